//! Serving one guest connection: a driver task owns the sans-IO [`Session`]; a reader task and a writer task
//! own the two halves of the transport, so the driver never blocks on I/O (and the host can never deadlock
//! writing to a guest that is itself blocked writing to the host); one worker task per stream runs the
//! request pipeline and talks to the driver over channels.
//!
//! A misbehaving session only ever affects its own tasks: frames it gets wrong are answered by the session
//! with machine-readable errors, and nothing it sends is trusted to size an allocation.

pub mod admission;
pub mod budget;
mod stream;

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use pexi_protocol::frame::FrameType;
use pexi_protocol::payload::{ErrorCode, ErrorPayload, Implementation};
use pexi_protocol::session::{Config as SessionConfig, Event, Session};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use admission::{Refusal, SessionSlot};
use budget::{Charge, SessionBudget};
use stream::Command;
pub use stream::{
    EndedBy, HeadRefused, Progress, RequestBody, Responder, SendFailed, StreamRequest, MAX_CHUNK,
    STREAM_BUFFER,
};

use crate::audit::records::{self, SessionEvent};
use crate::pipeline::{Caller, Pipeline};

/// How long an unanswered SYNC waits before a fresh one.
const RETRY_AFTER: Duration = Duration::from_secs(1);
/// After the drain deadline, how long the last ERRORs get to reach a guest before the connection is
/// dropped anyway (a guest that reads nothing must not hold a shutdown).
const LAST_WORDS: Duration = Duration::from_secs(1);

/// Whether a connection was admitted (see [`admission::Admission::admit`]).
pub enum Admitted {
    Yes(SessionSlot),
    /// Over a limit: the guest's HELLO is answered with this refusal, then the connection closes.
    No(Refusal),
}

/// Serves one transport connection until the guest goes away, the transport fails, or `shutdown` fires
/// (then open streams get `drain_timeout_ms` to finish).
pub async fn serve_connection<T>(
    io: T,
    pipeline: Arc<Pipeline>,
    shutdown: CancellationToken,
    peer: String,
    admitted: Admitted,
) where
    T: AsyncRead + AsyncWrite + Send + 'static,
{
    let mut config = SessionConfig::new("pexi-host", env!("CARGO_PKG_VERSION"));
    config.versions = vec![pexi_protocol::session::PROTOCOL_VERSION];
    config.policy_revision = Some(pipeline.policy_revision());
    let mut session = Session::server(config, pipeline.config.pep.limits.protocol_limits());
    let slot = match admitted {
        Admitted::Yes(slot) => Some(slot),
        Admitted::No(Refusal { slot: None, error }) => {
            // A flood of these must not become a flood of log lines.
            if let Some(closed) = pipeline.admission.closed_at_once.hit() {
                tracing::warn!(%peer, closed, message = %error.message, "connections closed at once: over a limit, and too many refusals in flight");
            }
            return;
        }
        Admitted::No(Refusal {
            slot: Some(_refusing),
            error,
        }) => {
            tracing::warn!(%peer, message = %error.message, "refusing the session");
            pipeline.record(&records::Session {
                code: Some(error.code.as_str().to_string()),
                message: Some(error.message.clone()),
                limit: error.details.limit,
                ..records::Session::new(SessionEvent::Refused, &peer)
            });
            session.refuse_sessions(error);
            // `_refusing` is held until this connection has been answered.
            return serve_session(io, pipeline, shutdown, peer, session, None).await;
        }
    };
    serve_session(io, pipeline, shutdown, peer, session, slot).await;
}

async fn serve_session<T>(
    io: T,
    pipeline: Arc<Pipeline>,
    shutdown: CancellationToken,
    peer: String,
    session: Session,
    slot: Option<SessionSlot>,
) where
    T: AsyncRead + AsyncWrite + Send + 'static,
{
    let (reader, writer) = tokio::io::split(io);
    let (in_tx, in_rx) = mpsc::channel::<Bytes>(8);
    let (out_tx, out_rx) = mpsc::channel::<Outgoing>(16);
    let read_task = tokio::spawn(read_loop(reader, in_tx));
    let mut write_task = tokio::spawn(write_loop(writer, out_rx));
    let (commands_tx, commands_rx) = mpsc::unbounded_channel();
    let budget = pipeline.admission.budget.session();
    let own_streams = pipeline.admission.session_streams();
    let mut driver = Driver {
        session,
        pipeline,
        streams: HashMap::new(),
        ready: VecDeque::new(),
        in_flight: None,
        commands_tx,
        budget,
        own_streams,
        peer,
        refusing: slot.is_none(),
        refusal_sent: false,
    };
    driver.run(in_rx, out_tx, commands_rx, shutdown).await;
    read_task.abort();
    // The writer drains what the driver queued (a GOAWAY, the last ERRORs) and then ends with the channel;
    // a guest that reads nothing does not get to hold the connection open for that.
    if tokio::time::timeout(LAST_WORDS, &mut write_task)
        .await
        .is_err()
    {
        write_task.abort();
    }
    drop(slot);
}

async fn read_loop<R: AsyncRead + Unpin>(mut reader: R, tx: mpsc::Sender<Bytes>) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match reader.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if tx.send(Bytes::copy_from_slice(&buf[..n])).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// One encoded frame for the writer. A DATA frame carries its bytes' charge: the stream's buffer and the
/// budget get them back only once the transport has taken the frame, so a guest that does not read its
/// socket holds at most [`STREAM_BUFFER`] per stream, whatever credit it announced.
struct Outgoing {
    bytes: Vec<u8>,
    data: Option<(Charge, Arc<Progress>)>,
}

async fn write_loop<W: AsyncWrite + Unpin>(mut writer: W, mut rx: mpsc::Receiver<Outgoing>) {
    while let Some(out) = rx.recv().await {
        if writer.write_all(&out.bytes).await.is_err() {
            return;
        }
        if let Some((charge, progress)) = out.data {
            progress.add_delivered(charge.len());
        }
        // Flush only when nothing else is queued: one syscall for a burst of frames.
        if rx.is_empty() && writer.flush().await.is_err() {
            return;
        }
    }
    let _ = writer.shutdown().await;
}

/// What the driver keeps per stream besides what the session keeps.
struct StreamState {
    /// Request body to the worker; dropped at the guest's END.
    body: Option<mpsc::UnboundedSender<Bytes>>,
    cancel: CancellationToken,
    /// Worker output not yet handed to the session, in order.
    pending: VecDeque<Out>,
    buffer: Arc<Semaphore>,
    progress: Arc<Progress>,
    /// Whether the stream is in the driver's `ready` queue.
    ready: bool,
}

enum Out {
    Data(Bytes, Charge),
    End,
    Error(ErrorPayload),
}

struct Driver {
    session: Session,
    pipeline: Arc<Pipeline>,
    streams: HashMap<u32, StreamState>,
    /// Streams with output to move into the session, served round-robin one frame at a time.
    ready: VecDeque<u32>,
    /// The charge of the one DATA frame just moved into the session, until the writer takes it.
    in_flight: Option<(u32, Charge, Arc<Progress>)>,
    commands_tx: mpsc::UnboundedSender<Command>,
    budget: SessionBudget,
    /// This session's reserved stream places (`session_reserved_streams`).
    own_streams: Arc<Semaphore>,
    peer: String,
    /// Over a limit: the guest's HELLO is answered with a refusal and the connection then closes.
    refusing: bool,
    refusal_sent: bool,
}

/// Why a connection's driver is winding down.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Drain {
    Shutdown,
    GuestGoAway,
}

impl Driver {
    async fn run(
        &mut self,
        mut input: mpsc::Receiver<Bytes>,
        output: mpsc::Sender<Outgoing>,
        mut commands: mpsc::UnboundedReceiver<Command>,
        shutdown: CancellationToken,
    ) {
        let limits = &self.pipeline.config.pep.limits;
        let handshake_limit = Duration::from_millis(limits.handshake_timeout_ms);
        let idle_limit = Duration::from_millis(limits.idle_connection_timeout_ms);
        let drain_limit = Duration::from_millis(limits.drain_timeout_ms);
        let mut input_open = true;
        let mut refused = false;
        let mut drain: Option<(Drain, Instant)> = None;
        // Set once the drain deadline passed: the connection ends then, whatever is still queued.
        let mut hard_stop: Option<Instant> = None;
        let handshake_deadline = tokio::time::sleep(handshake_limit);
        tokio::pin!(handshake_deadline);
        let mut last_input = Instant::now();
        let far = || Instant::now() + Duration::from_secs(86_400 * 365);
        loop {
            let idle_at = if self.session.info().is_some() && self.streams.is_empty() {
                last_input + idle_limit
            } else {
                far()
            };
            let drain_at = match (drain, hard_stop) {
                (Some((_, at)), None) => at,
                _ => far(),
            };
            tokio::select! {
                biased;
                () = &mut handshake_deadline, if self.session.info().is_none() => {
                    tracing::info!(peer = %self.peer, ?handshake_limit, "no HELLO in time; closing the connection");
                    self.record_session_event(SessionEvent::HandshakeTimeout, Some(handshake_limit));
                    break;
                }
                () = tokio::time::sleep_until(hard_stop.unwrap_or_else(far)), if hard_stop.is_some() => break,
                () = tokio::time::sleep_until(drain_at), if drain.is_some() && hard_stop.is_none() => {
                    self.cut_remaining(drain_limit);
                    hard_stop = Some(Instant::now() + LAST_WORDS);
                }
                () = tokio::time::sleep_until(idle_at), if drain.is_none() => {
                    tracing::info!(peer = %self.peer, ?idle_limit, "session idle; closing the connection");
                    self.record_session_event(SessionEvent::IdleTimeout, Some(idle_limit));
                    break;
                }
                _ = shutdown.cancelled(), if !matches!(drain, Some((Drain::Shutdown, _))) => {
                    // Streams already open may finish within the drain deadline; new ones are refused.
                    let deadline = drain.map_or(Instant::now() + drain_limit, |(_, at)| at);
                    drain = Some((Drain::Shutdown, deadline));
                    if self.session.is_established() {
                        self.session.go_away(ErrorCode::SessionReset, "the PEP is shutting down");
                    }
                }
                permit = output.reserve(), if self.session.has_pending_transmit() || !self.ready.is_empty() => {
                    let Ok(permit) = permit else { break };
                    if !self.session.has_pending_transmit() {
                        self.push_next_data();
                    }
                    if let Some(frame) = self.session.poll_transmit() {
                        let data = match self.in_flight.take() {
                            Some((id, charge, progress)) if frame.frame_type == FrameType::Data && frame.stream_id == id => {
                                Some((charge, progress))
                            }
                            other => {
                                self.in_flight = other;
                                None
                            }
                        };
                        permit.send(Outgoing { bytes: frame.encode(), data });
                    }
                }
                bytes = input.recv(), if input_open => match bytes {
                    Some(bytes) => {
                        last_input = Instant::now();
                        self.session.receive(&bytes);
                    }
                    None => {
                        input_open = false;
                        self.session.transport_closed();
                    }
                },
                Some(command) = commands.recv() => self.apply(command),
                _ = tokio::time::sleep(RETRY_AFTER), if self.session.awaiting_answer() => self.session.retry(),
            }
            if self.handle_events() && drain.is_none() {
                drain = Some((Drain::GuestGoAway, Instant::now() + drain_limit));
            }
            if self.refusing && !refused {
                refused = self.session.info().is_none() && self.refusal_sent;
            }
            let quiet = !self.session.has_pending_transmit() && self.ready.is_empty();
            if !input_open {
                break;
            }
            let done = (drain.is_some() && self.streams.is_empty()) || (self.refusing && refused);
            if done && quiet {
                break;
            }
        }
        if let Some((why, _)) = drain {
            self.record_session_event(
                match why {
                    Drain::Shutdown => SessionEvent::DrainedForShutdown,
                    Drain::GuestGoAway => SessionEvent::DrainedAfterGuestGoaway,
                },
                None,
            );
        }
        self.fail_all(EndedBy::SessionReset, "the connection ended");
        if !self.refusing {
            self.record_session_event(SessionEvent::Close, None);
        }
    }

    fn record_session_event(&self, event: SessionEvent, limit: Option<Duration>) {
        self.pipeline.record(&records::Session {
            session_id: self
                .session
                .info()
                .map(|i| format!("{:016x}", i.session_id)),
            limit_ms: limit.map(|l| l.as_millis() as u64),
            ..records::Session::new(event, &self.peer)
        });
    }

    /// The drain deadline passed: each stream still open gets ERROR `session_reset` after what it was
    /// already sent, and its worker stops (its outcome record says `shutdown`).
    fn cut_remaining(&mut self, drain_limit: Duration) {
        let ids: Vec<u32> = self.streams.keys().copied().collect();
        for id in ids {
            if let Some(state) = self.streams.get(&id) {
                state.progress.set_ended_by(EndedBy::Shutdown);
            }
            let error = ErrorPayload::new(
                ErrorCode::SessionReset,
                format!("the connection is closing and this stream did not finish within {drain_limit:?}"),
            )
            .retryable(true);
            let _ = self.session.send_error(id, error);
            self.forget(id, EndedBy::Shutdown);
        }
    }

    /// Returns whether the guest sent GOAWAY.
    fn handle_events(&mut self) -> bool {
        let mut guest_goaway = false;
        while let Some(event) = self.session.poll_event() {
            match event {
                Event::Established(info) => {
                    tracing::info!(
                        peer = %self.peer,
                        session = format_args!("{:016x}", info.session_id),
                        // Debug form: the guest chose these bytes, and a newline or an escape
                        // sequence must not forge a log line or drive the operator's terminal.
                        guest = ?info.peer.name,
                        guest_version = ?info.peer.version,
                        "session established"
                    );
                    self.pipeline.record(&records::Session {
                        session_id: Some(format!("{:016x}", info.session_id)),
                        guest: Some(records::Guest {
                            name: info.peer.name.clone(),
                            version: info.peer.version.clone(),
                        }),
                        protocol_version: Some(info.version),
                        ..records::Session::new(SessionEvent::Open, &self.peer)
                    });
                }
                Event::Opened { stream_id, call } => self.open(stream_id, call),
                Event::Data { stream_id, data } => {
                    let len = data.len();
                    let delivered = self
                        .streams
                        .get(&stream_id)
                        .and_then(|s| s.body.as_ref())
                        .is_some_and(|body| body.send(data).is_ok());
                    if !delivered {
                        // Nobody reads this body (the worker finished early): give the credit back now.
                        self.session.release(stream_id, len);
                    }
                }
                Event::End { stream_id, .. } => {
                    if let Some(state) = self.streams.get_mut(&stream_id) {
                        state.body = None;
                    }
                }
                Event::StreamFailed {
                    stream_id,
                    error,
                    origin,
                } => {
                    tracing::debug!(stream_id, code = %error.code, "stream ended abnormally");
                    let why = match origin {
                        pexi_protocol::session::Origin::Peer
                            if error.code != ErrorCode::SessionReset =>
                        {
                            EndedBy::Guest
                        }
                        _ => EndedBy::SessionReset,
                    };
                    self.forget(stream_id, why);
                }
                Event::SendCapacity { stream_id: 0 } => {
                    let ids: Vec<u32> = self.streams.keys().copied().collect();
                    for id in ids {
                        self.mark_ready(id);
                    }
                }
                Event::SendCapacity { stream_id } => self.mark_ready(stream_id),
                Event::Rejected { stream_id, error } => {
                    if stream_id == 0 && self.refusing && self.session.info().is_none() {
                        self.refusal_sent = true;
                    }
                    tracing::warn!(
                        peer = %self.peer, stream_id, code = ?error.code, message = ?error.message,
                        "refused guest input"
                    )
                }
                Event::PeerError(error) => tracing::warn!(
                    peer = %self.peer, code = ?error.code, message = ?error.message, "guest reported an error"
                ),
                Event::GoAway(goaway) => {
                    tracing::info!(peer = %self.peer, code = %goaway.code, "guest sent GOAWAY; draining");
                    guest_goaway = true;
                }
                Event::Resynced => tracing::info!(peer = %self.peer, "session resynchronised"),
                Event::Closed => tracing::info!(peer = %self.peer, "session closed"),
                Event::Pong(_) | Event::Refused(_) | Event::Head { .. } => {}
            }
        }
        guest_goaway
    }

    fn open(&mut self, stream_id: u32, call: pexi_protocol::payload::MethodCall) {
        let Some(info) = self.session.info() else {
            return;
        };
        let slot = match self.pipeline.admission.stream_slot(&self.own_streams) {
            Ok(slot) => slot,
            Err(error) => {
                tracing::warn!(peer = %self.peer, stream_id, message = %error.message, "stream refused");
                let _ = self.session.send_error(stream_id, error);
                return;
            }
        };
        let caller = Caller {
            session_id: info.session_id,
            guest: Implementation {
                name: info.peer.name.clone(),
                version: info.peer.version.clone(),
            },
            stream_id,
        };
        let max_head = info.peer_receive.max_frame as usize;
        let (body_tx, body_rx) = mpsc::unbounded_channel();
        let cancel = CancellationToken::new();
        let buffer = Arc::new(Semaphore::new(STREAM_BUFFER));
        let progress = Arc::new(Progress::default());
        self.streams.insert(
            stream_id,
            StreamState {
                body: Some(body_tx),
                cancel: cancel.clone(),
                pending: VecDeque::new(),
                buffer: buffer.clone(),
                progress: progress.clone(),
                ready: false,
            },
        );
        let request = StreamRequest {
            caller,
            call,
            body: RequestBody {
                stream_id,
                chunks: body_rx,
                commands: self.commands_tx.clone(),
            },
            responder: Responder {
                stream_id,
                commands: self.commands_tx.clone(),
                buffer,
                budget: self.budget.clone(),
                stall: Duration::from_millis(self.pipeline.config.pep.limits.idle_timeout_ms),
                progress,
                max_head,
            },
            cancel,
            slot,
        };
        self.pipeline
            .admission
            .workers
            .spawn(self.pipeline.clone().serve_stream(request));
    }

    fn apply(&mut self, command: Command) {
        match command {
            Command::Head(id, head) => {
                if let Err(err) = self.session.send_head(id, &head) {
                    tracing::debug!(stream_id = id, %err, "HEAD for a stream that is gone");
                }
            }
            Command::Data(id, data, charge) => self.queue(id, Out::Data(data, charge)),
            Command::End(id) => self.queue(id, Out::End),
            Command::Error(id, error) => {
                if error.code == ErrorCode::GuestStalled {
                    // The guest takes no data, so what is still pending would hold the ERROR back for
                    // ever: the ERROR goes now, the unsent data (and its charge) with the stream.
                    if let Some(state) = self.streams.get_mut(&id) {
                        state.pending.clear();
                    }
                }
                self.queue(id, Out::Error(error))
            }
            Command::Release(id, n) => self.session.release(id, n),
        }
    }

    fn queue(&mut self, stream_id: u32, out: Out) {
        // A stream that is gone drops its worker's output (and with it the output's charge).
        if let Some(state) = self.streams.get_mut(&stream_id) {
            state.pending.push_back(out);
            self.mark_ready(stream_id);
        }
    }

    fn mark_ready(&mut self, stream_id: u32) {
        if let Some(state) = self.streams.get_mut(&stream_id) {
            if !state.ready && !state.pending.is_empty() {
                state.ready = true;
                self.ready.push_back(stream_id);
            }
        }
    }

    /// Moves one frame's worth of the next ready stream's output into the session (round-robin, so one
    /// busy stream cannot starve the others). Called only when the session has nothing queued, so the DATA
    /// frame is the next one out and its charge rides with it to the writer.
    fn push_next_data(&mut self) {
        let max_frame = self
            .session
            .info()
            .map_or(MAX_CHUNK, |info| info.peer_receive.max_frame as usize)
            .min(MAX_CHUNK);
        while let Some(id) = self.ready.pop_front() {
            let Some(state) = self.streams.get_mut(&id) else {
                continue;
            };
            state.ready = false;
            let finished = match state.pending.pop_front() {
                None => continue,
                Some(Out::Data(mut data, mut charge)) => {
                    let room = self.session.send_capacity(id);
                    if room == 0 {
                        // Waits for the guest's WINDOW_UPDATE (Event::SendCapacity).
                        state.pending.push_front(Out::Data(data, charge));
                        continue;
                    }
                    let piece = data.split_to(data.len().min(room).min(max_frame));
                    let piece_charge = charge.split_to(piece.len());
                    if !data.is_empty() {
                        state.pending.push_front(Out::Data(data, charge));
                    }
                    let progress = state.progress.clone();
                    if self.session.send_data(id, piece).is_err() {
                        true
                    } else {
                        self.in_flight = Some((id, piece_charge, progress));
                        self.mark_ready(id);
                        return;
                    }
                }
                Some(Out::End) => {
                    let _ = self.session.send_end(id, Vec::new());
                    true
                }
                Some(Out::Error(error)) => {
                    let _ = self.session.send_error(id, error);
                    true
                }
            };
            if finished {
                // The session finishes the stream; the worker is done with it.
                if let Some(state) = self.streams.remove(&id) {
                    state.buffer.close();
                }
                return;
            }
        }
    }

    fn forget(&mut self, stream_id: u32, why: EndedBy) {
        if let Some(state) = self.streams.remove(&stream_id) {
            state.progress.set_ended_by(why);
            state.cancel.cancel();
            state.buffer.close();
        }
    }

    fn fail_all(&mut self, why: EndedBy, reason: &str) {
        let ids: Vec<u32> = self.streams.keys().copied().collect();
        for id in ids {
            tracing::debug!(stream_id = id, reason, "cancelling stream");
            self.forget(id, why);
        }
    }
}
