"""A checkpoint save that cannot write (disk full, quota, file-size limit) becomes a clear error.

torch's zip writer loses the OS error: a full disk surfaces as ``RuntimeError: [enforce fail at
inline_container.cc] unexpected pos 704 vs 598``. When a save fails like that, a small probe
write into the same folder asks the filesystem what is wrong ("No space left on device"), and
the error names the folder, that answer, and what is still safe: the half-written tag is never
marked complete, so ``latest`` keeps naming the previous checkpoint and a re-run resumes there.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from pathlib import Path

from ..checkpoint.files import CheckpointError, find_resume_tag

# OS errors that mean "this filesystem takes no more bytes from us"
NO_ROOM_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
# how torch's zip writer reports a failed write (the errno is lost on the way)
TORCH_WRITE_FAILURES = ("unexpected pos", "PytorchStreamWriter failed writing", "file write failed")
PROBE_BYTES = 1 << 20


class CheckpointWriteError(CheckpointError):
    """A checkpoint could not be written; nothing already saved was lost."""


def is_write_failure(exc: BaseException) -> bool:
    if isinstance(exc, OSError):
        return exc.errno in NO_ROOM_ERRNOS
    return isinstance(exc, RuntimeError) and any(marker in str(exc) for marker in TORCH_WRITE_FAILURES)


def write_probe(directory: Path, n_bytes: int) -> None:
    """Write ``n_bytes`` to a synced probe file in ``directory`` and remove it; raises the OSError if that fails."""
    probe = directory / f".write_probe_{os.getpid()}"
    try:
        with open(probe, "wb") as handle:
            handle.write(b"\0" * n_bytes)
            handle.flush()
            os.fsync(handle.fileno())
    except OSError:
        with contextlib.suppress(OSError):
            probe.unlink()
        raise
    probe.unlink()


def filesystem_says(directory: Path) -> str:
    """What the filesystem says to a 1 MiB write in ``directory`` now: its error, or the free space."""
    try:
        write_probe(directory, PROBE_BYTES)
    except OSError as exc:
        return exc.strerror or str(exc)
    return f"a 1 MiB test write now succeeds; {shutil.disk_usage(directory).free / 2**20:.0f} MiB free"


@contextlib.contextmanager
def reporting_write_failures(checkpoint_dir: Path, tag: str, rank: int):
    """Turn a failed write while saving ``tag`` into a CheckpointWriteError that says what is safe."""
    try:
        yield
    except (OSError, RuntimeError) as exc:
        if isinstance(exc, CheckpointError) or not is_write_failure(exc):
            raise
        raise CheckpointWriteError(describe_failure(checkpoint_dir, tag, rank, exc)) from exc


def describe_failure(checkpoint_dir: Path, tag: str, rank: int, exc: BaseException) -> str:
    tag_dir = checkpoint_dir / tag
    where = tag_dir if tag_dir.is_dir() else checkpoint_dir
    previous = find_resume_tag(checkpoint_dir)
    kept = (f"the previous checkpoint {previous} is kept and `latest` still names it, so re-running the same "
            "command resumes from it" if previous else "no earlier checkpoint exists, so a re-run starts over")
    return (f"could not save checkpoint {tag} in {checkpoint_dir}: rank {rank} failed to write its files "
            f"({_os_reason(exc) or 'the filesystem says: ' + filesystem_says(where)}). "
            f"Nothing saved before is lost: {tag} is not marked complete and is never resumed from; {kept}. "
            f"Free space there (delete {tag_dir} and old checkpoints you do not need) or point "
            "training.output_dir at a bigger filesystem, then re-run")


def _os_reason(exc: BaseException) -> str | None:
    if isinstance(exc, OSError):
        return f"{exc.strerror}: {exc.filename}" if exc.filename else exc.strerror
    return None
