"""The README stays true: its config reference is the generated one, and both commands are there."""

from pathlib import Path

from stackwise_ds.config_reference import markdown_table, reference_rows

README = Path(__file__).resolve().parents[1] / "README.md"
CI = Path(__file__).resolve().parents[1] / ".ci" / "run"


def test_config_reference_is_current():
    text = README.read_text()
    assert markdown_table() in text, "README config reference is stale: paste `python -m stackwise_ds.config_reference`"
    assert len(reference_rows()) > 40


def test_readme_gives_the_two_commands_and_ci_runs_the_test_one():
    text = README.read_text()
    assert "deepspeed --num_gpus 2 launch/train.py" in text
    test_command = "python -m pytest -q tests"
    assert test_command in text and test_command in CI.read_text()
