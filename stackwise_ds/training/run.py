"""The ``launch/train.py`` command: parse arguments, build config, rack and trainer, run.

Errors a user can fix (config, data, checkpoint, launch layout) are printed as one
clear line naming the rank, and the process exits with status 2 (1 for anything
unexpected); under the ``deepspeed`` launcher one failing rank makes the launcher stop
the others, so nothing waits forever in a collective.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback

from ..config import ConfigError, StackWiseConfig
from .checkpointing import CheckpointError

USER_ERRORS = (ConfigError, CheckpointError, FileNotFoundError, ValueError, PermissionError)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="launch/train.py",
        description="Train a Rack (rackwise, stackwise or blockwise) on a DeepSpeed pipeline. "
                    "Run as `deepspeed [--num_gpus N] launch/train.py ...` or `python launch/train.py ...`.")
    parser.add_argument("--config", help="run YAML (default: the built-in defaults, training on the "
                                         "Python standard library's sources)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config key, e.g. --set training.max_steps=50 (repeatable)")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # from the deepspeed launcher
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return parser.parse_args(argv)


def load_config(args: argparse.Namespace) -> StackWiseConfig:
    if args.config:
        return StackWiseConfig.from_yaml(args.config, overrides=args.overrides)
    from ..config import apply_overrides

    return StackWiseConfig.from_dict(apply_overrides({}, args.overrides))


def main(argv: list[str] | None = None) -> int:
    rank = os.environ.get("RANK", "0")
    try:
        args = parse_args(argv)
        config = load_config(args)
        if args.print_config:
            print(json.dumps(config.to_dict(), indent=2))
            return 0
        results = train(config)
    except USER_ERRORS as exc:
        print(f"[stackwise] error on rank {rank}: {exc}", file=sys.stderr, flush=True)
        return 2
    except Exception:  # noqa: BLE001 - report anything else with its traceback, still non-zero
        print(f"[stackwise] unexpected failure on rank {rank}:", file=sys.stderr, flush=True)
        traceback.print_exc()
        return 1
    if rank == "0":
        for phase in results["phases"]:
            print(f"[stackwise] {phase['name']}: train loss {phase['losses'][0]:.4f} -> {phase['losses'][-1]:.4f}, "
                  f"val loss {phase.get('val_loss_before', float('nan')):.4f} -> {phase['val_loss_after']:.4f}",
                  flush=True)
        print(f"[stackwise] outputs in {results['output_dir']}", flush=True)
    return 0


def train(config: StackWiseConfig) -> dict:
    from ..model import create_rack_from_config
    from .trainer import ArchitectureTrainer

    rack = create_rack_from_config(config)
    return ArchitectureTrainer(config).train_architecture(rack)


def exit_main() -> None:
    """Entry point: exit without running interpreter teardown of half-closed process groups."""
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
