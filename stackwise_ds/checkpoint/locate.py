"""Find a checkpoint tag from whatever path a user gives, and refuse incomplete ones clearly.

Accepted paths: ``<output_dir>``, ``<output_dir>/checkpoints`` or one tag folder
``<output_dir>/checkpoints/<tag>``. A tag is complete once ``stackwise_state.json`` is in it
(the trainer writes it last); ``latest`` names the newest complete tag.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from ..config import StackWiseConfig
from .files import (
    LATEST_FILE,
    LAYER_FILE_RE,
    STATE_FILE,
    CheckpointError,
    TrainingState,
    find_resume_tag,
    layer_file_name,
    load_state,
)

# <output_dir>/initial_weights: training.init_from's source as layer files; never a checkpoint tag
INITIAL_WEIGHTS_DIR = "initial_weights"
SOURCE_STACKS_FILE = "source_stacks.json"  # in initial_weights/: which target stacks came from training.init_from


def source_frozen_stacks(output_dir: Path, freeze_source: bool) -> list[int]:
    """The stacks training.freeze_source freezes: those that started as a source stack, as the run's initial weights
    recorded them (the same list on a resume, when the source itself is no longer read)."""
    if not freeze_source:
        return []
    record = Path(output_dir) / INITIAL_WEIGHTS_DIR / SOURCE_STACKS_FILE
    if not record.is_file():
        raise CheckpointError(f"training.freeze_source: {record} is missing, so the stacks that came from "
                              "training.init_from are unknown; start the run afresh (a new output_dir)")
    return json.loads(record.read_text())["source_stacks"]


@dataclass
class CheckpointRef:
    """One complete tag of a checkpoint directory, with its training state."""

    checkpoint_dir: Path  # <output_dir>/checkpoints
    tag: str
    state: TrainingState

    @property
    def path(self) -> Path:
        return self.checkpoint_dir / self.tag

    @property
    def config(self) -> StackWiseConfig:
        return config_of(self.state, self.path)

    def layer_file(self, index: int) -> Path:
        return self.path / layer_file_name(index)


def config_of(state: TrainingState, where: Path) -> StackWiseConfig:
    """The config of the weights in a tag: the run's, with an untied head where the tag's phase untied it."""
    if not state.config:
        raise CheckpointError(f"{where / STATE_FILE} holds no config: it was not written by the StackWise-DS "
                              "trainer; re-save the checkpoint with the trainer or mark_complete()")
    config = StackWiseConfig.from_dict(state.config)
    if state.untied_head:  # the weights are those of an untied rack: the tools read and write its head
        config.model.tie_embeddings = False
    return config


def is_tag_dir(path: Path) -> bool:
    """A folder DeepSpeed or the trainer saved one tag into (not the initial weights of init_from)."""
    return path.is_dir() and path.name != INITIAL_WEIGHTS_DIR and ((path / STATE_FILE).is_file()
                                                                   or any(LAYER_FILE_RE.match(p.name)
                                                                          for p in path.iterdir()))


def list_tags(checkpoint_dir: Path) -> list[tuple[str, bool]]:
    """Every tag folder under ``checkpoint_dir`` as (tag, complete), oldest step first."""
    if not checkpoint_dir.is_dir():
        return []
    tags = [p.name for p in checkpoint_dir.iterdir() if is_tag_dir(p)]
    return [(t, (checkpoint_dir / t / STATE_FILE).is_file()) for t in sorted(tags, key=_tag_sort_key)]


def _tag_sort_key(tag: str) -> tuple[int, str]:
    digits = re.findall(r"\d+", tag)
    return (int(digits[-1]) if digits else -1, tag)


def split_path(path: str | Path) -> tuple[Path, str | None]:
    """(checkpoint dir, tag named by the path or None) for any of the accepted path forms."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint path {path} does not exist: pass <output_dir>, "
                              "<output_dir>/checkpoints or one tag folder inside it")
    if not path.is_dir():
        raise CheckpointError(f"checkpoint path {path} is a file, not a folder: pass <output_dir>, "
                              "<output_dir>/checkpoints or one tag folder inside it")
    if is_tag_dir(path):
        return path.parent, path.name
    if (path / "checkpoints").is_dir():
        return path / "checkpoints", None
    return path, None


def resolve_checkpoint(path: str | Path, tag: str | None = None) -> CheckpointRef:
    """The complete tag ``tag`` (default: the newest complete one) of the checkpoint at ``path``."""
    checkpoint_dir, path_tag = split_path(path)
    if tag is not None and path_tag is not None and tag != path_tag:
        raise CheckpointError(f"{path} is the folder of tag '{path_tag}' but --tag asks for '{tag}': "
                              "give the checkpoints folder with --tag, or the tag folder alone")
    tag = tag or path_tag
    if tag is None:
        tag = find_resume_tag(checkpoint_dir)
        if tag is None:
            raise CheckpointError(_no_complete_tag_message(checkpoint_dir))
    if not (checkpoint_dir / tag).is_dir():
        known = ", ".join(t for t, _ in list_tags(checkpoint_dir)) or "none"
        raise CheckpointError(f"tag '{tag}' does not exist in {checkpoint_dir} (tags there: {known})")
    if not (checkpoint_dir / tag / STATE_FILE).is_file():
        raise CheckpointError(
            f"checkpoint {checkpoint_dir / tag} is incomplete: it has no {STATE_FILE}, which the trainer writes "
            "after every rank has saved (the save was interrupted); use an earlier tag or re-run training to "
            "write it again")
    return CheckpointRef(checkpoint_dir, tag, load_state(checkpoint_dir, tag))


def _no_complete_tag_message(checkpoint_dir: Path) -> str:
    tags = list_tags(checkpoint_dir)
    if not tags:
        return (f"no checkpoint in {checkpoint_dir}: it holds no tag folder (layer_XX-model_states.pt files); "
                "point at <output_dir> or <output_dir>/checkpoints of a run that saved one")
    incomplete = [t for t, complete in tags if not complete]
    return (f"no complete checkpoint in {checkpoint_dir}: tags {', '.join(incomplete)} have no {STATE_FILE} "
            "(their save was interrupted); re-run training to save again")


def read_latest(checkpoint_dir: Path) -> str | None:
    latest = checkpoint_dir / LATEST_FILE
    return latest.read_text().strip() if latest.is_file() else None
