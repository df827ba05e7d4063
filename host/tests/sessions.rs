//! Session-level behaviour of a real `pexi serve`: concurrency, isolation between streams and between
//! sessions, hostile bytes, shutdown, and the reconnecting `connect:` transport.

mod support;

use std::time::{Duration, Instant};

use pexi_protocol::frame::{crc32c, Frame, FrameDecoder, FrameType};
use pexi_protocol::payload::{cbor, ErrorPayload, HttpRequest, MethodCall};
use pexi_protocol::session::{Config as SessionConfig, Event, Session};
use support::{loopback_options, Guest, TestPep, Upstream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

fn get(url: &str) -> MethodCall {
    MethodCall::HttpRequest(HttpRequest::new("GET", url))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hundred_concurrent_streams_on_one_session() {
    let upstream = Upstream::http("127.0.0.1").await;
    let mut options = loopback_options(&[("api.test", "127.0.0.1")], &["api.test"]);
    options.limits = vec![("max_concurrent_streams", 100)];
    let pep = TestPep::start(options);
    let mut guest = pep.guest().await;
    let mut ids = Vec::new();
    for i in 0..100 {
        let id = guest
            .session()
            .open(get(&format!(
                "http://api.test:{}/big?n={}",
                upstream.port(),
                1000 + i
            )))
            .expect("open");
        guest.session().send_end(id, vec![]).expect("end");
        ids.push(id);
    }
    let mut sizes = std::collections::HashMap::new();
    let mut done = 0;
    while done < 100 {
        match guest.conn.next_event().await.expect("io").expect("open") {
            Event::Data { stream_id, data } => {
                *sizes.entry(stream_id).or_insert(0usize) += data.len();
                guest.session().release(stream_id, data.len());
            }
            Event::End { .. } => done += 1,
            Event::StreamFailed {
                stream_id, error, ..
            } => panic!("stream {stream_id}: {error:?}"),
            _ => {}
        }
    }
    for (i, id) in ids.iter().enumerate() {
        assert_eq!(sizes[id], 1000 + i, "stream {id}");
    }
    assert_eq!(upstream.hits().len(), 100);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_slow_reader_on_one_stream_does_not_stall_the_others() {
    let upstream = Upstream::http("127.0.0.1").await;
    let pep = TestPep::start(loopback_options(
        &[("api.test", "127.0.0.1")],
        &["api.test"],
    ));
    let mut guest = pep.guest().await;
    // 5 MB that the guest never consumes: it fills that stream's window and the PEP's buffer for it.
    let stuck = guest
        .session()
        .open(get(&format!(
            "http://api.test:{}/big?n=5000000",
            upstream.port()
        )))
        .expect("open");
    guest.session().send_end(stuck, vec![]).expect("end");
    let mut stuck_bytes = 0;
    // Meanwhile ten other requests complete, one after the other, while the stuck one holds its window: the
    // order of events is the proof (a stall would leave this loop waiting, and the test would not end).
    for i in 0..10 {
        let id = guest
            .session()
            .open(get(&format!(
                "http://api.test:{}/big?n={}",
                upstream.port(),
                10_000 + i
            )))
            .expect("open");
        guest.session().send_end(id, vec![]).expect("end");
        let mut got = 0;
        loop {
            match guest.conn.next_event().await.expect("io").expect("open") {
                Event::Data { stream_id, data } if stream_id == id => {
                    got += data.len();
                    guest.session().release(id, data.len());
                }
                Event::Data { stream_id, data } if stream_id == stuck => stuck_bytes += data.len(),
                Event::End { stream_id, .. } if stream_id == id => break,
                Event::StreamFailed {
                    stream_id, error, ..
                } => panic!("{stream_id}: {error:?}"),
                _ => {}
            }
        }
        assert_eq!(got, 10_000 + i);
    }
    assert!(
        stuck_bytes <= 256 * 1024,
        "the stuck stream stays within its window: {stuck_bytes}"
    );
    // Consuming it now lets it finish.
    guest.session().release(stuck, stuck_bytes);
    let reply = guest.collect(stuck).await;
    assert_eq!(
        stuck_bytes + reply.body.len(),
        5_000_000,
        "{:?}",
        reply.error
    );
}

/// Reads frames from a raw socket until `want` says stop, with a deadline.
async fn read_frames(stream: &mut UnixStream, mut want: impl FnMut(&Frame) -> bool) -> Vec<Frame> {
    let mut decoder = FrameDecoder::new(65_536);
    let mut frames = Vec::new();
    let mut buf = vec![0u8; 65_536];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let n = tokio::time::timeout_at(deadline, stream.read(&mut buf))
            .await
            .expect("frames in time")
            .expect("read");
        assert!(n > 0, "connection closed; frames so far {frames:?}");
        let mut input = &buf[..n];
        while let Some(frame) = decoder.decode(&mut input) {
            let frame = frame.expect("the PEP sends valid frames");
            let stop = want(&frame);
            frames.push(frame);
            if stop {
                return frames;
            }
        }
    }
}

fn error_of(frame: &Frame) -> ErrorPayload {
    cbor::decode("ERROR", &frame.payload).expect("ERROR payload")
}

#[tokio::test(flavor = "multi_thread")]
async fn hostile_bytes_get_protocol_errors_and_other_sessions_carry_on() {
    let upstream = Upstream::http("127.0.0.1").await;
    let pep = TestPep::start(loopback_options(
        &[("api.test", "127.0.0.1")],
        &["api.test"],
    ));
    let url = format!("http://api.test:{}/hello", upstream.port());
    let mut good = pep.guest().await;

    // Garbage before any HELLO.
    let mut raw = UnixStream::connect(&pep.socket).await.expect("connect");
    raw.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    let frames = read_frames(&mut raw, |f| f.frame_type == FrameType::Error).await;
    let error = error_of(frames.last().expect("frame"));
    assert_eq!(error.code.as_str(), "protocol_error");
    assert_eq!(error.details.frame_error.as_deref(), Some("bad_magic"));

    // An oversize length with a valid header CRC: refused from the header alone.
    let mut header = b"PEXI\x01\x11\x00\x00\x00\x00\x00\x01".to_vec();
    header.extend_from_slice(&0x7fff_ffffu32.to_be_bytes());
    header.extend_from_slice(&0u32.to_be_bytes());
    let crc = crc32c(&header);
    header.extend_from_slice(&crc.to_be_bytes());
    let mut raw2 = UnixStream::connect(&pep.socket).await.expect("connect");
    raw2.write_all(&header).await.expect("write");
    let frames = read_frames(&mut raw2, |f| f.frame_type == FrameType::Error).await;
    let error = error_of(frames.last().expect("frame"));
    assert_eq!(
        error.details.frame_error.as_deref(),
        Some("oversize_length")
    );

    // The same socket can still say HELLO and be served: bad input never wedges a connection.
    let mut session = Session::client(SessionConfig::new("raw", "1"));
    let mut out = Vec::new();
    while let Some(f) = session.poll_transmit() {
        f.encode_into(&mut out);
    }
    raw2.write_all(&out).await.expect("hello");
    let frames = read_frames(&mut raw2, |f| f.frame_type == FrameType::HelloAck).await;
    assert_eq!(
        frames.last().map(|f| f.frame_type),
        Some(FrameType::HelloAck)
    );

    // An established session that then sends garbage mid-stream gets an ERROR and a resync.
    let mut bad = pep.guest().await;
    let id = bad.session().open(get(&url)).expect("open");
    bad.conn.flush().await.expect("flush");
    let (mut stream, mut session) = bad.conn.into_inner();
    stream.write_all(&[0xff; 64]).await.expect("garbage");
    let frames = read_frames(&mut stream, |f| f.frame_type == FrameType::Sync).await;
    let error = frames
        .iter()
        .find(|f| f.frame_type == FrameType::Error && f.stream_id == 0)
        .map(error_of)
        .expect("ERROR on stream 0");
    assert_eq!(error.code.as_str(), "protocol_error");
    // The guest's session processes the same frames: the in-flight stream fails with session_reset.
    for frame in &frames {
        session.receive(&frame.encode());
    }
    let failed: Vec<_> = std::iter::from_fn(|| session.poll_event())
        .filter_map(|e| match e {
            Event::StreamFailed {
                stream_id, error, ..
            } => Some((stream_id, error.code)),
            _ => None,
        })
        .collect();
    assert!(
        failed
            .iter()
            .any(|(s, c)| *s == id && c.as_str() == "session_reset"),
        "{failed:?}"
    );

    // Meanwhile the well-behaved session was never disturbed.
    for _ in 0..3 {
        let reply = good.get(&url).await;
        assert_eq!(reply.body, b"hello");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_misbehaving_guest_cannot_exceed_the_stream_limit() {
    let mut options = loopback_options(&[], &[]);
    options.limits = vec![("max_concurrent_streams", 2)];
    let pep = TestPep::start(options);
    let guest = pep.guest().await;
    let (mut stream, _) = guest.conn.into_inner();
    let mut out = Vec::new();
    for id in [1u32, 3, 5] {
        Frame::new(FrameType::Open, id, get("https://blocked.test/").encode())
            .encode_into(&mut out);
    }
    stream.write_all(&out).await.expect("write");
    let frames = read_frames(&mut stream, |f| {
        f.frame_type == FrameType::Error && f.stream_id == 5
    })
    .await;
    let error = error_of(frames.last().expect("frame"));
    assert_eq!(error.code.as_str(), "resource_exhausted");
    assert_eq!(error.details.limit, Some(2));
    assert!(error.retryable);
}

/// The outcome record of `stream_id`, waiting for it to be written.
fn outcome_of(pep: &TestPep, stream_id: u32) -> serde_json::Value {
    pep.wait_record(&format!("outcome for stream {stream_id}"), |r| {
        r["kind"] == "outcome" && r["stream_id"] == stream_id
    })
}

/// What the guest saw on each stream until the connection ended (bounded: a PEP that never answers fails
/// the test instead of hanging it).
#[derive(Default, Debug)]
struct Seen {
    bytes: std::collections::HashMap<u32, usize>,
    ended: Vec<u32>,
    failed: Vec<(u32, String)>,
    goaway: bool,
    closed: bool,
}

async fn watch_until_closed(guest: &mut Guest, limit: Duration) -> Seen {
    let mut seen = Seen::default();
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let event = match tokio::time::timeout_at(deadline, guest.conn.next_event()).await {
            Err(_) => return seen,
            Ok(event) => event.expect("io"),
        };
        match event {
            None => {
                seen.closed = true;
                return seen;
            }
            Some(Event::Data { stream_id, data }) => {
                *seen.bytes.entry(stream_id).or_default() += data.len();
                guest.session().release(stream_id, data.len());
            }
            Some(Event::End { stream_id, .. }) => seen.ended.push(stream_id),
            Some(Event::StreamFailed {
                stream_id, error, ..
            }) => seen
                .failed
                .push((stream_id, error.code.as_str().to_string())),
            Some(Event::GoAway(_)) => seen.goaway = true,
            Some(_) => {}
        }
    }
}

/// Opens a paced stream that lasts forever and one that finishes in about 0.8 s, and waits until both
/// have their HEAD.
async fn open_forever_and_short(guest: &mut Guest, port: u16) -> (u32, u32) {
    let forever = guest
        .session()
        .open(get(&format!("http://api.test:{port}/forever?gap_ms=50")))
        .expect("open");
    guest.session().send_end(forever, vec![]).expect("end");
    let short = guest
        .session()
        .open(get(&format!("http://api.test:{port}/sse?n=8&gap_ms=100")))
        .expect("open");
    guest.session().send_end(short, vec![]).expect("end");
    let mut heads = 0;
    while heads < 2 {
        match guest.conn.next_event().await.expect("io").expect("open") {
            Event::Head { .. } => heads += 1,
            Event::Data { stream_id, data } => guest.session().release(stream_id, data.len()),
            other => panic!("{other:?}"),
        }
    }
    (forever, short)
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_drains_open_streams_then_cuts_the_rest_and_says_so() {
    let upstream = Upstream::http("127.0.0.1").await;
    let mut options = loopback_options(&[("api.test", "127.0.0.1")], &["api.test"]);
    options.limits = vec![("drain_timeout_ms", 2000)];
    let mut pep = TestPep::start(options);
    let mut guest = pep.guest().await;
    let (forever, short) = open_forever_and_short(&mut guest, upstream.port()).await;
    let started = Instant::now();
    let status = pep.terminate();
    assert!(status.success(), "{status:?}");
    // Exited, and not before the drain deadline (how much later depends on the machine's load).
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(1900), "exit after {took:?}");
    let seen = watch_until_closed(&mut guest, Duration::from_secs(10)).await;
    assert!(seen.goaway && seen.closed, "{seen:?}");
    // The stream that could finish within the deadline finished, all of it.
    assert_eq!(seen.ended, vec![short], "{seen:?}");
    // The other was cut after the data it had, with session_reset.
    assert_eq!(
        seen.failed,
        vec![(forever, "session_reset".to_string())],
        "{seen:?}"
    );
    let short_outcome = outcome_of(&pep, short);
    assert_eq!(short_outcome["status"], 200, "{short_outcome}");
    assert!(short_outcome["error"].is_null(), "{short_outcome}");
    let cut = outcome_of(&pep, forever);
    assert_eq!(cut["error"], "shutdown", "{cut}");
    assert_eq!(cut["status"], 200, "{cut}");
    let delivered = cut["response_body"]["bytes_delivered"]
        .as_u64()
        .expect("bytes_delivered");
    // At 1 KiB per 50 ms for about 2 s; what the guest read cannot exceed what was delivered.
    assert!(delivered >= 10 * 1024, "{cut}");
    assert!(
        delivered as usize >= seen.bytes[&forever],
        "{cut} vs {seen:?}"
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while !upstream.aborted.load(std::sync::atomic::Ordering::SeqCst) {
        assert!(
            Instant::now() < deadline,
            "upstream request survived shutdown"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_guest_goaway_drains_its_streams_then_the_connection_closes() {
    let upstream = Upstream::http("127.0.0.1").await;
    let mut options = loopback_options(&[("api.test", "127.0.0.1")], &["api.test"]);
    options.limits = vec![("drain_timeout_ms", 2000)];
    let pep = TestPep::start(options);
    let mut guest = pep.guest().await;
    let (forever, short) = open_forever_and_short(&mut guest, upstream.port()).await;
    // The guest is leaving; last_stream_id = 0 (it serves no host-opened streams). Its own streams must
    // still be answered: before, the host dropped them and the guest waited forever.
    guest.session().go_away(
        pexi_protocol::payload::ErrorCode::SessionReset,
        "guest leaving",
    );
    let started = Instant::now();
    let seen = watch_until_closed(&mut guest, Duration::from_secs(10)).await;
    assert!(
        seen.closed,
        "the host never closed the connection: {seen:?}"
    );
    assert!(started.elapsed() >= Duration::from_millis(1900), "{seen:?}");
    assert_eq!(seen.ended, vec![short], "{seen:?}");
    assert_eq!(
        seen.failed,
        vec![(forever, "session_reset".to_string())],
        "{seen:?}"
    );
    assert_eq!(outcome_of(&pep, forever)["error"], "shutdown");
    let records = pep.audit_records();
    assert!(
        records
            .iter()
            .any(|r| r["kind"] == "session" && r["event"] == "drained_after_guest_goaway"),
        "{records:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn connect_mode_reconnects_and_rehandshakes() {
    // The test plays QEMU: a chardev that listens; the PEP connects to it.
    let dir = support::temp_dir("chardev");
    let chardev = dir.join("serial.sock");
    let listener = tokio::net::UnixListener::bind(&chardev).expect("bind");
    let config_dir = support::temp_dir("connect-config");
    let audit = config_dir.join("audit.jsonl");
    let mut doc: toml::Table = include_str!("../default-config.toml")
        .parse()
        .expect("toml");
    let pep_table = doc["pep"].as_table_mut().expect("pep");
    pep_table.insert(
        "listen".into(),
        toml::Value::Array(vec![format!("connect:{}", chardev.display()).into()]),
    );
    pep_table["audit"]
        .as_table_mut()
        .expect("audit")
        .insert("path".into(), audit.display().to_string().into());
    support::copy_policies(&config_dir);
    let config = config_dir.join("config.toml");
    std::fs::write(&config, toml::to_string(&doc).expect("toml")).expect("config");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_pexi"))
        .args(["serve", "--config"])
        .arg(&config)
        .env("RUST_LOG", "warn")
        .spawn()
        .expect("spawn");

    for round in 0..2 {
        let (stream, _) = tokio::time::timeout(Duration::from_secs(10), listener.accept())
            .await
            .expect("the PEP connects")
            .expect("accept");
        let mut guest = Guest {
            conn: pexi_protocol::io::Connection::new(
                stream,
                Session::client(SessionConfig::new("vm", "1")),
            ),
        };
        assert!(
            matches!(
                guest.conn.next_event().await.expect("io"),
                Some(Event::Established(_))
            ),
            "round {round}"
        );
        let reply = guest
            .call(
                MethodCall::PolicyCheck(HttpRequest::new("GET", "https://example.com/")),
                b"",
            )
            .await;
        assert!(reply.head.is_some(), "round {round}: {:?}", reply.error);
        // The VM goes away; the PEP must come back for the next one.
        drop(guest);
    }
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(&config_dir);
}

#[tokio::test(flavor = "multi_thread")]
async fn unread_request_bodies_do_not_leak_session_credit() {
    let upstream = Upstream::http("127.0.0.1").await;
    let pep = TestPep::start(loopback_options(
        &[("api.test", "127.0.0.1")],
        &["api.test"],
    ));
    let mut guest = pep.guest().await;
    // Twelve policy checks that (wrongly) carry 200 KB bodies: 2.4 MB in all, past the 1 MiB session
    // window. Their workers answer normally without reading the bodies; the session must still get the
    // credit back, or every later upload on it stalls.
    for _ in 0..12 {
        let check = HttpRequest::new("POST", "https://denied.test/upload");
        let reply = tokio::time::timeout(
            Duration::from_secs(10),
            guest.call(MethodCall::PolicyCheck(check), &vec![0u8; 200_000]),
        )
        .await
        .expect("the request was not starved of credit");
        assert!(reply.head.is_some(), "{:?}", reply.error);
    }
    let post = HttpRequest {
        content_length: Some(200_000),
        ..HttpRequest::new("POST", format!("http://api.test:{}/echo", upstream.port()))
    };
    let reply = tokio::time::timeout(
        Duration::from_secs(10),
        guest.call(MethodCall::HttpRequest(post), &vec![1u8; 200_000]),
    )
    .await
    .expect("the session still has credit");
    assert_eq!(reply.body.len(), 200_000);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_connection_without_a_timely_hello_is_closed() {
    let mut options = loopback_options(&[], &[]);
    options.limits = vec![("handshake_timeout_ms", 300)];
    let pep = TestPep::start(options);
    // Silent, and trickling a HELLO one byte at a time: both are cut at the deadline.
    for trickle in [false, true] {
        let mut raw = UnixStream::connect(&pep.socket).await.expect("connect");
        let started = Instant::now();
        let closed = async {
            let mut buf = [0u8; 64];
            loop {
                if trickle {
                    // The first bytes of a frame header, never completed.
                    let _ = raw.write_all(b"P").await;
                }
                match tokio::time::timeout(Duration::from_millis(100), raw.read(&mut buf)).await {
                    Ok(Ok(0)) | Ok(Err(_)) => return,
                    _ => {}
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(10), closed)
            .await
            .expect("the PEP closed the connection");
        assert!(started.elapsed() >= Duration::from_millis(250));
    }
    // Audit records other than decisions are written behind the effect: wait for both.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let records = pep.audit_records();
        let timeouts = records
            .iter()
            .filter(|r| r["kind"] == "session" && r["event"] == "handshake_timeout")
            .count();
        if timeouts == 2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{timeouts} handshake_timeout records: {records:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // A guest that says HELLO at once is served as before.
    let mut guest = pep.guest().await;
    let reply = guest
        .call(
            MethodCall::PolicyCheck(HttpRequest::new("GET", "https://example.com/")),
            b"",
        )
        .await;
    assert!(reply.head.is_some(), "{:?}", reply.error);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_guest_goaway_right_after_its_open_gets_the_answer_then_the_connection_closes() {
    let upstream = Upstream::http("127.0.0.1").await;
    let pep = TestPep::start(loopback_options(
        &[("api.test", "127.0.0.1")],
        &["api.test"],
    ));
    let mut guest = pep.guest().await;
    let id = guest
        .session()
        .open(get(&format!("http://api.test:{}/hello", upstream.port())))
        .expect("open");
    guest.session().send_end(id, vec![]).expect("end");
    guest
        .session()
        .go_away(pexi_protocol::payload::ErrorCode::SessionReset, "leaving");
    let seen = watch_until_closed(&mut guest, Duration::from_secs(5)).await;
    assert_eq!(seen.ended, vec![id], "{seen:?}");
    assert!(seen.closed, "{seen:?}");
}
