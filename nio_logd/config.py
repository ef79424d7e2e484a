"""The configuration: one TOML file validated at load time into frozen pydantic models."""

from __future__ import annotations

import copy
import grp
import ipaddress
import json
import os
import pwd
import stat
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from . import tomlpos
from .errors import ConfigError

DEFAULT_SYSTEM_CONFIG = Path("/etc/nio-logd/nio-logd.toml")
ENV_CONFIG = "NIO_LOGD_CONFIG"
# Suffixes of compressed rotated logs (logrotate's compress and others): never a copy to write to.
COMPRESSED = (".gz", ".bz2", ".xz", ".zst", ".lz4", ".lzo", ".lzma", ".Z", ".zip")


def rotated_name(name: str, base: str) -> bool:
    """Whether ``name`` is one logrotate or the built-in rotation gives a copy of the log named
    ``base`` (``messages.log.1``, ``messages.log-20261201``), uncompressed, and not one of the
    forwarder's own files next to it (``.forward-…cursor``, ``.tmp``) or another program's
    (``messages-audit.log``)."""
    rest = name[len(base) :]
    return (
        name.startswith(base)
        and rest[:1] in (".", "-", "_")
        and not name.endswith((*COMPRESSED, ".cursor", ".tmp"))
        and ".forward-" not in rest
    )


# The last bytes the writer keeps of each file to put back what a copytruncate copy missed (a ring of
# at most this); a forwarder keeps twice this of what it read, so that it finds the copy
# and steps over what was put back whatever the daemon wrote between the copy and the truncation.
COPYTRUNCATE_JOURNAL_BYTES = 8 << 20


class KeyedValueError(ValueError):
    """A validator's error about particular keys of its table (as the message names them): ``keys``,
    relative to that table, the first one set in the config is where the error points."""

    def __init__(self, message: str, *keys: tuple[str | int, ...]) -> None:
        super().__init__(message)
        self.keys = keys


@dataclass(frozen=True, slots=True)
class Address:
    """A parsed listener address: ``tcp://HOST:PORT`` or ``unix:///PATH``."""

    scheme: Literal["tcp", "unix"]
    host: str = ""
    port: int = 0
    path: str = ""

    def __str__(self) -> str:
        if self.scheme == "unix":
            return f"unix://{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp://{host}:{self.port}"


def parse_address(text: str) -> Address:
    """Parse a listener address; raise ValueError naming what is wrong."""
    if text.startswith("unix://"):
        path = text[len("unix://") :]
        if not path:
            raise ValueError("unix address needs a path, e.g. unix:///run/nio-logd/nio-logd.sock")
        if "\0" in path:
            raise ValueError("unix socket path contains a NUL byte")
        return Address("unix", path=path)
    if not text.startswith("tcp://"):
        raise ValueError(f"{text!r}: expected tcp://HOST:PORT or unix:///PATH")
    rest = text[len("tcp://") :]
    if rest.startswith("["):
        host, sep, port_text = rest[1:].partition("]:")
        if not sep:
            raise ValueError(f"{text!r}: IPv6 addresses are written tcp://[::1]:PORT")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{text!r}: {host!r} is not an IPv6 address") from None
    else:
        host, sep, port_text = rest.rpartition(":")
        if not sep or not host:
            raise ValueError(f"{text!r}: expected tcp://HOST:PORT")
        if ":" in host:
            raise ValueError(f"{text!r}: IPv6 addresses are written tcp://[::1]:PORT")
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"{text!r}: port must be a number from 0 to 65535")
    return Address("tcp", host=host, port=int(port_text))


def _check_address(text: str) -> str:
    parse_address(text)
    return text


def _check_network(text: str) -> str:
    ipaddress.ip_network(text, strict=False)
    return text


def _check_mode(text: str) -> str:
    try:
        value = int(text, 8)
    except ValueError:
        raise ValueError(f'{text!r} is not an octal file mode such as "0640"') from None
    if not 0 <= value <= 0o777:
        raise ValueError(f"{text!r} is not a file mode between 0000 and 0777")
    return text


AddressText = Annotated[str, AfterValidator(_check_address)]
NetworkText = Annotated[str, AfterValidator(_check_network)]
ModeText = Annotated[str, AfterValidator(_check_mode)]
Seconds = Annotated[float, Field(gt=0, le=86400 * 7)]


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class TLSSettings(_Frozen):
    """TLS on one TCP listener."""

    cert: str
    key: str
    ca: str | None = None
    require_client_cert: bool = False

    @model_validator(mode="after")
    def _ca_for_client_certs(self) -> TLSSettings:
        if self.require_client_cert and not self.ca:
            raise KeyedValueError(
                "require_client_cert needs ca (the CA that signs the client certificates)", ("require_client_cert",)
            )
        return self


class ListenerSettings(_Frozen):
    """One listening socket."""

    address: AddressText = "tcp://127.0.0.1:8888"
    ack: bool = False
    allow: tuple[NetworkText, ...] = ()
    tls: TLSSettings | None = None
    # unix:// only: the socket file's mode, owner and group (as systemd's SocketMode=, SocketUser=,
    # SocketGroup=), set by the daemon at bind, as root before it drops privileges. Unset: mode
    # 0666 (systemd's default: who may connect is then up to the folder), owner and group those
    # of the daemon at bind. Names or numeric ids; unknown names are refused at load.
    mode: ModeText | None = None
    owner: str | int | None = None
    group: str | int | None = None

    @property
    def parsed(self) -> Address:
        return parse_address(self.address)

    @property
    def socket_mode(self) -> int:
        """The mode of the unix socket file this listener creates."""
        return int(self.mode, 8) if self.mode is not None else 0o666

    @property
    def socket_uid(self) -> int:
        """The owner's uid for the unix socket file; -1: leave it."""
        return -1 if self.owner is None else self._uid(self.owner)

    @property
    def socket_gid(self) -> int:
        """The group's gid for the unix socket file; -1: leave it."""
        return -1 if self.group is None else self._gid(self.group)

    @staticmethod
    def _uid(value: str | int) -> int:
        if isinstance(value, int) or value.isdigit():
            return int(value)
        try:
            return pwd.getpwnam(value).pw_uid
        except KeyError:
            raise ValueError(f"no such user {value!r}") from None

    @staticmethod
    def _gid(value: str | int) -> int:
        if isinstance(value, int) or value.isdigit():
            return int(value)
        try:
            return grp.getgrnam(value).gr_gid
        except KeyError:
            raise ValueError(f"no such group {value!r}") from None

    @field_validator("owner", "group")
    @classmethod
    def _known_id(cls, value: str | int | None, info: ValidationInfo) -> str | int | None:
        if value is None:
            return value
        if isinstance(value, int) and not 0 <= value < (1 << 32) - 1:
            raise ValueError(f"{value} is not a {'user' if info.field_name == 'owner' else 'group'} id")
        if isinstance(value, str) and not value:
            raise ValueError("empty name")
        if info.field_name == "owner":
            cls._uid(value)
        else:
            cls._gid(value)
        return value

    @model_validator(mode="after")
    def _tcp_only_options(self) -> ListenerSettings:
        if self.address.startswith("unix://"):
            if self.tls is not None:
                raise KeyedValueError("tls: TLS is for tcp:// listeners, not unix:// ones", ("tls",))
            if self.allow:
                raise KeyedValueError("allow: allowed networks are for tcp:// listeners, not unix:// ones", ("allow",))
        else:
            for key in ("mode", "owner", "group"):
                if getattr(self, key) is not None:
                    raise KeyedValueError(
                        f"{key}: the socket file's {key} is for unix:// listeners, not tcp:// ones", (key,)
                    )
        return self


class LogSettings(_Frozen):
    """Where and how records are written."""

    path: str = "logs/messages.log"
    rejects_path: str = "logs/rejects.log"
    durability: Literal["write", "fsync"] = "write"
    fsync_max_wait: Annotated[float, Field(ge=0, le=10)] = 0.0
    rotate_bytes: Annotated[int, Field(ge=0)] = 0
    rotate_keep: Annotated[int, Field(ge=1, le=1000)] = 5
    # How much of the end of each log file stays in the page cache; older pages are written back
    # and dropped from it as the file grows (output.pagecache). 0: left to the kernel.
    cache_bytes: Annotated[int, Field(ge=0, le=1 << 40)] = 64 * 1024 * 1024
    file_mode: ModeText = "0640"
    reject_raw_bytes: Annotated[int, Field(ge=0, le=1 << 20)] = 1024
    # Reject lines per second per connection (burst: one second's worth); past it they are counted
    # and summed up in one "rejects_suppressed" line. 0: no limit.
    rejects_per_second: Annotated[float, Field(ge=0)] = 100.0


class RecordSettings(_Frozen):
    """The rules a record must pass."""

    max_user_chars: Annotated[int, Field(ge=1, le=1 << 20)] = 256
    max_msg_chars: Annotated[int, Field(ge=0, le=1 << 26)] = 65536
    extra: Literal["forbid", "ignore", "keep"] = "forbid"


class LimitSettings(_Frozen):
    """Limits on clients."""

    max_record_bytes: Annotated[int, Field(ge=64, le=1 << 28)] = 256 * 1024
    max_connections: Annotated[int, Field(ge=1, le=1_000_000)] = 10_000
    max_connections_per_client: Annotated[int, Field(ge=0, le=1_000_000)] = 0
    rate_limit: Annotated[float, Field(ge=0)] = 0.0
    idle_timeout: Seconds = 300.0
    queue_bytes: Annotated[int, Field(ge=1 << 16, le=1 << 34)] = 32 * 1024 * 1024
    # Unfinished lines, records read but not yet taken, and unsent answers, over all connections;
    # past it the connections holding the most are closed.
    buffer_bytes: Annotated[int, Field(ge=1 << 20, le=1 << 36)] = 64 * 1024 * 1024
    # A connection whose records are (nearly: 99 %) all refused is closed after this many. 0: never.
    refused_close_after: Annotated[int, Field(ge=0)] = 1000


def cpus_available() -> int:
    """The CPUs this process may run on (its affinity mask, not the machine's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


class ServerSettings(_Frozen):
    """The ingest processes, their I/O threads, and shutdown."""

    # Ingest processes (each validating and rendering on its own loops), around one process that
    # owns the files. "auto": the CPUs available to the daemon. 1: one process, no IPC.
    workers: int | Literal["auto"] = "auto"
    io_threads: Annotated[int, Field(ge=1, le=64)] = 1
    shutdown_timeout: Seconds = 10.0

    @field_validator("workers", mode="before")
    @classmethod
    def _workers(cls, value: object) -> object:
        if value == "auto" or (type(value) is int and 1 <= value <= 64):
            return value
        raise ValueError('a number of processes from 1 to 64, or "auto" (the CPUs available)')

    @property
    def worker_count(self) -> int:
        return cpus_available() if self.workers == "auto" else self.workers


class DaemonSettings(_Frozen):
    """The classic daemon (`nio-logd start`) and the daemon's own events."""

    pidfile: str = "nio-logd.pid"
    user: str | None = None
    group: str | None = None
    events: Literal["auto", "json", "console"] = "auto"
    events_level: Literal["debug", "info", "warning", "error"] = "info"
    # Where the detached daemon (`nio-logd start`) writes its events, which `run` sends to stderr.
    # None: "nio-logd.events.log" in the folder of [log] path.
    events_file: str | None = None


class MetricsSettings(_Frozen):
    """The optional Prometheus endpoint."""

    address: AddressText | None = None
    health_stall_seconds: Seconds = 10.0  # /healthz answers 503 after the writer is stuck this long
    # Each metrics connection costs a thread and an fd: hostile or stuck scrapers must not be able
    # to take every fd of the daemon (and with them its log clients).
    allow: tuple[NetworkText, ...] = ()  # if not empty, only these networks may scrape
    max_connections: Annotated[int, Field(ge=1, le=1024)] = 16  # past this, closed at once
    read_timeout: Seconds = 5.0  # a client must have sent its whole request within this


def _check_engine_url(text: str) -> str:
    scheme, sep, rest = text.partition("://")
    if not sep or scheme not in ("nats", "tls"):
        raise ValueError(f"{text!r}: expected nats://HOST:PORT or tls://HOST:PORT")
    hostport = rest.split("@")[-1].rstrip("/")
    host, colon, port = hostport.rpartition(":")
    if not colon:
        host, port = hostport, "4222"
    if not host.strip("[]"):
        raise ValueError(f"{text!r}: no host")
    if not port.isdigit() or not 0 < int(port) <= 65535:
        raise ValueError(f"{text!r}: port must be a number from 1 to 65535")
    return text


def _check_subject(text: str) -> str:
    tokens = text.split(".")
    if not text or any(not t or t in ("*", ">") or any(c.isspace() for c in t) for t in tokens):
        raise ValueError(f"{text!r}: a NATS subject of dot-separated tokens, without spaces or wildcards")
    return text


def _check_stream(text: str) -> str:
    if not text or any(c in text for c in " \t\r\n.*>/\\") or len(text) > 255:
        raise ValueError(f"{text!r}: a JetStream stream name, without spaces, '.', '*', '>', '/' or '\\'")
    return text


def _check_forward_name(text: str) -> str:
    if not text or len(text) > 64 or not all(c.isalnum() or c in "-_" for c in text):
        raise ValueError(f"{text!r}: letters, digits, '-' and '_' only (at most 64)")
    return text


EngineURL = Annotated[str, AfterValidator(_check_engine_url)]


class ForwardTLSSettings(_Frozen):
    """TLS to the engine: the CA that signs its certificate, our client certificate if it wants one."""

    ca: str | None = None
    cert: str | None = None
    key: str | None = None

    @model_validator(mode="after")
    def _pair(self) -> ForwardTLSSettings:
        if self.key is not None and self.cert is None:
            raise KeyedValueError("key needs cert (the client certificate it belongs to)", ("key",))
        return self


class ForwardSettings(_Frozen):
    """One ``[[forward]]`` table: accepted records forwarded, at least once, to a NATS JetStream stream."""

    kind: Literal["nats"] = "nats"
    # Unique across the tables: it names the cursor file and the metrics' ``forward`` label.
    # Default: the stream and the subject ("LOGS-logs.nio" -> "LOGS-logs_nio").
    name: Annotated[str, AfterValidator(_check_forward_name)] | None = None
    servers: Annotated[tuple[EngineURL, ...], Field(min_length=1)] = ("nats://127.0.0.1:4222",)
    subject: Annotated[str, AfterValidator(_check_subject)] = "logs.nio"
    stream: Annotated[str, AfterValidator(_check_stream)] = "LOGS"
    # Credentials: user + password, or a token, or a .creds file (JWT + NKey; needs the nkeys package).
    user: str | None = None
    password: SecretStr | None = None  # shown as ******** by check-config
    token: SecretStr | None = None
    creds: str | None = None
    tls: ForwardTLSSettings | None = None
    # Written with each record as "host"; None: this machine's name (socket.gethostname()).
    host: str | None = None
    # Messages published and not yet acknowledged, at most; and bytes read from the log at a time.
    max_in_flight: Annotated[int, Field(ge=1, le=65536)] = 4096
    batch_bytes: Annotated[int, Field(ge=1 << 12, le=64 << 20)] = 1 << 20
    ack_timeout: Seconds = 5.0  # a publish not acknowledged within this is sent again (same id)
    cursor: str | None = None  # None: "<[log] path>.forward-<name>.cursor"
    cursor_interval: Annotated[float, Field(ge=0, le=60)] = 0.5  # the cursor is replaced at most this often
    # Where a forwarder without a cursor begins: the start of the current messages log, or its end.
    start: Literal["beginning", "end"] = "beginning"
    # /healthz degrades once the records not yet acknowledged are more than lag_bytes bytes, or the
    # oldest of them has waited more than lag_seconds. 0: that check is off.
    lag_bytes: Annotated[int, Field(ge=0)] = 256 << 20
    lag_seconds: Annotated[float, Field(ge=0)] = 300.0
    # true: a client's {"ok": true} waits until this engine has acknowledged the record.
    ack_after: bool = False

    @model_validator(mode="after")
    def _credentials(self) -> ForwardSettings:
        if (self.user is None) != (self.password is None):
            raise KeyedValueError("user and password go together", ("user",), ("password",))
        given = [k for k in ("user", "token", "creds") if getattr(self, k) is not None]
        if len(given) > 1:
            raise KeyedValueError(
                f"{' and '.join(given)}: give one kind of credentials (user/password, token or creds)",
                *((k,) for k in reversed(given)),
            )
        if self.tls is not None and any(u.startswith("nats://") for u in self.servers):
            # nats-py upgrades nats:// to TLS when a context is given; say it in the config instead.
            raise KeyedValueError("tls: write the servers as tls://HOST:PORT when [forward.tls] is set", ("tls",))
        if self.host is not None and (not self.host or any(ord(c) < 32 for c in self.host)):
            raise KeyedValueError("host: a non-empty name without control characters", ("host",))
        return self

    @property
    def label(self) -> str:
        """The table's name: given, or derived from the stream and the subject."""
        if self.name is not None:
            return self.name
        return "".join(c if c.isalnum() or c in "-_" else "_" for c in f"{self.stream}-{self.subject}")[:64]


def _default_listeners() -> tuple[ListenerSettings, ...]:
    return (ListenerSettings(),)


class Settings(_Frozen):
    """The whole configuration; relative paths are resolved against ``base_dir``."""

    listeners: Annotated[tuple[ListenerSettings, ...], Field(min_length=1)] = Field(default_factory=_default_listeners)
    log: LogSettings = LogSettings()
    record: RecordSettings = RecordSettings()
    limits: LimitSettings = LimitSettings()
    server: ServerSettings = ServerSettings()
    daemon: DaemonSettings = DaemonSettings()
    metrics: MetricsSettings = MetricsSettings()
    forward: tuple[ForwardSettings, ...] = ()
    # Not a TOML key: the folder relative paths resolve against, and where the settings came from.
    base_dir: str = "."
    source: str = "built-in defaults"

    def resolve(self, path: str) -> Path:
        """An absolute path for a configured path (relative ones against ``base_dir``)."""
        full = Path(self.base_dir) / path
        if full.name in ("", ".", ".."):
            return full.resolve()
        # The folder is resolved, the file name is not: a symlink planted at a log path must
        # reach the daemon's O_NOFOLLOW open as a link (and be refused), not as its target.
        return full.parent.resolve() / full.name

    @property
    def file_mode(self) -> int:
        return int(self.log.file_mode, 8)

    @model_validator(mode="after")
    def _no_clashes(self) -> Settings:
        """Combinations that cannot work: two listeners on one address (the second bind fails),
        accepted and refused records mixed in one file."""
        seen: dict[str, int] = {}
        for i, ls in enumerate(self.listeners):
            addr = ls.parsed
            if addr.scheme == "unix":
                key = f"unix://{self.resolve(addr.path)}"
            elif addr.port == 0:
                continue  # each gets a port of its own
            else:
                key = str(addr)
            if key in seen:
                raise KeyedValueError(
                    f"listeners.{seen[key]} and listeners.{i} are both {ls.address}: give each its own address",
                    ("listeners", i, "address"),
                    ("listeners", i),
                )
            seen[key] = i
        if self.resolve(self.log.path) == self.resolve(self.log.rejects_path):
            raise KeyedValueError(
                f"log.path and log.rejects_path are the same file ({self.log.path}): "
                "accepted and refused records would be mixed; give the rejects their own file",
                ("log", "rejects_path"),
                ("log", "path"),
            )
        return self

    @model_validator(mode="after")
    def _distinct_forwards(self) -> Settings:
        seen: set[str] = set()
        for i, table in enumerate(self.forward):
            if table.label in seen:
                raise KeyedValueError(
                    f"forward: two tables are named {table.label!r}; give each a distinct name",
                    ("forward", i, "name"),
                    ("forward", i),
                )
            seen.add(table.label)
        return self

    def forward_cursor(self, table: ForwardSettings) -> Path:
        """Where a ``[[forward]]`` table keeps its cursor."""
        if table.cursor is not None:
            return self.resolve(table.cursor)
        log_path = self.resolve(self.log.path)
        return log_path.parent / f"{log_path.name}.forward-{table.label}.cursor"


Key = tomlpos.Key


class _Read:
    """One config file as read: its text, its own keys, and where its arrays of tables begin in
    the merged config (``{"listeners": 2}``: its first ``[[listeners]]`` is ``listeners.2`` there)."""

    def __init__(self, path: Path, text: str, data: dict[str, Any]) -> None:
        self.path = path
        self.text = text
        self.data = data
        self.shifts: dict[str, int] = {}
        self._entries: dict[Key, tomlpos.Entry] | None = None
        self._indexed = False

    def line_of(self, key: Key, *, missing: bool = False) -> int | None:
        """The line of ``key`` (this file's own numbering of its arrays) in this file, or None."""
        if not self._indexed:
            self._entries, self._indexed = tomlpos.index(self.text), True
        return tomlpos.find(self._entries, key, missing=missing)

    def local(self, key: Key) -> Key:
        """``key`` of the merged config as this file numbers it (negative: not one of its items)."""
        out: list[str | int] = []
        for j, part in enumerate(key):
            shift = self.shifts.get(".".join(str(p) for p in key[:j]), 0) if isinstance(part, int) else 0
            out.append(part - shift if isinstance(part, int) else part)
        return tuple(out)

    def depth(self, key: Key) -> int:
        """How many leading parts of ``key`` (this file's numbering) this file sets."""
        value: Any = self.data
        for n, part in enumerate(key):
            in_table = isinstance(value, dict) and isinstance(part, str) and part in value
            in_array = isinstance(value, list) and isinstance(part, int) and 0 <= part < len(value)
            if not (in_table or in_array):
                return n
            value = value[part]
        return len(key)


def at(path: Path | str, line: int | None) -> str:
    """The location that starts a config error: ``FILE:LINE`` (``FILE`` when the line is unknown)."""
    return f"{path}:{line}" if line is not None else str(path)


def _where(reads: list[_Read], key: Key) -> tuple[_Read, Key, int] | None:
    """The file that set the most of ``key`` (the last one, as it wins the merge), ``key`` as that
    file numbers it and how much of it is there; None if no file has any of it."""
    best: tuple[_Read, Key, int] | None = None
    for read in reversed(reads):
        local = read.local(key)
        depth = read.depth(local)
        if depth and (best is None or depth > best[2]):
            best = (read, local, depth)
    return best


def _locate(
    reads: list[_Read], loc: Key, keys: tuple[Key, ...] = (), *, missing: bool = False
) -> tuple[int, int | None]:
    """The file (its place among ``reads``) and line for an error at ``loc`` (about its ``keys``,
    the first one set, if any); the line is None when it is not known."""
    for key in keys:
        found = _where(reads, (*loc, *key))
        if found is not None and found[2] == len(loc) + len(key):
            read, local, _ = found
            return reads.index(read), read.line_of(local)
    found = _where(reads, loc)
    if found is None:
        return 0, None
    read, local, _ = found
    return reads.index(read), read.line_of(local, missing=missing)


def _format_error(reads: list[_Read], exc: ValidationError) -> str:
    """Each error as ``FILE:LINE: key: problem`` (the file that set the key, the line it is on),
    in the order of the files and lines (not pydantic's, which changes between its versions),
    joined by "; "."""
    parts: list[tuple[tuple[int, int], str]] = []
    errors = exc.errors(include_url=False, include_input=False)
    failed_items = {err["loc"][:-1] for err in errors if len(err["loc"]) > 1}
    for err in errors:
        if err["type"] == "too_short" and any(loc[: len(err["loc"])] == err["loc"] for loc in failed_items):
            continue  # "at least 1 item ... not 0" only because an item above failed: said once
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"]
        keys: tuple[Key, ...] = ()
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif err["type"] == "value_error":
            msg = msg.removeprefix("Value error, ")  # our own validators' text, as written
            cause = err.get("ctx", {}).get("error")
            if isinstance(cause, KeyedValueError):
                keys = cause.keys
        index, line = _locate(reads, tuple(err["loc"]), keys, missing=err["type"] == "missing")
        where = at(reads[index].path, line)
        # A check of the whole config (no loc): its text names the keys.
        whole = not err["loc"] and err["type"] == "value_error"
        parts.append(((index, line or 0), f"{where}: {msg}" if whole else f"{where}: {loc}: {msg}"))
    return "; ".join(text for _order, text in sorted(parts, key=lambda part: part[0]))


def _no_dates(value: object) -> dict[str, str]:
    # TOML dates and times are valid TOML, but no key takes one: an object fails every key's type.
    return {"toml_date": str(value)}


def find_config(explicit: str | None) -> Path | None:
    """The config file to use: --config, then $NIO_LOGD_CONFIG, then /etc; None for defaults."""
    if explicit:
        return Path(explicit)
    env = os.environ.get(ENV_CONFIG)
    if env:
        return Path(env)
    if DEFAULT_SYSTEM_CONFIG.exists():
        return DEFAULT_SYSTEM_CONFIG
    return None


def load_settings(explicit: str | None = None) -> Settings:
    """Find, read and validate the configuration; raise ConfigError naming file, key and problem."""
    path = find_config(explicit)
    if path is None:
        return Settings(base_dir=str(Path.cwd()))
    return load_file(path)


# A real config is a few KiB. The cap keeps an endless or huge file (/dev/zero, a log given by
# mistake) from being read into memory and handed to the parser.
MAX_CONFIG_BYTES = 1 << 20
# The deepest a valid config goes is 3 (listeners, a listener's table, its allow list); anything
# far deeper is hostile, and would exhaust the recursion of json or pydantic's JSON parser.
_MAX_NESTING = 32

_FILE_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def _not_regular(path: Path, mode: int) -> ConfigError:
    kind = next((name for test, name in _FILE_KINDS if test(mode)), f"file type {stat.S_IFMT(mode):o}")
    return ConfigError(f"{path}: not a regular file ({kind})")


def _read_config_bytes(path: Path) -> bytes:
    """The file's bytes, refusing anything that is not a regular file of at most MAX_CONFIG_BYTES."""
    try:
        # O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer for ever.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        try:
            mode = os.stat(path).st_mode
        except OSError:
            mode = stat.S_IFREG
        if not stat.S_ISREG(mode):  # a Unix socket cannot be opened at all (ENXIO): say what it is
            raise _not_regular(path, mode) from None
        raise ConfigError(f"{path}: cannot read config file: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _not_regular(path, st.st_mode)
        too_large = ConfigError(f"{path}: larger than the {MAX_CONFIG_BYTES >> 20} MiB limit for a config file")
        if st.st_size > MAX_CONFIG_BYTES:
            raise too_large
        chunks: list[bytes] = []
        total = 0
        # At most one byte past the cap: a file growing while it is read is refused all the same.
        while chunk := os.read(fd, MAX_CONFIG_BYTES + 1 - total):
            chunks.append(chunk)
            total += len(chunk)
            if total > MAX_CONFIG_BYTES:
                raise too_large
        return b"".join(chunks)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc.strerror}") from None
    finally:
        os.close(fd)


def _too_deep(data: dict[str, Any]) -> Key | None:
    """The key of the first value nested deeper than _MAX_NESTING, or None (iterative: no recursion)."""
    stack: list[tuple[object, int, Key]] = [(data, 0, ())]
    while stack:
        value, depth, key = stack.pop()
        if depth > _MAX_NESTING:
            return key
        if isinstance(value, dict):
            stack.extend((v, depth + 1, (*key, str(k))) for k, v in value.items())
        elif isinstance(value, list):
            # Indices only for tables (listeners.0); "log.path" names a pile of nested arrays better
            # than "log.path.0.0.0...".
            stack.extend((v, depth + 1, (*key, i) if isinstance(v, dict) else key) for i, v in enumerate(value))
    return None


DROP_IN_DIR = "conf.d"
MAX_DROP_INS = 256


def drop_ins(path: Path) -> list[Path]:
    """The drop-in files of the config file ``path``: ``conf.d/*.toml`` in its folder, by name."""
    folder = path.absolute().parent / DROP_IN_DIR
    try:
        names = sorted(entry.name for entry in os.scandir(folder) if entry.name.endswith(".toml"))
    except FileNotFoundError:
        return []
    except NotADirectoryError:
        raise ConfigError(f"{folder}: not a directory (drop-in files go in a folder of that name)") from None
    except OSError as exc:
        raise ConfigError(f"{folder}: cannot list the drop-in folder: {exc.strerror}") from None
    if len(names) > MAX_DROP_INS:
        raise ConfigError(f"{folder}: {len(names)} drop-in files, more than the {MAX_DROP_INS} allowed")
    return [folder / name for name in names]


def config_files(path: Path) -> list[Path]:
    """The main config file and its drop-ins, in the order they are merged."""
    return [path, *drop_ins(path)]


def _parse(path: Path) -> _Read:
    raw = _read_config_bytes(path)
    try:
        text = raw.decode("utf-8")
        data: dict[str, Any] = tomllib.loads(text)
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise ConfigError(f"{at(path, line)}: not UTF-8 text (byte {exc.start})") from None
    except tomllib.TOMLDecodeError as exc:
        # "Invalid value (at line 2, column 5)": said as FILE:2: invalid TOML: Invalid value (column 5)
        syntax = tomlpos.syntax_error(str(exc))
        if syntax is None:
            raise ConfigError(f"{path}: invalid TOML: {exc}") from None
        raise ConfigError(f"{at(path, syntax[0])}: invalid TOML: {syntax[1]}") from None
    except RecursionError:  # tomllib recurses once per level of nested arrays and inline tables
        raise ConfigError(f"{path}: invalid TOML: arrays or inline tables nested too deeply") from None
    except MemoryError:
        raise ConfigError(f"{path}: invalid TOML: too large to parse") from None
    read = _Read(path, text, data)
    deep = _too_deep(data)
    if deep is not None:
        name = ".".join(str(p) for p in deep) or "(top level)"
        where = at(path, read.line_of(deep))
        raise ConfigError(f"{where}: {name}: nested too deeply (more than {_MAX_NESTING} levels)")
    for reserved in ("base_dir", "source"):
        if reserved in data:
            raise ConfigError(f"{at(path, read.line_of((reserved,)))}: {reserved}: unknown key")
    return read


def _merge(
    into: dict[str, Any],
    data: dict[str, Any],
    origin: str,
    origins: dict[str, str],
    *,
    shifts: dict[str, int],
    prefix: str = "",
) -> None:
    """A drop-in over what came before: a table merges key by key, an array of tables
    (``[[listeners]]``, ``[[forward]]``) grows, any other value replaces the one before.
    ``shifts``: for each array of tables that grew, the index of the drop-in's first item."""
    for key, value in data.items():
        name = f"{prefix}{key}"
        mine = into.get(key)
        if isinstance(value, dict) and isinstance(mine, dict):
            _merge(mine, value, origin, origins, shifts=shifts, prefix=f"{name}.")
            continue
        if isinstance(value, list) and isinstance(mine, list) and all(isinstance(v, dict) for v in value + mine):
            start = len(mine)
            shifts[name] = start
            mine.extend(value)
            for i, item in enumerate(value, start):
                _note(origins, item, origin, f"{name}.{i}.")
            continue
        into[key] = value
        for old in [k for k in origins if k == name or k.startswith(f"{name}.")]:
            del origins[old]
        if isinstance(value, dict):
            _note(origins, value, origin, f"{name}.")
        else:
            origins[name] = origin


def _note(origins: dict[str, str], data: Any, origin: str, prefix: str = "") -> None:
    if isinstance(data, dict):
        for key, value in data.items():
            _note(origins, value, origin, f"{prefix}{key}.")
    elif isinstance(data, list) and data and all(isinstance(v, dict) for v in data):
        for i, item in enumerate(data):
            _note(origins, item, origin, f"{prefix}{i}.")
    else:
        origins[prefix.rstrip(".")] = origin


def _merged(path: Path) -> tuple[dict[str, Any], dict[str, str], list[_Read]]:
    """The main file and its drop-ins merged, which file set each key (dotted names), and each
    file as read (for the lines of its keys)."""
    main = _parse(path)
    reads = [main]
    data = copy.deepcopy(main.data)  # the merge changes it in place; each file's own keys are kept
    origins: dict[str, str] = {}
    _note(origins, data, str(path))
    for extra in drop_ins(path):
        read = _parse(extra)
        reads.append(read)
        _merge(data, copy.deepcopy(read.data), str(extra), origins, shifts=read.shifts)
    return data, origins, reads


def key_sources(path: Path) -> dict[str, str]:
    """``{"log.path": "/etc/nio-logd/conf.d/10-paths.toml", ...}``: the file that set each key."""
    return _merged(path)[1]


def key_location(path: Path, key: Key) -> str | None:
    """``FILE:LINE`` of a key of the merged config ``path`` (``("daemon", "user")``): the file that
    set it and its line there; None when no file sets it (or its line is not known)."""
    found = _where(_merged(path)[2], key)
    if found is None or found[2] != len(key):
        return None
    read, local, _ = found
    line = read.line_of(local)
    return None if line is None else at(read.path, line)


def load_file(path: Path) -> Settings:
    """Read and validate one TOML file, and the drop-ins of its ``conf.d`` folder merged over it
    (relative paths in a drop-in resolve against the main file's folder, as in the main file)."""
    data, _, reads = _merged(path)
    base_dir = str(path.resolve().parent)
    try:
        # Validated in JSON mode: strict types, yet TOML arrays become tuples and integers floats.
        document = json.dumps({**data, "base_dir": base_dir, "source": str(path)}, default=_no_dates)
        return Settings.model_validate_json(document)
    except ValidationError as exc:
        raise ConfigError(_format_error(reads, exc)) from None
    except (RecursionError, MemoryError):  # _too_deep bounds the nesting; this is the last guard
        raise ConfigError(f"{path}: nested too deeply or too large to validate") from None
