//! The SDK's one error type.

use pexi_protocol::payload::ErrorPayload;

/// Everything a request can fail with. [`Error::code`] gives the stable machine-readable code: the
/// protocol's (`policy_denied`, `blocked_address`, `session_reset`, ...) or the SDK's own
/// (`endpoint`, `connect`, `closed`, `body`).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The PEP refused or failed the request.
    #[error("{}: {}", .0.code, .0.message)]
    Pep(ErrorPayload),
    /// No PEP could be reached.
    #[error("cannot reach the PEP at {endpoint}: {message}")]
    Connect {
        /// The endpoint tried.
        endpoint: String,
        /// What went wrong.
        message: String,
    },
    /// The endpoint string or environment is wrong.
    #[error("endpoint: {0}")]
    Endpoint(String),
    /// The client's connection task is gone.
    #[error("the client is closed")]
    Closed,
    /// The request body could not be read.
    #[error("request body: {0}")]
    Body(String),
}

impl Error {
    /// The stable code: the protocol's, or `connect`, `endpoint`, `closed`, `body`.
    pub fn code(&self) -> &str {
        match self {
            Error::Pep(error) => error.code.as_str(),
            Error::Connect { .. } => "connect",
            Error::Endpoint(_) => "endpoint",
            Error::Closed => "closed",
            Error::Body(_) => "body",
        }
    }

    /// The policy's reasons, for `policy_denied`.
    pub fn reasons(&self) -> &[String] {
        match self {
            Error::Pep(error) => &error.details.reasons,
            _ => &[],
        }
    }

    /// Whether sending the same request again may succeed. For `session_reset` only idempotent requests
    /// should be retried: the host may have performed the request.
    pub fn retryable(&self) -> bool {
        match self {
            Error::Pep(error) => error.retryable,
            Error::Connect { .. } => true,
            _ => false,
        }
    }

    /// The audit record of the decision, when there was one.
    pub fn decision_id(&self) -> Option<&str> {
        match self {
            Error::Pep(error) => error.details.decision_id.as_deref(),
            _ => None,
        }
    }
}
