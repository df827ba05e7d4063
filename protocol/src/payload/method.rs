//! Stream payloads of the methods this version defines: OPEN parameters, HEAD results, END trailers.
//!
//! OPEN carries `{method, params}`. The session decodes it in two steps so that an unknown method is told
//! apart from malformed parameters: first the method name (unknown → `method_not_found`), then the
//! parameters for that method (malformed → `invalid_request`).

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{
    bytes_schema,
    cbor::{self, PayloadError},
};

pub const METHOD_HTTP_REQUEST: &str = "pep.http.request";
pub const METHOD_POLICY_CHECK: &str = "pep.policy.check";
pub const METHOD_NET_CONNECT: &str = "pep.net.connect";

/// One header as a two-element CBOR array: the name as a text string and the value as a byte string (HTTP
/// field values are octets, not necessarily UTF-8). Order and repetition are kept as sent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct HeaderField(
    pub String,
    #[serde(with = "serde_bytes")]
    #[schemars(schema_with = "bytes_schema::byte_string")]
    pub Vec<u8>,
);

impl HeaderField {
    pub fn new(name: impl Into<String>, value: impl Into<Vec<u8>>) -> Self {
        HeaderField(name.into(), value.into())
    }

    pub fn name(&self) -> &str {
        &self.0
    }

    pub fn value(&self) -> &[u8] {
        &self.1
    }
}

/// What the host does with a 3xx response.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum RedirectMode {
    /// Follow each `Location` as a new, separately policy-checked hop, up to the session's `max_redirects`.
    #[default]
    Follow,
    /// Return the 3xx response to the guest as it is.
    Manual,
    /// Fail the stream with `redirect_not_allowed`.
    Error,
}

/// Parameters of `pep.http.request` and `pep.policy.check`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct HttpRequest {
    /// HTTP method token, e.g. `GET`.
    pub method: String,
    /// Absolute `http` or `https` URL.
    pub url: String,
    #[serde(default)]
    pub headers: Vec<HeaderField>,
    /// Request body length when known in advance; the body itself follows as DATA frames.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_length: Option<u64>,
    #[serde(default)]
    pub redirect: RedirectMode,
    /// Whole-request deadline wanted by the guest; the host caps it at `limits.total_timeout_ms`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
}

impl HttpRequest {
    pub fn new(method: impl Into<String>, url: impl Into<String>) -> Self {
        HttpRequest {
            method: method.into(),
            url: url.into(),
            headers: Vec::new(),
            content_length: None,
            redirect: RedirectMode::Follow,
            timeout_ms: None,
        }
    }
}

/// Parameters of `pep.net.connect`: an opaque TCP tunnel to `host`:`port`, for destinations the policy
/// marks tunnel-only. The bytes are not inspected and no credential is injected.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct NetConnect {
    /// A DNS name or an IP literal (IPv6 without brackets).
    pub host: String,
    pub port: u16,
}

/// A method invocation: the typed form of an OPEN payload.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "method", content = "params")]
pub enum MethodCall {
    /// Perform an HTTP request after a policy decision. Request body: DATA frames, then END.
    #[serde(rename = "pep.http.request")]
    HttpRequest(HttpRequest),
    /// Decide only: no DNS, no network. The guest sends END without DATA.
    #[serde(rename = "pep.policy.check")]
    PolicyCheck(HttpRequest),
    /// Open an opaque TCP tunnel after a policy decision. DATA both ways, END each way.
    #[serde(rename = "pep.net.connect")]
    NetConnect(NetConnect),
}

/// Why an OPEN payload was refused, already mapped onto the error code the stream is answered with.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    #[error("method {0:?} is not implemented")]
    MethodNotFound(String),
    #[error(transparent)]
    Invalid(#[from] PayloadError),
}

#[derive(Deserialize)]
struct RawOpen {
    method: String,
    params: ciborium::Value,
}

impl MethodCall {
    pub fn method_name(&self) -> &'static str {
        match self {
            MethodCall::HttpRequest(_) => METHOD_HTTP_REQUEST,
            MethodCall::PolicyCheck(_) => METHOD_POLICY_CHECK,
            MethodCall::NetConnect(_) => METHOD_NET_CONNECT,
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        cbor::encode(self)
    }

    pub fn decode(payload: &[u8]) -> Result<MethodCall, OpenError> {
        let raw: RawOpen = cbor::decode("OPEN", payload)?;
        let params = |what| {
            raw.params
                .deserialized::<HttpRequest>()
                .map_err(|err| PayloadError {
                    what,
                    reason: err.to_string(),
                })
        };
        match raw.method.as_str() {
            METHOD_HTTP_REQUEST => Ok(MethodCall::HttpRequest(params(METHOD_HTTP_REQUEST)?)),
            METHOD_POLICY_CHECK => Ok(MethodCall::PolicyCheck(params(METHOD_POLICY_CHECK)?)),
            METHOD_NET_CONNECT => raw
                .params
                .deserialized::<NetConnect>()
                .map(MethodCall::NetConnect)
                .map_err(|err| {
                    OpenError::Invalid(PayloadError {
                        what: METHOD_NET_CONNECT,
                        reason: err.to_string(),
                    })
                }),
            _ => Err(OpenError::MethodNotFound(raw.method)),
        }
    }
}

/// HEAD of `pep.http.request`: the final upstream response's status line and headers. Any status, 4xx and
/// 5xx included, is a normal HEAD; only a failure to get a response is an ERROR.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct HttpResponseHead {
    pub status: u16,
    /// Always sent (possibly empty); a receiver treats a missing one as empty.
    #[serde(default)]
    pub headers: Vec<HeaderField>,
    /// The URL of the response after any redirects followed.
    pub final_url: String,
    pub redirect_count: u32,
    /// The audit record of the final hop's decision.
    pub decision_id: String,
}

/// HEAD of `pep.policy.check`: the decision, with no effect performed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct PolicyDecision {
    pub allow: bool,
    /// Always sent (possibly empty).
    #[serde(default)]
    pub reasons: Vec<String>,
    pub decision_id: String,
}

/// HEAD of `pep.net.connect`: the tunnel is open; DATA both ways follows.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct NetConnectHead {
    /// The address connected to (`ip:port`), one of those the address guard allowed.
    pub address: String,
    /// The audit record of the decision.
    pub decision_id: String,
}

/// A typed HEAD; which variant is decided by the method that opened the stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ResponseHead {
    Http(HttpResponseHead),
    PolicyDecision(PolicyDecision),
    NetConnect(NetConnectHead),
}

impl ResponseHead {
    pub fn encode(&self) -> Vec<u8> {
        match self {
            ResponseHead::Http(head) => cbor::encode(head),
            ResponseHead::PolicyDecision(decision) => cbor::encode(decision),
            ResponseHead::NetConnect(head) => cbor::encode(head),
        }
    }

    pub fn decode(method: &MethodCall, payload: &[u8]) -> Result<ResponseHead, PayloadError> {
        match method {
            MethodCall::HttpRequest(_) => cbor::decode("HEAD", payload).map(ResponseHead::Http),
            MethodCall::PolicyCheck(_) => {
                cbor::decode("HEAD", payload).map(ResponseHead::PolicyDecision)
            }
            MethodCall::NetConnect(_) => {
                cbor::decode("HEAD", payload).map(ResponseHead::NetConnect)
            }
        }
    }
}

/// END payload when there are trailers; an END without trailers has an empty payload.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct End {
    #[serde(default)]
    pub trailers: Vec<HeaderField>,
}

impl End {
    pub fn encode(&self) -> Vec<u8> {
        if self.trailers.is_empty() {
            Vec::new()
        } else {
            cbor::encode(self)
        }
    }

    pub fn decode(payload: &[u8]) -> Result<End, PayloadError> {
        if payload.is_empty() {
            Ok(End::default())
        } else {
            cbor::decode("END", payload)
        }
    }
}
