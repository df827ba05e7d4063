"""The guest side of a session (§4–§8), sans-IO: feed it bytes with `receive()`, take bytes to write from
`data_to_send()`, read what happened from `poll_event()`, and drive its two timers (HELLO and SYNC retries)
with `handle_timeout()`. It never touches a socket or a clock of its own, so tests drive it directly and
`client.py` wraps it in one I/O thread.
"""

from __future__ import annotations

import secrets
from collections import deque
from dataclasses import dataclass, field

from . import __version__
from .frame import DEFAULT_MAX_FRAME, FLAG_IGNORABLE, Frame, FrameDecoder, FrameType, FramingError, encode_frame
from .payload import (
    METHOD_NET_CONNECT,
    METHOD_POLICY_CHECK,
    End,
    ErrorDetails,
    ErrorPayload,
    GoAway,
    Hello,
    HelloAck,
    HttpResponseHead,
    Implementation,
    MethodCall,
    NetConnectHead,
    PayloadError,
    PolicyDecision,
    ReceiveParams,
    encode,
    loads,
)

MAX_WINDOW = (1 << 31) - 1
RETRY_SECONDS = 1.0


# ---------------------------------------------------------------------------------------------------------
# Events


@dataclass(frozen=True)
class Established:
    ack: HelloAck


@dataclass(frozen=True)
class Refused:
    """The host refused our HELLO (`unsupported_version`, or `protocol_error` for bad receive values)."""

    error: ErrorPayload


@dataclass(frozen=True)
class Head:
    stream_id: int
    head: HttpResponseHead | PolicyDecision


@dataclass(frozen=True)
class Data:
    stream_id: int
    data: bytes


@dataclass(frozen=True)
class StreamEnd:
    stream_id: int
    trailers: tuple


@dataclass(frozen=True)
class StreamFailed:
    """The stream ended abnormally: an ERROR or CANCEL from the host, or a local `session_reset` /
    `protocol_error`."""

    stream_id: int
    error: ErrorPayload


@dataclass(frozen=True)
class SessionError:
    """An ERROR on stream 0 that does not end the session (§7)."""

    error: ErrorPayload


@dataclass(frozen=True)
class GoAwayReceived:
    goaway: GoAway


@dataclass(frozen=True)
class Pong:
    payload: bytes


@dataclass(frozen=True)
class Resynced:
    pass


@dataclass(frozen=True)
class Closed:
    reason: str


def session_reset(message: str) -> ErrorPayload:
    return ErrorPayload("session_reset", message, retryable=True)


def protocol_error(message: str, **details) -> ErrorPayload:
    return ErrorPayload("protocol_error", message, details=ErrorDetails(**details))


# ---------------------------------------------------------------------------------------------------------


@dataclass
class Config:
    implementation: Implementation = field(default_factory=lambda: Implementation("pexi-python", __version__))
    receive: ReceiveParams = field(default_factory=ReceiveParams)
    versions: tuple[int, ...] = (1,)


@dataclass
class _Stream:
    method: str
    send_credit: int
    # Frames of this stream not yet written, in order: (type, payload).
    out: deque = field(default_factory=deque)
    queued_data: int = 0
    end_queued: bool = False
    head_seen: bool = False
    remote_ended: bool = False
    # Inbound accounting: what the host may still send, and what the application consumed but we have not
    # granted back yet.
    recv_window: int = 0
    unconsumed: int = 0
    ungranted: int = 0


class Session:
    """One guest session. States: idle → handshaking → established ⇄ resyncing; closed at the end."""

    def __init__(self, config: Config | None = None):
        self.config = config or Config()
        self.state = "idle"
        self.ack: HelloAck | None = None
        self._decoder = FrameDecoder(DEFAULT_MAX_FRAME)
        self._control: deque[bytes] = deque()
        self._streams: dict[int, _Stream] = {}
        self._events: deque = deque()
        self._next_id = 1
        self._hello_nonce: int | None = None
        self._sync_nonce: int | None = None
        self._timer: float | None = None
        self._goaway: GoAway | None = None
        self._peer = ReceiveParams(DEFAULT_MAX_FRAME)
        self._send_credit = 0
        self._recv_window = 0
        self._session_ungranted = 0

    # -- driving --------------------------------------------------------------------------------------------

    def start(self, now: float) -> None:
        """Sends HELLO (a fresh nonce each time: a late answer to an earlier HELLO is ignored by it)."""
        self._hello_nonce = secrets.randbits(64)
        hello = Hello(
            nonce=self._hello_nonce,
            implementation=self.config.implementation,
            receive=self.config.receive,
            versions=self.config.versions,
        )
        self._control.append(encode_frame(FrameType.HELLO, 0, encode(hello)))
        self.state = "handshaking"
        self._timer = now + RETRY_SECONDS
        self._decoder.max_payload = DEFAULT_MAX_FRAME

    def next_timeout(self) -> float | None:
        return self._timer

    def handle_timeout(self, now: float) -> None:
        if self._timer is None or now < self._timer:
            return
        if self.state == "handshaking":
            self.start(now)
        elif self.state == "resyncing":
            self._send_sync(now)
        else:
            self._timer = None

    def transport_reconnected(self, now: float) -> None:
        """A virtio-serial host end came back: bytes in flight may be lost or cut (§1)."""
        self._decoder.reset()
        if self.state == "handshaking":
            self.start(now)
        elif self.state in ("established", "resyncing"):
            self._lose_sync(now, frame_error=None)

    def poll_event(self):
        return self._events.popleft() if self._events else None

    def receive(self, data: bytes, now: float) -> None:
        if self.state in ("idle", "closed"):
            return
        self._decoder.feed(data)
        while self.state != "closed":
            item = self._decoder.next()
            if item is None:
                return
            if isinstance(item, FramingError):
                if self.state in ("established", "resyncing"):
                    self._lose_sync(now, frame_error=item.code if self.state == "established" else None)
                continue
            self._handle(item, now)

    # -- application commands -------------------------------------------------------------------------------

    def going_away(self) -> bool:
        """The host sent a graceful GOAWAY: nothing opens on this session; its open streams run on."""
        return self._goaway is not None

    def active_streams(self) -> int:
        return len(self._streams)

    def can_open(self) -> bool:
        return (
            self.state == "established"
            and self._goaway is None
            and self.ack is not None
            and len(self._streams) < self.ack.limits.max_concurrent_streams
        )

    def open(self, call: MethodCall) -> int:
        if not self.can_open():
            raise RuntimeError(f"cannot open a stream in state {self.state}")
        stream_id = self._next_id
        self._next_id += 2
        stream = _Stream(
            method=call.method,
            send_credit=self._peer.initial_stream_window,
            recv_window=self.config.receive.initial_stream_window,
        )
        stream.out.append((FrameType.OPEN, encode(call)))
        self._streams[stream_id] = stream
        return stream_id

    def send_data(self, stream_id: int, data: bytes) -> bool:
        """Queues request body bytes; False when the stream is gone (answered with an error, cancelled)."""
        stream = self._streams.get(stream_id)
        if stream is None or stream.end_queued:
            return False
        if data:
            stream.out.append((FrameType.DATA, bytes(data)))
            stream.queued_data += len(data)
        return True

    def send_end(self, stream_id: int, end: End | None = None) -> None:
        stream = self._streams.get(stream_id)
        if stream is None or stream.end_queued:
            return
        stream.out.append((FrameType.END, (end or End()).encode()))
        stream.end_queued = True
        self._maybe_finish(stream_id)

    def cancel(self, stream_id: int) -> None:
        """Abandons a stream: CANCEL goes ahead of queued data; nothing more is sent or delivered for it."""
        stream = self._streams.pop(stream_id, None)
        if stream is None:
            return
        if stream.out and stream.out[0][0] == FrameType.OPEN:
            return  # never written: the host never knew it
        self._control.append(encode_frame(FrameType.CANCEL, stream_id))
        self._regrant(stream.unconsumed)

    def release(self, stream_id: int, amount: int) -> None:
        """The application consumed `amount` bytes of the stream's DATA: grant them back (§6)."""
        stream = self._streams.get(stream_id)
        if stream is None:
            return  # its unconsumed bytes were re-granted when it finished or failed
        self._session_ungranted += amount
        stream.unconsumed -= amount
        stream.ungranted += amount
        half = self.config.receive.initial_stream_window // 2
        if stream.ungranted >= max(1, half) and not stream.remote_ended:
            self._window_update(stream_id, stream.ungranted)
            stream.recv_window += stream.ungranted
            stream.ungranted = 0
        self._grant_session(force=False)

    def queued_data(self, stream_id: int) -> int:
        stream = self._streams.get(stream_id)
        return stream.queued_data if stream is not None else 0

    def ping(self, payload: bytes) -> None:
        if len(payload) != 8:
            raise ValueError("a PING carries 8 bytes")
        self._control.append(encode_frame(FrameType.PING, 0, payload))

    def data_to_send(self, limit: int = 256 * 1024) -> bytes:
        """Bytes to write, session frames and CANCEL first, then each stream's frames in order, DATA within
        the host's credit and max frame. At most about `limit` bytes per call."""
        out = bytearray()
        while self._control:
            out += self._control.popleft()
        if self.state != "established":
            return bytes(out)
        progress = True
        while progress and len(out) < limit:
            progress = False
            for stream_id in list(self._streams):
                stream = self._streams[stream_id]
                if not stream.out:
                    continue
                kind, payload = stream.out[0]
                if kind == FrameType.DATA:
                    room = min(stream.send_credit, self._send_credit, self._peer.max_frame)
                    if room <= 0:
                        continue
                    piece = payload[:room]
                    if len(piece) == len(payload):
                        stream.out.popleft()
                    else:
                        stream.out[0] = (kind, payload[room:])
                    stream.send_credit -= len(piece)
                    self._send_credit -= len(piece)
                    stream.queued_data -= len(piece)
                    out += encode_frame(FrameType.DATA, stream_id, piece)
                else:
                    stream.out.popleft()
                    out += encode_frame(kind, stream_id, payload)
                    if kind == FrameType.END:
                        self._maybe_finish(stream_id)
                progress = True
        return bytes(out)

    # -- inbound --------------------------------------------------------------------------------------------

    def _handle(self, frame: Frame, now: float) -> None:
        kind = frame.kind
        if self.state == "handshaking":
            if kind == FrameType.HELLO_ACK:
                self._on_hello_ack(frame)
            elif kind == FrameType.ERROR and frame.stream_id == 0:
                error = self._decode_error(frame)
                if error is not None and error.details.hello_nonce == self._hello_nonce:
                    self.state = "closed"
                    self._timer = None
                    self._events.append(Refused(error))
                    self._events.append(Closed(f"HELLO refused: {error.code}: {error.message}"))
            return  # everything else is stale or early: dropped (§4.0)
        if self.state == "resyncing" and kind not in (FrameType.SYNC, FrameType.SYNC_ACK, FrameType.ERROR):
            return
        if self.state == "resyncing" and kind == FrameType.ERROR and frame.stream_id != 0:
            return
        if kind is None:
            if not frame.flags & FLAG_IGNORABLE:
                self._control.append(self._error_frame(0, protocol_error(f"unknown frame type {frame.type:#04x}")))
            return
        if kind in (FrameType.HELLO_ACK, FrameType.HELLO):
            return  # a late answer to an earlier HELLO (ours is established), or a HELLO we never accept
        if kind == FrameType.PING:
            if self._fixed(frame, 8):
                self._control.append(encode_frame(FrameType.PONG, 0, frame.payload))
        elif kind == FrameType.PONG:
            if self._fixed(frame, 8):
                self._events.append(Pong(frame.payload))
        elif kind == FrameType.SYNC:
            if self._fixed(frame, 8):
                self._reset_streams("the host resynchronised the session")
                self._reset_credit()
                self._control.append(encode_frame(FrameType.SYNC_ACK, 0, frame.payload))
        elif kind == FrameType.SYNC_ACK:
            if self._fixed(frame, 8) and self.state == "resyncing":
                if int.from_bytes(frame.payload, "big") == self._sync_nonce:
                    self.state = "established"
                    self._timer = None
                    self._events.append(Resynced())
        elif kind == FrameType.WINDOW_UPDATE:
            self._on_window_update(frame)
        elif kind == FrameType.GOAWAY:
            self._on_goaway(frame)
        elif kind == FrameType.ERROR and frame.stream_id == 0:
            error = self._decode_error(frame)
            if error is None:
                return
            if error.code == "session_reset":
                # The host has no session for us (it restarted, or lost ours): start a new one (§4.0, §8).
                self._reset_streams("the host lost the session")
                self._events.append(SessionError(error))
                self.start(now)
            else:
                self._events.append(SessionError(error))
        elif frame.stream_id == 0 or frame.stream_id % 2 == 0:
            self._control.append(self._error_frame(0, protocol_error(f"{frame.name} on stream {frame.stream_id}")))
        else:
            self._on_stream_frame(frame, kind)

    def _on_hello_ack(self, frame: Frame) -> None:
        try:
            ack = HelloAck.from_cbor(loads(frame.payload))
        except PayloadError:
            return
        if ack.nonce != self._hello_nonce:
            return  # stale: an answer to an earlier HELLO
        if ack.version not in self.config.versions or not ack.receive.in_range():
            # Unusable: the requests waiting for this session fail (a new HELLO would get the same answer).
            reason = f"HELLO_ACK with version {ack.version} or receive values out of range"
            self.state = "closed"
            self._timer = None
            self._events.append(Refused(ErrorPayload("protocol_error", reason)))
            self._events.append(Closed(reason))
            return
        self.ack = ack
        self._peer = ack.receive
        self._reset_credit()
        self._decoder.max_payload = self.config.receive.max_frame
        self._next_id = 1
        self._goaway = None
        self.state = "established"
        self._timer = None
        self._events.append(Established(ack))

    def _on_window_update(self, frame: Frame) -> None:
        if len(frame.payload) != 4:
            self._protocol_violation(frame.stream_id, "WINDOW_UPDATE payload is not 4 bytes")
            return
        increment = int.from_bytes(frame.payload, "big")
        if frame.stream_id == 0:
            if increment == 0 or self._send_credit + increment > MAX_WINDOW:
                self._goaway_and_close("bad session WINDOW_UPDATE")
                return
            self._send_credit += increment
            return
        stream = self._streams.get(frame.stream_id)
        if stream is None:
            return  # for a stream that ended: it crossed our END/CANCEL
        if increment == 0 or stream.send_credit + increment > MAX_WINDOW:
            self._protocol_violation(frame.stream_id, "bad stream WINDOW_UPDATE")
            return
        stream.send_credit += increment

    def _on_goaway(self, frame: Frame) -> None:
        try:
            goaway = GoAway.from_cbor(loads(frame.payload))
        except PayloadError:
            return
        self._events.append(GoAwayReceived(goaway))
        if goaway.code == "protocol_error":
            self._reset_streams(f"the host ended the session: {goaway.message}")
            self._close(f"GOAWAY protocol_error: {goaway.message}")
            return
        self._goaway = goaway
        for stream_id in [s for s in self._streams if s > goaway.last_stream_id]:
            self._streams.pop(stream_id)
            self._events.append(StreamFailed(stream_id, session_reset("the host is going away")))

    def _on_stream_frame(self, frame: Frame, kind: FrameType) -> None:
        stream_id = frame.stream_id
        stream = self._streams.get(stream_id)
        if kind == FrameType.DATA:
            self._recv_window -= len(frame.payload)
            if self._recv_window < 0:
                self._goaway_and_close("DATA beyond the session window")
                return
            if stream is None:
                self._regrant(len(frame.payload))  # in flight when the stream ended (§6)
                if stream_id >= self._next_id:
                    self._control.append(self._error_frame(stream_id, protocol_error("DATA on a stream never opened")))
                return
            if not stream.head_seen or stream.remote_ended or len(frame.payload) > stream.recv_window:
                self._regrant(len(frame.payload))
                self._protocol_violation(stream_id, "DATA out of order or beyond the stream window")
                return
            stream.recv_window -= len(frame.payload)
            stream.unconsumed += len(frame.payload)
            self._events.append(Data(stream_id, frame.payload))
            return
        if stream is None:
            # Ids below the next one were opened and have ended: the frame was in flight, drop it. An id
            # never opened is a rule breach on that id (§5.1), but an ERROR or CANCEL is never answered.
            if stream_id >= self._next_id and kind not in (FrameType.ERROR, FrameType.CANCEL):
                self._control.append(self._error_frame(stream_id, protocol_error(f"{frame.name} on a stream never opened")))
            return
        if kind == FrameType.HEAD:
            if stream.head_seen:
                self._protocol_violation(stream_id, "a second HEAD")
                return
            try:
                value = loads(frame.payload)
                if stream.method == METHOD_POLICY_CHECK:
                    head = PolicyDecision.from_cbor(value)
                elif stream.method == METHOD_NET_CONNECT:
                    head = NetConnectHead.from_cbor(value)
                else:
                    head = HttpResponseHead.from_cbor(value)
            except PayloadError as error:
                self._protocol_violation(stream_id, f"bad HEAD: {error}")
                return
            stream.head_seen = True
            self._events.append(Head(stream_id, head))
        elif kind == FrameType.END:
            if not stream.head_seen or stream.remote_ended:
                self._protocol_violation(stream_id, "END before HEAD")
                return
            try:
                end = End.decode(frame.payload)
            except PayloadError as error:
                self._protocol_violation(stream_id, f"bad END: {error}")
                return
            stream.remote_ended = True
            self._events.append(StreamEnd(stream_id, end.trailers))
            self._maybe_finish(stream_id)
        elif kind == FrameType.ERROR:
            error = self._decode_error(frame) or ErrorPayload("internal", "an unreadable ERROR")
            self._streams.pop(stream_id)
            self._regrant(stream.unconsumed)
            self._events.append(StreamFailed(stream_id, error))
        elif kind == FrameType.CANCEL:
            self._streams.pop(stream_id)
            self._regrant(stream.unconsumed)
            self._events.append(StreamFailed(stream_id, ErrorPayload("cancelled", "the host cancelled the stream")))
        else:  # OPEN from the host: version 1 has guest-opened streams only
            self._protocol_violation(stream_id, f"{frame.name} from the host")

    # -- helpers --------------------------------------------------------------------------------------------

    def _maybe_finish(self, stream_id: int) -> None:
        stream = self._streams.get(stream_id)
        if stream is not None and stream.end_queued and not stream.out and stream.remote_ended:
            self._streams.pop(stream_id)
            self._regrant(stream.unconsumed)

    def _fixed(self, frame: Frame, size: int) -> bool:
        if len(frame.payload) != size:
            self._control.append(self._error_frame(0, protocol_error(f"{frame.name} payload is not {size} bytes")))
            return False
        return True

    def _decode_error(self, frame: Frame) -> ErrorPayload | None:
        try:
            return ErrorPayload.from_cbor(loads(frame.payload))
        except PayloadError:
            return None

    def _error_frame(self, stream_id: int, error: ErrorPayload) -> bytes:
        return encode_frame(FrameType.ERROR, stream_id, encode(error))

    def _protocol_violation(self, stream_id: int, message: str) -> None:
        """A frame broke a stream rule: that stream fails (both sides learn why), the session goes on."""
        error = protocol_error(message)
        stream = self._streams.pop(stream_id, None)
        self._control.append(self._error_frame(stream_id, error))
        if stream is not None:
            self._regrant(stream.unconsumed)
            self._events.append(StreamFailed(stream_id, error))

    def _window_update(self, stream_id: int, increment: int) -> None:
        self._control.append(encode_frame(FrameType.WINDOW_UPDATE, stream_id, increment.to_bytes(4, "big")))

    def _regrant(self, amount: int) -> None:
        """Data nobody will consume still returns session credit, at once (§6)."""
        if amount > 0:
            self._session_ungranted += amount
            self._grant_session(force=True)

    def _grant_session(self, force: bool) -> None:
        half = self.config.receive.initial_connection_window // 2
        if self._session_ungranted > 0 and (force or self._session_ungranted >= max(1, half)):
            self._window_update(0, self._session_ungranted)
            self._recv_window += self._session_ungranted
            self._session_ungranted = 0

    def _reset_credit(self) -> None:
        self._send_credit = self._peer.initial_connection_window
        self._recv_window = self.config.receive.initial_connection_window
        self._session_ungranted = 0

    def _reset_streams(self, why: str) -> None:
        streams, self._streams = self._streams, {}
        for stream_id in streams:
            self._events.append(StreamFailed(stream_id, session_reset(why)))

    def _lose_sync(self, now: float, frame_error: str | None) -> None:
        """§8 for the side that lost sync: fail streams, tell the host why, reset credit, SYNC."""
        self._reset_streams("the session lost sync")
        if frame_error is not None:
            self._control.append(self._error_frame(0, protocol_error("framing error", frame_error=frame_error)))
        self._reset_credit()
        self._send_sync(now)

    def _send_sync(self, now: float) -> None:
        self._sync_nonce = secrets.randbits(64)
        self._control.append(encode_frame(FrameType.SYNC, 0, self._sync_nonce.to_bytes(8, "big")))
        self.state = "resyncing"
        self._timer = now + RETRY_SECONDS

    def _goaway_and_close(self, message: str) -> None:
        last = max(self._streams, default=0)
        goaway = GoAway("protocol_error", message, last)
        self._control.append(encode_frame(FrameType.GOAWAY, 0, encode(goaway)))
        self._reset_streams(message)
        self._close(message)

    def _close(self, reason: str) -> None:
        self.state = "closed"
        self._timer = None
        self._events.append(Closed(reason))
