"""A TLS socket that reads and writes like a plain non-blocking socket, for the daemon and clients.

design: ``TLSSocket`` (installed as a context's ``sslsocket_class``) turns "no data yet" into
``BlockingIOError`` (not ``SSLWantReadError``), the end of the stream into ``b""`` (with or
without close_notify), and drains what OpenSSL already decrypted (``pending()``), which epoll
cannot report; so code written for plain sockets runs unchanged on TLS ones. ``ClientTLSSocket``
is the client's side. The helpers load keys without ever prompting for a passphrase.
"""

from __future__ import annotations

import errno
import ssl
from typing import Any

TLS_RECORD = 16384  # the largest TLS plaintext record: one SSL_read returns at most this much


class TLSSocket(ssl.SSLSocket):
    """An SSLSocket that reads and writes like a plain non-blocking socket (see the module doc)."""

    # False on a server socket until its handshake completed: the drain at shutdown must not
    # complete a handshake behind our back (SSL_read would) and take records without a subject.
    app_data = True
    at_eof = False

    def recv(self, buflen: int = 1024, flags: int = 0) -> bytes:
        """Up to ``buflen`` decrypted bytes (a little more if OpenSSL holds the rest of a record)."""
        if not self.app_data:
            raise BlockingIOError(errno.EAGAIN, "TLS handshake not complete")
        if self.at_eof:
            return b""
        chunks: list[bytes] = []
        total = 0
        blocking = self.gettimeout() != 0.0
        while total < buflen:
            try:
                data = super().recv(min(TLS_RECORD, buflen - total), flags)
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                if not chunks:
                    raise BlockingIOError(errno.EAGAIN, "no complete TLS record yet") from None
                break
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                data = b""
            if not data:
                self.at_eof = True
                break
            chunks.append(data)
            total += len(data)
            if blocking:
                break  # a blocking read returns what one record gave, like recv() on a socket
        while not self.at_eof and self.pending():
            chunks.append(super().recv(self.pending(), flags))
        return b"".join(chunks)

    def send(self, data: Any, flags: int = 0) -> int:
        """Bytes taken from ``data``; ``BlockingIOError`` if none (then retry with the same bytes).

        Written one record at a time so that a partly accepted write returns how much was taken,
        as send() on a socket does; OpenSSL requires a blocked record to be retried with the same
        bytes, which holds because the caller resends what was not taken.
        """
        # Slices, not a memoryview: a view would pin the caller's bytearray (the loop resizes it).
        total = 0
        size = len(data)
        while total < size:
            try:
                total += super().send(data[total : total + TLS_RECORD], flags)
            except (ssl.SSLWantWriteError, ssl.SSLWantReadError):
                if not total:
                    raise BlockingIOError(errno.EAGAIN, "TLS send would block") from None
                break
        return total


class ClientTLSSocket(TLSSocket):
    """The client's side: when the daemon has refused us, report its alert, not "broken pipe"."""

    def send(self, data: Any, flags: int = 0) -> int:
        try:
            return super().send(data, flags)
        except (ssl.SSLEOFError, ConnectionError):
            # With TLS 1.3 the daemon checks our certificate after our handshake has finished: its
            # refusal (an alert) may be waiting unread while our write fails. Reading raises it.
            timeout = self.gettimeout()
            self.setblocking(False)
            try:
                ssl.SSLSocket.recv(self, 4096)
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError, ssl.SSLEOFError, ssl.SSLZeroReturnError):
                pass
            except ssl.SSLError as alert:
                raise alert from None
            except OSError:
                pass
            finally:
                self.settimeout(timeout)
            raise


class EncryptedKeyError(Exception):
    pass


def no_password() -> str:
    # Without a callback OpenSSL would prompt on the terminal for an encrypted key's passphrase.
    raise EncryptedKeyError


def ssl_reason(exc: ssl.SSLError) -> str:
    return str(exc.reason or exc.strerror or exc).replace("_", " ").lower()
