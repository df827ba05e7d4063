//! Serving one guest connection: a driver task owns the sans-IO [`Session`]; a reader task and a writer task
//! own the two halves of the transport, so the driver never blocks on I/O (and the host can never deadlock
//! writing to a guest that is itself blocked writing to the host); one worker task per stream runs the
//! request pipeline and talks to the driver over channels.
//!
//! A misbehaving session only ever affects its own tasks: frames it gets wrong are answered by the session
//! with machine-readable errors, and nothing it sends is trusted to size an allocation.

mod stream;

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use pexi_protocol::payload::{ErrorCode, ErrorPayload, Implementation};
use pexi_protocol::session::{Config as SessionConfig, Event, Session};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;

use stream::Command;
pub use stream::{
    Gone, HeadRefused, RequestBody, Responder, StreamRequest, MAX_CHUNK, STREAM_BUFFER,
};

use crate::pipeline::{Caller, Pipeline};

/// How long an unanswered SYNC waits before a fresh one.
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// Serves one transport connection until the guest goes away, the transport fails, or `shutdown` fires.
pub async fn serve_connection<T>(
    io: T,
    pipeline: Arc<Pipeline>,
    shutdown: CancellationToken,
    peer: String,
) where
    T: AsyncRead + AsyncWrite + Send + 'static,
{
    let mut config = SessionConfig::new("pexi-host", env!("CARGO_PKG_VERSION"));
    config.versions = vec![pexi_protocol::session::PROTOCOL_VERSION];
    config.policy_revision = Some(pipeline.policy_revision());
    let session = Session::server(config, pipeline.config.pep.limits.protocol_limits());
    let (reader, writer) = tokio::io::split(io);
    let (in_tx, in_rx) = mpsc::channel::<Bytes>(8);
    let (out_tx, out_rx) = mpsc::channel::<Vec<u8>>(16);
    let read_task = tokio::spawn(read_loop(reader, in_tx));
    let write_task = tokio::spawn(write_loop(writer, out_rx));
    let (commands_tx, commands_rx) = mpsc::unbounded_channel();
    let mut driver = Driver {
        session,
        pipeline,
        streams: HashMap::new(),
        commands_tx,
        peer,
    };
    driver.run(in_rx, out_tx, commands_rx, shutdown).await;
    read_task.abort();
    // The writer drains what the driver queued (a GOAWAY, the last ERRORs) and then ends with the channel.
    let _ = write_task.await;
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

async fn write_loop<W: AsyncWrite + Unpin>(mut writer: W, mut rx: mpsc::Receiver<Vec<u8>>) {
    while let Some(bytes) = rx.recv().await {
        if writer.write_all(&bytes).await.is_err() {
            return;
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
    /// Worker output waiting for the guest's credit, in order.
    pending: VecDeque<Out>,
    buffer: Arc<Semaphore>,
}

enum Out {
    Data(Bytes),
    End,
    Error(ErrorPayload),
}

struct Driver {
    session: Session,
    pipeline: Arc<Pipeline>,
    streams: HashMap<u32, StreamState>,
    commands_tx: mpsc::UnboundedSender<Command>,
    peer: String,
}

impl Driver {
    async fn run(
        &mut self,
        mut input: mpsc::Receiver<Bytes>,
        output: mpsc::Sender<Vec<u8>>,
        mut commands: mpsc::UnboundedReceiver<Command>,
        shutdown: CancellationToken,
    ) {
        let mut input_open = true;
        let mut shutting_down = false;
        let handshake_limit =
            Duration::from_millis(self.pipeline.config.pep.limits.handshake_timeout_ms);
        let handshake_deadline = tokio::time::sleep(handshake_limit);
        tokio::pin!(handshake_deadline);
        loop {
            tokio::select! {
                biased;
                () = &mut handshake_deadline, if self.session.info().is_none() => {
                    tracing::info!(peer = %self.peer, ?handshake_limit, "no HELLO in time; closing the connection");
                    self.pipeline.record(
                        "session",
                        serde_json::json!({"event": "handshake_timeout", "peer": self.peer, "limit_ms": handshake_limit.as_millis() as u64}),
                    );
                    break;
                }
                _ = shutdown.cancelled(), if !shutting_down => {
                    shutting_down = true;
                    // Each in-flight stream learns its outcome is unknown, then no new stream is accepted.
                    let ids: Vec<u32> = self.streams.keys().copied().collect();
                    for id in ids {
                        let error = ErrorPayload::new(ErrorCode::SessionReset, "the PEP is shutting down")
                            .retryable(true);
                        let _ = self.session.send_error(id, error);
                        self.forget(id);
                    }
                    self.session.go_away(ErrorCode::SessionReset, "the PEP is shutting down");
                }
                permit = output.reserve(), if self.session.has_pending_transmit() => {
                    let Ok(permit) = permit else { break };
                    if let Some(frame) = self.session.poll_transmit() {
                        permit.send(frame.encode());
                    }
                }
                bytes = input.recv(), if input_open => match bytes {
                    Some(bytes) => self.session.receive(&bytes),
                    None => {
                        input_open = false;
                        self.session.transport_closed();
                    }
                },
                Some(command) = commands.recv() => self.apply(command),
                _ = tokio::time::sleep(RETRY_AFTER), if self.session.awaiting_answer() => self.session.retry(),
            }
            self.handle_events();
            let done = (!input_open || shutting_down) && !self.session.has_pending_transmit();
            if done {
                break;
            }
        }
        self.fail_all("the connection ended");
        let session_id = self
            .session
            .info()
            .map(|i| format!("{:016x}", i.session_id));
        self.pipeline.record(
            "session",
            serde_json::json!({"event": "close", "session_id": session_id, "peer": self.peer}),
        );
    }

    fn handle_events(&mut self) {
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
                    self.pipeline.record(
                        "session",
                        serde_json::json!({
                            "event": "open",
                            "session_id": format!("{:016x}", info.session_id),
                            "peer": self.peer,
                            "guest": {"name": info.peer.name, "version": info.peer.version},
                            "protocol_version": info.version,
                        }),
                    );
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
                    stream_id, error, ..
                } => {
                    tracing::debug!(stream_id, code = %error.code, "stream ended abnormally");
                    self.forget(stream_id);
                }
                Event::SendCapacity { stream_id: 0 } => {
                    let ids: Vec<u32> = self.streams.keys().copied().collect();
                    for id in ids {
                        self.flush_stream(id);
                    }
                }
                Event::SendCapacity { stream_id } => self.flush_stream(stream_id),
                Event::Rejected { stream_id, error } => tracing::warn!(
                    peer = %self.peer, stream_id, code = ?error.code, message = ?error.message,
                    "refused guest input"
                ),
                Event::PeerError(error) => tracing::warn!(
                    peer = %self.peer, code = ?error.code, message = ?error.message, "guest reported an error"
                ),
                Event::GoAway(goaway) => {
                    tracing::info!(peer = %self.peer, code = %goaway.code, "guest sent GOAWAY")
                }
                Event::Resynced => tracing::info!(peer = %self.peer, "session resynchronised"),
                Event::Closed => tracing::info!(peer = %self.peer, "session closed"),
                Event::Pong(_) | Event::Refused(_) | Event::Head { .. } => {}
            }
        }
    }

    fn open(&mut self, stream_id: u32, call: pexi_protocol::payload::MethodCall) {
        let Some(info) = self.session.info() else {
            return;
        };
        let caller = Caller {
            session_id: info.session_id,
            guest: Implementation {
                name: info.peer.name.clone(),
                version: info.peer.version.clone(),
            },
            stream_id,
        };
        let (body_tx, body_rx) = mpsc::unbounded_channel();
        let cancel = CancellationToken::new();
        let buffer = Arc::new(Semaphore::new(STREAM_BUFFER));
        self.streams.insert(
            stream_id,
            StreamState {
                body: Some(body_tx),
                cancel: cancel.clone(),
                pending: VecDeque::new(),
                buffer: buffer.clone(),
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
                max_head: self
                    .session
                    .info()
                    .map_or(pexi_protocol::frame::DEFAULT_MAX_PAYLOAD, |info| {
                        info.peer_receive.max_frame
                    }) as usize,
            },
            cancel,
        };
        tokio::spawn(self.pipeline.clone().serve_stream(request));
    }

    fn apply(&mut self, command: Command) {
        match command {
            Command::Head(id, head) => {
                if let Err(err) = self.session.send_head(id, &head) {
                    tracing::debug!(stream_id = id, %err, "HEAD for a stream that is gone");
                }
            }
            Command::Data(id, data) => self.queue(id, Out::Data(data)),
            Command::End(id) => self.queue(id, Out::End),
            Command::Error(id, error) => self.queue(id, Out::Error(error)),
            Command::Release(id, n) => self.session.release(id, n),
        }
    }

    fn queue(&mut self, stream_id: u32, out: Out) {
        match self.streams.get_mut(&stream_id) {
            Some(state) => {
                state.pending.push_back(out);
                self.flush_stream(stream_id);
            }
            None => {
                // The stream is gone: its worker's output goes nowhere.
            }
        }
    }

    /// Moves a stream's pending output into the session as far as the guest's credit allows. Once the
    /// stream's END or ERROR is in the session, the driver forgets it (the session finishes it).
    fn flush_stream(&mut self, stream_id: u32) {
        let Some(state) = self.streams.get_mut(&stream_id) else {
            return;
        };
        let mut finished = false;
        while let Some(out) = state.pending.pop_front() {
            match out {
                Out::Data(mut data) => {
                    let room = self.session.send_capacity(stream_id);
                    if room == 0 {
                        state.pending.push_front(Out::Data(data));
                        return;
                    }
                    let piece = data.split_to(data.len().min(room));
                    let len = piece.len();
                    if self.session.send_data(stream_id, piece).is_err() {
                        finished = true;
                        break;
                    }
                    state.buffer.add_permits(len);
                    if !data.is_empty() {
                        state.pending.push_front(Out::Data(data));
                        return;
                    }
                }
                Out::End => {
                    let _ = self.session.send_end(stream_id, Vec::new());
                    finished = true;
                    break;
                }
                Out::Error(error) => {
                    let _ = self.session.send_error(stream_id, error);
                    finished = true;
                    break;
                }
            }
        }
        if finished {
            if let Some(state) = self.streams.remove(&stream_id) {
                state.buffer.close();
            }
        }
    }

    fn forget(&mut self, stream_id: u32) {
        if let Some(state) = self.streams.remove(&stream_id) {
            state.cancel.cancel();
            state.buffer.close();
        }
    }

    fn fail_all(&mut self, why: &str) {
        let ids: Vec<u32> = self.streams.keys().copied().collect();
        for id in ids {
            tracing::debug!(stream_id = id, why, "cancelling stream");
            self.forget(id);
        }
    }
}
