#!/usr/bin/env python
"""Regroup a rack's blocks into another number of stacks (same blocks, same function).

    python tools/restack.py runs/stackwise rack_2x4.safetensors --n-stacks 2     # 4 x 2 blocks -> 2 x 4
    python tools/restack.py rack_2x4.safetensors rack_4x2.safetensors --n-stacks 4

The source is a consolidated .safetensors file or a checkpoint (<output_dir>, its checkpoints/
folder or a tag); the output is a consolidated file whose config follows the new grouping. The
total number of blocks must be divisible by --n-stacks. Config keys sized for the old stack count
(parallel.pipeline_stages, training.stack_lr_scale, ...) are changed to fit and listed.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from stackwise_ds.checkpoint.cli import run_tool  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help=".safetensors file, <output_dir>, <output_dir>/checkpoints or one tag folder")
    parser.add_argument("out", help="output .safetensors file")
    parser.add_argument("--n-stacks", type=int, required=True, help="stacks to regroup the blocks into")
    parser.add_argument("--tag", help="checkpoint tag to read (default: the newest complete one)")
    args = parser.parse_args(argv)

    def body() -> None:
        from stackwise_ds.checkpoint.restack import restack

        path, changes = restack(args.source, args.out, args.n_stacks, args.tag)
        for change in changes:
            print(f"changed {change}")
        print(f"wrote {path}")

    return run_tool("restack", body)


if __name__ == "__main__":
    sys.exit(main())
