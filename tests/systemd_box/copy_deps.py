"""Copy a project's dependencies, as installed here, into another environment's site-packages, offline.

Usage: python copy_deps.py PYPROJECT_TOML TARGET_SITE_PACKAGES

Run with the interpreter whose environment has the dependencies installed (the tests'). The
project's [project] dependencies, as its pyproject.toml declares them now, and everything they
need (extras left out) are copied file by file from their RECORD, dist-info included, so the
target sees properly installed packages. A declared dependency missing here is an error.
Meant for an interpreter of the same Python version and platform (here: the tests' CPython 3.11
copying into a venv of Debian's CPython 3.11), so compiled extensions load as they are.
"""

from __future__ import annotations

import importlib.metadata as md
import re
import shutil
import sys
import tomllib
from pathlib import Path, PurePosixPath

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_closure(roots: list[str]) -> list[md.Distribution]:
    """The installed distributions ``roots`` name and need, directly or not."""
    found: dict[str, md.Distribution] = {}
    for root in roots:
        try:
            md.distribution(root)
        except md.PackageNotFoundError:
            raise SystemExit(f"dependency {root!r} is not installed here (pip install -e .)") from None
    todo = list(roots)
    while todo:
        name = todo.pop()
        key = _canonical(name)
        if key in found:
            continue
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue  # a requirement for another Python or platform: not needed here
        found[key] = dist
        for requirement in dist.requires or []:
            _spec, _, marker = requirement.partition(";")
            if "extra" in marker:
                continue
            match = _NAME.match(requirement.strip())
            if match:
                todo.append(match.group(0))
    return list(found.values())


def declared_dependencies(pyproject: Path) -> list[str]:
    """The names in ``[project] dependencies`` (markers for extras left out)."""
    with pyproject.open("rb") as f:
        project = tomllib.load(f)["project"]
    names = []
    for requirement in project.get("dependencies", []):
        match = _NAME.match(requirement.strip())
        if match and "extra" not in requirement.partition(";")[2]:
            names.append(match.group(0))
    return names


def copy_distribution(dist: md.Distribution, target: Path) -> int:
    copied = 0
    for file in dist.files or []:
        relative = PurePosixPath(str(file))
        if relative.parts[0] == "..":
            continue  # console scripts outside site-packages: not needed to import the package
        source = Path(str(dist.locate_file(file)))
        if not source.is_file():
            continue
        destination = target / relative
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, destination)  # keeps mtimes: the copied .pyc files stay valid
        copied += 1
    return copied


def main() -> int:
    pyproject, target = Path(sys.argv[1]), Path(sys.argv[2])
    if not target.is_dir():
        print(f"{target}: not a directory", file=sys.stderr)
        return 2
    for dist in requirement_closure(declared_dependencies(pyproject)):
        n = copy_distribution(dist, target)
        print(f"{dist.metadata['Name']} {dist.version}: {n} files")
    return 0


if __name__ == "__main__":
    sys.exit(main())
