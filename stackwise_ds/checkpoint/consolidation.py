"""One safetensors file per model: every pipeline layer file merged under the Rack's stable names.

The file's metadata holds the resolved run config (``{"stackwise_config": json}``) and the run's
tokenizer (``stackwise_tokenizer``: a ``tokenizers`` JSON string, with its eos/mask token names), so a
consolidated file is self-describing: :func:`load_rack` rebuilds the Rack from it alone and
:func:`load_run_tokenizer` its tokenizer. A tied
LM head is stored once, as ``embedding.weight``; loading re-ties it (one Parameter for both).
"""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

import torch

from ..config import DataConfig, ModelConfig, StackWiseConfig
from ..data import TOKENIZER_FILE, ByteTokenizer, Tokenizer, load_tokenizer_json
from ..enums import TokenizerKind
from ..model import Rack, build_rack
from .files import CheckpointError
from .layers import check_architecture, check_shapes, read_rack_state
from .locate import resolve_checkpoint

CONFIG_KEY = "stackwise_config"
TOKENIZER_KEY = "stackwise_tokenizer"  # the tokenizers JSON; the two keys below name its specials
TOKENIZER_EOS_KEY = "stackwise_tokenizer_eos"
TOKENIZER_MASK_KEY = "stackwise_tokenizer_mask"
RackState = OrderedDict[str, torch.Tensor]  # Rack parameter name -> tensor (a tied head only as embedding.weight)


def consolidate(checkpoint: str | Path, out: str | Path, tag: str | None = None) -> Path:
    """Write the weights of ``checkpoint`` (any number of stages) to ``out`` (.safetensors)."""
    ref = resolve_checkpoint(checkpoint, tag)
    state, config = read_rack_state(ref), ref.config
    return save_consolidated(state, config, out, tag_tokenizer(ref.path, config.data, config.model))


def tokenizer_metadata(tokenizer: Tokenizer | None) -> dict[str, str]:
    """safetensors metadata entries that carry ``tokenizer`` (none for None)."""
    if tokenizer is None:
        return {}
    entries = {TOKENIZER_KEY: tokenizer.to_json(), TOKENIZER_EOS_KEY: tokenizer.eos_token}
    if tokenizer.mask_token is not None:
        entries[TOKENIZER_MASK_KEY] = tokenizer.mask_token
    return entries


def tag_tokenizer(tag_dir: Path, data: DataConfig, model: ModelConfig) -> Tokenizer | None:
    """The tokenizer saved in a checkpoint tag; the byte tokenizer for a byte run saved without one
    (older versions); None when unknown."""
    path = Path(tag_dir) / TOKENIZER_FILE
    if path.is_file():
        return load_tokenizer_json(path.read_text(encoding="utf-8"), str(path))
    return _byte_fallback(data, model)


def _byte_fallback(data: DataConfig, model: ModelConfig) -> Tokenizer | None:
    # Only a vocabulary of exactly the byte tokenizer's 258 ids: data.tokenizer is also 'byte' (the default)
    # in the config of a model imported without a tokenizer (stackwise-import-hf), whose ids >= 258 the byte
    # tokenizer would silently drop; a byte run saved by this version always carries its tokenizer.json.
    if data.tokenizer == TokenizerKind.BYTE and model.vocab_size == ByteTokenizer().vocab_size:
        return ByteTokenizer()
    return None


def save_consolidated(state: dict[str, torch.Tensor], config: StackWiseConfig, out: str | Path,
                      tokenizer: Tokenizer | None = None) -> Path:
    from safetensors.torch import save_file

    out = Path(out)
    if out.suffix != ".safetensors":
        raise ValueError(f"output {out} must end in .safetensors (the tools read the format from the suffix)")
    out.parent.mkdir(parents=True, exist_ok=True)
    if config.model.tie_embeddings:  # a Rack's state_dict lists the tied head too: store the matrix once
        state = {name: t for name, t in state.items() if name != "lm_head.weight"}
    check_shapes(state, config.model, str(out))
    tensors = {name: t.detach().contiguous().cpu() for name, t in state.items()}
    save_file(tensors, str(out), metadata={CONFIG_KEY: json.dumps(config.to_dict()), **tokenizer_metadata(tokenizer)})
    return out


def safetensors_metadata(path: str | Path) -> dict[str, str]:
    """The metadata of a .safetensors file; a file that is not one (corrupt, truncated, another format under
    that name) is a CheckpointError naming it, not safetensors' bare 'header too large'."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return handle.metadata() or {}
    except SafetensorError as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file ({exc}): it is truncated, corrupt or "
                              "another format under a .safetensors name; give a file written by "
                              "stackwise-consolidate, stackwise-import-hf or stackwise-restack") from None


def consolidated_tokenizer(path: Path, data: DataConfig, model: ModelConfig) -> Tokenizer | None:
    """The tokenizer in a consolidated file's metadata (see :func:`tag_tokenizer` for the fallback)."""
    metadata = safetensors_metadata(path)
    if TOKENIZER_KEY in metadata:
        return load_tokenizer_json(metadata[TOKENIZER_KEY], str(path), metadata.get(TOKENIZER_EOS_KEY),
                                   metadata.get(TOKENIZER_MASK_KEY))
    return _byte_fallback(data, model)


def find_run_tokenizer(source: str | Path, tag: str | None, data: DataConfig, model: ModelConfig) -> Tokenizer | None:
    """The tokenizer a checkpoint (its tag folder) or a consolidated file was trained with; None if unknown."""
    if Path(source).suffix == ".safetensors":
        return consolidated_tokenizer(Path(source), data, model)
    return tag_tokenizer(resolve_checkpoint(source, tag).path, data, model)


def load_run_tokenizer(source: str | Path, tag: str | None = None, config: StackWiseConfig | None = None) -> Tokenizer:
    """:func:`find_run_tokenizer`, refusing a source that carries none."""
    config = config or load_rack_state(source, tag)[1]
    tokenizer = find_run_tokenizer(source, tag, config.data, config.model)
    if tokenizer is None:
        raise CheckpointError(f"{source} carries no tokenizer (data.tokenizer {config.data.tokenizer!r}, "
                              f"{config.model.vocab_size} ids): give the one it was trained with (stackwise-generate "
                              f"--tokenizer PATH: a {TOKENIZER_FILE} or a folder holding one), or copy the run's "
                              f"<output_dir>/{TOKENIZER_FILE} into the checkpoint tag folder and consolidate again")
    return tokenizer


def read_consolidated(path: str | Path) -> tuple[RackState, StackWiseConfig]:
    """Weights and config of a consolidated file."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist: pass a .safetensors file written by stackwise-consolidate")
    safetensors_metadata(path)  # a file that is no safetensors: named here
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
        if CONFIG_KEY not in metadata:
            raise CheckpointError(f"{path} has no '{CONFIG_KEY}' metadata, so the rack it belongs to is unknown: "
                                  "write it with stackwise-consolidate or stackwise-import-hf")
        state = OrderedDict((name, handle.get_tensor(name)) for name in handle.keys())
    return state, StackWiseConfig.from_dict(json.loads(metadata[CONFIG_KEY]))


def load_rack_state(source: str | Path, tag: str | None = None,
                    model: ModelConfig | None = None) -> tuple[RackState, StackWiseConfig]:
    """(Rack-named weights, the config they were trained with) from a .safetensors file or a checkpoint;
    ``model`` (optional) is the architecture the caller expects."""
    if Path(source).suffix == ".safetensors":
        state, saved = read_consolidated(source)
        if model is not None:
            check_architecture(saved.model, model, Path(source))
        check_shapes(state, saved.model, str(source))
        return state, saved
    ref = resolve_checkpoint(source, tag)
    return read_rack_state(ref, model), ref.config


def load_rack(source: str | Path, tag: str | None = None, model: ModelConfig | None = None,
              dtype: torch.dtype | None = torch.float32) -> Rack:
    """A Rack with the weights of a consolidated ``.safetensors`` file or a checkpoint directory.

    ``model`` (optional) is the architecture the caller expects: a checkpoint of another one is
    refused, naming the differing keys. ``dtype`` casts the weights (None: keep the saved dtype).
    """
    return load_rack_with_config(source, tag, model, dtype)[0]


def load_rack_with_config(source: str | Path, tag: str | None = None, model: ModelConfig | None = None,
                          dtype: torch.dtype | None = torch.float32) -> tuple[Rack, StackWiseConfig]:
    """:func:`load_rack`, plus the config the weights were trained with."""
    state, saved = load_rack_state(source, tag, model)
    dtype = dtype or next(iter(state.values())).dtype
    with torch.device("meta"):  # skip the random init; every weight comes from the file
        rack = build_rack(saved.model)
    rack = rack.to_empty(device="cpu").to(dtype)  # RotaryEmbedding rebuilds its fp32 tables on _apply
    if saved.model.tie_embeddings:
        state = OrderedDict(state, **{"lm_head.weight": state["embedding.weight"]})
        rack.lm_head.weight = rack.embedding.weight  # to_empty made a new Parameter per module: re-tie
    rack.load_state_dict(state, strict=True)
    return rack.eval(), saved
