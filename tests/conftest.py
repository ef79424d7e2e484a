"""Shared test helpers: configs in tmp_path, a real daemon process, an in-process server."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nio_logd.config import load_file
from nio_logd.service.server import Server

REPO = Path(__file__).resolve().parent.parent

# A suite started in the background by a shell without job control (`nohup ... &`, some CI
# runners) inherits SIGINT ignored, and so would every program it starts (an ignored signal stays
# ignored across exec): the tests that stop `nio-logd tail -f` with Ctrl-C's SIGINT would wait for
# ever. A handler of our own is reset to the default in the programs we start.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(value)


# ``[server] workers`` for the configs a test writes without one: None leaves the daemon's default
# ("auto", one worker per CPU). Tests marked ``both_shapes`` run twice, with 1 and with 2.
_SHAPE: dict[str, int | None] = {"workers": None}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if metafunc.definition.get_closest_marker("both_shapes"):
        metafunc.parametrize("_shape", [1, 2], ids=["workers1", "workers2"], indirect=True)


@pytest.fixture(autouse=True)
def _shape(request: pytest.FixtureRequest) -> Iterator[None]:
    _SHAPE["workers"] = getattr(request, "param", None)
    try:
        yield
    finally:
        _SHAPE["workers"] = None


def write_config(
    directory: Path,
    listeners: list[dict[str, Any]] | None = None,
    **sections: dict[str, Any],
) -> Path:
    """Write a TOML config into ``directory``; logs go to ``directory/logs``."""
    listeners = listeners if listeners is not None else [{"address": f"tcp://127.0.0.1:{free_port()}"}]
    out: list[str] = []
    for listener in listeners:
        out.append("[[listeners]]")
        for key, value in listener.items():
            if isinstance(value, dict):
                continue
            out.append(f"{key} = {_toml_value(value)}")
        for key, value in listener.items():
            if isinstance(value, dict):
                out.append(f"[listeners.{key}]")
                out.extend(f"{k} = {_toml_value(v)}" for k, v in value.items())
    sections.setdefault("log", {})
    sections["log"].setdefault("path", "logs/messages.log")
    sections["log"].setdefault("rejects_path", "logs/rejects.log")
    sections.setdefault("daemon", {}).setdefault("events", "json")
    if _SHAPE["workers"] is not None:
        sections.setdefault("server", {}).setdefault("workers", _SHAPE["workers"])
    for name, values in sections.items():
        out.append(f"[{name}]")
        out.extend(f"{k} = {_toml_value(v)}" for k, v in values.items())
    path = directory / "nio-logd.toml"
    path.write_text("\n".join(out) + "\n")
    return path


def record(user: str = "alice", msg: str = "hello", when: str = "2026-11-29 12:00:00") -> bytes:
    return json.dumps({"send_user": user, "send_time": when, "send_msg": msg}).encode()


def read_lines(path: Path, *, writing: bool = False) -> list[dict[str, Any]]:
    """Every line of a log file, parsed; fails on a partial or invalid line.

    ``writing=True`` is for polling a file the daemon is still appending to: a reader can see a
    write() half done, so a trailing partial line is left out instead of failing.
    """
    if not path.exists():
        return []
    data = path.read_bytes()
    if writing:
        data = data[: data.rfind(b"\n") + 1]
    assert not data or data.endswith(b"\n"), f"{path} ends with a partial line: {data[-200:]!r}"
    return [json.loads(line) for line in data.splitlines()]


def wait_for(predicate: Any, timeout: float = 10.0, interval: float = 0.02) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {predicate}")
        time.sleep(interval)


class DaemonProcess:
    """``nio-logd run`` as a real subprocess, with its stderr events collected."""

    def __init__(self, config: Path, extra_args: tuple[str, ...] = (), env: dict[str, str] | None = None) -> None:
        self.config = config
        self.settings = load_file(config)
        self.messages = self.settings.resolve(self.settings.log.path)
        self.rejects = self.settings.resolve(self.settings.log.rejects_path)
        self.events: list[dict[str, Any]] = []
        self.stderr_lines: list[str] = []
        self.stop_sent = False
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "nio_logd", "run", "--config", str(config), *extra_args],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env={**os.environ, **(env or {})},
            cwd=config.parent,
        )
        self._reader = threading.Thread(target=self._read_stderr, daemon=True)
        self._reader.start()

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            self.stderr_lines.append(line)
            try:
                self.events.append(json.loads(line))
            except ValueError:
                pass

    @property
    def pid(self) -> int:
        return self.proc.pid

    def event(self, name: str) -> dict[str, Any] | None:
        for ev in list(self.events):
            if ev.get("event") == name:
                return ev
        return None

    def wait_ready(self, timeout: float = 15.0) -> DaemonProcess:
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited {self.proc.returncode}: {self.stderr_lines}")
            return self.event("ready") is not None

        wait_for(ready, timeout)
        return self

    @property
    def address(self) -> str:
        ev = self.event("listening")
        assert ev is not None
        return str(ev["address"])

    @property
    def tcp(self) -> tuple[str, int]:
        addr = self.address.removeprefix("tcp://")
        host, _, port = addr.rpartition(":")
        return host.strip("[]"), int(port)

    def signal(self, signum: int) -> None:
        if signum in (signal.SIGTERM, signal.SIGINT):
            self.stop_sent = True
        self.proc.send_signal(signum)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM (unless the test sent one already: a second one forces the end) and wait."""
        if self.proc.poll() is None and not self.stop_sent:
            self.signal(signal.SIGTERM)
        code = self.proc.wait(timeout)
        self._close_pipe()
        return code

    def _close_pipe(self) -> None:
        self._reader.join(5)
        if self.proc.stderr is not None and not self._reader.is_alive():
            self.proc.stderr.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._close_pipe()


@pytest.fixture
def world_dir() -> Iterator[Path]:
    """A folder an unprivileged user can traverse (tmp_path is 0700 root, like /root)."""
    path = Path(tempfile.mkdtemp(prefix="nio-logd-world-", dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def daemon_factory() -> Iterator[Any]:
    """Start real daemons; any still running at the end of the test are killed."""
    started: list[DaemonProcess] = []

    def start(config: Path, *args: str, env: dict[str, str] | None = None, ready: bool = True) -> DaemonProcess:
        d = DaemonProcess(config, args, env)
        started.append(d)
        return d.wait_ready() if ready else d

    yield start
    for d in started:
        d.kill()


class InProcessServer:
    """The server's threads in this process (no signals), for fast protocol tests."""

    def __init__(self, config: Path) -> None:
        self.settings = load_file(config)
        self.server = Server(self.settings)
        self.server.startup()
        self.server.start()
        self.messages = self.settings.resolve(self.settings.log.path)
        self.rejects = self.settings.resolve(self.settings.log.rejects_path)

    @property
    def address(self) -> str:
        return self.server.addresses()[0]

    @property
    def tcp(self) -> tuple[str, int]:
        host, _, port = self.address.removeprefix("tcp://").rpartition(":")
        return host.strip("[]"), int(port)

    def wait_written(self, accepted: int, refused: int = 0, timeout: float = 20.0) -> None:
        w = self.server.writer
        wait_for(lambda: w.written_records >= accepted and w.written_rejects >= refused, timeout)

    def stop(self) -> bool:
        return self.server.shutdown(timeout=10)


@pytest.fixture
def server_factory() -> Iterator[Any]:
    started: list[InProcessServer] = []

    def start(config: Path) -> InProcessServer:
        s = InProcessServer(config)
        started.append(s)
        return s

    yield start
    for s in started:
        if any(loop.thread and loop.thread.is_alive() for loop in s.server.loops):
            s.stop()


from nats_cluster import nats_cluster  # noqa: E402, F401 - the JetStream cluster of the forwarding tests


def tick_after(path: Path) -> None:
    """Wait until a file made now gets a later mtime than ``path`` has (file times come from a
    coarse clock: a copy made in the same tick as a truncation has the same mtime). Real logrotate
    runs are minutes apart; a test that plays two of them in a row waits for one tick here."""
    ref = os.stat(path).st_mtime_ns
    probe = path.parent / ".tick"
    try:
        for _ in range(1000):
            probe.write_bytes(b"")
            os.utime(probe)  # now, by the file system's clock
            if os.stat(probe).st_mtime_ns > ref:
                return
            time.sleep(0.001)
        raise AssertionError(f"the file system's clock did not pass {path}'s mtime in 1 s")
    finally:
        probe.unlink(missing_ok=True)
