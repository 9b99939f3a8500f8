#!/usr/bin/env python
"""Summarise a checkpoint: its tags (complete or not), progress, the rack's units and what trained when.

    python tools/inspect_checkpoint.py runs/default [--tag step00000150]
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from stackwise_ds.checkpoint.cli import run_tool  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="<output_dir>, <output_dir>/checkpoints or one tag folder")
    parser.add_argument("--tag", help="tag to describe (default: the newest complete one)")
    args = parser.parse_args(argv)

    def body() -> None:
        from stackwise_ds.checkpoint.summary import describe

        print(describe(args.checkpoint, args.tag))

    return run_tool("inspect_checkpoint", body)


if __name__ == "__main__":
    sys.exit(main())
