"""``build_datasets``: source -> tokenise -> pack -> cache -> seeded train/val split."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..enums import DataSource, Objective, TokenizerKind
from . import cache, corpus
from .packing import (
    PackedDataset,
    check_objective,
    split_windows,
    text_dataset,
    tokenize_documents,
    tokenize_texts,
    write_windows,
)
from .tokenizer import (
    BPE_VERSION,
    TOKENIZER_FILE,
    Tokenizer,
    TokenizerError,
    check_bpe_vocab,
    check_vocab,
    load_tokenizer_json,
    make_tokenizer,
    token_dtype,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DataBundle:
    train: PackedDataset
    val: PackedDataset
    tokenizer: Tokenizer
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
    if source not in DataSource.values():
        raise ValueError(f"unknown data source {source!r}: set data.source to one of: {', '.join(DataSource.values())}")
    if source == DataSource.TEXT_FILES and not paths:
        raise ValueError("data.source='text_files' needs data.paths: list the text files or directories to train on")
    if source == DataSource.HF and not hf_name:
        raise ValueError("data.source='hf' needs data.hf_name: the Hugging Face dataset to load, e.g. 'wikitext'")
    if not isinstance(seq_len, int) or seq_len <= 0:
        raise ValueError(f"seq_len must be a positive integer, got {seq_len!r}: fix data.seq_len")
    if not 0.0 <= val_fraction < 0.5:
        raise ValueError(f"val_fraction must be in [0, 0.5), got {val_fraction}: fix data.val_fraction")
    check_objective(objective)
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
    user_files = source == DataSource.TEXT_FILES
    if user_files:
        key["reader"] = "skips-binary"  # cached data of the reader that kept binary files is stale
    return _Source(key, lambda: corpus.read_file_documents(selected, max_bytes, user_files=user_files))


def _resolve_source(
    source: str, paths: list[str] | None, hf_name: str | None, hf_config: str | None, hf_split: str,
    text_field: str, max_files: int | None, max_bytes: int | None,
) -> _Source:
    if source == DataSource.STDLIB:
        return _file_source(source, corpus.list_stdlib_files(), max_files, max_bytes)
    if source == DataSource.TEXT_FILES:
        return _file_source(source, corpus.list_text_files(list(paths or [])), max_files, max_bytes)
    # hf: a Hub dataset is keyed by name/config/split only -- a re-published dataset under the same
    # name needs a fresh cache_dir (or deleting the entry); a local folder also by its files, so an
    # added or edited file makes a new entry (as for text_files).
    key = {
        "source": source, "hf_name": hf_name, "hf_config": hf_config, "hf_split": hf_split,
        "text_field": text_field, "max_docs": max_files, "max_bytes": max_bytes,
    }
    folder = corpus.local_dataset_dir(hf_name)
    if folder is not None:
        key["files"] = [[f.path, f.size, f.mtime_ns] for f in corpus.local_dataset_files(folder)]
    return _Source(key, lambda: corpus.read_hf_documents(hf_name, hf_config, hf_split, text_field, max_files,
                                                         max_bytes))


def _check_not_empty(n_rows: int, src: _Source) -> None:
    if n_rows == 0:
        raise ValueError(
            f"dataset is empty: source {src.key_inputs['source']!r} produced no text "
            "(check data.paths / data.hf_name / data.text_field, or raise data.max_files / data.max_bytes)"
        )


def _check_packed(n_windows: int, n_tokens: int, seq_len: int) -> None:
    if n_windows == 0:
        raise ValueError(
            f"dataset is empty after packing: {n_tokens} tokens do not fill one sequence of "
            f"seq_len + 1 = {seq_len + 1} tokens: add data or shorten data.seq_len"
        )


def _pack_into(out_dir: Path, scratch: Path, src: _Source, tokenizer: Tokenizer, seq_len: int,
               entry: str) -> dict[str, Any]:
    """Cache builder: tokenise ``src`` and write windows.npy and tokenizer.json into ``out_dir``; return meta."""
    tokenized = tokenize_documents(src.documents, tokenizer, scratch, fingerprint=entry)
    _check_not_empty(len(tokenized), src)
    dtype = token_dtype(tokenizer.vocab_size)
    n_tokens, n_windows = write_windows(tokenized, seq_len, out_dir / cache.WINDOWS_FILE, dtype)
    _check_packed(n_windows, n_tokens, seq_len)
    tokenizer.save(out_dir / TOKENIZER_FILE)
    log.info("packed %d documents, %d tokens into %d windows of %d", len(tokenized), n_tokens, n_windows,
             seq_len + 1)
    return {"n_documents": len(tokenized), "n_tokens": n_tokens, "n_windows": n_windows, "seq_len": seq_len}


def piece_chars(seq_len: int) -> int:
    """Characters per piece of text the BPE split deals out (a few windows' worth of tokens)."""
    return 16 * (seq_len + 1)


def document_pieces(documents: Callable[[], Iterator[str]], size: int) -> Iterator[dict]:
    """Every document cut into pieces of at most ``size`` characters, at a line end where one is near."""
    for text in documents():
        start = 0
        while start < len(text):
            end = min(start + size, len(text))
            if end < len(text):
                cut = text.rfind("\n", start + size // 2, end)
                end = cut + 1 if cut >= 0 else end
            yield {"text": text[start:end], "ends_doc": end == len(text)}
            start = end


def _pack_bpe_into(out_dir: Path, scratch: Path, src: _Source, vocab_size: int, seq_len: int, val_fraction: float,
                   seed: int, entry: str) -> dict[str, Any]:
    """Cache builder for data.tokenizer 'bpe': the text is cut into pieces, split into train/val pieces
    by ``seed``, the BPE is trained on the training pieces only, and each split is packed on its own:
    windows.npy holds the training windows, then the validation ones (meta ``n_train_windows``)."""
    texts = text_dataset(lambda: document_pieces(src.documents, piece_chars(seq_len)), scratch, entry)
    _check_not_empty(len(texts), src)
    train_rows, val_rows = split_windows(len(texts), val_fraction, seed)  # rows are pieces here, not windows
    train_texts, val_texts = texts.select(train_rows), texts.select(val_rows)

    def training_texts() -> Iterator[str]:
        for batch in train_texts.iter(batch_size=1024):
            yield from batch["text"]

    tokenizer = make_tokenizer(TokenizerKind.BPE, vocab_size, training_texts)
    parts = [tokenize_texts(train_texts, tokenizer, f"{entry}-train"),
             tokenize_texts(val_texts, tokenizer, f"{entry}-val")]
    n_tokens, (n_train, n_val) = write_windows(parts, seq_len, out_dir / cache.WINDOWS_FILE, token_dtype(vocab_size))
    _check_packed(n_train, n_tokens, seq_len)
    tokenizer.save(out_dir / TOKENIZER_FILE)
    log.info("trained a %d-token BPE on %d of %d text pieces; packed %d tokens into %d + %d windows",
             tokenizer.vocab_size, len(train_rows), len(texts), n_tokens, n_train, n_val)
    return {"n_documents": len(texts), "n_tokens": n_tokens, "n_windows": n_train + n_val, "seq_len": seq_len,
            "n_train_windows": n_train}


def _tokenizer_key(spec: str | Tokenizer, vocab_size: int | None, seq_len: int, val_fraction: float, seed: int):
    """(the tokenizer, or None for a BPE trained during the build; its data-cache key inputs)."""
    if isinstance(spec, Tokenizer):  # a tokenizer already made (a trained model's): keyed by its ids, as a path is
        check_vocab(spec, vocab_size)
        return spec, {"tokenizer": spec.name}
    if spec != TokenizerKind.BPE:
        tokenizer = make_tokenizer(spec, vocab_size)
        return tokenizer, {"tokenizer": tokenizer.name}
    if vocab_size is None:
        raise TokenizerError("data.tokenizer 'bpe' needs the vocabulary size to train to: pass vocab_size "
                             "(model.vocab_size)")
    check_bpe_vocab(vocab_size)  # before any text is read
    # The BPE sees only the training split, so the split (seed, val_fraction) is part of its key.
    return None, {"tokenizer": BPE_VERSION, "vocab_size": vocab_size, "val_fraction": val_fraction, "seed": seed,
                  "piece_chars": piece_chars(seq_len)}


def build_datasets(
    *, source: str = DataSource.STDLIB, paths: list[str] | None = None, hf_name: str | None = None,
    hf_config: str | None = None, hf_split: str = "train", text_field: str = "text",
    seq_len: int = 256, val_fraction: float = 0.01, seed: int = 0,
    objective: str = Objective.CAUSAL_LM, mask_prob: float = 0.15,
    max_files: int | None = None, max_bytes: int | None = None,
    cache_dir: str | None = None, tokenizer: str | Tokenizer = TokenizerKind.BYTE,
    vocab_size: int | None = None,
) -> DataBundle:
    """Packed, split, cached datasets for the trainer. Safe to call from every rank at once.

    ``max_files`` caps files (stdlib/text_files) or documents (hf); ``max_bytes`` caps the raw
    text read. The cache is keyed by the source content fingerprint, tokenizer and seq_len;
    seed/val_fraction/objective are applied on load, so changing them reuses the cache.
    ``tokenizer`` is data.tokenizer ('byte', 'bpe' or a tokenizer.json / folder path), or a Tokenizer
    (a trained model's), and ``vocab_size`` model.vocab_size: a 'bpe' is trained to it inside the
    (locked, one-process) cache build, on the training split only, so its key also holds seed and val_fraction.
    """
    _validate_args(source, paths, hf_name, seq_len, val_fraction, objective, mask_prob, max_files, max_bytes)
    tok, tok_key = _tokenizer_key(tokenizer, vocab_size, seq_len, val_fraction, seed)
    src = _resolve_source(source, paths, hf_name, hf_config, hf_split, text_field, max_files, max_bytes)
    key_inputs = {**src.key_inputs, **tok_key, "seq_len": seq_len}
    root = Path(cache_dir).expanduser() if cache_dir else cache.default_cache_dir()
    entry_name = cache.entry_name(key_inputs)

    def build(out: Path, scratch: Path) -> dict[str, Any]:
        if tok is None:
            return _pack_bpe_into(out, scratch, src, vocab_size, seq_len, val_fraction, seed, entry_name)
        return _pack_into(out, scratch, src, tok, seq_len, entry_name)

    entry, meta, hit = cache.load_or_build(root, key_inputs, build)
    log.info("packed data %s from %s", "loaded" if hit else "built", entry)
    if tok is None:
        tok = load_tokenizer_json((entry / TOKENIZER_FILE).read_text(encoding="utf-8"), str(entry / TOKENIZER_FILE))
    windows = np.load(entry / cache.WINDOWS_FILE, mmap_mode="r")  # uint16 (uint32 > 65536 ids) [N, seq_len + 1]
    train_rows, val_rows = _split(meta, len(windows), val_fraction, seed)

    def split_dataset(rows: np.ndarray) -> PackedDataset:
        return PackedDataset(windows, rows, objective=objective, mask_prob=mask_prob, seed=seed, tokenizer=tok)

    return DataBundle(split_dataset(train_rows), split_dataset(val_rows), tok, hit, int(meta["n_tokens"]), entry)


def describe_bundle(bundle: DataBundle, data_tokenizer: str, vocab_size: int) -> list[str]:
    """The lines a run prints about its data: the cache entry (loaded or built), its size and the tokenizer;
    then a warning when a trained BPE stopped short of ``vocab_size`` (its text had too few distinct
    merges), since the embedding rows above it are never trained and generation cannot decode them."""
    n_tokens = bundle.tokenizer.vocab_size
    if data_tokenizer == "bpe":
        kind = f"a {n_tokens:,}-token BPE trained on the training split"
    elif data_tokenizer == "byte":
        kind = f"the byte tokenizer ({n_tokens} ids)"
    else:
        kind = f"{data_tokenizer} ({n_tokens:,} tokens)"
    lines = [(f"data: packed windows {'loaded from' if bundle.cache_hit else 'built into'} cache entry "
              f"{bundle.cache_path} ({bundle.n_tokens:,} tokens, {len(bundle.train):,} training + "
              f"{len(bundle.val):,} validation windows); tokenizer: {kind}")]
    if data_tokenizer == "bpe" and n_tokens < vocab_size:
        lines.append(f"warning: the BPE reached only {n_tokens:,} of model.vocab_size {vocab_size:,} tokens (its "
                     f"training text has no more merges): embedding rows {n_tokens:,}..{vocab_size - 1:,} are never "
                     f"trained; set model.vocab_size={n_tokens} or train on more text")
    return lines


def _split(meta: dict[str, Any], n_windows: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, val rows): stored by a BPE build (split before training), else a seeded window split."""
    if "n_train_windows" in meta:
        n_train = int(meta["n_train_windows"])
        return np.arange(n_train), np.arange(n_train, n_windows)
    return split_windows(n_windows, val_fraction, seed)
