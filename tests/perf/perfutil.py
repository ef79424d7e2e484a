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
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
CLK_TCK = os.sysconf("SC_CLK_TCK")
RSYSLOGD = shutil.which("rsyslogd") or "/usr/sbin/rsyslogd"


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


def cpu_ns(pid: int) -> int:
    """CPU time of all the process's threads in nanoseconds (schedstat: finer than clock ticks)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            pass  # a thread that just ended
    return total


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
        ["git", "-C", str(REPO), "status", "--porcelain", "--", "nio_logd"], capture_output=True, text=True
    ).stdout.strip()
    return head + ("+dirty" if dirty else "")


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
        """Every process doing the daemon's work (one, except for the multi-process prototype)."""
        return [self.proc.pid]

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
    """rsyslogd -n with a private config: imtcp only, %rawmsg% lines, async omfile in ``directory``."""

    def __init__(self, directory: Path, port: int | None = None, extra_imtcp: str = "") -> None:
        self.name = "rsyslog"
        self.port = port or free_port()
        directory.mkdir(parents=True, exist_ok=True)
        work = directory / "work"
        work.mkdir(exist_ok=True)
        self.output = directory / "messages.log"
        self.config = directory / "rsyslog.conf"
        # Only imtcp is loaded: no imuxsock (/dev/log), no imklog; nothing but our file is written.
        self.config.write_text(
            f'global(workDirectory="{work}" net.enableDNS="off")\n'
            'module(load="imtcp"' + (f" {extra_imtcp}" if extra_imtcp else "") + ")\n"
            'template(name="raw" type="string" string="%rawmsg%\\n")\n'
            'ruleset(name="bench") {\n'
            f'  action(type="omfile" file="{self.output}" template="raw"\n'
            '         asyncWriting="on" ioBufferSize="64k" flushOnTXEnd="off")\n'
            "}\n"
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
        )
        wait_listening(self.port, proc=self.proc)


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
    ) -> None:
        self.name = name
        self.port = port or free_port()
        directory.mkdir(parents=True, exist_ok=True)
        self.output = directory / "logs" / "messages.log"
        self.rejects = directory / "logs" / "rejects.log"
        sections: dict[str, dict[str, Any]] = {
            "log": {"path": "logs/messages.log", "rejects_path": "logs/rejects.log", "durability": durability},
            "daemon": {"events": "json", "pidfile": "nio-logd.pid"},
        }
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
        )
        wait_listening(self.port, proc=self.proc)
        self._wait_ready()

    def _command(self) -> list[str]:
        return [sys.executable, "-m", "nio_logd", "run", "--config", str(self.config)]

    def _wait_ready(self) -> None:
        self._wait_event("ready")

    def _wait_event(self, name: str, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.log_path.read_text(errors="replace").splitlines():
                try:
                    if json.loads(line).get("event") == name:
                        return
                except ValueError:
                    pass
            time.sleep(0.05)
        raise RuntimeError(f"{self.name}: no {name!r} event; stderr: {self.log_path.read_text()[-2000:]}")


def children_of(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(x) for x in text.split()]


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
