"""What this client puts on the wire validates against `schemas/`: every CBOR message it can send, taken from
the session's real output rather than built by hand for the test."""

from __future__ import annotations

import json

import jsonschema
import pytest
from conftest import SCHEMAS

from pexi_client import payload as p
from pexi_client.frame import FrameDecoder, FrameType, encode_frame
from pexi_client.session import Config, Session


def validate(schema: str, payload: bytes) -> None:
    document = json.loads((SCHEMAS / schema).read_text())
    jsonschema.Draft202012Validator(document).validate(p.to_json(p.loads(payload)))


def frames(data: bytes):
    decoder = FrameDecoder(1 << 24)
    decoder.feed(data)
    out = []
    while (frame := decoder.next()) is not None:
        out.append(frame)
    return out


def established():
    session = Session(Config())
    session.start(0.0)
    [hello] = frames(session.data_to_send())
    validate("hello.schema.json", hello.payload)
    nonce = p.Hello.from_cbor(p.loads(hello.payload)).nonce
    ack = p.HelloAck(
        version=1,
        nonce=nonce,
        session_id=7,
        implementation=p.Implementation("test-host", "1"),
        receive=p.ReceiveParams(),
        limits=p.Limits(128, 1 << 20, 1 << 20, 5, 1000, 1000, 1000),
    )
    session.receive(encode_frame(FrameType.HELLO_ACK, 0, p.encode(ack)), 0.0)
    assert session.state == "established"
    return session


def test_hello_validates():
    established()


@pytest.mark.parametrize(
    "call",
    [
        p.MethodCall(p.METHOD_HTTP_REQUEST, p.HttpRequest("POST", "https://api.example.com/v1", (p.HeaderField("a", b"\xff\x00"),), 3, "manual", 5000)),
        p.MethodCall(p.METHOD_HTTP_REQUEST, p.HttpRequest("GET", "https://api.example.com/")),
        p.MethodCall(p.METHOD_POLICY_CHECK, p.HttpRequest("GET", "https://api.example.com/", redirect="error")),
    ],
)
def test_open_validates(call):
    session = established()
    stream_id = session.open(call)
    session.send_data(stream_id, b"abc")
    session.send_end(stream_id, p.End((p.HeaderField("x-checksum", b"abc"),)))
    sent = frames(session.data_to_send())
    assert [f.name for f in sent] == ["OPEN", "DATA", "END"]
    validate("open.schema.json", sent[0].payload)
    validate("end.schema.json", sent[2].payload)


def test_errors_and_goaway_the_session_sends_validate():
    session = established()
    # A DATA for a stream that was never opened: the session answers ERROR protocol_error on that id.
    session.receive(encode_frame(FrameType.HEAD, 9, p.dumps({"status": 200})), 0.0)
    [error] = frames(session.data_to_send())
    assert error.name == "ERROR"
    validate("error.schema.json", error.payload)
    # A session WINDOW_UPDATE that overflows: GOAWAY protocol_error.
    session.receive(encode_frame(FrameType.WINDOW_UPDATE, 0, (2**31 - 1).to_bytes(4, "big")), 0.0)
    [goaway] = frames(session.data_to_send())
    assert goaway.name == "GOAWAY"
    validate("goaway.schema.json", goaway.payload)
    assert session.state == "closed"


def test_an_error_for_a_stream_never_opened_is_not_answered():
    """§5.1: answering it could bounce errors between two peers forever."""
    session = established()
    refusal = p.encode(p.ErrorPayload("protocol_error", "END for stream 99"))
    session.receive(encode_frame(FrameType.ERROR, 99, refusal), 0.0)
    session.receive(encode_frame(FrameType.CANCEL, 97), 0.0)
    assert frames(session.data_to_send()) == []
    assert session.state == "established"
