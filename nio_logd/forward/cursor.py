"""The forwarder's persisted cursor: which file, how far, how many records, replaced atomically.

design: the cursor names the file by identity (st_dev, st_ino), not by name, since rotation
renames it; ``offset`` is where the first record not yet acknowledged by the engine begins, and
``seq`` how many records the forwarder has forwarded before it (since ``epoch``, a random id
drawn when the cursor is first created). A record's message id is built from the host, the epoch
and its seq, so a restart that reads the same lines again sends the same ids, while a cursor that
is lost (a new epoch) can never make JetStream drop new records as duplicates of old ones.
``check`` is a digest of the bytes just before ``offset``: a file truncated and grown past the
offset again (copytruncate while the daemon was down) is recognised as not the same content.

The file is written whole to a temporary name, fsynced, renamed over the cursor and the folder
fsynced: after a crash it is the old cursor or the new one, never a mix.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from dataclasses import dataclass, replace
from pathlib import Path

import orjson

VERSION = 1
CHECK_BYTES = 64  # the bytes before the offset that ``check`` digests


def digest(data: bytes) -> str:
    """The check of the bytes just before a position (the last CHECK_BYTES of ``data``)."""
    return hashlib.blake2b(data[-CHECK_BYTES:], digest_size=8).hexdigest()


@dataclass(frozen=True, slots=True)
class Cursor:
    """A position in the messages log: the file, the offset in it, the records before it."""

    epoch: str
    dev: int
    ino: int
    offset: int
    seq: int
    check: str = ""  # digest() of the bytes before offset ("" at offset 0)

    @classmethod
    def new(cls, dev: int, ino: int, offset: int = 0, check: str = "") -> Cursor:
        return cls(secrets.token_hex(6), dev, ino, offset, 0, check)

    @property
    def ident(self) -> tuple[int, int]:
        return (self.dev, self.ino)

    def moved(self, dev: int, ino: int, offset: int, seq: int, check: str) -> Cursor:
        return replace(self, dev=dev, ino=ino, offset=offset, seq=seq, check=check)

    def to_bytes(self) -> bytes:
        return orjson.dumps(
            {
                "version": VERSION,
                "epoch": self.epoch,
                "dev": self.dev,
                "ino": self.ino,
                "offset": self.offset,
                "seq": self.seq,
                "check": self.check,
            }
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> Cursor:
        """Parse a cursor file; ValueError saying what is wrong."""
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            raise ValueError(f"not JSON: {exc}") from None
        if not isinstance(obj, dict) or obj.get("version") != VERSION:
            raise ValueError(f"not a version {VERSION} cursor")
        epoch, check = obj.get("epoch"), obj.get("check", "")
        numbers = [obj.get(k) for k in ("dev", "ino", "offset", "seq")]
        if not isinstance(epoch, str) or not epoch or not isinstance(check, str):
            raise ValueError("epoch or check missing")
        if not all(type(n) is int and n >= 0 for n in numbers):
            raise ValueError("dev, ino, offset and seq must be numbers >= 0")
        dev, ino, offset, seq = numbers
        assert isinstance(dev, int) and isinstance(ino, int) and isinstance(offset, int) and isinstance(seq, int)
        return cls(epoch, dev, ino, offset, seq, check)


def load(path: Path) -> Cursor | None:
    """The cursor stored at ``path``; None if there is none; ValueError if it is unreadable."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ValueError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        return Cursor.from_bytes(data)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None


def store(path: Path, cursor: Cursor) -> None:
    """Replace the cursor at ``path`` atomically and durably (raises OSError)."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o640)
    try:
        data = cursor.to_bytes() + b"\n"
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    folder = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)
