"""ArchitectureTrainer: runs the phases of a run on the DeepSpeed pipeline.

``ArchitectureTrainer(config).train_architecture(rack, dataloader)`` is the seed
project's API. Each phase builds a fresh stage-aware engine over the same
PipelineModule (new trainable set, new optimizer, restarted LR schedule), trains
its step budget, validates, and checkpoints. Re-running with the same
``output_dir`` resumes from the newest complete checkpoint at the same phase,
step and sample.
"""

from __future__ import annotations

import math
import os
import resource
import time
import uuid
from functools import partial
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch

from ..config import StackWiseConfig
from ..model import Rack, create_rack_from_config
from ..parallel import distributed
from ..parallel.ds_config import build_ds_config
from ..parallel.engine import build_engine
from ..layout import LayerUnit, stage_rack_modules
from ..parallel.pipe import rack_to_pipeline, stage_of_rank
from ..parallel.tied import tied_weight_max_abs_diff
from ..parallel.watchdog import PeerWatchdog
from . import checkpointing as ckpt
from .errors import NonFiniteLossError
from .lr import warmup_cosine
from .monitor import Monitor
from .optim import make_optimizer
from .phases import TRAIN, Phase, plan_phases
from .unit_copy import copy_previous_unit


def check_writable(directory: Path) -> None:
    """Fail early, with the fix, when ``directory`` cannot hold this run's outputs."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".write_probe_{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise PermissionError(f"training.output_dir {directory} is not writable ({exc.strerror}): "
                              "choose a directory you can write to") from exc


class ArchitectureTrainer:
    def __init__(self, config: StackWiseConfig | dict[str, Any]):
        self.config = config if isinstance(config, StackWiseConfig) else StackWiseConfig.from_dict(config)
        self.output_dir = Path(self.config.training.output_dir)
        self.checkpoint_dir = self.output_dir / "checkpoints"

    # ------------------------------------------------------------------ public API

    def train_architecture(self, rack: Rack | None = None, dataloader: Iterable | None = None,
                           val_data: Iterable | None = None) -> dict[str, Any]:
        """Train ``rack`` through every phase; returns per-step and per-phase loss history.

        Without ``rack``, the Rack of ``config.model`` is built here with only this rank's
        stage materialized: a rank never allocates or initialises another stage's weights.

        ``dataloader`` yields ``(input_ids, labels)`` micro-batches for this rank, forever or
        long enough; without one, the data named by ``config.data`` is built. ``val_data``
        yields validation micro-batches (default: the held-out split of ``config.data``).
        """
        cfg = self.config
        self.rank, self.world_size = distributed.init_distributed(int(cfg.parallel.collective_timeout_s))
        check_writable(self.output_dir)  # on every rank, before anything waits for anyone
        self.dp_size = cfg.validate_world_size(self.world_size)
        watchdog = self._start_watchdog()
        self.global_batch = cfg.training.micro_batch_size * cfg.training.gradient_accumulation_steps * self.dp_size
        if rack is None:
            rack = self._build_stage_rack()
        self.pipe = rack_to_pipeline(rack, cfg.pipeline_stages, self.world_size,
                                     cfg.parallel.activation_checkpoint_interval)
        self.ds_config = build_ds_config(cfg, self.dp_size)
        state = self._resume_state()
        self._prepare_output_dir()
        self.train_source, self.val_source = self._data_sources(dataloader, val_data)
        self.monitor = Monitor(self.output_dir, enabled=self.rank == 0, progress_bar=cfg.training.progress_bar)
        self.results: dict[str, Any] = {"phases": [], "losses": [], "val_history": [],
                                        "output_dir": str(self.output_dir)}
        try:
            phases = plan_phases(cfg)
            if state.phase_index >= len(phases):
                self.monitor.message(f"[stackwise] {self.checkpoint_dir} already holds the finished run "
                                     f"({state.global_step} steps); nothing to do. Use a new training.output_dir "
                                     "to train again.")
            for phase in phases[state.phase_index:]:
                state = self._run_phase(phase, len(phases), state)
        finally:
            self.monitor.close()
        distributed.barrier()
        if watchdog is not None:
            watchdog.stop()
        self.results["global_step"] = state.global_step
        self.results["finished_phases"] = state.finished_phases
        if self.rank == 0:
            ckpt.write_json_atomic(self.output_dir / "results.json", self.results)
        return self.results

    # ------------------------------------------------------------------ setup

    def _build_stage_rack(self) -> Rack:
        """The configured Rack with real weights only in this rank's stage (the rest on meta)."""
        cfg = self.config
        stage = stage_of_rank(self.rank, cfg.pipeline_stages, self.world_size)
        arch = cfg.model.architecture
        local = stage_rack_modules(arch.n_stacks, arch.blocks_per_stack, cfg.pipeline_stages, stage,
                                   cfg.model.tie_embeddings)
        return create_rack_from_config(cfg, materialize=local.__contains__)

    def _start_watchdog(self) -> PeerWatchdog | None:
        if self.world_size == 1:
            return None
        run_id = distributed.broadcast_object(uuid.uuid4().hex[:12] if self.rank == 0 else None)
        return PeerWatchdog(self.output_dir / ".heartbeat" / run_id, self.rank, self.world_size,
                            timeout_s=self.config.parallel.peer_timeout_s).start()

    def _resume_state(self) -> ckpt.TrainingState:
        fresh = ckpt.TrainingState(training_architecture=self.config.training.training_architecture,
                                   config=self.config.to_dict())
        self.resume_tag = ckpt.find_resume_tag(self.checkpoint_dir)
        if self.resume_tag is None:
            return fresh
        if not self.config.training.resume:
            raise ckpt.CheckpointError(
                f"{self.checkpoint_dir} already holds checkpoints and training.resume is false: starting over "
                "would overwrite them; choose a new training.output_dir or set training.resume=true")
        state = ckpt.load_state(self.checkpoint_dir, self.resume_tag)
        ckpt.check_same_architecture(state.config.get("model", {}), self.config.to_dict()["model"],
                                     self.checkpoint_dir / self.resume_tag)
        if state.training_architecture != self.config.training.training_architecture:
            raise ckpt.CheckpointError(
                f"checkpoint {self.checkpoint_dir / self.resume_tag} comes from a "
                f"{state.training_architecture} run but the config asks for "
                f"{self.config.training.training_architecture}: use a new training.output_dir")
        state.config = self.config.to_dict()
        return state

    def _prepare_output_dir(self) -> None:
        if self.rank == 0:
            self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
            self.config.to_yaml(self.output_dir / "config.yaml")
        distributed.barrier()

    def _data_sources(self, dataloader, val_data):
        if dataloader is not None:
            return dataloader, val_data
        from .data_setup import build_run_data

        return build_run_data(self.config, self.pipe, self.dp_size, val_data)

    # ------------------------------------------------------------------ one phase

    def _run_phase(self, phase: Phase, n_phases: int, state: ckpt.TrainingState) -> ckpt.TrainingState:
        cfg = self.config.training
        resuming_mid_phase = self.resume_tag is not None and state.phase_step > 0
        if state.phase_step == 0 and cfg.new_unit_init == "copy_previous" and self.resume_tag is None:
            copy_previous_unit(self.pipe, phase)
        engine = self._build_engine(phase)
        self._load_resume_checkpoint(engine, full=resuming_mid_phase)
        self.resume_tag = None  # loaded once; later phases continue from memory
        record = {"index": phase.index, "name": phase.name, "kind": phase.kind, "steps": phase.steps,
                  "start_global_step": state.global_step - state.phase_step, "losses": []}
        if state.phase_step == 0:
            record["val_loss_before"] = self._validate(engine, state.global_step)
        self.monitor.start_phase(phase, n_phases, state.phase_step, state.global_step)
        data = self._train_iterator(state.consumed_samples)
        while state.phase_step < phase.steps:
            loss, seconds = self._train_step(engine, data, phase, state)
            record["losses"].append(loss)
            self._after_step(engine, phase, state, loss, seconds)
        record["val_loss_after"] = self._validate(engine, state.global_step)
        record["end_global_step"] = state.global_step
        self.monitor.close_bar()
        self.monitor.message(f"[stackwise] phase {phase.name} done: val loss "
                             f"{record.get('val_loss_before', float('nan')):.4f} -> {record['val_loss_after']:.4f}")
        state.finished_phases.append({k: v for k, v in record.items() if k != "losses"})
        state.phase_index, state.phase_step = phase.index + 1, 0
        self._save(engine, state)
        self.results["phases"].append(record)
        del engine
        return state

    def _build_engine(self, phase: Phase):
        roles = None if phase.kind == "rack" else {i: self._unit_role(phase, unit)
                                                  for i, unit in enumerate(self.pipe.units)}
        return build_engine(self.pipe, self.ds_config, roles,
                            optimizer_factory=partial(make_optimizer, training=self.config.training,
                                                              units=self.pipe.units),
                            lr_lambda=lambda step: warmup_cosine(step, phase.steps, self.config.training.warmup_steps,
                                                                 self.config.training.min_lr_ratio))

    @staticmethod
    def _unit_role(phase: Phase, unit: LayerUnit) -> str:
        if unit.kind == "block":
            return phase.block_role(unit.stack_id, unit.block_id)
        if unit.kind == "embedding":
            return phase.embedding_role
        return TRAIN  # final norm and LM head always train

    def _load_resume_checkpoint(self, engine, full: bool) -> None:
        """Load on every rank; a failure on any rank is reported on all of them (no rank left waiting)."""
        if self.resume_tag is None:
            return
        where = self.checkpoint_dir / self.resume_tag
        self.monitor.message(f"[stackwise] resuming from {where}")
        problems = distributed.all_gather_objects(ckpt.unreadable_files(self._files_to_load(engine, where, full)))
        failed = [f"rank {rank}: {', '.join(texts)}" for rank, texts in enumerate(problems) if texts]
        if failed:
            raise ckpt.CheckpointError(
                f"checkpoint {where} cannot be loaded ({'; '.join(failed)[:800]}): it is corrupt or incomplete; "
                "delete that folder to resume from an earlier checkpoint, or use a new training.output_dir")
        engine.load_checkpoint(str(self.checkpoint_dir), tag=self.resume_tag, load_module_only=not full,
                               load_optimizer_states=full, load_lr_scheduler_states=full)

    def _files_to_load(self, engine, where: Path, full: bool) -> list[Path]:
        """The DeepSpeed files this rank reads: its layers (a tied head has none), its engine and optimizer state."""
        stage, tied = self.pipe.stage_id, self.config.model.tie_embeddings
        files = [where / f"layer_{index:02d}-model_states.pt" for index, unit in self.pipe.local_units().items()
                 if not (unit.kind == "head" and tied)]
        files.append(where / f"mp_rank_{stage:02d}_model_states.pt")
        if full and engine.optimizer is not None and self.config.parallel.zero_stage == 1:
            dp_rank = self.pipe._grid.get_data_parallel_id()
            files.append(where / f"zero_pp_rank_{dp_rank}_mp_rank_{stage:02d}_optim_states.pt")
        return files

    # ------------------------------------------------------------------ steps

    def _train_iterator(self, consumed_samples: int) -> Iterator:
        source = self.train_source
        if hasattr(source, "at_position"):
            return iter(source.at_position(consumed_samples))
        return iter(source)

    def _train_step(self, engine, data: Iterator, phase: Phase, state: ckpt.TrainingState) -> tuple[float, float]:
        start = time.perf_counter()
        loss = float(engine.train_batch(data))
        seconds = time.perf_counter() - start
        if not math.isfinite(loss):
            raise NonFiniteLossError(
                f"non-finite training loss ({loss}) at global step {state.global_step + 1}, phase {phase.name} "
                f"(step {state.phase_step + 1}); the last good checkpoint is kept in {self.checkpoint_dir}. "
                "Lower training.lr, raise training.warmup_steps or check the data, then re-run to resume")
        state.phase_step += 1
        state.global_step += 1
        state.consumed_samples += self.global_batch
        return loss, seconds

    def _after_step(self, engine, phase: Phase, state: ckpt.TrainingState, loss: float, seconds: float) -> None:
        t = self.config.training
        tokens_per_s = self.global_batch * self.config.data.seq_len / max(seconds, 1e-9)
        self.results["losses"].append(loss)
        self.monitor.step(phase, loss, tokens_per_s)
        step = state.global_step
        self.monitor.scalars({"train/loss": loss, f"train/loss_phase{phase.index}": loss,
                              "train/lr": engine.get_lr()[0] if engine.optimizer is not None else None,
                              "train/tokens_per_sec": tokens_per_s, "train/step_time_s": seconds,
                              "train/phase": phase.index}, step)
        if t.log_interval and step % t.log_interval == 0:
            self._log_stage_stats(engine, step)
        last_step = state.phase_step == phase.steps
        if t.eval_interval and step % t.eval_interval == 0 and not last_step:
            self._validate(engine, step)
        if t.save_interval and step % t.save_interval == 0 and not last_step:
            self._save(engine, state)

    def _log_stage_stats(self, engine, step: int) -> None:
        """Memory and per-stack gradient norm of every stage, gathered to rank 0.

        A stack's norm is taken on each replica's own accumulated gradient, before the
        data-parallel average and before clipping (ZeRO keeps only shards afterwards), and
        logged as the mean over replicas."""
        stage = self.pipe.stage_id
        rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        cuda_mb = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else 0.0
        grad_norms = engine.stack_grad_norms(self.config.model.architecture.n_stacks)
        gathered = distributed.all_gather_floats([stage, rss_mb, cuda_mb, *grad_norms])
        for s in sorted({int(row[0]) for row in gathered}):  # over a stage's replicas, the peak matters
            replicas = [row for row in gathered if int(row[0]) == s]
            self.monitor.scalars({f"memory/stage{s}_rss_mb": max(r[1] for r in replicas),
                                  f"memory/stage{s}_cuda_mb": max(r[2] for r in replicas)}, step)
        for stack_id in range(len(grad_norms)):  # mean over the replicas that hold the stack
            norms = [r[3 + stack_id] for r in gathered if r[3 + stack_id] >= 0]
            if norms:
                self.monitor.scalar(f"grad_norm/stack{stack_id}", sum(norms) / len(norms), step)

    def _validate(self, engine, step: int) -> float:
        if self.val_source is None:
            return float("nan")
        losses = [float(engine.eval_batch(iter([batch]), num_micro_batches=1)) for batch in self.val_source]
        val_loss = sum(losses) / max(len(losses), 1)
        self.results["val_history"].append((step, val_loss))
        self.monitor.scalars({"val/loss": val_loss, "val/perplexity": math.exp(min(val_loss, 50.0))}, step)
        self.monitor.flush()
        return val_loss

    def _save(self, engine, state: ckpt.TrainingState) -> None:
        tag = ckpt.tag_for(state.global_step)
        state.tied_weight_max_abs_diff = tied_weight_max_abs_diff(self.pipe)
        self.monitor.scalar("integrity/tied_weight_max_abs_diff", state.tied_weight_max_abs_diff, state.global_step)
        if state.tied_weight_max_abs_diff != 0.0:
            self.monitor.message(f"[stackwise] WARNING: tied weight copies differ by up to "
                                 f"{state.tied_weight_max_abs_diff:.3e} across stages at step {state.global_step}")
        if self.rank == 0:  # re-saving a tag (a resume from before it): never a marker over half-new files
            ckpt.unmark(self.checkpoint_dir, tag)
        distributed.barrier()
        engine.save_checkpoint(str(self.checkpoint_dir), tag=tag, save_latest=False)
        distributed.barrier()  # every rank's files are on disk before the tag is published
        if self.rank == 0:
            ckpt.mark_complete(self.checkpoint_dir, tag, state)
        distributed.barrier()
        self.monitor.flush()
