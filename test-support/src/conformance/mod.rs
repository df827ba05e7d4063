//! The machinery shared by the two conformance runners (protocol/conformance/README.md): reading frames
//! from a peer, building the frames a scenario states, and comparing what came back. The scenarios are data;
//! these runners only send what they say and check what they require.

mod conn;
pub mod guest;
pub mod host;

pub use conn::{pattern, Conn};

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine;
use pexi_protocol::frame::{Flags, Frame, FrameDecoder, FrameType, Header, DEFAULT_MAX_PAYLOAD};
use pexi_protocol::payload::{
    cbor, End, ErrorPayload, GoAway, Hello, HelloAck, HttpResponseHead, MethodCall, NetConnectHead,
    PolicyDecision, ReceiveParams,
};
use pexi_protocol::session::{DEFAULT_CONNECTION_WINDOW, DEFAULT_STREAM_WINDOW};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// How long an `expect` waits for its frame.
pub const EXPECT_WITHIN: Duration = Duration::from_secs(5);

/// The receive parameters a runner announces unless a scenario overrides them: the reference
/// implementation's defaults (max frame 65 536, windows 262 144 / 1 048 576).
pub fn reference_receive() -> ReceiveParams {
    ReceiveParams {
        max_frame: DEFAULT_MAX_PAYLOAD,
        initial_stream_window: DEFAULT_STREAM_WINDOW,
        initial_connection_window: DEFAULT_CONNECTION_WINDOW,
    }
}

/// Values a scenario captured from frames (`"capture"`), substituted where a later step says `"$name"`.
pub type Vars = HashMap<String, Value>;

/// Every `*.json` scenario in `dir`, sorted by name.
pub fn scenario_files(dir: &Path) -> Result<Vec<PathBuf>, String> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    Ok(files)
}

pub fn load(file: &Path) -> Result<Value, String> {
    let text = std::fs::read_to_string(file).map_err(|e| format!("{}: {e}", file.display()))?;
    serde_json::from_str(&text).map_err(|e| format!("{}: {e}", file.display()))
}

/// One connection to the implementation under test, read frame by frame.
pub struct Wire {
    pub stream: UnixStream,
    decoder: FrameDecoder,
    buffer: Vec<u8>,
    eof: bool,
}

impl Wire {
    pub fn new(stream: UnixStream, max_payload: u32) -> Wire {
        Wire {
            stream,
            decoder: FrameDecoder::new(max_payload),
            buffer: Vec::new(),
            eof: false,
        }
    }

    /// The next frame within `within`: `Ok(None)` when the peer closed, `Err("nothing")` when nothing came.
    pub async fn next(&mut self, within: Duration) -> Result<Option<Frame>, String> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let mut input = &self.buffer[..];
            let decoded = self.decoder.decode(&mut input);
            let used = self.buffer.len() - input.len();
            self.buffer.drain(..used);
            if let Some(decoded) = decoded {
                return decoded
                    .map(Some)
                    .map_err(|e| format!("undecodable bytes from the peer: {e}"));
            }
            if self.eof {
                return Ok(None);
            }
            let mut chunk = [0u8; 65536];
            match tokio::time::timeout_at(deadline, self.stream.read(&mut chunk)).await {
                Err(_) => return Err(NOTHING.into()),
                Ok(Ok(0)) | Ok(Err(_)) => self.eof = true,
                Ok(Ok(n)) => self.buffer.extend_from_slice(&chunk[..n]),
            }
        }
    }

    pub async fn write(&mut self, bytes: &[u8]) -> Result<(), String> {
        self.stream
            .write_all(bytes)
            .await
            .map_err(|e| format!("write: {e}"))
    }
}

/// What [`Wire::next`] says when no frame came in time.
pub const NOTHING: &str = "nothing";

/// Captured values put in, everywhere in `value`: a whole string `"$name"` becomes the value (a number
/// stays a number), and `${name}` inside a longer string becomes its text.
pub fn substitute(value: &Value, vars: &Vars) -> Result<Value, String> {
    Ok(match value {
        Value::String(text) if text.starts_with('$') && !text.starts_with("${") => vars
            .get(&text[1..])
            .cloned()
            .ok_or_else(|| format!("{text} was never captured"))?,
        Value::String(text) if text.contains("${") => {
            let mut out = String::new();
            let mut rest = text.as_str();
            while let Some(start) = rest.find("${") {
                let end = rest[start..]
                    .find('}')
                    .ok_or_else(|| format!("unclosed ${{ in {text:?}"))?;
                let name = &rest[start + 2..start + end];
                let value = vars
                    .get(name)
                    .ok_or_else(|| format!("${{{name}}} was never captured"))?;
                out.push_str(&rest[..start]);
                match value {
                    Value::String(s) => out.push_str(s),
                    other => out.push_str(&other.to_string()),
                }
                rest = &rest[start + end + 1..];
            }
            out.push_str(rest);
            Value::String(out)
        }
        Value::Array(items) => Value::Array(
            items
                .iter()
                .map(|v| substitute(v, vars))
                .collect::<Result<_, _>>()?,
        ),
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| Ok((k.clone(), substitute(v, vars)?)))
                .collect::<Result<_, String>>()?,
        ),
        other => other.clone(),
    })
}

pub fn frame_type(spec: &Value) -> Result<FrameType, String> {
    if let Some(code) = spec["type_code"].as_u64() {
        return Ok(FrameType::from_code(code as u8));
    }
    let name = spec["type"]
        .as_str()
        .ok_or("a frame needs type or type_code")?;
    FrameType::ALL
        .into_iter()
        .find(|t| t.name() == name)
        .ok_or_else(|| format!("unknown frame type {name}"))
}

pub fn stream_id(spec: &Value) -> Result<u32, String> {
    match &spec["stream"] {
        Value::Null => Ok(0),
        value => value
            .as_u64()
            .and_then(|s| u32::try_from(s).ok())
            .ok_or_else(|| format!("stream {value} is not a stream id")),
    }
}

/// The §10 JSON form of a payload turned into its Rust type: the one byte string of v1 payloads, a
/// HeaderField's value, goes from base64 to the sequence of octets serde reads it from.
fn typed<T: serde::de::DeserializeOwned>(json: &Value, what: &str) -> Result<T, String> {
    fn unbase64(value: &Value) -> Result<Value, String> {
        Ok(match value {
            Value::Object(map) => Value::Object(
                map.iter()
                    .map(|(k, v)| {
                        let v = if k == "headers" || k == "trailers" {
                            header_list(v)?
                        } else {
                            unbase64(v)?
                        };
                        Ok((k.clone(), v))
                    })
                    .collect::<Result<_, String>>()?,
            ),
            other => other.clone(),
        })
    }
    fn header_list(list: &Value) -> Result<Value, String> {
        let Some(fields) = list.as_array() else {
            return Ok(list.clone());
        };
        fields
            .iter()
            .map(|field| match field.as_array().map(Vec::as_slice) {
                Some([name, Value::String(value)]) => {
                    let bytes = base64::engine::general_purpose::STANDARD
                        .decode(value)
                        .map_err(|e| format!("header value {value:?} is not base64: {e}"))?;
                    Ok(Value::Array(vec![name.clone(), Value::from(bytes)]))
                }
                _ => Ok(field.clone()),
            })
            .collect::<Result<Vec<_>, String>>()
            .map(Value::Array)
    }
    serde_json::from_value(unbase64(json)?).map_err(|e| format!("payload for {what}: {e}"))
}

/// A `send` frame's payload: `payload_hex` as is; `payload` (the §10 JSON form) through the type of that
/// frame, so the keys go in the spec's order; `payload_json` as CBOR with the JSON's (sorted) key order, for
/// payloads no type describes.
pub fn payload(spec: &Value, kind: FrameType) -> Result<Vec<u8>, String> {
    if let Some(hex_text) = spec["payload_hex"].as_str() {
        return hex::decode(hex_text).map_err(|e| format!("payload_hex: {e}"));
    }
    if let Some(json) = spec.get("payload_json") {
        return Ok(cbor::encode(json));
    }
    let Some(json) = spec.get("payload") else {
        return Ok(Vec::new());
    };
    let name = kind.name();
    Ok(match kind {
        FrameType::Hello => cbor::encode(&typed::<Hello>(json, name)?),
        FrameType::HelloAck => cbor::encode(&typed::<HelloAck>(json, name)?),
        FrameType::Open => typed::<MethodCall>(json, name)?.encode(),
        FrameType::GoAway => cbor::encode(&typed::<GoAway>(json, name)?),
        FrameType::Error => cbor::encode(&typed::<ErrorPayload>(json, name)?),
        FrameType::End => typed::<End>(json, name)?.encode(),
        // Which HEAD it is follows from the method; the scenario's keys say which.
        FrameType::Head if json.get("status").is_some() => {
            cbor::encode(&typed::<HttpResponseHead>(json, name)?)
        }
        FrameType::Head if json.get("allow").is_some() => {
            cbor::encode(&typed::<PolicyDecision>(json, name)?)
        }
        FrameType::Head if json.get("address").is_some() => {
            cbor::encode(&typed::<NetConnectHead>(json, name)?)
        }
        other => {
            return Err(format!(
                "no typed payload for {}: use payload_hex",
                other.name()
            ))
        }
    })
}

/// The frame a `send` step states (after substitution).
pub fn build_frame(spec: &Value) -> Result<Frame, String> {
    let kind = frame_type(spec)?;
    let mut frame = Frame::new(kind, stream_id(spec)?, payload(spec, kind)?);
    frame.flags = Flags(spec["flags"].as_u64().unwrap_or(0) as u16);
    Ok(frame)
}

/// A `send_header` step: a checksummed header alone, announcing `length` payload bytes that never follow.
pub fn lone_header(spec: &Value) -> Result<Vec<u8>, String> {
    let header = Header {
        frame_type: frame_type(spec)?,
        flags: Flags(0),
        stream_id: stream_id(spec)?,
        length: spec["length"]
            .as_u64()
            .and_then(|l| u32::try_from(l).ok())
            .ok_or("send_header needs length")?,
        payload_crc: 0,
    };
    Ok(header.encode().to_vec())
}

/// Whether `actual` has what `expected` states: every key of an object with a value that contains the
/// expected one, arrays of the same length element by element, anything else equal. An expected
/// `{"includes_in_order": [...]}` matches an array holding those elements in that order, among others (an
/// HTTP client may add headers of its own, but must keep the application's in order).
pub fn contains(actual: &Value, expected: &Value) -> bool {
    if let (Value::Array(a), Some(Value::Array(wanted))) =
        (actual, expected.get("includes_in_order"))
    {
        let mut rest = a.iter();
        return wanted.iter().all(|w| rest.any(|av| contains(av, w)));
    }
    match (actual, expected) {
        (Value::Object(a), Value::Object(e)) => e
            .iter()
            .all(|(k, v)| a.get(k).is_some_and(|av| contains(av, v))),
        (Value::Array(a), Value::Array(e)) => {
            a.len() == e.len() && a.iter().zip(e).all(|(av, ev)| contains(av, ev))
        }
        (a, e) => a == e,
    }
}

/// The §10 JSON form of a CBOR value (byte strings as padded base64).
pub fn cbor_to_json(value: &ciborium::Value) -> Value {
    use ciborium::Value as C;
    match value {
        C::Integer(i) => {
            let i = i128::from(*i);
            u64::try_from(i)
                .map(Value::from)
                .or_else(|_| i64::try_from(i).map(Value::from))
                .unwrap_or(Value::Null)
        }
        C::Bytes(b) => Value::String(base64::engine::general_purpose::STANDARD.encode(b)),
        C::Float(f) => Value::from(*f),
        C::Text(t) => Value::String(t.clone()),
        C::Bool(b) => Value::Bool(*b),
        C::Tag(_, inner) => cbor_to_json(inner),
        C::Array(items) => Value::Array(items.iter().map(cbor_to_json).collect()),
        C::Map(entries) => Value::Object(
            entries
                .iter()
                .map(|(k, v)| {
                    let key = match k {
                        C::Text(t) => t.clone(),
                        other => format!("{other:?}"),
                    };
                    (key, cbor_to_json(v))
                })
                .collect(),
        ),
        _ => Value::Null,
    }
}

/// A frame's payload in the §10 JSON form, or `Null` when it is not one CBOR item.
pub fn as_json(frame: &Frame) -> Value {
    let mut input = &frame.payload[..];
    match ciborium::from_reader::<ciborium::Value, _>(&mut input) {
        Ok(value) if input.is_empty() => cbor_to_json(&value),
        _ => Value::Null,
    }
}

pub fn describe(frame: &Frame) -> String {
    let payload = match as_json(frame) {
        Value::Null if frame.payload.len() > 64 => format!("{} bytes", frame.payload.len()),
        Value::Null => hex::encode(&frame.payload),
        json => json.to_string(),
    };
    format!(
        "{} on stream {} ({payload})",
        frame.frame_type.name(),
        frame.stream_id
    )
}

/// Whether `frame` is what an `expect` step states: its `type`, `stream`, exact `payload_hex`, and `fields`
/// contained in its §10 JSON form. `capture` then stores `stream`, `payload_hex` or a JSON pointer into the
/// payload (`/nonce`) under a name.
pub fn matches(frame: &Frame, spec: &Value, vars: &mut Vars) -> Result<bool, String> {
    let kind = frame_type(spec)?;
    let stream_ok = match &spec["stream"] {
        Value::Null => true,
        _ => stream_id(spec)? == frame.stream_id,
    };
    let payload_ok = spec["payload_hex"]
        .as_str()
        .is_none_or(|h| hex::encode(&frame.payload) == h);
    let fields_ok = spec
        .get("fields")
        .is_none_or(|fields| contains(&as_json(frame), fields));
    if frame.frame_type != kind || !stream_ok || !payload_ok || !fields_ok {
        return Ok(false);
    }
    if let Some(captures) = spec["capture"].as_object() {
        for (name, from) in captures {
            let from = from.as_str().ok_or("capture from a string")?;
            let value = match from {
                "stream" => Value::from(frame.stream_id),
                "payload_hex" => Value::from(hex::encode(&frame.payload)),
                pointer => as_json(frame)
                    .pointer(pointer)
                    .cloned()
                    .ok_or_else(|| format!("no {pointer} in {} to capture", describe(frame)))?,
            };
            vars.insert(name.clone(), value);
        }
    }
    Ok(true)
}
