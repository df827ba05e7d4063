//! Asking a person (docs/approvals.md), end to end against a real `pexi serve`, loopback upstreams and the
//! control socket: a held request goes on only after an answer, "always" answers become entries the policy
//! then decides by, no answer is a deny, identical requests share one question, and no guest request can
//! reach the PEP's own dashboard. Each test runs alone in a loopback-only network namespace.

mod support;

use std::time::{Duration, Instant};

use pexi_host::control::client::Client;
use pexi_protocol::payload::{HttpRequest, MethodCall};
use serde_json::{json, Value};
use support::{loopback_options, TestPep, Upstream};

/// A PEP that lists nothing, asks about everything unlisted, and sends new.test to 127.0.0.1.
fn asking_pep(timeout_ms: i64) -> TestPep {
    TestPep::start_with(loopback_options(&[("new.test", "127.0.0.1")], &[]), |doc| {
        let mut approvals = toml::Table::new();
        approvals.insert("enabled".into(), true.into());
        approvals.insert("approval_timeout_ms".into(), timeout_ms.into());
        doc["pep"]
            .as_table_mut()
            .expect("[pep]")
            .insert("approvals".into(), approvals.into());
    })
}

fn control(pep: &TestPep) -> Client {
    Client::new(&pep.dir.join("control.sock"), "control")
}

/// Waits until `count` questions are waiting, and returns them.
async fn questions(client: &Client, count: usize) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, body) = client.get("/api/questions").await.expect("questions");
        assert_eq!(status, 200, "{body}");
        let waiting = body["questions"].as_array().cloned().unwrap_or_default();
        if waiting.len() == count && waiting.iter().all(|q| q["waiting"].as_u64() >= Some(1)) {
            return waiting;
        }
        assert!(
            Instant::now() < deadline,
            "waiting for {count} question(s): {body}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

fn get(url: String) -> MethodCall {
    MethodCall::HttpRequest(HttpRequest::new("GET", url))
}

/// A GET from a guest session of its own, left running: it is held until its question ends.
async fn held_get(pep: &TestPep, url: &str) -> tokio::task::JoinHandle<support::Reply> {
    let mut guest = pep.guest().await;
    let url = url.to_string();
    tokio::spawn(async move { guest.call(get(url), b"").await })
}

#[tokio::test(flavor = "multi_thread")]
async fn an_always_answer_lets_the_held_request_go_and_the_next_one_through_without_asking() {
    if !support::in_isolated_netns(
        "an_always_answer_lets_the_held_request_go_and_the_next_one_through_without_asking",
    ) {
        return;
    }
    let api = Upstream::http("127.0.0.1").await;
    let pep = asking_pep(30_000);
    let client = control(&pep);
    let url = format!("http://new.test:{}/headers", api.port());
    let held = held_get(&pep, &url).await;
    let asked = questions(&client, 1).await;
    let question = &asked[0];
    assert_eq!(question["method"], "GET");
    assert_eq!(question["url"], url.as_str());
    assert_eq!(question["host"], "new.test");
    assert_eq!(
        question["reasons"],
        json!(["host new.test is not in the allowlist"])
    );
    // Held: nothing was sent while the question waits.
    assert!(api.hits().is_empty(), "sent before an answer");

    let id = question["id"].as_str().expect("id");
    let (status, answered) = client
        .post(
            &format!("/api/questions/{id}/answer"),
            &json!({"answer": "allow_always"}),
        )
        .await
        .expect("answer");
    assert_eq!(status, 200, "{answered}");
    assert_eq!(answered["allow"], true);
    let reply = held.await.expect("the held request");
    assert_eq!(reply.status(), 200, "{:?}", reply.error);
    assert_eq!(api.hits().len(), 1);

    // The answer is an entry now: the next request is the policy's to allow, with no question.
    let mut guest = pep.guest().await;
    let reply = guest.call(get(url.clone()), b"").await;
    assert_eq!(reply.status(), 200, "{:?}", reply.error);
    let (_, waiting) = client.get("/api/questions").await.expect("questions");
    assert_eq!(waiting["questions"], json!([]));
    let approvals: Value = serde_json::from_str(
        &std::fs::read_to_string(pep.dir.join("approvals.json")).expect("approvals file"),
    )
    .expect("json");
    assert_eq!(
        approvals["allow"],
        json!([{"host": "new.test", "ports": [api.port()], "schemes": ["http"]}])
    );
    let (_, entries) = client.get("/api/entries").await.expect("entries");
    assert!(
        entries["entries"]
            .as_array()
            .expect("entries")
            .iter()
            .any(|e| e["entry"]["host"] == "new.test"
                && e["source"]
                    .as_str()
                    .is_some_and(|s| s.ends_with("approvals.json"))),
        "{entries}"
    );

    // Removing the entry from the approvals file revokes it: after the hot reload the host is asked
    // about again.
    std::fs::write(pep.dir.join("approvals.json"), r#"{"allow": []}"#).expect("revoke");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, entries) = client.get("/api/entries").await.expect("entries");
        if !entries.to_string().contains("new.test") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the revocation was not reloaded: {entries}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let asked_again = held_get(&pep, &url).await;
    let again = questions(&client, 1).await;
    let again_id = again[0]["id"].as_str().expect("id").to_string();
    client
        .post(
            &format!("/api/questions/{again_id}/answer"),
            &json!({"answer": "deny_once"}),
        )
        .await
        .expect("answer");
    let reply = asked_again.await.expect("asked again");
    assert_eq!(
        reply.error.as_ref().map(|e| e.code.as_str()),
        Some("policy_denied")
    );
    assert_eq!(api.hits().len(), 2, "the revoked host got nothing more");

    // The audit: the asking decision, the question, the answer (who, through what), the later allow.
    let question_record = pep.wait_record("the question", |r| {
        r["kind"] == "approval_question" && r["question_id"] == id
    });
    assert_eq!(question_record["question_id"], id);
    assert_eq!(question_record["url"], url.as_str());
    let answer = pep.wait_record("the answer", |r| {
        r["kind"] == "approval_answer" && r["question_id"] == id
    });
    assert_eq!(answer["answer"], "allow_always");
    assert_eq!(answer["surface"], "control");
    assert!(
        answer["by"]
            .as_str()
            .is_some_and(|by| by.starts_with("uid ")),
        "{answer}"
    );
    assert_eq!(answer["list"], "allow");
    let asked_id = question_record["decision_id"]
        .as_str()
        .expect("decision id");
    let decisions: Vec<Value> = pep
        .audit_records()
        .into_iter()
        .filter(|r| r["kind"] == "decision")
        .collect();
    assert_eq!(decisions.len(), 3, "{decisions:?}");
    assert_eq!(decisions[0]["decision_id"], asked_id);
    assert_eq!(decisions[0]["decision"]["allow"], false);
    assert_eq!(decisions[0]["decision"]["ask"], json!({"scope": "host"}));
    assert_eq!(decisions[1]["decision"]["allow"], true);
    assert_eq!(
        decisions[1]["decision"]["reasons"],
        json!(["allowed by allowlist entry new.test"])
    );
    assert!(decisions[1]["decision"].get("ask").is_none());
    // The answer was durable before the request it released went on.
    let records = pep.audit_records();
    let seq_of = |kind: &str| {
        records
            .iter()
            .find(|r| r["kind"] == kind)
            .and_then(|r| r["seq"].as_u64())
            .expect("record")
    };
    let released = records
        .iter()
        .find(|r| r["kind"] == "resolve" && r["decision_id"] == asked_id)
        .and_then(|r| r["seq"].as_u64())
        .expect("the held request's resolve record");
    assert!(seq_of("approval_answer") < released);
}

#[tokio::test(flavor = "multi_thread")]
async fn no_answer_is_a_deny_and_identical_requests_share_one_question() {
    if !support::in_isolated_netns("no_answer_is_a_deny_and_identical_requests_share_one_question")
    {
        return;
    }
    let api = Upstream::http("127.0.0.1").await;
    let pep = asking_pep(1_500);
    let client = control(&pep);
    let url = format!("http://new.test:{}/x", api.port());
    let held = vec![held_get(&pep, &url).await, held_get(&pep, &url).await];
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, body) = client.get("/api/questions").await.expect("questions");
        let waiting = body["questions"].as_array().cloned().unwrap_or_default();
        assert!(waiting.len() <= 1, "identical requests asked twice: {body}");
        if waiting.first().and_then(|q| q["waiting"].as_u64()) == Some(2) {
            assert_eq!(waiting[0]["decision_ids"].as_array().map(Vec::len), Some(2));
            break;
        }
        assert!(
            Instant::now() < deadline,
            "two requests on one question: {body}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    for request in held {
        let reply = request.await.expect("held request");
        let error = reply.error.expect("denied");
        assert_eq!(error.code.as_str(), "policy_denied", "{error:?}");
        assert!(
            error.message.contains("no answer")
                || error
                    .details
                    .reasons
                    .iter()
                    .any(|r| r.contains("no answer")),
            "{error:?}"
        );
    }
    assert!(api.hits().is_empty(), "a request went out unanswered");
    let records = pep.audit_records();
    let count = |kind: &str| records.iter().filter(|r| r["kind"] == kind).count();
    assert_eq!(count("approval_question"), 1);
    let answer = pep.wait_record("no answer", |r| r["kind"] == "approval_answer");
    assert_eq!(answer["answer"], "no_answer");
    assert_eq!(answer["decision_ids"].as_array().map(Vec::len), Some(2));
    // A late answer finds nothing to answer.
    let id = answer["question_id"].as_str().expect("id");
    let (status, body) = client
        .post(
            &format!("/api/questions/{id}/answer"),
            &json!({"answer": "allow_once"}),
        )
        .await
        .expect("late answer");
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["error"]["code"], "not_waiting");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_guest_cannot_reach_the_dashboard_even_when_loopback_is_allowed() {
    if !support::in_isolated_netns(
        "a_guest_cannot_reach_the_dashboard_even_when_loopback_is_allowed",
    ) {
        return;
    }
    // The dashboard's port, chosen here so that the allowlist can name it: with it allowed and loopback
    // allowed, only the address guard stands between a guest and the dashboard.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let pep = TestPep::start_with(
        loopback_options(&[("dash.test", "127.0.0.1")], &[]),
        |doc| {
            let pep = doc["pep"].as_table_mut().expect("[pep]");
            pep["control"]
                .as_table_mut()
                .expect("[pep.control]")
                .insert("dashboard".into(), format!("127.0.0.1:{port}").into());
            let allow: Vec<toml::Value> =
                ["dash.test", "127.0.0.1", "127.0.0.2", "::ffff:127.0.0.1"]
                    .iter()
                    .map(|host| {
                        let mut entry = toml::Table::new();
                        entry.insert("host".into(), (*host).into());
                        entry.insert("ports".into(), vec![i64::from(port)].into());
                        entry.into()
                    })
                    .collect();
            pep["policy"]
                .as_table_mut()
                .expect("[pep.policy]")
                .insert("allow".into(), allow.into());
        },
    );
    let client = control(&pep);
    let (status, dashboard) = client.get("/api/dashboard").await.expect("dashboard");
    assert_eq!(status, 200, "{dashboard}");
    let address: std::net::SocketAddr = dashboard["address"]
        .as_str()
        .expect("address")
        .parse()
        .expect("socket address");
    assert_eq!(address.port(), port);
    let mut guest = pep.guest().await;
    for host in ["dash.test", "127.0.0.1", "127.0.0.2", "[::ffff:127.0.0.1]"] {
        let reply = guest
            .call(get(format!("http://{host}:{port}/api/status")), b"")
            .await;
        let status = if reply.error.is_none() {
            reply.status()
        } else {
            0
        };
        let error = reply
            .error
            .unwrap_or_else(|| panic!("{host}:{port} reached the dashboard: status {status}"));
        assert_eq!(error.code.as_str(), "blocked_address", "{host}: {error:?}");
    }
    let refused = pep.wait_record("the guard's refusal", |r| {
        r["kind"] == "resolve"
            && r["refused"][0]["class"]
                .as_str()
                .is_some_and(|c| c.contains("own surface"))
    });
    assert_eq!(refused["host"], "dash.test");
}

/// `pexi approve` on a real terminal (a pty): what it shows, and what its keys do.
struct Terminal {
    child: std::process::Child,
    keys: std::fs::File,
    screen: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Terminal {
    fn start(config: &std::path::Path) -> Terminal {
        use std::os::fd::OwnedFd;
        let pty = nix::pty::openpty(None, None).expect("openpty");
        let slave = |fd: &OwnedFd| std::process::Stdio::from(fd.try_clone().expect("dup"));
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_pexi"))
            .args(["approve", "--config"])
            .arg(config)
            .env("RUST_LOG", "warn")
            .stdin(slave(&pty.slave))
            .stdout(slave(&pty.slave))
            .stderr(slave(&pty.slave))
            .spawn()
            .expect("spawn pexi approve");
        drop(pty.slave);
        let master = std::fs::File::from(pty.master);
        let keys = master.try_clone().expect("dup master");
        let screen = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let shown = screen.clone();
        std::thread::spawn(move || {
            use std::io::Read;
            let mut master = master;
            let mut buffer = [0u8; 4096];
            while let Ok(n) = master.read(&mut buffer) {
                if n == 0 {
                    break;
                }
                shown
                    .lock()
                    .expect("screen")
                    .push_str(&String::from_utf8_lossy(&buffer[..n]));
            }
        });
        Terminal {
            child,
            keys,
            screen,
        }
    }

    /// Waits until the screen shows `text` after byte `from`, and returns where it ends.
    async fn wait_for(&self, text: &str, from: usize) -> usize {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            {
                let screen = self.screen.lock().expect("screen");
                if let Some(at) = screen.get(from..).and_then(|s| s.find(text)) {
                    return from + at + text.len();
                }
                assert!(
                    Instant::now() < deadline,
                    "the terminal never showed {text:?}; it shows:\n{}",
                    &screen[from.min(screen.len())..]
                );
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    fn press(&mut self, key: &str) {
        use std::io::Write;
        self.keys.write_all(key.as_bytes()).expect("key");
    }
}

impl Drop for Terminal {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn pexi_approve_answers_with_single_keys_shares_questions_and_lets_timeouts_deny() {
    if !support::in_isolated_netns(
        "pexi_approve_answers_with_single_keys_shares_questions_and_lets_timeouts_deny",
    ) {
        return;
    }
    let api = Upstream::http("127.0.0.1").await;
    let pep = asking_pep(4_000);
    let mut terminal = Terminal::start(&pep.dir.join("config.toml"));
    let mut at = terminal.wait_for("waiting for questions", 0).await;

    // One request, answered "allow once" with `a`.
    let once = format!("http://new.test:{}/headers", api.port());
    let held = held_get(&pep, &once).await;
    at = terminal.wait_for(&once, at).await;
    at = terminal.wait_for("1 request(s) waiting", at).await;
    terminal.press("a");
    at = terminal.wait_for("-> allow_once", at).await;
    let reply = held.await.expect("held");
    assert_eq!(reply.status(), 200, "{:?}", reply.error);

    // Two identical requests: one question, and `d` denies both.
    let shared = format!("http://new.test:{}/echo", api.port());
    let held = vec![held_get(&pep, &shared).await, held_get(&pep, &shared).await];
    at = terminal.wait_for("2 request(s) waiting", at).await;
    terminal.press("d");
    at = terminal.wait_for("-> deny_once", at).await;
    for request in held {
        let reply = request.await.expect("held");
        let error = reply.error.expect("denied");
        assert!(
            error
                .details
                .reasons
                .iter()
                .any(|r| r.contains("through terminal (deny_once)")),
            "{error:?}"
        );
    }

    // Nobody presses a key: the deadline denies.
    let ignored = format!("http://new.test:{}/status", api.port());
    let reply = held_get(&pep, &ignored).await;
    at = terminal.wait_for(&ignored, at).await;
    let reply = reply.await.expect("held");
    let error = reply.error.expect("denied unanswered");
    assert!(
        error
            .details
            .reasons
            .iter()
            .any(|r| r.starts_with("no answer")),
        "{error:?}"
    );
    terminal.wait_for("no question is waiting", at).await;

    assert_eq!(api.hits().len(), 1, "only the allowed request went out");
    let answers: Vec<Value> = pep
        .audit_records()
        .into_iter()
        .filter(|r| r["kind"] == "approval_answer")
        .collect();
    let summary: Vec<(&str, &str, usize)> = answers
        .iter()
        .map(|a| {
            (
                a["answer"].as_str().unwrap_or_default(),
                a["surface"].as_str().unwrap_or_default(),
                a["decision_ids"].as_array().map_or(0, Vec::len),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            ("allow_once", "terminal", 1),
            ("deny_once", "terminal", 2),
            ("no_answer", "pep", 1)
        ]
    );
    terminal.press("q");
    let deadline = Instant::now() + Duration::from_secs(10);
    while terminal.child.try_wait().expect("wait").is_none() {
        assert!(Instant::now() < deadline, "q did not end pexi approve");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}
