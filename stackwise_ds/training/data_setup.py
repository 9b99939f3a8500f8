"""The run's data, from ``config.data``: a resumable training stream and fixed validation batches."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

from ..config import ConfigError, DataConfig, ModelConfig, StackWiseConfig, TrainingConfig
from ..data import (
    TOKENIZER_FILE,
    Tokenizer,
    TrainBatchStream,
    build_datasets,
    check_enough_data,
    make_tokenizer,
    padded_val_batch,
    val_batches,
)
from ..enums import TokenizerKind


class RunData:
    """This rank's training stream, positioned anew at any global sample count."""

    def __init__(self, train, *, global_batch_size: int, micro_batch_size: int, dp_rank: int, dp_size: int,
                 seed: int, with_window_ids: bool = False):
        self.train = train
        self.kwargs = dict(global_batch_size=global_batch_size, micro_batch_size=micro_batch_size,
                           dp_rank=dp_rank, dp_world_size=dp_size, seed=seed, with_window_ids=with_window_ids)

    def at_position(self, consumed_samples: int) -> TrainBatchStream:
        return TrainBatchStream(self.train, consumed_samples=consumed_samples, **self.kwargs)

    def with_window_ids(self) -> RunData:
        """The same stream, each micro-batch's inputs paired with its rows' dataset indices (the stack cache's keys)."""
        keyed = copy.copy(self)
        keyed.kwargs = {**self.kwargs, "with_window_ids": True}
        return keyed


def load_bundle(config: StackWiseConfig, tokenizer: Tokenizer | None = None):
    """The run's datasets (with their tokenizer): tokenised by ``tokenizer`` when given (a trained model's),
    else as data.tokenizer says."""
    d, t = config.data, config.training
    if not t.progress_bar:  # datasets' own bars (split generation, tokenising) follow training.progress_bar
        import datasets

        datasets.disable_progress_bars()
    bundle = build_datasets(source=d.source, paths=d.paths, hf_name=d.hf_name, hf_config=d.hf_config,
                            hf_split=d.hf_split, text_field=d.text_field, seq_len=d.seq_len,
                            val_fraction=d.val_fraction, seed=t.seed, objective=t.objective, mask_prob=d.mask_prob,
                            max_files=d.max_files, max_bytes=d.max_bytes, cache_dir=d.cache_dir,
                            tokenizer=tokenizer or d.tokenizer, vocab_size=config.model.vocab_size)
    return bundle


def print_data_summary(data: DataConfig, model: ModelConfig, bundle) -> None:
    """One line on the data (cache hit or build, tokens, tokenizer), and a warning line for a short BPE."""
    from ..data.build import describe_bundle

    for line in describe_bundle(bundle, data.tokenizer, model.vocab_size):
        print(f"[stackwise] {line}", flush=True)


def validation_note(n_val: int, micro_batch_size: int, eval_batches: int) -> str | None:
    """Rank 0's line at start when validation is missing or thinner than one micro-batch (else None)."""
    if n_val == 0 or eval_batches == 0:
        reason = "training.eval_batches is 0" if n_val else "the data has no validation windows"
        return (f"note: {reason}: no validation runs and validation losses read n/a (null in results.json); "
                "set data.val_fraction > 0 and training.eval_batches > 0 to validate")
    if n_val < micro_batch_size:
        return (f"warning: the validation split holds {n_val} window(s), fewer than one micro-batch "
                f"(training.micro_batch_size {micro_batch_size}): each validation is the loss over those {n_val}; "
                "raise data.val_fraction or data.max_bytes for a steadier figure")
    return None


def run_tokenizer(data: DataConfig, model: ModelConfig, bundle) -> Tokenizer | None:
    """The tokenizer of the run's data; None when unknown (a user's dataloader with a 'bpe' config,
    or a vocabulary too small for the configured tokenizer)."""
    if bundle is not None:
        return bundle.tokenizer
    if data.tokenizer == TokenizerKind.BPE:
        return None
    try:
        tokenizer = make_tokenizer(data.tokenizer)
    except ValueError:
        return None
    return tokenizer if tokenizer.vocab_size <= model.vocab_size else None


def save_tokenizer(data: DataConfig, model: ModelConfig, bundle, directory: Path) -> None:
    """Put the run's tokenizer.json into ``directory`` (a checkpoint tag), so tools need nothing else."""
    tokenizer = run_tokenizer(data, model, bundle)
    if tokenizer is not None:
        tokenizer.save(Path(directory) / TOKENIZER_FILE)


def check_run_data(model: ModelConfig, bundle, global_batch: int) -> None:
    """Fail on every rank alike, before any collective, when the data cannot feed this run."""
    if bundle.tokenizer.vocab_size > model.vocab_size:
        raise ConfigError(f"model.vocab_size ({model.vocab_size}) is smaller than the tokenizer's "
                          f"{bundle.tokenizer.vocab_size} tokens: "
                          f"set model.vocab_size >= {bundle.tokenizer.vocab_size}")
    check_enough_data(bundle.train, global_batch)


def replica_data(t: TrainingConfig, bundle, global_batch: int, dp_rank: int, dp_size: int):
    """(training source, validation micro-batches) of data-parallel replica ``dp_rank`` of ``dp_size``.

    The global sample order and the validation set do not depend on ``dp_size``: a phase that
    changes the data-parallel degree continues at the same sample and validates on the same data."""
    train = RunData(bundle.train, global_batch_size=global_batch, micro_batch_size=t.micro_batch_size,
                    dp_rank=dp_rank, dp_size=dp_size, seed=t.seed)
    return train, validation_set(bundle.val, t.micro_batch_size, t.eval_batches, dp_rank, dp_size)


@dataclass
class ValidationSet:
    """This replica's share of the run's validation micro-batches, padded to the same count on
    every replica (a pipeline pass needs equal counts): only the first ``real`` count."""

    batches: list
    real: int


def validation_set(val, micro_batch_size: int, eval_batches: int, dp_rank: int, dp_size: int) -> ValidationSet | None:
    """The first ``eval_batches`` held-out micro-batches, dealt round-robin to the replicas; a split smaller than
    one micro-batch is that one batch, padded with rows the loss ignores; None without a split.

    The set is the same for every data-parallel degree, so validation losses of phases with
    different layouts compare exactly; replicas with one batch fewer repeat a batch that is not counted."""
    if len(val) == 0 or eval_batches == 0:
        return None
    if len(val) < micro_batch_size:
        batches = [padded_val_batch(val, micro_batch_size)]
    else:
        batches = list(val_batches(val, micro_batch_size, eval_batches))
    mine = batches[dp_rank::dp_size]
    padding = [batches[0]] * (-(-len(batches) // dp_size) - len(mine))
    return ValidationSet(mine + padding, len(mine))
