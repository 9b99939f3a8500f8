"""What every tools/*.py shares: one clear line and exit status 2 for errors a user can fix."""

from __future__ import annotations

import sys
from typing import Callable

from ..config import ConfigError
from ..training.checkpointing import CheckpointError

USER_ERRORS = (CheckpointError, ConfigError, FileNotFoundError, ValueError, PermissionError)


def run_tool(name: str, body: Callable[[], None]) -> int:
    """Run ``body``; a user error becomes ``<name>: error: ...`` on stderr and status 2."""
    try:
        body()
    except USER_ERRORS as exc:
        print(f"{name}: error: {exc}", file=sys.stderr, flush=True)
        return 2
    return 0
