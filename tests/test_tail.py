"""``nio-logd tail``: last N, -f across every kind of rotation, filters, pretty vs JSON, hostile lines.

Every test runs ``nio-logd tail`` as a real process on real files; the -f tests follow the file
of a real daemon while logrotate, the daemon's own rotation, or the test itself rotates it.
"""

from __future__ import annotations

import collections
import json
import os
import pty
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO, DaemonProcess, wait_for, write_config

LOGROTATE = shutil.which("logrotate") or "/usr/sbin/logrotate"
ESC = "\x1b"


# -- helpers -----------------------------------------------------------------------------------------
def daemon_line(i: int, *, user: str = "alice", when: datetime | None = None, msg: str | None = None) -> bytes:
    """A line as the daemon writes it."""
    when = when or datetime(2026, 11, 29, 11, 0, tzinfo=UTC) + timedelta(seconds=i)
    return json.dumps(
        {
            "timestamp": when.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            "level": "info",
            "event": "message",
            "send_user": user,
            "send_time": "2026-11-29T12:00:00",
            "send_msg": msg if msg is not None else f"rid={i} hello",
            "peer": "127.0.0.1:50000",
            "listener": "tcp://127.0.0.1:8888",
        }
    ).encode()


def write_log(path: Path, lines: list[bytes]) -> Path:
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    return path


def run_tail(*args: str, timeout: float = 60, **kw: Any) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "nio_logd", "tail", *args], capture_output=True, timeout=timeout, cwd=REPO, **kw
    )


RID = re.compile(rb'"send_msg": ?"rid=(\d+)')


def rids(output: bytes) -> list[int]:
    return [int(m.group(1)) for m in RID.finditer(output)]


class TailProcess:
    """``nio-logd tail ARGS`` running, its stdout and stderr collected as they come."""

    def __init__(self, *args: str, stdin: Any = None) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "nio_logd", "tail", *args],
            stdin=stdin,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=REPO,
        )
        self.out: list[bytes] = []
        self.err: list[bytes] = []
        self._threads = [
            threading.Thread(target=self._pump, args=(self.proc.stdout, self.out), daemon=True),
            threading.Thread(target=self._pump, args=(self.proc.stderr, self.err), daemon=True),
        ]
        for t in self._threads:
            t.start()

    @staticmethod
    def _pump(stream: Any, into: list[bytes]) -> None:
        for line in stream:
            into.append(line)

    def ids(self) -> collections.Counter[int]:
        return collections.Counter(rids(b"".join(self.out)))

    def stderr(self) -> str:
        return b"".join(self.err).decode(errors="replace")

    def wait_ids(self, expected: range | set[int], timeout: float = 20.0) -> None:
        want = set(expected)
        try:
            wait_for(lambda: want <= self.ids().keys() or self.proc.poll() is not None, timeout)
        except AssertionError:
            missing = sorted(want - self.ids().keys())
            raise AssertionError(f"tail never printed {len(missing)}: {missing[:20]}; {self.stderr()}") from None
        assert self.proc.poll() is None, (self.proc.returncode, self.stderr())

    def wait_notice(self, text: str, count: int = 1, timeout: float = 20.0) -> None:
        wait_for(lambda: self.stderr().count(text) >= count, timeout)

    def interrupt(self) -> int:
        self.proc.send_signal(signal.SIGINT)
        code = self.proc.wait(20)
        self._close()
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._close()

    def _close(self) -> None:
        for t in self._threads:
            t.join(5)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


@pytest.fixture
def tail_factory() -> Iterator[Any]:
    started: list[TailProcess] = []

    def start(*args: str) -> TailProcess:
        t = TailProcess(*args)
        started.append(t)
        return t

    yield start
    for t in started:
        t.kill()


def send(daemon: DaemonProcess, ids: range) -> None:
    """Records whose send_msg is "rid=N hello" for N in ``ids``, on one connection."""
    with socket.create_connection(daemon.tcp, timeout=10) as sock:
        sock.sendall(
            b"".join(
                json.dumps(
                    {"send_user": "alice", "send_time": "2026-11-29 12:00:00", "send_msg": f"rid={i} hello"}
                ).encode()
                + b"\n"
                for i in ids
            )
        )


def lines_in(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def reopened(daemon: DaemonProcess) -> int:
    path = str(daemon.messages)
    return sum(1 for ev in list(daemon.events) if ev.get("event") == "reopened" and ev.get("path") == path)


def assert_once(tail: TailProcess, expected: range) -> None:
    counts = tail.ids()
    assert set(counts) == set(expected), (sorted(set(expected) - set(counts))[:10], sorted(set(counts) - set(expected)))
    assert max(counts.values()) == 1, [i for i, n in counts.items() if n > 1][:10]


# -- last N --------------------------------------------------------------------------------------------
def test_last_n_lines(tmp_path: Path) -> None:
    """-n N prints the last N lines in file order; 10 by default; 0 none; 'all' every one."""
    log = write_log(tmp_path / "m.log", [daemon_line(i) for i in range(100)])
    assert rids(run_tail("-n", "5", str(log)).stdout) == [95, 96, 97, 98, 99]
    assert rids(run_tail(str(log)).stdout) == list(range(90, 100))
    assert run_tail("-n", "0", str(log)).stdout == b""
    assert rids(run_tail("-n", "all", str(log)).stdout) == list(range(100))
    assert rids(run_tail("-n", "500", str(log)).stdout) == list(range(100))


def test_last_n_ignores_a_line_still_being_written(tmp_path: Path) -> None:
    """A last line without its newline yet (a write in progress) is not printed half."""
    log = write_log(tmp_path / "m.log", [daemon_line(i) for i in range(3)])
    with log.open("ab") as f:
        f.write(daemon_line(3)[:40])
    proc = run_tail("-n", "5", str(log))
    assert proc.returncode == 0
    assert rids(proc.stdout) == [0, 1, 2]
    assert b"malformed" not in proc.stdout


def test_last_n_reads_only_the_end_of_a_large_file(tmp_path: Path) -> None:
    """On a 4 GiB file, -n 3 reads a few blocks from the end, not the file (bytes read, from /proc)."""
    log = tmp_path / "big.log"
    with log.open("wb") as f:
        f.truncate(4 << 30)  # sparse: costs no disk, but reading it all would be 4 GiB
        f.seek(0, os.SEEK_END)
        f.write(b"\n" + b"".join(daemon_line(i) + b"\n" for i in range(10)))
    code = (
        "import sys\nfrom nio_logd.cli import main\nrc = main(sys.argv[1:])\nsys.stdout.flush()\n"
        "io = dict(l.split(': ') for l in open('/proc/self/io').read().splitlines())\n"
        "print('READ', io['rchar'], file=sys.stderr)\nsys.exit(rc)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, "tail", "-n", "3", str(log)], capture_output=True, timeout=120, cwd=REPO
    )
    assert proc.returncode == 0, proc.stderr
    assert rids(proc.stdout) == [7, 8, 9]
    read = int(re.search(rb"READ (\d+)", proc.stderr).group(1))  # type: ignore[union-attr]
    assert read < 64 << 20, f"read {read} bytes of a 4 GiB file for 3 lines"


# -- filters ---------------------------------------------------------------------------------------------
def test_filter_user(tmp_path: Path) -> None:
    """--user keeps that user's records; repeated, any of them; -n counts the records kept."""
    users = ["alice", "bob", "carol"]
    log = write_log(tmp_path / "m.log", [daemon_line(i, user=users[i % 3]) for i in range(30)])
    assert rids(run_tail("-n", "all", "--user", "bob", str(log)).stdout) == list(range(1, 30, 3))
    assert rids(run_tail("-n", "2", "--user", "bob", str(log)).stdout) == [25, 28]
    both = rids(run_tail("-n", "all", "--user", "bob", "--user", "carol", str(log)).stdout)
    assert both == [i for i in range(30) if i % 3]
    assert run_tail("--user", "nobody", str(log)).stdout == b""


def test_filter_since_until_absolute(tmp_path: Path) -> None:
    """--since/--until with ISO 8601 (with Z, with an offset) and 'YYYY-MM-DD HH:MM:SS' (local time)."""
    base = datetime(2026, 11, 29, 11, 0, tzinfo=UTC)
    log = write_log(tmp_path / "m.log", [daemon_line(i, when=base + timedelta(minutes=i)) for i in range(60)])
    out = run_tail("--since", "2026-11-29T11:50:00Z", str(log)).stdout
    assert rids(out) == list(range(50, 60))  # all of them: no -n with --since
    out = run_tail("--since", "2026-11-29T12:10:00+01:00", "--until", "2026-11-29T11:15:00Z", str(log)).stdout
    assert rids(out) == list(range(10, 16))
    env = {**os.environ, "TZ": "Asia/Kolkata"}  # +05:30, no DST: 16:35 local is 11:05 UTC
    out = run_tail("--since", "2026-11-29 16:35:00", "--until", "2026-11-29 16:37:00", str(log), env=env).stdout
    assert rids(out) == [5, 6, 7]
    assert rids(run_tail("-n", "2", "--until", "2026-11-29T11:20:00Z", str(log)).stdout) == [19, 20]


def test_filter_since_until_relative(tmp_path: Path) -> None:
    """--since 1h, --until 10m, 1h30m: durations before now."""
    now = datetime.now(UTC)
    ages = [timedelta(days=2), timedelta(hours=2), timedelta(minutes=80), timedelta(minutes=30), timedelta(seconds=5)]
    log = write_log(tmp_path / "m.log", [daemon_line(i, when=now - age) for i, age in enumerate(ages)])
    assert rids(run_tail("--since", "1h", str(log)).stdout) == [3, 4]
    assert rids(run_tail("--since", "1h30m", str(log)).stdout) == [2, 3, 4]
    assert rids(run_tail("--until", "10m", str(log)).stdout) == [0, 1, 2, 3]
    assert rids(run_tail("--since", "1d", "--until", "1h", str(log)).stdout) == [1, 2]
    assert rids(run_tail("--since", "3d", "--until", "60s", str(log)).stdout) == [0, 1, 2, 3]


def test_filter_grep_matches_the_message(tmp_path: Path) -> None:
    """--grep is a regex over send_msg (not the other fields); -i ignores case."""
    lines = [
        daemon_line(0, msg="rid=0 disk FULL on /var"),
        daemon_line(1, msg="rid=1 all good", user="full-user"),  # "full" only in another field
        daemon_line(2, msg="rid=2 disk full again"),
        daemon_line(3, msg="rid=3 diskfull"),
    ]
    log = write_log(tmp_path / "m.log", lines)
    assert rids(run_tail("--grep", r"disk full\b", str(log)).stdout) == [2]
    assert rids(run_tail("--grep", r"disk\s?full", "-i", str(log)).stdout) == [0, 2, 3]
    assert rids(run_tail("--grep", "full", str(log)).stdout) == [2, 3]


def test_filters_combine_and_apply_to_the_rejects_log(daemon_factory: Any, tmp_path: Path) -> None:
    """--rejects reads the config's rejects log; --user finds the user inside the refused input."""
    daemon: DaemonProcess = daemon_factory(write_config(tmp_path))
    with socket.create_connection(daemon.tcp) as sock:
        sock.sendall(
            b'{"send_user": "mallory", "send_time": "not a time", "send_msg": "x"}\n'
            b'{"send_user": "alice", "send_time": "2026-11-29 12:00:00", "send_msg": "rid=1 ok"}\n'
            b'{"send_user": "trudy", "send_time": "2026-11-29 12:00:00"}\n'
        )
    wait_for(lambda: lines_in(daemon.rejects) == 2 and lines_in(daemon.messages) == 1)
    cfg = str(daemon.config)
    rejected = [json.loads(line) for line in run_tail("--config", cfg, "--rejects").stdout.splitlines()]
    assert [r["event"] for r in rejected] == ["rejected", "rejected"]
    mallory = run_tail("--config", cfg, "--rejects", "--user", "mallory").stdout.splitlines()
    assert len(mallory) == 1 and b"not a time" in mallory[0]
    assert rids(run_tail("--config", cfg).stdout) == [1]  # no FILE: the config's messages log
    trudy = run_tail("--config", cfg, "--rejects", "--grep", "tr[u]dy").stdout.splitlines()  # in the raw input
    assert len(trudy) == 1 and b"send_msg" in trudy[0]
    proc = run_tail("--config", cfg, "--rejects", str(daemon.messages))
    assert proc.returncode == 2 and b"not both" in proc.stderr


# -- errors ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--grep", "(unclosed"], 2, "--grep '(unclosed': not a valid regular expression"),
        (["--since", "last tuesday"], 2, "--since 'last tuesday': not a time"),
        (["--until", "2026-13-45"], 2, "--until '2026-13-45': not a time"),
        (["--since", "1h", "--until", "2h"], 2, "is after --until"),
        (["-n", "ten"], 2, "'ten': a number of lines"),
    ],
)
def test_bad_option_values_are_one_line_errors(tmp_path: Path, args: list[str], code: int, message: str) -> None:
    log = write_log(tmp_path / "m.log", [daemon_line(0)])
    proc = run_tail(*args, str(log))
    err = proc.stderr.decode()
    assert proc.returncode == code, err
    assert message in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert proc.stdout == b""


def test_missing_file_without_follow_is_an_error(tmp_path: Path) -> None:
    proc = run_tail(str(tmp_path / "nope.log"))
    assert proc.returncode == 66
    assert proc.stderr.decode() == f"nio-logd tail: {tmp_path / 'nope.log'}: no such file (-f waits for it to appear)\n"


def test_missing_file_with_follow_waits_for_it(tmp_path: Path, tail_factory: Any) -> None:
    log = tmp_path / "later.log"
    tail = tail_factory("-f", str(log))
    tail.wait_notice("waiting for it to appear")
    write_log(log, [daemon_line(i) for i in range(3)])
    tail.wait_ids(range(3))
    assert tail.interrupt() == 130
    assert "Traceback" not in tail.stderr()


# -- output ------------------------------------------------------------------------------------------------
def test_piped_output_is_the_raw_json_lines(tmp_path: Path) -> None:
    """Not a terminal: the lines exactly as in the file; --pretty forces the human form, --color never."""
    lines = [daemon_line(i) for i in range(5)]
    log = write_log(tmp_path / "m.log", lines)
    assert run_tail(str(log)).stdout == b"".join(line + b"\n" for line in lines)
    assert run_tail("--json", str(log)).stdout == b"".join(line + b"\n" for line in lines)
    pretty = run_tail("--pretty", str(log)).stdout.decode()
    assert ESC not in pretty
    first = pretty.splitlines()[0]
    assert first.startswith("2026-11-29T11:00:00.000000Z [info")
    assert "rid=0 hello" in first and "send_user=alice" in first and "{" not in first
    colored = run_tail("--pretty", "--color", "always", str(log)).stdout.decode()
    assert ESC + "[" in colored
    proc = run_tail("--pretty", "--json", str(log))
    assert proc.returncode == 2  # one or the other


def _on_terminal(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    """Run tail with its stdout on a pseudo-terminal; (exit code, what the terminal got)."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "nio_logd", "tail", *args],
        stdout=slave,
        stderr=subprocess.PIPE,
        cwd=REPO,
        env={k: v for k, v in os.environ.items() if k != "NO_COLOR"} | {"TERM": "xterm"} | (env or {}),
    )
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    code = proc.wait(30)
    assert proc.stderr is not None
    err = proc.stderr.read()
    proc.stderr.close()
    assert err == b"", err
    return code, b"".join(chunks).decode()


def test_terminal_gets_pretty_colours(tmp_path: Path) -> None:
    """On a terminal: structlog's console form with colours; NO_COLOR turns them off; --json stays JSON."""
    log = write_log(tmp_path / "m.log", [daemon_line(i) for i in range(3)])
    code, screen = _on_terminal("-n", "2", str(log))
    assert code == 0
    assert ESC + "[" in screen
    plain = re.sub(ESC + r"\[[0-9;]*m", "", screen).splitlines()
    assert len(plain) == 2
    assert plain[0].startswith("2026-11-29T11:00:01.000000Z [info") and "rid=1 hello" in plain[0]
    assert "send_user=alice" in plain[1]
    code, screen = _on_terminal("-n", "2", str(log), env={"NO_COLOR": "1"})
    assert code == 0 and ESC not in screen and "rid=2 hello" in screen
    code, screen = _on_terminal("-n", "1", "--json", str(log))
    assert json.loads(screen)["send_msg"] == "rid=2 hello"


def test_malformed_lines_are_shown_as_such(tmp_path: Path) -> None:
    """Not JSON, not UTF-8, a JSON array, a 17 MiB line, terminal escapes: shown, marked, no crash."""
    hostile = [
        daemon_line(0),
        b"this is not json",
        b'{"send_msg": "\xff\xfe"}',
        b"[1, 2, 3]",
        b'"just a string"',
        b"{" * 5000 + b"}" * 5000,
        b"x" * (17 << 20),
        daemon_line(1, msg="rid=1 \x1b]0;owned\x07\x1b[2J clear screen \u202e"),
        json.dumps({"timestamp": ["no"], "level": {"a": 1}, "event": 5, "exc_info": True, "stack": 1}).encode(),
        daemon_line(2),
    ]
    log = write_log(tmp_path / "m.log", hostile)
    proc = run_tail("-n", "all", str(log))
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == b""
    out = [json.loads(line) for line in proc.stdout.splitlines()]  # still JSON lines, every one
    assert len(out) == 10
    assert [o.get("malformed", False) for o in out] == [False, True, True, True, True, True, True, False, False, False]
    errors = [o["error"] for o in out if o.get("malformed")]
    assert errors[0].startswith("not JSON")
    assert errors[1] == "not UTF-8 (byte 14)"
    assert errors[2] == "JSON an array, not an object"
    assert errors[3] == "JSON a string, not an object"
    assert errors[4].startswith("not JSON")
    assert errors[5].startswith("line too long (17825792 bytes")
    assert out[6]["bytes"] == 17 << 20 and len(out[6]["raw"]) < 10_000

    pretty = run_tail("-n", "all", "--pretty", "--color", "always", str(log))
    assert pretty.returncode == 0, pretty.stderr
    text = pretty.stdout.decode()
    assert text.count("[malformed]") == 6
    assert "\x07" not in text and "\x1b]" not in text and "\x1b[2J" not in text and "\u202e" not in text
    assert "\\x1b]0;owned\\x07" in text and "\\u202e" in text
    assert all(ord(c) >= 0x20 or c in "\n\x1b" for c in text)
    assert len(text.splitlines()) == 10
    # -n from the end crosses the huge line too
    assert rids(run_tail("-n", "4", str(log)).stdout) == [1, 2]


def test_tail_into_head_has_no_traceback(tmp_path: Path) -> None:
    """`nio-logd tail | head -1`: the closed pipe ends tail quietly."""
    log = write_log(tmp_path / "m.log", [daemon_line(i) for i in range(200_000)])
    cmd = f"{sys.executable} -m nio_logd tail -n all --pretty {log} | head -n 1"
    proc = subprocess.run(["sh", "-c", cmd], capture_output=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0
    assert proc.stdout.decode().count("\n") == 1 and "rid=0 hello" in proc.stdout.decode()
    assert proc.stderr == b"", proc.stderr.decode()


def test_ctrl_c_exits_quietly(tmp_path: Path, tail_factory: Any) -> None:
    log = write_log(tmp_path / "m.log", [daemon_line(0)])
    tail = tail_factory("-f", str(log))
    tail.wait_ids({0})
    assert tail.interrupt() == 130
    assert tail.stderr() == ""


# -- follow --------------------------------------------------------------------------------------------------
def test_follow_prints_appended_lines_and_malformed_ones(tmp_path: Path, tail_factory: Any) -> None:
    log = write_log(tmp_path / "m.log", [daemon_line(i) for i in range(5)])
    tail = tail_factory("-f", "-n", "2", str(log))
    tail.wait_ids({3, 4})
    with log.open("ab") as f:
        f.write(daemon_line(5) + b"\n" + b"garbage\xff\n")
        f.flush()
        f.write(daemon_line(6)[:30])  # half a line: printed only once complete
        f.flush()
        tail.wait_ids({5})
        f.write(daemon_line(6)[30:] + b"\n")
    tail.wait_ids({6})
    out = b"".join(tail.out)
    assert rids(out) == [3, 4, 5, 6]
    assert b'"malformed":true' in out and b'"error":"not UTF-8 (byte 7)"' in out


def test_follow_across_rename_and_create_by_hand(daemon_factory: Any, tmp_path: Path, tail_factory: Any) -> None:
    """mv + new file + (later) SIGHUP: the lines the daemon still writes to the old file after the
    new one appeared are printed too, then those in the new file; each once."""
    daemon: DaemonProcess = daemon_factory(write_config(tmp_path))
    tail = tail_factory("-f", "-n", "all", str(daemon.messages))
    send(daemon, range(1))
    tail.wait_ids(range(1))
    os.rename(daemon.messages, daemon.messages.with_name("messages.log.1"))
    send(daemon, range(1, 11))  # into the renamed file (the daemon has not reopened)
    tail.wait_ids(range(1, 11))
    daemon.messages.touch(mode=0o640)
    tail.wait_notice("replaced by a new file")
    send(daemon, range(11, 21))  # still into the renamed file: tail must keep reading it
    tail.wait_ids(range(11, 21))
    daemon.signal(signal.SIGHUP)
    wait_for(lambda: reopened(daemon) == 1)
    send(daemon, range(21, 31))  # into the new file
    tail.wait_ids(range(21, 31))
    assert lines_in(daemon.messages) == 10
    assert_once(tail, range(31))


@pytest.mark.skipif(not Path(LOGROTATE).exists(), reason="logrotate is not installed")
@pytest.mark.parametrize("method", ["create", "copytruncate"])
def test_follow_across_logrotate_under_load(
    daemon_factory: Any, tmp_path: Path, tail_factory: Any, method: str
) -> None:
    """logrotate 3 times while records stream in (create + HUP, or copytruncate): tail -f prints each once."""
    from tests.test_rotation import logrotate_config, run_logrotate

    daemon: DaemonProcess = daemon_factory(write_config(tmp_path))
    conf = logrotate_config(tmp_path, daemon.messages.parent, method=method, pid=daemon.pid)
    tail = tail_factory("-f", "-n", "all", str(daemon.messages))
    send(daemon, range(1))
    tail.wait_ids(range(1))
    total = 6001
    stop = threading.Event()

    def stream() -> None:
        for start in range(1, total, 100):
            send(daemon, range(start, start + 100))
            time.sleep(0.02)
        stop.set()

    sender = threading.Thread(target=stream, daemon=True)
    sender.start()
    notice = "replaced by a new file" if method == "create" else "truncated"
    for k in range(1, 4):
        tail.wait_ids(range(k * 1000))  # records are flowing, and tail has seen the last rotation
        tail.wait_notice(notice, k - 1)
        run_logrotate(tmp_path, conf)
        if method == "create":
            wait_for(lambda k=k: reopened(daemon) == k, timeout=30)  # type: ignore[misc]
    tail.wait_notice(notice, 3)
    assert stop.wait(60)
    sender.join(10)
    tail.wait_ids(range(total), timeout=30)
    time.sleep(0.5)  # a last look: anything printed twice shows up late
    assert_once(tail, range(total))


def test_follow_across_truncation_by_hand(daemon_factory: Any, tmp_path: Path, tail_factory: Any) -> None:
    """The file emptied under tail: it starts again from the top; nothing old is printed again."""
    daemon: DaemonProcess = daemon_factory(write_config(tmp_path))
    tail = tail_factory("-f", "-n", "all", str(daemon.messages))
    send(daemon, range(10))
    tail.wait_ids(range(10))
    os.truncate(daemon.messages, 0)
    tail.wait_notice("truncated")
    send(daemon, range(10, 20))
    tail.wait_ids(range(10, 20))
    assert_once(tail, range(20))


def test_follow_truncated_file_that_grew_back_past_where_tail_was(
    daemon_factory: Any, tmp_path: Path, tail_factory: Any
) -> None:
    """Truncated, then longer than before by tail's next look (tail stopped meanwhile): seen, read again."""
    daemon: DaemonProcess = daemon_factory(write_config(tmp_path))
    tail = tail_factory("-f", "-n", "all", str(daemon.messages))
    send(daemon, range(10))
    tail.wait_ids(range(10))
    size = daemon.messages.stat().st_size
    tail.proc.send_signal(signal.SIGSTOP)
    try:
        os.truncate(daemon.messages, 0)
        send(daemon, range(10, 40))
        wait_for(lambda: daemon.messages.stat().st_size > size and lines_in(daemon.messages) == 30)
    finally:
        tail.proc.send_signal(signal.SIGCONT)
    tail.wait_ids(range(10, 40))
    assert_once(tail, range(40))


def test_follow_across_builtin_rotation(daemon_factory: Any, tmp_path: Path, tail_factory: Any) -> None:
    """The daemon's own size rotation (rename, new file) many times: every record printed once."""
    daemon: DaemonProcess = daemon_factory(write_config(tmp_path, log={"rotate_bytes": 20_000, "rotate_keep": 100}))
    tail = tail_factory("-f", "-n", "all", str(daemon.messages))
    send(daemon, range(1))
    tail.wait_ids(range(1))
    for start in range(1, 2001, 50):
        send(daemon, range(start, start + 50))
        time.sleep(0.005)
    tail.wait_ids(range(2001), timeout=30)
    rotations = sum(1 for ev in list(daemon.events) if ev.get("event") == "rotated")
    assert rotations >= 10
    assert_once(tail, range(2001))
