"""ArchitectureTrainer: runs the phases of a run on the DeepSpeed pipeline.

``ArchitectureTrainer(config).train_architecture(rack, dataloader)`` is the seed
project's API. Each phase gets a layout (``stackwise_ds.placement``): the run's fixed
pipeline, or, for stackwise/blockwise phases under ``parallel.phase_layout: elastic``, only
the live layers re-partitioned over every rank. When the layout changes, the previous
engine, PipelineModule and their process groups are destroyed and the new pipeline is
filled from the per-layer files of the newest checkpoint (``layer_files``). Each phase
then builds a fresh stage-aware engine (its trainable set and optimizer, the LR schedule of
``training.lr_schedule``, AdamW moments carried under ``optimizer_across_phases: carry``),
trains its step budget, validates, and checkpoints. Re-running with the same
``output_dir`` resumes from the newest complete checkpoint at the same phase, step and
sample.

The trainer coordinates; the parts live beside it: ``startup`` (distributed init, the output
dir's lock and checks, the watchdog), ``resume`` and ``checkpoints`` (where a run continues
from, saving tags), ``phase_pipeline`` (placement and engine), ``loop`` (steps and validation),
``metrics`` (results.json and statistics), ``feeds`` (each replica's data) and ``stack_cache`` (the frozen prefix's
activations kept per window, ``training.stack_cache``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Iterable

from ..checkpoint import files as ckpt
from ..checkpoint.locate import source_frozen_stacks
from ..config import ModelConfig, ParallelConfig, StackWiseConfig, TrainingConfig
from ..enums import OptimizerAcrossPhases, Precision
from ..layout import LayerUnit, layer_units
from ..model import Rack
from ..parallel.ds_config import configure_fp32_matmuls, resolve_precision
from ..phases import Phase, plan_phases
from ..placement import PhaseLayout, plan_phase_layouts
from .checkpoints import Checkpointer
from .feeds import DataFeeds
from .growth import phase_layer_sources, phase_zeroed_layers
from .loop import PhaseRun, StepLoop
from .metrics import RunHistory, count_process_groups, current_rss_mb, format_loss, resource_usage, val_loss_at
from .moments import carry_moments
from .monitor import Monitor
from .phase_pipeline import PhasePipeline
from .resume import ResumePoint, check_resumed_layout, find_resume_point, load_resume_checkpoint
from .stack_cache import ActivationCache
from .startup import (
    check_shared_output_dir,
    check_writable,
    lock_output_dir,
    prepare_output_dir,
    start_distributed,
    start_watchdog,
)

# importable from here as before the trainer was split
__all__ = ["ArchitectureTrainer", "check_shared_output_dir", "check_writable", "current_rss_mb", "val_loss_at"]


@dataclass
class RunPlan:
    """What a launch has to do: the run's phases, the layouts of those still to run, where it starts."""

    phases: list[Phase]
    layouts: list[PhaseLayout]  # one per phase from ``start.state.phase_index`` on
    start: ResumePoint
    finished_before: bool  # the checkpoint resumed holds the finished run: nothing to train
    init_dir: Path | None  # training.init_from's layer files (a fresh run only)


class ArchitectureTrainer:
    def __init__(self, config: StackWiseConfig | dict[str, Any]):
        self.config = config if isinstance(config, StackWiseConfig) else StackWiseConfig.from_dict(config)
        self.output_dir = Path(self.config.training.output_dir)
        self.checkpoint_dir = self.output_dir / "checkpoints"

    def train_architecture(self, rack: Rack | None = None, dataloader: Iterable | None = None,
                           val_data: Iterable | None = None) -> dict[str, Any]:
        """Train ``rack`` through every phase; returns per-step and per-phase loss history.

        Without ``rack``, the Rack of ``config.model`` is built here with only this rank's
        stage materialized: a rank never allocates or initialises another stage's weights.

        ``dataloader`` yields ``(input_ids, labels)`` micro-batches for this rank, forever or
        long enough; without one, the data named by ``config.data`` is built. ``val_data``
        yields validation micro-batches (default: the held-out split of ``config.data``).
        """
        rank, world_size = start_distributed(self.config.parallel, self.output_dir)
        configure_fp32_matmuls(self.config.training.precision)
        with lock_output_dir(self.output_dir, rank, world_size):  # only a clean end clears its record
            return self._train_locked(rank, world_size, rack, dataloader, val_data)

    def _train_locked(self, rank: int, world_size: int, rack: Rack | None, dataloader: Iterable | None,
                      val_data: Iterable | None) -> dict:
        cfg = self.config
        cfg.validate_world_size(world_size)
        watchdog = start_watchdog(self.output_dir, rank, world_size, cfg.parallel.peer_timeout_s)
        groups_before = count_process_groups()
        history = RunHistory(self.output_dir)
        plan = self._plan(rank, world_size, history)
        prepare_output_dir(self.output_dir, rank, None if plan.finished_before else cfg.to_yaml)
        runner = self._phase_runner(rank, world_size, plan, history, rack, (dataloader, val_data))
        state = runner.run_all(plan)
        history.results["process_groups"] = {"before": groups_before, "after": count_process_groups()}
        if watchdog is not None:
            watchdog.stop()
        if rank == 0 and not plan.finished_before:
            history.write(state, complete=True)
        return history.results

    def _plan(self, rank: int, world_size: int, history: RunHistory) -> RunPlan:
        """Where the run starts, and every remaining phase planned now (deterministic, the same on every
        rank): a phase that cannot be placed, e.g. under parallel.max_rank_memory_mb, stops the run before
        any training, naming it."""
        cfg = self.config
        start = find_resume_point(self.checkpoint_dir, cfg.training, cfg.to_dict(), rank)
        init_dir = self._initial_weights(rank, world_size) if start.tag is None else None
        if start.tag is not None:
            history.take_over(start.state.global_step)
        phases = plan_phases(cfg, tuple(self._source_frozen_stacks()))
        remaining = phases[start.state.phase_index:]
        layouts = plan_phase_layouts(remaining, self._units(), cfg, world_size, self._bf16())
        finished_before = not remaining
        if start.saved_config is not None and not finished_before:
            ckpt.check_resumable_changes(start.saved_config, cfg.to_dict(), self.checkpoint_dir / start.tag)
        return RunPlan(phases, layouts, start, finished_before, init_dir)

    def _source_frozen_stacks(self) -> list[int]:
        return source_frozen_stacks(self.output_dir, self.config.training.freeze_source)

    def _initial_weights(self, rank: int, world_size: int) -> Path | None:
        """A fresh run with training.init_from: the source as layer files of output_dir/initial_weights
        (each rank converts a share), read by the first placement like a checkpoint tag."""
        if self.config.training.init_from is None:
            return None
        from .init_weights import prepare_initial_weights

        return prepare_initial_weights(self.config, self.output_dir, rank, world_size)

    def _phase_runner(self, rank: int, world_size: int, plan: RunPlan, history: RunHistory, rack: Rack | None,
                      user_data: tuple[Iterable | None, Iterable | None]) -> PhaseRunner:
        """This launch's collaborators: the data (built from config.data unless a dataloader is given),
        the monitor, the pipeline, the checkpointer and the step loop."""
        cfg, t = self.config, self.config.training
        global_batch = self._global_batch(world_size)
        dataloader, val_data = user_data
        feeds = DataFeeds(training=t, data=cfg.data, model=cfg.model, base_dp=world_size // cfg.pipeline_stages,
                          global_batch=global_batch, bundle=self._load_bundle() if dataloader is None else None,
                          dataloader=dataloader, val_data=val_data)
        if dataloader is None:
            feeds.check_bundle(plan.init_dir, self.output_dir, rank)
        monitor = Monitor(self.output_dir, enabled=rank == 0, progress_bar=t.progress_bar,
                          log_interval=t.log_interval)
        stack_cache = (ActivationCache(t, cfg.model, self.output_dir, cfg.data.seq_len, rank)
                       if ActivationCache.wanted(t) else None)
        pipeline = PhasePipeline(model=cfg.model, training=t, parallel=cfg.parallel, rank=rank, world_size=world_size,
                                 units=self._units(), user_rack=rack, feeds=feeds, stack_cache=stack_cache)
        checkpointer = Checkpointer(self.checkpoint_dir, t, rank, monitor, history, feeds.save_tokenizer,
                                    weights_tag=plan.start.tag, init_dir=plan.init_dir)
        loop = StepLoop(training=t, seq_len=cfg.data.seq_len, n_stacks=cfg.model.architecture.n_stacks,
                        global_batch=global_batch, monitor=monitor, history=history, checkpoint_dir=self.checkpoint_dir)
        return PhaseRunner(training=t, parallel=cfg.parallel, model=cfg.model, world_size=world_size, pipeline=pipeline,
                           checkpointer=checkpointer, loop=loop, monitor=monitor, history=history,
                           resume_tag=plan.start.tag)

    def _load_bundle(self):
        """The datasets of config.data (every rank loads them; the cache lets one tokenise while others wait)."""
        from .data_setup import load_bundle

        return load_bundle(self.config)

    def _global_batch(self, world_size: int) -> int:
        t = self.config.training
        return t.micro_batch_size * t.gradient_accumulation_steps * (world_size // self.config.pipeline_stages)

    def _units(self) -> list[LayerUnit]:
        arch = self.config.model.architecture
        return layer_units(arch.n_stacks, arch.blocks_per_stack)

    def _bf16(self) -> bool:
        return resolve_precision(self.config.training.precision) == Precision.BF16


class PhaseRunner:
    """Runs a launch's phases one after another on the standing pipeline, checkpointing each end."""

    def __init__(self, *, training: TrainingConfig, parallel: ParallelConfig, model: ModelConfig, world_size: int,
                 pipeline: PhasePipeline, checkpointer: Checkpointer, loop: StepLoop, monitor: Monitor,
                 history: RunHistory, resume_tag: str | None):
        self.training = training
        self.tied = model.tie_embeddings  # the config ties the head; a phase may untie it (freeze_embedding)
        self.zero_stage = parallel.zero_stage
        self.world_size = world_size
        self.pipeline = pipeline
        self.checkpointer = checkpointer
        self.loop = loop
        self.monitor = monitor
        self.history = history
        self.resume_tag = resume_tag  # loaded once, by the first phase; later ones continue from memory

    def run_all(self, plan: RunPlan) -> ckpt.TrainingState:
        """Every remaining phase of ``plan``; the pipeline is retired at the end."""
        state = plan.start.state
        try:
            if plan.finished_before:
                self.monitor.message(f"[stackwise] {self.checkpointer.checkpoint_dir} already holds the finished "
                                     f"run ({state.global_step} steps); nothing to do, its config.yaml and "
                                     "results.json are kept. Use a new training.output_dir to train again.")
            for phase, layout in zip(plan.phases[state.phase_index:], plan.layouts, strict=True):
                state = self.run_phase(phase, layout, plan.phases, state)
        finally:
            self.monitor.close()
        self.pipeline.retire()
        if self.pipeline.stack_cache is not None:
            self.pipeline.stack_cache.remove()
        return state

    def run_phase(self, phase: Phase, layout: PhaseLayout, phases: list[Phase],
                  state: ckpt.TrainingState) -> ckpt.TrainingState:
        started = time.perf_counter()
        engine = self._start_engine(phase, layout, phases, state)
        engine_start_s = round(time.perf_counter() - started, 3)  # a phase change: re-placement, engine, groups
        state.layout = layout.to_dict()
        record = self._open_record(phase, engine, state) | {"engine_start_s": engine_start_s}
        self.monitor.start_phase(phase, len(phases), state.phase_step, state.global_step)
        self.monitor.layout(layout, state.global_step)
        run = PhaseRun(phase, engine, state, self.pipeline.pipe.stage_id, self.pipeline.train_source,
                       self.pipeline.val_source, save=partial(self.checkpointer.save, engine, self.pipeline, state))
        self.loop.train(run, record["losses"])
        self._close_phase(phase, engine, state, record)
        return state

    def _start_engine(self, phase: Phase, layout: PhaseLayout, phases: list[Phase], state: ckpt.TrainingState):
        """Place ``layout`` (unless it stands), build the phase's engine and give it the optimizer state
        it continues from: the checkpoint's mid-phase, the previous phase's moments when carried."""
        resuming_mid_phase = self.resume_tag is not None and state.phase_step > 0
        if resuming_mid_phase:
            check_resumed_layout(layout, state, self.checkpointer.checkpoint_dir / self.resume_tag, self.world_size)
        elif self.resume_tag is not None:  # at a phase boundary: the mid-phase load says it as it loads
            self.monitor.message(f"[stackwise] resuming from {self.checkpointer.checkpoint_dir / self.resume_tag} at "
                                 f"the start of phase {phase.index + 1}/{len(phases)} {phase.name}")
        sources, zeroed = self._growth_sources(phase, phases, state), self._zeroed_layers(phase, state)
        self.pipeline.take_layout(layout, self.checkpointer.weights_dir(), sources, self._head_tied(phase), zeroed)
        engine = self.pipeline.build_engine(phase, phases)
        if resuming_mid_phase:
            load_resume_checkpoint(engine, self.pipeline.pipe, self.checkpointer.checkpoint_dir, self.resume_tag,
                                   self.zero_stage, self.monitor)
        elif self._carries_optimizer() and phase.index > 0:
            previous, units = phases[phase.index - 1], self.pipeline.units
            carry_moments(engine, self.pipeline.pipe, self.checkpointer.weights_dir(), units,
                          previous.layer_roles(units), sources, self._head_tied(previous), zeroed)
        self.resume_tag = None
        return engine

    def _growth_sources(self, phase: Phase, phases: list[Phase], state: ckpt.TrainingState) -> dict[int, int]:
        """At the start of a growing phase: pipeline layer -> the layer whose weights it starts as; the head of
        the first phase that unties it starts as the embedding (layer 0, the tied matrix)."""
        if state.phase_step:
            return {}
        units = self.pipeline.units
        sources = phase_layer_sources(units, phase, self.training.growth_operator)
        if phase.index > 0 and self._head_tied(phases[phase.index - 1]) and not self._head_tied(phase):
            sources[len(units) - 1] = 0
        return sources

    def _zeroed_layers(self, phase: Phase, state: ckpt.TrainingState) -> frozenset[int]:
        """At the start of a growing phase under growth_init 'identity': the layers of the units it adds."""
        if state.phase_step:
            return frozenset()
        return phase_zeroed_layers(self.pipeline.units, phase, self.training.growth_operator,
                                   self.training.growth_init)

    def _head_tied(self, phase: Phase) -> bool:
        return self.tied and not phase.untied_head

    def _carries_optimizer(self) -> bool:
        return self.training.optimizer_across_phases == OptimizerAcrossPhases.CARRY

    def _open_record(self, phase: Phase, engine, state: ckpt.TrainingState) -> dict[str, Any]:
        """The phase's results.json record, with its losses so far and the validation loss it starts at."""
        start = state.global_step - state.phase_step
        record = {"index": phase.index, "name": phase.name, "kind": phase.kind, "steps": phase.steps,
                  "start_global_step": start, "layout": state.layout,
                  "losses": self.history.losses_since(start)}  # steps done before a mid-phase resume
        if state.phase_step == 0:
            record["val_loss_before"] = self.loop.validate(engine, self.pipeline.val_source, state.global_step)
        else:  # a mid-phase resume: the phase's first validation is in the saved history
            record["val_loss_before"] = self.history.val_loss_at(start)
        return record

    def _report_cache(self, phase: Phase, record: dict[str, Any], step: int) -> None:
        """Collective: the stack cache's windows of the phase, into its record, the log and TensorBoard."""
        cache = self.pipeline.cache_stats()
        if cache is None:
            return
        record["stack_cache"] = cache
        self.monitor.message(f"[stackwise] stack cache, phase {phase.name}: " + (
            f"{cache['read']} windows read, {cache['computed']} computed, {cache['advanced']} advanced"
            + (f", {cache['corrupt']} corrupt (computed again)" if cache["corrupt"] else "")
            if cache["ranks"] else "not in use (see the warning), the frozen prefix ran every time"))
        served = cache["read"] + cache["computed"]
        self.monitor.scalars({"stack_cache/read_share": cache["read"] / served if served else 0.0,
                              "stack_cache/advanced": cache["advanced"]}, step)

    def _close_phase(self, phase: Phase, engine, state: ckpt.TrainingState, record: dict[str, Any]) -> None:
        """Validate, record and checkpoint the phase's end (also the last phase's: a run may be extended)."""
        record["val_loss_after"] = self.loop.validate(engine, self.pipeline.val_source, state.global_step)
        record["end_global_step"] = state.global_step
        self._report_cache(phase, record, state.global_step)
        self.monitor.close_bar()
        self.monitor.message(f"[stackwise] phase {phase.name} done: val loss "
                             f"{format_loss(record.get('val_loss_before'))} -> {format_loss(record['val_loss_after'])}")
        state.finished_phases.append({k: v for k, v in record.items() if k != "losses"})
        state.phase_index, state.phase_step = phase.index + 1, 0
        self.history.add_phase(record)
        self.checkpointer.save(engine, self.pipeline, state, moments=self._carries_optimizer())
        record.update(resource_usage())
