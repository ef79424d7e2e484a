"""TLS listeners: client certificates and their subject, refusals, the non-blocking handshake, acks.

The certificates are made for each test module with the ``openssl`` command: a CA, a server
certificate for 127.0.0.1/localhost, client certificates from that CA and from another CA.
"""

from __future__ import annotations

import json
import os
import select
import socket
import ssl
import subprocess
import sys
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import free_port, read_lines, record, wait_for, write_config

from nio_logd.config import TLSSettings, load_file
from nio_logd.errors import ClientError, ConfigError, StartupError
from nio_logd.service.server import Server
from nio_logd.tools.client import client_context, send
from nio_logd.wire.tls import server_context, subject_string

OPENSSL_CNF = """\
[req]
distinguished_name = dn
[dn]
[ca]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign,cRLSign
subjectKeyIdentifier = hash
[server]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = IP:127.0.0.1,IP:::1,DNS:localhost
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always
[client]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature
extendedKeyUsage = clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always
"""


@dataclass
class Cert:
    pem: Path
    key: Path

    @property
    def subject(self) -> str:
        """The subject as ``openssl x509 -nameopt RFC2253`` prints it: what the daemon must write."""
        out = _openssl("x509", "-in", str(self.pem), "-noout", "-subject", "-nameopt", "RFC2253")
        return out.strip().removeprefix("subject=")


@dataclass
class PKI:
    ca: Cert
    other_ca: Cert
    server: Cert
    client: Cert  # from ca
    client2: Cert  # from ca, another subject
    rogue: Cert  # from other_ca, with the same subject as client


def _openssl(*args: str, cwd: Path | None = None) -> str:
    done = subprocess.run(["openssl", *args], capture_output=True, text=True, cwd=cwd, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def _new_key_and_csr(d: Path, name: str, subject: str) -> tuple[Path, Path]:
    key, csr = d / f"{name}.key", d / f"{name}.csr"
    _openssl(
        "req",
        "-new",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        str(key),
        "-out",
        str(csr),
        "-subj",
        subject,
        "-config",
        str(d / "openssl.cnf"),
    )
    return key, csr


def _make_ca(d: Path, name: str, subject: str) -> Cert:
    pem, key = d / f"{name}.pem", d / f"{name}.key"
    _openssl(
        "req",
        "-x509",
        "-new",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        str(key),
        "-out",
        str(pem),
        "-days",
        "2",
        "-subj",
        subject,
        "-config",
        str(d / "openssl.cnf"),
        "-extensions",
        "ca",
    )
    return Cert(pem, key)


def _issue(d: Path, ca: Cert, name: str, subject: str, kind: str, serial: int) -> Cert:
    key, csr = _new_key_and_csr(d, name, subject)
    pem = d / f"{name}.pem"
    _openssl(
        "x509",
        "-req",
        "-in",
        str(csr),
        "-CA",
        str(ca.pem),
        "-CAkey",
        str(ca.key),
        "-set_serial",
        str(serial),
        "-days",
        "2",
        "-out",
        str(pem),
        "-extfile",
        str(d / "openssl.cnf"),
        "-extensions",
        kind,
    )
    return Cert(pem, key)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    d = tmp_path_factory.mktemp("pki")
    (d / "openssl.cnf").write_text(OPENSSL_CNF)
    ca = _make_ca(d, "ca", "/O=Example/CN=nio-logd test CA")
    other = _make_ca(d, "other-ca", "/O=Elsewhere/CN=another CA")
    client_subject = "/O=Example, Inc./OU=Logging/CN=client1"
    return PKI(
        ca=ca,
        other_ca=other,
        server=_issue(d, ca, "server", "/CN=localhost", "server", 1001),
        client=_issue(d, ca, "client1", client_subject, "client", 1002),
        client2=_issue(d, ca, "client2", "/CN=client2", "client", 1003),
        rogue=_issue(d, other, "rogue", client_subject, "client", 1004),
    )


def tls_listener(pki: PKI, *, ack: bool = False, ca: bool = True, require: bool = True, **extra: Any) -> dict[str, Any]:
    tls: dict[str, Any] = {"cert": str(pki.server.pem), "key": str(pki.server.key)}
    if ca:
        tls["ca"] = str(pki.ca.pem)
        tls["require_client_cert"] = require
    return {"address": f"tcp://127.0.0.1:{free_port()}", "ack": ack, **extra, "tls": tls}


def ctx_for(pki: PKI, cert: Cert | None) -> ssl.SSLContext:
    """A client context (the one ``nio-logd send --tls`` uses) trusting our CA, with ``cert``."""
    if cert is None:
        return client_context(str(pki.ca.pem))
    return client_context(str(pki.ca.pem), str(cert.pem), str(cert.key))


def tls_connect(addr: tuple[str, int], ctx: ssl.SSLContext) -> ssl.SSLSocket:
    return ctx.wrap_socket(socket.create_connection(addr, timeout=30), server_hostname=addr[0])


def refused(addr: tuple[str, int], ctx: ssl.SSLContext | None) -> str:
    """Connect (TLS with ``ctx``, or plain TCP), send a record, and return how the daemon refused it.

    Fails if the daemon answers anything but a TLS alert or the end of the connection.
    """
    raw = socket.create_connection(addr, timeout=30)
    line = record("intruder", "should never be logged") + b"\n"
    if ctx is None:
        with raw:
            raw.sendall(line)
            try:
                while raw.recv(4096):  # a TLS alert to our non-TLS bytes, then the end
                    pass
            except ConnectionResetError:
                return "reset"
            return "closed"
    try:
        s = ctx.wrap_socket(raw, server_hostname=addr[0])
    except (ssl.SSLError, ConnectionError) as exc:  # TLS 1.2: refused within the handshake
        raw.close()
        return type(exc).__name__
    with s:
        try:
            # TLS 1.3: the client finishes its handshake before the server has checked its
            # certificate; the refusal arrives as an alert on the next read.
            s.sendall(line)
            data = s.recv(4096)
        except (ssl.SSLError, ConnectionError) as exc:
            return type(exc).__name__ + ": " + str(getattr(exc, "reason", "") or exc)
        assert data == b"", f"the daemon answered a refused client: {data!r}"
        return "closed"


def client_hello(pki: PKI) -> bytes:
    """The bytes of a real ClientHello (made with a memory BIO, no socket)."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx_for(pki, pki.client).wrap_bio(incoming, outgoing, server_hostname="127.0.0.1")
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


# -- client certificates ---------------------------------------------------------------------------
def test_client_certificate_subject_is_written_with_each_record(tmp_path: Path, server_factory: Any, pki: PKI) -> None:
    srv = server_factory(write_config(tmp_path, listeners=[tls_listener(pki)]))
    addr = srv.tcp
    with tls_connect(addr, ctx_for(pki, pki.client)) as s:
        s.sendall(b"".join(record("alice", f"pipelined-{i}") + b"\n" for i in range(3)))
    # Like the seed client: one record, no newline, then close (no close_notify).
    with tls_connect(addr, ctx_for(pki, pki.client2)) as s:
        s.sendall(record("bob", "no newline"))
    srv.wait_written(4)
    lines = read_lines(srv.messages)
    by_msg = {m["send_msg"]: m for m in lines}
    assert set(by_msg) == {"pipelined-0", "pipelined-1", "pipelined-2", "no newline"}
    assert pki.client.subject == "CN=client1,OU=Logging,O=Example\\, Inc."  # what openssl says
    for i in range(3):
        assert by_msg[f"pipelined-{i}"]["client"] == pki.client.subject
    assert by_msg["no newline"]["client"] == "CN=client2"
    for m in lines:
        assert m["peer"].startswith("127.0.0.1:") and m["listener"] == srv.settings.listeners[0].address
        assert list(m)[-1] == "client"
    snap = srv.server.snapshot()
    assert snap["tls_handshakes"] == 2 and snap["tls_handshake_failed"] == 0


def test_optional_client_certificate(tmp_path: Path, server_factory: Any, pki: PKI) -> None:
    """ca without require_client_cert: no certificate is fine (no client field); a bad one is not."""
    srv = server_factory(write_config(tmp_path, listeners=[tls_listener(pki, require=False)]))
    send(srv.address, [record("anon", "without certificate")], tls=ctx_for(pki, None))
    send(srv.address, [record("known", "with certificate")], tls=ctx_for(pki, pki.client))
    assert refused(srv.tcp, client_context(str(pki.ca.pem), str(pki.rogue.pem), str(pki.rogue.key)))
    srv.wait_written(2)
    by_user = {m["send_user"]: m for m in read_lines(srv.messages)}
    assert set(by_user) == {"anon", "known"}
    assert "client" not in by_user["anon"]
    assert by_user["known"]["client"] == pki.client.subject
    wait_for(lambda: srv.server.snapshot()["tls_handshake_failed"] == 1)


def test_no_client_ca_configured_means_no_client_field(tmp_path: Path, server_factory: Any, pki: PKI) -> None:
    """Without ca the daemon asks for no certificate: a client that has one is logged without it."""
    srv = server_factory(write_config(tmp_path, listeners=[tls_listener(pki, ca=False)]))
    send(srv.address, [record("x", "y")], tls=ctx_for(pki, pki.client))
    srv.wait_written(1)
    [line] = read_lines(srv.messages)
    assert "client" not in line


def test_bad_clients_are_refused_counted_and_do_not_disturb_a_valid_stream(
    tmp_path: Path, server_factory: Any, pki: PKI
) -> None:
    """10,000 records stream over TLS while clients without a certificate, with one from another
    CA, or speaking plain TCP try the same port (on the same I/O thread): all 10,000 arrive with
    their subject, every bad client is refused and counted, none of their bytes is logged."""
    srv = server_factory(write_config(tmp_path, listeners=[tls_listener(pki)], server={"io_threads": 1}))
    addr = srv.tcp
    n = 10_000
    halfway = threading.Event()
    attacks_done = threading.Event()
    errors: list[BaseException] = []

    def lines() -> Iterator[bytes]:
        for i in range(n):
            if i == n // 2:
                halfway.set()  # the first half is on the wire; the stream waits, connected, mid-way
                assert attacks_done.wait(120)
            yield record("good", f"r{i}")

    def good() -> None:
        try:
            send(srv.address, lines(), tls=ctx_for(pki, pki.client), timeout=120)
        except BaseException as exc:
            errors.append(exc)
            halfway.set()

    t = threading.Thread(target=good)
    t.start()
    assert halfway.wait(60)
    outcomes: dict[str, list[str]] = {"no_cert": [], "other_ca": [], "plain_tcp": []}
    rogue = client_context(str(pki.ca.pem), str(pki.rogue.pem), str(pki.rogue.key))
    for _ in range(5):
        outcomes["no_cert"].append(refused(addr, ctx_for(pki, None)))
        outcomes["other_ca"].append(refused(addr, rogue))
        outcomes["plain_tcp"].append(refused(addr, None))
    attacks_done.set()
    t.join(120)
    assert not errors, errors
    srv.wait_written(n)
    wait_for(lambda: srv.server.snapshot()["tls_handshake_failed"] == 15)
    srv.stop()
    msgs = read_lines(srv.messages)
    assert len(msgs) == n
    assert [m["send_msg"] for m in msgs] == [f"r{i}" for i in range(n)]
    assert {m["client"] for m in msgs} == {pki.client.subject}
    assert read_lines(srv.rejects) == []
    snap = srv.server.snapshot()
    assert snap["tls_handshakes"] == 1
    assert snap["tls_handshake_failed"] == 15
    assert all(o != "closed" for o in outcomes["no_cert"] + outcomes["other_ca"]), outcomes


def test_tls_below_1_2_is_refused(tmp_path: Path, server_factory: Any, pki: PKI) -> None:
    srv = server_factory(write_config(tmp_path, listeners=[tls_listener(pki, ca=False)]))
    old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    old.load_verify_locations(str(pki.ca.pem))
    old.set_ciphers("DEFAULT:@SECLEVEL=0")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # that is the point
        old.minimum_version = old.maximum_version = ssl.TLSVersion.TLSv1_1
    with socket.create_connection(srv.tcp, timeout=30) as raw, pytest.raises(ssl.SSLError) as err:
        old.wrap_socket(raw, server_hostname="127.0.0.1")
    # The daemon answered with a protocol_version alert (not our client failing on its own).
    assert "PROTOCOL_VERSION" in str(err.value).upper() or "UNSUPPORTED_PROTOCOL" in str(err.value).upper()
    wait_for(lambda: srv.server.snapshot()["tls_handshake_failed"] == 1)


# -- the handshake never blocks the loop ---------------------------------------------------------------
def test_a_handshake_that_never_completes_blocks_no_one_and_is_closed_after_idle_timeout(
    tmp_path: Path, server_factory: Any, pki: PKI
) -> None:
    cfg = write_config(tmp_path, listeners=[tls_listener(pki)], limits={"idle_timeout": 1.0}, server={"io_threads": 1})
    srv = server_factory(cfg)
    addr = srv.tcp
    silent = socket.create_connection(addr)  # TCP only, never a byte
    half = socket.create_connection(addr)
    hello = client_hello(pki)
    half.sendall(hello[: len(hello) // 2])  # half a ClientHello, then nothing
    wait_for(lambda: srv.server.open_connections == 2)
    # Meanwhile (same I/O thread) a good client does a full handshake and delivers, with acks.
    result = send(srv.address, [record("good", str(i)) for i in range(200)], tls=ctx_for(pki, pki.client))
    assert result.sent == 200
    srv.wait_written(200)
    for s in (silent, half):
        s.settimeout(60)
        try:
            assert s.recv(1) == b""  # closed by the daemon
        except ConnectionResetError:
            pass
        s.close()
    wait_for(lambda: srv.server.snapshot()["tls_handshake_incomplete"] == 2)
    snap = srv.server.snapshot()
    assert snap["idle_closed"] >= 2
    assert snap["tls_handshakes"] == 1
    assert snap["tls_handshake_failed"] == 0


def test_many_slow_handshakes_at_once(tmp_path: Path, server_factory: Any, pki: PKI) -> None:
    """50 clients that send their ClientHello a few bytes at a time, interleaved, all get through."""
    srv = server_factory(write_config(tmp_path, listeners=[tls_listener(pki)], server={"io_threads": 1}))
    ctx = ctx_for(pki, pki.client)
    socks = [socket.create_connection(srv.tcp, timeout=30) for _ in range(50)]
    objs = []
    for s in socks:
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        objs.append((ctx.wrap_bio(incoming, outgoing, server_hostname="127.0.0.1"), incoming, outgoing))
    hellos = []
    for obj, _inc, out in objs:
        with pytest.raises(ssl.SSLWantReadError):
            obj.do_handshake()
        hellos.append(out.read())
    for offset in range(0, max(len(h) for h in hellos), 64):
        for s, h in zip(socks, hellos, strict=True):
            if h[offset : offset + 64]:
                s.sendall(h[offset : offset + 64])
    # Finish every handshake over its socket, then send one record each.
    for i, (s, (obj, inc, out)) in enumerate(zip(socks, objs, strict=True)):
        while True:
            try:
                obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                if pending := out.read():
                    s.sendall(pending)
                data = s.recv(65536)
                assert data, "the daemon closed during the handshake"
                inc.write(data)
        obj.write(record(f"slow{i}", "ok") + b"\n")
        s.sendall(out.read())
        s.close()
    srv.wait_written(50)
    assert {m["send_user"] for m in read_lines(srv.messages)} == {f"slow{i}" for i in range(50)}
    assert srv.server.snapshot()["tls_handshakes"] == 50


def test_tls_socket_recv_leaves_nothing_decrypted_behind(pki: PKI) -> None:
    """recv() takes what OpenSSL already decrypted (pending), which epoll could never report."""
    settings = TLSSettings(cert=str(pki.server.pem), key=str(pki.server.key))
    a, b = socket.socketpair()
    server = server_context(settings, Path, "test").wrap_socket(a, server_side=True, do_handshake_on_connect=False)
    client = ctx_for(pki, None).wrap_socket(b, server_hostname="127.0.0.1", do_handshake_on_connect=False)
    t = threading.Thread(target=client.do_handshake)
    t.start()
    server.do_handshake()
    t.join(30)
    with server, client:
        for c in b"xyz":
            assert client.send(bytes([c]) * 1000) == 1000  # one TLS record each
        server.setblocking(False)
        first = server.recv(1500)  # ends inside the second record...
        assert first == b"x" * 1000 + b"y" * 1000  # ...which it still takes whole
        assert server.pending() == 0
        assert server.recv(1500) == b"z" * 1000
        with pytest.raises(BlockingIOError):
            server.recv(1500)
        client.send(b"last")
        socket.socket.shutdown(client, socket.SHUT_WR)  # the end of the stream, without close_notify
        assert server.recv(1500) == b"last"
        assert server.recv(1500) == b""


# -- acks ----------------------------------------------------------------------------------------------
def test_acks_over_tls(tmp_path: Path, server_factory: Any, pki: PKI) -> None:
    srv = server_factory(write_config(tmp_path, listeners=[tls_listener(pki, ack=True)]))
    ctx = ctx_for(pki, pki.client)
    lines = [record("a", str(i)) for i in range(3000)] + [b"[]"] + [record("a", "end")]
    result = send(srv.address, lines, ack=True, tls=ctx, window=500)
    assert result.acked == 3001
    [(index, line, answer)] = result.refused
    assert (index, line, answer["seq"], answer["reason"]) == (3000, b"[]", 3001, "not_an_object")
    # By hand: 50 records in one write, 50 answers in order.
    with tls_connect(srv.tcp, ctx) as s:
        s.sendall(b"".join(record("b", str(i)) + b"\n" for i in range(50)))
        buf = b""
        while buf.count(b"\n") < 50:
            data = s.recv(65536)
            assert data, "closed before all acks"
            buf += data
    assert [json.loads(x) for x in buf.splitlines()] == [{"seq": i, "ok": True} for i in range(1, 51)]
    srv.wait_written(3051, 1)
    msgs = read_lines(srv.messages)
    assert len(msgs) == 3051 and {m["client"] for m in msgs} == {pki.client.subject}


def test_acks_to_a_client_that_reads_them_late(tmp_path: Path, server_factory: Any, pki: PKI) -> None:
    """The client writes and does not read until its writes stall: the daemon's TLS writes of
    acks block (more acks than its send buffer and our 8 KiB receive buffer hold), it stops
    reading, and then, once the client reads, every ack still arrives, whole and in order."""
    srv = server_factory(write_config(tmp_path, listeners=[tls_listener(pki, ack=True)]))
    n = 250_000  # about 6 MB of acks: more than a socket send buffer can grow to (4 MB)
    data = b"".join(record("late", str(i)) + b"\n" for i in range(n))
    raw = socket.socket()
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
    raw.connect(srv.tcp)
    s = ctx_for(pki, pki.client).wrap_socket(raw, server_hostname="127.0.0.1")
    s.setblocking(False)
    sent, answers = 0, bytearray()
    reading = False  # not until our writes stall
    with s:
        while len(answers) < n * 20 or answers.count(b"\n") < n:
            want_write = sent < len(data)
            readable, writable, _ = select.select(
                [s] if reading else [], [s] if want_write else [], [], 30 if reading else 1.0
            )
            if not readable and not writable:
                assert not reading, "no progress for 30 s"
                reading = True  # our writes stalled: the daemon stopped reading; now take the acks
                continue
            if writable:
                try:
                    sent += s.send(data[sent : sent + 65536])
                except BlockingIOError:
                    pass
            if readable:
                try:
                    chunk = s.recv(65536)
                except BlockingIOError:
                    continue
                assert chunk, "the daemon closed the connection"
                answers += chunk
    assert reading, "our writes never stalled: the scenario did not happen"
    assert answers == b"".join(b'{"seq":%d,"ok":true}\n' % i for i in range(1, n + 1))
    srv.wait_written(n)


def test_sigterm_drains_tls_connections(tmp_path: Path, daemon_factory: Any, pki: PKI) -> None:
    """Records sent over TLS before SIGTERM are written and the daemon stops cleanly."""
    d = daemon_factory(write_config(tmp_path, listeners=[tls_listener(pki)]))
    ctx = ctx_for(pki, pki.client)
    socks = [tls_connect(d.tcp, ctx) for _ in range(3)]
    for k, s in enumerate(socks):
        s.sendall(b"".join(record(f"u{k}", f"{k}-{i}") + b"\n" for i in range(2000)))
    d.signal(15)
    assert d.stop() == 0
    for s in socks:
        s.close()
    assert len({m["send_msg"] for m in read_lines(d.messages)}) == 6000
    stopped = d.event("stopped")
    assert stopped is not None and stopped["clean"] is True


# -- the command line ----------------------------------------------------------------------------------
def nio(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "nio_logd", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "NIO_LOGD_CONFIG": ""},
    )


def test_send_tls_from_the_command_line(tmp_path: Path, server_factory: Any, pki: PKI) -> None:
    srv = server_factory(write_config(tmp_path, listeners=[tls_listener(pki, ack=True)]))
    base = ["send", "--address", srv.address, "--tls", "--ca", str(pki.ca.pem)]
    mine = ["--cert", str(pki.client.pem), "--key", str(pki.client.key)]
    done = nio(*base, *mine, "--user", "cli", "--msg", "over TLS", "--ack")
    assert done.returncode == 0, done.stderr
    assert "1 acknowledged" in done.stderr
    done = nio(*base, *mine, "--user", "cli", "--msg", "no ack")
    assert done.returncode == 0, done.stderr
    srv.wait_written(2)
    lines = read_lines(srv.messages)
    assert [m["send_msg"] for m in lines] == ["over TLS", "no ack"]
    assert {m["client"] for m in lines} == {pki.client.subject}
    # A daemon certificate from a CA we do not trust: refused by the client, clearly.
    done = nio(
        "send",
        "--address",
        srv.address,
        "--tls",
        "--ca",
        str(pki.other_ca.pem),
        *mine,
        "--user",
        "cli",
        "--msg",
        "x",
        "--ack",
    )
    assert done.returncode != 0 and "certificate verify failed" in done.stderr
    # No client certificate where one is required: refused by the daemon.
    done = nio(*base, "--user", "cli", "--msg", "x", "--ack")
    assert done.returncode != 0 and "certificate required" in done.stderr, done.stderr
    # The name the certificate must carry.
    done = nio(*base, *mine, "--server-name", "not-the-daemon.example", "--user", "cli", "--msg", "x")
    assert done.returncode != 0 and "mismatch" in done.stderr.lower(), done.stderr
    done = nio(*base, *mine, "--server-name", "localhost", "--user", "cli", "--msg", "by name")
    assert done.returncode == 0, done.stderr
    done = nio("send", "--address", srv.address, "--ca", str(pki.ca.pem), "--user", "u", "--msg", "m")
    assert done.returncode != 0 and "need --tls" in done.stderr
    srv.wait_written(3)
    assert len(read_lines(srv.messages)) == 3


# -- configuration and start-up errors -----------------------------------------------------------------
def test_failed_handshakes_are_logged_with_the_peer_once_per_address_per_minute(
    tmp_path: Path, daemon_factory: Any, pki: PKI
) -> None:
    d = daemon_factory(write_config(tmp_path, listeners=[tls_listener(pki)]))
    host, port = d.tcp
    for source in ("127.0.0.1", "127.0.0.2"):
        for _ in range(20):
            with socket.socket() as s:
                s.bind((source, 0))
                s.connect((host, port))
                s.sendall(b"GET / HTTP/1.0\r\n\r\n")
                s.settimeout(30)
                try:
                    while s.recv(4096):
                        pass
                except ConnectionResetError:
                    pass
    wait_for(lambda: d.event("tls_handshake_failed") is not None)
    assert d.stop() == 0
    failed = [e for e in d.events if e.get("event") == "tls_handshake_failed"]
    hosts = [e["peer"].rpartition(":")[0] for e in failed]
    # Once a minute per address in each worker process (each keeps its own rate).
    assert sorted(set(hosts)) == ["127.0.0.1", "127.0.0.2"], hosts
    assert all(hosts.count(h) <= d.settings.server.worker_count for h in hosts), hosts
    for e in failed:
        assert e["level"] == "warning" and e["listener"] == d.settings.listeners[0].address and e["error"]
    stopping = d.event("stopping")
    assert stopping is not None and stopping["tls_handshake_failed"] == 40


def test_tls_settings_errors_at_load(tmp_path: Path, pki: PKI) -> None:
    unix = write_config(
        tmp_path,
        listeners=[
            {"address": f"unix://{tmp_path}/s.sock", "tls": {"cert": str(pki.server.pem), "key": str(pki.server.key)}}
        ],
    )
    with pytest.raises(ConfigError, match=r"listeners\.0: .*TLS is for tcp:// listeners"):
        load_file(unix)
    no_ca = write_config(
        tmp_path,
        listeners=[
            {
                "address": "tcp://127.0.0.1:0",
                "tls": {"cert": str(pki.server.pem), "key": str(pki.server.key), "require_client_cert": True},
            }
        ],
    )
    with pytest.raises(ConfigError, match=r"listeners\.0\.tls: .*require_client_cert needs ca"):
        load_file(no_ca)


@pytest.mark.parametrize(
    ("which", "content", "needle"),
    [
        ("cert", None, "No such file"),
        ("key", None, "No such file"),
        ("ca", None, "No such file"),
        ("cert", "not a certificate\n", "no PEM certificate"),
        ("key", "not a key\n", "must be the PEM private key"),
        ("key", "other", "must be the PEM private key"),  # a valid key, of another certificate
        ("key", "encrypted", "the key is encrypted"),  # never a passphrase prompt on the terminal
        ("ca", "not a CA\n", "no PEM CA certificate"),
    ],
)
def test_bad_certificate_files_stop_the_start_naming_the_file(
    tmp_path: Path, pki: PKI, which: str, content: str | None, needle: str
) -> None:
    files = {"cert": str(pki.server.pem), "key": str(pki.server.key), "ca": str(pki.ca.pem)}
    bad = tmp_path / f"bad-{which}.pem"
    if content == "other":
        bad = pki.client.key
    elif content == "encrypted":
        _openssl("pkey", "-in", str(pki.server.key), "-aes256", "-passout", "pass:secret", "-out", str(bad))
    elif content is not None:
        bad.write_text(content)
    files[which] = str(bad)
    cfg = write_config(
        tmp_path,
        listeners=[{"address": f"tcp://127.0.0.1:{free_port()}", "tls": {**files, "require_client_cert": True}}],
    )
    server = Server(load_file(cfg))
    with pytest.raises(StartupError) as err:
        server.startup()
    assert str(bad) in str(err.value) and needle in str(err.value)
    assert not (tmp_path / "logs" / "messages.log").exists()  # checked before anything is opened


def test_bad_key_from_the_command_line_exits_69_naming_the_file(tmp_path: Path, pki: PKI) -> None:
    bad = tmp_path / "garbage.key"
    bad.write_text("garbage\n")
    cfg = write_config(
        tmp_path,
        listeners=[
            {"address": f"tcp://127.0.0.1:{free_port()}", "tls": {"cert": str(pki.server.pem), "key": str(bad)}}
        ],
    )
    done = nio("run", "--config", str(cfg))
    assert done.returncode == 69
    assert str(bad) in done.stderr


def test_subject_string_matches_openssl_rfc2253() -> None:
    cert = {
        "subject": (
            (("countryName", "FR"),),
            (("organizationName", 'A+B, "C" <D>;'),),
            (("commonName", " lead#"), ("userId", "42")),
        )
    }
    assert subject_string(cert) == 'CN=\\ lead#+UID=42,O=A\\+B\\, \\"C\\" \\<D\\>\\;,C=FR'
    assert subject_string({"subject": ((("commonName", "#x "),),)}) == "CN=\\#x\\ "
    assert subject_string({}) is None


def test_client_context_errors_name_the_file(tmp_path: Path, pki: PKI) -> None:
    with pytest.raises(ClientError, match="nope.pem"):
        client_context(str(tmp_path / "nope.pem"))
    with pytest.raises(ClientError, match="needs its certificate"):
        client_context(str(pki.ca.pem), None, str(pki.client.key))
    with pytest.raises(ClientError, match=str(pki.client2.key)):
        client_context(str(pki.ca.pem), str(pki.client.pem), str(pki.client2.key))


def test_two_listeners_with_the_same_configured_address_keep_their_own_tls(
    tmp_path: Path, server_factory: Any, pki: PKI
) -> None:
    """Both configured as tcp://127.0.0.1:0, the first with TLS: the second stays plain (its
    settings were once looked up by the configured address, so it spoke TLS too)."""
    tls = tls_listener(pki, ca=False)
    tls["address"] = "tcp://127.0.0.1:0"
    srv = server_factory(write_config(tmp_path, listeners=[tls, {"address": "tcp://127.0.0.1:0"}]))
    tls_address, plain_address = srv.server.addresses()
    send(plain_address, [record("plain")], timeout=10)
    send(tls_address, [record("tls")], tls=ctx_for(pki, None), timeout=10)
    srv.wait_written(2)
    assert sorted(line["send_user"] for line in read_lines(srv.messages)) == ["plain", "tls"]
    assert srv.server.snapshot()["tls_handshake_failed"] == 0
