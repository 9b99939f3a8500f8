"""The checkpoint tools' command lines: one ``main`` per console script of pyproject.toml.

    stackwise-inspect       summarise a checkpoint (tags, progress, units, what trained when)
    stackwise-consolidate   merge a pipeline checkpoint into one safetensors file with Rack names
    stackwise-reshard       rewrite a checkpoint for another pipeline layout, optimizer state included
    stackwise-export-hf     export a causal mha/gqa rack as a Hugging Face LlamaForCausalLM folder
    stackwise-import-hf     import a local Llama folder as a consolidated StackWise file
    stackwise-restack       regroup a rack's blocks into another number of stacks
    stackwise-generate      sample text from a trained causal rack
    stackwise-eval          validation loss and perplexity of a trained rack on the data a config describes
    stackwise-plan          what a run would do on N ranks (layouts, memory, predicted cost), before launching it

``tools/<name>.py`` runs the same ``main`` from a checkout. Each ``main`` only parses arguments
and calls one library function through ``run_tool`` (user errors: one line, status 2).
"""

from __future__ import annotations

import argparse
import json
import os
import textwrap
from pathlib import Path

from .checkpoint.cli import run_tool


def _parser(prog: str, description: str) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(prog=prog, description=textwrap.dedent(description).strip(),
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def consolidate_main(argv: list[str] | None = None) -> int:
    parser = _parser("stackwise-consolidate", """
        Merge a pipeline checkpoint (any number of stages) into one safetensors file with Rack names.

            stackwise-consolidate runs/default/checkpoints model.safetensors [--tag step00000300]

        The resolved run config and the run's tokenizer (the tag's tokenizer.json) travel in the file's
        metadata; load it with ``stackwise_ds.checkpoint.load_rack("model.safetensors")``.
        """)
    parser.add_argument("checkpoint", help="<output_dir>, <output_dir>/checkpoints or one tag folder")
    parser.add_argument("out", help="output .safetensors file")
    parser.add_argument("--tag", help="tag to read (default: the newest complete one)")
    args = parser.parse_args(argv)

    def body() -> None:
        from .checkpoint import consolidate

        print(f"wrote {consolidate(args.checkpoint, args.out, args.tag)}")

    return run_tool("consolidate", body)


def export_hf_main(argv: list[str] | None = None) -> int:
    parser = _parser("stackwise-export-hf", """
        Export a causal mha/gqa rack as a Hugging Face LlamaForCausalLM folder (config.json, model.safetensors,
        and the run's tokenizer: tokenizer.json, tokenizer_config.json, generation_config.json).

            stackwise-export-hf runs/default/checkpoints hf_model/      # or a consolidated .safetensors
            python -c "from transformers import AutoTokenizer, LlamaForCausalLM
            tok = AutoTokenizer.from_pretrained('hf_model'); model = LlamaForCausalLM.from_pretrained('hf_model')
            print(tok.decode(model.generate(**tok('def main(', return_tensors='pt'), max_new_tokens=50)[0]))"

        MLA, kernel attention and bidirectional racks have no Llama equivalent and are refused.
        """)
    parser.add_argument("source", help="checkpoint (<output_dir>, checkpoints/ or a tag folder) or a .safetensors file")
    parser.add_argument("out_dir", help="folder to write the Hugging Face model into")
    parser.add_argument("--tag", help="checkpoint tag (default: the newest complete one)")
    args = parser.parse_args(argv)

    def body() -> None:
        from .checkpoint.hf import export_hf

        print(f"wrote {export_hf(args.source, args.out_dir, args.tag)}")

    return run_tool("export_hf", body)


def generate_main(argv: list[str] | None = None) -> int:
    parser = _parser("stackwise-generate", """
        Sample text from a trained causal rack, in the tokenizer it was trained with.

            stackwise-generate runs/default --prompt "def main(" --max-new-tokens 200 --temperature 0.8 --top-k 50

        CHECKPOINT is a checkpoint (<output_dir>, checkpoints/ or a tag folder) or a consolidated
        .safetensors file; the tokenizer comes from the tag's tokenizer.json or the file's metadata
        (--tokenizer PATH for a model that carries none: it is refused without one).
        --temperature 0 samples greedily. Bidirectional (masked-LM) racks are refused.
        """)
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
        from .checkpoint.generate import generate_text

        print(generate_text(args.checkpoint, args.prompt, args.max_new_tokens, args.temperature,
                            args.top_k or None, args.seed, args.tag, args.tokenizer))

    return run_tool("generate", body)


def eval_main(argv: list[str] | None = None) -> int:
    parser = _parser("stackwise-eval", """
        Validation loss and perplexity of a trained rack on the data a config describes.

            stackwise-eval runs/stackwise                               # the run's own validation windows
            stackwise-eval rack.safetensors --config other.yaml --json  # e.g. data.source text_files, data.paths
            deepspeed --num_gpus 4 tools/eval.py runs/stackwise --config other.yaml   # a share of windows per rank

        MODEL is a run (<output_dir>, checkpoints/ or a tag folder) or a consolidated .safetensors file. The
        config is MODEL's own with the --config file's keys, then --set, on top (its model section cannot
        change). The windows are those training validates on: the first training.eval_batches micro-batches
        of training.micro_batch_size windows of the validation split of config.data (its seed, val_fraction,
        seq_len), tokenised with the model's tokenizer; the loss is the trainer's validation loss.
        """)
    parser.add_argument("model", help="run dir, checkpoints/ or tag folder, or a consolidated .safetensors file")
    parser.add_argument("--config", help="YAML whose keys go on top of the model's config (default: none, i.e. "
                                         "the run's own data)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config key, e.g. --set training.eval_batches=64 (repeatable)")
    parser.add_argument("--tag", help="checkpoint tag (default: the newest complete one)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="weights and activations (the loss is always fp32); default float32")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # from the deepspeed launcher
    args = parser.parse_args(argv)

    def body() -> None:
        import torch

        from .checkpoint.evaluation import evaluate

        result = evaluate(args.model, args.config, args.overrides, args.tag, getattr(torch, args.dtype))
        if os.environ.get("RANK", "0") == "0":
            print(json.dumps(result.to_dict()) if args.json else result.line(), flush=True)

    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    code = run_tool(f"eval (rank {os.environ['RANK']})" if launched else "eval", body)
    if launched:  # leave without tearing down the process group (see exit_process)
        from .parallel.distributed import exit_process

        exit_process(code)
    return code


def import_hf_main(argv: list[str] | None = None) -> int:
    parser = _parser("stackwise-import-hf", """
        Import a local Llama-architecture model folder (save_pretrained) as a consolidated StackWise file.

            stackwise-import-hf path/to/llama_dir rack.safetensors [--n-stacks 4]

        The model's layers are split into --n-stacks stacks of equal size (it must divide the layer count).
        The folder's tokenizer.json (if any) travels in the output's metadata, so stackwise-generate and a
        later export use it. Nothing is downloaded: pass a folder that is already on disk.
        """)
    parser.add_argument("hf_dir", help="local folder with config.json and model.safetensors")
    parser.add_argument("out", help="output .safetensors file")
    parser.add_argument("--n-stacks", type=int, default=1, help="stacks to split the layers into (default 1)")
    args = parser.parse_args(argv)

    def body() -> None:
        from .checkpoint.hf import import_hf

        print(f"wrote {import_hf(args.hf_dir, args.out, args.n_stacks)}")

    return run_tool("import_hf", body)


def inspect_main(argv: list[str] | None = None) -> int:
    parser = _parser("stackwise-inspect", """
        Summarise a checkpoint: its tags (complete or not), progress, the rack's units and what trained when.

            stackwise-inspect runs/default [--tag step00000150]
        """)
    parser.add_argument("checkpoint", help="<output_dir>, <output_dir>/checkpoints or one tag folder")
    parser.add_argument("--tag", help="tag to describe (default: the newest complete one)")
    args = parser.parse_args(argv)

    def body() -> None:
        from .checkpoint.summary import describe

        print(describe(args.checkpoint, args.tag))

    return run_tool("inspect_checkpoint", body)


def reshard_main(argv: list[str] | None = None) -> int:
    parser = _parser("stackwise-reshard", """
        Rewrite a checkpoint for another pipeline layout, optimizer state included.

            stackwise-reshard runs/a/checkpoints runs/a_pp1 --pipeline-stages 1 [--data-parallel 2] [--tag TAG]

        OUT_DIR becomes a new output_dir (config.yaml + checkpoints/<tag>); resume there with
        ``training.output_dir=OUT_DIR parallel.pipeline_stages=M`` on M x D processes. Supports ZeRO-1
        checkpoints (the default parallel.zero_stage); gradient_accumulation_steps is rescaled so the
        global batch stays the same when the data-parallel degree changes.
        """)
    parser.add_argument("checkpoint", help="<output_dir>, <output_dir>/checkpoints or one tag folder")
    parser.add_argument("out_dir", help="new output_dir to write (must not hold this tag yet)")
    parser.add_argument("--pipeline-stages", type=int, required=True, help="pipeline stages of the new layout")
    parser.add_argument("--data-parallel", type=int, default=1, help="data-parallel replicas per stage (default 1)")
    parser.add_argument("--tag", help="tag to reshard (default: the newest complete one)")
    args = parser.parse_args(argv)

    def body() -> None:
        from .checkpoint.resharding import reshard

        target = reshard(args.checkpoint, args.out_dir, args.pipeline_stages, args.data_parallel, args.tag)
        world = args.pipeline_stages * args.data_parallel
        print(f"wrote {target}; resume with: deepspeed --num_gpus {world} launch/train.py --config "
              f"{Path(args.out_dir) / 'config.yaml'}")

    return run_tool("reshard", body)


def restack_main(argv: list[str] | None = None) -> int:
    parser = _parser("stackwise-restack", """
        Regroup a rack's blocks into another number of stacks (same blocks, same function).

            stackwise-restack runs/stackwise rack_2x4.safetensors --n-stacks 2     # 4 x 2 blocks -> 2 x 4
            stackwise-restack rack_2x4.safetensors rack_4x2.safetensors --n-stacks 4

        The source is a consolidated .safetensors file or a checkpoint (<output_dir>, its checkpoints/
        folder or a tag); the output is a consolidated file whose config follows the new grouping. The
        total number of blocks must be divisible by --n-stacks. Config keys sized for the old stack count
        (parallel.pipeline_stages, training.stack_lr_scale, ...) are changed to fit and listed.
        """)
    parser.add_argument("source", help=".safetensors file, <output_dir>, <output_dir>/checkpoints or one tag folder")
    parser.add_argument("out", help="output .safetensors file")
    parser.add_argument("--n-stacks", type=int, required=True, help="stacks to regroup the blocks into")
    parser.add_argument("--tag", help="checkpoint tag to read (default: the newest complete one)")
    args = parser.parse_args(argv)

    def body() -> None:
        from .checkpoint.restack import restack

        path, changes = restack(args.source, args.out, args.n_stacks, args.tag)
        for change in changes:
            print(f"changed {change}")
        print(f"wrote {path}")

    return run_tool("restack", body)


def plan_main(argv: list[str] | None = None) -> int:
    from .plan import main  # its own argument handling: launch/train.py's config arguments, no DeepSpeed import

    return main(argv)
