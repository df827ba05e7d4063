//! The session state machine driven deterministically: two real sessions joined by a byte pump.

mod support;

use bytes::Bytes;
use pexi_protocol::frame::{Frame, FrameType};
use pexi_protocol::payload::{
    cbor, ErrorCode, HeaderField, HttpRequest, HttpResponseHead, Limits, MethodCall,
    PolicyDecision, ResponseHead,
};
use pexi_protocol::session::{Config, Event, Origin, Session, SessionError};
use support::{client, established, established_with, events, pump, server, server_with, settle};

fn get(url: &str) -> MethodCall {
    MethodCall::HttpRequest(HttpRequest::new("GET", url))
}

fn http_head(status: u16) -> ResponseHead {
    ResponseHead::Http(HttpResponseHead {
        status,
        headers: vec![HeaderField::new("content-type", "text/plain")],
        final_url: "https://example.com/".into(),
        redirect_count: 0,
        decision_id: "d-1".into(),
    })
}

/// Opens `n` GET streams, delivers the OPENs and drains the host's `Opened` events.
fn open_streams(guest: &mut Session, host: &mut Session, n: usize) -> Vec<u32> {
    let ids = (0..n)
        .map(|i| {
            guest
                .open(get(&format!("https://a.example/{i}")))
                .expect("open")
        })
        .collect();
    settle(guest, host);
    events(host);
    ids
}

/// Frames queued by `session`, decoded back from bytes, without delivering them anywhere.
fn drain_frames(session: &mut Session) -> Vec<Frame> {
    std::iter::from_fn(|| session.poll_transmit()).collect()
}

fn failed_codes(events: &[Event]) -> Vec<(u32, ErrorCode, Origin)> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::StreamFailed {
                stream_id,
                error,
                origin,
            } => Some((*stream_id, error.code.clone(), *origin)),
            _ => None,
        })
        .collect()
}

#[test]
fn handshake_agrees_on_version_session_id_and_limits() {
    let limits = Limits {
        max_concurrent_streams: 3,
        max_redirects: 2,
        ..Limits::default()
    };
    let mut guest = client();
    let mut host = server_with(Config::new("test-host", "1.0"), limits);
    settle(&mut guest, &mut host);
    let (g, h) = match (events(&mut guest).as_slice(), events(&mut host).as_slice()) {
        ([Event::Established(g)], [Event::Established(h)]) => (g.clone(), h.clone()),
        other => panic!("{other:?}"),
    };
    assert_eq!(g.session_id, h.session_id);
    assert_eq!((g.version, h.version), (1, 1));
    assert_eq!(g.limits, limits);
    assert_eq!(g.peer.name, "test-host");
    assert_eq!(h.peer.name, "test-guest");
}

#[test]
fn version_mismatch_is_refused_and_the_host_waits_for_a_better_hello() {
    let mut config = Config::new("future-guest", "9.0");
    config.versions = vec![2, 3];
    let mut guest = Session::client(config);
    let mut host = server();
    settle(&mut guest, &mut host);
    let guest_events = events(&mut guest);
    match guest_events.as_slice() {
        [Event::Refused(error), Event::Closed] => {
            assert_eq!(error.code, ErrorCode::UnsupportedVersion);
            assert_eq!(error.details.supported_versions, vec![1]);
        }
        other => panic!("{other:?}"),
    }
    assert!(guest.is_closed());
    assert_eq!(
        guest.open(get("https://a.example/")),
        Err(SessionError::Closed)
    );
    assert!(matches!(
        events(&mut host).as_slice(),
        [Event::Rejected { stream_id: 0, error }] if error.code == ErrorCode::UnsupportedVersion
    ));
    assert!(!host.is_established());

    // The same host session (same port) accepts a guest that speaks version 1.
    let mut guest = client();
    settle(&mut guest, &mut host);
    assert!(guest.is_established() && host.is_established());
}

#[test]
fn a_new_guest_ignores_answers_left_in_the_port_by_an_earlier_session() {
    // An earlier guest on this port was refused and then answered; those bytes are still in the port.
    let mut config = Config::new("old-guest", "0");
    config.versions = vec![9];
    config.seed = 1;
    let mut old = Session::client(config);
    let mut host = server();
    pump(&mut old, &mut host);
    let mut stale = Vec::new();
    while let Some(frame) = host.poll_transmit() {
        frame.encode_into(&mut stale);
    }
    let mut old = client();
    pump(&mut old, &mut host);
    while let Some(frame) = host.poll_transmit() {
        frame.encode_into(&mut stale);
    }
    events(&mut host);
    // The rebooted guest reads the stale refusal and the stale HELLO_ACK before the host answers it.
    let mut config = Config::new("new-guest", "1");
    config.seed = 99;
    let mut guest = Session::client(config);
    guest.receive(&stale);
    assert!(
        events(&mut guest).is_empty(),
        "stale answers must not count"
    );
    assert!(!guest.is_established() && !guest.is_closed());
    settle(&mut guest, &mut host);
    assert!(guest.is_established());
    assert_eq!(
        guest.info().map(|i| i.session_id),
        host.info().map(|i| i.session_id)
    );
}

#[test]
fn nothing_but_hello_is_accepted_before_the_handshake() {
    let mut host = server();
    let open = Frame::new(FrameType::Open, 1, get("https://a.example/").encode());
    let ping = Frame::new(FrameType::Ping, 0, b"12345678".to_vec());
    host.receive(&[open.encode(), ping.encode()].concat());
    let evs = events(&mut host);
    assert_eq!(evs.len(), 2);
    assert!(evs.iter().all(|e| matches!(e,
        Event::Rejected { stream_id: 0, error } if error.code == ErrorCode::SessionReset && error.message.starts_with("no session: send HELLO"))));
    let sent = drain_frames(&mut host);
    assert!(sent
        .iter()
        .all(|f| f.frame_type == FrameType::Error && f.stream_id == 0));
    assert!(!host.is_established());
    // The client may not open either.
    let mut guest = client();
    assert_eq!(
        guest.open(get("https://a.example/")),
        Err(SessionError::NotEstablished)
    );
}

#[test]
fn a_request_and_its_streamed_response() {
    let (mut guest, mut host) = established();
    let id = guest
        .open(MethodCall::HttpRequest(HttpRequest {
            content_length: Some(11),
            ..HttpRequest::new("POST", "https://a.example/upload")
        }))
        .expect("open");
    assert_eq!(id, 1);
    guest
        .send_data(id, Bytes::from_static(b"hello "))
        .expect("data");
    guest
        .send_data(id, Bytes::from_static(b"world"))
        .expect("data");
    guest.send_end(id, Vec::new()).expect("end");
    settle(&mut guest, &mut host);

    let evs = events(&mut host);
    assert!(
        matches!(&evs[0], Event::Opened { stream_id: 1, call: MethodCall::HttpRequest(r) } if r.method == "POST")
    );
    let body: Vec<u8> = evs
        .iter()
        .filter_map(|e| match e {
            Event::Data { data, .. } => Some(data.to_vec()),
            _ => None,
        })
        .flatten()
        .collect();
    assert_eq!(body, b"hello world");
    assert!(matches!(evs.last(), Some(Event::End { stream_id: 1, .. })));
    host.release(id, body.len());

    host.send_head(id, &http_head(404)).expect("head");
    host.send_data(id, Bytes::from_static(b"not here"))
        .expect("data");
    host.send_end(id, vec![HeaderField::new("x-trailer", "t")])
        .expect("end");
    settle(&mut guest, &mut host);
    let evs = events(&mut guest);
    match evs.as_slice() {
        [Event::Head {
            stream_id: 1,
            head: ResponseHead::Http(head),
        }, Event::Data { data, .. }, Event::End { trailers, .. }] => {
            assert_eq!(head.status, 404, "an upstream 4xx is a normal HEAD");
            assert_eq!(&data[..], b"not here");
            assert_eq!(trailers, &vec![HeaderField::new("x-trailer", "t")]);
        }
        other => panic!("{other:?}"),
    }
    guest.release(id, 8);
    assert_eq!(guest.active_streams(), 0);
    assert_eq!(host.active_streams(), 0);
}

#[test]
fn policy_check_heads_are_typed_by_the_method() {
    let (mut guest, mut host) = established();
    let id = guest
        .open(MethodCall::PolicyCheck(HttpRequest::new(
            "GET",
            "https://a.example/",
        )))
        .expect("open");
    guest.send_end(id, Vec::new()).expect("end");
    settle(&mut guest, &mut host);
    events(&mut host);
    let decision = PolicyDecision {
        allow: true,
        reasons: vec!["allowlisted".into()],
        decision_id: "d-9".into(),
    };
    host.send_head(id, &ResponseHead::PolicyDecision(decision.clone()))
        .expect("head");
    host.send_end(id, Vec::new()).expect("end");
    settle(&mut guest, &mut host);
    assert!(matches!(
        events(&mut guest).as_slice(),
        [Event::Head { head: ResponseHead::PolicyDecision(d), .. }, Event::End { .. }] if *d == decision
    ));
}

#[test]
fn the_host_must_send_head_before_data_or_end() {
    let (mut guest, mut host) = established();
    let id = guest.open(get("https://a.example/")).expect("open");
    settle(&mut guest, &mut host);
    assert_eq!(
        host.send_data(id, Bytes::from_static(b"x")),
        Err(SessionError::HeadNotSent(id))
    );
    assert_eq!(
        host.send_end(id, vec![]),
        Err(SessionError::HeadNotSent(id))
    );
    assert_eq!(
        guest.send_head(id, &http_head(200)),
        Err(SessionError::WrongRole(
            pexi_protocol::session::Role::Server
        ))
    );
}

#[test]
fn unknown_methods_and_bad_params_get_their_own_codes() {
    let (_guest, mut host) = established();
    #[derive(serde::Serialize)]
    struct Raw<'a> {
        method: &'a str,
        params: serde_json::Value,
    }
    let frames = [
        Frame::new(
            FrameType::Open,
            1,
            cbor::encode(&Raw {
                method: "pep.fs.write",
                params: serde_json::json!({}),
            }),
        ),
        Frame::new(
            FrameType::Open,
            3,
            cbor::encode(&Raw {
                method: "pep.http.request",
                params: serde_json::json!({"method": "GET"}),
            }),
        ),
        Frame::new(FrameType::Open, 5, b"\xff\x00not cbor".to_vec()),
    ];
    host.receive(&frames.iter().flat_map(Frame::encode).collect::<Vec<u8>>());
    let codes: Vec<(u32, ErrorCode)> = events(&mut host)
        .into_iter()
        .map(|e| match e {
            Event::Rejected { stream_id, error } => (stream_id, error.code),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(
        codes,
        vec![
            (1, ErrorCode::MethodNotFound),
            (3, ErrorCode::InvalidRequest),
            (5, ErrorCode::InvalidRequest)
        ]
    );
    // Each refusal crosses the wire as an ERROR on its stream.
    let sent = drain_frames(&mut host);
    assert_eq!(
        sent.iter()
            .map(|f| (f.frame_type, f.stream_id))
            .collect::<Vec<_>>(),
        vec![
            (FrameType::Error, 1),
            (FrameType::Error, 3),
            (FrameType::Error, 5)
        ]
    );
}

#[test]
fn stream_ids_must_be_odd_and_increasing() {
    let (_guest, mut host) = established();
    let open = |id| Frame::new(FrameType::Open, id, get("https://a.example/").encode()).encode();
    host.receive(&open(5));
    assert!(matches!(
        events(&mut host).as_slice(),
        [Event::Opened { stream_id: 5, .. }]
    ));
    for bad in [3, 5, 8] {
        host.receive(&open(bad));
        let evs = events(&mut host);
        assert!(
            evs.iter().any(|e| matches!(e,
                Event::Rejected { stream_id, error } | Event::StreamFailed { stream_id, error, .. }
                    if *stream_id == bad && error.code == ErrorCode::ProtocolError)),
            "id {bad}: {evs:?}"
        );
    }
    host.receive(&open(7));
    assert!(matches!(
        events(&mut host).as_slice(),
        [Event::Opened { stream_id: 7, .. }]
    ));
}

#[test]
fn concurrent_stream_limit_is_enforced_on_both_sides() {
    let limits = Limits {
        max_concurrent_streams: 2,
        ..Limits::default()
    };
    let (mut guest, mut host) = established_with(server_with(Config::new("h", "1"), limits));
    guest.open(get("https://a.example/1")).expect("first");
    guest.open(get("https://a.example/2")).expect("second");
    assert_eq!(
        guest.open(get("https://a.example/3")),
        Err(SessionError::TooManyStreams(2))
    );
    settle(&mut guest, &mut host);
    // A guest that ignores the limit is refused by the host with a retryable resource_exhausted.
    host.receive(&Frame::new(FrameType::Open, 5, get("https://a.example/3").encode()).encode());
    let evs = events(&mut host);
    assert!(
        matches!(evs.last(), Some(Event::Rejected { stream_id: 5, error })
        if error.code == ErrorCode::ResourceExhausted && error.retryable && error.details.limit == Some(2))
    );
}

#[test]
fn a_sender_never_exceeds_its_credit() {
    // Small windows so that the 1 MiB body needs many round trips.
    let mut host_config = Config::new("h", "1");
    host_config.receive.initial_stream_window = 10_000;
    host_config.receive.initial_connection_window = 25_000;
    let (mut guest, mut host) = established_with(server_with(host_config, Limits::default()));
    let ids = open_streams(&mut guest, &mut host, 3);

    let total = 1 << 20;
    let mut sent = vec![0usize; ids.len()];
    let mut received = vec![0usize; ids.len()];
    for _round in 0..10_000 {
        for (i, &id) in ids.iter().enumerate() {
            let room = guest.send_capacity(id).min(total - sent[i]).min(3_000);
            if room > 0 {
                guest
                    .send_data(id, Bytes::from(vec![i as u8; room]))
                    .expect("within capacity");
                sent[i] += room;
            }
            assert_eq!(
                guest.send_data(id, Bytes::from(vec![0; guest.send_capacity(id) + 1])),
                Err(SessionError::InsufficientCapacity {
                    requested: guest.send_capacity(id) + 1,
                    available: guest.send_capacity(id)
                })
            );
        }
        pump(&mut guest, &mut host);
        // Held-but-unreleased data can never exceed the windows granted.
        let mut held = vec![0usize; ids.len()];
        for event in events(&mut host) {
            match event {
                Event::Data { stream_id, data } => {
                    let i = ids
                        .iter()
                        .position(|&x| x == stream_id)
                        .expect("known stream");
                    assert!(data.iter().all(|&b| b == i as u8), "streams do not mix");
                    held[i] += data.len();
                }
                Event::StreamFailed { .. } | Event::Rejected { .. } => panic!("{event:?}"),
                _ => {}
            }
        }
        assert!(
            held.iter().all(|&h| h <= 10_000),
            "stream window exceeded: {held:?}"
        );
        assert!(
            held.iter().sum::<usize>() <= 25_000,
            "session window exceeded: {held:?}"
        );
        for (i, &id) in ids.iter().enumerate() {
            received[i] += held[i];
            host.release(id, held[i]);
        }
        pump(&mut host, &mut guest);
        events(&mut guest);
        if received.iter().all(|&r| r == total) {
            return;
        }
    }
    panic!("transfer did not complete: {received:?}");
}

#[test]
fn data_beyond_credit_fails_the_stream_or_the_session() {
    let mut host_config = Config::new("h", "1");
    host_config.receive.initial_stream_window = 100;
    host_config.receive.initial_connection_window = 150;
    let (mut guest, mut host) = established_with(server_with(host_config, Limits::default()));
    let a = guest.open(get("https://a.example/a")).expect("open");
    let b = guest.open(get("https://a.example/b")).expect("open");
    settle(&mut guest, &mut host);
    events(&mut host);
    // A misbehaving guest ignores the stream window: that stream alone fails.
    host.receive(&Frame::new(FrameType::Data, a, vec![0u8; 101]).encode());
    assert_eq!(
        failed_codes(&events(&mut host)),
        vec![(a, ErrorCode::ProtocolError, Origin::Local)]
    );
    // The 101 discarded bytes went back into the session window, so 100 more fit on stream b.
    host.receive(&Frame::new(FrameType::Data, b, vec![0u8; 100]).encode());
    assert!(matches!(events(&mut host).as_slice(), [Event::Data { .. }]));
    // Past the session window the peer's accounting is broken: GOAWAY.
    host.receive(&Frame::new(FrameType::Data, b, vec![0u8; 60]).encode());
    let evs = events(&mut host);
    assert!(evs.iter().any(|e| matches!(e, Event::Rejected { stream_id: 0, error } if error.code == ErrorCode::ProtocolError)), "{evs:?}");
    let sent = drain_frames(&mut host);
    assert!(sent.iter().any(|f| f.frame_type == FrameType::GoAway));
    assert!(!host.is_established());
    // The guest's streams cannot complete on a session the host ended: all fail, and the guest closes.
    guest.receive(&sent.iter().flat_map(Frame::encode).collect::<Vec<u8>>());
    let evs = events(&mut guest);
    let failed = failed_codes(&evs);
    assert_eq!(
        failed,
        vec![
            (a, ErrorCode::SessionReset, Origin::Local),
            (b, ErrorCode::SessionReset, Origin::Local)
        ]
    );
    assert!(matches!(evs.last(), Some(Event::Closed)));
    assert!(guest.is_closed());
}

#[test]
fn a_malformed_session_window_update_ends_the_session_a_stream_one_only_the_stream() {
    for payload in [vec![0, 0, 0, 0], vec![0, 0, 1]] {
        let (mut guest, mut host) = established();
        let a = guest.open(get("https://a.example/a")).expect("open");
        settle(&mut guest, &mut host);
        events(&mut host);
        // On a stream: that stream fails, the session carries on.
        host.receive(&Frame::new(FrameType::WindowUpdate, a, payload.clone()).encode());
        assert_eq!(
            failed_codes(&events(&mut host)),
            vec![(a, ErrorCode::ProtocolError, Origin::Local)]
        );
        assert!(host.is_established());
        // On stream 0 (zero increment, wrong length): GOAWAY protocol_error, as for an overflow (§6).
        host.receive(&Frame::new(FrameType::WindowUpdate, 0, payload).encode());
        let sent = drain_frames(&mut host);
        assert!(
            sent.iter().any(|f| f.frame_type == FrameType::GoAway),
            "{sent:?}"
        );
        assert!(!host.is_established());
    }
}

#[test]
fn discarded_data_still_returns_session_credit() {
    let mut host_config = Config::new("h", "1");
    host_config.receive.initial_stream_window = 8_000;
    host_config.receive.initial_connection_window = 8_000;
    let (mut guest, mut host) = established_with(server_with(host_config, Limits::default()));
    for round in 0..5 {
        let id = guest
            .open(get(&format!("https://a.example/{round}")))
            .expect("open");
        pump(&mut guest, &mut host);
        // The host refuses the stream at once...
        host.send_error(
            id,
            pexi_protocol::payload::ErrorPayload::new(ErrorCode::PolicyDenied, "no"),
        )
        .expect("error");
        // ...while the guest, not yet aware, spends the whole session window on it.
        assert_eq!(
            guest.send_capacity(id),
            8_000,
            "round {round}: session credit leaked"
        );
        guest
            .send_data(id, Bytes::from(vec![1u8; 8_000]))
            .expect("data");
        settle(&mut guest, &mut host);
        let evs = events(&mut guest);
        assert!(failed_codes(&evs).contains(&(id, ErrorCode::PolicyDenied, Origin::Peer)));
        assert!(
            events(&mut host)
                .iter()
                .all(|e| !matches!(e, Event::Data { .. })),
            "discarded, not delivered"
        );
    }
}

#[test]
fn data_held_by_a_failed_stream_is_released_with_it() {
    let mut host_config = Config::new("h", "1");
    host_config.receive.initial_stream_window = 5_000;
    host_config.receive.initial_connection_window = 5_000;
    let (mut guest, mut host) = established_with(server_with(host_config, Limits::default()));
    let a = guest.open(get("https://a.example/a")).expect("open");
    guest
        .send_data(a, Bytes::from(vec![0u8; 5_000]))
        .expect("data");
    settle(&mut guest, &mut host);
    events(&mut host); // the host application never releases these 5000 bytes...
    guest.cancel(a).expect("cancel"); // ...and the guest gives up on the stream.
    settle(&mut guest, &mut host);
    assert_eq!(
        failed_codes(&events(&mut host)),
        vec![(a, ErrorCode::Cancelled, Origin::Peer)]
    );
    let b = guest.open(get("https://a.example/b")).expect("open");
    assert_eq!(guest.send_capacity(b), 5_000);
}

#[test]
fn control_frames_overtake_queued_data() {
    let (mut guest, _host) = established();
    let id = guest.open(get("https://a.example/")).expect("open");
    guest
        .send_data(id, Bytes::from(vec![0u8; 200_000]))
        .expect("data");
    guest.ping(*b"urgent!!").expect("ping");
    let order: Vec<FrameType> = drain_frames(&mut guest)
        .iter()
        .map(|f| f.frame_type)
        .collect();
    assert_eq!(order[0], FrameType::Ping);
    assert_eq!(order[1], FrameType::Open, "stream frames keep their order");
    assert!(order[2..].iter().all(|t| *t == FrameType::Data));
    assert_eq!(order.len(), 2 + 200_000usize.div_ceil(65_536));
}

#[test]
fn an_error_after_data_arrives_after_that_data() {
    let (mut guest, mut host) = established();
    let id = guest.open(get("https://a.example/big")).expect("open");
    guest.send_end(id, vec![]).expect("end");
    settle(&mut guest, &mut host);
    events(&mut host);
    // The host streams the response up to its cap, then fails the stream, all before anything is written.
    host.send_head(id, &http_head(200)).expect("head");
    host.send_data(id, Bytes::from(vec![b'x'; 100_000]))
        .expect("data");
    host.send_error(
        id,
        pexi_protocol::payload::ErrorPayload::new(ErrorCode::ResponseTooLarge, "cap"),
    )
    .expect("error");
    settle(&mut guest, &mut host);
    let evs = events(&mut guest);
    let received: usize = evs
        .iter()
        .map(|e| match e {
            Event::Data { data, .. } => data.len(),
            _ => 0,
        })
        .sum();
    assert!(matches!(evs.first(), Some(Event::Head { .. })));
    assert_eq!(received, 100_000, "every byte before the error arrives");
    assert_eq!(
        failed_codes(&evs),
        vec![(id, ErrorCode::ResponseTooLarge, Origin::Peer)]
    );
    assert!(matches!(evs.last(), Some(Event::StreamFailed { .. })));
}

#[test]
fn ping_is_answered_with_the_same_bytes() {
    let (mut guest, mut host) = established();
    guest.ping(*b"pexi-ok!").expect("ping");
    settle(&mut guest, &mut host);
    assert_eq!(events(&mut guest), vec![Event::Pong(*b"pexi-ok!")]);
}

#[test]
fn cancel_before_open_left_sends_nothing() {
    let (mut guest, mut host) = established();
    let id = guest.open(get("https://a.example/")).expect("open");
    guest
        .send_data(id, Bytes::from_static(b"abc"))
        .expect("data");
    guest.cancel(id).expect("cancel");
    assert!(drain_frames(&mut guest).is_empty());
    // The id stays used: the next stream gets a higher one, and the host accepts the gap.
    let next = guest.open(get("https://a.example/")).expect("open");
    assert_eq!(next, id + 2);
    settle(&mut guest, &mut host);
    assert!(
        matches!(events(&mut host).as_slice(), [Event::Opened { stream_id, .. }] if *stream_id == next)
    );
}

#[test]
fn cancel_mid_response_stops_the_host_and_late_frames_are_harmless() {
    let (mut guest, mut host) = established();
    let id = guest.open(get("https://a.example/sse")).expect("open");
    guest.send_end(id, vec![]).expect("end");
    settle(&mut guest, &mut host);
    events(&mut host);
    host.send_head(id, &http_head(200)).expect("head");
    host.send_data(id, Bytes::from_static(b"data: 1\n\n"))
        .expect("data");
    settle(&mut guest, &mut host);
    events(&mut guest);
    guest.cancel(id).expect("cancel");
    // The host is still writing when the CANCEL crosses.
    host.send_data(id, Bytes::from_static(b"data: 2\n\n"))
        .expect("data");
    settle(&mut guest, &mut host);
    assert_eq!(
        failed_codes(&events(&mut host)),
        vec![(id, ErrorCode::Cancelled, Origin::Peer)]
    );
    assert!(
        events(&mut guest).is_empty(),
        "late DATA for a cancelled stream is dropped quietly"
    );
    assert_eq!(
        host.send_data(id, Bytes::from_static(b"x")),
        Err(SessionError::UnknownStream(id))
    );
}

#[test]
fn resync_after_garbage_fails_in_flight_streams_and_recovers() {
    let (mut guest, mut host) = established();
    let ids = open_streams(&mut guest, &mut host, 3);

    // Half of a DATA frame whose header was damaged (as a reconnect mid-frame leaves it), noise holding a
    // false magic, then a valid PING.
    let mut garbage = Frame::new(FrameType::Data, 1, vec![7u8; 1000]).encode()[..500].to_vec();
    garbage[21] ^= 0xff;
    garbage.extend_from_slice(b"\x00\xffPEXInoise");
    garbage.extend_from_slice(&Frame::new(FrameType::Ping, 0, b"after-gb".to_vec()).encode());
    host.receive(&garbage);

    let evs = events(&mut host);
    assert!(
        matches!(&evs[0], Event::Rejected { stream_id: 0, error } if error.details.frame_error.as_deref() == Some("bad_header_crc"))
    );
    let failed = failed_codes(&evs);
    assert_eq!(failed.iter().map(|f| f.0).collect::<Vec<_>>(), ids);
    assert!(failed
        .iter()
        .all(|(_, code, origin)| *code == ErrorCode::SessionReset && *origin == Origin::Local));
    assert!(host.is_resyncing());
    // The PING after the garbage was found, but only SYNC, SYNC_ACK and HELLO count until the resync ends.
    let sent = drain_frames(&mut host);
    assert_eq!(
        sent.iter().map(|f| f.frame_type).collect::<Vec<_>>(),
        vec![FrameType::Error, FrameType::Sync]
    );

    // The guest learns what happened, fails the same streams, and answers the SYNC.
    guest.receive(&sent.iter().flat_map(Frame::encode).collect::<Vec<u8>>());
    settle(&mut guest, &mut host);
    let guest_events = events(&mut guest);
    assert!(matches!(&guest_events[0], Event::PeerError(e) if e.code == ErrorCode::ProtocolError));
    let guest_failed = failed_codes(&guest_events);
    assert_eq!(guest_failed.iter().map(|f| f.0).collect::<Vec<_>>(), ids);
    assert!(guest_failed
        .iter()
        .all(|(_, code, _)| *code == ErrorCode::SessionReset));
    assert!(matches!(events(&mut host).as_slice(), [Event::Resynced]));
    assert!(host.is_established() && guest.is_established());

    // The session is usable again, with the same session id and fresh stream ids.
    let id = guest.open(get("https://a.example/after")).expect("open");
    assert!(id > *ids.last().expect("ids"));
    settle(&mut guest, &mut host);
    assert!(
        matches!(events(&mut host).as_slice(), [Event::Opened { stream_id, .. }] if *stream_id == id)
    );
    assert_eq!(
        guest.info().map(|i| i.session_id),
        host.info().map(|i| i.session_id)
    );
}

#[test]
fn the_guest_can_resync_after_a_reconnect_and_a_lost_sync_is_retried() {
    let (mut guest, mut host) = established();
    let id = guest.open(get("https://a.example/")).expect("open");
    settle(&mut guest, &mut host);
    events(&mut host);
    guest.transport_reconnected();
    assert_eq!(
        failed_codes(&events(&mut guest)),
        vec![(id, ErrorCode::SessionReset, Origin::Local)]
    );
    // The first SYNC is lost on the wire.
    assert_eq!(
        drain_frames(&mut guest)
            .iter()
            .map(|f| f.frame_type)
            .collect::<Vec<_>>(),
        vec![FrameType::Sync]
    );
    assert!(guest.is_resyncing());
    // The adapter's retry timer fires: a fresh nonce goes out and is answered.
    assert!(guest.awaiting_answer());
    guest.retry();
    settle(&mut guest, &mut host);
    assert_eq!(events(&mut guest), vec![Event::Resynced]);
    assert_eq!(
        failed_codes(&events(&mut host)),
        vec![(id, ErrorCode::SessionReset, Origin::Local)]
    );
    assert!(guest.open(get("https://a.example/")).is_ok());
}

#[test]
fn an_unanswered_hello_is_retried_with_a_fresh_nonce() {
    let mut guest = client();
    let mut host = server();
    // The first HELLO reaches the host, but its answer is lost on the way back.
    pump(&mut guest, &mut host);
    let first_answer = drain_frames(&mut host);
    assert!(guest.awaiting_answer());
    guest.retry();
    pump(&mut guest, &mut host);
    // The late answer to the first HELLO arrives before the answer to the second: it must not count.
    guest.receive(
        &first_answer
            .iter()
            .flat_map(Frame::encode)
            .collect::<Vec<u8>>(),
    );
    assert!(!guest.is_established());
    pump(&mut host, &mut guest);
    assert!(guest.is_established() && !guest.awaiting_answer());
    assert_eq!(
        guest.info().map(|i| i.session_id),
        host.info().map(|i| i.session_id),
        "both sides agree on the session the second HELLO started"
    );
}

#[test]
fn a_sync_to_a_host_without_a_session_asks_for_hello() {
    let mut host = server();
    host.receive(&Frame::new(FrameType::Sync, 0, 42u64.to_be_bytes().to_vec()).encode());
    assert!(matches!(events(&mut host).as_slice(),
        [Event::Rejected { stream_id: 0, error }] if error.code == ErrorCode::SessionReset));
}

#[test]
fn a_new_hello_restarts_the_session() {
    let (mut guest, mut host) = established();
    let id = guest.open(get("https://a.example/")).expect("open");
    settle(&mut guest, &mut host);
    events(&mut host);
    let first_id = host.info().expect("info").session_id;
    // The guest rebooted: a fresh client on the same port.
    let mut guest = client();
    settle(&mut guest, &mut host);
    let evs = events(&mut host);
    assert_eq!(
        failed_codes(&evs),
        vec![(id, ErrorCode::SessionReset, Origin::Local)]
    );
    assert!(matches!(evs.last(), Some(Event::Established(info)) if info.session_id != first_id));
    assert_eq!(
        guest.open(get("https://a.example/")),
        Ok(1),
        "stream ids start over in a new session"
    );
}

#[test]
fn goaway_fails_unprocessed_streams_and_blocks_new_ones() {
    let (mut guest, mut host) = established();
    let a = guest.open(get("https://a.example/a")).expect("open");
    pump(&mut guest, &mut host);
    let b = guest.open(get("https://a.example/b")).expect("open");
    // The host decides to shut down after seeing only stream a.
    host.go_away(ErrorCode::SessionReset, "host shutting down");
    settle(&mut guest, &mut host);
    let evs = events(&mut guest);
    assert_eq!(
        failed_codes(&evs),
        vec![(b, ErrorCode::SessionReset, Origin::Peer)]
    );
    assert!(matches!(evs.last(), Some(Event::GoAway(g)) if g.last_stream_id == a));
    assert_eq!(
        guest.open(get("https://a.example/c")),
        Err(SessionError::GoingAway)
    );
    // Stream a still completes.
    host.send_head(a, &http_head(200)).expect("head");
    host.send_end(a, vec![]).expect("end");
    settle(&mut guest, &mut host);
    assert!(matches!(
        events(&mut guest).as_slice(),
        [Event::Head { .. }, Event::End { .. }]
    ));
}

#[test]
fn a_guest_goaway_still_gets_its_open_streams_answered() {
    let (mut guest, mut host) = established();
    let a = guest.open(get("https://a.example/a")).expect("open");
    settle(&mut guest, &mut host);
    events(&mut host);
    // The guest is leaving: it says so with last_stream_id 0 (it serves no host-opened streams).
    guest.go_away(ErrorCode::SessionReset, "guest shutting down");
    settle(&mut guest, &mut host);
    let evs = events(&mut host);
    assert!(failed_codes(&evs).is_empty(), "{evs:?}");
    assert!(matches!(evs.last(), Some(Event::GoAway(g)) if g.last_stream_id == 0));
    // The host still answers stream a, and the guest receives the answer.
    host.send_head(a, &http_head(200)).expect("head");
    host.send_data(a, Bytes::from_static(b"bye")).expect("data");
    host.send_end(a, vec![]).expect("end");
    settle(&mut guest, &mut host);
    assert!(matches!(
        events(&mut guest).as_slice(),
        [Event::Head { .. }, Event::Data { .. }, Event::End { .. }]
    ));
    // The guest itself opens nothing more...
    assert_eq!(
        guest.open(get("https://a.example/b")),
        Err(SessionError::GoingAway)
    );
    let b = a + 2;
    // ...and an OPEN sent anyway breaks the rule and is refused.
    let late = MethodCall::HttpRequest(HttpRequest::new("GET", "https://a.example/late"));
    let frame = Frame::new(FrameType::Open, b + 2, late.encode());
    host.receive(&frame.encode());
    assert!(
        matches!(events(&mut host).as_slice(), [Event::Rejected { stream_id, error }]
            if *stream_id == b + 2 && error.code == ErrorCode::ProtocolError),
    );
}

#[test]
fn a_guest_goaway_does_not_overtake_the_opens_queued_before_it() {
    let (mut guest, mut host) = established();
    let a = guest.open(get("https://a.example/a")).expect("open");
    guest.go_away(ErrorCode::SessionReset, "leaving");
    settle(&mut guest, &mut host);
    let evs = events(&mut host);
    assert!(
        matches!(evs.as_slice(), [Event::Opened { stream_id, .. }, Event::GoAway(_)] if *stream_id == a),
        "{evs:?}"
    );
}

#[test]
fn huge_announced_windows_are_used_only_up_to_the_documented_maxima() {
    use pexi_protocol::payload::MAX_WINDOW;
    use pexi_protocol::session::{MAX_USED_CONNECTION_WINDOW, MAX_USED_STREAM_WINDOW};
    let mut guest_config = Config::new("g", "1");
    guest_config.receive.initial_stream_window = MAX_WINDOW;
    guest_config.receive.initial_connection_window = MAX_WINDOW;
    let mut guest = Session::client(guest_config);
    let mut host = server();
    settle(&mut guest, &mut host);
    events(&mut guest);
    events(&mut host);
    let ids = open_streams(&mut guest, &mut host, 8);
    for &id in &ids {
        host.send_head(id, &http_head(200)).expect("head");
        assert_eq!(host.send_capacity(id), MAX_USED_STREAM_WINDOW as usize);
    }
    let mut sent = 0usize;
    for &id in &ids {
        let room = host.send_capacity(id);
        host.send_data(id, Bytes::from(vec![0; room]))
            .expect("data");
        sent += room;
    }
    assert_eq!(sent, MAX_USED_CONNECTION_WINDOW as usize);
    assert!(ids.iter().all(|&id| host.send_capacity(id) == 0));
}

#[test]
fn a_hundred_interleaved_streams() {
    let limits = Limits {
        max_concurrent_streams: 100,
        ..Limits::default()
    };
    let (mut guest, mut host) = established_with(server_with(Config::new("h", "1"), limits));
    let ids = open_streams(&mut guest, &mut host, 100);
    for &id in &ids {
        guest.send_end(id, vec![]).expect("end");
    }
    settle(&mut guest, &mut host);
    events(&mut host);
    for (n, &id) in ids.iter().enumerate().rev() {
        host.send_head(id, &http_head(200)).expect("head");
        host.send_data(id, Bytes::from(format!("body {n}")))
            .expect("data");
        host.send_end(id, vec![]).expect("end");
    }
    settle(&mut guest, &mut host);
    let mut bodies = std::collections::BTreeMap::new();
    for event in events(&mut guest) {
        if let Event::Data { stream_id, data } = event {
            guest.release(stream_id, data.len());
            bodies.insert(stream_id, String::from_utf8(data.to_vec()).expect("utf8"));
        }
    }
    assert_eq!(bodies.len(), 100);
    for (n, id) in ids.iter().enumerate() {
        assert_eq!(bodies[id], format!("body {n}"));
    }
    assert_eq!(guest.active_streams(), 0);
    assert_eq!(host.active_streams(), 0);
}

#[test]
fn frames_that_break_stream_rules_fail_only_that_stream() {
    let (mut guest, mut host) = established();
    let a = guest.open(get("https://a.example/a")).expect("open");
    let b = guest.open(get("https://a.example/b")).expect("open");
    settle(&mut guest, &mut host);
    events(&mut host);
    // The host sends DATA on a before any HEAD: the guest fails a, tells the host, and b is untouched.
    guest.receive(&Frame::new(FrameType::Data, a, b"early".to_vec()).encode());
    assert_eq!(
        failed_codes(&events(&mut guest)),
        vec![(a, ErrorCode::ProtocolError, Origin::Local)]
    );
    settle(&mut guest, &mut host);
    assert_eq!(
        failed_codes(&events(&mut host)),
        vec![(a, ErrorCode::ProtocolError, Origin::Peer)]
    );
    host.send_head(b, &http_head(200)).expect("head");
    host.send_end(b, vec![]).expect("end");
    settle(&mut guest, &mut host);
    assert!(matches!(
        events(&mut guest).as_slice(),
        [Event::Head { .. }, Event::End { .. }]
    ));
    // A HEAD that does not decode for its method.
    let c = guest.open(get("https://a.example/c")).expect("open");
    settle(&mut guest, &mut host);
    events(&mut host);
    guest.receive(
        &Frame::new(
            FrameType::Head,
            c,
            cbor::encode(&serde_json::json!({"status": "two hundred"})),
        )
        .encode(),
    );
    assert_eq!(
        failed_codes(&events(&mut guest)),
        vec![(c, ErrorCode::ProtocolError, Origin::Local)]
    );
    // Frames for a stream nobody opened are refused; frames in the wrong place on stream 0 too.
    host.receive(&Frame::new(FrameType::End, 99, Vec::new()).encode());
    host.receive(&Frame::new(FrameType::Data, 0, b"x".to_vec()).encode());
    host.receive(&Frame::new(FrameType::Ping, 3, b"12345678".to_vec()).encode());
    let evs = events(&mut host);
    assert_eq!(evs.len(), 3, "{evs:?}");
    assert!(evs.iter().all(
        |e| matches!(e, Event::Rejected { error, .. } if error.code == ErrorCode::ProtocolError)
    ));
    assert!(host.is_established());
    // ...but an ERROR or CANCEL for a stream nobody opened is not answered: the two sessions (each would
    // answer the other's ERROR with its own) must not bounce errors forever.
    drain_frames(&mut host);
    drain_frames(&mut guest);
    let refusal =
        pexi_protocol::payload::ErrorPayload::new(ErrorCode::ProtocolError, "END for stream 99");
    for side in [&mut host, &mut guest] {
        side.receive(&Frame::new(FrameType::Error, 99, cbor::encode(&refusal)).encode());
        side.receive(&Frame::new(FrameType::Cancel, 97, Vec::new()).encode());
        assert!(events(side).is_empty());
        assert!(drain_frames(side).is_empty(), "an error was answered");
    }
}

/// `write` buffers ahead of credit up to the cap, the buffers drain fairly (one frame per stream in turn)
/// as credit arrives, a full buffer reports `Writable` once room appears, and END follows the data.
#[test]
fn written_data_waits_for_credit_in_a_bounded_buffer_and_streams_take_turns() {
    use pexi_protocol::session::STREAM_SEND_BUFFER;
    let mut host_config = Config::new("h", "1");
    host_config.receive.initial_stream_window = 40_000;
    host_config.receive.initial_connection_window = 1 << 20;
    host_config.receive.max_frame = 8_192;
    let (mut guest, mut host) = established_with(server_with(host_config, Limits::default()));
    let ids = open_streams(&mut guest, &mut host, 2);
    let (a, b) = (ids[0], ids[1]);

    // Far more than the 40 000 bytes of credit is accepted, up to the buffer's cap and no further.
    guest
        .write(a, Bytes::from(vec![1u8; STREAM_SEND_BUFFER]))
        .expect("fits the buffer");
    assert_eq!(guest.write_room(a), 0);
    assert_eq!(
        guest.write(a, Bytes::from_static(b"x")),
        Err(SessionError::SendBufferFull {
            stream_id: a,
            requested: 1,
            room: 0
        })
    );
    guest
        .write(b, Bytes::from(vec![2u8; 100_000]))
        .expect("fits the buffer");
    guest.write_end(b, Vec::new()).expect("end after the data");
    assert_eq!(guest.write_room(b), 0, "nothing may follow END");

    // The first frames alternate between the two streams.
    let frames = drain_frames(&mut guest);
    let data: Vec<u32> = frames
        .iter()
        .filter(|f| f.frame_type == FrameType::Data)
        .map(|f| f.stream_id)
        .collect();
    assert_eq!(&data[..4], &[a, b, a, b], "streams take turns");
    let sent = |id: u32| -> usize {
        frames
            .iter()
            .filter(|f| f.frame_type == FrameType::Data && f.stream_id == id)
            .map(|f| f.payload.len())
            .sum()
    };
    assert_eq!(sent(a), 40_000, "no more than the stream's credit");
    assert_eq!(sent(b), 40_000);
    assert!(
        frames.iter().all(|f| f.frame_type != FrameType::End),
        "END waits behind the data"
    );
    assert!(
        events(&mut guest)
            .iter()
            .any(|e| matches!(e, Event::Writable { stream_id } if *stream_id == a)),
        "the full buffer reports room"
    );
    assert_eq!(guest.write_room(a), 40_000);
    assert!(guest.poll_transmit().is_none(), "nothing without credit");

    // Deliver, let the host release everything, and run to the end: every byte arrives, in order, then END.
    for frame in frames {
        let mut wire = Vec::new();
        frame.encode_into(&mut wire);
        host.receive(&wire);
    }
    let mut received = [0usize; 2];
    let mut ended = false;
    for _round in 0..1_000 {
        for event in events(&mut host) {
            match event {
                Event::Data { stream_id, data } => {
                    let i = usize::from(stream_id == b);
                    assert!(data.iter().all(|&x| x == i as u8 + 1), "streams do not mix");
                    received[i] += data.len();
                    host.release(stream_id, data.len());
                }
                Event::End { stream_id, .. } => {
                    assert_eq!(stream_id, b);
                    assert_eq!(received[1], 100_000, "END after all of the data");
                    ended = true;
                }
                Event::StreamFailed { .. } | Event::Rejected { .. } => panic!("{event:?}"),
                _ => {}
            }
        }
        pump(&mut host, &mut guest);
        events(&mut guest);
        pump(&mut guest, &mut host);
        if ended && received[0] == STREAM_SEND_BUFFER {
            return;
        }
    }
    panic!("transfer did not complete: {received:?}, ended {ended}");
}

#[test]
fn an_error_written_after_data_follows_it_and_send_error_drops_it() {
    let (mut guest, mut host) = established();
    let ids = open_streams(&mut guest, &mut host, 2);
    for &id in &ids {
        host.send_head(id, &http_head(200)).expect("head");
        host.write(id, Bytes::from(vec![7u8; 1000])).expect("write");
    }
    host.write_error(
        ids[0],
        pexi_protocol::payload::ErrorPayload::new(ErrorCode::ResponseTooLarge, "cut"),
    )
    .expect("error after data");
    // At once: the buffered data is dropped, the ERROR goes ahead.
    host.send_error(
        ids[1],
        pexi_protocol::payload::ErrorPayload::new(ErrorCode::GuestStalled, "stalled"),
    )
    .expect("error now");
    let kinds: Vec<(u32, FrameType)> = drain_frames(&mut host)
        .iter()
        .map(|f| (f.stream_id, f.frame_type))
        .collect();
    assert_eq!(
        kinds,
        vec![
            (ids[0], FrameType::Head),
            (ids[1], FrameType::Head),
            (ids[1], FrameType::Error),
            (ids[0], FrameType::Data),
            (ids[0], FrameType::Error),
        ]
    );
}

/// Moves `total` bytes on `id` from `sender` to `receiver` over a wire that takes one round to carry the
/// sender's frames (as a transport with latency does: DATA is in flight while credit and PINGs travel
/// back); the receiver consumes everything as it arrives. `each_round` runs on the receiver just before
/// the round's frames reach it. Returns the most credit the sender had on the stream and the most the
/// receiver held at once.
fn transfer(
    sender: &mut Session,
    receiver: &mut Session,
    id: u32,
    total: usize,
    mut each_round: impl FnMut(&mut Session),
) -> (usize, usize) {
    let (mut sent, mut received, mut most_credit, mut most_held) = (0, 0, 0, 0);
    let mut in_flight: Vec<u8> = Vec::new();
    for _round in 0..10_000 {
        let room = sender.send_capacity(id).min(total - sent);
        most_credit = most_credit.max(sender.send_capacity(id));
        // A tenth of the window per frame, as 64 KiB frames are a quarter of the default window.
        let mut left = room;
        while left > 0 {
            let n = left.min(1_000);
            sender
                .send_data(id, Bytes::from(vec![7; n]))
                .expect("within capacity");
            left -= n;
        }
        sent += room;
        let mut sending = Vec::new();
        while let Some(frame) = sender.poll_transmit() {
            frame.encode_into(&mut sending);
        }
        each_round(receiver);
        receiver.receive(&std::mem::replace(&mut in_flight, sending));
        let mut held = 0;
        for event in events(receiver) {
            match event {
                Event::Data { stream_id, data } if stream_id == id => {
                    assert!(data.iter().all(|&b| b == 7));
                    held += data.len();
                }
                Event::StreamFailed { .. } | Event::Rejected { .. } => {
                    panic!("receiver: {event:?}")
                }
                _ => {}
            }
        }
        most_held = most_held.max(held);
        received += held;
        receiver.release(id, held);
        pump(receiver, sender);
        for event in events(sender) {
            if let Event::StreamFailed { .. } | Event::Rejected { .. } = event {
                panic!("sender: {event:?}");
            }
        }
        if received == total {
            return (most_credit, most_held);
        }
    }
    panic!("transfer on stream {id} stalled: {received} of {total}");
}

/// Sends all the credit `session` has on `id` as one DATA of `byte`s.
fn spend_credit(session: &mut Session, id: u32, byte: u8) {
    let room = session.send_capacity(id);
    if room > 0 {
        session
            .send_data(id, Bytes::from(vec![byte; room]))
            .expect("within capacity");
    }
}

fn small_window_host() -> Session {
    let mut config = Config::new("h", "1");
    config.receive.initial_stream_window = 10_000;
    config.receive.initial_connection_window = 40_000;
    server_with(config, Limits::default())
}

#[test]
fn a_stream_window_that_limits_a_transfer_grows_up_to_the_session_window_and_no_further() {
    let (mut guest, mut host) = established_with(small_window_host());
    let id = open_streams(&mut guest, &mut host, 1)[0];
    let (most_credit, most_held) = transfer(&mut guest, &mut host, id, 1 << 20, |_| {});
    assert!(
        most_credit > 10_000,
        "the window never grew: at most {most_credit} bytes of credit"
    );
    assert!(
        most_credit <= 40_000 && most_held <= 40_000,
        "past the session window: credit {most_credit}, held {most_held}"
    );
}

#[test]
fn a_reader_that_does_not_read_keeps_the_initial_window() {
    let (mut guest, mut host) = established_with(small_window_host());
    let ids = open_streams(&mut guest, &mut host, 2);
    // Another stream's transfer grows the session's window first; this reader still gets only its own.
    let (most_credit, _) = transfer(&mut guest, &mut host, ids[0], 1 << 20, |_| {});
    assert!(most_credit > 10_000);
    let id = ids[1];
    for _round in 0..20 {
        spend_credit(&mut guest, id, 1);
        settle(&mut guest, &mut host);
    }
    let held: usize = events(&mut host)
        .iter()
        .map(|e| match e {
            Event::Data { data, .. } => data.len(),
            _ => 0,
        })
        .sum();
    assert_eq!(held, 10_000, "the host got exactly one initial window");
    assert_eq!(guest.send_capacity(id), 0);
}

#[test]
fn a_small_response_sends_no_window_probe() {
    let (mut guest, mut host) = established();
    let id = open_streams(&mut guest, &mut host, 1)[0];
    host.send_head(id, &http_head(200)).expect("head");
    host.send_data(id, Bytes::from(vec![0; 1024]))
        .expect("data");
    pump(&mut host, &mut guest);
    events(&mut guest);
    guest.release(id, 1024);
    assert!(
        drain_frames(&mut guest)
            .iter()
            .all(|f| f.frame_type != FrameType::Ping),
        "a 1 KB body is no reason to measure the window"
    );
}

/// A guest that answers the host's window probes with PONGs it makes up (every payload a probe could
/// have) raises the host's receive windows at most to the session window the host already grants.
#[test]
fn forged_pongs_cannot_raise_the_hosts_windows_past_its_session_window() {
    let (mut guest, mut host) = established_with(small_window_host());
    let id = open_streams(&mut guest, &mut host, 1)[0];
    let mut received = 0;
    for round in 0..50u32 {
        spend_credit(&mut guest, id, 2);
        pump(&mut guest, &mut host);
        let mut forged = Vec::new();
        for probe in 1..=round + 1 {
            let mut payload = b"bdp:".to_vec();
            payload.extend_from_slice(&probe.to_be_bytes());
            Frame::new(FrameType::Pong, 0, payload).encode_into(&mut forged);
        }
        host.receive(&forged);
        let held: usize = events(&mut host)
            .iter()
            .map(|e| match e {
                Event::Data { data, .. } => data.len(),
                Event::StreamFailed { .. } | Event::Rejected { .. } => panic!("{e:?}"),
                _ => 0,
            })
            .sum();
        assert!(held <= 40_000, "round {round}: the host held {held} bytes");
        received += held;
        host.release(id, held);
        pump(&mut host, &mut guest);
        events(&mut guest);
        assert!(
            guest.send_capacity(id) <= 40_000,
            "round {round}: {} bytes of credit",
            guest.send_capacity(id)
        );
    }
    assert!(received > 0);
}

/// The guest's windows grow for a download, and a stream whose OPEN was still queued when they grew is
/// not promised credit the host never hears of (the host would drop a WINDOW_UPDATE for a stream it does
/// not know, and the guest, waiting for half of a window the host never got, would stall that stream).
#[test]
fn a_download_grows_the_guests_window_and_streams_not_yet_opened_get_no_credit_early() {
    let mut config = Config::new("g", "1");
    config.seed = 3;
    config.receive.initial_stream_window = 10_000;
    config.receive.initial_connection_window = 40_000;
    let mut guest = Session::client(config);
    let mut host = server();
    settle(&mut guest, &mut host);
    events(&mut guest);
    events(&mut host);
    let id = open_streams(&mut guest, &mut host, 1)[0];
    host.send_head(id, &http_head(200)).expect("head");
    // Each round the guest opens one more stream just before the host's frames (PONGs among them) arrive,
    // so its OPEN is still queued when the window grows.
    let mut opened = Vec::new();
    let (_, most_held) = transfer(&mut host, &mut guest, id, 600_000, |guest| {
        if opened.len() < 100 {
            opened.push(guest.open(get("https://a.example/other")).expect("open"));
        }
    });
    assert!(
        most_held > 10_000,
        "the guest's window never grew: it held at most {most_held} bytes at once"
    );
    assert!(most_held <= 40_000, "past the session window: {most_held}");
    assert!(opened.len() > 10);
    for stream in opened {
        host.send_head(stream, &http_head(200)).expect("head");
        transfer(&mut host, &mut guest, stream, 60_000, |_| {});
    }
}
