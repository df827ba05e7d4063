"""The golden vectors (`protocol/vectors/frames.json`, written by the Rust reference) against this client:
byte-for-byte encoding of every valid frame from typed values, decoding whole and split at every byte,
framing errors, the JSON mapping of payloads, and what an established session does with special inputs.
A change to the Rust encoding is blessed into the vectors; if Python cannot follow it, this fails."""

from __future__ import annotations

import json

import jsonschema
import pytest
from conftest import SCHEMAS

from pexi_client import payload as p
from pexi_client.frame import FrameDecoder, FrameType, FramingError, encode_frame
from pexi_client.session import Config, Session

# The typed message each CBOR vector's schema stands for.
TYPED = {
    "hello.schema.json": p.Hello.from_cbor,
    "hello-ack.schema.json": p.HelloAck.from_cbor,
    "goaway.schema.json": p.GoAway.from_cbor,
    "open.schema.json": p.MethodCall.from_cbor,
    "head.pep.http.request.schema.json": p.HttpResponseHead.from_cbor,
    "head.pep.policy.check.schema.json": p.PolicyDecision.from_cbor,
    "head.pep.net.connect.schema.json": p.NetConnectHead.from_cbor,
    "error.schema.json": p.ErrorPayload.from_cbor,
}


def load():
    from conftest import VECTORS

    return json.loads(VECTORS.read_text())


DOC = load()
VECTORS = DOC["vectors"]


def ids(vector):
    return vector["name"]


def decode_all(chunks, max_payload):
    decoder = FrameDecoder(max_payload)
    seen = []
    frames = []
    for chunk in chunks:
        decoder.feed(chunk)
        while (item := decoder.next()) is not None:
            if isinstance(item, FramingError):
                seen.append(f"error:{item.code}")
            else:
                seen.append(f"frame:{item.name}")
                frames.append(item)
    return seen, decoder.finish(), frames


def test_the_vectors_are_the_version_this_client_speaks():
    assert DOC["frame_format_version"] == 1
    assert DOC["protocol_version"] == p.PROTOCOL_VERSION
    assert len(VECTORS) >= 28
    names = {v["frame"]["type"] for v in VECTORS if "frame" in v}
    assert names >= {t.name for t in FrameType}, "a valid vector for every frame type"


@pytest.mark.parametrize("vector", VECTORS, ids=ids)
def test_decodes_whole(vector):
    seen, finish, _ = decode_all([bytes.fromhex(vector["hex"])], DOC["decoder_max_payload"])
    assert seen == vector["decodes"]
    assert finish == vector["finish"]


@pytest.mark.parametrize("vector", VECTORS, ids=ids)
def test_decodes_split_at_every_byte(vector):
    data = bytes.fromhex(vector["hex"])
    for cut in range(1, len(data)):
        seen, finish, _ = decode_all([data[:cut], data[cut:]], DOC["decoder_max_payload"])
        assert (seen, finish) == (vector["decodes"], vector["finish"]), f"split at {cut}"
    seen, finish, _ = decode_all([data[i : i + 1] for i in range(len(data))], DOC["decoder_max_payload"])
    assert (seen, finish) == (vector["decodes"], vector["finish"]), "byte by byte"


VALID = [v for v in VECTORS if "frame" in v]


@pytest.mark.parametrize("vector", VALID, ids=ids)
def test_frame_fields_and_encoding(vector):
    frame = vector["frame"]
    _, _, [decoded] = decode_all([bytes.fromhex(vector["hex"])], DOC["decoder_max_payload"])
    assert decoded.type == frame["type_code"]
    assert decoded.name == frame["type"]
    assert decoded.flags == frame["flags"]
    assert decoded.stream_id == frame["stream_id"]
    assert decoded.payload.hex() == frame["payload_hex"]
    encoded = encode_frame(frame["type_code"], frame["stream_id"], bytes.fromhex(frame["payload_hex"]), frame["flags"])
    assert encoded.hex() == vector["hex"]
    assert encoded[:24].hex() == frame["header_hex"]


@pytest.mark.parametrize("vector", [v for v in VALID if v.get("schema")], ids=ids)
def test_cbor_payloads_round_trip_through_typed_values(vector):
    raw = bytes.fromhex(vector["frame"]["payload_hex"])
    value = p.loads(raw)
    assert p.to_json(value) == vector["payload"], "the §10 JSON mapping"
    if vector["frame"]["type"] == "END":
        typed = p.End.decode(raw)
        assert typed.encode() == raw
    else:
        typed = TYPED[vector["schema"]](value)
        # Encoding the typed value in spec key order gives the golden bytes exactly.
        assert p.encode(typed).hex() == vector["frame"]["payload_hex"]
    schema = json.loads((SCHEMAS / vector["schema"]).read_text())
    jsonschema.Draft202012Validator(schema).validate(vector["payload"])


FIXED = {
    "PING": lambda payload: payload,
    "PONG": lambda payload: payload,
    "WINDOW_UPDATE": lambda payload: int.from_bytes(payload, "big").to_bytes(4, "big"),
    "SYNC": lambda payload: int.from_bytes(payload, "big").to_bytes(8, "big"),
    "SYNC_ACK": lambda payload: int.from_bytes(payload, "big").to_bytes(8, "big"),
}


@pytest.mark.parametrize("vector", [v for v in VALID if v["frame"]["type"] in FIXED], ids=ids)
def test_fixed_size_payloads(vector):
    raw = bytes.fromhex(vector["frame"]["payload_hex"])
    assert len(raw) == {"PING": 8, "PONG": 8, "WINDOW_UPDATE": 4, "SYNC": 8, "SYNC_ACK": 8}[vector["frame"]["type"]]
    assert FIXED[vector["frame"]["type"]](raw) == raw


@pytest.mark.parametrize("vector", [v for v in VALID if v["frame"]["type"] in ("DATA", "CANCEL", "END") and not v.get("schema")], ids=ids)
def test_raw_and_empty_payloads(vector):
    raw = bytes.fromhex(vector["frame"]["payload_hex"])
    if vector["frame"]["type"] == "DATA":
        with pytest.raises(p.PayloadError):
            # DATA is raw bytes, never CBOR: this one is JSON text, which is not one CBOR item.
            p.loads(raw)
    else:
        assert raw == b""


def established_session() -> tuple[Session, float]:
    """A guest session taken to Established by a HELLO_ACK built from the hello-ack vector."""
    session = Session(Config())
    session.start(0.0)
    hello = p.Hello.from_cbor(p.loads(_frames(session.data_to_send())[0].payload))
    ack_vector = next(v for v in VECTORS if v["name"] == "hello-ack")
    ack = p.HelloAck.from_cbor(p.loads(bytes.fromhex(ack_vector["frame"]["payload_hex"])))
    ack = p.HelloAck(**{**ack.__dict__, "nonce": hello.nonce})
    session.receive(encode_frame(FrameType.HELLO_ACK, 0, p.encode(ack)), 0.0)
    assert session.state == "established"
    while session.poll_event() is not None:
        pass
    return session, 0.0


def _frames(data: bytes):
    _, _, frames = decode_all([data], 1 << 24)
    return frames


@pytest.mark.parametrize("vector", [v for v in VECTORS if "session" in v], ids=ids)
def test_special_inputs_in_an_established_session(vector):
    """The vectors say what an established host does; a guest's session reacts the same way."""
    session, now = established_session()
    session.receive(bytes.fromhex(vector["hex"]), now)
    sent = _frames(session.data_to_send())
    kinds = [f.name for f in sent]
    if vector["session"] == "resync":
        assert kinds == ["ERROR", "SYNC"]
        error = p.ErrorPayload.from_cbor(p.loads(sent[0].payload))
        assert error.code == "protocol_error"
        assert error.details.frame_error == vector["decodes"][0].removeprefix("error:")
        assert session.state == "resyncing"
    elif vector["session"] == "protocol_error":
        assert kinds == ["ERROR"]
        assert sent[0].stream_id == 0
        assert p.ErrorPayload.from_cbor(p.loads(sent[0].payload)).code == "protocol_error"
        assert session.state == "established"
    else:
        assert vector["session"] == "nothing"
        assert kinds == []
        assert session.state == "established"


def test_the_checksum_is_crc32c():
    from pexi_client.crc32c import check

    assert check() == 0xE3069283
