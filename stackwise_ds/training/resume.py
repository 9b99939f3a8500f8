"""Resuming a run: which checkpoint it continues from, and the mid-phase load of that checkpoint.

Finding the checkpoint and checking it against the config import no DeepSpeed (``stackwise-plan`` runs them
too); loading one does."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..checkpoint import files as ckpt
from ..config import TrainingConfig
from ..placement import PhaseLayout
from .monitor import Monitor


@dataclass
class ResumePoint:
    """Where a launch starts: the checkpoint tag it resumes (None: a fresh run) and the state to continue."""

    tag: str | None
    state: ckpt.TrainingState
    saved_config: dict[str, Any] | None  # the config the checkpoint was saved with


def find_resume_point(checkpoint_dir: Path, training: TrainingConfig, config_dict: dict[str, Any],
                      rank: int) -> ResumePoint:
    """The newest complete checkpoint of ``checkpoint_dir`` to continue from, checked against this run's
    config (``config_dict``, the run's whole config as a dict), or a fresh start when there is none."""
    tag = ckpt.find_resume_tag(checkpoint_dir)
    if tag is None:
        fresh = ckpt.TrainingState(training_architecture=training.training_architecture, config=config_dict)
        return ResumePoint(None, fresh, None)
    _check_may_resume(checkpoint_dir, tag, training, rank)
    state = ckpt.load_state(checkpoint_dir, tag)
    _check_same_run(state, checkpoint_dir / tag, training, config_dict)
    saved_config, state.config = state.config, config_dict
    return ResumePoint(tag, state, saved_config)


def _check_may_resume(checkpoint_dir: Path, tag: str, training: TrainingConfig, rank: int) -> None:
    if not training.resume:
        raise ckpt.CheckpointError(
            f"{checkpoint_dir} already holds checkpoints and training.resume is false: starting over "
            "would overwrite them; choose a new training.output_dir or set training.resume=true")
    if training.init_from is not None and rank == 0:
        print(f"[stackwise] {checkpoint_dir} holds checkpoint {tag}: resume wins, "
              f"training.init_from ({training.init_from}) is ignored (it only starts a fresh run)", flush=True)


def _check_same_run(state: ckpt.TrainingState, tag_dir: Path, training: TrainingConfig,
                    config_dict: dict[str, Any]) -> None:
    ckpt.check_same_architecture(state.config.get("model", {}), config_dict["model"], tag_dir)
    if state.training_architecture != training.training_architecture:
        raise ckpt.CheckpointError(
            f"checkpoint {tag_dir} comes from a {state.training_architecture} run but the config asks for "
            f"{training.training_architecture}: use a new training.output_dir")


def check_resumed_layout(layout: PhaseLayout, state: ckpt.TrainingState, tag_dir: Path, world_size: int) -> None:
    """Mid-phase, the optimizer shards and engine files belong to the layout that saved them."""
    saved = PhaseLayout.from_dict(state.layout) if state.layout else None
    if saved is not None and not layout.same_placement(saved):
        raise ckpt.CheckpointError(
            f"checkpoint {tag_dir} was saved mid-phase with the layout "
            f"'{saved.describe()}' but this launch plans '{layout.describe()}' (world size {world_size}): "
            "relaunch with the world size, parallel.* and training.stack_cache settings of the saved run, or convert "
            "the tag with "
            f"stackwise-reshard {tag_dir} NEW_OUTPUT_DIR --pipeline-stages P "
            "--data-parallel D (it continues on the fixed pipeline)")


def load_resume_checkpoint(engine, pipe, checkpoint_dir: Path, tag: str, zero_stage: int, monitor: Monitor) -> None:
    """Load weights, optimizer and scheduler mid-phase on every rank; a failure on any rank is
    reported on all of them (no rank left waiting)."""
    from .layer_files import verify_on_every_rank

    where = checkpoint_dir / tag
    monitor.message(f"[stackwise] resuming from {where}")
    verify_on_every_rank(files_to_load(engine, pipe, where, zero_stage), where)
    engine.load_checkpoint(str(checkpoint_dir), tag=tag)


def files_to_load(engine, pipe, where: Path, zero_stage: int) -> list[Path]:
    """The DeepSpeed files this rank reads besides its layer files: its engine and optimizer state.

    The layer files were verified (CRCs, the right layer) by the placement that just loaded them
    from this same tag (the placement runs first on a resume: no layout is placed yet)."""
    from ..parallel.pipe import data_parallel_rank

    stage = pipe.stage_id
    files = [where / ckpt.engine_state_file(stage)]
    if engine.optimizer is not None and zero_stage == 1:
        files.append(where / ckpt.zero_shard_file(data_parallel_rank(pipe), stage))
    return files
