//! The frame decoder never allocates more than one header plus the negotiated max frame, whatever it is
//! fed; decoding a hostile CBOR payload inside a valid frame allocates at most serde's preallocation cap
//! (1 MiB) at once. A counting global allocator records the largest single allocation made while decoding.
//! This file holds one test so that no other test's allocations are counted.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use pexi_protocol::frame::{crc32c, Frame, FrameDecoder, FrameType, HARD_MAX_PAYLOAD, HEADER_LEN};
use pexi_protocol::payload::Limits;
use pexi_protocol::session::{Config, Session};

struct Counting;

static ARMED: AtomicBool = AtomicBool::new(false);
static LARGEST: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards every call unchanged to the system allocator; it only records sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if ARMED.load(Ordering::Relaxed) {
            LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        }
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if ARMED.load(Ordering::Relaxed) {
            LARGEST.fetch_max(new_size, Ordering::Relaxed);
        }
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn header(length: u32) -> Vec<u8> {
    let mut h = b"PEXI\x01\x11\x00\x00\x00\x00\x00\x01".to_vec();
    h.extend_from_slice(&length.to_be_bytes());
    h.extend_from_slice(&0u32.to_be_bytes());
    let crc = crc32c(&h);
    h.extend_from_slice(&crc.to_be_bytes());
    h
}

#[test]
fn hostile_input_never_allocates_beyond_the_max_frame() {
    let max = 64 * 1024;
    let mut input = Vec::new();
    // Headers announcing ever larger payloads, up to 4 GiB, each with a valid header CRC.
    for length in [
        max + 1,
        1 << 20,
        HARD_MAX_PAYLOAD,
        HARD_MAX_PAYLOAD + 1,
        u32::MAX,
    ] {
        input.extend_from_slice(&header(length));
    }
    // A header at exactly the max, whose payload never completes before more headers arrive.
    input.extend_from_slice(&header(max));
    input.extend(std::iter::repeat_n(0xAAu8, 3 * max as usize));
    // Long runs of garbage and of partial magics.
    input.extend(std::iter::repeat_n(b'P', 100_000));
    input.extend(b"PEXPEXPEXIPEXI".iter().cycle().take(100_000));

    let mut decoder = FrameDecoder::new(max);
    LARGEST.store(0, Ordering::Relaxed);
    ARMED.store(true, Ordering::Relaxed);
    for chunk in input.chunks(100_003) {
        let mut chunk = chunk;
        while let Some(result) = decoder.decode(&mut chunk) {
            std::hint::black_box(&result);
        }
    }
    ARMED.store(false, Ordering::Relaxed);
    let largest = LARGEST.load(Ordering::Relaxed);
    assert!(largest > 0, "the counter saw no allocation at all");
    assert!(
        largest <= HEADER_LEN + max as usize,
        "largest allocation {largest} bytes exceeds header + max frame"
    );

    // Valid frames whose CBOR payloads declare absurd lengths: 2^32 headers, 2^64 versions, a 4 GiB text.
    let mut host = Session::server(Config::new("h", "1"), Limits::default());
    let mut hostile = Vec::new();
    let open_prefix =
        b"\xa2\x66method\x70pep.http.request\x66params\xa3\x66method\x63GET\x63url\x61u\x67headers";
    for tail in [
        &b"\x9b\x00\x00\x00\x01\x00\x00\x00\x00"[..],
        &[0x99, 0xff, 0xff][..],
    ] {
        let mut payload = open_prefix.to_vec();
        payload.extend_from_slice(tail);
        payload.extend(std::iter::repeat_n(0x82u8, 60_000));
        hostile.extend(Frame::new(FrameType::Hello, 0, payload.clone()).encode());
        hostile.extend(Frame::new(FrameType::Open, 1, payload).encode());
    }
    let mut hello = b"\xa1\x68versions\x9b\xff\xff\xff\xff\xff\xff\xff\xff".to_vec();
    hello.extend(std::iter::repeat_n(0x01u8, 60_000));
    hostile.extend(Frame::new(FrameType::Hello, 0, hello).encode());
    hostile.extend(
        Frame::new(
            FrameType::Hello,
            0,
            b"\xa1\x68versions\x7b\x00\x00\x00\x01\x00\x00\x00\x00".to_vec(),
        )
        .encode(),
    );
    LARGEST.store(0, Ordering::Relaxed);
    ARMED.store(true, Ordering::Relaxed);
    host.receive(&hostile);
    ARMED.store(false, Ordering::Relaxed);
    let largest = LARGEST.load(Ordering::Relaxed);
    assert!(largest > 0, "the counter saw no allocation at all");
    assert!(
        largest <= 1024 * 1024,
        "largest allocation {largest} bytes while decoding hostile payloads exceeds 1 MiB"
    );
    assert!(
        !host.is_established(),
        "none of those was an acceptable HELLO"
    );
}
