"""training.stack_cache: keep the frozen prefix's output per training window, so a window that comes again skips it.

In a phase whose embedding and first units are frozen (``prefix: frozen``, phases after the first), the
activations entering the first training layer depend only on the window. ``ActivationCache.attach`` (every
rank, after each phase's engine is built) serves them from an ``ActivationStore`` on the first stage:

* the store is keyed by the frozen prefix's weights (and their frozen precision), the training data and
  the storage dtype, so a resumed run finds its store again and a changed prefix never reads a stale one;
* at a phase change, the store of the previous prefix advances by one unit: the just-frozen layers run
  forward once over its windows (shared out over the node's first-stage ranks), instead of the whole
  prefix from the embedding when each window comes again; the old store is then removed;
* it is the node's (``<stack_cache_dir>/<host>/<key>``): the first-stage ranks of a node read and write
  one store, whatever replica meets a window;
* a store that cannot be allocated (a full disk, no permission) leaves the phase computing, with one
  warning; so does a layout that spreads the prefix over several stages (the cache lives on the first);
* it stores the activations in their own dtype by default (``stack_cache_dtype: auto``: bf16 on bf16 runs), so
  a read is exact; slots failing their checksum are computed again, with one warning that counts them; and it
  warns once when the planner predicts that running the prefix is cheaper than reading it (a GPU's forward
  usually is: ``placement.cached_prefix_seconds``).

The training stream then carries each row's window index (``RunData.with_window_ids``). At the run's
clean end the stores are removed.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import socket
from pathlib import Path

import numpy as np
import torch

from ..config import ModelConfig, TrainingConfig
from ..console import human_size
from ..enums import CacheDtype, Precision, StackCache
from ..layout import cached_boundary
from ..parallel import distributed
from ..parallel.ds_config import resolve_precision
from ..parallel.prefix_cache import advance_store, install_prefix_cache
from ..parallel.roles import unwrap
from ..placement import PhaseLayout, cached_prefix_seconds
from .activation_store import (
    ActivationStore,
    StoreMeta,
    create_store,
    read_meta,
    remove_store,
    slots_within,
    sweep_removed,
)


class ActivationCache:
    """The run's stack cache: attached to each phase's first stage, removed at the run's end."""

    def __init__(self, training: TrainingConfig, model: ModelConfig, output_dir: Path, seq_len: int, rank: int):
        self.training = training
        self.model = model
        self.root = Path(training.stack_cache_dir or output_dir / "stack_cache") / socket.gethostname()
        self.seq_len, self.d_model = seq_len, model.d_model
        self.dtype = storage_dtype(training)
        self.rank = rank
        self.prefix = None  # this phase's CachedPrefix on this rank, if any
        self.advanced = 0  # windows the phase's start advanced on this rank
        self.advance_corrupt = 0  # slots of the previous store that failed their checksum while advancing
        self.applies = False  # whether the phase has a frozen prefix to cache (the same on every rank)
        self.stores: set[Path] = set()  # the stores this launch used (removed at the end)
        self._warned: set[str] = set()  # the kinds of fallback already reported

    @staticmethod
    def wanted(training: TrainingConfig) -> bool:
        return training.stack_cache == StackCache.DISK

    def attach(self, pipe, layer_roles: list[str], layout: PhaseLayout, train_source):
        """Collective. Serve this phase's frozen prefix from the store on the first stage; returns the training
        source the phase reads (its rows carrying window ids where the cache is installed)."""
        self.prefix, self.advanced, self.advance_corrupt, self.applies = None, 0, 0, False
        boundary = cached_boundary(layer_roles)
        if boundary is None:
            return train_source
        self.applies = True
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
        slower = reading_is_slower(self.model, self.seq_len, boundary, self.dtype, device_type)
        if slower is not None:
            self._warn("slower", slower)
        if layout.parts[1] <= boundary:
            self._warn("stages", f"the frozen prefix (layers 0-{boundary}) spans {layout.stage_of(boundary) + 1} "
                       "pipeline stages but the cache needs it on the first: this phase runs it (parallel.phase_layout "
                       "'elastic', fewer parallel.pipeline_stages or a higher parallel.max_rank_memory_mb place it "
                       "on one)")
            return train_source
        first_stage = pipe.stage_id == 0
        store = self._prepare(pipe, boundary, train_source.train, first_stage)
        if store is None:
            return train_source
        self.prefix = install_prefix_cache(pipe, boundary, store, self.d_model)
        return train_source.with_window_ids()

    def _prepare(self, pipe, boundary: int, dataset, first_stage: bool) -> ActivationStore | None:
        """Collective: the node's leader makes (or finds) the store, then the first-stage ranks open it and
        advance the previous prefix's store into it."""
        keys = prefix_keys(pipe, boundary, dataset, self.dtype) if first_stage else []
        here = self._first_stage_ranks_here(first_stage)
        leader = first_stage and here[0] == self.rank  # makes the node's store
        meta = self._meta(keys[-1], boundary, len(dataset)) if first_stage else None
        if leader:
            self._make_store(meta)
        distributed.barrier()
        store = ActivationStore.open(self.root / meta.key) if first_stage else None
        previous = self._previous_store(keys) if store is not None else None
        if previous is not None:
            self._advance(pipe, previous, store, here)
        distributed.barrier()
        if leader and previous is not None:
            remove_store(previous.folder)
        if store is not None:
            self.stores.add(store.folder)
        return store

    def _meta(self, key: str, boundary: int, n_windows: int) -> StoreMeta:
        capacity = slots_within(self.training.stack_cache_max_gb, n_windows, self.seq_len, self.d_model, self.dtype)
        return StoreMeta(key, boundary, n_windows, capacity, self.seq_len, self.d_model, self.dtype)

    def _make_store(self, meta: StoreMeta) -> None:
        """The leader's part: reuse a finished store of this key (a resumed run), else allocate one."""
        if read_meta(self.root / meta.key) == meta:
            return
        if meta.capacity < meta.n_windows:
            need = human_size(meta.n_windows * meta.slot_bytes)
            self._warn("bound", f"training.stack_cache_max_gb ({self.training.stack_cache_max_gb}) holds "
                       f"{meta.capacity} of the {meta.n_windows} training windows; the others run the frozen prefix "
                       f"every time (all of them need {need})", every_rank=True)
        if meta.capacity == 0:
            return
        try:
            create_store(self.root / meta.key, meta)
        except OSError as exc:
            self._warn("allocate", allocation_failure(self.root, meta.capacity * meta.slot_bytes, exc), every_rank=True)

    def _previous_store(self, keys: list[str]) -> ActivationStore | None:
        """The store of a shorter frozen prefix of these weights (the previous phase's), if one is on disk."""
        for boundary in range(len(keys) - 2, 0, -1):
            store = ActivationStore.open(self.root / keys[boundary])
            if store is not None and store.meta.boundary == boundary:
                return store
        return None

    def _advance(self, pipe, previous: ActivationStore, store: ActivationStore, here: list[int]) -> None:
        """This rank's share (of the node's first-stage ranks ``here``) of the windows the previous store holds
        and the new one lacks."""
        mine = advance_share(previous, store, here.index(self.rank), len(here))
        self.advanced = advance_store(pipe, previous.meta.boundary, store.meta.boundary, previous, store, mine,
                                      self.training.micro_batch_size)
        self.advance_corrupt = previous.corrupt

    def _first_stage_ranks_here(self, first_stage: bool) -> list[int]:
        """Collective: the first-stage ranks of this rank's host, lowest first (the lowest makes its store)."""
        host = socket.gethostname()
        rows = distributed.all_gather_objects((self.rank, host, first_stage))
        return sorted(rank for rank, peer_host, first in rows if first and peer_host == host)

    def _warn(self, kind: str, message: str, every_rank: bool = False) -> None:
        """Once a run for each ``kind`` of fallback: on rank 0, or on each rank that meets it."""
        if kind not in self._warned and (every_rank or self.rank == 0):
            print(f"[stackwise] WARNING stack cache: {message}", flush=True)
        self._warned.add(kind)

    def phase_stats(self) -> dict[str, int] | None:
        """Collective: windows read from the store, run through the prefix, and advanced, the ranks serving
        them, and the slots that failed their checksum (computed again), over every rank; None in a phase
        without a frozen prefix. The first phase that finds corrupt slots warns, with their count."""
        if not self.applies:
            return None
        prefix = self.prefix
        local = [prefix.read, prefix.computed, 1, prefix.store.corrupt] if prefix is not None else [0, 0, 0, 0]
        rows = distributed.all_gather_floats([*local[:3], self.advanced, local[3] + self.advance_corrupt])
        names = ("read", "computed", "ranks", "advanced", "corrupt")
        stats = {name: int(sum(r[i] for r in rows)) for i, name in enumerate(names)}
        if stats["corrupt"]:
            self._warn("corrupt", corrupt_warning(stats["corrupt"], self.root))
        return stats

    def remove(self) -> None:
        """Collective, at the run's clean end: the stores are scratch; free their disk."""
        distributed.barrier()
        for folder in self.stores:
            remove_store(folder)
        sweep_removed(self.root)
        made_here = [self.root.parent] if self.training.stack_cache_dir is None else []  # <output_dir>/stack_cache
        for folder in (self.root, *made_here):
            with contextlib.suppress(OSError):  # not empty (another run's stores), or another rank was quicker
                folder.rmdir()


def storage_dtype(training: TrainingConfig) -> CacheDtype:
    """training.stack_cache_dtype with 'auto' resolved to the activations' own dtype (bf16 on bf16 runs, fp32
    on fp32 ones): exact, in the fewest bytes."""
    if training.stack_cache_dtype != CacheDtype.AUTO:
        return CacheDtype(training.stack_cache_dtype)
    return CacheDtype.BF16 if resolve_precision(training.precision) == Precision.BF16 else CacheDtype.FP32


def reading_is_slower(model: ModelConfig, seq_len: int, boundary: int, dtype: CacheDtype,
                      device_type: str) -> str | None:
    """The warning to give when the planner predicts that running the frozen prefix (pipeline layers 0..boundary)
    on ``device_type`` costs less than reading its output from the cache; None when reading is cheaper."""
    read_s, run_s = cached_prefix_seconds(model, seq_len, boundary, 2 if dtype == CacheDtype.BF16 else 4,
                                          device_type)
    if read_s <= run_s:
        return None
    return (f"the planner predicts that running the frozen prefix (layers 0-{boundary}) on {device_type} is cheaper "
            f"than reading its output from the cache (about {run_s * 1e6:.1f} vs {read_s * 1e6:.1f} us a window, "
            "at the rates placement.py assumes): training.stack_cache 'off' is likely faster here")


def corrupt_warning(count: int, root: Path) -> str:
    return (f"{count} cached window(s) failed their checksum (a torn write or a damaged disk) and were computed "
            f"again; the cache under {root} keeps serving the intact ones (later phases count them in their "
            "stack cache line)")
def allocation_failure(root: Path, size_bytes: int, exc: OSError) -> str:
    """Why a store could not be made in ``root``, and what to change (the phase then computes its prefix)."""
    if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return (f"could not create a store in {root}: it is read-only for this process ({exc.strerror or exc}); the "
                "frozen prefix runs every time (set training.stack_cache_dir to a folder this user can write)")
    return (f"could not allocate {human_size(size_bytes)} in {root} ({exc.strerror or exc}); the frozen prefix runs "
            "every time (free space, or set training.stack_cache_dir or a lower training.stack_cache_max_gb)")


def advance_share(previous: ActivationStore, store: ActivationStore, position: int, ranks: int) -> np.ndarray:
    """The windows rank ``position`` of ``ranks`` advances from ``previous`` into ``store``: its stride of the
    previous store's windows (which nobody writes meanwhile), less those the new store holds already (a resumed
    advance). The share must not depend on the new store's state, which the other ranks are writing: a rank that
    looked later would stride over a shorter list and skip windows that no rank then advances."""
    shared = previous.filled()[position::ranks]
    return np.asarray([w for w in shared if w < store.meta.capacity and store.sums[w] == 0], dtype=np.int64)


def prefix_keys(pipe, boundary: int, dataset, dtype: CacheDtype) -> list[str]:
    """keys[b]: the store key of the prefix ending at layer b (b <= ``boundary``): a digest of the data, the
    storage dtype and, layer by layer, the weights and frozen precision."""
    digest = hashlib.blake2b(f"{dtype}|{data_fingerprint(dataset)}".encode(), digest_size=16)
    precisions = getattr(pipe, "frozen_precision", None) or {}
    keys = []
    for layer in range(boundary + 1):
        digest.update(f"|{layer}:{precisions.get(layer, 'same')}".encode())
        for name, tensor in unwrap(pipe.forward_funcs[layer]).state_dict().items():
            digest.update(name.encode())
            digest.update(tensor.detach().to("cpu").contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        keys.append(digest.copy().hexdigest())
    return keys


def data_fingerprint(dataset) -> str:
    """The training split, recognisably: its size and a digest of a few windows at both ends and the middle."""
    n = len(dataset)
    digest = hashlib.blake2b(f"{n}".encode(), digest_size=16)
    for index in sorted({*range(min(n, 4)), n // 2, *range(max(0, n - 4), n)}):
        inputs, labels = dataset[index]
        digest.update(inputs.numpy().tobytes())
        digest.update(labels.numpy().tobytes())
    return digest.hexdigest()
