"""A file of activations, one slot per training window: what the stack cache reads instead of a frozen forward.

A store is a folder::

    meta.json         the key (the frozen prefix's weights and the data), shapes and dtype; written last
    activations.bin   [capacity, T, D] in the storage dtype (fp32, or bf16 kept as its 16 bits)
    sums.bin          [capacity] uint64: 0 = empty, else 1 << 32 | crc32 of the slot's bytes

Slot ``i`` holds window ``i`` of the training split (its dataset index), so every rank of a node shares
one store: a window one data-parallel replica computed is read by whichever replica meets it next.
Ranks write disjoint slots. A slot counts only when its checksum matches, so a write cut short by a
crash reads as empty and is computed again. Both files are allocated in full when the store is made
(``posix_fallocate``): a full disk fails then, with ``OSError``, never later inside a memory map.
"""

from __future__ import annotations

import json
import os
import shutil
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ..enums import CacheDtype

META, ACTIVATIONS, SUMS = "meta.json", "activations.bin", "sums.bin"
REMOVING = ".removing"  # the suffix of a store being deleted
FILLED = np.uint64(1 << 32)
_NUMPY = {CacheDtype.FP32: np.float32, CacheDtype.BF16: np.uint16}  # bf16 bits held as uint16


@dataclass(frozen=True)
class StoreMeta:
    key: str  # the frozen prefix's weights, the data and the storage dtype (``stack_cache.prefix_key``)
    boundary: int  # the last pipeline layer whose output the store holds
    n_windows: int  # windows in the training split
    capacity: int  # slots: windows [0, capacity) are kept (training.stack_cache_max_gb)
    seq_len: int
    d_model: int
    dtype: CacheDtype

    @property
    def slot_bytes(self) -> int:
        return self.seq_len * self.d_model * np.dtype(_NUMPY[self.dtype]).itemsize


def slots_within(max_gb: float, n_windows: int, seq_len: int, d_model: int, dtype: CacheDtype) -> int:
    """How many of ``n_windows`` windows a store of at most ``max_gb`` GiB keeps."""
    slot_bytes = seq_len * d_model * np.dtype(_NUMPY[dtype]).itemsize
    return min(n_windows, int(max_gb * 2**30) // slot_bytes)


def read_meta(folder: Path) -> StoreMeta | None:
    """The store's description, or None when ``folder`` holds no finished store."""
    try:
        raw = json.loads((folder / META).read_text())
        return StoreMeta(**{**raw, "dtype": CacheDtype(raw["dtype"])})
    except (OSError, ValueError, TypeError, KeyError):
        return None


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
        self.corrupt = 0  # reads of a written slot whose checksum failed (computed again instead)
        shape = (meta.capacity, meta.seq_len, meta.d_model)
        self.slots = np.memmap(folder / ACTIVATIONS, dtype=_NUMPY[meta.dtype], mode="r+", shape=shape)
        self.sums = np.memmap(folder / SUMS, dtype=np.uint64, mode="r+", shape=(meta.capacity,))

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

    def get(self, ids: np.ndarray) -> tuple[np.ndarray, torch.Tensor]:
        """(hit mask over ``ids``, float32 activations [hits, T, D] of the hits in order)."""
        hit = np.zeros(len(ids), dtype=bool)
        rows = []
        for n, window in enumerate(ids):
            if window < self.meta.capacity and self.sums[window] != 0:
                row = np.array(self.slots[window])
                if self.sums[window] == FILLED | np.uint64(zlib.crc32(row)):
                    hit[n] = True
                    rows.append(row)
                else:
                    self.corrupt += 1
        return hit, self._decode(np.stack(rows)) if rows else torch.empty(0)

    def put(self, ids: np.ndarray, activations: torch.Tensor) -> None:
        """Keep ``activations`` [len(ids), T, D] of windows ``ids`` (those within the capacity)."""
        encoded = self._encode(activations)
        for window, row in zip(ids, encoded, strict=True):
            if window < self.meta.capacity:
                self.slots[window] = row
                self.sums[window] = FILLED | np.uint64(zlib.crc32(np.ascontiguousarray(row)))

    def round_trip(self, activations: torch.Tensor) -> torch.Tensor:
        """What a later ``get`` returns for ``activations`` (bf16 storage rounds), as float32."""
        return self._decode(self._encode(activations))

    def _encode(self, activations: torch.Tensor) -> np.ndarray:
        x = activations.detach().to("cpu", torch.float32)
        if self.meta.dtype == CacheDtype.BF16:
            return x.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
        return x.numpy()

    def _decode(self, rows: np.ndarray) -> torch.Tensor:
        if self.meta.dtype == CacheDtype.BF16:
            return torch.from_numpy(rows.view(np.int16).copy()).view(torch.bfloat16).float()
        return torch.from_numpy(rows)
