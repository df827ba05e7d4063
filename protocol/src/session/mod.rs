//! The session state machine, shared by guest (client) and host (server).
//!
//! Like `quinn-proto`, it owns no socket, task or clock. The caller feeds it received bytes
//! ([`Session::receive`]), drains what it has to say ([`Session::poll_event`] for the application,
//! [`Session::poll_transmit`] for the wire) and issues commands ([`Session::open`], [`Session::send_data`],
//! ...). Everything it does is therefore reproducible in a unit test, byte for byte.
//!
//! States: a session starts in `Handshaking` (the client has queued HELLO; the server waits for one), becomes
//! `Established` after HELLO / HELLO_ACK, drops to `Resyncing` when the byte stream is corrupted (every
//! in-flight stream fails with `session_reset`; a SYNC with a fresh nonce is sent and everything but SYNC,
//! SYNC_ACK and HELLO is discarded until that nonce comes back) and returns to `Established`. A client whose
//! HELLO was refused, or either side after a fatal error, is `Closed`; a server instead goes back to
//! waiting for a new HELLO, because a virtio-serial port has no "new connection" to wait for.
//!
//! Outgoing frames sit in two queues: session control frames and CANCEL in one, stream frames whose order
//! matters (OPEN, HEAD, DATA, END, and a stream's ERROR, which must follow the data it cuts short) in the
//! other. [`Session::poll_transmit`] drains control first, so a PING or WINDOW_UPDATE never waits behind a
//! megabyte of DATA.

mod flow;
mod receive;
mod stream;
mod tuning;

use std::collections::{BTreeMap, VecDeque};

use bytes::Bytes;

pub use flow::{
    FlowError, RecvWindow, SendWindow, MAX_USED_CONNECTION_WINDOW, MAX_USED_STREAM_WINDOW,
};

use crate::frame::{Frame, FrameDecoder, FrameType, DEFAULT_MAX_PAYLOAD, SESSION_STREAM};
use crate::payload::{
    cbor, encode_window_update, End, ErrorCode, ErrorPayload, GoAway, HeaderField, Hello,
    Implementation, Limits, MethodCall, ReceiveParams, ResponseHead,
};
use stream::{Stream, Then};
use tuning::WindowTuner;

/// The protocol major version this crate implements.
pub const PROTOCOL_VERSION: u16 = 1;
/// Default per-stream receive window: 256 KiB.
pub const DEFAULT_STREAM_WINDOW: u32 = 256 * 1024;

/// Bytes a driver may hold for one stream that the session has not yet taken (waiting for the peer's
/// credit, or for the reader on the other side): one default window, so a stream whose credit arrives has
/// its next window ready, and a slow reader stalls only its own stream's source. The host's workers, the
/// SDK's uploads and pexi-guestd's local relay all use this one bound.
pub const STREAM_SEND_BUFFER: usize = DEFAULT_STREAM_WINDOW as usize;

/// The largest piece of stream data a driver hands over at once: one default frame payload.
pub const DATA_CHUNK: usize = crate::frame::DEFAULT_MAX_PAYLOAD as usize;
/// Default session receive window: 1 MiB.
pub const DEFAULT_CONNECTION_WINDOW: u32 = 1024 * 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// The guest: sends HELLO, opens streams (odd ids).
    Client,
    /// The host PEP: answers HELLO, serves streams.
    Server,
}

/// What one side announces and how it seeds its identifiers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    pub implementation: Implementation,
    /// Client: versions offered. Server: versions accepted.
    pub versions: Vec<u16>,
    pub features: Vec<String>,
    pub receive: ReceiveParams,
    /// Server: the policy revision announced in HELLO_ACK.
    pub policy_revision: Option<String>,
    /// Seeds HELLO and SYNC nonces and (server) session ids. [`Config::new`] draws it from the process's
    /// random hasher seed; tests set a constant so runs are reproducible. Not a secret: nonces and session
    /// ids only have to differ.
    pub seed: u64,
}

impl Config {
    pub fn new(name: impl Into<String>, version: impl Into<String>) -> Self {
        Config {
            implementation: Implementation {
                name: name.into(),
                version: version.into(),
            },
            versions: vec![PROTOCOL_VERSION],
            features: Vec::new(),
            receive: ReceiveParams {
                max_frame: DEFAULT_MAX_PAYLOAD,
                initial_stream_window: DEFAULT_STREAM_WINDOW,
                initial_connection_window: DEFAULT_CONNECTION_WINDOW,
            },
            policy_revision: None,
            // std seeds RandomState from the OS once per process: enough for ids and nonces that must differ
            // between sessions and processes, without a dependency and without I/O here.
            seed: std::hash::BuildHasher::hash_one(
                &std::collections::hash_map::RandomState::new(),
                0u8,
            ),
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_concurrent_streams: 128,
            max_request_bytes: 5 * 1024 * 1024,
            max_response_bytes: 10 * 1024 * 1024,
            max_redirects: 5,
            connect_timeout_ms: 10_000,
            idle_timeout_ms: 300_000,
            total_timeout_ms: 900_000,
        }
    }
}

/// What the handshake settled.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionInfo {
    pub session_id: u64,
    /// The host's policy revision, when it announced one.
    pub policy_revision: Option<String>,
    pub version: u16,
    pub peer: Implementation,
    pub peer_features: Vec<String>,
    /// What the peer accepts: bounds this side's frames and initial send credit.
    pub peer_receive: ReceiveParams,
    /// The host's limits (its own on the server, as announced on the client).
    pub limits: Limits,
}

/// Who ended a stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// The peer sent ERROR or CANCEL.
    Peer,
    /// This side failed it: session reset, or the peer broke the stream's rules (and was told so).
    Local,
}

/// What the application learns from the session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// Handshake complete. On the server this follows an accepted HELLO (a re-HELLO restarts the session).
    Established(SessionInfo),
    /// Client only: the host refused the HELLO. The session is closed.
    Refused(ErrorPayload),
    /// Server only: the guest opened a stream.
    Opened {
        stream_id: u32,
        call: MethodCall,
    },
    /// Client only: the response head.
    Head {
        stream_id: u32,
        head: ResponseHead,
    },
    /// DATA arrived. Call [`Session::release`] once it is consumed, or the peer runs out of credit.
    Data {
        stream_id: u32,
        data: Bytes,
    },
    /// The peer finished its direction of the stream.
    End {
        stream_id: u32,
        trailers: Vec<HeaderField>,
    },
    /// The stream ended abnormally in both directions; nothing more arrives for it.
    StreamFailed {
        stream_id: u32,
        error: ErrorPayload,
        origin: Origin,
    },
    /// More send credit: on that stream, or for every stream when `stream_id` is 0. Data written with
    /// [`Session::write`] moves on by itself; this is for callers of [`Session::send_data`].
    SendCapacity {
        stream_id: u32,
    },
    /// A [`Session::write`] found the stream's send buffer full, and room has appeared since.
    Writable {
        stream_id: u32,
    },
    Pong([u8; 8]),
    /// The peer accepts no new streams; streams above `last_stream_id` were failed with `session_reset`.
    GoAway(GoAway),
    /// The peer reported a session-level problem (ERROR on stream 0). The session continues.
    PeerError(ErrorPayload),
    /// This side refused something the peer sent and told the peer so (ERROR on `stream_id`, 0 for the
    /// session). For logs; no action needed.
    Rejected {
        stream_id: u32,
        error: ErrorPayload,
    },
    /// A resynchronisation finished: the session is usable again.
    Resynced,
    /// The session is over (client refused or after GOAWAY for a fatal error).
    Closed,
}

/// A command the session cannot carry out.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SessionError {
    #[error("the session is not established")]
    NotEstablished,
    #[error("the session is closed")]
    Closed,
    #[error("the peer is going away and accepts no new streams")]
    GoingAway,
    #[error("only the {0:?} side may do this")]
    WrongRole(Role),
    #[error("stream {0} is not open")]
    UnknownStream(u32),
    #[error("all stream ids of this session are used")]
    StreamIdsExhausted,
    #[error("the host allows {0} concurrent streams")]
    TooManyStreams(u32),
    #[error("{requested} bytes exceed the {available} bytes of send credit")]
    InsufficientCapacity { requested: usize, available: usize },
    #[error(
        "{requested} bytes exceed the {room} bytes of room in stream {stream_id}'s send buffer"
    )]
    SendBufferFull {
        stream_id: u32,
        requested: usize,
        room: usize,
    },
    #[error("this side already ended stream {0}")]
    AlreadyEnded(u32),
    #[error("HEAD was already sent on stream {0}")]
    HeadAlreadySent(u32),
    #[error("HEAD must be sent before data or END on stream {0}")]
    HeadNotSent(u32),
    #[error("{what} payload of {length} bytes exceeds the peer's max frame of {max}")]
    PayloadTooLarge {
        what: &'static str,
        length: usize,
        max: u32,
    },
}

/// What happens to a removed stream's queued HEAD / DATA / END.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Unsent {
    /// They still go out (ahead of the ERROR that ends the stream).
    Keep,
    /// They are dropped: the stream was cancelled or broke the rules, nobody wants them.
    Drop,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Handshaking,
    Established,
    Resyncing { nonce: u64 },
    Closed,
}

pub struct Session {
    role: Role,
    config: Config,
    /// The server's own limits; on the client, replaced by the HELLO_ACK's.
    limits: Limits,
    state: State,
    info: Option<SessionInfo>,
    decoder: FrameDecoder,
    streams: BTreeMap<u32, Stream>,
    /// Highest stream id opened so far (by the client; v1 has no host-opened streams).
    highest_stream: u32,
    conn_send: SendWindow,
    conn_recv: RecvWindow,
    control: VecDeque<Frame>,
    ordered: VecDeque<Frame>,
    /// Streams whose send buffer has something to move into frames, served one frame at a time in turn,
    /// so one busy stream cannot starve the others.
    ready: VecDeque<u32>,
    events: VecDeque<Event>,
    rng: u64,
    /// Set once this side sent GOAWAY: the last stream id it still serves.
    local_goaway: Option<u32>,
    /// Set once the peer sent GOAWAY.
    peer_goaway: Option<u32>,
    /// Client: the nonce of its HELLO, which the answer must echo.
    hello_nonce: u64,
    /// Server: every HELLO is answered with this error (a host at its session limit).
    refusal: Option<ErrorPayload>,
    /// Grows stream receive windows with the bandwidth-delay product, up to the session window.
    tuner: WindowTuner,
}

impl Session {
    /// A guest session; HELLO is queued at once.
    pub fn client(config: Config) -> Session {
        let mut session = Session::new(Role::Client, config, Limits::default());
        session.send_hello();
        session
    }

    fn send_hello(&mut self) {
        self.hello_nonce = self.next_random();
        let hello = Hello {
            versions: self.config.versions.clone(),
            nonce: self.hello_nonce,
            implementation: self.config.implementation.clone(),
            features: self.config.features.clone(),
            receive: self.config.receive,
        };
        self.push_control(FrameType::Hello, SESSION_STREAM, cbor::encode(&hello));
    }

    /// A host session waiting for HELLO.
    pub fn server(config: Config, limits: Limits) -> Session {
        Session::new(Role::Server, config, limits)
    }

    fn new(role: Role, config: Config, limits: Limits) -> Session {
        Session {
            role,
            decoder: FrameDecoder::new(config.receive.max_frame),
            conn_send: SendWindow::new(0, MAX_USED_CONNECTION_WINDOW),
            conn_recv: RecvWindow::new(config.receive.initial_connection_window),
            tuner: WindowTuner::new(
                config.receive.initial_stream_window,
                config
                    .receive
                    .initial_connection_window
                    .min(MAX_USED_STREAM_WINDOW),
            ),
            rng: config.seed,
            config,
            limits,
            state: State::Handshaking,
            info: None,
            streams: BTreeMap::new(),
            highest_stream: 0,
            control: VecDeque::new(),
            ordered: VecDeque::new(),
            ready: VecDeque::new(),
            events: VecDeque::new(),
            local_goaway: None,
            peer_goaway: None,
            hello_nonce: 0,
            refusal: None,
        }
    }

    /// Server: answers every well-formed HELLO with `error` (carrying that HELLO's nonce, so the guest
    /// reads it as the answer to its HELLO) instead of starting a session: what a host at a limit says.
    /// Each refusal is reported as [`Event::Rejected`] on stream 0.
    pub fn refuse_sessions(&mut self, error: ErrorPayload) {
        self.refusal = Some(error);
    }

    pub fn role(&self) -> Role {
        self.role
    }

    pub fn info(&self) -> Option<&SessionInfo> {
        self.info.as_ref()
    }

    pub fn is_established(&self) -> bool {
        self.state == State::Established
    }

    pub fn is_resyncing(&self) -> bool {
        matches!(self.state, State::Resyncing { .. })
    }

    pub fn is_closed(&self) -> bool {
        self.state == State::Closed
    }

    /// Whether the peer sent a graceful GOAWAY: no stream may be opened on this session any more; the open
    /// ones still run to completion.
    pub fn peer_going_away(&self) -> bool {
        self.peer_goaway.is_some()
    }

    /// Streams not yet finished (including finished ones whose data the application still holds).
    pub fn active_streams(&self) -> usize {
        self.streams.len()
    }

    /// Bytes the frame decoder holds for an incomplete frame (bounded by one header plus max frame).
    pub fn buffered_input(&self) -> usize {
        self.decoder.buffered()
    }

    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// The next frame to write: control frames first, then stream frames in the order they were queued,
    /// then one frame from the next stream whose send buffer the peer's credit lets move.
    pub fn poll_transmit(&mut self) -> Option<Frame> {
        if let Some(frame) = self.control.pop_front() {
            return Some(frame);
        }
        if let Some(frame) = self.ordered.pop_front() {
            return Some(frame);
        }
        self.transmit_from_buffers()
    }

    /// Whether [`Session::poll_transmit`] may have a frame (it can still answer `None` when every buffered
    /// stream waits for credit).
    pub fn has_pending_transmit(&self) -> bool {
        !self.control.is_empty() || !self.ordered.is_empty() || !self.ready.is_empty()
    }

    /// Whether `stream_id` is still known to the session (open, or finished with data the application
    /// has not released).
    pub fn has_stream(&self, stream_id: u32) -> bool {
        self.streams.contains_key(&stream_id)
    }

    /// Whether this side still has something to send on `stream_id`: it is open and this side's END or
    /// ERROR has not gone into the transmit queue yet.
    pub fn is_sending(&self, stream_id: u32) -> bool {
        self.streams
            .get(&stream_id)
            .is_some_and(|stream| !stream.local_ended)
    }

    /// Bytes [`Session::write`] accepts on `stream_id` now: [`STREAM_SEND_BUFFER`] less what was written
    /// and has not left through [`Session::poll_transmit`]. 0 for a stream that is not writable.
    pub fn write_room(&self, stream_id: u32) -> usize {
        match self.streams.get(&stream_id) {
            Some(stream) if !stream.local_ended && stream.outbox.then.is_none() => {
                STREAM_SEND_BUFFER.saturating_sub(stream.outbox.unsent)
            }
            _ => 0,
        }
    }

    /// Buffers `data` for `stream_id`; it goes out as DATA frames as the peer's credit allows, fairly
    /// among streams. Unlike [`Session::send_data`] it does not need credit now, only room in the stream's
    /// send buffer ([`Session::write_room`]); when there is too little, nothing is taken and
    /// [`Event::Writable`] follows once room appears.
    pub fn write(&mut self, stream_id: u32, data: Bytes) -> Result<(), SessionError> {
        let room = self.write_room(stream_id);
        let role = self.role;
        let stream = self.writable_stream(stream_id)?;
        if role == Role::Server && !stream.head {
            return Err(SessionError::HeadNotSent(stream_id));
        }
        if stream.outbox.then.is_some() {
            return Err(SessionError::AlreadyEnded(stream_id));
        }
        if data.len() > room {
            stream.outbox.blocked = true;
            return Err(SessionError::SendBufferFull {
                stream_id,
                requested: data.len(),
                room,
            });
        }
        if data.is_empty() {
            return Ok(());
        }
        stream.outbox.unsent += data.len();
        stream.outbox.data.push_back(data);
        self.mark_ready(stream_id);
        Ok(())
    }

    /// Ends this side's direction after the data already written ([`Session::send_end`] once the send
    /// buffer is empty).
    pub fn write_end(
        &mut self,
        stream_id: u32,
        trailers: Vec<HeaderField>,
    ) -> Result<(), SessionError> {
        let stream = self.writable_stream(stream_id)?;
        if stream.outbox.then.is_some() {
            return Err(SessionError::AlreadyEnded(stream_id));
        }
        if stream.outbox.data.is_empty() {
            return self.send_end(stream_id, trailers);
        }
        stream.outbox.then = Some(Then::End(trailers));
        Ok(())
    }

    /// Fails the stream after the data already written ([`Session::send_error`] once the send buffer is
    /// empty). To fail it at once, dropping what is buffered, call [`Session::send_error`].
    pub fn write_error(&mut self, stream_id: u32, error: ErrorPayload) -> Result<(), SessionError> {
        self.require_established()?;
        let stream = self
            .streams
            .get_mut(&stream_id)
            .ok_or(SessionError::UnknownStream(stream_id))?;
        if stream.outbox.data.is_empty() {
            return self.send_error(stream_id, error);
        }
        stream.outbox.then = Some(Then::Error(error));
        Ok(())
    }

    /// Drops what was written on `stream_id` and not yet sent, with a pending END or ERROR.
    pub fn discard_unsent(&mut self, stream_id: u32) {
        if let Some(stream) = self.streams.get_mut(&stream_id) {
            stream.outbox = stream::Outbox::default();
        }
    }

    fn mark_ready(&mut self, stream_id: u32) {
        if let Some(stream) = self.streams.get_mut(&stream_id) {
            let outbox = &mut stream.outbox;
            if !outbox.ready && (!outbox.data.is_empty() || outbox.then.is_some()) {
                outbox.ready = true;
                self.ready.push_back(stream_id);
            }
        }
    }

    /// Streams that wait for credit come back into the round-robin when it arrives.
    fn credit_arrived(&mut self, stream_id: u32) {
        if stream_id == SESSION_STREAM {
            let ids: Vec<u32> = self
                .streams
                .iter()
                .filter(|(_, s)| !s.outbox.data.is_empty())
                .map(|(id, _)| *id)
                .collect();
            for id in ids {
                self.mark_ready(id);
            }
        } else {
            self.mark_ready(stream_id);
        }
    }

    /// One frame from the next ready stream's send buffer: a DATA frame as large as its credit and the
    /// peer's max frame allow, or the END / ERROR that follows the last data.
    fn transmit_from_buffers(&mut self) -> Option<Frame> {
        if self.state != State::Established {
            return None;
        }
        let max_frame = self.peer_receive().max_frame as usize;
        while let Some(id) = self.ready.pop_front() {
            let credit = self.send_capacity(id);
            let Some(stream) = self.streams.get_mut(&id) else {
                continue;
            };
            let outbox = &mut stream.outbox;
            outbox.ready = false;
            if let Some(mut data) = outbox.data.pop_front() {
                if credit == 0 {
                    // Back with the peer's WINDOW_UPDATE (credit_arrived).
                    outbox.data.push_front(data);
                    continue;
                }
                let piece = data.split_to(data.len().min(credit).min(max_frame));
                if !data.is_empty() {
                    outbox.data.push_front(data);
                }
                outbox.unsent -= piece.len();
                let writable = outbox.blocked;
                outbox.blocked = false;
                if self.send_data(id, piece).is_err() {
                    continue;
                }
                if writable {
                    self.events.push_back(Event::Writable { stream_id: id });
                }
                self.mark_ready(id);
                return self.ordered.pop_front();
            }
            match outbox.then.take() {
                Some(Then::End(trailers)) => {
                    let _ = self.send_end(id, trailers);
                }
                Some(Then::Error(error)) => {
                    let _ = self.send_error(id, error);
                }
                None => continue,
            }
            return self.ordered.pop_front();
        }
        None
    }

    /// Client: opens a stream for `call` and returns its id. Request body DATA and END follow.
    pub fn open(&mut self, call: MethodCall) -> Result<u32, SessionError> {
        self.require_role(Role::Client)?;
        self.require_established()?;
        if self.peer_goaway.is_some() || self.local_goaway.is_some() {
            return Err(SessionError::GoingAway);
        }
        let max_streams = self.limits.max_concurrent_streams;
        if self.streams.len() >= max_streams as usize {
            return Err(SessionError::TooManyStreams(max_streams));
        }
        let stream_id = match self.highest_stream {
            0 => 1,
            id => id.checked_add(2).ok_or(SessionError::StreamIdsExhausted)?,
        };
        let payload = call.encode();
        self.check_frame_size("OPEN", payload.len())?;
        let peer = self.peer_receive();
        self.highest_stream = stream_id;
        self.streams.insert(
            stream_id,
            Stream::new(
                call,
                peer.initial_stream_window,
                self.config.receive.initial_stream_window,
            ),
        );
        self.push_ordered(FrameType::Open, stream_id, payload);
        Ok(stream_id)
    }

    /// Server: the response head; must precede DATA and END.
    pub fn send_head(&mut self, stream_id: u32, head: &ResponseHead) -> Result<(), SessionError> {
        self.require_role(Role::Server)?;
        let payload = head.encode();
        self.check_frame_size("HEAD", payload.len())?;
        let stream = self.writable_stream(stream_id)?;
        if stream.head {
            return Err(SessionError::HeadAlreadySent(stream_id));
        }
        stream.head = true;
        self.push_ordered(FrameType::Head, stream_id, payload);
        Ok(())
    }

    /// DATA bytes this side may send on `stream_id` now (0 for a stream that is not writable).
    pub fn send_capacity(&self, stream_id: u32) -> usize {
        match self.streams.get(&stream_id) {
            Some(stream) if !stream.local_ended && self.state == State::Established => {
                stream.send.available().min(self.conn_send.available()) as usize
            }
            _ => 0,
        }
    }

    /// Queues `data` as DATA frames no larger than the peer's max frame. `data` must fit in
    /// [`Session::send_capacity`]; wait for [`Event::SendCapacity`] otherwise.
    pub fn send_data(&mut self, stream_id: u32, data: Bytes) -> Result<(), SessionError> {
        let available = self.send_capacity(stream_id);
        let role = self.role;
        let stream = self.writable_stream(stream_id)?;
        if role == Role::Server && !stream.head {
            return Err(SessionError::HeadNotSent(stream_id));
        }
        if data.len() > available {
            return Err(SessionError::InsufficientCapacity {
                requested: data.len(),
                available,
            });
        }
        // Fits in u32: available is bounded by a window of at most 2^31-1.
        let length = data.len() as u32;
        stream.send.consume(length);
        self.conn_send.consume(length);
        let max_frame = self.peer_receive().max_frame as usize;
        let mut rest = data;
        while !rest.is_empty() {
            let chunk = rest.split_to(rest.len().min(max_frame));
            self.push_ordered(FrameType::Data, stream_id, chunk);
        }
        Ok(())
    }

    /// Ends this side's direction of the stream, with optional trailers.
    pub fn send_end(
        &mut self,
        stream_id: u32,
        trailers: Vec<HeaderField>,
    ) -> Result<(), SessionError> {
        let payload = End { trailers }.encode();
        self.check_frame_size("END", payload.len())?;
        let role = self.role;
        let stream = self.writable_stream(stream_id)?;
        if role == Role::Server && !stream.head {
            return Err(SessionError::HeadNotSent(stream_id));
        }
        stream.local_ended = true;
        self.push_ordered(FrameType::End, stream_id, payload);
        self.close_if_done(stream_id);
        Ok(())
    }

    /// Ends the stream in both directions with an error for the peer. The ERROR is queued behind the
    /// stream's HEAD and DATA already queued, so the peer sees the data up to the failure, then the error
    /// (a response cut at the size cap arrives as its first bytes followed by `response_too_large`).
    pub fn send_error(&mut self, stream_id: u32, error: ErrorPayload) -> Result<(), SessionError> {
        self.require_established()?;
        if !self.streams.contains_key(&stream_id) {
            return Err(SessionError::UnknownStream(stream_id));
        }
        let payload = cbor::encode(&error);
        self.check_frame_size("ERROR", payload.len())?;
        self.remove_stream(stream_id, Unsent::Keep);
        self.push_ordered(FrameType::Error, stream_id, payload);
        Ok(())
    }

    /// Abandons the stream in both directions at once: its unsent frames are dropped and CANCEL goes ahead
    /// of queued DATA. If its OPEN had not left yet, the peer never hears of the stream.
    pub fn cancel(&mut self, stream_id: u32) -> Result<(), SessionError> {
        if !self.streams.contains_key(&stream_id) {
            return Err(SessionError::UnknownStream(stream_id));
        }
        let open_was_queued = self.remove_stream(stream_id, Unsent::Drop);
        if !open_was_queued && self.state == State::Established {
            self.push_control(FrameType::Cancel, stream_id, Bytes::new());
        }
        Ok(())
    }

    /// The application consumed `n` bytes of DATA received on `stream_id`; credit flows back to the peer.
    /// Releasing for a stream that already failed is a no-op (the session released its data itself).
    pub fn release(&mut self, stream_id: u32, n: usize) {
        let n = u32::try_from(n).unwrap_or(u32::MAX);
        let Some(stream) = self.streams.get_mut(&stream_id) else {
            return;
        };
        let n = n.min(stream.recv.held());
        let stream_update = stream.recv.release(n);
        let remote_ended = stream.remote_ended;
        self.release_connection(n);
        // After the peer's END no more DATA comes, so a stream WINDOW_UPDATE would be noise.
        if let (Some(increment), false) = (stream_update, remote_ended) {
            self.push_control(
                FrameType::WindowUpdate,
                stream_id,
                encode_window_update(increment).to_vec(),
            );
        }
        self.close_if_done(stream_id);
    }

    /// Queues a PING; the peer's PONG arrives as [`Event::Pong`].
    pub fn ping(&mut self, payload: [u8; 8]) -> Result<(), SessionError> {
        self.require_established()?;
        self.push_control(FrameType::Ping, SESSION_STREAM, payload.to_vec());
        Ok(())
    }

    /// Announces that this side accepts (host) or opens (guest) no new streams; streams already open
    /// finish. `last_stream_id` names the peer-opened streams this side will still serve: on the host the
    /// highest the guest opened, on the guest 0 (hosts open no streams in v1), so a guest's GOAWAY never
    /// cancels its own requests.
    pub fn go_away(&mut self, code: ErrorCode, message: impl Into<String>) {
        let last_stream_id = match self.role {
            Role::Server => self.highest_stream,
            Role::Client => 0,
        };
        self.local_goaway = Some(last_stream_id);
        let goaway = GoAway {
            code,
            message: message.into(),
            last_stream_id,
        };
        match self.role {
            Role::Server => {
                self.push_control(FrameType::GoAway, SESSION_STREAM, cbor::encode(&goaway))
            }
            // Behind the OPENs already queued: a guest's GOAWAY that overtook them would make the host
            // refuse streams the guest opened before it said it was leaving.
            Role::Client => {
                self.push_ordered(FrameType::GoAway, SESSION_STREAM, cbor::encode(&goaway))
            }
        }
    }

    /// Starts a resynchronisation (§8 of the spec): in-flight streams fail with `session_reset`, a SYNC
    /// with a fresh nonce goes out, and everything but SYNC, SYNC_ACK and HELLO is dropped until it is
    /// answered.
    pub fn resync(&mut self) {
        if matches!(self.state, State::Handshaking | State::Closed) {
            return;
        }
        self.reset_streams("the session is resynchronising");
        self.reset_connection_windows();
        self.send_sync();
    }

    fn send_sync(&mut self) {
        let nonce = self.next_random();
        self.state = State::Resyncing { nonce };
        self.push_control(
            FrameType::Sync,
            SESSION_STREAM,
            nonce.to_be_bytes().to_vec(),
        );
    }

    /// True while this side waits for the answer to its HELLO (client) or SYNC. The answer or the request
    /// may have been lost, so the adapter calls [`Session::retry`] if this stays true for about a second.
    pub fn awaiting_answer(&self) -> bool {
        matches!(self.state, State::Resyncing { .. })
            || (self.role == Role::Client && self.state == State::Handshaking)
    }

    /// Sends the unanswered HELLO or SYNC again, with a fresh nonce so that a late answer to the first one
    /// is not mistaken for the answer to this one. Does nothing when no answer is awaited.
    pub fn retry(&mut self) {
        match (self.state, self.role) {
            (State::Resyncing { .. }, _) => self.send_sync(),
            (State::Handshaking, Role::Client) => self.send_hello(),
            _ => {}
        }
    }

    /// The transport was re-established underneath (a virtio-serial port reconnected): anything buffered
    /// may be half a frame, and the peer may have lost bytes too.
    pub fn transport_reconnected(&mut self) {
        self.decoder.reset_to_scanning();
        self.resync();
    }

    /// The byte stream ended for good (socket closed). Every in-flight stream fails with `session_reset`.
    pub fn transport_closed(&mut self) {
        self.reset_streams("the transport closed");
        self.control.clear();
        self.ordered.clear();
        self.ready.clear();
        if self.state != State::Closed {
            self.state = State::Closed;
            self.events.push_back(Event::Closed);
        }
    }

    fn require_role(&self, role: Role) -> Result<(), SessionError> {
        if self.role == role {
            Ok(())
        } else {
            Err(SessionError::WrongRole(role))
        }
    }

    fn require_established(&self) -> Result<(), SessionError> {
        match self.state {
            State::Established => Ok(()),
            State::Closed => Err(SessionError::Closed),
            State::Handshaking | State::Resyncing { .. } => Err(SessionError::NotEstablished),
        }
    }

    fn peer_receive(&self) -> ReceiveParams {
        self.info.as_ref().map_or(
            ReceiveParams {
                max_frame: DEFAULT_MAX_PAYLOAD,
                initial_stream_window: 0,
                initial_connection_window: 0,
            },
            |info| info.peer_receive,
        )
    }

    fn check_frame_size(&self, what: &'static str, length: usize) -> Result<(), SessionError> {
        let max = self.peer_receive().max_frame;
        if length > max as usize {
            Err(SessionError::PayloadTooLarge { what, length, max })
        } else {
            Ok(())
        }
    }

    fn writable_stream(&mut self, stream_id: u32) -> Result<&mut Stream, SessionError> {
        self.require_established()?;
        let stream = self
            .streams
            .get_mut(&stream_id)
            .ok_or(SessionError::UnknownStream(stream_id))?;
        if stream.local_ended {
            return Err(SessionError::AlreadyEnded(stream_id));
        }
        Ok(stream)
    }

    fn push_control(&mut self, frame_type: FrameType, stream_id: u32, payload: impl Into<Bytes>) {
        self.control
            .push_back(Frame::new(frame_type, stream_id, payload));
    }

    fn push_ordered(&mut self, frame_type: FrameType, stream_id: u32, payload: impl Into<Bytes>) {
        self.ordered
            .push_back(Frame::new(frame_type, stream_id, payload));
    }

    /// Forgets a stream and releases the connection credit of data the application still held. With
    /// [`Unsent::Drop`] its queued stream frames go too (giving back the send credit of unsent DATA).
    /// Returns whether its OPEN was among the frames dropped.
    fn remove_stream(&mut self, stream_id: u32, unsent_frames: Unsent) -> bool {
        let Some(stream) = self.streams.remove(&stream_id) else {
            return false;
        };
        self.control.retain(|frame| frame.stream_id != stream_id);
        self.release_connection(stream.recv.held());
        if unsent_frames == Unsent::Keep {
            return false;
        }
        let mut open_was_queued = false;
        let mut unsent = 0u32;
        self.ordered.retain(|frame| {
            if frame.stream_id != stream_id {
                return true;
            }
            match frame.frame_type {
                FrameType::Open => open_was_queued = true,
                FrameType::Data => unsent += frame.payload.len() as u32,
                _ => {}
            }
            false
        });
        // Cannot overflow: the credit being returned was taken from this same window.
        let _ = self.conn_send.grant(unsent);
        open_was_queued
    }

    fn release_connection(&mut self, n: u32) {
        if let Some(increment) = self.conn_recv.release(n) {
            self.push_control(
                FrameType::WindowUpdate,
                SESSION_STREAM,
                encode_window_update(increment).to_vec(),
            );
        }
    }

    fn close_if_done(&mut self, stream_id: u32) {
        if self.streams.get(&stream_id).is_some_and(Stream::is_done) {
            self.streams.remove(&stream_id);
        }
    }

    /// Fails every stream locally with `session_reset` and clears the transmit queues of stream frames.
    fn reset_streams(&mut self, why: &str) {
        self.ready.clear();
        let ids: Vec<u32> = self.streams.keys().copied().collect();
        for stream_id in ids {
            self.streams.remove(&stream_id);
            self.events.push_back(Event::StreamFailed {
                stream_id,
                error: ErrorPayload::new(ErrorCode::SessionReset, why).retryable(true),
                origin: Origin::Local,
            });
        }
        self.ordered.clear();
        self.control.retain(|frame| {
            frame.stream_id == SESSION_STREAM && frame.frame_type != FrameType::WindowUpdate
        });
    }

    fn reset_connection_windows(&mut self) {
        self.conn_send = SendWindow::new(
            self.peer_receive().initial_connection_window,
            MAX_USED_CONNECTION_WINDOW,
        );
        self.conn_recv = RecvWindow::new(self.config.receive.initial_connection_window);
        self.tuner.forget_probe();
    }

    /// Raises `stream_id`'s receive window to the tuner's and announces the extra credit. Only a transfer
    /// is raised: a stream whose reader has consumed half a window (so a reader that does not read keeps
    /// the initial window, whatever other streams of the session did); streams are raised as their DATA
    /// arrives, and all at once when the window grows.
    fn raise_window(&mut self, stream_id: u32) {
        let window = self.tuner.window();
        let Some(stream) = self.streams.get_mut(&stream_id) else {
            return;
        };
        // A guest's stream before its HEAD may still have its OPEN queued behind this WINDOW_UPDATE (control
        // goes first): the host would not know the stream yet and would drop the credit.
        if stream.remote_ended
            || !stream.recv.regranted()
            || (self.role == Role::Client && !stream.head)
        {
            return;
        }
        if let Some(extra) = stream.recv.grow(window) {
            self.push_control(
                FrameType::WindowUpdate,
                stream_id,
                encode_window_update(extra).to_vec(),
            );
        }
    }

    /// splitmix64: a few lines, no dependency, and good enough for nonces and ids that need only to differ.
    fn next_random(&mut self) -> u64 {
        self.rng = self.rng.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}
