"""The channel between a worker and the hub (``service/ipc.py``) over a real socket pair."""

from __future__ import annotations

import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nio_logd.output.writer import Batch
from nio_logd.service import ipc


@settings(max_examples=50, deadline=None)
@given(messages=st.binary(max_size=5000), rejects=st.binary(max_size=5000), accepted=st.integers(0, 1000))
def test_a_batch_arrives_whole_with_its_messages_and_rejects_in_buffers_of_their_own(
    messages: bytes, rejects: bytes, accepted: int
) -> None:
    """What the worker's ``RemoteWriter.submit`` sends, the hub reads back: the same counts and
    bytes, the messages in a buffer holding them alone (the copytruncate journal keeps it: a view
    into the whole message would keep the rejects alive too)."""
    hub, worker = ipc.channel_pair()
    try:
        remote = ipc.RemoteWriter(worker, credit=1 << 30)
        sender = threading.Thread(
            target=remote.submit, args=(Batch(None, messages, accepted, rejects=rejects, refused=3),)
        )
        sender.start()
        kind, size = ipc.recv_head(hub)
        assert kind == ipc.BATCH
        seq, got_accepted, refused, got_messages, got_rejects = ipc.recv_batch(hub, size)
        sender.join(10)
        assert (seq, got_accepted, refused) == (1, accepted, 3)
        assert got_messages == messages and got_rejects == rejects
        assert type(got_messages) is bytes and len(got_messages) == len(messages)
    finally:
        hub.close()
        worker.close()


@pytest.mark.parametrize(("size", "n"), [(ipc.BATCH_HEAD.size - 1, 0), (ipc.BATCH_HEAD.size + 10, 11)])
def test_a_batch_that_breaks_the_protocol_closes_the_channel(size: int, n: int) -> None:
    hub, worker = ipc.channel_pair()
    try:
        worker.sendall(ipc.BATCH_HEAD.pack(1, 0, 0, n)[:size] + b"x" * max(0, size - ipc.BATCH_HEAD.size))
        with pytest.raises(ipc.ChannelClosed):
            ipc.recv_batch(hub, size)
    finally:
        hub.close()
        worker.close()


class _Owner:
    """A loop's side of a batch: what comes back once the hub has written it."""

    def __init__(self) -> None:
        self.done: list[Batch] = []

    def batch_done(self, batch: Batch) -> None:
        self.done.append(batch)

    def resume_reading(self) -> None:
        pass


def test_a_sent_batch_waits_for_done_with_its_acks_and_size_not_its_lines() -> None:
    """Once sent, a batch's lines are the hub's: the worker keeps its acks and its size (its credit
    still counts it until DONE) but not a second copy of the bytes."""
    hub, worker = ipc.channel_pair()
    try:
        remote = ipc.RemoteWriter(worker, credit=1 << 30)
        owner = _Owner()
        lines = b'{"event":"message"}\n' * 5000
        acks = {"a connection": [b'{"seq":1,"ok":true}\n']}
        batch = Batch(owner, bytearray(lines), 5000, rejects=b"refused\n", refused=1, acks=acks, answer_bytes=20)
        size = batch.nbytes
        sender = threading.Thread(target=remote.submit, args=(batch,))
        sender.start()
        kind, payload = ipc.recv_head(hub)
        _seq, _accepted, _refused, got_messages, got_rejects = ipc.recv_batch(hub, payload)
        sender.join(10)
        assert got_messages == lines and got_rejects == b"refused\n"
        assert batch.messages == b"" and batch.rejects == b""
        assert batch.nbytes == size and remote.depth == size
        remote.written(1)
        assert owner.done == [batch] and owner.done[0].acks == acks and remote.depth == 0
    finally:
        hub.close()
        worker.close()


@pytest.mark.parametrize("cut", [1, 4096, 99_999])
def test_a_message_that_arrives_in_pieces_is_read_whole(cut: int) -> None:
    """``recv_exact`` asks for the whole message at once; when the kernel gives less (here: a
    socket with a timeout, non-blocking underneath, and the rest sent a moment later), it reads
    the rest into place: the same bytes, in a buffer of their own."""
    hub, worker = ipc.channel_pair()
    payload = bytes(range(256)) * 400  # 102,400 bytes
    try:
        hub.settimeout(10)
        first_read = threading.Event()

        def send_in_two() -> None:
            worker.sendall(payload[:cut])
            first_read.wait(0.2)  # the reader takes the first piece alone, as a rule
            worker.sendall(payload[cut:])

        sender = threading.Thread(target=send_in_two)
        sender.start()
        got = ipc.recv_exact(hub, len(payload))
        first_read.set()
        sender.join(10)
        assert got == payload and type(got) is bytes
    finally:
        hub.close()
        worker.close()


def test_a_channel_that_ends_inside_a_message_is_closed() -> None:
    hub, worker = ipc.channel_pair()
    try:
        worker.sendall(b"x" * 1000)
        worker.close()
        with pytest.raises(ipc.ChannelClosed):
            ipc.recv_exact(hub, 5000)
    finally:
        hub.close()
