"""The run's data as each phase's replicas read it: the user's loaders, or those built from config.data."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from ..config import ConfigError, StackWiseConfig
from ..placement import PhaseLayout


def load_run_bundle(config: StackWiseConfig, global_batch: int, init_dir: Path | None, output_dir: Path, rank: int):
    """The run's datasets (every rank loads them; the cache lets one tokenise while others wait)."""
    from ..data import TOKENIZER_FILE
    from .data_setup import check_run_data, load_bundle, print_data_summary
    from .init_weights import check_run_tokenizer

    bundle = load_bundle(config)
    check_run_data(config, bundle, global_batch)
    check_run_tokenizer(init_dir, config.training.init_from, bundle.tokenizer, config.data.tokenizer)
    if rank == 0:  # <output_dir>/tokenizer.json: the run's tokens, for tools and users
        bundle.tokenizer.save(output_dir / TOKENIZER_FILE)
        print_data_summary(config, bundle)
    return bundle


class DataFeeds:
    """Hands each placement its replica's training source and validation set."""

    def __init__(self, config: StackWiseConfig, world_size: int, global_batch: int, bundle,
                 dataloader: Iterable | None, val_data: Iterable | None):
        self.config = config
        self.world_size = world_size
        self.global_batch = global_batch
        self.bundle = bundle  # the data of config.data; None with the user's dataloader
        self.dataloader = dataloader
        self.val_data = val_data

    def replica(self, layout: PhaseLayout, dp_rank: int):
        """(training source, validation set) of data-parallel replica ``dp_rank`` in ``layout``."""
        if self.dataloader is None:
            from .data_setup import replica_data

            train, val = replica_data(self.config, self.bundle, self.global_batch, dp_rank, layout.data_parallel)
            return train, (val if self.val_data is None else _as_validation_set(self.val_data))
        base_dp = self.world_size // self.config.pipeline_stages
        if layout.data_parallel != base_dp:
            raise ConfigError(
                f"the dataloader given to train_architecture feeds {base_dp} data-parallel replica(s), but this "
                f"phase's {layout.describe()} has {layout.data_parallel}: set parallel.phase_layout=fixed, or "
                "let the trainer build the data from config.data (it re-splits the global batch per phase)")
        return self.dataloader, None if self.val_data is None else _as_validation_set(self.val_data)

    def save_tokenizer(self, directory: Path) -> None:
        """Put the run's tokenizer.json into ``directory`` (a checkpoint tag)."""
        from .data_setup import save_tokenizer

        save_tokenizer(self.config, self.bundle, directory)


def _as_validation_set(batches):
    from .data_setup import ValidationSet

    batches = list(batches)
    return ValidationSet(batches, len(batches)) if batches else None
