//! What a request worker holds: the call, its request body as it arrives, a responder, and a cancellation
//! token that fires when the guest cancels, the session resets, or the PEP shuts down.

use std::sync::atomic::{AtomicU16, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use pexi_protocol::payload::{ErrorCode, ErrorPayload, MethodCall, ResponseHead};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use super::budget::{Charge, SessionBudget};
use crate::pipeline::Caller;

/// Largest piece a worker hands over at once.
pub use pexi_protocol::session::DATA_CHUNK as MAX_CHUNK;
/// Response bytes a worker may have handed over and the transport not yet taken (waiting for the guest's
/// flow-control credit, or for the guest to read its socket). Beyond this the worker waits, so a slow guest
/// reader stalls only its own upstream.
pub use pexi_protocol::session::STREAM_SEND_BUFFER as STREAM_BUFFER;

/// Worker → connection driver.
#[derive(Debug)]
pub(super) enum Command {
    Head(u32, ResponseHead),
    /// The bytes and what they hold against the budget until the transport has taken them.
    Data(u32, Bytes, Charge),
    End(u32),
    Error(u32, ErrorPayload),
    /// The worker consumed this many request body bytes: credit may flow back to the guest.
    Release(u32, usize),
}

pub struct StreamRequest {
    pub caller: Caller,
    pub call: MethodCall,
    pub body: RequestBody,
    pub responder: Responder,
    pub cancel: CancellationToken,
    /// This stream's place among all streams of the PEP (`max_streams_total`); held while the worker runs.
    pub slot: OwnedSemaphorePermit,
}

/// Why a stream's worker was cancelled, for its outcome record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum EndedBy {
    /// The guest sent CANCEL or ERROR.
    Guest = 1,
    /// The session was reset or the connection ended.
    SessionReset = 2,
    /// The PEP's drain deadline passed during shutdown or after the guest's GOAWAY.
    Shutdown = 3,
}

impl EndedBy {
    pub fn as_str(self) -> &'static str {
        match self {
            EndedBy::Guest => "cancelled",
            EndedBy::SessionReset => "session_reset",
            EndedBy::Shutdown => "shutdown",
        }
    }
}

/// What the guest has received on a stream so far, kept by the connection for the worker's outcome record.
#[derive(Debug, Default)]
pub struct Progress {
    status: AtomicU16,
    delivered: AtomicU64,
    ended_by: AtomicU8,
}

impl Progress {
    /// The HTTP status of the HEAD sent, if one was.
    pub fn status(&self) -> Option<u16> {
        Some(self.status.load(Ordering::Relaxed)).filter(|s| *s != 0)
    }

    /// Response bytes the transport has taken (written to the guest's socket or port).
    pub fn delivered(&self) -> u64 {
        self.delivered.load(Ordering::Relaxed)
    }

    pub fn ended_by(&self) -> Option<EndedBy> {
        match self.ended_by.load(Ordering::Relaxed) {
            1 => Some(EndedBy::Guest),
            2 => Some(EndedBy::SessionReset),
            3 => Some(EndedBy::Shutdown),
            _ => None,
        }
    }

    pub(super) fn set_ended_by(&self, why: EndedBy) {
        // The first reason wins: a shutdown that cuts a stream is not overwritten by the reset that follows.
        let _ = self
            .ended_by
            .compare_exchange(0, why as u8, Ordering::Relaxed, Ordering::Relaxed);
    }

    pub(super) fn add_delivered(&self, n: usize) {
        self.delivered.fetch_add(n as u64, Ordering::Relaxed);
    }
}

/// The request body, chunk by chunk as the guest sends it. `None` once the guest sent END.
pub struct RequestBody {
    pub(super) stream_id: u32,
    pub(super) chunks: mpsc::UnboundedReceiver<Bytes>,
    pub(super) commands: mpsc::UnboundedSender<Command>,
}

impl RequestBody {
    /// The next chunk; the guest gets the credit for it back at once, because the caller takes ownership.
    pub async fn next(&mut self) -> Option<Bytes> {
        let chunk = self.chunks.recv().await?;
        let _ = self
            .commands
            .send(Command::Release(self.stream_id, chunk.len()));
        Some(chunk)
    }
}

impl Drop for RequestBody {
    /// A worker that stops reading (a refusal, an early answer, a policy check with a body) must still
    /// give the guest its credit back for what was queued, or the session's window shrinks for good.
    /// Closing first means nothing more can be queued; later chunks are released by the driver.
    fn drop(&mut self) {
        self.chunks.close();
        let mut unread = 0;
        while let Ok(chunk) = self.chunks.try_recv() {
            unread += chunk.len();
        }
        if unread > 0 {
            let _ = self.commands.send(Command::Release(self.stream_id, unread));
        }
    }
}

/// Why response bytes could not be handed over.
#[derive(Debug, thiserror::Error)]
pub enum SendFailed {
    /// The stream is gone (cancelled, reset, or the session ended): stop producing.
    #[error("the stream is gone")]
    Gone,
    /// Nothing could be handed over for this long: the guest granted no credit and read nothing.
    #[error("the guest took no response data for {0:?}")]
    Stalled(Duration),
}

impl SendFailed {
    /// The stream's error for the guest and the outcome record.
    pub fn to_error(&self) -> ErrorPayload {
        match self {
            SendFailed::Gone => ErrorPayload::new(ErrorCode::Cancelled, "the stream is gone"),
            SendFailed::Stalled(idle) => ErrorPayload::new(
                ErrorCode::GuestStalled,
                format!(
                    "the guest took no response data for {idle:?} (no flow-control credit, or its transport \
                     not read); the upstream was released"
                ),
            ),
        }
    }
}

pub struct Responder {
    pub(super) stream_id: u32,
    pub(super) commands: mpsc::UnboundedSender<Command>,
    pub(super) buffer: Arc<Semaphore>,
    pub(super) budget: SessionBudget,
    /// How long handing over one chunk may wait before the stream counts as stalled (`idle_timeout_ms`).
    pub(super) stall: Duration,
    pub(super) progress: Arc<Progress>,
    /// The largest frame payload the guest accepts: a HEAD is one frame and cannot be split.
    pub(super) max_head: usize,
}

/// Why a HEAD was not sent.
#[derive(Debug, PartialEq, Eq)]
pub enum HeadRefused {
    Gone,
    /// It encodes to `length` bytes, over the guest's `max` frame payload.
    TooLarge {
        length: usize,
        max: usize,
    },
}

impl Responder {
    pub fn stream_id(&self) -> u32 {
        self.stream_id
    }

    pub fn progress(&self) -> &Arc<Progress> {
        &self.progress
    }

    /// The session's share of the host's buffer budget, for other bytes kept on the guest's behalf.
    pub fn budget(&self) -> &SessionBudget {
        &self.budget
    }

    /// Queues the HEAD, or says why it cannot go: a HEAD larger than the guest's frames would be dropped
    /// by the session and leave the guest waiting, so the caller must end the stream with an error.
    pub fn head(&self, head: ResponseHead) -> Result<(), HeadRefused> {
        let length = head.encode().len();
        if length > self.max_head {
            return Err(HeadRefused::TooLarge {
                length,
                max: self.max_head,
            });
        }
        if let ResponseHead::Http(http) = &head {
            self.progress.status.store(http.status, Ordering::Relaxed);
        }
        self.commands
            .send(Command::Head(self.stream_id, head))
            .map_err(|_| HeadRefused::Gone)
    }

    /// Hands response bytes to the driver, waiting while the stream's buffer or the session's share of the
    /// budget is full; the charge comes back once the transport has taken the bytes. A wait longer than
    /// the idle timeout ends the stream: a guest that grants no credit must not hold an upstream forever.
    pub async fn data(&self, mut data: Bytes) -> Result<(), SendFailed> {
        while !data.is_empty() {
            let chunk = data.split_to(data.len().min(MAX_CHUNK));
            let n = chunk.len();
            let charge = async {
                // Fits in u32: MAX_CHUNK does.
                let stream = self
                    .buffer
                    .clone()
                    .acquire_many_owned(n as u32)
                    .await
                    .map_err(|_| SendFailed::Gone)?;
                let charge = self.budget.acquire(n).await.map_err(|_| SendFailed::Gone)?;
                Ok::<_, SendFailed>(charge.with_stream(stream))
            };
            let charge = tokio::time::timeout(self.stall, charge)
                .await
                .map_err(|_| SendFailed::Stalled(self.stall))??;
            self.commands
                .send(Command::Data(self.stream_id, chunk, charge))
                .map_err(|_| SendFailed::Gone)?;
        }
        Ok(())
    }

    pub fn end(self) {
        let _ = self.commands.send(Command::End(self.stream_id));
    }

    /// Ends the stream with an error, after any data already handed over.
    pub fn error(self, error: ErrorPayload) {
        let _ = self.commands.send(Command::Error(self.stream_id, error));
    }
}
