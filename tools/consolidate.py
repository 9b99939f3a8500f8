#!/usr/bin/env python
"""Merge a pipeline checkpoint (any number of stages) into one safetensors file with Rack names.

    python tools/consolidate.py runs/default/checkpoints model.safetensors [--tag step00000300]

The resolved run config and the run's tokenizer (the tag's tokenizer.json) travel in the file's
metadata; load it with ``stackwise_ds.checkpoint.load_rack("model.safetensors")``.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from stackwise_ds.checkpoint.cli import run_tool  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="<output_dir>, <output_dir>/checkpoints or one tag folder")
    parser.add_argument("out", help="output .safetensors file")
    parser.add_argument("--tag", help="tag to read (default: the newest complete one)")
    args = parser.parse_args(argv)

    def body() -> None:
        from stackwise_ds.checkpoint import consolidate

        print(f"wrote {consolidate(args.checkpoint, args.out, args.tag)}")

    return run_tool("consolidate", body)


if __name__ == "__main__":
    sys.exit(main())
