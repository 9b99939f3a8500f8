"""Checkpoints: DeepSpeed's own layout plus a small metadata file that marks a tag complete.

Layout under ``<output_dir>/checkpoints``::

    latest                          tag of the newest complete checkpoint (atomically replaced)
    step00000150/
        layer_XX-model_states.pt    one file per pipeline layer (DeepSpeed)
        mp_rank_00_model_states.pt  engine state incl. LR scheduler (DeepSpeed)
        zero_pp_rank_*_optim_states.pt / *_optim_states.pt   optimizer shards (DeepSpeed)
        stackwise_state.json        phase, step, data position, config -- written LAST

DeepSpeed writes ``latest`` as soon as rank 0 is done with its own files; we pass
``save_latest=False`` and write both ``stackwise_state.json`` and ``latest`` only after
a barrier that every rank reaches once its files are on disk. A tag without
``stackwise_state.json`` is incomplete (a kill during save) and is never resumed from.

Retention (``training.keep_checkpoints``, ``training.keep_phase_ends``): after a tag is
published, global rank 0 deletes the older tags beyond the newest N complete ones, keeping
every phase's final tag. A deletion removes the tag's ``stackwise_state.json`` first, so a
kill half-way leaves an incomplete tag (never resumed from, removed by the next save), not
a complete-looking one with files missing.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

STATE_FILE = "stackwise_state.json"
LATEST_FILE = "latest"
_TAG_RE = re.compile(r"^step(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message says why and what to do."""


@dataclass
class TrainingState:
    """Where a run is: enough to continue at the same phase, step and sample."""

    phase_index: int = 0
    phase_step: int = 0  # optimizer steps done in the current phase
    global_step: int = 0  # optimizer steps done in the whole run
    consumed_samples: int = 0  # training sequences consumed (global, all replicas)
    finished_phases: list[dict[str, Any]] = field(default_factory=list)  # one record per completed phase
    training_architecture: str = "rackwise"
    tied_weight_max_abs_diff: float = 0.0  # at this checkpoint, across the stages holding a tied copy
    layout: dict[str, Any] = field(default_factory=dict)  # PhaseLayout of the phase that saved it
    untied_head: bool = False  # the LM head of a tied config has its own layer file (training.freeze_embedding)
    config: dict[str, Any] = field(default_factory=dict)


def tag_for(global_step: int) -> str:
    return f"step{global_step:08d}"


def finite_json(payload: Any) -> Any:
    """``payload`` with every NaN or infinite float as None: JSON has no NaN (``json.dumps`` would write one that
    strict readers reject), so a missing figure (no validation split) is null."""
    if isinstance(payload, float):
        return payload if math.isfinite(payload) else None
    if isinstance(payload, dict):
        return {key: finite_json(value) for key, value in payload.items()}
    if isinstance(payload, (list, tuple)):
        return [finite_json(value) for value in payload]
    return payload


def json_text(payload: Any, **options) -> str:
    """Strict JSON of ``payload`` (non-finite floats as null)."""
    return json.dumps(finite_json(payload), allow_nan=False, **options)


def write_json_atomic(path: Path, payload: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json_text(payload, indent=2, sort_keys=True))
    os.replace(tmp, path)


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def mark_complete(checkpoint_dir: Path, tag: str, state: TrainingState) -> None:
    """Rank 0, after every rank has written its files: publish the tag."""
    write_json_atomic(checkpoint_dir / tag / STATE_FILE, asdict(state))
    write_text_atomic(checkpoint_dir / LATEST_FILE, tag)


def is_complete(checkpoint_dir: Path, tag: str) -> bool:
    return (checkpoint_dir / tag / STATE_FILE).is_file()


def find_resume_tag(checkpoint_dir: Path) -> str | None:
    """The newest complete tag (highest step with its marker), or None.

    Not simply ``latest``: a kill between writing a tag's marker and replacing ``latest``
    leaves ``latest`` one checkpoint behind, and resuming from it would redo steps that are
    safely on disk. ``latest`` is kept for DeepSpeed's own loaders and for people."""
    if not checkpoint_dir.is_dir():
        return None
    complete = [p.name for p in checkpoint_dir.iterdir()
                if _TAG_RE.match(p.name) and is_complete(checkpoint_dir, p.name)]
    return max(complete, key=lambda t: int(_TAG_RE.match(t).group(1)), default=None)


def unmark(checkpoint_dir: Path, tag: str) -> None:
    """Rank 0, before a tag is (re)written: it is not complete until ``mark_complete`` again."""
    (checkpoint_dir / tag / STATE_FILE).unlink(missing_ok=True)


def step_of(tag: str) -> int:
    return int(_TAG_RE.match(tag).group(1))


def retire_old_tags(checkpoint_dir: Path, keep: int | None, keep_phase_ends: bool) -> list[str]:
    """Rank 0, right after ``mark_complete``: delete the tags retention lets go; returns them.

    Kept: the newest ``keep`` complete tags (all when ``keep`` is 0 or None), the tag ``latest``
    names, every phase's final tag when ``keep_phase_ends``, and every tag newer than the newest
    complete one (a save in progress, or one a resume will write again). Deleted besides: older
    incomplete tags, the remains of a save or a deletion that a kill cut short."""
    if not keep or not checkpoint_dir.is_dir():
        return []
    tags = sorted((p.name for p in checkpoint_dir.iterdir() if _TAG_RE.match(p.name) and p.is_dir()), key=step_of)
    complete = [t for t in tags if is_complete(checkpoint_dir, t)]
    if not complete:
        return []
    kept = set(complete[-keep:]) | {read_latest(checkpoint_dir)}
    newest = step_of(complete[-1])
    doomed = [t for t in tags if t not in kept and step_of(t) < newest
              and not (keep_phase_ends and is_complete(checkpoint_dir, t) and _is_phase_end(checkpoint_dir, t))]
    for tag in doomed:
        delete_tag(checkpoint_dir, tag)
    return doomed


def read_latest(checkpoint_dir: Path) -> str | None:
    try:
        return (checkpoint_dir / LATEST_FILE).read_text().strip()
    except OSError:
        return None


def _is_phase_end(checkpoint_dir: Path, tag: str) -> bool:
    """Saved at the end of a phase: the state points at the next phase's step 0."""
    try:
        state = json.loads((checkpoint_dir / tag / STATE_FILE).read_text())
    except (OSError, ValueError):
        return False
    return state.get("phase_step") == 0 and state.get("global_step", 0) > 0


def delete_tag(checkpoint_dir: Path, tag: str) -> None:
    """Marker first: from then on the tag is incomplete, whatever a kill leaves of its files."""
    unmark(checkpoint_dir, tag)
    shutil.rmtree(checkpoint_dir / tag)


def load_state(checkpoint_dir: Path, tag: str) -> TrainingState:
    path = checkpoint_dir / tag / STATE_FILE
    try:
        raw = json.loads(path.read_text())
        return TrainingState(**raw)
    except (OSError, json.JSONDecodeError, TypeError) as exc:
        raise CheckpointError(f"checkpoint {checkpoint_dir / tag} is corrupt ({path.name} unreadable: {exc}): "
                              f"delete that folder to resume from an earlier checkpoint") from exc


# model.* keys that change how the weights are used, not which weights there are
NOT_ARCHITECTURE = frozenset({"dropout", "compile"})


def check_same_architecture(saved_model: dict[str, Any], current_model: dict[str, Any], where: Path) -> None:
    """Refuse to resume a checkpoint of another architecture, naming the first differing keys."""
    differences = [f"model.{k}: checkpoint {saved_model.get(k)!r} vs config {current_model.get(k)!r}"
                   for k in sorted(set(saved_model) | set(current_model))
                   if k not in NOT_ARCHITECTURE and saved_model.get(k) != current_model.get(k)]
    if differences:
        raise CheckpointError(
            f"checkpoint in {where} was trained with another architecture ({'; '.join(differences[:4])}): "
            "point training.output_dir at a new folder, or set training.resume=false to start over there")


# Settings a resume can honour as they are: step budgets, logging, I/O, timeouts and the layout
# (a mid-phase resume checks the layout on its own). Any other change would train with one value
# while the checkpoint's history was made with another.
RESUMABLE_CHANGES = frozenset({
    "training.output_dir", "training.max_steps", "training.steps_per_phase", "training.joint_steps",
    "training.log_interval", "training.eval_interval", "training.eval_batches", "training.save_interval",
    "training.keep_checkpoints", "training.keep_phase_ends",
    "training.stack_cache", "training.stack_cache_max_gb", "training.stack_cache_dir",  # fp32 or off: same numbers
    "training.resume", "training.progress_bar", "training.init_from", "training.init_growth",
    "data.cache_dir", "parallel.peer_timeout_s",
    "parallel.collective_timeout_s", "parallel.pipeline_stages", "parallel.phase_layout",
    "parallel.max_rank_memory_mb", "parallel.ds_config", "parallel.activation_checkpoint_interval",
})


def check_resumable_changes(saved: dict[str, Any], current: dict[str, Any], where: Path) -> None:
    """Refuse a resume whose config changes a setting the run cannot honour, naming each one."""
    import copy
    import warnings

    from ..config import StackWiseConfig, migrate_legacy_keys

    with warnings.catch_warnings():  # a checkpoint written before a key was renamed: compare under the new name
        warnings.simplefilter("ignore", DeprecationWarning)
        saved = migrate_legacy_keys(copy.deepcopy(saved))
    # a key the saved config lacks (written before the setting existed) had its default value
    old = _cache_storage_as_numbers({**_flatten(StackWiseConfig().to_dict()), **_flatten(saved)})
    new = _cache_storage_as_numbers(_flatten(current))
    changed = [f"{key}: checkpoint {old.get(key)!r} vs config {new.get(key)!r}"
               for key in sorted(set(old) | set(new))
               if not key.startswith("model.") and key not in RESUMABLE_CHANGES and old.get(key) != new.get(key)]
    if changed:
        raise CheckpointError(
            f"the config changes settings that the run in {where} cannot continue with ({'; '.join(changed[:6])}): "
            "put the saved values back to resume, or train with the new ones in a new training.output_dir")


def _cache_storage_as_numbers(flat: dict[str, Any]) -> dict[str, Any]:
    """training.stack_cache_dtype as what it does to the numbers: 'exact' where the cache is off or stores the
    activations exactly ('auto', 'fp32', or 'bf16' on a bf16 run), so a resume may switch between those."""
    dtype = flat.get("training.stack_cache_dtype")
    exact = (flat.get("training.stack_cache") in ("off", False) or dtype in ("auto", "fp32")
             or (dtype == "bf16" and flat.get("training.precision") == "bf16"))
    return {**flat, "training.stack_cache_dtype": "exact" if exact else dtype}


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def unreadable_files(paths: list[Path]) -> list[str]:
    """Problems with checkpoint files this rank is about to load: missing, or failing torch's zip CRCs.

    Checked before DeepSpeed loads anything, because a rank that fails half-way through
    DeepSpeed's load leaves its peers waiting in the tied-weight broadcast that ends it.
    """
    problems = []
    for path in paths:
        if not path.is_file():
            problems.append(f"{path.name} is missing")
            continue
        try:
            with zipfile.ZipFile(path) as archive:
                bad, names = archive.testzip(), archive.namelist()
            if bad is not None:
                problems.append(f"{path.name} is corrupt (bad CRC in {bad})")
            elif (other := saved_as_other_layer(path.name, names)) is not None:
                problems.append(f"{path.name} holds the weights of pipeline layer {other} (torch.save recorded "
                                "that file name in it): a file was copied over another; put the right file back")
        except (zipfile.BadZipFile, OSError) as exc:
            problems.append(f"{path.name} is unreadable ({exc})")
    return problems


# DeepSpeed's per-layer file name; the stem is also the root torch.save gives the file's archive
LAYER_FILE_STEM = re.compile(r"^layer_(\d+)-model_states")
LAYER_FILE_RE = re.compile(LAYER_FILE_STEM.pattern + r"\.pt$")


# training.optimizer_across_phases: carry -- a layer's AdamW moments at a phase end (parallel/optimizer_state.py)
MOMENTS_FILE_RE = re.compile(r"^layer_(\d+)-optim_moments\.pt$")


def moments_file_name(layer: int) -> str:
    """``layer_03-optim_moments.pt``: the full moments of pipeline layer ``layer``'s trainable parameters."""
    return f"layer_{layer:02d}-optim_moments.pt"


def layer_file_name(layer: int) -> str:
    """``layer_03-model_states.pt``: the file DeepSpeed saves pipeline layer ``layer`` into."""
    return f"layer_{layer:02d}-model_states.pt"


def engine_state_file(stage: int) -> str:
    """``mp_rank_01_model_states.pt``: DeepSpeed's engine state (LR scheduler, ``param_shapes``) of pipeline stage
    ``stage``."""
    return f"mp_rank_{stage:02d}_model_states.pt"


def zero_shard_file(dp_rank: int, stage: int, bf16: bool = False) -> str:
    """``zero_pp_rank_1_mp_rank_01_optim_states.pt``: DeepSpeed's ZeRO-1 optimizer shard of data-parallel rank
    ``dp_rank`` in pipeline stage ``stage``; ``bf16_``-prefixed when DeepSpeed's bf16 optimizer wrote it."""
    return f"{'bf16_' if bf16 else ''}zero_pp_rank_{dp_rank}_mp_rank_{stage:02d}_optim_states.pt"


def saved_as_other_layer(file_name: str, archive_names: list[str]) -> int | None:
    """The layer index a layer file was saved for, when it is not the one its name says.

    ``torch.save`` roots its archive at the name of the file it wrote (``layer_03-model_states/``),
    so a copy of layer 3's file renamed to ``layer_04-...`` still says 3 inside."""
    wanted, root = LAYER_FILE_STEM.match(file_name), archive_names[0].split("/", 1)[0] if archive_names else ""
    saved = LAYER_FILE_STEM.match(root)
    if wanted is None or saved is None or int(saved.group(1)) == int(wanted.group(1)):
        return None
    return int(saved.group(1))
