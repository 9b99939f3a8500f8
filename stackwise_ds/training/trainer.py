"""ArchitectureTrainer: runs the phases of a run on the DeepSpeed pipeline.

``ArchitectureTrainer(config).train_architecture(rack, dataloader)`` is the seed
project's API. Each phase gets a layout (``stackwise_ds.placement``): the run's fixed
pipeline, or, for stackwise/blockwise phases under ``parallel.phase_layout: elastic``, only
the live layers re-partitioned over every rank. When the layout changes, the previous
engine, PipelineModule and their process groups are destroyed and the new pipeline is
filled from the per-layer files of the newest checkpoint (``layer_files``). Each phase
then builds a fresh stage-aware engine (new trainable set, new optimizer, restarted LR
schedule), trains its step budget, validates, and checkpoints. Re-running with the same
``output_dir`` resumes from the newest complete checkpoint at the same phase, step and
sample.
"""

from __future__ import annotations

import gc
import json
import math
import os
import resource
import socket
import time
import uuid
from functools import partial
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch

from ..checkpoint import files as ckpt
from ..config import ConfigError, StackWiseConfig
from ..enums import OptimizerAcrossPhases, Precision
from ..layout import TRAIN, UnitKind, layer_units
from ..model import Rack, create_rack_from_config
from ..parallel import distributed
from ..parallel.ds_config import build_ds_config, resolve_precision
from ..parallel.engine import build_engine, forget_process_groups
from ..parallel.optimizer_state import layer_moments, set_layer_moments
from ..parallel.pipe import data_parallel_rank, rack_to_pipeline, stage_of_rank
from ..parallel.tied import tied_weight_max_abs_diff
from ..parallel.watchdog import PeerWatchdog
from ..phases import Phase, PhaseKind, plan_phases
from ..placement import PhaseLayout, plan_phase_layouts
from .errors import NonFiniteLossError
from .growth import phase_layer_sources
from .layer_files import load_layers, local_layer_modules, save_unplaced_layers, verify_on_every_rank
from .lr import phase_lr_lambda
from .monitor import Monitor
from .optim import make_optimizer
from .output_lock import OutputDirLock
from .save_errors import reporting_write_failures, write_probe


def check_writable(directory: Path) -> None:
    """Fail early, with the fix, when ``directory`` (or its existing checkpoints/, found otherwise only
    at the first save) cannot hold this run's outputs."""
    for where in (directory, directory / "checkpoints"):
        if where != directory and not where.is_dir():
            continue
        try:
            where.mkdir(parents=True, exist_ok=True)
            write_probe(where, n_bytes=2)
        except OSError as exc:
            raise PermissionError(f"{where} (under training.output_dir) is not writable ({exc.strerror}): "
                                  "make it writable (chmod u+w) or choose a training.output_dir you can write to"
                                  ) from exc


def check_shared_output_dir(directory: Path, rank: int) -> None:
    """Collective: every rank must see the files rank 0 writes in ``directory``.

    Checkpoints are written by every rank into one folder and resumed from it, so on several
    nodes the output dir must be on a filesystem they all mount; otherwise each node would keep
    a part of every checkpoint. Fails on every rank, naming the ranks and hosts that miss it."""
    token = distributed.broadcast_object(uuid.uuid4().hex if rank == 0 else None)
    probe = directory / f".shared_probe_{token}"
    if rank == 0:
        probe.write_text(token)
    distributed.barrier()
    try:
        seen = probe.read_text() == token
    except OSError:
        seen = False
    blind = [f"rank {r} on {host}" for r, (ok, host) in enumerate(distributed.all_gather_objects(
        (seen, socket.gethostname()))) if not ok]
    distributed.barrier()  # everyone has looked before the probe goes
    if rank == 0:
        probe.unlink(missing_ok=True)
    if blind:
        raise PermissionError(
            f"training.output_dir {directory} is not shared between the nodes: {', '.join(blind)} cannot see "
            "the files rank 0 writes there, so no checkpoint would be whole; put training.output_dir on a "
            "filesystem every node mounts (NFS, Lustre, ...) at the same path")


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
        self.rank, self.world_size = distributed.init_distributed(int(self.config.parallel.collective_timeout_s))
        check_writable(self.output_dir)  # on every rank, before anything waits for anyone
        if self.world_size > 1:
            check_shared_output_dir(self.output_dir, self.rank)
        with self._lock_output_dir():  # released on the way out; only a clean end clears its record
            return self._train_locked(rack, dataloader, val_data)

    def _lock_output_dir(self) -> OutputDirLock:
        """Rank 0 takes the output dir's lock; a refusal is raised on every rank, naming the holder."""
        lock, outcome = OutputDirLock(self.output_dir), None
        if self.rank == 0:
            try:
                outcome = ("notice", lock.acquire())
            except ckpt.CheckpointError as exc:
                outcome = ("refused", str(exc))
        if self.world_size > 1:
            outcome = distributed.broadcast_object(outcome)
        kind, text = outcome
        if kind == "refused":
            raise ckpt.CheckpointError(text)
        if text and self.rank == 0:
            print(text, flush=True)
        return lock

    def _train_locked(self, rack: Rack | None, dataloader: Iterable | None, val_data: Iterable | None) -> dict:
        cfg = self.config
        cfg.validate_world_size(self.world_size)
        watchdog = self._start_watchdog()
        groups_before = self._count_process_groups()
        self._setup_run(rack, dataloader, val_data)
        saved_config, state = self._resume_state()
        phases = plan_phases(cfg)
        # every remaining phase is planned now (deterministic, the same on every rank): a phase that cannot
        # be placed, e.g. under parallel.max_rank_memory_mb, stops the run before any training, naming it
        layouts = plan_phase_layouts(phases[state.phase_index:], self.units, cfg, self.world_size, self.bf16)
        finished_before = state.phase_index >= len(phases)
        if saved_config is not None and not finished_before:
            ckpt.check_resumable_changes(saved_config, cfg.to_dict(), self.checkpoint_dir / self.resume_tag)
        self._prepare_output_dir(write_config=not finished_before)
        self.bundle = self._load_data() if dataloader is None else None
        self.monitor = Monitor(self.output_dir, enabled=self.rank == 0, progress_bar=cfg.training.progress_bar,
                               log_interval=cfg.training.log_interval)
        try:
            if finished_before:
                self.monitor.message(f"[stackwise] {self.checkpoint_dir} already holds the finished run "
                                     f"({state.global_step} steps); nothing to do, its config.yaml and results.json "
                                     "are kept. Use a new training.output_dir to train again.")
            for phase, layout in zip(phases[state.phase_index:], layouts, strict=True):
                state = self._run_phase(phase, layout, phases, state)
        finally:
            self.monitor.close()
        self._retire_pipeline()
        self.results["process_groups"] = {"before": groups_before, "after": self._count_process_groups()}
        if watchdog is not None:
            watchdog.stop()
        if self.rank == 0 and not finished_before:
            self._write_results(state, complete=True)
        return self.results

    # ------------------------------------------------------------------ setup

    def _setup_run(self, rack: Rack | None, dataloader, val_data) -> None:
        cfg, t = self.config, self.config.training
        data_parallel = self.world_size // cfg.pipeline_stages
        self.global_batch = t.micro_batch_size * t.gradient_accumulation_steps * data_parallel
        self.user_rack, self.user_data = rack, (dataloader, val_data)
        self.bf16 = resolve_precision(t.precision) == Precision.BF16
        self.units = layer_units(cfg.model.architecture.n_stacks, cfg.model.architecture.blocks_per_stack)
        self.pipe = self.engine = self.layout = None
        self.weights_tag: str | None = None  # the newest checkpoint: where a new placement reads its layers
        self.init_dir: Path | None = None  # training.init_from's layer files, the weights before any checkpoint
        self.results: dict[str, Any] = {"phases": [], "losses": [], "val_history": [],
                                        "output_dir": str(self.output_dir)}

    def _build_stage_rack(self, layout: PhaseLayout) -> Rack:
        """The configured Rack with real weights only in this rank's stage of ``layout`` (the rest on meta)."""
        stage = stage_of_rank(self.rank, layout.pipeline_stages, self.world_size)
        local = layout.rack_modules(stage, self.units, self.config.model.tie_embeddings)
        return create_rack_from_config(self.config, materialize=local.__contains__)

    def _start_watchdog(self) -> PeerWatchdog | None:
        if self.world_size == 1:
            return None
        run_id = distributed.broadcast_object(uuid.uuid4().hex[:12] if self.rank == 0 else None)
        return PeerWatchdog(self.output_dir / ".heartbeat" / run_id, self.rank, self.world_size,
                            timeout_s=self.config.parallel.peer_timeout_s).start()

    def _resume_state(self) -> tuple[dict | None, ckpt.TrainingState]:
        """(the saved config, or None when starting fresh; the state to continue from)."""
        fresh = ckpt.TrainingState(training_architecture=self.config.training.training_architecture,
                                   config=self.config.to_dict())
        self.resume_tag = ckpt.find_resume_tag(self.checkpoint_dir)
        if self.resume_tag is None:
            self._prepare_initial_weights()
            return None, fresh
        if not self.config.training.resume:
            raise ckpt.CheckpointError(
                f"{self.checkpoint_dir} already holds checkpoints and training.resume is false: starting over "
                "would overwrite them; choose a new training.output_dir or set training.resume=true")
        if self.config.training.init_from is not None and self.rank == 0:
            print(f"[stackwise] {self.checkpoint_dir} holds checkpoint {self.resume_tag}: resume wins, "
                  f"training.init_from ({self.config.training.init_from}) is ignored (it only starts a fresh run)",
                  flush=True)
        state = ckpt.load_state(self.checkpoint_dir, self.resume_tag)
        self.weights_tag = self.resume_tag
        self._resumed_history(state.global_step)
        ckpt.check_same_architecture(state.config.get("model", {}), self.config.to_dict()["model"],
                                     self.checkpoint_dir / self.resume_tag)
        if state.training_architecture != self.config.training.training_architecture:
            raise ckpt.CheckpointError(
                f"checkpoint {self.checkpoint_dir / self.resume_tag} comes from a "
                f"{state.training_architecture} run but the config asks for "
                f"{self.config.training.training_architecture}: use a new training.output_dir")
        saved_config, state.config = state.config, self.config.to_dict()
        return saved_config, state

    def _prepare_initial_weights(self) -> None:
        """A fresh run with training.init_from: the source as layer files of output_dir/initial_weights
        (each rank converts a share), read by the first placement like a checkpoint tag."""
        if self.config.training.init_from is not None:
            from .init_weights import prepare_initial_weights

            self.init_dir = prepare_initial_weights(self.config, self.output_dir, self.rank, self.world_size)

    def _weights_dir(self) -> Path | None:
        """Where a placement reads its layers: the newest checkpoint, else init_from's initial weights."""
        return self.checkpoint_dir / self.weights_tag if self.weights_tag is not None else self.init_dir

    def _prepare_output_dir(self, write_config: bool) -> None:
        if self.rank == 0:
            self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
            if write_config:
                self.config.to_yaml(self.output_dir / "config.yaml")
        distributed.barrier()

    def _write_results(self, state: ckpt.TrainingState, complete: bool) -> None:
        """Rank 0: results.json, the whole run's history so far (also at every checkpoint, so a
        resumed run continues it instead of starting a new one)."""
        self.results.update(global_step=state.global_step, finished_phases=state.finished_phases, complete=complete)
        ckpt.write_json_atomic(self.output_dir / "results.json", self.results)

    def _resumed_history(self, global_step: int) -> None:
        """Take over the history of results.json up to the checkpoint being resumed (steps after it are redone)."""
        path = self.output_dir / "results.json"
        try:
            saved = json.loads(path.read_text())
        except (OSError, ValueError):
            return  # no history (a run killed before its first checkpoint, or an older version): start anew
        if len(saved.get("losses", [])) < global_step:
            return  # a history older than the checkpoint (written by an older version): not continued
        self.results["losses"] = saved["losses"][:global_step]
        self.results["val_history"] = [entry for entry in saved.get("val_history", []) if entry[0] <= global_step]
        self.results["phases"] = [p for p in saved.get("phases", []) if p.get("end_global_step", 1e18) <= global_step]

    def _load_data(self):
        """The run's datasets (every rank loads them; the cache lets one tokenise while others wait)."""
        from ..data import TOKENIZER_FILE
        from .data_setup import check_run_data, load_bundle, print_data_summary
        from .init_weights import check_run_tokenizer

        bundle = load_bundle(self.config)
        check_run_data(self.config, bundle, self.global_batch)
        check_run_tokenizer(self.init_dir, self.config.training.init_from, bundle.tokenizer, self.config.data.tokenizer)
        if self.rank == 0:  # <output_dir>/tokenizer.json: the run's tokens, for tools and users
            bundle.tokenizer.save(self.output_dir / TOKENIZER_FILE)
            print_data_summary(self.config, bundle)
        return bundle

    def _replica_data(self, layout: PhaseLayout):
        """(training source, validation set) of this rank's data-parallel replica in ``layout``."""
        dp_rank = data_parallel_rank(self.pipe)
        dataloader, val_data = self.user_data
        if dataloader is None:
            from .data_setup import replica_data

            train, val = replica_data(self.config, self.bundle, self.global_batch, dp_rank, layout.data_parallel)
            return train, (val if val_data is None else _as_validation_set(val_data))
        base_dp = self.world_size // self.config.pipeline_stages
        if layout.data_parallel != base_dp:
            raise ConfigError(
                f"the dataloader given to train_architecture feeds {base_dp} data-parallel replica(s), but this "
                f"phase's {layout.describe()} has {layout.data_parallel}: set parallel.phase_layout=fixed, or "
                "let the trainer build the data from config.data (it re-splits the global batch per phase)")
        return dataloader, None if val_data is None else _as_validation_set(val_data)

    # ------------------------------------------------------------------ placement

    def _place(self, layout: PhaseLayout, sources: dict[int, int]) -> None:
        """Re-form the pipeline for ``layout``: retire the old one, build this rank's stage, fill it
        from the newest checkpoint's layer files (``sources``: a growth's layer -> the layer it copies)."""
        self._retire_pipeline()
        self.groups_before = distributed.live_process_groups()
        rack = self.user_rack if self.user_rack is not None else self._build_stage_rack(layout)
        cfg = self.config
        self.pipe = rack_to_pipeline(rack, layout, self.world_size, cfg.parallel.activation_checkpoint_interval,
                                     stack_precision=cfg.stack_frozen_precisions())
        self.layout = layout
        self.ds_config = build_ds_config(cfg, layout.data_parallel, layout.gradient_accumulation_steps)
        self.train_source, self.val_source = self._replica_data(layout)
        if self._weights_dir() is not None:
            load_layers(self.pipe, self._weights_dir(), sources)

    def _growth_sources(self, phase: Phase, state: ckpt.TrainingState) -> dict[int, int]:
        """At the start of a growing phase: pipeline layer -> the layer whose weights it starts as."""
        if state.phase_step:
            return {}
        return phase_layer_sources(self.units, phase, self.config.training.growth_operator)

    def _retire_pipeline(self) -> None:
        """Destroy the engine, the PipelineModule and every process group they created."""
        if self.pipe is None:
            return
        if self.engine is not None:
            self.engine.destroy()
        self.engine = self.pipe = None
        distributed.destroy_process_groups_except(self.groups_before)
        forget_process_groups()
        gc.collect()  # the old stage's modules, engine and ZeRO buffers sit in reference cycles
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _check_resumed_layout(self, layout: PhaseLayout, state: ckpt.TrainingState) -> None:
        """Mid-phase, the optimizer shards and engine files belong to the layout that saved them."""
        saved = PhaseLayout.from_dict(state.layout) if state.layout else None
        if saved is not None and not layout.same_placement(saved):
            raise ckpt.CheckpointError(
                f"checkpoint {self.checkpoint_dir / self.resume_tag} was saved mid-phase with the layout "
                f"'{saved.describe()}' but this launch plans '{layout.describe()}' (world size {self.world_size}): "
                "relaunch with the world size and parallel.* settings of the saved run, or convert the tag with "
                f"python tools/reshard.py {self.checkpoint_dir / self.resume_tag} NEW_OUTPUT_DIR --pipeline-stages P "
                "--data-parallel D (it continues on the fixed pipeline)")

    # ------------------------------------------------------------------ one phase

    def _run_phase(self, phase: Phase, layout: PhaseLayout, phases: list[Phase],
                   state: ckpt.TrainingState) -> ckpt.TrainingState:
        resuming_mid_phase = self.resume_tag is not None and state.phase_step > 0
        if resuming_mid_phase:
            self._check_resumed_layout(layout, state)
        sources = self._growth_sources(phase, state)
        if not layout.same_placement(self.layout):
            self._place(layout, sources)
        elif sources:  # the pipeline stays: re-read the grown layers' sources
            load_layers(self.pipe, self._weights_dir(), sources)
        self.engine = engine = self._build_engine(phase, phases)
        if resuming_mid_phase:
            self._load_resume_checkpoint(engine)
        elif self._carries_optimizer() and phase.index > 0:
            self._carry_moments(engine, phases[phase.index - 1], sources)
        self.resume_tag = None  # loaded once; later phases continue from memory or the newest tag
        state.layout = layout.to_dict()
        start = state.global_step - state.phase_step
        record = {"index": phase.index, "name": phase.name, "kind": phase.kind, "steps": phase.steps,
                  "start_global_step": start, "layout": state.layout,
                  "losses": list(self.results["losses"][start:])}  # steps done before a mid-phase resume
        if state.phase_step == 0:
            record["val_loss_before"] = self._validate(engine, state.global_step)
        else:  # a mid-phase resume: the phase's first validation is in the saved history
            record["val_loss_before"] = val_loss_at(self.results["val_history"], start)
        self.monitor.start_phase(phase, len(phases), state.phase_step, state.global_step)
        self.monitor.layout(layout, state.global_step)
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
        self.results["phases"].append(record)
        self._save(engine, state, moments=self._carries_optimizer())  # also the last: a run may be extended
        record.update(self._resource_usage())
        return state

    def _build_engine(self, phase: Phase, phases: list[Phase]):
        roles = None if phase.kind == PhaseKind.RACK else dict(enumerate(phase.layer_roles(self.pipe.units)))
        return build_engine(self.pipe, self.ds_config, roles,
                            optimizer_factory=partial(make_optimizer, training=self.config.training,
                                                      units=self.pipe.units),
                            lr_lambda=phase_lr_lambda(phase, phases, self.config.training))

    # ------------------------------------------------------------------ optimizer across phases

    def _carries_optimizer(self) -> bool:
        return self.config.training.optimizer_across_phases == OptimizerAcrossPhases.CARRY

    def _carry_moments(self, engine, previous: Phase, sources: dict[int, int]) -> None:
        """Start this phase's optimizer from the moments the previous phase's end wrote (its tag is the
        newest): each layer that trains takes those of the layer it starts as, if that one trained.
        Continuing and resuming at a phase boundary both read the files, bit for bit alike."""
        tag_dir, modules = self._weights_dir(), local_layer_modules(self.pipe)
        trained = previous.layer_roles(self.units)
        tied = self.config.model.tie_embeddings  # the tied weight (layer 0's file) trains through the head
        files = {}
        for layer, module in modules.items():
            source = sources.get(layer, layer)
            if any(p.requires_grad for p in module.parameters()) and (trained[source] == TRAIN or
                                                                       (source == 0 and tied)):
                files[layer] = tag_dir / ckpt.moments_file_name(source)
        verify_on_every_rank(sorted(set(files.values())), tag_dir)
        payloads = {layer: torch.load(path, map_location="cpu", weights_only=True) for layer, path in files.items()}
        set_layer_moments(engine, modules, payloads)

    def _save_moments(self, engine, tag_dir: Path) -> None:
        """Collective: the phase end's per-layer moments, written by one rank per layer."""
        for layer, payload in layer_moments(engine, local_layer_modules(self.pipe)).items():
            torch.save(payload, tag_dir / ckpt.moments_file_name(layer))

    def _resource_usage(self) -> dict[str, float]:
        """Live process groups and resident memory, the largest over ranks (leak checks across phases)."""
        rows = distributed.all_gather_floats([len(distributed.live_process_groups()), current_rss_mb()])
        return {"process_groups": int(max(r[0] for r in rows)), "rss_mb": max(r[1] for r in rows)}

    @staticmethod
    def _count_process_groups() -> int:
        """The most process groups any rank holds (collective)."""
        return int(max(row[0] for row in distributed.all_gather_floats([len(distributed.live_process_groups())])))

    def _load_resume_checkpoint(self, engine) -> None:
        """Load weights, optimizer and scheduler mid-phase on every rank; a failure on any rank is
        reported on all of them (no rank left waiting)."""
        where = self.checkpoint_dir / self.resume_tag
        self.monitor.message(f"[stackwise] resuming from {where}")
        verify_on_every_rank(self._files_to_load(engine, where), where)
        engine.load_checkpoint(str(self.checkpoint_dir), tag=self.resume_tag)

    def _files_to_load(self, engine, where: Path) -> list[Path]:
        """The DeepSpeed files this rank reads besides its layer files: its engine and optimizer state.

        The layer files were verified (CRCs, the right layer) by the placement that just loaded them
        from this same tag (``_place`` runs first on a resume: no layout is placed yet)."""
        stage = self.pipe.stage_id
        files = [where / ckpt.engine_state_file(stage)]
        if engine.optimizer is not None and self.config.parallel.zero_stage == 1:
            files.append(where / ckpt.zero_shard_file(data_parallel_rank(self.pipe), stage))
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
        """Mean loss over the run's validation micro-batches, whatever the data-parallel degree."""
        if self.val_source is None:
            return float("nan")
        val = self.val_source
        losses = engine.eval_batch(iter(val.batches), num_micro_batches=len(val.batches), reduce_output=None,
                                   bcast_loss=False)
        real = [float(loss) for loss in losses[:val.real]] if engine.is_last_stage() else []
        rows = distributed.all_gather_floats([sum(real), len(real)])
        val_loss = sum(r[0] for r in rows) / max(sum(r[1] for r in rows), 1)
        self.results["val_history"].append((step, val_loss))
        self.monitor.scalars({"val/loss": val_loss, "val/perplexity": math.exp(min(val_loss, 50.0))}, step)
        self.monitor.flush()
        return val_loss

    def _save(self, engine, state: ckpt.TrainingState, moments: bool = False) -> None:
        """Checkpoint ``state``; ``moments``: also the per-layer optimizer moments the next phase starts from."""
        tag = ckpt.tag_for(state.global_step)
        state.tied_weight_max_abs_diff = tied_weight_max_abs_diff(self.pipe)
        self.monitor.scalar("integrity/tied_weight_max_abs_diff", state.tied_weight_max_abs_diff, state.global_step)
        if state.tied_weight_max_abs_diff != 0.0:
            self.monitor.message(f"[stackwise] WARNING: tied weight copies differ by up to "
                                 f"{state.tied_weight_max_abs_diff:.3e} across stages at step {state.global_step}")
        if self.rank == 0:  # re-saving a tag (a resume from before it): never a marker over half-new files
            ckpt.unmark(self.checkpoint_dir, tag)
        distributed.barrier()
        with reporting_write_failures(self.checkpoint_dir, tag, self.rank):  # a full disk: a clear error
            engine.save_checkpoint(str(self.checkpoint_dir), tag=tag, save_latest=False)
            self._save_unplaced_layers(self.checkpoint_dir / tag)
            if moments:
                self._save_moments(engine, self.checkpoint_dir / tag)
            distributed.barrier()  # every rank's files are on disk before the tag is published
            if self.rank == 0:  # history first: a published tag never has an older results.json beside it
                self._write_results(state, complete=False)
                from .data_setup import save_tokenizer  # tools find the tokenizer in the tag folder

                save_tokenizer(self.config, self.bundle, self.checkpoint_dir / tag)
                ckpt.mark_complete(self.checkpoint_dir, tag, state)
        if self.rank == 0:
            self._announce_and_retire(tag)
        distributed.barrier()
        self.weights_tag = tag
        self.monitor.flush()

    def _announce_and_retire(self, tag: str) -> None:
        """Rank 0, once ``tag`` is published: delete the tags training.keep_checkpoints lets go, and say so."""
        t = self.config.training
        try:
            removed, note = ckpt.retire_old_tags(self.checkpoint_dir, t.keep_checkpoints, t.keep_phase_ends), ""
        except OSError as exc:  # an old tag that cannot be deleted costs disk space, not the run
            removed, note = [], f"; WARNING: could not delete an older checkpoint ({exc}), it stays"
        deleted = f", deleted {', '.join(removed)} (training.keep_checkpoints={t.keep_checkpoints})" if removed else ""
        self.monitor.message(f"[stackwise] checkpoint {tag} saved{deleted}{note}")

    def _save_unplaced_layers(self, tag_dir: Path) -> None:
        tied = self.config.model.tie_embeddings
        unplaced = [i for i, unit in enumerate(self.units)
                    if i not in self.layout.live and not (tied and unit.kind == UnitKind.HEAD)]
        save_unplaced_layers(tag_dir, unplaced, self.units, self.user_rack, self.config.model,
                             self.config.training.seed, self.rank, self.world_size, self._weights_dir())


def _as_validation_set(batches):
    from .data_setup import ValidationSet

    batches = list(batches)
    return ValidationSet(batches, len(batches)) if batches else None


def val_loss_at(history: list, step: int) -> float:
    """The last validation loss recorded at ``step`` (a phase's first: its predecessor's last comes before it)."""
    return next((loss for at, loss in reversed(history) if at == step), float("nan"))


def current_rss_mb() -> float:
    """Resident memory of this process now (not the peak)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:  # not Linux: the peak is the best there is
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
