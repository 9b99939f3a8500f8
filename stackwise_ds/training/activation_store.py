"""A file of activations, one slot per training window: what the stack cache reads instead of a frozen forward.

A store is a folder::

    meta.json         the key (the frozen prefix's weights and the data), shapes and dtype; written last
    activations.bin   [capacity, T, D] in the storage dtype (fp32, or bf16 kept as its 16 bits)
    sums.bin          [capacity] uint64: 0 = empty, else the slot's checksum (``slot_sums``)

Slot ``i`` holds window ``i`` of the training split (its dataset index), so every rank of a node shares
one store: a window one data-parallel replica computed is read by whichever replica meets it next.
Ranks write disjoint slots, the activations before the checksum. A slot counts only when its checksum
matches, so a write cut short by a crash, or a slot damaged since, reads as empty and is computed again
(``corrupt`` counts them). The checksum is a wrapping sum of the slot's 64-bit words, about 10x faster
than a CRC (it is verified on every read), which any changed word, torn page or flipped bit shows. Both
files are allocated in full when the store is made (``posix_fallocate``): a full disk fails then, with
``OSError``, never later inside a memory map.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ..enums import CacheDtype

META, ACTIVATIONS, SUMS = "meta.json", "activations.bin", "sums.bin"
CHECKSUM = "sum64"  # the checksum's name in meta.json: a store made with another is made again
REMOVING = ".removing"  # the suffix of a store being deleted
_NUMPY = {CacheDtype.FP32: np.float32, CacheDtype.BF16: np.uint16}  # bf16 bits held as uint16
TORCH_DTYPE = {CacheDtype.FP32: torch.float32, CacheDtype.BF16: torch.bfloat16}


@dataclass(frozen=True)
class StoreMeta:
    key: str  # the frozen prefix's weights, the data and the storage dtype (``stack_cache.prefix_key``)
    boundary: int  # the last pipeline layer whose output the store holds
    n_windows: int  # windows in the training split
    capacity: int  # slots: windows [0, capacity) are kept (training.stack_cache_max_gb)
    seq_len: int
    d_model: int
    dtype: CacheDtype  # fp32 or bf16 (training.stack_cache_dtype 'auto' is resolved before)
    checksum: str = CHECKSUM

    @property
    def slot_bytes(self) -> int:
        return self.seq_len * self.d_model * np.dtype(_NUMPY[self.dtype]).itemsize


def slots_within(max_gb: float, n_windows: int, seq_len: int, d_model: int, dtype: CacheDtype) -> int:
    """How many of ``n_windows`` windows a store of at most ``max_gb`` GiB keeps."""
    slot_bytes = seq_len * d_model * np.dtype(_NUMPY[dtype]).itemsize
    return min(n_windows, int(max_gb * 2**30) // slot_bytes)


def slot_sums(rows: np.ndarray) -> np.ndarray:
    """[n, ...] -> [n] uint64: each row's bytes summed as 64-bit words (narrower where its size needs), wrapping;
    a sum of 0 becomes 1, as 0 marks an empty slot."""
    flat = rows.reshape(len(rows), -1).view(np.uint8)
    width = next(w for w in (np.uint64, np.uint32, np.uint16, np.uint8) if flat.shape[1] % np.dtype(w).itemsize == 0)
    sums = flat.view(width).sum(axis=1, dtype=np.uint64)
    sums[sums == 0] = 1
    return sums


def read_meta(folder: Path) -> StoreMeta | None:
    """The store's description, or None when ``folder`` holds no finished store of this format."""
    try:
        raw = json.loads((folder / META).read_text())
        meta = StoreMeta(**{**raw, "dtype": CacheDtype(raw["dtype"])})
    except (OSError, ValueError, TypeError, KeyError):
        return None
    return meta if raw.get("checksum") == CHECKSUM else None


def create_store(folder: Path, meta: StoreMeta) -> None:
    """Allocate an empty store in ``folder``; ``OSError`` (a full disk, no permission) leaves no store behind."""
    folder.mkdir(parents=True, exist_ok=True)
    try:
        _allocate(folder / ACTIVATIONS, meta.capacity * meta.slot_bytes)
        _allocate(folder / SUMS, meta.capacity * 8)
        tmp = folder / (META + ".tmp")
        tmp.write_text(json.dumps({**asdict(meta), "dtype": str(meta.dtype)}))
        os.replace(tmp, folder / META)
    except OSError:
        for name in (META + ".tmp", ACTIVATIONS, SUMS):
            (folder / name).unlink(missing_ok=True)
        raise


def remove_store(folder: Path) -> None:
    """Delete a store so that a kill half-way never leaves one that opens: it is renamed first (atomically, out of
    every key's name), then deleted; ``sweep_removed`` finishes what a kill interrupted."""
    sweep_removed(folder.parent)
    doomed = folder.with_name(folder.name + REMOVING)
    try:
        os.rename(folder, doomed)
    except OSError:
        return  # removed already (by another rank, or an earlier launch)
    shutil.rmtree(doomed, ignore_errors=True)


def sweep_removed(root: Path) -> None:
    """Delete the stores whose removal a kill interrupted (``root`` may be gone: another rank removed it)."""
    try:
        doomed = [folder for folder in root.iterdir() if folder.name.endswith(REMOVING)]
    except OSError:
        return
    for folder in doomed:
        shutil.rmtree(folder, ignore_errors=True)


def _allocate(path: Path, size: int) -> None:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        if size:
            os.posix_fallocate(fd, 0, size)  # zero-filled: every checksum reads 0, empty
    finally:
        os.close(fd)


class ActivationStore:
    """An open store: ``get`` the kept windows' activations, ``put`` new ones (see the module docstring)."""

    def __init__(self, folder: Path, meta: StoreMeta):
        self.folder = folder
        self.meta = meta
        self.dtype = TORCH_DTYPE[meta.dtype]
        shape = (meta.capacity, meta.seq_len, meta.d_model)
        self.slots = np.memmap(folder / ACTIVATIONS, dtype=_NUMPY[meta.dtype], mode="r+", shape=shape)
        self.sums = np.memmap(folder / SUMS, dtype=np.uint64, mode="r+", shape=(meta.capacity,))
        self.corrupt = 0  # slots found written but failing their checksum (computed again)

    @classmethod
    def open(cls, folder: Path) -> ActivationStore | None:
        meta = read_meta(folder)
        if meta is None or meta.capacity == 0:
            return None
        try:
            return cls(folder, meta)
        except (OSError, ValueError):  # its data files gone or cut short (a store half-deleted by an older version)
            return None

    def filled(self) -> np.ndarray:
        """Window ids whose slot was written (their checksums are checked when read)."""
        return np.flatnonzero(self.sums != 0)

    def get(self, ids: np.ndarray, out: torch.Tensor | None = None) -> tuple[np.ndarray, torch.Tensor]:
        """(hit mask over ``ids``, the hits' activations [hits, T, D] in the storage dtype, in order), read into
        the first rows of ``out`` (a CPU tensor [>= len(ids), T, D] of that dtype, e.g. a pinned one) when given."""
        ids = np.asarray(ids, dtype=np.int64)
        kept = ids < self.meta.capacity
        kept[kept] = self.sums[ids[kept]] != 0
        windows = ids[kept]
        shape = (len(windows), self.meta.seq_len, self.meta.d_model)
        rows = torch.empty(shape, dtype=self.dtype) if out is None else out[:len(windows)]
        if len(windows):
            np.take(self.slots, windows, axis=0, out=_as_numpy(rows), mode="clip")  # straight into ``rows``
            intact = slot_sums(_as_numpy(rows)) == self.sums[windows]
            if not intact.all():
                self.corrupt += int((~intact).sum())
                kept[np.flatnonzero(kept)[~intact]] = False
                rows = rows[torch.from_numpy(intact)]
        return kept, rows

    def put(self, ids: np.ndarray, activations: torch.Tensor) -> None:
        """Keep ``activations`` [len(ids), T, D] (any device and dtype) of windows ``ids`` (those within the
        capacity): converted to the storage dtype where they are, then one copy to the host."""
        ids = np.asarray(ids, dtype=np.int64)
        kept = ids < self.meta.capacity
        if not kept.any():
            return
        fresh = activations.detach()
        if not kept.all():
            fresh = fresh[torch.from_numpy(np.flatnonzero(kept)).to(fresh.device)]
        rows = _as_numpy(fresh.to(self.dtype).cpu())
        self.slots[ids[kept]] = rows
        self.sums[ids[kept]] = slot_sums(rows)  # after the activations: a torn write reads as empty


def _as_numpy(rows: torch.Tensor) -> np.ndarray:
    """A numpy view of a CPU tensor of a storage dtype (bf16 as its uint16 bits)."""
    return rows.view(torch.int16).numpy().view(np.uint16) if rows.dtype == torch.bfloat16 else rows.numpy()
