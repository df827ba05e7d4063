//! Typed payloads. Control payloads are deterministic CBOR maps (see [`cbor`]); a few fixed-size session
//! payloads are plain big-endian integers; DATA is raw bytes and never passes through here.

mod bytes_schema;
pub mod cbor;
mod error;
mod hello;
mod method;

pub use cbor::PayloadError;
pub use error::{ErrorCode, ErrorDetails, ErrorPayload, GoAway};
pub use hello::{Hello, HelloAck, Implementation, Limits, ReceiveParams};
pub use method::{
    End, HeaderField, HttpRequest, HttpResponseHead, MethodCall, NetConnect, NetConnectHead,
    OpenError, PolicyDecision, RedirectMode, ResponseHead, METHOD_HTTP_REQUEST, METHOD_NET_CONNECT,
    METHOD_POLICY_CHECK,
};

/// Largest credit a window may hold, and so the largest WINDOW_UPDATE increment: 2^31 - 1.
pub const MAX_WINDOW: u32 = (1 << 31) - 1;

/// WINDOW_UPDATE payload: a 4-byte big-endian increment in `1..=MAX_WINDOW`.
pub fn encode_window_update(increment: u32) -> [u8; 4] {
    increment.to_be_bytes()
}

pub fn decode_window_update(payload: &[u8]) -> Result<u32, PayloadError> {
    let bytes: [u8; 4] = payload.try_into().map_err(|_| PayloadError {
        what: "WINDOW_UPDATE",
        reason: format!("payload is {} bytes, expected 4", payload.len()),
    })?;
    match u32::from_be_bytes(bytes) {
        0 => Err(PayloadError {
            what: "WINDOW_UPDATE",
            reason: "increment is 0".into(),
        }),
        n if n > MAX_WINDOW => Err(PayloadError {
            what: "WINDOW_UPDATE",
            reason: format!("increment {n} exceeds 2^31-1"),
        }),
        n => Ok(n),
    }
}

/// PING / PONG payload: 8 opaque bytes, echoed unchanged.
pub fn decode_ping(payload: &[u8]) -> Result<[u8; 8], PayloadError> {
    payload.try_into().map_err(|_| PayloadError {
        what: "PING",
        reason: format!("payload is {} bytes, expected 8", payload.len()),
    })
}

/// SYNC / SYNC_ACK payload: an 8-byte big-endian nonce.
pub fn decode_nonce(payload: &[u8]) -> Result<u64, PayloadError> {
    let bytes: [u8; 8] = payload.try_into().map_err(|_| PayloadError {
        what: "SYNC",
        reason: format!("payload is {} bytes, expected 8", payload.len()),
    })?;
    Ok(u64::from_be_bytes(bytes))
}
