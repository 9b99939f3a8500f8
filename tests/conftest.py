import os
import sys
import tempfile

import pytest
import torch

from launch_utils import run_training

# Every test run shares one tokenised-data cache (CI points it at its own folder).
os.environ.setdefault("STACKWISE_DS_CACHE", os.path.join(tempfile.gettempdir(), "stackwise_ds_test_cache"))
os.environ.setdefault("PYTHONUNBUFFERED", "1")
# The in-process tests work on tiny tensors: a second intra-op thread buys nothing there, and on
# shared, busy cores its spin-waiting makes them up to 10x slower. (Launched runs are unaffected.)
torch.set_num_threads(1)

# The fast tier (`pytest -m "not multiprocess"`) must hold every test that starts no process. So a
# test that starts one (the deepspeed launcher, a training run, a tool as a subprocess) must say so
# with @pytest.mark.multiprocess; an unmarked one fails on its first process start instead of
# slowing the fast tier down. The check is an audit hook: CPython raises these events before it
# starts a program. (A bare os.fork is not one: `datasets` forks map workers inside the library.)
PROCESS_START_EVENTS = frozenset({"subprocess.Popen", "os.system", "os.posix_spawn", "os.spawn", "os.exec"})
_current_test_may_start_processes = True  # outside a test (collection, reporting) nothing is checked


def _refuse_process_start_in_unmarked_test(event: str, args: tuple) -> None:
    if event in PROCESS_START_EVENTS and not _current_test_may_start_processes:
        raise RuntimeError(f"this test starts a process ({event} {args[:2]!r}) but is not marked "
                           "@pytest.mark.multiprocess: mark it (or its module: pytestmark = pytest.mark.multiprocess) "
                           "so that `pytest -m 'not multiprocess'` stays the fast tier")


sys.addaudithook(_refuse_process_start_in_unmarked_test)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """Setup, call and teardown of one test (and the fixtures it sets up) run under its marker."""
    global _current_test_may_start_processes
    _current_test_may_start_processes = item.get_closest_marker("multiprocess") is not None
    try:
        yield
    finally:
        _current_test_may_start_processes = True


@pytest.fixture(scope="session")
def tiny_rackwise_run(tmp_path_factory):
    """One 2-stage rackwise run of launch_utils.TINY (6 steps, a checkpoint every 2, byte tokenizer),
    shared by tests/test_rackwise.py and tests/test_tokenizers.py: read it or copy it, never write into it."""
    out = tmp_path_factory.mktemp("tiny_rackwise")
    proc = run_training(2, out, "training.save_interval=2")
    (out / "launch.log").write_text(proc.stdout + proc.stderr)
    return out
