"""``nio-logd tail`` on hostile files (finding 11): deep nesting, FIFOs, folders and devices at the
path, control and bidi characters on a terminal.

Real files, real ``nio-logd tail`` processes, a real FIFO and a real pseudo-terminal; every wait
has a timeout and every process a test starts is killed at its end.
"""

from __future__ import annotations

import json
import os
import pty
import re
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tests.conftest import REPO, wait_for
from tests.test_tail import (  # noqa: F401 - tail_factory is a fixture
    TailProcess,
    daemon_line,
    rids,
    run_tail,
    tail_factory,
    write_log,
)

# What must never reach a terminal raw: C0 (newline included: it separates lines), DEL, C1,
# the line/paragraph separators and the bidi controls.
UNSAFE = (
    [chr(c) for c in range(0x20)]
    + ["\x7f"]
    + [chr(c) for c in range(0x80, 0xA0)]
    + ["\u2028", "\u2029", "\u061c", "\u200e", "\u200f"]
    + [chr(c) for c in range(0x202A, 0x202F)]
    + [chr(c) for c in range(0x2066, 0x206A)]
)
NOT_C0 = [c for c in UNSAFE if ord(c) >= 0x20]
SGR = re.compile("\x1b\\[[0-9;]*m")


def raw_unsafe(text: str) -> list[str]:
    """The unsafe characters in ``text`` other than the newlines ending its lines, as code points."""
    return sorted({f"U+{ord(c):04X}" for c in text if c in UNSAFE and c != "\n"})


def on_terminal(*args: str, timeout: float = 30.0) -> tuple[int, str, bytes]:
    """Run tail with stdout on a real pseudo-terminal: (exit code, what the terminal got, stderr)."""
    master, slave = pty.openpty()
    env = {k: v for k, v in os.environ.items() if k != "NO_COLOR"} | {"TERM": "xterm"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "nio_logd", "tail", *args], stdout=slave, stderr=subprocess.PIPE, cwd=REPO, env=env
    )
    os.close(slave)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            assert left > 0, f"tail {args} did not finish writing to the terminal in {timeout} s"
            ready, _, _ = select.select([master], [], [], left)
            if not ready:
                continue
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        code = proc.wait(timeout)
        assert proc.stderr is not None
        err = proc.stderr.read()
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        if proc.stderr is not None:
            proc.stderr.close()
    # The terminal's line discipline turns each "\n" into "\r\n" (onlcr); any other "\r" is tail's.
    return code, b"".join(chunks).decode().replace("\r\n", "\n"), err


def one_line_error(proc: subprocess.CompletedProcess[bytes]) -> str:
    err = proc.stderr.decode()
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def nested(depth: int) -> str:
    return '{"a":' * depth + "1" + "}" * depth


# -- deep nesting ----------------------------------------------------------------------------------------
def test_tail_hostile_deeply_nested_line(tmp_path: Path, tail_factory: Any) -> None:
    """A record nested 300 deep (orjson cannot write it back), 1,000 deep (nor can json.dumps) and
    100,000 deep (nor parse it): shown, no traceback, pretty and JSON, reading and following."""
    record = {"timestamp": "2026-11-29T11:00:00.500000Z", "level": "info", "event": "message", "send_user": "eve"}
    shallow = json.dumps(record | {"send_msg": "rid=100 deep"})[:-1] + ', "deep": ' + nested(300) + "}"
    deep = json.dumps(record | {"send_msg": "rid=101 deeper"})[:-1] + ', "deep": ' + nested(1000) + "}"
    deepest = nested(100_000)
    lines = [daemon_line(0), shallow.encode(), deep.encode(), deepest.encode(), daemon_line(1)]
    log = write_log(tmp_path / "m.log", lines)

    proc = run_tail("-n", "all", "--pretty", "--color", "never", str(log))
    assert proc.returncode == 0 and proc.stderr == b"", proc.stderr.decode()[-2000:]
    out = proc.stdout.decode().splitlines()
    assert len(out) == 5
    assert "rid=0 hello" in out[0] and "rid=1 hello" in out[4]
    assert "rid=100 deep" in out[1] and "deep=" in out[1] and nested(300) in out[1]  # the json fallback writes it
    assert "rid=101 deeper" in out[2] and '{"a":{"a":' in out[2]  # too deep for either: the line as text
    assert out[2].startswith("[too deep] JSON nested too deeply to show as fields: {")
    assert out[3].startswith("[malformed] not JSON")
    assert all(len(line) < 20_000 for line in out)

    piped = run_tail("-n", "all", "--json", str(log))
    assert piped.returncode == 0 and piped.stderr == b""
    assert piped.stdout.splitlines()[:3] == lines[:3]  # JSON mode: the lines as they are

    tail = tail_factory("-f", "-n", "1", "--pretty", "--color", "never", str(log))
    wait_for(lambda: b"rid=1 hello" in b"".join(tail.out) or tail.proc.poll() is not None, 20)
    with log.open("ab") as f:
        f.write(deep.encode() + b"\n" + daemon_line(2) + b"\n")
    wait_for(lambda: b"rid=2 hello" in b"".join(tail.out) or tail.proc.poll() is not None, 20)
    assert tail.proc.poll() is None, tail.stderr()[-2000:]
    followed = b"".join(tail.out).decode().splitlines()
    assert len(followed) == 3 and "rid=101 deeper" in followed[1] and "rid=2 hello" in followed[2]
    assert tail.stderr() == ""


# -- what the path is ------------------------------------------------------------------------------------
def test_tail_hostile_follow_path_becomes_folder(tmp_path: Path, tail_factory: Any) -> None:
    """-f: the path turns into a folder: a notice, the old file still read, then the regular file
    that comes back is followed. -f on a folder from the start waits the same way."""
    log = write_log(tmp_path / "m.log", [daemon_line(i) for i in range(3)])
    tail = tail_factory("-f", str(log))
    tail.wait_ids(range(3))
    os.rename(log, tmp_path / "m.log.old")
    log.mkdir()
    tail.wait_notice(f"{log}: a directory, not a regular file; waiting for a regular file", timeout=10)
    with (tmp_path / "m.log.old").open("ab") as f:  # a daemon that has not reopened yet
        f.write(daemon_line(3) + b"\n")
    tail.wait_ids({3})
    time.sleep(0.5)  # several looks at the folder: one notice only
    assert tail.stderr().count("not a regular file") == 1, tail.stderr()
    log.rmdir()
    write_log(log, [daemon_line(4)])
    tail.wait_ids({4})
    assert "Traceback" not in tail.stderr()
    assert tail.interrupt() == 130

    folder = tmp_path / "later.log"
    folder.mkdir()
    waiting = tail_factory("-f", str(folder))
    waiting.wait_notice("a directory, not a regular file; waiting for a regular file", timeout=10)
    assert waiting.proc.poll() is None, waiting.stderr()
    folder.rmdir()
    write_log(folder, [daemon_line(5)])
    waiting.wait_ids({5})
    waiting.wait_notice("has appeared; following it")
    assert waiting.interrupt() == 130
    assert "Traceback" not in waiting.stderr()

    log.unlink()  # without -f, a folder is a one-line error, exit 66
    log.mkdir()
    proc = run_tail(str(log), timeout=20)
    assert proc.returncode == 66 and proc.stdout == b""
    assert one_line_error(proc) == f"nio-logd tail: {log}: a directory, not a regular file\n"


def test_tail_hostile_fifo_does_not_hang(tmp_path: Path, tail_factory: Any) -> None:
    """A FIFO with no writer at the path: refused at once without -f; with -f a notice, and the
    regular file that replaces it is followed; the path turning into a FIFO while following too."""
    fifo = tmp_path / "m.log"
    os.mkfifo(fifo)
    proc = run_tail(str(fifo), timeout=20)  # TimeoutExpired (the child killed) if open() blocks
    assert proc.returncode == 66 and proc.stdout == b""
    assert one_line_error(proc) == f"nio-logd tail: {fifo}: a FIFO, not a regular file\n"

    tail = tail_factory("-f", str(fifo))
    tail.wait_notice(f"{fifo}: a FIFO, not a regular file; waiting for a regular file", timeout=10)
    fifo.unlink()
    write_log(fifo, [daemon_line(0)])
    tail.wait_ids({0})
    os.rename(fifo, tmp_path / "m.log.1")
    os.mkfifo(fifo)
    tail.wait_notice(f"{fifo}: a FIFO, not a regular file; waiting for a regular file", count=2, timeout=10)
    fifo.unlink()
    write_log(fifo, [daemon_line(1)])
    tail.wait_ids({1})
    tail.wait_notice("replaced by a new file")
    assert "Traceback" not in tail.stderr()
    assert tail.interrupt() == 130


def test_tail_hostile_device_is_refused(tmp_path: Path) -> None:
    """A character device (/dev/null, /dev/zero: endless) is not read as a log."""
    for device in ("/dev/null", "/dev/zero"):
        proc = run_tail(device, timeout=20)
        assert proc.returncode == 66 and proc.stdout == b""
        assert one_line_error(proc) == f"nio-logd tail: {device}: a character device, not a regular file\n"


def test_tail_hostile_follow_rotation_skips_fifo_neighbour(tmp_path: Path, tail_factory: Any) -> None:
    """Looking for rotated files (PATH.1, PATH.2...) after a rotation does not block on a FIFO there."""
    log = write_log(tmp_path / "m.log", [daemon_line(0)])
    tail = tail_factory("-f", str(log))
    tail.wait_ids({0})
    os.mkfifo(tmp_path / "m.log.1")
    with log.open("ab") as f:
        f.write(daemon_line(1) + b"\n")
    os.rename(log, tmp_path / "m.log.2")
    write_log(log, [daemon_line(2)])
    tail.wait_ids({1, 2}, timeout=10)
    assert rids(b"".join(tail.out)) == [0, 1, 2]


def test_tail_hostile_follow_truncation_skips_fifo_neighbour(tmp_path: Path, tail_factory: Any) -> None:
    """Looking for a copytruncate copy after a truncation does not block on a FIFO beside the log."""
    log = write_log(tmp_path / "m.log", [daemon_line(i) for i in range(3)])
    tail = tail_factory("-f", str(log))
    tail.wait_ids(range(3))
    shutil.copyfile(log, tmp_path / "m.log-20261129")
    fifo = tmp_path / "m.log-copy.fifo"
    os.mkfifo(fifo)
    later = time.time() + 60
    os.utime(fifo, (later, later))  # the newest entry: the first one looked at
    os.truncate(log, 0)
    write_log(log, [daemon_line(3)])
    tail.wait_ids({3}, timeout=10)
    tail.wait_notice("truncated")
    assert rids(b"".join(tail.out)) == [0, 1, 2, 3]


# -- control and bidi characters -------------------------------------------------------------------------
def hostile_text() -> str:
    return "".join(UNSAFE) + " end"


def test_tail_hostile_pretty_escapes_bidi(tmp_path: Path) -> None:
    """Pretty output, piped and on a terminal: every control and bidi character (U+061C included)
    in values, keys and malformed lines is escaped visibly; one screen line per file line."""
    bad = hostile_text()
    record = json.loads(daemon_line(0, msg="rid=0 " + bad))
    record[bad] = bad
    record["level"] = bad
    lines = [
        json.dumps(record, ensure_ascii=False).encode(),
        b"not json " + bad.replace("\n", "").encode() + b" \xff",
        daemon_line(1),
    ]
    log = write_log(tmp_path / "m.log", lines)

    piped = run_tail("-n", "all", "--pretty", "--color", "never", str(log))
    assert piped.returncode == 0 and piped.stderr == b""
    code, screen, err = on_terminal("-n", "all", str(log))
    assert code == 0 and err == b""
    assert "\x1b[" in screen  # coloured, as on any terminal
    for text in (piped.stdout.decode(), SGR.sub("", screen)):
        assert raw_unsafe(text) == []
        assert len(text.splitlines()) == 3
        assert "\\u061c" in text and "\\u202e" in text and "\\u2066" in text and "\\u200f" in text
        assert "\\x85" in text and "\\x7f" in text and "\\x1b" in text and "\\n" in text
        assert "rid=0" in text and "[malformed]" in text and "rid=1 hello" in text


def test_tail_hostile_json_on_terminal_escapes_controls(tmp_path: Path) -> None:
    """--json on a terminal: DEL, C1, U+2028 and bidi characters are written as \\u escapes, raw
    tabs and carriage returns between tokens as spaces; every line is still the same JSON."""
    bad = "".join(NOT_C0)
    lines = [
        json.dumps(json.loads(daemon_line(0, msg="rid=0 " + bad + "\n\x1b[2J")) | {bad: bad}, ensure_ascii=False),
        '{"send_user": "bob",\t"send_msg": "rid=1 tab"\r}',
        "not json \x1b[2J " + bad,
    ]
    log = write_log(tmp_path / "m.log", [line.encode() for line in lines] + [b"\xff\xfe \x85 not UTF-8"])
    assert any(c in log.read_text(errors="replace") for c in NOT_C0)  # the file does hold them raw
    code, screen, err = on_terminal("-n", "all", "--json", str(log))
    assert code == 0 and err == b""
    assert raw_unsafe(screen) == []
    out = [json.loads(line) for line in screen.splitlines()]
    assert len(out) == 4
    assert out[0] == json.loads(lines[0])  # the same values, only written differently
    assert out[1] == json.loads(lines[1])
    assert out[2]["malformed"] is True and out[2]["raw"] == lines[2]
    assert out[3]["malformed"] is True and out[3]["error"] == "not UTF-8 (byte 0)"
    assert "\\u202e" in screen and "\\u0085" in screen and "\\u2028" in screen and "\\u061c" in screen


def test_tail_hostile_piped_json_byte_exact(tmp_path: Path, tail_factory: Any) -> None:
    """Piped, the JSON lines stay byte for byte as in the file, hostile characters, raw
    whitespace and deep nesting included, whether read or followed."""
    bad = "".join(NOT_C0)
    lines = [
        json.dumps(json.loads(daemon_line(0, msg="rid=0 " + bad)) | {bad: bad}, ensure_ascii=False).encode(),
        b'{"send_user": "bob",\t"send_msg": "rid=1 tab"\r}',
        b'{"send_msg": "rid=2 deep", "deep": ' + nested(1000).encode() + b"}",
        b'{"send_msg": "rid=3 big", "n": ' + b"9" * 100 + b"}",
    ]
    log = write_log(tmp_path / "m.log", lines)
    expected = b"".join(line + b"\n" for line in lines)
    for args in (["-n", "all"], ["-n", "all", "--json"]):
        proc = run_tail(*args, str(log))
        assert proc.returncode == 0 and proc.stderr == b""
        assert proc.stdout == expected

    tail = tail_factory("-f", "--json", str(tmp_path / "later.log"))
    tail.wait_notice("waiting for it to appear")
    (tmp_path / "later.log").write_bytes(expected)
    wait_for(lambda: len(b"".join(tail.out)) >= len(expected) or tail.proc.poll() is not None, 20)
    assert b"".join(tail.out) == expected, tail.stderr()
