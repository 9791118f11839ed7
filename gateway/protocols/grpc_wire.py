"""gRPC's transport: HTTP/2 over cleartext TCP (prior knowledge), in the gateway's event loop.

The gRPC door (``gateway.protocols.grpc_v2``) registers, per method path, a *unary* handler
(``(message, call) -> Outcome``, or a coroutine of it), a *step* handler (the unary calls of
one method that arrived in one read, all at once, as the HTTP fast lane takes a loop step's
requests) or a *stream* handler (one reply message per request message, for server
reflection). A connection is an ``asyncio.Protocol``: its frames are parsed
where they arrive, and a call whose answer needs no waiting (a cached row) is answered in the
same loop step, without a task; a handler that has to wait goes on in a task of its own. The
replies of one loop step go out in one write.

HTTP/2 as RFC 9113 has it, as far as a gRPC server needs: the preface and ``SETTINGS``
(acknowledged both ways), ``PING``, ``GOAWAY`` (both ways; a stopping server sends one, refuses
newer streams with ``REFUSED_STREAM`` and lets the running calls finish), ``RST_STREAM`` (the
peer's cancels the call's task), ``WINDOW_UPDATE`` and flow control both ways (what the peer's
windows do not admit waits for its updates), ``CONTINUATION``, padding and priority fields
(read, ignored), frames of unknown types (ignored). A violation of the protocol ends the
connection with ``GOAWAY`` and the error's code, or the stream with ``RST_STREAM``. Header blocks
are decoded with HPACK (``hpack``, dynamic table included); a block that leaves the table as it
was decodes the same way as long as the table stays so, and is memoized: a client sending the
same headers call after call costs a dictionary lookup. Headers sent are literals outside the
dynamic table.

gRPC over it (the "gRPC over HTTP2" protocol): ``POST`` with ``content-type: application/grpc``
(else HTTP 415), ``grpc-timeout`` as the call's deadline (past it the call is cancelled and
answered ``DEADLINE_EXCEEDED``), length-prefixed messages, uncompressed only (a compressed one is
``UNIMPLEMENTED``), a message over ``max_message`` bytes ``RESOURCE_EXHAUSTED``, an unknown
method ``UNIMPLEMENTED``; replies as headers, one message and trailers (``grpc-status``,
``grpc-message`` percent-encoded, the handler's trailing metadata), errors as trailers only.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import struct
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import hpack

__all__ = ["Call", "Outcome", "StepHandler", "StreamHandler", "UnaryHandler", "WireServer"]

log = logging.getLogger("gateway.grpc")

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# frame types and flags
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, \
    CONTINUATION = range(10)
END_STREAM, ACK, END_HEADERS, PADDED, PRIORITY_FLAG = 0x1, 0x1, 0x4, 0x8, 0x20
# error codes
NO_ERROR, PROTOCOL_ERROR, INTERNAL_ERROR, FLOW_CONTROL_ERROR, STREAM_CLOSED = 0, 1, 2, 3, 5
FRAME_SIZE_ERROR, REFUSED_STREAM, CANCEL, COMPRESSION_ERROR = 6, 7, 8, 9
# gRPC status codes
OK, CANCELLED, INVALID_ARGUMENT, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED = 0, 1, 3, 4, 8
UNIMPLEMENTED, INTERNAL, UNAVAILABLE = 12, 13, 14

_HEAD = struct.Struct(">IBI")  # length << 8 | type, flags, stream id
_MAX_WINDOW = (1 << 31) - 1
_FRAME_SIZE = 16_384  # the largest frame payload we take (the protocol's default)
_STREAM_WINDOW = 1 << 20  # what a stream may send before our WINDOW_UPDATE
_CONNECTION_WINDOW = 16 << 20
_MAX_HEADER_LIST = 16_384  # decoded size (RFC 9113 §6.5.2) of a request's headers
_MAX_HEADER_BLOCK = 65_536  # encoded bytes of one block, CONTINUATIONs included
_MEMO = 256  # header blocks memoized per connection
_DEADLINE_SLACK_S = 0.05  # the handler's own deadline answers first; this is the backstop
_MAX_GRPC_MESSAGE = 4_096  # bytes of grpc-message sent (an error's message is shorter)

_TIMEOUT_UNITS = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}

Metadata = list[tuple[str, bytes]]


@dataclass(slots=True)
class Outcome:
    """How a unary call ended: its status, message, reply (OK only) and trailing metadata."""

    code: int
    message: str = ""
    reply: bytes | None = None
    trailing: tuple[tuple[str, str], ...] = ()


UnaryHandler = Callable[[bytes, "Call"], "Outcome | Coroutine[Any, Any, Outcome]"]
"""The outcome now, or a coroutine of it (run in a task) when the call has to wait."""
StreamHandler = Callable[[bytes], bytes]  # one reply per request message; ValueError: refused
StepHandler = Callable[[list[tuple[bytes, "Call"]]],
                       list["Outcome | Coroutine[Any, Any, Outcome]"]]
"""Unary calls of one method that arrived in one read, all at once: per call, as UnaryHandler."""


@dataclass(slots=True)
class Call:
    """One call as its handler sees it: the method path, the custom metadata (lower-case keys,
    values as sent) and the deadline (``loop.time()``, None without one)."""

    method: str
    metadata: Metadata
    deadline: float | None

    def time_remaining(self) -> float | None:
        """Seconds until the deadline (negative once passed); None without one."""
        if self.deadline is None:
            return None
        return self.deadline - asyncio.get_running_loop().time()

    def get(self, key: str) -> bytes | None:
        """The last value of metadata ``key`` (lower-case), or None."""
        found = None
        for k, v in self.metadata:
            if k == key:
                found = v
        return found


class _ConnectionError(Exception):
    """The connection ends: GOAWAY with ``code``."""

    def __init__(self, code: int, why: str) -> None:
        super().__init__(why)
        self.code = code


class _StreamError(Exception):
    """The stream ends: RST_STREAM with ``code``."""

    def __init__(self, code: int, why: str) -> None:
        super().__init__(why)
        self.code = code


def _frame(kind: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    return _HEAD.pack(len(payload) << 8 | kind, flags, sid) + payload


def _hpack_int(value: int, prefix: int, first: int) -> bytes:
    """HPACK's integer representation with an N-bit ``prefix`` (RFC 7541 §5.1)."""
    limit = (1 << prefix) - 1
    if value < limit:
        return bytes((first | value,))
    out = bytearray((first | limit,))
    value -= limit
    while value >= 128:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _literal(name: bytes, value: bytes) -> bytes:
    """A header field as a literal without indexing, new name, no Huffman coding."""
    return (b"\x00" + _hpack_int(len(name), 7, 0) + name + _hpack_int(len(value), 7, 0)
            + value)


# :status 200 (static index 8), then content-type (static name 31) application/grpc
_REPLY_HEADERS = b"\x88" + _hpack_int(31, 4, 0) + _hpack_int(16, 7, 0) + b"application/grpc"


def _status_block(status: int) -> bytes:
    """``:status`` (static name 8) other than 200, alone."""
    value = str(status).encode()
    return _hpack_int(8, 4, 0) + _hpack_int(len(value), 7, 0) + value


def _percent(message: str) -> bytes:
    """``grpc-message``'s encoding: UTF-8, then %XX for bytes outside printable ASCII and '%'."""
    raw = message.encode("utf-8", "replace")
    out = bytearray()
    for b in raw:
        if 0x20 <= b <= 0x7E and b != 0x25:
            out.append(b)
        else:
            out += b"%%%02X" % b
        if len(out) >= _MAX_GRPC_MESSAGE:
            break
    return bytes(out)


def _trailers(code: int, message: str, trailing: tuple[tuple[str, str], ...]) -> bytes:
    block = _STATUS[code] if code in _STATUS else _literal(b"grpc-status", str(code).encode())
    if message:
        block += _literal(b"grpc-message", _percent(message))
    for k, v in trailing:
        block += _literal(k.encode("latin-1"), v.encode("latin-1", "replace")[:1024])
    return block


_STATUS = {code: _literal(b"grpc-status", str(code).encode()) for code in range(17)}


def _timeout(value: bytes) -> float | None:
    """``grpc-timeout`` in seconds (up to 8 digits and a unit); None when malformed."""
    if not 2 <= len(value) <= 9 or not value[:-1].isdigit():
        return None
    unit = _TIMEOUT_UNITS.get(chr(value[-1]))
    return None if unit is None else int(value[:-1]) * unit


class _Stream:
    __slots__ = (
        "body",
        "consumed",
        "deadline",
        "ended",
        "handler",
        "metadata",
        "method",
        "pending",
        "send_window",
        "sent_headers",
        "sid",
        "streaming",
        "task",
        "timer",
        "trailers",
        "why_cancelled",
        "window",
    )

    def __init__(self, sid: int, send_window: int) -> None:
        self.sid = sid
        self.method = ""
        self.handler: UnaryHandler | StreamHandler | StepHandler | None = None
        self.streaming = False
        self.metadata: Metadata = []
        self.deadline: float | None = None
        self.body = bytearray()
        self.ended = False  # the peer's END_STREAM arrived
        self.window = _STREAM_WINDOW  # what the peer may still send
        self.consumed = 0  # received since our last WINDOW_UPDATE for it
        self.send_window = send_window
        self.pending = bytearray()  # DATA payload waiting for window
        self.trailers: bytes | None = None  # sent once ``pending`` is out
        self.sent_headers = False
        self.task: asyncio.Task[Outcome] | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.why_cancelled = ""  # "peer", "deadline", "shutdown"


class _Connection(asyncio.Protocol):
    """One HTTP/2 connection (see the module docstring)."""

    def __init__(self, server: WireServer) -> None:
        self._server = server
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._preface = False
        self._streams: dict[int, _Stream] = {}
        self._last_sid = 0
        self._decoder = hpack.Decoder(max_header_list_size=_MAX_HEADER_BLOCK * 4)
        self._memo: dict[bytes, list[tuple[bytes, bytes]]] = {}
        self._block: bytearray | None = None  # a header block awaiting CONTINUATION
        self._block_sid = 0
        self._block_end = False
        self._send_window = 65_535  # the connection's, as the peer allows
        self._initial_window = 65_535  # the peer's SETTINGS_INITIAL_WINDOW_SIZE
        self._max_frame = 16_384  # the peer's SETTINGS_MAX_FRAME_SIZE
        self._recv_window = _CONNECTION_WINDOW
        self._recv_consumed = 0
        self._out: list[bytes] = []
        self._flush_soon = False
        self._blocked: dict[int, _Stream] = {}  # streams with DATA waiting for window
        self._step: list[tuple[_Stream, bytes, Call]] = []  # calls for step handlers
        self._closing = False  # GOAWAY sent: no new streams

    # -- asyncio.Protocol ------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        t: asyncio.Transport = transport  # type: ignore[assignment]  # uvloop's: no subclass
        self._transport = t
        if not self._server.admit(self):
            t.abort()
            return
        settings = struct.pack(">HIHIHIHI", 3, self._server.max_streams, 4, _STREAM_WINDOW,
                               5, _FRAME_SIZE, 6, _MAX_HEADER_LIST)
        self._emit(_frame(SETTINGS, 0, 0, settings)
                   + _frame(WINDOW_UPDATE, 0, 0,
                            (_CONNECTION_WINDOW - 65_535).to_bytes(4, "big")))
        self._flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self._server.release(self)
        for st in list(self._streams.values()):
            self._cancel(st, "peer")
        self._streams.clear()
        self._blocked.clear()

    def pause_writing(self) -> None:  # the peer does not read: neither do we
        if self._transport is not None:
            self._transport.pause_reading()

    def resume_writing(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        buf = self._buffer
        buf += data
        try:
            if not self._preface:
                if len(buf) < len(PREFACE):
                    if not PREFACE.startswith(bytes(buf)):
                        raise _ConnectionError(PROTOCOL_ERROR, "not an HTTP/2 preface")
                    return
                if not buf.startswith(PREFACE):
                    raise _ConnectionError(PROTOCOL_ERROR, "not an HTTP/2 preface")
                self._preface = True
                del buf[:len(PREFACE)]
            pos = 0
            end = len(buf)
            while end - pos >= 9:
                head, flags, sid = _HEAD.unpack_from(buf, pos)
                length, kind = head >> 8, head & 0xFF
                if length > _FRAME_SIZE:
                    raise _ConnectionError(FRAME_SIZE_ERROR, f"a frame of {length} bytes")
                if end - pos - 9 < length:
                    break
                payload = bytes(memoryview(buf)[pos + 9:pos + 9 + length])  # one copy
                pos += 9 + length
                self._frame(kind, flags, sid & _MAX_WINDOW, payload)
            del buf[:pos]
        except _ConnectionError as exc:
            self._step.clear()
            self._fail(exc.code, str(exc))
        if self._step:
            self._run_step()
        self._flush()

    # -- frames ------------------------------------------------------------------------------
    def _frame(self, kind: int, flags: int, sid: int, payload: bytes) -> None:
        if self._block is not None and kind != CONTINUATION:
            raise _ConnectionError(PROTOCOL_ERROR, "a header block was interrupted")
        try:
            if kind == HEADERS:
                self._headers(flags, sid, payload)
            elif kind == DATA:
                self._data(flags, sid, payload)
            elif kind == CONTINUATION:
                self._continuation(flags, sid, payload)
            elif kind == SETTINGS:
                self._settings(flags, sid, payload)
            elif kind == WINDOW_UPDATE:
                self._window_update(sid, payload)
            elif kind == PING:
                if sid or len(payload) != 8:
                    raise _ConnectionError(PROTOCOL_ERROR if sid else FRAME_SIZE_ERROR, "PING")
                if not flags & ACK:
                    self._emit(_frame(PING, ACK, 0, payload))
            elif kind == RST_STREAM:
                if not sid or len(payload) != 4:
                    raise _ConnectionError(PROTOCOL_ERROR if not sid else FRAME_SIZE_ERROR,
                                           "RST_STREAM")
                if sid > self._last_sid:
                    raise _ConnectionError(PROTOCOL_ERROR, "RST_STREAM on an idle stream")
                st = self._streams.get(sid)
                if st is not None:
                    self._drop(st)
                    self._cancel(st, "peer")
            elif kind == PRIORITY:
                if not sid:
                    raise _ConnectionError(PROTOCOL_ERROR, "PRIORITY on stream 0")
                if len(payload) != 5:
                    raise _StreamError(FRAME_SIZE_ERROR, "PRIORITY")
            elif kind == GOAWAY:
                if sid or len(payload) < 8:
                    raise _ConnectionError(PROTOCOL_ERROR, "GOAWAY")
                self._closing = True
                self._close_if_idle()
            elif kind == PUSH_PROMISE:
                raise _ConnectionError(PROTOCOL_ERROR, "PUSH_PROMISE from a client")
            # other types are ignored (RFC 9113 §4.1)
        except _StreamError as exc:
            self._reset(sid, exc.code)

    def _settings(self, flags: int, sid: int, payload: bytes) -> None:
        if sid:
            raise _ConnectionError(PROTOCOL_ERROR, "SETTINGS on a stream")
        if flags & ACK:
            if payload:
                raise _ConnectionError(FRAME_SIZE_ERROR, "SETTINGS ACK with a payload")
            return
        if len(payload) % 6:
            raise _ConnectionError(FRAME_SIZE_ERROR, "SETTINGS")
        for i in range(0, len(payload), 6):
            key, value = struct.unpack_from(">HI", payload, i)
            if key == 2 and value > 1:
                raise _ConnectionError(PROTOCOL_ERROR, "SETTINGS_ENABLE_PUSH")
            if key == 4:
                if value > _MAX_WINDOW:
                    raise _ConnectionError(FLOW_CONTROL_ERROR, "SETTINGS_INITIAL_WINDOW_SIZE")
                delta = value - self._initial_window
                self._initial_window = value
                for st in self._streams.values():
                    st.send_window += delta
                    if st.send_window > _MAX_WINDOW:
                        raise _ConnectionError(FLOW_CONTROL_ERROR, "a stream's window")
            elif key == 5:
                if not 16_384 <= value <= (1 << 24) - 1:
                    raise _ConnectionError(PROTOCOL_ERROR, "SETTINGS_MAX_FRAME_SIZE")
                self._max_frame = value
        self._emit(_frame(SETTINGS, ACK, 0))
        self._send_blocked()

    def _window_update(self, sid: int, payload: bytes) -> None:
        if len(payload) != 4:
            raise _ConnectionError(FRAME_SIZE_ERROR, "WINDOW_UPDATE")
        increment = int.from_bytes(payload, "big") & _MAX_WINDOW
        if not sid:
            if not increment:
                raise _ConnectionError(PROTOCOL_ERROR, "WINDOW_UPDATE of 0")
            self._send_window += increment
            if self._send_window > _MAX_WINDOW:
                raise _ConnectionError(FLOW_CONTROL_ERROR, "the connection's window")
            self._send_blocked()
            return
        if sid > self._last_sid:
            raise _ConnectionError(PROTOCOL_ERROR, "WINDOW_UPDATE on an idle stream")
        if not increment:
            raise _StreamError(PROTOCOL_ERROR, "WINDOW_UPDATE of 0")
        st = self._streams.get(sid)
        if st is not None:
            st.send_window += increment
            if st.send_window > _MAX_WINDOW:
                raise _StreamError(FLOW_CONTROL_ERROR, "the stream's window")
            if sid in self._blocked:
                self._send(st)

    def _unpad(self, flags: int, payload: bytes) -> bytes:
        if flags & PADDED:
            if not payload or payload[0] >= len(payload):
                raise _ConnectionError(PROTOCOL_ERROR, "padding longer than the frame")
            return payload[1:len(payload) - payload[0]]
        return payload

    def _headers(self, flags: int, sid: int, payload: bytes) -> None:
        if not sid or not sid & 1:
            raise _ConnectionError(PROTOCOL_ERROR, f"HEADERS on stream {sid}")
        block = self._unpad(flags, payload)
        if flags & PRIORITY_FLAG:
            if len(block) < 5:
                raise _ConnectionError(FRAME_SIZE_ERROR, "HEADERS priority fields")
            block = block[5:]
        if flags & END_HEADERS:
            self._header_block(sid, block, bool(flags & END_STREAM))
        else:
            self._block = bytearray(block)
            self._block_sid = sid
            self._block_end = bool(flags & END_STREAM)

    def _continuation(self, flags: int, sid: int, payload: bytes) -> None:
        if self._block is None or sid != self._block_sid:
            raise _ConnectionError(PROTOCOL_ERROR, "CONTINUATION without HEADERS")
        self._block += payload
        if len(self._block) > _MAX_HEADER_BLOCK:
            raise _ConnectionError(COMPRESSION_ERROR, "a header block over 64 KiB")
        if flags & END_HEADERS:
            block, self._block = bytes(self._block), None
            self._header_block(sid, block, self._block_end)

    def _decode(self, block: bytes) -> list[tuple[bytes, bytes]]:
        """The block's header fields; a block that leaves the dynamic table as it was is
        memoized until the table changes."""
        headers = self._memo.get(block)
        if headers is not None:
            return headers
        table = self._decoder.header_table
        entries = table.dynamic_entries
        before = (entries[0] if entries else None, len(entries), table.maxsize)
        try:
            headers = [(bytes(k), bytes(v)) for k, v in self._decoder.decode(block, raw=True)]
        except hpack.HPACKError as exc:
            raise _ConnectionError(COMPRESSION_ERROR, f"header block: {exc}") from None
        after = (entries[0] if entries else None, len(entries), table.maxsize)
        if after[0] is not before[0] or after[1:] != before[1:]:
            self._memo.clear()
        else:
            if len(self._memo) >= _MEMO:  # blocks of one-off values (a grpc-timeout...)
                self._memo.clear()
            self._memo[block] = headers
        return headers

    def _header_block(self, sid: int, block: bytes, end: bool) -> None:
        headers = self._decode(block)  # always: the table must follow the peer's
        st = self._streams.get(sid)
        if sid <= self._last_sid:
            if st is None:
                raise _ConnectionError(STREAM_CLOSED, f"HEADERS on closed stream {sid}")
            if st.ended or not end:  # trailers must end the stream
                raise _StreamError(PROTOCOL_ERROR, "trailers without END_STREAM")
            self._ended(st)
            return
        self._last_sid = sid
        if self._closing or len(self._streams) >= self._server.max_streams:
            raise _StreamError(REFUSED_STREAM, "not taking new streams")
        st = _Stream(sid, self._initial_window)
        method = b""
        path = b""
        content_type = b""
        size = 0
        regular = False
        for name, value in headers:
            size += len(name) + len(value) + 32
            if name[:1] == b":":
                if regular:
                    raise _StreamError(PROTOCOL_ERROR, "a pseudo-header after a header")
                if name == b":method":
                    method = value
                elif name == b":path":
                    path = value
                elif name not in (b":scheme", b":authority"):
                    raise _StreamError(PROTOCOL_ERROR, f"pseudo-header {name!r}")
                continue
            regular = True
            if name == b"content-type":
                content_type = value
            elif name == b"grpc-timeout":
                timeout = _timeout(value)
                if timeout is not None:
                    st.deadline = self._loop.time() + timeout
            elif name in (b"connection", b"keep-alive", b"transfer-encoding", b"upgrade") \
                    or name != name.lower():
                raise _StreamError(PROTOCOL_ERROR, f"header {name!r}")
            elif name not in (b"te", b"user-agent", b"grpc-encoding", b"grpc-accept-encoding"):
                st.metadata.append((name.decode("latin-1"), value))
        self._streams[sid] = st
        if size > _MAX_HEADER_LIST:
            self._finish(st, RESOURCE_EXHAUSTED, "request headers over 16 KiB")
        elif method != b"POST" or not path:
            self._http_status(st, 405 if path else 400)
        elif not content_type.startswith(b"application/grpc"):
            self._http_status(st, 415)
        else:
            st.method = path.decode("latin-1")
            handler, streaming = self._server.handler(st.method)
            if handler is None:
                self._finish(st, UNIMPLEMENTED, f"unknown method {st.method[:200]}")
            else:
                st.handler, st.streaming = handler, streaming
        if end and sid in self._streams:
            self._ended(st)

    def _data(self, flags: int, sid: int, payload: bytes) -> None:
        if not sid:
            raise _ConnectionError(PROTOCOL_ERROR, "DATA on stream 0")
        if sid > self._last_sid:
            raise _ConnectionError(PROTOCOL_ERROR, "DATA on an idle stream")
        size = len(payload)
        self._recv_window -= size
        if self._recv_window < 0:
            raise _ConnectionError(FLOW_CONTROL_ERROR, "the connection's window")
        self._recv_consumed += size
        if self._recv_consumed >= _CONNECTION_WINDOW // 2:
            self._emit(_frame(WINDOW_UPDATE, 0, 0, self._recv_consumed.to_bytes(4, "big")))
            self._recv_window += self._recv_consumed
            self._recv_consumed = 0
        st = self._streams.get(sid)
        if st is None:
            return  # a stream answered already (or reset): its data is not wanted
        if st.ended:
            raise _StreamError(STREAM_CLOSED, "DATA after END_STREAM")
        st.window -= size
        if st.window < 0:
            raise _StreamError(FLOW_CONTROL_ERROR, "the stream's window")
        data = self._unpad(flags, payload)
        if st.handler is not None:
            body = st.body
            body += data
            if st.streaming:
                self._stream_messages(st)
            if len(body) >= 5 and st.handler is not None:  # the next message's prefix
                length = int.from_bytes(body[1:5], "big")
                limit = self._server.max_message
                if length > limit:
                    self._finish(st, RESOURCE_EXHAUSTED,
                                 f"message of {length} bytes, more than the {limit} taken")
                    return
                if len(body) > 5 + length:  # (a streaming call's was answered above)
                    self._finish(st, INVALID_ARGUMENT, "a unary call carries exactly one "
                                 "message")
                    return
        if flags & END_STREAM:
            self._ended(st)
        elif st.sid in self._streams:
            st.consumed += size
            if st.consumed >= _STREAM_WINDOW // 2:
                self._emit(_frame(WINDOW_UPDATE, 0, sid, st.consumed.to_bytes(4, "big")))
                st.window += st.consumed
                st.consumed = 0

    # -- calls -------------------------------------------------------------------------------
    def _ended(self, st: _Stream) -> None:
        """The peer ended the stream: run a unary call, end a streaming one."""
        st.ended = True
        if st.handler is None:
            return  # answered at its headers (an error); the stream closes when that is sent
        if st.streaming:
            if st.body:
                self._finish(st, INVALID_ARGUMENT, "a message cut short")
            else:
                self._finish(st, OK, "")
            return
        body = st.body
        if len(body) < 5 or int.from_bytes(body[1:5], "big") != len(body) - 5:
            self._finish(st, INVALID_ARGUMENT, "a unary call carries exactly one message")
            return
        if body[0]:
            self._finish(st, UNIMPLEMENTED, "compressed messages are not taken")
            return
        message = bytes(memoryview(body)[5:])
        st.body = bytearray()
        call = Call(st.method, st.metadata, st.deadline)
        if st.method in self._server.steps:
            self._step.append((st, message, call))  # begun with the step's others
            return
        handler: UnaryHandler = st.handler  # type: ignore[assignment]
        context = contextvars.copy_context()
        try:
            result = context.run(handler, message, call)
        except Exception:  # the handler answers its own faults; this is a bug
            log.exception("gRPC call %s failed", st.method)
            self._finish(st, INTERNAL, "internal error")
            return
        self._start(st, result, context)

    def _run_step(self) -> None:
        """Hand the calls of step handlers that arrived in this read to their handler, all
        at once per method."""
        calls, self._step = self._step, []
        by_method: dict[str, list[tuple[_Stream, bytes, Call]]] = {}
        for entry in calls:
            if entry[0].sid in self._streams:  # (not reset since)
                by_method.setdefault(entry[0].method, []).append(entry)
        for method, group in by_method.items():
            try:
                results = self._server.steps[method]([(m, c) for _, m, c in group])
            except Exception:  # the handler answers its own faults; this is a bug
                log.exception("gRPC calls %s failed", method)
                for st, _, _ in group:
                    self._finish(st, INTERNAL, "internal error")
                continue
            for (st, _, _), result in zip(group, results, strict=True):
                self._start(st, result)

    def _start(self, st: _Stream, result: Outcome | Coroutine[Any, Any, Outcome],
               context: contextvars.Context | None = None) -> None:
        """Answer a call's outcome, or run its coroutine in a task (in ``context``, the one
        its handler ran in; else a copy of the current one)."""
        if type(result) is Outcome:
            self._outcome(st, result)
            return
        task = self._loop.create_task(result,  # type: ignore[arg-type]
                                      context=context or contextvars.copy_context())
        st.task = task
        task.add_done_callback(functools.partial(self._done, st))
        if st.deadline is not None:
            st.timer = self._loop.call_at(st.deadline + _DEADLINE_SLACK_S, self._expire, st)

    def _expire(self, st: _Stream) -> None:
        st.timer = None
        if st.task is not None and not st.task.done():
            st.why_cancelled = "deadline"
            st.task.cancel()

    def _cancel(self, st: _Stream, why: str) -> None:
        """Cancel the call's task, once it has taken its first step: a coroutine cancelled
        before it starts never runs its body, which accounts for the call."""
        if st.task is not None and not st.task.done():
            st.why_cancelled = why
            self._loop.call_soon(st.task.cancel)

    def _done(self, st: _Stream, task: asyncio.Task[Outcome]) -> None:
        if st.timer is not None:
            st.timer.cancel()
            st.timer = None
        st.task = None
        if st.sid not in self._streams:  # reset by the peer, or the connection is gone
            self._server.settled()
            return
        if task.cancelled():
            if st.why_cancelled == "deadline":
                self._finish(st, DEADLINE_EXCEEDED, "the call's deadline has passed")
            else:
                self._finish(st, UNAVAILABLE if st.why_cancelled == "shutdown" else CANCELLED,
                             "the server is shutting down" if st.why_cancelled == "shutdown"
                             else "cancelled")
        else:
            exc = task.exception()
            if exc is not None:
                log.error("gRPC call %s failed", st.method, exc_info=exc)
                self._finish(st, INTERNAL, "internal error")
            else:
                self._outcome(st, task.result())
        self._schedule_flush()
        self._server.settled()

    def _outcome(self, st: _Stream, outcome: Outcome) -> None:
        if outcome.code == OK and outcome.reply is not None:
            self._reply_message(st, outcome.reply)
        self._finish(st, outcome.code, outcome.message, outcome.trailing)

    def _stream_messages(self, st: _Stream) -> None:
        """Answer each complete message of a streaming call, in order."""
        body = st.body
        handler: StreamHandler = st.handler  # type: ignore[assignment]
        while len(body) >= 5 and len(body) - 5 >= int.from_bytes(body[1:5], "big"):
            length = int.from_bytes(body[1:5], "big")
            if body[0]:
                self._finish(st, UNIMPLEMENTED, "compressed messages are not taken")
                return
            message = bytes(body[5:5 + length])
            del body[:5 + length]
            try:
                reply = handler(message)
            except ValueError as exc:
                self._finish(st, INVALID_ARGUMENT, str(exc))
                return
            self._reply_message(st, reply)

    # -- sending -----------------------------------------------------------------------------
    def _reply_message(self, st: _Stream, message: bytes) -> None:
        if not st.sent_headers:
            st.sent_headers = True
            self._emit(_frame(HEADERS, END_HEADERS, st.sid, _REPLY_HEADERS))
        st.pending += len(message).to_bytes(5, "big") + message  # flag 0: not compressed
        self._send(st)

    def _finish(self, st: _Stream, code: int, message: str,
                trailing: tuple[tuple[str, str], ...] = ()) -> None:
        """End the stream with this status: trailers (or trailers only), once its data is
        out. The call's handler is no longer wanted."""
        if st.handler is None and st.trailers is not None:
            return  # ended already
        st.handler = None
        block = _trailers(code, message, trailing)
        if not st.sent_headers:
            st.sent_headers = True
            block = _REPLY_HEADERS + block
        st.trailers = block
        self._send(st)

    def _http_status(self, st: _Stream, status: int) -> None:
        st.handler = None
        st.sent_headers = True
        st.trailers = _status_block(status)
        self._send(st)

    def _send(self, st: _Stream) -> None:
        """Send what the windows admit of the stream's data, then its trailers."""
        pending = st.pending
        while pending:
            n = min(len(pending), self._send_window, st.send_window, self._max_frame)
            if n <= 0:
                self._blocked[st.sid] = st
                return
            self._emit(_frame(DATA, 0, st.sid, bytes(pending[:n])))
            del pending[:n]
            self._send_window -= n
            st.send_window -= n
        self._blocked.pop(st.sid, None)
        if st.trailers is not None:
            self._emit(_frame(HEADERS, END_HEADERS | END_STREAM, st.sid, st.trailers))
            if not st.ended:  # the peer was still sending: it need not go on
                self._emit(_frame(RST_STREAM, 0, st.sid, NO_ERROR.to_bytes(4, "big")))
            self._drop(st)
            self._cancel(st, "peer")

    def _send_blocked(self) -> None:
        for st in list(self._blocked.values()):
            self._send(st)

    def _drop(self, st: _Stream) -> None:
        self._streams.pop(st.sid, None)
        self._blocked.pop(st.sid, None)
        if self._closing:
            self._close_if_idle()

    def _reset(self, sid: int, code: int) -> None:
        self._emit(_frame(RST_STREAM, 0, sid, code.to_bytes(4, "big")))
        st = self._streams.get(sid)
        if st is not None:
            self._drop(st)
            self._cancel(st, "peer")

    def _emit(self, data: bytes) -> None:
        self._out.append(data)

    def _schedule_flush(self) -> None:
        if not self._flush_soon:
            self._flush_soon = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_soon = False
        if self._out and self._transport is not None and not self._transport.is_closing():
            self._transport.write(b"".join(self._out))
        self._out.clear()

    def _fail(self, code: int, why: str) -> None:
        log.debug("gRPC connection ends: %s", why)
        self._emit(_frame(GOAWAY, 0, 0, struct.pack(">II", self._last_sid, code)
                          + why.encode()[:200]))
        self._flush()
        if self._transport is not None:
            self._transport.close()

    # -- shutdown ----------------------------------------------------------------------------
    def goaway(self) -> None:
        """No new streams: GOAWAY naming the last stream taken; closes once the rest ended."""
        if self._closing and self._transport is not None and self._transport.is_closing():
            return
        self._closing = True
        self._emit(_frame(GOAWAY, 0, 0, struct.pack(">II", self._last_sid, NO_ERROR)))
        self._flush()
        self._close_if_idle()

    def cancel_calls(self) -> list[asyncio.Task[Outcome]]:
        """Cancel the calls running in tasks (answered ``UNAVAILABLE``); those tasks."""
        tasks = []
        for st in list(self._streams.values()):
            if st.task is not None and not st.task.done():
                tasks.append(st.task)
                self._cancel(st, "shutdown")
        return tasks

    def busy(self) -> bool:
        return bool(self._streams)

    def close(self) -> None:
        self._flush()
        if self._transport is not None:
            self._transport.close()

    def _close_if_idle(self) -> None:
        if not self._streams and self._transport is not None:
            self._flush()
            self._transport.close()


class WireServer:
    """gRPC's HTTP/2 server for the door's handlers (see the module docstring).

    ``unary`` and ``streams`` map method paths (``/package.Service/Method``) to handlers;
    ``max_message`` bounds a request message, ``max_connections`` the connections open at once
    (more are closed on arrival), ``max_streams`` the calls at once on one connection."""

    def __init__(self, unary: dict[str, UnaryHandler], streams: dict[str, StreamHandler], *,
                 steps: dict[str, StepHandler] | None = None, max_message: int,
                 max_connections: int, max_streams: int = 256) -> None:
        self._unary = unary
        self._streams = streams
        self.steps = steps or {}
        self.max_message = max_message
        self.max_streams = max_streams
        self._max_connections = max_connections
        self._connections: set[_Connection] = set()
        self._server: asyncio.Server | None = None
        self._idle: asyncio.Event | None = None

    def handler(self, method: str) -> tuple[UnaryHandler | StreamHandler | StepHandler | None,
                                            bool]:
        found: UnaryHandler | StepHandler | None = self._unary.get(method) or \
            self.steps.get(method)
        if found is not None:
            return found, False
        stream = self._streams.get(method)
        return stream, stream is not None

    async def start(self, host: str, port: int) -> int:
        """Listen on ``host:port`` (shared with other processes: ``SO_REUSEPORT``); the port."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Connection(self), host, port,
                                                reuse_port=True, backlog=2048)
        sock = self._server.sockets[0]
        return int(sock.getsockname()[1])

    def admit(self, connection: _Connection) -> bool:
        if len(self._connections) >= self._max_connections or self._idle is not None:
            return False
        self._connections.add(connection)
        return True

    def release(self, connection: _Connection) -> None:
        self._connections.discard(connection)
        self.settled()

    def settled(self) -> None:
        if self._idle is not None and not any(c.busy() for c in self._connections):
            self._idle.set()

    async def stop(self, grace_s: float) -> None:
        """Stop intake (GOAWAY: newer streams refused), let running calls finish within
        ``grace_s``, then cancel them (``UNAVAILABLE``) and close every connection."""
        if self._server is None:
            return
        self._server.close()
        self._idle = asyncio.Event()
        for c in list(self._connections):
            c.goaway()
        self.settled()
        try:
            async with asyncio.timeout(grace_s):
                await self._idle.wait()
        except TimeoutError:
            tasks = [t for c in list(self._connections) for t in c.cancel_calls()]
            if tasks:  # their answers are queued by their done callbacks, written at close
                await asyncio.wait(tasks)
        for c in list(self._connections):
            c.close()
        await self._server.wait_closed()
