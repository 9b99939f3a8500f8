"""Peer watchdog: no rank waits forever for a rank that died.

Every rank writes a heartbeat file (pid, host, time) every few seconds under
``<output_dir>/.heartbeat/<run id>/``. A daemon thread on each rank watches its
peers: a peer whose process is gone (same host) or whose heartbeat is older than
``timeout_s`` is reported by rank and pid, and this rank exits non-zero (after a short
grace period in which its own error, if any, gets printed) instead of blocking in a
collective. The ``deepspeed`` launcher already stops every rank when
one exits non-zero; then the SIGTERM handler names the rank that died, which the
launcher's own log does not.

The watchdog also watches the ``deepspeed`` launcher processes above its rank (the runner and
``deepspeed.launcher.launch``). A signal to the runner alone (what ``timeout deepspeed ...``
sends) kills the runner without stopping the ranks; without this check they would train on,
orphaned, and a re-run would start a second writer. A rank whose launcher is gone exits.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

from ..console import write_line

EXIT_PEER_FAILED = 3
_ACTIVE: "PeerWatchdog | None" = None
INPUT_ERROR = "stopped on an input error (its own message says what to fix)"
RESUME_HINT = "The latest complete checkpoint is kept; re-run the same command to resume."


def describe_failed_peers() -> str:
    """'rank 1 (pid 42 on node1): process is gone' for every failed peer of the running watchdog, or ''."""
    return "; ".join(_ACTIVE.failed_peers()) if _ACTIVE is not None else ""


def record_input_error() -> None:
    """This rank stops on a user's input error (a config, data or checkpoint file to fix): its last
    heartbeat says so, and the peers that see it gone do not call it a crash to resume from."""
    if _ACTIVE is not None:
        _ACTIVE.input_error = True  # in every later heartbeat too, whichever thread writes it
        try:
            _ACTIVE._beat()
        except OSError:
            pass  # the peers then report a plain failure


def resume_hint(problems: str) -> str:
    """The advice to re-run, unless the failure is an input error that a re-run would only repeat."""
    return "" if INPUT_ERROR in problems else " " + RESUME_HINT


class PeerWatchdog:
    def __init__(self, directory: Path, rank: int, world_size: int, interval_s: float = 2.0,
                 timeout_s: float = 120.0):
        self.directory, self.rank, self.world_size = Path(directory), rank, world_size
        self.interval_s, self.timeout_s = interval_s, timeout_s
        self.host = socket.gethostname()
        self._stop = threading.Event()
        self._started_at = time.time()
        self.input_error = False
        self.launchers = launcher_pids()

    # ---- lifecycle

    def start(self) -> "PeerWatchdog":
        global _ACTIVE
        _ACTIVE = self
        self.directory.mkdir(parents=True, exist_ok=True)
        self._beat()
        threading.Thread(target=self._watch, name="stackwise-watchdog", daemon=True).start()
        signal.signal(signal.SIGTERM, self._on_sigterm)
        return self

    def stop(self) -> None:
        self._stop.set()

    # ---- heartbeats

    def _path(self, rank: int) -> Path:
        return self.directory / f"rank{rank}.json"

    def _beat(self) -> None:
        tmp = self._path(self.rank).with_suffix(".tmp")
        tmp.write_text(json.dumps({"pid": os.getpid(), "host": self.host, "time": time.time(),
                                   "input_error": self.input_error}))
        os.replace(tmp, self._path(self.rank))

    def _read(self, rank: int) -> dict | None:
        try:
            return json.loads(self._path(rank).read_text())
        except (OSError, ValueError):
            return None

    # ---- failure detection

    def failed_peers(self) -> list[str]:
        """One line per peer that is dead or silent, e.g. 'rank 1 (pid 4242 on node1): process is gone'."""
        now, problems = time.time(), []
        for rank in range(self.world_size):
            if rank == self.rank:
                continue
            beat = self._read(rank)
            if beat is None:
                if now - self._started_at > self.timeout_s:
                    problems.append(f"rank {rank}: never started its heartbeat")
                continue
            where = f"rank {rank} (pid {beat['pid']} on {beat['host']})"
            if beat.get("input_error"):
                problems.append(f"{where}: {INPUT_ERROR}")
            elif beat["host"] == self.host and not _alive(beat["pid"]):
                problems.append(f"{where}: process is gone")
            elif now - beat["time"] > self.timeout_s:
                problems.append(f"{where}: no heartbeat for {now - beat['time']:.0f} s")
        return problems

    def _watch(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self._beat()
            except OSError:
                pass  # a full or vanished disk must not kill training by itself
            gone = [pid for pid in self.launchers if not _alive(pid)]
            if gone:
                exit_now(self.rank, f"the deepspeed launcher (pid {', '.join(map(str, gone))}) is gone, stopped by "
                         "a signal or killed: stopping this rank too, so that no orphaned rank keeps training "
                         "and writing", code=128 + signal.SIGTERM)
            problems = self.failed_peers()
            if problems:  # give this rank's own error, if it is about to hit one, the chance to print
                exit_after_grace(self.rank, f"stopping because a peer failed: {'; '.join(problems)}",
                                 code=EXIT_PEER_FAILED)
                return

    def _on_sigterm(self, signum, frame) -> None:
        problems = self.failed_peers()
        reason = f"peer failure: {'; '.join(problems)}" if problems else "SIGTERM from the launcher or the user"
        exit_after_grace(self.rank, f"stopping on {reason}")


def exit_now(rank: int, message: str, code: int, hint: bool = True) -> None:
    write_line(f"[stackwise] rank {rank}: {message}.{resume_hint(message) if hint else ''}", sys.stderr)
    os._exit(code)


def exit_after_grace(rank: int, message: str, grace_s: float = 20.0, code: int = 128 + signal.SIGTERM,
                     hint: bool = True) -> None:
    """Exit with ``message`` in ``grace_s`` seconds unless the main thread exits first.

    When one rank fails, the ``deepspeed`` launcher SIGTERMs the others at once. The others
    usually hit the same bad input a moment later; the grace period lets each report its
    own error. A rank blocked in a collective exits when the grace period ends (before the
    launcher's SIGKILL, 30 s after its SIGTERM).
    """
    timer = threading.Timer(grace_s, exit_now, args=(rank, message, code, hint))
    timer.daemon = True
    timer.start()


def install_startup_sigterm_handler(rank: int) -> None:
    """Until the watchdog takes over: on SIGTERM, keep going for a grace period, then exit.

    No advice to resume: a peer failing this early most often stopped on a bad input."""
    signal.signal(signal.SIGTERM, lambda signum, frame: exit_after_grace(
        rank, "stopping on SIGTERM (another rank failed, or the job was stopped): see the other ranks' messages",
        hint=False))


def launcher_pids() -> list[int]:
    """The ``deepspeed`` launcher processes above this rank: ``deepspeed.launcher.launch`` (the
    parent) and the ``deepspeed`` runner above it; empty when not started by the launcher."""
    parent = os.getppid()
    if "deepspeed.launcher.launch" not in _cmdline(parent):
        return []
    runner = _parent_of(parent)
    return [parent] + ([runner] if runner and "deepspeed" in _cmdline(runner) else [])


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _parent_of(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a killed child of the launcher stays a zombie until reaped: treat that as dead
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ", 1)[1][:1] != "Z"
    except OSError:
        return True
