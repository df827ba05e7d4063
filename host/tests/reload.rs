//! Hot reload against a serving PEP: bad bundles are rejected while the old one keeps deciding; a good one
//! takes over atomically, with its own revision in HELLO_ACK and on the audit records.

mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use pexi_protocol::payload::{HttpRequest, MethodCall, PolicyDecision, ResponseHead};
use support::{loopback_options, Guest, TestPep};

async fn check(guest: &mut Guest, url: &str) -> PolicyDecision {
    let reply = guest
        .call(MethodCall::PolicyCheck(HttpRequest::new("GET", url)), b"")
        .await;
    match reply.head {
        Some(ResponseHead::PolicyDecision(decision)) => decision,
        other => panic!("{other:?} {:?}", reply.error),
    }
}

/// Writes by rename, so the PEP never reads a half-written file.
fn replace(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp-write");
    std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
    std::fs::write(&tmp, text).expect("write");
    std::fs::rename(&tmp, path).expect("rename");
}

/// Waits for the `n`th `policy` record with this `event` (reload, reload_rejected).
fn wait_for_record(pep: &TestPep, event: &str, already: usize) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let records: Vec<_> = pep
            .audit_records()
            .into_iter()
            .filter(|r| r["kind"] == "policy" && r["event"] == event)
            .collect();
        if records.len() > already {
            return records[already].clone();
        }
        assert!(Instant::now() < deadline, "no policy {event} record");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn revision_of(guest: &Guest) -> String {
    guest
        .conn
        .session()
        .info()
        .and_then(|i| i.policy_revision.clone())
        .expect("HELLO_ACK carries the policy revision")
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_bundles_are_rejected_and_a_good_one_takes_over() {
    let pep = TestPep::start(loopback_options(&[], &["api.test"]));
    let url = "https://api.test/v1";
    let mut guest = pep.guest().await;
    let first_revision = revision_of(&guest);
    let before = check(&mut guest, url).await;
    assert!(before.allow, "{before:?}");
    let policy = pep.dir.join("policies/pexi/http.rego");
    let original = std::fs::read_to_string(&policy).expect("policy");

    // 1. A policy that does not parse.
    replace(&policy, "package pexi.http\ndecision := {\n");
    let rejected = wait_for_record(&pep, "reload_rejected", 0);
    assert!(
        rejected["error"]
            .as_str()
            .expect("error")
            .contains("http.rego"),
        "{rejected}"
    );
    let during = check(&mut guest, url).await;
    assert!(during.allow, "the old policy still decides: {during:?}");

    // 2. A bundle whose own tests fail.
    replace(&policy, &original);
    replace(
        &pep.dir.join("policies/pexi/extra_test.rego"),
        "package pexi.extra_test\nimport rego.v1\ntest_always_fails if { 1 == 2 }\n",
    );
    let rejected = wait_for_record(&pep, "reload_rejected", 1);
    assert!(
        rejected["error"]
            .as_str()
            .expect("error")
            .contains("pexi.extra_test.test_always_fails"),
        "{rejected}"
    );
    assert!(check(&mut guest, url).await.allow);
    assert_eq!(
        pep.records_for(&check(&mut guest, url).await.decision_id)[0]["policy_revision"],
        first_revision.as_str(),
        "decisions are still made by the first bundle"
    );

    // 3. A valid, stricter bundle: the same URL is now denied with the new reason.
    std::fs::remove_file(pep.dir.join("policies/pexi/extra_test.rego")).expect("remove");
    replace(
        &pep.dir.join("policies/data/deny.json"),
        r#"{"deny": [{"host": "api.test", "paths": ["/v1"]}]}"#,
    );
    let reloaded = wait_for_record(&pep, "reload", 0);
    let new_revision = reloaded["new_revision"]
        .as_str()
        .expect("revision")
        .to_string();
    assert_eq!(reloaded["previous_revision"], first_revision.as_str());
    assert_ne!(new_revision, first_revision);
    let after = check(&mut guest, url).await;
    assert!(!after.allow);
    assert_eq!(after.reasons, vec!["denied by denylist entry api.test"]);
    assert_eq!(
        pep.records_for(&after.decision_id)[0]["policy_revision"],
        new_revision.as_str()
    );
    assert!(
        check(&mut guest, "https://api.test/v2").await.allow,
        "only /v1 is denied"
    );
    // A new session is told the new revision.
    let fresh = pep.guest().await;
    assert_eq!(revision_of(&fresh), new_revision);
    // Every record the pipeline writes carries the revision it was made under (the writer's own
    // chain_start / pep_start / rotate records precede any policy).
    assert!(pep
        .audit_records()
        .iter()
        .filter(|r| !matches!(
            r["kind"].as_str(),
            Some("chain_start" | "pep_start" | "rotate")
        ))
        .all(|r| r["policy_revision"].is_string()));
}

#[tokio::test(flavor = "multi_thread")]
async fn sighup_reloads_at_once() {
    let mut options = loopback_options(&[], &["api.test"]);
    // Polling effectively off: only the signal can trigger this reload.
    options.limits = vec![];
    let pep = TestPep::start_with(options, |doc| {
        doc["pep"]["policy"]
            .as_table_mut()
            .expect("policy")
            .insert("reload_check_ms".into(), 3_600_000.into());
    });
    let mut guest = pep.guest().await;
    assert!(check(&mut guest, "https://api.test/").await.allow);
    replace(
        &pep.dir.join("policies/data/deny.json"),
        r#"{"deny": [{"host": "api.test"}]}"#,
    );
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        check(&mut guest, "https://api.test/").await.allow,
        "no reload without a trigger"
    );
    let status = std::process::Command::new("kill")
        .args(["-HUP", &pep.pid().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    wait_for_record(&pep, "reload", 0);
    assert!(!check(&mut guest, "https://api.test/").await.allow);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reload_that_needs_a_restart_is_refused_whole() {
    if !support::in_isolated_netns("a_reload_that_needs_a_restart_is_refused_whole") {
        return;
    }
    let pep = TestPep::start(loopback_options(&[], &["api.test"]));
    let mut guest = pep.guest().await;
    let url = "https://api.test/v1";
    assert!(check(&mut guest, url).await.allow);
    // One edit: a deny for api.test (policy, which a reload applies) and an address range opened to the
    // guard (which only a restart applies). Applying the first and keeping the second would be a
    // half-reload that the audit log calls a reload.
    let config_path = pep.dir.join("config.toml");
    let mut doc: toml::Table = std::fs::read_to_string(&config_path)
        .expect("config")
        .parse()
        .expect("toml");
    let policy = doc["pep"]["policy"].as_table_mut().expect("policy");
    let deny: toml::Table = toml::toml! { host = "api.test" };
    policy.insert("deny".into(), toml::Value::Array(vec![deny.into()]));
    doc["pep"]["network"]
        .as_table_mut()
        .expect("network")
        .insert(
            "allowed_cidrs".into(),
            toml::Value::Array(vec!["10.0.0.0/8".into()]),
        );
    replace(&config_path, &toml::to_string(&doc).expect("toml"));
    let rejected = wait_for_record(&pep, "reload_rejected", 0);
    let error = rejected["error"].as_str().expect("error");
    assert!(
        error.contains("pep.network.allowed_cidrs") && error.contains("restart"),
        "{rejected}"
    );
    assert!(
        pep.audit_records()
            .iter()
            .all(|r| !(r["kind"] == "policy" && r["event"] == "reload")),
        "no reload record"
    );
    let still = check(&mut guest, url).await;
    assert!(still.allow, "the old policy keeps deciding: {still:?}");
}
