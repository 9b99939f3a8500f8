"""What a user watches: TensorBoard scalars and a progress bar, both on global rank 0 only."""

from __future__ import annotations

import math
import sys
from pathlib import Path

from ..phases import Phase

BUDGET_KEYS = {"rack": "training.max_steps", "joint": "training.joint_steps"}  # stage-wise: steps_per_phase


def spent_budget(phase: Phase, steps_done: int) -> str:
    """What a phase resumed past its (lowered) step budget does."""
    key = BUDGET_KEYS.get(phase.kind, "training.steps_per_phase")
    return (f"it already ran {steps_done} steps and its budget is now {phase.steps} ({key}): no steps left to "
            "train, the phase ends here (validation and its end checkpoint)")


class Monitor:
    """TensorBoard writer + tqdm bar. On ranks other than 0 every method is a no-op."""

    def __init__(self, output_dir: str | Path, enabled: bool, progress_bar: bool = True, log_interval: int = 0):
        self.enabled = enabled
        self.writer = None
        self.bar = None
        self.progress_bar = progress_bar and enabled
        self.log_interval = log_interval  # without a bar: a plain line every this many steps
        self.label, self.phase_step, self.phase_steps = "", 0, 0
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(Path(output_dir) / "tensorboard"))

    # ---- progress bar

    def start_phase(self, phase: Phase, n_phases: int, first_step: int, global_step: int) -> None:
        if not self.enabled:
            return
        self.scalar("train/phase", phase.index, global_step)
        if phase.stage_wise:  # which unit trains: a stack index, or a global block index
            self.scalar(f"train/active_{phase.kind}", phase.unit, global_step)
        label = f"phase {phase.index + 1}/{n_phases} {phase.name}"
        self.label, self.phase_step, self.phase_steps = label, first_step, phase.steps
        if first_step and first_step >= phase.steps:  # resumed with a smaller step budget than the phase ran
            print(f"[stackwise] {label}: {spent_budget(phase, first_step)}", flush=True)
        elif self.progress_bar:
            from tqdm import tqdm

            self.close_bar()
            self.bar = tqdm(total=phase.steps, initial=first_step, desc=label, file=sys.stdout,
                            dynamic_ncols=True, mininterval=1.0)
        else:
            print(f"[stackwise] {label}: steps {first_step}..{phase.steps}", flush=True)

    def layout(self, layout, global_step: int) -> None:
        """The phase's placement: printed, and logged as scalars and text."""
        self.message(f"[stackwise] layout {layout.describe()}")
        if self.writer is None:
            return
        self.scalars({"layout/pipeline_stages": layout.pipeline_stages, "layout/data_parallel": layout.data_parallel,
                      "layout/micro_batches": layout.gradient_accumulation_steps,
                      "layout/predicted_vs_rackwise": layout.predicted_vs_rackwise}, global_step)
        self.writer.add_text("layout", layout.describe(), global_step)

    def step(self, phase: Phase, loss: float, tokens_per_s: float) -> None:
        self.phase_step += 1
        if self.bar is not None:
            self.bar.set_postfix_str(f"{phase.name} loss {loss:.4f} tok/s {tokens_per_s:,.0f}", refresh=False)
            self.bar.update(1)
        elif self.enabled and self.log_interval and (self.phase_step % self.log_interval == 0
                                                     or self.phase_step == self.phase_steps):
            print(f"[stackwise] {self.label} step {self.phase_step}/{self.phase_steps}: loss {loss:.4f}, "
                  f"{tokens_per_s:,.0f} tokens/s", flush=True)

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    # ---- TensorBoard

    def scalar(self, tag: str, value: float, step: int) -> None:
        if self.writer is not None and value is not None and math.isfinite(value):
            self.writer.add_scalar(tag, value, step)

    def scalars(self, values: dict[str, float], step: int) -> None:
        for tag, value in values.items():
            self.scalar(tag, value, step)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        self.close_bar()
        if self.writer is not None:
            self.writer.close()
            self.writer = None
