"""`nio-logd send`: the default send_time is one instant in any $TZ, a bad --time is refused before
connecting, --config brings the listener's TLS, the count of records sent, failover over several
--address values (and with --ack, over a daemon stopped mid-way, nothing lost).

Real daemons (in-process servers or `nio-logd run` processes) on 127.0.0.1, the real command line.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from conftest import free_port, read_lines, record, wait_for, write_config


def nio(*args: str, stdin: bytes = b"", env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "nio_logd", *args],
        input=stdin.decode(),
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
        check=False,
    )


def _ack_listener() -> list[dict[str, Any]]:
    return [{"address": f"tcp://127.0.0.1:{free_port()}", "ack": True}]


def _msgs(path: Path) -> list[str]:
    return [line["send_msg"] for line in read_lines(path, writing=True)]


# -- --time ------------------------------------------------------------------------------------------
def test_default_send_time_has_the_utc_offset_and_is_the_same_instant_in_paris_and_new_york(
    tmp_path: Path, server_factory: Any
) -> None:
    srv = server_factory(write_config(tmp_path))
    for tz in ("Europe/Paris", "America/New_York"):
        out = nio("send", "--address", srv.address, "--user", "u", "--msg", tz, env={"TZ": tz})
        assert out.returncode == 0, out.stderr
    srv.wait_written(2)
    written = {line["send_msg"]: datetime.fromisoformat(line["send_time"]) for line in read_lines(srv.messages)}
    paris, new_york = written["Europe/Paris"], written["America/New_York"]
    assert paris.utcoffset() in (timedelta(hours=1), timedelta(hours=2)), paris
    assert new_york.utcoffset() in (timedelta(hours=-5), timedelta(hours=-4)), new_york
    assert abs(paris - new_york) < timedelta(seconds=10)  # aware datetimes: instants compared
    assert abs(datetime.now(UTC) - paris) < timedelta(seconds=30)


BAD_TIMES = ["yesterday", "1700000000", "2026-13-01 00:00:00", "2026-11-29T25:00:00", "29/11/2026 12:00", ""]


@pytest.mark.parametrize("when", BAD_TIMES)
def test_a_bad_time_is_a_usage_error_and_nothing_connects(when: str) -> None:
    """Exit 2, one line naming --time, and the daemon's socket never sees a connection."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.settimeout(0.5)
        address = f"tcp://127.0.0.1:{listener.getsockname()[1]}"
        out = nio("send", "--address", address, "--user", "u", "--msg", "m", "--time", when)
        try:
            conn, _ = listener.accept()
        except TimeoutError:
            conn = None
        if conn is not None:
            conn.close()
    assert conn is None, "send connected before checking --time"
    assert out.returncode == 2, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and "--time" in out.stderr, out.stderr


def test_a_bad_time_with_no_daemon_is_still_a_usage_error() -> None:
    out = nio("send", "--address", f"tcp://127.0.0.1:{free_port()}", "--user", "u", "--msg", "m", "--time", "noon")
    assert out.returncode == 2 and "cannot connect" not in out.stderr, out.stderr
    alone = nio("send", "--address", f"tcp://127.0.0.1:{free_port()}", "--time", "2026-11-29 12:00:00")
    assert alone.returncode == 2 and "--time needs --user and --msg" in alone.stderr, alone.stderr


def test_the_time_check_takes_exactly_what_the_daemon_takes() -> None:
    from nio_logd.config import RecordSettings
    from nio_logd.errors import UsageError
    from nio_logd.records.record import RecordValidator, Refusal
    from nio_logd.tools.client import check_time

    daemon = RecordValidator(RecordSettings(), 1 << 20)
    samples = [
        *BAD_TIMES,
        "2026-11-29 12:00:00",
        "2026-11-29T12:00:00Z",
        "2026-11-29T12:00:00+01:00",
        "2026-11-29t12:00:00.123456-05:00",
        "2026-11-29T12:00",
        "2026-11-29_12:00:00",
        "2026-11-29",
        " 2026-11-29 12:00:00",
        "2026-02-30 12:00:00",
    ]
    for when in samples:
        taken = not isinstance(daemon.validate(record(when=when)), Refusal)
        try:
            check_time(when)
            checked = True
        except UsageError:
            checked = False
        assert checked == taken, when


# -- --config brings the listener's TLS -------------------------------------------------------------
def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _server_cert(d: Path, kind: str) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key: self-signed, or issued by a CA the listener does not list."""
    key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    if kind == "self-signed":
        _openssl("req", "-x509", *key, "-keyout", "s.key", "-out", "s.pem", "-days", "2", "-subj", "/CN=nio-test",
                 "-addext", "subjectAltName=IP:127.0.0.1", cwd=d)  # fmt: skip
        return d / "s.pem", d / "s.key"
    ca_ext = ["-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign"]
    _openssl("req", "-x509", *key, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=nio-test-ca",
             *ca_ext, cwd=d)  # fmt: skip
    _openssl("req", *key, "-keyout", "s.key", "-out", "s.csr", "-subj", "/CN=nio-server", cwd=d)
    (d / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n")
    _openssl("x509", "-req", "-in", "s.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-out", "s.pem",
             "-days", "2", "-extfile", "ext.cnf", cwd=d)  # fmt: skip
    return d / "s.pem", d / "s.key"


@pytest.mark.parametrize("kind", ["self-signed", "issued by a CA"])
def test_send_config_speaks_tls_to_a_tls_listener(tmp_path: Path, server_factory: Any, kind: str) -> None:
    """`send --config X` (no --address, no --tls): TLS, the daemon verified against the listener's cert."""
    cert, key = _server_cert(tmp_path, kind)
    tls = {"cert": str(cert), "key": str(key)}
    config = write_config(tmp_path, listeners=[{"address": f"tcp://127.0.0.1:{free_port()}", "ack": True, "tls": tls}])
    srv = server_factory(config)
    out = nio("send", "--config", str(config), "--user", "tls", "--msg", kind, "--ack")
    assert out.returncode == 0, out.stderr
    assert "1 acknowledged" in out.stderr
    srv.wait_written(1)
    assert _msgs(srv.messages) == [kind]


# -- how many were sent ------------------------------------------------------------------------------
def test_send_without_ack_says_how_many_records_were_sent(tmp_path: Path, server_factory: Any) -> None:
    srv = server_factory(write_config(tmp_path))
    three = nio("send", "--address", srv.address, stdin=b"".join(record(msg=str(i)) + b"\n" for i in range(3)))
    assert three.returncode == 0 and three.stderr.strip() == "sent 3 records", three.stderr
    one = nio("send", "--address", srv.address, "--user", "u", "--msg", "m")
    assert one.returncode == 0 and one.stderr.strip() == "sent 1 record", one.stderr
    srv.wait_written(4)


# -- several --address -------------------------------------------------------------------------------
@pytest.mark.parametrize("ack", [False, True])
def test_send_fails_over_to_the_next_address_and_prefers_the_first(
    tmp_path: Path, server_factory: Any, ack: bool
) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = server_factory(write_config(tmp_path / "a", listeners=_ack_listener() if ack else None))
    second = server_factory(write_config(tmp_path / "b", listeners=_ack_listener() if ack else None))
    nothing = f"tcp://127.0.0.1:{free_port()}"
    flags = ["--ack"] if ack else []
    out = nio("send", "--address", nothing, "--address", second.address, *flags, "--user", "u", "--msg", "over")
    assert out.returncode == 0, out.stderr
    second.wait_written(1)
    out = nio("send", "--address", first.address, "--address", second.address, *flags, "--user", "u", "--msg", "pref")
    assert out.returncode == 0, out.stderr
    first.wait_written(1)
    assert _msgs(first.messages) == ["pref"] and _msgs(second.messages) == ["over"]
    out = nio("send", "--address", nothing, "--address", f"tcp://127.0.0.1:{free_port()}", *flags,
              "--user", "u", "--msg", "lost", "--timeout", "2")  # fmt: skip
    assert out.returncode == 1 and out.stderr.count("cannot connect") == 2, out.stderr


def test_client_library_send_takes_a_list_of_addresses(tmp_path: Path, server_factory: Any) -> None:
    from nio_logd.tools.client import send

    srv = server_factory(write_config(tmp_path, listeners=_ack_listener()))
    result = send([f"tcp://127.0.0.1:{free_port()}", srv.address], [record(msg="lib")], ack=True)
    assert result.acked == 1
    assert send(srv.address, [record(msg="single")], ack=True).acked == 1  # one address, as before
    srv.wait_written(2)
    assert _msgs(srv.messages) == ["lib", "single"]


def test_send_ack_fails_over_when_the_first_daemon_stops_mid_way(tmp_path: Path, daemon_factory: Any) -> None:
    """kill -9 of the first daemon mid-stream: send --ack goes on with the second and resends what
    was not answered there; every record is in one of the two logs, and the CLI exits 0. (A SIGTERM
    lets the first drain: it took all 200,000 records here before it closed.)"""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = daemon_factory(write_config(tmp_path / "a", _ack_listener(), server={"shutdown_timeout": 2.0}))
    second = daemon_factory(write_config(tmp_path / "b", _ack_listener()))
    total = 200_000
    proc = subprocess.Popen(
        [sys.executable, "-m", "nio_logd", "send", "--ack", "--address", first.address, "--address", second.address],
        stdin=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert proc.stdin is not None and proc.stderr is not None
        proc.stdin.write(b"".join(record("f", f"m-{i}") + b"\n" for i in range(total)))
        proc.stdin.close()
        # A stat, not a parse of the growing log: parsing it took longer than the daemon took to
        # finish all 200,000 (seen in CI). SIGSTOP first, so the client cannot collect the rest of
        # its acks from it between our look and the kill.
        wait_for(lambda: first.messages.exists() and first.messages.stat().st_size >= 1_000_000, 60, 0.002)
        first.signal(signal.SIGSTOP)
        assert proc.poll() is None, "the client finished before the first daemon was stopped"
        first.signal(signal.SIGKILL)
        first.proc.wait(30)
        err = proc.stderr.read()
        assert proc.wait(120) == 0, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        if proc.stderr is not None:
            proc.stderr.close()
    assert f"sent {total} records: {total} acknowledged, 0 refused".encode() in err, err
    assert b"resent after 1 reconnect\n" in err, err
    second.stop()
    in_first, in_second = set(_msgs(first.messages)), set(_msgs(second.messages))
    assert in_second, "nothing reached the second daemon"
    assert in_first | in_second == {f"m-{i}" for i in range(total)}
