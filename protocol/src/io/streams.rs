//! The two halves of one stream as a task outside the driver holds them: [`StreamIn`] receives what the peer
//! sends (credit flows back as each piece is taken), [`StreamOut`] sends, waiting while the stream's send
//! buffer is full. Both talk to the driver over one channel; neither touches the session.

use std::any::Any;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

use crate::frame::Frame;
use crate::payload::{ErrorCode, ErrorPayload, HeaderField, ResponseHead};
use crate::session::{Origin, DATA_CHUNK, STREAM_SEND_BUFFER};

/// Something that must live until the bytes it came with have been written to the transport (the host's
/// share of its memory budget, say): dropped by the writer right after.
pub type Hold = Box<dyn Any + Send>;

/// What arrives on a stream, in order.
#[derive(Debug)]
pub enum Inbound {
    /// The response head (on the client).
    Head(ResponseHead),
    Data(Bytes),
    /// The peer finished its direction.
    End(Vec<HeaderField>),
    /// The stream ended abnormally; nothing follows.
    Failed {
        error: ErrorPayload,
        origin: Origin,
    },
}

/// Why bytes could not be handed to a stream.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    /// The stream ended (finished, cancelled, failed) or the connection is gone: stop producing.
    #[error("the stream is gone")]
    Gone,
    #[error("{0} bytes at once exceed the stream's send buffer of {STREAM_SEND_BUFFER} bytes")]
    TooLarge(usize),
}

/// Stream handle → driver. Streams are named by a key unique for the driver's life, never by the stream
/// id: after a session restart the same id names another stream, and a late command must not reach it.
pub(super) enum StreamCommand {
    Head(u64, ResponseHead),
    Data(u64, Bytes, Option<Hold>),
    End(u64, Vec<HeaderField>),
    /// ERROR after the data already written.
    Error(u64, ErrorPayload),
    /// ERROR now; what is buffered is dropped.
    Abort(u64, ErrorPayload),
    Cancel(u64),
    /// The reader took this many bytes: credit may flow back.
    Release(u64, usize),
}

/// The receiving half of a stream.
pub struct StreamIn {
    key: u64,
    stream_id: u32,
    events: mpsc::UnboundedReceiver<Inbound>,
    commands: mpsc::UnboundedSender<StreamCommand>,
    /// Bytes delivered to this handle and not yet taken.
    buffered: Arc<AtomicUsize>,
}

impl StreamIn {
    pub fn stream_id(&self) -> u32 {
        self.stream_id
    }

    /// The next thing the peer sent. Taking DATA gives its credit back. When the driver is gone without a
    /// word (the connection ended), a `session_reset` failure.
    pub async fn next(&mut self) -> Inbound {
        match self.events.recv().await {
            Some(Inbound::Data(data)) => {
                self.buffered.fetch_sub(data.len(), Ordering::Relaxed);
                let _ = self
                    .commands
                    .send(StreamCommand::Release(self.key, data.len()));
                Inbound::Data(data)
            }
            Some(other) => other,
            None => Inbound::Failed {
                error: ErrorPayload::new(ErrorCode::SessionReset, "the connection ended")
                    .retryable(true),
                origin: Origin::Local,
            },
        }
    }

    /// DATA bytes received and not yet taken: bounded by the stream's receive window.
    pub fn buffered(&self) -> usize {
        self.buffered.load(Ordering::Relaxed)
    }
}

impl Drop for StreamIn {
    /// A reader that stops early (a refusal, an early answer) must still give back the credit of what was
    /// queued, or the session's window shrinks for good. Closing first means nothing more is queued; the
    /// driver releases later DATA itself.
    fn drop(&mut self) {
        self.events.close();
        let mut unread = 0;
        while let Ok(event) = self.events.try_recv() {
            if let Inbound::Data(data) = event {
                unread += data.len();
            }
        }
        if unread > 0 {
            let _ = self.commands.send(StreamCommand::Release(self.key, unread));
        }
    }
}

/// The sending half of a stream. Clones send on the same stream.
#[derive(Clone)]
pub struct StreamOut {
    key: u64,
    stream_id: u32,
    commands: mpsc::UnboundedSender<StreamCommand>,
    /// Room in the stream's send buffer: taken by a sender, given back once the transport has taken the
    /// bytes, closed when the stream is gone.
    room: Arc<Semaphore>,
    delivered: Arc<AtomicU64>,
}

/// Bytes with their room in the send buffer, ready to go ([`StreamOut::reserve`]).
pub struct Reserved {
    data: Bytes,
    permit: OwnedSemaphorePermit,
    key: u64,
    commands: mpsc::UnboundedSender<StreamCommand>,
}

impl StreamOut {
    pub fn stream_id(&self) -> u32 {
        self.stream_id
    }

    /// Bytes of this stream the transport has taken (written to the socket or port).
    pub fn delivered(&self) -> u64 {
        self.delivered.load(Ordering::Relaxed)
    }

    /// Queues the response head (server side).
    pub fn head(&self, head: ResponseHead) -> Result<(), SendError> {
        self.command(StreamCommand::Head(self.key, head))
    }

    /// Sends `data`, in pieces of at most [`DATA_CHUNK`], each waiting for room in the stream's send
    /// buffer (a peer that grants no credit, or does not read its transport, stalls this stream only).
    pub async fn data(&self, mut data: Bytes) -> Result<(), SendError> {
        while !data.is_empty() {
            let chunk = data.split_to(data.len().min(DATA_CHUNK));
            self.reserve(chunk).await?.send(None)?;
        }
        Ok(())
    }

    /// Waits for room for `chunk` (at most [`STREAM_SEND_BUFFER`] bytes) in the send buffer.
    pub async fn reserve(&self, chunk: Bytes) -> Result<Reserved, SendError> {
        let n = u32::try_from(chunk.len())
            .ok()
            .filter(|n| *n as usize <= STREAM_SEND_BUFFER)
            .ok_or(SendError::TooLarge(chunk.len()))?;
        let permit = self
            .room
            .clone()
            .acquire_many_owned(n)
            .await
            .map_err(|_| SendError::Gone)?;
        Ok(Reserved {
            data: chunk,
            permit,
            key: self.key,
            commands: self.commands.clone(),
        })
    }

    /// Ends this direction after the data already sent.
    pub fn end(&self) -> Result<(), SendError> {
        self.command(StreamCommand::End(self.key, Vec::new()))
    }

    /// Fails the stream after the data already sent.
    pub fn error(&self, error: ErrorPayload) -> Result<(), SendError> {
        self.command(StreamCommand::Error(self.key, error))
    }

    /// Fails the stream now, dropping what is buffered (the peer takes nothing, so it would never go).
    pub fn abort(&self, error: ErrorPayload) -> Result<(), SendError> {
        self.command(StreamCommand::Abort(self.key, error))
    }

    /// Abandons the stream in both directions (CANCEL).
    pub fn cancel(&self) {
        let _ = self.commands.send(StreamCommand::Cancel(self.key));
    }

    fn command(&self, command: StreamCommand) -> Result<(), SendError> {
        self.commands.send(command).map_err(|_| SendError::Gone)
    }
}

impl Reserved {
    pub fn len(&self) -> usize {
        self.data.len()
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// Hands the bytes to the driver; `hold` is dropped once the transport took them.
    pub fn send(self, hold: Option<Hold>) -> Result<(), SendError> {
        let Reserved {
            data,
            permit,
            key,
            commands,
        } = self;
        // The room comes back when the writer has written the bytes (`Written::done`).
        permit.forget();
        commands
            .send(StreamCommand::Data(key, data, hold))
            .map_err(|_| SendError::Gone)
    }
}

/// The driver's side of one attached stream.
pub(super) struct Slot {
    pub stream_id: u32,
    pub inbound: mpsc::UnboundedSender<Inbound>,
    pub buffered: Arc<AtomicUsize>,
    pub room: Arc<Semaphore>,
    pub delivered: Arc<AtomicU64>,
    /// Holds of the bytes written and not yet transmitted, with how many of those bytes each still covers.
    pub holds: VecDeque<(usize, Option<Hold>)>,
}

/// What the writer does once a DATA frame is on the transport.
pub(super) struct Written {
    room: Arc<Semaphore>,
    delivered: Arc<AtomicU64>,
    bytes: usize,
    _holds: Vec<Hold>,
}

impl Written {
    pub fn done(self) {
        self.room.add_permits(self.bytes);
        self.delivered
            .fetch_add(self.bytes as u64, Ordering::Relaxed);
    }
}

/// One frame for the writer task: its encoded header, and its payload as the session handed it over (the
/// writer sends both with one vectored write, so a DATA payload is never copied behind its header).
pub(super) struct Outgoing {
    pub header: [u8; crate::frame::HEADER_LEN],
    pub payload: bytes::Bytes,
    pub written: Option<Written>,
}

/// The streams attached to a driver, by key and by the current session's stream id.
pub(super) struct Streams {
    next_key: u64,
    slots: HashMap<u64, Slot>,
    by_id: HashMap<u32, u64>,
    pub commands: mpsc::UnboundedSender<StreamCommand>,
}

impl Streams {
    pub fn new(commands: mpsc::UnboundedSender<StreamCommand>) -> Self {
        Streams {
            next_key: 0,
            slots: HashMap::new(),
            by_id: HashMap::new(),
            commands,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    pub fn attach(&mut self, stream_id: u32) -> (StreamIn, StreamOut) {
        if let Some(old) = self.by_id.get(&stream_id).copied() {
            self.remove_key(old);
        }
        let key = self.next_key;
        self.next_key += 1;
        let (inbound, events) = mpsc::unbounded_channel();
        let buffered = Arc::new(AtomicUsize::new(0));
        let room = Arc::new(Semaphore::new(STREAM_SEND_BUFFER));
        let delivered = Arc::new(AtomicU64::new(0));
        self.slots.insert(
            key,
            Slot {
                stream_id,
                inbound,
                buffered: buffered.clone(),
                room: room.clone(),
                delivered: delivered.clone(),
                holds: VecDeque::new(),
            },
        );
        self.by_id.insert(stream_id, key);
        (
            StreamIn {
                key,
                stream_id,
                events,
                commands: self.commands.clone(),
                buffered,
            },
            StreamOut {
                key,
                stream_id,
                commands: self.commands.clone(),
                room,
                delivered,
            },
        )
    }

    pub fn id_of(&self, key: u64) -> Option<u32> {
        self.slots.get(&key).map(|slot| slot.stream_id)
    }

    pub fn get_mut(&mut self, key: u64) -> Option<&mut Slot> {
        self.slots.get_mut(&key)
    }

    pub fn by_id(&mut self, stream_id: u32) -> Option<&mut Slot> {
        let key = self.by_id.get(&stream_id)?;
        self.slots.get_mut(key)
    }

    /// Forgets the stream: its senders get [`SendError::Gone`], its reader the end of its channel.
    pub fn remove(&mut self, stream_id: u32) {
        if let Some(key) = self.by_id.get(&stream_id).copied() {
            self.remove_key(key);
        }
    }

    fn remove_key(&mut self, key: u64) {
        if let Some(slot) = self.slots.remove(&key) {
            self.by_id.remove(&slot.stream_id);
            slot.room.close();
        }
    }

    /// Tells every stream it failed, and forgets them all.
    pub fn fail_all(&mut self, error: &ErrorPayload) {
        for (_, slot) in self.slots.drain() {
            let _ = slot.inbound.send(Inbound::Failed {
                error: error.clone(),
                origin: Origin::Local,
            });
            slot.room.close();
        }
        self.by_id.clear();
    }

    /// The writer's item for `frame`: a DATA frame carries what must happen once it is written.
    pub fn outgoing(&mut self, frame: Frame) -> Outgoing {
        let header = frame.encode_header();
        let written = if frame.frame_type == crate::frame::FrameType::Data {
            self.by_id(frame.stream_id).map(|slot| {
                let n = frame.payload.len();
                let mut left = n;
                let mut done = Vec::new();
                while left > 0 {
                    let Some(front) = slot.holds.front_mut() else {
                        break;
                    };
                    if front.0 <= left {
                        left -= front.0;
                        if let Some((_, Some(hold))) = slot.holds.pop_front() {
                            done.push(hold);
                        }
                    } else {
                        front.0 -= left;
                        left = 0;
                    }
                }
                Written {
                    room: slot.room.clone(),
                    delivered: slot.delivered.clone(),
                    bytes: n,
                    _holds: done,
                }
            })
        } else {
            None
        };
        Outgoing {
            header,
            payload: frame.payload,
            written,
        }
    }
}
