//! One Rust type per audit record kind. The writer adds the chain fields (`v`, `seq`, `ts`, `kind`,
//! `prev`, `sig`) and the pipeline `policy_revision`; `schemas/audit/<kind>.schema.json` are generated from
//! these types (`host/tests/audit_schemas.rs`), and the examples in docs/audit.md are checked against them.
//!
//! Optional fields are left out when absent. `request`, `guest` and `previous_url` of a decision are the
//! policy input's (docs/policy.md) as they were decided, redacted.

use schemars::JsonSchema;
use serde::Serialize;
use serde_json::{Map, Value};

/// A record body and its kind.
pub trait AuditRecord: Serialize {
    const KIND: &'static str;
}

macro_rules! kinds {
    ($($ty:ty => $kind:literal,)*) => {
        $(impl AuditRecord for $ty {
            const KIND: &'static str = $kind;
        })*
        /// Every kind, with its type's schema, for the generated schemas.
        pub fn schemas() -> Vec<(&'static str, schemars::Schema)> {
            vec![$(($kind, schemars::schema_for!(Line<$ty>)),)*]
        }
    };
}

kinds! {
    ChainStart => "chain_start",
    PepStart => "pep_start",
    Rotate => "rotate",
    AuditRetention => "audit_retention",
    AuditResumed => "audit_resumed",
    PepStop => "pep_stop",
    Policy => "policy",
    Session => "session",
    Decision => "decision",
    Resolve => "resolve",
    Outcome => "outcome",
    ApprovalQuestion => "approval_question",
    ApprovalAnswer => "approval_answer",
    ExportGap => "export_gap",
    BundleFetch => "bundle",
}

/// One line of the audit log: the chain fields (`v`, `seq`, `ts`, `kind`, `prev`, `sig`) around the fields of
/// its kind (docs/audit.md). Fields a receiver does not know are ignored.
#[derive(Serialize, JsonSchema)]
pub struct Line<T> {
    /// Format version, 1.
    pub v: u64,
    /// Consecutive across every file of the log.
    pub seq: u64,
    /// When it was written, RFC 3339 UTC with milliseconds.
    pub ts: String,
    pub kind: String,
    /// `sha256:` + hex SHA-256 of the previous line's bytes; in a `chain_start`, its own `genesis`.
    pub prev: String,
    /// The policy bundle in service (records written by the pipeline).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy_revision: Option<String>,
    #[serde(flatten)]
    pub body: T,
    /// Ed25519 signature (128 hex digits) of the line without this field, always last (docs/audit.md).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sig: Option<String>,
}

/// A line left incomplete by a crash, moved aside at the next start.
#[derive(Clone, Debug, Serialize, JsonSchema)]
pub struct TornTail {
    pub file: Option<String>,
    pub line: usize,
    pub bytes: usize,
}

/// A log that did not verify, moved aside by `pexi serve --force`.
#[derive(Clone, Debug, Serialize, JsonSchema)]
pub struct PreviousLog {
    pub moved_to: String,
    pub problem: String,
}

/// The first record of a chain.
#[derive(Debug, Serialize, JsonSchema)]
pub struct ChainStart {
    /// `genesis:` + 32 random hex digits; also this record's `prev`.
    pub genesis: String,
    pub pid: u32,
    pub version: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub torn_tail: Option<TornTail>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub previous_log: Option<PreviousLog>,
}

/// The PEP started on an existing log.
#[derive(Debug, Serialize, JsonSchema)]
pub struct PepStart {
    pub pid: u32,
    pub version: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub torn_tail: Option<TornTail>,
}

/// The first record of each new file.
#[derive(Debug, Serialize, JsonSchema)]
pub struct Rotate {
    pub previous_file: Option<String>,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct RemovedFile {
    pub file: Option<String>,
    pub bytes: u64,
    pub first_seq: Option<u64>,
}

/// Rotated files past the retention bounds were removed.
#[derive(Debug, Serialize, JsonSchema)]
pub struct AuditRetention {
    pub removed: Vec<RemovedFile>,
    pub kept_files: usize,
    pub kept_bytes: u64,
    pub keep_rotated_files: usize,
    pub keep_rotated_bytes: u64,
}

/// The log is writable again after a failed write or fsync.
#[derive(Debug, Serialize, JsonSchema)]
pub struct AuditResumed {
    pub error: String,
    /// When it started failing.
    pub since: String,
    /// Records nobody waited for, kept meanwhile and written just before this one.
    pub kept_records: usize,
    /// Such records past the 4096 kept.
    pub lost_records: u64,
}

/// A clean shutdown.
#[derive(Debug, Serialize, JsonSchema)]
pub struct PepStop {
    pub reason: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum PolicyEvent {
    Load,
    Reload,
    ReloadRejected,
}

/// The PEP's own traffic to the bundle server (docs/fleet.md): a bundle downloaded, one refused, or the
/// server unreachable. Putting a downloaded bundle in service is the `policy` record that follows.
#[derive(Debug, Serialize, JsonSchema)]
pub struct BundleFetch {
    /// `download` (a new bundle, verified), `refused` (it did not verify), `unreachable` (the server
    /// could not be reached or answered with an error; once, until it answers again), `last_good` (the
    /// bundle kept on disk serves from the start).
    pub event: String,
    /// Without user info or query.
    pub url: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    /// The bundle's `.manifest` revision.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub etag: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The policy bundle was loaded, reloaded, or a reload rejected.
#[derive(Debug, Serialize, JsonSchema)]
pub struct Policy {
    pub event: PolicyEvent,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub new_revision: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub previous_revision: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum SessionEvent {
    Open,
    Close,
    /// Over a session cap: the HELLO was answered with `resource_exhausted`.
    Refused,
    HandshakeTimeout,
    IdleTimeout,
    DrainedForShutdown,
    DrainedAfterGuestGoaway,
}

#[derive(Clone, Debug, Serialize, JsonSchema)]
pub struct Guest {
    pub name: String,
    pub version: String,
}

/// The VM a session comes from, as the host set it up (its listener, `pexi vm run --name`), never as the
/// guest describes itself.
#[derive(Clone, Debug, Serialize, JsonSchema)]
pub struct Vm {
    pub name: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub profile: String,
}

impl Vm {
    /// `None` for a listener that names no VM, so such records stay as they were.
    pub fn named(name: &str, profile: &str) -> Option<Vm> {
        (!name.is_empty()).then(|| Vm {
            name: name.into(),
            profile: profile.into(),
        })
    }
}

/// A guest connection or session opened, ended, or was refused or closed by a limit.
#[derive(Debug, Serialize, JsonSchema)]
pub struct Session {
    pub event: SessionEvent,
    /// 16 hex digits; absent before a session was established.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session_id: Option<String>,
    /// Which transport connection (`unix:PATH#N`, `vsock:cidC:P`, ...).
    pub peer: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vm: Option<Vm>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guest: Option<Guest>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub protocol_version: Option<u16>,
    /// A refusal's error code and message, and the limit that was reached.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit: Option<u64>,
    /// The deadline that ended it (handshake, idle).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit_ms: Option<u64>,
}

impl Session {
    pub fn new(event: SessionEvent, peer: impl Into<String>) -> Session {
        Session {
            event,
            session_id: None,
            peer: peer.into(),
            vm: None,
            guest: None,
            protocol_version: None,
            code: None,
            message: None,
            limit: None,
            limit_ms: None,
        }
    }
}

/// What the policy decided for one hop.
#[derive(Debug, Serialize, JsonSchema)]
pub struct DecisionBody {
    pub allow: bool,
    pub reasons: Vec<String>,
    /// Brokered secrets the decision lets this hop carry (names).
    pub secrets: Value,
    pub policy_revision: String,
    pub query: String,
    /// A deny the policy lets a person overturn (`{"scope": "host" | "path"}`): the request is held and
    /// an `approval_question` follows.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ask: Option<Value>,
}

/// A policy decision, written (and durable) before its effect or its denial is reported.
#[derive(Debug, Serialize, JsonSchema)]
pub struct Decision {
    pub decision_id: String,
    pub session_id: String,
    pub stream_id: u32,
    /// `pep.http.request`, `pep.policy.check` or `pep.net.connect`.
    pub method: String,
    /// The guest's HELLO name and version.
    pub guest: Value,
    /// The VM the host knows the session as, when its listener names one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vm: Option<Vm>,
    /// The request as the policy saw it: canonical and redacted (docs/policy.md).
    pub request: Value,
    /// 0 for the request, n for its n-th redirect.
    pub hop: u32,
    pub previous_url: Value,
    pub decision: DecisionBody,
    /// Paths of the values that were redacted.
    pub redacted: Vec<String>,
    /// Keyed digests of the redacted values, by path (equal secrets correlate; none is readable).
    pub redacted_digests: Map<String, Value>,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct RefusedAddress {
    pub address: String,
    pub class: String,
}

/// After an allow: what the name resolved to and what the address guard did.
#[derive(Debug, Serialize, JsonSchema)]
pub struct Resolve {
    pub decision_id: String,
    pub host: String,
    /// `literal`, `override` or `dns`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allowed: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refused: Option<Vec<RefusedAddress>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Size and SHA-256 of a body (bodies are never logged).
#[derive(Debug, Default, Serialize, JsonSchema)]
pub struct BodyDigest {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// Of a response cut short: bytes the transport took towards the guest.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes_delivered: Option<u64>,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct TunnelBytes {
    pub address: String,
    pub bytes_to_upstream: u64,
    pub bytes_to_guest: u64,
}

/// How a stream ended: one per stream.
#[derive(Debug, Default, Serialize, JsonSchema)]
pub struct Outcome {
    /// The decision of the last hop, if there was one.
    pub decision_id: Option<String>,
    pub session_id: String,
    pub stream_id: u32,
    pub method: String,
    /// The HTTP status the guest got (the HEAD sent), if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub final_url: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redirects: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_body: Option<BodyDigest>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub response_body: Option<BodyDigest>,
    /// Brokered secrets some hop carried, and those withheld on another origin (names, never values).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secrets_injected: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secrets_withheld: Option<Vec<String>>,
    /// An upgraded connection: protocol, bytes each way, how long it lasted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upgrade: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tunnel: Option<TunnelBytes>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
    /// The error code the stream ended with (`shutdown`, `session_reset` or `cancelled` for one cut short).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Its message, redacted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// A request the policy held for a person (docs/approvals.md): the question, as `pexi approve` and the
/// dashboard show it. Identical requests that join it while it waits are named by the answer.
#[derive(Debug, Serialize, JsonSchema)]
pub struct ApprovalQuestion {
    pub question_id: String,
    /// The decision that asked.
    pub decision_id: String,
    pub session_id: String,
    pub guest: String,
    /// The HTTP method and the canonical URL, redacted.
    pub method: String,
    pub url: String,
    pub host: String,
    /// The policy's reasons.
    pub reasons: Vec<String>,
    /// What an "always" answer may cover: `host` or `path`.
    pub scope: String,
    /// When it is denied unanswered.
    pub timeout_ms: u64,
}

/// Records an export sink never shipped: retention removed their file first (docs/fleet.md). The
/// receiver gets this record in their place.
#[derive(Debug, Serialize, JsonSchema)]
pub struct ExportGap {
    /// `otlp` or `syslog`.
    pub sink: String,
    pub from_seq: u64,
    pub to_seq: u64,
}

/// How a question ended: a person's answer (written, and durable, before any held request goes on), no
/// answer by the deadline, or withdrawn when every request waiting on it went away.
#[derive(Debug, Serialize, JsonSchema)]
pub struct ApprovalAnswer {
    pub question_id: String,
    /// `allow_once`, `allow_always`, `deny_once`, `deny_always`, `no_answer` or `withdrawn`.
    pub answer: String,
    /// Who answered: `uid N (name)` on the control socket, `dashboard` (the holder of the start's
    /// token), or `pep` for no answer and withdrawals.
    pub by: String,
    /// Through what: `terminal` (`pexi approve`), `dashboard`, `control` (another client of the socket),
    /// or `pep`.
    pub surface: String,
    /// The held requests' decisions this answer settles.
    pub decision_ids: Vec<String>,
    /// An "always" answer's entry, its list (`allow` or `deny`) and the approvals file it went into.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub entry: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub list: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
}
