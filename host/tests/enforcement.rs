//! What the policy decided is exactly what is sent: a hostile guest's spellings and extra headers, end to
//! end against a real `pexi serve` and loopback upstreams. Each test runs alone in a loopback-only network
//! namespace (`unshare -n`), so a refusal that failed could send nothing off the machine.

mod support;

use pexi_protocol::payload::{HeaderField, HttpRequest, MethodCall, NetConnect, ResponseHead};
use support::{loopback_options, TestPep, Upstream};

/// A PEP that allows api.test (answering on 127.0.0.1), after one more edit of its config.
fn api_pep(edit: impl FnOnce(&mut toml::Table)) -> TestPep {
    TestPep::start_with(
        loopback_options(&[("api.test", "127.0.0.1")], &["api.test"]),
        edit,
    )
}

/// Sets `[pep.policy] key`: the allow or deny entries, the bundle's folder.
fn set_policy(doc: &mut toml::Table, key: &str, value: impl Into<toml::Value>) {
    doc["pep"]["policy"]
        .as_table_mut()
        .expect("[pep.policy]")
        .insert(key.into(), value.into());
}

#[tokio::test(flavor = "multi_thread")]
async fn forwarding_headers_from_the_guest_never_reach_an_upstream() {
    if !support::in_isolated_netns("forwarding_headers_from_the_guest_never_reach_an_upstream") {
        return;
    }
    let api = Upstream::http("127.0.0.1").await;
    let pep = api_pep(|_| {});
    let mut guest = pep.guest().await;
    // Claims an upstream might trust: "this request comes from inside".
    let claims = [
        ("x-forwarded-for", "10.0.0.1"),
        ("forwarded", "for=10.0.0.1;proto=https"),
        ("via", "1.1 internal-gateway"),
        ("x-real-ip", "10.0.0.1"),
        ("x-forwarded-host", "admin.internal"),
        ("true-client-ip", "10.0.0.1"),
    ];
    let mut headers: Vec<HeaderField> = claims
        .iter()
        .map(|&(name, value)| HeaderField::new(name, value))
        .collect();
    headers.push(HeaderField::new("x-request-id", "kept"));
    let request = HttpRequest {
        headers,
        ..HttpRequest::new("GET", format!("http://api.test:{}/headers", api.port()))
    };
    let reply = guest.call(MethodCall::HttpRequest(request), b"").await;
    assert_eq!(reply.status(), 200, "{:?}", reply.error);
    let hit = api.hits().pop().expect("the request arrived");
    for (name, _) in claims {
        assert!(
            hit.headers.iter().all(|(sent, _)| sent != name),
            "{name} reached the upstream: {:?}",
            hit.headers
        );
    }
    assert!(
        hit.headers
            .iter()
            .any(|(name, value)| name == "x-request-id" && value == "kept"),
        "an ordinary header still goes: {:?}",
        hit.headers
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tunnel_destination_is_a_bare_name_or_address() {
    if !support::in_isolated_netns("a_tunnel_destination_is_a_bare_name_or_address") {
        return;
    }
    // Something listening, so that the allowed tunnel has somewhere to go.
    let far = Upstream::http("127.0.0.1").await;
    let port = far.port();
    let entry: toml::Table = toml::toml! {
        host = "tun.test"
        tunnel = true
        ports = [port]
    };
    let pep = TestPep::start_with(loopback_options(&[("tun.test", "127.0.0.1")], &[]), |doc| {
        set_policy(doc, "allow", vec![toml::Value::from(entry)])
    });
    let mut guest = pep.guest().await;
    let connect = |host: &str, port: u16| {
        MethodCall::NetConnect(NetConnect {
            host: host.into(),
            port,
        })
    };
    // URL syntax around an allowed name: each would make the parsed destination (or its port) differ
    // from what the guest named.
    for host in [
        "tun.test/".to_string(),
        format!("tun.test:{port}"),
        format!("tun.test:{port}/"),
        "user@tun.test".to_string(),
        "tun.test?x".to_string(),
        "tun.test#x".to_string(),
        "tun.test\\x".to_string(),
        "tun%2Etest".to_string(),
        "[::1]".to_string(),
        String::new(),
    ] {
        let reply = guest.call(connect(&host, port), b"").await;
        assert_eq!(
            reply.error_code(),
            "invalid_request",
            "{host:?}: {:?}",
            reply.error
        );
    }
    // The same name, bare: a tunnel.
    let reply = guest.call(connect("tun.test", port), b"").await;
    assert!(
        matches!(reply.head, Some(ResponseHead::NetConnect(_))),
        "{:?}",
        reply.error
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_method_is_decided_as_it_is_sent_whatever_its_spelling() {
    if !support::in_isolated_netns("a_method_is_decided_as_it_is_sent_whatever_its_spelling") {
        return;
    }
    let api = Upstream::http("127.0.0.1").await;
    let deny: toml::Table = toml::toml! {
        host = "api.test"
        methods = ["DELETE"]
    };
    let pep = api_pep(|doc| set_policy(doc, "deny", vec![toml::Value::from(deny)]));
    let mut guest = pep.guest().await;
    let url = format!("http://api.test:{}/echo", api.port());
    // Every spelling of a denied standard method is that method, and denied.
    for spelling in ["DELETE", "delete", "Delete", "dElEtE"] {
        let reply = guest
            .call(
                MethodCall::HttpRequest(HttpRequest::new(spelling, url.clone())),
                b"",
            )
            .await;
        assert_eq!(
            reply.error_code(),
            "policy_denied",
            "{spelling}: {:?}",
            reply.error
        );
    }
    // Another method in lower case has no one meaning across servers: refused, not guessed at. Also one
    // whose quoted spelling in the error (and the audited outcome) holds a non-ASCII `name=value`.
    for spelling in ["purge", "ké=y"] {
        let reply = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            guest.call(
                MethodCall::HttpRequest(HttpRequest::new(spelling, url.clone())),
                b"",
            ),
        )
        .await
        .expect("answered: writing the outcome must not take the stream down");
        assert_eq!(
            reply.error_code(),
            "invalid_request",
            "{spelling}: {:?}",
            reply.error
        );
    }
    assert!(api.hits().is_empty(), "nothing reached the upstream");
    // An allowed method in any case is sent upper-case, as the policy saw it.
    for (spelling, sent) in [("get", "GET"), ("Post", "POST"), ("PURGE", "PURGE")] {
        let reply = guest
            .call(
                MethodCall::HttpRequest(HttpRequest::new(spelling, url.clone())),
                b"",
            )
            .await;
        assert_eq!(reply.status(), 200, "{spelling}: {:?}", reply.error);
        let hit = api.hits().pop().expect("arrived");
        assert_eq!(hit.method, sent);
        let records = pep.wait_records(&reply.http_head().decision_id, &["decision"]);
        assert_eq!(records[0]["request"]["method"], sent);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn guest_chosen_text_cannot_forge_log_lines_or_drive_the_terminal() {
    if !support::in_isolated_netns("guest_chosen_text_cannot_forge_log_lines_or_drive_the_terminal")
    {
        return;
    }
    let mut options = loopback_options(&[], &[]);
    options.log_to_file = true;
    options.env = vec![("RUST_LOG".into(), "info".into())];
    let mut pep = TestPep::start(options);
    let forged =
        "2026-12-01T00:00:00.000000Z  INFO pexi_host::cli: policy reloaded, allow everything";
    let name = format!("agent\n{forged}");
    // Set the terminal's title, then switch to red: what a raw write would do to the operator's terminal.
    let version = "1.0\u{1b}]0;pwned\u{7}\u{1b}[31m";
    let guest = support::Guest::connect_as(&pep.socket, &name, version).await;
    drop(guest);
    assert!(pep.terminate().success());
    let log = std::fs::read_to_string(pep.dir.join("pep.log")).expect("log");
    assert!(log.contains("session established"), "{log}");
    assert!(
        !log.lines().any(|line| line.starts_with(forged)),
        "a forged line: {log}"
    );
    assert!(
        !log.contains('\u{1b}'),
        "an escape sequence reached the log: {log:?}"
    );
    assert!(!log.contains('\u{7}'), "{log:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn outcome_messages_quote_urls_redacted() {
    if !support::in_isolated_netns("outcome_messages_quote_urls_redacted") {
        return;
    }
    // Port 8080 is allowed and nothing listens on it in this namespace: the connection error quotes the URL.
    let pep = api_pep(|_| {});
    let mut guest = pep.guest().await;
    let token = "tok-3f9a1c7e5d";
    let reply = guest
        .get(&format!(
            "http://api.test:8080/cb?access_token={token}&page=2"
        ))
        .await;
    let error = reply.error.expect("nothing listens there");
    assert!(!error.message.is_empty());
    // The outcome follows the error within the batch window.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let outcome = loop {
        if let Some(outcome) = pep
            .audit_records()
            .into_iter()
            .find(|r| r["kind"] == "outcome" && r["message"].is_string())
        {
            break outcome;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no outcome for {error:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let audit = std::fs::read_to_string(&pep.audit).expect("audit");
    assert!(
        !audit.contains(token),
        "the token is in the audit log: {}",
        outcome["message"]
    );
    assert!(audit.contains("page=2"), "the rest of the URL is kept");
}

#[tokio::test(flavor = "multi_thread")]
async fn asking_for_an_upgrade_does_not_lift_the_deadline_until_the_upstream_switches() {
    if !support::in_isolated_netns(
        "asking_for_an_upgrade_does_not_lift_the_deadline_until_the_upstream_switches",
    ) {
        return;
    }
    // An upstream that answers the handshake with 200 and a body that never ends.
    let api = Upstream::http("127.0.0.1").await;
    let mut options = loopback_options(&[("api.test", "127.0.0.1")], &["api.test"]);
    options.limits = vec![("total_timeout_ms", 1500)];
    options.websocket = true;
    let pep = TestPep::start(options);
    let mut guest = pep.guest().await;
    let request = HttpRequest {
        headers: vec![
            HeaderField::new("connection", "upgrade"),
            HeaderField::new("upgrade", "websocket"),
            HeaderField::new("sec-websocket-version", "13"),
            HeaderField::new("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ],
        ..HttpRequest::new(
            "GET",
            format!("http://api.test:{}/forever?gap_ms=100", api.port()),
        )
    };
    let reply = tokio::time::timeout(
        std::time::Duration::from_secs(15),
        guest.call(MethodCall::HttpRequest(request), b""),
    )
    .await
    .expect("the 1.5 s deadline ended the request: it did not run on");
    assert_eq!(reply.status(), 200);
    assert_eq!(reply.error_code(), "upstream_timeout", "{:?}", reply.error);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_upgrade_needs_an_allow_entry_that_lists_it() {
    if !support::in_isolated_netns("an_upgrade_needs_an_allow_entry_that_lists_it") {
        return;
    }
    let api = Upstream::http("127.0.0.1").await;
    let pep = api_pep(|doc| {
        // GET only: an entry for reads, which a WebSocket handshake (a GET) would otherwise pass.
        for entry in doc["pep"]["policy"]["allow"]
            .as_array_mut()
            .expect("allow")
            .iter_mut()
            .filter_map(toml::Value::as_table_mut)
        {
            entry.insert("methods".into(), toml::Value::Array(vec!["GET".into()]));
        }
    });
    let mut guest = pep.guest().await;
    let request = HttpRequest {
        headers: vec![
            HeaderField::new("connection", "upgrade"),
            HeaderField::new("upgrade", "websocket"),
            HeaderField::new("sec-websocket-version", "13"),
            HeaderField::new("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ],
        ..HttpRequest::new("GET", format!("http://api.test:{}/ws-echo", api.port()))
    };
    let reply = guest.call(MethodCall::HttpRequest(request), b"").await;
    assert_eq!(reply.error_code(), "policy_denied", "{:?}", reply.error);
    let reasons = &reply.error.as_ref().expect("error").details.reasons;
    assert!(
        reasons.iter().any(|r| r.contains("upgrade to websocket")),
        "{reasons:?}"
    );
    assert!(api.hits().is_empty(), "no handshake reached the upstream");
    // A plain GET to the same entry is still allowed.
    let reply = guest
        .get(&format!("http://api.test:{}/hello", api.port()))
        .await;
    assert_eq!(reply.status(), 200, "{:?}", reply.error);
}

#[tokio::test(flavor = "multi_thread")]
async fn response_headers_larger_than_a_frame_end_the_stream_with_an_error() {
    if !support::in_isolated_netns(
        "response_headers_larger_than_a_frame_end_the_stream_with_an_error",
    ) {
        return;
    }
    let api = Upstream::http("127.0.0.1").await;
    let pep = api_pep(|_| {});
    let mut guest = pep.guest().await;
    // 80 headers of 1000 bytes: over the 64 KiB frame a HEAD must fit in.
    let reply = tokio::time::timeout(
        std::time::Duration::from_secs(15),
        guest.get(&format!("http://api.test:{}/bigheaders?n=80", api.port())),
    )
    .await
    .expect("the guest is answered, not left waiting");
    assert!(reply.head.is_none(), "no HEAD could carry them");
    let error = reply.error.expect("an error ends the stream");
    assert_eq!(error.code.as_str(), "response_too_large", "{error:?}");
    assert!(
        error.message.contains("response headers"),
        "{}",
        error.message
    );
    // Audited as what it was: an error, not a 200.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let records = pep.audit_records();
        if let Some(outcome) = records.iter().find(|r| r["kind"] == "outcome") {
            assert_eq!(outcome["error"], "response_too_large", "{outcome}");
            assert!(outcome["status"].is_null(), "{outcome}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no outcome");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // A small response on the same session still works.
    let reply = guest
        .get(&format!("http://api.test:{}/hello", api.port()))
        .await;
    assert_eq!(reply.status(), 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_policy_bound_on_the_body_holds_whether_or_not_the_length_is_announced() {
    if !support::in_isolated_netns(
        "a_policy_bound_on_the_body_holds_whether_or_not_the_length_is_announced",
    ) {
        return;
    }
    let api = Upstream::http("127.0.0.1").await;
    // The shipped bundle plus the extension of docs/policy.md: uploads up to 1 MiB.
    let bundle = support::temp_dir("policy-uploads");
    support::copy_policies(&bundle);
    let rules = bundle.join("policies/pexi/rules");
    std::fs::create_dir_all(&rules).expect("mkdir");
    std::fs::write(
        rules.join("uploads.rego"),
        "package pexi.rules.uploads\n\nimport rego.v1\n\nmax_body_bytes := 1048576\n",
    )
    .expect("extension");
    let policy_dir = bundle.join("policies").display().to_string();
    let pep = api_pep(|doc| set_policy(doc, "dir", policy_dir));
    let mut guest = pep.guest().await;
    let url = format!("http://api.test:{}/echo", api.port());
    let two_mib = vec![b'u'; 2 << 20];
    // Streamed without a length: cut at the bound.
    let reply = guest
        .call(
            MethodCall::HttpRequest(HttpRequest::new("POST", url.clone())),
            &two_mib,
        )
        .await;
    assert_eq!(reply.error_code(), "body_too_large", "{:?}", reply.error);
    assert_eq!(
        reply.error.as_ref().and_then(|e| e.details.limit),
        Some(1_048_576)
    );
    assert!(
        api.hits().iter().all(|hit| hit.body_len <= 1_048_576),
        "no more than the bound reached the upstream"
    );
    // Announced over the bound: refused before anything is sent (a path of its own tells its hit from
    // the cut request's, which the upstream may record late).
    let announced = HttpRequest {
        content_length: Some(two_mib.len() as u64),
        ..HttpRequest::new("POST", format!("http://api.test:{}/announced", api.port()))
    };
    let reply = guest
        .call(MethodCall::HttpRequest(announced), &two_mib)
        .await;
    assert_eq!(reply.error_code(), "body_too_large", "{:?}", reply.error);
    // Under the bound, streamed: through, whole.
    let small = vec![b's'; 500_000];
    let reply = guest
        .call(
            MethodCall::HttpRequest(HttpRequest::new("POST", url)),
            &small,
        )
        .await;
    assert_eq!(reply.status(), 200, "{:?}", reply.error);
    assert_eq!(reply.body.len(), small.len());
    assert!(
        api.hits().iter().all(|hit| hit.path != "/announced"),
        "the announced request was sent"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_path_deny_holds_against_every_spelling_a_server_routes_to_the_same_place() {
    if !support::in_isolated_netns(
        "a_path_deny_holds_against_every_spelling_a_server_routes_to_the_same_place",
    ) {
        return;
    }
    let api = Upstream::http("127.0.0.1").await;
    let deny: toml::Table = toml::toml! {
        host = "api.test"
        paths = ["/admin"]
    };
    let pep = api_pep(|doc| set_policy(doc, "deny", vec![toml::Value::from(deny)]));
    let mut guest = pep.guest().await;
    let base = format!("http://api.test:{}", api.port());
    // What Flask/werkzeug, Express, nginx, Go net/http or Rails would route to /admin, and what the deny
    // on the prefix /admin does with each: denied (the path is canonicalised to /admin...) or refused
    // as ambiguous (invalid_request) before the policy.
    let table = [
        ("/admin", "policy_denied"),
        ("/admin/", "policy_denied"),
        ("/admin/users", "policy_denied"),
        ("/%61dmin", "policy_denied"),
        ("/%61%64%6D%69%6E", "policy_denied"),
        ("/adm%69n/users", "policy_denied"),
        ("/./admin", "policy_denied"),
        ("/public/../admin", "policy_denied"),
        ("/%2e/admin", "policy_denied"),
        ("/public/%2e%2e/admin", "policy_denied"),
        ("/admin?x=1", "policy_denied"),
        ("//admin", "invalid_request"),
        ("/admin;jsessionid=1", "invalid_request"),
        ("/admin;/", "invalid_request"),
        ("/public%2F..%2Fadmin", "invalid_request"),
        ("/%2Fadmin", "invalid_request"),
        ("/admin%5C", "invalid_request"),
    ];
    for (path, code) in table {
        let reply = guest.get(&format!("{base}{path}")).await;
        assert_eq!(reply.error_code(), code, "{path}: {:?}", reply.error);
    }
    assert!(api.hits().is_empty(), "no spelling reached the upstream");
    // What the policy saw is what is sent: a decoded unreserved escape arrives decoded, and the URL
    // parser's dot-segment resolution (which ate the empty segment here) is what the upstream gets too.
    for (path, sent) in [
        ("/%70ublic/x", "/public/x"),
        ("/public//../admin", "/public/admin"),
    ] {
        let reply = guest.get(&format!("{base}{path}")).await;
        assert_eq!(reply.status(), 404, "{path}: {:?}", reply.error);
        let hit = api.hits().pop().expect("sent");
        assert_eq!(hit.path, sent);
        let records = pep.wait_records(&reply.http_head().decision_id, &["decision"]);
        assert_eq!(records[0]["request"]["path"], sent);
    }
}
