//! Deterministic CBOR for control payloads.
//!
//! Every payload type is a struct whose fields serialise as a CBOR map with text keys in declaration order,
//! definite lengths and shortest-form integers; absent optional fields are omitted rather than sent as null.
//! Encoding the same value therefore always yields the same bytes, which is what lets `protocol/vectors/`
//! pin them. Decoding is lenient where the spec says so (unknown map keys are ignored, tags are skipped) and
//! strict where it matters: the payload must be exactly one CBOR item with nothing after it.

use serde::{de::DeserializeOwned, Serialize};

/// Why a CBOR payload was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid {what} payload: {reason}")]
pub struct PayloadError {
    pub what: &'static str,
    pub reason: String,
}

/// Nesting limit while decoding: our payloads are at most four levels deep, so this only stops hostile input.
const RECURSION_LIMIT: usize = 32;

pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    let mut out = Vec::new();
    // Writing plain data to a Vec cannot fail: the only error sources are I/O and custom Serialize impls
    // that refuse, and none of ours do.
    ciborium::into_writer(value, &mut out).expect("serialising a payload to a Vec cannot fail");
    out
}

pub fn decode<T: DeserializeOwned>(what: &'static str, bytes: &[u8]) -> Result<T, PayloadError> {
    let mut reader = bytes;
    let value = ciborium::de::from_reader_with_recursion_limit(&mut reader, RECURSION_LIMIT)
        .map_err(|err| PayloadError {
            what,
            reason: describe(err),
        })?;
    if !reader.is_empty() {
        return Err(PayloadError {
            what,
            reason: format!("{} bytes after the CBOR item", reader.len()),
        });
    }
    Ok(value)
}

fn describe<E: std::fmt::Debug>(err: ciborium::de::Error<E>) -> String {
    match err {
        ciborium::de::Error::Io(_) => "truncated CBOR".to_string(),
        ciborium::de::Error::Syntax(offset) => format!("malformed CBOR at byte {offset}"),
        ciborium::de::Error::Semantic(Some(offset), msg) => format!("{msg} (at byte {offset})"),
        ciborium::de::Error::Semantic(None, msg) => msg,
        ciborium::de::Error::RecursionLimitExceeded => "nested too deeply".to_string(),
    }
}
