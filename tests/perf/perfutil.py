"""Helpers for the performance scripts: daemons on free ports, /proc readings, medians.

Not a test module: the scripts in tests/perf are run by hand (see each one's docstring).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
CLK_TCK = os.sysconf("SC_CLK_TCK")
RSYSLOGD = shutil.which("rsyslogd") or "/usr/sbin/rsyslogd"


# Each daemon runs in a session of its own, as a service does: systemd gives a service a cgroup of
# its own, a detached daemon calls setsid(). The kernel's scheduler (autogroup, or the cgroups)
# then shares the CPUs between the daemon and the senders of a run, not between their threads: in
# one session a daemon's thread or two shared two CPUs with four sender processes as one of six.
# ``--same-session`` (compare_rsyslog.py, seed_pattern.py) puts them back in the harness's session.
OWN_SESSION = True


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_listening(port: int, timeout: float = 15.0, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout} s") from None
            time.sleep(0.05)


# -- /proc ---------------------------------------------------------------------------------------------
def cpu_seconds(pid: int) -> float:
    """utime + stime of a whole process (all its threads), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    # fields[0] is the state (field 3 of stat(5)); utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def _stat_ticks(pid: int) -> tuple[int, int]:
    """(utime + stime, cutime + cstime) of a process in clock ticks: its own and its reaped children's."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return int(fields[11]) + int(fields[12]), int(fields[13]) + int(fields[14])


def tree_cpu_seconds(pid: int) -> float:
    """CPU of a process and all its descendants, in seconds, the list of processes read now.

    utime + stime of every live process of the tree, plus cutime + cstime of the top one: a
    worker that died and was reaped since the last reading (a restart) is counted there, so the
    difference of two readings is the tree's CPU between them even when workers come and go.
    """
    own, reaped = _stat_ticks(pid)
    total = own + reaped
    for child in descendants_of(pid):
        try:
            total += _stat_ticks(child)[0]
        except (OSError, ValueError, IndexError):
            pass  # ended between the listing and the reading
    return total / CLK_TCK


def tree_hwm_kb(pid: int) -> dict[int, int]:
    """Peak RSS (VmHWM, kB) of each process of the tree, by pid."""
    out: dict[int, int] = {}
    for p in [pid, *descendants_of(pid)]:
        try:
            out[p] = status_kb(p, "VmHWM")
        except (OSError, KeyError):
            pass  # ended, or a zombie (no memory left to report)
    return out


def cpu_ns(pid: int) -> int:
    """CPU time of all the process's threads in nanoseconds (schedstat: finer than clock ticks)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            pass  # a thread that just ended
    return total


def thread_cpu_ns(pid: int) -> dict[tuple[int, int], int]:
    """Each thread's CPU time (schedstat, ns) over a process and its descendants, by (pid, tid)."""
    out: dict[tuple[int, int], int] = {}
    for proc in (pid, *descendants_of(pid)):
        try:
            tasks = list(Path(f"/proc/{proc}/task").iterdir())
        except OSError:
            continue
        for task in tasks:
            try:
                out[proc, int(task.name)] = int((task / "schedstat").read_text().split()[0])
            except (OSError, ValueError, IndexError):
                pass  # a thread that just ended
    return out


def cpu_ns_between(before: dict[tuple[int, int], int], after: dict[tuple[int, int], int]) -> int:
    """The CPU the threads used between two ``thread_cpu_ns`` readings: a thread that ended in
    between (rsyslog's queue workers end when idle) takes nothing away from the sum; one that
    began counts whole; the time an ending thread used between the readings is not seen."""
    return sum(ns - before.get(key, 0) for key, ns in after.items() if ns >= before.get(key, 0))


def status_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def tcp_ext(name: str) -> int:
    """A TcpExt counter of /proc/net/netstat (e.g. ListenOverflows), for this network namespace."""
    lines = Path("/proc/net/netstat").read_text().splitlines()
    for head, values in zip(lines[::2], lines[1::2], strict=True):
        if head.startswith("TcpExt:"):
            return int(dict(zip(head.split(), values.split(), strict=True))[name])
    raise KeyError(name)


def count_lines(path: Path) -> int:
    if not path.exists():
        return 0
    n = 0
    with path.open("rb") as f:
        while chunk := f.read(8 << 20):
            n += chunk.count(b"\n")
    return n


def wait_stable_count(path: Path, expected: int, settle: float = 3.0, timeout: float = 120.0) -> int:
    """Lines in ``path`` once it holds ``expected`` or has not changed for ``settle`` seconds."""
    deadline = time.monotonic() + timeout
    last, since = -1, time.monotonic()
    while True:
        n = count_lines(path)
        now = time.monotonic()
        if n != last:
            last, since = n, now
        if n >= expected or now - since >= settle or now > deadline:
            return n
        time.sleep(0.2)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def snapshot(rev: str, dest: Path) -> tuple[Path, str]:
    """The committed tree of ``rev`` (``git archive``, the working tree untouched) and its commit."""
    commit = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", rev], capture_output=True, text=True, check=True
    ).stdout.strip()
    dest.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", commit], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest, commit


def working_tree_state() -> str:
    """HEAD's commit, plus "+dirty" when nio_logd/ has uncommitted changes."""
    head = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "-C", str(REPO), "--no-optional-locks", "status", "--porcelain", "--", "nio_logd"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    return head + ("+dirty" if dirty else "")


def git_state() -> dict[str, Any]:
    """The commit checked out (``git rev-parse HEAD``) and what differs from it, read-only.

    ``dirty`` is about nio_logd/ (the code measured); ``dirty_elsewhere`` about the rest of the tree.
    ``--no-optional-locks``: ``git status`` must not even refresh the index.
    """

    def git(*argv: str) -> str:
        return subprocess.run(
            ["git", "-C", str(REPO), "--no-optional-locks", *argv], capture_output=True, text=True
        ).stdout.strip()

    changed = git("status", "--porcelain", "--", "nio_logd").splitlines()
    elsewhere = [line for line in git("status", "--porcelain").splitlines() if line not in changed]
    return {
        "commit": git("rev-parse", "HEAD"),
        "dirty": bool(changed),
        "changed_in_nio_logd": changed,
        "dirty_elsewhere": bool(elsewhere),
    }


def children_of(pid: int) -> list[int]:
    """The direct children of a process, started by any of its threads (each thread has its own list)."""
    out: list[int] = []
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return []
    for task in tasks:
        try:
            out.extend(int(x) for x in (task / "children").read_text().split())
        except OSError:
            pass  # a thread that just ended
    return sorted(set(out))


def descendants_of(pid: int) -> list[int]:
    """Children, grandchildren, ... of a process, read from /proc now."""
    out: list[int] = []
    todo = children_of(pid)
    while todo:
        child = todo.pop()
        out.append(child)
        todo.extend(children_of(child))
    return sorted(out)


# -- daemons ---------------------------------------------------------------------------------------------
class Daemon:
    """A daemon subprocess: its pid, output file, and stderr kept in a file."""

    name: str
    proc: subprocess.Popen[bytes]
    output: Path
    port: int

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def pids(self) -> list[int]:
        """Every process doing the daemon's work: the top one and its descendants, read now."""
        return [self.proc.pid, *descendants_of(self.proc.pid)]

    def _started(self, wait: Callable[[], object]) -> None:
        """Run ``wait`` (listening, ready); if it fails, stop the process before raising."""
        try:
            wait()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


class Rsyslog(Daemon):
    """rsyslogd -n with a private config: imtcp only, %rawmsg% lines, async omfile in ``directory``.

    ``json_parse``: the peer doing comparable work. Every record goes through mmjsonparse
    (``cookie=""``: the whole message is the JSON, no "@cee:" prefix; ``useRawMsg="on"``: the
    received bytes, not the syslog-parsed MSG part), is written re-serialised from the parsed tree
    (``%$!all-json%``) with the same async omfile, and a record that does not parse
    (``$parsesuccess == "FAIL"``, e.g. not an object) goes to ``rejects`` as received.
    """

    def __init__(
        self,
        directory: Path,
        port: int | None = None,
        extra_imtcp: str = "",
        *,
        json_parse: bool = False,
        name: str | None = None,
    ) -> None:
        self.name = name or ("rsyslog json" if json_parse else "rsyslog")
        self.json_parse = json_parse
        self.port = port or free_port()
        directory.mkdir(parents=True, exist_ok=True)
        work = directory / "work"
        work.mkdir(exist_ok=True)
        self.output = directory / "messages.log"
        self.rejects = directory / "rejects.log"
        self.config = directory / "rsyslog.conf"
        omfile = 'asyncWriting="on" ioBufferSize="64k" flushOnTXEnd="off"'
        if json_parse:
            rules = (
                '  action(type="mmjsonparse" cookie="" useRawMsg="on")\n'
                '  if $parsesuccess == "FAIL" then {\n'
                f'    action(type="omfile" file="{self.rejects}" template="raw")\n'
                "  } else {\n"
                f'    action(type="omfile" file="{self.output}" template="json" {omfile})\n'
                "  }\n"
            )
        else:
            rules = f'  action(type="omfile" file="{self.output}" template="raw" {omfile})\n'
        # Only imtcp (and mmjsonparse) are loaded: no imuxsock (/dev/log), no imklog; nothing but
        # our files is written.
        imtcp = f" {extra_imtcp}" if extra_imtcp else ""
        self.config.write_text(
            f'global(workDirectory="{work}" net.enableDNS="off")\n'
            f'module(load="imtcp"{imtcp})\n'
            + ('module(load="mmjsonparse")\n' if json_parse else "")
            + 'template(name="raw" type="string" string="%rawmsg%\\n")\n'
            'template(name="json" type="string" string="%$!all-json%\\n")\n'
            'ruleset(name="bench") {\n' + rules + "}\n"
            f'input(type="imtcp" address="127.0.0.1" port="{self.port}" ruleset="bench")\n'
        )
        check = subprocess.run([RSYSLOGD, "-N1", "-f", str(self.config)], capture_output=True, text=True)
        if check.returncode:
            raise RuntimeError(f"rsyslogd -N1 refused the config: {check.stderr}")
        self.log = (directory / "rsyslogd.stderr").open("wb")
        self.proc = subprocess.Popen(
            [RSYSLOGD, "-n", "-f", str(self.config), "-i", str(directory / "rsyslogd.pid")],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=OWN_SESSION,
        )
        self._started(lambda: wait_listening(self.port, proc=self.proc))


class NioLogd(Daemon):
    """``python -m nio_logd run`` with a config in ``directory`` (events kept in a file)."""

    def __init__(
        self,
        directory: Path,
        *,
        name: str = "nio-logd",
        ack: bool = False,
        durability: str = "write",
        extra: dict[str, dict[str, Any]] | None = None,
        port: int | None = None,
        source: Path | None = None,
        workers: int | str | None = None,
    ) -> None:
        """``workers``: ``[server] workers`` (a number or "auto"); None leaves the daemon's default."""
        self.name = name
        self.workers = workers
        self.port = port or free_port()
        directory.mkdir(parents=True, exist_ok=True)
        self.output = directory / "logs" / "messages.log"
        self.rejects = directory / "logs" / "rejects.log"
        sections: dict[str, dict[str, Any]] = {
            "log": {"path": "logs/messages.log", "rejects_path": "logs/rejects.log", "durability": durability},
            "daemon": {"events": "json", "pidfile": "nio-logd.pid"},
        }
        if workers is not None:
            sections["server"] = {"workers": workers}
        for key, values in (extra or {}).items():
            sections.setdefault(key, {}).update(values)
        lines = ["[[listeners]]", f'address = "tcp://127.0.0.1:{self.port}"', f"ack = {str(ack).lower()}"]
        for section, values in sections.items():
            lines.append(f"[{section}]")
            lines.extend(f"{k} = {json.dumps(v)}" for k, v in values.items())
        self.config = directory / "nio-logd.toml"
        self.config.write_text("\n".join(lines) + "\n")
        self.log_path = directory / "nio-logd.events"
        self.log = self.log_path.open("wb")
        env = {**os.environ, "PYTHONPATH": str(source or REPO)}
        self.proc = subprocess.Popen(
            self._command(),
            stdout=subprocess.DEVNULL,
            stderr=self.log,
            stdin=subprocess.DEVNULL,
            cwd=directory,
            env=env,
            start_new_session=OWN_SESSION,
        )
        self._started(self._wait_started)

    def _wait_started(self) -> None:
        wait_listening(self.port, proc=self.proc)
        self._wait_ready()

    def _command(self) -> list[str]:
        return [sys.executable, "-m", "nio_logd", "run", "--config", str(self.config)]

    def _wait_ready(self) -> None:
        self._wait_event("ready")

    def _wait_event(self, name: str, timeout: float = 60.0) -> None:
        # 60 s: with workers, "ready" comes once every worker (a fresh interpreter) listens, on a
        # machine that may be busy.
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(e.get("event") == name for e in self.events()):
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError(f"{self.name}: no {name!r} event; stderr: {self.log_path.read_text()[-2000:]}")

    def events(self) -> list[dict[str, Any]]:
        """The daemon's events so far (its stderr, one JSON object a line; other lines skipped)."""
        out: list[dict[str, Any]] = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict):
                out.append(event)
        return out


class ProtoDaemon(NioLogd):
    """tests/perf/proto_daemon.py (the daemon's Server with monkeypatched proposals), same config."""

    def __init__(self, directory: Path, *, name: str, flags: list[str], source: Path | None = None) -> None:
        self.flags = flags
        self.source = source
        super().__init__(directory, name=name, source=source)

    def _command(self) -> list[str]:
        cmd = [
            sys.executable,
            str(Path(__file__).resolve().parent / "proto_daemon.py"),
            "--config",
            str(self.config),
            *self.flags,
        ]
        if self.source:
            cmd += ["--source", str(self.source)]
        return cmd

    def _wait_ready(self) -> None:
        workers = int(self.flags[self.flags.index("--workers") + 1]) if "--workers" in self.flags else 1
        deadline = time.monotonic() + 20
        while self.log_path.read_text(errors="replace").count(" ready") < workers:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} did not start: {self.log_path.read_text()[-2000:]}")
            time.sleep(0.05)

    @property
    def pids(self) -> list[int]:
        return [self.pid, *children_of(self.pid)]


NETNS_ENV = "NIO_LOGD_PERF_NETNS"


def enter_private_netns(enabled: bool = True) -> str:
    """Re-run this script in a new network namespace (lo up) unless already there; describe where we run.

    The TcpExt counters (ListenOverflows, ...) are per namespace: in a private one they count our
    daemons alone, not every other process on a shared machine.
    """
    if enabled and os.environ.get(NETNS_ENV) != "1":
        os.environ[NETNS_ENV] = "1"
        os.execvp(
            "unshare",
            ["unshare", "--net", "sh", "-c", 'ip link set lo up && exec "$0" "$@"', sys.executable, *sys.argv],
        )
    if os.environ.get(NETNS_ENV) == "1":
        return "a private network namespace (unshare --net): the TcpExt counters are this run's alone"
    return "the host's network namespace: the TcpExt counters include every other process's connections"
