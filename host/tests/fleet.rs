//! One PEP, several VMs (docs/fleet.md): each listener tells the PEP which VM its guests are, the policy
//! decides on that identity, and nothing a guest says of itself changes it. Runs alone in a loopback-only
//! network namespace.

mod support;

use support::{loopback_options, Guest, TestPep, Upstream};

fn listener(socket: &std::path::Path, vm: &str, profile: &str) -> toml::Value {
    let mut table = toml::Table::new();
    table.insert("at".into(), format!("unix:{}", socket.display()).into());
    table.insert("vm".into(), vm.into());
    table.insert("profile".into(), profile.into());
    table.into()
}

fn entry(host: &str, port: u16, vms: &[&str]) -> toml::Value {
    let mut table = toml::Table::new();
    table.insert("host".into(), host.into());
    table.insert(
        "ports".into(),
        vec![toml::Value::from(i64::from(port))].into(),
    );
    if !vms.is_empty() {
        let vms: Vec<toml::Value> = vms.iter().map(|v| toml::Value::from(*v)).collect();
        table.insert("vms".into(), vms.into());
    }
    table.into()
}

#[tokio::test(flavor = "multi_thread")]
async fn two_vms_on_one_pep_get_the_decisions_of_their_own_identity() {
    if !support::in_isolated_netns("two_vms_on_one_pep_get_the_decisions_of_their_own_identity") {
        return;
    }
    let api = Upstream::http("127.0.0.1").await;
    let port = api.port();
    let options = loopback_options(
        &[
            ("alice.test", "127.0.0.1"),
            ("bob.test", "127.0.0.1"),
            ("both.test", "127.0.0.1"),
        ],
        &[],
    );
    let mut bob_socket = None;
    let pep = TestPep::start_with(options, |doc| {
        let pep = doc["pep"].as_table_mut().expect("[pep]");
        let alice = std::path::PathBuf::from(
            pep["listen"][0]
                .as_str()
                .and_then(|s| s.strip_prefix("unix:"))
                .expect("unix listener"),
        );
        let bob = alice.with_file_name("bob.sock");
        pep.insert(
            "listen".into(),
            vec![
                listener(&alice, "alice", "research"),
                listener(&bob, "bob", "coding"),
            ]
            .into(),
        );
        let policy = pep["policy"].as_table_mut().expect("[pep.policy]");
        policy.insert(
            "allow".into(),
            vec![
                entry("alice.test", port, &["alice"]),
                entry("bob.test", port, &["bob"]),
                entry("both.test", port, &["alice", "bob"]),
            ]
            .into(),
        );
        bob_socket = Some(bob);
    });
    let bob_socket = bob_socket.expect("bob's socket");
    // Each guest claims to be the other one: the HELLO name is the guest's word, the listener the host's.
    let mut alice = Guest::connect_as(&pep.socket, "bob", "1").await;
    let mut bob = Guest::connect_as(&bob_socket, "alice", "1").await;

    let alice_own = alice
        .get(&format!("http://alice.test:{port}/headers?from=a"))
        .await;
    let alice_other = alice
        .get(&format!("http://bob.test:{port}/headers?from=a"))
        .await;
    let bob_own = bob
        .get(&format!("http://bob.test:{port}/headers?from=b"))
        .await;
    let bob_other = bob
        .get(&format!("http://alice.test:{port}/headers?from=b"))
        .await;
    assert_eq!(alice_own.status(), 200, "{alice_own:?}");
    assert_eq!(bob_own.status(), 200, "{bob_own:?}");
    for (who, reply) in [("alice", &alice_other), ("bob", &bob_other)] {
        assert_eq!(reply.error_code(), "policy_denied", "{who}: {reply:?}");
    }
    // An entry for both serves both.
    assert_eq!(
        alice
            .get(&format!("http://both.test:{port}/headers"))
            .await
            .status(),
        200
    );
    assert_eq!(
        bob.get(&format!("http://both.test:{port}/headers"))
            .await
            .status(),
        200
    );
    assert_eq!(
        api.hits().len(),
        4,
        "only the allowed requests reached the upstream"
    );

    // The audit says which VM asked: on the session and on every decision, as the host named it.
    let records = pep.audit_records();
    let vm_of = |host: &str, from: &str| -> Vec<String> {
        records
            .iter()
            .filter(|r| r["kind"] == "decision" && r["request"]["host"] == host)
            .filter(|r| r["request"]["query"] == format!("from={from}").as_str())
            .map(|r| {
                format!(
                    "{}/{}",
                    r["vm"]["name"].as_str().unwrap_or("?"),
                    r["vm"]["profile"].as_str().unwrap_or("?")
                )
            })
            .collect()
    };
    assert_eq!(vm_of("alice.test", "a"), ["alice/research"]);
    assert_eq!(vm_of("bob.test", "a"), ["alice/research"]);
    assert_eq!(vm_of("bob.test", "b"), ["bob/coding"]);
    assert_eq!(vm_of("alice.test", "b"), ["bob/coding"]);
    let sessions: Vec<(String, String)> = records
        .iter()
        .filter(|r| r["kind"] == "session" && r["event"] == "open")
        .map(|r| {
            (
                r["vm"]["name"].as_str().unwrap_or("?").to_string(),
                r["guest"]["name"].as_str().unwrap_or("?").to_string(),
            )
        })
        .collect();
    assert!(
        sessions.contains(&("alice".into(), "bob".into())),
        "{sessions:?}"
    );
    assert!(
        sessions.contains(&("bob".into(), "alice".into())),
        "{sessions:?}"
    );
}

/// `pexi check --vm` decides as for that VM, so a policy author can try entries per VM.
#[test]
fn pexi_check_decides_for_the_vm_it_is_given() {
    let dir = support::temp_dir("fleet-check");
    let config = dir.join("config.toml");
    std::fs::write(
        &config,
        format!(
            "[pep]\nlisten = [\"unix:{}\"]\n[pep.audit]\npath = \"{}\"\n[[pep.policy.allow]]\nhost = \"api.example.com\"\nvms = [\"alice\"]\n",
            dir.join("pep.sock").display(),
            dir.join("audit.jsonl").display()
        ),
    )
    .expect("config");
    support::copy_policies(&dir);
    let check = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_pexi"))
            .arg("check")
            .arg("--config")
            .arg(&config)
            .args(args)
            .args(["GET", "https://api.example.com/"])
            .output()
            .expect("pexi check")
    };
    let alice = check(&["--vm", "alice"]);
    assert_eq!(alice.status.code(), Some(0), "{alice:?}");
    let bob = check(&["--vm", "bob"]);
    assert_eq!(bob.status.code(), Some(1), "{bob:?}");
    let nobody = check(&[]);
    assert_eq!(nobody.status.code(), Some(1), "{nobody:?}");
    let bad = check(&["--vm", "al ice"]);
    assert_eq!(bad.status.code(), Some(2), "{bad:?}");
}

/// A plain HTTP/1.1 GET on loopback: status and body.
fn http_get(port: u16, path: &str, host: &str) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(std::time::Duration::from_secs(10)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )?;
    let mut text = String::new();
    stream.read_to_string(&mut text)?;
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    // Chunked bodies: the JSON and the metrics text are whole lines, so dropping the size lines is enough.
    let body = if text
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        body.lines()
            .filter(|line| u64::from_str_radix(line.trim(), 16).is_err())
            .collect::<Vec<_>>()
            .join("\n")
    } else {
        body.to_string()
    };
    Ok((status, body))
}

/// Debian's Prometheus, scraping `target` every second, its data and API on loopback; killed on drop.
struct Prometheus {
    child: std::process::Child,
    port: u16,
    _dir: support::TestDir,
}

impl Prometheus {
    fn start(target: u16) -> Prometheus {
        let dir = support::temp_dir("prometheus");
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: pexi\n    static_configs:\n      - targets: ['127.0.0.1:{target}']\n"
            ),
        )
        .expect("prometheus.yml");
        let port = support::free_port();
        let log = std::fs::File::create(dir.join("prometheus.log")).expect("log");
        let child = std::process::Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("prometheus (Debian's `prometheus` package; scripts/setup installs it)");
        Prometheus {
            child,
            port,
            _dir: dir,
        }
    }

    /// The vector an instant query returns: (labels, value) pairs.
    fn query(&self, promql: &str) -> Vec<(serde_json::Value, f64)> {
        let encoded: String = promql
            .bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'_' | b'.' | b'-' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect();
        // Not answering yet while it starts.
        let Ok((200, body)) = http_get(
            self.port,
            &format!("/api/v1/query?query={encoded}"),
            &format!("127.0.0.1:{}", self.port),
        ) else {
            return Vec::new();
        };
        let doc: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        doc["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .map(|series| {
                let value = series["value"][1]
                    .as_str()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(f64::NAN);
                (series["metric"].clone(), value)
            })
            .collect()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn prometheus_scrapes_the_decision_counts_of_a_run() {
    if !support::in_isolated_netns("prometheus_scrapes_the_decision_counts_of_a_run") {
        return;
    }
    let api = Upstream::http("127.0.0.1").await;
    let port = api.port();
    let metrics_port = support::free_port();
    let pep = TestPep::start_with(
        loopback_options(
            &[("api.test", "127.0.0.1"), ("other.test", "127.0.0.1")],
            &["api.test"],
        ),
        |doc| {
            let mut metrics = toml::Table::new();
            metrics.insert("listen".into(), format!("127.0.0.1:{metrics_port}").into());
            let pep = doc["pep"].as_table_mut().expect("[pep]");
            pep.insert("metrics".into(), metrics.into());
            // The lists even name the metrics port: the address guard refuses it all the same.
            pep["policy"]["allow"]
                .as_array_mut()
                .expect("allow entries")
                .push(entry("api.test", metrics_port, &[]));
        },
    );
    let mut guest = pep.guest().await;
    for _ in 0..3 {
        let reply = guest.get(&format!("http://api.test:{port}/headers")).await;
        assert_eq!(reply.status(), 200, "{reply:?}");
    }
    for _ in 0..2 {
        let reply = guest
            .get(&format!("http://other.test:{port}/headers"))
            .await;
        assert_eq!(reply.error_code(), "policy_denied", "{reply:?}");
    }
    // The endpoint itself, as any scraper sees it; a rebound name is refused.
    let (status, text) = http_get(
        metrics_port,
        "/metrics",
        &format!("127.0.0.1:{metrics_port}"),
    )
    .expect("the metrics endpoint answers");
    assert_eq!(status, 200, "{text}");
    assert!(
        text.contains(r#"pexi_decisions_total{result="allow",reason="allowlist",vm=""} 3"#),
        "{text}"
    );
    assert!(
        text.contains(r#"pexi_decisions_total{result="deny",reason="not_listed",vm=""} 2"#),
        "{text}"
    );
    assert!(
        text.contains(r#"pexi_requests_total{method="pep.http.request",outcome="ok"} 3"#),
        "{text}"
    );
    assert!(text.contains("pexi_sessions 1"), "{text}");
    assert!(text.contains("pexi_decision_seconds_count 5"), "{text}");
    let (rebound, _) = http_get(
        metrics_port,
        "/metrics",
        &format!("evil.example:{metrics_port}"),
    )
    .expect("the metrics endpoint answers");
    assert_eq!(rebound, 421);
    // A guest cannot read it either: its port is the PEP's own surface, whatever the lists allow.
    let reply = guest
        .get(&format!("http://api.test:{metrics_port}/metrics"))
        .await;
    assert_eq!(reply.error_code(), "blocked_address", "{reply:?}");

    let prometheus = Prometheus::start(metrics_port);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let counts = loop {
        let counts: std::collections::BTreeMap<String, f64> = prometheus
            .query("sum by (result) (pexi_decisions_total)")
            .into_iter()
            .map(|(labels, value)| (labels["result"].as_str().unwrap_or("?").to_string(), value))
            .collect();
        // The guest's request to the metrics port was decided (allowed: api.test is listed) before the
        // guard refused it: four allows.
        if counts.get("allow") == Some(&4.0) && counts.get("deny") == Some(&2.0) {
            break counts;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "Prometheus did not report the run's decisions in 60 s: {counts:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    };
    assert_eq!(counts.len(), 2, "{counts:?}");
    let up = prometheus.query("up{job=\"pexi\"}");
    assert_eq!(up.len(), 1);
    assert_eq!(up[0].1, 1.0, "{up:?}");
    let blocked = prometheus.query("pexi_requests_total{outcome=\"blocked_address\"}");
    assert_eq!(blocked.len(), 1, "{blocked:?}");
    assert_eq!(blocked[0].1, 1.0);
}
