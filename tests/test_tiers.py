"""The fast tier stays honest: a test that starts a process without @pytest.mark.multiprocess fails
(tests/conftest.py), so `pytest -m "not multiprocess"` never launches one."""

import os
import subprocess
import sys

import pytest


def test_an_unmarked_test_cannot_start_a_process():
    for start in (lambda: subprocess.run([sys.executable, "-c", "pass"]), lambda: os.system("true")):
        with pytest.raises(RuntimeError, match=r"not marked @pytest.mark.multiprocess"):
            start()
