//! The audit export (docs/fleet.md) against real receivers: Debian's rsyslog over TLS (RFC 5425, octet
//! counting) and an OTLP/HTTP receiver that decodes with OpenTelemetry's own generated protobuf types. Both
//! must end up with every record of the run (and the signed checkpoints), in order and byte for byte,
//! across a PEP restart and a restart of each receiver; while they are down, guests' requests are decided
//! and answered as usual. Runs alone in a loopback-only network namespace.

mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::logs::v1::{
    ExportLogsServiceRequest, ExportLogsServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use prost::Message;
use serde_json::Value;
use support::{loopback_options, TestCa, TestPep, Upstream};

/// What a receiver got, in arrival order: (kind, the line's text).
type Received = Arc<Mutex<Vec<(String, String)>>>;

/// An OTLP/HTTP logs receiver on a fixed loopback port, stoppable and startable again.
struct OtlpReceiver {
    port: u16,
    /// Milliseconds each request is held before it is answered: a slow collector.
    delay_ms: Arc<std::sync::atomic::AtomicU64>,
    server: Option<tokio::task::JoinHandle<()>>,
}

impl OtlpReceiver {
    async fn start(port: u16, received: Received) -> OtlpReceiver {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .expect("bind the OTLP receiver");
        let store = received;
        let delay_ms = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let delay = delay_ms.clone();
        let app = axum::Router::new().route(
            "/v1/logs",
            axum::routing::post(
                move |headers: axum::http::HeaderMap, body: axum::body::Bytes| {
                    let store = store.clone();
                    let delay = delay.load(std::sync::atomic::Ordering::Relaxed);
                    async move {
                        tokio::time::sleep(Duration::from_millis(delay)).await;
                        assert_eq!(
                            headers.get("content-type").and_then(|v| v.to_str().ok()),
                            Some("application/x-protobuf")
                        );
                        let request =
                            ExportLogsServiceRequest::decode(body).expect("an OTLP logs request");
                        let mut got = store.lock().expect("store");
                        for resource in &request.resource_logs {
                            let service = resource
                                .resource
                                .as_ref()
                                .and_then(|r| r.attributes.iter().find(|a| a.key == "service.name"))
                                .and_then(|a| a.value.as_ref())
                                .and_then(|v| v.value.clone());
                            assert_eq!(service, Some(AnyValue::StringValue("pexi".into())));
                            for scope in &resource.scope_logs {
                                for record in &scope.log_records {
                                    let kind = record
                                        .attributes
                                        .iter()
                                        .find(|a| a.key == "pexi.audit.kind")
                                        .and_then(|a| a.value.as_ref())
                                        .and_then(|v| v.value.clone());
                                    let body = record.body.as_ref().and_then(|v| v.value.clone());
                                    let (
                                        Some(AnyValue::StringValue(kind)),
                                        Some(AnyValue::StringValue(text)),
                                    ) = (kind, body)
                                    else {
                                        panic!("a log record without its kind or body: {record:?}");
                                    };
                                    assert!(record.time_unix_nano > 0);
                                    got.push((kind, text));
                                }
                            }
                        }
                        (
                            [("content-type", "application/x-protobuf")],
                            ExportLogsServiceResponse::default().encode_to_vec(),
                        )
                    }
                },
            ),
        );
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        OtlpReceiver {
            port,
            delay_ms,
            server: Some(server),
        }
    }

    async fn stop(&mut self) {
        if let Some(server) = self.server.take() {
            server.abort();
            let _ = server.await;
        }
    }
}

/// Debian's rsyslogd in the foreground: TLS on a loopback port, each message's MSGID and MSG a line of
/// `out.log`. Stopped (SIGTERM, by PID) on drop.
struct Rsyslog {
    dir: PathBuf,
    port: u16,
    child: Option<std::process::Child>,
}

impl Rsyslog {
    fn start(dir: &Path, port: u16, ca: &TestCa) -> Rsyslog {
        std::fs::create_dir_all(dir).expect("dir");
        std::fs::write(dir.join("ca.pem"), &ca.ca_pem).expect("ca");
        std::fs::write(dir.join("cert.pem"), &ca.cert_pem).expect("cert");
        std::fs::write(dir.join("key.pem"), &ca.key_pem).expect("key");
        let d = dir.display();
        std::fs::write(
            dir.join("rsyslog.conf"),
            format!(
                r#"global(workDirectory="{d}" maxMessageSize="64k"
  DefaultNetstreamDriver="gtls"
  DefaultNetstreamDriverCAFile="{d}/ca.pem"
  DefaultNetstreamDriverCertFile="{d}/cert.pem"
  DefaultNetstreamDriverKeyFile="{d}/key.pem")
module(load="imtcp" StreamDriver.Name="gtls" StreamDriver.Mode="1" StreamDriver.AuthMode="anon")
input(type="imtcp" port="{port}" address="127.0.0.1")
template(name="line" type="string" string="%msgid% %msg%\n")
action(type="omfile" file="{d}/out.log" template="line")
"#
            ),
        )
        .expect("rsyslog.conf");
        let mut rsyslog = Rsyslog {
            dir: dir.to_path_buf(),
            port,
            child: None,
        };
        rsyslog.spawn();
        rsyslog
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("rsyslogd.log"))
            .expect("log");
        let child = std::process::Command::new("rsyslogd")
            .arg("-n")
            .arg("-f")
            .arg(self.dir.join("rsyslog.conf"))
            .arg("-i")
            .arg(self.dir.join("rsyslogd.pid"))
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("rsyslogd (Debian's rsyslog and rsyslog-gnutls; scripts/setup installs them)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "rsyslogd did not listen");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGSTOP or SIGCONT: a receiver that takes nothing (its buffers fill) and then goes on.
    fn pause(&self, paused: bool) {
        if let Some(child) = &self.child {
            let signal = if paused { "-STOP" } else { "-CONT" };
            let _ = std::process::Command::new("kill")
                .args([signal, &child.id().to_string()])
                .status();
        }
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let _ = child.wait();
        }
    }

    fn received(&self) -> Vec<(String, String)> {
        std::fs::read_to_string(self.dir.join("out.log"))
            .unwrap_or_default()
            .lines()
            .filter_map(|line| line.split_once(' '))
            .map(|(kind, text)| (kind.to_string(), text.trim_start().to_string()))
            .collect()
    }
}

impl Drop for Rsyslog {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Every line of the audit log (all files, oldest first), by seq.
fn audit_lines(pep: &TestPep) -> BTreeMap<u64, String> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(&pep.dir)
        .expect("dir")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("audit.jsonl"))
        })
        .collect();
    files.sort();
    let mut lines = BTreeMap::new();
    for file in files {
        for line in std::fs::read_to_string(&file).unwrap_or_default().lines() {
            if let Ok(value) = serde_json::from_str::<Value>(line) {
                if let Some(seq) = value["seq"].as_u64() {
                    lines.insert(seq, line.to_string());
                }
            }
        }
    }
    lines
}

/// The records a receiver got, first arrival of each seq, in arrival order; and its checkpoints.
fn shipped(received: &[(String, String)]) -> (Vec<(u64, String)>, Vec<Value>) {
    let mut seen = std::collections::BTreeSet::new();
    let mut records = Vec::new();
    let mut checkpoints = Vec::new();
    for (kind, text) in received {
        let value: Value = serde_json::from_str(text).unwrap_or_else(|err| panic!("{err}: {text}"));
        if kind == "checkpoint" {
            checkpoints.push(value);
            continue;
        }
        let seq = value["seq"].as_u64().expect("seq");
        assert_eq!(value["kind"].as_str(), Some(kind.as_str()), "{text}");
        if seen.insert(seq) {
            records.push((seq, text.clone()));
        }
    }
    (records, checkpoints)
}

async fn requests(pep: &TestPep, port: u16, n: usize) {
    let mut guest = pep.guest().await;
    for i in 0..n {
        let started = Instant::now();
        let allowed = guest
            .get(&format!("http://api.test:{port}/headers?n={i}"))
            .await;
        assert_eq!(allowed.status(), 200, "{allowed:?}");
        let denied = guest
            .get(&format!("http://other.test:{port}/headers?n={i}"))
            .await;
        assert_eq!(denied.error_code(), "policy_denied", "{denied:?}");
        // Generous: a decision never waits for a receiver (the default timeouts are 10-15 s).
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
    }
}

/// Waits until both receivers hold every record up to the log's last one now.
async fn wait_caught_up(pep: &TestPep, otlp: &Received, rsyslog: &Rsyslog) -> u64 {
    let last = *audit_lines(pep).keys().last().expect("records");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (otlp_records, _) = shipped(&otlp.lock().expect("store"));
        let (syslog_records, _) = shipped(&rsyslog.received());
        let top = |records: &[(u64, String)]| records.iter().map(|(seq, _)| *seq).max();
        if top(&otlp_records) >= Some(last) && top(&syslog_records) >= Some(last) {
            return last;
        }
        assert!(
            Instant::now() < deadline,
            "not shipped in 60 s: log up to {last}, otlp up to {:?}, syslog up to {:?}",
            top(&otlp_records),
            top(&syslog_records)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn every_record_reaches_rsyslog_and_an_otlp_receiver_in_order_across_restarts() {
    if !support::in_isolated_netns(
        "every_record_reaches_rsyslog_and_an_otlp_receiver_in_order_across_restarts",
    ) {
        return;
    }
    let api = Upstream::http("127.0.0.1").await;
    let port = api.port();
    let ca = TestCa::new(&["siem.test"]);
    let work = support::temp_dir("export");
    let syslog_port = support::free_port();
    let mut rsyslog = Rsyslog::start(&work.join("rsyslog"), syslog_port, &ca);
    let otlp_port = support::free_port();
    let received: Received = Arc::default();
    let mut otlp = OtlpReceiver::start(otlp_port, received.clone()).await;
    std::fs::write(work.join("siem-ca.pem"), &ca.ca_pem).expect("ca");
    let ca_file = work.join("siem-ca.pem");
    let mut pep = TestPep::start_with(
        loopback_options(
            &[("api.test", "127.0.0.1"), ("other.test", "127.0.0.1")],
            &["api.test"],
        ),
        |doc| {
            let export: toml::Table = toml::from_str(&format!(
                r#"
                batch_records = 7
                retry_max_ms = 500
                [otlp]
                endpoint = "http://127.0.0.1:{otlp_port}/v1/logs"
                [syslog]
                address = "127.0.0.1:{syslog_port}"
                server_name = "siem.test"
                ca_file = "{}"
                "#,
                ca_file.display()
            ))
            .expect("export table");
            let pep = doc["pep"].as_table_mut().expect("[pep]");
            pep.insert("export".into(), export.into());
            pep["audit"]
                .as_table_mut()
                .expect("[pep.audit]")
                .insert("checkpoint_ms".into(), 200.into());
        },
    );
    requests(&pep, port, 5).await;
    wait_caught_up(&pep, &received, &rsyslog).await;

    // Both receivers slow: rsyslogd stopped (SIGSTOP), the collector answering after 3 s. Decisions do
    // not wait for them.
    rsyslog.pause(true);
    otlp.delay_ms
        .store(3000, std::sync::atomic::Ordering::Relaxed);
    requests(&pep, port, 5).await;
    rsyslog.pause(false);
    otlp.delay_ms.store(0, std::sync::atomic::Ordering::Relaxed);
    wait_caught_up(&pep, &received, &rsyslog).await;

    // Both receivers down: requests are decided and answered as ever; their records wait.
    rsyslog.stop();
    otlp.stop().await;
    requests(&pep, port, 5).await;
    // The PEP restarts while they are down: each sink resumes from its cursor.
    pep.restart();
    requests(&pep, port, 3).await;
    let mut otlp = OtlpReceiver::start(otlp_port, received.clone()).await;
    rsyslog.spawn();
    requests(&pep, port, 3).await;
    let last = wait_caught_up(&pep, &received, &rsyslog).await;
    otlp.stop().await;
    assert_eq!(otlp.port, otlp_port);

    let log = audit_lines(&pep);
    let expected: Vec<(u64, String)> = log
        .range(..=last)
        .map(|(seq, text)| (*seq, text.clone()))
        .collect();
    assert!(
        expected
            .iter()
            .any(|(_, t)| t.contains("\"kind\":\"pep_stop\"")),
        "the run spans a restart"
    );
    for (name, got) in [
        ("otlp", received.lock().expect("store").clone()),
        ("syslog", rsyslog.received()),
    ] {
        let (records, checkpoints) = shipped(&got);
        let records: Vec<(u64, String)> = records
            .into_iter()
            .filter(|(seq, _)| *seq <= last)
            .collect();
        // Every record, each first seen in the order of the log, exactly as the log has it.
        assert_eq!(records.len(), expected.len(), "{name}: every record");
        for ((seq, text), (want_seq, want)) in records.iter().zip(&expected) {
            assert_eq!(seq, want_seq, "{name}: in order");
            assert_eq!(text, want, "{name}: byte for byte");
        }
        // Signed checkpoints went along, each after the records it covers.
        assert!(!checkpoints.is_empty(), "{name}: checkpoints");
        let mut seen_records = 0u64;
        for (kind, text) in &got {
            let value: Value = serde_json::from_str(text).expect("json");
            if kind == "checkpoint" {
                let covered = value["last_seq"].as_u64().unwrap_or(0);
                assert!(
                    covered < seen_records.max(1),
                    "{name}: a checkpoint before its records"
                );
                assert!(
                    value["sig"].as_str().is_some_and(|s| s.len() == 128),
                    "{name}: signed"
                );
            } else {
                seen_records = seen_records.max(value["seq"].as_u64().unwrap_or(0) + 1);
            }
        }
    }
}
