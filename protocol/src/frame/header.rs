//! The fixed 24-byte frame header. All integers are big-endian.
//!
//! | offset | size | field                                   |
//! |-------:|-----:|-----------------------------------------|
//! | 0      | 4    | magic `"PEXI"` (`50 45 58 49`)          |
//! | 4      | 1    | frame format version (1)                |
//! | 5      | 1    | frame type                              |
//! | 6      | 2    | flags                                   |
//! | 8      | 4    | stream id                               |
//! | 12     | 4    | payload length                          |
//! | 16     | 4    | CRC-32C of the payload                  |
//! | 20     | 4    | CRC-32C of header bytes 0..20           |

use super::{crc32c, DecodeError, Flags, FrameType};

pub const MAGIC: [u8; 4] = *b"PEXI";
pub const FRAME_FORMAT_VERSION: u8 = 1;
pub const HEADER_LEN: usize = 24;
/// No implementation may negotiate a larger payload: 16 MiB. A header claiming more is refused before the
/// length is used for anything.
pub const HARD_MAX_PAYLOAD: u32 = 16 * 1024 * 1024;
/// What each side accepts until HELLO / HELLO_ACK say otherwise: 64 KiB.
pub const DEFAULT_MAX_PAYLOAD: u32 = 64 * 1024;
/// The smallest `max_frame` a peer may announce: a HELLO must always fit.
pub const MIN_MAX_PAYLOAD: u32 = 4 * 1024;

/// A parsed header whose checksum, version and length were checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub frame_type: FrameType,
    pub flags: Flags,
    pub stream_id: u32,
    pub length: u32,
    pub payload_crc: u32,
}

impl Header {
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        out[0..4].copy_from_slice(&MAGIC);
        out[4] = FRAME_FORMAT_VERSION;
        out[5] = self.frame_type.code();
        out[6..8].copy_from_slice(&self.flags.0.to_be_bytes());
        out[8..12].copy_from_slice(&self.stream_id.to_be_bytes());
        out[12..16].copy_from_slice(&self.length.to_be_bytes());
        out[16..20].copy_from_slice(&self.payload_crc.to_be_bytes());
        let header_crc = crc32c(&out[0..20]);
        out[20..24].copy_from_slice(&header_crc.to_be_bytes());
        out
    }

    /// Checks in this order: magic, header CRC, format version, length against `max_payload`. The version is
    /// checked after the CRC so that a flipped version bit reads as corruption, not as a foreign format.
    pub fn parse(bytes: &[u8; HEADER_LEN], max_payload: u32) -> Result<Header, DecodeError> {
        let found = [bytes[0], bytes[1], bytes[2], bytes[3]];
        if found != MAGIC {
            return Err(DecodeError::BadMagic { found });
        }
        if crc32c(&bytes[0..20]) != be32(bytes, 20) {
            return Err(DecodeError::BadHeaderCrc);
        }
        if bytes[4] != FRAME_FORMAT_VERSION {
            return Err(DecodeError::UnsupportedFrameVersion(bytes[4]));
        }
        let length = be32(bytes, 12);
        let max = max_payload.min(HARD_MAX_PAYLOAD);
        if length > max {
            return Err(DecodeError::Oversize { length, max });
        }
        Ok(Header {
            frame_type: FrameType::from_code(bytes[5]),
            flags: Flags(u16::from_be_bytes([bytes[6], bytes[7]])),
            stream_id: be32(bytes, 8),
            length,
            payload_crc: be32(bytes, 16),
        })
    }
}

fn be32(bytes: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}
