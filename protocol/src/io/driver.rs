//! The one tokio driver of a pexi connection, used by the host, the guest SDK and pexi-guestd alike.
//!
//! A reader task and a writer task own the two halves of the transport, so the driver never blocks on I/O
//! (and neither side can deadlock writing to a peer that is itself blocked writing). The driver owns the
//! [`Session`] and does everything that is the same for every role: feeding it bytes, writing what it
//! queues through a bounded queue, retrying an unanswered HELLO or SYNC, keepalive PINGs, routing each
//! stream's events to its [`StreamIn`] and its handles' commands into the session, returning send-buffer
//! room once the transport has taken the bytes. What differs by role (admitting streams, opening them,
//! records, deadlines of its own) is a [`Handler`].

use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::streams::{Inbound, Outgoing, StreamCommand, StreamIn, StreamOut, Streams};
use crate::frame::{FrameType, HEADER_LEN};
use crate::payload::{ErrorCode, ErrorPayload};
use crate::session::{Event, Session};

/// How long a HELLO or SYNC may go unanswered before a fresh one is sent.
pub const RETRY_AFTER: Duration = Duration::from_secs(1);
/// Frames the driver may queue for the writer ahead of the transport.
const WRITE_QUEUE: usize = 16;
/// Reads the reader may hold ahead of the driver.
const READ_QUEUE: usize = 8;
const READ_BUFFER: usize = 64 * 1024;

#[derive(Clone, Debug)]
pub struct Options {
    /// After this much silence from the peer a PING goes out; a second silent period ends the connection
    /// ([`Ended::Lost`]). `None`: no keepalive (the host: the guest's own keepalive finds a dead host).
    pub keepalive: Option<Duration>,
    /// A read of 0 bytes is the end of the transport (sockets). On a virtio-serial port it only means the
    /// other end is not open right now: the reader waits and reads again.
    pub zero_read_is_eof: bool,
    /// Once the driver stops, how long the writer may take to send what was queued (a GOAWAY, the last
    /// ERRORs); a peer that reads nothing does not get to hold the connection open longer.
    pub last_words: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            keepalive: None,
            zero_read_is_eof: true,
            last_words: Duration::from_secs(1),
        }
    }
}

/// Why [`drive`] returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ended {
    /// The transport reached its end.
    Closed,
    /// Writing failed, or the peer missed two keepalive periods.
    Lost,
    /// The handler stopped the connection ([`Link::close`], [`Link::abort`]).
    Finished,
    /// Every sender of the handler's commands is gone, and so is every stream handed out.
    Dropped,
}

/// The role-specific part of a connection. Every method runs on the driver's task between I/O steps and
/// must not block; it acts through the [`Link`].
pub trait Handler {
    type Command;

    /// A session event. The driver has already routed the stream's part of it (HEAD, DATA, END, a
    /// failure) to the stream's [`StreamIn`]; HEAD and DATA are not passed on (they are the stream's).
    fn event(&mut self, link: &mut Link, event: Event);

    /// One of the handler's own commands (see [`drive`]'s `commands`).
    fn command(&mut self, _link: &mut Link, _command: Self::Command) {}

    /// When [`Handler::timer`] should run next, if at all. Asked before every wait.
    fn deadline(&self, _link: &Link) -> Option<Instant> {
        None
    }

    fn timer(&mut self, _link: &mut Link) {}

    /// This side's END or ERROR for `stream_id` has gone to the writer: it sends nothing more there.
    fn stream_sent(&mut self, _link: &mut Link, _stream_id: u32) {}

    /// After each step (events handled): a place to decide that the connection is done.
    fn after(&mut self, _link: &mut Link) {}

    /// The connection is over (`why`); every attached stream is failed right after.
    fn ended(&mut self, _link: &mut Link, _why: Ended) {}
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stop {
    /// Once everything queued has gone to the writer.
    WhenQuiet,
    Now,
}

/// The driver's state as a handler sees it: the session, the attached streams, and the ways to end.
pub struct Link {
    session: Session,
    streams: Streams,
    stop: Option<Stop>,
    restart: Option<(Session, String)>,
    last_input: Instant,
}

impl Link {
    pub fn session(&self) -> &Session {
        &self.session
    }

    pub fn session_mut(&mut self) -> &mut Session {
        &mut self.session
    }

    /// Gives `stream_id` its two handles: events for it go to the [`StreamIn`], and the [`StreamOut`]
    /// writes into the session.
    pub fn attach(&mut self, stream_id: u32) -> (StreamIn, StreamOut) {
        self.streams.attach(stream_id)
    }

    /// Forgets a stream's handles (its senders get `Gone`, its reader the end of its channel); the
    /// session's stream is left as it is.
    pub fn detach(&mut self, stream_id: u32) {
        self.streams.remove(stream_id);
    }

    /// Cancels the stream in the session and forgets its handles.
    pub fn cancel(&mut self, stream_id: u32) {
        let _ = self.session.cancel(stream_id);
        self.streams.remove(stream_id);
    }

    /// Fails every attached stream with `session_reset` and `why`, and forgets their handles.
    pub fn fail_all(&mut self, why: &str) {
        self.streams
            .fail_all(&ErrorPayload::new(ErrorCode::SessionReset, why).retryable(true));
    }

    /// When the peer last sent a byte (or the connection started).
    pub fn last_input(&self) -> Instant {
        self.last_input
    }

    /// Ends the connection once what is queued has gone to the writer.
    pub fn close(&mut self) {
        self.stop.get_or_insert(Stop::WhenQuiet);
    }

    /// Ends the connection now.
    pub fn abort(&mut self) {
        self.stop = Some(Stop::Now);
    }

    /// Replaces the session on the same transport once this step is over: what the old one still has to
    /// say goes out first, and every attached stream fails with `session_reset` and `why`.
    pub fn restart(&mut self, session: Session, why: impl Into<String>) {
        self.restart = Some((session, why.into()));
    }

    fn apply(&mut self, command: StreamCommand) {
        let key = match &command {
            StreamCommand::Head(key, _)
            | StreamCommand::Data(key, _, _)
            | StreamCommand::End(key, _)
            | StreamCommand::Error(key, _)
            | StreamCommand::Abort(key, _)
            | StreamCommand::Cancel(key)
            | StreamCommand::Release(key, _) => *key,
        };
        let Some(id) = self.streams.id_of(key) else {
            // A stream that is gone: its output goes with it (and a late release finds nothing to give).
            return;
        };
        let session = &mut self.session;
        // A HEAD, END or ERROR the session refuses (the stream already ended or failed) changes nothing: the
        // stream's other direction may still be running.
        match command {
            StreamCommand::Head(_, head) => {
                let _ = session.send_head(id, &head);
            }
            StreamCommand::Data(_, data, hold) => {
                let len = data.len();
                if session.write(id, data).is_ok() {
                    if let Some(slot) = self.streams.get_mut(key) {
                        slot.holds.push_back((len, hold));
                    }
                } else {
                    // The session takes nothing more here (this side ended, or the stream failed): its
                    // senders learn it now rather than wait for room that never comes.
                    self.streams.remove(id);
                }
            }
            StreamCommand::End(_, trailers) => {
                let _ = session.write_end(id, trailers);
            }
            StreamCommand::Error(_, error) => {
                let _ = session.write_error(id, error);
            }
            StreamCommand::Abort(_, error) => {
                let _ = session.send_error(id, error);
                self.streams.remove(id);
                return;
            }
            StreamCommand::Cancel(_) => {
                let _ = session.cancel(id);
                self.streams.remove(id);
                return;
            }
            StreamCommand::Release(_, n) => session.release(id, n),
        }
        self.forget_if_gone(id);
    }

    fn forget_if_gone(&mut self, stream_id: u32) {
        if !self.session.has_stream(stream_id) {
            self.streams.remove(stream_id);
        }
    }

    /// Routes the stream part of `event` to its handles; returns the event unless it was DATA.
    fn route(&mut self, event: Event) -> Option<Event> {
        match event {
            Event::Data { stream_id, data } => {
                let len = data.len();
                let delivered = self.streams.by_id(stream_id).is_some_and(|slot| {
                    slot.buffered
                        .fetch_add(len, std::sync::atomic::Ordering::Relaxed);
                    slot.inbound.send(Inbound::Data(data)).is_ok()
                });
                if !delivered {
                    // Nobody reads this stream any more: the credit goes back now.
                    self.session.release(stream_id, len);
                }
                None
            }
            Event::Head { stream_id, head } => {
                if let Some(slot) = self.streams.by_id(stream_id) {
                    let _ = slot.inbound.send(Inbound::Head(head));
                }
                None
            }
            Event::End {
                stream_id,
                trailers,
            } => {
                if let Some(slot) = self.streams.by_id(stream_id) {
                    let _ = slot.inbound.send(Inbound::End(trailers.clone()));
                }
                self.forget_if_gone(stream_id);
                Some(Event::End {
                    stream_id,
                    trailers,
                })
            }
            Event::StreamFailed {
                stream_id,
                error,
                origin,
            } => {
                if let Some(slot) = self.streams.by_id(stream_id) {
                    let _ = slot.inbound.send(Inbound::Failed {
                        error: error.clone(),
                        origin,
                    });
                }
                self.streams.remove(stream_id);
                Some(Event::StreamFailed {
                    stream_id,
                    error,
                    origin,
                })
            }
            other => Some(other),
        }
    }

    /// The next frame for the writer, and the stream this side finished with it (its END or ERROR).
    fn outgoing(&mut self) -> Option<(Outgoing, Option<u32>)> {
        let frame = self.session.poll_transmit()?;
        let ends_stream =
            matches!(frame.frame_type, FrameType::End | FrameType::Error) && frame.stream_id != 0;
        let stream_id = frame.stream_id;
        let outgoing = self.streams.outgoing(frame);
        if ends_stream {
            self.forget_if_gone(stream_id);
        }
        Some((outgoing, ends_stream.then_some(stream_id)))
    }
}

/// Runs one connection over `io` until the transport ends, the handler stops it, or (with `commands`)
/// every sender of the handler's commands is gone and no stream is left.
pub async fn drive<T, H>(
    io: T,
    session: Session,
    handler: &mut H,
    mut commands: Option<&mut mpsc::UnboundedReceiver<H::Command>>,
    options: &Options,
) -> Ended
where
    T: AsyncRead + AsyncWrite + Send + 'static,
    H: Handler,
{
    let (reader, writer) = tokio::io::split(io);
    let (in_tx, mut input) = mpsc::channel::<Bytes>(READ_QUEUE);
    let (out_tx, out_rx) = mpsc::channel::<Outgoing>(WRITE_QUEUE);
    let read_task = tokio::spawn(read_loop(reader, in_tx, options.zero_read_is_eof));
    let mut write_task = tokio::spawn(write_loop(writer, out_rx));
    let (stream_tx, mut stream_rx) = mpsc::unbounded_channel();
    let mut link = Link {
        session,
        streams: Streams::new(stream_tx),
        stop: None,
        restart: None,
        last_input: Instant::now(),
    };
    let mut pinged = false;
    let mut commands_closed = false;
    // Any byte from the peer proves it alive; a keepalive period of silence sends a PING, and a second one
    // without a byte ends the connection.
    let mut keepalive_from = Instant::now();
    let far = || Instant::now() + Duration::from_secs(86_400 * 365);
    let ended = loop {
        let deadline = handler.deadline(&link);
        let keepalive_at = options.keepalive.map(|period| keepalive_from + period);
        let mut lost = false;
        let mut input_closed = false;
        tokio::select! {
            biased;
            () = tokio::time::sleep_until(deadline.unwrap_or_else(far)), if deadline.is_some() => {
                handler.timer(&mut link);
            }
            permit = out_tx.reserve(), if link.session.has_pending_transmit() => {
                let Ok(permit) = permit else { break Ended::Lost };
                if let Some((outgoing, finished)) = link.outgoing() {
                    permit.send(outgoing);
                    if let Some(stream_id) = finished {
                        handler.stream_sent(&mut link, stream_id);
                    }
                }
            }
            bytes = input.recv() => match bytes {
                Some(bytes) => {
                    link.last_input = Instant::now();
                    keepalive_from = link.last_input;
                    pinged = false;
                    link.session.receive(&bytes);
                }
                None => {
                    link.session.transport_closed();
                    input_closed = true;
                }
            },
            Some(command) = stream_rx.recv() => link.apply(command),
            command = next_command(&mut commands), if !commands_closed => match command {
                Some(command) => handler.command(&mut link, command),
                None => commands_closed = true,
            },
            () = tokio::time::sleep(RETRY_AFTER), if link.session.awaiting_answer() => link.session.retry(),
            () = tokio::time::sleep_until(keepalive_at.unwrap_or_else(far)), if keepalive_at.is_some() => {
                if pinged {
                    link.session.transport_closed();
                    lost = true;
                } else {
                    pinged = link.session.ping(*b"pexi-ka!").is_ok();
                    keepalive_from = Instant::now();
                }
            }
        }
        while let Some(event) = link.session.poll_event() {
            if let Some(event) = link.route(event) {
                handler.event(&mut link, event);
            }
        }
        handler.after(&mut link);
        if let Some((session, why)) = link.restart.take() {
            // What the old session still has to say (a GOAWAY) goes first.
            let mut failed = false;
            while let Some((outgoing, _)) = link.outgoing() {
                if out_tx.send(outgoing).await.is_err() {
                    failed = true;
                    break;
                }
            }
            link.streams
                .fail_all(&ErrorPayload::new(ErrorCode::SessionReset, why).retryable(true));
            link.session = session;
            if failed {
                break Ended::Lost;
            }
        }
        if input_closed {
            break Ended::Closed;
        }
        if lost {
            break Ended::Lost;
        }
        // Nobody can ask for anything new: the connection lives as long as the streams already handed out.
        if commands_closed && link.streams.is_empty() && !link.session.has_pending_transmit() {
            break Ended::Dropped;
        }
        match link.stop {
            Some(Stop::Now) => break Ended::Finished,
            Some(Stop::WhenQuiet) if !link.session.has_pending_transmit() => break Ended::Finished,
            _ => {}
        }
    };
    handler.ended(&mut link, ended);
    link.streams.fail_all(
        &ErrorPayload::new(ErrorCode::SessionReset, "the connection ended").retryable(true),
    );
    read_task.abort();
    drop(out_tx);
    if tokio::time::timeout(options.last_words, &mut write_task)
        .await
        .is_err()
    {
        write_task.abort();
    }
    ended
}

async fn next_command<C>(commands: &mut Option<&mut mpsc::UnboundedReceiver<C>>) -> Option<C> {
    match commands {
        Some(commands) => commands.recv().await,
        None => std::future::pending().await,
    }
}

async fn read_loop<R: AsyncRead + Unpin>(
    mut reader: R,
    tx: mpsc::Sender<Bytes>,
    zero_is_eof: bool,
) {
    let mut buf = vec![0u8; READ_BUFFER];
    loop {
        match reader.read(&mut buf).await {
            Ok(0) if zero_is_eof => return,
            // A virtio-serial port with the other end closed: wait, do not spin.
            Ok(0) => tokio::time::sleep(Duration::from_millis(100)).await,
            Ok(n) => {
                if tx.send(Bytes::copy_from_slice(&buf[..n])).await.is_err() {
                    return;
                }
            }
            Err(_) => return,
        }
    }
}

async fn write_loop<W: AsyncWrite + Unpin>(mut writer: W, mut rx: mpsc::Receiver<Outgoing>) {
    let mut frames: Vec<([u8; HEADER_LEN], Bytes)> = Vec::new();
    let mut written = Vec::new();
    while let Some(first) = rx.recv().await {
        // Every frame already queued goes out in one vectored write: a small response's HEAD, DATA and END
        // cost one syscall, and no payload is copied behind its header.
        let mut next = Some(first);
        while let Some(out) = next.take() {
            frames.push((out.header, out.payload));
            written.extend(out.written);
            if frames.len() < WRITE_BATCH {
                next = rx.try_recv().ok();
            }
        }
        if write_frames(&mut writer, &frames).await.is_err() {
            return;
        }
        frames.clear();
        for done in written.drain(..) {
            done.done();
        }
        if writer.flush().await.is_err() {
            return;
        }
    }
    let _ = writer.shutdown().await;
}

/// Frames per vectored write at most (two slices each; well under any system's `IOV_MAX`).
const WRITE_BATCH: usize = 64;

async fn write_frames<W: AsyncWrite + Unpin>(
    writer: &mut W,
    frames: &[([u8; HEADER_LEN], Bytes)],
) -> std::io::Result<()> {
    if !writer.is_write_vectored() {
        // A transport without vectored writes (vsock here) would take one slice per syscall, a header
        // alone and then its payload: copy the burst together instead, one write as before.
        let mut bytes = Vec::with_capacity(
            frames
                .iter()
                .map(|(header, payload)| header.len() + payload.len())
                .sum(),
        );
        for (header, payload) in frames {
            bytes.extend_from_slice(header);
            bytes.extend_from_slice(payload);
        }
        return writer.write_all(&bytes).await;
    }
    let mut slices: Vec<std::io::IoSlice<'_>> = frames
        .iter()
        .flat_map(|(header, payload)| [&header[..], &payload[..]])
        .filter(|slice| !slice.is_empty())
        .map(std::io::IoSlice::new)
        .collect();
    let mut rest = &mut slices[..];
    while !rest.is_empty() {
        let n = writer.write_vectored(rest).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        std::io::IoSlice::advance_slices(&mut rest, n);
    }
    Ok(())
}
