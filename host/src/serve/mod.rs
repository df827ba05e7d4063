//! Serving one guest connection: the protocol's driver ([`pexi_protocol::io::drive`]) owns the transport
//! and the session; this module is the host's [`Handler`] of it. It admits streams and starts one worker per
//! stream (the request pipeline), and keeps the host's clocks: the handshake and idle limits, and the drain
//! after a shutdown or the guest's GOAWAY.
//!
//! A misbehaving session only ever affects its own tasks: frames it gets wrong are answered by the session
//! with machine-readable errors, and nothing it sends is trusted to size an allocation.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use pexi_protocol::io::{self, Ended, Handler, Link};
use pexi_protocol::payload::{ErrorCode, ErrorPayload, Implementation, MethodCall};
use pexi_protocol::session::{Config as SessionConfig, Event, Origin, Session};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::audit::records::{self, SessionEvent};
use crate::config::VmIdentity;
use crate::limits::admission::{Refusal, SessionSlot};
use crate::limits::budget::SessionBudget;
use crate::pipeline::Pipeline;
use crate::stream::{Caller, EndedBy, Progress, RequestBody, Responder, StreamRequest};

/// After the drain deadline, how long the last ERRORs get to reach a guest before the connection is
/// dropped anyway (a guest that reads nothing must not hold a shutdown).
const LAST_WORDS: Duration = Duration::from_secs(1);

/// The other end of a connection as the host knows it: where it came in (`unix:PATH#N`, `vsock:cidC:P`,
/// ...) and the VM its listener names. Nothing here comes from the guest.
#[derive(Clone, Debug)]
pub struct Peer {
    pub place: String,
    pub vm: Arc<VmIdentity>,
}

impl Peer {
    fn record(&self, event: SessionEvent) -> records::Session {
        records::Session {
            vm: records::Vm::named(&self.vm.name, &self.vm.profile),
            ..records::Session::new(event, &self.place)
        }
    }
}

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.vm.name.as_str() {
            "" => f.write_str(&self.place),
            name => write!(f, "{} (vm {name})", self.place),
        }
    }
}

/// Whether a connection was admitted (see [`crate::limits::admission::Admission::admit`]).
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
    peer: Peer,
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
                ..peer.record(SessionEvent::Refused)
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
    peer: Peer,
    session: Session,
    slot: Option<SessionSlot>,
) where
    T: AsyncRead + AsyncWrite + Send + 'static,
{
    let limits = &pipeline.config.pep.limits;
    let (shutdown_tx, mut commands) = mpsc::unbounded_channel();
    let notify = shutdown_tx.clone();
    let watcher = tokio::spawn(async move {
        shutdown.cancelled().await;
        let _ = notify.send(Shutdown);
    });
    let mut host = Host {
        handshake_limit: Duration::from_millis(limits.handshake_timeout_ms),
        idle_limit: Duration::from_millis(limits.idle_connection_timeout_ms),
        drain_limit: Duration::from_millis(limits.drain_timeout_ms),
        handshake_deadline: Instant::now() + Duration::from_millis(limits.handshake_timeout_ms),
        budget: pipeline.admission.budget.session(),
        own_streams: pipeline.admission.session_streams(),
        pipeline,
        workers: HashMap::new(),
        peer,
        refusing: slot.is_none(),
        refusal_sent: false,
        drain: None,
        hard_stop: None,
        _shutdown: shutdown_tx,
    };
    let options = io::Options {
        last_words: LAST_WORDS,
        ..io::Options::default()
    };
    io::drive(io, session, &mut host, Some(&mut commands), &options).await;
    watcher.abort();
    drop(slot);
}

/// The host's one command: the PEP is shutting down.
struct Shutdown;

/// What the host keeps per stream besides what the session and the driver keep.
struct Worker {
    cancel: CancellationToken,
    progress: Arc<Progress>,
}

/// Why a connection is winding down.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Drain {
    Shutdown,
    GuestGoAway,
}

struct Host {
    pipeline: Arc<Pipeline>,
    /// Streams whose response is not finished (this side's END or ERROR has not gone out).
    workers: HashMap<u32, Worker>,
    budget: SessionBudget,
    /// This session's reserved stream places (`session_reserved_streams`).
    own_streams: Arc<Semaphore>,
    peer: Peer,
    /// Over a limit: the guest's HELLO is answered with a refusal and the connection then closes.
    refusing: bool,
    refusal_sent: bool,
    handshake_limit: Duration,
    handshake_deadline: Instant,
    idle_limit: Duration,
    drain_limit: Duration,
    drain: Option<(Drain, Instant)>,
    /// Set once the drain deadline passed: the connection ends then, whatever is still queued.
    hard_stop: Option<Instant>,
    /// Keeps the command channel open after the shutdown watcher has spoken.
    _shutdown: mpsc::UnboundedSender<Shutdown>,
}

impl Handler for Host {
    type Command = Shutdown;

    fn command(&mut self, link: &mut Link, Shutdown: Shutdown) {
        if matches!(self.drain, Some((Drain::Shutdown, _))) {
            return;
        }
        // Streams already open may finish within the drain deadline; new ones are refused.
        let deadline = self
            .drain
            .map_or(Instant::now() + self.drain_limit, |(_, at)| at);
        self.drain = Some((Drain::Shutdown, deadline));
        if link.session().is_established() {
            link.session_mut()
                .go_away(ErrorCode::SessionReset, "the PEP is shutting down");
        }
    }

    fn deadline(&self, link: &Link) -> Option<Instant> {
        if let Some(at) = self.hard_stop {
            return Some(at);
        }
        if let Some((_, at)) = self.drain {
            return Some(at);
        }
        if link.session().info().is_none() {
            return Some(self.handshake_deadline);
        }
        self.workers
            .is_empty()
            .then(|| link.last_input() + self.idle_limit)
    }

    fn timer(&mut self, link: &mut Link) {
        let now = Instant::now();
        if self.hard_stop.is_some_and(|at| at <= now) {
            link.abort();
        } else if let (Some((_, at)), None) = (self.drain, self.hard_stop) {
            if at <= now {
                self.cut_remaining(link);
                self.hard_stop = Some(now + LAST_WORDS);
            }
        } else if link.session().info().is_none() {
            if self.handshake_deadline <= now {
                let limit = self.handshake_limit;
                tracing::info!(peer = %self.peer, ?limit, "no HELLO in time; closing the connection");
                self.record_session_event(link, SessionEvent::HandshakeTimeout, Some(limit));
                link.abort();
            }
        } else if self.workers.is_empty() && link.last_input() + self.idle_limit <= now {
            let limit = self.idle_limit;
            tracing::info!(peer = %self.peer, ?limit, "session idle; closing the connection");
            self.record_session_event(link, SessionEvent::IdleTimeout, Some(limit));
            link.abort();
        }
    }

    fn event(&mut self, link: &mut Link, event: Event) {
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
                    ..self.peer.record(SessionEvent::Open)
                });
            }
            Event::Opened { stream_id, call } => self.open(link, stream_id, call),
            Event::StreamFailed {
                stream_id,
                error,
                origin,
            } => {
                tracing::debug!(stream_id, code = %error.code, "stream ended abnormally");
                let why = match origin {
                    Origin::Peer if error.code != ErrorCode::SessionReset => EndedBy::Guest,
                    _ => EndedBy::SessionReset,
                };
                self.forget(stream_id, why);
            }
            Event::Rejected { stream_id, error } => {
                if stream_id == 0 && self.refusing && link.session().info().is_none() {
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
                if self.drain.is_none() {
                    self.drain = Some((Drain::GuestGoAway, Instant::now() + self.drain_limit));
                }
            }
            Event::Resynced => tracing::info!(peer = %self.peer, "session resynchronised"),
            Event::Closed => tracing::info!(peer = %self.peer, "session closed"),
            Event::End { .. }
            | Event::Data { .. }
            | Event::SendCapacity { .. }
            | Event::Writable { .. }
            | Event::Pong(_)
            | Event::Refused(_)
            | Event::Head { .. } => {}
        }
    }

    fn stream_sent(&mut self, _link: &mut Link, stream_id: u32) {
        // The response is finished (its END or ERROR is on its way): nothing of this stream holds a drain
        // or keeps the session from idling any more.
        self.workers.remove(&stream_id);
    }

    fn after(&mut self, link: &mut Link) {
        let refused = self.refusing && self.refusal_sent && link.session().info().is_none();
        if (self.drain.is_some() && self.workers.is_empty()) || refused {
            link.close();
        }
    }

    fn ended(&mut self, link: &mut Link, _why: Ended) {
        if let Some((why, _)) = self.drain {
            self.record_session_event(
                link,
                match why {
                    Drain::Shutdown => SessionEvent::DrainedForShutdown,
                    Drain::GuestGoAway => SessionEvent::DrainedAfterGuestGoaway,
                },
                None,
            );
        }
        let ids: Vec<u32> = self.workers.keys().copied().collect();
        for id in ids {
            tracing::debug!(stream_id = id, "cancelling stream: the connection ended");
            self.forget(id, EndedBy::SessionReset);
        }
        if !self.refusing {
            self.record_session_event(link, SessionEvent::Close, None);
        }
    }
}

impl Host {
    fn record_session_event(&self, link: &Link, event: SessionEvent, limit: Option<Duration>) {
        self.pipeline.record(&records::Session {
            session_id: link
                .session()
                .info()
                .map(|i| format!("{:016x}", i.session_id)),
            limit_ms: limit.map(|l| l.as_millis() as u64),
            ..self.peer.record(event)
        });
    }

    /// The drain deadline passed: each stream still open gets ERROR `session_reset` after what it was
    /// already sent, and its worker stops (its outcome record says `shutdown`).
    fn cut_remaining(&mut self, link: &mut Link) {
        let drain_limit = self.drain_limit;
        let ids: Vec<u32> = self.workers.keys().copied().collect();
        for id in ids {
            if let Some(worker) = self.workers.get(&id) {
                worker.progress.set_ended_by(EndedBy::Shutdown);
            }
            let error = ErrorPayload::new(
                ErrorCode::SessionReset,
                format!("the connection is closing and this stream did not finish within {drain_limit:?}"),
            )
            .retryable(true);
            let _ = link.session_mut().send_error(id, error);
            link.detach(id);
            self.forget(id, EndedBy::Shutdown);
        }
    }

    fn open(&mut self, link: &mut Link, stream_id: u32, call: MethodCall) {
        let Some(info) = link.session().info() else {
            return;
        };
        let slot = match self.pipeline.admission.stream_slot(&self.own_streams) {
            Ok(slot) => slot,
            Err(error) => {
                tracing::warn!(peer = %self.peer, stream_id, message = %error.message, "stream refused");
                let _ = link.session_mut().send_error(stream_id, error);
                return;
            }
        };
        let caller = Caller {
            session_id: info.session_id,
            guest: Implementation {
                name: info.peer.name.clone(),
                version: info.peer.version.clone(),
            },
            vm: self.peer.vm.clone(),
            stream_id,
        };
        let max_head = info.peer_receive.max_frame as usize;
        let (input, output) = link.attach(stream_id);
        let cancel = CancellationToken::new();
        let progress = Arc::new(Progress::default());
        self.workers.insert(
            stream_id,
            Worker {
                cancel: cancel.clone(),
                progress: progress.clone(),
            },
        );
        let request = StreamRequest {
            caller,
            call,
            body: RequestBody {
                input,
                ended: false,
            },
            responder: Responder {
                output,
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

    fn forget(&mut self, stream_id: u32, why: EndedBy) {
        if let Some(worker) = self.workers.remove(&stream_id) {
            worker.progress.set_ended_by(why);
            worker.cancel.cancel();
        }
    }
}
