"""Text sources: the interpreter's own stdlib, local text files, or a Hugging Face dataset.

Each source yields plain-text documents in a deterministic order and describes itself
with a JSON-able fingerprint that keys the tokenised cache (see cache.py).
"""

from __future__ import annotations

import os
import sysconfig
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

_SKIPPED_STDLIB_DIRS = {"site-packages", "dist-packages", "__pycache__"}


@dataclass(frozen=True)
class SourceFile:
    """A file to read, with the size and mtime that make its cache key go stale on edit."""

    path: str
    size: int
    mtime_ns: int

    @classmethod
    def stat(cls, path: Path) -> SourceFile:
        st = path.stat()
        return cls(str(path), st.st_size, st.st_mtime_ns)


def stdlib_root() -> Path:
    """The running interpreter's standard-library directory."""
    return Path(sysconfig.get_paths()["stdlib"]).resolve()


def list_stdlib_files() -> list[Path]:
    """All stdlib ``.py`` files, recursively, minus third-party and bytecode dirs, sorted."""
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(stdlib_root()):
        # Prune in place so os.walk never descends into site-packages (big, not stdlib).
        dirnames[:] = [d for d in dirnames if d not in _SKIPPED_STDLIB_DIRS]
        found.extend(Path(dirpath, f) for f in filenames if f.endswith(".py"))
    return sorted(found)


def _is_hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _entries_under(directory: Path) -> list[Path]:
    """Every non-hidden entry below ``directory`` that is not a folder, sorted."""
    return sorted(
        p for p in directory.rglob("*")
        if not p.is_dir() and not _is_hidden(p, directory) and "__pycache__" not in p.parts
    )


def list_text_files(paths: list[str]) -> list[Path]:
    """Expand ``data.paths``: files are taken as given, directories recursively (sorted).

    Only regular files are read: a FIFO, socket or device would block or never end, so it is
    skipped with a warning naming it. A directory without any regular file is an error."""
    files: list[Path] = []
    for raw in paths:
        path = Path(raw).expanduser().resolve()
        if not path.exists():
            raise FileNotFoundError(
                f"data.paths entry {raw!r} does not exist (resolved to {path}): "
                "fix data.paths to list existing text files or directories"
            )
        entries = _entries_under(path) if path.is_dir() else [path]
        regular = [p for p in entries if p.is_file()]
        skipped = [str(p) for p in entries if not p.is_file()]
        if skipped:
            warnings.warn(f"data.paths: skipping {len(skipped)} entries that are not regular files "
                          f"(FIFOs, sockets, devices): {', '.join(skipped[:5])}", stacklevel=2)
        if path.is_dir() and not regular:
            raise FileNotFoundError(f"data.paths entry {raw!r} ({path}) holds no regular, non-hidden file to "
                                    "train on: put text files there or fix data.paths")
        files.extend(regular)
    if not files:
        raise FileNotFoundError(f"data.paths {paths} name no regular file to train on: list text files or folders")
    return files


def select_files(files: list[Path], max_files: int | None, max_bytes: int | None) -> list[SourceFile]:
    """Keep files in order until ``max_files`` files or ``max_bytes`` bytes are reached."""
    if max_files is not None:
        files = files[:max_files]
    selected: list[SourceFile] = []
    total = 0
    for path in files:
        if max_bytes is not None and total >= max_bytes:
            break
        entry = SourceFile.stat(path)
        selected.append(entry)
        total += entry.size
    return selected


def read_file_documents(files: list[SourceFile], max_bytes: int | None, user_files: bool = False) -> Iterator[str]:
    """One document per file; the last one is cut so the total stays within ``max_bytes``.

    Invalid UTF-8 is replaced (some stdlib test files are deliberately not UTF-8). For a user's
    ``user_files``, binary files (a NUL byte) are skipped, and both are counted and named in one
    warning at the end."""
    budget = max_bytes
    binary: list[str] = []
    replaced_files, replaced_bytes = 0, 0
    for entry in files:
        raw = Path(entry.path).read_bytes()
        if budget is not None:
            raw = raw[:budget]
            budget -= len(raw)
        if user_files and b"\0" in raw:
            binary.append(entry.path)
        else:
            invalid = len(raw) - len(raw.decode("utf-8", errors="ignore").encode("utf-8"))
            replaced_files, replaced_bytes = replaced_files + (invalid > 0), replaced_bytes + invalid
            yield raw.decode("utf-8", errors="replace")
        if budget is not None and budget <= 0:
            break
    if user_files and (binary or replaced_files):
        named = ": " + ", ".join(binary[:5]) if binary else ""
        warnings.warn(f"data: skipped {len(binary)} binary file(s) (NUL bytes){named}; "
                      f"{replaced_files} file(s) had invalid UTF-8, {replaced_bytes} byte(s) replaced by U+FFFD",
                      stacklevel=2)


def local_dataset_dir(name: str) -> Path | None:
    """``data.hf_name`` as a local folder (jsonl/parquet/csv files or a ``save_to_disk`` folder); None for a
    Hub name. A name written as a path (``/``, ``.``, ``~``) that does not exist is an error here, before
    ``datasets`` takes it for a Hub name."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path.resolve()
    if name.startswith(("/", ".", "~")):
        raise FileNotFoundError(f"data.hf_name {name!r} is not an existing folder ({path.resolve()} not found): "
                                "fix the path, or give a Hugging Face Hub dataset name")
    return None


def local_dataset_files(folder: Path) -> list[SourceFile]:
    """The files of a local dataset folder, with the size and mtime that key its cache entry."""
    return [SourceFile.stat(p) for p in _entries_under(folder) if p.is_file()]


def _is_saved_dataset(folder: Path) -> bool:
    """A folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``."""
    return (folder / "state.json").is_file() or (folder / "dataset_dict.json").is_file()


def _saved_split(folder: Path, split: str):
    import datasets

    loaded = datasets.load_from_disk(str(folder))
    if not isinstance(loaded, datasets.DatasetDict):
        return loaded  # a saved Dataset is one split already
    if split not in loaded:
        raise ValueError(f"data.hf_split {split!r} is not a split of the saved dataset {folder}: its splits are "
                         f"{list(loaded)}; set data.hf_split to one of them")
    return loaded[split]


def load_hf_split(name: str, config: str | None, split: str):
    """The ``datasets.Dataset`` that ``data.hf_name`` / ``hf_config`` / ``hf_split`` name; any failure to load is
    one ValueError with the cause and the settings to fix (datasets' own errors rarely name them)."""
    import datasets  # local import: only this source needs the hub machinery

    folder = local_dataset_dir(name)
    if folder is not None and _is_saved_dataset(folder):
        return _saved_split(folder, split)
    try:
        return datasets.load_dataset(str(folder or name), config, split=split)
    except Exception as exc:  # hub, builder and file errors alike become one clear line
        where = f"the local folder {folder}" if folder else \
            f"{name!r} (no local folder of that name, so it was looked up on the Hugging Face Hub)"
        raise ValueError(f"data.hf_name: could not load {where} with config {config!r}, split {split!r}: "
                         f"{root_cause(exc)}; fix data.hf_name (a Hub dataset, or a local folder of "
                         "jsonl/parquet/csv files or of save_to_disk), data.hf_config or data.hf_split") from exc


def root_cause(exc: BaseException) -> str:
    """``Type: first line`` of the innermost exception ``exc`` was raised from (datasets wraps the real one)."""
    while (exc.__cause__ or exc.__context__) is not None:
        exc = exc.__cause__ or exc.__context__
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"


def read_hf_documents(
    name: str, config: str | None, split: str, text_field: str,
    max_docs: int | None, max_bytes: int | None,
) -> Iterator[str]:
    """Documents from ``datasets.load_dataset(name, config, split=split)[text_field]`` (``load_from_disk`` for
    a ``save_to_disk`` folder)."""
    loaded = load_hf_split(name, config, split)
    if text_field not in loaded.column_names:
        raise ValueError(
            f"Hugging Face dataset {name!r} (config {config!r}, split {split!r}) has no column "
            f"{text_field!r}; its columns are {loaded.column_names}: set data.text_field to one of them"
        )
    if max_docs is not None:
        loaded = loaded.select(range(min(max_docs, len(loaded))))
    total = 0
    # Batched iteration keeps memory flat on large corpora (no full-column list).
    for batch in loaded.select_columns([text_field]).iter(batch_size=1024):
        for text in batch[text_field]:
            if max_bytes is not None and total >= max_bytes:
                return
            text = text or ""
            total += len(text.encode("utf-8"))
            yield text
