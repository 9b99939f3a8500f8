"""The README and docs/ stay true: the config reference is the generated one, both commands are in the README
(CI runs the test one), the README stays short, and every relative link resolves."""

import re
from pathlib import Path

from stackwise_ds.config_reference import markdown_table, reference_rows, write_reference

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
CI = ROOT / ".ci" / "run"
DOCUMENTS = [README, *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def test_config_reference_is_current(tmp_path):
    text = (ROOT / "docs" / "config.md").read_text()
    assert markdown_table() in text, "docs/config.md is stale: run `python -m stackwise_ds.config_reference --write`"
    assert len(reference_rows()) > 40
    copy = tmp_path / "config.md"
    copy.write_text(text.replace("| `model.d_model` |", "| `model.d_modle` |"))
    write_reference(copy)
    assert copy.read_text() == text, "--write puts the generated table back between the markers, nothing else"


def test_readme_gives_the_two_commands_and_ci_runs_the_test_one():
    text = README.read_text()
    assert "deepspeed --num_gpus 2 launch/train.py" in text
    test_command = "python -m pytest -q tests"
    assert test_command in text and test_command in CI.read_text()
    assert 'ruff check . && python -m pytest -q -m "not multiprocess" tests' in text


def test_the_readme_is_what_a_newcomer_needs_first():
    text = README.read_text()
    assert len(text.splitlines()) <= 350
    for section in ("## Where things are", "## Two commands on a fresh machine", "## A tour of the modes",
                    "## Which mode should I use?", "## See a run before you launch it: `stackwise-plan`"):
        assert section in text, section


def _anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    headings = re.findall(r"^#{1,6} (.+)$", re.sub(r"```.*?```", "", markdown, flags=re.S), re.M)
    return {re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-") for heading in headings}


def test_every_relative_link_in_the_readme_and_docs_resolves():
    checked = 0
    for document in DOCUMENTS:
        text = re.sub(r"```.*?```", "", document.read_text(), flags=re.S)
        for target in LINK.findall(text):
            if re.match(r"[a-z]+:", target):
                continue  # http(s), mailto: not ours to check here
            path, _, anchor = target.partition("#")
            resolved = (document.parent / path).resolve() if path else document
            assert resolved.exists(), f"{document.name}: {target} does not exist"
            if anchor:
                assert anchor in _anchors(resolved.read_text()), f"{document.name}: no heading #{anchor} in {path}"
            checked += 1
    assert checked > 30
