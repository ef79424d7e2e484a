"""The record pipeline: the frames of one pass in; rendered lines, answers and counts out.

design: sans-I/O, like the framer. The I/O loop collects the frames each connection delivered in
a pass and hands them to ``take`` with the connection's ``Stream`` (its origin and per-connection
state: peer, listener, client subject, ack sequence, reject rate, refusal window, answers owed);
at the end of the pass ``outcome()`` gives the messages bytes, the rejects bytes, each stream's
answers in order (an item may hold the lines of many records), and the pass's ``RecordCounts``.
No sockets, no threads, no clock of its own (the loop passes ``now``): ``run`` does a whole pass
at once, and the tests compare it with a one-record-at-a-time reference.

Per record: validate (pydantic-core, from the JSON bytes), render (the structlog processor
chain), answer (on ack listeners). Per connection, bounds that count what a refusal costs rather
than what arrived: reject lines at most ``rejects_per_second`` (the rest counted and summed up in
one ``rejects_suppressed`` line), a stream closed once ``refused_close_after`` of its records
were 99 % refused, and no more frames taken once it owes ``answer_limit`` bytes of answers (the
caller holds the rest and does not read the connection).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import orjson

from ..stats import RecordCounts
from .record import Fields, Frame, Refusal
from .render import Renderer

ACK_CHUNK = 256  # frames validated at a time on an ack listener


class Stream:
    """One connection as the pipeline sees it: where its records come from, and their state."""

    __slots__ = (
        "ack",
        "client",
        "closing",
        "credentials",
        "listener_name",
        "owed",
        "peer",
        "refused",
        "reject_at",
        "reject_tokens",
        "seq",
        "suppressed",
        "window_refused",
        "window_seq",
    )

    def __init__(
        self,
        peer: str,
        listener_name: str,
        *,
        ack: bool,
        client: str | None = None,
        credentials: tuple[int, int, int] | None = None,
        reject_tokens: float = 0.0,
        now: float = 0.0,
    ) -> None:
        self.peer = peer
        self.listener_name = listener_name
        self.ack = ack
        self.client = client  # TLS: the client certificate's subject, written with each record
        # Unix sockets: the peer's pid, uid and gid (SO_PEERCRED), written with each record
        self.credentials = credentials
        self.seq = 0  # records seen, numbered from 1 in answers
        self.owed = 0  # answer bytes made and not yet sent (the caller subtracts what it sends)
        self.refused = 0
        self.window_seq = 0  # refused_close_after: where the current window of records began
        self.window_refused = 0
        self.reject_tokens = reject_tokens  # reject lines this stream may have written now
        self.reject_at = now
        self.suppressed = 0  # reject lines left out since the last one written
        self.closing = False  # nearly every record refused: the caller closes the connection

    def __repr__(self) -> str:
        return f"<Stream {self.peer} on {self.listener_name} seq={self.seq}>"


@dataclass(slots=True)
class Outcome:
    """What one pass produced."""

    messages: bytearray
    accepted: int  # lines in messages
    rejects: bytearray
    reject_lines: int  # lines in rejects that stand for one refused record each
    answers: dict[Any, list[bytes]]  # stream -> its answers, in order (an item may hold many lines)
    answer_bytes: int
    counts: RecordCounts
    closing: list[Any] = field(default_factory=list)  # streams to close (refused_close_after)
    taken: list[int] = field(default_factory=list)  # with run(): frames taken per intake


_OK_BETWEEN: Final = b',"ok":true}\n{"seq":'


def ok_answers(first: int, count: int) -> bytes:
    """The answers ``{"seq":N,"ok":true}`` for ``count`` records from ``first`` on, one per line.

    One C pass instead of a formatting per record: orjson writes the numbers as ``[a,b,c]`` (only
    digits and commas), and each comma becomes the end of one answer and the start of the next.
    """
    numbers = orjson.dumps(list(range(first, first + count)))
    return b'{"seq":' + numbers[1:-1].replace(b",", _OK_BETWEEN) + b',"ok":true}\n'


def nack(seq: int, refusal: Refusal) -> bytes:
    """The answer line for a refused record."""
    return (
        orjson.dumps(
            {"seq": seq, "ok": False, "error": refusal.message, "reason": refusal.reason, "detail": refusal.errors}
        )
        + b"\n"
    )


class Pipeline:
    """Validation, rendering and answers for the records of one loop (one pass at a time)."""

    __slots__ = (
        "_answer_bytes",
        "_answers",
        "_closing",
        "_counts",
        "answer_limit",
        "refused_close_after",
        "rejects_burst",
        "rejects_rate",
        "renderer",
        "validate_batch",
    )

    def __init__(
        self,
        validate_batch: Callable[[list[Frame]], tuple[list[Fields | Refusal], bytes | None]],
        renderer: Renderer,
        *,
        rejects_per_second: float = 0.0,
        refused_close_after: int = 0,
        answer_limit: int = 1 << 62,
    ) -> None:
        self.validate_batch = validate_batch
        self.renderer = renderer
        self.answer_limit = answer_limit
        self.refused_close_after = refused_close_after
        self.rejects_rate = rejects_per_second
        self.rejects_burst = max(1.0, rejects_per_second)
        self._answers: dict[Any, list[bytes]] = {}
        self._answer_bytes = 0
        self._counts = RecordCounts()
        self._closing: list[Any] = []

    def __repr__(self) -> str:
        return f"<Pipeline {self.nbytes} bytes this pass, {len(self._answers)} streams answered>"

    def apply(
        self, validate_batch: Callable[[list[Frame]], tuple[list[Fields | Refusal], bytes | None]], raw_limit: int
    ) -> None:
        """Reloaded record rules and reject size: from the next record on."""
        self.validate_batch = validate_batch
        self.renderer.raw_limit = raw_limit

    @property
    def nbytes(self) -> int:
        """Bytes this pass has made so far: lines and answers."""
        return self.renderer.nbytes + self._answer_bytes

    def pending(self, stream: Any) -> bool:
        """Whether this pass holds answers for ``stream`` that ``outcome()`` has not given out."""
        return stream in self._answers

    def forget(self, stream: Any) -> None:
        """``stream``'s connection closed: its answers of this pass go nowhere."""
        answers = self._answers.pop(stream, None)
        if answers:
            self._answer_bytes -= sum(map(len, answers))

    def new_stream(self, peer: str, listener_name: str, *, ack: bool, now: float) -> Stream:
        return Stream(peer, listener_name, ack=ack, reject_tokens=self.rejects_burst, now=now)

    # -- per pass -------------------------------------------------------------------------------
    def run(self, intake: Iterable[tuple[Stream, list[Frame]]], now: float) -> Outcome:
        """A whole pass at once: every stream's frames in, the outcome out."""
        self.new_pass()
        taken = [self.take(stream, frames, now) for stream, frames in intake]
        out = self.outcome()
        out.taken = taken
        return out

    def new_pass(self) -> None:
        """A read pass begins: its accepted lines share one timestamp, taken at its first record."""
        self.renderer.new_pass()

    def take(self, stream: Stream, frames: list[Frame], now: float) -> int:
        """Validate, render and answer ``frames`` of ``stream``; how many were taken.

        Fewer than all when the stream owes ``answer_limit`` answer bytes (the caller keeps the
        rest for later) or was found to send nearly nothing but refused records (``closing``).
        Validation is one call per read (``validate_batch``); on an ack listener, per chunk of
        ``ACK_CHUNK`` frames, so that frames held back for want of answer room are not validated
        in vain. A plain run (every record accepted, the three fields alone) is rendered in one
        call (``Renderer.splice``), and its answers made as one item.
        """
        renderer = self.renderer
        # One timestamp for the pass (new_pass; outcome() ends a pass too): each accepted line is
        # a constant head, the record's fields serialised alone, and a constant tail
        # (render.Renderer.frame).
        head, tail = renderer.frame(stream.peer, stream.listener_name, stream.client, stream.credentials)
        lines = renderer.messages
        dumps = orjson.dumps
        seq = stream.seq
        accepted = 0
        taken = 0
        if stream.ack:
            answers = self._answers.get(stream)
            if answers is None:
                answers = self._answers[stream] = []
            owed = stream.owed
            limit = self.answer_limit
            done = False
            for start in range(0, len(frames), ACK_CHUNK):
                if owed >= limit:
                    break
                results, body = self.validate_batch(frames[start : start + ACK_CHUNK])
                if body is not None:
                    run = ok_answers(seq + 1, len(results))
                    last = len(b'{"seq":%d,"ok":true}\n' % (seq + len(results)))
                    if owed + len(run) - last < limit:  # room for the last one: for all
                        renderer.splice(body, head, tail)
                        answers.append(run)
                        owed += len(run)
                        seq += len(results)
                        taken += len(results)
                        accepted += len(results)
                        continue
                for result in results:
                    if owed >= limit:
                        done = True
                        break
                    taken += 1
                    seq += 1
                    if type(result) is dict:
                        lines += head
                        lines += dumps(result)[1:-1]
                        lines += tail
                        accepted += 1
                        answer = b'{"seq":%d,"ok":true}\n' % seq
                    else:
                        assert isinstance(result, Refusal)
                        answer = nack(seq, result)
                        if self._refuse(stream, result, seq, now):
                            done = True
                            break
                    answers.append(answer)
                    owed += len(answer)
                if done:
                    break
            self._answer_bytes += owed - stream.owed
            stream.owed = owed
        else:
            results, body = self.validate_batch(frames)
            if body is not None:
                renderer.splice(body, head, tail)
                taken = accepted = len(results)
                seq += taken
            else:
                return self._render_results(stream, results, head, tail, now)
        stream.seq = seq
        renderer.accepted += accepted
        self._counts.accepted += accepted
        return taken

    def take_many(self, intake: Sequence[tuple[Stream, list[Frame]]], now: float) -> list[int]:
        """``[take(stream, frames, now) for stream, frames in intake]`` for streams without acks,
        their frames validated in one call (``validate_reads``, then ``take_validated`` for each):
        the frames of many connections that each sent a record or a few (a client of one record a
        connection), which one by one would each pay a cold call into pydantic-core."""
        per_read = self.validate_reads([frames for _stream, frames in intake])
        pairs = zip(intake, per_read, strict=True)
        return [self.take_validated(stream, results, now) for (stream, _frames), results in pairs]

    def validate_reads(self, reads: Sequence[list[Frame]]) -> list[list[Fields | Refusal]]:
        """The results of each read's frames, all validated in one ``validate_batch`` call; no
        state of the pipeline changes (so a caller whose call raised may take each read alone)."""
        results = self.validate_batch([frame for frames in reads for frame in frames])[0]
        out = []
        at = 0
        for frames in reads:
            out.append(results[at : at + len(frames)])
            at += len(frames)
        return out

    def take_validated(self, stream: Stream, results: list[Fields | Refusal], now: float) -> int:
        """``take`` of one read of a stream without acks whose frames ``validate_reads`` has
        validated: its lines rendered record by record (no splice), in order; how many it took.
        A stream found closing (``refused_close_after``) takes nothing more, here as its caller
        would not call ``take`` again."""
        assert not stream.ack, stream
        if stream.closing:
            return 0
        head, tail = self.renderer.frame(stream.peer, stream.listener_name, stream.client, stream.credentials)
        return self._render_results(stream, results, head, tail, now)

    def _render_results(
        self, stream: Stream, results: list[Fields | Refusal], head: bytes, tail: bytes, now: float
    ) -> int:
        """The lines of one stream's results, record by record (no acks); how many were taken:
        fewer than all when a refusal found the stream sending nearly nothing else (closing)."""
        renderer = self.renderer
        lines = renderer.messages
        dumps = orjson.dumps
        seq = stream.seq
        accepted = 0
        taken = 0
        for result in results:
            taken += 1
            seq += 1
            if type(result) is dict:
                lines += head
                lines += dumps(result)[1:-1]
                lines += tail
                accepted += 1
            else:
                assert isinstance(result, Refusal)
                if self._refuse(stream, result, seq, now):
                    break
        stream.seq = seq
        renderer.accepted += accepted
        self._counts.accepted += accepted
        return taken

    def _refuse(self, stream: Stream, refusal: Refusal, seq: int, now: float) -> bool:
        """Count a refusal and write its reject line (within the stream's rate); True when the
        stream has sent nearly nothing but refused records and must be closed."""
        counts = self._counts
        counts.refused += 1
        by_reason = counts.refused_by_reason
        by_reason[refusal.reason] = by_reason.get(refusal.reason, 0) + 1
        stream.refused += 1
        rate = self.rejects_rate
        if rate:
            tokens = min(self.rejects_burst, stream.reject_tokens + (now - stream.reject_at) * rate)
            stream.reject_at = now
            if tokens >= 1.0:
                stream.reject_tokens = tokens - 1.0
                if stream.suppressed:
                    self.summarize(stream)
                self.renderer.reject(refusal, stream.peer, stream.listener_name, stream.credentials)
            else:
                stream.reject_tokens = tokens
                stream.suppressed += 1
                counts.rejects_suppressed += 1
        else:
            self.renderer.reject(refusal, stream.peer, stream.listener_name, stream.credentials)
        limit = self.refused_close_after
        if limit:
            span = seq - stream.window_seq
            if span >= limit:
                if (stream.refused - stream.window_refused) * 100 >= span * 99:
                    stream.closing = True
                    counts.closed_refused_records += 1
                    self._closing.append(stream)
                    return True
                stream.window_seq = seq
                stream.window_refused = stream.refused
        return False

    def summarize(self, stream: Stream) -> None:
        """One rejects-log line for the reject lines the stream's rate left out (also at close)."""
        if stream.suppressed:
            self.renderer.suppressed(stream.suppressed, stream.peer, stream.listener_name, self.rejects_rate)
            stream.suppressed = 0

    def outcome(self) -> Outcome:
        """What the pass made since the last call; the pipeline starts the next pass empty."""
        messages, accepted, rejects, reject_lines = self.renderer.take()
        out = Outcome(
            messages, accepted, rejects, reject_lines, self._answers, self._answer_bytes, self._counts, self._closing
        )
        self._answers = {}
        self._answer_bytes = 0
        self._counts = RecordCounts()
        self._closing = []
        return out
