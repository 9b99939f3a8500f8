"""A phase's step loop: training steps, their logging, and validation at the configured intervals."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from ..checkpoint import files as ckpt
from ..config import TrainingConfig
from ..enums import PhaseData
from ..phases import Phase
from .errors import NonFiniteLossError
from .metrics import RunHistory, log_stage_stats, mean_validation_loss
from .monitor import Monitor


@dataclass
class PhaseRun:
    """One phase in training: what its steps use."""

    phase: Phase
    engine: Any
    state: ckpt.TrainingState
    stage: int  # this rank's pipeline stage
    train_source: Any  # an iterable of micro-batches, or a source positioned by ``at_position``
    val_source: Any  # a ValidationSet, or None: no validation
    save: Callable[[], None]  # checkpoint the run mid-phase


@dataclass
class StepRecord:
    """One optimizer step as logged: its loss, its wall-clock and the learning rate it used."""

    loss: float
    seconds: float
    lr: float | None  # None on a stage without an optimizer


class StepLoop:
    """Runs a phase's steps, logs them to the monitor and the history, validates and saves at intervals."""

    def __init__(self, *, training: TrainingConfig, seq_len: int, n_stacks: int, global_batch: int, monitor: Monitor,
                 history: RunHistory, checkpoint_dir: Path):
        self.training = training
        self.seq_len = seq_len
        self.n_stacks = n_stacks
        self.global_batch = global_batch
        self.monitor = monitor
        self.history = history
        self.checkpoint_dir = checkpoint_dir  # named when a step fails

    def train(self, run: PhaseRun, losses: list[float]) -> None:
        """Train until the phase's step budget is spent, appending each step's loss to ``losses``."""
        data = train_iterator(run.train_source, self.data_position(run.state))
        while run.state.phase_step < run.phase.steps:
            step = self._train_step(run, data)
            losses.append(step.loss)
            self._after_step(run, step)

    def data_position(self, state: ckpt.TrainingState) -> int:
        """The global sample the phase's next step reads: where the run stands, or, with phase_data 'repeat', where
        the phase stands (every phase starts at the order's first window)."""
        if self.training.phase_data == PhaseData.REPEAT:
            return state.phase_step * self.global_batch
        return state.consumed_samples

    def _train_step(self, run: PhaseRun, data: Iterator) -> StepRecord:
        state, phase = run.state, run.phase
        lr = run.engine.get_lr()[0] if run.engine.optimizer is not None else None  # the step's: read before it steps
        run.engine.record_grad_norms = self._logs_stats(state.global_step + 1)  # read by log_stage_stats only
        start = time.perf_counter()
        loss = float(run.engine.train_batch(data))
        seconds = time.perf_counter() - start
        if not math.isfinite(loss):
            raise NonFiniteLossError(
                f"non-finite training loss ({loss}) at global step {state.global_step + 1}, phase {phase.name} "
                f"(step {state.phase_step + 1}); the last good checkpoint is kept in {self.checkpoint_dir}. "
                "Lower training.lr, raise training.warmup_steps or check the data, then re-run to resume")
        state.phase_step += 1
        state.global_step += 1
        state.consumed_samples += self.global_batch
        return StepRecord(loss, seconds, lr)

    def _after_step(self, run: PhaseRun, record: StepRecord) -> None:
        t, phase, step = self.training, run.phase, run.state.global_step
        self._log_step(run, record)
        if self._logs_stats(step):
            log_stage_stats(self.monitor, run.engine, run.stage, self.n_stacks, step)
        last_step = run.state.phase_step == phase.steps
        if t.eval_interval and step % t.eval_interval == 0 and not last_step:
            self.validate(run.engine, run.val_source, step)
        if t.save_interval and step % t.save_interval == 0 and not last_step:
            run.save()

    def _logs_stats(self, global_step: int) -> bool:
        """Whether ``global_step`` logs per-stage memory and per-stack gradient norms."""
        interval = self.training.log_interval
        return bool(interval) and global_step % interval == 0

    def _log_step(self, run: PhaseRun, record: StepRecord) -> None:
        phase, loss = run.phase, record.loss
        tokens_per_s = self.global_batch * self.seq_len / max(record.seconds, 1e-9)
        self.history.add_loss(loss)
        self.monitor.step(phase, loss, tokens_per_s)
        self.monitor.scalars({"train/loss": loss, f"train/loss_phase{phase.index}": loss, "train/lr": record.lr,
                              "train/tokens_per_sec": tokens_per_s, "train/step_time_s": record.seconds,
                              "train/phase": phase.index}, run.state.global_step)

    def validate(self, engine, val_source, step: int) -> float:
        """Mean loss over the run's validation micro-batches, whatever the data-parallel degree."""
        if val_source is None:
            return float("nan")
        losses = engine.eval_batch(iter(val_source.batches), num_micro_batches=len(val_source.batches),
                                   reduce_output=None, bcast_loss=False)
        real = [float(loss) for loss in losses[:val_source.real]] if engine.is_last_stage() else []
        val_loss = mean_validation_loss(real)
        self.history.add_validation(step, val_loss)
        self.monitor.scalars({"val/loss": val_loss, "val/perplexity": math.exp(min(val_loss, 50.0))}, step)
        self.monitor.flush()
        return val_loss


def train_iterator(source, consumed_samples: int) -> Iterator:
    """An iterator over ``source``'s micro-batches from global sample ``consumed_samples`` (when it can seek)."""
    if hasattr(source, "at_position"):
        return iter(source.at_position(consumed_samples))
    return iter(source)
