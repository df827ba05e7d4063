//! One guest's bounded share of the host, against a real `pexi serve`: what a guest that announces huge
//! windows and then never reads can make the PEP hold, a stream whose guest grants no credit, and the caps
//! on sessions, streams and idle connections. Each bound is set small here so that the tests take seconds;
//! scripts/soak measures the defaults under all of it at once.

mod support;

use std::time::{Duration, Instant};

use pexi_protocol::payload::{ErrorCode, HttpRequest, MethodCall, MAX_WINDOW};
use pexi_protocol::session::{Config as SessionConfig, Event};
use support::{loopback_options, Guest, TestPep, Upstream};

fn get(url: &str) -> MethodCall {
    MethodCall::HttpRequest(HttpRequest::new("GET", url))
}

fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS");
    kib * 1024
}

fn api_options() -> support::PepOptions {
    loopback_options(&[("api.test", "127.0.0.1")], &["api.test"])
}

/// The first session-level record with `event`, waiting for it.
fn session_record(pep: &TestPep, event: &str) -> serde_json::Value {
    pep.wait_record(&format!("session {event}"), |r| {
        r["kind"] == "session" && r["event"] == event
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn a_guest_that_announces_huge_windows_and_never_reads_holds_only_its_stream_buffers() {
    const STREAMS: usize = 4;
    const SIZE: usize = 48 << 20;
    let upstream = Upstream::http("127.0.0.1").await;
    let mut options = api_options();
    options.limits = vec![("max_response_bytes", 1 << 30)];
    let pep = TestPep::start(options);
    let mut config = SessionConfig::new("hoarder", "1");
    config.receive.initial_stream_window = MAX_WINDOW;
    config.receive.initial_connection_window = MAX_WINDOW;
    let mut guest = Guest::try_connect_with(&pep.socket, config)
        .await
        .expect("handshake");
    let before = rss_bytes(pep.pid());
    for _ in 0..STREAMS {
        let id = guest
            .session()
            .open(get(&format!(
                "http://api.test:{}/zeros?n={SIZE}",
                upstream.port()
            )))
            .expect("open");
        guest.session().send_end(id, vec![]).expect("end");
    }
    guest.conn.flush().await.expect("flush");
    // From here the guest reads nothing at all. Wait until the upstream stops making progress.
    let mut last = 0;
    let mut still_since = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(20);
    while still_since.elapsed() < Duration::from_secs(2) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = upstream.streamed.load(std::sync::atomic::Ordering::SeqCst);
        if now != last {
            last = now;
            still_since = Instant::now();
        }
    }
    let streamed = upstream.streamed.load(std::sync::atomic::Ordering::SeqCst) as usize;
    let grown = rss_bytes(pep.pid()).saturating_sub(before);
    eprintln!(
        "upstream streamed {} MiB of {} MiB; PEP RSS grew {} MiB",
        streamed >> 20,
        (STREAMS * SIZE) >> 20,
        grown >> 20
    );
    // What the PEP holds per stream is its 256 KiB buffer and one frame; the rest of what the upstream
    // sent sits in the kernel's socket buffers (a few MiB per TCP connection on loopback). Before the fix
    // every byte was read into the session's queue: the whole 192 MiB.
    assert!(
        streamed < STREAMS * SIZE / 2,
        "the PEP kept reading its upstreams for a guest that reads nothing: {streamed} bytes"
    );
    assert!(
        grown < 48 << 20,
        "the PEP's RSS grew by {grown} bytes for a guest that reads nothing"
    );
    assert!(upstream.hits().len() == STREAMS);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stream_whose_guest_grants_no_credit_ends_after_the_idle_timeout() {
    let upstream = Upstream::http("127.0.0.1").await;
    let mut options = api_options();
    options.limits = vec![("idle_timeout_ms", 800), ("total_timeout_ms", 600_000)];
    let pep = TestPep::start(options);
    let mut config = SessionConfig::new("starver", "1");
    config.receive.initial_stream_window = 64 * 1024;
    let mut guest = Guest::try_connect_with(&pep.socket, config)
        .await
        .expect("handshake");
    let id = guest
        .session()
        .open(get(&format!(
            "http://api.test:{}/zeros?n={}",
            upstream.port(),
            8 << 20
        )))
        .expect("open");
    guest.session().send_end(id, vec![]).expect("end");
    let started = Instant::now();
    // The guest reads its socket but never releases what it received: no WINDOW_UPDATE ever goes out.
    let mut received = 0;
    let error = loop {
        let event = tokio::time::timeout(Duration::from_secs(15), guest.conn.next_event())
            .await
            .expect(
                "the stream was never ended: a credit-starved upstream is held until total_timeout",
            )
            .expect("io")
            .expect("open");
        match event {
            Event::Data { data, .. } => received += data.len(),
            Event::StreamFailed { error, .. } => break error,
            Event::Head { .. } => {}
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(error.code, ErrorCode::GuestStalled, "{error:?}");
    assert_eq!(received, 64 * 1024);
    // Not before the idle timeout (an upper bound would only measure the machine's load).
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(700), "{took:?}");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !upstream.aborted.load(std::sync::atomic::Ordering::SeqCst)
        && upstream.connections() > 0
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let outcome = pep
        .audit_records()
        .into_iter()
        .find(|r| r["kind"] == "outcome" && r["stream_id"] == id)
        .expect("outcome");
    assert_eq!(outcome["error"], "guest_stalled", "{outcome}");
    assert_eq!(outcome["status"], 200, "{outcome}");
}

#[tokio::test(flavor = "multi_thread")]
async fn sessions_over_the_cap_are_refused_with_the_limit_and_admitted_again_later() {
    let mut options = api_options();
    options.limits = vec![("max_sessions", 3), ("max_sessions_per_listener", 2)];
    let pep = TestPep::start(options);
    let first = pep.guest().await;
    let _second = pep.guest().await;
    let refused = Guest::try_connect_with(&pep.socket, SessionConfig::new("third", "1")).await;
    let Err(Some(Event::Refused(error))) = refused else {
        panic!("the third session was not refused: {:?}", refused.err());
    };
    assert_eq!(error.code, ErrorCode::ResourceExhausted, "{error:?}");
    assert!(error.retryable);
    assert_eq!(error.details.limit, Some(2));
    let record = session_record(&pep, "refused");
    assert_eq!(record["code"], "resource_exhausted");
    assert_eq!(record["limit"], 2);
    // A session that ends frees its place.
    drop(first);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match Guest::try_connect_with(&pep.socket, SessionConfig::new("later", "1")).await {
            Ok(_) => break,
            Err(other) => {
                assert!(Instant::now() < deadline, "never admitted again: {other:?}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn streams_are_capped_across_sessions() {
    let upstream = Upstream::http("127.0.0.1").await;
    let mut options = api_options();
    options.limits = vec![("max_streams_total", 2), ("session_reserved_streams", 1)];
    let pep = TestPep::start(options);
    let mut a = pep.guest().await;
    let mut b = pep.guest().await;
    let forever = format!("http://api.test:{}/forever?gap_ms=200", upstream.port());
    for which in [0, 0, 1, 1] {
        let guest = if which == 0 { &mut a } else { &mut b };
        let id = guest.session().open(get(&forever)).expect("open");
        guest.session().send_end(id, vec![]).expect("end");
        loop {
            match guest.conn.next_event().await.expect("io").expect("open") {
                Event::Head { stream_id, .. } if stream_id == id => break,
                Event::Data { stream_id, data } => guest.session().release(stream_id, data.len()),
                other => panic!("{other:?}"),
            }
        }
    }
    // a holds its own place and one shared place, b its own and the other shared one: the fourth is over
    // the PEP-wide cap...
    let reply = a.call(get(&forever), b"").await;
    let error = reply.error.expect("refused");
    assert_eq!(error.code, ErrorCode::ResourceExhausted, "{error:?}");
    assert!(error.retryable);
    assert_eq!(error.details.limit, Some(2));
    // ...while a session that holds no shared place still has its own.
    let mut c = pep.guest().await;
    let reply = c
        .call(
            get(&format!("http://api.test:{}/hello", upstream.port())),
            b"",
        )
        .await;
    assert_eq!(reply.status(), 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_silent_session_with_nothing_open_is_closed() {
    let mut options = api_options();
    options.limits = vec![("idle_connection_timeout_ms", 500)];
    let pep = TestPep::start(options);
    let mut guest = pep.guest().await;
    let started = Instant::now();
    // The guest says nothing at all (a real SDK pings every 15 s).
    let end = tokio::time::timeout(Duration::from_secs(10), guest.conn.next_event())
        .await
        .expect("the idle session was never closed")
        .expect("io");
    assert!(matches!(end, None | Some(Event::Closed)), "{end:?}");
    assert!(started.elapsed() >= Duration::from_millis(450));
    let record = session_record(&pep, "idle_timeout");
    assert_eq!(record["limit_ms"], 500);
}

fn audit_table(doc: &mut toml::Table) -> &mut toml::Table {
    doc["pep"].as_table_mut().expect("pep")["audit"]
        .as_table_mut()
        .expect("audit")
}

fn verify(files: &[std::path::PathBuf]) -> String {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_pexi"))
        .args(["audit", "verify"])
        .args(files)
        .output()
        .expect("pexi audit verify");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "audit verify failed: {text}");
    text
}

#[tokio::test(flavor = "multi_thread")]
async fn rotated_audit_files_past_the_retention_bound_are_removed_and_the_removal_is_recorded() {
    let upstream = Upstream::http("127.0.0.1").await;
    let mut pep = TestPep::start_with(api_options(), |doc| {
        let audit = audit_table(doc);
        audit.insert("rotate_bytes".into(), 4096.into());
        audit.insert("keep_rotated_files".into(), 2.into());
        audit.insert("keep_rotated_bytes".into(), 0.into());
    });
    let mut guest = pep.guest().await;
    for i in 0..30 {
        let url = format!("http://api.test:{}/hello?i={i}", upstream.port());
        assert_eq!(guest.call(get(&url), b"").await.status(), 200);
    }
    drop(guest);
    let audit = pep.audit.clone();
    assert!(pep.terminate().success());
    let files = pexi_host::audit::log_files(&audit);
    // At most two rotated files beside the active one, whatever was written.
    assert!(files.len() <= 3, "{files:?}");
    let mut removed = Vec::new();
    let mut records = Vec::new();
    for file in &files {
        for line in std::fs::read_to_string(file).expect("read").lines() {
            records.push(serde_json::from_str::<serde_json::Value>(line).expect("json"));
        }
    }
    for record in records.iter().filter(|r| r["kind"] == "audit_retention") {
        assert_eq!(record["keep_rotated_files"], 2);
        for gone in record["removed"].as_array().expect("removed") {
            assert!(
                gone["first_seq"].is_u64() && gone["bytes"].as_u64() > Some(0),
                "{gone}"
            );
            removed.push(gone["file"].as_str().expect("file").to_string());
        }
    }
    assert!(!removed.is_empty(), "nothing was removed: {files:?}");
    for name in &removed {
        assert!(
            !audit.with_file_name(name).exists(),
            "{name} is still there"
        );
    }
    // What is left verifies, as a chain that starts mid-way.
    let report = verify(&files);
    assert!(report.contains("starts before the first file"), "{report}");
}

#[test]
fn a_full_disk_refuses_with_audit_unavailable_and_the_pep_resumes_by_itself() {
    if !support::in_private_mounts(
        "a_full_disk_refuses_with_audit_unavailable_and_the_pep_resumes_by_itself",
    ) {
        return;
    }
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let disk = support::temp_dir("small-disk");
        let mounted = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=512k,mode=0700", "tmpfs"])
            .arg(&*disk)
            .status()
            .expect("mount");
        assert!(mounted.success(), "mount a tmpfs");
        let audit = disk.join("audit.jsonl");
        let upstream = Upstream::http("127.0.0.1").await;
        let mut pep = TestPep::start_with(api_options(), |doc| {
            let table = audit_table(doc);
            table.insert("path".into(), audit.display().to_string().into());
            table.insert("durability".into(), "always".into());
        });
        pep.audit = audit.clone();
        let mut guest = pep.guest().await;
        let url = format!("http://api.test:{}/hello", upstream.port());
        assert_eq!(guest.call(get(&url), b"").await.status(), 200);
        // Fill the disk.
        let filler = disk.join("filler");
        {
            use std::io::Write;
            let mut file = std::fs::File::create(&filler).expect("filler");
            let block = vec![0u8; 4096];
            while file
                .write_all(&block)
                .and_then(|()| file.sync_all())
                .is_ok()
            {}
        }
        let mut refused = None;
        for _ in 0..50 {
            let reply = guest.call(get(&url), b"").await;
            if let Some(error) = reply.error {
                refused = Some(error);
                break;
            }
        }
        let error = refused.expect("a full disk never refused a request");
        assert_eq!(error.code, ErrorCode::AuditUnavailable, "{error:?}");
        assert!(error.retryable);
        let hits_while_full = upstream.hits().len();
        // Nothing is sent while the log cannot be written.
        let again = guest.call(get(&url), b"").await;
        assert_eq!(again.error_code(), "audit_unavailable");
        assert_eq!(upstream.hits().len(), hits_while_full);
        // Space returns: the PEP resumes without a restart.
        std::fs::remove_file(&filler).expect("remove filler");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let reply = guest.call(get(&url), b"").await;
            if reply.error.is_none() {
                assert_eq!(reply.status(), 200);
                break;
            }
            assert!(
                Instant::now() < deadline,
                "never resumed: {:?}",
                reply.error
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        drop(guest);
        assert!(pep.terminate().success());
        let records = pep.audit_records();
        let resumed = records
            .iter()
            .find(|r| r["kind"] == "audit_resumed")
            .expect("an audit_resumed record");
        assert!(
            resumed["error"]
                .as_str()
                .is_some_and(|e| e.contains("No space")),
            "{resumed}"
        );
        // The chain is whole: whatever part of a failed write reached the file was cut off.
        verify(&pexi_host::audit::log_files(&audit));
        let _ = std::process::Command::new("umount").arg(&*disk).status();
    });
}

#[tokio::test(flavor = "multi_thread")]
async fn a_request_body_that_stops_coming_ends_after_the_idle_timeout() {
    let upstream = Upstream::http("127.0.0.1").await;
    let mut options = api_options();
    options.limits = vec![("idle_timeout_ms", 800), ("total_timeout_ms", 600_000)];
    let pep = TestPep::start(options);
    let mut guest = pep.guest().await;
    let mut request = HttpRequest::new("POST", format!("http://api.test:{}/echo", upstream.port()));
    request.headers = vec![pexi_protocol::payload::HeaderField::new(
        "content-length",
        "100000",
    )];
    let id = guest
        .session()
        .open(MethodCall::HttpRequest(request))
        .expect("open");
    guest
        .session()
        .send_data(
            id,
            bytes::Bytes::from_static(b"the first bytes, then nothing"),
        )
        .expect("data");
    let error = loop {
        let event = tokio::time::timeout(Duration::from_secs(15), guest.conn.next_event())
            .await
            .expect("a stalled upload held its upstream past the idle timeout")
            .expect("io")
            .expect("open");
        match event {
            Event::StreamFailed { error, .. } => break error,
            Event::Head { .. } => panic!("answered before the body arrived"),
            _ => {}
        }
    };
    // The HTTP client's read timeout (idle_timeout_ms) covers the send: the upstream waits for a body
    // that does not come, and the stream ends with upstream_timeout instead of lasting total_timeout_ms.
    assert_eq!(error.code, ErrorCode::UpstreamTimeout, "{error:?}");
    assert!(!error.message.contains("took longer than"), "{error:?}");
}
