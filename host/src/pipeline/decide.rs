//! Step 3 of every hop, as a unit: build the policy's input (redacted), evaluate it, write the decision
//! record and wait until it is durable. Nothing here acts on the decision; a decision that cannot be logged
//! is an error, so it is never acted on either.

use serde_json::{json, Value};

use super::input::{Asked, PolicyInput};
use super::Logged;
use crate::audit::records::{self, AuditRecord};
use crate::audit::{AuditLog, Redactor};
use crate::policy::PolicyEngine;
use crate::stream::Caller;

/// One hop to decide: who asks, with which method, for what, and after which hop.
#[derive(Clone, Copy)]
pub struct Hop<'a> {
    pub caller: &'a Caller,
    pub method: &'a str,
    pub asked: Asked<'a>,
    /// 0 for the request, n for its n-th redirect.
    pub number: u32,
    pub previous: Option<&'a url::Url>,
}

#[derive(Debug, thiserror::Error)]
pub enum DecideError {
    /// The decision record could not be made durable: the decision is not acted on.
    #[error("the audit log could not be written: {0}")]
    AuditUnavailable(String),
}

/// Decides `hop` with `policy` and returns once its record (named `decision_id`) is durable.
pub async fn decide_and_log(
    policy: &PolicyEngine,
    redactor: &Redactor,
    audit: &AuditLog,
    decision_id: String,
    hop: Hop<'_>,
) -> Result<Logged, DecideError> {
    let (input, redactions) = PolicyInput::build(
        redactor,
        hop.caller,
        hop.method,
        hop.asked,
        hop.number,
        hop.previous,
    );
    let input = input.to_json();
    let decision = policy.decide(&input);
    let digests: serde_json::Map<String, Value> = redactions
        .iter()
        .filter_map(|r| r.digest.as_ref().map(|d| (r.path.clone(), json!(d))))
        .collect();
    let record = records::Decision {
        decision_id: decision_id.clone(),
        session_id: format!("{:016x}", hop.caller.session_id),
        stream_id: hop.caller.stream_id,
        method: hop.method.to_string(),
        guest: input["session"]["guest"].clone(),
        vm: records::Vm::named(&hop.caller.vm.name, &hop.caller.vm.profile),
        request: input["request"].clone(),
        hop: hop.number,
        previous_url: input["previous_url"].clone(),
        decision: records::DecisionBody {
            allow: decision.allow,
            reasons: decision.reasons.clone(),
            secrets: json!(decision.secrets),
            policy_revision: policy.revision().to_string(),
            query: policy.query().to_string(),
            ask: decision.ask.as_ref().map(|ask| json!(ask)),
        },
        redacted: redactions.iter().map(|r| r.path.clone()).collect(),
        redacted_digests: digests,
    };
    let mut body = serde_json::to_value(&record).unwrap_or_else(|err| {
        // Only a bug in a record type gets here; the record still says what kind it was.
        json!({"serialisation_error": err.to_string()})
    });
    // The revision this decision was made under, not whatever is in service by now.
    body["policy_revision"] = json!(policy.revision());
    let writing = std::time::Instant::now();
    audit
        .record(records::Decision::KIND, body)
        .done()
        .await
        .map_err(|err| {
            tracing::error!(%err, "audit log write failed; refusing to act on the decision");
            DecideError::AuditUnavailable(err)
        })?;
    let seen = crate::approvals::Shown::of(&input);
    Ok(Logged {
        decision_id,
        decision,
        seen,
        audit_wait: writing.elapsed(),
    })
}

#[cfg(test)]
mod tests {
    use http::{HeaderName, HeaderValue, Method};
    use pexi_protocol::payload::{Implementation, RedirectMode};

    use super::*;
    use crate::audit::{AuditSettings, Durability};
    use crate::config::Config;
    use crate::pipeline::request::Prepared;
    use crate::pipeline::target::Target;

    /// The shipped policy, a real audit log: the decision is made, its record is durable before the
    /// function returns, and the record holds the redacted request, not the credential.
    #[tokio::test]
    async fn a_decision_is_durable_and_redacted_before_it_is_returned() {
        let dir = std::env::temp_dir().join(format!("pexi-decide-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let config = Config::embedded().expect("embedded config");
        let policy = crate::pipeline::load_policy(&config).expect("policy");
        let audit = AuditLog::open(&AuditSettings {
            path: dir.join("audit.jsonl"),
            durability: Durability::Always,
            batch_ms: 1,
            batch_records: 64,
            rotate_bytes: 0,
            keep_rotated_files: 0,
            keep_rotated_bytes: 0,
            sealing: None,
            force: false,
        })
        .expect("audit log");
        let redactor = Redactor::new(&["authorization".into()], &[], None);
        let caller = Caller {
            session_id: 7,
            guest: Implementation {
                name: "g".into(),
                version: "1".into(),
            },
            vm: Default::default(),
            stream_id: 1,
        };
        let prepared = Prepared {
            method: Method::GET,
            target: Target::parse("https://unlisted.example/x").expect("url"),
            headers: vec![(
                HeaderName::from_static("authorization"),
                HeaderValue::from_static("Bearer sk-live-123"),
            )],
            content_length: None,
            redirect: RedirectMode::Follow,
            timeout_ms: None,
            secrets: Vec::new(),
            upgrade: None,
        };
        let hop = Hop {
            caller: &caller,
            method: "pep.http.request",
            asked: Asked::Http(&prepared),
            number: 0,
            previous: None,
        };
        let logged = decide_and_log(&policy, &redactor, &audit, "d-1".into(), hop)
            .await
            .expect("decided and logged");
        assert!(!logged.decision.allow, "deny by default");
        // Durable now: the line is in the file before anything acts on the decision.
        let text = std::fs::read_to_string(dir.join("audit.jsonl")).expect("audit file");
        let line = text
            .lines()
            .find(|l| l.contains(r#""d-1""#))
            .expect("the decision's record");
        assert!(
            line.contains("unlisted.example") && line.contains("request.headers.authorization")
        );
        assert!(!line.contains("sk-live-123"), "{line}");
        audit.close();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
