//! End to end: a real `pexi serve`, real upstream HTTP(S) servers on loopback, a real protocol client over
//! the Unix socket. Names reach loopback through the PEP's DNS overrides, and 127.0.0.0/8 is allowed
//! explicitly in these tests' configs (it is refused by default).

mod support;

use std::time::{Duration, Instant};

use pexi_protocol::payload::{HeaderField, HttpRequest, MethodCall, RedirectMode, ResponseHead};
use support::{loopback_options, TestCa, TestPep, Upstream};

fn http_request(method: &str, url: &str) -> HttpRequest {
    HttpRequest::new(method, url)
}

#[tokio::test(flavor = "multi_thread")]
async fn allowed_requests_with_bodies_over_http_and_https() {
    let ca = TestCa::new(&["secure.test"]);
    let plain = Upstream::http("127.0.0.1").await;
    let tls = Upstream::https("127.0.0.1", &ca).await;
    let mut options = loopback_options(
        &[("api.test", "127.0.0.1"), ("secure.test", "127.0.0.1")],
        &["api.test", "secure.test"],
    );
    options.extra_ca_pem = Some(ca.ca_pem.clone());
    let pep = TestPep::start(options);
    let mut guest = pep.guest().await;

    let reply = guest
        .get(&format!("http://api.test:{}/hello", plain.port()))
        .await;
    assert_eq!(
        (reply.status(), reply.body.as_slice()),
        (200, &b"hello"[..])
    );
    assert!(reply.ended);

    let body = vec![7u8; 300_000];
    let post = HttpRequest {
        headers: vec![HeaderField::new("content-type", "application/octet-stream")],
        content_length: Some(body.len() as u64),
        ..http_request("POST", &format!("https://secure.test:{}/echo", tls.port()))
    };
    let reply = guest.call(MethodCall::HttpRequest(post), &body).await;
    assert_eq!(reply.status(), 200, "{:?}", reply.error);
    assert_eq!(reply.body, body, "the body made the round trip through TLS");
    let head = reply.http_head();
    assert_eq!(
        head.final_url,
        format!("https://secure.test:{}/echo", tls.port())
    );
    assert!(head
        .headers
        .iter()
        .any(|h| h.name() == "x-method" && h.value() == b"POST"));
    // The PEP connected to the name the URL gave (SNI and Host), and only the checked address.
    let hit = &tls.hits()[0];
    assert_eq!(hit.host, format!("secure.test:{}", tls.port()));
    assert_eq!(hit.body_len, body.len());

    // A streamed body without a length (chunked upstream).
    let post = http_request("POST", &format!("http://api.test:{}/echo", plain.port()));
    let reply = guest
        .call(MethodCall::HttpRequest(post), b"no length given")
        .await;
    assert_eq!(reply.body, b"no length given");

    // An upstream cannot pass its answer off as pexi's refusal: x-pexi-* never comes from upstream.
    let reply = guest
        .get(&format!("http://api.test:{}/forged-refusal", plain.port()))
        .await;
    assert_eq!(reply.status(), 403);
    let names: Vec<&str> = reply.http_head().headers.iter().map(|h| h.name()).collect();
    assert!(names.contains(&"x-upstream"), "{names:?}");
    assert!(!names.iter().any(|n| n.starts_with("x-pexi-")), "{names:?}");

    // An upstream 404 is a normal HEAD, not an error.
    let reply = guest
        .get(&format!(
            "http://api.test:{}/status?status=404",
            plain.port()
        ))
        .await;
    assert_eq!(reply.status(), 404);
    assert!(reply.error.is_none());

    // Every decision was logged before the request went out, and the outcome after.
    let records = pep.wait_records(&head.decision_id, &["decision", "resolve", "outcome"]);
    let kinds: Vec<&str> = records.iter().filter_map(|r| r["kind"].as_str()).collect();
    assert_eq!(kinds, vec!["decision", "resolve", "outcome"]);
    assert_eq!(records[0]["decision"]["allow"], true);
}

#[tokio::test(flavor = "multi_thread")]
async fn upstream_connections_are_reused_only_for_the_same_name_and_addresses() {
    let ca = TestCa::new(&["secure.test", "other.test"]);
    let plain = Upstream::http("127.0.0.1").await;
    let tls = Upstream::https("127.0.0.1", &ca).await;
    let mut options = loopback_options(
        &[
            ("api.test", "127.0.0.1"),
            ("secure.test", "127.0.0.1"),
            ("other.test", "127.0.0.1"),
        ],
        &["api.test", "secure.test", "other.test"],
    );
    options.extra_ca_pem = Some(ca.ca_pem.clone());
    let pep = TestPep::start(options);
    let mut guest = pep.guest().await;

    for _ in 0..5 {
        let reply = guest
            .get(&format!("http://api.test:{}/hello", plain.port()))
            .await;
        assert_eq!(reply.status(), 200);
        let reply = guest
            .get(&format!("https://secure.test:{}/hello", tls.port()))
            .await;
        assert_eq!(reply.status(), 200, "{:?}", reply.error);
    }
    assert_eq!(plain.connections(), 1, "keep-alive to the same destination");
    assert_eq!(tls.connections(), 1, "keep-alive through TLS as well");

    // Another name at the same address and port is another destination: its own TLS connection (with
    // its own SNI and certificate check), never the pooled one of secure.test.
    let reply = guest
        .get(&format!("https://other.test:{}/hello", tls.port()))
        .await;
    assert_eq!(reply.status(), 200, "{:?}", reply.error);
    assert_eq!(tls.connections(), 2);
    let hosts: Vec<String> = tls.hits().iter().map(|h| h.host.clone()).collect();
    assert_eq!(
        hosts.last().map(String::as_str),
        Some(format!("other.test:{}", tls.port()).as_str())
    );

    // Every request was still decided on its own.
    let decisions = pep
        .audit_records()
        .iter()
        .filter(|r| r["kind"] == "decision")
        .count();
    assert_eq!(decisions, 11);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unknown_certificate_authority_is_refused() {
    let ca = TestCa::new(&["secure.test"]);
    let tls = Upstream::https("127.0.0.1", &ca).await;
    // The PEP does not trust the test CA here.
    let pep = TestPep::start(loopback_options(
        &[("secure.test", "127.0.0.1")],
        &["secure.test"],
    ));
    let mut guest = pep.guest().await;
    let reply = guest
        .get(&format!("https://secure.test:{}/hello", tls.port()))
        .await;
    assert_eq!(reply.error_code(), "upstream_tls", "{:?}", reply.error);
    assert!(tls.hits().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_denied_request_reaches_neither_dns_nor_upstream() {
    let upstream = Upstream::http("127.0.0.1").await;
    let pep = TestPep::start(loopback_options(
        &[("allowed.test", "127.0.0.1"), ("denied.test", "127.0.0.1")],
        &["allowed.test"],
    ));
    let mut guest = pep.guest().await;
    for url in [
        format!("http://denied.test:{}/hello", upstream.port()),
        format!("http://never-resolved.invalid:{}/hello", upstream.port()),
        format!("http://127.0.0.1:{}/hello", upstream.port()),
    ] {
        let reply = guest.get(&url).await;
        let error = reply.error.expect("denied");
        assert_eq!(error.code.as_str(), "policy_denied", "{url}");
        assert!(
            error.details.reasons[0].contains("not in the allowlist"),
            "{:?}",
            error.details
        );
        let decision_id = error.details.decision_id.clone().expect("decision id");
        let records = pep.wait_records(&decision_id, &["decision", "outcome"]);
        assert_eq!(records[0]["kind"], "decision");
        assert_eq!(records[0]["decision"]["allow"], false);
        assert!(
            records.iter().all(|r| r["kind"] != "resolve"),
            "a denied name must not be looked up: {records:?}"
        );
    }
    assert!(
        upstream.hits().is_empty(),
        "upstream saw {:?}",
        upstream.hits()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn policy_check_answers_without_touching_the_network() {
    let upstream = Upstream::http("127.0.0.1").await;
    let pep = TestPep::start(loopback_options(
        &[("api.test", "127.0.0.1")],
        &["api.test"],
    ));
    let mut guest = pep.guest().await;
    for (url, allow) in [
        (format!("http://api.test:{}/hello", upstream.port()), true),
        (format!("http://other.test:{}/", upstream.port()), false),
    ] {
        let reply = guest
            .call(MethodCall::PolicyCheck(http_request("GET", &url)), b"")
            .await;
        match reply.head {
            Some(ResponseHead::PolicyDecision(decision)) => {
                assert_eq!(decision.allow, allow, "{url}");
                assert!(!decision.reasons.is_empty());
                let records = pep.records_for(&decision.decision_id);
                assert_eq!(records.len(), 1, "a decision and nothing else: {records:?}");
            }
            other => panic!("{other:?} {:?}", reply.error),
        }
    }
    let reply = guest
        .call(
            MethodCall::PolicyCheck(http_request("GET", "gopher://x/")),
            b"",
        )
        .await;
    assert_eq!(reply.error_code(), "invalid_request");
    assert!(upstream.hits().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn request_and_response_caps() {
    let upstream = Upstream::http("127.0.0.1").await;
    let mut options = loopback_options(&[("api.test", "127.0.0.1")], &["api.test"]);
    options.limits = vec![
        ("max_request_bytes", 10_000),
        ("max_response_bytes", 50_000),
    ];
    let pep = TestPep::start(options);
    let mut guest = pep.guest().await;
    let url = format!("http://api.test:{}/echo", upstream.port());

    // A known length over the cap is refused before upstream is contacted.
    let post = HttpRequest {
        content_length: Some(20_000),
        ..http_request("POST", &url)
    };
    let reply = guest
        .call(MethodCall::HttpRequest(post), &vec![1u8; 20_000])
        .await;
    let error = reply.error.expect("refused");
    assert_eq!(error.code.as_str(), "body_too_large");
    assert_eq!(error.details.limit, Some(10_000));
    assert!(upstream.hits().is_empty());

    // An unannounced length is cut off mid-stream.
    let reply = guest
        .call(
            MethodCall::HttpRequest(http_request("POST", &url)),
            &vec![1u8; 30_000],
        )
        .await;
    assert_eq!(reply.error_code(), "body_too_large", "{reply:?}");
    assert!(upstream.hits().iter().all(|h| h.body_len <= 10_000));

    // The response: head and data up to the cap, then response_too_large.
    let reply = guest
        .get(&format!("http://api.test:{}/big?n=120000", upstream.port()))
        .await;
    assert_eq!(reply.status(), 200);
    assert_eq!(reply.body.len(), 50_000);
    assert_eq!(reply.error_code(), "response_too_large");
    assert_eq!(
        reply.error.as_ref().and_then(|e| e.details.limit),
        Some(50_000)
    );

    // Exactly at the cap is fine.
    let reply = guest
        .get(&format!("http://api.test:{}/big?n=50000", upstream.port()))
        .await;
    assert!(
        reply.ended && reply.body.len() == 50_000,
        "{:?}",
        reply.error
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn redirects_are_checked_hop_by_hop() {
    let upstream = Upstream::http("127.0.0.1").await;
    let evil = Upstream::http("127.0.0.2").await;
    let mut options = loopback_options(
        &[
            ("a.test", "127.0.0.1"),
            ("b.test", "127.0.0.1"),
            ("evil.test", "127.0.0.2"),
        ],
        &["a.test", "b.test"],
    );
    options.limits = vec![("max_redirects", 2)];
    let pep = TestPep::start(options);
    let mut guest = pep.guest().await;
    let port = upstream.port();
    let to = |url: &str| url::form_urlencoded::byte_serialize(url.as_bytes()).collect::<String>();

    // allowed → allowed: followed, cross-origin credentials dropped, 303 turns POST into GET.
    let target = format!("http://b.test:{port}/echo");
    let post = HttpRequest {
        headers: vec![
            HeaderField::new("authorization", "Bearer secret"),
            HeaderField::new("x-trace", "kept"),
        ],
        content_length: Some(4),
        ..http_request(
            "POST",
            &format!(
                "http://a.test:{port}/redirect?status=303&to={}",
                to(&target)
            ),
        )
    };
    let reply = guest.call(MethodCall::HttpRequest(post), b"body").await;
    assert_eq!(reply.status(), 200, "{:?}", reply.error);
    let head = reply.http_head();
    assert_eq!(
        (head.redirect_count, head.final_url.as_str()),
        (1, target.as_str())
    );
    let last = upstream.hits().pop().expect("hit");
    assert_eq!((last.method.as_str(), last.body_len), ("GET", 0));
    assert!(
        last.headers.iter().all(|(n, _)| n != "authorization"),
        "{:?}",
        last.headers
    );
    assert!(last
        .headers
        .iter()
        .any(|(n, v)| n == "x-trace" && v == "kept"));

    // 307 keeps the method and the body.
    let post = HttpRequest {
        content_length: Some(4),
        ..http_request(
            "POST",
            &format!("http://a.test:{port}/redirect?status=307&to=/echo"),
        )
    };
    let reply = guest.call(MethodCall::HttpRequest(post), b"body").await;
    assert_eq!(reply.body, b"body", "{:?}", reply.error);

    // allowed → denied: stops at the denied hop; the denied host sees nothing.
    let hits_before = upstream.hits().len();
    let reply = guest
        .get(&format!(
            "http://a.test:{port}/redirect?to={}",
            to(&format!("http://evil.test:{}/hello", evil.port()))
        ))
        .await;
    let error = reply.error.expect("denied");
    assert_eq!(error.code.as_str(), "policy_denied");
    assert!(error.details.reasons[0].contains("evil.test"));
    assert!(evil.hits().is_empty());
    assert_eq!(upstream.hits().len(), hits_before + 1);
    // Both hops' decisions are in the log, the second one naming the first hop's URL.
    let second = pep.records_for(error.details.decision_id.as_deref().expect("id"));
    assert_eq!(second[0]["hop"], 1);
    assert!(second[0]["previous_url"]
        .as_str()
        .expect("previous")
        .contains("a.test"));

    // Manual mode hands the 3xx to the guest; error mode fails with its own code.
    let manual = HttpRequest {
        redirect: RedirectMode::Manual,
        ..http_request("GET", &format!("http://a.test:{port}/redirect?to=/hello"))
    };
    let reply = guest.call(MethodCall::HttpRequest(manual), b"").await;
    assert_eq!(reply.status(), 302);
    assert!(reply
        .http_head()
        .headers
        .iter()
        .any(|h| h.name() == "location" && h.value() == b"/hello"));
    let error_mode = HttpRequest {
        redirect: RedirectMode::Error,
        ..http_request("GET", &format!("http://a.test:{port}/redirect?to=/hello"))
    };
    let reply = guest.call(MethodCall::HttpRequest(error_mode), b"").await;
    assert_eq!(reply.error_code(), "redirect_not_allowed");

    // A chain longer than max_redirects.
    let hop3 = format!("http://a.test:{port}/hello");
    let hop2 = format!("http://a.test:{port}/redirect?to={}", to(&hop3));
    let hop1 = format!("http://a.test:{port}/redirect?to={}", to(&hop2));
    let reply = guest
        .get(&format!("http://a.test:{port}/redirect?to={}", to(&hop1)))
        .await;
    assert_eq!(reply.error_code(), "too_many_redirects");

    // A redirect to a refused address class is checked like any hop.
    let reply = guest
        .get(&format!(
            "http://a.test:{port}/redirect?to={}",
            to("http://169.254.169.254/latest/meta-data/")
        ))
        .await;
    assert_eq!(reply.error_code(), "policy_denied");
}

#[tokio::test(flavor = "multi_thread")]
async fn server_sent_events_arrive_as_they_are_sent() {
    let upstream = Upstream::http("127.0.0.1").await;
    let pep = TestPep::start(loopback_options(
        &[("api.test", "127.0.0.1")],
        &["api.test"],
    ));
    let mut guest = pep.guest().await;
    let started = Instant::now();
    let reply = guest
        .get(&format!(
            "http://api.test:{}/sse?n=3&gap_ms=1000",
            upstream.port()
        ))
        .await;
    assert!(reply.ended, "{:?}", reply.error);
    assert_eq!(reply.body, b"data: tick\n\n".repeat(3));
    assert_eq!(
        reply.chunks.len(),
        3,
        "one DATA per event: {:?}",
        reply.chunks
    );
    // Events arrived as they were written: the server paces them 1 s apart, so their arrivals span about
    // 2 s; a buffer anywhere on the way would deliver them together at the end.
    let first = reply.chunks[0].0.duration_since(started);
    let spread = reply.chunks[2].0.duration_since(reply.chunks[0].0);
    assert!(
        first < Duration::from_millis(1500),
        "first event after {first:?}"
    );
    assert!(
        spread >= Duration::from_millis(1200),
        "events arrived within {spread:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn cancelling_mid_stream_aborts_the_upstream_request() {
    let upstream = Upstream::http("127.0.0.1").await;
    let pep = TestPep::start(loopback_options(
        &[("api.test", "127.0.0.1")],
        &["api.test"],
    ));
    let mut guest = pep.guest().await;
    let id = guest
        .session()
        .open(MethodCall::HttpRequest(http_request(
            "GET",
            &format!("http://api.test:{}/forever?gap_ms=20", upstream.port()),
        )))
        .expect("open");
    guest.session().send_end(id, vec![]).expect("end");
    let mut received = 0;
    while received < 5 * 1024 {
        if let pexi_protocol::session::Event::Data { stream_id, data } =
            guest.conn.next_event().await.expect("io").expect("open")
        {
            received += data.len();
            guest.session().release(stream_id, data.len());
        }
    }
    assert!(!upstream.aborted.load(std::sync::atomic::Ordering::SeqCst));
    guest.session().cancel(id).expect("cancel");
    guest.conn.flush().await.expect("flush");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !upstream.aborted.load(std::sync::atomic::Ordering::SeqCst) {
        assert!(
            Instant::now() < deadline,
            "upstream response was never abandoned"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The cancelled request had been decided: its outcome (written just after the upstream saw the
    // cancellation, so waited for) names that decision.
    let decision = pep
        .audit_records()
        .into_iter()
        .find(|r| r["kind"] == "decision" && r["stream_id"] == id)
        .expect("decision logged");
    let decision_id = decision["decision_id"].as_str().expect("decision id");
    let records = pep.wait_records(decision_id, &["outcome"]);
    let outcome = records
        .iter()
        .find(|r| r["kind"] == "outcome" && r["stream_id"] == id)
        .expect("outcome logged");
    assert_eq!(outcome["error"], "cancelled");
}

#[tokio::test(flavor = "multi_thread")]
async fn upstream_timeouts() {
    let upstream = Upstream::http("127.0.0.1").await;
    let mut options = loopback_options(&[("api.test", "127.0.0.1")], &["api.test"]);
    options.limits = vec![("idle_timeout_ms", 300)];
    let pep = TestPep::start(options);
    let mut guest = pep.guest().await;
    // No response at all.
    let reply = guest
        .get(&format!("http://api.test:{}/stall", upstream.port()))
        .await;
    assert_eq!(reply.error_code(), "upstream_timeout", "{:?}", reply.error);
    // The idle timeout ended it, not the whole request's deadline (which says "took longer than").
    let message = reply
        .error
        .as_ref()
        .map(|e| e.message.as_str())
        .unwrap_or("");
    assert!(!message.contains("took longer than"), "{message}");
    // A response that goes quiet mid-body.
    let reply = guest
        .get(&format!(
            "http://api.test:{}/sse?n=3&gap_ms=1000",
            upstream.port()
        ))
        .await;
    assert_eq!(reply.status(), 200);
    assert_eq!(
        reply.body, b"data: tick\n\n",
        "the data before the silence arrives"
    );
    assert_eq!(reply.error_code(), "upstream_timeout");
    // The guest's own deadline.
    let timed = HttpRequest {
        timeout_ms: Some(200),
        ..http_request(
            "GET",
            &format!("http://api.test:{}/sse?n=3&gap_ms=250", upstream.port()),
        )
    };
    let reply = guest.call(MethodCall::HttpRequest(timed), b"").await;
    assert_eq!(reply.error_code(), "upstream_timeout");
}

#[tokio::test(flavor = "multi_thread")]
async fn environment_proxies_are_ignored() {
    let upstream = Upstream::http("127.0.0.1").await;
    let mut options = loopback_options(&[("api.test", "127.0.0.1")], &["api.test"]);
    // Nothing listens there: a PEP that honoured these would fail to connect.
    let dead = "http://127.0.0.9:9".to_string();
    options.env = [
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "http_proxy",
        "https_proxy",
        "all_proxy",
    ]
    .iter()
    .map(|k| (k.to_string(), dead.clone()))
    .collect();
    let pep = TestPep::start(options);
    let mut guest = pep.guest().await;
    let reply = guest
        .get(&format!("http://api.test:{}/hello", upstream.port()))
        .await;
    assert_eq!(reply.body, b"hello", "{:?}", reply.error);
    assert_eq!(
        upstream.hits().len(),
        1,
        "the request went straight to the checked address"
    );
}
