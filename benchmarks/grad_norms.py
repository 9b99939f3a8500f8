#!/usr/bin/env python
"""What the per-layer gradient norms cost a training step on CPU (issue 27: they are read every log_interval steps).

    python -m benchmarks.grad_norms --label before   # ~2 min on an idle core; merges into results/grad_norms.json
    python -m benchmarks.grad_norms --label after

Two figures per label:

* ``step``: a one-process rackwise run of the benchmark rack (``common.MODEL``, 4 stacks x 2 blocks) for ``STEPS``
  steps with ``training.log_interval`` 10; the median ``train/step_time_s`` after the first ``WARMUP`` steps,
  and the mean of the steps that log (every 10th) beside the mean of those that do not;
* ``norms_ms``: the norm computation alone on that rack's gradients (every block, norm and head parameter, one
  process, one thread), timed both ways: ``per_layer_float`` (the former code: one sum of squares per layer, one
  ``float()`` host read each) and ``foreach_one_read`` (``torch._foreach_norm`` over every gradient, one host read
  for all layers, what ``StageWiseEngine`` runs on a log step now).

On CPU ``float()`` costs no device synchronisation, so the per-step saving is small here; on a GPU each ``float()``
waits for the whole step's queued kernels (and every step paid it), which is the point of the change.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

from benchmarks.common import DEFAULT_WORK_DIR, MODEL, RESULTS_DIR, launch, median, read_scalars, write_labelled

STEPS, WARMUP, LOG_INTERVAL = 60, 5, 10
RUN = {**MODEL, "training.training_architecture": "rackwise", "training.max_steps": STEPS,
       "training.log_interval": LOG_INTERVAL, "training.eval_interval": 0, "training.save_interval": 0,
       "training.warmup_steps": 2, "parallel.pipeline_stages": 1, "data.max_bytes": 2_000_000}


def step_figures(work: Path) -> dict:
    out = work / "grad_norms_run"
    shutil.rmtree(out, ignore_errors=True)  # a fresh run, never a resume of the last one
    launch({**RUN, "training.output_dir": str(out)})
    times = {step: value for step, value, _ in read_scalars(out, "train/step_time_s") if step > WARMUP}
    logging = [t for step, t in times.items() if step % LOG_INTERVAL == 0]
    quiet = [t for step, t in times.items() if step % LOG_INTERVAL]
    return {"median_step_s": round(median(list(times.values())), 5), "steps": len(times),
            "mean_log_step_s": round(sum(logging) / len(logging), 5),
            "mean_other_step_s": round(sum(quiet) / len(quiet), 5)}


def rack_gradients() -> list[list]:
    """Per pipeline layer (blocks, norm, head), the gradients of one backward of the benchmark rack."""
    import torch

    from benchmarks.common import build_config
    from stackwise_ds.model import build_rack

    torch.manual_seed(0)
    config = build_config(RUN)
    rack = build_rack(config.model, config.training.seed)
    tokens = torch.randint(0, config.model.vocab_size, (8, config.data.seq_len + 1))
    logits = rack(tokens[:, :-1])
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
    layers = [list(block.parameters()) for stack in rack.stacks for block in stack.blocks]
    layers += [list(rack.norm.parameters()), list(rack.embedding.parameters())]
    return [[p.grad for p in layer] for layer in layers]


def per_layer_float(layers) -> list[float]:
    return [float(sum(g.detach().float().pow(2).sum() for g in grads)) ** 0.5 for grads in layers]


def foreach_one_read(layers) -> list[float]:
    import torch

    flat = [g.detach() for grads in layers for g in grads]
    norms = torch._foreach_norm(flat)
    sizes = [len(grads) for grads in layers]
    per_layer = torch.stack([torch.stack(chunk).float().pow(2).sum() for chunk in _split(norms, sizes)]).sqrt()
    return per_layer.tolist()


def _split(items, sizes):
    start = 0
    for size in sizes:
        yield items[start:start + size]
        start += size


def norms_figures(repeats: int = 200) -> dict:
    import torch

    torch.set_num_threads(1)
    layers = rack_gradients()
    old, new = per_layer_float(layers), foreach_one_read(layers)
    assert all(abs(a - b) <= 1e-4 * max(a, 1e-12) for a, b in zip(old, new, strict=True)), (old, new)
    figures = {"layers": len(layers), "tensors": sum(len(grads) for grads in layers)}
    for fn in (per_layer_float, foreach_one_read):
        fn(layers)
        start = time.perf_counter()
        for _ in range(repeats):
            fn(layers)
        figures[f"{fn.__name__}_ms"] = round((time.perf_counter() - start) / repeats * 1e3, 4)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--label", required=True, help="e.g. before / after (the key the figures are kept under)")
    parser.add_argument("--work-dir", type=Path, default=DEFAULT_WORK_DIR)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "grad_norms.json")
    args = parser.parse_args()
    record = {"measured_at": time.strftime("%Y-%m-%d %H:%M:%S"), "step": step_figures(args.work_dir),
              "norms_ms": norms_figures()}
    write_labelled(args.out, args.label, record)


if __name__ == "__main__":
    main()
