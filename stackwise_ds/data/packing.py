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

from ..enums import Objective
from .tokenizer import ByteTokenizer, Tokenizer, token_dtype

IGNORE_INDEX = -100  # torch.nn.CrossEntropyLoss default ignore_index
WINDOW_DTYPE = np.uint16  # byte ids (258) fit; half the size of int32 on disk (uint32 above 65536 ids)

# Distinct tags so the split, the masks and the batch order draw independent random streams
# from the same user seed.
SPLIT_TAG = 0x5E1_17
MASK_TAG = 0x3A5C


def check_objective(objective: str) -> None:
    if objective not in Objective.values():
        raise ValueError(f"unknown objective {objective!r}: set training.objective to one of: "
                         f"{', '.join(Objective.values())}")


def tokenize_documents(
    documents: Callable[[], Iterator[str]], tokenizer: Tokenizer, scratch_dir: Path, fingerprint: str,
):
    """Tokenise with ``datasets`` (Arrow on disk, so corpora larger than RAM work).

    Returns a ``datasets.Dataset`` with one row per non-empty document and a single column
    ``input_ids`` (uint16 list: the document's tokens followed by ``eos_id``).
    ``fingerprint`` replaces datasets' own hashing of the generator, which cannot see file
    contents; ``scratch_dir`` is private to this build, so nothing stale can be picked up.
    """
    texts = text_dataset(lambda: ({"text": text, "ends_doc": True} for text in documents()), scratch_dir, fingerprint)
    return tokenize_texts(texts, tokenizer, f"{fingerprint}-tok")


def text_dataset(rows: Callable[[], Iterator[dict]], scratch_dir: Path, fingerprint: str):
    """An on-disk Arrow dataset of ``{"text": str, "ends_doc": bool}`` rows (a document or a piece of one)."""
    import datasets

    features = datasets.Features({"text": datasets.Value("string"), "ends_doc": datasets.Value("bool")})
    try:
        return datasets.Dataset.from_generator(rows, features=features, cache_dir=str(scratch_dir),
                                               fingerprint=f"{fingerprint}-text")
    except datasets.exceptions.DatasetGenerationError as exc:
        # datasets wraps whatever the source raised; a user error (a missing column, an unloadable
        # dataset, a missing file) is raised as itself, its message naming the problem and the fix.
        cause = exc.__cause__ or exc.__context__
        if isinstance(cause, (ValueError, OSError)):
            raise cause from None
        raise


def tokenize_texts(texts, tokenizer: Tokenizer, fingerprint: str):
    """``input_ids`` per non-empty row: its tokens, then ``eos_id`` where the row ends a document."""
    import datasets

    dtype = token_dtype(tokenizer.vocab_size)
    features = datasets.Features({"input_ids": datasets.Sequence(datasets.Value(np.dtype(dtype).name))})
    eos = np.array([tokenizer.eos_id], dtype=dtype)
    none = np.array([], dtype=dtype)

    def encode_batch(batch: dict[str, list]) -> dict[str, list[np.ndarray]]:
        # Empty documents contribute nothing (not even an eos): returning fewer rows than
        # given is allowed because the input columns are removed.
        return {"input_ids": [
            np.concatenate([tokenizer.encode_to_array(text).astype(dtype), eos if ends else none])
            for text, ends in zip(batch["text"], batch["ends_doc"], strict=True) if text
        ]}

    return texts.map(
        encode_batch, batched=True, num_proc=1, remove_columns=texts.column_names, features=features,
        new_fingerprint=fingerprint, desc="tokenising",
    )


def _token_chunks(tokenized) -> Iterator[np.ndarray]:
    """The concatenated token stream as a sequence of flat uint16 numpy chunks (zero-copy)."""
    for chunk in tokenized.data.column("input_ids").chunks:
        yield chunk.flatten().to_numpy(zero_copy_only=False)


def write_windows(tokenized, seq_len: int, out_path: Path, dtype=WINDOW_DTYPE) -> tuple[int, int]:
    """Pack the token stream into ``out_path`` (.npy, ``dtype`` [n_windows, seq_len + 1]).

    Streams chunk by chunk into a memory-mapped file, so memory stays flat.
    Returns ``(n_tokens, n_windows)``; n_tokens counts every token incl. eos, before the
    incomplete tail window is dropped. ``tokenized`` may be a list of token datasets: each is
    packed on its own (no window mixes two), one after the other; n_windows is then a list.
    """
    parts = tokenized if isinstance(tokenized, list) else [tokenized]
    window_len = seq_len + 1
    part_tokens = [sum(len(chunk) for chunk in _token_chunks(part)) for part in parts]
    part_windows = [n // window_len for n in part_tokens]
    windows = np.lib.format.open_memmap(out_path, mode="w+", dtype=dtype, shape=(sum(part_windows), window_len))
    start = 0
    for part, n_windows in zip(parts, part_windows, strict=True):
        _fill(windows[start:start + n_windows].reshape(-1), part)  # a view: writes land in the file
        start += n_windows
    windows.flush()
    del windows
    n_windows_out = part_windows if isinstance(tokenized, list) else part_windows[0]
    return sum(part_tokens), n_windows_out


def _fill(flat: np.ndarray, tokenized) -> None:
    """Copy the head of ``tokenized``'s token stream into ``flat`` until it is full."""
    filled = 0
    for chunk in _token_chunks(tokenized):
        take = min(len(chunk), flat.size - filled)
        flat[filled:filled + take] = chunk[:take]
        filled += take
        if filled == flat.size:
            break


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
        self, windows: np.ndarray, rows: np.ndarray, *, objective: str = Objective.CAUSAL_LM,
        mask_prob: float = 0.15, seed: int = 0, tokenizer: Tokenizer | None = None,
    ) -> None:
        check_objective(objective)
        if not 0.0 < mask_prob < 1.0:
            raise ValueError(f"mask_prob must be in (0, 1), got {mask_prob}: fix data.mask_prob")
        self.windows = windows
        self.rows = np.asarray(rows, dtype=np.int64)
        self.objective = objective
        self.mask_prob = mask_prob
        self.seed = seed
        self.tokenizer = tokenizer or ByteTokenizer()
        if objective == Objective.MASKED_LM and self.tokenizer.mask_id is None:
            raise ValueError(f"{self.tokenizer!r} has no mask token, which training.objective 'masked_lm' needs: "
                             "use data.tokenizer 'byte' or 'bpe', or a tokenizer with a mask special token")

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
        if self.objective == Objective.CAUSAL_LM:
            return window[:-1], window[1:]
        return self._mask(window[:-1], row=int(self.rows[index]))

    def _mask(self, tokens: torch.Tensor, row: int) -> tuple[torch.Tensor, torch.Tensor]:
        """BERT-style corruption: of the chosen positions 80% -> mask_id, 10% random token, 10% kept."""
        gen = torch.Generator().manual_seed(mask_seed(self.seed, row))
        chosen = torch.rand(tokens.shape, generator=gen) < self.mask_prob
        if not chosen.any():  # every sample must contribute to the loss
            chosen[torch.randint(len(tokens), (1,), generator=gen)] = True
        action = torch.rand(tokens.shape, generator=gen)
        random_bytes = torch.randint(*self.tokenizer.text_id_range, tokens.shape, generator=gen)
        inputs = tokens.clone()
        inputs[chosen & (action < 0.8)] = self.tokenizer.mask_id
        swap = chosen & (action >= 0.8) & (action < 0.9)
        inputs[swap] = random_bytes[swap]
        labels = torch.where(chosen, tokens, torch.full_like(tokens, IGNORE_INDEX))
        return inputs, labels
