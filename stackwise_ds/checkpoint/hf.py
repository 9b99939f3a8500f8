"""Hugging Face ``LlamaForCausalLM`` export and import.

A causal Rack with softmax attention (mha/gqa) is a Llama: same pre-norm Block, SwiGLU, RMSNorm
(statistics in fp32) and RoPE in the ``rotate_half`` convention, so weights map 1:1 by name:

    embedding.weight                          <-> model.embed_tokens.weight
    stacks.{i}.blocks.{j}.attn_norm.weight    <-> model.layers.{l}.input_layernorm.weight
    stacks.{i}.blocks.{j}.attn.q_proj.weight  <-> model.layers.{l}.self_attn.q_proj.weight   (k, v, o too)
    stacks.{i}.blocks.{j}.ffn_norm.weight     <-> model.layers.{l}.post_attention_layernorm.weight
    stacks.{i}.blocks.{j}.ffn.gate_proj.weight <-> model.layers.{l}.mlp.gate_proj.weight      (up, down too)
    norm.weight                               <-> model.norm.weight
    lm_head.weight                            <-> lm_head.weight (absent when tied)

with l = i * blocks_per_stack + j. MLA, kernel attention and bidirectional attention have no
Llama equivalent and are refused. Nothing here downloads anything.

The run's tokenizer travels both ways: the export writes tokenizer.json + tokenizer_config.json
(``AutoTokenizer.from_pretrained`` loads them as a ``PreTrainedTokenizerFast``, the byte tokenizer
included, with the same ids) and the end-of-document id into config/generation_config; the import
keeps the folder's tokenizer in the consolidated file's metadata.
"""

from __future__ import annotations

import inspect
import json
import warnings
from collections import OrderedDict
from pathlib import Path

import torch

from ..config import ConfigError, ModelConfig, StackWiseConfig
from ..data import TOKENIZER_FILE, Tokenizer, TokenizerError
from ..data.tokenizer import load_tokenizer_file
from ..enums import AttentionMode, AttentionType
from .consolidation import find_run_tokenizer, load_rack_state, save_consolidated
from .files import CheckpointError

BLOCK_NAMES = {  # Rack name inside a block -> Llama name inside a decoder layer
    "attn_norm.weight": "input_layernorm.weight",
    "attn.q_proj.weight": "self_attn.q_proj.weight",
    "attn.k_proj.weight": "self_attn.k_proj.weight",
    "attn.v_proj.weight": "self_attn.v_proj.weight",
    "attn.o_proj.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn.gate_proj.weight": "mlp.gate_proj.weight",
    "ffn.up_proj.weight": "mlp.up_proj.weight",
    "ffn.down_proj.weight": "mlp.down_proj.weight",
}
TOP_NAMES = {"embedding.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
             "lm_head.weight": "lm_head.weight"}


class ExportError(ValueError):
    """A rack or model that has no counterpart on the other side; the message names the feature."""


# ----------------------------------------------------------------------------- export


def check_llama_compatible(m: ModelConfig) -> None:
    """Refuse racks whose computation a LlamaForCausalLM cannot reproduce, naming the feature."""
    if m.attention_type in (AttentionType.MLA, AttentionType.KERNEL):
        mla = m.attention_type == AttentionType.MLA
        kind = "multi-head latent attention (MLA)" if mla else "kernel (linear) attention"
        raise ExportError(f"model.attention_type '{m.attention_type}' ({kind}) has no LlamaForCausalLM equivalent: "
                          "only 'mha' and 'gqa' racks export to Llama; keep this model in the StackWise format "
                          "(stackwise-consolidate)")
    if m.attention_mode != AttentionMode.CAUSAL:
        raise ExportError(f"model.attention_mode '{m.attention_mode}' does not map: LlamaForCausalLM attends "
                          "causally only; a bidirectional (masked-LM) rack has no Llama equivalent")


def llama_config(m: ModelConfig, eos_id: int | None = None):
    """The ``transformers.LlamaConfig`` of a compatible rack whose tokenizer ends documents with ``eos_id``."""
    from transformers import LlamaConfig

    kwargs = dict(
        vocab_size=m.vocab_size, hidden_size=m.d_model, intermediate_size=m.resolved_d_ff,
        num_hidden_layers=m.n_blocks, num_attention_heads=m.n_heads,
        num_key_value_heads=m.n_kv_heads or m.n_heads, head_dim=m.d_model // m.n_heads,
        hidden_act="silu", max_position_embeddings=m.max_seq_len, initializer_range=m.init_std,
        rms_norm_eps=m.norm_eps, tie_word_embeddings=m.tie_embeddings, attention_bias=False, mlp_bias=False,
        attention_dropout=0.0, bos_token_id=None, pad_token_id=None,
        eos_token_id=eos_id,
        architectures=["LlamaForCausalLM"],
    )
    if "rope_parameters" in inspect.signature(LlamaConfig.__init__).parameters:  # transformers >= 5
        kwargs["rope_parameters"] = {"rope_type": "default", "rope_theta": m.rope_theta}
    else:
        kwargs["rope_theta"] = m.rope_theta
    return LlamaConfig(**kwargs)


def rack_to_llama_names(model: ModelConfig) -> dict[str, str]:
    bps = model.architecture.blocks_per_stack
    names = {}
    for i in range(model.architecture.n_stacks):
        for j in range(bps):
            for ours, theirs in BLOCK_NAMES.items():
                names[f"stacks.{i}.blocks.{j}.{ours}"] = f"model.layers.{i * bps + j}.{theirs}"
    names.update(TOP_NAMES)
    return names


def export_hf(source: str | Path, out_dir: str | Path, tag: str | None = None) -> Path:
    """Write ``out_dir`` (config.json + model.safetensors + the run's tokenizer) loadable by
    ``LlamaForCausalLM.from_pretrained`` and ``AutoTokenizer.from_pretrained``."""
    from safetensors.torch import save_file

    state, config = load_rack_state(source, tag)
    check_llama_compatible(config.model)
    tokenizer = find_run_tokenizer(source, tag, config.data, config.model)
    if tokenizer is None:
        warnings.warn(f"{source} carries no tokenizer: the export has none (copy the run's tokenizer.json into the "
                      "checkpoint tag folder and export again to get one)", stacklevel=2)
    names = rack_to_llama_names(config.model)
    tensors = {names[n]: t.detach().contiguous().float() for n, t in state.items()}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    eos_id = None if tokenizer is None else tokenizer.eos_id
    llama_config(config.model, eos_id).save_pretrained(str(out_dir))
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    if tokenizer is not None:
        save_hf_tokenizer(tokenizer, out_dir, config.model.max_seq_len)
    return out_dir


def save_hf_tokenizer(tokenizer: Tokenizer, out_dir: Path, max_length: int) -> None:
    """tokenizer.json, tokenizer_config.json (a PreTrainedTokenizerFast with eos, no cleanup of spaces,
    so decoding returns exactly the text) and generation_config.json (generation stops at eos)."""
    from transformers import GenerationConfig

    tokenizer.save(out_dir / TOKENIZER_FILE)
    specials = {"eos_token": tokenizer.eos_token, "pad_token": tokenizer.eos_token}
    if tokenizer.mask_token is not None:
        specials["mask_token"] = tokenizer.mask_token
    tokenizer_config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_length,
                        "clean_up_tokenization_spaces": False, "add_bos_token": False, "add_eos_token": False,
                        **specials}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    (out_dir / "special_tokens_map.json").write_text(json.dumps(specials, indent=2))
    GenerationConfig(eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.eos_id).save_pretrained(str(out_dir))


# ----------------------------------------------------------------------------- import


def import_hf(hf_dir: str | Path, out: str | Path, n_stacks: int = 1) -> Path:
    """Convert a local Llama-architecture model folder into a consolidated StackWise safetensors file
    (carrying the folder's tokenizer, when it has a tokenizer.json)."""
    hf_dir = Path(hf_dir)
    raw = read_hf_config(hf_dir)
    config = config_from_llama(raw, n_stacks)
    hf_state = read_hf_weights(hf_dir)
    names = {theirs: ours for ours, theirs in rack_to_llama_names(config.model).items()}
    state = OrderedDict()
    for name, tensor in hf_state.items():
        if name.endswith("rotary_emb.inv_freq"):
            continue  # old checkpoints saved the RoPE frequencies; ours are rebuilt from rope_theta
        if name not in names:
            raise ExportError(f"{hf_dir}: weight '{name}' has no place in a StackWise rack (a Llama variant with "
                              "extra parameters, e.g. biases); it cannot be imported")
        state[names[name]] = tensor
    if config.model.tie_embeddings:
        state.pop("lm_head.weight", None)
    return save_consolidated(state, config, out, read_hf_tokenizer(hf_dir, config.model.vocab_size))


def read_hf_tokenizer(hf_dir: Path, vocab_size: int) -> Tokenizer | None:
    """The tokenizer of a save_pretrained folder; None (with a warning) when it has none that fits."""
    if not (hf_dir / TOKENIZER_FILE).is_file():
        warnings.warn(f"{hf_dir} has no {TOKENIZER_FILE}: the imported model carries no tokenizer", stacklevel=3)
        return None
    try:
        tokenizer = load_tokenizer_file(hf_dir)
    except TokenizerError as exc:
        warnings.warn(f"the tokenizer of {hf_dir} is not kept: {exc}", stacklevel=3)
        return None
    if tokenizer.vocab_size > vocab_size:
        warnings.warn(f"the tokenizer of {hf_dir} has {tokenizer.vocab_size} tokens, more than the model's "
                      f"vocab_size {vocab_size}: it is not kept", stacklevel=3)
        return None
    return tokenizer


def read_hf_config(hf_dir: Path) -> dict:
    path = hf_dir / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{hf_dir} has no config.json: pass a local folder written by save_pretrained()")
    return json.loads(path.read_text())


def config_from_llama(raw: dict, n_stacks: int) -> StackWiseConfig:
    """A StackWise config for a Llama config dict, refusing what does not map."""
    if raw.get("model_type") != "llama":
        raise ExportError(f"model_type is '{raw.get('model_type')}', not 'llama': only Llama-architecture "
                          "models import (LlamaForCausalLM)")
    for key, bad in (("attention_bias", True), ("mlp_bias", True)):
        if raw.get(key) is bad:
            raise ExportError(f"{key}=true does not map: StackWise projections have no bias")
    if raw.get("hidden_act", "silu") != "silu":
        raise ExportError(f"hidden_act '{raw['hidden_act']}' does not map: the StackWise SwiGLU uses silu")
    rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise ExportError(f"RoPE scaling '{rope.get('rope_type', rope.get('type'))}' does not map: StackWise "
                          "uses plain RoPE")
    theta = rope.get("rope_theta", raw.get("rope_theta", 10000.0))
    d_model, n_heads, n_layers = raw["hidden_size"], raw["num_attention_heads"], raw["num_hidden_layers"]
    if raw.get("head_dim") not in (None, d_model // n_heads):
        raise ExportError(f"head_dim {raw['head_dim']} != hidden_size / num_attention_heads "
                          f"({d_model // n_heads}): StackWise derives head_dim from d_model")
    if n_stacks <= 0 or n_layers % n_stacks:
        raise ConfigError(f"--n-stacks {n_stacks} does not divide the model's {n_layers} layers: use one of "
                          f"{[s for s in range(1, n_layers + 1) if n_layers % s == 0]}")
    n_kv = raw.get("num_key_value_heads") or n_heads
    max_seq_len = raw.get("max_position_embeddings", 2048)
    return StackWiseConfig.from_dict({
        "model": {
            "vocab_size": raw["vocab_size"], "d_model": d_model, "n_heads": n_heads,
            "n_kv_heads": None if n_kv == n_heads else n_kv, "d_ff": raw["intermediate_size"],
            "max_seq_len": max_seq_len, "attention_type": "mha" if n_kv == n_heads else "gqa",
            "attention_mode": "causal", "rope_theta": float(theta), "norm_eps": float(raw.get("rms_norm_eps", 1e-6)),
            "tie_embeddings": bool(raw.get("tie_word_embeddings", False)),
            "init_std": float(raw.get("initializer_range", 0.02)),
            "architecture": {"n_stacks": n_stacks, "blocks_per_stack": n_layers // n_stacks},
        },
        "data": {"seq_len": min(256, max_seq_len)},
        "parallel": {"pipeline_stages": None},
    })


def read_hf_weights(hf_dir: Path) -> "OrderedDict[str, torch.Tensor]":
    """All tensors of a save_pretrained folder: one or sharded safetensors, else pytorch_model.bin."""
    from safetensors.torch import load_file

    single, index = hf_dir / "model.safetensors", hf_dir / "model.safetensors.index.json"
    if single.is_file():
        return OrderedDict(load_file(str(single)))
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state = OrderedDict()
        for name in files:
            state.update(load_file(str(hf_dir / name)))
        return state
    binary = hf_dir / "pytorch_model.bin"
    if binary.is_file():
        return OrderedDict(torch.load(binary, map_location="cpu", weights_only=True))
    raise CheckpointError(f"{hf_dir} holds no weights (model.safetensors, its index, or pytorch_model.bin): "
                          "save the model with save_pretrained() first")
