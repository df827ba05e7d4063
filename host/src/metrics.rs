//! What the PEP counts for Prometheus (docs/fleet.md, "Metrics"): decisions by result and reason class,
//! decision and request latency, bytes, audit writes; the gauges (sessions, streams, approvals waiting,
//! audit shipping lag) are read when a scrape comes. Labels hold only bounded sets: results, reason
//! classes, error codes, the VM names the host configured. Never a host name, a URL or a reason's text: a
//! guest picks those, and a label per value would let it grow the PEP's memory and the scraper's.
//!
//! Counting is a few atomic adds per request, off the path of nothing: the endpoint itself is
//! `crate::control::metrics`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecisionLabels {
    /// `allow`, `deny` or `ask`.
    pub result: &'static str,
    /// [`reason_class`].
    pub reason: &'static str,
    /// The VM's name as the host set it up ("" for a listener that names none).
    pub vm: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    /// `pep.http.request`, `pep.net.connect`, `pep.policy.check`.
    pub method: String,
    /// `ok`, or the error code the stream ended with (the protocol's stable codes).
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabels {
    /// `to_upstream` or `to_guest`.
    pub direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SinkLabels {
    /// The audit export's sink: `otlp` or `syslog`.
    pub sink: &'static str,
}

/// Every metric the PEP exports, registered once.
pub struct Metrics {
    registry: Registry,
    pub decisions: Family<DecisionLabels, Counter>,
    /// From the policy input being built to the decision record being durable.
    pub decision_seconds: Histogram,
    /// The decision record's wait for durability alone (the audit writer's batch and sync).
    pub audit_write_seconds: Histogram,
    pub requests: Family<OutcomeLabels, Counter>,
    /// A stream's whole life: from the guest's OPEN to its outcome.
    pub request_seconds: Histogram,
    pub body_bytes: Family<DirectionLabels, Counter>,
    pub sessions: Gauge,
    pub streams: Gauge,
    pub buffered_bytes: Gauge,
    pub approvals_waiting: Gauge,
    pub policy_reloads: Family<ResultLabels, Counter>,
    pub audit_records: Gauge,
    pub shipping_lag_records: Family<SinkLabels, Gauge>,
    pub shipping_lag_seconds: Family<SinkLabels, Gauge>,
    pub shipping_errors: Family<SinkLabels, Counter>,
    pub bundle_polls: Family<BundlePollLabels, Counter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BundlePollLabels {
    /// `not_modified`, `activated`, `unchanged`, `refused`, `unreachable`.
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    /// `applied` or `refused`.
    pub result: &'static str,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("pexi");
        let decisions = Family::<DecisionLabels, Counter>::default();
        registry.register(
            "decisions",
            "Policy decisions, by result, reason class and VM",
            decisions.clone(),
        );
        // 10 µs to 80 ms: a decision costs tens of µs, its durable record a disk sync.
        let decision_seconds = Histogram::new(exponential_buckets(0.000_01, 2.0, 14));
        registry.register_with_unit(
            "decision",
            "From the policy input to the durable decision record",
            Unit::Seconds,
            decision_seconds.clone(),
        );
        let audit_write_seconds = Histogram::new(exponential_buckets(0.000_01, 2.0, 14));
        registry.register_with_unit(
            "audit_write",
            "A decision record's wait until it is durable",
            Unit::Seconds,
            audit_write_seconds.clone(),
        );
        let requests = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "requests",
            "Guest streams ended, by protocol method and outcome (ok or the error code)",
            requests.clone(),
        );
        // 1 ms to 33 s.
        let request_seconds = Histogram::new(exponential_buckets(0.001, 2.0, 16));
        registry.register_with_unit(
            "request",
            "A guest stream from its OPEN to its outcome",
            Unit::Seconds,
            request_seconds.clone(),
        );
        let body_bytes = Family::<DirectionLabels, Counter>::default();
        registry.register_with_unit(
            "body",
            "Body bytes carried, by direction (to_upstream, to_guest)",
            Unit::Bytes,
            body_bytes.clone(),
        );
        let gauge = |registry: &mut Registry, name: &str, help: &str| {
            let gauge = Gauge::default();
            registry.register(name, help, gauge.clone());
            gauge
        };
        let sessions = gauge(&mut registry, "sessions", "Guest sessions served now");
        let streams = gauge(&mut registry, "streams", "Guest streams open now");
        let buffered_bytes = gauge(
            &mut registry,
            "buffered_bytes",
            "Bytes buffered for all guests now (the shared pool in use)",
        );
        let approvals_waiting = gauge(
            &mut registry,
            "approvals_waiting",
            "Questions waiting for a person",
        );
        let policy_reloads = Family::<ResultLabels, Counter>::default();
        registry.register(
            "policy_reloads",
            "Policy reloads (file changes, bundles, approvals), applied or refused by the gate",
            policy_reloads.clone(),
        );
        let audit_records = gauge(
            &mut registry,
            "audit_records",
            "The audit log's last sequence number (records written)",
        );
        let shipping_lag_records = Family::<SinkLabels, Gauge>::default();
        registry.register(
            "audit_shipping_lag_records",
            "Audit records written but not yet acknowledged by the sink",
            shipping_lag_records.clone(),
        );
        let shipping_lag_seconds = Family::<SinkLabels, Gauge>::default();
        registry.register_with_unit(
            "audit_shipping_lag",
            "Age of the oldest record the sink has not acknowledged (0 when caught up)",
            Unit::Seconds,
            shipping_lag_seconds.clone(),
        );
        let shipping_errors = Family::<SinkLabels, Counter>::default();
        registry.register(
            "audit_shipping_errors",
            "Failed attempts to ship audit records (retried)",
            shipping_errors.clone(),
        );
        let bundle_polls = Family::<BundlePollLabels, Counter>::default();
        registry.register(
            "bundle_polls",
            "Polls of the bundle server, by result",
            bundle_polls.clone(),
        );
        Metrics {
            bundle_polls,
            registry,
            decisions,
            decision_seconds,
            audit_write_seconds,
            requests,
            request_seconds,
            body_bytes,
            sessions,
            streams,
            buffered_bytes,
            approvals_waiting,
            policy_reloads,
            audit_records,
            shipping_lag_records,
            shipping_lag_seconds,
            shipping_errors,
        }
    }

    /// Counts one decision.
    pub fn decided(&self, allow: bool, ask: bool, reasons: &[String], vm: &str, seconds: f64) {
        let result = match (allow, ask) {
            (true, _) => "allow",
            (false, true) => "ask",
            (false, false) => "deny",
        };
        self.decisions
            .get_or_create(&DecisionLabels {
                result,
                reason: reason_class(allow, reasons),
                vm: vm.to_string(),
            })
            .inc();
        self.decision_seconds.observe(seconds);
    }

    /// The OpenMetrics text of everything, as a scrape gets it.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        // Writing into a String does not fail; an encoding error would be a bug in a label type.
        if let Err(err) = prometheus_client::encoding::text::encode(&mut text, &self.registry) {
            tracing::error!(%err, "encoding the metrics failed");
        }
        text
    }
}

/// A decision's reason as one of a few classes, from the shipped policy's wording (docs/policy.md):
/// `allowlist`, `not_listed`, `denylist`, `entry_field` (a listed host refusing a method, path, port,
/// scheme or upgrade), `tunnel`, `policy_error` (undefined, an error, a malformed decision: a deny), or
/// `rule` for anything else (an extension's denial, a policy of one's own).
pub fn reason_class(allow: bool, reasons: &[String]) -> &'static str {
    let first = reasons.first().map(String::as_str).unwrap_or("");
    if allow {
        return if first.starts_with("allowed by allowlist entry") {
            "allowlist"
        } else {
            "rule"
        };
    }
    if first.starts_with("policy ") {
        "policy_error"
    } else if first.starts_with("denied by denylist entry") {
        "denylist"
    } else if first.ends_with("is not in the allowlist") {
        "not_listed"
    } else if first.contains("tunnel") {
        "tunnel"
    } else if first.contains(" not allowed for ") {
        "entry_field"
    } else {
        "rule"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_fall_into_their_classes() {
        let class = |allow, reason: &str| reason_class(allow, &[reason.to_string()]);
        assert_eq!(class(true, "allowed by allowlist entry a.com"), "allowlist");
        assert_eq!(
            class(false, "host a.com is not in the allowlist"),
            "not_listed"
        );
        assert_eq!(class(false, "denied by denylist entry a.com"), "denylist");
        assert_eq!(
            class(false, "method POST not allowed for a.com"),
            "entry_field"
        );
        assert_eq!(
            class(false, "a.com:22 is not a tunnel destination"),
            "tunnel"
        );
        assert_eq!(class(false, "policy result is undefined"), "policy_error");
        assert_eq!(class(false, "uploads over 1 MiB are refused"), "rule");
        assert_eq!(reason_class(false, &[]), "rule");
    }

    #[test]
    fn counts_come_out_in_the_openmetrics_text() {
        let metrics = Metrics::new();
        let reasons = ["host a.com is not in the allowlist".to_string()];
        metrics.decided(false, false, &reasons, "alice", 0.000_05);
        metrics.decided(false, false, &reasons, "alice", 0.000_05);
        metrics.sessions.set(3);
        let text = metrics.encode();
        assert!(
            text.contains(
                r#"pexi_decisions_total{result="deny",reason="not_listed",vm="alice"} 2"#
            ),
            "{text}"
        );
        assert!(text.contains("pexi_sessions 3"), "{text}");
        assert!(text.contains("pexi_decision_seconds_count 2"), "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}
