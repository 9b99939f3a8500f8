"""Validation loss and perplexity of a trained rack on the data a config describes (``stackwise-eval``).

The windows are those the trainer validates on: the data of ``config.data`` built by the trainer's own
code (same cache, same seeded train/validation split), its first ``training.eval_batches`` held-out
micro-batches of ``training.micro_batch_size`` windows; the loss is the trainer's too: the mean over those
micro-batches of each one's mean cross entropy (``lm_loss``). The text is tokenised with the model's own
tokenizer (a ``data.tokenizer 'bpe'`` run on its own text rebuilds, or reuses, the run's BPE data build,
whose split is made before the BPE is trained).

The evaluation config is the model's own config, then the keys of DATA.yaml, then ``--set``: a file that
names only ``data.source`` and ``data.paths`` keeps the run's seq_len, val_fraction, seed and batch size.
Its model section cannot change (the model is MODEL's).

Under a launcher (``deepspeed --num_gpus N``) every rank holds the whole rack and evaluates its share of
the micro-batches, dealt round-robin as the trainer deals them to data-parallel replicas; the loss is the
mean over all of them, the same number as on one process. (Why not a pipeline: evaluation keeps no
optimizer state, gradients or activations for backward, about 2 bytes a parameter in bf16 against the ~16
of training, so a rack that needed a pipeline of up to ~8 ranks to train fits one rank to evaluate; sharing
windows needs no engine.)

The rack is the whole rack as every tool loads it (full-precision weights, every unit): the training's
own number for the run's last tag (up to the rounding of stacks validated frozen in bf16 or int8, which
the checkpoint holds exactly); a mid-run tag of a growing (stack- or blockwise) run also runs the
units its phase had not placed yet, which the trainer's validation then skipped.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import ConfigError, StackWiseConfig, apply_overrides, read_config_yaml, section_dict
from ..data import IGNORE_INDEX, Tokenizer, make_tokenizer
from ..enums import TokenizerKind
from ..model import Rack
from .consolidation import find_run_tokenizer, load_rack_with_config
from .locate import resolve_checkpoint

# data keys that decide the text a 'bpe' run's data build splits and trains its BPE on (with training.seed)
BPE_BUILD_KEYS = ("source", "paths", "hf_name", "hf_config", "hf_split", "text_field", "max_files", "max_bytes",
                  "seq_len", "val_fraction")


@dataclass
class Evaluation:
    """What ``stackwise-eval`` reports: the loss over the validation windows and what they were."""

    loss: float
    windows: int
    tokens: int  # positions scored (every one for causal LM; the masked ones for masked LM)
    micro_batches: int
    model: str
    tag: str | None  # the checkpoint tag evaluated; None for a consolidated file
    world_size: int
    config: StackWiseConfig  # the evaluation config (its data and training sections say which windows)
    cache_entry: str  # the packed-data cache entry the windows came from

    @property
    def perplexity(self) -> float:
        return math.exp(min(self.loss, 50.0))  # capped as the trainer's val/perplexity is

    def line(self) -> str:
        return (f"val loss {self.loss:.4f}  ppl {self.perplexity:.2f}  "
                f"({self.windows} windows, {self.tokens} tokens)")

    def to_dict(self) -> dict[str, Any]:
        t = self.config.training
        return {"loss": self.loss, "perplexity": self.perplexity, "windows": self.windows, "tokens": self.tokens,
                "micro_batches": self.micro_batches, "micro_batch_size": t.micro_batch_size,
                "eval_batches": t.eval_batches, "seed": t.seed, "model": self.model, "tag": self.tag,
                "world_size": self.world_size, "data": section_dict(self.config.data), "cache_entry": self.cache_entry}


def evaluate(source: str | Path, config_path: str | Path | None = None, overrides: list[str] | tuple = (),
             tag: str | None = None, dtype: torch.dtype = torch.float32) -> Evaluation:
    """The validation loss of the rack at ``source`` (a run dir, its checkpoints/ folder, a tag folder or a
    consolidated .safetensors file) on the data of ``config_path`` (None: the run's own) and ``overrides``.

    Every input is checked before a process group starts; under a launcher this is collective."""
    tag = None if Path(source).suffix == ".safetensors" else resolve_checkpoint(source, tag).tag  # fixed from here on
    rack, run_config = load_rack_with_config(source, tag, dtype=dtype)
    config = evaluation_config(run_config, config_path, list(overrides))
    bundle = evaluation_data(config, run_config, find_run_tokenizer(source, tag, run_config.data, run_config.model))
    batches = validation_batches(config, bundle, *launcher_rank())
    world_size = start_process_group(config)[1]
    from ..training.metrics import mean_validation_loss, sum_over_ranks

    losses, tokens = batch_losses(rack.to(eval_device()), batches.batches[:batches.real])
    loss = mean_validation_loss(losses)
    micro_batches, tokens = (int(x) for x in sum_over_ranks([len(losses), tokens]))
    return Evaluation(loss, micro_batches * config.training.micro_batch_size, tokens, micro_batches, str(source),
                      tag, world_size, config, str(bundle.cache_path))


def evaluation_config(run_config: StackWiseConfig, config_path: str | Path | None,
                      overrides: list[str]) -> StackWiseConfig:
    """The model's config with the keys of ``config_path`` and then ``overrides`` on top (strict keys)."""
    raw = run_config.to_dict()
    if config_path is not None:
        raw = merged(raw, read_config_yaml(config_path))
    raw = apply_overrides(raw, overrides)
    data, max_seq_len = raw.get("data"), run_config.model.max_seq_len
    seq_len = data.get("seq_len") if isinstance(data, dict) else None
    if isinstance(seq_len, int) and seq_len > max_seq_len:  # before the config's own advice to raise max_seq_len
        raise ConfigError(f"data.seq_len ({seq_len}) is longer than the model's max_seq_len ({max_seq_len}): "
                          f"set data.seq_len <= {max_seq_len}")
    config = StackWiseConfig.from_dict(raw)
    check_same_model(config, run_config)
    return config


def merged(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``top``'s keys, section by section (a list or a value replaces the base's)."""
    out = dict(base)
    for key, value in top.items():
        both_sections = isinstance(value, dict) and isinstance(base.get(key), dict)
        out[key] = merged(base[key], value) if both_sections else value
    return out


def check_same_model(config: StackWiseConfig, run_config: StackWiseConfig) -> None:
    """Refuse a config whose model section differs from the model's: the weights decide the architecture."""
    ours, theirs = flat(section_dict(config.model)), flat(section_dict(run_config.model))
    changed = [f"model.{key} {ours[key]!r} (the model's: {theirs[key]!r})" for key in ours if ours[key] != theirs[key]]
    if changed:
        raise ConfigError(f"the config sets {', '.join(changed)}, but the model section is MODEL's own: remove "
                          "those keys from the config or --set (only its data and training keys choose the windows)")


def flat(section: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in section.items():
        out.update(flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return out


def evaluation_data(config: StackWiseConfig, run_config: StackWiseConfig, tokenizer: Tokenizer | None):
    """The datasets of ``config.data``, tokenised as the model was (refusing another tokenizer)."""
    from ..training.data_setup import load_bundle

    bundle = load_bundle(config, packing_tokenizer(config, run_config, tokenizer))
    if tokenizer is not None:  # a 'bpe' data build may have trained its BPE anew
        check_same_tokenizer(bundle.tokenizer, tokenizer, config.data.tokenizer)
    return bundle


def packing_tokenizer(config: StackWiseConfig, run_config: StackWiseConfig,
                      tokenizer: Tokenizer | None) -> str | Tokenizer:
    """What the data is tokenised with: the model's tokenizer; the run's own 'bpe' data build on the run's own
    text (its split is made before the BPE trains); or the tokenizer data.tokenizer names instead of the run's."""
    spec, run_spec = config.data.tokenizer, run_config.data.tokenizer
    if spec != run_spec:
        return named_tokenizer(spec, run_spec, run_config.model.vocab_size, tokenizer)
    if tokenizer is None:
        raise ConfigError(f"the model carries no tokenizer (data.tokenizer {run_spec!r}, {run_config.model.vocab_size} "
                          "ids, e.g. imported without one): set data.tokenizer to the tokenizer.json it was trained "
                          "with (--set data.tokenizer=PATH)")
    if spec == TokenizerKind.BPE and same_bpe_build(config, run_config):
        return spec
    return tokenizer


def named_tokenizer(spec: str, run_spec: str, vocab_size: int, tokenizer: Tokenizer | None) -> Tokenizer:
    """The tokenizer data.tokenizer names instead of the run's: it must be the model's (when the model has one)."""
    if spec == TokenizerKind.BPE:
        raise ConfigError("data.tokenizer 'bpe' would train a new BPE on this data, but the model was trained with "
                          f"data.tokenizer {run_spec!r}: drop data.tokenizer (the model's own is used)")
    named = make_tokenizer(spec)
    if tokenizer is not None:
        check_same_tokenizer(named, tokenizer, spec)
    elif named.vocab_size > vocab_size:
        raise ConfigError(f"data.tokenizer {spec!r} has {named.vocab_size} tokens, more than the model's vocab_size "
                          f"({vocab_size}): the model was not trained with it; give its own tokenizer")
    return named


def same_bpe_build(config: StackWiseConfig, run_config: StackWiseConfig) -> bool:
    """Whether ``config`` describes the text the run's 'bpe' data build split and trained its BPE on."""
    same_text = all(getattr(config.data, key) == getattr(run_config.data, key) for key in BPE_BUILD_KEYS)
    return same_text and config.training.seed == run_config.training.seed


def check_same_tokenizer(built: Tokenizer, model: Tokenizer, spec: str) -> None:
    from ..training.init_weights import describe_tokenizer, same_ids

    if not same_ids(built, model):
        raise ConfigError(f"data.tokenizer {spec!r} gives {describe_tokenizer(built)}, but the model was trained "
                          f"with {describe_tokenizer(model)}: its ids mean other tokens; drop data.tokenizer from "
                          "the config (the model's own tokenizer is used)")


def validation_batches(config: StackWiseConfig, bundle, rank: int, world_size: int):
    """This rank's share of the trainer's validation micro-batches (a ValidationSet); none is an error here."""
    from ..training.data_setup import validation_set

    t = config.training
    batches = validation_set(bundle.val, t.micro_batch_size, t.eval_batches, rank, world_size)
    if batches is None:
        raise ConfigError(f"the validation split holds {len(bundle.val)} windows, fewer than one micro-batch "
                          f"(training.micro_batch_size {t.micro_batch_size}): raise data.val_fraction "
                          f"({config.data.val_fraction}), give more text, or lower training.micro_batch_size")
    return batches


def launcher_rank() -> tuple[int, int]:
    """(rank, world size) as a launcher set them (0, 1 without one), before any process group exists."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def start_process_group(config: StackWiseConfig) -> tuple[int, int]:
    """(rank, world size); under a launcher of more than one process, starts the process group (collective)."""
    rank, world_size = launcher_rank()
    if world_size == 1:
        return rank, world_size
    from ..parallel.distributed import init_distributed

    return init_distributed(int(config.parallel.collective_timeout_s))


def eval_device() -> torch.device:
    """This rank's accelerator (the launcher's LOCAL_RANK: set by init_distributed), else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


@torch.inference_mode()
def batch_losses(rack: Rack, batches: list) -> tuple[list[float], int]:
    """(each micro-batch's mean loss over its labelled positions, the labelled positions in all)."""
    from ..parallel.pipe import lm_loss  # the trainer's loss: the pipeline's last stage computes it

    device = next(rack.parameters()).device
    losses, tokens = [], 0
    for inputs, labels in batches:  # [B, T] each
        labels = labels.to(device)
        losses.append(float(lm_loss(rack(inputs.to(device)), labels)))
        tokens += int((labels != IGNORE_INDEX).sum())
    return losses, tokens
