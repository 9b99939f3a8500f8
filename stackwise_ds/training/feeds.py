"""The run's data as each phase's replicas read it: the user's loaders, or those built from config.data."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from ..config import ConfigError, DataConfig, ModelConfig, TrainingConfig
from ..enums import PhaseData, StackCache
from ..placement import PhaseLayout


class DataFeeds:
    """Hands each placement its replica's training source and validation set."""

    def __init__(self, *, training: TrainingConfig, data: DataConfig, model: ModelConfig, base_dp: int,
                 global_batch: int, bundle, dataloader: Iterable | None, val_data: Iterable | None):
        self.training = training
        self.data = data
        self.model = model
        self.base_dp = base_dp  # the run's data-parallel degree: the replicas a user's dataloader feeds
        self.global_batch = global_batch
        self.bundle = bundle  # the data of config.data (every rank loads it); None with the user's dataloader
        self.dataloader = dataloader
        self.val_data = val_data
        if dataloader is not None:
            check_user_dataloader(training)

    def check_bundle(self, init_dir: Path | None, output_dir: Path, rank: int) -> None:
        """Before any collective: the run's data fits the model and the tokenizer of ``init_dir`` (the
        initial weights, if any); rank 0 writes <output_dir>/tokenizer.json and describes the data."""
        from ..data import TOKENIZER_FILE
        from .data_setup import check_run_data, print_data_summary, validation_note
        from .init_weights import check_run_tokenizer

        bundle = self.bundle
        check_run_data(self.model, bundle, self.global_batch)
        check_run_tokenizer(init_dir, self.training.init_from, bundle.tokenizer, self.data.tokenizer)
        if rank == 0:  # <output_dir>/tokenizer.json: the run's tokens, for tools and users
            bundle.tokenizer.save(output_dir / TOKENIZER_FILE)
            print_data_summary(self.data, self.model, bundle)
            note = validation_note(len(bundle.val), self.training.micro_batch_size, self.training.eval_batches)
            if note is not None and self.val_data is None:
                print(f"[stackwise] {note}", flush=True)

    def replica(self, layout: PhaseLayout, dp_rank: int):
        """(training source, validation set) of data-parallel replica ``dp_rank`` in ``layout``."""
        if self.dataloader is None:
            from .data_setup import replica_data

            train, val = replica_data(self.training, self.bundle, self.global_batch, dp_rank, layout.data_parallel)
            return train, (val if self.val_data is None else _as_validation_set(self.val_data))
        base_dp = self.base_dp
        if layout.data_parallel != base_dp:
            raise ConfigError(
                f"the dataloader given to train_architecture feeds {base_dp} data-parallel replica(s), but this "
                f"phase's {layout.describe()} has {layout.data_parallel}: set parallel.phase_layout=fixed, or "
                "let the trainer build the data from config.data (it re-splits the global batch per phase)")
        return self.dataloader, None if self.val_data is None else _as_validation_set(self.val_data)

    def save_tokenizer(self, directory: Path) -> None:
        """Put the run's tokenizer.json into ``directory`` (a checkpoint tag)."""
        from .data_setup import save_tokenizer

        save_tokenizer(self.data, self.model, self.bundle, directory)


def check_user_dataloader(training: TrainingConfig) -> None:
    """Settings that need the data of config.data (its sample order, its window indices), not a user's loader."""
    if training.phase_data == PhaseData.REPEAT:
        raise ConfigError("training.phase_data 'repeat' starts every phase at the first window again, which a "
                          "dataloader passed to train_architecture cannot do: let the trainer build the data from "
                          "config.data, or set phase_data 'continue'")
    if training.stack_cache == StackCache.DISK:
        raise ConfigError("training.stack_cache 'disk' keys activations by each window's index in the data of "
                          "config.data, which a dataloader passed to train_architecture does not give: let the trainer "
                          "build the data, or set stack_cache 'off'")


def _as_validation_set(batches):
    from .data_setup import ValidationSet

    batches = list(batches)
    return ValidationSet(batches, len(batches)) if batches else None
