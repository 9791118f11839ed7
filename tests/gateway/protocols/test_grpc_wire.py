"""gRPC's HTTP/2 transport over real TCP, driven frame by frame: calls, flow control, header
blocks, cancellation, deadlines, shutdown, the protocol errors it must refuse, and a fuzz of
frames that must never raise in the event loop. (The door on it, with stock clients:
``test_grpc_v2.py``, ``tests/test_grpc_e2e.py``.)"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import hpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.protocols.grpc_wire import (
    ACK,
    CONTINUATION,
    DATA,
    END_HEADERS,
    END_STREAM,
    GOAWAY,
    HEADERS,
    PING,
    PREFACE,
    RST_STREAM,
    SETTINGS,
    WINDOW_UPDATE,
    Call,
    Outcome,
    WireServer,
)

pytestmark = pytest.mark.anyio

_HEAD = struct.Struct(">IBI")
METHOD = "/test.Service/Echo"


def frame(kind: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    return _HEAD.pack(len(payload) << 8 | kind, flags, sid) + payload


def message(data: bytes, compressed: bool = False) -> bytes:
    return bytes([compressed]) + len(data).to_bytes(4, "big") + data


@dataclass
class Frame:
    kind: int
    flags: int
    sid: int
    payload: bytes
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)  # HEADERS, decoded


@dataclass
class Handlers:
    """The calls' handlers: ``Echo`` answers at once, ``Slow`` waits for ``release``."""

    release: asyncio.Event = field(default_factory=asyncio.Event)
    cancelled: int = 0
    seen: list[Call] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)  # calls per step

    def echo(self, request: bytes, call: Call) -> Outcome:
        self.seen.append(call)
        return Outcome(0, "", request[::-1], (("x-echo", "yes"),))

    async def slow(self, request: bytes, call: Call) -> Outcome:
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        return Outcome(0, "", request)

    def fail(self, request: bytes, call: Call) -> Outcome:
        return Outcome(3, "bad ünicode 100%", None)

    def step(self, calls: list[tuple[bytes, Call]]) -> list[Any]:
        self.steps.append(len(calls))

        async def later(request: bytes) -> Outcome:
            await self.release.wait()
            return Outcome(0, "", request)

        return [Outcome(0, "", m.upper()) if m != b"wait" else later(m) for m, _ in calls]

    def stream(self, request: bytes) -> bytes:
        if request == b"refuse":
            raise ValueError("refused")
        return request.upper()


class Client:
    """One raw HTTP/2 connection: frames out, frames in."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.encoder = hpack.Encoder()
        self.decoder = hpack.Decoder()

    async def handshake(self, settings_payload: bytes = b"") -> None:
        self.writer.write(PREFACE + frame(SETTINGS, 0, 0, settings_payload))
        got = await self.until(lambda f: f.kind == SETTINGS and not f.flags & ACK)
        assert got
        self.writer.write(frame(SETTINGS, ACK, 0))

    def headers(self, sid: int, *, path: str = METHOD, content_type: str = "application/grpc",
                extra: list[tuple[str, str]] | None = None, end: bool = False) -> bytes:
        block = self.encoder.encode([(":method", "POST"), (":scheme", "http"), (":path", path),
                                     (":authority", "t"), ("content-type", content_type),
                                     ("te", "trailers"), *(extra or [])])
        return frame(HEADERS, END_HEADERS | (END_STREAM if end else 0), sid, block)

    def call(self, sid: int, body: bytes, **kw: Any) -> None:
        self.writer.write(self.headers(sid, **kw) + frame(DATA, END_STREAM, sid, message(body)))

    async def read(self) -> Frame | None:
        try:
            head = await asyncio.wait_for(self.reader.readexactly(9), 5)
        except asyncio.IncompleteReadError:
            return None
        length_kind, flags, sid = _HEAD.unpack(head)
        payload = await self.reader.readexactly(length_kind >> 8)
        return Frame(length_kind & 0xFF, flags, sid & 0x7FFFFFFF, payload)

    async def until(self, done: Any) -> list[Frame]:
        """Frames until ``done(frame)`` (included); [] if the connection ends first."""
        out = []
        while True:
            f = await self.read()
            if f is None:
                return []
            if f.kind in (HEADERS, CONTINUATION):
                f.headers = [(bytes(k), bytes(v))
                             for k, v in self.decoder.decode(f.payload, raw=True)]
            out.append(f)
            if done(f):
                return out

    async def answer(self, sid: int) -> tuple[dict[bytes, bytes], bytes, dict[bytes, bytes]]:
        """The stream's headers, data and trailers (trailers-only: headers empty)."""
        frames = await self.until(lambda f: (f.sid == sid and f.flags & END_STREAM)
                                  or (f.kind == GOAWAY and f.payload[4:8] != bytes(4)))
        mine = [f for f in frames if f.sid == sid]
        blocks = [dict(f.headers) for f in mine if f.kind == HEADERS]
        data = b"".join(f.payload for f in mine if f.kind == DATA)
        if len(blocks) == 1:
            return {}, data, blocks[0]
        return blocks[0], data, blocks[-1]

    async def synced(self) -> None:
        """Return once the server has read everything sent so far (a PING's answer)."""
        self.writer.write(frame(PING, 0, 0, b"12345678"))
        await self.until(lambda f: f.kind == PING)

    async def goaway(self) -> int:
        """The error code of the GOAWAY that ends the connection."""
        frames = await self.until(lambda f: f.kind == GOAWAY)
        assert frames, "the connection closed without GOAWAY"
        return int.from_bytes(frames[-1].payload[4:8], "big")


@asynccontextmanager
async def served(max_connections: int = 8, max_message: int = 1000,
                 max_streams: int = 256) -> AsyncIterator[tuple[WireServer, Handlers, Any]]:
    h = Handlers()
    server = WireServer({METHOD: h.echo, "/test.Service/Slow": h.slow,
                         "/test.Service/Fail": h.fail},
                        {"/test.Service/Stream": h.stream},
                        steps={"/test.Service/Step": h.step}, max_message=max_message,
                        max_connections=max_connections, max_streams=max_streams)
    port = await server.start("127.0.0.1", 0)
    errors: list[dict[str, Any]] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _loop, ctx: errors.append(ctx))
    clients: list[asyncio.StreamWriter] = []

    async def connect() -> Client:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        clients.append(writer)
        return Client(reader, writer)

    try:
        yield server, h, connect
    finally:
        h.release.set()
        await server.stop(1.0)
        loop.set_exception_handler(None)
        for w in clients:
            w.close()
    assert not errors, errors


async def test_a_unary_call_is_answered_with_headers_message_and_trailers() -> None:
    async with served() as (_, h, connect):
        c = await connect()
        await c.handshake()
        c.call(1, b"hello", extra=[("x-request-id", "r1"), ("grpc-timeout", "5S")])
        headers, data, trailers = await c.answer(1)
        assert headers == {b":status": b"200", b"content-type": b"application/grpc"}
        assert data == message(b"olleh")
        assert trailers == {b"grpc-status": b"0", b"x-echo": b"yes"}
        assert h.seen[0].get("x-request-id") == b"r1" and h.seen[0].deadline is not None
        for sid in (3, 5, 7):  # the same headers again, now indexed: the memoized block
            c.call(sid, b"ab")
            assert (await c.answer(sid))[1] == message(b"ba")


async def test_calls_of_a_step_handler_that_arrive_in_one_read_are_handed_over_together(
        ) -> None:
    async with served() as (_, h, connect):
        c = await connect()
        await c.handshake()
        path = "/test.Service/Step"
        c.writer.write(c.headers(1, path=path) + frame(DATA, END_STREAM, 1, message(b"a"))
                       + c.headers(3, path=path) + frame(DATA, END_STREAM, 3, message(b"wait"))
                       + c.headers(5, path=path) + frame(DATA, END_STREAM, 5, message(b"c")))
        assert (await c.answer(1))[1] == message(b"A")
        assert (await c.answer(5))[1] == message(b"C")
        h.release.set()
        assert (await c.answer(3))[1] == message(b"wait")
        assert h.steps == [3]


async def test_errors_are_trailers_only_with_a_percent_encoded_message() -> None:
    async with served() as (_, _, connect):
        c = await connect()
        await c.handshake()
        c.call(1, b"x", path="/test.Service/Fail")
        headers, data, trailers = await c.answer(1)
        assert headers == {} and data == b""
        assert trailers[b"grpc-status"] == b"3"
        assert trailers[b"grpc-message"] == b"bad %C3%BCnicode 100%25"


@pytest.mark.parametrize(("send", "status", "grpc_status"), [
    ("unknown", None, b"12"),
    ("text", b"415", None),
    ("compressed", None, b"12"),
    ("two messages", None, b"3"),
    ("no message", None, b"3"),
    ("oversized", None, b"8"),
])
async def test_what_a_call_may_not_be(send: str, status: bytes | None,
                                      grpc_status: bytes | None) -> None:
    async with served() as (_, _, connect):
        c = await connect()
        await c.handshake()
        if send == "unknown":
            c.call(1, b"x", path="/test.Service/Nope")
        elif send == "text":
            c.call(1, b"x", content_type="text/plain")
        elif send == "compressed":
            c.writer.write(c.headers(1) + frame(DATA, END_STREAM, 1, message(b"x", True)))
        elif send == "two messages":
            c.writer.write(c.headers(1) + frame(DATA, END_STREAM, 1, message(b"x") * 2))
        elif send == "no message":
            c.writer.write(c.headers(1, end=True))
        else:  # refused from the message's length prefix, before the rest arrives
            c.writer.write(c.headers(1) + frame(DATA, 0, 1, (2000).to_bytes(5, "big")))
        _, _, trailers = await c.answer(1)
        if status is not None:
            assert trailers[b":status"] == status
        else:
            assert trailers[b"grpc-status"] == grpc_status, trailers


async def test_replies_wait_for_the_peers_flow_control_windows() -> None:
    async with served() as (_, _, connect):
        c = await connect()
        await c.handshake(struct.pack(">HI", 4, 10))  # INITIAL_WINDOW_SIZE 10
        c.call(1, b"y" * 95)  # the reply: 100 bytes
        frames = await c.until(lambda f: f.kind == DATA)
        assert [len(f.payload) for f in frames if f.kind == DATA] == [10]
        got = 10
        while got < 100:
            c.writer.write(frame(WINDOW_UPDATE, 0, 1, (30).to_bytes(4, "big")))
            frames = await c.until(lambda f: f.kind == DATA or f.flags & END_STREAM)
            got += sum(len(f.payload) for f in frames if f.kind == DATA)
            assert not any(f.flags & END_STREAM for f in frames) or got == 100
        frames = await c.until(lambda f: f.flags & END_STREAM)
        assert dict(frames[-1].headers)[b"grpc-status"] == b"0"


async def test_continuation_frames_carry_the_rest_of_a_header_block() -> None:
    async with served() as (_, _, connect):
        c = await connect()
        await c.handshake()
        whole = c.headers(1)[9:]
        c.writer.write(frame(HEADERS, 0, 1, whole[:7]) + frame(CONTINUATION, 0, 1, whole[7:12])
                       + frame(CONTINUATION, END_HEADERS, 1, whole[12:])
                       + frame(DATA, END_STREAM, 1, message(b"abc")))
        assert (await c.answer(1))[1] == message(b"cba")
        c.writer.write(frame(HEADERS, 0, 3, c.headers(3)[9:12]) + frame(PING, 0, 0, b"8bytes!!"))
        assert await c.goaway() == 1  # PROTOCOL_ERROR: the block was interrupted


async def test_ping_is_acknowledged_with_its_payload() -> None:
    async with served() as (_, _, connect):
        c = await connect()
        await c.handshake()
        c.writer.write(frame(PING, 0, 0, b"12345678"))
        frames = await c.until(lambda f: f.kind == PING)
        assert frames[-1].flags & ACK and frames[-1].payload == b"12345678"


@pytest.mark.parametrize(("raw", "code"), [
    (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", 1),
    (PREFACE + frame(SETTINGS, 0, 0) + frame(DATA, 0, 1, b"x" * 16_385), 6),  # FRAME_SIZE
    (PREFACE + frame(SETTINGS, 0, 0) + frame(HEADERS, END_HEADERS, 2, b"\x82"), 1),  # even id
    (PREFACE + frame(SETTINGS, 0, 0, b"\x00\x04\xff\xff\xff\xff"), 3),  # FLOW_CONTROL
    (PREFACE + frame(SETTINGS, 0, 0, b"\x00\x05\x00\x00\x00\x01"), 1),  # frame size < 16 KiB
    (PREFACE + frame(SETTINGS, 0, 0) + frame(HEADERS, END_HEADERS, 1, b"\xff\xff\xff\xff"), 9),
    (PREFACE + frame(SETTINGS, 0, 0) + frame(WINDOW_UPDATE, 0, 0, b"\0\0\0\0"), 1),
    (PREFACE + frame(SETTINGS, 0, 0) + frame(PING, 0, 0, b"short"), 6),
    (PREFACE + frame(SETTINGS, 0, 0) + frame(5, END_HEADERS, 1, b"\0\0\0\2"), 1),  # PUSH
    (PREFACE + frame(SETTINGS, 0, 0) + frame(DATA, 0, 9, b"x"), 1),  # DATA on an idle stream
])
async def test_protocol_errors_end_the_connection_with_goaway(raw: bytes, code: int) -> None:
    async with served() as (_, _, connect):
        c = await connect()
        c.writer.write(raw)
        assert await c.goaway() == code


async def test_a_peers_reset_cancels_its_call() -> None:
    async with served() as (_, h, connect):
        c = await connect()
        await c.handshake()
        c.call(1, b"x", path="/test.Service/Slow")
        c.call(3, b"y")  # answered meanwhile: the slow call waits in a task
        assert (await c.answer(3))[1] == message(b"y")
        c.writer.write(frame(RST_STREAM, 0, 1, (8).to_bytes(4, "big")))
        await c.synced()
        await asyncio.sleep(0)
        assert h.cancelled == 1


async def test_a_call_reset_in_the_read_that_started_it_still_runs_its_handler_to_its_end(
        ) -> None:
    """The handler's coroutine takes its first step before it is cancelled: what it
    accounts for (counted, logged) is never skipped."""
    async with served() as (_, h, connect):
        c = await connect()
        await c.handshake()
        c.writer.write(c.headers(1, path="/test.Service/Slow")
                       + frame(DATA, END_STREAM, 1, message(b"x"))
                       + frame(RST_STREAM, 0, 1, (8).to_bytes(4, "big")))
        await c.synced()
        await asyncio.sleep(0)
        assert h.cancelled == 1


async def test_a_call_past_its_deadline_is_cancelled_and_answered_deadline_exceeded() -> None:
    async with served() as (_, h, connect):
        c = await connect()
        await c.handshake()
        c.call(1, b"x", path="/test.Service/Slow", extra=[("grpc-timeout", "20m")])
        _, _, trailers = await c.answer(1)
        assert trailers[b"grpc-status"] == b"4" and h.cancelled == 1


async def test_a_streaming_call_answers_each_message_then_ends_with_the_peer() -> None:
    async with served() as (_, _, connect):
        c = await connect()
        await c.handshake()
        path = "/test.Service/Stream"
        c.writer.write(c.headers(1, path=path) + frame(DATA, 0, 1, message(b"ab") + b"\0"))
        frames = await c.until(lambda f: f.kind == DATA)
        assert frames[-1].payload == message(b"AB")
        c.writer.write(frame(DATA, END_STREAM, 1, b"\0\0\0\1c"))
        _, data, trailers = await c.answer(1)
        assert data == message(b"C") and trailers[b"grpc-status"] == b"0"
        c.writer.write(c.headers(3, path=path) + frame(DATA, END_STREAM, 3, message(b"refuse")))
        assert (await c.answer(3))[2][b"grpc-status"] == b"3"


async def test_streams_past_the_concurrency_limit_are_refused() -> None:
    async with served(max_streams=1) as (_, h, connect):
        c = await connect()
        await c.handshake()
        c.call(1, b"x", path="/test.Service/Slow")
        c.call(3, b"y")
        frames = await c.until(lambda f: f.kind == RST_STREAM)
        assert frames[-1].sid == 3 and frames[-1].payload == (7).to_bytes(4, "big")
        h.release.set()
        assert (await c.answer(1))[1] == message(b"x")


async def test_connections_past_the_cap_are_closed() -> None:
    async with served(max_connections=1) as (_, _, connect):
        first = await connect()
        await first.handshake()
        second = await connect()
        second.writer.write(PREFACE + frame(SETTINGS, 0, 0))
        assert await second.read() is None
        first.call(1, b"ok")
        assert (await first.answer(1))[1] == message(b"ko")


async def slow_call(connect: Any, body: bytes) -> Client:
    """A connection whose stream 1 is a call running in its task."""
    c: Client = await connect()
    await c.handshake()
    c.call(1, body, path="/test.Service/Slow")
    await c.synced()
    return c


async def test_stop_sends_goaway_refuses_new_streams_and_lets_running_calls_finish() -> None:
    async with served() as (server, h, connect):
        c = await slow_call(connect, b"done")
        stopping = asyncio.ensure_future(server.stop(5.0))
        frames = await c.until(lambda f: f.kind == GOAWAY)
        assert int.from_bytes(frames[-1].payload[:4], "big") == 1  # the last stream taken
        c.call(3, b"late")
        frames = await c.until(lambda f: f.kind == RST_STREAM)
        assert frames[-1].sid == 3 and frames[-1].payload == (7).to_bytes(4, "big")
        h.release.set()
        assert (await c.answer(1))[1] == message(b"done")
        await stopping
        assert await c.read() is None


async def test_calls_still_running_after_the_grace_period_are_answered_unavailable() -> None:
    async with served() as (server, h, connect):
        c = await slow_call(connect, b"x")
        await server.stop(0.05)
        _, _, trailers = await c.answer(1)
        assert trailers[b"grpc-status"] == b"14" and h.cancelled == 1


_frames = st.lists(st.tuples(st.integers(0, 12), st.integers(0, 255), st.integers(0, 9),
                             st.binary(max_size=64)), max_size=8)


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(frames=_frames)
def test_no_frame_sequence_raises_in_the_event_loop(frames: list[tuple[int, int, int,
                                                                        bytes]]) -> None:
    """Whatever frames follow a valid start, the connection answers or ends with GOAWAY and
    the server serves the next connection; nothing raises in the loop (``served`` checks)."""

    async def run() -> None:
        async with served() as (_, _, connect):
            c = await connect()
            await c.handshake()
            c.writer.write(c.headers(1) + frame(DATA, END_STREAM, 1, message(b"a")))
            c.writer.write(b"".join(frame(k, fl, sid, p) for k, fl, sid, p in frames))
            c.writer.write(frame(PING, 0, 0, b"12345678"))
            await c.until(lambda f: f.kind in (PING, GOAWAY))
            fresh = await connect()
            await fresh.handshake()
            fresh.call(1, b"xy")
            assert (await fresh.answer(1))[1] == message(b"yx")

    asyncio.run(run())
