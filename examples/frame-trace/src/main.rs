//! Runs a guest and a host session against each other in memory and prints every frame that crosses,
//! header fields and payload decoded, so the protocol can be read off a real exchange:
//!
//! ```sh
//! cargo run -p pexi-example-frame-trace
//! ```
//!
//! The host side here answers by hand; the real PEP decides with policy and performs the request.
//!
//! `--decode` reads frames as hex lines on stdin and prints how the reference implementation reads each
//! (see `decode.rs`): a tool for captures, and the Python client's tests use it against their encodings.

use bytes::Bytes;
use pexi_protocol::frame::{Frame, FrameType, HEADER_LEN};
use pexi_protocol::payload::{
    ErrorCode, ErrorDetails, ErrorPayload, HttpRequest, HttpResponseHead, Limits, MethodCall,
    PolicyDecision, ResponseHead,
};
use pexi_protocol::session::{Config, Event, Session};

mod decode;

fn main() -> std::process::ExitCode {
    if std::env::args().nth(1).as_deref() == Some("--decode") {
        return decode::run();
    }
    trace();
    std::process::ExitCode::SUCCESS
}

fn trace() {
    let mut guest = Session::client(Config::new("frame-trace-guest", "0.1.0"));
    let mut host = Session::server(Config::new("frame-trace-host", "0.1.0"), Limits::default());
    exchange(&mut guest, &mut host);

    let check = guest
        .open(MethodCall::PolicyCheck(HttpRequest::new(
            "GET",
            "https://evil.example/",
        )))
        .expect("session is established");
    guest.send_end(check, vec![]).expect("stream is open");
    let post = guest
        .open(MethodCall::HttpRequest(HttpRequest {
            content_length: Some(5),
            ..HttpRequest::new("POST", "https://api.example.com/v1/echo")
        }))
        .expect("session is established");
    guest
        .send_data(post, Bytes::from_static(b"hello"))
        .expect("within credit");
    guest.send_end(post, vec![]).expect("stream is open");
    exchange(&mut guest, &mut host);

    host.send_head(
        check,
        &ResponseHead::PolicyDecision(PolicyDecision {
            allow: false,
            reasons: vec!["evil.example is not allowlisted".into()],
            decision_id: "d-1".into(),
        }),
    )
    .expect("stream is open");
    host.send_end(check, vec![]).expect("head was sent");
    host.send_head(
        post,
        &ResponseHead::Http(HttpResponseHead {
            status: 200,
            headers: vec![],
            final_url: "https://api.example.com/v1/echo".into(),
            redirect_count: 0,
            decision_id: "d-2".into(),
        }),
    )
    .expect("stream is open");
    host.send_data(post, Bytes::from_static(b"olleh"))
        .expect("within credit");
    host.send_error(
        post,
        ErrorPayload::new(
            ErrorCode::ResponseTooLarge,
            "the example cuts the body here",
        )
        .with_details(ErrorDetails {
            limit: Some(5),
            ..ErrorDetails::default()
        }),
    )
    .expect("stream is open");
    exchange(&mut guest, &mut host);
}

/// Moves frames both ways until both sides are quiet, printing each frame and then each side's events.
fn exchange(guest: &mut Session, host: &mut Session) {
    while forward(guest, host, "guest → host") | forward(host, guest, "host → guest") {}
    for (session, label) in [(guest, "guest"), (host, "host")] {
        while let Some(event) = session.poll_event() {
            if let Event::Data { stream_id, data } = &event {
                session.release(*stream_id, data.len());
            }
            println!("    {label} event: {event:?}");
        }
    }
}

/// Delivers every queued frame of `from` to `to`; true if there were any.
fn forward(from: &mut Session, to: &mut Session, label: &str) -> bool {
    let mut moved = false;
    while let Some(frame) = from.poll_transmit() {
        print_frame(label, &frame);
        to.receive(&frame.encode());
        moved = true;
    }
    moved
}

fn print_frame(label: &str, frame: &Frame) {
    let bytes = frame.encode();
    println!(
        "{label}: {} stream {} flags {:#06x}, {} payload bytes",
        frame.frame_type.name(),
        frame.stream_id,
        frame.flags.0,
        frame.payload.len()
    );
    println!("    header  {}", hex(&bytes[..HEADER_LEN]));
    match frame.frame_type {
        FrameType::Data => println!(
            "    payload {:?} (raw bytes)",
            String::from_utf8_lossy(&frame.payload)
        ),
        _ if frame.payload.is_empty() => {}
        _ => match ciborium::from_reader::<ciborium::Value, _>(&frame.payload[..]) {
            Ok(value) if frame.payload.first().is_some_and(|b| b >> 5 == 5) => {
                let json = serde_json::to_string(&value).unwrap_or_else(|_| format!("{value:?}"));
                println!("    payload {json} (CBOR)");
            }
            _ => println!("    payload {} (fixed-size binary)", hex(&frame.payload)),
        },
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}
