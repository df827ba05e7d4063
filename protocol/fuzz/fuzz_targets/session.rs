//! A guest and a host session, established, then driven by a script of operations from the fuzzer: raw
//! bytes injected into either side, and every API call a real adapter or application makes. The sessions
//! must never panic (a sender exceeding its credit would trip an internal assertion), never buffer more
//! than one frame, and always be able to re-handshake afterwards.
//!
//! Input format: a sequence of operations, each an opcode byte; opcodes 0 and 1 are followed by a length
//! byte pair (big-endian) and that many bytes to inject.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use pexi_protocol::frame::HEADER_LEN;
use pexi_protocol::payload::{ErrorCode, ErrorPayload, HttpRequest, HttpResponseHead, Limits, MethodCall, ResponseHead};
use pexi_protocol::session::{Config, Event, Session};

fn pump(from: &mut Session, to: &mut Session) {
    let mut bytes = Vec::new();
    while let Some(frame) = from.poll_transmit() {
        frame.encode_into(&mut bytes);
    }
    to.receive(&bytes);
}

fn ok_head() -> ResponseHead {
    ResponseHead::Http(HttpResponseHead {
        status: 200,
        headers: vec![],
        final_url: "https://a.example/".into(),
        redirect_count: 0,
        decision_id: "d".into(),
    })
}

fn small(name: &str, seed: u64) -> Config {
    let mut config = Config::new(name, "fuzz");
    config.seed = seed;
    config.receive.initial_stream_window = 3000;
    config.receive.initial_connection_window = 5000;
    config.receive.max_frame = 4096;
    config
}

fuzz_target!(|data: &[u8]| {
    let limits = Limits { max_concurrent_streams: 4, ..Limits::default() };
    let mut guest = Session::client(small("guest", 1));
    let mut host = Session::server(small("host", 2), limits);
    pump(&mut guest, &mut host);
    pump(&mut host, &mut guest);
    let mut guest_streams: Vec<u32> = Vec::new();
    let mut host_streams: Vec<u32> = Vec::new();
    let mut ops = data;
    while let Some((&op, rest)) = ops.split_first() {
        ops = rest;
        match op % 16 {
            0 | 1 => {
                let len = match ops {
                    [a, b, ..] => usize::from(u16::from_be_bytes([*a, *b])),
                    _ => 0,
                };
                let start = ops.len().min(2);
                let end = (start + len).min(ops.len());
                let bytes = &ops[start..end];
                ops = &ops[end..];
                if op % 16 == 0 { host.receive(bytes) } else { guest.receive(bytes) }
            }
            2 => {
                if let Ok(id) = guest.open(MethodCall::HttpRequest(HttpRequest::new("POST", "https://a.example/"))) {
                    guest_streams.push(id);
                }
            }
            3 => {
                if let Some(&id) = guest_streams.last() {
                    let n = guest.send_capacity(id).min(5000);
                    let _ = guest.send_data(id, Bytes::from(vec![0x5a; n]));
                }
            }
            4 => {
                if let Some(id) = guest_streams.pop() {
                    let _ = if id % 3 == 0 { guest.cancel(id) } else { guest.send_end(id, vec![]) };
                }
            }
            5 => pump(&mut guest, &mut host),
            6 => pump(&mut host, &mut guest),
            7 => {
                if let Some(&id) = host_streams.first() {
                    let _ = host.send_head(id, &ok_head());
                    let n = host.send_capacity(id).min(7000);
                    let _ = host.send_data(id, Bytes::from(vec![0xa5; n]));
                }
            }
            8 => {
                if let Some(id) = host_streams.pop() {
                    let _ = host.send_error(id, ErrorPayload::new(ErrorCode::PolicyDenied, "no"));
                }
            }
            9 => guest.resync(),
            10 => guest.transport_reconnected(),
            // The send buffers: written ahead of credit, never past their room, END and ERROR behind the data.
            12 => {
                if let Some(&id) = guest_streams.last() {
                    let room = guest.write_room(id);
                    assert!(guest.write(id, Bytes::from(vec![0x5b; room + 1])).is_err());
                    let _ = guest.write(id, Bytes::from(vec![0x5b; room.min(9000)]));
                }
            }
            13 => {
                if let Some(&id) = host_streams.first() {
                    let _ = host.send_head(id, &ok_head());
                    let room = host.write_room(id);
                    let _ = host.write(id, Bytes::from(vec![0xa6; room.min(20_000)]));
                }
            }
            14 => {
                if let Some(id) = host_streams.pop() {
                    let _ = host.write_error(id, ErrorPayload::new(ErrorCode::ResponseTooLarge, "cut"));
                }
            }
            15 => {
                if let Some(&id) = guest_streams.last() {
                    let _ = guest.write_end(id, vec![]);
                }
                if let Some(&id) = host_streams.first() {
                    let _ = host.write_end(id, vec![]);
                }
            }
            _ => {
                if let Some(id) = host_streams.first().copied() {
                    let _ = host.send_end(id, vec![]);
                }
            }
        }
        // The applications consume everything they are handed.
        while let Some(event) = host.poll_event() {
            match event {
                Event::Opened { stream_id, .. } => host_streams.push(stream_id),
                Event::Data { stream_id, data } => host.release(stream_id, data.len()),
                _ => {}
            }
        }
        while let Some(event) = guest.poll_event() {
            if let Event::Data { stream_id, data } = event {
                guest.release(stream_id, data.len());
            }
        }
        assert!(host.buffered_input() <= HEADER_LEN + 4096 + 4096);
        assert!(guest.buffered_input() <= HEADER_LEN + 4096 + 4096);
    }
    // Whatever happened, a fresh guest can still handshake with this host over the same byte stream.
    let mut fresh = Session::client(small("fresh", 3));
    host.transport_reconnected();
    pump(&mut fresh, &mut host);
    pump(&mut host, &mut fresh);
    assert!(fresh.is_established(), "host no longer answers HELLO");
});
