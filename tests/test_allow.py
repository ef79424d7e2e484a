"""Allowed networks: connections from elsewhere are closed at accept, counted, and logged sparingly."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest
from conftest import free_port, read_lines, record, wait_for, write_config

from nio_logd.config import load_file
from nio_logd.errors import ConfigError
from nio_logd.tools.client import send
from nio_logd.wire.access import AllowList, OncePer


def connect_from(source: str, addr: tuple[str, int]) -> socket.socket:
    """A TCP connection to ``addr`` from the local address ``source`` (e.g. 127.0.0.2)."""
    s = socket.socket(socket.AF_INET6 if ":" in source else socket.AF_INET)
    s.bind((source, 0))
    s.connect(addr)
    s.settimeout(30)
    return s


def closed_without_reading(s: socket.socket) -> bool:
    """Send a record; True if the daemon closes the connection (FIN, or RST for the unread bytes)."""
    with s:
        try:
            s.sendall(record("outsider", "must not be logged") + b"\n")
            return s.recv(1) == b""
        except (ConnectionResetError, BrokenPipeError):
            return True


def refused_not_allowed(srv: Any) -> int:
    return int(srv.server.snapshot()["connections_refused_by_reason"].get("not_allowed", 0))


def test_connection_from_outside_allow_is_closed_at_accept_and_counted(tmp_path: Path, server_factory: Any) -> None:
    port = free_port()
    srv = server_factory(
        write_config(
            tmp_path,
            listeners=[
                {"address": f"tcp://127.0.0.1:{port}", "allow": ["127.0.0.1/32"]},
            ],
        )
    )
    assert closed_without_reading(connect_from("127.0.0.2", srv.tcp))
    wait_for(lambda: refused_not_allowed(srv) == 1)
    with connect_from("127.0.0.1", srv.tcp) as s:  # the allowed address still gets in
        s.sendall(record("insider", "welcome"))
    srv.wait_written(1)
    srv.stop()
    assert [m["send_user"] for m in read_lines(srv.messages)] == ["insider"]
    assert read_lines(srv.rejects) == []  # refused before any byte was read: nothing to reject
    snap = srv.server.snapshot()
    assert snap["connections_refused"] == 1
    assert snap["connections_total"] == 1  # the refused one was never a connection of a loop
    assert snap["bytes_in"] == len(record("insider", "welcome"))


def test_networks_not_single_addresses(tmp_path: Path, server_factory: Any) -> None:
    srv = server_factory(
        write_config(
            tmp_path,
            listeners=[
                {"address": f"tcp://127.0.0.1:{free_port()}", "allow": ["10.0.0.0/8", "127.0.0.0/30", "::1/128"]},
            ],
        )
    )
    for source in ("127.0.0.1", "127.0.0.2", "127.0.0.3"):
        with connect_from(source, srv.tcp) as s:
            s.sendall(record(source, "in"))
    assert closed_without_reading(connect_from("127.0.0.4", srv.tcp))
    srv.wait_written(3)
    wait_for(lambda: refused_not_allowed(srv) == 1)
    assert {m["send_user"] for m in read_lines(srv.messages)} == {"127.0.0.1", "127.0.0.2", "127.0.0.3"}


def test_ipv6_client_against_an_ipv4_only_allow_list(tmp_path: Path, server_factory: Any) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this machine")
    try:
        socket.create_server(("::1", 0), family=socket.AF_INET6).close()
    except OSError:
        pytest.skip("no IPv6 loopback on this machine")
    srv = server_factory(
        write_config(
            tmp_path,
            listeners=[
                {"address": f"tcp://[::1]:{free_port()}", "allow": ["127.0.0.0/8"]},
                {"address": f"tcp://[::1]:{free_port()}", "allow": ["127.0.0.0/8", "::1/128"]},
            ],
        )
    )
    v4_only, both = srv.server.addresses()
    port_v4_only = int(v4_only.rpartition(":")[2])
    assert closed_without_reading(connect_from("::1", ("::1", port_v4_only)))
    wait_for(lambda: refused_not_allowed(srv) == 1)
    send(both, [record("six", "allowed")])
    srv.wait_written(1)
    [line] = read_lines(srv.messages)
    assert line["send_user"] == "six" and line["peer"].startswith("[::1]:")


def test_100_refusals_from_one_address_log_one_event_a_minute(tmp_path: Path, daemon_factory: Any) -> None:
    d = daemon_factory(
        write_config(
            tmp_path,
            listeners=[
                {"address": f"tcp://127.0.0.1:{free_port()}", "allow": ["127.0.0.1/32"]},
            ],
        )
    )
    for _ in range(100):
        assert closed_without_reading(connect_from("127.0.0.2", d.tcp))
    for _ in range(3):
        assert closed_without_reading(connect_from("127.0.0.3", d.tcp))
    send(d.address, [record("insider", "still served")])
    wait_for(lambda: len(read_lines(d.messages)) == 1)
    assert d.stop() == 0
    refusals = [e for e in d.events if e.get("event") == "connection_refused"]
    hosts = [e["peer"].rpartition(":")[0] for e in refusals]
    # Once a minute per address in each worker process (each keeps its own rate): not 103 lines.
    assert sorted(set(hosts)) == ["127.0.0.2", "127.0.0.3"], hosts
    assert all(hosts.count(h) <= d.settings.server.worker_count for h in hosts), hosts
    for e in refusals:
        assert e["reason"] == "not_allowed" and e["level"] == "warning" and e["allow"] == ["127.0.0.1/32"]
    stopping = d.event("stopping")
    assert stopping is not None
    assert stopping["connections_refused_by_reason"] == {"not_allowed": 103}


def test_tls_listener_refuses_outsiders_before_the_handshake(tmp_path: Path, server_factory: Any) -> None:
    """The allow check comes first: an outsider costs no handshake and counts no TLS failure."""
    # The certificate files are never read by this test's connections; any PEM pair will do, so
    # make a throwaway self-signed one.
    import subprocess

    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            str(tmp_path / "k.pem"),
            "-out",
            str(tmp_path / "c.pem"),
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    srv = server_factory(
        write_config(
            tmp_path,
            listeners=[
                {
                    "address": f"tcp://127.0.0.1:{free_port()}",
                    "allow": ["127.0.0.1/32"],
                    "tls": {"cert": str(tmp_path / "c.pem"), "key": str(tmp_path / "k.pem")},
                }
            ],
        )
    )
    for _ in range(5):
        assert closed_without_reading(connect_from("127.0.0.2", srv.tcp))
    wait_for(lambda: refused_not_allowed(srv) == 5)
    snap = srv.server.snapshot()
    assert snap["tls_handshake_failed"] == 0 and snap["tls_handshake_incomplete"] == 0


def test_allow_on_a_unix_listener_is_a_config_error(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, listeners=[{"address": f"unix://{tmp_path}/s.sock", "allow": ["127.0.0.1/32"]}])
    with pytest.raises(ConfigError, match=r"listeners\.0: .*allowed networks are for tcp:// listeners"):
        load_file(cfg)


def test_bad_network_is_a_config_error(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, listeners=[{"address": "tcp://127.0.0.1:0", "allow": ["127.0.0.300/8"]}])
    with pytest.raises(ConfigError, match=r"listeners\.0\.allow\.0"):
        load_file(cfg)


# -- the matching itself ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("networks", "host", "allowed"),
    [
        ((), "203.0.113.9", True),  # empty: everyone
        (("127.0.0.0/8",), "127.1.2.3", True),
        (("127.0.0.1/32",), "127.0.0.2", False),
        (("127.0.0.0/8",), "[::ffff:127.0.0.1]", True),  # IPv4-mapped IPv6 matches IPv4 networks
        (("127.0.0.0/8",), "::ffff:10.0.0.1", False),
        (("127.0.0.0/8",), "[::1]", False),  # IPv6 loopback against an IPv4-only list
        (("::1/128",), "[::1]", True),
        (("::1/128",), "127.0.0.1", False),
        (("2001:db8::/32",), "[2001:db8:ffff::1]", True),
        (("2001:db8::/32",), "[2001:db9::1]", False),
        (("fe80::/10",), "fe80::1%eth0", True),  # a scope id does not hide the address
        (("192.168.1.7/24",), "192.168.1.200", True),  # host bits in the config are ignored
        (("0.0.0.0/0",), "198.51.100.1", True),
        (("0.0.0.0/0",), "[2001:db8::1]", False),  # the IPv4 "everyone" is not IPv6
        (("127.0.0.0/8",), "unknown", False),  # the peer vanished before we could ask: refuse
        (("127.0.0.0/8",), "unix", False),
    ],
)
def test_allow_list_matching(networks: tuple[str, ...], host: str, allowed: bool) -> None:
    assert AllowList(networks).permits(host) is allowed


def test_once_per_limits_each_key_and_counts_what_it_muted() -> None:
    limiter = OncePer(60.0, max_keys=3)
    assert limiter.check("a", now=0.0) == 0
    assert limiter.check("a", now=1.0) is None
    assert limiter.check("a", now=59.0) is None
    assert limiter.check("b", now=2.0) == 0
    assert limiter.check("a", now=60.0) == 2  # logged again, saying two were not
    assert limiter.check("c", now=61.0) == 0
    # Full (a, b, c), none expired: a new key shares the overflow entry; memory stays bounded.
    assert limiter.check("d", now=61.5) == 0
    assert limiter.check("e", now=61.6) is None
    assert len(limiter._last) <= 4
    # Once b has expired, a new key gets its own entry again.
    assert limiter.check("f", now=200.0) == 0
