"""The logging handler and the structlog integration against real daemons: what lands in the log
(user, time with offset, message, extra fields), TLS and the Unix socket, emit() never blocking
(nobody listening, a stopped daemon), the daemon killed and restarted while the application logs
(nothing lost), failover, refusals counted and not resent.

Real ``nio-logd run`` processes (``daemon_factory``) on loopback, ``[server] workers = 1`` except
in one run of the kill-and-restart test, which uses the default worker processes.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import structlog
from conftest import free_port, read_lines, wait_for, write_config
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_tls import PKI, pki, tls_listener  # noqa: F401 - pki is a fixture

from nio_logd.errors import ClientError
from nio_logd.tools.handler import NioLogdHandler, record_time
from nio_logd.tools.structlog_sink import NioLogdLogger, NioLogdLoggerFactory


def _ack_tcp(port: int | None = None) -> dict[str, Any]:
    return {"address": f"tcp://127.0.0.1:{port or free_port()}", "ack": True}


def _config(directory: Path, listeners: list[dict[str, Any]], workers: int | None = 1, **sections: Any) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    if workers is not None:
        sections.setdefault("server", {})["workers"] = workers
    return write_config(directory, listeners, **sections)


class Collect(logging.Handler):
    """Keeps the LogRecords, to compare what was written with ``record.created``."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def attach() -> Iterator[Any]:
    """A fresh logger (no propagation) carrying the given handlers; closed at the end."""
    loggers: list[logging.Logger] = []

    def make(*handlers: logging.Handler) -> logging.Logger:
        logger = logging.getLogger(f"nio-test.{uuid.uuid4().hex[:8]}")
        logger.propagate = False
        logger.setLevel(logging.DEBUG)
        for h in handlers:
            logger.addHandler(h)
        loggers.append(logger)
        return logger

    yield make
    for logger in loggers:
        for h in list(logger.handlers):
            logger.removeHandler(h)
            h.close()


def _msgs(path: Path) -> list[str]:
    return [line["send_msg"] for line in read_lines(path, writing=True)]


def _instant(text: str) -> datetime:
    when = datetime.fromisoformat(text)
    assert when.utcoffset() is not None, f"send_time without an offset: {text}"
    return when


# -- what lands in the log ---------------------------------------------------------------------------
def test_records_land_with_the_user_the_creation_time_with_offset_and_the_formatted_message(
    tmp_path: Path, daemon_factory: Any, attach: Any
) -> None:
    listener = _ack_tcp()
    daemon = daemon_factory(_config(tmp_path, [listener]))
    handler = NioLogdHandler(listener["address"], user="billing")
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    seen = Collect()
    logger = attach(handler, seen)
    logger.info("order %s paid", 42)
    logger.warning("card %s declined", "x-1")
    old_tz = os.environ.get("TZ")
    os.environ["TZ"] = "America/New_York"  # another offset, the same instant
    time.tzset()
    try:
        logger.error("in New York")
    finally:
        if old_tz is None:
            del os.environ["TZ"]
        else:
            os.environ["TZ"] = old_tz
        time.tzset()
    assert handler.flush(20)
    lines = read_lines(daemon.messages)
    assert [m["send_msg"] for m in lines] == [
        f"INFO {logger.name}: order 42 paid",
        f"WARNING {logger.name}: card x-1 declined",
        f"ERROR {logger.name}: in New York",
    ]
    assert {m["send_user"] for m in lines} == {"billing"}
    for line, rec in zip(lines, seen.records, strict=True):
        assert _instant(line["send_time"]) == datetime.fromtimestamp(rec.created, UTC)
    ny = _instant(lines[2]["send_time"]).utcoffset()  # the offset in force when it was created
    assert ny is not None and ny.total_seconds() in (-5 * 3600, -4 * 3600)
    assert (handler.sent, handler.acked, handler.refused, handler.dropped, handler.resent) == (3, 3, 0, 0, 0)
    assert handler.counts()["held"] == 0


def test_arbitrary_users_and_messages_round_trip(tmp_path: Path, daemon_factory: Any) -> None:
    listener = _ack_tcp()
    daemon = daemon_factory(_config(tmp_path, [listener]))
    bidi = "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
    users = st.text(st.characters(exclude_categories=("Cc", "Cs"), exclude_characters=bidi), min_size=1, max_size=64)
    messages = st.text(st.characters(exclude_categories=("Cs",)), max_size=300)
    written: list[tuple[str, str]] = []

    @settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(user=users, msg=messages)
    def round_trip(user: str, msg: str) -> None:
        handler = NioLogdHandler(listener["address"], user=user, close_timeout=20)
        logger = logging.getLogger("nio-test.hypothesis")
        logger.propagate = False
        logger.setLevel(logging.INFO)
        logger.addHandler(handler)
        try:
            logger.info("%s", msg)
        finally:
            logger.removeHandler(handler)
            handler.close()
        assert handler.acked == 1, handler.last_error
        written.append((user, msg))
        last = read_lines(daemon.messages)[-1]
        assert (last["send_user"], last["send_msg"]) == (user, msg)

    round_trip()
    assert [(m["send_user"], m["send_msg"]) for m in read_lines(daemon.messages)][-len(written) :] == written


def test_extra_fields_are_sent_when_asked_and_kept_by_a_keep_listener(
    tmp_path: Path, daemon_factory: Any, attach: Any
) -> None:
    listener = _ack_tcp()
    daemon = daemon_factory(_config(tmp_path, [listener], record={"extra": "keep"}))
    handler = NioLogdHandler(
        listener["address"], user="api", fields={"logger": "name", "log_level": "levelname"}, extra=True
    )
    logger = attach(handler)

    class Opaque:
        def __str__(self) -> str:
            return "opaque!"

    logger.info("paid", extra={"request_id": "r-1", "amount": 12.5, "obj": Opaque(), "send_user": "spoof"})
    logger.info("reserved", extra={"level": "x"})  # a key the daemon writes itself: refused
    assert handler.flush(20)
    (line,) = read_lines(daemon.messages)
    assert line["send_user"] == "api" and line["send_msg"] == "paid"
    assert (line["logger"], line["log_level"], line["request_id"], line["amount"], line["obj"]) == (
        logger.name, "INFO", "r-1", 12.5, "opaque!"
    )  # fmt: skip
    assert (handler.acked, handler.refused, handler.resent) == (1, 1, 0)
    assert handler.last_refusal is not None and "level" in json.dumps(handler.last_refusal)


def test_refused_records_are_counted_and_not_sent_again(tmp_path: Path, daemon_factory: Any, attach: Any) -> None:
    """A listener with the default extra = "forbid" refuses a record with more fields: ok:false."""
    listener = _ack_tcp()
    daemon = daemon_factory(_config(tmp_path, [listener]))
    handler = NioLogdHandler(listener["address"], fields={"logger": "name"})
    logger = attach(handler)
    for i in range(5):
        logger.info("r-%d", i)
    assert handler.flush(20)
    assert (handler.sent, handler.acked, handler.refused, handler.resent, handler.dropped) == (5, 0, 5, 0, 0)
    wait_for(lambda: len(read_lines(daemon.rejects, writing=True)) == 5)
    assert not daemon.messages.exists() or read_lines(daemon.messages) == []
    assert handler.last_refusal is not None and handler.last_refusal["ok"] is False


# -- transports ----------------------------------------------------------------------------------------
def test_tls_with_a_client_certificate(tmp_path: Path, daemon_factory: Any, attach: Any, pki: PKI) -> None:
    listener = tls_listener(pki, ack=True)  # requires a client certificate from the CA
    daemon = daemon_factory(_config(tmp_path, [listener]))
    handler = NioLogdHandler(
        listener["address"], user="tls", ca=str(pki.ca.pem), cert=str(pki.client.pem), key=str(pki.client.key)
    )
    logger = attach(handler)
    for i in range(200):
        logger.info("tls-%d", i)
    assert handler.flush(20), handler.last_error
    lines = read_lines(daemon.messages)
    assert [m["send_msg"] for m in lines] == [f"tls-{i}" for i in range(200)]
    assert {m["client"] for m in lines} == {pki.client.subject}
    # An untrusted daemon is never sent to: the handshake fails, the records wait.
    stranger = NioLogdHandler(listener["address"], ca=str(pki.other_ca.pem), close_timeout=0.5, max_backoff=0.1)
    attach(stranger).info("never")
    wait_for(lambda: stranger.last_error and "certificate verify failed" in stranger.last_error)
    assert not stranger.flush(0.2) and stranger.sent == 0


def test_unix_socket(tmp_path: Path, daemon_factory: Any, attach: Any) -> None:
    folder = Path(tempfile.mkdtemp(prefix="nlh-", dir="/tmp"))  # a short path: sun_path holds 108 bytes
    try:
        address = f"unix://{folder}/logd.sock"
        daemon = daemon_factory(_config(tmp_path, [{"address": address, "ack": True}]))
        handler = NioLogdHandler(address, user="local")
        logger = attach(handler)
        for i in range(100):
            logger.info("unix-%d", i)
        assert handler.flush(20), handler.last_error
        lines = read_lines(daemon.messages)
        assert [m["send_msg"] for m in lines] == [f"unix-{i}" for i in range(100)]
        assert {(m["send_user"], m["peer"], m["peer_pid"]) for m in lines} == {("local", "unix", os.getpid())}
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_without_acks_records_are_written_plainly(tmp_path: Path, daemon_factory: Any, attach: Any) -> None:
    port = free_port()
    daemon = daemon_factory(_config(tmp_path, [{"address": f"tcp://127.0.0.1:{port}"}]))
    handler = NioLogdHandler(f"tcp://127.0.0.1:{port}", ack=False)
    logger = attach(handler)
    for i in range(1000):
        logger.info("plain-%d", i)
    assert handler.flush(20)
    wait_for(lambda: len(_msgs(daemon.messages)) == 1000)
    assert _msgs(daemon.messages) == [f"plain-{i}" for i in range(1000)]


# -- never blocking ------------------------------------------------------------------------------------
def _log_many(logger: logging.Logger, n: int) -> tuple[float, float]:
    """Log n records; (total seconds, longest single call)."""
    longest = 0.0
    start = time.perf_counter()
    for i in range(n):
        t = time.perf_counter()
        logger.info("m-%d", i)
        longest = max(longest, time.perf_counter() - t)
    return time.perf_counter() - start, longest


def test_with_nobody_listening_emit_returns_at_once_drops_are_counted_and_the_queue_is_sent_later(
    tmp_path: Path, daemon_factory: Any, attach: Any
) -> None:
    port = free_port()
    handler = NioLogdHandler(f"tcp://127.0.0.1:{port}", queue_size=2000, max_backoff=0.2)
    logger = attach(handler)
    total, longest = _log_many(logger, 100_000)
    assert total < 20 and longest < 0.5, (total, longest)
    assert handler.dropped == 98_000 and handler.counts()["held"] == 2000
    assert handler.last_error is not None and "cannot connect" in handler.last_error
    daemon = daemon_factory(_config(tmp_path, [_ack_tcp(port)]))  # now someone listens: reconnect
    assert handler.flush(30), handler.last_error
    assert _msgs(daemon.messages) == [f"m-{i}" for i in range(2000)]
    assert (handler.acked, handler.dropped) == (2000, 98_000)


def test_a_stopped_daemon_does_not_block_the_application(tmp_path: Path, daemon_factory: Any, attach: Any) -> None:
    listener = _ack_tcp()
    daemon = daemon_factory(_config(tmp_path, [listener]))
    daemon.signal(signal.SIGSTOP)  # connects still succeed (the backlog); nothing is read or answered
    try:
        handler = NioLogdHandler(listener["address"], queue_size=5000, timeout=30)
        logger = attach(handler)
        total, longest = _log_many(logger, 100_000)
        assert total < 20 and longest < 0.5, (total, longest)
        assert handler.dropped == 95_000 and handler.acked == 0
    finally:
        daemon.signal(signal.SIGCONT)
    assert handler.flush(30), handler.last_error
    assert sorted(set(_msgs(daemon.messages))) == sorted(f"m-{i}" for i in range(5000))
    assert handler.acked == 5000


def test_close_is_bounded_and_counts_what_it_abandons(attach: Any) -> None:
    """As logging.shutdown does at exit: flush(), then close(); with nobody listening, each bounded,
    and close() does not wait a second time once a flush timed out."""
    handler = NioLogdHandler(f"tcp://127.0.0.1:{free_port()}", close_timeout=1.0)
    logger = attach(handler)
    for i in range(10):
        logger.info("lost-%d", i)
    start = time.monotonic()
    assert handler.flush() is False
    assert 0.9 < time.monotonic() - start < 3
    start = time.monotonic()
    handler.close()
    assert time.monotonic() - start < 0.9
    assert handler.stats.abandoned == 10 and handler.dropped == 0
    logger.info("after close")  # dropped, counted, no error
    assert handler.dropped == 1
    handler.close()  # twice is harmless
    assert handler.stats.abandoned == 10


def test_a_record_that_cannot_be_formatted_goes_to_handle_error_not_to_the_caller(attach: Any) -> None:
    class Recording(NioLogdHandler):
        def handleError(self, record: logging.LogRecord) -> None:
            failed.append(record)

    failed: list[logging.LogRecord] = []
    handler = Recording(f"tcp://127.0.0.1:{free_port()}", close_timeout=0.1)
    logger = attach(handler)
    logger.info("%d apples", "not a number")  # raises inside format()
    assert [r.msg for r in failed] == ["%d apples"] and handler.counts()["held"] == 0


def test_bad_settings_raise_client_error() -> None:
    with pytest.raises(ClientError, match="expected tcp://HOST:PORT"):
        NioLogdHandler("http://example.net")
    with pytest.raises(ClientError, match="must be > 0"):
        NioLogdHandler(queue_size=0)
    with pytest.raises(ClientError, match="TLS CA file"):
        NioLogdHandler(ca="/nonexistent/ca.pem")


# -- the daemon killed and restarted; failover ---------------------------------------------------------
@pytest.mark.parametrize("workers", [1, None], ids=["workers=1", "workers=default"])
def test_daemon_killed_and_restarted_while_logging_with_acks_loses_nothing(
    tmp_path: Path, daemon_factory: Any, attach: Any, workers: int | None
) -> None:
    total = 50_000
    listener = _ack_tcp()
    config = _config(tmp_path, [listener], workers=workers)
    first = daemon_factory(config)
    handler = NioLogdHandler(listener["address"], queue_size=total, max_backoff=0.2)
    logger = attach(handler)
    logged = 0

    def application() -> None:
        nonlocal logged
        for i in range(total):
            logger.info("k-%d", i)
            logged = i + 1
            if i % 250 == 249:  # about 25,000 records/s, in bursts
                time.sleep(0.01)

    app = threading.Thread(target=application)
    app.start()
    try:
        wait_for(lambda: first.messages.exists() and first.messages.stat().st_size > 1_000_000, 30, 0.005)
        assert app.is_alive(), "the application finished before the kill"
        first.proc.kill()  # SIGKILL
        first.proc.wait(10)
        at_kill = logged
        second = daemon_factory(config)  # the same port, the same log
    finally:
        app.join(60)
    assert not app.is_alive() and at_kill < total
    assert handler.flush(30), handler.last_error
    assert (handler.acked, handler.refused, handler.dropped) == (total, 0, 0)
    assert handler.stats.errors >= 1 and handler.stats.connections >= 2
    second.stop()
    counts = Counter(_msgs(second.messages))
    assert set(counts) == {f"k-{i}" for i in range(total)}, "records lost"
    duplicates = sum(n - 1 for n in counts.values())
    assert duplicates <= handler.resent, (duplicates, handler.resent)


def test_failover_to_the_second_daemon_when_the_first_goes_down(
    tmp_path: Path, daemon_factory: Any, attach: Any
) -> None:
    one, two = _ack_tcp(), _ack_tcp()
    first = daemon_factory(_config(tmp_path / "a", [one]))
    second = daemon_factory(_config(tmp_path / "b", [two]))
    handler = NioLogdHandler([one["address"], two["address"]], max_backoff=0.2)
    logger = attach(handler)
    for i in range(50):
        logger.info("f-%d", i)
    assert handler.flush(20)
    assert _msgs(first.messages) == [f"f-{i}" for i in range(50)] and _msgs(second.messages) == []
    first.proc.kill()
    first.proc.wait(10)
    for i in range(50, 100):
        logger.info("f-%d", i)
    assert handler.flush(20), handler.last_error
    assert set(_msgs(first.messages)) | set(_msgs(second.messages)) == {f"f-{i}" for i in range(100)}
    assert set(_msgs(second.messages)) >= {f"f-{i}" for i in range(50, 100)}
    assert handler.acked == 100
    # Nobody at the first address from the start: the second takes everything.
    third = NioLogdHandler([f"tcp://127.0.0.1:{free_port()}", two["address"]], user="third")
    attach(third).info("via the second")
    assert third.flush(20)
    assert read_lines(second.messages)[-1]["send_user"] == "third"


# -- structlog -----------------------------------------------------------------------------------------
def test_structlog_rendered_events_and_event_dicts_reach_the_daemon(tmp_path: Path, daemon_factory: Any) -> None:
    listener = _ack_tcp()
    daemon = daemon_factory(_config(tmp_path, [listener], record={"extra": "keep"}))
    handler = NioLogdHandler(listener["address"], user="svc")
    try:
        structlog.configure(
            processors=[structlog.processors.add_log_level, structlog.processors.JSONRenderer(sort_keys=True)],
            logger_factory=NioLogdLoggerFactory(handler),
            cache_logger_on_first_use=False,
        )
        before = time.time()
        structlog.get_logger().info("user logged in", user_id=7)
        # The event dict itself (a last processor returning it): its keys become extra fields.
        as_fields = structlog.wrap_logger(
            NioLogdLogger(handler), processors=[structlog.processors.add_log_level, lambda _l, _m, ev: ev]
        )
        as_fields.warning("disk low", free_mb=12)
        after = time.time()
        assert handler.flush(20), handler.last_error
    finally:
        structlog.reset_defaults()
        handler.close()
    rendered, fields = read_lines(daemon.messages)
    assert json.loads(rendered["send_msg"]) == {"event": "user logged in", "level": "info", "user_id": 7}
    assert rendered["send_user"] == "svc"
    assert before - 1e-6 <= _instant(rendered["send_time"]).timestamp() <= after + 1e-6
    assert (fields["send_msg"], fields["free_mb"], fields["log_level"]) == ("disk low", 12, "warning")
    assert fields["level"] == "info"  # the daemon's own level: the event's went under log_level
    assert handler.acked == 2


def test_record_time_is_the_instant_with_the_local_offset() -> None:
    created = 1_764_417_347.678347
    text = record_time(created)
    assert _instant(text) == datetime.fromtimestamp(created, UTC)
    assert _instant(text).utcoffset() == datetime.fromtimestamp(created).astimezone().utcoffset()
