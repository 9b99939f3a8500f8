"""The config reference (docs/config.md), generated from the dataclasses and their field docstrings.

    python -m stackwise_ds.config_reference           # print the table
    python -m stackwise_ds.config_reference --write   # rewrite it in docs/config.md
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import sys
import typing
from pathlib import Path

from . import config as config_module
from .config import StackWiseConfig, _type_name


def _field_docs(cls: type) -> dict[str, str]:
    """Docstrings written under dataclass fields (string literals right after an annotated assignment)."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    docs = {}
    for node, following in zip(body, body[1:], strict=False):
        if isinstance(node, ast.AnnAssign) and isinstance(following, ast.Expr) \
                and isinstance(following.value, ast.Constant) and isinstance(following.value.value, str):
            docs[node.target.id] = " ".join(following.value.value.split())
    return docs


def reference_rows(cls: type = StackWiseConfig, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(key, type, default, meaning) for every leaf key, depth first."""
    rows = []
    hints = typing.get_type_hints(cls, vars(config_module))
    docs = _field_docs(cls)
    defaults = cls()
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hints[f.name]):
            rows.extend(reference_rows(hints[f.name], key + "."))
        else:
            rows.append((key, _type_name(hints[f.name]), repr(getattr(defaults, f.name)), docs.get(f.name, "")))
    return rows


def markdown_table() -> str:
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    lines += [f"| `{k}` | {t} | `{d}` | {m} |" for k, t, d, m in reference_rows()]
    return "\n".join(lines)


REFERENCE = Path(__file__).resolve().parents[1] / "docs" / "config.md"
BEGIN, END = "<!-- generated:", "<!-- end of the generated reference -->"


def write_reference(path: Path = REFERENCE) -> None:
    """Replace the generated table of ``path`` (between its two markers) with the current one."""
    text = path.read_text()
    begin = text.index("\n", text.index(BEGIN)) + 1
    end = text.index(END)
    path.write_text(text[:begin] + markdown_table() + "\n" + text[end:])


if __name__ == "__main__":
    if sys.argv[1:] == ["--write"]:
        write_reference()
    else:
        print(markdown_table())
