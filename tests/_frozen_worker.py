"""Worker for tests/test_frozen_engine.py: ``deepspeed --num_gpus N _frozen_worker.py GROUP OUT [CKPT_DIR]``.

Each scenario builds small pipelines with the structure pipe.py gives a Rack (tied embedding
-> Linear "blocks" -> RMSNorm -> tied LM head, explicit stage boundaries), trains them with
``build_engine`` and records facts; rank 0 writes them to ``OUT`` (JSON) for the test to assert.
Set ``SW_DEBUG=<seconds>`` to dump every rank's stack when a run hangs.
"""

from __future__ import annotations

import json
import os
import sys

import deepspeed
import torch
import torch.distributed as tdist
import torch.nn.functional as F
from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec
from deepspeed.runtime.pipe.topology import PipeDataParallelTopology
from torch import nn

from stackwise_ds.parallel.distributed import barrier, exit_process, init_distributed
from stackwise_ds.parallel.engine import build_engine
from stackwise_ds.parallel.roles import DORMANT, FROZEN, TRAIN

VOCAB, DIM, SEQ, MICRO = 48, 16, 8, 2
TIED = "tied_modules.embed.embedding.weight"


# ----------------------------------------------------------------------------- model

class EmbeddingPipe(nn.Module):
    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(VOCAB, DIM)

    def forward(self, ids):
        return self.embedding(ids)


def tied_head(embed: EmbeddingPipe, hidden):
    return F.linear(hidden, embed.embedding.weight)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(DIM, DIM)

    def forward(self, x):
        return x + torch.tanh(self.lin(x))


class Norm(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.RMSNorm(DIM)

    def forward(self, x):
        return self.norm(x)


def lm_loss(logits, labels):
    return F.cross_entropy(logits.float().reshape(-1, VOCAB), labels.reshape(-1))


class PartsPipe(PipelineModule):
    """PipelineModule split at explicit layer boundaries (as pipe.py splits at stack boundaries)."""

    def __init__(self, *args, parts, **kwargs):
        self.explicit_parts = list(parts)
        super().__init__(*args, **kwargs)

    def _partition_layers(self, method="uniform"):
        self.parts = list(self.explicit_parts)
        stage = self._topo.get_coord(self.global_rank).pipe
        self._set_bounds(start=self.parts[stage], stop=self.parts[stage + 1])


def make_pipe(n_blocks: int, parts: list[int], dp: int = 1) -> PartsPipe:
    layers = [TiedLayerSpec("embed", EmbeddingPipe, tied_weight_attr="embedding.weight"),
              *[LayerSpec(Block) for _ in range(n_blocks)], LayerSpec(Norm),
              TiedLayerSpec("embed", EmbeddingPipe, forward_fn=tied_head, tied_weight_attr="embedding.weight")]
    topo = PipeDataParallelTopology(num_pp=len(parts) - 1, num_dp=dp)
    return PartsPipe(layers, topology=topo, loss_fn=lm_loss, parts=parts, seed_layers=True, base_seed=1234)


def roles(n_layers: int, frozen=(), dormant=()) -> dict[int, str]:
    """Layer roles: TRAIN unless listed as frozen or dormant."""
    out = {i: TRAIN for i in range(n_layers)}
    out.update({i: FROZEN for i in frozen})
    out.update({i: DORMANT for i in dormant})
    return out


def ds_config(gas: int = 4, dp: int = 1, zero: int = 1, clip: float = 0.0) -> dict:
    return {"train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": gas,
            "train_batch_size": MICRO * gas * dp, "gradient_clipping": clip,
            "zero_optimization": {"stage": zero}, "steps_per_print": 10**9,
            "pipeline": {"activation_checkpoint_interval": 0}}


LR, WD = 3e-2, 0.01


def adamw(named):
    return torch.optim.AdamW([p for _, p in named], lr=LR, weight_decay=WD)


def batches(seed: int, skip: int = 0):
    """Endless (ids, labels) micro-batches; the label is a fixed function of the token (learnable)."""
    g = torch.Generator().manual_seed(seed)
    for index in iter(int, 1):
        ids = torch.randint(0, VOCAB, (MICRO, SEQ), generator=g)
        if index >= skip:
            yield ids, (ids * 7 + 3) % VOCAB


# ----------------------------------------------------------------------------- observation helpers

def gather(obj):
    out = [None] * tdist.get_world_size()
    tdist.all_gather_object(out, obj)
    return out


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def layer_params_unchanged(before: dict, module: PipelineModule) -> dict[int, bool]:
    """Per local pipeline layer (tied weight excluded): are its parameters bit-identical to ``before``?"""
    now = dict(module.named_parameters())
    out: dict[int, bool] = {}
    for name in before:
        head = name.split(".")[0]
        if head.isdigit():
            out[int(head)] = out.get(int(head), True) and torch.equal(before[name], now[name].detach())
    return out


def tied_weight(module: PipelineModule) -> torch.Tensor:
    return module.tied_modules["embed"].embedding.weight.detach().cpu().clone()


def tied_copies_identical(module: PipelineModule) -> bool:
    """Are the tied copies (first and last stage) of every data-parallel slice bit-identical?"""
    holds = module.stage_id in (0, module.num_stages - 1)
    copies = [w for w in gather(tied_weight(module) if holds else None) if w is not None]
    return len(copies) == 2 * module._grid.data_parallel_size and all(torch.equal(copies[0], w) for w in copies)


def full_state(module: PipelineModule) -> dict[str, torch.Tensor]:
    """The whole pipeline's parameters (data-parallel slice 0), on every rank."""
    mine = {n: p.detach().cpu().clone() for n, p in module.named_parameters()}
    merged: dict[str, torch.Tensor] = {}
    for part in gather(mine if module._grid.data_parallel_id == 0 else {}):
        merged.update(part)
    return merged


class GradWatch:
    """Counts module forwards, forwards whose output required grad, and backward calls through any
    submodule: the last two stay zero on a stage that never builds or runs a backward graph."""

    def __init__(self, module: nn.Module):
        self.forward_calls = self.outputs_requiring_grad = self.backward_calls = 0
        self.handles = []
        for m in module.modules():
            if m is not module:
                self.handles += [m.register_forward_hook(self._on_forward),
                                 m.register_full_backward_hook(self._on_backward)]

    def _on_forward(self, _module, _inputs, output):
        self.forward_calls += 1
        self.outputs_requiring_grad += int(torch.is_tensor(output) and output.requires_grad)

    def _on_backward(self, *_):
        self.backward_calls += 1

    def facts(self) -> dict:
        for h in self.handles:
            h.remove()
        return {"forward_calls": self.forward_calls, "outputs_requiring_grad": self.outputs_requiring_grad,
                "backward_calls": self.backward_calls}


def optimizer_state_tensors(engine) -> int:
    if engine.optimizer is None:
        return 0
    state = engine.optimizer.state_dict()
    state = state.get("base_optimizer_state", state)
    return sum(torch.is_tensor(v) for st in state["state"].values() for v in st.values())


def stage_info(engine) -> dict:
    return {"rank": tdist.get_rank(), "stage": engine.stage_id, "dp": engine.grid.data_parallel_id,
            "stage_role": engine.stage_role, "has_optimizer": engine.optimizer is not None,
            "optimizer_state_tensors": optimizer_state_tensors(engine),
            "instructions": dict(engine.executed_instructions), "global_steps": engine.global_steps,
            "forward_pre_hooks": len(engine.module._forward_pre_hooks)}


# ----------------------------------------------------------------------------- single-process reference

class Reference:
    """The same model in plain torch, one process: frozen layers under no_grad, dormant skipped,
    AdamW over the train layers' parameters (the tied matrix trains through the head)."""

    def __init__(self, state: dict[str, torch.Tensor], n_blocks: int):
        self.embed, self.blocks, self.norm = EmbeddingPipe(), [Block() for _ in range(n_blocks)], Norm()
        modules = {f"{i}.": b for i, b in enumerate(self.blocks, 1)} | {f"{n_blocks + 1}.": self.norm}
        with torch.no_grad():
            self.embed.embedding.weight.copy_(state[TIED])
            for prefix, module in modules.items():
                for name, p in module.named_parameters():
                    p.copy_(state[prefix + name])
        self.layers = [self.embed, *self.blocks, self.norm, lambda h: tied_head(self.embed, h)]

    def params(self, layer_roles: dict[int, str]) -> list[nn.Parameter]:
        train = [m for i, m in enumerate(self.layers[:-1]) if layer_roles[i] == TRAIN]
        params = [p for m in train for p in m.parameters()]
        tied = self.embed.embedding.weight
        head_trains = layer_roles[len(self.layers) - 1] == TRAIN
        return params + ([tied] if head_trains and all(p is not tied for p in params) else [])

    def loss(self, ids, labels, layer_roles):
        x = ids
        for i, layer in enumerate(self.layers):
            if layer_roles[i] == FROZEN:
                with torch.no_grad():
                    x = layer(x)
            elif layer_roles[i] == TRAIN:
                x = layer(x)
        return lm_loss(x, labels)

    def train(self, layer_roles, data, steps: int, gas: int, clip: float) -> tuple[list[float], list[float]]:
        params = self.params(layer_roles)
        opt = torch.optim.AdamW(params, lr=LR, weight_decay=WD)
        losses, norms = [], []
        for _ in range(steps):
            opt.zero_grad()
            total = 0.0
            for _ in range(gas):
                loss = self.loss(*next(data), layer_roles)
                (loss / gas).backward()
                total += loss.item()
            norms.append(float(torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf"))))
            opt.step()
            losses.append(total / gas)
        return losses, norms

    def eval(self, layer_roles, data, gas: int) -> float:
        with torch.no_grad():
            return sum(self.loss(*next(data), layer_roles).item() for _ in range(gas)) / gas


def compare_with_reference(engine, layer_roles, n_blocks: int, steps: int, gas: int, clip: float,
                           seed: int) -> dict:
    """Train ``engine`` and, on rank 0, a Reference from the same start; both losses + eval losses."""
    state = full_state(engine.module)
    pipe_eval = float(engine.eval_batch(batches(seed + 1)))
    data = batches(seed)
    pipe_losses = [float(engine.train_batch(data)) for _ in range(steps)]
    out = {"pipe_losses": pipe_losses, "pipe_eval": pipe_eval}
    if tdist.get_rank() == 0:
        ref = Reference(state, n_blocks)
        out["ref_eval"] = ref.eval(layer_roles, batches(seed + 1), gas)
        out["ref_losses"], out["ref_grad_norms"] = ref.train(layer_roles, batches(seed), steps, gas, clip)
    return out


# ----------------------------------------------------------------------------- scenarios, 2 ranks

def frozen_first_stage(out: dict, _ckpt: str) -> None:
    """2 stages: stage 0 forward-only, stage 1 trains (ZeRO-1, clipping on)."""
    pipe = make_pipe(4, [0, 3, 7])
    watch = GradWatch(pipe)
    before = snapshot(pipe)
    engine = build_engine(pipe, ds_config(clip=1.0), roles(7, frozen=[0, 1, 2]), adamw)
    data = batches(0)
    losses = [float(engine.train_batch(data)) for _ in range(4)]
    info = stage_info(engine) | watch.facts()
    info.update(losses=losses, layers_unchanged=layer_params_unchanged(before, pipe),
                requires_grad=sorted(n for n, p in pipe.named_parameters() if p.requires_grad))
    out["ranks"] = gather(info)
    out["tied_identical"] = tied_copies_identical(pipe)


def two_phases(out: dict, _ckpt: str) -> None:
    """Phase A (stage 0 trains, stage 1 dormant blocks + head), then phase B (stage 0 frozen)."""
    pipe = make_pipe(4, [0, 3, 7])
    data = batches(1)
    start = snapshot(pipe)
    engine = build_engine(pipe, ds_config(clip=1.0), roles(7, dormant=[3, 4]), adamw)
    losses_a = [float(engine.train_batch(data)) for _ in range(3)]
    info_a = stage_info(engine) | {"layers_unchanged": layer_params_unchanged(start, pipe),
                                   "eval": float(engine.eval_batch(batches(9)))}
    tied_a = tied_copies_identical(pipe)
    after_a = snapshot(pipe)
    engine = build_engine(pipe, ds_config(clip=1.0), roles(7, frozen=[0, 1, 2]), adamw)
    losses_b = [float(engine.train_batch(data)) for _ in range(3)]
    info_b = stage_info(engine) | {"layers_unchanged": layer_params_unchanged(after_a, pipe),
                                   "eval": float(engine.eval_batch(batches(9)))}
    out.update(losses_a=losses_a, losses_b=losses_b, phase_a=gather(info_a), phase_b=gather(info_b),
               tied_identical_a=tied_a, tied_identical_b=tied_copies_identical(pipe))


def rackwise_matches_plain(out: dict, _ckpt: str) -> None:
    """layer_roles=None against deepspeed.initialize's PipelineEngine on an identical pipeline."""
    config = ds_config(clip=0.5)
    plain_pipe = make_pipe(4, [0, 3, 7])
    plain, *_ = deepspeed.initialize(model=plain_pipe, optimizer=adamw(plain_pipe.named_parameters()),
                                     config=config)
    data = batches(2)
    plain_losses = [float(plain.train_batch(data)) for _ in range(4)]
    pipe = make_pipe(4, [0, 3, 7])
    engine = build_engine(pipe, config, None, adamw)
    data = batches(2)
    out["plain_losses"] = plain_losses
    out["losses"] = [float(engine.train_batch(data)) for _ in range(4)]
    out["params_equal"] = all(gather(all(torch.equal(a, b) for a, b in
                                         zip(plain_pipe.parameters(), pipe.parameters(), strict=True))))
    out["ranks"] = gather(stage_info(engine))


def clipping_matches_reference(out: dict, _ckpt: str) -> None:
    """2-stage frozen layout with tight clipping vs the single-process reference, ZeRO-1 and plain fp32."""
    variants = {"zero1": ds_config(zero=1, clip=0.05), "zero0": ds_config(zero=0, clip=0.05),
                "zero1_activation_checkpointing": ds_config(zero=1, clip=0.05)}
    variants["zero1_activation_checkpointing"]["pipeline"]["activation_checkpoint_interval"] = 1
    for name, config in variants.items():
        pipe = make_pipe(4, [0, 3, 7])
        layer_roles = roles(7, frozen=[0, 1, 2])
        engine = build_engine(pipe, config, layer_roles, adamw)
        out[name] = compare_with_reference(engine, layer_roles, 4, steps=5, gas=4, clip=0.05, seed=3)
        out[name]["layer_grad_norms"] = gather(engine.layer_grad_norms())
        engine.record_grad_norms = False  # a step that does not log them (the step loop's choice)
        engine.train_batch(batches(5))
        out[name]["quiet_step_grad_norms"] = gather(engine.layer_grad_norms())


def bf16_layouts(out: dict, _ckpt: str) -> None:
    """bf16 weights with fp32 gradient accumulation (the GPU template: DeepSpeed's BF16_Optimizer)."""
    for name, layer_roles in {"frozen": roles(7, frozen=[0, 1, 2]), "phase0": roles(7, dormant=[3, 4]),
                              "rackwise": None}.items():
        config = ds_config(clip=0.05) | {"bf16": {"enabled": True}, "data_types": {"grad_accum_dtype": "fp32"}}
        pipe = make_pipe(4, [0, 3, 7])
        engine = build_engine(pipe, config, layer_roles, adamw)
        losses = [float(engine.train_batch(batches(4))) for _ in range(3)]
        out[name] = {"losses": losses, "tied_identical": tied_copies_identical(pipe),
                     "optimizers": gather(type(engine.optimizer).__name__)}


# ----------------------------------------------------------------------------- scenarios, 3 ranks

def three_stage_phases(out: dict, ckpt: str) -> None:
    """9 layers on 3 stages [0,3) [3,5) [5,9); four phases on one module, each against the reference:
    T-R-T (stage 1 relays, tied grads all-reduced), F-T-T, F-F-T (tied weight owned by the head),
    and T-R-T with a frozen embedding and block inside the first train stage (blockwise)."""
    pipe = make_pipe(6, [0, 3, 5, 9])
    phases = {"train_relay_train": roles(9, dormant=[3, 4, 5, 6]),
              "frozen_train_train": roles(9, frozen=[0, 1, 2], dormant=[5, 6]),
              "frozen_frozen_train": roles(9, frozen=[0, 1, 2, 3, 4]),
              "mixed_relay_train": roles(9, frozen=[0, 1], dormant=[3, 4, 5, 6])}
    saved = None
    for seed, (name, layer_roles) in enumerate(phases.items(), start=10):
        engine = build_engine(pipe, ds_config(clip=0.05), layer_roles, adamw)
        extra = {}
        if saved is not None:  # a new phase resumes from the previous phase's checkpoint
            module_only_load(engine, os.path.join(ckpt, "relay"))
            extra["cross_phase_restored"] = restored(saved, pipe)
            saved = None
        watch = GradWatch(pipe)
        before = snapshot(pipe)
        result = compare_with_reference(engine, layer_roles, 6, steps=4, gas=4, clip=0.05, seed=seed)
        info = stage_info(engine) | watch.facts() | extra | {"layers_unchanged": layer_params_unchanged(before, pipe)}
        if name == "train_relay_train":
            info["checkpoint"], saved = checkpoint_roundtrip(engine, os.path.join(ckpt, "relay"), seed)
        out[name] = result | {"ranks": gather(info), "tied_identical": tied_copies_identical(pipe)}


# ----------------------------------------------------------------------------- scenarios, 4 ranks

def data_parallel_frozen(out: dict, ckpt: str) -> None:
    """2 stages x 2 data-parallel replicas, stage 0 frozen, ZeRO-1 on the train stage, clipping on."""
    pipe = make_pipe(4, [0, 3, 7], dp=2)
    before = snapshot(pipe)
    engine = build_engine(pipe, ds_config(dp=2, clip=0.5), roles(7, frozen=[0, 1, 2]), adamw,
                          lr_lambda=lambda step: 1.0 / (1 + step))
    data = batches(20 + engine.grid.data_parallel_id)  # each replica its own data
    losses = [float(engine.train_batch(data)) for _ in range(3)]
    info = stage_info(engine) | {"losses": losses, "layers_unchanged": layer_params_unchanged(before, pipe),
                                 "lr": None if engine.optimizer is None else engine.get_lr()[0]}
    info["checkpoint"], _ = checkpoint_roundtrip(engine, ckpt, 30 + engine.grid.data_parallel_id)
    info["params"] = {n: p.detach().cpu() for n, p in pipe.named_parameters()}
    ranks = gather(info)
    replicas_equal = all(torch.equal(a["params"][n], b["params"][n]) for a in ranks for b in ranks
                         if a["stage"] == b["stage"] for n in a["params"])
    for r in ranks:
        del r["params"]
    out.update(ranks=ranks, replicas_identical=replicas_equal, tied_identical=tied_copies_identical(pipe))


def checkpoint_roundtrip(engine, directory: str, seed: int) -> tuple[dict, dict]:
    """Save, train 2 steps, load, train the same 2 steps again: same losses and weights iff the
    checkpoint restored weights, optimizer and LR state on every rank (with or without optimizer).
    Then a module-only load (how a new phase resumes) must bring back the saved weights."""
    saved = snapshot(engine.module)
    engine.save_checkpoint(directory, tag="ckpt")
    first = [float(engine.train_batch(batches(seed))) for _ in range(2)]
    weights = snapshot(engine.module)
    engine.load_checkpoint(directory, tag="ckpt")
    again = [float(engine.train_batch(batches(seed))) for _ in range(2)]
    same_weights = all(torch.equal(weights[n], p.detach()) for n, p in engine.module.named_parameters())
    module_only_load(engine, directory)
    files = sorted(os.listdir(os.path.join(directory, "ckpt"))) if tdist.get_rank() == 0 else None
    return {"first": first, "again": again, "same_weights": same_weights, "files": files,
            "module_only_restored": restored(saved, engine.module)}, saved


def module_only_load(engine, directory: str) -> None:
    engine.load_checkpoint(directory, tag="ckpt", load_module_only=True, load_optimizer_states=False,
                           load_lr_scheduler_states=False)


def restored(saved: dict, module: nn.Module) -> bool:
    return all(torch.equal(saved[n], p.detach()) for n, p in module.named_parameters())


GROUPS = {
    "pp2": [frozen_first_stage, two_phases, rackwise_matches_plain, clipping_matches_reference, bf16_layouts],
    "pp3": [three_stage_phases],
    "dp2": [data_parallel_frozen],
}


def main() -> None:
    group, path, ckpt = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    if os.environ.get("SW_DEBUG"):
        import faulthandler
        faulthandler.dump_traceback_later(int(os.environ["SW_DEBUG"]), exit=True)
    init_distributed()  # ours: also unlinks DeepSpeed's /dev/shm buffer names
    results = {}
    for scenario in GROUPS[group]:
        results[scenario.__name__] = out = {}
        scenario(out, ckpt)
    if tdist.get_rank() == 0:
        with open(path, "w") as f:
            json.dump(results, f, indent=1)
    barrier()  # every rank is done with every collective
    exit_process(0)  # as launch/train.py leaves: no interpreter teardown of gloo's threads


if __name__ == "__main__":
    main()
