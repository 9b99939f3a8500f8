"""One writer per output dir: a job holds an exclusive lock on ``<output_dir>/.lock`` while it trains.

Global rank 0 takes a non-blocking ``flock`` on the file and writes who holds it (host, pid,
start time). A second job on the same output dir is refused on every one of its ranks, naming
the holder, before it reads or writes anything. The kernel drops a ``flock`` when its process
dies, so a job killed without cleaning up leaves a stale file, not a stale lock: the next job
takes it over and says whose it was. Only a clean end clears the record: a job that stopped on an
error or a signal leaves it, so the next job says which job ended without finishing. ``flock`` is
reliable on local filesystems and NFSv4; on a filesystem without working locks the lock always
succeeds (a second writer is then not detected).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from ..checkpoint.files import CheckpointError

LOCK_NAME = ".lock"


class OutputDirLock:
    def __init__(self, output_dir: Path):
        self.path = Path(output_dir) / LOCK_NAME
        self._file = None

    def acquire(self) -> str | None:
        """Take the lock; returns a notice when a dead job's record is taken over, raises when a live job holds it."""
        lock_file = open(self.path, "a+")
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_record(lock_file)
            lock_file.close()
            raise CheckpointError(
                f"training.output_dir {self.path.parent} is in use by another training job ({_describe(holder)}): "
                "two jobs writing one run would corrupt its checkpoints; wait for that job to finish or stop it, "
                "or choose another training.output_dir") from None
        previous = _read_record(lock_file)
        lock_file.seek(0)
        lock_file.truncate()
        lock_file.write(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}))
        lock_file.flush()
        self._file = lock_file
        if previous:
            return (f"[stackwise] taking over the lock of {self.path.parent} left by a job that is no longer running "
                    f"({_describe(previous)}): it stopped without finishing cleanly (an error, a signal or a kill)")
        return None

    def __enter__(self) -> "OutputDirLock":
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        self.release(clean_end=exc_type is None)  # after an error the record stays: the next job says so

    def release(self, clean_end: bool = True) -> None:
        """Drop the lock; a clean end also clears the record (it leaves nothing to take over)."""
        if self._file is None:
            return
        if clean_end:
            self._file.seek(0)
            self._file.truncate()
        self._file.close()  # closing the descriptor releases the flock
        self._file = None


def _read_record(lock_file) -> dict | None:
    lock_file.seek(0)
    try:
        return json.loads(lock_file.read() or "null")
    except ValueError:
        return {"unreadable": True}


def _describe(record: dict | None) -> str:
    if not record or "pid" not in record:
        return "holder unknown"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.get("since", 0)))
    return f"pid {record['pid']} on host {record.get('host', '?')}, since {since}"
