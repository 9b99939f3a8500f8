#!/usr/bin/env python
"""Plain PyTorch baseline (no DeepSpeed), run as its own process by ``benchmarks/run.py``.

    python -m benchmarks.plain_torch --values '{"model.d_model": 128, ...}' --steps 20 --out plain.json

1. Trains the same Rack (``build_rack``) on the same micro-batches as the trainer
   (the trainer's own data stream), with AdamW over the same parameter groups, the same LR
   schedule, gradient clipping and loss averaging over micro-batches: the reference the
   trainer's rackwise tokens/s is compared with.
2. Times the pieces a step is made of, on the same shapes: each stack's forward (no_grad) and
   forward+backward, the head's forward+backward, the embedding, a micro-batch fetch and the
   optimizer step over a given set of parameters. From them come the *ideal* step times of a
   stackwise phase (frozen stacks forward only, the active one forward+backward) and of a
   rackwise step.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.common import TORCH_THREADS, build_config, median

# Repetitions of each timed piece; pieces are timed round-robin so a burst of load from
# another process hits all of them alike, and the median drops the bursts.
COMPONENT_REPS = 9
COMPONENT_WARMUP = 2


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=-100)


def adamw(params: list[tuple[str, torch.nn.Parameter]], t) -> torch.optim.AdamW:
    """AdamW with decay on matrices only, as the trainer builds it."""
    decay = [p for _, p in params if p.dim() >= 2]
    no_decay = [p for _, p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": t.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=t.lr, betas=tuple(t.adam_betas), eps=1e-8)


def unique_named_params(module: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in module.named_parameters() if p.requires_grad]  # named_parameters dedups ties


def data_stream(config):
    from stackwise_ds.data import TrainBatchStream
    from stackwise_ds.training.data_setup import load_bundle

    t = config.training
    bundle = load_bundle(config)
    return TrainBatchStream(bundle.train, global_batch_size=t.micro_batch_size * t.gradient_accumulation_steps,
                            micro_batch_size=t.micro_batch_size, dp_rank=0, dp_world_size=1, seed=t.seed)


# ----------------------------------------------------------------------------- 1. the training loop

def train_loop(rack, stream, config, steps: int) -> tuple[list[float], list[float]]:
    """(losses, step seconds) of ``steps`` optimizer steps; a step spans what train_batch spans."""
    from stackwise_ds.training.lr import warmup_cosine

    t = config.training
    params = unique_named_params(rack)
    optimizer = adamw(params, t)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, steps, t.warmup_steps, t.min_lr_ratio))
    gas = t.gradient_accumulation_steps
    losses, seconds = [], []
    for _ in range(steps):
        start = time.perf_counter()
        total = torch.zeros(())
        for _ in range(gas):
            input_ids, labels = next(stream)
            loss = lm_loss(rack(input_ids), labels)
            (loss / gas).backward()  # DeepSpeed scales each micro-batch's loss by 1/gas the same way
            total += loss.detach()
        if t.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_([p for _, p in params], t.grad_clip)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(total / gas))
        seconds.append(time.perf_counter() - start)
    return losses, seconds


# ----------------------------------------------------------------------------- 2. the pieces of a step

def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def component_fns(rack, stream, config) -> dict:
    """Closures that each run one piece of a micro-batch (or an optimizer step) once."""
    input_ids, labels = next(stream)
    with torch.no_grad():
        inputs = [rack.embedding(input_ids)]  # inputs[i] = hidden state entering stack i
        for stack in rack.stacks:
            inputs.append(stack(inputs[-1]))
    upstream = torch.randn_like(inputs[0])
    fns = {"fetch": lambda: next(stream),
           "embed_fwd": lambda: _no_grad(rack.embedding, input_ids),
           "head_fwdbwd": lambda: _head_fwdbwd(rack, inputs[-1], labels)}
    for i, stack in enumerate(rack.stacks):
        fns[f"stack{i}_fwd"] = lambda s=stack, x=inputs[i]: _no_grad(s, x)
        fns[f"stack{i}_fwdbwd"] = lambda s=stack, x=inputs[i]: _fwdbwd(s, x, upstream, input_grad=False)
        fns[f"stack{i}_fwdbwd_inputgrad"] = lambda s=stack, x=inputs[i]: _fwdbwd(s, x, upstream, input_grad=True)
    last = len(rack.stacks) - 1
    fns["opt_all"] = _optimizer_step_fn(unique_named_params(rack), config)
    fns["opt_last_phase"] = _optimizer_step_fn(_last_phase_params(rack, last), config)
    return fns


def _no_grad(module, x):
    with torch.no_grad():
        module(x)


def _fwdbwd(module, x, upstream, input_grad: bool):
    x = x.detach().requires_grad_(input_grad)
    module(x).backward(upstream)
    module.zero_grad(set_to_none=True)


def _head_fwdbwd(rack, hidden, labels):
    hidden = hidden.detach().requires_grad_(True)  # the gradient flows on into the active stack
    lm_loss(rack.lm_head(rack.norm(hidden)), labels).backward()
    rack.zero_grad(set_to_none=True)


def _last_phase_params(rack, last: int) -> list[tuple[str, torch.nn.Parameter]]:
    """What trains in the last stackwise phase: the last stack, the final norm, the (tied) head."""
    keep = (f"stacks.{last}.", "norm.", "lm_head.", "embedding.")
    return [(n, p) for n, p in unique_named_params(rack) if n.startswith(keep)]


def _optimizer_step_fn(params, config):
    """Clip + AdamW step + zero_grad over ``params``, with fixed random gradients."""
    t = config.training
    optimizer = adamw(params, t)
    grads = [torch.randn_like(p) * 1e-3 for _, p in params]

    def step():
        for (_, p), g in zip(params, grads, strict=True):
            p.grad = g.clone()
        torch.nn.utils.clip_grad_norm_([p for _, p in params], t.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def time_components(fns: dict) -> dict[str, float]:
    """Median seconds of each piece, timed round-robin."""
    samples = {name: [] for name in fns}
    for rep in range(COMPONENT_WARMUP + COMPONENT_REPS):
        for name, fn in fns.items():
            seconds = timed(fn)
            if rep >= COMPONENT_WARMUP:
                samples[name].append(seconds)
    return {name: median(values) for name, values in samples.items()}


def ideal_step_times(c: dict[str, float], n_stacks: int, gas: int) -> dict[str, float]:
    """Ideal step seconds assembled from the pieces (the optimizer step counted once per step)."""
    per_micro_common = c["fetch"] + c["embed_fwd"] + c["head_fwdbwd"]
    last = n_stacks - 1
    frozen = sum(c[f"stack{i}_fwd"] for i in range(last))
    stackwise_last = gas * (per_micro_common + frozen + c[f"stack{last}_fwdbwd"]) + c["opt_last_phase"]
    # Rackwise: stack 0's input (the embedding output) needs a gradient too, as do all later ones.
    rack = gas * (per_micro_common + sum(c[f"stack{i}_fwdbwd_inputgrad"] for i in range(n_stacks))) + c["opt_all"]
    return {"stackwise_last_phase": stackwise_last, "rackwise": rack}


# ----------------------------------------------------------------------------- main

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--values", required=True, help="the run's config overrides, as JSON")
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--no-components", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(TORCH_THREADS)
    config = build_config(json.loads(args.values))
    from stackwise_ds.model import build_rack

    rack = build_rack(config.model, config.training.seed)
    stream = data_stream(config)
    losses, seconds = train_loop(rack, stream, config, args.steps)
    out = {"losses": losses, "step_times": seconds, "threads": torch.get_num_threads()}
    if not args.no_components:
        components = time_components(component_fns(rack, stream, config))
        out["components"] = components
        out["ideal"] = ideal_step_times(components, len(rack.stacks), config.training.gradient_accumulation_steps)
    Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
