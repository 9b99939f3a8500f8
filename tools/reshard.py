#!/usr/bin/env python
"""Rewrite a checkpoint for another pipeline layout, optimizer state included.

    python tools/reshard.py runs/a/checkpoints runs/a_pp1 --pipeline-stages 1 [--data-parallel 2] [--tag TAG]

OUT_DIR becomes a new output_dir (config.yaml + checkpoints/<tag>); resume there with
``training.output_dir=OUT_DIR parallel.pipeline_stages=M`` on M x D processes. Supports ZeRO-1
checkpoints (the default parallel.zero_stage); gradient_accumulation_steps is rescaled so the
global batch stays the same when the data-parallel degree changes.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from stackwise_ds.checkpoint.cli import run_tool  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="<output_dir>, <output_dir>/checkpoints or one tag folder")
    parser.add_argument("out_dir", help="new output_dir to write (must not hold this tag yet)")
    parser.add_argument("--pipeline-stages", type=int, required=True, help="pipeline stages of the new layout")
    parser.add_argument("--data-parallel", type=int, default=1, help="data-parallel replicas per stage (default 1)")
    parser.add_argument("--tag", help="tag to reshard (default: the newest complete one)")
    args = parser.parse_args(argv)

    def body() -> None:
        from stackwise_ds.checkpoint.resharding import reshard

        target = reshard(args.checkpoint, args.out_dir, args.pipeline_stages, args.data_parallel, args.tag)
        world = args.pipeline_stages * args.data_parallel
        print(f"wrote {target}; resume with: deepspeed --num_gpus {world} launch/train.py --config "
              f"{Path(args.out_dir) / 'config.yaml'}")

    return run_tool("reshard", body)


if __name__ == "__main__":
    sys.exit(main())
