#!/usr/bin/env python
"""Import a local Llama-architecture model folder (save_pretrained) as a consolidated StackWise file.

    python tools/import_hf.py path/to/llama_dir rack.safetensors [--n-stacks 4]

The model's layers are split into --n-stacks stacks of equal size (it must divide the layer count).
The folder's tokenizer.json (if any) travels in the output's metadata, so tools/generate.py and a
later export use it. Nothing is downloaded: pass a folder that is already on disk.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from stackwise_ds.checkpoint.cli import run_tool  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("hf_dir", help="local folder with config.json and model.safetensors")
    parser.add_argument("out", help="output .safetensors file")
    parser.add_argument("--n-stacks", type=int, default=1, help="stacks to split the layers into (default 1)")
    args = parser.parse_args(argv)

    def body() -> None:
        from stackwise_ds.checkpoint.hf import import_hf

        print(f"wrote {import_hf(args.hf_dir, args.out, args.n_stacks)}")

    return run_tool("import_hf", body)


if __name__ == "__main__":
    sys.exit(main())
