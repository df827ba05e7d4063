//! What a request worker holds: the call, its request body as it arrives, a responder, and a cancellation
//! token that fires when the guest cancels, the session resets, or the PEP shuts down.

use std::sync::Arc;

use bytes::Bytes;
use pexi_protocol::payload::{ErrorPayload, MethodCall, ResponseHead};
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::pipeline::Caller;

/// Response bytes a worker may have handed over but the guest's flow-control credit not yet let through.
/// Beyond this the worker waits, so a slow guest reader stalls only its own upstream.
pub const STREAM_BUFFER: usize = 256 * 1024;
/// Largest piece a worker hands over at once.
pub const MAX_CHUNK: usize = 64 * 1024;

/// Worker → connection driver.
#[derive(Debug)]
pub(super) enum Command {
    Head(u32, ResponseHead),
    Data(u32, Bytes),
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

/// The stream is gone (cancelled, reset, or the session ended): stop producing.
#[derive(Debug, thiserror::Error)]
#[error("the stream is gone")]
pub struct Gone;

pub struct Responder {
    pub(super) stream_id: u32,
    pub(super) commands: mpsc::UnboundedSender<Command>,
    pub(super) buffer: Arc<Semaphore>,
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
        self.commands
            .send(Command::Head(self.stream_id, head))
            .map_err(|_| HeadRefused::Gone)
    }

    /// Hands response bytes to the driver, waiting while the stream's buffer is full.
    pub async fn data(&self, mut data: Bytes) -> Result<(), Gone> {
        while !data.is_empty() {
            let chunk = data.split_to(data.len().min(MAX_CHUNK));
            // Fits in u32: MAX_CHUNK does.
            let permit = self
                .buffer
                .acquire_many(chunk.len() as u32)
                .await
                .map_err(|_| Gone)?;
            // The driver returns the permits when the bytes go out under the guest's credit.
            permit.forget();
            self.commands
                .send(Command::Data(self.stream_id, chunk))
                .map_err(|_| Gone)?;
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
