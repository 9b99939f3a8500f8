#!/usr/bin/env python
"""Run ``launch/train.py`` pinned to one CPU core per rank, one torch thread per process.

    BENCH_CORES=0,1 deepspeed --num_gpus 2 benchmarks/pinned.py --set ...
    BENCH_CORES=0   python benchmarks/pinned.py --set ...

Rank ``LOCAL_RANK`` (0 without a launcher) runs on core ``BENCH_CORES[LOCAL_RANK]``. The
affinity and thread count are set before torch is imported, so every thread torch or
DeepSpeed starts inherits them. (``deepspeed --bind_cores_to_rank`` does the same through
numactl, which this machine does not have.)
"""

import os
import runpy
import sys
from pathlib import Path

TRAIN = Path(__file__).resolve().parents[1] / "launch" / "train.py"


def pin() -> None:
    cores = [int(c) for c in os.environ.get("BENCH_CORES", "0").split(",")]
    rank = int(os.environ.get("LOCAL_RANK", "0"))
    os.sched_setaffinity(0, {cores[rank % len(cores)]})
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["MKL_NUM_THREADS"] = "1"


if __name__ == "__main__":
    pin()
    sys.argv = [str(TRAIN), *sys.argv[1:]]
    runpy.run_path(str(TRAIN), run_name="__main__")
