"""The declared floors of the core dependencies, for a second environment in which .ci/run runs a
fast part of the tests, so that a floor the code has outgrown fails CI.

`floors.py pins` prints the core dependencies of pyproject.toml pinned to their floors (`>=X`
becomes `==X`), for `pip install -r`. Those named with --as-installed stay unpinned: torch, of
which this machine has one release only (pip.conf caps it at what lies on the disk); older ones
cannot be had here.

`floors.py share SITE_PACKAGES NAME...` links the installed distributions NAME, with everything
they need, from the running environment into SITE_PACKAGES (hard links: no copy of torch's 4 GB
of CUDA libraries), so pip there finds them installed and keeps them as they are.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import shutil
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name


def floors(pyproject: Path, *, as_installed: set[str]) -> list[str]:
    lines = []
    for text in tomllib.loads(pyproject.read_text())["project"]["dependencies"]:
        req = Requirement(text)
        marker = f"; {req.marker}" if req.marker else ""
        lows = [s.version for s in req.specifier if s.operator == ">="]
        if canonicalize_name(req.name) in as_installed or not lows:
            lines.append(f"{req.name}{marker}")
        else:
            (low,) = lows
            lines.append(f"{req.name}=={low}{marker}")
    return lines


def closure(names: list[str]) -> list[importlib.metadata.Distribution]:
    """The installed distributions `names` and, recursively, those they require here (markers
    evaluated, extras followed)."""
    found: dict[str, importlib.metadata.Distribution] = {}
    todo: list[tuple[str, set[str]]] = [(n, set()) for n in names]
    extras_seen: dict[str, set[str]] = {}
    while todo:
        name, extras = todo.pop()
        key = canonicalize_name(name)
        if key in found and extras <= extras_seen[key]:
            continue
        dist = found.get(key) or importlib.metadata.distribution(name)
        found[key] = dist
        extras_seen[key] = extras_seen.get(key, set()) | extras
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in extras_seen[key] | {""}):
                todo.append((req.name, set(req.extras)))
    return list(found.values())


def share(site_packages: Path, names: list[str]) -> int:
    """Hard-link (copy where links cannot be made) the files of `names` and what they need, except
    distributions the environment at `site_packages` has already; returns how many files."""
    count = 0
    there = {canonicalize_name(d.metadata["Name"]) for d in importlib.metadata.distributions(path=[str(site_packages)])}
    for dist in closure(names):
        if canonicalize_name(dist.metadata["Name"]) in there:
            continue  # installed there already (pip, setuptools): pip upgrades it where needed
        root = Path(dist.locate_file(""))
        for file in dist.files or []:
            source = Path(dist.locate_file(file))
            if root not in source.resolve().parents or not source.is_file():
                continue  # scripts in bin/ and the like: not needed to import the package
            target = site_packages / file
            target.parent.mkdir(parents=True, exist_ok=True)
            if target.exists():
                continue
            try:
                os.link(source, target)
            except OSError:  # another file system
                shutil.copy2(source, target)
            count += 1
    return count


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    pins = commands.add_parser("pins", help="the core dependencies pinned to their floors")
    pins.add_argument("pyproject", type=Path, nargs="?", default=Path("pyproject.toml"))
    pins.add_argument("--as-installed", action="append", default=[], metavar="NAME")
    shared = commands.add_parser("share", help="link installed distributions into another environment")
    shared.add_argument("site_packages", type=Path)
    shared.add_argument("names", nargs="+")
    args = parser.parse_args()
    if args.command == "pins":
        print("\n".join(floors(args.pyproject, as_installed={canonicalize_name(n) for n in args.as_installed})))
    else:
        print(f"linked {share(args.site_packages, args.names)} files of {', '.join(args.names)} and what they need",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
