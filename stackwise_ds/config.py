"""Typed, nested run configuration: defaults < YAML < ``--set key=value`` overrides.

Every section is a dataclass with documented fields. Loading is strict: an unknown
key is an error naming the key and its section, a value of the wrong type is an
error naming the expected type. Keys of the seed project (``training.mode``,
``training.block_size``, ``layerwise_training``, ...) are migrated with a
``DeprecationWarning`` that says what to write instead.

Each consumer takes only the section it needs (``ModelConfig`` builds the rack,
``DataConfig`` the data, ...), so no god object travels through the code.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import os
import types
import typing
import warnings
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from .enums import (
    AttentionMode,
    AttentionType,
    CacheDtype,
    Choice,
    DataSource,
    FrozenPrecision,
    GrowthInit,
    GrowthOperator,
    InitGrowth,
    KernelFeatureMap,
    LayoutKind,
    LrDecay,
    LrSchedule,
    NonfinitePolicy,
    Objective,
    OptimizerAcrossPhases,
    PhaseData,
    Precision,
    Prefix,
    StackCache,
    TokenizerKind,
    TrainingArchitecture,
)


class ConfigError(ValueError):
    """A configuration problem; the message names the key and how to fix it."""


# bf16 weights with gradients accumulated in fp32 (the bf16 template) are DeepSpeed's BF16_Optimizer, which it builds
# only under ZeRO-1; without ZeRO it raises "unsupported mix of model_dtype=torch.bfloat16 and grad_accum_dtype=...".
BF16_WITHOUT_ZERO = ("training.precision bf16 (what 'auto' picks on a GPU) needs parallel.zero_stage 1: DeepSpeed "
                     "accumulates bf16 gradients in fp32 only under ZeRO-1 and refuses bf16 without ZeRO; set "
                     "parallel.zero_stage 1 (the default, which also shards the optimizer over data-parallel replicas)"
                     ", or training.precision fp32")


# --------------------------------------------------------------------------- model


@dataclass
class ArchitectureConfig:
    n_stacks: int = 2
    """Number of Stacks in the Rack; each Stack is one pipeline stage by default."""
    blocks_per_stack: int = 2
    """Transformer Blocks in every Stack."""


@dataclass
class MLAConfig:
    """Multi-head latent attention (DeepSeek-V2); used when attention_type is 'mla'."""

    kv_lora_rank: int = 64
    """Width of the compressed K/V latent."""
    q_lora_rank: int = 0
    """Width of the compressed query latent; 0 projects queries directly."""
    rope_head_dim: int = 16
    """Per-head dimensions carrying the decoupled RoPE part of queries and keys."""

    def validate(self) -> None:
        _check_positive("model.mla.kv_lora_rank", self.kv_lora_rank)
        _check_positive("model.mla.rope_head_dim", self.rope_head_dim)
        if self.rope_head_dim % 2:
            raise ConfigError(f"model.mla.rope_head_dim ({self.rope_head_dim}) must be even for RoPE, which rotates "
                              "pairs of dimensions: choose an even value")
        if self.q_lora_rank < 0:
            raise ConfigError(f"model.mla.q_lora_rank ({self.q_lora_rank}) must be >= 0: use 0 to project queries "
                              "directly")


@dataclass
class KernelAttentionConfig:
    """Linear attention with a positive feature map; used when attention_type is 'kernel'."""

    feature_map: KernelFeatureMap = KernelFeatureMap.ELU
    """'elu' (elu(x)+1) or 'relu'."""
    chunk_size: int = 64
    """Chunk length of the causal O(T) scan."""


@dataclass
class ModelConfig:
    vocab_size: int = 258
    """Token vocabulary; 258 = 256 bytes + end-of-document + mask of the byte tokenizer."""
    d_model: int = 256
    """Residual stream width."""
    n_heads: int = 8
    """Query heads."""
    n_kv_heads: Optional[int] = None
    """Key/value heads for 'gqa' and 'kernel' (None = n_heads); must divide n_heads."""
    d_ff: Optional[int] = None
    """SwiGLU hidden width (None = 8/3 * d_model rounded up to a multiple of 64)."""
    max_seq_len: int = 1024
    """Longest sequence the model accepts (RoPE tables are built for it)."""
    attention_type: AttentionType = AttentionType.GQA
    """'mha', 'gqa', 'mla' or 'kernel'."""
    attention_mode: AttentionMode = AttentionMode.CAUSAL
    """'causal' (next-token LM) or 'bidirectional' (masked LM)."""
    rope_theta: float = 10000.0
    """RoPE base frequency."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    dropout: float = 0.0
    """Dropout on the residual branches (0 for pretraining-style runs)."""
    tie_embeddings: bool = True
    """Share the token embedding with the LM head."""
    freeze_up_proj: bool = False
    """Keep every SwiGLU up-projection at its random initialisation."""
    init_std: float = 0.02
    """Std of the normal init; residual output projections get init_std / sqrt(2 * n_blocks)."""
    compile: bool = False
    """torch.compile each Block (its forward, and the backward through it): fewer kernel launches and fused
    elementwise work on GPUs; the first steps of each phase pay the compile (tens of seconds), and weights and
    checkpoints are unchanged, so a run may resume with it switched."""
    architecture: ArchitectureConfig = field(default_factory=ArchitectureConfig)
    mla: MLAConfig = field(default_factory=MLAConfig)
    kernel: KernelAttentionConfig = field(default_factory=KernelAttentionConfig)

    @property
    def n_blocks(self) -> int:
        return self.architecture.n_stacks * self.architecture.blocks_per_stack

    @property
    def resolved_n_kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def validate(self) -> None:
        """The model's own rules, each checked here and nowhere else (the model modules trust a validated config);
        every message names the ``model.`` key and how to fix it."""
        _parse_choices(self, key="model")
        for key in ("vocab_size", "d_model", "n_heads", "max_seq_len", "rope_theta", "norm_eps", "init_std"):
            _check_positive(f"model.{key}", getattr(self, key))
        for key in ("n_stacks", "blocks_per_stack"):
            _check_positive(f"model.architecture.{key}", getattr(self.architecture, key))
        for key in ("n_kv_heads", "d_ff"):
            if getattr(self, key) is not None:
                _check_positive(f"model.{key}", getattr(self, key))
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout ({self.dropout}) must be in [0, 1): use 0.0 to disable it")
        self._validate_heads()
        if self.attention_type == AttentionType.MLA:
            self.mla.validate()
        if self.attention_type == AttentionType.KERNEL:
            _check_positive("model.kernel.chunk_size", self.kernel.chunk_size)

    def _validate_heads(self) -> None:
        if self.d_model % self.n_heads:
            raise ConfigError(f"model.d_model ({self.d_model}) must be divisible by model.n_heads ({self.n_heads}): "
                              "pick n_heads among the divisors of d_model")
        one_kv_per_query = self.attention_type in (AttentionType.MHA, AttentionType.MLA)
        if one_kv_per_query and self.n_kv_heads not in (None, self.n_heads):
            raise ConfigError(f"model.attention_type '{self.attention_type}' uses one key/value head per query head "
                              f"but model.n_kv_heads is {self.n_kv_heads}: remove n_kv_heads, or use 'gqa' or 'kernel'")
        if self.n_heads % self.resolved_n_kv_heads:
            raise ConfigError(f"model.n_heads ({self.n_heads}) must be divisible by model.n_kv_heads "
                              f"({self.n_kv_heads}): pick n_kv_heads among the divisors of n_heads")
        if self.attention_type != AttentionType.MLA and self.head_dim % 2:  # MLA rotates only its rope_head_dim
            raise ConfigError(f"the head width model.d_model / model.n_heads ({self.head_dim}) must be even for RoPE, "
                              "which rotates pairs of dimensions: choose d_model and n_heads so that it is even")

    @property
    def resolved_d_ff(self) -> int:
        if self.d_ff is not None:
            return self.d_ff
        return -(-(8 * self.d_model // 3) // 64) * 64  # Llama's 8/3 rule, rounded up to 64


# --------------------------------------------------------------------------- training


@dataclass
class TrainingConfig:
    training_architecture: TrainingArchitecture = TrainingArchitecture.RACKWISE
    """'rackwise' (end to end), 'stackwise' (one stack per phase) or 'blockwise' (one block per phase)."""
    objective: Objective = Objective.CAUSAL_LM
    """'causal_lm' (next token) or 'masked_lm' (needs attention_mode 'bidirectional')."""
    seed: int = 42
    """Seeds the weights (per module, layout-independent), the data order and the split."""
    output_dir: str = "runs/default"
    """Where config.yaml, tensorboard/ and checkpoints/ go; re-running resumes from here."""
    max_steps: int = 150
    """Optimizer steps of a rackwise run."""
    steps_per_phase: Union[int, list[int]] = 75
    """Steps of each stackwise/blockwise phase: one number for all, or one per phase (one per depth_schedule entry)."""
    depth_schedule: Optional[list[int]] = None
    """Stackwise/blockwise: active units (stacks, or blocks in blockwise) per phase, increasing and ending at the full
    depth, e.g. [1, 4] grows once; None = [1, 2, ..., n] (one new unit a phase). Units beyond a phase's count are
    not placed."""
    joint_steps: int = 0
    """Steps of a closing end-to-end phase after the last stackwise/blockwise phase (0 = none)."""
    growth_operator: GrowthOperator = GrowthOperator.FRESH
    """How the units a phase adds start: 'fresh' (their own seeded init), 'copy_last' (copies of the last active unit),
    'copy_all' (Gstack: growing from m units, new unit j copies unit j mod m), 'copy_middle' (MIDAS: copies of the
    middle units inserted in the middle, later units move up) or 'interleave' (LLaMA Pro: after every
    interleave_every-th old unit comes a copy of it, e.g. 2 -> 4 gives [0, 0', 1, 1']). With prefix 'frozen' the old
    units freeze wherever they now sit and only the added units train. Replaces new_unit_init (fresh / copy_previous
    = copy_last)."""
    interleave_every: int = 1
    """growth_operator 'interleave': a copy follows every this-many old units; a growth from m units adds at most
    m // interleave_every."""
    growth_init: GrowthInit = GrowthInit.COPY
    """'copy' (the added units start as growth_operator says) or 'identity' (then their blocks' attention o_proj and
    SwiGLU down_proj start at zero, carried AdamW moments of those too, so the grown rack computes exactly what the
    smaller one did, as LLaMA Pro's block expansion). The added units: the positions after the old ones (fresh,
    copy_last, copy_all), copy_middle's inserted copies (not the later units that move up), and with init_from the
    stacks beyond the source's (a stage-wise run from init_from zeroes every stack its growths add, source stacks
    too). A unit is a stack (stackwise, every block of it) or a block (blockwise)."""
    prefix: Prefix = Prefix.FROZEN
    """Stackwise/blockwise: the units a phase does not add are 'frozen' (forward only) or 'train' (progressive
    stacking: every active unit trains)."""
    freeze_embedding: bool = True
    """prefix 'frozen': from the second phase on, the input embedding freezes with the prefix, so the frozen units'
    input never moves; a tied LM head then trains as its own copy of the embedding (the run's checkpoints from that
    phase on hold an untied head). false: a tied head keeps training the shared matrix under the frozen units."""
    frozen_stacks: list[int] = field(default_factory=list)
    """Stacks frozen for the whole run, in any training_architecture (e.g. [1] in a rackwise run of 2 stacks trains
    stack 0 through a frozen stack 1). A frozen stack may sit anywhere: one after a trained layer passes the gradient
    back to it (forward with autograd for its input only, no weight gradient, no optimizer state). Stage-wise runs add
    these to what each phase freezes. frozen_precision / stack_precision apply to them."""
    freeze_source: bool = False
    """With init_from: freeze, for the whole run, the stacks that start as a source stack (every stack but those
    init_growth adds), so only the added stacks train: LLaMA Pro's block expansion with init_growth 'interleave' and
    growth_init 'identity'. Adds to frozen_stacks."""
    blocks_only: bool = False
    """Train blocks only: the input embedding, the final norm and the LM head stay frozen in every phase (LLaMA Pro's
    choice when expanding a model: only the inserted blocks train). false: the norm and head train in every phase
    (literature: a frozen head cripples stage-wise training from scratch) and the embedding as the mode says."""
    optimizer_across_phases: OptimizerAcrossPhases = OptimizerAcrossPhases.RESTART
    """'restart' (a fresh AdamW every phase) or 'carry' (AdamW moments and step count of every parameter that keeps
    training pass to the next phase, across any re-placement and ZeRO-1 re-sharding; grown units start with their
    source's moments)."""
    micro_batch_size: int = 8
    """Sequences per micro-batch on each data-parallel replica."""
    gradient_accumulation_steps: int = 2
    """Micro-batches per optimizer step (the pipeline's micro-batches)."""
    lr: float = 1e-3
    """Peak learning rate."""
    min_lr_ratio: float = 0.1
    """Floor of the decay as a fraction of lr."""
    warmup_steps: int = 20
    """Linear warmup steps: at the start of every phase (lr_schedule 'per_phase') or of the run ('continuous')."""
    lr_schedule: LrSchedule = LrSchedule.PER_PHASE
    """'per_phase' (warmup and decay restart every phase) or 'continuous' (one warmup at the start of the run and one
    decay over the sum of all phases' steps)."""
    lr_decay: LrDecay = LrDecay.COSINE
    """'cosine' (from the end of warmup to min_lr_ratio) or 'wsd' (warmup-stable-decay: the peak until the last
    decay_fraction of the steps, then linear to min_lr_ratio)."""
    decay_fraction: float = 0.2
    """lr_decay 'wsd': share of the schedule's steps spent decaying."""
    growth_warmup_steps: int = 0
    """lr_schedule 'continuous': after each growth, re-warm over this many steps from growth_warmup_start x the
    scheduled lr (0 = no re-warm)."""
    growth_warmup_start: float = 0.1
    """Fraction of the scheduled lr a growth re-warm starts from."""
    stack_lr_scale: Optional[list[float]] = None
    """Per-stack multipliers of lr (one per stack); None = 1.0 everywhere."""
    weight_decay: float = 0.1
    """AdamW decoupled weight decay on matrices (not on norms)."""
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    """AdamW (beta1, beta2)."""
    grad_clip: float = 1.0
    """Global gradient-norm clip over the trainable parameters (0 = off)."""
    precision: Precision = Precision.AUTO
    """'auto' (bf16 on GPU, fp32 on CPU), 'fp32' or 'bf16'."""
    frozen_precision: FrozenPrecision = FrozenPrecision.SAME
    """Stackwise/blockwise with prefix 'frozen': what a frozen stack's weights are held and run in while it is frozen:
    'same' (the training precision), 'bf16' (bf16 weights and forward, activations cast back) or 'int8' (weight-only
    int8 with per-output-channel scales, torch's own int8 matmul). Training stacks keep the training precision, and
    checkpoints always hold the full-precision weights."""
    stack_precision: Optional[list[FrozenPrecision]] = None
    """Per-stack frozen_precision, one entry per stack (e.g. [int8, bf16, same, same]), applied while that stack is
    frozen; when set it overrides frozen_precision (None = frozen_precision for every stack)."""
    phase_data: PhaseData = PhaseData.CONTINUE
    """Stackwise/blockwise: 'continue' (each phase takes the sample order on where the last one stopped) or 'repeat'
    (every phase starts again at the order's first window, so all phases train on the same windows, as classical
    layer-wise training does)."""
    stack_cache: StackCache = StackCache.OFF
    """prefix 'frozen': 'disk' keeps, per training window, the activations the frozen prefix hands the training stack
    (a file-backed map under stack_cache_dir), so a window that comes again (a later epoch, phase_data 'repeat')
    skips the frozen forward; at a phase change the just-frozen stack runs once over the cached windows. 'off':
    the prefix runs every time. Needs the frozen embedding (phases after the first), model.dropout 0 and the data of
    config.data; the prefix must sit on the first pipeline stage (else that phase computes, with a warning)."""
    stack_cache_dtype: CacheDtype = CacheDtype.AUTO
    """How the cache stores activations: 'auto' (their own dtype: bf16 on bf16 runs, fp32 on fp32 ones; exact, so
    the losses are bitwise those without the cache), 'fp32' (exact) or 'bf16' (half the disk of fp32; on an fp32 run
    the training stack then sees bf16-rounded inputs)."""
    stack_cache_max_gb: float = 16.0
    """Bound on the cache's file on each node; windows beyond it are computed each time (with one warning)."""
    stack_cache_dir: Optional[str] = None
    """Where the cache lives (None = <output_dir>/stack_cache); a node-local disk is faster than a network one.
    Removed at the end of a run; a run that stops early resumes with it."""
    log_interval: int = 10
    """Log per-stage memory and per-stack gradient norms every this many steps (and, without a progress bar, print a
    line of step, loss and tokens/s)."""
    eval_interval: int = 25
    """Validate every this many steps and at the end of each phase (0 = only at phase ends)."""
    eval_batches: int = 8
    """Validation micro-batches per evaluation."""
    save_interval: int = 50
    """Checkpoint every this many steps (0 = only at phase ends)."""
    keep_checkpoints: Optional[int] = 3
    """Keep the newest N complete checkpoint tags and delete older ones after each save (0 or null = keep all)."""
    keep_phase_ends: bool = True
    """Also keep every phase's final tag (growth, stackwise-restack and stackwise-reshard start from them)."""
    resume: bool = True
    """Continue from the latest checkpoint in output_dir when there is one."""
    init_from: Optional[str] = None
    """Start a fresh run from these weights: a run dir, its checkpoints/ or a tag folder, a consolidated .safetensors,
    or a local Hugging Face Llama folder (None = seeded init; a checkpoint in output_dir resumes instead)."""
    init_growth: InitGrowth = InitGrowth.STACK
    """With init_from and more stacks than the source: 'stack' (stack i starts as source stack i mod n, G_stack),
    'fresh' (the new stacks get their seeded init) or 'interleave' (LLaMA Pro: a copy after every interleave_every-th
    source stack, e.g. 4 -> 6 with interleave_every 2 gives [0, 1, 1', 2, 3, 3'])."""
    progress_bar: bool = True
    """tqdm bar on rank 0 (phase, step, loss, tokens/s); when false, a plain line every log_interval steps (and no
    progress bars while data is prepared)."""
    nonfinite_policy: NonfinitePolicy = NonfinitePolicy.STOP
    """On a non-finite loss: 'stop' (report step and phase, keep the last good checkpoint, exit non-zero)."""

    def frozen_precisions(self, n_stacks: int) -> list[FrozenPrecision]:
        """The precision each of ``n_stacks`` stacks runs in while frozen: stack_precision, else frozen_precision."""
        if self.stack_precision is not None:
            return list(self.stack_precision)
        return [self.frozen_precision] * n_stacks


# --------------------------------------------------------------------------- data


@dataclass
class DataConfig:
    source: DataSource = DataSource.STDLIB
    """'stdlib' (the Python standard library's sources, no download), 'text_files' or 'hf'."""
    paths: list[str] = field(default_factory=list)
    """Files or directories for source 'text_files'."""
    hf_name: Optional[str] = None
    """Hugging Face dataset name for source 'hf'."""
    hf_config: Optional[str] = None
    """Configuration name of the Hugging Face dataset."""
    hf_split: str = "train"
    """Split of the Hugging Face dataset."""
    text_field: str = "text"
    """Column holding the text in the Hugging Face dataset."""
    seq_len: int = 256
    """Tokens per packed training sequence."""
    val_fraction: float = 0.01
    """Share of sequences held out for validation."""
    mask_prob: float = 0.15
    """Masked-LM masking rate."""
    max_files: Optional[int] = None
    """Use only the first N files (sorted) of the source."""
    max_bytes: Optional[int] = None
    """Stop reading the source after this many bytes."""
    cache_dir: Optional[str] = None
    """Tokenised-data cache (None = ~/.cache/stackwise_ds/data or $STACKWISE_DS_CACHE)."""
    tokenizer: Union[TokenizerKind, str] = TokenizerKind.BYTE
    """'byte' (utf-8 bytes, 258 ids), 'bpe' (byte-level BPE of model.vocab_size ids trained on the run's training
    split) or a path to a local tokenizer.json or a save_pretrained tokenizer folder."""


# --------------------------------------------------------------------------- parallel


@dataclass
class ParallelConfig:
    pipeline_stages: Optional[int] = None
    """Pipeline stages; must divide n_stacks and the world size (None = the largest depth that divides both)."""
    zero_stage: int = 1
    """ZeRO stage over the data-parallel replicas of each stage; 0 or 1 (2/3 do not work with pipelines). bf16 needs
    1: DeepSpeed accumulates bf16 gradients in fp32 only under ZeRO."""
    ds_config: str = "auto"
    """DeepSpeed JSON template: 'auto' (ds_configs/cpu_fp32.json or gpu_bf16.json) or a path."""
    activation_checkpoint_interval: int = 0
    """Recompute activations every N pipeline layers in backward (0 = off)."""
    phase_layout: LayoutKind = LayoutKind.ELASTIC
    """Stackwise/blockwise phases: 'elastic' (place only the live layers, re-partitioned over every rank per phase) or
    'fixed' (pipeline_stages, dormant relays)."""
    max_rank_memory_mb: Optional[float] = None
    """Elastic planner's bound on the estimated memory of one rank (weights, grads, optimizer shard, activations); None
    = no bound."""
    peer_timeout_s: float = 120.0
    """A rank exits (non-zero, naming the peer) when a peer process is gone or silent this long."""
    collective_timeout_s: float = 1800.0
    """torch.distributed timeout: a collective that waits longer fails instead of hanging."""


@dataclass
class StackWiseConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    # ---- loading and saving

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "StackWiseConfig":
        migrated = migrate_legacy_keys(copy.deepcopy(raw or {}))
        config = _build_dataclass(cls, migrated, section="")
        config.expand_user_paths()
        config.validate()
        return config

    def expand_user_paths(self) -> None:
        """``~`` in a path setting means the home directory, never a folder literally named '~'."""
        t, d, p = self.training, self.data, self.parallel
        t.output_dir = os.path.expanduser(t.output_dir)
        t.init_from = None if t.init_from is None else os.path.expanduser(t.init_from)
        t.stack_cache_dir = None if t.stack_cache_dir is None else os.path.expanduser(t.stack_cache_dir)
        d.paths = [os.path.expanduser(path) for path in d.paths]
        d.cache_dir = None if d.cache_dir is None else os.path.expanduser(d.cache_dir)
        d.tokenizer = d.tokenizer if d.tokenizer in TokenizerKind.values() else os.path.expanduser(d.tokenizer)
        p.ds_config = p.ds_config if p.ds_config == "auto" else os.path.expanduser(p.ds_config)

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: list[str] | None = None) -> "StackWiseConfig":
        return cls.from_dict(apply_overrides(read_config_yaml(path), overrides or []))

    def to_dict(self) -> dict[str, Any]:
        """Plain YAML/JSON types only: every enum member becomes its string."""
        return dataclasses.asdict(self, dict_factory=_plain_dict)

    def to_yaml(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    # ---- derived values

    @property
    def pipeline_stages(self) -> int:
        """The pipeline depth; while unset (before ``validate_world_size`` knows the world), n_stacks."""
        return self.parallel.pipeline_stages or self.model.architecture.n_stacks

    # ---- validation

    def validate(self) -> None:
        """Cross-field checks; each message names the key and how to fix it."""
        m, t, d = self.model, self.training, self.data
        _parse_choices(self, key="")
        if t.init_from is not None and not t.init_from.strip():
            raise ConfigError("training.init_from is an empty string: give a run dir, checkpoint, .safetensors file "
                              "or Hugging Face folder, or null for a seeded init")
        if self.parallel.max_rank_memory_mb is not None:
            _check_positive("parallel.max_rank_memory_mb", self.parallel.max_rank_memory_mb)
        m.validate()
        for key, value in [
            ("training.max_steps", t.max_steps), ("training.micro_batch_size", t.micro_batch_size),
            ("training.gradient_accumulation_steps", t.gradient_accumulation_steps),
            ("data.seq_len", d.seq_len),
        ]:
            _check_positive(key, value)
        if d.seq_len > m.max_seq_len:
            raise ConfigError(f"data.seq_len ({d.seq_len}) is longer than model.max_seq_len ({m.max_seq_len}): "
                              "raise model.max_seq_len or shorten data.seq_len")
        if t.objective == Objective.MASKED_LM and m.attention_mode != AttentionMode.BIDIRECTIONAL:
            raise ConfigError("training.objective 'masked_lm' needs model.attention_mode 'bidirectional' "
                              "(a causal model cannot see the tokens after a mask)")
        if t.objective == Objective.CAUSAL_LM and m.attention_mode != AttentionMode.CAUSAL:
            raise ConfigError("training.objective 'causal_lm' needs model.attention_mode 'causal' "
                              "(bidirectional attention would let each position see its own target)")
        self._validate_phases()
        self._validate_optimization()
        self._validate_parallel()
        if d.source == DataSource.TEXT_FILES and not d.paths:
            raise ConfigError("data.source is 'text_files' but data.paths is empty: list files or directories")
        if d.source == DataSource.HF and not d.hf_name:
            raise ConfigError("data.source is 'hf' but data.hf_name is not set: name a Hugging Face dataset")
        if not 0.0 <= d.val_fraction < 0.5:
            raise ConfigError(f"data.val_fraction ({d.val_fraction}) must be in [0, 0.5)")
        if len(t.adam_betas) != 2:
            raise ConfigError(f"training.adam_betas must hold two numbers, got {t.adam_betas}")

    def _validate_phases(self) -> None:
        t, arch = self.training, self.model.architecture
        self._validate_depth_schedule()
        n_phases = self.n_phases
        steps = t.steps_per_phase
        if isinstance(steps, list):
            if t.training_architecture != TrainingArchitecture.RACKWISE and len(steps) != n_phases:
                per = "depth_schedule entry" if t.depth_schedule is not None else "phase"
                raise ConfigError(
                    f"training.steps_per_phase lists {len(steps)} values but {t.training_architecture} training "
                    f"has {n_phases} phases: give one number per {per}, or a single number for all")
            for s in steps:
                _check_positive("training.steps_per_phase", s)
        else:
            _check_positive("training.steps_per_phase", steps)
        if t.joint_steps < 0:
            raise ConfigError(f"training.joint_steps must be >= 0, got {t.joint_steps}")
        if t.stack_lr_scale is not None and len(t.stack_lr_scale) != arch.n_stacks:
            raise ConfigError(f"training.stack_lr_scale has {len(t.stack_lr_scale)} values for "
                              f"{arch.n_stacks} stacks: give one multiplier per stack")
        self._validate_frozen_stacks()
        self._validate_frozen_precision()
        self._validate_stack_cache()

    def _validate_frozen_precision(self) -> None:
        t, n_stacks = self.training, self.model.architecture.n_stacks
        if t.stack_precision is not None:
            if len(t.stack_precision) != n_stacks:
                raise ConfigError(f"training.stack_precision has {len(t.stack_precision)} entries for {n_stacks} "
                                  f"stacks: give one of {', '.join(FrozenPrecision.values())} per stack")
            t.stack_precision = [FrozenPrecision.parse(value, f"training.stack_precision[{i}]", ConfigError)
                                 for i, value in enumerate(t.stack_precision)]
        freezes = (t.training_architecture != TrainingArchitecture.RACKWISE and t.prefix == Prefix.FROZEN
                   or bool(t.frozen_stacks) or t.freeze_source)
        if not freezes and any(p != FrozenPrecision.SAME for p in self.stack_frozen_precisions()):
            key = "stack_precision" if t.stack_precision is not None else "frozen_precision"
            raise ConfigError(f"training.{key} asks for a lower precision of frozen stacks, but this run freezes "
                              f"none (training_architecture '{t.training_architecture}', prefix '{t.prefix}', no "
                              "training.frozen_stacks): frozen stacks exist in stackwise/blockwise runs with "
                              f"training.prefix 'frozen' or with training.frozen_stacks; remove training.{key} or set "
                              "it to 'same'")

    def _validate_frozen_stacks(self) -> None:
        t, n_stacks = self.training, self.model.architecture.n_stacks
        if t.freeze_source and t.init_from is None:
            raise ConfigError("training.freeze_source freezes the stacks that come from training.init_from, but "
                              "init_from is not set: set training.init_from, or training.freeze_source=false")
        bad = [i for i in t.frozen_stacks if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n_stacks]
        if bad or len(set(t.frozen_stacks)) != len(t.frozen_stacks):
            raise ConfigError(f"training.frozen_stacks is {t.frozen_stacks}: give distinct stack indices from 0 to "
                              f"{n_stacks - 1} (model.architecture.n_stacks is {n_stacks})")

    def _validate_stack_cache(self) -> None:
        t, m = self.training, self.model
        if t.stack_cache == StackCache.OFF:
            return
        _check_positive("training.stack_cache_max_gb", t.stack_cache_max_gb)
        if t.training_architecture == TrainingArchitecture.RACKWISE or t.prefix != Prefix.FROZEN:
            raise ConfigError(f"training.stack_cache 'disk' keeps the activations of a frozen prefix, but this run "
                              f"freezes none (training_architecture '{t.training_architecture}', prefix '{t.prefix}'): "
                              "use a stackwise/blockwise run with training.prefix 'frozen', or stack_cache 'off'")
        if m.tie_embeddings and not t.freeze_embedding:
            raise ConfigError("training.stack_cache 'disk' needs a frozen embedding, but training.freeze_embedding is "
                              "false with tied embeddings, so the LM head keeps changing the prefix's input: set "
                              "training.freeze_embedding true, or stack_cache 'off'")
        if m.dropout:
            raise ConfigError(f"training.stack_cache 'disk' stores one forward of the frozen prefix per window, "
                              f"but model.dropout ({m.dropout}) would draw new noise in every forward: set "
                              "model.dropout 0, or stack_cache 'off'")

    def stack_frozen_precisions(self) -> list[FrozenPrecision]:
        """The precision each stack runs in while frozen (``TrainingConfig.frozen_precisions``)."""
        return self.training.frozen_precisions(self.model.architecture.n_stacks)

    @property
    def n_units(self) -> int:
        """Units a stage-wise run grows through: stacks (stackwise) or blocks (blockwise)."""
        arch = self.model.architecture
        if self.training.training_architecture == TrainingArchitecture.BLOCKWISE:
            return arch.n_stacks * arch.blocks_per_stack
        return arch.n_stacks

    def _validate_depth_schedule(self) -> None:
        schedule, mode = self.training.depth_schedule, self.training.training_architecture
        if schedule is None:
            return
        if mode == TrainingArchitecture.RACKWISE:
            raise ConfigError("training.depth_schedule is set but training.training_architecture is 'rackwise': "
                              "use stackwise (counts stacks) or blockwise (counts blocks), or remove depth_schedule")
        n = self.n_units
        unit = "stacks" if mode == TrainingArchitecture.STACKWISE else "blocks"
        increasing = all(0 < a < b for a, b in zip(schedule, schedule[1:], strict=False))
        if not schedule or schedule[0] < 1 or not increasing or schedule[-1] != n:
            raise ConfigError(
                f"training.depth_schedule {schedule} must list the active {unit} per phase, strictly increasing "
                f"from at least 1 and ending at the model's {n} {unit} (e.g. [1, {n}] grows once, "
                f"{list(range(1, n + 1))} adds one a phase)")

    def _validate_optimization(self) -> None:
        """Values that would train silently wrong (gradient ascent, lr above its peak, val loss 0)."""
        t = self.training
        _check_positive("training.lr", t.lr)
        for key, value in (("training.warmup_steps", t.warmup_steps), ("training.weight_decay", t.weight_decay),
                           ("training.grad_clip", t.grad_clip), ("training.eval_batches", t.eval_batches),
                           ("training.eval_interval", t.eval_interval), ("training.save_interval", t.save_interval),
                           ("training.log_interval", t.log_interval)):
            if value < 0:
                raise ConfigError(f"{key} must be >= 0, got {value}")
        if t.keep_checkpoints is not None and t.keep_checkpoints < 0:
            raise ConfigError(f"training.keep_checkpoints must be >= 0, got {t.keep_checkpoints}: the number of "
                              "newest checkpoints to keep (0 or null keeps all)")
        if not 0.0 <= t.min_lr_ratio <= 1.0:
            raise ConfigError(f"training.min_lr_ratio ({t.min_lr_ratio}) must be in [0, 1]: it is the cosine "
                              "floor as a fraction of training.lr, never above the peak")
        if t.stack_lr_scale is not None and any(scale < 0 for scale in t.stack_lr_scale):
            raise ConfigError(f"training.stack_lr_scale ({t.stack_lr_scale}) has a negative multiplier, which would "
                              "ascend the loss: use multipliers >= 0 (0 keeps a stack fixed)")
        if not all(0.0 <= beta < 1.0 for beta in t.adam_betas):
            raise ConfigError(f"training.adam_betas ({t.adam_betas}) must each be in [0, 1)")
        if not 0.0 < t.decay_fraction <= 1.0:
            raise ConfigError(f"training.decay_fraction ({t.decay_fraction}) must be in (0, 1]: the share of the "
                              "schedule's steps spent decaying under lr_decay 'wsd'")
        if t.growth_warmup_steps < 0 or not 0.0 <= t.growth_warmup_start <= 1.0:
            raise ConfigError(f"training.growth_warmup_steps ({t.growth_warmup_steps}) must be >= 0 and "
                              f"training.growth_warmup_start ({t.growth_warmup_start}) in [0, 1]")
        self._validate_interleave()
        if t.growth_warmup_steps and t.lr_schedule != LrSchedule.CONTINUOUS:
            raise ConfigError("training.growth_warmup_steps needs training.lr_schedule 'continuous': with "
                              "'per_phase' every phase already warms up from 0")

    def _validate_interleave(self) -> None:
        t = self.training
        if t.interleave_every < 1:
            raise ConfigError(f"training.interleave_every ({t.interleave_every}) must be >= 1")
        if t.growth_operator != GrowthOperator.INTERLEAVE or t.training_architecture == TrainingArchitecture.RACKWISE:
            return
        depths = t.depth_schedule or list(range(1, self.n_phases + 1))
        for old, new in zip(depths, depths[1:], strict=False):
            if new - old > old // t.interleave_every:
                raise ConfigError(f"training.growth_operator 'interleave' inserts one copy after every "
                                  f"{t.interleave_every} old unit(s), so {old} units grow to at most "
                                  f"{old + old // t.interleave_every}, but training.depth_schedule grows {old} -> "
                                  f"{new}: lower interleave_every or grow in smaller steps")

    def _validate_parallel(self) -> None:
        n_stacks, stages = self.model.architecture.n_stacks, self.pipeline_stages
        _check_positive("parallel.pipeline_stages", stages)
        if n_stacks % stages:
            raise ConfigError(
                f"parallel.pipeline_stages ({stages}) must divide model.architecture.n_stacks ({n_stacks}) "
                "so that stage boundaries fall on stack boundaries: "
                f"use one of {[s for s in range(1, n_stacks + 1) if n_stacks % s == 0]}")
        if self.parallel.collective_timeout_s < 1:
            raise ConfigError(f"parallel.collective_timeout_s ({self.parallel.collective_timeout_s}) must be >= 1 "
                              "second: a shorter timeout fails healthy collectives")
        _check_positive("parallel.peer_timeout_s", self.parallel.peer_timeout_s)
        if self.parallel.zero_stage not in (0, 1):
            raise ConfigError(f"parallel.zero_stage ({self.parallel.zero_stage}) must be 0 or 1: "
                              "DeepSpeed refuses ZeRO-2/3 with pipeline parallelism")
        if (self.training.precision == Precision.BF16 and self.parallel.zero_stage == 0
                and self.parallel.ds_config == "auto"):
            raise ConfigError(BF16_WITHOUT_ZERO)

    @property
    def n_phases(self) -> int:
        """Training phases before the optional joint phase."""
        t = self.training
        if t.training_architecture == TrainingArchitecture.RACKWISE:
            return 1
        return len(t.depth_schedule) if t.depth_schedule is not None else self.n_units

    def validate_world_size(self, world_size: int) -> int:
        """Data-parallel degree for this world size, or an error saying how to launch.

        An unset ``parallel.pipeline_stages`` is fixed here to the deepest pipeline that divides
        both ``n_stacks`` and the world size (4 stacks on 2 ranks: 2 stages; on 3 ranks: 1), so
        that the recorded config says what ran."""
        n_stacks = self.model.architecture.n_stacks
        fitting = [s for s in range(1, n_stacks + 1) if n_stacks % s == 0 and world_size % s == 0]
        if self.parallel.pipeline_stages is None:
            self.parallel.pipeline_stages = max(fitting)
        stages = self.pipeline_stages
        if world_size % stages:
            raise ConfigError(
                f"world size {world_size} is not a multiple of parallel.pipeline_stages ({stages}): set "
                f"parallel.pipeline_stages to one of {fitting} (they divide both model.architecture.n_stacks "
                f"({n_stacks}) and the world size), unset it to get the largest, or launch a multiple of "
                f"{stages} processes")
        return world_size // stages


def read_config_yaml(path: str | Path) -> dict[str, Any]:
    """The raw mapping of a config YAML file (not yet checked against the schema)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist: pass an existing YAML file to --config")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(raw).__name__}")
    return raw


# --------------------------------------------------------------------------- strict building


def _build_dataclass(cls: type, raw: Any, section: str) -> Any:
    where = section or "the top level"
    if not isinstance(raw, dict):
        raise ConfigError(f"section '{section}' must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in names:
            raise ConfigError(f"unknown key '{key}' in {where} of the config; {_closest_keys(key, names, section)}")
    kwargs = {key: _coerce(hints[key], value, f"{section}.{key}".lstrip(".")) for key, value in raw.items()}
    return cls(**kwargs)


def _closest_keys(key: str, names: set[str], section: str) -> str:
    """Advice for an unknown ``key`` among ``names`` of ``section``: the closest spellings there, or the same name in
    another section (training.seq_len -> data.seq_len); else where the keys are listed."""
    close = [f"{section}.{name}".lstrip(".") for name in difflib.get_close_matches(key, sorted(names), n=3)]
    elsewhere = [dotted for dotted in _leaf_keys(StackWiseConfig) if dotted.rsplit(".", 1)[-1] == key]
    if close or elsewhere:
        return "did you mean " + " or ".join(f"'{k}'" for k in close + elsewhere) + "?"
    return f"the keys of {section or 'the top level'} are in the config reference, docs/config.md"


def _leaf_keys(cls: type, prefix: str = "") -> list[str]:
    """Every dotted key of the dataclass ``cls``, depth first."""
    hints = typing.get_type_hints(cls)
    keys = []
    for f in dataclasses.fields(cls):
        nested = dataclasses.is_dataclass(hints[f.name])
        keys += _leaf_keys(hints[f.name], f"{prefix}{f.name}.") if nested else [prefix + f.name]
    return keys


def _coerce(hint: Any, value: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``hint``; ints are accepted where floats are expected."""
    if dataclasses.is_dataclass(hint):
        return _build_dataclass(hint, value, key)
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in typing.get_args(hint):
            return None
        options = [option for option in typing.get_args(hint) if option is not type(None)]
        if len(options) == 1:  # Optional[X]: X's own message names what is wrong (e.g. which list item)
            return _coerce(options[0], value, key)
        for option in typing.get_args(hint):
            if option is type(None):
                continue
            try:
                return _coerce(option, value, key)
            except ConfigError:
                pass
        raise ConfigError(f"config key '{key}' got {value!r}, which is not {_type_name(hint)}")
    if isinstance(hint, type) and issubclass(hint, Choice):
        return hint.parse(value, key, ConfigError)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}' must be a list ({_type_name(hint)}), got {value!r}")
        (item_hint,) = typing.get_args(hint)
        return [_coerce(item_hint, item, key) for item in value]
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        try:  # YAML 1.1 reads "1e-3" as a string; accept it as the number the user meant
            return float(value)
        except ValueError:
            pass
    if hint in (int, str, bool) and type(value) is hint:
        return value
    raise ConfigError(f"config key '{key}' must be {_type_name(hint)}, got {value!r}")


def _type_name(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        return " or ".join(dict.fromkeys(_type_name(a) for a in typing.get_args(hint)))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(hint)[0])}"
    if isinstance(hint, type) and issubclass(hint, Choice):
        return "a string"  # its values are listed by the error of a wrong one, and in each key's meaning
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false",
            type(None): "null"}.get(hint, getattr(hint, "__name__", str(hint)))


def _parse_choices(section: Any, key: str) -> None:
    """Turn every closed-set field that holds a plain string into its enum member, in place.

    ``_coerce`` does it for loaded YAML; this covers sections built or changed in Python."""
    hints = typing.get_type_hints(type(section))
    for f in dataclasses.fields(section):
        value, hint, where = getattr(section, f.name), hints[f.name], f"{key}.{f.name}".lstrip(".")
        if dataclasses.is_dataclass(value):
            _parse_choices(value, where)
        elif isinstance(hint, type) and issubclass(hint, Choice):
            setattr(section, f.name, hint.parse(value, where, ConfigError))


def section_dict(section: Any) -> dict[str, Any]:
    """A config section (e.g. ``ModelConfig``) as plain YAML/JSON types, as in ``StackWiseConfig.to_dict()``."""
    return dataclasses.asdict(section, dict_factory=_plain_dict)


def _plain_dict(items: list[tuple[str, Any]]) -> dict[str, Any]:
    return {key: _plain(value) for key, value in items}


def _plain(value: Any) -> Any:
    """An enum member as its string, also inside a list (e.g. training.stack_precision)."""
    if isinstance(value, list):
        return [_plain(item) for item in value]
    return value.value if isinstance(value, Enum) else value


def _check_positive(key: str, value: int | float) -> None:
    if value <= 0:
        raise ConfigError(f"{key} must be positive, got {value}")


# --------------------------------------------------------------------------- overrides


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` strings (values parsed as YAML) on top of ``raw``."""
    raw = copy.deepcopy(raw)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set '{item}' is not of the form section.key=value "
                              "(for example --set training.max_steps=100)")
        dotted, text = item.split("=", 1)
        parts = dotted.strip().split(".")
        node = raw
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {dotted}: '{part}' is a value, not a section")
        try:
            node[parts[-1]] = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {item}: the value is not valid YAML ({str(exc).splitlines()[0]}); quote "
                              "strings and write lists as [a, b]") from exc
    return raw


# --------------------------------------------------------------------------- legacy keys

# The seed project's vocabulary: its "layer" is our block, its "block" (a group of
# block_size layers) is our stack, and "fused" training is end-to-end training.
_LEGACY_MODES = {"layerwise": "blockwise", "blockwise": "stackwise", "fused": "rackwise"}
_LEGACY_TRAINING_KEYS = {  # old training.<key> -> (new section path, new key)
    "block_size": (("model", "architecture"), "blocks_per_stack"),
    "total_blocks": (("model", "architecture"), "n_stacks"),
    "learning_rate": (("training",), "lr"),
    "batch_size": (("training",), "micro_batch_size"),
}
# training.new_unit_init (before growth operators): value -> training.growth_operator
_LEGACY_UNIT_INITS = {"fresh": GrowthOperator.FRESH.value, "copy_previous": GrowthOperator.COPY_LAST.value}


def _deprecated(old: str, new: str) -> None:
    warnings.warn(f"config key '{old}' is deprecated: write '{new}' instead", DeprecationWarning, stacklevel=4)


def _put(raw: dict, path: tuple[str, ...], key: str, value: Any, old: str) -> None:
    node = raw
    for part in path:
        node = node.setdefault(part, {})
    if key in node and node[key] != value:
        raise ConfigError(f"config sets both the deprecated '{old}' ({value!r}) and "
                          f"'{'.'.join(path + (key,))}' ({node[key]!r}): keep only the new key")
    node[key] = value
    _deprecated(old, ".".join(path + (key,)))


def migrate_legacy_keys(raw: dict[str, Any]) -> dict[str, Any]:
    """Rewrite the seed project's keys into this schema, warning once per key."""
    training = raw.get("training")
    if isinstance(training, dict):
        if "mode" in training:
            old_mode = training.pop("mode")
            if old_mode not in _LEGACY_MODES:
                raise ConfigError(f"training.mode '{old_mode}' is unknown; the key is deprecated anyway: "
                                  f"write training.training_architecture: {' | '.join(TrainingArchitecture.values())}")
            _put(raw, ("training",), "training_architecture", _LEGACY_MODES[old_mode], "training.mode")
        for old_key, (path, new_key) in _LEGACY_TRAINING_KEYS.items():
            if old_key in training:
                _put(raw, path, new_key, training.pop(old_key), f"training.{old_key}")
        if "new_unit_init" in training:
            old_init = training.pop("new_unit_init")
            if old_init not in _LEGACY_UNIT_INITS:
                raise ConfigError(f"training.new_unit_init '{old_init}' is unknown; the key is deprecated anyway: "
                                  f"write training.growth_operator: {' | '.join(GrowthOperator.values())}")
            new_value = _LEGACY_UNIT_INITS[old_init]
            if training.get("growth_operator", new_value) != new_value:
                raise ConfigError(f"config sets both the deprecated 'training.new_unit_init' ({old_init!r}) and "
                                  f"'training.growth_operator' ({training['growth_operator']!r}): "
                                  "keep only the new key")
            training["growth_operator"] = new_value
            _deprecated(f"training.new_unit_init: {old_init}", f"training.growth_operator: {new_value}")
    for section, mode in (("layerwise_training", "blockwise"), ("blockwise_training", "stackwise")):
        if section in raw:
            _migrate_legacy_section(raw, section, mode)
    return raw


def _migrate_legacy_section(raw: dict[str, Any], section: str, mode: str) -> None:
    """``layerwise_training: {enabled, steps_per_layer, ...}`` -> training.* keys."""
    body = raw.pop(section) or {}
    if not isinstance(body, dict):
        raise ConfigError(f"legacy section '{section}' must be a mapping")
    if not body.pop("enabled", True):
        _deprecated(section, "training.training_architecture")
        return
    _put(raw, ("training",), "training_architecture", mode, section)
    renames = {"steps_per_layer": "steps_per_phase", "steps_per_block": "steps_per_phase",
               "steps": "steps_per_phase", "block_size": "blocks_per_stack"}
    for old_key, value in body.items():
        new_key = renames.get(old_key)
        if new_key is None:
            raise ConfigError(f"unknown key '{old_key}' in legacy section '{section}'; it has no equivalent: "
                              "move the section's settings to training.* (see docs/config.md, the config reference)")
        path = ("model", "architecture") if new_key == "blocks_per_stack" else ("training",)
        _put(raw, path, new_key, value, f"{section}.{old_key}")
