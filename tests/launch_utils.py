"""Launch real training runs (``deepspeed`` or ``python launch/train.py``) from tests and read their outputs."""

from __future__ import annotations

import glob
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TRAIN = str(REPO / "launch" / "train.py")

# A rack small enough that a 2-process run takes seconds on 2 CPU cores.
TINY = [
    "model.d_model=64", "model.n_heads=4", "model.n_kv_heads=2", "model.max_seq_len=64",
    "data.seq_len=32", "data.max_files=40", "training.micro_batch_size=2",
    "training.gradient_accumulation_steps=2", "training.max_steps=6", "training.eval_interval=3",
    "training.eval_batches=2", "training.warmup_steps=2", "training.progress_bar=false",
    "training.log_interval=2",
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def train_command(n_procs: int, output_dir: Path, overrides: list[str]) -> list[str]:
    sets = [arg for item in [*TINY, f"training.output_dir={output_dir}", *overrides] for arg in ("--set", item)]
    if n_procs == 1:
        return [sys.executable, TRAIN, *sets]
    launcher = str(Path(sys.executable).with_name("deepspeed"))
    return [launcher, "--num_gpus", str(n_procs), "--master_port", str(free_port()), TRAIN, *sets]


def run_training(n_procs: int, output_dir: Path, *overrides: str, expect_ok: bool = True,
                 timeout: int = 400, env: dict | None = None) -> subprocess.CompletedProcess:
    command = train_command(n_procs, output_dir, list(overrides))
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    if expect_ok and result.returncode != 0:
        raise AssertionError(f"training failed ({result.returncode}):\n"
                             f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    if n_procs > 1:  # no run may leave DeepSpeed's ~70 MB per-rank shared-memory buffers in /dev/shm (RAM)
        port = command[command.index("--master_port") + 1]
        leaked = glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{port}_*")
        assert not leaked, f"shared-memory buffers left behind: {leaked}"
    return result


def results(output_dir: Path) -> dict:
    return json.loads((output_dir / "results.json").read_text())


def state(output_dir: Path, tag: str | None = None) -> dict:
    checkpoints = output_dir / "checkpoints"
    tag = tag or (checkpoints / "latest").read_text().strip()
    return json.loads((checkpoints / tag / "stackwise_state.json").read_text())


def layer_state(output_dir: Path, global_step: int, layer: int) -> dict:
    """Pipeline layer ``layer``'s weights in the run's checkpoint of ``global_step``."""
    import torch

    path = output_dir / "checkpoints" / f"step{global_step:08d}" / f"layer_{layer:02d}-model_states.pt"
    return torch.load(path, weights_only=True)


def scalars(output_dir: Path, tag: str) -> list[tuple[int, float]]:
    """A TensorBoard scalar series, read back with tensorboard's own event reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(output_dir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


def relative_close(a: list[float], b: list[float], rtol: float) -> bool:
    return len(a) == len(b) and all(abs(x - y) <= rtol * abs(y) for x, y in zip(a, b, strict=True))


def resumed_copy(run: Path, tmp_path: Path, last_kept_step: int) -> Path:
    """A copy of a finished run's output dir with only the checkpoints up to ``last_kept_step`` (and no
    TensorBoard logs): relaunching on it resumes from that step, as after a kill."""
    out = tmp_path / "resumed"
    shutil.copytree(run, out)
    for tag in (out / "checkpoints").glob("step*"):
        if int(tag.name[4:]) > last_kept_step:
            shutil.rmtree(tag)
    shutil.rmtree(out / "tensorboard")
    return out


def rack_of(config, seed: int | None = None, **kwargs):
    """The seeded Rack of a whole ``StackWiseConfig``: ``build_rack`` of its model at training.seed (or ``seed``)."""
    from stackwise_ds.model import build_rack

    return build_rack(config.model, config.training.seed if seed is None else seed, **kwargs)


def scrambled_rack(cfg, seed: int = 0):
    """The rack of ``cfg`` with large random weights (norms included), so that any tensor put in the wrong place, or a
    block left out, changes the logits."""
    import torch

    rack = rack_of(cfg)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in rack.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.3 + (1.0 if param.dim() == 1 else 0.0))
    return rack.eval()
