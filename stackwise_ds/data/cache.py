"""On-disk cache of packed windows, safe under concurrent ranks and killed runs.

Layout::

    <cache_dir>/
      <source>-T<seq_len>-<sha256[:16]>/   one complete entry per key
        windows.npy                       uint16 [n_windows, seq_len + 1]
        meta.json                         key inputs, n_tokens, n_documents, n_windows
      .<entry>.lock                       fcntl lock: only one process builds a key
      .tmp-<entry>-XXXX/                  in-progress build, renamed into place when done

An entry directory only ever appears through an atomic ``os.rename`` of a finished temp dir,
so a reader either sees a complete entry or none. The lock just stops N ranks from doing the
same tokenisation N times; correctness does not depend on it (first rename wins).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

CACHE_FORMAT_VERSION = 1
CACHE_ENV_VAR = "STACKWISE_DS_CACHE"
WINDOWS_FILE = "windows.npy"
META_FILE = "meta.json"


def default_cache_dir() -> Path:
    """``$STACKWISE_DS_CACHE`` if set, else ``~/.cache/stackwise_ds/data``."""
    env = os.environ.get(CACHE_ENV_VAR)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "stackwise_ds" / "data"


def entry_name(key_inputs: dict[str, Any]) -> str:
    """Readable prefix + hash of everything that determines the packed windows."""
    canonical = json.dumps({"format": CACHE_FORMAT_VERSION, **key_inputs}, sort_keys=True)
    digest = hashlib.sha256(canonical.encode()).hexdigest()[:16]
    return f"{key_inputs['source']}-T{key_inputs['seq_len']}-{digest}"


def is_complete(entry: Path) -> bool:
    return (entry / META_FILE).is_file() and (entry / WINDOWS_FILE).is_file()


def read_meta(entry: Path) -> dict[str, Any]:
    return json.loads((entry / META_FILE).read_text())


@contextlib.contextmanager
def exclusive_lock(lock_path: Path) -> Iterator[None]:
    """Block until this process holds an exclusive fcntl lock on ``lock_path``."""
    try:
        import fcntl
    except ImportError:  # non-POSIX: fall back on rename-wins alone
        yield
        return
    with open(lock_path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _publish(tmp: Path, entry: Path) -> None:
    """Atomically move a finished build into place; if another process won, keep theirs."""
    if entry.exists() and not is_complete(entry):
        shutil.rmtree(entry, ignore_errors=True)  # debris from a non-atomic copy by hand
    try:
        os.rename(tmp, entry)
    except OSError:
        if not is_complete(entry):
            raise


def load_or_build(
    cache_dir: Path, key_inputs: dict[str, Any], build: Callable[[Path, Path], dict[str, Any]],
) -> tuple[Path, dict[str, Any], bool]:
    """Return ``(entry_dir, meta, cache_hit)``, building the entry if needed.

    ``build(out_dir, scratch_dir)`` must write ``WINDOWS_FILE`` into ``out_dir`` and return
    the metadata to store; ``scratch_dir`` is a private temp dir deleted afterwards.
    """
    entry = cache_dir / entry_name(key_inputs)
    if is_complete(entry):
        return entry, read_meta(entry), True
    cache_dir.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(cache_dir / f".{entry.name}.lock"):
        if is_complete(entry):  # another rank built it while we waited for the lock
            return entry, read_meta(entry), True
        log.info("building packed-data cache entry %s", entry)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{entry.name}-", dir=cache_dir))
        scratch = Path(tempfile.mkdtemp(prefix=f".scratch-{entry.name}-", dir=cache_dir))
        try:
            meta = {"format": CACHE_FORMAT_VERSION, "key": key_inputs, **build(tmp, scratch)}
            # meta.json is written last: its presence marks the temp dir as finished.
            (tmp / META_FILE).write_text(json.dumps(meta, indent=1, sort_keys=True))
            _publish(tmp, entry)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.rmtree(scratch, ignore_errors=True)
    return entry, read_meta(entry), False
