"""Byte-level tokenizer: no vocabulary file, nothing to download, every text encodable."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

N_BYTE_IDS = 256  # ids 0..255 are the raw utf-8 bytes


class ByteTokenizer:
    """ids 0..255 = bytes, 256 = end-of-document, 257 = mask (masked-LM)."""

    # Part of the data-cache key: bump it if the id mapping ever changes.
    name = "byte-v1"
    eos_id = 256
    mask_id = 257

    @property
    def vocab_size(self) -> int:
        return 258

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_to_array(self, text: str) -> np.ndarray:
        """Fast path for bulk tokenisation: uint16 array [len(utf-8 bytes)]."""
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.uint16)

    def decode(self, ids: Iterable[int]) -> str:
        # Specials (eos, mask) carry no text; a window may also start mid-character,
        # hence errors="replace" rather than raising.
        raw = bytes(int(i) for i in ids if 0 <= int(i) < N_BYTE_IDS)
        return raw.decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return f"ByteTokenizer(vocab_size={self.vocab_size}, eos_id={self.eos_id}, mask_id={self.mask_id})"
