"""``training.init_from``: start a fresh run from existing weights, growing the rack in depth if asked.

The source (a run, checkpoint folder or tag; a consolidated ``.safetensors``; a local Hugging Face
Llama folder) is turned into per-layer files of ``<output_dir>/initial_weights`` in the checkpoint
layer format, each rank converting a share of the layers and reading only their tensors. The
trainer's first placement then loads its layers from there exactly as from a checkpoint tag, and
layers a stage-wise phase does not place are copied from there at every save, so a stackwise run
keeps the source's later stacks. The folder is never taken for a checkpoint (``locate.is_tag_dir``).

Growth (target stacks T > source stacks n, same blocks per stack): ``init_growth: stack`` fills
target stack i from source stack i mod n (G_stack); ``fresh`` gives stacks n..T-1 their seeded
init. Embedding, final norm and LM head always come from the source. With ``growth_init: identity``
the added stacks n..T-1 then get zero residual writers (``growth.zeroed_residual_writers``): the grown
rack computes what the source does.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch

from ..checkpoint.files import CheckpointError, layer_file_name
from ..checkpoint.layers import file_layers, layer_key, rack_name, rack_shapes, read_layer_file, unit_keys, units_of
from ..checkpoint.locate import (
    INITIAL_WEIGHTS_DIR,
    SOURCE_STACKS_FILE,
    is_tag_dir,
    list_tags,
    resolve_checkpoint,
    source_frozen_stacks,
)
from ..config import ConfigError, ModelConfig, StackWiseConfig, TrainingConfig
from ..data import TOKENIZER_FILE, ByteTokenizer, Tokenizer, TokenizerError, load_tokenizer_json, make_tokenizer
from ..data.tokenizer import load_tokenizer_file, parse_tokenizer_json
from ..enums import AttentionType, GrowthInit, GrowthOperator, InitGrowth
from ..growth_order import growth_order
from ..layout import UnitKind
from ..model import build_block
from .growth import zeroed_residual_writers

RESTACK_HINT = "regroup the source's blocks with stackwise-restack SOURCE OUT.safetensors --n-stacks N"


# ----------------------------------------------------------------------------- sources


class CheckpointSource:
    """A run, its checkpoints/ folder or one tag: one file per pipeline layer."""

    def __init__(self, path: str):
        self.ref = resolve_checkpoint(path)
        self.config, self.where = self.ref.config, str(self.ref.path)
        self._cached: tuple[int, dict] | None = None  # (layer, its file): a layer's tensors come in a row

    def tensor(self, name: str) -> torch.Tensor:
        units = units_of(self.config.model)
        layer = next(i for i, unit in enumerate(units) if name.startswith(unit.rack_prefix))
        if self._cached is None or self._cached[0] != layer:
            self._cached = (layer, read_layer_file(self.ref, layer))
        return _present(self._cached[1].get(layer_key(units[layer], name)), name, self.ref.layer_file(layer))

    def tokenizer(self) -> tuple[Tokenizer | None, str]:
        """(the tokenizer the source was trained with, or None when unknown; how to name it in data.tokenizer)."""
        from ..checkpoint.consolidation import tag_tokenizer

        tokenizer = tag_tokenizer(self.ref.path, self.config.data, self.config.model)
        file = self.ref.path / TOKENIZER_FILE
        return tokenizer, str(file) if file.is_file() else "byte"


class ConsolidatedSource:
    """A .safetensors file of stackwise-consolidate, -import-hf or -restack (config in its metadata)."""

    def __init__(self, path: str):
        from ..checkpoint.consolidation import CONFIG_KEY, safetensors_metadata

        self.path, self.where = path, path
        metadata = safetensors_metadata(path)
        if CONFIG_KEY not in metadata:
            raise CheckpointError(f"training.init_from {path} has no '{CONFIG_KEY}' metadata, so its rack is unknown: "
                                  "write it with stackwise-consolidate, stackwise-import-hf or stackwise-restack")
        self.config = StackWiseConfig.from_dict(json.loads(metadata[CONFIG_KEY]))

    def tensor(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(self.path, framework="pt") as handle:  # reads this one tensor only
            return _present(handle.get_tensor(name) if name in handle.keys() else None, name, self.path)

    def tokenizer(self) -> tuple[Tokenizer | None, str]:
        from ..checkpoint.consolidation import consolidated_tokenizer

        tokenizer = consolidated_tokenizer(Path(self.path), self.config.data, self.config.model)
        spec = "byte" if isinstance(tokenizer, ByteTokenizer) else \
            f"a tokenizer.json of the one in {self.path}'s metadata (stackwise-export-hf writes it)"
        return tokenizer, spec


class HFSource:
    """A local save_pretrained folder of a LlamaForCausalLM, its layers cut into stacks of ``blocks_per_stack``."""

    def __init__(self, path: str, blocks_per_stack: int):
        from ..checkpoint.hf import config_from_llama, rack_to_llama_names, read_hf_config

        self.dir, self.where = Path(path), path
        raw = read_hf_config(self.dir)
        n_layers = raw.get("num_hidden_layers", 0)
        if n_layers % blocks_per_stack:
            raise ConfigError(f"training.init_from {path}: its {n_layers} layers do not split into stacks of "
                              f"model.architecture.blocks_per_stack ({blocks_per_stack}) blocks: use a "
                              f"blocks_per_stack that divides {n_layers}")
        self.config = config_from_llama(raw, n_layers // blocks_per_stack)
        self.names = rack_to_llama_names(self.config.model)
        self.files = _hf_weight_files(self.dir)

    def tensor(self, name: str) -> torch.Tensor:
        theirs = self.names[name]
        file = self.files.get(theirs, self.files.get(None))
        if file is None:
            return _present(None, theirs, self.dir)
        if file.suffix == ".bin":
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            return _present(state.get(theirs), theirs, file)
        from safetensors import safe_open

        with safe_open(str(file), framework="pt") as handle:
            return _present(handle.get_tensor(theirs) if theirs in handle.keys() else None, theirs, file)

    def tokenizer(self) -> tuple[Tokenizer | None, str]:
        if not (self.dir / TOKENIZER_FILE).is_file():
            return None, str(self.dir)
        try:
            return load_tokenizer_file(self.dir), str(self.dir)
        except TokenizerError:
            return None, str(self.dir)  # one this project cannot use (no eos): nothing to compare


def _hf_weight_files(hf_dir: Path) -> dict[str | None, Path]:
    """HF tensor name -> the file holding it (key None: one file holds them all)."""
    single, index = hf_dir / "model.safetensors", hf_dir / "model.safetensors.index.json"
    if single.is_file():
        return {None: single}
    if index.is_file():
        return {name: hf_dir / file for name, file in json.loads(index.read_text())["weight_map"].items()}
    if (hf_dir / "pytorch_model.bin").is_file():
        return {None: hf_dir / "pytorch_model.bin"}
    raise CheckpointError(f"training.init_from {hf_dir} holds no weights (model.safetensors, its index, or "
                          "pytorch_model.bin): save the model with save_pretrained() first")


def _present(tensor: torch.Tensor | None, name: str, where) -> torch.Tensor:
    if tensor is None:
        raise CheckpointError(f"training.init_from: tensor '{name}' is missing from {where}: the file is "
                              "incomplete or was written for another architecture")
    return tensor


ACCEPTED_SOURCES = ("give another run's output dir, its checkpoints/ folder or a tag, a consolidated .safetensors "
                    "file, or a local Hugging Face Llama folder (config.json + weights)")
HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


def open_source(path: str, target: ModelConfig, output_dir: Path):
    """The weights at ``path``, whichever of the accepted forms it is, for a rack of ``target`` (a Hugging Face
    folder is cut into its stacks) in a run writing to ``output_dir`` (which is no source)."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"training.init_from {path} does not exist: {ACCEPTED_SOURCES}")
    if p.suffix == ".safetensors":
        return ConsolidatedSource(path)
    if p.is_file():
        raise CheckpointError(f"training.init_from {path} is a {p.suffix or 'plain'} file, which is not a source: "
                              f"{ACCEPTED_SOURCES} (a layer_XX-model_states.pt file: give its tag folder)")
    if (p / "config.json").is_file() and not (p / "checkpoints").is_dir() and not is_tag_dir(p):
        return HFSource(path, target.architecture.blocks_per_stack)
    check_holds_checkpoint(p, output_dir)
    return CheckpointSource(path)


def check_holds_checkpoint(folder: Path, output_dir: Path) -> None:
    """Say what a folder that is no checkpoint (and no Hugging Face folder) is, instead of 'no tag folder'."""
    if folder.resolve() in (output_dir.resolve(), output_dir.resolve() / "checkpoints"):
        raise CheckpointError(f"training.init_from {folder} is this run's own training.output_dir: init_from starts "
                              "a fresh run from other weights (a run resumes its own checkpoints by itself); "
                              f"{ACCEPTED_SOURCES}")
    if is_tag_dir(folder) or list_tags(folder) or list_tags(folder / "checkpoints"):
        return  # a checkpoint: resolve_checkpoint says what is wrong with it, if anything
    hf_files = [name for name in (*HF_WEIGHT_FILES, "tokenizer.json") if (folder / name).is_file()]
    if hf_files:
        raise CheckpointError(f"training.init_from {folder} holds {', '.join(hf_files)} but no config.json: a Hugging "
                              "Face folder needs its config.json (save_pretrained() writes it)")
    raise CheckpointError(f"training.init_from {folder} holds no checkpoint tag and no Hugging Face config.json: "
                          f"{ACCEPTED_SOURCES}")


# ----------------------------------------------------------------------------- what goes where


StackMap = list  # target stack -> the source stack it starts as (None: its own seeded init)


def target_stacks_by_origin(source: ModelConfig, target: ModelConfig, t: TrainingConfig) -> tuple[list[int], list[int]]:
    """The target stacks that start as a source stack, and those the growth adds (``stack_sources``)."""
    _, added = stack_sources(source.architecture.n_stacks, target.architecture.n_stacks, t)
    return [s for s in range(target.architecture.n_stacks) if s not in added], added


def planned_source_stacks(target: StackWiseConfig) -> list[int]:
    """The stacks ``training.freeze_source`` will freeze, before the run writes its initial weights (for
    ``stackwise-plan``): read from the run's record when it has one, else from the source's config alone."""
    t = target.training
    if not t.freeze_source:
        return []
    if (Path(t.output_dir) / INITIAL_WEIGHTS_DIR / SOURCE_STACKS_FILE).is_file():
        return source_frozen_stacks(Path(t.output_dir), freeze_source=True)
    source = open_source(t.init_from, target.model, Path(t.output_dir))
    return target_stacks_by_origin(source.config.model, target.model, t)[0]


def stack_sources(n_source: int, n_target: int, t: TrainingConfig) -> tuple[StackMap, list[int]]:
    """Where each target stack starts (``init_growth``), and the target stacks the growth adds: 'stack' (stack i
    from source stack i mod n) and 'fresh' add the stacks after the source's; 'interleave' (LLaMA Pro) puts a copy
    after every ``interleave_every``-th source stack, so the source stacks move up and the copies are added."""
    if t.init_growth == InitGrowth.INTERLEAVE:
        order, added = growth_order(n_source, n_target, GrowthOperator.INTERLEAVE, t.interleave_every)
        return order, list(added)
    grown = t.init_growth == InitGrowth.STACK
    return ([s if s < n_source else (s % n_source if grown else None) for s in range(n_target)],
            list(range(n_source, n_target)))


def source_name(target_name: str, sources: StackMap) -> str | None:
    """Rack name of the source tensor for a target tensor (None for a fresh block)."""
    if not target_name.startswith("stacks."):
        return target_name
    _, stack, rest = target_name.split(".", 2)
    src = sources[int(stack)]
    return None if src is None else f"stacks.{src}.{rest}"


def _architecture(model: ModelConfig) -> dict:
    """What fixes the rack's function apart from depth (gqa with n_kv_heads = n_heads is mha)."""
    n_kv = model.n_kv_heads or model.n_heads
    gqa_as_mha = model.attention_type == AttentionType.GQA and n_kv == model.n_heads
    kind = AttentionType.MHA if gqa_as_mha else model.attention_type
    arch = dict(vocab_size=model.vocab_size, d_model=model.d_model, n_heads=model.n_heads, n_kv_heads=n_kv,
                d_ff=model.resolved_d_ff, attention_type=kind, attention_mode=model.attention_mode,
                rope_theta=model.rope_theta, norm_eps=model.norm_eps, tie_embeddings=model.tie_embeddings)
    if kind in (AttentionType.MLA, AttentionType.KERNEL):
        arch[kind] = dataclasses.asdict(getattr(model, kind))
    return arch


def check_compatible(source: ModelConfig, target: ModelConfig, where: str, t: TrainingConfig) -> None:
    """Refuse a source whose blocks cannot fill the target rack, before anything is read."""
    check_depth(source, target, where)
    theirs, ours = _architecture(source), _architecture(target)
    keys = [f"model.{k}: source {theirs.get(k)!r} vs config {ours.get(k)!r}"
            for k in ours if theirs.get(k) != ours.get(k)]
    src_shapes = rack_shapes(source)
    sources, _ = stack_sources(source.architecture.n_stacks, target.architecture.n_stacks, t)
    tensors = []
    for name, shape in rack_shapes(target).items():
        src = source_name(name, sources)
        if src is not None and tuple(src_shapes.get(src, ())) != tuple(shape):
            got = tuple(src_shapes[src]) if src in src_shapes else "absent"
            tensors.append(f"{name}: source {got} vs target {tuple(shape)}")
    if keys or tensors:
        raise ConfigError(f"training.init_from {where} does not fit this rack ({'; '.join(keys[:6])}"
                          f"{'; tensors ' + '; '.join(tensors[:3]) if tensors else ''}): set these model.* keys "
                          "to the source's values")


def check_depth(source: ModelConfig, target: ModelConfig, where: str) -> None:
    """Same blocks per stack, and at least as many stacks as the source."""
    s, t = source.architecture, target.architecture
    shapes = f"the source has {s.n_stacks} stacks x {s.blocks_per_stack} blocks, the config {t.n_stacks} x " \
             f"{t.blocks_per_stack}"
    if s.blocks_per_stack != t.blocks_per_stack:
        raise ConfigError(f"training.init_from {where}: {shapes}; growth keeps the blocks per stack: set "
                          f"model.architecture.blocks_per_stack={s.blocks_per_stack}, or {RESTACK_HINT}")
    if t.n_stacks < s.n_stacks:
        raise ConfigError(f"training.init_from {where}: {shapes}; a rack can only grow from its source: set "
                          f"model.architecture.n_stacks >= {s.n_stacks}, or {RESTACK_HINT}")


# ----------------------------------------------------------------------------- conversion


def layer_state(source, target: ModelConfig, training: TrainingConfig, layer: int) -> dict[str, torch.Tensor]:
    """The layer file of target pipeline layer ``layer`` (module keys -> fp32 tensors): a block of a stack the
    growth adds has its residual writers at zero under growth_init 'identity'."""
    sources, added_stacks = stack_sources(source.config.model.architecture.n_stacks, target.architecture.n_stacks,
                                          training)
    state = _source_layer_state(source, target, training.seed, layer, sources)
    unit = units_of(target)[layer]
    added = unit.kind == UnitKind.BLOCK and unit.stack_id in added_stacks
    return zeroed_residual_writers(state) if added and training.growth_init == GrowthInit.IDENTITY else state


def _source_layer_state(source, target: ModelConfig, seed: int, layer: int,
                        sources: StackMap) -> dict[str, torch.Tensor]:
    """Target pipeline layer ``layer`` as the source (or, for a fresh block, its init under ``seed``) gives it."""
    unit = units_of(target)[layer]
    if unit.kind == UnitKind.BLOCK and sources[unit.stack_id] is None:
        block = build_block(target, unit.stack_id, unit.block_id, seed)
        return {k: v.detach().clone() for k, v in block.state_dict().items()}
    shapes, state = rack_shapes(target), {}
    for key in unit_keys(target, unit):
        name = rack_name(unit, key)
        tensor = source.tensor(source_name(name, sources))
        if tuple(tensor.shape) != tuple(shapes[name]):
            raise ConfigError(f"training.init_from {source.where}: tensor {source_name(name, sources)} has "
                              f"shape {tuple(tensor.shape)} but {name} of this rack needs {tuple(shapes[name])}")
        state[key] = tensor.detach().to(torch.float32).clone()
    return state


def write_initial_weights(source, target: ModelConfig, training: TrainingConfig, out_dir: Path, rank: int = 0,
                          world_size: int = 1) -> list[int]:
    """This rank's share of the layer files of ``out_dir``; returns the layers written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    mine = file_layers(target)[rank::world_size]
    for layer in mine:
        final = out_dir / layer_file_name(layer)
        tmp = final.with_name(final.name + f".tmp{rank}")
        torch.save(layer_state(source, target, training, layer), tmp)
        os.replace(tmp, final)  # a kill mid-write never leaves a half file under the final name
    return mine


def describe_growth(source: ModelConfig, target: ModelConfig, t: TrainingConfig) -> str:
    n_src, n_tgt = source.architecture.n_stacks, target.architecture.n_stacks
    sources, _ = stack_sources(n_src, n_tgt, t)
    plan = ", ".join(f"{i}<-{'init' if src is None else src}" for i, src in enumerate(sources))
    return f"{n_src} -> {n_tgt} stacks (target<-source: {plan})"


# ----------------------------------------------------------------------------- tokenizer


def same_ids(a: Tokenizer, b: Tokenizer) -> bool:
    """Whether every id names the same token in both (what an embedding row means)."""
    def vocab(tokenizer: Tokenizer) -> dict[str, int]:
        return parse_tokenizer_json(tokenizer.to_json(), "tokenizer").get_vocab(with_added_tokens=True)

    return a.to_json() == b.to_json() or vocab(a) == vocab(b)


def describe_tokenizer(tokenizer: Tokenizer) -> str:
    kind = "byte tokenizer" if isinstance(tokenizer, ByteTokenizer) else "tokenizer"
    return f"a {tokenizer.vocab_size}-token {kind}"


def check_source_tokenizer(source_tokenizer: Tokenizer | None, source_spec: str, where: str,
                           run_tokenizer: Tokenizer | None, run_spec: str) -> None:
    """Refuse a source trained with another tokenizer than the run's (its embedding rows would mean other
    tokens); ``run_tokenizer`` None is data.tokenizer 'bpe' before its training: only a byte source is
    known to differ then. A source without a known tokenizer is not checked."""
    if source_tokenizer is None:
        return
    if run_tokenizer is None:
        differs = isinstance(source_tokenizer, ByteTokenizer)
        run_text = "a BPE trained on this run's data"
    else:
        differs = not same_ids(source_tokenizer, run_tokenizer)
        run_text = describe_tokenizer(run_tokenizer)
    if differs:
        raise ConfigError(f"training.init_from {where} was trained with {describe_tokenizer(source_tokenizer)} but "
                          f"data.tokenizer {run_spec!r} is {run_text}: its ids mean other tokens; set "
                          f"data.tokenizer to the source's ({source_spec})")


def check_run_tokenizer(init_dir: Path | None, init_from: str | None, tokenizer: Tokenizer,
                        data_tokenizer: str) -> None:
    """Once the data is built: the run's tokenizer against the source's, saved by :func:`initial_weights`
    (where a data.tokenizer 'bpe' run is checked, its BPE being trained with the data)."""
    saved = None if init_dir is None else init_dir / TOKENIZER_FILE
    if saved is None or not saved.is_file():
        return
    source = load_tokenizer_json(saved.read_text(encoding="utf-8"), str(saved))
    check_source_tokenizer(source, str(saved), str(init_from), tokenizer, data_tokenizer)


def run_tokenizer_before_data(data_tokenizer: str) -> Tokenizer | None:
    """The run's tokenizer when known without its data (None for 'bpe', trained while the data is built)."""
    return None if data_tokenizer == "bpe" else make_tokenizer(data_tokenizer)


def initial_weights(target: StackWiseConfig, out_dir: Path, rank: int = 0, world_size: int = 1) -> str:
    """Check the source of ``training.init_from`` and write this rank's share of ``out_dir``; returns a summary."""
    t = target.training
    source = open_source(t.init_from, target.model, Path(t.output_dir))
    check_compatible(source.config.model, target.model, source.where, t)
    source_tokenizer, source_spec = source.tokenizer()
    check_source_tokenizer(source_tokenizer, source_spec, source.where,
                           run_tokenizer_before_data(target.data.tokenizer), target.data.tokenizer)
    write_initial_weights(source, target.model, t, out_dir, rank, world_size)
    if rank == 0:
        sources, added = target_stacks_by_origin(source.config.model, target.model, t)
        (out_dir / SOURCE_STACKS_FILE).write_text(json.dumps({"source_stacks": sources, "added_stacks": added}))
    if rank == 0:  # for check_run_tokenizer once a 'bpe' is trained (none from an earlier attempt stays)
        (out_dir / TOKENIZER_FILE).unlink(missing_ok=True)
        if source_tokenizer is not None:
            source_tokenizer.save(out_dir / TOKENIZER_FILE)
    zeroed = t.growth_init == GrowthInit.IDENTITY and target.model.architecture.n_stacks > \
        source.config.model.architecture.n_stacks
    return (f"initial weights from {source.where}: {describe_growth(source.config.model, target.model, t)}"
            + (", the added stacks' o_proj and down_proj zeroed (growth_init identity)" if zeroed else ""))


def prepare_initial_weights(config: StackWiseConfig, output_dir: Path, rank: int, world_size: int) -> Path:
    """Collective: every rank writes its share of ``output_dir/initial_weights``; a failure on any rank is
    raised on every rank (no rank left waiting), naming each rank's problem."""
    from ..parallel import distributed

    out_dir = output_dir / INITIAL_WEIGHTS_DIR
    try:
        summary, problem = initial_weights(config, out_dir, rank, world_size), None
    except (ConfigError, CheckpointError, OSError, ValueError) as exc:
        summary, problem = None, f"{type(exc).__name__}: {exc}"
    problems = distributed.all_gather_objects(problem) if world_size > 1 else [problem]
    failed = [(r, text) for r, text in enumerate(problems) if text]
    if failed:  # this rank's own problem when it has one; the others named, never this rank itself
        first, text = (rank, problem) if problem else failed[0]
        text = text.split(": ", 1)[1] if first == rank else f"on rank {first}: {text.split(': ', 1)[1]}"
        others = [str(r) for r, _ in failed if r not in (rank, first)]
        raise ConfigError(text + (f" (also failed on rank(s) {', '.join(others)})" if others else ""))
    distributed.barrier()
    if rank == 0:
        print(f"[stackwise] training.init_from: {summary}, in {out_dir}", flush=True)
    return out_dir
