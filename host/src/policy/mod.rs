//! Policy decisions with the embedded regorus engine.
//!
//! One fixed query (`pep.policy.query`, by default `data.pexi.http.decision`) is evaluated per hop. Only
//! exactly one defined object of the form `{"allow": true|false, "reasons": [string, ...]}` counts; an
//! undefined result, an evaluation error or timeout, or any other shape is a deny whose reason says what
//! went wrong. A bundle is only put to work after it compiled, passed its own tests and produced a
//! well-formed decision for a probe input. [`PolicyStore`] swaps bundles atomically on reload.
//!
//! Decisions run on regorus's bytecode VM (RVM) when the bundle compiles to it: the tree-walking
//! interpreter spent ~0.6 ms per decision of the shipped policy, the VM ~0.05 ms (docs/benchmarks.md).
//! The interpreter stays the reference: it runs the bundle's tests (`with` needs it), and a bundle the
//! VM cannot compile, or whose probe decisions differ between the two, is served by the interpreter,
//! saying so in the log. Both evaluate in a fresh state per decision; VMs are pooled, not shared.

mod bundle;
pub mod entries;
mod index;
pub mod opa_bundle;
mod testing;

use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

pub use bundle::{Approvals, ApprovalsFile, Bundle, Listed, PolicyRoot};
pub use testing::{run_tests, TestOutcome};

/// The outcome of one evaluation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub allow: bool,
    pub reasons: Vec<String>,
    /// Obligations: when the policy names them, exactly these brokered secrets go into an allowed
    /// request (each still only within its binding); `None` leaves it to the request's placeholders.
    pub secrets: Option<Vec<String>>,
    /// Obligation: the request body may not pass this many bytes, announced or not (the PEP counts the
    /// stream); `None` leaves only `limits.max_request_bytes`.
    pub max_body_bytes: Option<u64>,
    /// A deny that a person may overturn: the PEP holds the request and asks (docs/approvals.md). Never
    /// set together with `allow`.
    pub ask: Option<Ask>,
}

/// What the policy lets a person's "always" answer cover.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AskScope {
    /// The host (with the request's scheme and port), or anything narrower.
    Host,
    /// Only the request's method under a path prefix of the host.
    Path,
}

impl AskScope {
    pub fn as_str(self) -> &'static str {
        match self {
            AskScope::Host => "host",
            AskScope::Path => "path",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Ask {
    pub scope: AskScope,
}

impl Decision {
    fn deny(reason: impl Into<String>) -> Decision {
        Decision {
            allow: false,
            reasons: vec![reason.into()],
            secrets: None,
            max_body_bytes: None,
            ask: None,
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
    timeout: Duration,
    vm: Option<Compiled>,
    /// The bundle's allow and deny entries with their sources (`pexi policy list`, the dashboard).
    listed: Vec<Listed>,
}

/// The bundle compiled for the RVM, its data, and VMs ready to run it.
struct Compiled {
    program: Arc<regorus::rvm::Program>,
    data: regorus::Value,
    idle: Mutex<Vec<regorus::rvm::RegoVM>>,
}

/// Upper bound on VM instructions per decision, far above any sane policy (10 000 allowlist entries
/// take ~10 million); the wall-clock `timeout_ms` is the limit that matters.
const MAX_INSTRUCTIONS: usize = 1 << 34;
/// Pooled VMs kept per bundle (one per concurrently deciding thread is enough).
const IDLE_VMS: usize = 64;

fn timer(timeout: Duration) -> regorus::utils::limits::ExecutionTimerConfig {
    regorus::utils::limits::ExecutionTimerConfig {
        limit: timeout,
        // Reading the clock every step cost ~10% of a decision; every 64 steps is still sub-µs late.
        check_interval: std::num::NonZeroU32::new(64).unwrap_or(std::num::NonZeroU32::MIN),
    }
}

/// The bundle's modules and data in an engine, with the evaluation time limit set. No tests run here.
pub fn compile(bundle: &Bundle, timeout_ms: u64) -> Result<regorus::Engine, PolicyError> {
    let mut engine = regorus::Engine::new();
    engine.set_execution_timer_config(timer(Duration::from_millis(timeout_ms.max(1))));
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
        .add_data(engine_data(bundle).map_err(data_error)?)
        .map_err(data_error)?;
    Ok(engine)
}

/// The bundle's data as the engines hold it, with `data.pexi.index.lists` sharing the very arrays of
/// `data.pexi.allow` and `data.pexi.deny`: the policy serves from the index only when it was built from the
/// lists it decides on, and comparing shared arrays is a pointer comparison, not a walk of every entry.
/// Data without the lists and their index (a bundle of other policy) is left as it is.
fn engine_data(bundle: &Bundle) -> Result<regorus::Value, String> {
    let mut data = regorus::Value::from(bundle.data.clone());
    let key = |name: &str| regorus::Value::from(name);
    let field = |value: &regorus::Value, name: &str| -> Option<regorus::Value> {
        value.as_object().ok()?.get(&key(name)).cloned()
    };
    let Some(mut pexi) = field(&data, "pexi") else {
        return Ok(data);
    };
    let (Some(allow), Some(deny), Some(mut index)) = (
        field(&pexi, "allow"),
        field(&pexi, "deny"),
        field(&pexi, "index"),
    ) else {
        return Ok(data);
    };
    let lists: regorus::value::Object = [(key("allow"), allow), (key("deny"), deny)]
        .into_iter()
        .collect();
    index
        .as_object_mut()
        .map_err(|err| err.to_string())?
        .insert(key("lists"), regorus::Value::from(lists));
    pexi.as_object_mut()
        .map_err(|err| err.to_string())?
        .insert(key("index"), index);
    data.as_object_mut()
        .map_err(|err| err.to_string())?
        .insert(key("pexi"), pexi);
    Ok(data)
}

/// A request every bundle must be able to decide (allow or deny) before it may serve.
fn probe_input() -> serde_json::Value {
    serde_json::json!({
        "method": "pep.policy.check",
        "request": {"method": "GET", "scheme": "https", "host": "probe.pexi.invalid", "host_kind": "dns",
            "port": 443, "path": "/", "query": null, "headers": {}, "body_length": null,
            "url": "https://probe.pexi.invalid/", "secrets": []},
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
        let mut policy = PolicyEngine {
            engine,
            query: query.to_string(),
            revision: bundle.revision.clone(),
            timeout: Duration::from_millis(timeout_ms.max(1)),
            vm: None,
            listed: bundle.listed.clone(),
        };
        match policy.compile_vm(bundle) {
            Ok(vm) => policy.vm = Some(vm),
            Err(why) => tracing::warn!(
                revision = %bundle.revision,
                "policy served by the interpreter (slower): {why}"
            ),
        }
        policy
            .result(&probe_input())
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

    /// The allow and deny entries in force, with where each came from.
    pub fn listed(&self) -> &[Listed] {
        &self.listed
    }

    pub fn query(&self) -> &str {
        &self.query
    }

    /// Whether decisions run on the bytecode VM (else on the interpreter).
    pub fn compiled(&self) -> bool {
        self.vm.is_some()
    }

    /// Compiles the query for the VM and checks it against the interpreter on the probe inputs.
    fn compile_vm(&self, bundle: &Bundle) -> Result<Compiled, String> {
        let entry: regorus::Rc<str> = self.query.as_str().into();
        let mut engine = self.engine.clone();
        let policy = engine
            .compile_with_entrypoint(&entry)
            .map_err(|err| format!("{err}"))?;
        let program = regorus::languages::rego::compiler::Compiler::compile_from_policy(
            &policy,
            &[self.query.as_str()],
        )
        .map_err(|err| format!("bytecode compiler: {err:?}"))?;
        let compiled = Compiled {
            program,
            data: engine_data(bundle)?,
            idle: Mutex::new(Vec::new()),
        };
        for input in probe_inputs(bundle) {
            let reference = self.interpret(&input);
            let fast = compiled.run(&self.query, self.timeout, &input);
            if reference != fast {
                return Err(format!(
                    "the VM and the interpreter disagree on {input}: {fast:?} vs {reference:?}"
                ));
            }
        }
        Ok(compiled)
    }

    fn interpret(&self, input: &serde_json::Value) -> Result<regorus::Value, String> {
        let mut engine = self.engine.clone();
        engine.set_input(rego_value(input));
        engine
            .eval_rule(self.query.clone())
            .map_err(|err| format!("policy evaluation failed: {err}"))
    }

    pub fn revision(&self) -> &str {
        &self.revision
    }

    /// The query's raw result for `input`, as JSON (`pexi policy eval` shows it whole).
    pub fn evaluate(&self, input: &serde_json::Value) -> Result<serde_json::Value, String> {
        let json = self
            .result(input)?
            .to_json_str()
            .map_err(|err| format!("policy decision unreadable: {err}"))?;
        serde_json::from_str(&json).map_err(|err| format!("policy decision unreadable: {err}"))
    }

    fn result(&self, input: &serde_json::Value) -> Result<regorus::Value, String> {
        let value = match &self.vm {
            Some(vm) => vm.run(&self.query, self.timeout, input)?,
            None => self.interpret(input)?,
        };
        if value == regorus::Value::Undefined {
            return Err("policy decision is undefined".into());
        }
        Ok(value)
    }

    /// Evaluates the query for `input`. Never fails: every failure is a deny that says why.
    pub fn decide(&self, input: &serde_json::Value) -> Decision {
        match self.result(input).and_then(|value| interpret(&value)) {
            Ok(decision) => decision,
            Err(reason) => Decision::deny(reason),
        }
    }
}

impl Compiled {
    fn run(
        &self,
        query: &str,
        timeout: Duration,
        input: &serde_json::Value,
    ) -> Result<regorus::Value, String> {
        let pooled = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let mut vm = match pooled {
            Some(vm) => vm,
            None => {
                let mut vm = regorus::rvm::RegoVM::new();
                vm.load_program(self.program.clone());
                vm.set_data(self.data.clone())
                    .map_err(|err| format!("policy data rejected: {err}"))?;
                vm.set_max_instructions(MAX_INSTRUCTIONS);
                vm.set_execution_timer_config(Some(timer(timeout)));
                // A builtin that fails is an error (a deny), as in the interpreter, never a silently
                // undefined expression that could drop a denial.
                vm.set_strict_builtin_errors(true);
                vm
            }
        };
        vm.set_input(rego_value(input));
        let result = vm
            .execute_entry_point_by_name(query)
            .map_err(|err| format!("policy evaluation failed: {err}"));
        // Each execution starts from a reset state, so a VM is reusable whatever this one did.
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < IDLE_VMS {
            idle.push(vm);
        }
        result
    }
}

/// Inputs on which the VM must agree with the interpreter before it may serve a bundle: the probe,
/// and for every allowlist and denylist entry a request to its host, allowed and refused variants.
fn probe_inputs(bundle: &Bundle) -> Vec<serde_json::Value> {
    let mut inputs = vec![probe_input()];
    let mut hosts = Vec::new();
    for list in ["allow", "deny"] {
        if let Some(entries) = bundle.data["pexi"][list].as_array() {
            for entry in entries.iter().take(50) {
                if let Some(host) = entry["host"].as_str() {
                    hosts.push(
                        host.trim_start_matches("**.")
                            .trim_start_matches("*.")
                            .to_string(),
                    );
                    hosts.push(host.replace('*', "sub"));
                }
            }
        }
    }
    for host in hosts {
        for (method, scheme, port, path) in
            [("GET", "https", 443, "/"), ("POST", "http", 8080, "/v1/x")]
        {
            let mut input = probe_input();
            let host = host.split('/').next().unwrap_or_default();
            let kind = match host.parse::<std::net::IpAddr>() {
                Ok(std::net::IpAddr::V4(_)) => "ipv4",
                Ok(std::net::IpAddr::V6(_)) => "ipv6",
                Err(_) => "dns",
            };
            input["request"]["host"] = host.into();
            input["request"]["host_kind"] = kind.into();
            input["request"]["method"] = method.into();
            input["request"]["scheme"] = scheme.into();
            input["request"]["port"] = port.into();
            input["request"]["path"] = path.into();
            inputs.push(input);
        }
    }
    inputs
}

/// Reads a decision object strictly: exactly `allow` and `reasons`, of exactly their types, and
/// optionally `secrets`, an array of secret names, `max_body_bytes`, a non-negative integer, and `ask`,
/// `{}` or `{"scope": "host" | "path"}` on a deny only.
fn interpret(parsed: &regorus::Value) -> Result<Decision, String> {
    let malformed = || {
        let shown = serde_json::to_string(parsed).unwrap_or_else(|_| format!("{parsed:?}"));
        format!("policy decision is malformed: {shown}")
    };
    let object = parsed.as_object().map_err(|_| malformed())?;
    let field = |name: &str| object.get(&regorus::Value::from(name));
    let strings = |value: &regorus::Value| -> Option<Vec<String>> {
        value
            .as_array()
            .ok()?
            .iter()
            .map(|item| item.as_string().ok().map(|s| s.to_string()))
            .collect()
    };
    let secrets = match field("secrets") {
        None => None,
        Some(names) => Some(strings(names).ok_or_else(malformed)?),
    };
    let max_body_bytes = match field("max_body_bytes") {
        None => None,
        Some(n) => Some(n.as_u64().map_err(|_| malformed())?),
    };
    let ask = match field("ask") {
        None => None,
        Some(ask) => Some(read_ask(ask).ok_or_else(malformed)?),
    };
    let expected = 2
        + usize::from(secrets.is_some())
        + usize::from(max_body_bytes.is_some())
        + usize::from(ask.is_some());
    if object.len() != expected {
        return Err(malformed());
    }
    let allow = *field("allow")
        .and_then(|value| value.as_bool().ok())
        .ok_or_else(malformed)?;
    // "Allow, but ask" is two answers at once: ambiguous, so a deny.
    if allow && ask.is_some() {
        return Err(malformed());
    }
    let reasons = field("reasons").and_then(strings).ok_or_else(malformed)?;
    Ok(Decision {
        allow,
        reasons,
        secrets,
        max_body_bytes,
        ask,
    })
}

fn read_ask(value: &regorus::Value) -> Option<Ask> {
    let object = value.as_object().ok()?;
    let scope = match object.get(&regorus::Value::from("scope")) {
        None => AskScope::Host,
        Some(scope) => match scope.as_string().ok()?.as_ref() {
            "host" => AskScope::Host,
            "path" => AskScope::Path,
            _ => return None,
        },
    };
    let known = usize::from(object.contains_key(&regorus::Value::from("scope")));
    (object.len() == known).then_some(Ask { scope })
}

/// The policy's input as a regorus value, built directly: going through serde (`Value::from` clones the
/// document and deserialises it) cost a fifth of a decision. Same values as that conversion (the tests
/// compare them): strings, integers as integers, objects keyed by strings.
pub fn rego_value(value: &serde_json::Value) -> regorus::Value {
    use serde_json::Value as Json;
    match value {
        Json::Null => regorus::Value::Null,
        Json::Bool(b) => regorus::Value::from(*b),
        Json::Number(n) => {
            if let Some(u) = n.as_u64() {
                regorus::Value::from(u)
            } else if let Some(i) = n.as_i64() {
                regorus::Value::from(i)
            } else if let Some(f) = n.as_f64().filter(|f| f.is_finite()) {
                regorus::Value::from(f)
            } else {
                regorus::Value::Undefined
            }
        }
        Json::String(s) => regorus::Value::from(s.as_str()),
        Json::Array(items) => {
            regorus::Value::from(items.iter().map(rego_value).collect::<Vec<_>>())
        }
        Json::Object(fields) => regorus::Value::from(
            fields
                .iter()
                .map(|(k, v)| (regorus::Value::from(k.as_str()), rego_value(v)))
                .collect::<std::collections::BTreeMap<_, _>>(),
        ),
    }
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

    /// The direct conversion builds the same values as regorus's own (serde) conversion, including the
    /// edges: integers past i64, negatives, fractions, unicode keys, empty and nested containers.
    #[test]
    fn inputs_convert_as_regorus_converts_them() {
        let documents = [
            probe_input(),
            json!(null),
            json!([
                true,
                false,
                null,
                0,
                -1,
                1.5,
                -0.25,
                1e300,
                u64::MAX,
                i64::MIN
            ]),
            json!({"": "", "é": {"ü": [[], {}, ["x"]]}, "port": 443, "big": 18446744073709551615u64}),
            json!({"headers": {"content-type": ["application/json"], "x-a": ["1", "2"]}}),
            json!("a \u{0} string"),
        ];
        for document in documents {
            assert_eq!(
                rego_value(&document),
                regorus::Value::from(document.clone()),
                "{document}"
            );
        }
    }

    #[test]
    fn the_default_policy_denies_by_default() {
        let decision = engine_with(&[]).decide(&request("example.com"));
        assert_eq!(
            decision,
            Decision {
                allow: false,
                reasons: vec!["host example.com is not in the allowlist".into()],
                secrets: None,
                max_body_bytes: None,
                ask: None,
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
            listed: Vec::new(),
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
            // On the VM: its handling of these is what serves.
            assert!(policy.compiled(), "{what}");
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
            (
                json!({"allow": true, "reasons": [], "secrets": "openai"}),
                "secrets not an array",
            ),
            (
                json!({"allow": true, "reasons": [], "secrets": [1]}),
                "secret name not a string",
            ),
            (
                json!({"allow": true, "reasons": [], "ask": {}}),
                "allow and ask at once",
            ),
            (
                json!({"allow": false, "reasons": [], "ask": true}),
                "ask not an object",
            ),
            (
                json!({"allow": false, "reasons": [], "ask": {"scope": "everything"}}),
                "unknown ask scope",
            ),
            (
                json!({"allow": false, "reasons": [], "ask": {"scope": "host", "also": 1}}),
                "extra key in ask",
            ),
        ] {
            assert!(interpret(&rego_value(&json)).is_err(), "{what}");
        }
        for (json, scope) in [
            (
                json!({"allow": false, "reasons": [], "ask": {}}),
                AskScope::Host,
            ),
            (
                json!({"allow": false, "reasons": [], "ask": {"scope": "path"}}),
                AskScope::Path,
            ),
        ] {
            let decided = interpret(&rego_value(&json)).expect("a deny that asks");
            assert_eq!(decided.ask, Some(Ask { scope }));
            assert!(!decided.allow);
        }
        // The refusal quotes the decision on one line: it becomes a reason in the audit and the guest's error.
        assert_eq!(
            interpret(&rego_value(&json!({"allow": "yes", "reasons": []}))).unwrap_err(),
            r#"policy decision is malformed: {"allow":"yes","reasons":[]}"#
        );
        let granted = interpret(&rego_value(
            &json!({"allow": true, "reasons": [], "secrets": ["openai"]}),
        ))
        .expect("secrets is the one optional key");
        assert_eq!(granted.secrets, Some(vec!["openai".to_string()]));
    }

    #[test]
    fn conflicting_definitions_are_a_deny_not_a_pick() {
        let policy = custom(
            "package pexi.http\nimport rego.v1\ndecision := {\"allow\": true, \"reasons\": []} if input.a\ndecision := {\"allow\": false, \"reasons\": []} if not input.a\ndecision := {\"allow\": false, \"reasons\": [\"b\"]} if input.b\n",
        )
        .expect("loads");
        assert!(policy.compiled());
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
    fn extension_packages_add_denials_and_body_bounds_to_the_shipped_policy() {
        let mut bundle = Bundle::load(
            &PolicyRoot::Embedded,
            &[Entry::host("uploads.example.com").expect("entry")],
            &[],
        )
        .expect("bundle");
        // The example of docs/policy.md: a bound on every body, and a denial for one announced too large.
        bundle.modules.push((
            "pexi/rules/uploads.rego".into(),
            "package pexi.rules.uploads\nimport rego.v1\n\nmax_body_bytes := 1048576\n\ndenials contains sprintf(\"body of %d bytes is over 1 MiB\", [input.request.body_length]) if {\n\tinput.request.body_length > 1048576\n}\n".into(),
        ));
        bundle.modules.push((
            "pexi/rules/other.rego".into(),
            "package pexi.rules.other\nimport rego.v1\n\nmax_body_bytes := 4096 if input.request.method == \"PUT\"\n".into(),
        ));
        let policy = PolicyEngine::load(&bundle, "data.pexi.http.decision", 1000).expect("loads");
        let mut small = request("uploads.example.com");
        small["request"]["body_length"] = json!(1000);
        let decided = policy.decide(&small);
        assert!(decided.allow);
        assert_eq!(decided.max_body_bytes, Some(1_048_576));
        // Not announced: allowed, and bounded all the same.
        let unknown = request("uploads.example.com");
        let decided = policy.decide(&unknown);
        assert!(decided.allow && decided.max_body_bytes == Some(1_048_576));
        // The smallest bound that applies wins.
        let mut put = request("uploads.example.com");
        put["request"]["method"] = json!("PUT");
        assert_eq!(policy.decide(&put).max_body_bytes, Some(4096));
        let mut big = request("uploads.example.com");
        big["request"]["body_length"] = json!(5_000_000);
        assert_eq!(
            policy.decide(&big),
            Decision {
                allow: false,
                reasons: vec!["body of 5000000 bytes is over 1 MiB".into()],
                secrets: None,
                max_body_bytes: Some(1_048_576),
                ask: None,
            }
        );
    }

    /// Requests of every shape the shipped policy distinguishes, against entries of every kind.
    fn corpus() -> (Vec<Entry>, Vec<serde_json::Value>) {
        let entries = vec![
            Entry::host("api.example.com").expect("entry"),
            Entry::host("*.cdn.example").expect("entry"),
            Entry::host("**.docs.example").expect("entry"),
            Entry::host("10.1.2.3").expect("entry"),
            Entry::host("192.168.0.0/16").expect("entry"),
            Entry::host("2001:db8::/32").expect("entry"),
        ];
        let mut inputs = Vec::new();
        for (host, kind) in [
            ("api.example.com", "dns"),
            ("x.api.example.com", "dns"),
            ("a.cdn.example", "dns"),
            ("cdn.example", "dns"),
            ("docs.example", "dns"),
            ("a.b.docs.example", "dns"),
            ("10.1.2.3", "ipv4"),
            ("10.1.2.4", "ipv4"),
            ("192.168.7.7", "ipv4"),
            ("2001:db8::1", "ipv6"),
            ("2001:db9::1", "ipv6"),
            ("unlisted.test", "dns"),
        ] {
            for (scheme, port) in [("https", 443), ("http", 80), ("https", 8443), ("ftp", 21)] {
                for method in ["GET", "DELETE"] {
                    let mut input = request(host);
                    input["request"]["host_kind"] = json!(kind);
                    input["request"]["scheme"] = json!(scheme);
                    input["request"]["port"] = json!(port);
                    input["request"]["method"] = json!(method);
                    inputs.push(input);
                }
            }
        }
        (entries, inputs)
    }

    #[test]
    fn the_vm_decides_exactly_as_the_interpreter() {
        let (allow, inputs) = corpus();
        let deny = vec![Entry::host("blocked.docs.example").expect("entry")];
        let bundle = Bundle::load(&PolicyRoot::Embedded, &allow, &deny).expect("bundle");
        let policy = PolicyEngine::load(&bundle, "data.pexi.http.decision", 1000).expect("loads");
        assert!(policy.compiled(), "the shipped policy runs on the VM");
        let vm = policy.vm.as_ref().expect("compiled");
        let mut allowed = 0;
        for input in inputs
            .iter()
            .chain([request("blocked.docs.example")].iter())
        {
            let reference = policy.interpret(input).expect("interpreter");
            let fast = vm.run(&policy.query, policy.timeout, input).expect("vm");
            assert_eq!(fast, reference, "{input}");
            allowed += usize::from(policy.decide(input).allow);
        }
        // The corpus exercises both outcomes, or the comparison would prove little.
        assert!(allowed > 5 && allowed < inputs.len() - 5, "{allowed}");
    }

    #[test]
    fn an_evaluation_over_the_time_limit_is_a_deny() {
        let bundle = Bundle {
            listed: Vec::new(),
            modules: vec![(
                "slow.rego".into(),
                "package pexi.http\nimport rego.v1\ndecision := {\"allow\": true, \"reasons\": []} if not input.slow\ndecision := {\"allow\": count(pairs) == 0, \"reasons\": []} if input.slow\npairs contains [x, y] if {\n\tsome x in numbers.range(1, 4000)\n\tsome y in numbers.range(1, 4000)\n\tx * y == -1\n}\n".into(),
            )],
            tests: vec![],
            data: json!({}),
            revision: "test".into(),
        };
        let policy = PolicyEngine::load(&bundle, "data.pexi.http.decision", 50).expect("loads");
        assert!(policy.compiled());
        assert!(policy.decide(&json!({"slow": false})).allow);
        let decision = policy.decide(&json!({"slow": true}));
        assert!(!decision.allow, "{decision:?}");
        assert!(
            decision.reasons[0].starts_with("policy evaluation failed"),
            "{decision:?}"
        );
    }

    #[test]
    fn a_bundle_the_vm_cannot_compile_is_served_by_the_interpreter() {
        // `some name` followed by a reference that uses it is a form regorus's bytecode compiler refuses.
        let policy = custom(
            "package pexi.http\nimport rego.v1\ndecision := {\"allow\": count(hits) > 0, \"reasons\": []}\nhits contains h if {\n\tsome name\n\tsome h in data.lists[name]\n\th == input.request.host\n}\n",
        )
        .expect("loads");
        assert!(!policy.compiled());
        assert!(!policy.decide(&request("example.com")).allow);
    }

    #[test]
    fn an_extension_can_rule_on_requested_secrets() {
        // The example of docs/secrets.md.
        let mut bundle = Bundle::load(
            &PolicyRoot::Embedded,
            &[Entry::host("api.openai.com").expect("entry")],
            &[],
        )
        .expect("bundle");
        bundle.modules.push((
            "pexi/rules/secrets.rego".into(),
            "package pexi.rules.secrets\n\nimport rego.v1\n\ndenials contains \"secret openai is only for /v1/chat/completions\" if {\n\t\"openai\" in input.request.secrets\n\tinput.request.path != \"/v1/chat/completions\"\n}\n".into(),
        ));
        let policy = PolicyEngine::load(&bundle, "data.pexi.http.decision", 1000).expect("loads");
        assert!(policy.compiled());
        let mut input = request("api.openai.com");
        input["request"]["secrets"] = json!(["openai"]);
        input["request"]["path"] = json!("/v1/files");
        assert_eq!(
            policy.decide(&input).reasons,
            vec!["secret openai is only for /v1/chat/completions".to_string()]
        );
        input["request"]["path"] = json!("/v1/chat/completions");
        assert!(policy.decide(&input).allow);
        input["request"]["secrets"] = json!([]);
        input["request"]["path"] = json!("/v1/files");
        assert!(policy.decide(&input).allow);
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
