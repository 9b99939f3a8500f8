#!/usr/bin/env python
"""Export a causal mha/gqa rack as a Hugging Face LlamaForCausalLM folder (config.json, model.safetensors,
and the run's tokenizer: tokenizer.json, tokenizer_config.json, generation_config.json).

    python tools/export_hf.py runs/default/checkpoints hf_model/      # or a consolidated .safetensors
    python -c "from transformers import AutoTokenizer, LlamaForCausalLM
    tok = AutoTokenizer.from_pretrained('hf_model'); model = LlamaForCausalLM.from_pretrained('hf_model')
    print(tok.decode(model.generate(**tok('def main(', return_tensors='pt'), max_new_tokens=50)[0]))"

MLA, kernel attention and bidirectional racks have no Llama equivalent and are refused.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from stackwise_ds.checkpoint.cli import run_tool  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="checkpoint (<output_dir>, checkpoints/ or a tag folder) or a .safetensors file")
    parser.add_argument("out_dir", help="folder to write the Hugging Face model into")
    parser.add_argument("--tag", help="checkpoint tag (default: the newest complete one)")
    args = parser.parse_args(argv)

    def body() -> None:
        from stackwise_ds.checkpoint.hf import export_hf

        print(f"wrote {export_hf(args.source, args.out_dir, args.tag)}")

    return run_tool("export_hf", body)


if __name__ == "__main__":
    sys.exit(main())
