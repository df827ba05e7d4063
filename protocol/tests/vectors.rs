//! Golden vectors: `protocol/vectors/frames.json` pins the exact bytes of one frame of every type and every
//! method, plus invalid inputs and what a decoder must make of them. Rust must produce exactly these bytes,
//! decode them back to the same values, and reach the same outcome however the bytes are split.
//! Other-language clients test against the same file.

mod support;

use pexi_protocol::frame::{
    crc32c, Flags, Frame, FrameDecoder, FrameType, DEFAULT_MAX_PAYLOAD, HEADER_LEN,
};
use pexi_protocol::payload::{
    cbor, encode_window_update, End, ErrorCode, ErrorDetails, ErrorPayload, GoAway, HeaderField,
    Hello, HelloAck, HttpRequest, HttpResponseHead, Implementation, Limits, MethodCall, NetConnect,
    NetConnectHead, PolicyDecision, ReceiveParams, RedirectMode, ResponseHead,
};
use pexi_protocol::session::Event;
use serde_json::json;
use support::{cbor_to_json, check_generated, established, events, repo_root};

/// How a valid vector's payload is typed.
enum Payload {
    /// Raw or fixed binary payload: no schema.
    Binary,
    /// CBOR: the schema file that describes it, and a decode → encode round trip through the Rust type.
    Cbor {
        schema: &'static str,
        roundtrip: fn(&[u8]) -> Vec<u8>,
    },
}

enum Kind {
    Valid {
        frame: Frame,
        payload: Payload,
    },
    /// Bytes that are not (only) one valid frame; `session` is what an established host does with them.
    Special {
        bytes: Vec<u8>,
        session: Option<&'static str>,
    },
}

struct Vector {
    name: &'static str,
    description: &'static str,
    kind: Kind,
}

impl Vector {
    fn bytes(&self) -> Vec<u8> {
        match &self.kind {
            Kind::Valid { frame, .. } => frame.encode(),
            Kind::Special { bytes, .. } => bytes.clone(),
        }
    }
}

fn roundtrip<T: serde::Serialize + serde::de::DeserializeOwned>(bytes: &[u8]) -> Vec<u8> {
    cbor::encode(&cbor::decode::<T>("vector", bytes).expect("vector payload decodes"))
}

fn valid(name: &'static str, description: &'static str, frame: Frame, payload: Payload) -> Vector {
    Vector {
        name,
        description,
        kind: Kind::Valid { frame, payload },
    }
}

fn cbor_frame<T: serde::Serialize>(frame_type: FrameType, stream_id: u32, value: &T) -> Frame {
    Frame::new(frame_type, stream_id, cbor::encode(value))
}

fn sample_request() -> HttpRequest {
    HttpRequest {
        method: "POST".into(),
        url: "https://api.example.com/v1/messages?stream=true".into(),
        headers: vec![
            HeaderField::new("content-type", "application/json"),
            HeaderField::new("accept", "text/event-stream"),
        ],
        content_length: Some(27),
        redirect: RedirectMode::Manual,
        timeout_ms: Some(30_000),
    }
}

fn receive_params() -> ReceiveParams {
    ReceiveParams {
        max_frame: 65_536,
        initial_stream_window: 262_144,
        initial_connection_window: 1_048_576,
    }
}

/// A header with a correct header CRC around whatever fields we like.
fn raw_header(
    version: u8,
    frame_type: u8,
    stream_id: u32,
    length: u32,
    payload_crc: u32,
) -> Vec<u8> {
    let mut h = Vec::with_capacity(HEADER_LEN);
    h.extend_from_slice(b"PEXI");
    h.push(version);
    h.push(frame_type);
    h.extend_from_slice(&0u16.to_be_bytes());
    h.extend_from_slice(&stream_id.to_be_bytes());
    h.extend_from_slice(&length.to_be_bytes());
    h.extend_from_slice(&payload_crc.to_be_bytes());
    let crc = crc32c(&h);
    h.extend_from_slice(&crc.to_be_bytes());
    h
}

fn ping() -> Frame {
    Frame::new(FrameType::Ping, 0, b"pexiping".to_vec())
}

fn catalog() -> Vec<Vector> {
    let hello = Hello {
        versions: vec![1],
        nonce: 0x1122_3344_5566_7788,
        implementation: Implementation {
            name: "pexi-guest".into(),
            version: "0.1.0".into(),
        },
        features: vec![],
        receive: receive_params(),
    };
    let ack = HelloAck {
        version: 1,
        nonce: 0x1122_3344_5566_7788,
        session_id: 0x0123_4567_89ab_cdef,
        implementation: Implementation {
            name: "pexi-host".into(),
            version: "0.1.0".into(),
        },
        features: vec![],
        receive: receive_params(),
        limits: Limits::default(),
        policy_revision: None,
    };
    let denied = ErrorPayload::new(ErrorCode::PolicyDenied, "request denied by policy")
        .with_details(ErrorDetails {
            reasons: vec!["host evil.example is not in the allowlist".into()],
            decision_id: Some("d-000001".into()),
            ..ErrorDetails::default()
        });
    let unsupported =
        ErrorPayload::new(ErrorCode::UnsupportedVersion, "no common protocol version")
            .with_details(ErrorDetails {
                supported_versions: vec![1],
                hello_nonce: Some(0x1122_3344_5566_7788),
                ..ErrorDetails::default()
            });
    let response_head = HttpResponseHead {
        status: 200,
        headers: vec![
            HeaderField::new("content-type", "text/event-stream"),
            HeaderField::new("set-cookie", b"a=1".to_vec()),
            HeaderField::new("set-cookie", b"b=\xff".to_vec()),
        ],
        final_url: "https://api.example.com/v1/messages?stream=true".into(),
        redirect_count: 0,
        decision_id: "d-000002".into(),
    };
    let upgrade_request = HttpRequest {
        headers: vec![
            HeaderField::new("upgrade", "websocket"),
            HeaderField::new("connection", "upgrade"),
            HeaderField::new("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
            HeaderField::new("sec-websocket-version", "13"),
        ],
        redirect: RedirectMode::Manual,
        ..HttpRequest::new("GET", "https://chat.example.com/socket")
    };
    let switching_head = HttpResponseHead {
        status: 101,
        headers: vec![
            HeaderField::new("sec-websocket-accept", "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
            HeaderField::new("connection", "upgrade"),
            HeaderField::new("upgrade", "websocket"),
        ],
        final_url: "https://chat.example.com/socket".into(),
        redirect_count: 0,
        decision_id: "d-000004".into(),
    };
    let decision = PolicyDecision {
        allow: false,
        reasons: vec!["default deny".into()],
        decision_id: "d-000003".into(),
    };
    let ack_with_revision = HelloAck {
        policy_revision: Some(
            "sha256:d66f4be0e1d3a1b1a1e1ab5f1e3b1dd2e7b8c9a0f1e2d3c4b5a697887766554a".into(),
        ),
        ..ack.clone()
    };
    let no_session =
        ErrorPayload::new(ErrorCode::SessionReset, "no session: send HELLO").retryable(true);
    let hello_frame = cbor_frame(FrameType::Hello, 0, &hello);
    let hello_bytes = hello_frame.encode();

    let mut bad_header_crc = ping().encode();
    bad_header_crc[22] ^= 0x01;
    let mut bad_payload_crc = ping().encode();
    bad_payload_crc[HEADER_LEN] ^= 0x20;
    let mut bad_magic = ping().encode();
    bad_magic[0] = b'X';
    let mut garbage_then_ping = b"\xffstale bytes PEX".to_vec();
    garbage_then_ping.extend_from_slice(&ping().encode());
    // Fewer than a header's bytes, not starting with the magic: nothing is judged yet.
    let mut short_garbage = b"\xff".to_vec();
    short_garbage.extend_from_slice(&ping().encode()[..10]);
    // A frame with a bad magic, then a PING cut after 10 bytes: the decoder is scanning when the input ends.
    let mut garbage_then_partial = bad_magic.clone();
    garbage_then_partial.extend_from_slice(&ping().encode()[..10]);
    let unknown = Frame::new(FrameType::Unknown(0x7f), 0, b"?".to_vec());
    let mut unknown_ignorable = unknown.clone();
    unknown_ignorable.flags = Flags::IGNORABLE;

    vec![
        valid("hello", "HELLO: the guest offers version 1 and its receive limits", hello_frame,
            Payload::Cbor { schema: "hello.schema.json", roundtrip: roundtrip::<Hello> }),
        valid("hello-ack", "HELLO_ACK: the host picks version 1, assigns a session id and states its limits",
            cbor_frame(FrameType::HelloAck, 0, &ack),
            Payload::Cbor { schema: "hello-ack.schema.json", roundtrip: roundtrip::<HelloAck> }),
        valid("hello-ack-policy-revision", "HELLO_ACK with the optional policy_revision, which comes last",
            cbor_frame(FrameType::HelloAck, 0, &ack_with_revision),
            Payload::Cbor { schema: "hello-ack.schema.json", roundtrip: roundtrip::<HelloAck> }),
        valid("ping", "PING with 8 opaque bytes", ping(), Payload::Binary),
        valid("pong", "PONG echoing the PING's bytes", Frame::new(FrameType::Pong, 0, b"pexiping".to_vec()), Payload::Binary),
        valid("window-update-session", "WINDOW_UPDATE on stream 0: 65536 more bytes of session credit",
            Frame::new(FrameType::WindowUpdate, 0, encode_window_update(65_536).to_vec()), Payload::Binary),
        valid("window-update-stream", "WINDOW_UPDATE on stream 1: 131072 more bytes of stream credit",
            Frame::new(FrameType::WindowUpdate, 1, encode_window_update(131_072).to_vec()), Payload::Binary),
        valid("goaway", "GOAWAY: the host shuts down; streams up to 7 still complete",
            cbor_frame(FrameType::GoAway, 0, &GoAway { code: ErrorCode::SessionReset, message: "host shutting down".into(), last_stream_id: 7 }),
            Payload::Cbor { schema: "goaway.schema.json", roundtrip: roundtrip::<GoAway> }),
        valid("sync", "SYNC with nonce 0x0102030405060708",
            Frame::new(FrameType::Sync, 0, 0x0102_0304_0506_0708u64.to_be_bytes().to_vec()), Payload::Binary),
        valid("sync-ack", "SYNC_ACK returning nonce 0x0102030405060708",
            Frame::new(FrameType::SyncAck, 0, 0x0102_0304_0506_0708u64.to_be_bytes().to_vec()), Payload::Binary),
        valid("open-http-request", "OPEN stream 1: pep.http.request POST with two headers, a 27-byte body to follow, manual redirects, 30 s timeout",
            cbor_frame(FrameType::Open, 1, &MethodCall::HttpRequest(sample_request())),
            Payload::Cbor { schema: "open.schema.json", roundtrip: |b| MethodCall::decode(b).expect("decodes").encode() }),
        valid("open-policy-check", "OPEN stream 3: pep.policy.check GET with defaults (follow redirects, no headers)",
            cbor_frame(FrameType::Open, 3, &MethodCall::PolicyCheck(HttpRequest::new("GET", "https://example.com/"))),
            Payload::Cbor { schema: "open.schema.json", roundtrip: |b| MethodCall::decode(b).expect("decodes").encode() }),
        valid("open-websocket-upgrade", "OPEN stream 7: pep.http.request GET asking to upgrade to websocket (§5.5); no END follows until the guest closes its side",
            cbor_frame(FrameType::Open, 7, &MethodCall::HttpRequest(upgrade_request)),
            Payload::Cbor { schema: "open.schema.json", roundtrip: |b| MethodCall::decode(b).expect("decodes").encode() }),
        valid("head-switching-protocols", "HEAD on stream 7: 101, the upgraded connection's bytes follow as DATA both ways",
            Frame::new(FrameType::Head, 7, ResponseHead::Http(switching_head).encode()),
            Payload::Cbor { schema: "head.pep.http.request.schema.json", roundtrip: roundtrip::<HttpResponseHead> }),
        valid("open-net-connect", "OPEN stream 9: pep.net.connect to pinned.example.com:443, an opaque tunnel (§5.6)",
            cbor_frame(FrameType::Open, 9, &MethodCall::NetConnect(NetConnect { host: "pinned.example.com".into(), port: 443 })),
            Payload::Cbor { schema: "open.schema.json", roundtrip: |b| MethodCall::decode(b).expect("decodes").encode() }),
        valid("head-net-connect", "HEAD on stream 9: the tunnel is open to the address the guard allowed",
            Frame::new(FrameType::Head, 9, ResponseHead::NetConnect(NetConnectHead { address: "203.0.113.7:443".into(), decision_id: "d-000005".into() }).encode()),
            Payload::Cbor { schema: "head.pep.net.connect.schema.json", roundtrip: roundtrip::<NetConnectHead> }),
        valid("data", "DATA on stream 1: 27 raw body bytes (never CBOR)",
            Frame::new(FrameType::Data, 1, b"{\"model\":\"m\",\"stream\":true}".to_vec()), Payload::Binary),
        valid("head-http-request", "HEAD on stream 1 for pep.http.request: 200 with repeated set-cookie, one value not UTF-8",
            Frame::new(FrameType::Head, 1, ResponseHead::Http(response_head).encode()),
            Payload::Cbor { schema: "head.pep.http.request.schema.json", roundtrip: roundtrip::<HttpResponseHead> }),
        valid("head-policy-check", "HEAD on stream 3 for pep.policy.check: deny with a reason",
            Frame::new(FrameType::Head, 3, ResponseHead::PolicyDecision(decision).encode()),
            Payload::Cbor { schema: "head.pep.policy.check.schema.json", roundtrip: roundtrip::<PolicyDecision> }),
        valid("end", "END on stream 1 without trailers: empty payload", Frame::new(FrameType::End, 1, Vec::new()), Payload::Binary),
        valid("end-trailers", "END on stream 1 with one trailer",
            Frame::new(FrameType::End, 1, End { trailers: vec![HeaderField::new("x-checksum", "abc")] }.encode()),
            Payload::Cbor { schema: "end.schema.json", roundtrip: roundtrip::<End> }),
        valid("error-policy-denied", "ERROR on stream 5: policy_denied with the policy's reason and decision id",
            cbor_frame(FrameType::Error, 5, &denied),
            Payload::Cbor { schema: "error.schema.json", roundtrip: roundtrip::<ErrorPayload> }),
        valid("error-unsupported-version", "ERROR on stream 0 refusing a HELLO: unsupported_version, host speaks [1]",
            cbor_frame(FrameType::Error, 0, &unsupported),
            Payload::Cbor { schema: "error.schema.json", roundtrip: roundtrip::<ErrorPayload> }),
        valid("error-no-session", "ERROR on stream 0 from a host without a session (it restarted, or never got a HELLO): session_reset; the guest starts over with HELLO",
            cbor_frame(FrameType::Error, 0, &no_session),
            Payload::Cbor { schema: "error.schema.json", roundtrip: roundtrip::<ErrorPayload> }),
        valid("cancel", "CANCEL stream 1: empty payload", Frame::new(FrameType::Cancel, 1, Vec::new()), Payload::Binary),
        Vector { name: "bad-header-crc", description: "the PING vector with one bit of its header CRC flipped",
            kind: Kind::Special { bytes: bad_header_crc, session: Some("resync") } },
        Vector { name: "bad-payload-crc", description: "the PING vector with one payload bit flipped",
            kind: Kind::Special { bytes: bad_payload_crc, session: Some("resync") } },
        Vector { name: "bad-magic", description: "the PING vector with its first byte changed",
            kind: Kind::Special { bytes: bad_magic, session: Some("resync") } },
        Vector { name: "oversize-length", description: "a header with a valid CRC announcing 65537 payload bytes, one more than the default max frame; refused from the header alone",
            kind: Kind::Special { bytes: raw_header(1, 0x11, 1, DEFAULT_MAX_PAYLOAD + 1, 0), session: Some("resync") } },
        Vector { name: "unsupported-frame-version", description: "a PING header with frame format version 2 and a valid CRC",
            kind: Kind::Special { bytes: { let mut v = raw_header(2, 0x03, 0, 8, crc32c(b"pexiping")); v.extend_from_slice(b"pexiping"); v }, session: Some("resync") } },
        Vector { name: "truncated", description: "the HELLO vector cut after 30 bytes: no frame, and a truncation at end of stream",
            kind: Kind::Special { bytes: hello_bytes[..30].to_vec(), session: Some("nothing") } },
        Vector { name: "unknown-type", description: "frame type 0x7f without IGNORABLE: decodes, and the session answers protocol_error",
            kind: Kind::Special { bytes: unknown.encode(), session: Some("protocol_error") } },
        Vector { name: "unknown-type-ignorable", description: "frame type 0x7f with IGNORABLE (flags 0x0001): skipped silently",
            kind: Kind::Special { bytes: unknown_ignorable.encode(), session: Some("nothing") } },
        Vector { name: "short-garbage", description: "a stale byte and the first 10 bytes of a PING: no header is judged before all 24 of its bytes arrived, so this is a truncation, not bad_magic",
            kind: Kind::Special { bytes: short_garbage, session: Some("nothing") } },
        Vector { name: "garbage-then-partial-frame", description: "the bad-magic vector, then a PING cut after 10 bytes: one bad_magic; bytes held while scanning are not a truncation",
            kind: Kind::Special { bytes: garbage_then_partial, session: Some("resync") } },
        Vector { name: "garbage-then-ping", description: "16 stale bytes (ending in a partial magic) before a valid PING: one bad_magic, then the PING",
            kind: Kind::Special { bytes: garbage_then_ping, session: Some("resync") } },
    ]
}

/// What a fresh decoder makes of the bytes: one entry per frame or error, then the end-of-stream check.
fn decode_outcomes(chunks: &[&[u8]]) -> (Vec<String>, String) {
    let mut decoder = FrameDecoder::new(DEFAULT_MAX_PAYLOAD);
    let mut outcomes = Vec::new();
    for chunk in chunks {
        let mut input = *chunk;
        while let Some(result) = decoder.decode(&mut input) {
            outcomes.push(match result {
                Ok(frame) => format!("frame:{}", frame.frame_type.name()),
                Err(err) => format!("error:{}", err.code()),
            });
        }
        assert!(input.is_empty(), "decode returned None with input left");
    }
    let finish = match decoder.finish() {
        Ok(()) => "ok".to_string(),
        Err(err) => err.code().to_string(),
    };
    (outcomes, finish)
}

fn render(vectors: &[Vector]) -> String {
    let entries: Vec<serde_json::Value> = vectors
        .iter()
        .map(|v| {
            let bytes = v.bytes();
            let (decodes, finish) = decode_outcomes(&[&bytes]);
            let mut entry = json!({
                "name": v.name,
                "description": v.description,
                "hex": hex::encode(&bytes),
                "decodes": decodes,
                "finish": finish,
            });
            match &v.kind {
                Kind::Valid { frame, payload } => {
                    entry["frame"] = json!({
                        "type": frame.frame_type.name(),
                        "type_code": frame.frame_type.code(),
                        "flags": frame.flags.0,
                        "stream_id": frame.stream_id,
                        "header_hex": hex::encode(&bytes[..HEADER_LEN]),
                        "payload_hex": hex::encode(&frame.payload),
                    });
                    if let Payload::Cbor { schema, .. } = payload {
                        let value: ciborium::Value = ciborium::from_reader(&frame.payload[..])
                            .expect("vector payload is CBOR");
                        entry["payload"] = cbor_to_json(&value);
                        entry["schema"] = json!(schema);
                    }
                }
                Kind::Special { session, .. } => {
                    entry["session"] = json!(session);
                }
            }
            entry
        })
        .collect();
    let doc = json!({
        "format": "pexi protocol golden vectors; see docs/protocol.md §11. The keys of each payload object are sorted; encode in the key order the spec gives for the type (the wire bytes are payload_hex)",
        "frame_format_version": 1,
        "protocol_version": 1,
        "decoder_max_payload": DEFAULT_MAX_PAYLOAD,
        "vectors": entries,
    });
    serde_json::to_string_pretty(&doc).expect("json") + "\n"
}

#[test]
fn golden_file_matches_the_code_byte_for_byte() {
    let path = repo_root().join("protocol/vectors/frames.json");
    check_generated(&path, &render(&catalog()));
}

#[test]
fn golden_file_is_what_the_tests_read() {
    // Independently of the renderer: parse the checked-in file and hold Rust to every hex string in it.
    let path = repo_root().join("protocol/vectors/frames.json");
    let doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).expect("vectors file")).expect("json");
    let on_disk = doc["vectors"].as_array().expect("vectors array");
    let vectors = catalog();
    assert_eq!(on_disk.len(), vectors.len());
    let mut types_seen = std::collections::BTreeSet::new();
    for (disk, v) in on_disk.iter().zip(&vectors) {
        assert_eq!(disk["name"], v.name);
        assert_eq!(disk["hex"], hex::encode(v.bytes()), "{}", v.name);
        if let Kind::Valid { frame, .. } = &v.kind {
            types_seen.insert(frame.frame_type.code());
        }
    }
    let all: std::collections::BTreeSet<u8> = FrameType::ALL.iter().map(|t| t.code()).collect();
    assert_eq!(types_seen, all, "one valid vector per frame type");
}

#[test]
fn valid_vectors_decode_to_the_same_frame_and_payload() {
    for v in catalog() {
        let Kind::Valid { frame, payload } = &v.kind else {
            continue;
        };
        let bytes = frame.encode();
        let mut decoder = FrameDecoder::new(DEFAULT_MAX_PAYLOAD);
        let mut input = &bytes[..];
        let decoded = decoder.decode(&mut input).expect("a frame").expect("valid");
        assert_eq!(&decoded, frame, "{}", v.name);
        assert!(input.is_empty() && decoder.decode(&mut input).is_none());
        if let Payload::Cbor { roundtrip, .. } = payload {
            assert_eq!(
                roundtrip(&decoded.payload),
                decoded.payload.to_vec(),
                "{}: re-encoding differs",
                v.name
            );
        }
    }
}

#[test]
fn every_split_point_gives_the_same_outcome() {
    for v in catalog() {
        let bytes = v.bytes();
        let whole = decode_outcomes(&[&bytes]);
        for at in 0..=bytes.len() {
            let (a, b) = bytes.split_at(at);
            assert_eq!(decode_outcomes(&[a, b]), whole, "{} split at {at}", v.name);
        }
        let singles: Vec<&[u8]> = bytes.chunks(1).collect();
        assert_eq!(decode_outcomes(&singles), whole, "{} byte by byte", v.name);
    }
}

#[test]
fn invalid_vectors_have_the_documented_decoder_outcome() {
    let expect = |name: &str| -> (Vec<&str>, &str) {
        match name {
            "bad-header-crc" => (vec!["error:bad_header_crc"], "ok"),
            "bad-payload-crc" => (vec!["error:bad_payload_crc"], "ok"),
            "bad-magic" => (vec!["error:bad_magic"], "ok"),
            "oversize-length" => (vec!["error:oversize_length"], "ok"),
            "unsupported-frame-version" => (vec!["error:unsupported_frame_version"], "ok"),
            "truncated" => (vec![], "truncated"),
            "unknown-type" | "unknown-type-ignorable" => (vec!["frame:UNKNOWN"], "ok"),
            "garbage-then-ping" => (vec!["error:bad_magic", "frame:PING"], "ok"),
            "short-garbage" => (vec![], "truncated"),
            "garbage-then-partial-frame" => (vec!["error:bad_magic"], "ok"),
            other => panic!("no expectation for {other}"),
        }
    };
    for v in catalog() {
        if let Kind::Special { bytes, .. } = &v.kind {
            let (outcomes, finish) = decode_outcomes(&[bytes]);
            let (want, want_finish) = expect(v.name);
            assert_eq!(outcomes, want, "{}", v.name);
            assert_eq!(finish, want_finish, "{}", v.name);
        }
    }
}

#[test]
fn an_established_host_reacts_to_special_vectors_as_documented() {
    for v in catalog() {
        let Kind::Special {
            bytes,
            session: Some(expected),
        } = &v.kind
        else {
            continue;
        };
        let (_guest, mut host) = established();
        host.receive(bytes);
        let events = events(&mut host);
        let mut sent = Vec::new();
        while let Some(frame) = host.poll_transmit() {
            sent.push(frame.frame_type);
        }
        match *expected {
            "nothing" => {
                assert!(events.is_empty(), "{}: {events:?}", v.name);
                assert!(sent.is_empty(), "{}: {sent:?}", v.name);
            }
            "protocol_error" => {
                assert!(
                    matches!(events.as_slice(), [Event::Rejected { stream_id: 0, error }] if error.code == ErrorCode::ProtocolError),
                    "{}: {events:?}",
                    v.name
                );
                assert_eq!(sent, vec![FrameType::Error], "{}", v.name);
                assert!(host.is_established());
            }
            "resync" => {
                assert!(
                    matches!(events.first(), Some(Event::Rejected { stream_id: 0, error }) if error.code == ErrorCode::ProtocolError && error.details.frame_error.is_some()),
                    "{}: {events:?}",
                    v.name
                );
                assert_eq!(sent, vec![FrameType::Error, FrameType::Sync], "{}", v.name);
                assert!(host.is_resyncing(), "{}", v.name);
            }
            other => panic!("unknown expectation {other}"),
        }
    }
}

#[test]
fn cbor_payloads_validate_against_their_schemas() {
    let path = repo_root().join("protocol/vectors/frames.json");
    let doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).expect("vectors file")).expect("json");
    let mut checked = 0;
    for entry in doc["vectors"].as_array().expect("array") {
        let Some(schema_name) = entry["schema"].as_str() else {
            continue;
        };
        let schema_path = repo_root().join("schemas").join(schema_name);
        let schema: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&schema_path).expect("schema file"))
                .expect("json");
        // The JSON in the file must be exactly the mapping of the CBOR in the hex.
        let payload =
            hex::decode(entry["frame"]["payload_hex"].as_str().expect("hex")).expect("hex");
        let value: ciborium::Value = ciborium::from_reader(&payload[..]).expect("cbor");
        assert_eq!(cbor_to_json(&value), entry["payload"], "{}", entry["name"]);
        if let Err(err) = jsonschema::validate(&schema, &entry["payload"]) {
            panic!("{} does not match {schema_name}: {err}", entry["name"]);
        }
        checked += 1;
    }
    assert!(checked >= 10, "only {checked} CBOR vectors checked");
}

#[test]
fn schemas_reject_what_the_decoder_rejects() {
    // A schema that accepted anything would pass the test above; these must fail.
    let schema: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repo_root().join("schemas/open.schema.json")).expect("schema"),
    )
    .expect("json");
    let bad = [
        json!({"method": "pep.http.request"}),
        json!({"method": "pep.http.request", "params": {"method": "GET"}}),
        json!({"method": "pep.http.request", "params": {"method": "GET", "url": "u", "redirect": "sometimes"}}),
        json!({"method": "pep.http.request", "params": {"method": "GET", "url": "u", "headers": [["a", 5]]}}),
    ];
    for instance in bad {
        assert!(
            jsonschema::validate(&schema, &instance).is_err(),
            "{instance} accepted"
        );
    }
}
