//! What the session does with each frame it receives, state by state.
//!
//! Rule of thumb: a problem confined to one stream fails that stream (ERROR to the peer, `StreamFailed` to
//! the application) and nothing else; a malformed session frame is answered with ERROR on stream 0 and the
//! session goes on; unreadable bytes start a resync; only a flow-control breach of the session window, which
//! leaves both sides' accounting meaningless, ends the session with GOAWAY.

use bytes::Bytes;

use super::tuning::Pong;
use super::{Event, Origin, Session, SessionInfo, State, Stream, Unsent};
use crate::frame::{DecodeError, Flags, Frame, FrameType, SESSION_STREAM};
use crate::payload::{
    cbor, decode_nonce, decode_ping, decode_window_update, End, ErrorCode, ErrorDetails,
    ErrorPayload, GoAway, Hello, HelloAck, MethodCall, OpenError, ResponseHead,
};

use super::Role;

impl Session {
    /// Feeds bytes read from the transport. Any amount, split anywhere; the decoder keeps at most one
    /// partial frame.
    pub fn receive(&mut self, mut input: &[u8]) {
        while let Some(result) = self.decoder.decode(&mut input) {
            match result {
                Ok(frame) => self.handle_frame(frame),
                Err(err) => self.handle_decode_error(err),
            }
            if self.state == State::Closed {
                return;
            }
        }
    }

    fn handle_decode_error(&mut self, err: DecodeError) {
        let error = ErrorPayload::new(ErrorCode::ProtocolError, format!("unreadable frame: {err}"))
            .with_details(ErrorDetails {
                frame_error: Some(err.code().to_string()),
                ..ErrorDetails::default()
            });
        match (self.state, self.role) {
            (State::Established, _) => {
                self.tell_peer(SESSION_STREAM, error);
                self.resync();
            }
            // The guest should learn that its HELLO never arrived intact.
            (State::Handshaking, Role::Server) => self.tell_peer(SESSION_STREAM, error),
            // Stale bytes before our HELLO_ACK, or more garbage while a SYNC is outstanding: keep scanning.
            _ => {}
        }
    }

    fn handle_frame(&mut self, frame: Frame) {
        match self.state {
            State::Closed => {}
            State::Handshaking => self.handle_handshaking(frame),
            State::Resyncing { nonce } => self.handle_resyncing(frame, nonce),
            State::Established => self.handle_established(frame),
        }
    }

    fn handle_handshaking(&mut self, frame: Frame) {
        match (self.role, frame.frame_type) {
            (Role::Server, FrameType::Hello) if frame.stream_id == SESSION_STREAM => {
                self.handle_hello(&frame.payload)
            }
            (Role::Server, FrameType::Unknown(_)) if frame.flags.contains(Flags::IGNORABLE) => {}
            // A well-formed frame before any HELLO comes from a guest whose session this host does not
            // have (the host restarted under it, or the guest is confused): tell it to start one.
            (Role::Server, other) => self.tell_peer(
                SESSION_STREAM,
                ErrorPayload::new(
                    ErrorCode::SessionReset,
                    format!("no session: send HELLO (got {})", other.name()),
                )
                .retryable(true),
            ),
            (Role::Client, FrameType::HelloAck) if frame.stream_id == SESSION_STREAM => {
                self.handle_hello_ack(&frame.payload)
            }
            (Role::Client, FrameType::Error) if frame.stream_id == SESSION_STREAM => {
                let error = decode_error_payload(&frame.payload);
                if error.details.hello_nonce == Some(self.hello_nonce) {
                    self.close(Event::Refused(error));
                }
            }
            // Anything else, and answers to someone else's HELLO, may be left over from an earlier session
            // on the same port.
            (Role::Client, _) => {}
        }
    }

    fn handle_resyncing(&mut self, frame: Frame, nonce: u64) {
        match frame.frame_type {
            FrameType::SyncAck if decode_nonce(&frame.payload) == Ok(nonce) => {
                self.state = State::Established;
                self.events.push_back(Event::Resynced);
            }
            FrameType::Sync => self.handle_sync(&frame.payload),
            FrameType::Hello if self.role == Role::Server => self.handle_hello(&frame.payload),
            FrameType::Error if frame.stream_id == SESSION_STREAM => {
                let error = decode_error_payload(&frame.payload);
                self.events.push_back(Event::PeerError(error));
            }
            // Sent before the peer saw our SYNC: it belongs to streams that no longer exist.
            _ => {}
        }
    }

    fn handle_established(&mut self, frame: Frame) {
        let frame_type = frame.frame_type;
        let on_session_stream = frame.stream_id == SESSION_STREAM;
        if frame_type.is_session_frame() && !on_session_stream {
            return self.reject_session(format!("{} must be sent on stream 0", frame_type.name()));
        }
        if on_session_stream
            && matches!(
                frame_type,
                FrameType::Open
                    | FrameType::Data
                    | FrameType::Head
                    | FrameType::End
                    | FrameType::Cancel
            )
        {
            return self.reject_session(format!("{} needs a stream id", frame_type.name()));
        }
        let id = frame.stream_id;
        match frame_type {
            FrameType::Hello if self.role == Role::Server => self.handle_hello(&frame.payload),
            FrameType::Hello | FrameType::HelloAck => {
                self.reject_session(format!("unexpected {}", frame_type.name()))
            }
            FrameType::Ping => match decode_ping(&frame.payload) {
                Ok(payload) => self.push_control(FrameType::Pong, SESSION_STREAM, payload.to_vec()),
                Err(err) => self.reject_session(err.to_string()),
            },
            FrameType::Pong => match decode_ping(&frame.payload) {
                Ok(payload) => match self.tuner.on_pong(payload) {
                    Pong::Other => self.events.push_back(Event::Pong(payload)),
                    Pong::Kept => {}
                    Pong::Grown(_) => {
                        let receiving: Vec<u32> = self.streams.keys().copied().collect();
                        for stream_id in receiving {
                            self.raise_window(stream_id);
                        }
                    }
                },
                Err(err) => self.reject_session(err.to_string()),
            },
            FrameType::WindowUpdate => self.handle_window_update(id, &frame.payload),
            FrameType::GoAway => self.handle_goaway(&frame.payload),
            FrameType::Sync => self.handle_sync(&frame.payload),
            // A SYNC_ACK for a resync that already completed (we retried): harmless.
            FrameType::SyncAck => {}
            FrameType::Open if self.role == Role::Server => self.handle_open(id, &frame.payload),
            FrameType::Head if self.role == Role::Client => self.handle_head(id, &frame.payload),
            FrameType::Open | FrameType::Head => self.reject_stream(
                id,
                ErrorCode::ProtocolError,
                format!("{} may not be sent by this side", frame_type.name()),
            ),
            FrameType::Data => self.handle_data(id, frame.payload),
            FrameType::End => self.handle_end(id, &frame.payload),
            FrameType::Error if on_session_stream => {
                let error = decode_error_payload(&frame.payload);
                self.events.push_back(Event::PeerError(error));
            }
            FrameType::Error => {
                let error = decode_error_payload(&frame.payload);
                self.peer_ended_stream(id, error);
            }
            FrameType::Cancel => self.peer_ended_stream(
                id,
                ErrorPayload::new(ErrorCode::Cancelled, "the peer cancelled the stream"),
            ),
            FrameType::Unknown(_) if frame.flags.contains(Flags::IGNORABLE) => {}
            FrameType::Unknown(code) => {
                self.reject_session(format!("unknown frame type 0x{code:02x} without IGNORABLE"))
            }
        }
    }

    fn handle_hello(&mut self, payload: &[u8]) {
        if matches!(self.state, State::Established | State::Resyncing { .. }) {
            // A new HELLO starts a new session: the guest rebooted or its SDK reconnected.
            self.reset_streams("the guest started a new session");
            self.state = State::Handshaking;
            self.info = None;
        }
        // Whatever was still queued answered an earlier session; the new guest must not read it.
        self.control.clear();
        self.ordered.clear();
        let hello: Hello = match cbor::decode("HELLO", payload) {
            Ok(hello) => hello,
            Err(err) => return self.reject_session(err.to_string()),
        };
        let refuse = |code, message: String| {
            ErrorPayload::new(code, message).with_details(ErrorDetails {
                hello_nonce: Some(hello.nonce),
                ..ErrorDetails::default()
            })
        };
        if let Some(mut error) = self.refusal.clone() {
            error.details.hello_nonce = Some(hello.nonce);
            return self.tell_peer(SESSION_STREAM, error);
        }
        if let Err(reason) = hello.receive.check() {
            let error = refuse(ErrorCode::ProtocolError, format!("HELLO: {reason}"));
            return self.tell_peer(SESSION_STREAM, error);
        }
        let Some(version) = hello
            .versions
            .iter()
            .copied()
            .filter(|v| self.config.versions.contains(v))
            .max()
        else {
            let mut error = refuse(
                ErrorCode::UnsupportedVersion,
                format!(
                    "no common protocol version: guest offers {:?}, host speaks {:?}",
                    hello.versions, self.config.versions
                ),
            );
            error.details.supported_versions = self.config.versions.clone();
            return self.tell_peer(SESSION_STREAM, error);
        };
        let session_id = self.next_random();
        let ack = HelloAck {
            version,
            nonce: hello.nonce,
            session_id,
            implementation: self.config.implementation.clone(),
            features: self.config.features.clone(),
            receive: self.config.receive,
            limits: self.limits,
            policy_revision: self.config.policy_revision.clone(),
        };
        self.push_control(FrameType::HelloAck, SESSION_STREAM, cbor::encode(&ack));
        self.establish(SessionInfo {
            session_id,
            policy_revision: self.config.policy_revision.clone(),
            version,
            peer: hello.implementation,
            peer_features: hello.features,
            peer_receive: hello.receive,
            limits: self.limits,
        });
    }

    fn handle_hello_ack(&mut self, payload: &[u8]) {
        let ack: HelloAck = match cbor::decode("HELLO_ACK", payload) {
            Ok(ack) => ack,
            Err(err) => return self.refuse_locally(err.to_string()),
        };
        if ack.nonce != self.hello_nonce {
            // The answer to an earlier guest's HELLO, still in the port.
            return;
        }
        if !self.config.versions.contains(&ack.version) {
            return self.refuse_locally(format!(
                "HELLO_ACK chose version {} which was not offered",
                ack.version
            ));
        }
        if let Err(reason) = ack.receive.check() {
            return self.refuse_locally(format!("HELLO_ACK: {reason}"));
        }
        self.limits = ack.limits;
        self.establish(SessionInfo {
            session_id: ack.session_id,
            policy_revision: ack.policy_revision,
            version: ack.version,
            peer: ack.implementation,
            peer_features: ack.features,
            peer_receive: ack.receive,
            limits: ack.limits,
        });
    }

    fn establish(&mut self, info: SessionInfo) {
        self.info = Some(info.clone());
        self.state = State::Established;
        self.highest_stream = 0;
        self.local_goaway = None;
        self.peer_goaway = None;
        self.reset_connection_windows();
        self.events.push_back(Event::Established(info));
    }

    fn handle_sync(&mut self, payload: &[u8]) {
        let nonce = match decode_nonce(payload) {
            Ok(nonce) => nonce,
            Err(err) => return self.reject_session(err.to_string()),
        };
        self.reset_streams("the peer resynchronised the session");
        self.reset_connection_windows();
        self.push_control(
            FrameType::SyncAck,
            SESSION_STREAM,
            nonce.to_be_bytes().to_vec(),
        );
    }

    fn handle_open(&mut self, id: u32, payload: &[u8]) {
        if id % 2 == 0 {
            return self.reject_stream(
                id,
                ErrorCode::ProtocolError,
                "streams opened by the guest have odd ids",
            );
        }
        if id <= self.highest_stream {
            return self.reject_stream(
                id,
                ErrorCode::ProtocolError,
                format!(
                    "stream id {id} is not above the last one opened ({})",
                    self.highest_stream
                ),
            );
        }
        self.highest_stream = id;
        if self.peer_goaway.is_some() {
            return self.reject_stream(
                id,
                ErrorCode::ProtocolError,
                "the guest sent GOAWAY and may open no more streams",
            );
        }
        if self.local_goaway.is_some() {
            let error = ErrorPayload::new(ErrorCode::SessionReset, "the host is going away")
                .retryable(true);
            return self.tell_peer(id, error);
        }
        let max = self.limits.max_concurrent_streams;
        if self.streams.len() >= max as usize {
            let error = ErrorPayload::new(
                ErrorCode::ResourceExhausted,
                format!("at most {max} concurrent streams"),
            )
            .retryable(true)
            .with_details(ErrorDetails {
                limit: Some(u64::from(max)),
                ..ErrorDetails::default()
            });
            return self.tell_peer(id, error);
        }
        match MethodCall::decode(payload) {
            Ok(call) => {
                let stream = Stream::new(
                    call.clone(),
                    self.peer_receive().initial_stream_window,
                    self.config.receive.initial_stream_window,
                );
                self.streams.insert(id, stream);
                self.events.push_back(Event::Opened {
                    stream_id: id,
                    call,
                });
            }
            Err(OpenError::MethodNotFound(method)) => self.tell_peer(
                id,
                ErrorPayload::new(
                    ErrorCode::MethodNotFound,
                    format!("method {method:?} is not implemented"),
                ),
            ),
            Err(OpenError::Invalid(err)) => self.tell_peer(
                id,
                ErrorPayload::new(ErrorCode::InvalidRequest, err.to_string()),
            ),
        }
    }

    fn handle_head(&mut self, id: u32, payload: &[u8]) {
        let Some(stream) = self.streams.get_mut(&id) else {
            return self.unknown_stream(id, FrameType::Head);
        };
        if stream.head {
            return self.reject_stream(id, ErrorCode::ProtocolError, "a second HEAD");
        }
        match ResponseHead::decode(&stream.call, payload) {
            Ok(head) => {
                stream.head = true;
                self.events.push_back(Event::Head {
                    stream_id: id,
                    head,
                });
            }
            Err(err) => self.reject_stream(id, ErrorCode::ProtocolError, err.to_string()),
        }
    }

    fn handle_data(&mut self, id: u32, data: Bytes) {
        // Fits: the decoder refuses payloads above HARD_MAX_PAYLOAD.
        let length = data.len() as u32;
        // Every DATA byte counts against the session window, wherever it lands.
        if let Err(err) = self.conn_recv.receive(length) {
            return self.fatal(format!("session flow control: {err}"));
        }
        let role = self.role;
        let Some(stream) = self.streams.get_mut(&id) else {
            // Discarded data still returns session credit, or the window would shrink for good.
            self.release_connection(length);
            return self.unknown_stream(id, FrameType::Data);
        };
        let problem = if stream.remote_ended {
            Some("DATA after END".to_string())
        } else if role == Role::Client && !stream.head {
            Some("DATA before HEAD".to_string())
        } else {
            stream
                .recv
                .receive(length)
                .err()
                .map(|err| format!("stream flow control: {err}"))
        };
        if let Some(problem) = problem {
            self.release_connection(length);
            return self.reject_stream(id, ErrorCode::ProtocolError, problem);
        }
        // A stream whose reader has consumed half a window is a transfer worth measuring; a small response
        // never gets there and costs no PING.
        let bulk = stream.recv.regranted();
        if length > 0 {
            self.events.push_back(Event::Data {
                stream_id: id,
                data,
            });
            if let Some(probe) = self.tuner.on_data(length, bulk) {
                self.push_control(FrameType::Ping, SESSION_STREAM, probe.to_vec());
            }
            self.raise_window(id);
        }
    }

    fn handle_end(&mut self, id: u32, payload: &[u8]) {
        let role = self.role;
        let Some(stream) = self.streams.get_mut(&id) else {
            return self.unknown_stream(id, FrameType::End);
        };
        let problem = if stream.remote_ended {
            Some("a second END".to_string())
        } else if role == Role::Client && !stream.head {
            Some("END before HEAD".to_string())
        } else {
            None
        };
        if let Some(problem) = problem {
            return self.reject_stream(id, ErrorCode::ProtocolError, problem);
        }
        match End::decode(payload) {
            Ok(end) => {
                stream.remote_ended = true;
                self.events.push_back(Event::End {
                    stream_id: id,
                    trailers: end.trailers,
                });
                self.close_if_done(id);
            }
            Err(err) => self.reject_stream(id, ErrorCode::ProtocolError, err.to_string()),
        }
    }

    fn handle_window_update(&mut self, id: u32, payload: &[u8]) {
        let increment = match decode_window_update(payload) {
            Ok(increment) => increment,
            // Session credit the peer meant to grant is unknown now: both sides' accounting is off, as
            // for an overflow (§6).
            Err(err) if id == SESSION_STREAM => {
                return self.fatal(format!("session WINDOW_UPDATE: {err}"))
            }
            Err(err) => return self.reject_stream(id, ErrorCode::ProtocolError, err.to_string()),
        };
        if id == SESSION_STREAM {
            if let Err(err) = self.conn_send.grant(increment) {
                return self.fatal(format!("session flow control: {err}"));
            }
        } else {
            let Some(stream) = self.streams.get_mut(&id) else {
                // Credit for a stream that already finished: nothing to do.
                return;
            };
            if let Err(err) = stream.send.grant(increment) {
                return self.reject_stream(id, ErrorCode::ProtocolError, err.to_string());
            }
        }
        self.events.push_back(Event::SendCapacity { stream_id: id });
        self.credit_arrived(id);
    }

    fn handle_goaway(&mut self, payload: &[u8]) {
        let goaway: GoAway = match cbor::decode("GOAWAY", payload) {
            Ok(goaway) => goaway,
            Err(err) => return self.reject_session(err.to_string()),
        };
        if goaway.code == ErrorCode::ProtocolError {
            // The peer ended the session over a breach: it has already dropped every stream.
            return self.end_session(Event::GoAway(goaway));
        }
        self.peer_goaway = Some(goaway.last_stream_id);
        // last_stream_id bounds the streams *this* side opened: the guest's on a host's GOAWAY. A guest's
        // GOAWAY names host-opened streams (none in v1); the streams it opened itself still get answers.
        let unprocessed: Vec<u32> = match self.role {
            Role::Client => self
                .streams
                .range(goaway.last_stream_id.saturating_add(1)..)
                .map(|(id, _)| *id)
                .collect(),
            Role::Server => Vec::new(),
        };
        for id in unprocessed {
            self.remove_stream(id, Unsent::Drop);
            self.events.push_back(Event::StreamFailed {
                stream_id: id,
                error: ErrorPayload::new(ErrorCode::SessionReset, "not processed: peer going away")
                    .retryable(true),
                origin: Origin::Peer,
            });
        }
        self.events.push_back(Event::GoAway(goaway));
    }

    fn peer_ended_stream(&mut self, id: u32, error: ErrorPayload) {
        if self.streams.contains_key(&id) {
            self.remove_stream(id, Unsent::Drop);
            self.events.push_back(Event::StreamFailed {
                stream_id: id,
                error,
                origin: Origin::Peer,
            });
        }
        // An ERROR or CANCEL for a stream that is not open is never answered, not even when the id was
        // never opened: two peers answering each other's errors would bounce them forever.
    }

    /// A stream frame for an id with no live stream: fine for a stream that finished (the frame crossed our
    /// ERROR or CANCEL on the wire), a protocol error for one that was never opened.
    fn unknown_stream(&mut self, id: u32, frame_type: FrameType) {
        if !self.was_opened(id) {
            self.reject_stream(
                id,
                ErrorCode::ProtocolError,
                format!(
                    "{} for stream {id}, which was never opened",
                    frame_type.name()
                ),
            );
        }
    }

    fn was_opened(&self, id: u32) -> bool {
        id % 2 == 1 && id <= self.highest_stream
    }

    /// Fails a stream because of something the peer did, and tells the peer.
    fn reject_stream(&mut self, id: u32, code: ErrorCode, message: impl Into<String>) {
        let error = ErrorPayload::new(code, message);
        if self.streams.contains_key(&id) {
            self.remove_stream(id, Unsent::Drop);
            self.events.push_back(Event::StreamFailed {
                stream_id: id,
                error: error.clone(),
                origin: Origin::Local,
            });
            self.push_control(FrameType::Error, id, cbor::encode(&error));
        } else {
            self.tell_peer(id, error);
        }
    }

    fn reject_session(&mut self, message: impl Into<String>) {
        self.tell_peer(
            SESSION_STREAM,
            ErrorPayload::new(ErrorCode::ProtocolError, message),
        );
    }

    /// Sends ERROR and records that we did.
    fn tell_peer(&mut self, id: u32, error: ErrorPayload) {
        self.push_control(FrameType::Error, id, cbor::encode(&error));
        self.events.push_back(Event::Rejected {
            stream_id: id,
            error,
        });
    }

    /// The client cannot use what the host answered to its HELLO.
    fn refuse_locally(&mut self, message: String) {
        self.close(Event::Refused(ErrorPayload::new(
            ErrorCode::ProtocolError,
            message,
        )));
    }

    fn close(&mut self, event: Event) {
        self.reset_streams("the session closed");
        self.state = State::Closed;
        self.events.push_back(event);
        self.events.push_back(Event::Closed);
    }

    /// The peer broke session-wide accounting: nothing it sends can be trusted to line up any more.
    fn fatal(&mut self, message: String) {
        let error = ErrorPayload::new(ErrorCode::ProtocolError, message);
        let goaway = GoAway {
            code: ErrorCode::ProtocolError,
            message: error.message.clone(),
            last_stream_id: self.highest_stream,
        };
        self.end_session(Event::Rejected {
            stream_id: SESSION_STREAM,
            error,
        });
        self.push_control(FrameType::GoAway, SESSION_STREAM, cbor::encode(&goaway));
    }

    /// Fails every stream and ends the session: a guest closes; a host waits for a new HELLO, because the
    /// port stays.
    fn end_session(&mut self, event: Event) {
        match self.role {
            Role::Client => self.close(event),
            Role::Server => {
                self.reset_streams("the session ended");
                self.control.clear();
                self.state = State::Handshaking;
                self.info = None;
                self.events.push_back(event);
            }
        }
    }
}

/// An ERROR payload that cannot be decoded still ends the stream; keep what is known.
fn decode_error_payload(payload: &[u8]) -> ErrorPayload {
    cbor::decode::<ErrorPayload>("ERROR", payload).unwrap_or_else(|err| {
        ErrorPayload::new(
            ErrorCode::ProtocolError,
            format!("undecodable ERROR: {err}"),
        )
    })
}
