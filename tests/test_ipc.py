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
        assert type(got_messages) is bytearray and len(got_messages) == len(messages)
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
