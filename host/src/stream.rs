//! What a request worker holds: who is calling, the call, its request body as it arrives, a responder, and a
//! cancellation token that fires when the guest cancels, the session resets, or the PEP shuts down.
//!
//! The meeting point of the connection layer ([`crate::serve`], which makes these) and the pipeline
//! ([`crate::pipeline`], which consumes them); it depends on neither. The bytes move through the protocol
//! driver's stream handles ([`StreamIn`], [`StreamOut`]); this adds the host's budget, stall limit and the
//! record of what the guest received.

use std::sync::atomic::{AtomicU16, AtomicU8, Ordering};
use std::time::Duration;

use bytes::Bytes;
use pexi_protocol::io::{Inbound, SendError, StreamIn, StreamOut};
use pexi_protocol::payload::{ErrorCode, ErrorPayload, Implementation, MethodCall, ResponseHead};
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;

use crate::config::VmIdentity;
use crate::limits::budget::SessionBudget;

/// Who sent a stream: the session (as the host numbered it), the guest's self-description, the VM the
/// host knows it as (from the listener it came in on), the stream.
#[derive(Clone, Debug)]
pub struct Caller {
    pub session_id: u64,
    pub guest: Implementation,
    pub vm: std::sync::Arc<VmIdentity>,
    pub stream_id: u32,
}

/// Largest piece a worker hands over at once.
pub use pexi_protocol::session::DATA_CHUNK as MAX_CHUNK;

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

/// What the guest has received on a stream so far, for the worker's outcome record.
#[derive(Debug, Default)]
pub struct Progress {
    status: AtomicU16,
    ended_by: AtomicU8,
}

impl Progress {
    /// The HTTP status of the HEAD sent, if one was.
    pub fn status(&self) -> Option<u16> {
        Some(self.status.load(Ordering::Relaxed)).filter(|s| *s != 0)
    }

    pub fn ended_by(&self) -> Option<EndedBy> {
        match self.ended_by.load(Ordering::Relaxed) {
            1 => Some(EndedBy::Guest),
            2 => Some(EndedBy::SessionReset),
            3 => Some(EndedBy::Shutdown),
            _ => None,
        }
    }

    pub(crate) fn set_ended_by(&self, why: EndedBy) {
        // The first reason wins: a shutdown that cuts a stream is not overwritten by the reset that follows.
        let _ = self
            .ended_by
            .compare_exchange(0, why as u8, Ordering::Relaxed, Ordering::Relaxed);
    }
}

/// The request body, chunk by chunk as the guest sends it. Dropping it gives back the credit of what was
/// queued and not read (a refusal, an early answer).
pub struct RequestBody {
    pub(crate) input: StreamIn,
    pub(crate) ended: bool,
}

impl RequestBody {
    /// The next chunk, `None` once the guest sent END (or the stream is gone: the cancellation token says
    /// so); the guest gets the credit back at once, because the caller takes ownership.
    pub async fn next(&mut self) -> Option<Bytes> {
        while !self.ended {
            match self.input.next().await {
                Inbound::Data(data) => return Some(data),
                Inbound::End(_) | Inbound::Failed { .. } => self.ended = true,
                Inbound::Head(_) => {}
            }
        }
        None
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

pub struct Responder {
    pub(crate) output: StreamOut,
    pub(crate) budget: SessionBudget,
    /// How long handing over one chunk may wait before the stream counts as stalled (`idle_timeout_ms`).
    pub(crate) stall: Duration,
    pub(crate) progress: std::sync::Arc<Progress>,
    /// The largest frame payload the guest accepts: a HEAD is one frame and cannot be split.
    pub(crate) max_head: usize,
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
        self.output.stream_id()
    }

    pub fn progress(&self) -> &std::sync::Arc<Progress> {
        &self.progress
    }

    /// Response bytes the transport has taken (written to the guest's socket or port).
    pub fn delivered(&self) -> u64 {
        self.output.delivered()
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
        self.output.head(head).map_err(|_| HeadRefused::Gone)
    }

    /// Hands response bytes to the connection, waiting while the stream's send buffer or the session's
    /// share of the budget is full; the charge comes back once the transport has taken the bytes. A wait
    /// longer than the idle timeout ends the stream: a guest that grants no credit must not hold an
    /// upstream forever.
    pub async fn data(&self, mut data: Bytes) -> Result<(), SendFailed> {
        while !data.is_empty() {
            let chunk = data.split_to(data.len().min(MAX_CHUNK));
            let ready = async {
                let reserved = self
                    .output
                    .reserve(chunk)
                    .await
                    .map_err(|_| SendFailed::Gone)?;
                let charge = self
                    .budget
                    .acquire(reserved.len())
                    .await
                    .map_err(|_| SendFailed::Gone)?;
                Ok::<_, SendFailed>((reserved, charge))
            };
            let (reserved, charge) = tokio::time::timeout(self.stall, ready)
                .await
                .map_err(|_| SendFailed::Stalled(self.stall))??;
            reserved
                .send(Some(Box::new(charge)))
                .map_err(|_: SendError| SendFailed::Gone)?;
        }
        Ok(())
    }

    pub fn end(self) {
        let _ = self.output.end();
    }

    /// Ends the stream with an error, after any data already handed over. A guest that takes no data
    /// (`guest_stalled`) would hold that error back for ever, so it goes at once and the unsent data with it.
    pub fn error(self, error: ErrorPayload) {
        let _ = if error.code == ErrorCode::GuestStalled {
            self.output.abort(error)
        } else {
            self.output.error(error)
        };
    }
}
