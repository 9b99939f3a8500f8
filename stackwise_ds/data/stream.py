"""Deterministic, resumable micro-batch order for data-parallel pipeline training.

The global sample order is an infinite concatenation of per-epoch permutations of the
training split (epoch e is shuffled with a generator seeded from (seed, e)). Global batch
of step s = positions [s*G, (s+1)*G) of that order. Data-parallel rank r of D owns the
contiguous slice [r*G/D, (r+1)*G/D) of it, which it yields as ``grad_accum`` micro-batches
of ``micro_batch_size``. The only state is ``consumed_samples`` (global), so stopping and
restarting anywhere on a step boundary reproduces the uninterrupted stream exactly.

Each ``next()`` returns ``(input_ids [mbs, T], labels [mbs, T])`` -- the data-iterator
format DeepSpeed's PipelineEngine consumes (it calls next() grad_accum times per step) -- or,
``with_window_ids``, ``((input_ids, window_ids [mbs]), labels)``: the dataset index of each row
travels with it to the first stage, where the stack cache keys activations by it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from .packing import IGNORE_INDEX, PackedDataset

ORDER_TAG = 0x0D3E


def check_enough_data(dataset: PackedDataset, global_batch_size: int) -> None:
    """Raise if the training split cannot fill a single global batch."""
    if len(dataset) < global_batch_size:
        raise ValueError(
            f"the training split has {len(dataset)} sequences of length {dataset.seq_len} but one "
            f"global batch needs {global_batch_size}: add data, lower training.micro_batch_size/"
            "gradient_accumulation_steps, or shorten data.seq_len"
        )


def collate(dataset: PackedDataset, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack samples -> (input_ids LongTensor[B, T], labels LongTensor[B, T])."""
    inputs, labels = zip(*(dataset[int(i)] for i in indices), strict=True)
    return torch.stack(inputs), torch.stack(labels)


class TrainBatchStream:
    """Infinite iterator of this rank's micro-batches; see the module docstring for the order.

    ``consumed_samples`` counts global samples of completed steps; it advances by
    ``global_batch_size`` after every ``grad_accum`` micro-batches. A ``state_dict()`` taken
    mid-step records the start of that step, so a resume replays the unfinished step (its
    optimizer update never happened).
    """

    def __init__(
        self, dataset: PackedDataset, *, global_batch_size: int, micro_batch_size: int,
        dp_rank: int, dp_world_size: int, seed: int, consumed_samples: int = 0,
        start_step: int | None = None, with_window_ids: bool = False,
    ) -> None:
        _validate_batch_geometry(global_batch_size, micro_batch_size, dp_rank, dp_world_size)
        if len(dataset) == 0:
            raise ValueError("the training split is empty: add data or lower data.val_fraction")
        if start_step is not None:
            if consumed_samples not in (0, start_step * global_batch_size):
                raise ValueError(
                    f"start_step={start_step} contradicts consumed_samples={consumed_samples}: pass only one"
                )
            consumed_samples = start_step * global_batch_size
        if consumed_samples < 0:
            raise ValueError(f"consumed_samples must be >= 0, got {consumed_samples}")
        self.dataset = dataset
        self.global_batch_size = global_batch_size
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_world_size = dp_world_size
        self.seed = seed
        self.grad_accum = global_batch_size // (micro_batch_size * dp_world_size)
        self.with_window_ids = with_window_ids
        self.consumed_samples = consumed_samples
        self._micro_step = 0  # micro-batches already yielded within the current step
        self._epoch_orders: dict[int, np.ndarray] = {}

    @property
    def step(self) -> int:
        """Number of completed global steps (exact when consumed_samples is a multiple of G)."""
        return self.consumed_samples // self.global_batch_size

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Permutation of the training split's sample indices for ``epoch``."""
        if epoch not in self._epoch_orders:
            if len(self._epoch_orders) >= 2:  # keep the current and the next epoch only
                self._epoch_orders.pop(min(self._epoch_orders))
            rng = np.random.default_rng(np.random.SeedSequence([self.seed, ORDER_TAG, epoch]))
            self._epoch_orders[epoch] = rng.permutation(len(self.dataset))
        return self._epoch_orders[epoch]

    def sample_indices(self, start: int, count: int) -> np.ndarray:
        """Dataset indices at global positions [start, start + count) of the infinite order."""
        n = len(self.dataset)
        positions = np.arange(start, start + count)
        epochs, offsets = np.divmod(positions, n)
        indices = np.empty(count, dtype=np.int64)
        for epoch in np.unique(epochs):  # a batch may straddle an epoch boundary
            in_epoch = epochs == epoch
            indices[in_epoch] = self.epoch_order(int(epoch))[offsets[in_epoch]]
        return indices

    def micro_batch_indices(self, consumed_samples: int, micro_step: int) -> np.ndarray:
        """This rank's ``micro_step``-th micro-batch of the step starting at ``consumed_samples``."""
        per_rank = self.micro_batch_size * self.grad_accum
        start = consumed_samples + self.dp_rank * per_rank + micro_step * self.micro_batch_size
        return self.sample_indices(start, self.micro_batch_size)

    def __iter__(self) -> TrainBatchStream:
        return self

    def __next__(self) -> tuple:
        indices = self.micro_batch_indices(self.consumed_samples, self._micro_step)
        inputs, labels = collate(self.dataset, indices)
        batch = ((inputs, torch.from_numpy(indices)), labels) if self.with_window_ids else (inputs, labels)
        self._micro_step += 1
        if self._micro_step == self.grad_accum:
            self._micro_step = 0
            self.consumed_samples += self.global_batch_size
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"consumed_samples": self.consumed_samples}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        consumed = int(state["consumed_samples"])
        if consumed < 0:
            raise ValueError(f"consumed_samples must be >= 0, got {consumed}")
        self.consumed_samples = consumed
        self._micro_step = 0


def _validate_batch_geometry(global_batch_size: int, micro_batch_size: int, dp_rank: int, dp_world_size: int) -> None:
    if micro_batch_size <= 0 or dp_world_size <= 0 or global_batch_size <= 0:
        raise ValueError(
            f"batch sizes and dp_world_size must be positive (global_batch_size={global_batch_size}, "
            f"micro_batch_size={micro_batch_size}, dp_world_size={dp_world_size})"
        )
    if not 0 <= dp_rank < dp_world_size:
        raise ValueError(f"dp_rank={dp_rank} is outside [0, dp_world_size={dp_world_size})")
    if global_batch_size % (micro_batch_size * dp_world_size) != 0:
        raise ValueError(
            f"global_batch_size={global_batch_size} is not divisible by micro_batch_size*dp_world_size="
            f"{micro_batch_size}*{dp_world_size}: set global_batch_size = micro_batch_size * "
            "gradient_accumulation_steps * dp_world_size"
        )


def val_batches(
    dataset: PackedDataset, micro_batch_size: int, max_batches: int | None = None, *,
    dp_rank: int = 0, dp_world_size: int = 1,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Validation micro-batches in dataset order (no shuffle), full batches only (fixed shapes).

    With dp_world_size > 1, rank r takes batches r, r + D, r + 2D, ... so ranks share the work.
    ``max_batches`` caps the number of batches counted globally (before sharding).
    Arguments are checked now, not at the first ``next()``.
    """
    _validate_batch_geometry(micro_batch_size * dp_world_size, micro_batch_size, dp_rank, dp_world_size)
    n_batches = len(dataset) // micro_batch_size
    if max_batches is not None:
        n_batches = min(n_batches, max_batches)
    return (
        collate(dataset, np.arange(b * micro_batch_size, (b + 1) * micro_batch_size))
        for b in range(dp_rank, n_batches, dp_world_size)
    )


def padded_val_batch(dataset: PackedDataset, micro_batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A split smaller than one micro-batch as one micro-batch (pipelines need fixed shapes): its windows, then
    copies of the first whose labels are all IGNORE_INDEX, so the loss is the mean over the real windows only."""
    if not 0 < len(dataset) < micro_batch_size:
        raise ValueError(f"padded_val_batch needs 1..{micro_batch_size - 1} windows, got {len(dataset)}")
    inputs, labels = collate(dataset, np.arange(len(dataset)))
    pad = micro_batch_size - len(dataset)
    ignored = torch.full((pad, labels.shape[1]), IGNORE_INDEX, dtype=labels.dtype)
    return torch.cat([inputs, inputs[:1].expand(pad, -1)]), torch.cat([labels, ignored])
