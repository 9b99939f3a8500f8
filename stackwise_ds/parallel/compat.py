"""The DeepSpeed releases this package supports, and an import-time check of the internals it uses.

The stage-aware engine (``engine.py``) and the pipeline adapter (``pipe.py``) subclass DeepSpeed's
``PipelineEngine``/``PipelineModule`` and override, call or read private names of theirs (see the
engine's design note). Those names come and go between releases: 0.16.0 to 0.19.7, for instance,
lack ``PipelineEngine._train_schedule`` and ``DeepSpeedEngine._configure_python_gc``. A missing
name would surface as an ``AttributeError`` in the middle of a training step -- or not at all, when
an overridden ``_exec_*`` method is silently never called -- so :func:`check_deepspeed` looks them
all up when ``stackwise_ds.parallel.engine`` is imported and names every one that is missing.

``REQUIRED_NAMES`` lists where each name must be found and how it is checked:

* ``ATTRIBUTE`` -- ``getattr`` on the module or class (module-level functions and classes, methods,
  properties, class attributes).
* ``ASSIGNED`` -- an instance attribute: DeepSpeed's source of the class (or of a DeepSpeed base
  class) assigns ``self.<name>`` somewhere. ``hasattr`` on the class cannot see these.
* ``MENTIONED`` -- a protocol name: the class's source reads or writes ``<obj>.<name>`` or uses the
  string ``'<name>'`` (parameter flags such as ``ds_pipe_replicated``, keys of ``tied_comms``).
"""

from __future__ import annotations

import functools
import importlib
import inspect
import linecache
import re
import warnings
from dataclasses import dataclass

# The oldest release with every name below (0.19.7 lacks PipelineEngine._train_schedule,
# DeepSpeedEngine._configure_python_gc and deepspeed.comm.pg_utils), tested by .ci/run's second
# job; the newest release below 0.20 runs the full suite. Keep SUPPORTED_DEEPSPEED equal to the
# deepspeed requirement in pyproject.toml (tests/test_compat.py checks).
MIN_DEEPSPEED = "0.19.8"
SUPPORTED_DEEPSPEED = f">={MIN_DEEPSPEED},<0.20"

ATTRIBUTE, ASSIGNED, MENTIONED = "attribute", "assigned", "mentioned"
CHECK_KINDS = (ATTRIBUTE, ASSIGNED, MENTIONED)

_PIPE_ENGINE = "deepspeed.runtime.pipe.engine:PipelineEngine"
_PIPE_MODULE = "deepspeed.runtime.pipe.module:PipelineModule"
_ZERO = "deepspeed.runtime.zero.stage_1_and_2:DeepSpeedZeroOptimizer"
_SCHEDULE = "deepspeed.runtime.pipe.schedule"


@dataclass(frozen=True)
class Required:
    """Names that must exist at ``where``: ``"package.module"`` or ``"package.module:Class"``."""

    where: str
    kind: str  # one of CHECK_KINDS
    names: tuple[str, ...]

    def __post_init__(self):
        if self.kind not in CHECK_KINDS:
            raise ValueError(f"Required({self.where!r}): kind {self.kind!r} is not one of {CHECK_KINDS}")


REQUIRED_NAMES: tuple[Required, ...] = (
    # module-level imports of engine.py, pipe.py, schedule.py, tied.py, distributed.py, resharding.py
    Required("deepspeed", ATTRIBUTE, ("init_distributed", "set_optimizer_flags")),
    Required("deepspeed.comm", ATTRIBUTE, ("all_reduce", "broadcast", "barrier", "new_group", "get_rank",
                                           "get_world_size", "is_initialized", "all_gather", "ReduceOp")),
    Required("deepspeed.comm.pg_utils", ATTRIBUTE, ("is_parallel",)),
    Required("deepspeed.accelerator", ATTRIBUTE, ("get_accelerator",)),
    Required("deepspeed.runtime.config", ATTRIBUTE, ("DeepSpeedConfig",)),
    Required("deepspeed.pipe", ATTRIBUTE, ("LayerSpec", "PipelineModule", "TiedLayerSpec")),
    Required("deepspeed.runtime.pipe.module", ATTRIBUTE, ("PipelineModule", "TiedLayerSpec")),
    Required("deepspeed.runtime.pipe.engine", ATTRIBUTE, ("PipelineEngine",)),
    Required("deepspeed.runtime.pipe.topology", ATTRIBUTE, ("PipeDataParallelTopology",)),
    Required("deepspeed.runtime.zero.stage_1_and_2", ATTRIBUTE, ("DeepSpeedZeroOptimizer",)),
    Required("deepspeed.utils.tensor_fragment", ATTRIBUTE, ("fragment_address",)),
    Required(_SCHEDULE, ATTRIBUTE, ("ForwardPass", "LoadMicroBatch", "OptimizerStep", "PipeInstruction",
                                    "PipeSchedule", "RecvActivation", "ReduceGrads", "ReduceTiedGrads",
                                    "SendActivation", "TrainSchedule")),
    # StageWiseTrainSchedule subclasses PipeSchedule and wraps TrainSchedule
    Required(f"{_SCHEDULE}:PipeSchedule", ATTRIBUTE, ("steps", "num_pipe_buffers", "is_first_stage",
                                                      "is_last_stage")),
    Required(f"{_SCHEDULE}:PipeSchedule", ASSIGNED, ("micro_batches", "stages", "stage_id")),
    # StageWiseEngine: methods it overrides (a renamed one would silently stop being called) or calls
    Required(_PIPE_ENGINE, ATTRIBUTE, (
        "_INSTRUCTION_MAP", "_train_schedule", "_exec_schedule", "_exec_recv_activations",
        "_exec_forward_pass", "_exec_backward_pass", "_exec_send_grads", "_exec_reduce_grads",
        "_exec_reduce_tied_grads", "_configure_zero_optimizer", "_configure_bf16_optimizer",
        "_configure_python_gc", "_reentrant_activation_checkpointing", "clip_fp32_gradients",
        "load_checkpoint", "_load_checkpoint", "load_universal_checkpoint", "save_checkpoint", "destroy",
        "train_batch", "eval_batch", "gradient_clipping", "train_batch_size", "zero_optimization",
        "is_last_stage", "get_lr", "gradient_accumulation_steps", "_backward_prologue",
        "_backward_prologue_per_tensor")),
    # ... and the instance attributes it reads or replaces
    Required(_PIPE_ENGINE, ASSIGNED, (
        "pipe_buffers", "grad_layer", "micro_batches", "num_stages", "stage_id", "using_bf16_optimizer",
        "module_forward_pre_hook", "module_forward_post_hook", "global_steps", "global_samples",
        "_global_grad_norm", "optimizer", "loss")),
    # RackPipelineModule overrides / the engine, trainer and tools read
    Required(_PIPE_MODULE, ATTRIBUTE, ("_partition_layers", "_set_bounds", "_synchronize_tied_weights",
                                       "_recursive_getattr")),
    Required(_PIPE_MODULE, ASSIGNED, ("forward_funcs", "tied_comms", "tied_modules", "parts", "_grid", "_topo",
                                      "_layer_specs", "_local_start", "num_stages",
                                      "global_rank", "stage_id", "is_checkpointable_results_interval")),
    # tied_comms entries, and the flag that keeps a tied copy out of the clipping norm
    Required(_PIPE_MODULE, MENTIONED, ("module", "weight_attr", "group", "ranks", "ds_pipe_replicated")),
    Required("deepspeed.runtime.pipe.module:TiedLayerSpec", ASSIGNED, ("key",)),
    Required("deepspeed.runtime.pipe.topology:ProcessTopology", ATTRIBUTE, ("get_coord",)),
    Required("deepspeed.runtime.pipe.topology:PipelineParallelGrid", ATTRIBUTE, (
        "get_stage_id", "stage_to_global", "get_data_parallel_world_size", "get_data_parallel_id",
        "get_global_rank", "get_model_parallel_group")),
    Required(_ZERO, ASSIGNED, ("bit16_groups",)),
    # the bf16 optimizer's accumulated fp32 gradient of a parameter, read for tied all-reduces and grad norms
    Required("deepspeed.runtime.bf16_optimizer:BF16_Optimizer", MENTIONED, ("_hp_grad",)),
    Required(_ZERO, MENTIONED, ("ds_pipe_replicated",)),
    # optimizer_state.py (optimizer_across_phases: carry): per-parameter moments of the flat partitions
    Required("deepspeed.utils", ATTRIBUTE, ("safe_get_full_optimizer_state", "safe_set_full_optimizer_state")),
    Required("deepspeed.utils.tensor_fragment:tensor_fragment", ATTRIBUTE, ("set_optim_state_fragment",)),
    Required("deepspeed.utils.tensor_fragment:tensor_fragment", MENTIONED, ("param_group_index",)),
    Required("deepspeed.runtime.bf16_optimizer", ATTRIBUTE, ("BF16_Optimizer",)),
    Required(_ZERO, MENTIONED, ("_hp_mapping",)),
)


class DeepSpeedVersionError(ImportError):
    """The installed DeepSpeed lacks internals the stage-aware engine relies on, or is too old."""


class UntestedDeepSpeedWarning(UserWarning):
    """The installed DeepSpeed has every name needed but is newer than the tested range."""


def installed_deepspeed_version() -> str:
    import deepspeed

    return str(deepspeed.__version__).strip()  # a source checkout's may end in a newline


def check_deepspeed(required: tuple[Required, ...] = REQUIRED_NAMES,
                    supported: str = SUPPORTED_DEEPSPEED) -> str:
    """Fail (``DeepSpeedVersionError``) if a name in ``required`` is missing or the installed
    DeepSpeed is older than ``supported``; warn if it is newer. Returns the installed version.

    The error names the installed version, the supported range, every missing name and the fix.
    """
    version = installed_deepspeed_version()
    missing = missing_names(required)
    position = _range_position(version, supported)
    if missing or position == "below":
        raise DeepSpeedVersionError(_error_message(version, supported, missing))
    if position == "above":
        warnings.warn(f"DeepSpeed {version} is newer than the tested range deepspeed{supported}; every internal "
                      "name stackwise_ds uses exists, but its behaviour is untested. If training misbehaves, "
                      f'install a tested release: pip install "deepspeed{supported}"',
                      UntestedDeepSpeedWarning, stacklevel=2)
    return version


def missing_names(required: tuple[Required, ...] = REQUIRED_NAMES) -> list[str]:
    """Every ``where.name`` (``kind`` in brackets) of ``required`` the installed DeepSpeed lacks."""
    missing = []
    for entry in required:
        target, problem = _resolve(entry.where)
        if problem:
            missing.append(f"{entry.where} ({problem})")
            continue
        present = _present_names(target, entry.kind)
        missing += [f"{entry.where}.{name} ({entry.kind})" for name in entry.names if name not in present]
    return missing


def _error_message(version: str, supported: str, missing: list[str]) -> str:
    lines = [f"stackwise_ds needs deepspeed{supported}, but DeepSpeed {version} is installed."]
    if missing:
        lines.append("Its stage-aware pipeline engine uses DeepSpeed internals this release lacks:")
        lines += [f"  - {name}" for name in missing]
    else:
        lines.append("That release is older than the oldest one tested with the stage-aware pipeline engine.")
    lines.append(f'Fix: pip install "deepspeed{supported}"')
    return "\n".join(lines)


def _range_position(version: str, supported: str) -> str:
    """``"inside"``, ``"below"`` or ``"above"`` the specifier set ``supported`` (e.g. ``>=0.19.8,<0.20``)."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    parsed = Version(version)
    if SpecifierSet(supported).contains(parsed, prereleases=True):
        return "inside"
    lower = [Version(s.version) for s in SpecifierSet(supported) if s.operator in (">=", ">", "==", "~=")]
    return "below" if any(parsed.release < bound.release for bound in lower) else "above"


def _resolve(where: str):
    """(module or class, None), or (None, why it cannot be found)."""
    module_name, _, class_name = where.partition(":")
    try:
        target = importlib.import_module(module_name)
    except Exception as err:  # any failure to import is reported, with its reason
        return None, f"cannot import {module_name}: {type(err).__name__}: {err}"
    if class_name and not hasattr(target, class_name):
        return None, f"{module_name} has no {class_name}"
    return (getattr(target, class_name) if class_name else target), None


def _present_names(target, kind: str) -> set[str]:
    if kind == ATTRIBUTE:
        return set(dir(target))
    found = set()
    for cls in inspect.getmro(target):
        if cls.__module__.startswith("deepspeed"):
            found |= _names_in(cls, kind)
    return found


@functools.lru_cache(maxsize=None)
def _names_in(cls: type, kind: str) -> frozenset[str]:
    text = _method_source(cls)
    patterns = _ASSIGNED_PATTERNS if kind == ASSIGNED else _MENTIONED_PATTERNS
    return frozenset(name for regex in patterns for name in regex.findall(text))


# ``self.n =``, ``self.n: T =``, ``self.n +=``; ``self.a, self.b =`` at a line's start;
# ``setattr(self, "n", ...)``; ``self.__dict__["n"] =``.
_ASSIGNED_PATTERNS = (
    re.compile(r"\bself\.(\w+)\s*(?::\s*[\w.\[\], |]+)?(?:\*\*|//|<<|>>|[-+*/%&|^@])?=(?!=)"),
    re.compile(r"^[\s(]*self\.(\w+)\s*,[^=\n]*=(?!=)", re.MULTILINE),
    re.compile(r"setattr\(self,\s*['\"](\w+)['\"]"),
    re.compile(r"self\.__dict__\[['\"](\w+)['\"]\]\s*=(?!=)"),
)
# any ``x.n`` and any string literal ``"n"``
_MENTIONED_PATTERNS = (re.compile(r"\.(\w+)"), re.compile(r"['\"](\w+)['\"]"))


@functools.lru_cache(maxsize=None)
def _method_source(cls: type) -> str:
    """The source lines of ``cls``'s own methods (nested functions included), from their code objects.

    Much cheaper than ``inspect.getsource(cls)``, which parses the whole module (DeepSpeed's
    engine.py is 300 kB): this check runs at every import of the engine.
    """
    try:
        filename = inspect.getsourcefile(cls)
    except TypeError:  # a built-in class
        return ""
    lines = linecache.getlines(filename) if filename else []
    chunks = []
    for value in vars(cls).values():
        for code in _code_objects(value):
            if code.co_filename == filename:
                last = max((line for _, _, line in code.co_lines() if line is not None), default=0)
                chunks.append("".join(lines[code.co_firstlineno - 1:last]))
    return "\n".join(chunks)


def _code_objects(value) -> list:
    if isinstance(value, (staticmethod, classmethod)):
        value = value.__func__
    functions = [value.fget, value.fset, value.fdel] if isinstance(value, property) else [value]
    codes = []
    for function in functions:
        if callable(function):
            code = getattr(inspect.unwrap(function), "__code__", None)
            codes += [code] if code is not None else []
    return codes
