//! The tokio adapter over a real Unix socket pair: a host task serving requests and a guest driving them.

mod support;

use bytes::Bytes;
use pexi_protocol::io::Connection;
use pexi_protocol::payload::{ErrorCode, HttpRequest, HttpResponseHead, MethodCall, ResponseHead};
use pexi_protocol::session::Event;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// A tiny host: answers every request with a 200 whose body echoes the request body, reversed.
async fn echo_host(socket: UnixStream) -> std::io::Result<Vec<Event>> {
    let mut conn = Connection::new(socket, support::server());
    let mut bodies: std::collections::HashMap<u32, Vec<u8>> = Default::default();
    let mut seen = Vec::new();
    while let Some(event) = conn.next_event().await? {
        let session = conn.session_mut();
        match &event {
            Event::Data { stream_id, data } => {
                bodies
                    .entry(*stream_id)
                    .or_default()
                    .extend_from_slice(data);
                session.release(*stream_id, data.len());
            }
            Event::End { stream_id, .. } => {
                let mut body = bodies.remove(stream_id).unwrap_or_default();
                body.reverse();
                let head = ResponseHead::Http(HttpResponseHead {
                    status: 200,
                    headers: vec![],
                    final_url: "https://a.example/".into(),
                    redirect_count: 0,
                    decision_id: format!("d-{stream_id}"),
                });
                session.send_head(*stream_id, &head).expect("head");
                session
                    .send_data(*stream_id, Bytes::from(body))
                    .expect("data");
                session.send_end(*stream_id, vec![]).expect("end");
            }
            _ => {}
        }
        seen.push(event);
    }
    Ok(seen)
}

#[tokio::test]
async fn a_request_over_a_unix_socket_and_a_clean_eof() {
    let (guest_socket, host_socket) = UnixStream::pair().expect("socketpair");
    let host = tokio::spawn(echo_host(host_socket));

    let mut guest = Connection::new(guest_socket, support::client());
    assert!(matches!(
        guest.next_event().await.expect("io"),
        Some(Event::Established(_))
    ));
    let id = guest
        .session_mut()
        .open(MethodCall::HttpRequest(HttpRequest::new(
            "POST",
            "https://a.example/",
        )))
        .expect("open");
    guest
        .session_mut()
        .send_data(id, Bytes::from_static(b"stressed"))
        .expect("data");
    guest.session_mut().send_end(id, vec![]).expect("end");
    let mut body = Vec::new();
    loop {
        match guest.next_event().await.expect("io").expect("not eof") {
            Event::Head {
                head: ResponseHead::Http(head),
                ..
            } => assert_eq!(head.status, 200),
            Event::Data { stream_id, data } => {
                body.extend_from_slice(&data);
                guest.session_mut().release(stream_id, data.len());
            }
            Event::End { .. } => break,
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(body, b"desserts");

    // An in-flight stream when the transport closes fails with session_reset; then the host sees EOF.
    let pending = guest
        .session_mut()
        .open(MethodCall::HttpRequest(HttpRequest::new(
            "GET",
            "https://a.example/",
        )))
        .expect("open");
    guest.flush().await.expect("flush");
    let (mut socket, _session) = guest.into_inner();
    socket.shutdown().await.expect("shutdown");
    drop(socket);
    let host_events = host.await.expect("join").expect("io");
    assert!(host_events.iter().any(|e| matches!(e,
        Event::StreamFailed { stream_id, error, .. } if *stream_id == pending && error.code == ErrorCode::SessionReset)));
    assert!(matches!(host_events.last(), Some(Event::Closed)));
}

#[tokio::test(start_paused = true)]
async fn an_unanswered_sync_is_retried() {
    let (guest_socket, mut far_end) = UnixStream::pair().expect("socketpair");
    let mut guest = Connection::new(guest_socket, support::client());
    // Play the host by hand: answer the HELLO, then stay silent while the guest resyncs.
    let mut host = support::server();
    let mut buf = vec![0u8; 4096];
    guest.flush().await.expect("flush");
    let n = far_end.read(&mut buf).await.expect("read");
    host.receive(&buf[..n]);
    let mut out = Vec::new();
    while let Some(f) = host.poll_transmit() {
        f.encode_into(&mut out);
    }
    far_end.write_all(&out).await.expect("write");
    assert!(matches!(
        guest.next_event().await.expect("io"),
        Some(Event::Established(_))
    ));

    guest.session_mut().transport_reconnected();
    let waiter = tokio::spawn(async move {
        let event = guest.next_event().await;
        (guest, event)
    });
    // Two SYNCs with different nonces reach the far end: the first, and the retry a second later.
    let mut syncs = Vec::new();
    let mut decoder = pexi_protocol::frame::FrameDecoder::new(65_536);
    while syncs.len() < 2 {
        let n = far_end.read(&mut buf).await.expect("read");
        let mut input = &buf[..n];
        while let Some(frame) = decoder.decode(&mut input) {
            let frame = frame.expect("valid");
            if frame.frame_type == pexi_protocol::frame::FrameType::Sync {
                syncs.push(frame.payload);
            }
        }
    }
    assert_ne!(syncs[0], syncs[1], "a retry uses a fresh nonce");
    waiter.abort();
}
