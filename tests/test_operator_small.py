"""Small operator-facing fixes: journald priorities, messages that say what they mean, the example
config that names every key, check-config's events path.

Every test runs the real command line or a real daemon process; the journald test boots a real
systemd (tests/systemd_box) and asks its journalctl.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pytest
from conftest import REPO, free_port, record, wait_for, write_config

from nio_logd.config import ForwardSettings, ForwardTLSSettings, ListenerSettings, Settings, TLSSettings, load_file
from nio_logd.service.daemonize import events_path

PRIORITY = {"debug": 7, "info": 6, "warning": 4, "error": 3, "critical": 2}


def nio(*args: str, cwd: Path | None = None, stdin: bytes = b"") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "nio_logd", *args],
        input=stdin.decode(),
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        check=False,
    )


# -- (2) journald priorities --------------------------------------------------------------------------
class StderrDaemon:
    """``nio-logd run`` whose stderr is the fd given (a pipe we read, or a file), JOURNAL_STREAM set."""

    def __init__(self, config: Path, stderr_fd: int, journal_stream: str, reader: IO[bytes] | None) -> None:
        env = {**os.environ, "JOURNAL_STREAM": journal_stream}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "nio_logd", "run", "--config", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=stderr_fd,
            env=env,
            cwd=config.parent,
        )
        self.lines: list[str] = []
        self._reader: threading.Thread | None = None
        if reader is not None:
            self._reader = threading.Thread(target=self._read, args=(reader,), daemon=True)
            self._reader.start()

    def _read(self, reader: IO[bytes]) -> None:
        with reader:
            for raw in reader:
                self.lines.append(raw.decode("utf-8", "replace").rstrip("\n"))

    def has(self, event: str) -> bool:
        return any(f'"event":"{event}"' in line for line in list(self.lines))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(10)
            if self._reader is not None:
                self._reader.join(10)


@pytest.fixture
def stderr_daemons() -> Iterator[list[StderrDaemon]]:
    started: list[StderrDaemon] = []
    yield started
    for d in started:
        d.stop()


def _pipe_daemon(config: Path, started: list[StderrDaemon], *, matching: bool) -> StderrDaemon:
    """A daemon whose stderr is a pipe; JOURNAL_STREAM names that pipe, or another one."""
    r, w = os.pipe()
    other_r, other_w = os.pipe()
    try:
        st = os.fstat(w if matching else other_w)
        d = StderrDaemon(config, w, f"{st.st_dev}:{st.st_ino}", os.fdopen(r, "rb"))
    finally:
        os.close(w)
        os.close(other_r)
        os.close(other_w)
    started.append(d)
    return d


def _move_listener(config: Path) -> None:
    """A change SIGHUP cannot apply: the daemon answers with reload_needs_restart (a warning)."""
    text = config.read_text()
    new, n = re.subn(r'address = "tcp://127\.0\.0\.1:\d+"', f'address = "tcp://127.0.0.1:{free_port()}"', text)
    assert n == 1
    config.write_text(new)


def test_events_carry_their_syslog_priority_when_stderr_is_the_journal_stream(
    tmp_path: Path, stderr_daemons: list[StderrDaemon]
) -> None:
    """stderr = the stream JOURNAL_STREAM names: every line starts with <N>, N the event's level's
    syslog priority (journald's SyslogLevelPrefix), a warning <4>, info <6>."""
    config = write_config(tmp_path)
    d = _pipe_daemon(config, stderr_daemons, matching=True)
    wait_for(lambda: d.has("ready"), 20)
    _move_listener(config)
    d.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: d.has("reload_needs_restart"), 20)
    d.stop()
    assert d.proc.returncode == 0
    levels = {}
    for line in d.lines:
        m = re.match(r"<(\d)>(\{.*\})\Z", line)
        assert m, f"no priority prefix: {line!r}"
        event = json.loads(m[2])
        assert int(m[1]) == PRIORITY[event["level"]], line
        levels[event["event"]] = int(m[1])
    assert levels["reload_needs_restart"] == 4
    assert levels["ready"] == 6 and levels["listening"] == 6


@pytest.mark.parametrize("stderr_kind", ["another pipe", "a plain file"])
def test_no_priority_prefix_when_stderr_is_not_the_journal_stream(
    tmp_path: Path, stderr_daemons: list[StderrDaemon], stderr_kind: str
) -> None:
    """JOURNAL_STREAM inherited by a daemon whose stderr goes elsewhere: plain JSON lines, no <N>.
    (A plain file is never the journal, even if JOURNAL_STREAM names it.)"""
    config = write_config(tmp_path)
    if stderr_kind == "another pipe":
        d = _pipe_daemon(config, stderr_daemons, matching=False)
        lines = lambda: list(d.lines)  # noqa: E731
    else:
        path = tmp_path / "stderr.log"
        with path.open("wb") as f:
            st = os.fstat(f.fileno())
            d = StderrDaemon(config, f.fileno(), f"{st.st_dev}:{st.st_ino}", None)
        stderr_daemons.append(d)
        lines = lambda: path.read_text().splitlines()  # noqa: E731
    wait_for(lambda: any('"event":"ready"' in line for line in lines()), 20)
    d.stop()
    assert d.proc.returncode == 0
    got = lines()
    assert got and all(line.startswith("{") for line in got), got
    assert [json.loads(line)["event"] for line in got][-1] == "stopped"


def _box_reason() -> str | None:
    sys.path.insert(0, str(Path(__file__).parent))
    from systemd_box.box import unavailable_reason, visible_in_box

    reason = unavailable_reason()
    if reason is None and not visible_in_box(Path(sys.executable)):
        reason = f"{sys.executable} is not on the root file system: the box cannot run it"
    return reason


@pytest.mark.root
@pytest.mark.slow
def test_journalctl_priority_warning_shows_the_warning_events(tmp_path: Path) -> None:
    """A real journald: `nio-logd run` as a unit of a booted systemd; after a SIGHUP it cannot apply,
    `journalctl -p warning` lists reload_needs_restart and running_as_root and no info event."""
    reason = _box_reason()
    if reason:
        pytest.skip(reason)
    from systemd_box.box import Box

    box = Box(f"nio-logd-prio-{uuid.uuid4().hex[:8]}", REPO, tmp_path)
    unit = "nio-logd-prio"
    try:
        box.boot()
        box.run("mkdir", "-m", "0755", "/var/lib/nio-prio")
        config = box.path("/var/lib/nio-prio") / "nio-logd.toml"
        config.write_text(
            f'[[listeners]]\naddress = "tcp://127.0.0.1:{free_port()}"\n[daemon]\nevents = "json"\n'
            'pidfile = "nio-logd.pid"\n'
        )
        config.chmod(0o644)
        box.run(
            "systemd-run",
            f"--unit={unit}",
            "--setenv=PYTHONPATH=/src",
            "--working-directory=/var/lib/nio-prio",
            sys.executable,
            "-m",
            "nio_logd",
            "run",
            "--config",
            "/var/lib/nio-prio/nio-logd.toml",
        )

        def journal(*args: str) -> str:
            return box.run("journalctl", "--no-pager", "-o", "cat", "-u", unit, *args, check=False).stdout

        wait_for(lambda: '"event":"ready"' in journal(), 30, 0.1)
        _move_listener(config)
        box.systemctl("kill", "-s", "HUP", unit)
        wait_for(lambda: '"event":"reload_needs_restart"' in journal(), 30, 0.1)
        warnings = [json.loads(line) for line in journal("-p", "warning").splitlines() if line.startswith("{")]
        names = {e["event"] for e in warnings}
        assert {"reload_needs_restart", "running_as_root"} <= names, journal("-p", "warning")
        assert {e["level"] for e in warnings} == {"warning"}
        everything = journal()
        assert '"event":"ready"' in everything and not re.search(r"^<\d>", everything, re.M)
        priority: dict[str, str] = {}  # event -> the PRIORITY field journald stored
        for entry in map(json.loads, box.run("journalctl", "-o", "json", "-u", unit, check=False).stdout.splitlines()):
            message = entry.get("MESSAGE")
            if isinstance(message, str) and message.startswith("{"):
                priority[json.loads(message)["event"]] = entry["PRIORITY"]
        assert priority["reload_needs_restart"] == "4" and priority["running_as_root"] == "4"
        assert priority["ready"] == "6" and priority["listening"] == "6"
        box.systemctl("stop", unit)
    finally:
        left = box.shutdown()
        assert left == {}, f"the box left behind: {left}"


# -- (11) small things --------------------------------------------------------------------------------
def test_invalid_json_refusal_says_at_line_once(tmp_path: Path, server_factory: Any) -> None:
    """The answer and the rejects log say "... at line 1 column N" once, whatever the parser said."""
    from nio_logd.records.record import _json_error
    from nio_logd.tools.client import send

    srv = server_factory(write_config(tmp_path, listeners=[{"address": f"tcp://127.0.0.1:{free_port()}", "ack": True}]))
    bad = [b'{"a" 1}', b"{", b'{"send_user":"\x01"}', b"nope", b"{}x"]
    result = send(srv.address, bad, ack=True)
    errors = [answer["error"] for _i, _line, answer in result.refused]
    assert len(errors) == len(bad)
    assert errors[0] == "(record): invalid JSON: expected `:` at line 1 column 6"
    for error in errors:
        assert re.fullmatch(r"\(record\): invalid JSON: \S.* at line 1 column \d+", error), error
        assert " at at " not in error
    # A parser message whose own words end in "at" (Python's json does this) is said once too.
    assert _json_error("Invalid JSON: Invalid control character at at line 1 column 2") == (
        "invalid JSON: Invalid control character at line 1 column 2"
    )


def test_stale_pidfile_names_a_reused_pid_as_another_program(tmp_path: Path) -> None:
    """A pid now used by another program is said to be that program's, not "gone"; a dead one is gone."""
    config = write_config(tmp_path, daemon={"pidfile": "nio-logd.pid", "events": "json"})
    pidfile = tmp_path / "nio-logd.pid"
    with subprocess.Popen(["sleep", "60"]) as other:
        try:
            pidfile.write_text(f"{other.pid}\n")
            status = nio("status", "--config", str(config))
            assert status.returncode == 3
            assert f"pid {other.pid} is now another program ('sleep'), not nio-logd" in status.stdout, status.stdout
            assert "gone" not in status.stdout
            stop = nio("stop", "--config", str(config))
            assert stop.returncode == 0 and "another program ('sleep')" in stop.stdout
            assert other.poll() is None
        finally:
            other.kill()
    # other has been waited for (the with block): its pid names no process now
    status = nio("status", "--config", str(config))
    assert status.returncode == 3
    assert f"pid {other.pid} is gone" in status.stdout, status.stdout


def test_send_ack_says_sent_1_record(tmp_path: Path, server_factory: Any) -> None:
    srv = server_factory(write_config(tmp_path, listeners=[{"address": f"tcp://127.0.0.1:{free_port()}", "ack": True}]))
    one = nio("send", "--address", srv.address, "--ack", stdin=record() + b"\n")
    assert one.returncode == 0, one.stderr
    assert one.stderr.strip() == "sent 1 record: 1 acknowledged, 0 refused"
    two = nio("send", "--address", srv.address, "--ack", stdin=record() + b"\n" + record() + b"\n")
    assert two.stderr.strip() == "sent 2 records: 2 acknowledged, 0 refused"


@pytest.mark.root
def test_run_as_root_without_a_user_warns_running_as_root(tmp_path: Path, daemon_factory: Any) -> None:
    """`run` as root with no [daemon] user logs the running_as_root warning, as `start` does."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    d = daemon_factory(write_config(tmp_path))
    ev = wait_for(lambda: d.event("running_as_root"), 10)
    assert ev["level"] == "warning" and "[daemon] user" in ev["advice"]
    assert d.stop() == 0


def _keys(model: Any) -> set[str]:
    return set(model.model_fields)


def test_example_config_names_every_key_and_its_commented_defaults_are_the_defaults(tmp_path: Path) -> None:
    """config/nio-logd.toml shows every key (set, or commented out), in its table; the commented
    events_file, uncommented, changes nothing."""
    text = (REPO / "config" / "nio-logd.toml").read_text()
    tables: dict[str, set[str]] = {}
    table = ""
    for line in text.splitlines():
        head = re.match(r"#?\s*\[\[?([\w.]+)\]\]?", line)
        if head:
            table = head[1]
            continue
        key = re.match(r"#?\s*(\w+)\s*=", line)
        if key:
            tables.setdefault(table, set()).add(key[1])
    expected: dict[str, set[str]] = {
        "listeners": _keys(ListenerSettings) - {"tls"},
        "listeners.tls": _keys(TLSSettings),
        "forward": _keys(ForwardSettings) - {"tls"},
        "forward.tls": _keys(ForwardTLSSettings),
    }
    for name, field in Settings.model_fields.items():
        if name not in ("listeners", "forward", "base_dir", "source"):
            assert field.annotation is not None
            expected[name] = _keys(field.annotation)
    missing = {t: sorted(keys - tables.get(t, set())) for t, keys in expected.items() if keys - tables.get(t, set())}
    assert missing == {}
    uncommented, n = re.subn(r"^# (events_file = )", r"\1", text, flags=re.M)
    assert n == 1
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "n.toml").write_text(text)
    (tmp_path / "b" / "n.toml").write_text(uncommented)
    a, b = load_file(tmp_path / "a" / "n.toml"), load_file(tmp_path / "b" / "n.toml")
    assert b.daemon.events_file is not None
    assert events_path(a).relative_to(tmp_path / "a") == events_path(b).relative_to(tmp_path / "b")


@pytest.mark.parametrize(("events_file", "expected"), [(None, "logs/nio-logd.events.log"), ("ev/e.log", "ev/e.log")])
def test_check_config_prints_the_resolved_events_file(tmp_path: Path, events_file: str | None, expected: str) -> None:
    daemon: dict[str, Any] = {"events": "json"}
    if events_file:
        daemon["events_file"] = events_file
    out = nio("check-config", "--config", str(write_config(tmp_path, daemon=daemon)))
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["paths"]["events"] == str(tmp_path / expected)


@pytest.mark.parametrize("log_path", ["/proc/nio-logd-test/messages.log", "/proc/nio.log"])
def test_a_log_path_under_proc_names_the_file(tmp_path: Path, log_path: str) -> None:
    """`run` with a log under /proc (a folder that cannot be made, a file that cannot be created):
    the one line names the log file, not only its folder."""
    out = nio("run", "--config", str(write_config(tmp_path, log={"path": log_path})))
    assert out.returncode == 69
    assert len(out.stderr.strip().splitlines()) == 1
    assert f"cannot open log file {log_path}:" in out.stderr, out.stderr


def test_the_readme_test_command_is_what_ci_runs() -> None:
    """.ci/run runs exactly the README's "whole test suite" command (a package added to one and
    not the other once made them differ)."""
    root = Path(__file__).resolve().parents[1]
    ci = (root / ".ci" / "run").read_text().strip().splitlines()[-1]
    readme = [line for line in (root / "README.md").read_text().splitlines() if line.startswith("apt-get update")]
    assert readme == [ci]


@pytest.mark.parametrize("program", ["nio_logd.cli", "nio_logd.service.worker"])
def test_the_daemons_programs_never_load_rich_even_where_it_is_installed(program: str) -> None:
    # rich is installed here (twine needs it), and structlog would import it: the daemon's
    # processes must weigh and behave the same as on a machine without it.
    probe = "import importlib.util, sys; print(importlib.util.find_spec('rich') is not None)"
    installed = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True)
    assert installed.stdout.strip() == "True"
    check = f"import sys, {program}, structlog; print(sys.modules.get('rich') is None, 'structlog' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.split() == ["True", "True"], out.stderr
