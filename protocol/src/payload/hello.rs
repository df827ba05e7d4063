//! HELLO and HELLO_ACK: version negotiation and the parameters each side announces.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::MAX_WINDOW;
use crate::frame::{HARD_MAX_PAYLOAD, MIN_MAX_PAYLOAD};

/// Who is speaking: shown in logs and audit records, never used for decisions.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Implementation {
    pub name: String,
    pub version: String,
}

/// What one side can receive. Each value limits the *peer's* sending.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ReceiveParams {
    /// Largest frame payload this side accepts, in bytes (4 KiB ..= 16 MiB).
    #[schemars(range(min = 4096, max = 16_777_216))]
    pub max_frame: u32,
    /// DATA bytes the peer may send on a new stream before a WINDOW_UPDATE (1 ..= 2^31-1).
    #[schemars(range(min = 1, max = 2_147_483_647))]
    pub initial_stream_window: u32,
    /// DATA bytes the peer may send across all streams before a WINDOW_UPDATE on stream 0 (1 ..= 2^31-1).
    #[schemars(range(min = 1, max = 2_147_483_647))]
    pub initial_connection_window: u32,
}

impl ReceiveParams {
    /// The spec's ranges (§4.1): `max_frame` 4096 ..= 16 MiB, each window 1 ..= 2³¹−1. A HELLO or HELLO_ACK
    /// with values outside them is refused.
    pub fn check(&self) -> Result<(), String> {
        if !(MIN_MAX_PAYLOAD..=HARD_MAX_PAYLOAD).contains(&self.max_frame) {
            return Err(format!(
                "max_frame {} outside {MIN_MAX_PAYLOAD}..={HARD_MAX_PAYLOAD}",
                self.max_frame
            ));
        }
        for (name, value) in [
            ("initial_stream_window", self.initial_stream_window),
            ("initial_connection_window", self.initial_connection_window),
        ] {
            if !(1..=MAX_WINDOW).contains(&value) {
                return Err(format!("{name} {value} outside 1..=2^31-1"));
            }
        }
        Ok(())
    }
}

/// Guest → host, first frame of a session (type 0x01, stream 0).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Hello {
    /// Protocol major versions the client speaks, in any order. This document defines version 1.
    pub versions: Vec<u16>,
    /// Chosen by the guest for this HELLO and echoed in the answer (HELLO_ACK `nonce`, or a refusal's
    /// `details.hello_nonce`), so that stale bytes left in a port by an earlier session are never taken
    /// for the answer.
    pub nonce: u64,
    pub implementation: Implementation,
    /// Capabilities; unknown names are ignored. Version 1 defines none. Always sent (empty); a receiver
    /// treats a missing one as empty.
    #[serde(default)]
    pub features: Vec<String>,
    /// What this side accepts from the peer.
    pub receive: ReceiveParams,
}

/// Limits the host enforces on this session, so the guest can refuse early instead of being cut off.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Limits {
    /// Streams the guest may have open at once; one more is refused with `resource_exhausted`.
    pub max_concurrent_streams: u32,
    /// Largest request body, in bytes (`body_too_large` beyond).
    pub max_request_bytes: u64,
    /// Largest response body, in bytes (`response_too_large` beyond).
    pub max_response_bytes: u64,
    /// Redirect hops followed in `follow` mode (`too_many_redirects` beyond).
    pub max_redirects: u32,
    pub connect_timeout_ms: u64,
    /// Longest a stream may go without a byte either way (an upstream that sends nothing: `upstream_timeout`;
    /// a guest that takes nothing: `guest_stalled`).
    pub idle_timeout_ms: u64,
    /// Upper bound for a whole request, whatever the guest's own `timeout_ms` says.
    pub total_timeout_ms: u64,
}

/// Host → guest answer to an acceptable HELLO (type 0x02, stream 0). A HELLO the host cannot accept is
/// answered with an ERROR on stream 0 instead (`unsupported_version`, `protocol_error`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct HelloAck {
    /// The highest version both sides speak.
    pub version: u16,
    /// The HELLO's nonce.
    pub nonce: u64,
    /// Assigned by the host; names this session in audit records.
    pub session_id: u64,
    pub implementation: Implementation,
    /// As in HELLO: always sent (empty in version 1).
    #[serde(default)]
    pub features: Vec<String>,
    /// What this side accepts from the peer.
    pub receive: ReceiveParams,
    pub limits: Limits,
    /// Digest of the policy bundle (Rego and data) deciding this session's requests; also stamped on every
    /// audit record. Absent when the host has none to report.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy_revision: Option<String>,
}
