"""This rank's pipeline stage for a phase's layout, and the engine that trains it."""

from __future__ import annotations

import gc
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch

from ..config import ModelConfig, ParallelConfig, TrainingConfig
from ..console import deepspeed_prints
from ..layout import TRAIN, LayerUnit, UnitKind
from ..model import Rack, build_rack, untie_lm_head
from ..parallel import distributed
from ..parallel.ds_config import build_ds_config
from ..parallel.engine import build_engine, forget_process_groups
from ..parallel.pipe import data_parallel_rank, rack_to_pipeline, stage_of_rank
from ..phases import Phase
from ..placement import PhaseLayout
from .feeds import DataFeeds
from .growth import zero_residual_writers
from .layer_files import load_layers, local_layer_modules, save_unplaced_layers
from .lr import phase_lr_lambda
from .optim import make_optimizer
from .stack_cache import ActivationCache


class PhasePipeline:
    """The standing pipeline: re-formed when a phase's layout changes, kept while it stays."""

    def __init__(self, *, model: ModelConfig, training: TrainingConfig, parallel: ParallelConfig, rank: int,
                 world_size: int, units: list[LayerUnit], user_rack: Rack | None, feeds: DataFeeds,
                 stack_cache: ActivationCache | None = None):
        self.model = model
        self.training = training
        self.parallel = parallel
        self.rank = rank
        self.world_size = world_size
        self.units = units
        self.user_rack = user_rack
        self.feeds = feeds
        self.pipe = self.engine = self.layout = self.ds_config = None
        self.head_tied: bool | None = None  # whether the placed pipeline ties the LM head to the embedding
        self.groups_before = None  # the process groups before this pipeline's: what retiring it keeps
        self.replica_train = self.val_source = None  # this replica's data in the placed layout
        self.train_source = None  # what the phase reads: replica_train, its rows keyed for the stack cache
        self.stack_cache = stack_cache  # training.stack_cache 'disk'; None: off

    def take_layout(self, layout: PhaseLayout, weights_dir: Path | None, sources: dict[int, int],
                    tied: bool, zeroed: frozenset[int] = frozenset()) -> None:
        """Place ``layout`` (its LM head tied to the embedding when ``tied``) unless it stands already, head
        included; a standing pipeline re-reads the grown layers' sources. The residual writers of the layers
        ``zeroed`` (growth_init 'identity') then start at zero."""
        if not layout.same_placement(self.layout) or tied != self.head_tied:
            self.place(layout, weights_dir, sources, tied)
        elif sources:
            load_layers(self.pipe, weights_dir, sources)
        zero_residual_writers(local_layer_modules(self.pipe), zeroed)

    def place(self, layout: PhaseLayout, weights_dir: Path | None, sources: dict[int, int], tied: bool) -> None:
        """Re-form the pipeline for ``layout``: retire the old one, build this rank's stage (its head untied
        unless ``tied``), fill it from ``weights_dir``'s layer files (``sources``: a growth's layer -> the
        layer it copies)."""
        self.retire()
        self.groups_before = distributed.live_process_groups()
        rack = self._stage_rack(layout, tied)
        self.pipe = rack_to_pipeline(rack, layout, self.world_size, self.parallel.activation_checkpoint_interval,
                                     stack_precision=self.training.frozen_precisions(self.model.architecture.n_stacks))
        self.layout, self.head_tied = layout, tied
        self.ds_config = build_ds_config(self.training, self.parallel, layout.data_parallel,
                                         layout.gradient_accumulation_steps)
        self.replica_train, self.val_source = self.feeds.replica(layout, data_parallel_rank(self.pipe))
        if weights_dir is not None:
            load_layers(self.pipe, weights_dir, sources)

    def _build_stage_rack(self, layout: PhaseLayout, tied: bool) -> Rack:
        """The configured Rack (its head untied unless ``tied``) with real weights only in this rank's stage of
        ``layout`` (the rest on meta)."""
        stage = stage_of_rank(self.rank, layout.pipeline_stages, self.world_size)
        local = layout.rack_modules(stage, self.units, tied)
        model = replace(self.model, tie_embeddings=tied)
        return build_rack(model, seed=self.training.seed, materialize=local.__contains__)

    def _stage_rack(self, layout: PhaseLayout, tied: bool) -> Rack:
        """The Rack this rank's stage of ``layout`` wraps: the caller's (untied when the phase unties it), or
        one built here."""
        if self.user_rack is None:
            return self._build_stage_rack(layout, tied)
        if not tied:
            untie_lm_head(self.user_rack)
        return self.user_rack

    def untied_head(self) -> bool:
        """Whether the placed pipeline's head is its own copy of a tied config's embedding (what a tag records)."""
        return self.model.tie_embeddings and not self.head_tied

    def build_engine(self, phase: Phase, phases: list[Phase]):
        """A fresh engine for ``phase``: its trainable set, a new optimizer and its LR schedule; the stack cache
        serves its frozen prefix."""
        layer_roles = phase.layer_roles(self.pipe.units)
        roles = None if all(role == TRAIN for role in layer_roles) else dict(enumerate(layer_roles))
        training = self.training
        optimizer_factory = partial(make_optimizer, training=training, units=self.pipe.units)
        with deepspeed_prints():  # e.g. DeepSpeed's bf16 optimizer prints 'begin bf16_optimizer' and memory lines
            self.engine = build_engine(self.pipe, self.ds_config, roles, optimizer_factory=optimizer_factory,
                                       lr_lambda=phase_lr_lambda(phase, phases, training))
        self.train_source = self.replica_train
        if self.stack_cache is not None:
            self.train_source = self.stack_cache.attach(self.pipe, layer_roles, self.layout, self.replica_train)
        return self.engine

    def cache_stats(self) -> dict[str, int] | None:
        """Collective: the stack cache's windows of the phase (read, computed, advanced); None when off."""
        return None if self.stack_cache is None else self.stack_cache.phase_stats()

    def retire(self) -> None:
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

    def save_unplaced_layers(self, tag_dir: Path, source_dir: Path | None) -> None:
        """Collective: the files of the layers this layout does not place (see ``save_unplaced_layers``)."""
        unplaced = [i for i, unit in enumerate(self.units)
                    if i not in self.layout.live and not (self.head_tied and unit.kind == UnitKind.HEAD)]
        save_unplaced_layers(tag_dir, unplaced, self.units, self.user_rack, self.model, self.training.seed,
                             self.rank, self.world_size, source_dir)
