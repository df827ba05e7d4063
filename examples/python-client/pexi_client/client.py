"""A blocking client over the sans-IO session. One I/O thread owns the transport in both directions (a
virtio-serial port must not have a blocked writer beside a poller) and the session; application threads
hand it commands through a queue and wait on per-request queues. Any number of threads may make requests
at once: they share one session, multiplexed as streams.
"""

from __future__ import annotations

import json
import os
import queue
import secrets
import selectors
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

from .payload import (
    METHOD_HTTP_REQUEST,
    METHOD_POLICY_CHECK,
    ErrorPayload,
    HeaderField,
    HttpRequest,
    HttpResponseHead,
    MethodCall,
    PolicyDecision,
    ReceiveParams,
)
from .session import (
    Closed,
    Config,
    Data,
    Established,
    Head,
    Refused,
    Session,
    StreamEnd,
    StreamFailed,
)
from .transport import Endpoint

#: Request body bytes queued ahead of the PEP's credit, per request.
UPLOAD_BUFFER = 256 * 1024
#: A virtio-serial port reads 0 bytes while the host end is closed; poll it at this pace meanwhile.
HOST_AWAY_POLL = 0.05


class PexiError(Exception):
    """A request the PEP refused or could not perform. `code` is the protocol's (`policy_denied`, ...) or
    the client's own: `connect` (no PEP reachable), `closed` (the client was closed)."""

    def __init__(self, code: str, message: str, retryable: bool = False, reasons=(), decision_id=None, details=None):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.retryable = retryable
        self.reasons = list(reasons)
        self.decision_id = decision_id
        self.details = details

    @classmethod
    def from_payload(cls, error: ErrorPayload) -> "PexiError":
        return cls(
            error.known_code,
            error.message,
            error.retryable,
            error.details.reasons or (),
            error.details.decision_id,
            error.details,
        )


@dataclass
class _Call:
    call: MethodCall
    since: float
    events: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    opened: threading.Event = field(default_factory=threading.Event)
    room: threading.Condition = field(default_factory=threading.Condition)
    stream_id: int | None = None
    queued: int = 0
    done: bool = False
    failure: PexiError | None = None


class Response:
    """A response whose body streams as it arrives. Closing it before the end cancels the request."""

    def __init__(self, client: "Client", call: _Call, head: HttpResponseHead):
        self._client = client
        self._call = call
        self.status = head.status
        self.headers = [(h.name, h.value) for h in head.headers]
        self.final_url = head.final_url
        self.redirect_count = head.redirect_count
        self.decision_id = head.decision_id
        self._finished = False

    def header(self, name: str) -> bytes | None:
        name = name.lower()
        return next((value for key, value in self.headers if key.lower() == name), None)

    def iter_bytes(self) -> Iterator[bytes]:
        """The body, chunk by chunk as DATA arrives; raises PexiError after the data before a failure."""
        while not self._finished:
            event = self._call.events.get()
            if isinstance(event, Data):
                self._client._submit(lambda io, sid=event.stream_id, n=len(event.data): io.release(sid, n))
                yield event.data
            elif isinstance(event, StreamEnd):
                self._finished = True
            elif isinstance(event, StreamFailed):
                self._finished = True
                raise PexiError.from_payload(event.error)

    def read(self) -> bytes:
        return b"".join(self.iter_bytes())

    def text(self) -> str:
        return self.read().decode("utf-8", "replace")

    def json(self):
        return json.loads(self.read())

    def close(self) -> None:
        if not self._finished:
            self._finished = True
            self._client._submit(lambda io, call=self._call: io.cancel(call))

    def __enter__(self) -> "Response":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Client:
    """`Client("unix:/run/user/1000/pexi/pep.sock")`, or `Client()` for `PEXI_ENDPOINT` / the default virtio port."""

    def __init__(
        self,
        endpoint: str | Endpoint | None = None,
        *,
        versions: tuple[int, ...] = (1,),
        receive: ReceiveParams | None = None,
        connect_timeout: float = 10.0,
        keepalive: float = 15.0,
    ):
        if endpoint is None:
            endpoint = Endpoint.from_env()
        elif isinstance(endpoint, str):
            endpoint = Endpoint.parse(endpoint)
        self.endpoint = endpoint
        self._config = Config(receive=receive or ReceiveParams(), versions=versions)
        self._connect_timeout = connect_timeout
        # A virtio-serial port never reports that the host went away or lost bytes: after this much
        # silence the client PINGs, and after as much again with no answer it resynchronises (§8), which a
        # host without our session answers with session_reset (and the client starts over).
        self._keepalive = keepalive
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._closing = False
        self._io = _Io(self)
        self._thread = threading.Thread(target=self._io.run, name="pexi-client-io", daemon=True)
        self._thread.start()

    # -- public API -----------------------------------------------------------------------------------------

    def request(
        self,
        method: str,
        url: str,
        *,
        headers: Iterable[tuple[str, str | bytes]] = (),
        body: bytes | str | Iterable[bytes] | None = None,
        redirect: str = "follow",
        timeout_ms: int | None = None,
    ) -> Response:
        """Performs `method url` through the PEP and returns once the response head arrived."""
        if isinstance(body, str):
            body = body.encode()
        fields = tuple(HeaderField(name, value.encode("latin-1") if isinstance(value, str) else bytes(value)) for name, value in headers)
        params = HttpRequest(
            method=method,
            url=url,
            headers=fields,
            content_length=len(body) if isinstance(body, (bytes, bytearray)) else None,
            redirect=redirect,
            timeout_ms=timeout_ms,
        )
        call = self._start(MethodCall(METHOD_HTTP_REQUEST, params))
        try:
            if body is not None:
                self._upload(call, [bytes(body)] if isinstance(body, (bytes, bytearray)) else body)
            self._submit(lambda io: io.end(call))
            event = call.events.get()
        except BaseException:
            self._submit(lambda io: io.cancel(call))
            raise
        if isinstance(event, StreamFailed):
            raise PexiError.from_payload(event.error)
        assert isinstance(event, Head) and isinstance(event.head, HttpResponseHead)
        return Response(self, call, event.head)

    def get(self, url: str, **kwargs) -> Response:
        return self.request("GET", url, **kwargs)

    def check(self, method: str, url: str) -> PolicyDecision:
        """The policy's decision on `method url`; nothing is performed (`pep.policy.check`)."""
        call = self._start(MethodCall(METHOD_POLICY_CHECK, HttpRequest(method, url)))
        self._submit(lambda io: io.end(call))
        event = call.events.get()
        if isinstance(event, StreamFailed):
            raise PexiError.from_payload(event.error)
        # The host ends the stream after the decision; drain it so the stream finishes.
        while not isinstance(call.events.get(), (StreamEnd, StreamFailed)):
            pass
        return event.head

    @property
    def session(self):
        """The HelloAck of the current session (None before the first request connects)."""
        return self._io.ack

    def close(self) -> None:
        if not self._closing:
            self._closing = True
            self._wake()
            self._thread.join(timeout=5)
            # Closed here, not by the I/O thread: it may stop between the flag and the wake-up write.
            os.close(self._wake_r)
            os.close(self._wake_w)

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- plumbing -------------------------------------------------------------------------------------------

    def _start(self, method_call: MethodCall) -> _Call:
        if self._closing:
            raise PexiError("closed", "the client is closed")
        call = _Call(method_call, time.monotonic())
        self._submit(lambda io: io.waiting.append(call))
        call.opened.wait()
        if call.failure is not None:
            raise call.failure
        return call

    def _upload(self, call: _Call, chunks: Iterable[bytes]) -> None:
        for chunk in chunks:
            if not chunk:
                continue
            with call.room:
                # Backpressure: wait until the PEP took most of what was queued.
                call.room.wait_for(lambda: call.done or call.queued < UPLOAD_BUFFER)
                if call.done:
                    return  # answered or failed early: the head (or error) says what happened
                call.queued += len(chunk)
            self._submit(lambda io, data=bytes(chunk): io.send_data(call, data))

    def _submit(self, command: Callable[["_Io"], None]) -> None:
        self._commands.put(command)
        self._wake()

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"\0")
        except BlockingIOError:
            pass  # already awake


class _Io:
    """Everything the I/O thread owns: the transport, the session and the calls in flight."""

    def __init__(self, client: Client):
        self.client = client
        self.session: Session | None = None
        self.ack = None
        self.fd: int | None = None
        self.out = bytearray()
        self.waiting: deque[_Call] = deque()
        self.calls: dict[int, _Call] = {}
        self.selector = selectors.DefaultSelector()
        self.selector.register(client._wake_r, selectors.EVENT_READ, "wake")
        self.host_away_until = 0.0
        self.connect_error = ""
        self.last_heard = 0.0
        self.pinged_at: float | None = None

    # Commands (run on the I/O thread)

    def send_data(self, call: _Call, data: bytes) -> None:
        if call.stream_id is None or self.session is None or not self.session.send_data(call.stream_id, data):
            self._finish(call)

    def end(self, call: _Call) -> None:
        if call.stream_id is not None and self.session is not None:
            self.session.send_end(call.stream_id)

    def cancel(self, call: _Call) -> None:
        if call in self.waiting:
            self.waiting.remove(call)
        if call.stream_id is not None and self.session is not None:
            self.session.cancel(call.stream_id)
            self.calls.pop(call.stream_id, None)
        self._finish(call)

    def release(self, stream_id: int, amount: int) -> None:
        if self.session is not None:
            self.session.release(stream_id, amount)

    # The loop

    def run(self) -> None:
        client = self.client
        try:
            while not client._closing:
                now = time.monotonic()
                self._connect_if_needed(now)
                self._step(now)
        finally:
            self._fail_everything(PexiError("closed", "the client is closed"))
            self._close_transport()
            self.selector.close()

    def _keepalive(self, now: float) -> None:
        session = self.session
        if session is None or session.state != "established":
            return
        interval = self.client._keepalive
        if self.pinged_at is None:
            if now - self.last_heard >= interval:
                session.ping(secrets.token_bytes(8))
                self.pinged_at = now
        elif now - self.pinged_at >= interval:
            self.pinged_at = None
            self.last_heard = now
            session.transport_reconnected(now)

    def _step(self, now: float) -> None:
        session = self.session
        timeout = min(0.5, self.client._keepalive / 2)
        if session is not None and session.next_timeout() is not None:
            timeout = max(0.0, min(timeout, session.next_timeout() - now))
        if self.waiting and self.fd is None:
            timeout = min(timeout, 0.1)  # retrying the connection
        if self.fd is not None:
            wanted = selectors.EVENT_WRITE if self.out else 0
            if now >= self.host_away_until:
                wanted |= selectors.EVENT_READ
            if wanted:
                self.selector.modify(self.fd, wanted)
            else:
                self.selector.modify(self.fd, selectors.EVENT_READ)
                timeout = min(timeout, max(0.0, self.host_away_until - now))
        for key, mask in self.selector.select(timeout):
            if key.data == "wake":
                try:
                    while os.read(self.client._wake_r, 4096):
                        pass
                except BlockingIOError:
                    pass
                continue
            if mask & selectors.EVENT_READ and not self._read():
                return
            if mask & selectors.EVENT_WRITE and self.fd is not None:
                self._write()
        while True:
            try:
                command = self.client._commands.get_nowait()
            except queue.Empty:
                break
            command(self)
        if self.session is not None:
            self._keepalive(time.monotonic())
            self.session.handle_timeout(time.monotonic())
            self._dispatch()
        if self.session is not None:
            self._open_waiting()
            self.out += self.session.data_to_send()
            self._update_room()
            if self.out and self.fd is not None:
                self._write()
            if self.session.going_away() and self.session.active_streams() == 0 and not self.out:
                # The host's GOAWAY is honoured (every stream it promised finished): requests that came
                # meanwhile wait for a new connection.
                self._close_transport()

    def _connect_if_needed(self, now: float) -> None:
        if self.fd is not None or not self.waiting:
            return
        try:
            self.fd = self.client.endpoint.open()
        except OSError as error:
            self.connect_error = str(error)
            for call in [c for c in self.waiting if now - c.since > self.client._connect_timeout]:
                self.waiting.remove(call)
                call.failure = PexiError(
                    "connect", f"cannot reach the PEP at {self.client.endpoint}: {error}", retryable=True
                )
                self._finish(call)
            return
        self.selector.register(self.fd, selectors.EVENT_READ, "transport")
        self.session = Session(self.client._config)
        self.session.start(now)
        self.last_heard = now
        self.pinged_at = None

    def _read(self) -> bool:
        try:
            data = os.read(self.fd, 65536)
        except BlockingIOError:
            return True
        except OSError as error:
            self._transport_lost(f"read: {error}")
            return False
        if not data:
            if self.client.endpoint.is_stream_socket:
                self._transport_lost("the PEP closed the connection")
                return False
            # A virtio-serial port with the host end closed: not the end; look again shortly.
            self.host_away_until = time.monotonic() + HOST_AWAY_POLL
            return True
        self.last_heard = time.monotonic()
        self.pinged_at = None
        self.session.receive(data, self.last_heard)
        return True

    def _write(self) -> None:
        try:
            written = os.write(self.fd, self.out)
        except BlockingIOError:
            return
        except OSError as error:
            self._transport_lost(f"write: {error}")
            return
        del self.out[:written]

    def _transport_lost(self, why: str) -> None:
        self._fail_everything(PexiError("session_reset", why, retryable=True), keep_waiting=True)
        self._close_transport()

    def _close_transport(self) -> None:
        if self.fd is not None:
            self.selector.unregister(self.fd)
            os.close(self.fd)
            self.fd = None
        self.session = None
        self.ack = None
        self.out.clear()

    def _dispatch(self) -> None:
        while (event := self.session.poll_event()) is not None:
            if isinstance(event, Established):
                self.ack = event.ack
            elif isinstance(event, Refused):
                error = PexiError.from_payload(event.error)
                for call in list(self.waiting):
                    call.failure = error
                    self._finish(call)
                self.waiting.clear()
            elif isinstance(event, Closed):
                self._fail_everything(PexiError("session_reset", event.reason, retryable=True), keep_waiting=True)
                # What the session still has to say (a GOAWAY protocol_error) goes out before the close.
                self.out += self.session.data_to_send()
                if self.out and self.fd is not None:
                    self._write()
                self._close_transport()
                return
            elif isinstance(event, (Head, Data, StreamEnd, StreamFailed)):
                call = self.calls.get(event.stream_id)
                if call is None:
                    continue
                call.events.put(event)
                if isinstance(event, (StreamEnd, StreamFailed)):
                    self.calls.pop(event.stream_id, None)
                    self._finish(call)
                elif isinstance(event, Head):
                    # Once answered, the rest of an upload would go nowhere the application can see.
                    with call.room:
                        call.room.notify_all()

    def _open_waiting(self) -> None:
        session = self.session
        while self.waiting and session is not None and session.can_open():
            call = self.waiting.popleft()
            call.stream_id = session.open(call.call)
            self.calls[call.stream_id] = call
            call.opened.set()

    def _update_room(self) -> None:
        for stream_id, call in self.calls.items():
            queued = self.session.queued_data(stream_id)
            if queued != call.queued:
                with call.room:
                    call.queued = queued
                    call.room.notify_all()

    def _finish(self, call: _Call) -> None:
        with call.room:
            call.done = True
            call.room.notify_all()
        call.opened.set()

    def _fail_everything(self, error: PexiError, keep_waiting: bool = False) -> None:
        for call in list(self.calls.values()):
            call.events.put(StreamFailed(call.stream_id or 0, ErrorPayload(error.code, error.message, error.retryable)))
            self._finish(call)
        self.calls.clear()
        if not keep_waiting:
            for call in self.waiting:
                call.failure = error
                self._finish(call)
            self.waiting.clear()
