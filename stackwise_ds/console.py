"""What the ranks print: whole lines, and DeepSpeed's own chatter only when asked for.

A plain run's log is the run's story (layout, phases, losses, checkpoints, the end). DeepSpeed's
INFO lines and prints (``SEED_LAYERS=...``, ``Using topology``, ``... built successfully``) come
back with ``launch/train.py --verbose`` or ``STACKWISE_VERBOSE=1``. No DeepSpeed import here.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import warnings
from collections.abc import Iterator
from typing import TextIO

VERBOSE_ENV = "STACKWISE_VERBOSE"
ACCELERATOR_NOTICE = "Setting accelerator to"


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0", "false")


def human_size(n_bytes: float) -> str:
    """A byte count in the unit that reads best, three figures: '512 B', '64.0 KB', '1.50 GB' (powers of 1024)."""
    if n_bytes < 1024:
        return f"{n_bytes:.0f} B"
    for unit in ("KB", "MB", "GB", "TB"):
        n_bytes /= 1024
        if n_bytes < 1000 or unit == "TB":
            break
    decimals = 2 if n_bytes < 10 else 1 if n_bytes < 100 else 0
    return f"{n_bytes:.{decimals}f} {unit}"


def write_line(text: str, stream: TextIO | None = None) -> None:
    """``text`` as one line in one write: the lines of ranks sharing a terminal or a log file
    never interleave mid-line (``print`` writes the text and the newline separately)."""
    stream = sys.stderr if stream is None else stream
    data = (text.rstrip("\n") + "\n").encode(errors="replace")
    stream.flush()
    try:
        os.write(stream.fileno(), data)
    except (AttributeError, OSError, io.UnsupportedOperation):  # a stream without a file (captured)
        stream.write(data.decode())
        stream.flush()


def configure_deepspeed_output() -> None:
    """Before DeepSpeed is imported on a rank: keep its logger to warnings (all its levels with verbose)."""
    if verbose():
        from deepspeed.utils.logging import set_log_level_from_string

        set_log_level_from_string("info")
        return
    # the logger DeepSpeed creates at import is this one: its handler and level are set there,
    # a filter added now stays
    logging.getLogger("DeepSpeed").addFilter(_quiet_deepspeed_record)
    # DeepSpeed's ZeRO-1 gathers its partitions with torch.distributed.all_gather_into_tensor,
    # which torch 2.13 deprecates; our code does not call it and a user can do nothing about it
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.all_gather_into_tensor` is deprecated",
                            category=FutureWarning)


def _quiet_deepspeed_record(record: logging.LogRecord) -> bool:
    if record.levelno < logging.WARNING:
        return False
    # under the deepspeed launcher (it sets LOCAL_RANK), the launcher has said it for the node already
    return not (ACCELERATOR_NOTICE in record.getMessage() and "LOCAL_RANK" in os.environ)


@contextlib.contextmanager
def deepspeed_prints() -> Iterator[None]:
    """Around a DeepSpeed call that ``print``s its internals: swallowed unless verbose (our own ``[stackwise]``
    lines printed inside, e.g. a stage's frozen precision while its engine is built, still come through)."""
    if verbose():
        yield
        return
    with contextlib.redirect_stdout(_OwnLinesOnly(sys.stdout)):
        yield


class _OwnLinesOnly(io.TextIOBase):
    """A stdout that passes on whole lines starting with ``[stackwise]`` and drops the rest."""

    def __init__(self, target: TextIO):
        self.target = target
        self.pending = ""

    def write(self, text: str) -> int:
        *lines, self.pending = (self.pending + text).split("\n")
        for line in lines:
            if line.startswith("[stackwise]"):
                self.target.write(line + "\n")
        return len(text)

    def flush(self) -> None:
        self.target.flush()
