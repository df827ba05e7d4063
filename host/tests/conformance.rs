//! Host conformance: runs every scenario of `protocol/conformance/host/` against a live `pexi serve`, each on
//! a fresh connection. The scenarios are data (protocol/conformance/README.md); this runner only sends the
//! frames they state and checks what comes back.

mod support;

use std::path::Path;
use std::time::Duration;

use pexi_protocol::frame::{Flags, Frame, FrameDecoder, FrameType, Header};
use pexi_protocol::payload::{cbor, ErrorPayload, GoAway, Hello, MethodCall};
use serde_json::Value;
use support::{loopback_options, TestPep};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// How long an `expect` waits for its frame.
const EXPECT_WITHIN: Duration = Duration::from_secs(5);

struct Wire {
    stream: UnixStream,
    decoder: FrameDecoder,
    buffer: Vec<u8>,
    eof: bool,
}

impl Wire {
    async fn next(&mut self, within: Duration) -> Result<Option<Frame>, String> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let mut input = &self.buffer[..];
            if let Some(decoded) = self.decoder.decode(&mut input) {
                let used = self.buffer.len() - input.len();
                self.buffer.drain(..used);
                return decoded
                    .map(Some)
                    .map_err(|e| format!("undecodable bytes from the host: {e}"));
            }
            let used = self.buffer.len() - input.len();
            self.buffer.drain(..used);
            if self.eof {
                return Ok(None);
            }
            let mut chunk = [0u8; 65536];
            match tokio::time::timeout_at(deadline, self.stream.read(&mut chunk)).await {
                Err(_) => return Err("nothing".into()),
                Ok(Ok(0)) | Ok(Err(_)) => self.eof = true,
                Ok(Ok(n)) => self.buffer.extend_from_slice(&chunk[..n]),
            }
        }
    }
}

fn frame_type(spec: &Value) -> Result<FrameType, String> {
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

/// A `send` frame's payload: `payload_hex` as is, `payload` through the type of that frame (so the keys go
/// in wire order), or `payload_json` as CBOR with the JSON's (sorted) key order.
fn payload(spec: &Value, kind: FrameType) -> Result<Vec<u8>, String> {
    if let Some(hex_text) = spec["payload_hex"].as_str() {
        return hex::decode(hex_text).map_err(|e| format!("payload_hex: {e}"));
    }
    if let Some(json) = spec.get("payload_json") {
        return Ok(cbor::encode(json));
    }
    let Some(json) = spec.get("payload") else {
        return Ok(Vec::new());
    };
    let typed = |e: serde_json::Error| format!("payload for {}: {e}", kind.name());
    Ok(match kind {
        FrameType::Hello => {
            cbor::encode(&serde_json::from_value::<Hello>(json.clone()).map_err(typed)?)
        }
        FrameType::Open => serde_json::from_value::<MethodCall>(json.clone())
            .map_err(typed)?
            .encode(),
        FrameType::GoAway => {
            cbor::encode(&serde_json::from_value::<GoAway>(json.clone()).map_err(typed)?)
        }
        FrameType::Error => {
            cbor::encode(&serde_json::from_value::<ErrorPayload>(json.clone()).map_err(typed)?)
        }
        other => {
            return Err(format!(
                "no typed payload for {}: use payload_hex",
                other.name()
            ))
        }
    })
}

/// Whether every key of `expected` is in `actual` with the same value (objects compared recursively).
fn contains(actual: &Value, expected: &Value) -> bool {
    match (actual, expected) {
        (Value::Object(a), Value::Object(e)) => e
            .iter()
            .all(|(k, v)| a.get(k).is_some_and(|av| contains(av, v))),
        (a, e) => a == e,
    }
}

fn as_json(frame: &Frame) -> Value {
    cbor::decode::<Value>("payload", &frame.payload).unwrap_or(Value::Null)
}

fn describe(frame: &Frame) -> String {
    format!(
        "{} on stream {} ({})",
        frame.frame_type.name(),
        frame.stream_id,
        match as_json(frame) {
            Value::Null => hex::encode(&frame.payload),
            json => json.to_string(),
        }
    )
}

async fn run(socket: &Path, scenario: &Value) -> Result<(), String> {
    let stream = UnixStream::connect(socket)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let mut wire = Wire {
        stream,
        decoder: FrameDecoder::new(16 * 1024 * 1024),
        buffer: Vec::new(),
        eof: false,
    };
    let steps = scenario["steps"].as_array().ok_or("no steps")?;
    for (index, step) in steps.iter().enumerate() {
        let at = |what: String| format!("step {}: {what}", index + 1);
        if step.get("handshake").is_some() {
            let hello = Hello {
                versions: vec![1],
                nonce: 0x5eed,
                implementation: pexi_protocol::payload::Implementation {
                    name: "conformance".into(),
                    version: "1".into(),
                },
                features: Vec::new(),
                receive: pexi_protocol::payload::ReceiveParams {
                    max_frame: 65536,
                    initial_stream_window: 262_144,
                    initial_connection_window: 1_048_576,
                },
            };
            let frame = Frame::new(FrameType::Hello, 0, cbor::encode(&hello));
            wire.stream
                .write_all(&frame.encode())
                .await
                .map_err(|e| at(format!("write: {e}")))?;
            match wire.next(EXPECT_WITHIN).await.map_err(at)? {
                Some(f)
                    if f.frame_type == FrameType::HelloAck && as_json(&f)["nonce"] == 0x5eed => {}
                other => {
                    return Err(at(format!(
                        "handshake answered with {:?}",
                        other.as_ref().map(describe)
                    )))
                }
            }
        } else if let Some(spec) = step.get("send") {
            let kind = frame_type(spec).map_err(at)?;
            let mut frame = Frame::new(
                kind,
                spec["stream"].as_u64().unwrap_or(0) as u32,
                payload(spec, kind).map_err(at)?,
            );
            frame.flags = Flags(spec["flags"].as_u64().unwrap_or(0) as u16);
            wire.stream
                .write_all(&frame.encode())
                .await
                .map_err(|e| at(format!("write: {e}")))?;
        } else if let Some(spec) = step.get("send_header") {
            // A header alone, checksummed, announcing `length` payload bytes that never follow.
            let header = Header {
                frame_type: frame_type(spec).map_err(at)?,
                flags: Flags(0),
                stream_id: spec["stream"].as_u64().unwrap_or(0) as u32,
                length: spec["length"]
                    .as_u64()
                    .ok_or_else(|| at("send_header needs length".into()))?
                    as u32,
                payload_crc: 0,
            };
            wire.stream
                .write_all(&header.encode())
                .await
                .map_err(|e| at(format!("write: {e}")))?;
        } else if let Some(hex_text) = step["send_hex"].as_str() {
            let bytes = hex::decode(hex_text).map_err(|e| at(format!("send_hex: {e}")))?;
            wire.stream
                .write_all(&bytes)
                .await
                .map_err(|e| at(format!("write: {e}")))?;
        } else if let Some(spec) = step.get("expect") {
            let kind = frame_type(spec).map_err(at)?;
            let frame = match wire.next(EXPECT_WITHIN).await {
                Ok(Some(frame)) => frame,
                Ok(None) => return Err(at(format!("expected {}, the host closed", kind.name()))),
                Err(what) => return Err(at(format!("expected {}, got {what}", kind.name()))),
            };
            let stream_ok = spec["stream"]
                .as_u64()
                .is_none_or(|s| s == u64::from(frame.stream_id));
            let payload_ok = spec["payload_hex"]
                .as_str()
                .is_none_or(|h| hex::encode(&frame.payload) == h);
            let fields_ok = spec
                .get("fields")
                .is_none_or(|fields| contains(&as_json(&frame), fields));
            if frame.frame_type != kind || !stream_ok || !payload_ok || !fields_ok {
                return Err(at(format!("expected {spec}, got {}", describe(&frame))));
            }
        } else if let Some(ms) = step["expect_silence_ms"].as_u64() {
            match wire.next(Duration::from_millis(ms)).await {
                Err(_) => {}
                Ok(Some(frame)) => {
                    return Err(at(format!("expected silence, got {}", describe(&frame))))
                }
                Ok(None) => return Err(at("expected silence, the host closed".into())),
            }
        } else if step.get("expect_closed").is_some() {
            loop {
                match wire.next(EXPECT_WITHIN).await {
                    Ok(None) => break,
                    Ok(Some(_)) => continue,
                    Err(what) => return Err(at(format!("expected the host to close, got {what}"))),
                }
            }
        } else {
            return Err(at(format!("unknown step {step}")));
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn the_host_passes_every_conformance_scenario() {
    let dir = support::repo_root().join("protocol/conformance/host");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .expect("scenarios")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    assert!(files.len() >= 25, "{} scenarios", files.len());
    // `allowed.example` resolves to loopback: requests to it are allowed and then fail to connect, without a
    // packet leaving the machine.
    let mut options = loopback_options(&[("allowed.example", "127.0.0.1")], &["allowed.example"]);
    // In a network namespace of its own with only loopback: nothing listens on port 80 there.
    options.isolated_network = true;
    let pep = TestPep::start(options);
    let mut failures = Vec::new();
    for file in &files {
        let scenario: Value = serde_json::from_str(&std::fs::read_to_string(file).expect("read"))
            .unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        let name = file
            .file_stem()
            .expect("name")
            .to_string_lossy()
            .into_owned();
        if let Err(why) = run(&pep.socket, &scenario).await {
            failures.push(format!("{name} ({}): {why}", scenario["covers"]));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} scenarios failed:\n{}",
        failures.len(),
        files.len(),
        failures.join("\n")
    );
}
