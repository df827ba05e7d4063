//! Credential brokering end to end: a real `pexi serve` holding an API key in its environment, a mock API
//! on loopback (HTTPS, test CA) that answers only with that key, and a guest that only ever sends the
//! placeholder. Then every byte the run wrote (audit log, the PEP's trace-level log, its config, what the
//! guest received) is searched for the key.

mod support;

use pexi_protocol::payload::{HeaderField, HttpRequest, MethodCall, RedirectMode};
use support::{loopback_options, TestCa, TestPep, Upstream};

fn key() -> String {
    // Unique per run, so a match can only come from this run.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("sk-pexi-test-{}-{nanos:x}", std::process::id())
}

fn with_auth(method: &str, url: &str, value: &str) -> HttpRequest {
    HttpRequest {
        headers: vec![
            HeaderField::new("authorization", value),
            HeaderField::new("accept", "text/event-stream"),
        ],
        ..HttpRequest::new(method, url)
    }
}

/// Every file under `dir`, recursively.
fn files(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).expect("read dir").flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(files(&path));
        } else {
            out.push(path);
        }
    }
    out
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test(flavor = "multi_thread")]
async fn the_key_reaches_only_its_host_and_is_written_nowhere() {
    let key = key();
    let ca = TestCa::new(&["api.test"]);
    let api = Upstream::https("127.0.0.1", &ca).await;
    api.require("authorization", &format!("Bearer {key}"));
    let other = Upstream::http("127.0.0.1").await;
    let mut options = loopback_options(
        &[("api.test", "127.0.0.1"), ("other.test", "127.0.0.1")],
        &["api.test", "other.test"],
    );
    options.extra_ca_pem = Some(ca.ca_pem.clone());
    options.env = vec![
        ("PEXI_TEST_LLM_KEY".into(), key.clone()),
        // Everything every crate logs, to show the key is in none of it.
        ("RUST_LOG".into(), "trace".into()),
    ];
    options.log_to_file = true;
    let mut pep = TestPep::start_with(options, |doc| {
        let secret: toml::Table = toml::toml! {
            name = "llm"
            env = "PEXI_TEST_LLM_KEY"
            header = "authorization"
            template = "Bearer {secret}"
            hosts = ["api.test"]
            methods = ["GET", "POST"]
        };
        doc.insert(
            "secrets".into(),
            toml::Value::Array(vec![toml::Value::Table(secret)]),
        );
    });
    let mut guest = pep.guest().await;
    let mut received: Vec<u8> = Vec::new();
    let api_url = |path: &str| format!("https://api.test:{}{path}", api.port());
    let other_url = |path: &str| format!("http://other.test:{}{path}", other.port());

    // An authenticated streamed call with only the placeholder.
    let reply = guest
        .call(
            MethodCall::HttpRequest(with_auth(
                "POST",
                &api_url("/sse?n=3&gap_ms=50"),
                "Bearer pexi:secret:llm",
            )),
            b"{\"model\":\"m\"}",
        )
        .await;
    assert_eq!(reply.status(), 200, "{:?}", reply.error);
    assert_eq!(reply.body, b"data: tick\n\n".repeat(3));
    assert!(reply.chunks.len() >= 2, "streamed: {:?}", reply.chunks);
    received.extend(&reply.body);
    let decision_id = reply.http_head().decision_id.clone();
    let records = pep.wait_records(&decision_id, &["decision", "outcome"]);
    let decision = records
        .iter()
        .find(|r| r["kind"] == "decision")
        .expect("decision");
    assert_eq!(decision["request"]["secrets"], serde_json::json!(["llm"]));
    let outcome = records
        .iter()
        .find(|r| r["kind"] == "outcome")
        .expect("outcome");
    assert_eq!(outcome["secrets_injected"], serde_json::json!(["llm"]));

    // The control: without the placeholder the mock API refuses, so the 200 above needed the real key.
    let reply = guest
        .call(
            MethodCall::HttpRequest(HttpRequest::new("GET", api_url("/hello"))),
            b"",
        )
        .await;
    assert_eq!(reply.status(), 401);

    // The same placeholder to another allowlisted host: refused, and nothing reaches that host.
    let reply = guest
        .call(
            MethodCall::HttpRequest(with_auth(
                "POST",
                &other_url("/echo"),
                "Bearer pexi:secret:llm",
            )),
            b"x",
        )
        .await;
    assert_eq!(
        reply.error_code(),
        "secret_not_allowed",
        "{:?}",
        reply.error
    );
    let message = &reply.error.as_ref().expect("error").message;
    assert!(message.contains("not for other.test"), "{message}");
    assert!(other.hits().is_empty(), "nothing reached other.test");

    // A method outside the binding, a placeholder in the URL, an unknown name, and a key the guest
    // brought itself: all refused before anything is sent.
    let api_hits = api.hits().len();
    for (request, why) in [
        (
            with_auth("DELETE", &api_url("/hello"), "Bearer pexi:secret:llm"),
            "DELETE",
        ),
        (
            HttpRequest::new("GET", api_url("/hello?key=pexi:secret:llm")),
            "URL",
        ),
        (
            with_auth("GET", &api_url("/hello"), "Bearer pexi:secret:nope"),
            "\"nope\"",
        ),
        (
            with_auth("GET", &api_url("/hello"), "Bearer sk-stolen-elsewhere"),
            "brokers",
        ),
    ] {
        let reply = guest.call(MethodCall::HttpRequest(request), b"").await;
        assert_eq!(reply.error_code(), "secret_not_allowed", "{why}");
        let message = &reply.error.as_ref().expect("error").message;
        assert!(message.contains(why), "{why}: {message}");
        received.extend(message.as_bytes());
    }
    assert_eq!(api.hits().len(), api_hits, "none of them reached the API");

    // A redirect from the API host to another origin: followed, without the secret or the placeholder.
    let mut redirect = with_auth(
        "GET",
        &api_url(&format!(
            "/redirect?to={}",
            other_url("/hello").replace(':', "%3A").replace('/', "%2F")
        )),
        "Bearer pexi:secret:llm",
    );
    redirect.redirect = RedirectMode::Follow;
    let reply = guest.call(MethodCall::HttpRequest(redirect), b"").await;
    assert_eq!(reply.status(), 200, "{:?}", reply.error);
    assert_eq!(reply.body, b"hello");
    let hop = other.hits().pop().expect("the redirect reached other.test");
    assert!(
        hop.headers.iter().all(|(name, _)| name != "authorization"),
        "{:?}",
        hop.headers
    );
    let records = pep.wait_records(&reply.http_head().decision_id, &["outcome"]);
    let outcome = records
        .iter()
        .find(|r| r["kind"] == "outcome")
        .expect("outcome");
    assert_eq!(outcome["secrets_withheld"], serde_json::json!(["llm"]));
    assert_eq!(outcome["secrets_injected"], serde_json::json!(["llm"]));

    // Nothing the run wrote holds the key: audit log, trace-level log, config, what the guest got.
    drop(guest);
    assert!(pep.terminate().success());
    let log = std::fs::read_to_string(pep.dir.join("pep.log")).expect("log");
    assert!(log.contains("TRACE"), "the log is at trace level");
    let written = files(&pep.dir);
    assert!(written.iter().any(|p| p.ends_with("audit.jsonl")));
    for path in written {
        let bytes = std::fs::read(&path).expect("read");
        assert!(
            !contains(&bytes, key.as_bytes()),
            "{} holds the key",
            path.display()
        );
    }
    assert!(!contains(&received, key.as_bytes()));
}

// ---------------------------------------------------------------------------------------------------------
// A hostile guest's attempts on a brokered key. Each runs alone in a loopback-only network namespace: if a
// refusal failed, nothing could leave the machine.

/// A PEP brokering the key as secret `llm` for `api.test` (the secret's other fields from `fields`), with an
/// HTTPS upstream (which echoes headers at /headers) and a plain-HTTP one, both answering as api.test. With
/// `methods`, the policy's allow entry for api.test names them.
async fn brokering(
    key: &str,
    fields: toml::Table,
    methods: Option<&[&str]>,
) -> (TestPep, Upstream, Upstream) {
    let ca = TestCa::new(&["api.test"]);
    let tls = Upstream::https("127.0.0.1", &ca).await;
    let plain = Upstream::http("127.0.0.1").await;
    let mut options = loopback_options(&[("api.test", "127.0.0.1")], &["api.test"]);
    options.extra_ca_pem = Some(ca.ca_pem.clone());
    options.env = vec![("PEXI_TEST_LLM_KEY".into(), key.to_string())];
    let pep = TestPep::start_with(options, |doc| {
        if let Some(methods) = methods {
            let allow = doc["pep"]["policy"]["allow"]
                .as_array_mut()
                .expect("allow entries");
            for entry in allow.iter_mut().filter_map(toml::Value::as_table_mut) {
                entry.insert(
                    "methods".into(),
                    toml::Value::Array(methods.iter().map(|m| (*m).into()).collect()),
                );
            }
        }
        let mut secret: toml::Table = toml::toml! {
            name = "llm"
            env = "PEXI_TEST_LLM_KEY"
            hosts = ["api.test"]
        };
        secret.extend(fields);
        doc.insert(
            "secrets".into(),
            toml::Value::Array(vec![toml::Value::Table(secret)]),
        );
    });
    (pep, tls, plain)
}

fn refused_with(reply: &support::Reply, words: &str) {
    assert_eq!(
        reply.error_code(),
        "secret_not_allowed",
        "{:?}",
        reply.error
    );
    let message = &reply.error.as_ref().expect("error").message;
    assert!(message.contains(words), "{words}: {message}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_brokered_key_never_travels_over_plain_http() {
    if !support::in_isolated_netns("a_brokered_key_never_travels_over_plain_http") {
        return;
    }
    let key = key();
    let fields = toml::toml! { header = "authorization" template = "Bearer {secret}" };
    let (pep, tls, plain) = brokering(&key, fields, None).await;
    let mut guest = pep.guest().await;
    let placeholder = "Bearer pexi:secret:llm";
    let url = format!("http://api.test:{}/headers", plain.port());
    let reply = guest
        .call(
            MethodCall::HttpRequest(with_auth("POST", &url, placeholder)),
            b"x",
        )
        .await;
    refused_with(&reply, "over http");
    assert!(plain.hits().is_empty(), "nothing went out in the clear");
    // The control: the same request over https carries the key.
    let url = format!("https://api.test:{}/hello", tls.port());
    let reply = guest
        .call(
            MethodCall::HttpRequest(with_auth("POST", &url, placeholder)),
            b"x",
        )
        .await;
    assert_eq!(reply.status(), 200, "{:?}", reply.error);
    let hit = tls.hits().pop().expect("the https request arrived");
    assert!(hit
        .headers
        .iter()
        .any(|(name, value)| name == "authorization" && *value == format!("Bearer {key}")));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_brokered_key_is_never_sent_with_a_method_an_upstream_echoes() {
    if !support::in_isolated_netns("a_brokered_key_is_never_sent_with_a_method_an_upstream_echoes")
    {
        return;
    }
    let key = key();
    // No `methods` on the secret: any method may carry the key, and still not these. The policy allows
    // them here (its default entry would not), so that the broker's own refusal is what is tested.
    let fields = toml::toml! { header = "x-api-key" };
    let (pep, tls, _plain) = brokering(&key, fields, Some(&["GET", "TRACE", "TRACK"])).await;
    let mut guest = pep.guest().await;
    for method in ["TRACE", "TRACK"] {
        let request = HttpRequest {
            headers: vec![HeaderField::new("x-api-key", "pexi:secret:llm")],
            ..HttpRequest::new(method, format!("https://api.test:{}/headers", tls.port()))
        };
        let reply = guest.call(MethodCall::HttpRequest(request), b"").await;
        refused_with(&reply, &format!("may not be sent with {method}"));
        assert!(!contains(&reply.body, key.as_bytes()));
    }
    assert!(
        tls.hits().is_empty(),
        "no echoing request reached the upstream"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_guest_key_in_another_credential_header_is_refused() {
    if !support::in_isolated_netns("a_guest_key_in_another_credential_header_is_refused") {
        return;
    }
    let key = key();
    // The secret goes in x-api-key; the guest's own SDK would send its own key as a bearer token.
    let fields = toml::toml! { header = "x-api-key" };
    let (pep, tls, _plain) = brokering(&key, fields, None).await;
    let mut guest = pep.guest().await;
    let url = format!("https://api.test:{}/hello", tls.port());
    for (header, value) in [
        ("authorization", "Bearer sk-the-guests-own-key"),
        ("x-goog-api-key", "the-guests-own-key"),
        ("x-auth-token", "the-guests-own-key"),
    ] {
        let request = HttpRequest {
            headers: vec![HeaderField::new(header, value)],
            ..HttpRequest::new("GET", url.clone())
        };
        let reply = guest.call(MethodCall::HttpRequest(request), b"").await;
        refused_with(&reply, &format!("its own {header}"));
    }
    assert!(
        tls.hits().is_empty(),
        "no guest credential reached the host"
    );
    // An ordinary header is not a credential: the request goes, with the brokered key.
    let request = HttpRequest {
        headers: vec![
            HeaderField::new("x-api-key", "pexi:secret:llm"),
            HeaderField::new("accept", "application/json"),
        ],
        ..HttpRequest::new("GET", url)
    };
    let reply = guest.call(MethodCall::HttpRequest(request), b"").await;
    assert_eq!(reply.status(), 200, "{:?}", reply.error);
}
