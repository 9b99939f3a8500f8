"""The run's data, from ``config.data``: a resumable training stream and fixed validation batches."""

from __future__ import annotations

from ..config import ConfigError, StackWiseConfig
from ..data import TrainBatchStream, build_datasets, check_enough_data, val_batches


class RunData:
    """This rank's training stream, positioned anew at any global sample count."""

    def __init__(self, train, *, global_batch_size: int, micro_batch_size: int, dp_rank: int, dp_size: int,
                 seed: int):
        self.train = train
        self.kwargs = dict(global_batch_size=global_batch_size, micro_batch_size=micro_batch_size,
                           dp_rank=dp_rank, dp_world_size=dp_size, seed=seed)

    def at_position(self, consumed_samples: int) -> TrainBatchStream:
        return TrainBatchStream(self.train, consumed_samples=consumed_samples, **self.kwargs)


def load_bundle(config: StackWiseConfig):
    d, t = config.data, config.training
    return build_datasets(source=d.source, paths=d.paths, hf_name=d.hf_name, hf_config=d.hf_config,
                          hf_split=d.hf_split, text_field=d.text_field, seq_len=d.seq_len,
                          val_fraction=d.val_fraction, seed=t.seed, objective=t.objective, mask_prob=d.mask_prob,
                          max_files=d.max_files, max_bytes=d.max_bytes, cache_dir=d.cache_dir)


def build_run_data(config: StackWiseConfig, pipe, dp_size: int, val_data=None):
    """(training source, validation micro-batches) for this rank."""
    # Every rank builds (or loads) at once: the cache lets one process tokenise while the others
    # wait on its lock, and a bad data setting fails on every rank alike, before any collective.
    bundle = load_bundle(config)
    t = config.training
    if bundle.tokenizer.vocab_size > config.model.vocab_size:
        raise ConfigError(f"model.vocab_size ({config.model.vocab_size}) is smaller than the tokenizer's "
                          f"{bundle.tokenizer.vocab_size} tokens: set model.vocab_size >= {bundle.tokenizer.vocab_size}")
    global_batch = t.micro_batch_size * t.gradient_accumulation_steps * dp_size
    check_enough_data(bundle.train, global_batch)
    dp_rank = pipe._grid.get_data_parallel_id()
    train = RunData(bundle.train, global_batch_size=global_batch, micro_batch_size=t.micro_batch_size,
                    dp_rank=dp_rank, dp_size=dp_size, seed=t.seed)
    if val_data is None:
        val_data = _validation_batches(bundle.val, t.micro_batch_size, t.eval_batches, dp_rank, dp_size)
    return train, val_data


def _validation_batches(val, micro_batch_size: int, eval_batches: int, dp_rank: int, dp_size: int):
    """The same number of validation micro-batches on every replica (a pipeline pass needs equal counts)."""
    available = min(eval_batches, len(val) // micro_batch_size)
    usable = available // dp_size * dp_size
    if usable == 0:
        return None  # too little held-out data for one micro-batch per replica: validation is skipped
    return list(val_batches(val, micro_batch_size, usable, dp_rank=dp_rank, dp_world_size=dp_size))
