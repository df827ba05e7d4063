"""Payloads (§3–§7): typed messages, their deterministic CBOR form, and the JSON mapping of §10.

Encoding follows §3: one map with text keys in the order the spec lists them, shortest-form integers,
definite lengths, absent optional fields omitted. cbor2 keeps dict insertion order and writes integers and
lengths in shortest form, so building each map in spec order gives the golden bytes. Decoding accepts
keys in any order, ignores unknown keys and rejects trailing bytes.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass, field
from typing import Any

import cbor2

PROTOCOL_VERSION = 1
MAX_NESTING = 32


class PayloadError(ValueError):
    """A payload that is not valid CBOR or not the message expected; maps to `invalid_request` /
    `protocol_error` depending on where it arrived."""


# ---------------------------------------------------------------------------------------------------------
# CBOR in and out


def dumps(value: Any) -> bytes:
    return cbor2.dumps(value)


def _depth(value: Any, level: int = 1) -> None:
    if level > MAX_NESTING:
        raise PayloadError(f"CBOR nested deeper than {MAX_NESTING} levels")
    if isinstance(value, dict):
        for item in value.values():
            _depth(item, level + 1)
    elif isinstance(value, list):
        for item in value:
            _depth(item, level + 1)


def loads(data: bytes) -> Any:
    """Exactly one CBOR item (§3: trailing bytes are an error)."""
    stream = io.BytesIO(data)
    try:
        value = cbor2.CBORDecoder(stream).decode()
    except Exception as error:  # cbor2 raises several types for malformed input
        raise PayloadError(f"not CBOR: {error}") from error
    if stream.tell() != len(data):
        raise PayloadError(f"{len(data) - stream.tell()} bytes after the CBOR item")
    _depth(value)
    return value


def _map(value: Any, what: str) -> dict:
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise PayloadError(f"{what} is not a map with text keys")
    return value


def _get(value: dict, key: str, kind: type | tuple, what: str, default: Any = ...) -> Any:
    if key not in value or value[key] is None:  # §10: null is accepted as absent
        if default is ...:
            raise PayloadError(f"{what} has no {key!r}")
        return default
    item = value[key]
    if kind is int and (isinstance(item, bool) or not isinstance(item, int) or item < 0):
        raise PayloadError(f"{what}.{key} is not an unsigned integer")
    if not isinstance(item, kind):
        raise PayloadError(f"{what}.{key} has the wrong type")
    return item


def _uint(value: int, bits: int, what: str) -> int:
    if value >= 1 << bits:
        raise PayloadError(f"{what} does not fit in {bits} bits")
    return value


# ---------------------------------------------------------------------------------------------------------
# Headers


@dataclass(frozen=True)
class HeaderField:
    """`[name: text, value: bytes]`: values are octets, not necessarily UTF-8 (§3)."""

    name: str
    value: bytes

    def to_cbor(self) -> list:
        return [self.name, bytes(self.value)]

    @staticmethod
    def from_cbor(value: Any) -> "HeaderField":
        if not (isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], bytes)):
            raise PayloadError("a header field is not [text, bytes]")
        return HeaderField(value[0], value[1])


def _headers(value: Any, what: str) -> list[HeaderField]:
    if not isinstance(value, list):
        raise PayloadError(f"{what} is not an array")
    return [HeaderField.from_cbor(item) for item in value]


# ---------------------------------------------------------------------------------------------------------
# Handshake (§4.1)


@dataclass(frozen=True)
class Implementation:
    name: str
    version: str

    def to_cbor(self) -> dict:
        return {"name": self.name, "version": self.version}

    @staticmethod
    def from_cbor(value: Any) -> "Implementation":
        value = _map(value, "implementation")
        return Implementation(_get(value, "name", str, "implementation"), _get(value, "version", str, "implementation"))


@dataclass(frozen=True)
class ReceiveParams:
    max_frame: int = 65_536
    initial_stream_window: int = 262_144
    initial_connection_window: int = 1_048_576

    def to_cbor(self) -> dict:
        return {
            "max_frame": self.max_frame,
            "initial_stream_window": self.initial_stream_window,
            "initial_connection_window": self.initial_connection_window,
        }

    def in_range(self) -> bool:
        limit = (1 << 31) - 1
        return (
            4_096 <= self.max_frame <= 16_777_216
            and 1 <= self.initial_stream_window <= limit
            and 1 <= self.initial_connection_window <= limit
        )

    @staticmethod
    def from_cbor(value: Any) -> "ReceiveParams":
        value = _map(value, "receive")
        return ReceiveParams(
            _uint(_get(value, "max_frame", int, "receive"), 32, "receive.max_frame"),
            _uint(_get(value, "initial_stream_window", int, "receive"), 32, "receive.initial_stream_window"),
            _uint(_get(value, "initial_connection_window", int, "receive"), 32, "receive.initial_connection_window"),
        )


@dataclass(frozen=True)
class Hello:
    nonce: int
    implementation: Implementation
    receive: ReceiveParams = ReceiveParams()
    versions: tuple[int, ...] = (PROTOCOL_VERSION,)
    features: tuple[str, ...] = ()

    def to_cbor(self) -> dict:
        return {
            "versions": list(self.versions),
            "nonce": self.nonce,
            "implementation": self.implementation.to_cbor(),
            "features": list(self.features),
            "receive": self.receive.to_cbor(),
        }

    @staticmethod
    def from_cbor(value: Any) -> "Hello":
        value = _map(value, "Hello")
        return Hello(
            versions=tuple(_uint(v, 16, "versions[]") for v in _get(value, "versions", list, "Hello")),
            nonce=_uint(_get(value, "nonce", int, "Hello"), 64, "nonce"),
            implementation=Implementation.from_cbor(_get(value, "implementation", dict, "Hello")),
            features=tuple(_get(value, "features", list, "Hello", [])),
            receive=ReceiveParams.from_cbor(_get(value, "receive", dict, "Hello")),
        )


@dataclass(frozen=True)
class Limits:
    max_concurrent_streams: int
    max_request_bytes: int
    max_response_bytes: int
    max_redirects: int
    connect_timeout_ms: int
    idle_timeout_ms: int
    total_timeout_ms: int

    KEYS = (
        "max_concurrent_streams",
        "max_request_bytes",
        "max_response_bytes",
        "max_redirects",
        "connect_timeout_ms",
        "idle_timeout_ms",
        "total_timeout_ms",
    )

    def to_cbor(self) -> dict:
        return {key: getattr(self, key) for key in self.KEYS}

    @staticmethod
    def from_cbor(value: Any) -> "Limits":
        value = _map(value, "limits")
        return Limits(*(_get(value, key, int, "limits") for key in Limits.KEYS))


@dataclass(frozen=True)
class HelloAck:
    version: int
    nonce: int
    session_id: int
    implementation: Implementation
    receive: ReceiveParams
    limits: Limits
    features: tuple[str, ...] = ()
    policy_revision: str | None = None

    def to_cbor(self) -> dict:
        value = {
            "version": self.version,
            "nonce": self.nonce,
            "session_id": self.session_id,
            "implementation": self.implementation.to_cbor(),
            "features": list(self.features),
            "receive": self.receive.to_cbor(),
            "limits": self.limits.to_cbor(),
        }
        if self.policy_revision is not None:
            value["policy_revision"] = self.policy_revision
        return value

    @staticmethod
    def from_cbor(value: Any) -> "HelloAck":
        value = _map(value, "HelloAck")
        return HelloAck(
            version=_uint(_get(value, "version", int, "HelloAck"), 16, "version"),
            nonce=_uint(_get(value, "nonce", int, "HelloAck"), 64, "nonce"),
            session_id=_uint(_get(value, "session_id", int, "HelloAck"), 64, "session_id"),
            implementation=Implementation.from_cbor(_get(value, "implementation", dict, "HelloAck")),
            features=tuple(_get(value, "features", list, "HelloAck", [])),
            receive=ReceiveParams.from_cbor(_get(value, "receive", dict, "HelloAck")),
            limits=Limits.from_cbor(_get(value, "limits", dict, "HelloAck")),
            policy_revision=_get(value, "policy_revision", str, "HelloAck", None),
        )


@dataclass(frozen=True)
class GoAway:
    code: str
    message: str
    last_stream_id: int

    def to_cbor(self) -> dict:
        return {"code": self.code, "message": self.message, "last_stream_id": self.last_stream_id}

    @staticmethod
    def from_cbor(value: Any) -> "GoAway":
        value = _map(value, "GoAway")
        return GoAway(
            _get(value, "code", str, "GoAway"),
            _get(value, "message", str, "GoAway"),
            _uint(_get(value, "last_stream_id", int, "GoAway"), 32, "last_stream_id"),
        )


# ---------------------------------------------------------------------------------------------------------
# Methods (§5)

REDIRECT_MODES = ("follow", "manual", "error")


@dataclass(frozen=True)
class HttpRequest:
    method: str
    url: str
    headers: tuple[HeaderField, ...] = ()
    content_length: int | None = None
    redirect: str = "follow"
    timeout_ms: int | None = None

    def to_cbor(self) -> dict:
        if self.redirect not in REDIRECT_MODES:
            raise PayloadError(f"redirect mode {self.redirect!r} is not one of {REDIRECT_MODES}")
        value: dict = {"method": self.method, "url": self.url, "headers": [h.to_cbor() for h in self.headers]}
        if self.content_length is not None:
            value["content_length"] = self.content_length
        value["redirect"] = self.redirect
        if self.timeout_ms is not None:
            value["timeout_ms"] = self.timeout_ms
        return value

    @staticmethod
    def from_cbor(value: Any) -> "HttpRequest":
        value = _map(value, "HttpRequest")
        redirect = _get(value, "redirect", str, "HttpRequest", "follow")
        if redirect not in REDIRECT_MODES:
            raise PayloadError(f"redirect mode {redirect!r}")
        return HttpRequest(
            method=_get(value, "method", str, "HttpRequest"),
            url=_get(value, "url", str, "HttpRequest"),
            headers=tuple(_headers(_get(value, "headers", list, "HttpRequest", []), "headers")),
            content_length=_get(value, "content_length", int, "HttpRequest", None),
            redirect=redirect,
            timeout_ms=_get(value, "timeout_ms", int, "HttpRequest", None),
        )


METHOD_HTTP_REQUEST = "pep.http.request"
METHOD_POLICY_CHECK = "pep.policy.check"
METHOD_NET_CONNECT = "pep.net.connect"


@dataclass(frozen=True)
class NetConnect:
    """Parameters of pep.net.connect (§5.6): an opaque tunnel to host:port."""

    host: str
    port: int

    def to_cbor(self) -> dict:
        return {"host": self.host, "port": self.port}

    @staticmethod
    def from_cbor(value: Any) -> "NetConnect":
        value = _map(value, "NetConnect")
        return NetConnect(
            host=_get(value, "host", str, "NetConnect"),
            port=_uint(_get(value, "port", int, "NetConnect"), 16, "port"),
        )


@dataclass(frozen=True)
class MethodCall:
    """The OPEN payload: pep.http.request and pep.policy.check take an HttpRequest, pep.net.connect a
    NetConnect."""

    method: str
    params: HttpRequest | NetConnect

    def to_cbor(self) -> dict:
        return {"method": self.method, "params": self.params.to_cbor()}

    @staticmethod
    def from_cbor(value: Any) -> "MethodCall":
        value = _map(value, "MethodCall")
        method = _get(value, "method", str, "MethodCall")
        params = _get(value, "params", dict, "MethodCall")
        if method in (METHOD_HTTP_REQUEST, METHOD_POLICY_CHECK):
            return MethodCall(method, HttpRequest.from_cbor(params))
        if method == METHOD_NET_CONNECT:
            return MethodCall(method, NetConnect.from_cbor(params))
        raise PayloadError(f"unknown method {method!r}")


@dataclass(frozen=True)
class HttpResponseHead:
    status: int
    headers: tuple[HeaderField, ...]
    final_url: str
    redirect_count: int
    decision_id: str

    def to_cbor(self) -> dict:
        return {
            "status": self.status,
            "headers": [h.to_cbor() for h in self.headers],
            "final_url": self.final_url,
            "redirect_count": self.redirect_count,
            "decision_id": self.decision_id,
        }

    @staticmethod
    def from_cbor(value: Any) -> "HttpResponseHead":
        value = _map(value, "HttpResponseHead")
        return HttpResponseHead(
            status=_uint(_get(value, "status", int, "HttpResponseHead"), 16, "status"),
            headers=tuple(_headers(_get(value, "headers", list, "HttpResponseHead", []), "headers")),
            final_url=_get(value, "final_url", str, "HttpResponseHead"),
            redirect_count=_uint(_get(value, "redirect_count", int, "HttpResponseHead"), 32, "redirect_count"),
            decision_id=_get(value, "decision_id", str, "HttpResponseHead"),
        )


@dataclass(frozen=True)
class PolicyDecision:
    allow: bool
    reasons: tuple[str, ...]
    decision_id: str

    def to_cbor(self) -> dict:
        return {"allow": self.allow, "reasons": list(self.reasons), "decision_id": self.decision_id}

    @staticmethod
    def from_cbor(value: Any) -> "PolicyDecision":
        value = _map(value, "PolicyDecision")
        return PolicyDecision(
            allow=_get(value, "allow", bool, "PolicyDecision"),
            reasons=tuple(_get(value, "reasons", list, "PolicyDecision", [])),
            decision_id=_get(value, "decision_id", str, "PolicyDecision"),
        )


@dataclass(frozen=True)
class NetConnectHead:
    """HEAD of pep.net.connect: the tunnel is open."""

    address: str
    decision_id: str

    def to_cbor(self) -> dict:
        return {"address": self.address, "decision_id": self.decision_id}

    @staticmethod
    def from_cbor(value: Any) -> "NetConnectHead":
        value = _map(value, "NetConnectHead")
        return NetConnectHead(
            address=_get(value, "address", str, "NetConnectHead"),
            decision_id=_get(value, "decision_id", str, "NetConnectHead"),
        )


@dataclass(frozen=True)
class End:
    """END with trailers; END without them has an empty payload (§5.4)."""

    trailers: tuple[HeaderField, ...] = ()

    def encode(self) -> bytes:
        return dumps({"trailers": [t.to_cbor() for t in self.trailers]}) if self.trailers else b""

    @staticmethod
    def decode(payload: bytes) -> "End":
        if not payload:
            return End()
        value = _map(loads(payload), "End")
        return End(tuple(_headers(_get(value, "trailers", list, "End", []), "trailers")))


# ---------------------------------------------------------------------------------------------------------
# Errors (§7)

ERROR_CODES = (
    "policy_denied",
    "invalid_request",
    "method_not_found",
    "unsupported_version",
    "protocol_error",
    "body_too_large",
    "response_too_large",
    "too_many_redirects",
    "redirect_not_allowed",
    "blocked_address",
    "secret_not_allowed",
    "dns_failure",
    "upstream_connect",
    "upstream_tls",
    "upstream_timeout",
    "cancelled",
    "resource_exhausted",
    "session_reset",
    "guest_stalled",
    "audit_unavailable",
    "internal",
)


@dataclass(frozen=True)
class ErrorDetails:
    reasons: tuple[str, ...] | None = None
    decision_id: str | None = None
    limit: int | None = None
    supported_versions: tuple[int, ...] | None = None
    hello_nonce: int | None = None
    frame_error: str | None = None

    KEYS = ("reasons", "decision_id", "limit", "supported_versions", "hello_nonce", "frame_error")

    def to_cbor(self) -> dict:
        value = {}
        for key in self.KEYS:
            item = getattr(self, key)
            if item is not None:
                value[key] = list(item) if isinstance(item, tuple) else item
        return value

    @staticmethod
    def from_cbor(value: Any) -> "ErrorDetails":
        value = _map(value, "ErrorDetails")
        reasons = _get(value, "reasons", list, "details", None)
        versions = _get(value, "supported_versions", list, "details", None)
        return ErrorDetails(
            reasons=tuple(reasons) if reasons is not None else None,
            decision_id=_get(value, "decision_id", str, "details", None),
            limit=_get(value, "limit", int, "details", None),
            supported_versions=tuple(versions) if versions is not None else None,
            hello_nonce=_get(value, "hello_nonce", int, "details", None),
            frame_error=_get(value, "frame_error", str, "details", None),
        )


@dataclass(frozen=True)
class ErrorPayload:
    code: str
    message: str
    retryable: bool = False
    details: ErrorDetails = field(default_factory=ErrorDetails)

    def to_cbor(self) -> dict:
        value = {"code": self.code, "message": self.message, "retryable": self.retryable}
        details = self.details.to_cbor()
        if details:
            value["details"] = details
        return value

    @property
    def known_code(self) -> str:
        """The code, or `internal` for one this client does not know (§7)."""
        return self.code if self.code in ERROR_CODES else "internal"

    @staticmethod
    def from_cbor(value: Any) -> "ErrorPayload":
        value = _map(value, "ErrorPayload")
        return ErrorPayload(
            code=_get(value, "code", str, "ErrorPayload"),
            message=_get(value, "message", str, "ErrorPayload"),
            retryable=_get(value, "retryable", bool, "ErrorPayload", False),
            details=ErrorDetails.from_cbor(_get(value, "details", dict, "ErrorPayload", {})),
        )


def encode(message: Any) -> bytes:
    """The CBOR bytes of a typed message."""
    return dumps(message.to_cbor())


# ---------------------------------------------------------------------------------------------------------
# The JSON mapping (§10)


def to_json(value: Any) -> Any:
    """A decoded CBOR value in the JSON form of §10: byte strings become padded base64 text."""
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, dict):
        return {key: to_json(item) for key, item in value.items()}
    if isinstance(value, list):
        return [to_json(item) for item in value]
    return value
