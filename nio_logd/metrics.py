"""Metrics: Prometheus text format and a health check on an optional HTTP listener.

design: the hot path only bumps plain ints (each I/O loop's ``stats`` counters, the writer's
counters and ``LatencyHistogram`` buckets, all changed by one thread each, per read or per batch,
never per record under a lock). A custom prometheus_client ``Collector`` reads
``Server.snapshot()`` when Prometheus scrapes, so the cost of metrics is paid by the scraper.
The HTTP server (wsgiref, one thread per request) runs in its own daemon thread and serves
``/metrics`` and ``/healthz``.

``/healthz`` answers 200 while the daemon can take records, and 503 with the reasons when
- the writer has had records queued and made no progress for ``[metrics] health_stall_seconds``
  (a stuck or failing disk: ENOSPC, EIO, a frozen filesystem), or writes have been failing
  that long, or
- an I/O loop has been paused by backpressure without a break for that long, or
- a writer or I/O thread has died, or the daemon is stopping.
A disk that is slow but keeps up with short pauses stays healthy: that is backpressure doing its
job, visible in ``nio_logd_backpressure_paused_seconds_total``.
"""

from __future__ import annotations

import socket
import threading
from bisect import bisect_left
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

import orjson
from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from .config import parse_address
from .errors import StartupError
from .events import get_logger

if TYPE_CHECKING:
    from wsgiref.types import StartResponse, WSGIEnvironment

    from .server import Server

log = get_logger()

# Seconds; one write() or fsync() of a whole group of batches, from 100 µs to 30 s.
BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
           10.0, 30.0)

# Reasons always exported (as 0 until they happen), so dashboards and alerts see every series.
RECORD_REFUSAL_REASONS = ("invalid_json", "invalid_utf8", "not_an_object", "invalid_fields", "too_large")
CONNECTION_REFUSAL_REASONS = ("max_connections", "max_connections_per_client", "not_allowed")


class LatencyHistogram:
    """Counts of durations per bucket; ``observe`` is called by one thread only (the writer)."""

    __slots__ = ("counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)  # the last one is +Inf
        self.total = 0.0

    def __repr__(self) -> str:
        return f"<LatencyHistogram count={sum(self.counts)} sum={self.total:.3f}>"

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(BUCKETS, seconds)] += 1
        self.total += seconds

    def cumulative(self) -> tuple[list[tuple[str, float]], float]:
        """Prometheus buckets (``le`` label, cumulative count) and the sum of observations."""
        counts = list(self.counts)  # a copy: the writer may observe meanwhile
        out = []
        running = 0
        for bound, n in zip((*map(str, BUCKETS), "+Inf"), counts, strict=True):
            running += n
            out.append((bound, float(running)))
        return out, self.total


def health(server: Server) -> tuple[bool, dict[str, Any]]:
    """Whether the daemon is healthy, and a JSON-able explanation."""
    s = server.snapshot()
    limit = server.settings.metrics.health_stall_seconds
    problems: list[str] = []
    if s["stopping"]:
        problems.append("the daemon is stopping")
    if s["writer_stalled_seconds"] >= limit:
        problems.append(f"the writer has made no progress for {s['writer_stalled_seconds']:.0f} s "
                        f"with {s['queue_bytes']} bytes queued")
    if s["write_failing_seconds"] >= limit:
        problems.append(f"writes have been failing for {s['write_failing_seconds']:.0f} s: {s['last_write_error']}")
    if s["paused_now_seconds"] >= limit:
        problems.append(f"reading has been paused by backpressure for {s['paused_now_seconds']:.0f} s")
    if not s["threads_alive"]:
        problems.append("a writer or I/O thread has died")
    body = {
        "status": "unhealthy" if problems else "ok",
        "problems": problems,
        "paused": s["paused"],
        "queue_bytes": s["queue_bytes"],
        "connections": s["connections"],
        "writer_stalled_seconds": round(s["writer_stalled_seconds"], 3),
    }
    return not problems, body


class ServerCollector(Collector):
    """Reads the server's counters at scrape time."""

    def __init__(self, server: Server) -> None:
        self.server = server

    def collect(self) -> Iterator[Metric]:
        s = self.server.snapshot()
        yield GaugeMetricFamily("nio_logd_connections_open", "Client connections open now.", value=s["connections"])
        yield CounterMetricFamily("nio_logd_connections", "Client connections accepted.",
                                  value=s["connections_total"])
        yield _by_reason("nio_logd_connections_refused", "Connections closed at once, by reason.",
                         s["connections_refused_by_reason"], CONNECTION_REFUSAL_REASONS)
        yield CounterMetricFamily("nio_logd_connections_idle_closed", "Connections closed after idle_timeout.",
                                  value=s["idle_closed"])
        yield CounterMetricFamily("nio_logd_bytes_received", "Bytes read from clients.", value=s["bytes_in"])
        yield CounterMetricFamily("nio_logd_records_accepted", "Records that passed validation.",
                                  value=s["accepted"])
        yield _by_reason("nio_logd_records_refused", "Records refused (written to the rejects log), by reason.",
                         s["refused_by_reason"], RECORD_REFUSAL_REASONS)
        yield CounterMetricFamily("nio_logd_records_written", "Accepted records written to the messages log.",
                                  value=s["written"])
        yield CounterMetricFamily("nio_logd_rejects_written", "Refused records written to the rejects log.",
                                  value=s["rejects_written"])
        yield CounterMetricFamily("nio_logd_incomplete_records_dropped",
                                  "Connections whose unfinished last line was dropped at shutdown.",
                                  value=s["incomplete_dropped"])
        yield GaugeMetricFamily("nio_logd_queue_bytes", "Bytes waiting for (or being written by) the writer.",
                                value=s["queue_bytes"])
        yield GaugeMetricFamily("nio_logd_queue_records", "Records waiting for (or being written by) the writer.",
                                value=s["queue_records"])
        yield GaugeMetricFamily("nio_logd_queue_limit_bytes", "queue_bytes: over it reading pauses.",
                                value=s["queue_limit"])
        yield CounterMetricFamily("nio_logd_write_errors", "Failed write() or fsync() calls (each retried).",
                                  value=s["write_errors"])
        yield GaugeMetricFamily("nio_logd_write_failing", "1 while writes fail and are being retried.",
                                value=1.0 if s["write_failing_seconds"] > 0 else 0.0)
        writer = self.server.writer
        for name, hist, text in (
            ("nio_logd_write_seconds", writer.write_hist, "Time of one write() of a group of batches to one file."),
            ("nio_logd_fsync_seconds", writer.fsync_hist, "Time of one fsync() (group commit) of one file."),
        ):
            buckets, total = hist.cumulative()
            yield HistogramMetricFamily(name, text, buckets=buckets, sum_value=total)
        yield GaugeMetricFamily("nio_logd_backpressure_paused", "I/O loops not reading because the writer is behind.",
                                value=s["paused_loops"])
        yield CounterMetricFamily("nio_logd_backpressure_pauses", "Times an I/O loop stopped reading.",
                                  value=s["pauses"])
        yield CounterMetricFamily("nio_logd_backpressure_paused_seconds",
                                  "Seconds I/O loops spent not reading (summed over loops).",
                                  value=s["paused_seconds"])
        yield CounterMetricFamily("nio_logd_rate_limited", "Times a connection was slowed down by rate_limit.",
                                  value=s["rate_limited"])
        for key, text in (
            ("tls_handshakes", "TLS handshakes completed."),
            ("tls_handshake_failed", "TLS handshakes that failed."),
            ("tls_handshake_incomplete", "TLS handshakes abandoned by the client or timed out."),
        ):
            if key in s:
                yield CounterMetricFamily(f"nio_logd_{key}", text, value=s[key])
        healthy, _ = health(self.server)
        yield GaugeMetricFamily("nio_logd_healthy", "1 when /healthz answers 200.", value=1.0 if healthy else 0.0)


def _by_reason(name: str, text: str, counts: dict[str, int], known: Iterable[str]) -> CounterMetricFamily:
    family = CounterMetricFamily(name, text, labels=["reason"])
    for reason in sorted({*known, *counts}):
        family.add_metric([reason], counts.get(reason, 0))
    return family


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass  # scrapes every few seconds are not events worth a line each


class _V6Server(ThreadingWSGIServer):
    address_family = socket.AF_INET6


class MetricsServer:
    """The HTTP listener for ``/metrics`` and ``/healthz``, bound by ``__init__``."""

    def __init__(self, server: Server, address: str) -> None:
        addr = parse_address(address)
        if addr.scheme != "tcp":
            raise StartupError(f"cannot serve metrics on {address}: only tcp://HOST:PORT addresses are supported")
        self.server = server
        registry = CollectorRegistry(auto_describe=False)
        registry.register(ServerCollector(server))
        ProcessCollector(registry=registry)  # resident memory, CPU, open fds
        self._metrics_app = make_wsgi_app(registry)
        server_class = _V6Server if ":" in addr.host else ThreadingWSGIServer
        try:
            self.httpd = make_server(addr.host, addr.port, self._app, server_class=server_class,
                                     handler_class=_QuietHandler)
        except OSError as exc:
            raise StartupError(f"cannot listen on metrics address {address}: {exc.strerror or exc}") from None
        host, port = self.httpd.socket.getsockname()[:2]
        self.address = f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"
        self._thread: threading.Thread | None = None

    def __repr__(self) -> str:
        return f"<MetricsServer {self.address}>"

    def start(self) -> None:
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.5},
                                        name="nio-logd-metrics", daemon=True)
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
            start_response("200 OK" if healthy else "503 Service Unavailable",
                           [("Content-Type", "application/json"), ("Content-Length", str(len(data)))])
            return [data]
        if path in ("/metrics", "/"):
            result: Iterable[bytes] = self._metrics_app(environ, start_response)
            return result
        data = b"not found: try /metrics or /healthz\n"
        start_response("404 Not Found", [("Content-Type", "text/plain"), ("Content-Length", str(len(data)))])
        return [data]
