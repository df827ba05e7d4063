"""Python encodes, the Rust reference decodes: beyond the fixed golden vectors, messages with edge values
(64-bit extremes, non-UTF-8 header values, non-ASCII text, every optional field present and absent) go
through `pexi-example-frame-trace --decode`, which reads each frame with the Rust codec, maps its payload to
JSON (§10) and re-encodes its typed value. Both must agree with Python byte for byte."""

from __future__ import annotations

import json
import subprocess

import pytest
from conftest import REPO

from pexi_client import payload as p
from pexi_client.frame import FLAG_IGNORABLE, FrameType, encode_frame

U64 = 2**64 - 1
U32 = 2**32 - 1

IMPL = p.Implementation("pexi-python", "0.1.0 ünïcode")
LIMITS = p.Limits(U32, U64, 0, 0, U64, 1, U64)
HEADERS = (p.HeaderField("x-binary", b"\x00\xff\x80 raw"), p.HeaderField("set-cookie", b"a=1"), p.HeaderField("set-cookie", b"b=2"))

MESSAGES = [
    ("hello", FrameType.HELLO, 0, p.encode(p.Hello(nonce=U64, implementation=IMPL, versions=(1, 2, 65535), features=("x-future",)))),
    ("hello-min", FrameType.HELLO, 0, p.encode(p.Hello(nonce=0, implementation=IMPL, receive=p.ReceiveParams(4096, 1, 1)))),
    (
        "hello-ack",
        FrameType.HELLO_ACK,
        0,
        p.encode(p.HelloAck(1, U64, 0, IMPL, p.ReceiveParams(16_777_216, 2**31 - 1, 2**31 - 1), LIMITS, ("f",), "sha256:" + "ab" * 32)),
    ),
    ("goaway", FrameType.GOAWAY, 0, p.encode(p.GoAway("session_reset", "bye ✓", U32))),
    (
        "open-everything",
        FrameType.OPEN,
        U32,
        p.encode(p.MethodCall(p.METHOD_HTTP_REQUEST, p.HttpRequest("PATCH", "https://例え.jp/パス?q=1", HEADERS, U64, "error", U64))),
    ),
    ("open-minimal", FrameType.OPEN, 1, p.encode(p.MethodCall(p.METHOD_POLICY_CHECK, p.HttpRequest("GET", "http://a/")))),
    (
        "head",
        FrameType.HEAD,
        3,
        p.encode(p.HttpResponseHead(599, HEADERS, "https://b.example/", U32, "d-" + "9" * 40)),
    ),
    ("head-no-headers", FrameType.HEAD, 3, p.encode(p.HttpResponseHead(200, (), "http://a/", 0, ""))),
    ("decision", FrameType.HEAD, 5, p.encode(p.PolicyDecision(True, ("r1", "r2 ✓"), "d"))),
    ("end-trailers", FrameType.END, 7, p.End(HEADERS).encode()),
    ("end", FrameType.END, 7, b""),
    (
        "error-all-details",
        FrameType.ERROR,
        9,
        p.encode(p.ErrorPayload("resource_exhausted", "m", True, p.ErrorDetails(("a",), "d", U64, (1, 65535), U64, "bad_magic"))),
    ),
    ("error-no-details", FrameType.ERROR, 0, p.encode(p.ErrorPayload("future_code", "unknown codes pass through"))),
    ("ping", FrameType.PING, 0, b"\x00\xff" * 4),
    ("window-update", FrameType.WINDOW_UPDATE, 11, (2**31 - 1).to_bytes(4, "big")),
    ("sync", FrameType.SYNC, 0, U64.to_bytes(8, "big")),
    ("data", FrameType.DATA, 13, bytes(range(256)) * 300),
    ("cancel", FrameType.CANCEL, 15, b""),
]


@pytest.fixture(scope="module")
def reference():
    binary = REPO / "target" / "debug" / "pexi-example-frame-trace"
    subprocess.run(["cargo", "build", "-q", "-p", "pexi-example-frame-trace"], cwd=REPO, check=True)
    frames = [encode_frame(kind, stream, payload) for _, kind, stream, payload in MESSAGES]
    frames.append(encode_frame(0x7E, 0, b"future", FLAG_IGNORABLE))
    result = subprocess.run(
        [str(binary), "--decode"],
        input="\n".join(f.hex() for f in frames).encode(),
        capture_output=True,
        check=True,
        timeout=60,
    )
    lines = [json.loads(line) for line in result.stdout.decode().splitlines()]
    assert len(lines) == len(frames)
    return lines


@pytest.mark.parametrize("index", range(len(MESSAGES)), ids=[m[0] for m in MESSAGES])
def test_the_reference_reads_what_python_writes(reference, index):
    _, kind, stream, payload = MESSAGES[index]
    seen = reference[index]
    assert "error" not in seen, seen.get("error")
    assert seen["type"] == kind.name
    assert seen["stream_id"] == stream
    assert seen["flags"] == 0
    # Rust's typed value, encoded again, is Python's bytes exactly: both are canonical (§3).
    assert seen["reencoded_hex"] == payload.hex()
    if payload and kind not in (FrameType.DATA, FrameType.PING, FrameType.WINDOW_UPDATE, FrameType.SYNC):
        assert seen["payload"] == p.to_json(p.loads(payload))


def test_an_unknown_ignorable_frame_passes_through(reference):
    seen = reference[-1]
    assert seen["type"] == "UNKNOWN"
    assert seen["flags"] == FLAG_IGNORABLE
