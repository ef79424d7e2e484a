"""Packaging: an install from a read-only checkout, the wheel's contents and metadata, the generated
man page and completions (up to date with the argparse definitions), the examples of --help."""

from __future__ import annotations

import hashlib
import os
import shlex
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import REPO

from nio_logd import __version__
from nio_logd.cli import build_parser

DATA = f"nio_logd-{__version__}.data/data/"
DIST_INFO = f"nio_logd-{__version__}.dist-info/"
GENERATED = (
    "share/man/man1/nio-logd.1",
    "share/bash-completion/completions/nio-logd",
    "share/zsh/site-functions/_nio-logd",
)
COMMANDS = ("run", "start", "stop", "status", "reload", "reopen", "check-config", "send", "tail", "bench")
# What `pip install .` reads from a checkout (hatchling's wheel: pyproject.toml, the readme and the
# license for the metadata, the package, the generated data files).
PACKAGING_INPUTS = ("pyproject.toml", "README.md", "LICENSE", "nio_logd", "share")


def _package_files(root: Path) -> set[str]:
    """The files of the package as a wheel holds them (no byte code)."""
    return {
        p.relative_to(root).as_posix()
        for p in (root / "nio_logd").rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }


def _snapshot(root: Path) -> dict[str, tuple[int, str]]:
    """Every path under ``root`` with its mode and (for a file) the digest of its bytes."""
    out = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else ""
        out[p.relative_to(root).as_posix()] = (st.st_mode, digest)
    return out


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel, built from this checkout as `python3 -m build --wheel` builds it."""
    out = tmp_path_factory.mktemp("wheel")
    built = subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--outdir", str(out), str(REPO)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    (path,) = out.glob("nio_logd-*.whl")
    return path


# -- (a) pip install from a read-only checkout --------------------------------------------------------
@pytest.fixture
def read_only_checkout(tmp_path: Path) -> Iterator[Path]:
    """A copy of the packaging inputs, behind a read-only bind mount (root ignores mode bits)."""
    if os.geteuid() != 0:
        pytest.skip("needs root: a read-only bind mount")
    src, ro = tmp_path / "src", tmp_path / "ro"
    src.mkdir()
    ro.mkdir()
    for name in PACKAGING_INPUTS:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(REPO / name, src / name)
    subprocess.run(["mount", "--bind", str(src), str(ro)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(ro)], check=True)
        yield ro
    finally:
        subprocess.run(["umount", str(ro)], check=True)


@pytest.mark.root
@pytest.mark.slow
def test_pip_install_from_a_read_only_checkout(read_only_checkout: Path, tmp_path: Path) -> None:
    """`pip install .` of a checkout that cannot be written succeeds and writes nothing into it
    (setuptools wrote nio_logd.egg-info there and failed)."""
    ro = read_only_checkout
    with pytest.raises(OSError):
        (ro / "probe").write_text("")  # the mount really refuses writes, even root's
    before = _snapshot(ro)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    installed = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "--no-deps", "--disable-pip-version-check", str(ro)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=600,
    )
    assert installed.returncode == 0, installed.stdout[-3000:] + installed.stderr[-3000:]
    assert _snapshot(ro) == before
    assert not (ro / "nio_logd.egg-info").exists() and not (ro / "build").exists()
    site = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert _package_files(Path(site)) == _package_files(REPO)
    assert (Path(site) / "nio_logd" / "cli.py").read_bytes() == (REPO / "nio_logd" / "cli.py").read_bytes()
    assert (venv / "bin" / "nio-logd").is_file()
    for name in GENERATED:  # the data files, under the environment's prefix
        assert (venv / name).read_bytes() == (REPO / name).read_bytes(), name


# -- (b) the wheel ------------------------------------------------------------------------------------
@pytest.mark.slow
def test_the_wheel_holds_the_package_the_man_page_and_the_completions(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        for name in GENERATED:
            assert DATA + name in names, sorted(names)
            assert z.read(DATA + name) == (REPO / name).read_bytes(), name
        assert {n for n in names if n.startswith("nio_logd/")} == _package_files(REPO)
        assert {n for n in names if not n.startswith(("nio_logd/", DIST_INFO))} == {DATA + n for n in GENERATED}
        metadata = z.read(DIST_INFO + "METADATA").decode().split("\n\n", 1)[0].splitlines()
        assert "License-Expression: MIT" in metadata
        assert "License-File: LICENSE" in metadata
        assert not [line for line in metadata if line.startswith("License:")]  # the deprecated table's field
        assert z.read(DIST_INFO + "licenses/LICENSE") == (REPO / "LICENSE").read_bytes()
        entry_points = z.read(DIST_INFO + "entry_points.txt").decode()
        assert "[console_scripts]\nnio-logd = nio_logd.cli:run\n" in entry_points


def test_the_license_is_mit() -> None:
    text = (REPO / "LICENSE").read_text()
    assert text.startswith("MIT License\n\nCopyright (c) 2026 the nio-logd authors\n")
    assert 'THE SOFTWARE IS PROVIDED "AS IS"' in text


# -- (c) the generated files --------------------------------------------------------------------------
def test_the_man_page_and_the_completions_are_up_to_date(tmp_path: Path) -> None:
    """tools/gen_manpage.py writes the same bytes as committed under share/: after a change of the
    options or their help, run `python3 tools/gen_manpage.py` and commit what it wrote."""
    out = subprocess.run(
        [sys.executable, str(REPO / "tools" / "gen_manpage.py"), "--output-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "137"},  # the script fixes the width itself
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    for name in GENERATED:
        fresh = tmp_path / name.removeprefix("share/")
        assert fresh.read_bytes() == (REPO / name).read_bytes(), f"{name} is stale: run python3 tools/gen_manpage.py"


def _roff(text: str) -> str:
    return text.replace("\\", "\\e").replace("-", "\\-")


def test_the_man_page_has_every_command_its_options_and_examples() -> None:
    page = (REPO / "share/man/man1/nio-logd.1").read_text()
    assert page.startswith('.TH NIO\\-LOGD "1"')
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.choices and a.dest == "command")
    assert set(subparsers.choices) == set(COMMANDS)
    for name, sub in subparsers.choices.items():
        assert f".SH COMMAND \\fI\\,'nio\\-logd {_roff(name)}'\\/\\fR" in page, name
        for action in sub._actions:
            for option in action.option_strings:
                if option not in ("-h", "--help"):
                    assert f"\\fB{_roff(option)}\\fR" in page, (name, option)
        assert f".SS nio\\-logd {_roff(name)}\n.nf\n" in page, name
        for line in sub.epilog.splitlines()[1:]:
            assert _roff(line.strip()) in page, (name, line)
    assert ".SH EXAMPLES" in page


def test_the_completions_know_every_command() -> None:
    bash = (REPO / "share/bash-completion/completions/nio-logd").read_text()
    zsh = (REPO / "share/zsh/site-functions/_nio-logd").read_text()
    assert "complete " in bash and "nio-logd" in bash
    assert zsh.startswith("#compdef nio-logd")
    for name in COMMANDS:
        assert name in bash and name in zsh, name
    assert "--grep" in bash and "--record-bytes" in zsh


# -- (d) --help gives examples ------------------------------------------------------------------------
def _help(*args: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "nio_logd", *args, "--help"], capture_output=True, text=True, cwd=REPO, timeout=60
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def _examples(text: str) -> list[str]:
    assert "\nexamples:\n" in text, text
    block = text.split("\nexamples:\n", 1)[1]
    lines = [line for line in block.splitlines() if line.strip()]
    assert lines and all(line.startswith("  ") for line in lines), lines
    return [line.strip() for line in lines]


@pytest.mark.parametrize("command", ["", *COMMANDS])
def test_help_ends_with_examples_that_parse(command: str) -> None:
    """`nio-logd [COMMAND] --help` ends with examples; each nio-logd command in them is accepted
    by the parser (an option renamed or mistyped in an example fails here)."""
    examples = _examples(_help(*([command] if command else [])))
    assert any(f"nio-logd {command}" in line for line in examples), examples
    checked = 0
    for line in examples:
        if "COMMAND" in line:
            continue  # `nio-logd COMMAND --help`: a placeholder
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        lexer.commenters = "#"
        words: list[str] = []
        for token in [*lexer, "|"]:
            if token not in ("|", "||", "&&", ";", ">"):
                words.append(token)
                continue
            while words and "=" in words[0] and not words[0].startswith("-"):
                words.pop(0)  # VAR=value before the command
            if words[:1] == ["nio-logd"] or words[:3] == ["python3", "-m", "nio_logd"]:
                argv = words[1:] if words[0] == "nio-logd" else words[3:]
                try:
                    build_parser().parse_args(argv)
                except SystemExit as exc:
                    pytest.fail(f"example {line!r}: {argv} exits {exc.code}")
                checked += 1
            words = []
    assert checked >= 2, examples


def test_help_and_send_help_print_examples() -> None:
    assert any(line.startswith('nio-logd send --user alice --msg "hello"') for line in _examples(_help()))
    send = _examples(_help("send"))
    assert 'nio-logd send --user alice --msg "hello"' in send
    assert any(line.endswith("| nio-logd send") for line in send), send
