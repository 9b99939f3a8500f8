"""Tokenise documents with `datasets`, pack them into fixed-length windows, split, serve.

Pipeline-parallel engines need every micro-batch to have the same shape, so documents are
concatenated (eos between them) into one token stream and cut into non-overlapping windows
of ``seq_len + 1`` tokens: inputs = w[:-1], labels = w[1:] for causal LM. The tail that does
not fill a whole window is dropped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from .tokenizer import N_BYTE_IDS, ByteTokenizer

OBJECTIVES = ("causal_lm", "masked_lm")
IGNORE_INDEX = -100  # torch.nn.CrossEntropyLoss default ignore_index
WINDOW_DTYPE = np.uint16  # vocab_size 258 fits; half the size of int32 on disk

# Distinct tags so the split, the masks and the batch order draw independent random streams
# from the same user seed.
SPLIT_TAG = 0x5E1_17
MASK_TAG = 0x3A5C


def tokenize_documents(
    documents: Callable[[], Iterator[str]], tokenizer: ByteTokenizer, scratch_dir: Path, fingerprint: str,
):
    """Tokenise with ``datasets`` (Arrow on disk, so corpora larger than RAM work).

    Returns a ``datasets.Dataset`` with one row per non-empty document and a single column
    ``input_ids`` (uint16 list: the document's tokens followed by ``eos_id``).
    ``fingerprint`` replaces datasets' own hashing of the generator, which cannot see file
    contents; ``scratch_dir`` is private to this build, so nothing stale can be picked up.
    """
    import datasets

    features = datasets.Features({"input_ids": datasets.Sequence(datasets.Value("uint16"))})
    eos = np.array([tokenizer.eos_id], dtype=np.uint16)

    def generate_texts():
        for text in documents():
            yield {"text": text}

    def encode_batch(batch: dict[str, list[str]]) -> dict[str, list[np.ndarray]]:
        # Empty documents contribute nothing (not even an eos): returning fewer rows than
        # given is allowed because the input column is removed.
        return {"input_ids": [
            np.concatenate([tokenizer.encode_to_array(text), eos]) for text in batch["text"] if text
        ]}

    texts = datasets.Dataset.from_generator(
        generate_texts, features=datasets.Features({"text": datasets.Value("string")}),
        cache_dir=str(scratch_dir), fingerprint=f"{fingerprint}-text",
    )
    return texts.map(
        encode_batch, batched=True, num_proc=1, remove_columns=["text"], features=features,
        new_fingerprint=f"{fingerprint}-tok", desc="tokenising",
    )


def _token_chunks(tokenized) -> Iterator[np.ndarray]:
    """The concatenated token stream as a sequence of flat uint16 numpy chunks (zero-copy)."""
    for chunk in tokenized.data.column("input_ids").chunks:
        yield chunk.flatten().to_numpy(zero_copy_only=False)


def write_windows(tokenized, seq_len: int, out_path: Path) -> tuple[int, int]:
    """Pack the token stream into ``out_path`` (.npy, uint16 [n_windows, seq_len + 1]).

    Streams chunk by chunk into a memory-mapped file, so memory stays flat.
    Returns ``(n_tokens, n_windows)``; n_tokens counts every token incl. eos, before the
    incomplete tail window is dropped.
    """
    n_tokens = sum(len(chunk) for chunk in _token_chunks(tokenized))
    window_len = seq_len + 1
    n_windows = n_tokens // window_len
    windows = np.lib.format.open_memmap(out_path, mode="w+", dtype=WINDOW_DTYPE, shape=(n_windows, window_len))
    flat = windows.reshape(-1)  # view: writes land in the file
    filled = 0
    for chunk in _token_chunks(tokenized):
        take = min(len(chunk), flat.size - filled)
        flat[filled:filled + take] = chunk[:take]
        filled += take
        if filled == flat.size:
            break
    windows.flush()
    del flat, windows
    return n_tokens, n_windows


def count_val_windows(n_windows: int, val_fraction: float) -> int:
    """``val_fraction`` of the windows, rounded, but at least one when the fraction is > 0."""
    if val_fraction <= 0:
        return 0
    return max(1, round(n_windows * val_fraction))


def split_windows(n_windows: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded, deterministic train/val split of window rows -> (train_rows, val_rows), sorted.

    Depends only on (n_windows, val_fraction, seed): every rank and every run agree.
    """
    rng = np.random.default_rng(np.random.SeedSequence([seed, SPLIT_TAG]))
    order = rng.permutation(n_windows)
    n_val = count_val_windows(n_windows, val_fraction)
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def mask_seed(seed: int, row: int) -> int:
    """A well-mixed 64-bit torch seed for the masks of window ``row`` under ``seed``."""
    return int(np.random.SeedSequence([seed, MASK_TAG, row]).generate_state(1, dtype=np.uint64)[0])


class PackedDataset(Dataset):
    """Fixed-length samples over rows of a packed window array.

    ``windows``: uint16 [n_windows, seq_len + 1] (usually a read-only memmap);
    ``rows``: which windows belong to this split. Item i ->
      causal_lm: (input_ids = w[:-1], labels = w[1:]), both LongTensor[seq_len];
      masked_lm: (input_ids = w[:seq_len] with ~mask_prob positions corrupted BERT-style,
                  labels = original token at those positions, -100 elsewhere).
    Masks are a pure function of (seed, window row), so resumed and multi-rank runs see the
    same masks for the same sample (static masking: also the same in every epoch).
    """

    def __init__(
        self, windows: np.ndarray, rows: np.ndarray, *, objective: str = "causal_lm",
        mask_prob: float = 0.15, seed: int = 0, tokenizer: ByteTokenizer | None = None,
    ) -> None:
        if objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {objective!r}: set data.objective to one of {OBJECTIVES}")
        if not 0.0 < mask_prob < 1.0:
            raise ValueError(f"mask_prob must be in (0, 1), got {mask_prob}: fix data.mask_prob")
        self.windows = windows
        self.rows = np.asarray(rows, dtype=np.int64)
        self.objective = objective
        self.mask_prob = mask_prob
        self.seed = seed
        self.tokenizer = tokenizer or ByteTokenizer()

    @property
    def seq_len(self) -> int:
        return self.windows.shape[1] - 1

    def __len__(self) -> int:
        return len(self.rows)

    def window(self, index: int) -> torch.Tensor:
        """The raw window of sample ``index``: LongTensor[seq_len + 1]."""
        row = int(self.rows[index])
        return torch.from_numpy(np.asarray(self.windows[row], dtype=np.int64))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"sample {index} out of range for a split of {len(self)} sequences")
        window = self.window(index)
        if self.objective == "causal_lm":
            return window[:-1], window[1:]
        return self._mask(window[:-1], row=int(self.rows[index]))

    def _mask(self, tokens: torch.Tensor, row: int) -> tuple[torch.Tensor, torch.Tensor]:
        """BERT-style corruption: of the chosen positions 80% -> mask_id, 10% random byte, 10% kept."""
        gen = torch.Generator().manual_seed(mask_seed(self.seed, row))
        chosen = torch.rand(tokens.shape, generator=gen) < self.mask_prob
        if not chosen.any():  # every sample must contribute to the loss
            chosen[torch.randint(len(tokens), (1,), generator=gen)] = True
        action = torch.rand(tokens.shape, generator=gen)
        random_bytes = torch.randint(N_BYTE_IDS, tokens.shape, generator=gen)
        inputs = tokens.clone()
        inputs[chosen & (action < 0.8)] = self.tokenizer.mask_id
        swap = chosen & (action >= 0.8) & (action < 0.9)
        inputs[swap] = random_bytes[swap]
        labels = torch.where(chosen, tokens, torch.full_like(tokens, IGNORE_INDEX))
        return inputs, labels
