//! Policy decisions with the embedded regorus engine.
//!
//! One fixed query (`pep.policy.query`, by default `data.pexi.egress.decision`) is evaluated per hop. Only
//! exactly one defined object of the form `{"allow": true|false, "reasons": [string, ...]}` counts; an
//! undefined result, an evaluation error or timeout, or any other shape is a deny whose reason says what
//! went wrong. The engine is loaded and checked once at start, then cloned per decision so that decisions
//! run in parallel without sharing interpreter state.

use std::time::Duration;

use crate::config::PolicyConfig;

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
}

impl PolicyEngine {
    /// Compiles the sources, adds `data`, and evaluates the query once against an empty input, so that a
    /// policy that does not parse or does not define the query fails at start rather than denying forever.
    pub fn load(config: &PolicyConfig, sources: &[(String, String)]) -> Result<Self, PolicyError> {
        let mut engine = regorus::Engine::new();
        engine.set_execution_timer_config(regorus::utils::limits::ExecutionTimerConfig {
            limit: Duration::from_millis(config.timeout_ms.max(1)),
            check_interval: std::num::NonZeroU32::MIN,
        });
        for (name, text) in sources {
            engine
                .add_policy(name.clone(), text.clone())
                .map_err(|err| PolicyError {
                    file: name.clone(),
                    message: err.to_string(),
                })?;
        }
        let data = serde_json::Value::Object(config.data.clone()).to_string();
        engine
            .add_data(
                regorus::Value::from_json_str(&data).map_err(|err| PolicyError {
                    file: "[pep.policy.data]".into(),
                    message: err.to_string(),
                })?,
            )
            .map_err(|err| PolicyError {
                file: "[pep.policy.data]".into(),
                message: err.to_string(),
            })?;
        let policy = PolicyEngine {
            engine,
            query: config.query.clone(),
        };
        let mut probe = policy.engine.clone();
        probe.set_input(regorus::Value::new_object());
        probe
            .eval_rule(policy.query.clone())
            .map_err(|err| PolicyError {
                file: sources
                    .iter()
                    .map(|(n, _)| n.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
                message: format!("query {}: {err}", policy.query),
            })?;
        Ok(policy)
    }

    pub fn query(&self) -> &str {
        &self.query
    }

    /// Evaluates the query for `input`. Never fails: every failure is a deny that says why.
    pub fn decide(&self, input: &serde_json::Value) -> Decision {
        let mut engine = self.engine.clone();
        let input = match regorus::Value::from_json_str(&input.to_string()) {
            Ok(input) => input,
            Err(err) => return Decision::deny(format!("policy input rejected: {err}")),
        };
        engine.set_input(input);
        match engine.eval_rule(self.query.clone()) {
            Ok(value) => interpret(&value),
            Err(err) => Decision::deny(format!("policy evaluation failed: {err}")),
        }
    }
}

/// Reads a decision object strictly: exactly the two keys, of exactly the two types.
fn interpret(value: &regorus::Value) -> Decision {
    if *value == regorus::Value::Undefined {
        return Decision::deny("policy decision is undefined");
    }
    let json = match value.to_json_str() {
        Ok(json) => json,
        Err(err) => return Decision::deny(format!("policy decision unreadable: {err}")),
    };
    let parsed: serde_json::Value = match serde_json::from_str(&json) {
        Ok(parsed) => parsed,
        Err(err) => return Decision::deny(format!("policy decision unreadable: {err}")),
    };
    let malformed = || Decision::deny(format!("policy decision is malformed: {parsed}"));
    let Some(object) = parsed.as_object() else {
        return malformed();
    };
    if object.len() != 2 {
        return malformed();
    }
    let (Some(allow), Some(reasons)) = (
        object.get("allow").and_then(serde_json::Value::as_bool),
        object.get("reasons").and_then(serde_json::Value::as_array),
    ) else {
        return malformed();
    };
    let Some(reasons) = reasons
        .iter()
        .map(|r| r.as_str().map(str::to_string))
        .collect::<Option<Vec<String>>>()
    else {
        return malformed();
    };
    Decision { allow, reasons }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use serde_json::json;

    fn engine_with(domains: serde_json::Value) -> PolicyEngine {
        let config = Config::embedded().expect("embedded config");
        let mut policy = config.pep.policy.clone();
        policy.data.insert("allowed_domains".into(), domains);
        PolicyEngine::load(&policy, &config.policies).expect("default policy loads")
    }

    fn request(host: &str) -> serde_json::Value {
        json!({"request": {"method": "GET", "scheme": "https", "host": host, "host_kind": "dns", "port": 443,
            "path": "/", "query": null, "headers": {}, "body_length": null}, "hop": 0, "previous_url": null,
            "method": "pep.http.request", "session": {"id": "1", "guest": {"name": "t", "version": "1"}}})
    }

    #[test]
    fn the_default_policy_denies_by_default() {
        let decision = engine_with(json!([])).decide(&request("example.com"));
        assert!(!decision.allow);
        assert_eq!(
            decision.reasons,
            vec!["host example.com is not on the allowlist (deny by default)"]
        );
    }

    #[test]
    fn the_default_policy_allows_listed_hosts_and_wildcard_subdomains() {
        let policy = engine_with(json!(["example.com", "*.api.test"]));
        assert!(policy.decide(&request("example.com")).allow);
        assert!(policy.decide(&request("v1.api.test")).allow);
        assert!(
            !policy.decide(&request("api.test")).allow,
            "a wildcard is for subdomains only"
        );
        assert!(!policy.decide(&request("example.com.evil.test")).allow);
        assert!(!policy.decide(&request("evilexample.com")).allow);
        assert!(!policy.decide(&request("xapi.test")).allow);
    }

    fn custom(rego: &str) -> Result<PolicyEngine, PolicyError> {
        let config = Config::embedded().expect("embedded config");
        PolicyEngine::load(&config.pep.policy, &[("custom.rego".into(), rego.into())])
    }

    #[test]
    fn anything_but_one_well_formed_decision_is_a_deny() {
        let cases = [
            ("undefined", "package pexi.egress\nimport rego.v1\ndecision := {\"allow\": true, \"reasons\": []} if input.never\n"),
            ("not an object", "package pexi.egress\ndecision := true\n"),
            ("allow not a bool", "package pexi.egress\ndecision := {\"allow\": \"yes\", \"reasons\": []}\n"),
            ("extra key", "package pexi.egress\ndecision := {\"allow\": true, \"reasons\": [], \"also\": 1}\n"),
            ("reason not a string", "package pexi.egress\ndecision := {\"allow\": true, \"reasons\": [1]}\n"),
            ("runtime error", "package pexi.egress\nimport rego.v1\ndecision := {\"allow\": true, \"reasons\": [x]} if { x := 1 / input.zero }\n"),
        ];
        for (what, rego) in cases {
            let policy = custom(rego).unwrap_or_else(|err| panic!("{what}: {err}"));
            let decision = policy.decide(&json!({"zero": 0}));
            assert!(!decision.allow, "{what}: {decision:?}");
            assert!(
                decision.reasons[0].starts_with("policy "),
                "{what}: {decision:?}"
            );
        }
        let ok =
            custom("package pexi.egress\ndecision := {\"allow\": true, \"reasons\": [\"fine\"]}\n")
                .expect("loads");
        assert_eq!(
            ok.decide(&json!({})),
            Decision {
                allow: true,
                reasons: vec!["fine".into()]
            }
        );
    }

    #[test]
    fn conflicting_definitions_are_a_deny_not_a_pick() {
        // Two complete definitions with different values: OPA calls this a conflict; it must not allow.
        let policy = custom(
            "package pexi.egress\nimport rego.v1\ndecision := {\"allow\": true, \"reasons\": []} if input.a\ndecision := {\"allow\": false, \"reasons\": []} if input.b\n",
        )
        .expect("loads");
        assert!(!policy.decide(&json!({"a": true, "b": true})).allow);
    }

    #[test]
    fn a_broken_policy_fails_at_load_naming_the_file() {
        let err = custom("package pexi.egress\ndecision := {")
            .err()
            .expect("refused");
        assert!(err.to_string().contains("custom.rego"), "{err}");
        let err = custom("package other\nx := 1\n")
            .err()
            .expect("no such query");
        assert!(
            err.to_string().contains("data.pexi.egress.decision"),
            "{err}"
        );
    }
}
