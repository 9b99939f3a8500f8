"""The ``launch/train.py`` command: parse arguments, build config, rack and trainer, run.

Errors a user can fix (config, data, checkpoint, launch layout) are printed as one
clear line naming the rank, and the process exits with status 2 (1 for anything
unexpected); under the ``deepspeed`` launcher one failing rank makes the launcher stop
the others, so nothing waits forever in a collective. Only a crash ends with the advice to
re-run and resume: an input error would fail the same way again, on any rank.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback

from ..checkpoint.files import CheckpointError
from ..config import ConfigError, StackWiseConfig
from ..console import VERBOSE_ENV, configure_deepspeed_output, write_line
from ..parallel.watchdog import describe_failed_peers, install_startup_sigterm_handler, record_input_error, resume_hint
from .errors import NonFiniteLossError

USER_ERRORS = (ConfigError, CheckpointError, FileNotFoundError, ValueError, PermissionError, NonFiniteLossError)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="launch/train.py",
        description="Train a Rack (rackwise, stackwise or blockwise) on a DeepSpeed pipeline. "
                    "Run as `deepspeed [--num_gpus N] launch/train.py ...` or `python launch/train.py ...`.")
    add_config_arguments(parser)
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # from the deepspeed launcher
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--verbose", action="store_true",
                        help=f"also show DeepSpeed's own INFO lines and prints (or set {VERBOSE_ENV}=1)")
    return parser.parse_args(argv)


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """--config and --set, as launch/train.py and stackwise-plan take them."""
    parser.add_argument("--config", help="run YAML (default: the built-in defaults, training on the "
                                         "Python standard library's sources)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config key, e.g. --set training.max_steps=50 (repeatable)")


def load_config(args: argparse.Namespace) -> StackWiseConfig:
    if args.config:
        return StackWiseConfig.from_yaml(args.config, overrides=args.overrides)
    from ..config import apply_overrides

    return StackWiseConfig.from_dict(apply_overrides({}, args.overrides))


def main(argv: list[str] | None = None) -> int:
    rank = os.environ.get("RANK", "0")
    install_startup_sigterm_handler(int(rank))
    try:
        args = parse_args(argv)
        if args.verbose:
            os.environ[VERBOSE_ENV] = "1"
        config = load_config(args)
        if args.print_config:
            print(json.dumps(config.to_dict(), indent=2))
            return 0
        results = train(config)
    except USER_ERRORS as exc:
        record_input_error()
        write_line(f"[stackwise] error on rank {rank}: {exc}", sys.stderr)
        return 2
    except Exception as exc:  # report anything else with its traceback, still non-zero
        traceback.print_exc()
        peers = describe_failed_peers()
        if peers:  # a collective failed because a peer died: say which one, not only what broke here
            write_line(f"[stackwise] rank {rank}: stopping because a peer failed: {peers} ({type(exc).__name__} "
                       f"in a collective).{resume_hint(peers)}", sys.stderr)
        else:
            write_line(f"[stackwise] unexpected failure on rank {rank}: {type(exc).__name__}: {exc}", sys.stderr)
        return 1
    if rank == "0":
        from .metrics import format_loss

        for phase in results["phases"]:
            losses = phase["losses"]  # empty when a resume found the phase's (shortened) budget already spent
            trained = f"train loss {losses[0]:.4f} -> {losses[-1]:.4f}" if losses else "no steps left to train"
            print(f"[stackwise] {phase['name']}: {trained}, "
                  f"val loss {format_loss(phase.get('val_loss_before'))} -> {format_loss(phase['val_loss_after'])}",
                  flush=True)
        print(f"[stackwise] outputs in {results['output_dir']}", flush=True)
    return 0


def train(config: StackWiseConfig) -> dict:
    configure_deepspeed_output()  # before the trainer imports DeepSpeed
    from .trainer import ArchitectureTrainer

    return ArchitectureTrainer(config).train_architecture()  # each rank builds its own stage only


def exit_main() -> None:
    """Entry point: exit without running interpreter teardown of half-closed process groups."""
    from ..parallel.distributed import exit_process

    exit_process(main())
