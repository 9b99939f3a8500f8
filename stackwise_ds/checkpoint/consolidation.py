"""One safetensors file per model: every pipeline layer file merged under the Rack's stable names.

The file's metadata holds the resolved run config (``{"stackwise_config": json}``), so a
consolidated file is self-describing: :func:`load_rack` rebuilds the Rack from it alone. A tied
LM head is stored once, as ``embedding.weight``; loading re-ties it (one Parameter for both).
"""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

import torch

from ..config import StackWiseConfig
from ..model import Rack, create_rack_from_config
from ..training.checkpointing import CheckpointError
from .layers import check_architecture, check_shapes, read_rack_state
from .locate import resolve_checkpoint

CONFIG_KEY = "stackwise_config"
RackState = OrderedDict[str, torch.Tensor]  # Rack parameter name -> tensor (a tied head only as embedding.weight)


def consolidate(checkpoint: str | Path, out: str | Path, tag: str | None = None) -> Path:
    """Write the weights of ``checkpoint`` (any number of stages) to ``out`` (.safetensors)."""
    ref = resolve_checkpoint(checkpoint, tag)
    state = read_rack_state(ref)
    return save_consolidated(state, ref.config, out)


def save_consolidated(state: dict[str, torch.Tensor], config: StackWiseConfig, out: str | Path) -> Path:
    from safetensors.torch import save_file

    out = Path(out)
    if out.suffix != ".safetensors":
        raise ValueError(f"output {out} must end in .safetensors (the tools read the format from the suffix)")
    out.parent.mkdir(parents=True, exist_ok=True)
    if config.model.tie_embeddings:  # a Rack's state_dict lists the tied head too: store the matrix once
        state = {name: t for name, t in state.items() if name != "lm_head.weight"}
    check_shapes(state, config, str(out))
    tensors = {name: t.detach().contiguous().cpu() for name, t in state.items()}
    save_file(tensors, str(out), metadata={CONFIG_KEY: json.dumps(config.to_dict())})
    return out


def read_consolidated(path: str | Path) -> tuple[RackState, StackWiseConfig]:
    """Weights and config of a consolidated file."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist: pass a .safetensors file written by tools/consolidate.py")
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
        if CONFIG_KEY not in metadata:
            raise CheckpointError(f"{path} has no '{CONFIG_KEY}' metadata, so the rack it belongs to is unknown: "
                                  "write it with tools/consolidate.py or tools/import_hf.py")
        state = OrderedDict((name, handle.get_tensor(name)) for name in handle.keys())
    return state, StackWiseConfig.from_dict(json.loads(metadata[CONFIG_KEY]))


def load_rack_state(source: str | Path, tag: str | None = None,
                    config: StackWiseConfig | dict | None = None) -> tuple[RackState, StackWiseConfig]:
    """(Rack-named weights, the config they were trained with) from a .safetensors file or a checkpoint."""
    wanted = StackWiseConfig.from_dict(config) if isinstance(config, dict) else config
    if Path(source).suffix == ".safetensors":
        state, saved = read_consolidated(source)
        if wanted is not None:
            check_architecture(saved, wanted, Path(source))
        check_shapes(state, saved, str(source))
        return state, saved
    ref = resolve_checkpoint(source, tag)
    return read_rack_state(ref, wanted), ref.config


def load_rack(source: str | Path, tag: str | None = None, config: StackWiseConfig | dict | None = None,
              dtype: torch.dtype | None = torch.float32) -> Rack:
    """A Rack with the weights of a consolidated ``.safetensors`` file or a checkpoint directory.

    ``config`` (optional) is the architecture the caller expects: a checkpoint of another one is
    refused, naming the differing keys. ``dtype`` casts the weights (None: keep the saved dtype).
    """
    return load_rack_with_config(source, tag, config, dtype)[0]


def load_rack_with_config(source: str | Path, tag: str | None = None, config: StackWiseConfig | dict | None = None,
                          dtype: torch.dtype | None = torch.float32) -> tuple[Rack, StackWiseConfig]:
    """:func:`load_rack`, plus the config the weights were trained with."""
    state, saved = load_rack_state(source, tag, config)
    dtype = dtype or next(iter(state.values())).dtype
    with torch.device("meta"):  # skip the random init; every weight comes from the file
        rack = create_rack_from_config(saved)
    rack = rack.to_empty(device="cpu").to(dtype)  # RotaryEmbedding rebuilds its fp32 tables on _apply
    if saved.model.tie_embeddings:
        state = OrderedDict(state, **{"lm_head.weight": state["embedding.weight"]})
        rack.lm_head.weight = rack.embedding.weight  # to_empty made a new Parameter per module: re-tie
    rack.load_state_dict(state, strict=True)
    return rack.eval(), saved
