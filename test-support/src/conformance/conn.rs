//! One connection to the implementation under test, with what the runner knows of the session on it, and
//! the steps both runners share. On every frame from the peer it checks the rules a scenario does not spell
//! out: DATA within the credit the runner granted (per stream and per session), payloads within the max
//! frame the runner announced, and, from a guest, OPEN ids odd and increasing, no OPEN after the runner's
//! GOAWAY, no more unfinished streams than the `limits.max_concurrent_streams` the runner announced.

use std::collections::HashMap;
use std::time::Duration;

use pexi_protocol::frame::{Frame, FrameType, DEFAULT_MAX_PAYLOAD};
use pexi_protocol::payload::{
    cbor, decode_window_update, encode_window_update, Hello, HelloAck, ReceiveParams,
};
use serde_json::Value;
use tokio::net::UnixStream;

use super::{
    as_json, build_frame, describe, lone_header, matches, stream_id, Vars, Wire, EXPECT_WITHIN,
    NOTHING,
};

/// The largest DATA frame the runner sends.
const RUNNER_CHUNK: u64 = 16 * 1024;

/// The byte at `offset` of every body the scenarios move with `send_data` (and a driver's `body_bytes`):
/// `a` to `z`, repeating.
pub fn pattern(offset: u64) -> u8 {
    b'a' + (offset % 26) as u8
}

/// What the runner knows of one stream.
#[derive(Default)]
struct StreamState {
    /// DATA the peer may still send (the runner's grant).
    peer_may_send: i64,
    /// DATA the runner may still send (the peer's grant).
    we_may_send: i64,
    peer_sent: u64,
    we_sent: u64,
    peer_ended: bool,
    we_ended: bool,
    failed: bool,
}

impl StreamState {
    fn unfinished(&self) -> bool {
        !(self.failed || self.peer_ended && self.we_ended)
    }
}

pub struct Conn {
    pub wire: Wire,
    /// What the runner announced (its HELLO or HELLO_ACK); before that, the pre-handshake maximum.
    announced: ReceiveParams,
    /// What the peer announced.
    peer_receive: ReceiveParams,
    /// The limit the runner announced as a host.
    max_concurrent: u32,
    peer_may_send_session: i64,
    we_may_send_session: i64,
    streams: HashMap<u32, StreamState>,
    last_open: u32,
    goaway_sent: bool,
    /// "guest" or "host": the peer, for messages.
    peer: &'static str,
}

impl Conn {
    pub fn new(stream: UnixStream, peer: &'static str) -> Conn {
        let before = ReceiveParams {
            // What both sides accept before a handshake (spec §2.1).
            max_frame: DEFAULT_MAX_PAYLOAD,
            initial_stream_window: 0,
            initial_connection_window: 0,
        };
        Conn {
            wire: Wire::new(stream, 16 << 20),
            announced: before,
            peer_receive: before,
            max_concurrent: u32::MAX,
            peer_may_send_session: 0,
            we_may_send_session: 0,
            streams: HashMap::new(),
            last_open: 0,
            goaway_sent: false,
            peer,
        }
    }

    /// Session credit back to the handshake's values, every stream gone: a new session or a resync.
    fn reset_session(&mut self) {
        self.peer_may_send_session = i64::from(self.announced.initial_connection_window);
        self.we_may_send_session = i64::from(self.peer_receive.initial_connection_window);
        self.streams.clear();
    }

    fn new_stream(&mut self, id: u32) {
        self.streams.insert(
            id,
            StreamState {
                peer_may_send: i64::from(self.announced.initial_stream_window),
                we_may_send: i64::from(self.peer_receive.initial_stream_window),
                ..StreamState::default()
            },
        );
    }

    /// Checks a frame from the peer against the rules and updates the accounting.
    fn observe_incoming(&mut self, frame: &Frame) -> Result<(), String> {
        let length = frame.payload.len();
        if length > self.announced.max_frame as usize {
            return Err(format!(
                "the {} sent {length} payload bytes, above the max frame {} the runner announced",
                self.peer, self.announced.max_frame
            ));
        }
        let id = frame.stream_id;
        match frame.frame_type {
            FrameType::Hello => {
                if let Ok(hello) = cbor::decode::<Hello>("HELLO", &frame.payload) {
                    self.peer_receive = hello.receive;
                }
                self.last_open = 0;
                self.goaway_sent = false;
                self.streams.clear();
            }
            FrameType::HelloAck => {
                if let Ok(ack) = cbor::decode::<HelloAck>("HELLO_ACK", &frame.payload) {
                    self.peer_receive = ack.receive;
                    self.reset_session();
                }
            }
            FrameType::Sync => self.reset_session(),
            FrameType::Open => {
                if id % 2 == 0 || id <= self.last_open {
                    return Err(format!(
                        "OPEN on stream {id}: ids must be odd and above every id opened before ({})",
                        self.last_open
                    ));
                }
                if self.goaway_sent {
                    return Err(format!("OPEN on stream {id} after the runner's GOAWAY"));
                }
                let open = self.streams.values().filter(|s| s.unfinished()).count();
                if open >= self.max_concurrent as usize {
                    return Err(format!(
                        "OPEN on stream {id} with {open} streams unfinished: limits.max_concurrent_streams is {}",
                        self.max_concurrent
                    ));
                }
                self.last_open = id;
                self.new_stream(id);
            }
            FrameType::Data => {
                self.peer_may_send_session -= length as i64;
                if self.peer_may_send_session < 0 {
                    return Err(format!(
                        "DATA on stream {id} goes {} bytes beyond the session credit the runner granted",
                        -self.peer_may_send_session
                    ));
                }
                if let Some(stream) = self.streams.get_mut(&id).filter(|s| !s.failed) {
                    if stream.peer_ended {
                        return Err(format!("DATA on stream {id} after the {}'s END", self.peer));
                    }
                    stream.peer_may_send -= length as i64;
                    if stream.peer_may_send < 0 {
                        return Err(format!(
                            "DATA on stream {id} goes {} bytes beyond the stream credit the runner granted",
                            -stream.peer_may_send
                        ));
                    }
                }
            }
            FrameType::End => {
                if let Some(stream) = self.streams.get_mut(&id) {
                    stream.peer_ended = true;
                }
            }
            FrameType::Error | FrameType::Cancel => {
                if let Some(stream) = self.streams.get_mut(&id) {
                    stream.failed = true;
                }
            }
            FrameType::WindowUpdate => {
                let increment = i64::from(
                    decode_window_update(&frame.payload)
                        .map_err(|e| format!("WINDOW_UPDATE on stream {id}: {e}"))?,
                );
                if id == 0 {
                    self.we_may_send_session += increment;
                } else if let Some(stream) = self.streams.get_mut(&id) {
                    stream.we_may_send += increment;
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// Updates the accounting for a frame the runner sends.
    fn observe_outgoing(&mut self, frame: &Frame) {
        let id = frame.stream_id;
        match frame.frame_type {
            FrameType::Hello => {
                if let Ok(hello) = cbor::decode::<Hello>("HELLO", &frame.payload) {
                    if hello.receive.check().is_ok() {
                        self.announced = hello.receive;
                    }
                }
                self.streams.clear();
            }
            // A HELLO_ACK a guest must refuse (another version, values out of range) changes nothing.
            FrameType::HelloAck => match cbor::decode::<HelloAck>("HELLO_ACK", &frame.payload) {
                Ok(ack) if ack.version == 1 && ack.receive.check().is_ok() => {
                    self.announced = ack.receive;
                    self.max_concurrent = ack.limits.max_concurrent_streams;
                    self.reset_session();
                }
                _ => {}
            },
            FrameType::Sync => self.reset_session(),
            FrameType::Open => self.new_stream(id),
            FrameType::WindowUpdate => {
                let increment = i64::from(decode_window_update(&frame.payload).unwrap_or_default());
                if id == 0 {
                    self.peer_may_send_session += increment;
                } else if let Some(stream) = self.streams.get_mut(&id) {
                    stream.peer_may_send += increment;
                }
            }
            FrameType::Data => {
                self.we_may_send_session -= frame.payload.len() as i64;
                if let Some(stream) = self.streams.get_mut(&id) {
                    stream.we_may_send -= frame.payload.len() as i64;
                    stream.we_sent += frame.payload.len() as u64;
                }
            }
            FrameType::End => {
                if let Some(stream) = self.streams.get_mut(&id) {
                    stream.we_ended = true;
                }
            }
            FrameType::Error | FrameType::Cancel if id != 0 => {
                if let Some(stream) = self.streams.get_mut(&id) {
                    stream.failed = true;
                }
            }
            FrameType::GoAway if as_json(frame)["code"] != "protocol_error" => {
                self.goaway_sent = true;
            }
            _ => {}
        }
    }

    pub async fn send(&mut self, frame: &Frame) -> Result<(), String> {
        self.observe_outgoing(frame);
        self.wire.write(&frame.encode()).await
    }

    /// The next frame from the peer, checked. PING is answered with PONG and, like WINDOW_UPDATE, handed to
    /// the caller only if `keep` says so.
    pub async fn next(
        &mut self,
        within: Duration,
        keep: impl Fn(FrameType) -> bool,
    ) -> Result<Option<Frame>, String> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let Some(frame) = self.wire.next(left).await? else {
                return Ok(None);
            };
            self.observe_incoming(&frame)?;
            let routine = matches!(frame.frame_type, FrameType::Ping | FrameType::WindowUpdate);
            if frame.frame_type == FrameType::Ping && !keep(FrameType::Ping) {
                self.send(&Frame::new(FrameType::Pong, 0, frame.payload.clone()))
                    .await?;
            }
            if !routine || keep(frame.frame_type) {
                return Ok(Some(frame));
            }
        }
    }

    /// Runs a step both runners understand; `Ok(false)` when the step is not one of them.
    pub async fn step(&mut self, step: &Value, vars: &mut Vars) -> Result<bool, String> {
        if let Some(spec) = step.get("send") {
            self.send(&build_frame(spec)?).await?;
        } else if let Some(spec) = step.get("send_header") {
            self.wire.write(&lone_header(spec)?).await?;
        } else if let Some(hex_text) = step["send_hex"].as_str() {
            let bytes = hex::decode(hex_text).map_err(|e| format!("send_hex: {e}"))?;
            self.wire.write(&bytes).await?;
        } else if let Some(spec) = step.get("send_data") {
            self.send_data(spec).await?;
        } else if let Some(spec) = step.get("expect") {
            let kind = super::frame_type(spec)?;
            let frame = match self.next(EXPECT_WITHIN, |t| t == kind).await {
                Ok(Some(frame)) => frame,
                Ok(None) => return Err(format!("expected {spec}, the {} closed", self.peer)),
                Err(what) => return Err(format!("expected {spec}, got {what}")),
            };
            if !matches(&frame, spec, vars)? {
                return Err(format!("expected {spec}, got {}", describe(&frame)));
            }
        } else if let Some(spec) = step.get("expect_data") {
            self.expect_data(spec).await?;
        } else if let Some(ms) = step["expect_silence_ms"].as_u64() {
            match self.next(Duration::from_millis(ms), |_| false).await {
                Err(what) if what == NOTHING => {}
                Err(what) => return Err(format!("expected silence, got {what}")),
                Ok(Some(frame)) => {
                    return Err(format!("expected silence, got {}", describe(&frame)))
                }
                Ok(None) => return Err(format!("expected silence, the {} closed", self.peer)),
            }
        } else if step.get("expect_closed").is_some() {
            let deadline = tokio::time::Instant::now() + EXPECT_WITHIN;
            loop {
                let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                match self.next(left, |_| true).await {
                    Ok(None) => break,
                    Ok(Some(_)) => continue,
                    Err(what) => {
                        return Err(format!("expected the {} to close, got {what}", self.peer))
                    }
                }
            }
        } else {
            return Ok(false);
        }
        Ok(true)
    }

    /// `send_data`: `bytes` of the pattern as DATA on `stream`, in frames that fit the peer's max frame,
    /// waiting for the peer's credit (unless `ignore_credit`). `"bytes": "session_credit"` sends all the
    /// session credit the peer granted, on a stream that is over (its own credit no longer applies), so
    /// that the peer must grant session credit back.
    async fn send_data(&mut self, spec: &Value) -> Result<(), String> {
        let id = stream_id(spec)?;
        let total = match &spec["bytes"] {
            Value::String(s) if s == "session_credit" => {
                u64::try_from(self.we_may_send_session).unwrap_or(0)
            }
            bytes => bytes.as_u64().ok_or("send_data needs bytes")?,
        };
        let ignore_credit = spec["ignore_credit"].as_bool().unwrap_or(false);
        let mut sent = 0u64;
        while sent < total {
            let (stream_credit, offset) = self
                .streams
                .get(&id)
                .filter(|s| s.unfinished())
                .map_or((i64::MAX, 0), |s| (s.we_may_send, s.we_sent));
            let room = if ignore_credit {
                i64::MAX
            } else {
                stream_credit.min(self.we_may_send_session)
            };
            if room <= 0 {
                match self
                    .next(EXPECT_WITHIN, |t| t == FrameType::WindowUpdate)
                    .await
                {
                    Ok(Some(frame)) if frame.frame_type == FrameType::WindowUpdate => continue,
                    Ok(Some(frame)) => {
                        return Err(format!(
                            "waiting for credit to send on stream {id}, got {}",
                            describe(&frame)
                        ))
                    }
                    Ok(None) => {
                        return Err(format!("waiting for credit, the {} closed", self.peer))
                    }
                    Err(what) => {
                        return Err(format!(
                            "no credit to send on stream {id} after {sent} of {total} bytes: {what}"
                        ))
                    }
                }
            }
            let size = (total - sent)
                .min(room as u64)
                .min(RUNNER_CHUNK)
                .min(u64::from(self.peer_receive.max_frame));
            let data: Vec<u8> = (offset..offset + size).map(pattern).collect();
            self.send(&Frame::new(FrameType::Data, id, data)).await?;
            sent += size;
        }
        Ok(())
    }

    /// `expect_data`: exactly `bytes` arrive as DATA on `stream` (WINDOW_UPDATE and PING may come between;
    /// anything else fails). With `"pattern": true` they must be the pattern; with `"grant_back": true` the
    /// runner grants each frame's bytes back at once (stream and session), as an application reading them.
    async fn expect_data(&mut self, spec: &Value) -> Result<(), String> {
        let id = stream_id(spec)?;
        let total = spec["bytes"].as_u64().ok_or("expect_data needs bytes")?;
        let check_pattern = spec["pattern"].as_bool().unwrap_or(false);
        let grant_back = spec["grant_back"].as_bool().unwrap_or(false);
        let mut got = 0u64;
        while got < total {
            let offset = self.streams.get(&id).map_or(0, |s| s.peer_sent);
            let frame = match self.next(EXPECT_WITHIN, |_| false).await {
                Ok(Some(frame)) => frame,
                Ok(None) => {
                    return Err(format!(
                        "expected DATA ({got} of {total}), the {} closed",
                        self.peer
                    ))
                }
                Err(what) => return Err(format!("expected DATA ({got} of {total}), got {what}")),
            };
            if frame.frame_type != FrameType::Data || frame.stream_id != id {
                return Err(format!(
                    "expected DATA on stream {id} ({got} of {total} bytes), got {}",
                    describe(&frame)
                ));
            }
            if check_pattern {
                if let Some(at) = frame
                    .payload
                    .iter()
                    .zip(offset..)
                    .position(|(byte, i)| *byte != pattern(i))
                {
                    return Err(format!(
                        "DATA on stream {id}: byte {} is not the pattern",
                        offset + at as u64
                    ));
                }
            }
            let length = frame.payload.len() as u32;
            if let Some(stream) = self.streams.get_mut(&id) {
                stream.peer_sent += u64::from(length);
            }
            got += u64::from(length);
            if got > total {
                return Err(format!(
                    "expected {total} bytes of DATA on stream {id}, got {got}"
                ));
            }
            if grant_back && length > 0 {
                let update = encode_window_update(length).to_vec();
                self.send(&Frame::new(FrameType::WindowUpdate, id, update.clone()))
                    .await?;
                self.send(&Frame::new(FrameType::WindowUpdate, 0, update))
                    .await?;
            }
        }
        Ok(())
    }
}
