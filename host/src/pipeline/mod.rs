//! The request pipeline: what happens to every hop of every request, in this order (see
//! `docs/threat-model.md` and `docs/architecture.md`):
//!
//! 1. validate the parameters ([`request`]) and parse the URL strictly ([`target`]; a tunnel's
//!    destination is a typed [`target::Endpoint`], no URL);
//! 2. canonicalise the host ([`target`]);
//! 3. decide with policy ([`crate::policy`]) on the typed input ([`input`]) and log the decision before
//!    anything else happens (`decide.rs`, which [`Pipeline::decide`] runs);
//! 4. only after an allow, resolve the name ([`resolve`]);
//! 5. drop refused addresses ([`address`]; both steps in `guard.rs`);
//! 6. connect to exactly the checked addresses ([`upstream`]), 7. send ([`fetch`]), 8. treat redirects as
//!    new hops ([`redirect`] says where, [`fetch`] runs the hop again); an upgraded connection or a tunnel
//!    then carries bytes both ways (`relay.rs`, [`tunnel`]).
//!
//! Each stage returns its own typed error; `failure.rs` gathers them in one `RequestError` and converts
//! that, once, to the wire's `ErrorPayload` where the stream ends. Each stream's worker starts in
//! `dispatch.rs`. `pep.policy.check` and `pexi check` run steps 1–3 only.

pub mod address;
mod approve;
mod decide;
mod dispatch;
mod failure;
pub mod fetch;
mod guard;
pub mod input;
pub mod redirect;
mod relay;
pub mod remote;
pub mod request;
pub mod resolve;
pub mod target;
pub mod tunnel;
pub mod upstream;

use std::sync::atomic::{AtomicU64, Ordering};

use pexi_protocol::payload::{HttpRequest, PolicyDecision};
use serde_json::{json, Value};

use crate::audit::records::{self, AuditRecord};
use crate::audit::{AuditLog, Redactor};
use crate::config::Config;
use crate::policy::{Bundle, Decision, PolicyEngine, PolicyError, PolicyRoot, PolicyStore};
use address::AddressGuard;
use failure::RequestError;
use input::Asked;
use request::{prepare, Prepared};

pub use crate::stream::Caller;
pub use approve::Answerer;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Policy(#[from] PolicyError),
    #[error("audit log {path}: {source}")]
    Audit {
        path: String,
        source: std::io::Error,
    },
    #[error("HTTP client: {0}")]
    Http(String),
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
}

pub struct Pipeline {
    pub config: Config,
    policy: PolicyStore,
    guard: AddressGuard,
    audit: AuditLog,
    redactor: Redactor,
    http: upstream::HttpClient,
    secrets: crate::secrets::Secrets,
    decision_prefix: String,
    decisions: AtomicU64,
    /// Questions to a person (docs/approvals.md), and what watchers are shown.
    approvals: crate::approvals::Broker,
    pub activity: crate::activity::Activity,
    /// What the Prometheus endpoint shows (docs/fleet.md).
    pub metrics: crate::metrics::Metrics,
    /// Reloads run one at a time (the watcher's, an "always" answer's, a new bundle's).
    reloading: std::sync::Mutex<()>,
    /// The verified bundle from the bundle server in service, if one is configured and has arrived.
    remote: std::sync::Mutex<Option<std::sync::Arc<crate::policy::opa_bundle::OpaBundle>>>,
    /// Sessions, streams and buffered bytes: what all guests together may hold.
    pub admission: crate::limits::admission::Admission,
}

/// The settings that differ between the config in service and a fresh read of its file, outside
/// `[pep.policy]` (which a reload applies): the listeners, limits, network (address guard, DNS overrides,
/// CA), audit, approvals, control surfaces and brokered secrets are built into the running PEP once, so
/// a reload that changes any of them is refused rather than half-applied. Secret values are not compared
/// (they are read at start).
fn restart_only_changes(running: &Config, fresh: &Config) -> Vec<&'static str> {
    let differ =
        |a: &dyn std::fmt::Debug, b: &dyn std::fmt::Debug| format!("{a:?}") != format!("{b:?}");
    let mut changed = Vec::new();
    let (r, f) = (&running.pep, &fresh.pep);
    for (name, a, b) in [
        (
            "pep.listen",
            &r.listen as &dyn std::fmt::Debug,
            &f.listen as &dyn std::fmt::Debug,
        ),
        ("pep.limits", &r.limits, &f.limits),
        (
            "pep.network.allowed_cidrs",
            &r.network.allowed_cidrs,
            &f.network.allowed_cidrs,
        ),
        (
            "pep.network.dns_overrides",
            &r.network.dns_overrides,
            &f.network.dns_overrides,
        ),
        (
            "pep.network.extra_ca_file",
            &running.extra_ca_pem,
            &fresh.extra_ca_pem,
        ),
        ("pep.audit", &r.audit, &f.audit),
        ("pep.approvals", &r.approvals, &f.approvals),
        ("pep.control", &r.control, &f.control),
        ("pep.metrics", &r.metrics, &f.metrics),
        ("pep.export", &r.export, &f.export),
        ("pep.policy.bundle", &r.policy.bundle, &f.policy.bundle),
        ("secrets", &running.secrets, &fresh.secrets),
    ] {
        if differ(a, b) {
            changed.push(name);
        }
    }
    changed
}

/// A decision that was logged, ready to be reported or acted on.
#[derive(Clone, Debug)]
pub struct Logged {
    pub decision_id: String,
    pub decision: Decision,
    /// What it was about, redacted: for questions and the dashboard.
    pub seen: crate::approvals::Shown,
    /// How long the decision record took to become durable.
    pub audit_wait: std::time::Duration,
}

impl Pipeline {
    pub fn new(config: Config) -> Result<Pipeline, StartError> {
        config.ensure_private_dirs()?;
        // With a bundle server configured, the last good bundle on disk serves from the start (verified
        // again: the disk is not trusted more than the network); the server's newest follows
        // (`crate::bundle_sync`).
        let remote = remote::last_good(&config);
        let engine = match &remote {
            Some(bundle) => {
                let root = PolicyRoot::Remote(bundle.clone(), config.pep.policy.bundle.url.clone());
                match load_policy_at(&config, &root) {
                    Ok(engine) => Some(engine),
                    Err(err) => {
                        tracing::error!(%err, "the last good bundle no longer loads; serving the local policy until the server's arrives");
                        None
                    }
                }
            }
            None => None,
        };
        let remote = if engine.is_some() { remote } else { None };
        let policy = PolicyStore::new(match engine {
            Some(engine) => engine,
            None => load_policy(&config)?,
        });
        let audit_error = |source: std::io::Error| StartError::Audit {
            path: config.pep.audit.path.display().to_string(),
            source,
        };
        let key = match config.pep.audit.key_path() {
            Some(path) => {
                let legacy = config.pep.audit.legacy_key_path();
                if config.pep.audit.key_file.is_empty() && !path.exists() && legacy.exists() {
                    // The old place was matched by the log's glob: copying the log copied the key.
                    crate::audit::seal::prepare_keys_dir(&config.pep.audit.keys_dir())
                        .map_err(audit_error)?;
                    std::fs::rename(&legacy, &path).map_err(audit_error)?;
                    std::fs::set_permissions(
                        &path,
                        std::os::unix::fs::PermissionsExt::from_mode(0o600),
                    )
                    .map_err(audit_error)?;
                    tracing::info!(from = %legacy.display(), to = %path.display(), "moved the audit redaction key");
                }
                if config.pep.audit.key_file.is_empty() {
                    crate::audit::seal::prepare_keys_dir(&config.pep.audit.keys_dir())
                        .map_err(audit_error)?;
                }
                Some(crate::audit::redact::load_or_create_key(&path).map_err(audit_error)?)
            }
            None => None,
        };
        let settings = config.pep.audit.settings_with_keys().map_err(audit_error)?;
        let audit = AuditLog::open(&settings).map_err(audit_error)?;
        let redactor = Redactor::new(
            &config.pep.audit.redact_headers,
            &config.pep.audit.redact_query_params,
            key,
        );
        let guard = AddressGuard::new(config.pep.network.allowed_cidrs.clone());
        let http = upstream::HttpClient::new(&config).map_err(StartError::Http)?;
        let seed = std::hash::BuildHasher::hash_one(
            &std::collections::hash_map::RandomState::new(),
            std::process::id(),
        );
        let secrets = config.secrets.clone();
        let admission = crate::limits::admission::Admission::new(&config.pep.limits);
        let approvals = crate::approvals::Broker::new(
            std::time::Duration::from_millis(config.pep.approvals.approval_timeout_ms),
            config.pep.approvals.max_waiting,
        );
        let pipeline = Pipeline {
            admission,
            secrets,
            config,
            policy,
            guard,
            audit,
            redactor,
            http,
            decision_prefix: format!("{:08x}", seed as u32),
            decisions: AtomicU64::new(0),
            reloading: std::sync::Mutex::new(()),
            remote: std::sync::Mutex::new(remote),
            approvals,
            activity: crate::activity::Activity::default(),
            metrics: crate::metrics::Metrics::new(),
        };
        pipeline.record(&records::Policy {
            event: records::PolicyEvent::Load,
            revision: Some(pipeline.policy_revision()),
            source: Some(pipeline.policy_root(&pipeline.config).to_string()),
            new_revision: None,
            previous_revision: None,
            error: None,
        });
        Ok(pipeline)
    }

    pub fn audit(&self) -> &AuditLog {
        &self.audit
    }

    /// The revision of the policy bundle in service.
    pub fn policy_revision(&self) -> String {
        self.policy.current().revision().to_string()
    }

    /// The bundle in service, for `pexi policy eval`.
    pub fn policy(&self) -> std::sync::Arc<PolicyEngine> {
        self.policy.current()
    }

    /// Re-reads the config file and the policy bundle and puts the new bundle in service if it compiles,
    /// passes its own tests and decides a probe request; otherwise the old one keeps serving. Returns the
    /// new revision, or `None` when nothing changed. With the embedded config only the bundle is re-read
    /// (its data can change: the approvals file). Both outcomes are audited as `policy` records.
    pub fn reload_policy(&self) -> Result<Option<String>, String> {
        let _one_at_a_time = self
            .reloading
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let root = self.policy_root(&self.config);
        // The embedded config does not change; its bundle's data can (the approvals file).
        let Some(path) = self.config.path.as_deref() else {
            return self.swap_in(
                load_policy_at(&self.config, &root).map_err(|err| err.to_string()),
                None,
            );
        };
        let loaded = Config::load(Some(path))
            .map_err(|err| err.to_string())
            .and_then(|fresh| {
                let changed = restart_only_changes(&self.config, &fresh);
                if changed.is_empty() {
                    Ok(fresh)
                } else {
                    Err(format!(
                        "{} changed, which takes effect only when the PEP restarts; nothing was \
                         reloaded (the policy neither): restart the PEP, or revert {}",
                        changed.join(", "),
                        if changed.len() == 1 { "it" } else { "them" }
                    ))
                }
            })
            .and_then(|fresh| {
                // A bundle in service stays the root; otherwise the fresh config's folder.
                let root = match root {
                    PolicyRoot::Remote(..) => root,
                    _ => fresh.policy_root.clone(),
                };
                load_policy_at(&fresh, &root).map_err(|err| err.to_string())
            });
        self.swap_in(loaded, None)
    }

    /// Where the policy comes from now: the bundle from the bundle server, once one has arrived, else
    /// the configured folder (or the embedded policy).
    fn policy_root(&self, config: &Config) -> PolicyRoot {
        match self
            .remote
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .as_ref()
        {
            Some(bundle) => {
                PolicyRoot::Remote(bundle.clone(), config.pep.policy.bundle.url.clone())
            }
            None => config.policy_root.clone(),
        }
    }

    /// The bundle in service from the bundle server, if any.
    pub fn remote_bundle(&self) -> Option<std::sync::Arc<crate::policy::opa_bundle::OpaBundle>> {
        self.remote
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Puts a verified bundle from the bundle server in service through the reload gate (it compiles,
    /// its tests pass, a probe decides); the one in service stays when it does not pass. Audited as a
    /// `policy` record either way.
    pub fn activate_bundle(
        &self,
        bundle: std::sync::Arc<crate::policy::opa_bundle::OpaBundle>,
    ) -> Result<Option<String>, String> {
        let _one_at_a_time = self
            .reloading
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let root = PolicyRoot::Remote(bundle.clone(), self.config.pep.policy.bundle.url.clone());
        let loaded = load_policy_at(&self.config, &root).map_err(|err| err.to_string());
        let swapped = self.swap_in(loaded, Some(root.to_string()))?;
        *self
            .remote
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(bundle);
        Ok(swapped)
    }

    /// Puts a freshly loaded bundle in service (or records why not); `None` when it is the one serving.
    fn swap_in(
        &self,
        loaded: Result<PolicyEngine, String>,
        source: Option<String>,
    ) -> Result<Option<String>, String> {
        let engine = match loaded {
            Ok(engine) => engine,
            Err(error) => {
                self.record(&records::Policy {
                    event: records::PolicyEvent::ReloadRejected,
                    revision: None,
                    source: source.clone(),
                    new_revision: None,
                    previous_revision: None,
                    error: Some(error.clone()),
                });
                self.metrics
                    .policy_reloads
                    .get_or_create(&crate::metrics::ResultLabels { result: "refused" })
                    .inc();
                return Err(error);
            }
        };
        if engine.revision() == self.policy.current().revision() {
            return Ok(None);
        }
        let revision = engine.revision().to_string();
        let previous = self.policy.replace(engine);
        self.record(&records::Policy {
            event: records::PolicyEvent::Reload,
            revision: None,
            source,
            new_revision: Some(revision.clone()),
            previous_revision: Some(previous),
            error: None,
        });
        self.metrics
            .policy_reloads
            .get_or_create(&crate::metrics::ResultLabels { result: "applied" })
            .inc();
        Ok(Some(revision))
    }

    /// Queues an audit record stamped with the revision of the policy in service. Not waited for: only
    /// decisions hold up their effect.
    pub fn record<R: AuditRecord>(&self, record: &R) {
        drop(self.audit.record(R::KIND, self.record_body(record)));
    }

    /// Queues an audit record and returns its ticket, for records an effect waits on (an answer).
    pub fn record_ticket<R: AuditRecord>(&self, record: &R) -> crate::audit::Ticket {
        self.audit.record(R::KIND, self.record_body(record))
    }

    /// A record's body with the policy revision in service.
    fn record_body<R: AuditRecord>(&self, record: &R) -> Value {
        let mut body = serde_json::to_value(record).unwrap_or_else(|err| {
            // Only a bug in a record type gets here; the record still says what kind it was.
            json!({"serialisation_error": err.to_string()})
        });
        if let Some(object) = body.as_object_mut() {
            object
                .entry("policy_revision")
                .or_insert_with(|| json!(self.policy.current().revision()));
        }
        body
    }

    /// `pep.policy.check`: steps 1–3, no DNS, no network.
    pub async fn policy_check(
        &self,
        caller: &Caller,
        request: &HttpRequest,
    ) -> Result<PolicyDecision, RequestError> {
        let prepared = self.prepare(caller, "pep.policy.check", request)?;
        let logged = self
            .decide(caller, "pep.policy.check", Asked::Http(&prepared), 0, None)
            .await?;
        Ok(PolicyDecision {
            allow: logged.decision.allow,
            reasons: logged.decision.reasons,
            decision_id: logged.decision_id,
        })
    }

    /// Steps 1–2. A refusal is returned, not logged: the stream's worker writes the one outcome record
    /// of the stream, whatever ended it.
    pub fn prepare(
        &self,
        _caller: &Caller,
        _method: &str,
        request: &HttpRequest,
    ) -> Result<Prepared, RequestError> {
        let mut prepared = prepare(request)?;
        prepared.secrets = self
            .secrets
            .requested(&prepared.headers, &prepared.target.url)
            .map_err(|refusal| RequestError::Secret(refusal.0))?;
        Ok(prepared)
    }

    /// From now on no hop may connect to `addr` (a surface of the PEP's own that just started listening).
    pub fn add_own_surface(&self, addr: std::net::SocketAddr) {
        self.guard.add_own(addr);
    }

    /// The configured brokered secrets.
    pub fn secrets(&self) -> &crate::secrets::Secrets {
        &self.secrets
    }

    /// Step 3: evaluates policy for one hop and returns once the decision record is durable (per the
    /// audit durability setting). A decision that cannot be logged is not acted on.
    pub async fn decide(
        &self,
        caller: &Caller,
        method: &str,
        asked: Asked<'_>,
        hop: u32,
        previous: Option<&url::Url>,
    ) -> Result<Logged, RequestError> {
        let decision_id = format!(
            "{}-{:08}",
            self.decision_prefix,
            self.decisions.fetch_add(1, Ordering::Relaxed)
        );
        let started = std::time::Instant::now();
        let hop = decide::Hop {
            caller,
            method,
            asked,
            number: hop,
            previous,
        };
        let logged = decide::decide_and_log(
            &self.policy.current(),
            &self.redactor,
            &self.audit,
            decision_id,
            hop,
        )
        .await
        .map_err(RequestError::from)?;
        let decision = &logged.decision;
        self.metrics.decided(
            decision.allow,
            decision.ask.is_some(),
            &decision.reasons,
            &caller.vm.name,
            started.elapsed().as_secs_f64(),
        );
        self.metrics
            .audit_write_seconds
            .observe(logged.audit_wait.as_secs_f64());
        self.activity
            .count(&logged.seen.host, decision.allow, decision.ask.is_some());
        self.activity.publish(json!({
            "type": "decision",
            "ts_ms": crate::activity::now_ms(),
            "decision_id": logged.decision_id,
            "protocol_method": method,
            "allow": decision.allow,
            "ask": decision.ask.is_some(),
            "reasons": decision.reasons,
            "request": logged.seen,
        }));
        Ok(logged)
    }

    /// The error a denied hop is answered with.
    fn denied(logged: &Logged) -> RequestError {
        RequestError::Denied {
            reasons: logged.decision.reasons.clone(),
            decision_id: logged.decision_id.clone(),
        }
    }

    /// The metrics' OpenMetrics text, its gauges read now.
    pub fn metrics_text(&self) -> String {
        let gauge = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
        let m = &self.metrics;
        m.sessions.set(gauge(self.admission.sessions()));
        m.streams.set(gauge(self.admission.streams()));
        m.buffered_bytes
            .set(gauge(self.admission.budget.pool_in_use()));
        m.approvals_waiting
            .set(gauge(self.approvals.waiting().len()));
        m.audit_records
            .set(i64::try_from(self.audit.written_seq()).unwrap_or(i64::MAX));
        m.encode()
    }

    fn count_outcome(&self, outcome: &records::Outcome) {
        use crate::metrics::{DirectionLabels, OutcomeLabels};
        self.metrics
            .requests
            .get_or_create(&OutcomeLabels {
                method: outcome.method.clone(),
                outcome: outcome.error.clone().unwrap_or_else(|| "ok".into()),
            })
            .inc();
        if let Some(ms) = outcome.duration_ms {
            self.metrics.request_seconds.observe(ms as f64 / 1000.0);
        }
        let bytes = |body: &Option<records::BodyDigest>| {
            body.as_ref()
                .and_then(|b| b.bytes_delivered.or(b.bytes))
                .unwrap_or(0)
        };
        let (mut up, mut down) = (bytes(&outcome.request_body), bytes(&outcome.response_body));
        if let Some(tunnel) = &outcome.tunnel {
            up += tunnel.bytes_to_upstream;
            down += tunnel.bytes_to_guest;
        }
        if let Some(upgrade) = &outcome.upgrade {
            up += upgrade["bytes_to_upstream"].as_u64().unwrap_or(0);
            down += upgrade["bytes_to_guest"].as_u64().unwrap_or(0);
        }
        for (direction, n) in [("to_upstream", up), ("to_guest", down)] {
            if n > 0 {
                self.metrics
                    .body_bytes
                    .get_or_create(&DirectionLabels { direction })
                    .inc_by(n);
            }
        }
    }

    /// Records how a request ended. Best effort: the effect has already happened or failed.
    pub fn log_outcome(
        &self,
        caller: &Caller,
        method: &str,
        decision_id: Option<&str>,
        mut outcome: records::Outcome,
    ) {
        // Error text may quote a URL (the request's, a redirect's Location) with a token in it.
        outcome.message = outcome.message.map(|m| self.redactor.text(&m));
        outcome.decision_id = decision_id.map(str::to_string);
        outcome.session_id = format!("{:016x}", caller.session_id);
        outcome.stream_id = caller.stream_id;
        outcome.method = method.to_string();
        self.count_outcome(&outcome);
        self.activity.publish(json!({
            "type": "outcome",
            "ts_ms": crate::activity::now_ms(),
            "decision_id": outcome.decision_id,
            "session_id": outcome.session_id,
            "protocol_method": method,
            "status": outcome.status,
            "error": outcome.error,
            "message": outcome.message,
            "duration_ms": outcome.duration_ms,
            "bytes": outcome.response_body.as_ref().and_then(|b| b.bytes),
        }));
        self.record(&outcome);
    }
}

/// Loads the bundle a configuration names and checks it can serve.
pub fn load_policy(config: &Config) -> Result<PolicyEngine, PolicyError> {
    load_policy_at(config, &config.policy_root)
}

/// Loads the policy from `root` with a configuration's entries and approvals, and checks it can serve.
pub fn load_policy_at(config: &Config, root: &PolicyRoot) -> Result<PolicyEngine, PolicyError> {
    let bundle = Bundle::load_with(
        root,
        &config.pep.policy.allow,
        &config.pep.policy.deny,
        &approvals_of(config),
    )?;
    PolicyEngine::load(
        &bundle,
        &config.pep.policy.query,
        config.pep.policy.timeout_ms,
    )
}

/// The approvals settings a configuration builds its bundle with.
pub fn approvals_of(config: &Config) -> crate::policy::Approvals {
    crate::policy::Approvals {
        enabled: config.pep.approvals.enabled,
        file: Some(config.pep.approvals.file_path(&config.pep.audit)),
    }
}
