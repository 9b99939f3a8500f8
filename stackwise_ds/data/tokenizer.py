"""Tokenizers behind one interface: bytes (the default), a byte-level BPE trained on the run's
training text, or a local Hugging Face ``tokenizer.json`` / tokenizer folder.

Every tokenizer can be written as a Hugging Face ``tokenizers`` JSON (:meth:`Tokenizer.to_json`),
which is what travels with checkpoints, consolidated files and Hugging Face exports;
:func:`load_tokenizer_json` reads one back. :func:`make_tokenizer` is the factory from
``data.tokenizer``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable
from functools import lru_cache
from pathlib import Path

import numpy as np

from ..enums import TokenizerKind

N_BYTE_IDS = 256  # ids 0..255 are the raw utf-8 bytes
TOKENIZER_FILE = "tokenizer.json"
EOS_TOKEN = "<|endoftext|>"  # the special tokens StackWise writes (byte and bpe)
MASK_TOKEN = "<|mask|>"
# Special-token spellings of common tokenizers, most specific first.
EOS_NAMES = (EOS_TOKEN, "</s>", "<|end_of_text|>", "<eos>", "<|eos|>", "<|im_end|>", "<|eot_id|>", "[SEP]")
MASK_NAMES = (MASK_TOKEN, "<mask>", "[MASK]", "<|mask_token|>")
BPE_VERSION = "bpe-v1"  # part of the data-cache key: bump when the BPE training recipe changes


class TokenizerError(ValueError):
    """A tokenizer that cannot serve this run; the message says what to change."""


def token_dtype(vocab_size: int) -> type:
    """Smallest unsigned numpy type that holds every id (uint16 up to 65536 ids)."""
    return np.uint16 if vocab_size <= 2**16 else np.uint32


class Tokenizer:
    """The interface every tokenizer offers (ByteTokenizer and HFTokenizer)."""

    name: str  # part of the data-cache key: changes whenever the id mapping does
    eos_id: int
    mask_id: int | None  # None: the tokenizer has no mask token (causal LM only)
    eos_token: str  # the text of those special tokens in to_json()
    mask_token: str | None

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    @property
    def text_id_range(self) -> tuple[int, int]:
        """[low, high) of the ids masked-LM may swap in as random tokens."""
        return 0, self.vocab_size

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def encode_to_array(self, text: str) -> np.ndarray:
        """Bulk tokenisation: an unsigned integer array [n_tokens] (see :func:`token_dtype`)."""
        return np.asarray(self.encode(text), dtype=token_dtype(self.vocab_size))

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    def to_json(self) -> str:
        """This tokenizer as a Hugging Face ``tokenizers`` JSON string (same ids)."""
        raise NotImplementedError

    def save(self, path: str | Path) -> Path:
        """Write :meth:`to_json` to ``path`` atomically (readers never see half a file)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(self.to_json(), encoding="utf-8")
        os.replace(tmp, path)
        return path


class ByteTokenizer(Tokenizer):
    """ids 0..255 = bytes, 256 = end-of-document, 257 = mask (masked-LM)."""

    # Part of the data-cache key: bump it if the id mapping ever changes.
    name = "byte-v1"
    eos_id = 256
    mask_id = 257
    eos_token = EOS_TOKEN  # the special tokens' text in the tokenizers JSON (to_json)
    mask_token = MASK_TOKEN

    @property
    def vocab_size(self) -> int:
        return 258

    @property
    def text_id_range(self) -> tuple[int, int]:
        return 0, N_BYTE_IDS

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

    def to_json(self) -> str:
        return byte_level_json()

    def __repr__(self) -> str:
        return f"ByteTokenizer(vocab_size={self.vocab_size}, eos_id={self.eos_id}, mask_id={self.mask_id})"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in character for each byte (the ByteLevel pre-tokenizer's alphabet)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    chars = {b: chr(b) for b in printable}
    chars.update({b: chr(256 + n) for n, b in enumerate(others)})
    return chars


@lru_cache(maxsize=1)
def byte_level_json() -> str:
    """The byte tokenizer as a ``tokenizers`` object: a BPE without merges over the ByteLevel alphabet
    (id = byte value), no regex split, so every text maps to its utf-8 bytes; specials at 256 and 257."""
    from tokenizers import AddedToken, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFCore

    vocab = {char: byte for byte, char in bytes_to_unicode().items()}
    core = HFCore(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens([AddedToken(EOS_TOKEN, special=True), AddedToken(MASK_TOKEN, special=True)])
    return core.to_str()


class HFTokenizer(Tokenizer):
    """A Hugging Face ``tokenizers.Tokenizer`` with its end-of-document (and optional mask) id."""

    def __init__(self, json_text: str, eos_token: str | None = None, mask_token: str | None = None,
                 origin: str = "tokenizer") -> None:
        self.core = parse_tokenizer_json(json_text, origin)
        self._json = json_text
        specials = special_tokens(json_text)
        eos = eos_token or next((t for t in EOS_NAMES if t in specials), None)
        if eos is None or self.core.token_to_id(eos) is None:
            raise TokenizerError(f"{origin} declares no end-of-document token (looked for {eos_token or EOS_NAMES} "
                                 f"among its special tokens {sorted(specials)}): add one as a special token "
                                 "(tokenizer.add_special_tokens) or use data.tokenizer 'byte' or 'bpe'")
        mask = mask_token or next((t for t in MASK_NAMES if t in specials), None)
        self.eos_id = self.core.token_to_id(eos)
        self.mask_id = None if mask is None else self.core.token_to_id(mask)
        self.eos_token, self.mask_token = eos, mask
        self._special_ids = {self.core.token_to_id(t) for t in specials}
        digest = hashlib.sha256(json_text.encode()).hexdigest()[:16]
        self.name = f"hf-{digest}-eos{self.eos_id}-mask{self.mask_id}"

    @property
    def vocab_size(self) -> int:
        return self.core.get_vocab_size(with_added_tokens=True)

    @property
    def text_id_range(self) -> tuple[int, int]:
        low = 0
        while low in self._special_ids:  # skip the specials at the front (a trained BPE's eos and mask)
            low += 1
        return low, self.vocab_size

    def encode(self, text: str) -> list[int]:
        return self.core.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        return self.core.decode([int(i) for i in ids], skip_special_tokens=True)

    def to_json(self) -> str:
        return self._json

    def __repr__(self) -> str:
        return f"HFTokenizer(vocab_size={self.vocab_size}, eos_id={self.eos_id}, mask_id={self.mask_id})"


def parse_tokenizer_json(json_text: str, origin: str):
    """The ``tokenizers.Tokenizer`` of ``json_text``; a truncated or corrupt file is a TokenizerError naming
    ``origin`` (the library's own error names no file)."""
    from tokenizers import Tokenizer as HFCore

    try:
        return HFCore.from_str(json_text)
    except Exception as exc:  # tokenizers raises a bare Exception for every parse error
        raise TokenizerError(f"{origin} is not a readable tokenizer.json ({exc}): the file is truncated or "
                             "corrupt; replace it with a complete copy (tokenizer.save / save_pretrained "
                             "write one)") from None


def special_tokens(json_text: str) -> set[str]:
    """Contents of the added tokens a ``tokenizers`` JSON marks special."""
    return {t["content"] for t in json.loads(json_text).get("added_tokens", []) if t.get("special")}


def load_tokenizer_json(json_text: str, origin: str = "tokenizer", eos_token: str | None = None,
                        mask_token: str | None = None) -> Tokenizer:
    """The tokenizer a JSON from :meth:`Tokenizer.to_json` describes (the byte tokenizer stays native);
    ``eos_token``/``mask_token`` name its specials when they are not among the usual spellings."""
    if json_text == byte_level_json():
        return ByteTokenizer()
    return HFTokenizer(json_text, eos_token, mask_token, origin=origin)


def train_bpe(texts: Callable[[], Iterable[str]], vocab_size: int) -> HFTokenizer:
    """A byte-level BPE of at most ``vocab_size`` ids trained on ``texts()``, deterministically.

    ids 0 and 1 are end-of-document and mask, then the 256 byte symbols, then the merges."""
    from tokenizers import Tokenizer as HFCore
    from tokenizers import decoders, models, pre_tokenizers, trainers

    check_bpe_vocab(vocab_size)
    core = HFCore(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS_TOKEN, MASK_TOKEN], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator(texts(), trainer=trainer)
    return HFTokenizer(core.to_str(), EOS_TOKEN, MASK_TOKEN, origin="the trained BPE")


def check_bpe_vocab(vocab_size: int) -> None:
    minimum = N_BYTE_IDS + 2
    if vocab_size < minimum:
        raise TokenizerError(f"model.vocab_size ({vocab_size}) is smaller than the {minimum} ids a byte-level BPE "
                             f"starts with (256 bytes + end-of-document + mask): set model.vocab_size >= {minimum}")


def tokenizer_file(spec: str | Path) -> Path:
    """The tokenizer.json a ``data.tokenizer`` path names: the file itself or ``<folder>/tokenizer.json``."""
    path = Path(spec).expanduser()
    if path.is_dir():
        path = path / TOKENIZER_FILE
    if not path.is_file():
        raise TokenizerError(f"data.tokenizer {str(spec)!r} is neither 'byte', 'bpe' nor an existing tokenizer.json "
                             f"or folder holding one ({path} not found): fix data.tokenizer")
    return path


def folder_special_names(path: Path) -> tuple[str | None, str | None]:
    """(eos_token, mask_token) a save_pretrained folder's tokenizer_config.json declares, if any."""
    config = path.parent / "tokenizer_config.json"
    if not config.is_file():
        return None, None
    try:
        raw = json.loads(config.read_text())
    except ValueError as exc:
        raise TokenizerError(f"{config} is not valid JSON ({exc}): repair or delete it") from None

    def name(key: str) -> str | None:
        value = raw.get(key)
        return value.get("content") if isinstance(value, dict) else value

    return name("eos_token"), name("mask_token")


def load_tokenizer_file(spec: str | Path) -> HFTokenizer | Tokenizer:
    """The tokenizer of a local ``tokenizer.json`` or tokenizer folder (``save_pretrained``)."""
    path = tokenizer_file(spec)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise TokenizerError(f"{path} is not a tokenizer.json (not UTF-8 text: {exc}): fix data.tokenizer") from None
    if text == byte_level_json():
        return ByteTokenizer()
    eos, mask = folder_special_names(path)
    return HFTokenizer(text, eos, mask, origin=str(path))


def check_vocab(tokenizer: Tokenizer, vocab_size: int | None) -> None:
    if vocab_size is not None and tokenizer.vocab_size > vocab_size:
        raise TokenizerError(f"model.vocab_size ({vocab_size}) is smaller than the tokenizer's {tokenizer.vocab_size} "
                             f"tokens: set model.vocab_size >= {tokenizer.vocab_size}")


def make_tokenizer(spec: str = TokenizerKind.BYTE, vocab_size: int | None = None,
                   training_texts: Callable[[], Iterable[str]] | None = None) -> Tokenizer:
    """The tokenizer ``data.tokenizer`` names, checked against ``model.vocab_size``.

    'bpe' trains on ``training_texts()`` (the run's training split: see build.py) to exactly
    ``vocab_size`` ids at most."""
    if spec == TokenizerKind.BYTE:  # any other spec than byte or bpe is a path
        tokenizer: Tokenizer = ByteTokenizer()
    elif spec == TokenizerKind.BPE:
        if training_texts is None or vocab_size is None:
            raise TokenizerError("data.tokenizer 'bpe' is trained while the data cache is built: "
                                 "call build_datasets(tokenizer='bpe', vocab_size=...)")
        tokenizer = train_bpe(training_texts, vocab_size)
    else:
        tokenizer = load_tokenizer_file(spec)
    check_vocab(tokenizer, vocab_size)
    return tokenizer
