//! Arbitrary bytes, split at arbitrary points, into a frame decoder with a small max frame: it must never
//! panic, never buffer more than one header plus the max frame (or a scan chunk), and must re-encode every
//! frame it yields to exactly the bytes it read.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pexi_protocol::frame::{FrameDecoder, HEADER_LEN};

const MAX: u32 = 4096;
const SCAN_CHUNK: usize = 4096;

fuzz_target!(|data: &[u8]| {
    let Some((&split, bytes)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(split).max(1);
    let mut decoder = FrameDecoder::new(MAX);
    for piece in bytes.chunks(chunk) {
        let mut input = piece;
        while let Some(result) = decoder.decode(&mut input) {
            if let Ok(frame) = result {
                assert!(frame.payload.len() <= MAX as usize);
                let encoded = frame.encode();
                let mut again = FrameDecoder::new(MAX);
                let mut slice = &encoded[..];
                assert_eq!(again.decode(&mut slice), Some(Ok(frame)));
            }
            assert!(decoder.buffered() <= HEADER_LEN + MAX as usize + SCAN_CHUNK);
        }
        assert!(input.is_empty());
    }
    let _ = decoder.finish();
});
