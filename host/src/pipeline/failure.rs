//! Why a request or a tunnel ended without its effect: each stage's typed error, gathered in one enum, and
//! the one conversion to the wire's `ErrorPayload` (stable code, message, details) where the stream ends.
//! Stages return their own errors; nothing in the pipeline builds an `ErrorPayload` itself.

use std::time::Duration;

use http::StatusCode;
use pexi_protocol::payload::{ErrorCode, ErrorDetails, ErrorPayload};

use super::decide::DecideError;
use super::guard::GuardError;
use super::redirect::RedirectError;
use super::request::InvalidRequest;
use super::resolve::ResolveError;
use super::target::EndpointError;
use super::upstream::UpstreamError;
use crate::stream::{HeadRefused, SendFailed};

#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// Validate and canonicalise: the request itself is malformed.
    #[error(transparent)]
    Invalid(#[from] InvalidRequest),
    /// A tunnel's destination is not a bare host name or IP literal.
    #[error(transparent)]
    Endpoint(#[from] EndpointError),
    /// A brokered secret the request names, or that this hop would carry, is not allowed there.
    #[error("{0}")]
    Secret(String),
    #[error(transparent)]
    Decide(#[from] DecideError),
    #[error("request denied by policy")]
    Denied {
        reasons: Vec<String>,
        decision_id: String,
    },
    /// The request body (announced or counted) passes the config's cap or the decision's `max_body_bytes`.
    #[error("{}", match .length {
        Some(length) => format!("request body of {length} bytes exceeds {limit}"),
        None => format!("request body exceeds {limit} bytes"),
    })]
    BodyTooLarge { limit: u64, length: Option<u64> },
    /// Resolve and guard: no address this hop may connect to.
    #[error(transparent)]
    Guard(#[from] GuardError),
    /// The pinned HTTP client could not be built (a PEP-side fault, not the guest's).
    #[error("HTTP client: {0}")]
    Client(String),
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    /// No address of a tunnel's destination accepted the connection.
    #[error("tunnel to {host}: {last}")]
    TunnelConnect { host: String, last: String },
    /// A redirect arrived for a request in redirect mode `error`.
    #[error("{status} redirect to {location} in redirect mode error")]
    RedirectRefused {
        status: StatusCode,
        location: String,
    },
    #[error("more than {limit} redirects")]
    TooManyRedirects { limit: u32 },
    #[error(transparent)]
    Redirect(#[from] RedirectError),
    /// A 307/308 needs the body again, and no complete copy was kept.
    #[error(
        "a 307/308 redirect needs the request body again, and only bodies up to {limit} bytes that were \
         fully sent (and fit the session's buffer budget) are kept"
    )]
    NoReplay { limit: usize },
    /// The response head does not fit one frame of this session (`status` is the upstream's, for HTTP).
    #[error("{}", match .status {
        Some(status) => format!(
            "the upstream's response headers ({status}) encode to {length} bytes, over the {max}-byte frame \
             this session accepts"
        ),
        None => format!("the response head encodes to {length} bytes, over the {max}-byte frame this session accepts"),
    })]
    HeadTooLarge {
        status: Option<StatusCode>,
        length: usize,
        max: usize,
    },
    #[error("no response data for {0:?}")]
    ResponseIdle(Duration),
    #[error("response body exceeds {limit} bytes")]
    ResponseTooLarge { limit: u64 },
    /// The guest's side: its stream went away, or it took nothing for the idle timeout.
    #[error(transparent)]
    Send(#[from] SendFailed),
    #[error("more than {cap} bytes sent on the upgraded connection")]
    UpgradedSentTooMuch { cap: u64 },
    #[error("more than {cap} bytes received on the upgraded connection")]
    UpgradedReceivedTooMuch { cap: u64 },
    #[error("upstream {op}: {source}")]
    UpgradedIo {
        op: &'static str,
        source: std::io::Error,
    },
    #[error("the upgraded connection was idle for {0:?}")]
    UpgradedIdle(Duration),
    /// The whole request's deadline (config `total_timeout_ms`, or the guest's shorter `timeout_ms`).
    #[error("request took longer than {0:?}")]
    Deadline(Duration),
    /// The guest cancelled the stream, or the session or the PEP ended.
    #[error("cancelled")]
    Cancelled,
}

impl RequestError {
    /// Why a response head was not sent; `status` is the upstream's, when it has one.
    pub fn head_refused(refused: HeadRefused, status: Option<StatusCode>) -> Self {
        match refused {
            HeadRefused::Gone => RequestError::Send(SendFailed::Gone),
            HeadRefused::TooLarge { length, max } => RequestError::HeadTooLarge {
                status,
                length,
                max,
            },
        }
    }
}

impl RequestError {
    /// The error code the guest and the outcome record get.
    pub fn code(&self) -> ErrorCode {
        use RequestError::*;
        match self {
            Invalid(_) | Endpoint(_) | Redirect(_) => ErrorCode::InvalidRequest,
            Secret(_) => ErrorCode::SecretNotAllowed,
            Decide(DecideError::AuditUnavailable(_)) => ErrorCode::AuditUnavailable,
            Denied { .. } => ErrorCode::PolicyDenied,
            BodyTooLarge { .. } | UpgradedSentTooMuch { .. } => ErrorCode::BodyTooLarge,
            Guard(GuardError::Resolve(_)) => ErrorCode::DnsFailure,
            Guard(GuardError::AllRefused { .. }) => ErrorCode::BlockedAddress,
            Client(_) => ErrorCode::Internal,
            Upstream(UpstreamError::Timeout(_))
            | ResponseIdle(_)
            | UpgradedIdle(_)
            | Deadline(_) => ErrorCode::UpstreamTimeout,
            Upstream(UpstreamError::Tls(_)) => ErrorCode::UpstreamTls,
            Upstream(UpstreamError::Connect(_)) | TunnelConnect { .. } | UpgradedIo { .. } => {
                ErrorCode::UpstreamConnect
            }
            RedirectRefused { .. } | NoReplay { .. } => ErrorCode::RedirectNotAllowed,
            TooManyRedirects { .. } => ErrorCode::TooManyRedirects,
            HeadTooLarge { .. } | ResponseTooLarge { .. } | UpgradedReceivedTooMuch { .. } => {
                ErrorCode::ResponseTooLarge
            }
            Send(SendFailed::Gone) | Cancelled => ErrorCode::Cancelled,
            Send(SendFailed::Stalled(_)) => ErrorCode::GuestStalled,
        }
    }

    /// Whether the same request may succeed if sent again unchanged.
    fn retryable(&self) -> bool {
        use RequestError::*;
        matches!(
            self,
            Decide(_)
                | Guard(GuardError::Resolve(ResolveError::Timeout { .. }))
                | Upstream(UpstreamError::Timeout(_) | UpstreamError::Connect(_))
                | TunnelConnect { .. }
                | ResponseIdle(_)
                | Deadline(_)
        )
    }

    /// The decision this error names itself (a denial, a guard refusal), if any.
    pub fn decision_id(&self) -> Option<&str> {
        match self {
            RequestError::Denied { decision_id, .. }
            | RequestError::Guard(GuardError::AllRefused { decision_id, .. }) => Some(decision_id),
            _ => None,
        }
    }
}

/// The one conversion from the pipeline's errors to what the guest receives.
impl From<RequestError> for ErrorPayload {
    fn from(err: RequestError) -> ErrorPayload {
        let code = err.code();
        let retryable = err.retryable();
        let message = match &err {
            // The record's reason text stays with the audit log; the guest learns only that it was logged.
            RequestError::Decide(DecideError::AuditUnavailable(_)) => {
                "the PEP cannot write its audit log, so it acts on no decision until it can; it retries by \
                 itself"
                    .to_string()
            }
            RequestError::Send(SendFailed::Stalled(idle)) => format!(
                "the guest took no response data for {idle:?} (no flow-control credit, or its transport not \
                 read); the upstream was released"
            ),
            _ => err.to_string(),
        };
        let details = match err {
            RequestError::Denied {
                reasons,
                decision_id,
            } => ErrorDetails {
                reasons,
                decision_id: Some(decision_id),
                ..ErrorDetails::default()
            },
            RequestError::Guard(GuardError::AllRefused {
                refused,
                decision_id,
                ..
            }) => ErrorDetails {
                reasons: refused,
                decision_id: Some(decision_id),
                ..ErrorDetails::default()
            },
            RequestError::BodyTooLarge { limit, .. } | RequestError::ResponseTooLarge { limit } => {
                ErrorDetails {
                    limit: Some(limit),
                    ..ErrorDetails::default()
                }
            }
            RequestError::TooManyRedirects { limit } => ErrorDetails {
                limit: Some(u64::from(limit)),
                ..ErrorDetails::default()
            },
            _ => ErrorDetails::default(),
        };
        ErrorPayload::new(code, message)
            .retryable(retryable)
            .with_details(details)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every stage's error keeps the code, message and details the guest received before the errors were
    /// typed: guests and docs match on these.
    #[test]
    fn codes_messages_and_details_are_stable() {
        let cases: Vec<(RequestError, ErrorCode, &str, bool)> = vec![
            (
                RequestError::Invalid(InvalidRequest::Method("G T".into())),
                ErrorCode::InvalidRequest,
                "invalid method \"G T\"",
                false,
            ),
            (
                RequestError::Redirect(RedirectError::Location("no".into())),
                ErrorCode::InvalidRequest,
                "redirect Location refused: no",
                false,
            ),
            (
                RequestError::BodyTooLarge {
                    limit: 10,
                    length: Some(11),
                },
                ErrorCode::BodyTooLarge,
                "request body of 11 bytes exceeds 10",
                false,
            ),
            (
                RequestError::BodyTooLarge {
                    limit: 10,
                    length: None,
                },
                ErrorCode::BodyTooLarge,
                "request body exceeds 10 bytes",
                false,
            ),
            (
                RequestError::Guard(GuardError::Resolve(ResolveError::Timeout {
                    name: "a.test".into(),
                    after: Duration::from_secs(1),
                })),
                ErrorCode::DnsFailure,
                "resolving a.test timed out after 1s",
                true,
            ),
            (
                RequestError::Guard(GuardError::Resolve(ResolveError::NoAddresses {
                    name: "a.test".into(),
                })),
                ErrorCode::DnsFailure,
                "a.test has no addresses",
                false,
            ),
            (
                RequestError::Upstream(UpstreamError::Tls("bad certificate".into())),
                ErrorCode::UpstreamTls,
                "bad certificate",
                false,
            ),
            (
                RequestError::Upstream(UpstreamError::Connect("refused".into())),
                ErrorCode::UpstreamConnect,
                "refused",
                true,
            ),
            (
                RequestError::TooManyRedirects { limit: 5 },
                ErrorCode::TooManyRedirects,
                "more than 5 redirects",
                false,
            ),
            (
                RequestError::Deadline(Duration::from_millis(1500)),
                ErrorCode::UpstreamTimeout,
                "request took longer than 1.5s",
                true,
            ),
            (
                RequestError::UpgradedIdle(Duration::from_secs(3)),
                ErrorCode::UpstreamTimeout,
                "the upgraded connection was idle for 3s",
                false,
            ),
            (
                RequestError::head_refused(HeadRefused::Gone, None),
                ErrorCode::Cancelled,
                "the stream is gone",
                false,
            ),
            (
                RequestError::head_refused(
                    HeadRefused::TooLarge {
                        length: 70_000,
                        max: 65_536,
                    },
                    Some(StatusCode::OK),
                ),
                ErrorCode::ResponseTooLarge,
                "the upstream's response headers (200 OK) encode to 70000 bytes, over the 65536-byte frame \
                 this session accepts",
                false,
            ),
            (
                RequestError::Cancelled,
                ErrorCode::Cancelled,
                "cancelled",
                false,
            ),
            (
                RequestError::Decide(DecideError::AuditUnavailable("disk full".into())),
                ErrorCode::AuditUnavailable,
                "the PEP cannot write its audit log, so it acts on no decision until it can; it retries by \
                 itself",
                true,
            ),
        ];
        for (err, code, message, retryable) in cases {
            let payload = ErrorPayload::from(err);
            assert_eq!(payload.code, code, "{message}");
            assert_eq!(payload.message, message);
            assert_eq!(payload.retryable, retryable, "{message}");
        }
    }

    #[test]
    fn refusals_carry_their_decision_and_limits() {
        let denied = RequestError::Denied {
            reasons: vec!["not on the allowlist".into()],
            decision_id: "d-1".into(),
        };
        assert_eq!(denied.decision_id(), Some("d-1"));
        let payload = ErrorPayload::from(denied);
        assert_eq!(payload.code, ErrorCode::PolicyDenied);
        assert_eq!(payload.details.reasons, ["not on the allowlist"]);
        assert_eq!(payload.details.decision_id.as_deref(), Some("d-1"));

        let blocked = RequestError::Guard(GuardError::AllRefused {
            host: "inside.test".into(),
            refused: vec!["10.0.0.1: private".into()],
            decision_id: "d-2".into(),
        });
        assert_eq!(blocked.decision_id(), Some("d-2"));
        let payload = ErrorPayload::from(blocked);
        assert_eq!(payload.code, ErrorCode::BlockedAddress);
        assert_eq!(
            payload.message,
            "inside.test resolves only to refused addresses"
        );
        assert_eq!(payload.details.reasons, ["10.0.0.1: private"]);

        let payload = ErrorPayload::from(RequestError::ResponseTooLarge { limit: 99 });
        assert_eq!(payload.details.limit, Some(99));
        let payload = ErrorPayload::from(RequestError::TooManyRedirects { limit: 3 });
        assert_eq!(payload.details.limit, Some(3));
        assert_eq!(RequestError::Cancelled.decision_id(), None);
    }
}
