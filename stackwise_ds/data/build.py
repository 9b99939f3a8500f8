"""``build_datasets``: source -> tokenise -> pack -> cache -> seeded train/val split."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import cache, corpus
from .packing import OBJECTIVES, PackedDataset, split_windows, tokenize_documents, write_windows
from .tokenizer import ByteTokenizer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DataBundle:
    train: PackedDataset
    val: PackedDataset
    tokenizer: ByteTokenizer
    cache_hit: bool  # True when the packed windows were loaded, not tokenised, this call
    n_tokens: int  # tokens in the packed stream incl. one eos per document
    cache_path: Path  # the cache entry directory holding windows.npy / meta.json


@dataclass(frozen=True)
class _Source:
    key_inputs: dict[str, Any]  # everything that determines the token stream
    documents: Callable[[], Iterator[str]]


def _validate_args(
    source: str, paths: list[str] | None, hf_name: str | None, seq_len: int, val_fraction: float,
    objective: str, mask_prob: float, max_files: int | None, max_bytes: int | None,
) -> None:
    if source not in corpus.KNOWN_SOURCES:
        raise ValueError(f"unknown data source {source!r}: set data.source to one of {corpus.KNOWN_SOURCES}")
    if source == "text_files" and not paths:
        raise ValueError("data.source='text_files' needs data.paths: list the text files or directories to train on")
    if source == "hf" and not hf_name:
        raise ValueError("data.source='hf' needs data.hf_name: the Hugging Face dataset to load, e.g. 'wikitext'")
    if not isinstance(seq_len, int) or seq_len <= 0:
        raise ValueError(f"seq_len must be a positive integer, got {seq_len!r}: fix data.seq_len")
    if not 0.0 <= val_fraction < 0.5:
        raise ValueError(f"val_fraction must be in [0, 0.5), got {val_fraction}: fix data.val_fraction")
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}: set data.objective to one of {OBJECTIVES}")
    if not 0.0 < mask_prob < 1.0:
        raise ValueError(f"mask_prob must be in (0, 1), got {mask_prob}: fix data.mask_prob")
    for name, cap in (("max_files", max_files), ("max_bytes", max_bytes)):
        if cap is not None and cap <= 0:
            raise ValueError(f"{name} must be positive or None, got {cap}: fix data.{name}")


def _file_source(source: str, files: list[Path], max_files: int | None, max_bytes: int | None) -> _Source:
    selected = corpus.select_files(files, max_files, max_bytes)
    key = {
        "source": source, "max_bytes": max_bytes,
        "files": [[f.path, f.size, f.mtime_ns] for f in selected],
    }
    user_files = source == "text_files"
    if user_files:
        key["reader"] = "skips-binary"  # cached data of the reader that kept binary files is stale
    return _Source(key, lambda: corpus.read_file_documents(selected, max_bytes, user_files=user_files))


def _resolve_source(
    source: str, paths: list[str] | None, hf_name: str | None, hf_config: str | None, hf_split: str,
    text_field: str, max_files: int | None, max_bytes: int | None,
) -> _Source:
    if source == "stdlib":
        return _file_source(source, corpus.list_stdlib_files(), max_files, max_bytes)
    if source == "text_files":
        return _file_source(source, corpus.list_text_files(list(paths or [])), max_files, max_bytes)
    # hf: keyed by name/config/split only -- a re-published dataset under the same name needs
    # a fresh cache_dir (or deleting the entry).
    key = {
        "source": source, "hf_name": hf_name, "hf_config": hf_config, "hf_split": hf_split,
        "text_field": text_field, "max_docs": max_files, "max_bytes": max_bytes,
    }
    return _Source(key, lambda: corpus.read_hf_documents(hf_name, hf_config, hf_split, text_field, max_files, max_bytes))


def _pack_into(out_dir: Path, scratch: Path, src: _Source, tokenizer: ByteTokenizer, seq_len: int, entry: str) -> dict[str, Any]:
    """Cache builder: tokenise ``src`` and write windows.npy into ``out_dir``; return meta."""
    tokenized = tokenize_documents(src.documents, tokenizer, scratch, fingerprint=entry)
    if len(tokenized) == 0:
        raise ValueError(
            f"dataset is empty: source {src.key_inputs['source']!r} produced no text "
            "(check data.paths / data.hf_name / data.text_field, or raise data.max_files / data.max_bytes)"
        )
    n_tokens, n_windows = write_windows(tokenized, seq_len, out_dir / cache.WINDOWS_FILE)
    if n_windows == 0:
        raise ValueError(
            f"dataset is empty after packing: {n_tokens} tokens do not fill one sequence of "
            f"seq_len + 1 = {seq_len + 1} tokens: add data or shorten data.seq_len"
        )
    log.info("packed %d documents, %d tokens into %d windows of %d", len(tokenized), n_tokens, n_windows, seq_len + 1)
    return {"n_documents": len(tokenized), "n_tokens": n_tokens, "n_windows": n_windows, "seq_len": seq_len}


def build_datasets(
    *, source: str = "stdlib", paths: list[str] | None = None, hf_name: str | None = None,
    hf_config: str | None = None, hf_split: str = "train", text_field: str = "text",
    seq_len: int = 256, val_fraction: float = 0.01, seed: int = 0,
    objective: str = "causal_lm", mask_prob: float = 0.15,
    max_files: int | None = None, max_bytes: int | None = None,
    cache_dir: str | None = None,
) -> DataBundle:
    """Packed, split, cached datasets for the trainer. Safe to call from every rank at once.

    ``max_files`` caps files (stdlib/text_files) or documents (hf); ``max_bytes`` caps the raw
    text read. The cache is keyed by the source content fingerprint, tokenizer and seq_len;
    seed/val_fraction/objective are applied on load, so changing them reuses the cache.
    """
    _validate_args(source, paths, hf_name, seq_len, val_fraction, objective, mask_prob, max_files, max_bytes)
    tokenizer = ByteTokenizer()
    src = _resolve_source(source, paths, hf_name, hf_config, hf_split, text_field, max_files, max_bytes)
    key_inputs = {**src.key_inputs, "tokenizer": tokenizer.name, "seq_len": seq_len}
    root = Path(cache_dir).expanduser() if cache_dir else cache.default_cache_dir()
    entry_name = cache.entry_name(key_inputs)
    entry, meta, hit = cache.load_or_build(
        root, key_inputs, lambda out, scratch: _pack_into(out, scratch, src, tokenizer, seq_len, entry_name),
    )
    log.info("packed data %s from %s", "loaded" if hit else "built", entry)
    windows = np.load(entry / cache.WINDOWS_FILE, mmap_mode="r")  # uint16 [N, seq_len + 1]
    train_rows, val_rows = split_windows(len(windows), val_fraction, seed)

    def split_dataset(rows: np.ndarray) -> PackedDataset:
        return PackedDataset(windows, rows, objective=objective, mask_prob=mask_prob, seed=seed, tokenizer=tokenizer)

    return DataBundle(split_dataset(train_rows), split_dataset(val_rows), tokenizer, hit, int(meta["n_tokens"]), entry)
