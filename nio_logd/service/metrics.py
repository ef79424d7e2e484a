"""Metrics: Prometheus text format and a health check on an optional HTTP listener.

design: the hot path only bumps plain ints (each I/O loop's ``stats`` counters, the writer's
counters and ``LatencyHistogram`` buckets, all changed by one thread each, per read or per batch,
never per record under a lock). A custom prometheus_client ``Collector`` reads
``Server.snapshot()`` when Prometheus scrapes, so the cost of metrics is paid by the scraper.
The HTTP server (wsgiref, one thread per request) runs in its own daemon thread and serves
``/metrics`` and ``/healthz``.

The listener must not be a way to take the daemon down, since each connection costs a thread and
an fd, and the fds are shared with the log clients:
- at most ``[metrics] max_connections`` are served at a time; past that a new connection is
  closed at once (the kernel's listen backlog holds no fd of ours);
- a client must send its whole request head within ``read_timeout`` (a deadline, not a per-recv
  timeout: a byte every few seconds cannot hold a slot), and each send of the answer gets as long;
- when accept fails for want of fds (EMFILE, ENFILE) the accept loop sleeps (50 ms doubling to
  0.5 s) instead of spinning: the pending connection keeps the listening socket readable;
- ``[metrics] allow`` networks, checked before anything is read.
Refusals, timeouts and accept failures are counted in ``nio_logd_metrics_*`` and logged at most
once a minute (per address for ``not_allowed``).

``/healthz`` answers 200 while the daemon can take records, and 503 with the reasons when
- the writer has had records queued and made no progress for ``[metrics] health_stall_seconds``
  (a stuck or failing disk: ENOSPC, EIO, a frozen filesystem), or writes have been failing
  that long, or
- an I/O loop has been paused by backpressure without a break for that long, or
- a writer or I/O thread has died, or the daemon is stopping, or
- a ``[[forward]]`` table's lag is past its threshold: more than ``lag_bytes`` bytes of the log
  not acknowledged by its engine, or the oldest of them waiting more than ``lag_seconds``.
A disk that is slow but keeps up with short pauses stays healthy: that is backpressure doing its
job, visible in ``nio_logd_backpressure_paused_seconds_total``.
"""

from __future__ import annotations

import errno
import io
import socket
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any, Protocol
from wsgiref.simple_server import WSGIRequestHandler

import orjson
from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from ..config import MetricsSettings, Settings, parse_address
from ..errors import StartupError
from ..events import get_logger
from ..output.writer import Writer
from ..stats import ForwardStats, Stats
from ..wire.access import AllowList, OncePer

if TYPE_CHECKING:
    from wsgiref.types import StartResponse, WSGIEnvironment


log = get_logger()

# Reasons always exported (as 0 until they happen), so dashboards and alerts see every series.
RECORD_REFUSAL_REASONS = ("invalid_json", "invalid_utf8", "not_an_object", "invalid_fields", "too_large")
CONNECTION_REFUSAL_REASONS = ("max_connections", "max_connections_per_client", "not_allowed")
METRICS_REFUSAL_REASONS = ("max_connections", "not_allowed")

# accept() errors that mean "no fd or memory for one more connection": retrying at once cannot
# succeed, and the connection still waiting keeps the listening socket readable.
_OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
_BACKOFF_FIRST = 0.05
_BACKOFF_MAX = 0.5  # also the most a shutdown waits for the accept loop to notice it


class Observed(Protocol):
    """What the metrics read from the server (``server.Server`` is one)."""

    settings: Settings
    writer: Writer

    def snapshot(self) -> Stats: ...


def health(server: Observed) -> tuple[bool, dict[str, Any]]:
    """Whether the daemon is healthy, and a JSON-able explanation."""
    s = server.snapshot()
    limit = server.settings.metrics.health_stall_seconds
    problems: list[str] = []
    if s.stopping:
        problems.append("the daemon is stopping")
    if s.writer.writer_stalled_seconds >= limit:
        problems.append(
            f"the writer has made no progress for {s.writer.writer_stalled_seconds:.0f} s "
            f"with {s.writer.queue_bytes} bytes queued"
        )
    if s.writer.write_failing_seconds >= limit:
        problems.append(
            f"writes have been failing for {s.writer.write_failing_seconds:.0f} s: {s.writer.last_write_error}"
        )
    if s.paused_now_seconds >= limit:
        problems.append(f"reading has been paused by backpressure for {s.paused_now_seconds:.0f} s")
    if s.fatal:
        problems.append(s.fatal)
    if not s.threads_alive:
        problems.append("a writer or I/O thread has died")
    problems.extend(reason for f in s.forward if (reason := f.lagging) is not None)
    body: dict[str, Any] = {
        "status": "unhealthy" if problems else "ok",
        "problems": problems,
        "paused": s.paused,
        "queue_bytes": s.writer.queue_bytes,
        "connections": s.connections,
        "writer_stalled_seconds": round(s.writer.writer_stalled_seconds, 3),
    }
    if s.forward:
        body["forward"] = {
            f.name: {
                "connected": f.connected,
                "forwarded": f.forwarded,
                "lag_bytes": f.lag_bytes,
                "lag_records": f.lag_records,
                "oldest_unforwarded_seconds": round(f.oldest_unforwarded_seconds, 3),
                "engine_errors": f.engine_errors,
                "lost_records": f.lost_records,
                "lost_files": f.lost_files,
                "last_error": f.last_error,
            }
            for f in s.forward
        }
    return not problems, body


class ServerCollector(Collector):
    """Reads the server's counters at scrape time."""

    def __init__(self, server: Observed) -> None:
        self.server = server

    def collect(self) -> Iterator[Metric]:
        s = self.server.snapshot()
        yield GaugeMetricFamily("nio_logd_connections_open", "Client connections open now.", value=s.connections)
        yield CounterMetricFamily(
            "nio_logd_connections", "Client connections accepted.", value=s.loops.connections_total
        )
        yield _by_reason(
            "nio_logd_connections_refused",
            "Connections closed at once, by reason.",
            s.loops.connections_refused_by_reason,
            CONNECTION_REFUSAL_REASONS,
        )
        yield CounterMetricFamily(
            "nio_logd_connections_idle_closed", "Connections closed after idle_timeout.", value=s.loops.idle_closed
        )
        yield _by_reason(
            "nio_logd_connections_closed",
            "Connections the daemon closed, by reason.",
            s.as_dict()["connections_closed_by_reason"],
            (),
        )
        yield GaugeMetricFamily(
            "nio_logd_buffered_bytes",
            "Unfinished lines, records waiting to be taken and unsent answers held now.",
            value=s.buffered_bytes,
        )
        yield CounterMetricFamily(
            "nio_logd_rejects_suppressed",
            "Refused records not written to the rejects log (per-connection rate), counted.",
            value=s.loops.records.rejects_suppressed,
        )
        for key, text in (
            ("read_errors", "Connections closed by a read error (reset, timeout)."),
            ("handler_errors", "Connections closed because handling them raised (a bug, logged)."),
            ("accept_errors", "Failed accept() calls (EMFILE, a network error of the new connection)."),
            ("accept_dead", "Connections already reset when accepted (health checks closing with RST)."),
            (
                "connections_handed_off",
                "Connections accepted by one worker process and served by another that held fewer.",
            ),
        ):
            yield CounterMetricFamily(f"nio_logd_{key}", text, value=getattr(s.loops, key))
        yield CounterMetricFamily("nio_logd_bytes_received", "Bytes read from clients.", value=s.loops.bytes_in)
        yield CounterMetricFamily(
            "nio_logd_records_accepted", "Records that passed validation.", value=s.loops.records.accepted
        )
        yield _by_reason(
            "nio_logd_records_refused",
            "Records refused (written to the rejects log), by reason.",
            s.loops.records.refused_by_reason,
            RECORD_REFUSAL_REASONS,
        )
        yield CounterMetricFamily(
            "nio_logd_records_written", "Accepted records written to the messages log.", value=s.writer.written
        )
        yield CounterMetricFamily(
            "nio_logd_rejects_written", "Refused records written to the rejects log.", value=s.writer.rejects_written
        )
        yield CounterMetricFamily(
            "nio_logd_rejects_lost",
            "Refused records whose rejects line could not be written (rejects disk full "
            "or failing); their clients were still told they were refused.",
            value=s.writer.rejects_lost,
        )
        yield CounterMetricFamily(
            "nio_logd_incomplete_records_dropped",
            "Connections whose unfinished last line was dropped at shutdown.",
            value=s.loops.incomplete_dropped,
        )
        yield GaugeMetricFamily(
            "nio_logd_queue_bytes", "Bytes waiting for (or being written by) the writer.", value=s.writer.queue_bytes
        )
        yield GaugeMetricFamily(
            "nio_logd_queue_records",
            "Records waiting for (or being written by) the writer.",
            value=s.writer.queue_records,
        )
        yield GaugeMetricFamily(
            "nio_logd_queue_limit_bytes", "queue_bytes: over it reading pauses.", value=s.writer.queue_limit
        )
        yield CounterMetricFamily(
            "nio_logd_write_errors", "Failed write() or fsync() calls (each retried).", value=s.writer.write_errors
        )
        yield GaugeMetricFamily(
            "nio_logd_write_failing",
            "1 while writes fail and are being retried.",
            value=1.0 if s.writer.write_failing_seconds > 0 else 0.0,
        )
        writer = self.server.writer
        for name, hist, text in (
            ("nio_logd_write_seconds", writer.write_hist, "Time of one write() of a group of batches to one file."),
            ("nio_logd_fsync_seconds", writer.fsync_hist, "Time of one fsync() (group commit) of one file."),
        ):
            buckets, total = hist.cumulative()
            yield HistogramMetricFamily(name, text, buckets=buckets, sum_value=total)
        yield GaugeMetricFamily(
            "nio_logd_backpressure_paused", "I/O loops not reading because the writer is behind.", value=s.paused_loops
        )
        yield CounterMetricFamily(
            "nio_logd_backpressure_pauses", "Times an I/O loop stopped reading.", value=s.loops.pauses
        )
        yield CounterMetricFamily(
            "nio_logd_backpressure_paused_seconds",
            "Seconds I/O loops spent not reading (summed over loops).",
            value=s.paused_seconds,
        )
        yield CounterMetricFamily(
            "nio_logd_rate_limited", "Times a connection was slowed down by rate_limit.", value=s.loops.rate_limited
        )
        for key, text in (
            ("tls_handshakes", "TLS handshakes completed."),
            ("tls_handshake_failed", "TLS handshakes that failed."),
            ("tls_handshake_incomplete", "TLS handshakes abandoned by the client or timed out."),
        ):
            yield CounterMetricFamily(f"nio_logd_{key}", text, value=getattr(s.loops, key))
        yield from _forward_metrics(s.forward)
        healthy, _ = health(self.server)
        yield GaugeMetricFamily("nio_logd_healthy", "1 when /healthz answers 200.", value=1.0 if healthy else 0.0)


_FORWARD_COUNTERS = (
    ("forwarded", "nio_logd_forward_records", "Records the engine acknowledged (since the daemon started)."),
    ("resent", "nio_logd_forward_resent", "Messages sent again (no acknowledgement in time, or an error answer)."),
    ("engine_errors", "nio_logd_forward_engine_errors", "Failed connects, error answers and timed-out acks."),
    ("lost_records", "nio_logd_forward_lost_records", "Records not forwarded (too large for the engine)."),
    ("lost_files", "nio_logd_forward_lost_files", "Log files gone before they were forwarded to their end."),
)
_FORWARD_GAUGES = (
    ("lag_bytes", "nio_logd_forward_lag_bytes", "Bytes of the messages log not acknowledged by the engine yet."),
    ("lag_records", "nio_logd_forward_lag_records", "Records of the messages log not acknowledged by the engine yet."),
    (
        "oldest_unforwarded_seconds",
        "nio_logd_forward_oldest_unforwarded_seconds",
        "Age of the oldest record not acknowledged by the engine yet (0: none).",
    ),
    ("connected", "nio_logd_forward_connected", "1 while connected to the engine."),
)


def _forward_metrics(forwards: tuple[ForwardStats, ...]) -> Iterator[Metric]:
    """One series per ``[[forward]]`` table (label ``forward``: its name); none without tables."""
    if not forwards:
        return
    for key, name, text in _FORWARD_COUNTERS:
        counter = CounterMetricFamily(name, text, labels=["forward"])
        for f in forwards:
            counter.add_metric([f.name], float(getattr(f, key)))
        yield counter
    for key, name, text in _FORWARD_GAUGES:
        gauge = GaugeMetricFamily(name, text, labels=["forward"])
        for f in forwards:
            gauge.add_metric([f.name], float(getattr(f, key)))
        yield gauge


def _by_reason(name: str, text: str, counts: dict[str, int], known: Iterable[str]) -> CounterMetricFamily:
    family = CounterMetricFamily(name, text, labels=["reason"])
    for reason in sorted({*known, *counts}):
        family.add_metric([reason], counts.get(reason, 0))
    return family


def _peer(client_address: Any) -> str:
    host, port = client_address[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class _DeadlineReader(io.RawIOBase):
    """Reads a socket, each recv limited to what is left of one deadline for the whole request."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        super().__init__()
        self._sock = sock
        self._deadline = deadline

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the request was not complete within read_timeout")
        self._sock.settimeout(left)
        return self._sock.recv_into(buffer)


class _QuietHandler(WSGIRequestHandler):
    server: _BoundedWSGIServer

    def setup(self) -> None:
        super().setup()
        # The stock reader's timeout is per recv, which a slow drip resets forever; one deadline
        # for the whole head instead. Closed first: its reference keeps the socket's fd open.
        self.rfile.close()
        self.rfile = io.BufferedReader(_DeadlineReader(self.connection, time.monotonic() + self.server.read_timeout))

    def parse_request(self) -> bool:
        ok = super().parse_request()
        # The head is read (the app reads no body); the answer's sends get read_timeout each,
        # not what the deadline left over.
        self.connection.settimeout(self.server.read_timeout)
        return ok

    def log_message(self, format: str, *args: Any) -> None:
        pass  # scrapes every few seconds are not events worth a line each


class _BoundedWSGIServer(ThreadingWSGIServer):
    """A thread per connection, but a bounded number of them, with an allow list and EMFILE back-off.

    Counters are changed by the accept thread (refusals, accept errors) or under ``_lock`` (the
    handler threads); the collector reads them without a lock.
    """

    request_queue_size = 128  # a burst of scrapers waits in the kernel instead of being dropped
    block_on_close = False  # close() must not wait for a client that is still being timed out

    def __init__(self, server_address: tuple[str, int], settings: MetricsSettings) -> None:
        self.allow = AllowList(settings.allow)
        self.max_connections = settings.max_connections
        self.read_timeout = settings.read_timeout
        self.active = 0
        self.served = 0
        self.timed_out = 0
        self.accept_errors = 0
        self.refused = dict.fromkeys(METRICS_REFUSAL_REASONS, 0)
        self._lock = threading.Lock()
        self._backoff = 0.0
        self._logged = OncePer(60.0)
        super().__init__(server_address, _QuietHandler)

    def get_request(self) -> tuple[socket.socket, Any]:
        try:
            request, client_address = self.socket.accept()
        except OSError as exc:
            if exc.errno in _OUT_OF_RESOURCES:
                self._back_off(exc)
            raise  # serve_forever drops it and selects again
        self._backoff = 0.0
        return request, client_address

    def _back_off(self, exc: OSError) -> None:
        self.accept_errors += 1
        self._backoff = min(_BACKOFF_MAX, max(_BACKOFF_FIRST, self._backoff * 2))
        muted = self._logged.check("accept_failed")
        if muted is not None:
            log.warning(
                "metrics_accept_failed",
                errno=errno.errorcode.get(exc.errno or 0, str(exc.errno)),
                error=exc.strerror,
                backoff_max=_BACKOFF_MAX,
                not_logged_since=muted,
            )
        time.sleep(self._backoff)

    def verify_request(self, request: Any, client_address: Any) -> bool:
        if self.allow.permits(client_address[0]):
            return True
        self._refuse("not_allowed", client_address, client_address[0])
        return False  # closed by the caller, before a byte is read

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._lock:
            full = self.active >= self.max_connections
            if not full:
                self.active += 1
        if full:
            self._refuse("max_connections", client_address, "max_connections")
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._release()  # no thread started: its slot is free again
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._release()

    def _release(self) -> None:
        with self._lock:
            self.active -= 1
            self.served += 1

    def _refuse(self, reason: str, client_address: Any, key: str) -> None:
        self.refused[reason] += 1
        muted = self._logged.check(f"{reason} {key}")
        if muted is None:
            return
        detail: dict[str, Any] = (
            {"allow": [str(n) for n in self.allow.networks]}
            if reason == "not_allowed"
            else {"limit": self.max_connections}
        )
        log.warning(
            "metrics_connection_refused", reason=reason, peer=_peer(client_address), not_logged_since=muted, **detail
        )

    def handle_error(self, request: Any, client_address: Any) -> None:
        # The stock one prints a traceback to stderr, where our JSON events go.
        exc = sys.exc_info()[1]
        if isinstance(exc, TimeoutError):
            with self._lock:
                self.timed_out += 1
        elif isinstance(exc, OSError):
            pass  # the client went away (reset, broken pipe): nothing for the operator to do
        else:
            muted = self._logged.check("request_failed")
            if muted is not None:
                log.warning(
                    "metrics_request_failed", peer=_peer(client_address), error=repr(exc), not_logged_since=muted
                )


class _V6Server(_BoundedWSGIServer):
    address_family = socket.AF_INET6


class _ListenerCollector(Collector):
    """The metrics listener's own counters."""

    def __init__(self, httpd: _BoundedWSGIServer) -> None:
        self.httpd = httpd

    def collect(self) -> Iterator[Metric]:
        h = self.httpd
        yield GaugeMetricFamily(
            "nio_logd_metrics_connections_open", "Metrics (HTTP) connections being served now.", value=h.active
        )
        yield CounterMetricFamily("nio_logd_metrics_connections", "Metrics connections served.", value=h.served)
        yield _by_reason(
            "nio_logd_metrics_connections_refused",
            "Metrics connections closed at once (allow, max_connections), by reason.",
            dict(h.refused),
            METRICS_REFUSAL_REASONS,
        )
        yield CounterMetricFamily(
            "nio_logd_metrics_connections_timed_out",
            "Metrics connections closed by read_timeout (request too slow, or answer not read).",
            value=h.timed_out,
        )
        yield CounterMetricFamily(
            "nio_logd_metrics_accept_errors",
            "Failed accepts on the metrics listener (EMFILE, ENFILE): each backs off.",
            value=h.accept_errors,
        )


class MetricsServer:
    """The HTTP listener for ``/metrics`` and ``/healthz``, bound by ``__init__``."""

    def __init__(self, server: Observed, address: str) -> None:
        addr = parse_address(address)
        if addr.scheme != "tcp":
            raise StartupError(f"cannot serve metrics on {address}: only tcp://HOST:PORT addresses are supported")
        self.server = server
        server_class = _V6Server if ":" in addr.host else _BoundedWSGIServer
        try:
            self.httpd = server_class((addr.host, addr.port), server.settings.metrics)
        except OSError as exc:
            raise StartupError(f"cannot listen on metrics address {address}: {exc.strerror or exc}") from None
        self.httpd.set_app(self._app)
        registry = CollectorRegistry(auto_describe=False)
        registry.register(ServerCollector(server))
        registry.register(_ListenerCollector(self.httpd))
        ProcessCollector(registry=registry)  # resident memory, CPU, open fds
        self._metrics_app = make_wsgi_app(registry)
        host, port = self.httpd.socket.getsockname()[:2]
        self.address = f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"
        self._thread: threading.Thread | None = None

    def __repr__(self) -> str:
        return f"<MetricsServer {self.address}>"

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.5}, name="nio-logd-metrics", daemon=True
        )
        self._thread.start()
        log.info("metrics_listening", address=self.address, paths=["/metrics", "/healthz"])

    def close(self) -> None:
        if self._thread is not None:
            self.httpd.shutdown()
            self._thread.join(2.0)
        self.httpd.server_close()

    def _app(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "/")
        if path == "/healthz":
            healthy, body = health(self.server)
            data = orjson.dumps(body) + b"\n"
            start_response(
                "200 OK" if healthy else "503 Service Unavailable",
                [("Content-Type", "application/json"), ("Content-Length", str(len(data)))],
            )
            return [data]
        if path in ("/metrics", "/"):
            result: Iterable[bytes] = self._metrics_app(environ, start_response)
            return result
        data = b"not found: try /metrics or /healthz\n"
        start_response("404 Not Found", [("Content-Type", "text/plain"), ("Content-Length", str(len(data)))])
        return [data]
