"""Worker for tests/test_tools.py: ``deepspeed --num_gpus N tests/_tools_worker.py SPEC.json``.

Trains a tiny Rack on our pipeline with the trainer's engine (``build_engine``: its AdamW
parameter groups, a LambdaLR schedule, ZeRO and clipping from ``build_ds_config``), optionally resumes from a
checkpoint, saves one as the trainer does (DeepSpeed files, then ``mark_complete`` on rank 0),
and writes what the test asserts on to ``spec["result"]`` (JSON, rank 0) and, when asked,
the logits of a fixed batch to ``spec["logits"]`` (torch file, last stage).

Data is a pure function of the global step, split over data-parallel ranks and micro-batches,
so runs with different layouts see the same global batches.
"""

from __future__ import annotations

import json
import sys
from functools import partial
from pathlib import Path

import torch

from stackwise_ds.checkpoint.files import TrainingState, mark_complete
from stackwise_ds.checkpoint.layers import units_of
from stackwise_ds.config import StackWiseConfig
from stackwise_ds.layout import TRAIN
from stackwise_ds.model import build_rack
from stackwise_ds.parallel.distributed import barrier, exit_process, init_distributed
from stackwise_ds.parallel.ds_config import build_ds_config
from stackwise_ds.parallel.engine import build_engine
from stackwise_ds.parallel.pipe import rack_to_pipeline
from stackwise_ds.placement import layout_for
from stackwise_ds.training.optim import make_optimizer

GLOBAL_BATCH, MICRO = 4, 2


def global_batch(step: int, vocab: int, seq_len: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1000 + step)
    return torch.randint(0, vocab, (GLOBAL_BATCH, seq_len + 1), generator=generator)


def step_micro_batches(step: int, dp_rank: int, gas: int, vocab: int, seq_len: int):
    rows = global_batch(step, vocab, seq_len)
    for i in range(gas):
        chunk = rows[(dp_rank * gas + i) * MICRO:(dp_rank * gas + i + 1) * MICRO]
        yield chunk[:, :-1].contiguous(), chunk[:, 1:].contiguous()


def build(spec: dict, world_size: int):
    stages = spec["stages"]
    dp = world_size // stages
    raw = json.loads(json.dumps(spec["config"]))
    raw.setdefault("parallel", {})["pipeline_stages"] = stages
    raw.setdefault("training", {}).update(micro_batch_size=MICRO,
                                          gradient_accumulation_steps=GLOBAL_BATCH // MICRO // dp)
    config = StackWiseConfig.from_dict(raw)
    rack = build_rack(config.model, config.training.seed)
    roles = [TRAIN] * len(units_of(config.model))
    pipe = rack_to_pipeline(rack, layout_for(roles, config, world_size, False, elastic=False),
                            world_size)
    # The trainer's own engine and optimizer factory (rackwise: every layer trains): its parameter
    # groups, split to equal counts across stages, are what reshard must reproduce.
    engine = build_engine(pipe, build_ds_config(config.training, config.parallel, dp), None,
                          partial(make_optimizer, training=config.training, units=pipe.units),
                          lr_lambda=lambda step: min(1.0, (step + 1) / 3))
    return config, engine, dp


def train(engine, config: StackWiseConfig, dp: int, steps: int) -> list[float]:
    vocab, seq_len = config.model.vocab_size, config.data.seq_len
    dp_rank = engine.grid.get_data_parallel_rank()
    losses = []
    for _ in range(steps):
        data = step_micro_batches(engine.global_steps, dp_rank, GLOBAL_BATCH // MICRO // dp, vocab, seq_len)
        losses.append(float(engine.train_batch(data)))
    return losses


def save(engine, config: StackWiseConfig, spec: dict, rank: int) -> None:
    output_dir = Path(spec["output_dir"])
    checkpoints = output_dir / "checkpoints"
    tag = spec["save_tag"]
    engine.save_checkpoint(str(checkpoints), tag=tag, save_latest=False)
    barrier()
    if rank == 0:
        config.to_yaml(output_dir / "config.yaml")
        state = TrainingState(phase_index=0, phase_step=engine.global_steps, global_step=engine.global_steps,
                              consumed_samples=engine.global_steps * GLOBAL_BATCH,
                              training_architecture=config.training.training_architecture, config=config.to_dict())
        mark_complete(checkpoints, tag, state)
    barrier()


def save_logits(engine, config: StackWiseConfig, path: str) -> None:
    ids = global_batch(10_000, config.model.vocab_size, config.data.seq_len)[:MICRO]
    _, logits = engine.eval_batch(iter([(ids[:, :-1], ids[:, 1:])]), return_logits=True, num_micro_batches=1)
    if engine.is_last_stage() and engine.grid.get_data_parallel_rank() == 0:
        torch.save({"input_ids": ids[:, :-1], "logits": logits.detach().float()}, path)


def main() -> None:
    spec = json.loads(Path(sys.argv[-1]).read_text())
    rank, world_size = init_distributed()
    config, engine, dp = build(spec, world_size)
    if spec.get("load_dir"):
        engine.load_checkpoint(spec["load_dir"], tag=spec["load_tag"],
                               load_optimizer_states=spec.get("load_optimizer", True),
                               load_lr_scheduler_states=spec.get("load_optimizer", True))
    result = {"start_step": engine.global_steps, "losses": train(engine, config, dp, spec.get("train_steps", 0))}
    if spec.get("save_tag"):
        save(engine, config, spec, rank)
    if spec.get("logits"):
        save_logits(engine, config, spec["logits"])
    result["continued"] = train(engine, config, dp, spec.get("continue_steps", 0))
    if rank == 0:
        Path(spec["result"]).write_text(json.dumps(result))
    barrier()  # every rank is done with every collective
    exit_process(0)  # as launch/train.py leaves: no interpreter teardown of gloo's threads


if __name__ == "__main__":
    main()
