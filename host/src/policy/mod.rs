//! Policy decisions with the embedded regorus engine.
//!
//! One fixed query (`pep.policy.query`, by default `data.pexi.http.decision`) is evaluated per hop. Only
//! exactly one defined object of the form `{"allow": true|false, "reasons": [string, ...]}` counts; an
//! undefined result, an evaluation error or timeout, or any other shape is a deny whose reason says what
//! went wrong. A bundle is only put to work after it compiled, passed its own tests and produced a
//! well-formed decision for a probe input; then it is cloned per decision so that decisions run in
//! parallel without sharing interpreter state. [`PolicyStore`] swaps bundles atomically on reload.

mod bundle;
pub mod entries;
mod testing;

use std::sync::{Arc, RwLock};
use std::time::Duration;

pub use bundle::{Bundle, PolicyRoot};
pub use testing::{run_tests, TestOutcome};

/// The outcome of one evaluation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub allow: bool,
    pub reasons: Vec<String>,
}

impl Decision {
    fn deny(reason: impl Into<String>) -> Decision {
        Decision {
            allow: false,
            reasons: vec![reason.into()],
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("policy {file}: {message}")]
pub struct PolicyError {
    pub file: String,
    pub message: String,
}

pub struct PolicyEngine {
    engine: regorus::Engine,
    query: String,
    revision: String,
}

/// The bundle's modules and data in an engine, with the evaluation time limit set. No tests run here.
pub fn compile(bundle: &Bundle, timeout_ms: u64) -> Result<regorus::Engine, PolicyError> {
    let mut engine = regorus::Engine::new();
    engine.set_execution_timer_config(regorus::utils::limits::ExecutionTimerConfig {
        limit: Duration::from_millis(timeout_ms.max(1)),
        check_interval: std::num::NonZeroU32::MIN,
    });
    for (name, text) in &bundle.modules {
        engine
            .add_policy(name.clone(), text.clone())
            .map_err(|err| PolicyError {
                file: name.clone(),
                message: err.to_string(),
            })?;
    }
    fn data_error(err: impl std::fmt::Display) -> PolicyError {
        PolicyError {
            file: "policy data".into(),
            message: err.to_string(),
        }
    }
    engine
        .add_data(regorus::Value::from_json_str(&bundle.data.to_string()).map_err(data_error)?)
        .map_err(data_error)?;
    Ok(engine)
}

/// A request every bundle must be able to decide (allow or deny) before it may serve.
fn probe_input() -> serde_json::Value {
    serde_json::json!({
        "method": "pep.policy.check",
        "request": {"method": "GET", "scheme": "https", "host": "probe.pexi.invalid", "host_kind": "dns",
            "port": 443, "path": "/", "query": null, "headers": {}, "body_length": null,
            "url": "https://probe.pexi.invalid/"},
        "hop": 0,
        "previous_url": null,
        "session": {"id": "0000000000000000", "guest": {"name": "probe", "version": "0"}},
    })
}

impl PolicyEngine {
    /// Compiles the bundle, adds its data, runs its tests and decides a probe request. Any failure keeps
    /// the bundle out of service and says why.
    pub fn load(bundle: &Bundle, query: &str, timeout_ms: u64) -> Result<Self, PolicyError> {
        let engine = compile(bundle, timeout_ms)?;
        let failed: Vec<String> = run_tests(&engine, &bundle.tests)?
            .into_iter()
            .filter(|t| !t.passed)
            .map(|t| format!("{} ({})", t.name, t.detail.unwrap_or_default()))
            .collect();
        if !failed.is_empty() {
            return Err(PolicyError {
                file: bundle
                    .tests
                    .iter()
                    .map(|(n, _)| n.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
                message: format!(
                    "{} policy test(s) failed: {}",
                    failed.len(),
                    failed.join("; ")
                ),
            });
        }
        let policy = PolicyEngine {
            engine,
            query: query.to_string(),
            revision: bundle.revision.clone(),
        };
        policy
            .evaluate(&probe_input())
            .and_then(|value| interpret(&value))
            .map_err(|message| PolicyError {
                file: bundle
                    .modules
                    .iter()
                    .map(|(n, _)| n.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
                message: format!("query {} on a probe request: {message}", policy.query),
            })?;
        Ok(policy)
    }

    pub fn query(&self) -> &str {
        &self.query
    }

    pub fn revision(&self) -> &str {
        &self.revision
    }

    /// The query's raw result for `input`, as JSON (`pexi policy eval` shows it whole).
    pub fn evaluate(&self, input: &serde_json::Value) -> Result<serde_json::Value, String> {
        let mut engine = self.engine.clone();
        let input = regorus::Value::from_json_str(&input.to_string())
            .map_err(|err| format!("policy input rejected: {err}"))?;
        engine.set_input(input);
        let value = engine
            .eval_rule(self.query.clone())
            .map_err(|err| format!("policy evaluation failed: {err}"))?;
        if value == regorus::Value::Undefined {
            return Err("policy decision is undefined".into());
        }
        let json = value
            .to_json_str()
            .map_err(|err| format!("policy decision unreadable: {err}"))?;
        serde_json::from_str(&json).map_err(|err| format!("policy decision unreadable: {err}"))
    }

    /// Evaluates the query for `input`. Never fails: every failure is a deny that says why.
    pub fn decide(&self, input: &serde_json::Value) -> Decision {
        match self.evaluate(input).and_then(|value| interpret(&value)) {
            Ok(decision) => decision,
            Err(reason) => Decision::deny(reason),
        }
    }
}

/// Reads a decision object strictly: exactly the two keys, of exactly the two types.
fn interpret(parsed: &serde_json::Value) -> Result<Decision, String> {
    let malformed = || format!("policy decision is malformed: {parsed}");
    let object = parsed.as_object().ok_or_else(malformed)?;
    if object.len() != 2 {
        return Err(malformed());
    }
    let allow = object
        .get("allow")
        .and_then(serde_json::Value::as_bool)
        .ok_or_else(malformed)?;
    let reasons = object
        .get("reasons")
        .and_then(serde_json::Value::as_array)
        .ok_or_else(malformed)?
        .iter()
        .map(|r| r.as_str().map(str::to_string))
        .collect::<Option<Vec<String>>>()
        .ok_or_else(malformed)?;
    Ok(Decision { allow, reasons })
}

/// The bundle in service, swapped whole on reload: a decision uses one bundle from start to end, and
/// there is never a moment without one.
pub struct PolicyStore {
    current: RwLock<Arc<PolicyEngine>>,
}

impl PolicyStore {
    pub fn new(engine: PolicyEngine) -> Self {
        PolicyStore {
            current: RwLock::new(Arc::new(engine)),
        }
    }

    pub fn current(&self) -> Arc<PolicyEngine> {
        // A poisoned lock means a panic mid-swap; the Arc inside is still a complete engine.
        self.current
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// Puts `engine` in service; returns the revision it replaced.
    pub fn replace(&self, engine: PolicyEngine) -> String {
        let mut current = self
            .current
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let previous = current.revision.clone();
        *current = Arc::new(engine);
        previous
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use entries::Entry;
    use serde_json::json;

    fn engine_with(allow: &[&str]) -> PolicyEngine {
        let entries: Vec<Entry> = allow
            .iter()
            .map(|h| Entry::host(h).expect("pattern"))
            .collect();
        let bundle = Bundle::load(&PolicyRoot::Embedded, &entries, &[]).expect("bundle");
        PolicyEngine::load(&bundle, "data.pexi.http.decision", 1000).expect("default policy loads")
    }

    fn request(host: &str) -> serde_json::Value {
        let mut input = probe_input();
        input["request"]["host"] = json!(host);
        input
    }

    #[test]
    fn the_default_policy_denies_by_default() {
        let decision = engine_with(&[]).decide(&request("example.com"));
        assert_eq!(
            decision,
            Decision {
                allow: false,
                reasons: vec!["host example.com is not in the allowlist".into()]
            }
        );
    }

    #[test]
    fn the_default_policy_allows_listed_hosts() {
        let policy = engine_with(&["example.com", "*.api.test"]);
        assert!(policy.decide(&request("example.com")).allow);
        assert!(policy.decide(&request("v1.api.test")).allow);
        assert!(!policy.decide(&request("api.test")).allow);
    }

    #[test]
    fn the_revision_names_code_and_data() {
        let a = Bundle::load(&PolicyRoot::Embedded, &[], &[]).expect("bundle");
        let b = Bundle::load(&PolicyRoot::Embedded, &[], &[]).expect("bundle");
        let c = Bundle::load(
            &PolicyRoot::Embedded,
            &[Entry::host("x.test").expect("entry")],
            &[],
        )
        .expect("bundle");
        assert_eq!(a.revision, b.revision);
        assert_ne!(a.revision, c.revision);
        assert!(a.revision.starts_with("sha256:") && a.revision.len() == 7 + 64);
    }

    fn custom(rego: &str) -> Result<PolicyEngine, PolicyError> {
        let bundle = Bundle {
            modules: vec![("custom.rego".into(), rego.into())],
            tests: vec![],
            data: json!({}),
            revision: "test".into(),
        };
        PolicyEngine::load(&bundle, "data.pexi.http.decision", 1000)
    }

    #[test]
    fn anything_but_one_well_formed_decision_is_a_deny() {
        let cases = [
            ("undefined", "package pexi.http\nimport rego.v1\ndecision := {\"allow\": true, \"reasons\": []} if input.request.host == \"probe.pexi.invalid\"\n"),
            ("not an object", "package pexi.http\nimport rego.v1\ndecision := true if input.zero == 0\ndecision := {\"allow\": false, \"reasons\": []} if not input.zero\n"),
            ("runtime error", "package pexi.http\nimport rego.v1\ndecision := {\"allow\": true, \"reasons\": [x]} if { x := 1 / input.zero }\ndecision := {\"allow\": false, \"reasons\": []} if not input.zero\n"),
        ];
        for (what, rego) in cases {
            let policy = custom(rego).unwrap_or_else(|err| panic!("{what}: {err}"));
            let decision = policy.decide(&json!({"zero": 0, "request": {"host": "x"}}));
            assert!(!decision.allow, "{what}: {decision:?}");
            assert!(
                decision.reasons[0].starts_with("policy "),
                "{what}: {decision:?}"
            );
        }
        for (json, what) in [
            (json!({"allow": "yes", "reasons": []}), "allow not a bool"),
            (
                json!({"allow": true, "reasons": [], "also": 1}),
                "extra key",
            ),
            (
                json!({"allow": true, "reasons": [1]}),
                "reason not a string",
            ),
        ] {
            assert!(interpret(&json).is_err(), "{what}");
        }
    }

    #[test]
    fn conflicting_definitions_are_a_deny_not_a_pick() {
        let policy = custom(
            "package pexi.http\nimport rego.v1\ndecision := {\"allow\": true, \"reasons\": []} if input.a\ndecision := {\"allow\": false, \"reasons\": []} if not input.a\ndecision := {\"allow\": false, \"reasons\": [\"b\"]} if input.b\n",
        )
        .expect("loads");
        assert!(!policy.decide(&json!({"a": true, "b": true})).allow);
    }

    #[test]
    fn a_bundle_that_cannot_serve_is_refused_naming_why() {
        let err = custom("package pexi.http\ndecision := {")
            .err()
            .expect("parse error");
        assert!(err.to_string().contains("custom.rego"), "{err}");
        let err = custom("package other\nx := 1\n")
            .err()
            .expect("no such query");
        assert!(err.to_string().contains("data.pexi.http.decision"), "{err}");
        let err = custom("package pexi.http\nimport rego.v1\ndecision := {\"allow\": true, \"reasons\": []} if input.never\n")
            .err()
            .expect("undefined on the probe");
        assert!(err.to_string().contains("probe"), "{err}");
        let mut bundle = Bundle::load(&PolicyRoot::Embedded, &[], &[]).expect("bundle");
        bundle.tests.push((
            "broken_test.rego".into(),
            "package broken_test\nimport rego.v1\ntest_fails if { 1 == 2 }\n".into(),
        ));
        let err = PolicyEngine::load(&bundle, "data.pexi.http.decision", 1000)
            .err()
            .expect("failing test");
        assert!(err.to_string().contains("broken_test.test_fails"), "{err}");
    }

    #[test]
    fn extension_packages_add_denials_to_the_shipped_policy() {
        let mut bundle = Bundle::load(
            &PolicyRoot::Embedded,
            &[Entry::host("uploads.example.com").expect("entry")],
            &[],
        )
        .expect("bundle");
        bundle.modules.push((
            "pexi/rules/body_limits.rego".into(),
            "package pexi.rules.body_limits\nimport rego.v1\n\ndenials contains sprintf(\"body of %d bytes is over 1 MiB\", [input.request.body_length]) if {\n\tinput.request.body_length > 1048576\n}\n".into(),
        ));
        let policy = PolicyEngine::load(&bundle, "data.pexi.http.decision", 1000).expect("loads");
        let mut small = request("uploads.example.com");
        small["request"]["body_length"] = json!(1000);
        assert!(policy.decide(&small).allow);
        let mut big = request("uploads.example.com");
        big["request"]["body_length"] = json!(5_000_000);
        assert_eq!(
            policy.decide(&big),
            Decision {
                allow: false,
                reasons: vec!["body of 5000000 bytes is over 1 MiB".into()]
            }
        );
    }

    #[test]
    fn the_shipped_tests_pass() {
        let bundle = Bundle::load(&PolicyRoot::Embedded, &[], &[]).expect("bundle");
        let policy = PolicyEngine::load(&bundle, "data.pexi.http.decision", 1000).expect("loads");
        let outcomes = run_tests(&policy.engine, &bundle.tests).expect("run");
        assert!(outcomes.len() >= 20, "{outcomes:?}");
        let failed: Vec<_> = outcomes.iter().filter(|t| !t.passed).collect();
        assert!(failed.is_empty(), "{failed:?}");
    }
}
