//! A push decoder: bytes in, frames out, with resynchronisation after garbage.
//!
//! The decoder copies from the caller's slice only what the current frame still needs, so its buffer never
//! holds more than one header plus `max_payload` bytes, whatever the caller feeds it; a length above the
//! maximum is refused from the header alone, before anything is reserved for the payload.
//!
//! When a header or payload fails its checks the decoder reports that error once and switches to scanning:
//! it looks for the magic, validates the candidate header's CRC, then the candidate payload's CRC, and drops
//! one byte and looks again whenever a candidate fails. Candidates that fail while scanning are not reported
//! again (they are part of the garbage already reported); the bytes dropped are counted.

use bytes::Bytes;

use super::{crc32c, DecodeError, Frame, Header, HEADER_LEN, MAGIC};

/// How much the scanner pulls from the input at a time while it has no candidate magic.
const SCAN_CHUNK: usize = 4096;

#[derive(Debug)]
pub struct FrameDecoder {
    max_payload: u32,
    /// Bytes taken from the input and not yet consumed. Bounded by `HEADER_LEN + max_payload` while synced,
    /// and by the same or `3 + SCAN_CHUNK` while scanning.
    buf: Vec<u8>,
    scanning: bool,
    discarded: u64,
}

impl FrameDecoder {
    pub fn new(max_payload: u32) -> Self {
        FrameDecoder {
            max_payload,
            buf: Vec::new(),
            scanning: false,
            discarded: 0,
        }
    }

    pub fn max_payload(&self) -> u32 {
        self.max_payload
    }

    /// Takes effect from the next header parsed.
    pub fn set_max_payload(&mut self, max_payload: u32) {
        self.max_payload = max_payload;
    }

    /// True after a decode error until the next valid frame is found.
    pub fn is_scanning(&self) -> bool {
        self.scanning
    }

    /// Bytes dropped as garbage since the last call.
    pub fn take_discarded(&mut self) -> u64 {
        std::mem::take(&mut self.discarded)
    }

    /// Bytes held while waiting for the rest of a frame.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// The buffer's allocation, for tests that check the memory bound.
    pub fn buffer_capacity(&self) -> usize {
        self.buf.capacity()
    }

    /// Drops any partial frame and starts scanning for the next header, as after a reconnect of the
    /// underlying transport where stale bytes may follow.
    pub fn reset_to_scanning(&mut self) {
        self.discarded += self.buf.len() as u64;
        self.buf = Vec::new();
        self.scanning = true;
    }

    /// At the end of the byte stream: an error if a frame was cut short.
    pub fn finish(&self) -> Result<(), DecodeError> {
        if self.buf.is_empty() || self.scanning {
            Ok(())
        } else {
            Err(DecodeError::Truncated {
                buffered: self.buf.len(),
            })
        }
    }

    /// Consumes bytes from the front of `input` (advancing the slice) and returns the next frame, the error
    /// that made the decoder lose its place, or `None` once `input` is exhausted without a complete frame.
    /// Call it again until it returns `None`.
    pub fn decode(&mut self, input: &mut &[u8]) -> Option<Result<Frame, DecodeError>> {
        loop {
            if self.scanning && !self.seek_magic(input) {
                return None;
            }
            if !self.fill(input, HEADER_LEN) {
                return None;
            }
            let mut header_bytes = [0u8; HEADER_LEN];
            header_bytes.copy_from_slice(&self.buf[..HEADER_LEN]);
            let header = match Header::parse(&header_bytes, self.max_payload) {
                Ok(header) => header,
                Err(err) => match self.lose_sync(err) {
                    Some(err) => return Some(Err(err)),
                    None => continue,
                },
            };
            let total = HEADER_LEN + header.length as usize;
            if !self.fill(input, total) {
                return None;
            }
            let payload = &self.buf[HEADER_LEN..total];
            if crc32c(payload) != header.payload_crc {
                match self.lose_sync(DecodeError::BadPayloadCrc) {
                    Some(err) => return Some(Err(err)),
                    None => continue,
                }
            }
            let payload = Bytes::copy_from_slice(payload);
            self.consume(total);
            self.scanning = false;
            return Some(Ok(Frame {
                frame_type: header.frame_type,
                flags: header.flags,
                stream_id: header.stream_id,
                payload,
            }));
        }
    }

    /// Drops the first byte of the failed candidate and scans from there. Returns the error to report if
    /// this is where the decoder lost its place, `None` if it was already scanning.
    fn lose_sync(&mut self, err: DecodeError) -> Option<DecodeError> {
        self.drop_front(1);
        if self.scanning {
            None
        } else {
            self.scanning = true;
            Some(err)
        }
    }

    /// Drops bytes until the buffer starts with the magic. Returns false when the input ran out first.
    fn seek_magic(&mut self, input: &mut &[u8]) -> bool {
        loop {
            if let Some(pos) = self.buf.windows(MAGIC.len()).position(|w| w == MAGIC) {
                self.drop_front(pos);
                return true;
            }
            // Keep a tail that could be the start of a magic split across two reads.
            let keep = self.buf.len().min(MAGIC.len() - 1);
            self.drop_front(self.buf.len() - keep);
            if input.is_empty() {
                return false;
            }
            let take = input.len().min(SCAN_CHUNK);
            self.take_input(input, take);
        }
    }

    /// Tops the buffer up to `want` bytes from `input`. True when it holds at least `want`.
    fn fill(&mut self, input: &mut &[u8], want: usize) -> bool {
        if self.buf.len() < want {
            let take = (want - self.buf.len()).min(input.len());
            self.take_input(input, take);
        }
        self.buf.len() >= want
    }

    fn take_input(&mut self, input: &mut &[u8], take: usize) {
        let (head, rest) = input.split_at(take);
        // reserve_exact: the buffer's allocation must stay within the documented bound, not double past it.
        self.buf.reserve_exact(take);
        self.buf.extend_from_slice(head);
        *input = rest;
    }

    fn drop_front(&mut self, n: usize) {
        self.discarded += n as u64;
        self.consume(n);
    }

    fn consume(&mut self, n: usize) {
        self.buf.drain(..n);
        if self.buf.is_empty() && self.buf.capacity() > HEADER_LEN {
            // Release a large payload buffer once the frame is out; the next frame reserves what it needs.
            self.buf = Vec::new();
        }
    }
}
