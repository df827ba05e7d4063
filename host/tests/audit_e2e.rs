//! The audit log as a real `pexi serve` writes it: no secret reaches the file, and a crash leaves a log
//! that verifies and holds the decision of every request the guest saw allowed.

mod support;

use std::collections::HashSet;
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use pexi_host::audit::log_files;
use pexi_host::audit::verify::verify;
use pexi_protocol::payload::{HeaderField, HttpRequest, MethodCall, ResponseHead};
use pexi_protocol::session::Event;
use support::{loopback_options, TestPep, Upstream};

const SECRETS: &[&str] = &[
    "SECRET-AUTH-1111",
    "SECRET-COOKIE-2222",
    "SECRET-KEY-3333",
    "SECRET-TOKEN-4444",
    "SECRET-Q-5555",
    "SECRET-Q-6666",
    "SECRET-Q-7777",
    "SECRET-BODY-8888",
    "SECRET-SETCOOKIE-9999",
    "SECRET-PROXY-0000",
    "SECRET-REDIRECT-1212",
];

#[tokio::test(flavor = "multi_thread")]
async fn no_secret_value_reaches_the_audit_log() {
    let upstream = Upstream::http("127.0.0.1").await;
    let pep = TestPep::start(loopback_options(
        &[("api.test", "127.0.0.1")],
        &["api.test"],
    ));
    let mut guest = pep.guest().await;
    let port = upstream.port();
    let post = HttpRequest {
        headers: vec![
            HeaderField::new("authorization", "Bearer SECRET-AUTH-1111"),
            HeaderField::new("cookie", "session=SECRET-COOKIE-2222"),
            HeaderField::new("x-api-key", "SECRET-KEY-3333"),
            HeaderField::new("x-custom-token", "SECRET-TOKEN-4444"),
            HeaderField::new("proxy-authorization", "Basic SECRET-PROXY-0000"),
            HeaderField::new("x-visible", "plain-value"),
        ],
        content_length: Some(16),
        ..HttpRequest::new(
            "POST",
            format!("http://api.test:{port}/echo?token=SECRET-Q-5555&api_key=SECRET-Q-6666&code=SECRET-Q-7777&q=visible"),
        )
    };
    let reply = guest
        .call(MethodCall::HttpRequest(post), b"SECRET-BODY-8888")
        .await;
    assert_eq!(reply.status(), 200, "{:?}", reply.error);
    let decision_id = reply.http_head().decision_id.clone();
    let reply = guest
        .get(&format!(
            "http://api.test:{port}/setcookie?cookie=SECRET-SETCOOKIE-9999"
        ))
        .await;
    assert!(reply
        .http_head()
        .headers
        .iter()
        .any(|h| h.value() == b"SECRET-SETCOOKIE-9999"));
    // A redirect whose Location carries a secret: the next hop's previous_url and URL are redacted too.
    let target = url::form_urlencoded::byte_serialize(
        format!("http://api.test:{port}/hello?access_token=SECRET-REDIRECT-1212").as_bytes(),
    )
    .collect::<String>();
    let reply = guest
        .get(&format!("http://api.test:{port}/redirect?to={target}"))
        .await;
    assert_eq!(reply.body, b"hello");

    let records = pep.wait_records(&decision_id, &["decision", "outcome"]);
    let decision = &records[0];
    let redacted: HashSet<&str> = decision["redacted"]
        .as_array()
        .expect("redacted")
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    for path in [
        "request.headers.authorization",
        "request.headers.cookie",
        "request.headers.x-api-key",
        "request.headers.x-custom-token",
        "request.query.token",
        "request.query.api_key",
        "request.query.code",
    ] {
        assert!(redacted.contains(path), "{path} not listed in {redacted:?}");
        let digest = decision["redacted_digests"][path].as_str().expect("digest");
        assert!(digest.starts_with("hmac-sha256:"), "{digest}");
    }
    assert_eq!(
        decision["request"]["headers"]["x-visible"][0],
        "plain-value"
    );
    assert!(decision["request"]["query"]
        .as_str()
        .expect("query")
        .contains("q=visible"));
    // The body is known by its size and digest only.
    let outcome = records
        .iter()
        .find(|r| r["kind"] == "outcome")
        .expect("outcome");
    assert_eq!(outcome["request_body"]["bytes"], 16);
    assert_eq!(
        outcome["request_body"]["sha256"].as_str().map(str::len),
        Some(64)
    );
    assert_eq!(outcome["response_body"]["bytes"], 16);

    // Grep the bytes of every file of the log.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let files = log_files(&pep.audit);
    let mut bytes = Vec::new();
    for file in &files {
        bytes.extend(std::fs::read(file).expect("read"));
    }
    let text = String::from_utf8_lossy(&bytes);
    for secret in SECRETS {
        assert!(!text.contains(secret), "{secret} is in the audit log");
    }
    assert!(text.contains("\"kind\":\"decision\""));
    // The keys and the log are the host's alone, and the keys are not where the log's glob reaches.
    let keys = pep.dir.join("keys");
    assert_eq!(
        std::fs::metadata(&keys).expect("keys").permissions().mode() & 0o777,
        0o700
    );
    for key in ["audit-redaction.key", "audit-signing.pk8"] {
        assert_eq!(
            std::fs::metadata(keys.join(key))
                .expect("key")
                .permissions()
                .mode()
                & 0o777,
            0o600
        );
    }
    assert!(files.iter().all(|f| !f.to_string_lossy().ends_with(".key")));
    assert_eq!(
        std::fs::metadata(&pep.audit)
            .expect("log")
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
    assert!(verify(&files).is_ok());
    // Every record matches the published schema.
    let schema: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(support::repo_root().join("schemas/audit/record.schema.json"))
            .expect("schema"),
    )
    .expect("json");
    let validator = jsonschema::validator_for(&schema).expect("valid schema");
    let mut kinds = HashSet::new();
    let mut by_kind = std::collections::HashMap::new();
    for line in text.lines() {
        let record: serde_json::Value = serde_json::from_str(line).expect("json");
        if let Err(err) = validator.validate(&record) {
            panic!("{err}: {record}");
        }
        let kind = record["kind"].as_str().expect("kind").to_string();
        // And the schema of its kind, generated from the record types.
        let typed = by_kind.entry(kind.clone()).or_insert_with(|| {
            let path = support::repo_root().join(format!("schemas/audit/{kind}.schema.json"));
            let schema: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(&path).expect("kind schema"))
                    .expect("json");
            jsonschema::validator_for(&schema).expect("valid schema")
        });
        if let Err(err) = typed.validate(&record) {
            panic!("{kind}: {err}: {record}");
        }
        kinds.insert(kind);
    }
    for kind in [
        "chain_start",
        "policy",
        "session",
        "decision",
        "resolve",
        "outcome",
    ] {
        assert!(kinds.contains(kind), "no {kind} record to check: {kinds:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn sigkill_under_load_leaves_a_verifiable_log_with_every_allowed_decision() {
    let upstream = Upstream::http("127.0.0.1").await;
    let mut pep = TestPep::start(loopback_options(
        &[("api.test", "127.0.0.1")],
        &["api.test"],
    ));
    let url = format!("http://api.test:{}/hello", upstream.port());
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let mut guest = pep.guest().await;
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            let mut seen = Vec::new();
            // Keep 8 streams in flight until the PEP dies under us.
            let mut in_flight = 0;
            loop {
                while in_flight < 8 {
                    let Ok(id) = guest
                        .session()
                        .open(MethodCall::HttpRequest(HttpRequest::new("GET", &url)))
                    else {
                        return seen;
                    };
                    let _ = guest.session().send_end(id, vec![]);
                    in_flight += 1;
                }
                match guest.conn.next_event().await {
                    Ok(Some(Event::Head {
                        head: ResponseHead::Http(head),
                        ..
                    })) => seen.push(head.decision_id),
                    Ok(Some(Event::Data { stream_id, data })) => {
                        guest.session().release(stream_id, data.len())
                    }
                    Ok(Some(Event::End { .. } | Event::StreamFailed { .. })) => in_flight -= 1,
                    Ok(Some(_)) => {}
                    Ok(None) | Err(_) => return seen,
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    pep.kill_now();
    let mut allowed = Vec::new();
    for task in tasks {
        allowed.extend(
            tokio::time::timeout(Duration::from_secs(10), task)
                .await
                .expect("guest ends")
                .expect("join"),
        );
    }
    assert!(allowed.len() > 50, "load was light: {}", allowed.len());

    let files = log_files(&pep.audit);
    let report = verify(&files).expect("every complete record verifies");
    let text: String = files
        .iter()
        .map(|f| String::from_utf8_lossy(&std::fs::read(f).expect("read")).into_owned())
        .collect();
    let logged: HashSet<String> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|r| r["kind"] == "decision")
        .filter_map(|r| r["decision_id"].as_str().map(str::to_string))
        .collect();
    let missing: Vec<&String> = allowed.iter().filter(|id| !logged.contains(*id)).collect();
    assert!(
        missing.is_empty(),
        "allowed without a decision record: {missing:?}"
    );
    eprintln!(
        "SIGKILL after {} allowed requests: {} records verify, torn end: {:?}",
        allowed.len(),
        report.records,
        report.torn_end
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_refused_request_has_exactly_one_outcome_record() {
    let pep = TestPep::start(loopback_options(&[], &["api.test"]));
    let mut guest = pep.guest().await;
    let http = guest
        .call(
            MethodCall::HttpRequest(HttpRequest::new("GET", "ftp://api.test/")),
            b"",
        )
        .await;
    assert_eq!(http.error_code(), "invalid_request");
    let check = guest
        .call(
            MethodCall::PolicyCheck(HttpRequest::new("GET", "ftp://api.test/")),
            b"",
        )
        .await;
    assert_eq!(check.error_code(), "invalid_request");
    // Both streams' outcomes are written after their answers; wait for the second.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !pep
        .audit_records()
        .iter()
        .any(|r| r["kind"] == "outcome" && r["stream_id"] == 3)
    {
        assert!(
            std::time::Instant::now() < deadline,
            "no outcome for stream 3"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A moment more, so that a second record for either stream would have been written too.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let outcomes: Vec<serde_json::Value> = pep
        .audit_records()
        .into_iter()
        .filter(|r| r["kind"] == "outcome")
        .collect();
    for stream in [1, 3] {
        let count = outcomes.iter().filter(|r| r["stream_id"] == stream).count();
        assert_eq!(count, 1, "stream {stream}: {outcomes:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_redaction_key_at_its_old_place_is_moved_out_of_the_logs_glob() {
    let key = [7u8; 32];
    let pep = TestPep::start_with(loopback_options(&[], &["api.test"]), |doc| {
        // The old place, `<path>.key`, beside the log: what `audit.jsonl*` matched.
        let path = doc["pep"]["audit"]["path"]
            .as_str()
            .expect("audit path")
            .to_string();
        std::fs::write(format!("{path}.key"), key).expect("legacy key");
    });
    let legacy = pep.dir.join("audit.jsonl.key");
    let moved = pep.dir.join("keys/audit-redaction.key");
    assert!(!legacy.exists(), "the key is still beside the log");
    assert_eq!(std::fs::read(&moved).expect("moved key"), key);
    assert_eq!(
        std::fs::metadata(&moved).expect("key").permissions().mode() & 0o777,
        0o600
    );
    assert_eq!(
        std::fs::metadata(pep.dir.join("keys"))
            .expect("keys")
            .permissions()
            .mode()
            & 0o777,
        0o700
    );
}
