#!/usr/bin/env python
"""Sample text from a trained causal rack, in the tokenizer it was trained with.

    python tools/generate.py runs/default --prompt "def main(" --max-new-tokens 200 --temperature 0.8 --top-k 50

CHECKPOINT is a checkpoint (<output_dir>, checkpoints/ or a tag folder) or a consolidated
.safetensors file; the tokenizer comes from the tag's tokenizer.json or the file's metadata
(--tokenizer PATH for a model that carries none: it is refused without one).
--temperature 0 samples greedily. Bidirectional (masked-LM) racks are refused.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from stackwise_ds.checkpoint.cli import run_tool  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="checkpoint folder or consolidated .safetensors file")
    parser.add_argument("--prompt", required=True, help="text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=200, help="tokens to generate at most (default 200)")
    parser.add_argument("--temperature", type=float, default=0.8, help="softmax temperature; 0 = greedy")
    parser.add_argument("--top-k", type=int, default=50, help="sample among the k likeliest tokens (0 = all)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    parser.add_argument("--tag", help="checkpoint tag (default: the newest complete one)")
    parser.add_argument("--tokenizer", help="tokenizer.json (or a folder holding one) for a model that carries "
                                            "no tokenizer, e.g. one imported without it")
    args = parser.parse_args(argv)

    def body() -> None:
        from stackwise_ds.checkpoint.generate import generate_text

        print(generate_text(args.checkpoint, args.prompt, args.max_new_tokens, args.temperature,
                            args.top_k or None, args.seed, args.tag, args.tokenizer))

    return run_tool("generate", body)


if __name__ == "__main__":
    sys.exit(main())
