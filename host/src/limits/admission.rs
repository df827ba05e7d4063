//! What the PEP admits: sessions per transport and in total, streams in total, and the buffer budget they
//! share. Every refusal is a `resource_exhausted` error naming the limit, with `retryable: true` (the same
//! request may succeed once another guest lets go).

use std::sync::Arc;

use pexi_protocol::payload::{ErrorCode, ErrorDetails, ErrorPayload};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::task::TaskTracker;

use super::budget::Budget;
use crate::config::LimitsConfig;

/// Refused connections answered at once (the guest learns why); past this many, further ones are closed
/// without a word, so a flood of connections cannot hold the PEP's tasks and descriptors.
const REFUSALS_IN_FLIGHT: usize = 16;

pub struct Admission {
    pub budget: Budget,
    sessions: Arc<Semaphore>,
    max_sessions: u32,
    per_listener: u32,
    streams: Arc<Semaphore>,
    max_streams: u32,
    reserved_streams: u32,
    refusals: Arc<Semaphore>,
    /// Connections closed unanswered (over a limit with every refusal slot busy), for a throttled log.
    pub closed_at_once: Throttled,
    /// Every stream's worker, so a shutdown can wait for their outcome records.
    pub workers: TaskTracker,
}

/// Counts an event that may come thousands of times a second (connections closed over a limit) and says
/// when to log it: the first time, then at most every [`Self::EVERY`], with how many happened since.
#[derive(Default)]
pub struct Throttled {
    count: std::sync::atomic::AtomicU64,
    last: std::sync::Mutex<Option<std::time::Instant>>,
}

impl Throttled {
    const EVERY: std::time::Duration = std::time::Duration::from_secs(10);

    /// Counts one; returns the count to report (and starts a new count) when a report is due.
    pub fn hit(&self) -> Option<u64> {
        use std::sync::atomic::Ordering;
        self.count.fetch_add(1, Ordering::Relaxed);
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        let now = std::time::Instant::now();
        if last.is_some_and(|at| now.duration_since(at) < Self::EVERY) {
            return None;
        }
        *last = Some(now);
        Some(self.count.swap(0, Ordering::Relaxed))
    }
}

/// A connection's place: held for as long as it is served.
pub struct SessionSlot {
    _listener: OwnedSemaphorePermit,
    _total: OwnedSemaphorePermit,
}

/// A connection that was not admitted: answer it with `error` while holding `slot`, or close it.
pub struct Refusal {
    pub error: ErrorPayload,
    pub slot: Option<OwnedSemaphorePermit>,
}

/// The sessions one listener (one transport) may hold.
#[derive(Clone)]
pub struct ListenerSlots(Arc<Semaphore>);

fn exhausted(message: String, limit: u32) -> ErrorPayload {
    ErrorPayload::new(ErrorCode::ResourceExhausted, message)
        .retryable(true)
        .with_details(ErrorDetails {
            limit: Some(u64::from(limit)),
            ..ErrorDetails::default()
        })
}

impl Admission {
    pub fn new(limits: &LimitsConfig) -> Admission {
        Admission {
            budget: Budget::new(limits),
            sessions: Arc::new(Semaphore::new(limits.max_sessions as usize)),
            max_sessions: limits.max_sessions,
            per_listener: limits.max_sessions_per_listener,
            streams: Arc::new(Semaphore::new(limits.max_streams_total as usize)),
            max_streams: limits.max_streams_total,
            reserved_streams: limits.session_reserved_streams,
            refusals: Arc::new(Semaphore::new(REFUSALS_IN_FLIGHT)),
            closed_at_once: Throttled::default(),
            workers: TaskTracker::new(),
        }
    }

    pub fn listener(&self) -> ListenerSlots {
        ListenerSlots(Arc::new(Semaphore::new(self.per_listener as usize)))
    }

    /// Sessions served now, across every transport.
    pub fn sessions(&self) -> usize {
        self.max_sessions as usize - self.sessions.available_permits()
    }

    /// Streams open now, across every session.
    pub fn streams(&self) -> usize {
        self.max_streams as usize - self.streams.available_permits()
    }

    pub fn admit(&self, listener: &ListenerSlots) -> Result<SessionSlot, Refusal> {
        let refusal = |error| Refusal {
            error,
            slot: self.refusals.clone().try_acquire_owned().ok(),
        };
        let Ok(mine) = listener.0.clone().try_acquire_owned() else {
            return Err(refusal(exhausted(
                format!(
                    "this transport serves at most {} sessions at once",
                    self.per_listener
                ),
                self.per_listener,
            )));
        };
        let Ok(total) = self.sessions.clone().try_acquire_owned() else {
            return Err(refusal(exhausted(
                format!(
                    "the PEP serves at most {} sessions at once",
                    self.max_sessions
                ),
                self.max_sessions,
            )));
        };
        Ok(SessionSlot {
            _listener: mine,
            _total: total,
        })
    }

    /// A session's own stream places, used before the shared ones: guests that hold every shared place
    /// cannot stop another session's requests.
    pub fn session_streams(&self) -> Arc<Semaphore> {
        Arc::new(Semaphore::new(self.reserved_streams as usize))
    }

    /// A place for one more stream: from the session's reserve, else among all sessions' streams.
    pub fn stream_slot(
        &self,
        reserve: &Arc<Semaphore>,
    ) -> Result<OwnedSemaphorePermit, ErrorPayload> {
        if let Ok(mine) = reserve.clone().try_acquire_owned() {
            return Ok(mine);
        }
        self.streams.clone().try_acquire_owned().map_err(|_| {
            exhausted(
                format!(
                    "the PEP serves at most {} streams at once across all sessions (beyond each session's own)",
                    self.max_streams
                ),
                self.max_streams,
            )
        })
    }
}
