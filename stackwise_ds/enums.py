"""The closed sets of config values, one ``str`` Enum each. No torch or DeepSpeed import.

Members are strings: they compare equal to, hash like and format as their values, so YAML,
JSON and checkpoints written with plain strings still load, and ``to_dict`` writes plain
strings again. The config loader turns a YAML string into its member (or says which values
are allowed); code compares against members, never against string literals.
"""

from __future__ import annotations

from enum import Enum


class Choice(str, Enum):
    """A closed set of config strings (prints as its value, not as ``Class.MEMBER``)."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    def __repr__(self) -> str:  # messages quote values with !r: keep them reading 'masked_lm'
        return repr(self.value)

    @classmethod
    def values(cls) -> tuple[str, ...]:
        return tuple(member.value for member in cls)

    @classmethod
    def parse(cls, value: object, key: str, error: type[Exception] = ValueError) -> "Choice":
        """The member whose value is ``value``, or ``error`` naming ``key`` and the allowed values."""
        try:
            return cls(value)
        except ValueError:
            raise error(f"{key} is '{value}' but must be one of: {', '.join(cls.values())}") from None


class TrainingArchitecture(Choice):
    RACKWISE = "rackwise"
    STACKWISE = "stackwise"
    BLOCKWISE = "blockwise"


class Objective(Choice):
    CAUSAL_LM = "causal_lm"
    MASKED_LM = "masked_lm"


class DataSource(Choice):
    STDLIB = "stdlib"
    TEXT_FILES = "text_files"
    HF = "hf"


class TokenizerKind(Choice):
    """The built-in tokenizers; any other ``data.tokenizer`` value is a path (a plain str)."""

    BYTE = "byte"
    BPE = "bpe"


class LayoutKind(Choice):
    """``parallel.phase_layout``, and the kind of every placed phase."""

    ELASTIC = "elastic"
    FIXED = "fixed"


class AttentionType(Choice):
    MHA = "mha"
    GQA = "gqa"
    MLA = "mla"
    KERNEL = "kernel"


class AttentionMode(Choice):
    CAUSAL = "causal"
    BIDIRECTIONAL = "bidirectional"


class KernelFeatureMap(Choice):
    """The positive feature map of kernel attention (``model.kernel.feature_map``)."""

    ELU = "elu"
    RELU = "relu"


class Prefix(Choice):
    FROZEN = "frozen"
    TRAIN = "train"


class GrowthOperator(Choice):
    """Where the units a growing phase adds start from (``training/growth.py``)."""

    FRESH = "fresh"
    COPY_LAST = "copy_last"
    COPY_ALL = "copy_all"
    COPY_MIDDLE = "copy_middle"
    INTERLEAVE = "interleave"


class GrowthInit(Choice):
    """What a growth does to the units it adds once ``growth_operator`` has started them (``training/growth.py``)."""

    COPY = "copy"
    IDENTITY = "identity"


class LrSchedule(Choice):
    PER_PHASE = "per_phase"
    CONTINUOUS = "continuous"


class LrDecay(Choice):
    COSINE = "cosine"
    WSD = "wsd"


class OptimizerAcrossPhases(Choice):
    RESTART = "restart"
    CARRY = "carry"


class InitGrowth(Choice):
    STACK = "stack"
    FRESH = "fresh"
    INTERLEAVE = "interleave"


class Precision(Choice):
    AUTO = "auto"
    FP32 = "fp32"
    BF16 = "bf16"


class FrozenPrecision(Choice):
    """What a frozen stack's weights are held and computed in (``parallel/precision.py``)."""

    SAME = "same"
    BF16 = "bf16"
    INT8 = "int8"


class NonfinitePolicy(Choice):
    STOP = "stop"


class PhaseData(Choice):
    """Which windows a stage-wise phase trains on: the sample order continued, or the same windows again."""

    CONTINUE = "continue"
    REPEAT = "repeat"


class StackCache(Choice):
    """Whether the activations a frozen prefix hands the training stack are kept ('disk') or recomputed."""

    OFF = "off"
    DISK = "disk"

    @classmethod
    def _missing_(cls, value):
        # YAML 1.1 reads a bare `off` as false (`stack_cache: off`, `--set training.stack_cache=off`)
        return cls.OFF if value is False else None


class CacheDtype(Choice):
    """How cached activations are stored: in their own dtype ('auto'), fp32 or bf16."""

    AUTO = "auto"
    FP32 = "fp32"
    BF16 = "bf16"
