//! Frames: the unit that crosses the byte stream.
//!
//! Every frame is a fixed 24-byte header followed by `length` payload bytes (layout in
//! [`header`], normative table in `docs/protocol.md`). The header carries two CRC-32C checksums, one over
//! the payload and one over the header itself, so that a reader which lost its place (a reconnect that cut a
//! frame in half, stale bytes in a virtio-serial port) can scan forward and recognise the next real header
//! with a false-positive rate of about 2^-32 per candidate.
//!
//! Payload meaning is not this module's business: it hands out raw [`Bytes`] and the [`crate::payload`]
//! module gives them types.

mod decoder;
mod header;
mod kind;

pub use decoder::FrameDecoder;
pub use header::{
    Header, DEFAULT_MAX_PAYLOAD, FRAME_FORMAT_VERSION, HARD_MAX_PAYLOAD, HEADER_LEN, MAGIC,
    MIN_MAX_PAYLOAD,
};
pub use kind::{Flags, FrameType};

use bytes::Bytes;

/// Stream id 0 addresses the session itself (HELLO, PING, GOAWAY, ...).
pub const SESSION_STREAM: u32 = 0;

/// A decoded (or to-be-encoded) frame. The payload is opaque here.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    pub frame_type: FrameType,
    pub flags: Flags,
    pub stream_id: u32,
    pub payload: Bytes,
}

impl Frame {
    pub fn new(frame_type: FrameType, stream_id: u32, payload: impl Into<Bytes>) -> Self {
        Frame {
            frame_type,
            flags: Flags::empty(),
            stream_id,
            payload: payload.into(),
        }
    }

    /// Total size on the wire.
    pub fn wire_len(&self) -> usize {
        HEADER_LEN + self.payload.len()
    }

    /// Appends the encoded frame to `out`.
    ///
    /// # Panics
    /// If the payload is longer than [`HARD_MAX_PAYLOAD`]. Every caller in this crate bounds payloads by the
    /// peer's negotiated maximum first, so reaching this is a bug in the caller, not bad input.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        out.reserve(self.wire_len());
        out.extend_from_slice(&self.encode_header());
        out.extend_from_slice(&self.payload);
    }

    /// The frame's header alone; the payload follows it unchanged on the wire. Lets a writer send the
    /// payload from where it already is (a vectored write) instead of copying it behind the header.
    ///
    /// # Panics
    /// As [`Frame::encode_into`].
    pub fn encode_header(&self) -> [u8; HEADER_LEN] {
        let len = u32::try_from(self.payload.len())
            .ok()
            .filter(|len| *len <= HARD_MAX_PAYLOAD)
            .expect("frame payload larger than HARD_MAX_PAYLOAD");
        Header {
            frame_type: self.frame_type,
            flags: self.flags,
            stream_id: self.stream_id,
            length: len,
            payload_crc: crc32c(&self.payload),
        }
        .encode()
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.wire_len());
        self.encode_into(&mut out);
        out
    }
}

/// CRC-32C (Castagnoli), the checksum used for both header and payload. The `crc32c` crate uses the CPU's
/// CRC instruction where there is one (SSE 4.2, ARMv8): the table-driven `crc` crate it replaced was the
/// top of the bulk-transfer profile (docs/benchmarks.md).
pub fn crc32c(bytes: &[u8]) -> u32 {
    crc32c::crc32c(bytes)
}

/// Why bytes could not be read as a frame. Each of these makes the reader lose its place; it then scans for
/// the next valid header (see [`FrameDecoder`]).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("bad magic {found:02x?} (expected \"PEXI\")")]
    BadMagic { found: [u8; 4] },
    #[error("header checksum mismatch")]
    BadHeaderCrc,
    #[error("unsupported frame format version {0}")]
    UnsupportedFrameVersion(u8),
    #[error("payload length {length} exceeds the maximum {max}")]
    Oversize { length: u32, max: u32 },
    #[error("payload checksum mismatch")]
    BadPayloadCrc,
    #[error("byte stream ended inside a frame ({buffered} bytes buffered)")]
    Truncated { buffered: usize },
}

impl DecodeError {
    /// Stable machine-readable name, carried in `details.frame_error` of the `protocol_error` sent back.
    pub fn code(&self) -> &'static str {
        match self {
            DecodeError::BadMagic { .. } => "bad_magic",
            DecodeError::BadHeaderCrc => "bad_header_crc",
            DecodeError::UnsupportedFrameVersion(_) => "unsupported_frame_version",
            DecodeError::Oversize { .. } => "oversize_length",
            DecodeError::BadPayloadCrc => "bad_payload_crc",
            DecodeError::Truncated { .. } => "truncated",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_is_castagnoli() {
        // The standard check value of CRC-32C (RFC 3720 appendix B.4 parameters).
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
    }

    #[test]
    fn frame_types_round_trip_through_their_codes() {
        for code in 0..=u8::MAX {
            assert_eq!(FrameType::from_code(code).code(), code);
        }
        for t in FrameType::ALL {
            assert_ne!(t.name(), "UNKNOWN");
        }
    }
}
