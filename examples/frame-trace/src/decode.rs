//! `--decode`: frames in, the reference implementation's reading of them out. Each stdin line is the hex of
//! one frame (as a capture or another implementation produced it); each stdout line is a JSON object with the
//! header fields, the payload in the JSON mapping of docs/protocol.md §10, and `reencoded_hex`: the payload
//! decoded into its typed value and encoded again, which equals the input for canonical encodings. Other
//! implementations (the Python client's tests) use it to check their encodings against the reference.

use std::io::{BufRead, Write};
use std::process::ExitCode;

use base64::Engine;
use pexi_protocol::frame::{Frame, FrameDecoder, FrameType, HARD_MAX_PAYLOAD};
use pexi_protocol::payload::{
    cbor, decode_nonce, decode_ping, decode_window_update, encode_window_update, End, ErrorPayload,
    GoAway, Hello, HelloAck, HttpResponseHead, MethodCall, PolicyDecision, ResponseHead,
};
use serde_json::{json, Value};

pub fn run() -> ExitCode {
    let stdin = std::io::stdin();
    let mut stdout = std::io::stdout().lock();
    for line in stdin.lock().lines() {
        let Ok(line) = line else {
            return ExitCode::FAILURE;
        };
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let record = match unhex(line) {
            Some(bytes) => describe(&bytes),
            None => json!({"error": "not hex"}),
        };
        if writeln!(stdout, "{record}").is_err() {
            return ExitCode::FAILURE;
        }
    }
    ExitCode::SUCCESS
}

fn describe(bytes: &[u8]) -> Value {
    let mut decoder = FrameDecoder::new(HARD_MAX_PAYLOAD);
    let mut input = bytes;
    let frame = match decoder.decode(&mut input) {
        Some(Ok(frame)) if input.is_empty() && decoder.finish().is_ok() => frame,
        Some(Ok(_)) => return json!({"error": "more than one frame"}),
        Some(Err(err)) => return json!({"error": err.to_string()}),
        None => return json!({"error": "truncated"}),
    };
    let payload = match frame.frame_type {
        FrameType::Data | FrameType::Cancel | FrameType::Unknown(_) => Value::Null,
        _ if frame.payload.is_empty() => Value::Null,
        FrameType::Ping
        | FrameType::Pong
        | FrameType::Sync
        | FrameType::SyncAck
        | FrameType::WindowUpdate => Value::Null,
        _ => match ciborium::from_reader::<ciborium::Value, _>(&frame.payload[..]) {
            Ok(value) => to_json(&value),
            Err(err) => return json!({"error": format!("CBOR: {err}")}),
        },
    };
    let mut record = json!({
        "type": frame.frame_type.name(),
        "stream_id": frame.stream_id,
        "flags": frame.flags.0,
        "payload": payload,
    });
    match reencode(&frame) {
        Ok(bytes) => record["reencoded_hex"] = Value::String(hex(&bytes)),
        Err(err) => record["error"] = Value::String(err),
    }
    record
}

fn reencode(frame: &Frame) -> Result<Vec<u8>, String> {
    let p = &frame.payload[..];
    let text = |err: &dyn std::fmt::Display| err.to_string();
    Ok(match frame.frame_type {
        FrameType::Hello => cbor::encode(&cbor::decode::<Hello>("HELLO", p).map_err(|e| text(&e))?),
        FrameType::HelloAck => {
            cbor::encode(&cbor::decode::<HelloAck>("HELLO_ACK", p).map_err(|e| text(&e))?)
        }
        FrameType::GoAway => {
            cbor::encode(&cbor::decode::<GoAway>("GOAWAY", p).map_err(|e| text(&e))?)
        }
        FrameType::Error => {
            cbor::encode(&cbor::decode::<ErrorPayload>("ERROR", p).map_err(|e| text(&e))?)
        }
        FrameType::Open => MethodCall::decode(p).map_err(|e| text(&e))?.encode(),
        // The method that opened the stream decides a HEAD's type; without it, try both.
        FrameType::Head => match cbor::decode::<HttpResponseHead>("HEAD", p) {
            Ok(head) => ResponseHead::Http(head).encode(),
            Err(_) => ResponseHead::PolicyDecision(
                cbor::decode::<PolicyDecision>("HEAD", p).map_err(|e| text(&e))?,
            )
            .encode(),
        },
        FrameType::End => End::decode(p).map_err(|e| text(&e))?.encode(),
        FrameType::Ping | FrameType::Pong => decode_ping(p).map_err(|e| text(&e))?.to_vec(),
        FrameType::Sync | FrameType::SyncAck => decode_nonce(p)
            .map_err(|e| text(&e))?
            .to_be_bytes()
            .to_vec(),
        FrameType::WindowUpdate => {
            encode_window_update(decode_window_update(p).map_err(|e| text(&e))?).to_vec()
        }
        FrameType::Data | FrameType::Cancel | FrameType::Unknown(_) => p.to_vec(),
    })
}

/// The JSON mapping of docs/protocol.md §10: byte strings become padded base64.
fn to_json(value: &ciborium::Value) -> Value {
    use ciborium::Value as C;
    match value {
        C::Integer(i) => {
            let n: i128 = (*i).into();
            u64::try_from(n)
                .map(Value::from)
                .or_else(|_| i64::try_from(n).map(Value::from))
                .unwrap_or(Value::Null)
        }
        C::Bytes(b) => Value::String(base64::engine::general_purpose::STANDARD.encode(b)),
        C::Text(t) => Value::String(t.clone()),
        C::Bool(b) => Value::Bool(*b),
        C::Null => Value::Null,
        C::Array(items) => Value::Array(items.iter().map(to_json).collect()),
        C::Map(entries) => Value::Object(
            entries
                .iter()
                .map(|(k, v)| (k.as_text().unwrap_or("?").to_string(), to_json(v)))
                .collect(),
        ),
        other => Value::String(format!("{other:?}")),
    }
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if text.len() % 2 != 0 {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
