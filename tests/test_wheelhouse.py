"""benchmarks/wheelhouse.py: the offline wheelhouse is closed under its wheels' requirements, on fixture wheels
(no network: ``--prepare`` itself runs where the package index is, not in CI)."""

import json
import zipfile

import pytest
from packaging.version import Version

from benchmarks.wheelhouse import (
    NODE_EXTRAS,
    check,
    installed_problems,
    node_packages,
    read_wheelhouse,
)


def make_wheel(folder, name: str, version: str, *requires: str) -> None:
    """A wheel holding only its METADATA: all the check reads."""
    metadata = "\n".join(["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}",
                          *(f"Requires-Dist: {req}" for req in requires)]) + "\n"
    stem = f"{name.replace('-', '_')}-{version}"
    with zipfile.ZipFile(folder / f"{stem}-py3-none-any.whl", "w") as archive:
        archive.writestr(f"{stem}.dist-info/METADATA", metadata)


@pytest.fixture
def node(tmp_path):
    listing = tmp_path / "node.txt"
    listing.write_text("# the node\ntorch\nPyYAML  # any spelling\nfsspec\n")
    return listing


def test_a_closed_wheelhouse_passes_and_markers_and_extras_are_read_for_the_target(tmp_path, node):
    house = tmp_path / "house"
    house.mkdir()
    make_wheel(house, "stackwise-ds", "0.1.0", "torch>=2.4", "deepspeed<0.20,>=0.19.8", "pyyaml>=6",
               "datasets>=4.3", "pytest; extra == 'test'")
    make_wheel(house, "deepspeed", "0.19.8", "hjson", "pydantic>=2", "torch",
               "windows-only; sys_platform == 'win32'", "old-python-only; python_version < '3.9'")
    make_wheel(house, "datasets", "4.8.5", "fsspec[http]<=2026.2.0", "dill<0.4.2")
    make_wheel(house, "hjson", "3.1.0")
    make_wheel(house, "pydantic", "2.14.4", "pydantic-core==2.50.5", "email-validator; extra == 'email'")
    make_wheel(house, "pydantic_core", "2.50.5")
    make_wheel(house, "dill", "0.4.1")
    make_wheel(house, "aiohttp", "3.14.5")
    (house / NODE_EXTRAS).write_text(json.dumps({"fsspec": {"http": ["aiohttp!=4.0.0a0"]}}))
    assert node_packages(node) == {"torch", "pyyaml", "fsspec"}
    assert check(house, node) == []
    (house / "aiohttp-3.14.5-py3-none-any.whl").unlink()  # what the node's fsspec[http] brings must ship
    assert check(house, node) == ["fsspec[http] requires aiohttp!=4.0.0a0, which is neither in the wheelhouse "
                                  "nor on the node's list"]


def test_every_unmet_requirement_is_named_with_who_asks_it(tmp_path, node):
    house = tmp_path / "house"
    house.mkdir()
    make_wheel(house, "deepspeed", "0.19.8", "hjson", "pydantic>=2", "torch")
    make_wheel(house, "pydantic", "1.10.0")
    make_wheel(house, "datasets", "4.8.5", "fsspec[http]")
    assert check(house, node) == [
        "datasets 4.8.5 asks fsspec[http]: what the node's fsspec extra(s) http bring is not recorded in "
        "node-extras.json",
        "deepspeed 0.19.8 requires hjson, which is neither in the wheelhouse nor on the node's list",
        "deepspeed 0.19.8 requires pydantic>=2, but the wheelhouse holds pydantic 1.10.0"]
    assert check(tmp_path / "empty", node)[0].endswith("holds no wheel: build it with bash "
                                                        f"benchmarks/gpu_check.sh --prepare {tmp_path / 'empty'}")


def test_an_extra_asked_of_a_shipped_wheel_ships_what_it_brings(tmp_path, node):
    house = tmp_path / "house"
    house.mkdir()
    make_wheel(house, "a", "1.0", "b[fast]")
    make_wheel(house, "b", "1.0", "c; extra == 'fast'", "d; extra == 'slow'")
    assert check(house, node) == ["b[fast] requires c; extra == \"fast\", which is neither in the wheelhouse nor "
                                  "on the node's list"]


def test_on_the_node_missing_requirements_stop_and_other_versions_are_reported(tmp_path):
    house = tmp_path / "house"
    house.mkdir()
    make_wheel(house, "datasets", "4.8.5", "huggingface-hub<2.0,>=0.25", "pyarrow>=21", "xxhash")
    wheels, _ = read_wheelhouse(house)
    assert set(wheels) == {"datasets"}
    seen = {"datasets": Version("4.8.5"), "huggingface-hub": Version("2.5.0"), "pyarrow": Version("26.0.1")}
    missing, mismatched = installed_problems(house, seen)
    assert missing == ["datasets 4.8.5 requires xxhash: not installed"]
    assert mismatched == ["datasets 4.8.5 requires huggingface-hub<2.0,>=0.25, found 2.5.0"]


def test_the_shipped_node_list_names_what_the_issue_says_the_node_has_and_not_what_it_lacks():
    node = node_packages()
    assert {"torch", "numpy", "pyarrow", "pandas", "tensorboard", "pyyaml", "safetensors", "tokenizers",
            "transformers", "tqdm", "psutil", "py-cpuinfo", "ninja", "msgpack", "einops", "nvidia-ml-py"} <= node
    assert not node & {"deepspeed", "hjson", "pydantic", "pydantic-core", "annotated-types", "typing-inspection",
                       "datasets", "dill", "multiprocess", "typing-extensions", "requests", "httpx"}
