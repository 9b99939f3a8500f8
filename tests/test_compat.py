"""The supported DeepSpeed range: one range everywhere, and an import-time check that names what is missing."""

import ast
import re
import warnings
from pathlib import Path

import deepspeed
import pytest

from stackwise_ds.parallel.compat import (
    ASSIGNED,
    ATTRIBUTE,
    MENTIONED,
    MIN_DEEPSPEED,
    REQUIRED_NAMES,
    SUPPORTED_DEEPSPEED,
    DeepSpeedVersionError,
    Required,
    UntestedDeepSpeedWarning,
    check_deepspeed,
    missing_names,
)

ROOT = Path(__file__).resolve().parents[1]
PIPE_ENGINE = "deepspeed.runtime.pipe.engine:PipelineEngine"


def test_installed_deepspeed_passes_the_check_without_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an out-of-range warning would fail here
        assert check_deepspeed() == deepspeed.__version__
    assert missing_names() == []
    kinds = {entry.kind for entry in REQUIRED_NAMES}
    assert kinds == {ATTRIBUTE, ASSIGNED, MENTIONED}


def test_missing_names_are_reported_with_version_range_and_fix():
    table = (
        Required(PIPE_ENGINE, ATTRIBUTE, ("_train_schedule", "_no_such_method")),
        # instance attributes: pipe_buffers is assigned in PipelineEngine.__init__; train_batch_size
        # is a method, never assigned, so it must count as missing
        Required(PIPE_ENGINE, ASSIGNED, ("pipe_buffers", "train_batch_size")),
        Required("deepspeed.runtime.zero.stage_1_and_2:DeepSpeedZeroOptimizer", ASSIGNED, ("bit16_groups",)),
        Required("deepspeed.runtime.pipe.module:PipelineModule", MENTIONED, ("weight_attr", "no_such_key")),
        Required("deepspeed.no_such_module", ATTRIBUTE, ("anything",)),
    )
    with pytest.raises(DeepSpeedVersionError) as caught:
        check_deepspeed(table)
    message = str(caught.value)
    assert isinstance(caught.value, ImportError)
    assert f"DeepSpeed {deepspeed.__version__} is installed" in message
    assert f"deepspeed{SUPPORTED_DEEPSPEED}" in message
    assert f'pip install "deepspeed{SUPPORTED_DEEPSPEED}"' in message
    listed = re.findall(r"^  - (\S+)", message, re.MULTILINE)
    assert listed == [f"{PIPE_ENGINE}._no_such_method", f"{PIPE_ENGINE}.train_batch_size",
                      "deepspeed.runtime.pipe.module:PipelineModule.no_such_key", "deepspeed.no_such_module"]
    assert "ModuleNotFoundError: No module named 'deepspeed.no_such_module'" in message


def test_release_outside_the_range_is_refused_below_and_warned_above():
    with pytest.raises(DeepSpeedVersionError, match=r"older than the oldest one tested.*\n.*deepspeed>=99\.0"):
        check_deepspeed(REQUIRED_NAMES, supported=">=99.0")
    with pytest.warns(UntestedDeepSpeedWarning, match=f"DeepSpeed {re.escape(deepspeed.__version__)} is newer"):
        assert check_deepspeed(REQUIRED_NAMES, supported=">=0.1,<0.2") == deepspeed.__version__


def test_unknown_check_kind_is_rejected():
    with pytest.raises(ValueError, match="kind 'exists' is not one of"):
        Required(PIPE_ENGINE, "exists", ("destroy",))


def test_pyproject_readme_and_ci_agree_with_the_supported_range():
    # the dependency strings of pyproject.toml (no tomllib: Python 3.10 is supported too)
    dependencies = re.findall(r'^\s*"([^"]+)",?\s*$', (ROOT / "pyproject.toml").read_text(), re.M)
    (requirement,) = [d for d in dependencies if re.match(r"deepspeed\b", d)]
    assert requirement == f"deepspeed{SUPPORTED_DEEPSPEED}"
    assert SUPPORTED_DEEPSPEED.startswith(f">={MIN_DEEPSPEED},")
    assert f"`{SUPPORTED_DEEPSPEED}`" in (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "from stackwise_ds.parallel.compat import MIN_DEEPSPEED" in ci
    assert 'pip install -q "deepspeed==$1"' in ci and 'oldest_deepspeed_job "$OLDEST_DEEPSPEED"' in ci


def test_ci_oldest_deepspeed_job_names_existing_tests():
    """The second CI job runs only when a release newer than the oldest exists, so a renamed test
    in its list would go unnoticed until then: check the list here."""
    ci = (ROOT / ".ci" / "run").read_text()
    block = re.search(r"^OLDEST_DEEPSPEED_TESTS=\((.*?)^\)", ci, re.MULTILINE | re.DOTALL).group(1)
    entries = re.findall(r"^\s*(tests/\S+)", block, re.MULTILINE)
    assert len(entries) >= 5
    for entry in entries:
        path, _, name = entry.partition("::")
        assert (ROOT / path).is_file(), entry
        assert not name or re.search(rf"^def {name}\(", (ROOT / path).read_text(), re.MULTILINE), entry


def test_engine_checks_before_it_imports_deepspeed():
    """The check must run before engine.py's own DeepSpeed imports, which would otherwise fail
    first with a bare ImportError on a release that lacks one of them."""
    body = ast.parse((ROOT / "stackwise_ds" / "parallel" / "engine.py").read_text()).body
    check = next(i for i, node in enumerate(body) if isinstance(node, ast.Expr)
                 and isinstance(node.value, ast.Call) and getattr(node.value.func, "id", "") == "check_deepspeed")
    first_ds_import = next(i for i, node in enumerate(body) if isinstance(node, ast.ImportFrom)
                           and (node.module or "").startswith("deepspeed"))
    assert check < first_ds_import


def test_deepspeed_prints_inside_an_engine_build_are_hidden_and_our_own_lines_pass(capsys, monkeypatch):
    """DeepSpeed's bf16 optimizer prints 'begin bf16_optimizer' and memory lines while an engine is built (the
    trainer builds it under deepspeed_prints); a stage's own '[stackwise]' line printed there still comes through."""
    from deepspeed.runtime.utils import see_memory_usage

    from stackwise_ds.console import VERBOSE_ENV, deepspeed_prints

    monkeypatch.delenv(VERBOSE_ENV, raising=False)
    with deepspeed_prints():
        see_memory_usage("begin bf16_optimizer", force=True)
        print("[stackwise] stage 0: frozen layers 1, 2 run in int8", flush=True)
        print("end bf16_ optimizer", end="")
    assert capsys.readouterr().out == "[stackwise] stage 0: frozen layers 1, 2 run in int8\n"
    monkeypatch.setenv(VERBOSE_ENV, "1")
    with deepspeed_prints():
        see_memory_usage("begin bf16_optimizer", force=True)
    assert "begin bf16_optimizer" in capsys.readouterr().out
