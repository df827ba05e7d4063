//! The ERROR payload and its stable codes; GOAWAY reuses the codes.

use std::{borrow::Cow, fmt};

use schemars::{json_schema, JsonSchema, Schema, SchemaGenerator};
use serde::{Deserialize, Serialize};

macro_rules! error_codes {
    ($($(#[$doc:meta])* $variant:ident = $name:literal,)*) => {
        /// A stable, machine-readable error code. The wire form is the snake_case string; a code this build
        /// does not know (from a newer peer) is kept as [`ErrorCode::Other`] and treated like `internal`.
        #[derive(Clone, Debug, PartialEq, Eq, Hash)]
        pub enum ErrorCode {
            $($(#[$doc])* $variant,)*
            Other(String),
        }

        impl ErrorCode {
            /// Every code this version defines.
            pub const KNOWN: &'static [ErrorCode] = &[$(ErrorCode::$variant,)*];

            pub fn as_str(&self) -> &str {
                match self {
                    $(ErrorCode::$variant => $name,)*
                    ErrorCode::Other(code) => code,
                }
            }

            pub fn parse(code: &str) -> ErrorCode {
                match code {
                    $($name => ErrorCode::$variant,)*
                    other => ErrorCode::Other(other.to_string()),
                }
            }
        }
    };
}

error_codes! {
    /// The policy did not allow the request; `details.reasons` says why.
    PolicyDenied = "policy_denied",
    /// The request's parameters are malformed or not allowed (bad URL, scheme, header, ...).
    InvalidRequest = "invalid_request",
    /// OPEN named a method this host does not implement.
    MethodNotFound = "method_not_found",
    /// No protocol version in common; `details.supported_versions` lists the host's.
    UnsupportedVersion = "unsupported_version",
    /// The peer broke the framing or the session rules.
    ProtocolError = "protocol_error",
    BodyTooLarge = "body_too_large",
    ResponseTooLarge = "response_too_large",
    TooManyRedirects = "too_many_redirects",
    /// A redirect arrived while the request's redirect mode was `error`.
    RedirectNotAllowed = "redirect_not_allowed",
    /// The destination resolved only to refused address classes.
    BlockedAddress = "blocked_address",
    /// The request names a brokered secret (a placeholder) it may not have here, or carries its own
    /// credential to a host whose credential the PEP brokers; nothing was sent.
    SecretNotAllowed = "secret_not_allowed",
    DnsFailure = "dns_failure",
    UpstreamConnect = "upstream_connect",
    UpstreamTls = "upstream_tls",
    UpstreamTimeout = "upstream_timeout",
    Cancelled = "cancelled",
    /// A limit on what one guest or all guests may hold was reached (concurrent streams per session or in
    /// total, sessions per transport or in total); `details.limit` names it.
    ResourceExhausted = "resource_exhausted",
    /// The session lost sync or was re-established; the stream's outcome is unknown.
    SessionReset = "session_reset",
    /// The guest took no response data (granted no credit, read nothing) for the host's idle timeout; the
    /// host ended the stream and released its upstream.
    GuestStalled = "guest_stalled",
    /// The audit log cannot be written (a full disk, an I/O error): nothing is decided until it can. The
    /// host keeps trying and resumes by itself.
    AuditUnavailable = "audit_unavailable",
    Internal = "internal",
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for ErrorCode {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for ErrorCode {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let code = String::deserialize(deserializer)?;
        Ok(ErrorCode::parse(&code))
    }
}

impl JsonSchema for ErrorCode {
    fn schema_name() -> Cow<'static, str> {
        "ErrorCode".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        let known: Vec<&str> = ErrorCode::KNOWN.iter().map(ErrorCode::as_str).collect();
        json_schema!({
            "description": "Stable error code. Receivers treat a code they do not know as `internal`.",
            "type": "string",
            "enum": known
        })
    }
}

/// Structured context for an error; every field is optional and unknown keys are ignored.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ErrorDetails {
    /// The policy's reasons for a deny.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reasons: Vec<String>,
    /// Ties the error to its audit record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decision_id: Option<String>,
    /// The limit that was exceeded, in the unit of the limit (bytes, hops, streams).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u64>,
    /// With `unsupported_version`: the versions the host speaks.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub supported_versions: Vec<u16>,
    /// In a refusal of a HELLO: that HELLO's nonce.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hello_nonce: Option<u64>,
    /// With `protocol_error` after a framing failure: which check failed (`bad_header_crc`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frame_error: Option<String>,
}

impl ErrorDetails {
    pub fn is_empty(&self) -> bool {
        self == &ErrorDetails::default()
    }
}

/// ERROR (type 0x14). On a stream it ends the stream in both directions; on stream 0 it reports a
/// session-level problem (refused HELLO, a frame that broke the rules) without ending the session.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema, thiserror::Error)]
#[error("{code}: {message}")]
pub struct ErrorPayload {
    pub code: ErrorCode,
    pub message: String,
    /// Whether the same request may succeed if sent again unchanged.
    #[serde(default)]
    pub retryable: bool,
    /// Structured context; omitted when empty.
    // Boxed: usually empty, and inline it would triple the size of every `Result` carrying an error.
    #[serde(default, skip_serializing_if = "ErrorDetails::is_empty")]
    pub details: Box<ErrorDetails>,
}

impl ErrorPayload {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ErrorPayload {
            code,
            message: message.into(),
            retryable: false,
            details: Box::default(),
        }
    }

    pub fn retryable(mut self, retryable: bool) -> Self {
        self.retryable = retryable;
        self
    }

    pub fn with_details(mut self, details: ErrorDetails) -> Self {
        self.details = Box::new(details);
        self
    }
}

/// GOAWAY (type 0x06, stream 0): the sender accepts no new streams. Streams up to `last_stream_id` still
/// complete; later ones were not processed and may be retried on a new session.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct GoAway {
    pub code: ErrorCode,
    pub message: String,
    pub last_stream_id: u32,
}
