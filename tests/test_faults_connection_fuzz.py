"""Connection-behaviour fuzz of the RUNNING daemon (a real process), plain and TLS, 1 and 2 I/O threads.

Hypothesis draws random interleavings of hostile and odd client behaviour: connect-and-RST,
records then half-close, partial lines cut by an RST, garbage lines, records dribbled in chunks,
clients that read their acks slowly (or never), TLS handshakes cut short (a truncated ClientHello,
random bytes, a full ClientHello and then an RST) and TLS sessions that end without close_notify.
The actions run from a few threads at once against an ``ack = true`` listener, while a
well-behaved acked stream keeps sending on the same listener for the whole test.

What it proves, after every example:
- the daemon process is alive and ``/healthz`` answers 200;
- the well-behaved stream is whole: every record it sent was acked ``ok``, in order;
- the counters add up: ``records_accepted`` equals exactly the records whose ``ok`` ack some client
  received, plus at most the records of clients that vanished (RST) before reading their acks;
  ``records_refused`` equals the refusals acked, plus at most the lines of such clients;
  ``connections_open`` returns to the stream's one connection; the connection and TLS handshake
  counters agree with the connections made;
and at the end: SIGTERM (while the stream has records on the wire) exits 0, every acked record
is in the messages log exactly once (matched by a unique ``send_msg``), no line is partial, no
record is duplicated, and the daemon logged no ``fatal``, ``io_loop_crashed`` or ``handler_failed``.
"""

from __future__ import annotations

import collections
import itertools
import json
import random
import signal
import socket
import ssl
import struct
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from conftest import free_port, read_lines, record, wait_for, write_config
from faultkit import healthz, metric, metrics_address, scrape
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_tls import PKI, ctx_for, pki, tls_listener  # noqa: F401 - pki is a fixture used via getfixturevalue

EXAMPLES = {"plain": 300, "tls": 160}
MAX_ACTIONS = 30
IO_TIMEOUT = 5.0  # every client socket
JOIN_TIMEOUT = 30.0  # every client thread
STREAM_FINAL = 200  # records the stream has on the wire when SIGTERM comes
BAD_EVENTS = {"fatal", "io_loop_crashed", "handler_failed"}
TLS_COUNTERS = (
    "nio_logd_tls_handshakes_total",
    "nio_logd_tls_handshake_failed_total",
    "nio_logd_tls_handshake_incomplete_total",
)


# -- a client connection: plain TCP, or TLS over memory BIOs (so TCP half-close works under TLS) --------
class Wire:
    """One client connection with a timeout on every operation.

    Under TLS the session runs over memory BIOs: the test then decides exactly what goes on the
    wire (a close_notify or not, a TCP FIN or an RST) and can still read after a TCP half-close.
    """

    def __init__(self, addr: tuple[str, int], ctx: ssl.SSLContext | None = None, *, rcvbuf: int = 0) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            if rcvbuf:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)  # before connect: sets the window
            sock.settimeout(IO_TIMEOUT)
            sock.connect(addr)
        except BaseException:
            sock.close()
            raise
        self.sock = sock
        self.tls: ssl.SSLObject | None = None
        self.handshaken = False
        if ctx is not None:
            self._in, self._out = ssl.MemoryBIO(), ssl.MemoryBIO()
            self.tls = ctx.wrap_bio(self._in, self._out, server_hostname=addr[0])
            try:
                self._handshake()
            except BaseException:
                sock.close()
                raise

    def _flush(self) -> None:
        assert self.tls is not None
        data = self._out.read()
        if data:
            self.sock.sendall(data)

    def _fill(self) -> bool:
        data = self.sock.recv(65536)
        if data:
            self._in.write(data)
        else:
            self._in.write_eof()
        return bool(data)

    def _handshake(self) -> None:
        assert self.tls is not None
        while True:
            try:
                self.tls.do_handshake()
            except ssl.SSLWantReadError:
                self._flush()
                if not self._fill():
                    raise ConnectionError("the daemon closed during the TLS handshake") from None
                continue
            self._flush()
            self.handshaken = True
            return

    def send(self, data: bytes) -> None:
        if self.tls is None:
            self.sock.sendall(data)
        else:
            self.tls.write(data)
            self._flush()

    def recv(self, n: int = 65536) -> bytes:
        """Up to ``n`` bytes (decrypted under TLS); b"" at the end, with or without close_notify."""
        if self.tls is None:
            return self.sock.recv(n)
        while True:
            try:
                return self.tls.read(n)
            except ssl.SSLWantReadError:
                self._fill()
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return b""

    def half_close(self, close_notify: bool = False) -> None:
        """TCP FIN (SHUT_WR); under TLS first a close_notify if asked (else the TLS session is just cut)."""
        if self.tls is not None and close_notify:
            try:
                self.tls.unwrap()
            except ssl.SSLWantReadError:
                pass  # our close_notify is out; theirs comes after the acks
            self._flush()
        self.sock.shutdown(socket.SHUT_WR)

    def read_all(self) -> bytes:
        buf = b""
        while chunk := self.recv():
            buf += chunk
        return buf

    def rst(self) -> None:
        """Close with an RST (SO_LINGER 0): whatever the daemon had not read is thrown away."""
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        finally:
            self.sock.close()

    def close(self) -> None:
        self.sock.close()  # never a close_notify


def rst_socket(sock: socket.socket) -> None:
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    finally:
        sock.close()


def parse_acks(buf: bytes) -> list[dict[str, Any]]:
    assert not buf or buf.endswith(b"\n"), f"partial ack line: {buf[-200:]!r}"
    answers = [json.loads(raw) for raw in buf.splitlines()]
    assert [a["seq"] for a in answers] == list(range(1, len(answers) + 1)), answers
    return answers


# -- the actions --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Rst:
    """Connect and reset at once (SO_LINGER 0), plain TCP even on the TLS listener."""


@dataclass(frozen=True)
class HalfClose:
    """Send ``n`` valid records, half-close (under TLS with a close_notify or not), read every ack."""

    n: int
    close_notify: bool


@dataclass(frozen=True)
class PartialRst:
    """Send ``before`` valid records and a cut-off record (no newline), then RST."""

    before: int
    cut: float


@dataclass(frozen=True)
class Garbage:
    """Send ``before`` valid records, then garbage bytes and a newline; half-close; read every ack."""

    before: int
    data: bytes


@dataclass(frozen=True)
class Chunked:
    """Send ``n`` valid records split at random points, with small sleeps; half-close; read the acks."""

    n: int
    cuts: tuple[int, ...]
    pauses_ms: tuple[int, ...]


@dataclass(frozen=True)
class SlowReader:
    """With a small SO_RCVBUF send ``n`` records; read the acks a few bytes at a time, then either
    abandon the rest (close with acks unread: an RST) or half-close and read them all, slowly."""

    n: int
    step: int
    abandon: bool


@dataclass(frozen=True)
class Noise:
    """Raw TCP (no TLS on our side): a ClientHello cut at ``cut`` (``kind`` hello), random bytes, or
    nothing; maybe wait a moment for an answer; then close or RST. On the plain listener the bytes
    are garbage (with ``{`` replaced, so no line can be a record)."""

    kind: str
    cut: float
    data: bytes
    tls12: bool
    wait: bool
    rst: bool


@dataclass(frozen=True)
class Abrupt:
    """Complete the (TLS) connection, send ``n`` records (the last maybe without newline) and end it
    without close_notify: half-close and read every ack, or close at once without reading."""

    n: int
    last_newline: bool
    read_acks: bool
    tls12: bool


cut = st.floats(0.02, 0.98)
actions = st.one_of(
    st.just(Rst()),
    st.builds(HalfClose, st.integers(1, 25), st.booleans()),
    st.builds(PartialRst, st.integers(0, 3), cut),
    st.builds(Garbage, st.integers(0, 3), st.binary(max_size=200)),
    st.builds(
        Chunked,
        st.integers(1, 3),
        st.lists(st.integers(0, 400), max_size=8).map(tuple),
        st.lists(st.integers(0, 8), max_size=8).map(tuple),
    ),
    st.builds(SlowReader, st.integers(20, 300), st.integers(32, 512), st.booleans()),
    st.builds(
        Noise,
        st.sampled_from(["hello", "random", "empty"]),
        cut,
        st.binary(min_size=1, max_size=300),
        st.booleans(),
        st.booleans(),
        st.booleans(),
    ),
    st.builds(Abrupt, st.integers(1, 20), st.booleans(), st.booleans(), st.booleans()),
)


@dataclass
class Tally:
    """What a set of actions delivered: exact where a client read the acks, bounds where it vanished."""

    acc_min: int = 0
    acc_max: int = 0
    ref_min: int = 0
    ref_max: int = 0
    connects: int = 0  # TCP connections made to the fuzzed listener (an upper bound of what it saw)
    answered: int = 0  # of those, connections whose acks we read to the end
    hs_min: int = 0  # TLS handshakes the daemon must have completed (we got answers in the session)
    hs_max: int = 0  # TLS handshakes completed on our side
    sure: list[str] = field(default_factory=list)  # ids acked ok: must be in the log exactly once
    maybe: list[str] = field(default_factory=list)  # ids sent but not acked: at most once

    def add(self, other: Tally) -> None:
        for name in ("acc_min", "acc_max", "ref_min", "ref_max", "connects", "answered", "hs_min", "hs_max"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.sure += other.sure
        self.maybe += other.maybe


class Fuzzer:
    def __init__(self, addr: tuple[str, int], tls: bool, pki_: PKI | None) -> None:
        self.addr = addr
        self.is_tls = tls
        self.ctx13 = self.ctx12 = None
        self.hello13 = self.hello12 = b""
        if tls:
            assert pki_ is not None
            self.ctx13 = ctx_for(pki_, pki_.client)
            self.ctx12 = ctx_for(pki_, pki_.client)
            self.ctx12.maximum_version = ssl.TLSVersion.TLSv1_2
            self.hello13 = self._client_hello(self.ctx13)
            self.hello12 = self._client_hello(self.ctx12)
        else:
            # The plain listener gets ClientHello bytes too (made with a throw-away context).
            self.hello13 = self.hello12 = self._client_hello(ssl.create_default_context())
        self._ids = itertools.count()
        self._lock = threading.Lock()

    @staticmethod
    def _client_hello(ctx: ssl.SSLContext) -> bytes:
        out = ssl.MemoryBIO()
        obj = ctx.wrap_bio(ssl.MemoryBIO(), out, server_hostname="127.0.0.1")
        try:
            obj.do_handshake()
        except ssl.SSLWantReadError:
            pass
        return out.read()

    def ids(self, n: int) -> list[str]:
        with self._lock:
            return [f"fz-{next(self._ids)}" for _ in range(n)]

    def ctx(self, tls12: bool = False) -> ssl.SSLContext | None:
        return (self.ctx12 if tls12 else self.ctx13) if self.is_tls else None

    def wire(self, t: Tally, *, tls12: bool = False, rcvbuf: int = 0) -> Wire:
        t.connects += 1
        w = Wire(self.addr, self.ctx(tls12), rcvbuf=rcvbuf)
        if w.handshaken:
            t.hs_max += 1
        return w

    @staticmethod
    def lines(ids: list[str]) -> bytes:
        return b"".join(record("fuzz", i) + b"\n" for i in ids)

    def answered(self, t: Tally, w: Wire, ids: list[str], answers: list[dict[str, Any]], extra: int = 0) -> None:
        """Every answer of a connection was read: the accounting is exact."""
        assert len(answers) == len(ids) + extra, answers
        assert all(a["ok"] for a in answers[: len(ids)]), answers
        t.sure += ids
        t.answered += 1
        if w.tls is not None:
            t.hs_min += 1
        for a in answers:
            if a["ok"]:
                t.acc_min += 1
                t.acc_max += 1
            else:
                assert a["reason"] and a["error"], a
                t.ref_min += 1
                t.ref_max += 1

    # -- one action; hostile ones swallow the connection errors they provoke -------------------------
    def run(self, action: Any) -> Tally:
        t = Tally()
        getattr(self, "do_" + type(action).__name__.lower())(action, t)
        return t

    def do_rst(self, _a: Rst, t: Tally) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.settimeout(IO_TIMEOUT)
            t.connects += 1
            sock.connect(self.addr)
        finally:
            rst_socket(sock)

    def exchange(self, t: Tally, n: int, close_notify: bool = False) -> None:
        ids = self.ids(n)
        w = self.wire(t)
        try:
            w.send(self.lines(ids))
            w.half_close(close_notify)
            self.answered(t, w, ids, parse_acks(w.read_all()))
        finally:
            w.close()

    def do_halfclose(self, a: HalfClose, t: Tally) -> None:
        self.exchange(t, a.n, a.close_notify)

    def do_partialrst(self, a: PartialRst, t: Tally) -> None:
        ids = self.ids(a.before + 1)
        whole = record("fuzz", ids[-1])
        partial = whole[: max(1, min(len(whole) - 1, int(len(whole) * a.cut)))]  # never a whole object
        t.maybe += ids[:-1]
        t.acc_max += a.before
        t.ref_max += a.before + 1  # bounds only: the RST may cut anything
        try:
            w = self.wire(t)
        except OSError:
            return
        try:
            w.send(self.lines(ids[:-1]) + partial)
        except OSError:
            pass
        finally:
            w.rst()

    def do_garbage(self, a: Garbage, t: Tally) -> None:
        ids = self.ids(a.before)
        w = self.wire(t)
        try:
            w.send(self.lines(ids) + a.data + b"\n")
            w.half_close()
            answers = parse_acks(w.read_all())
            self.answered(t, w, ids, answers, extra=len(answers) - len(ids))
        finally:
            w.close()

    def do_chunked(self, a: Chunked, t: Tally) -> None:
        ids = self.ids(a.n)
        data = self.lines(ids)
        points = sorted({c % len(data) for c in a.cuts} - {0})
        pieces = [data[i:j] for i, j in zip([0, *points], [*points, len(data)], strict=True)]
        w = self.wire(t)
        try:
            for k, piece in enumerate(pieces):
                w.send(piece)
                if k < len(a.pauses_ms):
                    time.sleep(a.pauses_ms[k] / 1000)
            w.half_close()
            self.answered(t, w, ids, parse_acks(w.read_all()))
        finally:
            w.close()

    def do_slowreader(self, a: SlowReader, t: Tally) -> None:
        ids = self.ids(a.n)
        w = self.wire(t, rcvbuf=2048)
        try:
            w.send(self.lines(ids))
            if a.abandon:
                t.maybe += ids
                t.acc_max += a.n
                buf = b""
                for _ in range(3):  # a few small reads, never waiting for answers that cannot come
                    if buf.count(b"\n") >= a.n:
                        break
                    chunk = w.recv(a.step)
                    if not chunk:
                        break
                    buf += chunk
                    time.sleep(0.002)
                got = parse_acks(buf[: buf.rfind(b"\n") + 1])
                assert len(got) <= a.n and all(x["ok"] for x in got), got
                t.acc_min += len(got)
                t.sure += ids[: len(got)]
                w.rst()  # what a close with unread acks does anyway
                return
            w.half_close()
            buf = b""
            while chunk := w.recv(a.step):
                buf += chunk
                time.sleep(0.0005)
            self.answered(t, w, ids, parse_acks(buf))
        finally:
            w.close()

    def do_noise(self, a: Noise, t: Tally) -> None:
        if a.kind == "hello":
            hello = self.hello12 if a.tls12 else self.hello13
            data = hello[: max(1, int(len(hello) * a.cut))] if a.cut < 0.9 else hello
        elif a.kind == "random":
            data = a.data
        else:
            data = b""
        if not self.is_tls:
            data = data.replace(b"{", b"(")  # no line can be a JSON object, so none is accepted
            t.ref_max += data.count(b"\n") + 1
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.settimeout(IO_TIMEOUT)
            t.connects += 1
            sock.connect(self.addr)
            if data:
                sock.sendall(data)
            if a.wait:
                sock.settimeout(0.05)
                try:
                    sock.recv(4096)
                except (TimeoutError, OSError):
                    pass
        except OSError:
            pass
        finally:
            if a.rst:
                rst_socket(sock)
            else:
                sock.close()

    def do_abrupt(self, a: Abrupt, t: Tally) -> None:
        ids = self.ids(a.n)
        data = self.lines(ids)
        if not a.last_newline:
            data = data[:-1]  # at the end of the stream the last line is a record
        if a.read_acks:
            w = self.wire(t, tls12=a.tls12)
            try:
                w.send(data)
                w.half_close(close_notify=False)
                self.answered(t, w, ids, parse_acks(w.read_all()))
            finally:
                w.close()
            return
        t.maybe += ids
        t.acc_max += a.n
        try:
            w = self.wire(t, tls12=a.tls12)
        except OSError:
            return
        try:
            w.send(data)
        except OSError:
            pass
        finally:
            w.close()  # no close_notify, acks unread


# -- the well-behaved stream --------------------------------------------------------------------------
class Stream(threading.Thread):
    """One acked connection for the whole test: batches of records, each batch's acks read before the
    next; every answer must be ok and in order. ``pause()`` returns once every record sent is acked."""

    def __init__(self, addr: tuple[str, int], ctx: ssl.SSLContext | None) -> None:
        super().__init__(daemon=True, name="well-behaved-stream")
        self.wire = Wire(addr, ctx)
        self.sent = 0
        self.acked = 0
        self.error: BaseException | None = None
        self.rng = random.Random(1234)
        self._cond = threading.Condition()
        self._want_pause = False
        self._paused = False
        self._stopping = False
        self._buf = b""

    def _read_acks(self, upto: int) -> None:
        while self.acked < upto:
            chunk = self.wire.recv()
            if not chunk:
                raise ConnectionError(f"the daemon closed the stream after {self.acked} acks")
            self._buf += chunk
            *lines, self._buf = self._buf.split(b"\n")
            for raw in lines:
                answer = json.loads(raw)
                assert answer == {"seq": self.acked + 1, "ok": True}, answer
                self.acked += 1

    def send_batch(self, n: int) -> None:
        self.wire.send(b"".join(record("stream", f"st-{i}") + b"\n" for i in range(self.sent, self.sent + n)))
        self.sent += n

    def run(self) -> None:
        try:
            while True:
                with self._cond:
                    if self._want_pause or self._stopping:
                        self._paused = True
                        self._cond.notify_all()
                        if self._stopping:
                            return
                        self._cond.wait_for(lambda: not self._want_pause or self._stopping, timeout=120)
                        self._paused = False
                        continue
                self.send_batch(self.rng.randint(1, 60))
                self._read_acks(self.sent)
                time.sleep(0.002)
        except BaseException as exc:  # reported by the test
            self.error = exc
            with self._cond:
                self._paused = True
                self._cond.notify_all()

    def pause(self) -> None:
        with self._cond:
            self._want_pause = True
            assert self._cond.wait_for(lambda: self._paused, timeout=JOIN_TIMEOUT), "the stream did not pause"
        self.check()

    def resume(self) -> None:
        with self._cond:
            self._want_pause = False
            self._cond.notify_all()

    def finish(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self.join(JOIN_TIMEOUT)
        assert not self.is_alive(), "the stream thread did not end"
        self.check()

    def check(self) -> None:
        if self.error is not None:
            raise AssertionError(f"the well-behaved stream failed after {self.acked} acks") from self.error
        assert self.acked == self.sent, (self.acked, self.sent)


# -- the test -----------------------------------------------------------------------------------------
def counters(mx: str) -> dict[str, float]:
    s = scrape(mx)
    return {
        "accepted": metric(s, "nio_logd_records_accepted_total"),
        "refused": sum(s["nio_logd_records_refused_total"].values()),
        "open": metric(s, "nio_logd_connections_open"),
        "total": metric(s, "nio_logd_connections_total"),
        "hs": metric(s, TLS_COUNTERS[0]),
        "hs_all": sum(metric(s, name) for name in TLS_COUNTERS),
    }


def run_threads(fuzzer: Fuzzer, plan: list[list[Any]]) -> Tally:
    total = Tally()
    errors: list[tuple[Any, BaseException]] = []
    lock = threading.Lock()

    def worker(todo: list[Any]) -> None:
        for action in todo:
            try:
                t = fuzzer.run(action)
            except BaseException as exc:  # reported below, with the action
                with lock:
                    errors.append((action, exc))
                return
            with lock:
                total.add(t)

    threads = [threading.Thread(target=worker, args=(todo,), daemon=True) for todo in plan]
    for th in threads:
        th.start()
    for th in threads:
        th.join(JOIN_TIMEOUT)
    assert not any(th.is_alive() for th in threads), "a client thread is stuck"
    if errors:
        action, exc = errors[0]
        raise AssertionError(f"well-behaved client action {action} failed: {exc!r}") from exc
    return total


@pytest.mark.slow
@pytest.mark.parametrize("io_threads", [1, 2], ids=["1", "2"])
@pytest.mark.parametrize("mode", ["plain", "tls"])
def test_connection_fuzz(
    tmp_path: Path, daemon_factory: Any, request: pytest.FixtureRequest, mode: str, io_threads: int
) -> None:
    tls = mode == "tls"
    pki_: PKI | None = request.getfixturevalue("pki") if tls else None
    # Distinct configured addresses: the daemon keys a listener's TLS (and allow list) by the address
    # as configured, so two listeners both configured as "tcp://127.0.0.1:0" would both be TLS.
    fuzzed = tls_listener(pki_, ack=True) if tls else {"address": f"tcp://127.0.0.1:{free_port()}", "ack": True}
    d = daemon_factory(
        write_config(
            tmp_path,
            listeners=[fuzzed, {"address": "tcp://127.0.0.1:0", "ack": True}],
            # One process: quiesce() reaches every loop by round robin, which the kernel's
            # SO_REUSEPORT spreading over worker processes would not guarantee.
            server={"io_threads": io_threads, "workers": 1},
            metrics={"address": "tcp://127.0.0.1:0"},
        )
    )
    mx = metrics_address(d)
    listening = [e for e in d.events if e.get("event") == "listening"]
    assert len(listening) == 2 and listening[0]["tls"] is tls and listening[1]["tls"] is False, listening

    def hostport(ev: dict[str, Any]) -> tuple[str, int]:
        host, _, port = str(ev["address"]).removeprefix("tcp://").rpartition(":")
        return host, int(port)

    addr, control = hostport(listening[0]), hostport(listening[1])
    fuzzer = Fuzzer(addr, tls, pki_)
    stream = Stream(addr, fuzzer.ctx())
    try:
        fuzz_and_stop(d, mx, mode, io_threads, tls, fuzzer, stream, control)
    finally:
        with stream._cond:  # a failed test: stop the stream's thread before closing its socket
            stream._stopping = True
            stream._cond.notify_all()
        if stream.is_alive():
            stream.join(JOIN_TIMEOUT)
        stream.wire.close()


def fuzz_and_stop(
    d: Any, mx: str, mode: str, io_threads: int, tls: bool, fuzzer: Fuzzer, stream: Stream, control: tuple[str, int]
) -> None:
    stream.start()
    grand = Tally()  # everything the actions, sentinels and probes delivered over the whole test
    stream.pause()
    stream_base = stream.acked
    wait_for(lambda: counters(mx)["open"] == 1, 10)
    base = counters(mx)
    stream.resume()
    state: dict[str, Any] = {
        "base": base,
        "dirty": False,
        "examples": 0,
        "actions": collections.Counter(),
        "slowest": (0.0, None, 0),
    }

    def open_now() -> int:
        return int(healthz(mx)[1]["connections"])

    def quiesce(t: Tally) -> None:
        """Until every fuzz connection has been accepted, processed and closed, and every loop has
        finished the pass that closed it (so its records are counted)."""
        fuzzer.exchange(t, 1)  # accepted after (FIFO) every connection made before it
        wait_for(lambda: open_now() == 1, 10)
        for _ in range(io_threads):  # one per loop (round robin): each has ended an earlier pass
            fuzzer.exchange(t, 1)
        wait_for(lambda: open_now() == 1, 10)  # polled on /healthz (cheaper); checked on /metrics

    @settings(
        max_examples=EXAMPLES[mode],
        deadline=None,
        database=None,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.large_base_example,
            HealthCheck.function_scoped_fixture,
        ],
    )
    @given(st.lists(actions, max_size=MAX_ACTIONS), st.integers(1, 4))
    def fuzz(todo: list[Any], n_threads: int) -> None:
        nonlocal stream_base
        if state["dirty"]:
            # The previous example failed half-way (hypothesis is shrinking): start from what the
            # daemon counts once it is quiet again, not from what that example left unaccounted.
            stream.pause()
            try:
                quiesce(Tally())
                stream_base = stream.acked
                state["base"] = counters(mx)
            finally:
                stream.resume()
        state["dirty"] = True
        start = state["base"]
        began = time.monotonic()
        plan = [todo[i::n_threads] for i in range(n_threads)]
        t = run_threads(fuzzer, plan)
        quiesce(t)
        with socket.create_connection(control, timeout=IO_TIMEOUT) as probe:  # the other listener serves too
            ids = fuzzer.ids(1)
            probe.sendall(Fuzzer.lines(ids))
            probe.shutdown(socket.SHUT_WR)
            buf = b""
            while chunk := probe.recv(4096):
                buf += chunk
            assert parse_acks(buf) == [{"seq": 1, "ok": True}]
            t.sure += ids
            t.acc_min += 1
            t.acc_max += 1
        stream.pause()
        try:
            assert d.proc.poll() is None, f"the daemon exited {d.proc.returncode}"
            status, body = healthz(mx)
            assert status == 200, body
            now = counters(mx)
            assert now["open"] == 1, now  # the stream's connection only
            delta = {k: now[k] - start[k] for k in now}
            streamed = stream.acked - stream_base
            assert t.acc_min <= delta["accepted"] - streamed <= t.acc_max, (delta, streamed, t)
            assert t.ref_min <= delta["refused"] <= t.ref_max, (delta, t)
            # Connections: the fuzzed listener saw at most those we made, at least those we read to
            # the end; the control listener saw the probe.
            assert t.answered + 1 <= delta["total"] <= t.connects + 1, (delta, t)
            if tls:
                # Every connection the TLS listener adopted ended in exactly one of the three
                # handshake counters (a socket reset before adoption counts as failed only).
                assert delta["total"] - 1 <= delta["hs_all"] <= t.connects, (delta, t)
                assert t.hs_min <= delta["hs"] <= t.hs_max, (delta, t)
            else:
                assert delta["hs_all"] == 0, delta
            bad = [e for e in list(d.events) if e.get("event") in BAD_EVENTS]
            assert not bad, bad
            # All checked: the next example starts from here (the stream is still paused).
            stream_base = stream.acked
            state["base"] = now
            state["dirty"] = False
        finally:
            grand.add(t)
            state["examples"] += 1
            took = time.monotonic() - began
            if took > state["slowest"][0]:
                state["slowest"] = (took, todo, n_threads)
            state["actions"].update(type(a).__name__ for a in todo)
            stream.resume()

    try:
        fuzz()
    except BaseException:
        print("\n[daemon events, last 40]\n" + "\n".join(d.stderr_lines[-40:]))
        raise
    # SIGTERM with records of the stream on the wire: they are written and acked, then exit 0.
    stream.finish()
    last = counters(mx)
    stream.send_batch(STREAM_FINAL)
    d.signal(signal.SIGTERM)
    stream._read_acks(stream.sent)
    assert stream.wire.read_all() == b""  # then the daemon closes the connection
    code = d.proc.wait(30)  # (not d.stop(): a second SIGTERM would force the end)
    d.stop()
    assert code == 0, d.stderr_lines[-20:]
    bad = [e for e in d.events if e.get("event") in BAD_EVENTS or e.get("level") in ("error", "critical")]
    assert not bad, bad

    lines = read_lines(d.messages)  # fails on a partial or invalid line
    assert len(lines) == last["accepted"] + STREAM_FINAL
    seen = collections.Counter(str(m["send_msg"]) for m in lines)
    ours = {k: n for k, n in seen.items() if k.startswith(("fz-", "st-"))}
    dup = {k: n for k, n in ours.items() if n > 1}
    assert not dup, f"duplicated records: {dict(list(dup.items())[:10])}"
    assert {f"st-{i}" for i in range(stream.sent)} <= ours.keys(), "the stream lost records"
    assert sum(1 for k in ours if k.startswith("st-")) == stream.sent
    missing = [i for i in grand.sure if i not in ours]
    assert not missing, f"acked records missing from the log: {missing[:10]}"
    sent = set(grand.sure) | set(grand.maybe)
    unknown = [k for k in ours if k.startswith("fz-") and k not in sent]
    assert not unknown, unknown
    rejects = read_lines(d.rejects)  # whole lines; past rejects_per_second some stand for many
    written = sum(1 for r in rejects if r.get("event") == "rejected")
    suppressed = sum(int(r["count"]) for r in rejects if r.get("event") == "rejects_suppressed")
    assert written + suppressed == last["refused"], (written, suppressed, last)
    print(
        f"\n[connection fuzz {mode}-{io_threads}] examples={state['examples']} actions={dict(state['actions'])} "
        f"stream={stream.sent} acked-by-actions={len(grand.sure)} maybe={len(grand.maybe)} "
        f"accepted={last['accepted']:.0f} refused={last['refused']:.0f} connections={last['total']:.0f} "
        f"slowest-example={state['slowest'][0]:.2f}s"
    )
