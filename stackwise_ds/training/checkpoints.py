"""Saving a run's checkpoints, and where a placement reads its layers from."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from ..checkpoint import files as ckpt
from ..config import TrainingConfig
from ..parallel import distributed
from ..parallel.tied import tied_weight_max_abs_diff
from .metrics import RunHistory
from .moments import save_moments
from .monitor import Monitor
from .phase_pipeline import PhasePipeline
from .save_errors import reporting_write_failures


class Checkpointer:
    """Writes checkpoint tags (with results.json, the tokenizer and the retention of old tags) and knows
    the newest one: where a new placement reads its layers."""

    def __init__(self, checkpoint_dir: Path, training: TrainingConfig, rank: int, monitor: Monitor,
                 history: RunHistory, write_tokenizer: Callable[[Path], None], weights_tag: str | None,
                 init_dir: Path | None):
        self.checkpoint_dir = checkpoint_dir
        self.training = training
        self.rank = rank
        self.monitor = monitor
        self.history = history
        self.write_tokenizer = write_tokenizer  # tools find the tokenizer in the tag folder
        self.weights_tag = weights_tag  # the newest checkpoint: where a new placement reads its layers
        self.init_dir = init_dir  # training.init_from's layer files, the weights before any checkpoint

    def weights_dir(self) -> Path | None:
        """Where a placement reads its layers: the newest checkpoint, else init_from's initial weights."""
        return self.checkpoint_dir / self.weights_tag if self.weights_tag is not None else self.init_dir

    def save(self, engine, pipeline: PhasePipeline, state: ckpt.TrainingState, moments: bool = False) -> None:
        """Checkpoint ``state``; ``moments``: also the per-layer optimizer moments the next phase starts from."""
        tag = ckpt.tag_for(state.global_step)
        self._check_tied_weights(pipeline, state)
        state.untied_head = pipeline.untied_head()  # the tools then read the head's own layer file
        if self.rank == 0:  # re-saving a tag (a resume from before it): never a marker over half-new files
            ckpt.unmark(self.checkpoint_dir, tag)
        distributed.barrier()
        with reporting_write_failures(self.checkpoint_dir, tag, self.rank):  # a full disk: a clear error
            self._write_tag(engine, pipeline, state, tag, moments)
        if self.rank == 0:
            self._announce_and_retire(tag)
        distributed.barrier()
        self.weights_tag = tag
        self.monitor.flush()

    def _check_tied_weights(self, pipeline: PhasePipeline, state: ckpt.TrainingState) -> None:
        state.tied_weight_max_abs_diff = tied_weight_max_abs_diff(pipeline.pipe)
        self.monitor.scalar("integrity/tied_weight_max_abs_diff", state.tied_weight_max_abs_diff, state.global_step)
        if state.tied_weight_max_abs_diff != 0.0:
            self.monitor.message(f"[stackwise] WARNING: tied weight copies differ by up to "
                                 f"{state.tied_weight_max_abs_diff:.3e} across stages at step {state.global_step}")

    def _write_tag(self, engine, pipeline: PhasePipeline, state: ckpt.TrainingState, tag: str, moments: bool) -> None:
        tag_dir = self.checkpoint_dir / tag
        engine.save_checkpoint(str(self.checkpoint_dir), tag=tag, save_latest=False)
        pipeline.save_unplaced_layers(tag_dir, self.weights_dir())
        if moments:
            save_moments(engine, pipeline.pipe, tag_dir)
        distributed.barrier()  # every rank's files are on disk before the tag is published
        if self.rank == 0:  # history first: a published tag never has an older results.json beside it
            self.history.write(state, complete=False)
            self.write_tokenizer(tag_dir)
            ckpt.mark_complete(self.checkpoint_dir, tag, state)

    def _announce_and_retire(self, tag: str) -> None:
        """Rank 0, once ``tag`` is published: delete the tags training.keep_checkpoints lets go, and say so."""
        t = self.training
        try:
            removed, note = ckpt.retire_old_tags(self.checkpoint_dir, t.keep_checkpoints, t.keep_phase_ends), ""
        except OSError as exc:  # an old tag that cannot be deleted costs disk space, not the run
            removed, note = [], f"; WARNING: could not delete an older checkpoint ({exc}), it stays"
        deleted = f", deleted {', '.join(removed)} (training.keep_checkpoints={t.keep_checkpoints})" if removed else ""
        self.monitor.message(f"[stackwise] checkpoint {tag} saved{deleted}{note}")
