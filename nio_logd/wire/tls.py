"""TLS: server and client contexts, a non-blocking TLS socket, and the TLS connection.

design: ``TLSSocket`` (installed as the contexts' ``sslsocket_class``) gives a wrapped socket the
semantics of a plain non-blocking socket: "no data yet" is ``BlockingIOError`` (not
``SSLWantReadError``), the end of the stream is ``b""`` (with or without the client's
close_notify), and ``recv`` drains what OpenSSL already decrypted (``pending()``), which epoll
cannot report. So the loop's ``Connection`` code (reading, framing, acks, limits, backpressure,
the drain at shutdown) runs unchanged on TLS connections and plain ones pay nothing.
``TLSConnection`` only adds the handshake in front: driven by readable/writable events
(``do_handshake_on_connect=False``), it never blocks the loop; until it completes, the
connection reads no record, and a client that never completes it is closed by the idle sweep.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config import TLSSettings
from ..errors import StartupError
from ..events import get_logger
from ..tlssocket import EncryptedKeyError, TLSSocket, no_password, ssl_reason
from .ioloop import Connection, DeadSocketError, _bytes_waiting
from .poller import READ, WRITE

if TYPE_CHECKING:
    import socket

    from .ioloop import IOLoop
    from .listeners import Listener

log = get_logger()

ConnectionFactory = Callable[["IOLoop", "socket.socket", "Listener", str, str], Connection]


# -- contexts ----------------------------------------------------------------------------------------
def _check_readable(label: str, path: Path) -> None:
    try:
        with path.open("rb") as f:
            f.read(1)
    except OSError as exc:
        raise StartupError(f"TLS {label} file {path}: {exc.strerror}") from None


def server_context(tls: TLSSettings, resolve: Callable[[str], Path], listener: str) -> ssl.SSLContext:
    """The context for one TLS listener; raises StartupError naming the file that is wrong."""
    cert = resolve(tls.cert)
    key = resolve(tls.key)
    ca = resolve(tls.ca) if tls.ca else None
    _check_readable("cert", cert)
    _check_readable("key", key)
    if ca is not None:
        _check_readable("ca", ca)
    probe = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        probe.load_verify_locations(cafile=str(cert))
    except ssl.SSLError as exc:
        raise StartupError(
            f"TLS cert file {cert} (listener {listener}): no PEM certificate in it ({ssl_reason(exc)})"
        ) from None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    # No renegotiation (a TLS 1.2 DoS vector); a client that closes without close_notify ends its
    # stream like a plain client that closes (its last record without newline counts).
    ctx.options |= ssl.OP_NO_RENEGOTIATION | getattr(ssl, "OP_IGNORE_UNEXPECTED_EOF", 0)
    # No TLS 1.3 session tickets: one-record clients close without reading them, and unread data
    # turns their close into a reset; we do not resume sessions anyway.
    ctx.num_tickets = 0
    ctx.sslsocket_class = TLSSocket
    try:
        ctx.load_cert_chain(str(cert), str(key), password=no_password)
    except EncryptedKeyError:
        raise StartupError(
            f"TLS key file {key}: the key is encrypted; nio-logd needs an unencrypted key "
            "(protect it with file permissions: it is read before privileges are dropped)"
        ) from None
    except ssl.SSLError as exc:
        raise StartupError(
            f"TLS key file {key}: cannot use it with certificate {cert} ({ssl_reason(exc)}); "
            "it must be the PEM private key of that certificate"
        ) from None
    if ca is not None:
        try:
            ctx.load_verify_locations(cafile=str(ca))
        except ssl.SSLError as exc:
            raise StartupError(f"TLS ca file {ca}: no PEM CA certificate in it ({ssl_reason(exc)})") from None
        ctx.verify_mode = ssl.CERT_REQUIRED if tls.require_client_cert else ssl.CERT_OPTIONAL
    return ctx


# -- the client's subject ------------------------------------------------------------------------------
# OpenSSL's long attribute names (what getpeercert() gives) and the short ones RFC 4514 (and
# `openssl x509 -nameopt RFC2253`) write.
_SHORT_NAMES = {
    "commonName": "CN",
    "countryName": "C",
    "localityName": "L",
    "stateOrProvinceName": "ST",
    "streetAddress": "street",
    "organizationName": "O",
    "organizationalUnitName": "OU",
    "domainComponent": "DC",
    "userId": "UID",
    "surname": "SN",
    "givenName": "GN",
    "serialNumber": "serialNumber",
    "emailAddress": "emailAddress",
}


def _escape(value: str) -> str:
    out = []
    for i, ch in enumerate(value):
        if ch in ',+"\\<>;' or (ch == "#" and i == 0) or (ch == " " and i in (0, len(value) - 1)):
            out.append("\\" + ch)
        elif ch == "\0":
            out.append("\\00")
        else:
            out.append(ch)
    return "".join(out)


def subject_string(cert: dict[str, Any]) -> str | None:
    """The certificate's subject as an RFC 4514 string ("CN=client1,O=Example"), None if absent.

    The same text as ``openssl x509 -noout -subject -nameopt RFC2253``: most specific first,
    multi-valued parts joined with "+", special characters escaped.
    """
    rdns = cert.get("subject") or ()
    parts = [
        "+".join(f"{_SHORT_NAMES.get(name, name)}={_escape(value)}" for name, value in rdn) for rdn in reversed(rdns)
    ]
    return ",".join(parts) or None


# -- the connection -----------------------------------------------------------------------------------
def _close_orphan(exc: BaseException) -> None:
    """Close the SSLSocket a failed ``wrap_socket`` made and dropped.

    When the peer resets between our check and the wrap, ``SSLSocket._create`` has already taken
    the descriptor from our socket and raises without closing its own object: the descriptor would
    stay open until the garbage collector finds it. The object is a local of a frame in the
    traceback, the only place it can still be reached.
    """
    tb = exc.__traceback__
    while tb is not None:
        orphan = tb.tb_frame.f_locals.get("self")
        if isinstance(orphan, ssl.SSLSocket):
            try:
                orphan.close()
            except OSError:
                pass
        tb = tb.tb_next


class TLSConnection(Connection):
    """A connection on a TLS listener: the handshake first, then exactly a plain Connection."""

    __slots__ = ("handshaking", "want")

    def __init__(
        self, loop: IOLoop, sock: socket.socket, listener: Listener, peer: str, host: str, *, context: ssl.SSLContext
    ) -> None:
        try:
            # A peer that reset before we accepted (a health check's RST) has no peer name. Asked
            # first, because wrap_socket detaches the socket before it finds out and then leaves
            # the descriptor in an object we never get.
            sock.getpeername()
            tls_sock = context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        except (OSError, ValueError) as exc:
            _close_orphan(exc)
            loop.stats.tls_handshake_failed += 1
            raise DeadSocketError(str(exc)) from None
        assert isinstance(tls_sock, TLSSocket)
        tls_sock.app_data = False
        super().__init__(loop, tls_sock, listener, peer, host)
        self.handshaking = True
        self.want = READ  # the client speaks first (ClientHello)

    def __repr__(self) -> str:
        state = "handshaking" if self.handshaking else f"client={self.client!r}"
        return f"<TLSConnection {self.peer} on {self.listener.name} {state} seq={self.seq}>"

    def wanted_events(self) -> int:
        if self.handshaking:
            return self.want
        return super().wanted_events()

    def on_event(self, mask: int) -> None:
        if self.handshaking:
            self.handshake()
        else:
            super().on_event(mask)

    def read_ahead(self) -> None:
        """The handshake comes first: it is driven by the poller's events."""

    def on_readable(self) -> bool:
        got = super().on_readable()
        if self.closed:
            return got
        if not self.eof and isinstance(self.sock, TLSSocket) and self.sock.at_eof:
            # The client's close_notify came with its last records: recv() returned the records,
            # and epoll will not report the end (the client waits for our close_notify).
            super().on_readable()
        if self.drain_owed > 0 and not self.closed:
            # At shutdown the loop reads until the bytes the kernel held are delivered; it counts
            # them in ciphertext but we delivered plaintext. What is owed is at most what is left.
            self.drain_owed = min(self.drain_owed, _bytes_waiting(self.sock))
        return got

    def handshake(self) -> None:
        """One step of the handshake, as far as the socket allows without blocking."""
        sock = self.sock
        loop = self.loop
        assert isinstance(sock, TLSSocket)
        try:
            sock.do_handshake()
        except ssl.SSLWantReadError:
            self.want = READ
            self.update_events()
            return
        except ssl.SSLWantWriteError:
            self.want = WRITE
            self.update_events()
            return
        except (OSError, ValueError) as exc:
            self.fail(exc)
            return
        self.handshaking = False
        sock.app_data = True
        loop.stats.tls_handshakes += 1
        self.client = subject_string(sock.getpeercert() or {})
        self.last_active = loop.now
        self.update_events()
        if self.events & READ:
            self.on_readable()  # a record may have come with the client's Finished

    def fail(self, exc: BaseException) -> None:
        """Count and (rate-limited per address) log a failed handshake, and close."""
        self.loop.stats.tls_handshake_failed += 1
        muted = self.loop.server.tls_failures_logged.check(self.client_host)
        if muted is not None:
            if isinstance(exc, ssl.SSLCertVerificationError):
                error = f"client certificate: {exc.verify_message}"
            elif isinstance(exc, ssl.SSLError):
                error = ssl_reason(exc)
            elif isinstance(exc, OSError) and exc.strerror:
                error = exc.strerror
            else:
                error = str(exc) or type(exc).__name__
            log.warning(
                "tls_handshake_failed",
                peer=self.peer,
                listener=self.listener.name,
                error=error,
                not_logged_since=muted,
                action="closed",
            )
        self.handshaking = False  # failed, not incomplete
        self.close()

    def close(self) -> None:
        if self.closed:
            return
        if self.handshaking:
            # Closed before the handshake completed: by the idle sweep (a client that never
            # finishes it) or at shutdown.
            self.loop.stats.tls_handshake_incomplete += 1
        elif isinstance(self.sock, TLSSocket) and self.sock.app_data:
            try:
                self.sock.unwrap()  # send close_notify: the client can tell our close from a cut
            except (OSError, ValueError):
                pass  # SSLWantReadError (their close_notify has not come) or a dead socket
        super().close()


def connection_factory(context: ssl.SSLContext) -> ConnectionFactory:
    """What the loop calls to adopt a socket accepted on a TLS listener."""

    def make(loop: IOLoop, sock: socket.socket, listener: Listener, peer: str, host: str) -> Connection:
        return TLSConnection(loop, sock, listener, peer, host, context=context)

    return make
