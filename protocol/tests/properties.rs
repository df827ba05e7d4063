//! Property tests: encode/decode of arbitrary frames and payloads, and the decoder and session fed
//! arbitrary bytes (never a panic, never more buffered than one header plus the max frame).

mod support;

use proptest::prelude::*;

use pexi_protocol::frame::{DecodeError, Flags, Frame, FrameDecoder, FrameType, HEADER_LEN};
use pexi_protocol::payload::{cbor, HeaderField, HttpRequest, MethodCall, RedirectMode};
use support::{established, events};

const MAX: u32 = 4096;

fn arb_frame() -> impl Strategy<Value = Frame> {
    (
        any::<u8>(),
        any::<u16>(),
        any::<u32>(),
        prop::collection::vec(any::<u8>(), 0..=MAX as usize),
    )
        .prop_map(|(code, flags, stream_id, payload)| Frame {
            frame_type: FrameType::from_code(code),
            flags: Flags(flags),
            stream_id,
            payload: payload.into(),
        })
}

/// Feeds `bytes` in chunks whose sizes come from `cuts`, collecting everything the decoder yields.
fn decode_chunked(
    decoder: &mut FrameDecoder,
    bytes: &[u8],
    cuts: &[usize],
) -> Vec<Result<Frame, DecodeError>> {
    let mut out = Vec::new();
    let mut rest = bytes;
    let mut cut = cuts.iter().cycle();
    while !rest.is_empty() {
        let n = (*cut.next().unwrap_or(&1)).clamp(1, rest.len());
        let (mut chunk, tail) = rest.split_at(n);
        rest = tail;
        while let Some(result) = decoder.decode(&mut chunk) {
            out.push(result);
            assert!(decoder.buffer_capacity() <= HEADER_LEN + MAX as usize + 4096);
        }
    }
    out
}

fn arb_request() -> impl Strategy<Value = HttpRequest> {
    (
        "[A-Z]{1,8}",
        "\\PC{0,64}",
        prop::collection::vec(
            ("[a-z-]{1,16}", prop::collection::vec(any::<u8>(), 0..32)),
            0..6,
        ),
        prop::option::of(any::<u64>()),
        prop_oneof![
            Just(RedirectMode::Follow),
            Just(RedirectMode::Manual),
            Just(RedirectMode::Error)
        ],
        prop::option::of(any::<u64>()),
    )
        .prop_map(
            |(method, url, headers, content_length, redirect, timeout_ms)| HttpRequest {
                method,
                url,
                headers: headers
                    .into_iter()
                    .map(|(n, v)| HeaderField::new(n, v))
                    .collect(),
                content_length,
                redirect,
                timeout_ms,
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn frames_round_trip_however_they_are_split(
        frames in prop::collection::vec(arb_frame(), 1..6),
        cuts in prop::collection::vec(1usize..200, 1..8),
    ) {
        let bytes: Vec<u8> = frames.iter().flat_map(Frame::encode).collect();
        let mut decoder = FrameDecoder::new(MAX);
        let decoded: Vec<Frame> = decode_chunked(&mut decoder, &bytes, &cuts)
            .into_iter()
            .collect::<Result<_, _>>()
            .expect("valid frames decode");
        prop_assert_eq!(decoded, frames);
        prop_assert_eq!(decoder.buffered(), 0);
        prop_assert!(decoder.finish().is_ok());
    }

    #[test]
    fn garbage_never_panics_and_stays_bounded(
        garbage in prop::collection::vec(any::<u8>(), 0..20_000),
        cuts in prop::collection::vec(1usize..5000, 1..8),
    ) {
        let mut decoder = FrameDecoder::new(MAX);
        decode_chunked(&mut decoder, &garbage, &cuts);
        prop_assert!(decoder.buffered() <= HEADER_LEN + MAX as usize + 4096);
    }

    #[test]
    fn valid_frames_are_found_after_garbage(
        garbage in prop::collection::vec(any::<u8>(), 1..3000),
        frames in prop::collection::vec(arb_frame(), 1..4),
        cuts in prop::collection::vec(1usize..500, 1..8),
    ) {
        let mut bytes = garbage.clone();
        bytes.extend(frames.iter().flat_map(Frame::encode));
        let mut decoder = FrameDecoder::new(MAX);
        let found: Vec<Frame> = decode_chunked(&mut decoder, &bytes, &cuts)
            .into_iter()
            .filter_map(Result::ok)
            .collect();
        // Random garbage forging a header with both CRCs right is a 2^-64 event; the real frames all come out,
        // in order, at the end.
        prop_assert!(found.len() >= frames.len());
        prop_assert_eq!(&found[found.len() - frames.len()..], &frames[..]);
    }

    #[test]
    fn http_request_params_round_trip_deterministically(request in arb_request()) {
        let call = MethodCall::HttpRequest(request);
        let bytes = call.encode();
        let back = MethodCall::decode(&bytes).expect("decodes");
        prop_assert_eq!(back.encode(), bytes);
        prop_assert_eq!(back, call);
    }

    #[test]
    fn arbitrary_cbor_never_panics_the_open_decoder(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = MethodCall::decode(&bytes);
        let _ = cbor::decode::<pexi_protocol::payload::Hello>("HELLO", &bytes);
    }

    #[test]
    fn an_established_host_survives_any_bytes(
        frames in prop::collection::vec(arb_frame(), 0..8),
        garbage in prop::collection::vec(any::<u8>(), 0..2000),
        order in any::<bool>(),
    ) {
        let (_guest, mut host) = established();
        let mut bytes: Vec<u8> = frames.iter().flat_map(Frame::encode).collect();
        if order { bytes.extend(&garbage) } else { bytes.splice(0..0, garbage.iter().copied()); }
        host.receive(&bytes);
        events(&mut host);
        prop_assert!(host.buffered_input() <= HEADER_LEN + 65_536 + 4096);
        // Whatever happened, the host still answers a fresh handshake on the same byte stream.
        let mut fresh = support::client();
        host.transport_reconnected();
        support::settle(&mut fresh, &mut host);
        prop_assert!(fresh.is_established());
    }
}
