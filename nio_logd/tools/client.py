"""A small client library: send NDJSON records to nio-logd, optionally waiting for acks.

With ``ack=True`` records are pipelined (up to ``window`` unanswered), answers are matched to
records by their ``seq``, and after a lost connection every record not yet answered is sent
again on a new one: delivery is at least once.
"""

from __future__ import annotations

import selectors
import socket
import ssl
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson
from pydantic_core import SchemaValidator, ValidationError
from pydantic_core import core_schema as cs

from ..config import Address, parse_address
from ..errors import ClientError, UsageError
from ..tlssocket import ClientTLSSocket, EncryptedKeyError, no_password, ssl_reason


def client_context(
    ca: str | None = None, cert: str | None = None, key: str | None = None, *, partial_chain: bool = False
) -> ssl.SSLContext:
    """A client context: the server's certificate is verified (against ``ca`` or the system's CAs).

    ``partial_chain``: any certificate in ``ca`` is a trust anchor, not only a self-signed root;
    so ``ca`` may be the server's own certificate (chain) file.
    """
    try:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
    except FileNotFoundError:
        raise ClientError(f"TLS CA file {ca}: no such file") from None
    except ssl.SSLError as exc:
        raise ClientError(f"TLS CA file {ca}: no PEM CA certificate in it ({ssl_reason(exc)})") from None
    except OSError as exc:
        raise ClientError(f"TLS CA file {ca}: {exc.strerror}") from None
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.sslsocket_class = ClientTLSSocket
    if partial_chain:
        ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    if key is not None and cert is None:
        raise ClientError("a TLS key needs its certificate (--cert)")
    if cert is not None:
        try:
            ctx.load_cert_chain(cert, key, password=no_password)
        except EncryptedKeyError:
            raise ClientError(f"TLS key file {key or cert}: encrypted keys are not supported") from None
        except ssl.SSLError as exc:
            raise ClientError(
                f"TLS certificate {cert} / key {key or cert}: cannot load them ({ssl_reason(exc)})"
            ) from None
        except OSError as exc:
            raise ClientError(f"TLS certificate {cert} / key {key or cert}: {exc.strerror}") from None
    return ctx


# The daemon's send_time rule (records.record): a string that looks like a date and time, then a
# datetime in pydantic's lax mode (ISO 8601 / RFC 3339, "YYYY-MM-DD HH:MM:SS"; no epoch numbers).
_SEND_TIME = SchemaValidator(
    cs.chain_schema([cs.str_schema(pattern=r"^\d{4}-\d{2}-\d{2}[Tt _]\d{2}:\d{2}"), cs.datetime_schema(strict=False)])
)


def check_time(when: str) -> str:
    """``when`` if the daemon would take it as a send_time, else UsageError saying what is expected."""
    try:
        _SEND_TIME.validate_python(when)
    except ValidationError:
        raise UsageError(
            f"--time {when!r}: expected 'YYYY-MM-DD HH:MM:SS' or ISO 8601, e.g. 2026-11-29T12:00:00+01:00"
        ) from None
    return when


def now() -> str:
    """Now, to the second, with this machine's UTC offset: one instant, whatever $TZ says."""
    return datetime.now().astimezone().isoformat(timespec="seconds")


def make_record(user: str, msg: str, when: str | None = None, extra: Mapping[str, Any] | None = None) -> bytes:
    """One record line (without its newline); ``when`` defaults to ``now()``.

    ``extra``: more fields, written after the three (a key among them is left out, never replacing
    one); a value JSON cannot hold is written as its ``str()``. A listener takes them only with
    ``[record] extra = "keep"`` (or drops them with ``"ignore"``); the default refuses the record.
    """
    record: dict[str, Any] = {"send_user": user, "send_time": when or now(), "send_msg": msg}
    if not extra:
        return orjson.dumps(record)
    for key, value in extra.items():
        record.setdefault(key, value)
    return orjson.dumps(record, default=str)


class TLSError(ClientError):
    """TLS failed (the server's certificate is not trusted, ours was refused): retrying will not help."""


def _reason(exc: ssl.SSLError) -> str:
    return str(exc.reason or exc).replace("_", " ").lower()


def connect(
    address: str | Address,
    timeout: float = 10.0,
    *,
    tls: ssl.SSLContext | None = None,
    server_name: str | None = None,
) -> socket.socket:
    """A connected, blocking socket; raises ClientError naming the address.

    With ``tls`` (see ``nio_logd.tls.client_context``) the handshake is done here; the server's
    certificate must match ``server_name`` (default: the address's host, a name or an IP).
    """
    addr = parse_address(address) if isinstance(address, str) else address
    if tls is not None and addr.scheme != "tcp":
        raise ClientError(f"TLS needs a tcp:// address, not {addr}")
    try:
        if addr.scheme == "unix":
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            sock.connect(addr.path)
        else:
            sock = socket.create_connection((addr.host, addr.port), timeout=timeout)
    except OSError as exc:
        raise ClientError(f"cannot connect to {addr}: {exc.strerror or exc}") from None
    if tls is None:
        return sock
    try:
        return tls.wrap_socket(sock, server_hostname=server_name or addr.host)
    except ssl.SSLCertVerificationError as exc:
        raise TLSError(f"TLS handshake with {addr} failed: certificate verify failed: {exc.verify_message}") from None
    except ssl.SSLError as exc:
        raise TLSError(f"TLS handshake with {addr} failed: {_reason(exc)}") from None
    except OSError as exc:
        raise ClientError(f"TLS handshake with {addr} failed: {exc.strerror or exc}") from None


@dataclass
class SendResult:
    sent: int = 0  # records written to a socket (counting resends once)
    acked: int = 0
    resent: int = 0
    reconnects: int = 0
    answered: int = 0  # lines[:answered] have an answer (ok or refusal)
    refused: list[tuple[int, bytes, dict[str, Any]]] = field(default_factory=list)  # (index, line, answer)


def _addresses(address: str | Address | Sequence[str | Address]) -> list[Address]:
    given = [address] if isinstance(address, (str, Address)) else list(address)
    if not given:
        raise ClientError("no address to send to")
    return [parse_address(a) if isinstance(a, str) else a for a in given]


def send(
    address: str | Address | Sequence[str | Address],
    lines: Iterable[bytes],
    *,
    ack: bool = False,
    timeout: float = 10.0,
    window: int = 10_000,
    retries: int = 5,
    tls: ssl.SSLContext | None = None,
    server_name: str | None = None,
) -> SendResult:
    """Send every line; with ``ack``, wait until each has been answered. ``tls``: see ``connect``.

    ``address`` may be several (one daemon per host, in order of preference): one that cannot be
    connected to is skipped for the next. With ``ack``, a connection lost mid-way also moves on to
    the next address, where every record not yet answered is sent again. Without ``ack`` nothing
    is resent once bytes went out (what the lost daemon took is unknown): that error is raised.
    A TLS failure (an untrusted certificate) is raised at once, never skipped.
    """
    addresses = _addresses(address)
    if not ack:
        return _send_plain(addresses, lines, timeout, tls=tls, server_name=server_name)
    return _send_acked(addresses, list(lines), timeout, window, retries, tls=tls, server_name=server_name)


def _connect_any(
    addresses: list[Address], timeout: float, *, tls: ssl.SSLContext | None, server_name: str | None
) -> tuple[socket.socket, Address]:
    """A connection to the first of ``addresses`` that takes one."""
    errors: list[str] = []
    for addr in addresses:
        try:
            return connect(addr, timeout, tls=tls, server_name=server_name), addr
        except TLSError:
            raise
        except ClientError as exc:
            errors.append(str(exc))
    raise ClientError("; ".join(errors))


def _send_plain(
    addresses: list[Address],
    lines: Iterable[bytes],
    timeout: float,
    *,
    tls: ssl.SSLContext | None = None,
    server_name: str | None = None,
) -> SendResult:
    result = SendResult()
    sock, address = _connect_any(addresses, timeout, tls=tls, server_name=server_name)
    try:
        chunk: list[bytes] = []
        size = 0
        for line in lines:
            chunk.append(line)
            size += len(line) + 1
            result.sent += 1
            if size >= 256 * 1024:
                chunk.append(b"")
                sock.sendall(b"\n".join(chunk))
                chunk, size = [], 0
        if chunk:
            chunk.append(b"")
            sock.sendall(b"\n".join(chunk))
        # Half-close and wait for the daemon to close: then it has read every byte we sent.
        if isinstance(sock, ssl.SSLSocket):
            _tls_close_notify(sock)
            while socket.socket.recv(sock, 65536):  # the raw stream, whatever it still carries
                pass
        else:
            sock.shutdown(socket.SHUT_WR)
            while sock.recv(65536):
                pass
    except OSError as exc:
        raise ClientError(f"sending to {address}: {exc.strerror or exc}") from None
    finally:
        sock.close()
    return result


def _tls_close_notify(sock: ssl.SSLSocket) -> None:
    """Tell the daemon the stream ends (close_notify); raise if it refused us (e.g. our certificate)."""
    try:
        sock.unwrap()
    except ssl.SSLEOFError:
        pass  # it has closed already
    except ssl.SSLError as exc:
        if exc.reason != "APPLICATION_DATA_AFTER_CLOSE_NOTIFY":  # acks on an ack listener: harmless
            raise


def _send_acked(
    addresses: list[Address],
    lines: list[bytes],
    timeout: float,
    window: int,
    retries: int,
    *,
    tls: ssl.SSLContext | None = None,
    server_name: str | None = None,
) -> SendResult:
    """Until every line is answered: connect to the current address (the next one when that
    fails), pump, and after a lost connection go on with the next address. One attempt is one
    round over every address that failed to connect, or one lost connection; backoff between."""
    result = SendResult()
    attempts = 0
    current = 0
    round_errors: list[str] = []  # why each address failed to connect, since the last connection
    while result.answered < len(lines):
        address = addresses[current]
        try:
            sock = connect(address, timeout, tls=tls, server_name=server_name)
        except TLSError:
            raise
        except ClientError as exc:
            current = (current + 1) % len(addresses)
            round_errors.append(str(exc))
            if len(round_errors) < len(addresses):
                continue  # the next address, at once
            attempts += 1
            if attempts > retries:
                raise ClientError("; ".join(round_errors)) from None
            round_errors = []
            time.sleep(min(0.2 * 2**attempts, 5.0))
            continue
        round_errors = []
        if result.sent:
            result.reconnects += 1
        try:
            _pump(sock, lines, window, timeout, result)
            attempts = 0
        except (OSError, ConnectionError) as exc:
            if isinstance(exc, ssl.SSLError) and not isinstance(exc, ssl.SSLEOFError):
                # A TLS alert, e.g. the daemon refused our certificate: retrying will not help.
                raise TLSError(f"TLS error with {address}: {_reason(exc)}") from None
            attempts += 1
            if attempts > retries:
                raise ClientError(
                    f"lost connection to {address} {attempts} times: {getattr(exc, 'strerror', None) or exc}; "
                    f"{result.answered} of {len(lines)} records answered"
                ) from None
            if len(addresses) > 1:
                current = (current + 1) % len(addresses)  # fail over; the unanswered go there
            else:
                time.sleep(min(0.1 * 2**attempts, 5.0))
        finally:
            sock.close()
    return result


def _pump(
    sock: socket.socket, lines: list[bytes], window: int, timeout: float, result: SendResult, *, seq_base: int = 0
) -> None:
    """Send the unanswered lines on one connection until all are answered (or it fails).

    ``seq_base``: how many records this connection carried before (all answered), so that a
    long-lived sender (``tools.handler``) can pump one batch after another on one connection.
    """
    start = result.answered
    sock.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_READ | selectors.EVENT_WRITE)
    nxt = start  # next line to send
    answered = start
    out = b""
    inbuf = b""
    first_send = start
    deadline = time.monotonic() + timeout

    def take(data: bytes) -> None:
        nonlocal inbuf, answered
        inbuf += data
        *answers, inbuf = inbuf.split(b"\n")
        for raw in answers:
            if not raw:
                continue
            answer = orjson.loads(raw)
            index = first_send + answer["seq"] - seq_base - 1
            if index != answered:
                raise ClientError(f"answer out of order: seq {answer['seq']}")
            if answer.get("ok"):
                result.acked += 1
            else:
                result.refused.append((index, lines[index], answer))
            answered += 1
            result.answered = answered

    def take_the_rest() -> None:
        """The connection broke: answers already in our receive buffer still count (fewer resends)."""
        for _ in range(1024):
            try:
                data = sock.recv(262144)
            except OSError:
                return
            if not data:
                return
            take(data)

    try:
        while answered < len(lines):
            want_write = bool(out) or (nxt < len(lines) and nxt - answered < window)
            sel.modify(sock, selectors.EVENT_READ | (selectors.EVENT_WRITE if want_write else 0))
            events = sel.select(max(0.0, deadline - time.monotonic()))
            if not events:
                if result.answered == 0 and answered == start:
                    raise ClientError(f"no acknowledgement within {timeout} s: is ack = true set on the listener?")
                raise TimeoutError(f"no answer for {timeout} s")
            for _key, mask in events:
                if mask & selectors.EVENT_WRITE:
                    if not out:
                        end = min(len(lines), answered + window, nxt + 1000)
                        out = b"".join(line + b"\n" for line in lines[nxt:end])
                        if nxt < result.sent:
                            result.resent += min(end, result.sent) - nxt
                        result.sent = max(result.sent, end)
                        nxt = end
                    try:
                        n = sock.send(out)
                    except BlockingIOError:  # TLS: a record that cannot be written yet; retried as is
                        n = 0
                    except OSError:
                        take_the_rest()
                        raise
                    out = out[n:]
                if mask & selectors.EVENT_READ:
                    try:
                        data = sock.recv(262144)
                    except BlockingIOError:  # TLS: readable, but not a whole record yet
                        continue
                    if not data:
                        raise ConnectionError("the daemon closed the connection")
                    deadline = time.monotonic() + timeout
                    take(data)
    finally:
        sel.close()


def read_records(stream: Iterable[bytes]) -> Iterator[bytes]:
    """NDJSON lines from a binary stream, without newlines, blank lines skipped."""
    for raw in stream:
        line = raw.rstrip(b"\r\n")
        if line.strip():
            yield line
