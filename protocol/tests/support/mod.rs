//! Helpers shared by the integration tests: the CBOR→JSON mapping of `docs/protocol.md`, a byte pump that
//! connects two sessions, and the bless switch for checked-in generated files.
#![allow(dead_code)]

use std::path::PathBuf;

use base64::Engine;
use pexi_protocol::payload::Limits;
use pexi_protocol::session::{Config, Event, Session};

/// `PEXI_BLESS=1` rewrites checked-in generated files (vectors, schemas) instead of comparing against them.
pub fn blessing() -> bool {
    std::env::var_os("PEXI_BLESS").is_some_and(|v| v == "1")
}

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("protocol/ has a parent")
        .to_path_buf()
}

/// Compares `actual` with the checked-in file, or rewrites the file when blessing.
pub fn check_generated(path: &std::path::Path, actual: &str) {
    if blessing() {
        std::fs::create_dir_all(path.parent().expect("file has a parent")).expect("mkdir");
        std::fs::write(path, actual).expect("write generated file");
        return;
    }
    let expected = std::fs::read_to_string(path).unwrap_or_default();
    assert!(
        expected == actual,
        "{} differs from what the code generates; run `PEXI_BLESS=1 cargo test -p pexi-protocol` and review the diff",
        path.display()
    );
}

/// The normative CBOR→JSON mapping: byte strings become padded base64 strings, text stays text, integers
/// stay integers, maps need text keys.
pub fn cbor_to_json(value: &ciborium::Value) -> serde_json::Value {
    use ciborium::Value as C;
    use serde_json::Value as J;
    match value {
        C::Integer(i) => {
            let i = i128::from(*i);
            if let Ok(u) = u64::try_from(i) {
                J::from(u)
            } else {
                J::from(i64::try_from(i).expect("CBOR integer within i64"))
            }
        }
        C::Bytes(b) => J::String(base64::engine::general_purpose::STANDARD.encode(b)),
        C::Float(f) => J::from(*f),
        C::Text(t) => J::String(t.clone()),
        C::Bool(b) => J::Bool(*b),
        C::Null => J::Null,
        C::Tag(_, inner) => cbor_to_json(inner),
        C::Array(items) => J::Array(items.iter().map(cbor_to_json).collect()),
        C::Map(entries) => J::Object(
            entries
                .iter()
                .map(|(k, v)| {
                    let key = k.as_text().expect("payload map keys are text").to_string();
                    (key, cbor_to_json(v))
                })
                .collect(),
        ),
        other => panic!("unexpected CBOR value {other:?}"),
    }
}

pub fn client() -> Session {
    let mut config = Config::new("test-guest", "1.0");
    config.seed = 7;
    Session::client(config)
}

pub fn server() -> Session {
    server_with(Config::new("test-host", "1.0"), Limits::default())
}

pub fn server_with(mut config: Config, limits: Limits) -> Session {
    config.seed = 11;
    Session::server(config, limits)
}

/// Moves every queued frame from `from` to `to`; returns the number of bytes moved.
pub fn pump(from: &mut Session, to: &mut Session) -> usize {
    let mut bytes = Vec::new();
    while let Some(frame) = from.poll_transmit() {
        frame.encode_into(&mut bytes);
    }
    to.receive(&bytes);
    bytes.len()
}

/// Pumps both ways until neither side has anything to send.
pub fn settle(a: &mut Session, b: &mut Session) {
    for _ in 0..64 {
        if pump(a, b) + pump(b, a) == 0 {
            return;
        }
    }
    panic!("sessions did not settle");
}

pub fn events(session: &mut Session) -> Vec<Event> {
    std::iter::from_fn(|| session.poll_event()).collect()
}

/// A client and server that completed the handshake, with the handshake events drained.
pub fn established() -> (Session, Session) {
    established_with(server())
}

pub fn established_with(mut host: Session) -> (Session, Session) {
    let mut guest = client();
    settle(&mut guest, &mut host);
    assert!(matches!(
        events(&mut guest).as_slice(),
        [Event::Established(_)]
    ));
    assert!(matches!(
        events(&mut host).as_slice(),
        [Event::Established(_)]
    ));
    (guest, host)
}
