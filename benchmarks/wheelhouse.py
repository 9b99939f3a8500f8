#!/usr/bin/env python3
"""The offline wheelhouse of ``benchmarks/gpu_check.sh``: what a GPU node without network needs beside what it has.

    python3 -m benchmarks.wheelhouse prepare DIR     # gpu_check.sh --prepare: build it (needs the package index)
    python3 -m benchmarks.wheelhouse check DIR       # every requirement of every wheel: in DIR or on the node
    python3 -m benchmarks.wheelhouse installed DIR   # on the node, after the install: met by what Python sees

The target is CPython 3.12 on manylinux x86_64 (glibc 2.17, or 2.28 where a project ships only that: a node
running torch >= 2.6 from PyPI has it). ``prepare`` puts in DIR

* the project's own wheel (``pip wheel --no-deps .``);
* a DeepSpeed wheel built from its sdist (``DS_BUILD_OPS=0``: no op prebuilt; DeepSpeed compiles one when
  first used, which this trainer's GPU path does not need), of the release the project requires;
* every requirement of those wheels, and of theirs, that the node may lack: all but the distributions named in
  ``gpu_node_packages.txt``, as binary wheels for the target (``pip download --only-binary=:all:``), each
  within every specifier asked of it; ``node-extras.json`` records what an extra asked of a node package
  brings (``fsspec[http]``: aiohttp, ...), and those ship too;

then runs ``check`` and refuses a wheelhouse over ``MAX_MIB``. ``check`` needs no network and no torch.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from email.parser import Parser
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
NODE_FILE = Path(__file__).with_name("gpu_node_packages.txt")
NODE_EXTRAS = "node-extras.json"
MAX_MIB = 40
PYTHON_VERSION = "3.12"
PLATFORMS = ("manylinux2014_x86_64", "manylinux_2_28_x86_64")
# The environment markers of the target interpreter (PEP 508), ``extra`` set per requirement.
TARGET = {"python_version": PYTHON_VERSION, "python_full_version": f"{PYTHON_VERSION}.0", "os_name": "posix",
          "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64",
          "platform_python_implementation": "CPython", "implementation_name": "cpython",
          "implementation_version": f"{PYTHON_VERSION}.0", "platform_release": "", "platform_version": ""}
# Releases taken where the newest would ask more of the node than it likely has: datasets 5 needs pyarrow >= 24
# and huggingface-hub >= 1.31; 4.3 is the first whose from_generator takes the fingerprint stackwise_ds passes.
PINS = {"datasets": ">=4.3,<5"}
PINS_ENV = "WHEELHOUSE_PINS"  # e.g. "datasets>=5 pydantic<2.13": replaces or adds pins (a node with newer packages)


def pins() -> dict[str, str]:
    extra = [Requirement(text) for text in os.environ.get(PINS_ENV, "").split()]
    return {**PINS, **{canonical(req.name): str(req.specifier) for req in extra}}


def canonical(name: str) -> str:
    """A distribution name as PEP 503 compares them: ``Typing_Extensions`` -> ``typing-extensions``."""
    return re.sub(r"[-_.]+", "-", name).lower()


def node_packages(path: Path = NODE_FILE) -> set[str]:
    """The distributions the node has, from ``gpu_node_packages.txt`` (a name a line, # comments)."""
    names = (line.split("#")[0].strip() for line in path.read_text().splitlines())
    return {canonical(name) for name in names if name}


@dataclass
class Wheel:
    name: str  # canonical
    version: Version
    requires: list[Requirement] = field(default_factory=list)
    path: Path | None = None

    def requirements(self, extras: set[str] = frozenset()) -> list[Requirement]:
        """The requirements of this wheel on the target, with ``extras`` asked of it."""
        return [req for req in self.requires if wanted_on_target(req, extras)]


def wanted_on_target(requirement: Requirement, extras: set[str] = frozenset()) -> bool:
    """Whether ``requirement`` applies on the target with these extras (no marker: always)."""
    if requirement.marker is None:
        return True
    return any(requirement.marker.evaluate({**TARGET, "extra": extra}) for extra in ("", *sorted(extras)))


def read_wheel(path: Path) -> Wheel:
    """Name, version and Requires-Dist of a wheel, from its METADATA."""
    with zipfile.ZipFile(path) as archive:
        metadata = next(n for n in archive.namelist() if re.fullmatch(r"[^/]+\.dist-info/METADATA", n))
        headers = Parser().parsestr(archive.read(metadata).decode("utf-8"))
    return Wheel(canonical(headers["Name"]), Version(headers["Version"]),
                 [Requirement(text) for text in headers.get_all("Requires-Dist") or []], path)


def read_wheelhouse(directory: Path) -> tuple[dict[str, Wheel], dict[str, dict[str, list[str]]]]:
    """The wheels in ``directory`` by name, and the recorded extras of node packages."""
    wheels = {}
    for path in sorted(directory.glob("*.whl")):
        wheel = read_wheel(path)
        wheels[wheel.name] = wheel
    extras_file = directory / NODE_EXTRAS
    return wheels, json.loads(extras_file.read_text()) if extras_file.exists() else {}


# ----------------------------------------------------------------------------- check


def demands(wheels: dict[str, Wheel], node_extras: dict[str, dict[str, list[str]]]) -> list[tuple[str, Requirement]]:
    """(who asks, requirement) for every requirement the wheelhouse's wheels make on the target, with the extras
    asked of them (and of node packages, as recorded) followed until nothing new is asked."""
    asked: dict[str, set[str]] = {}
    out: list[tuple[str, Requirement]] = []
    todo = [(f"{w.name} {w.version}", req) for w in wheels.values() for req in w.requirements()]
    seen: set[tuple[str, str]] = set()
    while todo:
        who, req = todo.pop()
        if (who, str(req)) in seen:
            continue
        seen.add((who, str(req)))
        out.append((who, req))
        name, new = canonical(req.name), set(req.extras) - asked.get(canonical(req.name), set())
        if not new:
            continue
        asked.setdefault(name, set()).update(new)
        if name in wheels:
            todo += [(f"{name}[{','.join(sorted(new))}]", r) for r in wheels[name].requires
                     if r.marker is not None and wanted_on_target(r, new) and not wanted_on_target(r)]
        for extra in sorted(new):
            todo += [(f"{name}[{extra}]", Requirement(text)) for text in node_extras.get(name, {}).get(extra, [])]
    return out


def problems(wheels: dict[str, Wheel], node: set[str], node_extras: dict[str, dict[str, list[str]]]) -> list[str]:
    """Every requirement of every wheel that neither the wheelhouse nor the node meets, as a sentence."""
    found = []
    for who, req in demands(wheels, node_extras):
        name = canonical(req.name)
        if name in node:
            missing = [extra for extra in req.extras if extra not in node_extras.get(name, {})]
            if missing:
                found.append(f"{who} asks {req}: what the node's {name} extra(s) {', '.join(missing)} bring is not "
                             f"recorded in {NODE_EXTRAS}")
        elif name not in wheels:
            found.append(f"{who} requires {req}, which is neither in the wheelhouse nor on the node's list")
        elif not req.specifier.contains(wheels[name].version, prereleases=True):
            found.append(f"{who} requires {req}, but the wheelhouse holds {name} {wheels[name].version}")
    return sorted(set(found))


def check(directory: Path, node_file: Path = NODE_FILE) -> list[str]:
    wheels, node_extras = read_wheelhouse(directory)
    if not wheels:
        return [f"{directory} holds no wheel: build it with bash benchmarks/gpu_check.sh --prepare {directory}"]
    return problems(wheels, node_packages(node_file), node_extras)


# ----------------------------------------------------------------------------- on the node


def installed_problems(directory: Path, available: dict[str, Version]) -> tuple[list[str], list[str]]:
    """(missing, mismatched): requirements of the wheelhouse's wheels that no distribution Python sees meets, and
    those met by name with a version outside the specifier (``available``: name -> version)."""
    wheels, node_extras = read_wheelhouse(directory)
    missing, mismatched = [], []
    for who, req in demands(wheels, node_extras):
        version = available.get(canonical(req.name))
        if version is None:
            missing.append(f"{who} requires {req}: not installed")
        elif not req.specifier.contains(version, prereleases=True):
            mismatched.append(f"{who} requires {req}, found {version}")
    return sorted(set(missing)), sorted(set(mismatched))


def visible_distributions() -> dict[str, Version]:
    """Every distribution on this Python's path (PYTHONPATH first) by name -> version; the first found wins."""
    from importlib.metadata import distributions

    found: dict[str, Version] = {}
    for dist in distributions():
        name = canonical(dist.metadata["Name"] or "")
        if name and name not in found:
            found[name] = Version(dist.version)
    return found


# ----------------------------------------------------------------------------- prepare


def pip(*args: str, env: dict | None = None) -> str:
    done = subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})})
    if done.returncode != 0:
        raise RuntimeError(f"pip {' '.join(args[:6])} ... failed:\n{(done.stdout + done.stderr)[-3000:]}")
    return done.stdout


def download_binary(requirement: str, directory: Path) -> None:
    """The target's binary wheel of ``requirement`` (no dependencies) into ``directory``."""
    platforms = [arg for platform in PLATFORMS for arg in ("--platform", platform)]
    pip("download", "--quiet", "--no-deps", "--only-binary=:all:", "--python-version", PYTHON_VERSION,
        "--implementation", "cp", "--abi", f"cp{PYTHON_VERSION.replace('.', '')}", *platforms, "-d", str(directory),
        requirement)


def build_project_wheel(directory: Path) -> Wheel:
    pip("wheel", "--quiet", "--no-deps", str(REPO), "-w", str(directory))
    return read_wheel(next(directory.glob("stackwise_ds-*.whl")))


def build_deepspeed_wheel(directory: Path, requirement: Requirement, scratch: Path) -> None:
    """DeepSpeed from its sdist, no op prebuilt. Its setup imports torch, so this Python needs one (any build)."""
    try:
        import torch  # noqa: F401
    except ImportError:
        raise SystemExit("--prepare builds DeepSpeed from its sdist, whose setup.py imports torch: run it with a "
                         "Python that has torch (any build: PYTHON=/path/to/python3)") from None
    pip("download", "--quiet", "--no-deps", "--no-binary", ":all:", "--no-build-isolation", "-d", str(scratch),
        str(requirement))
    (sdist,) = scratch.glob("deepspeed-*.tar.gz")
    pip("wheel", "--quiet", "--no-deps", "--no-build-isolation", str(sdist), "-w", str(directory),
        env={"DS_BUILD_OPS": "0"})


def missing_from(wheels: dict[str, Wheel], node: set[str],
                 node_extras: dict[str, dict[str, list[str]]]) -> tuple[dict[str, SpecifierSet], dict[str, set[str]]]:
    """(what to download: name -> every specifier asked of it, node packages whose extras are not yet recorded)."""
    specs: dict[str, SpecifierSet] = {}
    unrecorded: dict[str, set[str]] = {}
    for _, req in demands(wheels, node_extras):
        name = canonical(req.name)
        if name in node:
            extras = set(req.extras) - set(node_extras.get(name, {}))
            if extras:
                unrecorded.setdefault(name, set()).update(extras)
            continue
        specs[name] = specs.get(name, SpecifierSet()) & req.specifier & SpecifierSet(pins().get(name, ""))
    fetch = {name: spec for name, spec in specs.items()
             if name not in wheels or not spec.contains(wheels[name].version, prereleases=True)}
    return fetch, unrecorded


def record_node_extras(name: str, extras: set[str], node_extras: dict, scratch: Path) -> None:
    """What ``name``'s extras ask (read from the newest wheel of ``name``; the node's own release may differ)."""
    folder = scratch / f"extras-{name}"
    folder.mkdir(exist_ok=True)
    pip("download", "--quiet", "--no-deps", "--only-binary=:all:", "-d", str(folder), name)
    wheel = read_wheel(next(folder.glob("*.whl")))
    for extra in extras:
        node_extras.setdefault(name, {})[extra] = [
            str(req) for req in wheel.requires
            if req.marker is not None and wanted_on_target(req, {extra}) and not wanted_on_target(req)]


def collect_requirements(directory: Path, node: set[str], scratch: Path) -> None:
    """Download until every requirement of every wheel in ``directory`` is met there or on the node."""
    node_extras: dict[str, dict[str, list[str]]] = {}
    for _ in range(20):  # a new wheel may ask for more; a few rounds settle it
        wheels, _ = read_wheelhouse(directory)
        fetch, unrecorded = missing_from(wheels, node, node_extras)
        if not fetch and not unrecorded:
            break
        for name, extras in sorted(unrecorded.items()):
            record_node_extras(name, extras, node_extras, scratch)
        for name, spec in sorted(fetch.items()):
            if name in wheels:
                wheels[name].path.unlink()  # the specifiers asked since exclude it
            download_binary(f"{name}{spec}", directory)
        (directory / NODE_EXTRAS).write_text(json.dumps(node_extras, indent=1, sort_keys=True))
    else:
        raise RuntimeError("the wheelhouse's requirements did not settle in 20 rounds")


def prepare(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for old in [*directory.glob("*.whl"), directory / NODE_EXTRAS]:
        old.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        project = build_project_wheel(directory)
        (deepspeed,) = [req for req in project.requirements() if canonical(req.name) == "deepspeed"]
        build_deepspeed_wheel(directory, deepspeed, Path(scratch))
        collect_requirements(directory, node_packages(), Path(scratch))
    found = check(directory)
    if found:
        raise SystemExit("the wheelhouse is not complete:\n  " + "\n  ".join(found))
    report(directory)


def report(directory: Path) -> None:
    files = sorted(directory.glob("*.whl"))
    total = sum(path.stat().st_size for path in files)
    for path in files:
        print(f"  {path.stat().st_size / 2**20:7.2f} MiB  {path.name}")
    print(f"[wheelhouse] {directory}: {len(files)} wheels, {total / 2**20:.2f} MiB (limit {MAX_MIB} MiB); every "
          f"requirement is in it or on the node's list ({NODE_FILE.name})")
    if total > MAX_MIB * 2**20:
        raise SystemExit(f"the wheelhouse is {total / 2**20:.1f} MiB, over the {MAX_MIB} MiB that may travel with "
                         "the repository")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=("prepare", "check", "installed"))
    parser.add_argument("directory", type=Path)
    args = parser.parse_args()
    if args.command == "prepare":
        prepare(args.directory)
    elif args.command == "check":
        found = check(args.directory)
        print("\n".join(found) or f"[wheelhouse] {args.directory}: every requirement is met")
        sys.exit(1 if found else 0)
    else:
        missing, mismatched = installed_problems(args.directory, visible_distributions())
        for line in mismatched:
            print(f"[wheelhouse] WARNING version: {line}")
        for line in missing:
            print(f"[wheelhouse] MISSING: {line}")
        sys.exit(1 if missing else 0)


if __name__ == "__main__":
    main()
