"""``nio-logd tail``, more: compressed rotated files, ``-`` for stdin, a last line without a newline,
and ``-f`` waiting on inotify instead of polling.

Real files in tmp_path (compressed ones made with the stdlib's gzip, bz2 and lzma), real
``nio-logd tail`` processes, stdin through real pipes, and the idle cost of ``tail -f`` read from
/proc (CPU time and the number of times the process went to sleep and woke up). Every wait has a
timeout and every process a test starts is killed at its end.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO, wait_for
from tests.test_tail import (  # noqa: F401 - tail_factory is a fixture
    TailProcess,
    daemon_line,
    rids,
    run_tail,
    tail_factory,
    write_log,
)

OPENERS: dict[str, Callable[..., Any]] = {"gz": gzip.open, "bz2": bz2.open, "xz": lzma.open}
NO_NEWLINE = "the last line has no newline at its end; printed as it is"


def write_compressed(path: Path, data: bytes) -> Path:
    ext = path.suffix.lstrip(".")
    with OPENERS[ext](path, "wb") as f:
        f.write(data)
    return path


def lines_bytes(lines: list[bytes]) -> bytes:
    return b"".join(line + b"\n" for line in lines)


def one_line_error(proc: subprocess.CompletedProcess[bytes]) -> str:
    err = proc.stderr.decode()
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def idle_cost(pid: int) -> tuple[float, int]:
    """(CPU seconds, user + system; times the process went to sleep), summed over its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    sleeps = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        for line in Path(f"/proc/{pid}/task/{task}/status").read_text().splitlines():
            if line.startswith("voluntary_ctxt_switches:"):
                sleeps += int(line.split()[1])
    return cpu, sleeps


def settle(tail: TailProcess, seconds: float = 0.5) -> None:
    """Let the tail finish starting (imports, the initial output) before its idle cost is measured."""
    time.sleep(seconds)
    assert tail.proc.poll() is None, tail.stderr()


# -- compressed files ----------------------------------------------------------------------------------
@pytest.mark.parametrize("ext", ["gz", "bz2", "xz"])
def test_compressed_rotated_file_prints_like_the_plain_file(tmp_path: Path, ext: str) -> None:
    """messages.log.2.gz (.bz2, .xz): last N, -n all, --user, --since, --json and --pretty print
    exactly what they print for the same lines uncompressed."""
    users = ["alice", "bob"]
    lines = [daemon_line(i, user=users[i % 2]) for i in range(50)]
    plain = write_log(tmp_path / "messages.log", lines)
    packed = write_compressed(tmp_path / f"messages.log.2.{ext}", lines_bytes(lines))
    for args in (
        [],
        ["-n", "3"],
        ["-n", "all"],
        ["-n", "4", "--user", "bob"],
        ["--since", "2026-11-29T11:00:45Z"],
        ["--json", "-n", "all"],
        ["--pretty", "-n", "5"],
    ):
        want = run_tail(*args, str(plain))
        got = run_tail(*args, str(packed))
        assert got.returncode == 0 and got.stderr == b"", (args, got.stderr)
        assert got.stdout == want.stdout, args
    assert rids(run_tail(str(packed)).stdout) == list(range(40, 50))
    assert rids(run_tail("-n", "4", "--user", "bob", str(packed)).stdout) == [43, 45, 47, 49]
    assert run_tail("--json", "-n", "all", str(packed)).stdout == lines_bytes(lines)


def test_compressed_file_is_streamed_in_bounded_memory(tmp_path: Path) -> None:
    """A gzip file of 160 MB of lines: -n 3 and --since (matching the last 3) keep only what they
    print; the process's peak memory (VmHWM, from /proc) stays far below the file's size."""
    block = lines_bytes([daemon_line(i) for i in range(1000)])
    last = [
        daemon_line(900_000 + i, when=datetime(2027, 1, 1, 0, 0, i, tzinfo=UTC), msg=f"rid={900_000 + i} last")
        for i in range(3)
    ]
    packed = tmp_path / "messages.log.3.gz"
    size = 0
    with gzip.open(packed, "wb", compresslevel=1) as f:
        while size < 160 << 20:
            f.write(block)
            size += len(block)
        f.write(lines_bytes(last))
    code = (
        "import sys\nfrom nio_logd.cli import main\nrc = main(sys.argv[1:])\nsys.stdout.flush()\n"
        "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]\n"
        "print('HWM', hwm, file=sys.stderr)\nsys.exit(rc)\n"
    )
    for args in (["-n", "3"], ["--since", "2026-12-31T00:00:00Z"]):
        proc = subprocess.run(
            [sys.executable, "-c", code, "tail", *args, str(packed)], capture_output=True, timeout=240, cwd=REPO
        )
        assert proc.returncode == 0, proc.stderr
        assert rids(proc.stdout) == [900_000, 900_001, 900_002], args
        hwm_kib = int(re.search(rb"HWM (\d+)", proc.stderr).group(1))  # type: ignore[union-attr]
        assert hwm_kib < 100 << 10, f"{args}: peak memory {hwm_kib} KiB reading a {size >> 20} MiB file"


@pytest.mark.parametrize("name", ["messages.log.2.gz", "messages.log.2.xz", "hidden-gzip.log"])
def test_follow_on_a_compressed_file_is_a_usage_error(tmp_path: Path, name: str) -> None:
    """-f on a compressed file (known by its name, or by its first bytes) is refused: exit 2, one line."""
    ext = "xz" if name.endswith(".xz") else "gz"
    path = tmp_path / name
    data = lines_bytes([daemon_line(i) for i in range(3)])
    with OPENERS[ext](path, "wb") as f:
        f.write(data)
    proc = run_tail("-f", str(path), timeout=20)
    assert proc.returncode == 2, proc.stderr
    err = one_line_error(proc)
    assert "compressed" in err and "drop -f" in err
    assert proc.stdout == b""


@pytest.mark.parametrize("ext", ["gz", "bz2", "xz"])
def test_truncated_compressed_file_prints_what_was_decoded_then_fails(tmp_path: Path, ext: str) -> None:
    """A compressed file cut short: the lines decoded before the cut are printed, then a one-line
    error and exit 66; no traceback. -n 3 prints the last 3 of those lines."""
    lines = [daemon_line(i) for i in range(20_000)]
    whole = write_compressed(tmp_path / f"whole.log.{ext}", lines_bytes(lines))
    cut = tmp_path / f"messages.log.2.{ext}"
    data = whole.read_bytes()
    cut.write_bytes(data[: len(data) * 6 // 10])

    proc = run_tail("-n", "all", str(cut))
    assert proc.returncode == 66, proc.stderr
    err = one_line_error(proc)
    assert "corrupt or cut short" in err and str(cut) in err
    got = rids(proc.stdout)
    assert 0 < len(got) < 20_000
    assert got == list(range(len(got)))  # a prefix of the file, in order, no half line
    assert b"malformed" not in proc.stdout

    proc = run_tail("-n", "3", str(cut))
    assert proc.returncode == 66
    assert rids(proc.stdout) == got[-3:]


def test_corrupt_gzip_file_prints_what_was_decoded_then_fails(tmp_path: Path) -> None:
    """Bytes overwritten in the middle of a gzip file: what came before is printed, then one line, exit 66."""
    lines = [daemon_line(i) for i in range(20_000)]
    path = write_compressed(tmp_path / "messages.log.2.gz", lines_bytes(lines))
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 256] = os.urandom(256)
    path.write_bytes(bytes(data))
    proc = run_tail("-n", "all", str(path))
    assert proc.returncode == 66, proc.stderr
    assert "corrupt or cut short" in one_line_error(proc)
    assert rids(proc.stdout)[:1000] == list(range(1000))


# -- stdin -----------------------------------------------------------------------------------------------
def test_dash_reads_stdin_like_a_file(tmp_path: Path) -> None:
    """FILE '-': stdin through a pipe; the output is what the same lines in a file give."""
    users = ["alice", "bob", "carol"]
    lines = [daemon_line(i, user=users[i % 3]) for i in range(40)]
    log = write_log(tmp_path / "m.log", lines)
    for args in ([], ["-n", "3"], ["-n", "0"], ["-n", "all", "--user", "carol"], ["--pretty", "-n", "2"]):
        got = run_tail(*args, "-", input=lines_bytes(lines))
        assert got.returncode == 0 and got.stderr == b"", (args, got.stderr)
        assert got.stdout == run_tail(*args, str(log)).stdout, args
    assert rids(run_tail("-", input=lines_bytes(lines)).stdout) == list(range(30, 40))
    with log.open("rb") as f:  # stdin a regular file (a shell redirection)
        assert rids(run_tail("-n", "2", "-", stdin=f).stdout) == [38, 39]


class StdinTail(TailProcess):
    """``nio-logd tail ARGS -`` with a pipe as its stdin, its output collected as it comes."""

    def __init__(self, *args: str) -> None:
        super().__init__(*args, "-", stdin=subprocess.PIPE)

    def write(self, data: bytes) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        for t in self._threads:
            t.join(5)
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if stream is not None:
                try:
                    stream.close()
                except BrokenPipeError:
                    pass


def test_dash_with_follow_prints_each_line_as_it_arrives_until_eof() -> None:
    """tail -f -: each line is printed while the writer still holds the pipe open; at the end of
    the stream tail exits 0, after printing the last line even without its newline."""
    tail = StdinTail("-f")
    try:
        tail.write(lines_bytes([daemon_line(i) for i in range(3)]))
        wait_for(lambda: rids(b"".join(tail.out)) == [0, 1, 2], 20)
        assert tail.proc.poll() is None
        tail.write(daemon_line(3) + b"\n" + daemon_line(4)[:30])
        wait_for(lambda: rids(b"".join(tail.out)) == [0, 1, 2, 3], 20)
        tail.write(daemon_line(4)[30:] + b"\n" + daemon_line(5))  # the last one without its newline
        assert tail.proc.stdin is not None
        tail.proc.stdin.close()
        assert tail.proc.wait(20) == 0
        tail._threads[0].join(5)
        tail._threads[1].join(5)
        assert rids(b"".join(tail.out)) == list(range(6))
        assert b"".join(tail.err).decode() == f"nio-logd tail: {NO_NEWLINE}\n"
    finally:
        tail.close()


# -- a last line without a newline -----------------------------------------------------------------------
def test_static_file_last_record_without_newline_is_printed_with_a_notice(tmp_path: Path) -> None:
    """A whole JSON object after the last newline is the file's last line: printed (it counts in
    -n, it is filtered), and stderr says it had no newline."""
    log = tmp_path / "m.log"
    log.write_bytes(lines_bytes([daemon_line(i) for i in range(5)]) + daemon_line(5, user="bob"))
    proc = run_tail("-n", "3", str(log))
    assert proc.returncode == 0
    assert rids(proc.stdout) == [3, 4, 5]
    assert proc.stdout.endswith(daemon_line(5, user="bob") + b"\n")
    assert proc.stderr.decode() == f"nio-logd tail: {NO_NEWLINE}\n"
    assert rids(run_tail("-n", "all", str(log)).stdout) == list(range(6))
    assert rids(run_tail("-n", "1", str(log)).stdout) == [5]
    assert rids(run_tail("--user", "bob", str(log)).stdout) == [5]
    other = run_tail("--user", "alice", "-n", "2", str(log))
    assert rids(other.stdout) == [3, 4] and other.stderr == b""  # not printed: nothing to say about it
    assert run_tail("-n", "0", str(log)).stdout == b""


def test_static_file_last_fragment_without_newline_is_reported_not_dropped_silently(tmp_path: Path) -> None:
    """A fragment after the last newline (a write in progress, most likely) is not printed as a
    broken line, and stderr says so with its size."""
    log = tmp_path / "m.log"
    fragment = daemon_line(3)[:40]
    log.write_bytes(lines_bytes([daemon_line(i) for i in range(3)]) + fragment)
    proc = run_tail("-n", "5", str(log))
    assert proc.returncode == 0
    assert rids(proc.stdout) == [0, 1, 2] and b"malformed" not in proc.stdout
    err = proc.stderr.decode()
    assert err.count("\n") == 1 and "no newline" in err and f"({len(fragment)} bytes)" in err and "not shown" in err


@pytest.mark.parametrize("source", ["stdin", "gz"])
def test_stream_prints_its_last_line_without_newline_even_a_fragment(tmp_path: Path, source: str) -> None:
    """A stream (stdin, a compressed file) has ended: its last line is printed whatever it is, with the notice."""
    data = lines_bytes([daemon_line(i) for i in range(3)]) + b'{"send_msg": "rid=3 cut'
    if source == "stdin":
        proc = run_tail("-n", "2", "-", input=data)
    else:
        proc = run_tail("-n", "2", str(write_compressed(tmp_path / "messages.log.1.gz", data)))
    assert proc.returncode == 0
    out = proc.stdout.splitlines()
    assert len(out) == 2 and rids(out[0]) == [2]
    assert b'"malformed":true' in out[1] and b"rid=3 cut" in out[1]
    assert proc.stderr.decode() == f"nio-logd tail: {NO_NEWLINE}\n"


def test_follow_holds_an_unterminated_last_line_until_its_newline(tmp_path: Path, tail_factory: Any) -> None:
    """With -f the last line without a newline may be half written: it is printed once its newline
    comes, once, and no notice is given about it."""
    log = tmp_path / "m.log"
    log.write_bytes(lines_bytes([daemon_line(i) for i in range(2)]) + daemon_line(2))
    tail = tail_factory("-f", "-n", "all", str(log))
    tail.wait_ids({0, 1})
    time.sleep(1.0)
    assert rids(b"".join(tail.out)) == [0, 1]
    with log.open("ab") as f:
        f.write(b"\n" + daemon_line(3) + b"\n")
    tail.wait_ids({2, 3})
    assert rids(b"".join(tail.out)) == [0, 1, 2, 3]
    assert tail.stderr() == ""


# -- following with inotify --------------------------------------------------------------------------------
def test_follow_idle_does_not_wake_up_or_use_cpu(tmp_path: Path, tail_factory: Any) -> None:
    """Idle for 2 s, tail -f uses less than 0.05 s of CPU and goes to sleep at most 3 times (it
    waits on inotify; polling ten times a second sleeps 20 times)."""
    log = write_log(tmp_path / "m.log", [daemon_line(i) for i in range(3)])
    tail = tail_factory("-f", str(log))
    tail.wait_ids({0, 1, 2})
    settle(tail)
    cpu0, sleeps0 = idle_cost(tail.proc.pid)
    time.sleep(2.0)
    cpu1, sleeps1 = idle_cost(tail.proc.pid)
    assert cpu1 - cpu0 < 0.05, f"{cpu1 - cpu0:.3f} s of CPU in 2 s idle"
    assert sleeps1 - sleeps0 <= 3, f"woke up {sleeps1 - sleeps0} times in 2 s idle"
    with log.open("ab") as f:  # and it is still awake to changes
        f.write(daemon_line(3) + b"\n")
    tail.wait_ids({3}, timeout=1.5)


def test_follow_sees_append_rotation_and_copytruncate_at_once_without_polling(
    tmp_path: Path, tail_factory: Any
) -> None:
    """Append, rename + create, copytruncate, each after an idle second: every change is printed
    within a second (the safety-net look is every 2 s) and tail wakes up only around the changes."""
    log = write_log(tmp_path / "m.log", [daemon_line(0)])
    tail = tail_factory("-f", "-n", "all", str(log))
    tail.wait_ids({0})
    settle(tail)
    _, sleeps0 = idle_cost(tail.proc.pid)
    started = time.monotonic()

    def change(ids: range, action: Callable[[], None]) -> None:
        time.sleep(1.0)
        action()
        with log.open("ab") as f:
            f.write(lines_bytes([daemon_line(i) for i in ids]))
        tail.wait_ids(ids, timeout=1.0)

    change(range(1, 3), lambda: None)  # append
    change(range(3, 5), lambda: (os.rename(log, tmp_path / "m.log.1"), log.touch()))  # rename + create
    change(range(5, 7), lambda: None)  # append to the new file

    def copytruncate() -> None:  # as logrotate does it: the older copies shift, the log is copied, then emptied
        os.rename(tmp_path / "m.log.1", tmp_path / "m.log.2")
        shutil.copyfile(log, tmp_path / "m.log.1")
        os.truncate(log, 0)

    change(range(7, 9), copytruncate)
    elapsed = time.monotonic() - started
    _, sleeps1 = idle_cost(tail.proc.pid)
    assert sleeps1 - sleeps0 <= 16, f"woke up {sleeps1 - sleeps0} times in {elapsed:.1f} s with 4 changes"
    time.sleep(0.3)
    counts = tail.ids()
    assert sorted(counts) == list(range(9)) and max(counts.values()) == 1, counts
    assert "replaced by a new file" in tail.stderr() and "truncated" in tail.stderr()


def test_follow_without_inotify_still_follows_by_polling(tmp_path: Path) -> None:
    """inotify_simple not importable (as where it is not installed): tail -f polls as before, and
    sees an append and a rename + create within a second each."""
    log = write_log(tmp_path / "m.log", [daemon_line(0)])
    code = (
        "import sys\nsys.modules['inotify_simple'] = None  # import inotify_simple raises ImportError\n"
        "from nio_logd.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, "tail", "-f", "-n", "all", str(log)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=REPO,
    )
    out: list[bytes] = []
    pump = threading.Thread(target=lambda: out.extend(iter(proc.stdout.readline, b"")), daemon=True)  # type: ignore[union-attr]
    pump.start()
    try:
        wait_for(lambda: rids(b"".join(out)) == [0], 20)
        with log.open("ab") as f:
            f.write(daemon_line(1) + b"\n")
        wait_for(lambda: rids(b"".join(out)) == [0, 1], 1.0)
        os.rename(log, tmp_path / "m.log.1")
        write_log(log, [daemon_line(2)])
        wait_for(lambda: rids(b"".join(out)) == [0, 1, 2], 1.0)
        _, sleeps0 = idle_cost(proc.pid)
        time.sleep(1.0)
        _, sleeps1 = idle_cost(proc.pid)
        assert sleeps1 - sleeps0 >= 5  # it polls (ten times a second), it does not wait on inotify
        assert proc.poll() is None
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        pump.join(5)
        assert proc.stdout is not None and proc.stderr is not None
        err = proc.stderr.read()
        proc.stdout.close()
        proc.stderr.close()
    assert b"Traceback" not in err, err
