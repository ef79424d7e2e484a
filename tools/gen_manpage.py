#!/usr/bin/env python3
"""Generate nio-logd's man page and its bash and zsh completions from the argparse definitions.

Usage: python3 tools/gen_manpage.py [--output-dir DIR]

Writes, under DIR (default: share/ at the top of this checkout, where they are committed and from
where the wheel installs them as data files):

    man/man1/nio-logd.1                  the man page (argparse-manpage): every command, its options
                                         and the examples of its --help
    bash-completion/completions/nio-logd bash completion (shtab)
    zsh/site-functions/_nio-logd         zsh completion (shtab)

argparse-manpage and shtab are only needed here (the `test` extra), never at run time.
tests/test_packaging.py runs this script and checks that the committed files are what it writes,
so after changing a command's options or help text, run it and commit the result.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# Help texts are wrapped to the terminal's width (argparse reads $COLUMNS): fixed, so that the
# generated files are the same bytes wherever they are made.
COLUMNS = "80"

MAN_PAGE = Path("man/man1/nio-logd.1")
BASH_COMPLETION = Path("bash-completion/completions/nio-logd")
ZSH_COMPLETION = Path("zsh/site-functions/_nio-logd")
OUTPUTS = (MAN_PAGE, BASH_COMPLETION, ZSH_COMPLETION)

# Arguments that name a file: the shells complete them with file names.
_FILE_METAVARS = {"PATH", "FILE"}

_EXTRA_SECTIONS = (
    (
        "ENVIRONMENT",
        ".TP\n\\fBNIO_LOGD_CONFIG\\fR\nthe config file when \\fB\\-\\-config\\fR is not given",
    ),
    (
        "FILES",
        ".TP\n\\fI/etc/nio\\-logd/nio\\-logd.toml\\fR\nthe config file when neither \\fB\\-\\-config\\fR nor "
        "\\fBNIO_LOGD_CONFIG\\fR is given (without it: the built\\-in defaults)\n"
        ".TP\n\\fI/etc/nio\\-logd/conf.d/*.toml\\fR\ndrop\\-ins merged over the config file, in name order",
    ),
    (
        "EXIT STATUS",
        "0 success, 1 failure, 2 usage or a bad option value, 3 not running, 66 no such input file "
        "(\\fBtail\\fR), 69 cannot bind or open, 78 bad configuration.",
    ),
    ("SEE ALSO", "\\fBsystemctl\\fR(1), \\fBjournalctl\\fR(1), \\fBlogrotate\\fR(8)"),
)


def _roff(line: str) -> str:
    """One line of text as roff prints it, not as requests or escapes."""
    line = line.replace("\\", "\\e").replace("-", "\\-")
    return "\\&" + line if line.startswith((".", "'")) else line


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _examples(epilog: str | None) -> list[str]:
    """The command lines of an ``examples:`` epilog (nio_logd.cli.examples)."""
    if not epilog:
        return []
    lines = epilog.splitlines()
    assert lines[0] == "examples:", f"an epilog that is not examples: {epilog!r}"
    return [line.removeprefix("  ") for line in lines[1:] if line.strip()]


def _mark_files(parser: argparse.ArgumentParser) -> None:
    import shtab

    for action in parser._actions:
        if action.metavar in _FILE_METAVARS:
            action.complete = shtab.FILE  # type: ignore[attr-defined]  # shtab's documented attribute
    for sub in _subcommands(parser).values():
        _mark_files(sub)


def man_page(parser: argparse.ArgumentParser) -> str:
    from argparse_manpage.manpage import Manpage

    from nio_logd import __version__

    # The examples go in one EXAMPLES section, a subsection per command, line by line; as the top
    # level's epilog, argparse-manpage would fill them into one paragraph (COMMENTS).
    examples = [(parser.prog, _examples(parser.epilog))]
    examples += [(f"{parser.prog} {name}", _examples(sub.epilog)) for name, sub in _subcommands(parser).items()]
    parser.epilog = None
    page = Manpage(parser)
    page.date = ""  # reproducible: the version says which release it describes
    page.source = f"nio-logd {__version__}"
    page.manual = "nio-logd manual"
    page.description = "a logging daemon for JSON records"
    blocks = []
    for title, lines in examples:
        if lines:
            blocks.append(".SS " + _roff(title) + "\n.nf\n" + "\n".join(map(_roff, lines)) + "\n.fi")
    page.add_section("EXAMPLES", ">", "\n".join(blocks))
    for heading, content in _EXTRA_SECTIONS:
        page.add_section(heading, ">", content)
    return str(page)


def completion(parser: argparse.ArgumentParser, shell: str) -> str:
    import shtab

    text: str = shtab.complete(parser, shell=shell)
    return text if text.endswith("\n") else text + "\n"


def generate(out_dir: Path) -> list[Path]:
    """Write the three files under ``out_dir``; return their paths."""
    os.environ["COLUMNS"] = COLUMNS
    sys.path.insert(0, str(REPO))  # this checkout's nio_logd, installed or not
    from nio_logd.cli import build_parser

    texts = {MAN_PAGE: man_page(build_parser())}
    parser = build_parser()
    _mark_files(parser)
    texts[BASH_COMPLETION] = completion(parser, "bash")
    texts[ZSH_COMPLETION] = completion(parser, "zsh")
    written = []
    for relative, text in texts.items():
        path = out_dir / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--output-dir", type=Path, default=REPO / "share", help="default: share/ of this checkout")
    args = parser.parse_args()
    for path in generate(args.output_dir):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
