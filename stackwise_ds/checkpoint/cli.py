"""What every tools/*.py shares: one clear line and exit status 2 for errors a user can fix."""

from __future__ import annotations

import contextlib
import sys
from typing import Callable

from ..config import ConfigError
from .files import CheckpointError

USER_ERRORS = (CheckpointError, ConfigError, FileNotFoundError, ValueError, PermissionError)


def run_tool(name: str, body: Callable[[], None]) -> int:
    """Run ``body``; a user error becomes ``<name>: error: ...`` on stderr and status 2."""
    _import_deepspeed_logging_to_stderr()
    try:
        body()
    except USER_ERRORS as exc:
        print(f"{name}: error: {exc}", file=sys.stderr, flush=True)
        return 2
    return 0


def _import_deepspeed_logging_to_stderr() -> None:
    """Keep stdout for the tool's output: DeepSpeed's log handler binds to sys.stdout as it is at
    import time (its CPU-accelerator warning would otherwise start every tool's output)."""
    if "deepspeed" in sys.modules:
        return
    with contextlib.redirect_stdout(sys.stderr):
        import deepspeed  # noqa: F401 - imported for its side effect: its log handler binds to stderr now
