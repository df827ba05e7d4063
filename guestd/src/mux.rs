//! The local pexi socket: pexi-guestd serves the pexi protocol on a Unix socket inside the guest and
//! relays every stream over its own single session with the PEP. A virtio-serial port has one opener;
//! through this socket any number of processes (the SDKs use it by default when it exists) share it.
//!
//! Per local connection: a reader task feeds bytes to the session, a writer task writes what it queues,
//! and one driver owns the session (sans-IO) and never waits on I/O itself. Each stream gets a relay task
//! with its upstream call ([`pexi_guest::Client::call`]). Backpressure both ways: bytes from the local
//! client are released (credit back) only once the upstream took them; bytes from the PEP are read from
//! the upstream call only while less than [`STREAM_BUFFER`] of them wait for the local client's credit.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use bytes::Bytes;
use pexi_guest::{Client, Error, RawEvent};
use pexi_protocol::payload::{ErrorCode, ErrorPayload, Limits, MethodCall, ResponseHead};
use pexi_protocol::session::{Config as SessionConfig, Event, Session};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::{mpsc, Semaphore};

// Bytes from the PEP that may wait in pexi-guestd for one local stream's credit.
use pexi_protocol::session::STREAM_SEND_BUFFER as STREAM_BUFFER;

/// Relay task → driver.
enum Down {
    Head(u32, ResponseHead),
    Data(u32, Bytes),
    End(u32),
    Error(u32, ErrorPayload),
    /// The upstream took this many of the local client's bytes: give the credit back.
    Released(u32, usize),
}

/// Driver → relay task: the local client's direction.
enum Up {
    Data(Bytes),
    End,
}

struct LocalStream {
    up: mpsc::UnboundedSender<Up>,
    /// Bytes for the local client that wait for its credit, then the END or ERROR that follows them.
    pending: VecDeque<Bytes>,
    end_pending: bool,
    error_pending: Option<ErrorPayload>,
    room: Arc<Semaphore>,
    /// Each direction's end: the entry goes when both are done.
    local_ended: bool,
    host_ended: bool,
}

/// The limits announced to local clients: the protocol's defaults (the PEP's own limits still apply to
/// every request, as it enforces them).
fn local_limits() -> Limits {
    Limits {
        max_concurrent_streams: 256,
        max_request_bytes: u64::MAX,
        max_response_bytes: u64::MAX,
        max_redirects: 20,
        connect_timeout_ms: 10_000,
        idle_timeout_ms: 300_000,
        total_timeout_ms: 900_000,
    }
}

/// Serves one local connection until it closes.
pub async fn serve(client: Client, socket: UnixStream) {
    let (mut read_half, mut write_half) = socket.into_split();
    let (in_tx, mut in_rx) = mpsc::channel::<Bytes>(8);
    let (out_tx, mut out_rx) = mpsc::unbounded_channel::<Vec<u8>>();
    let reader = tokio::spawn(async move {
        let mut buffer = vec![0u8; 64 * 1024];
        loop {
            match read_half.read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if in_tx
                        .send(Bytes::copy_from_slice(&buffer[..n]))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            }
        }
    });
    let writer = tokio::spawn(async move {
        while let Some(bytes) = out_rx.recv().await {
            if write_half.write_all(&bytes).await.is_err() {
                return;
            }
        }
    });
    let config = SessionConfig::new("pexi-guestd", env!("CARGO_PKG_VERSION"));
    let mut session = Session::server(config, local_limits());
    let (down_tx, mut down_rx) = mpsc::unbounded_channel::<Down>();
    let mut streams: HashMap<u32, LocalStream> = HashMap::new();
    loop {
        tokio::select! {
            input = in_rx.recv() => match input {
                Some(bytes) => session.receive(&bytes),
                None => {
                    session.transport_closed();
                    break;
                }
            },
            Some(down) = down_rx.recv() => apply(&mut session, &mut streams, down),
        }
        while let Some(event) = session.poll_event() {
            match event {
                Event::Opened { stream_id, call } => {
                    let (up_tx, up_rx) = mpsc::unbounded_channel();
                    let room = Arc::new(Semaphore::new(STREAM_BUFFER));
                    streams.insert(
                        stream_id,
                        LocalStream {
                            up: up_tx,
                            pending: VecDeque::new(),
                            end_pending: false,
                            error_pending: None,
                            room: room.clone(),
                            local_ended: false,
                            host_ended: false,
                        },
                    );
                    tokio::spawn(relay(
                        client.clone(),
                        stream_id,
                        call,
                        up_rx,
                        down_tx.clone(),
                        room,
                    ));
                }
                Event::Data { stream_id, data } => match streams.get(&stream_id) {
                    Some(stream) => {
                        let len = data.len();
                        if stream.up.send(Up::Data(data)).is_err() {
                            session.release(stream_id, len);
                        }
                    }
                    None => session.release(stream_id, data.len()),
                },
                Event::End { stream_id, .. } => {
                    if let Some(stream) = streams.get_mut(&stream_id) {
                        let _ = stream.up.send(Up::End);
                        stream.local_ended = true;
                        if stream.host_ended {
                            streams.remove(&stream_id);
                        }
                    }
                }
                Event::StreamFailed { stream_id, .. } => {
                    // Dropping the relay's channel ends it, which cancels the upstream call.
                    streams.remove(&stream_id);
                }
                _ => {}
            }
        }
        flush_pending(&mut session, &mut streams);
        while let Some(frame) = session.poll_transmit() {
            let mut bytes = Vec::with_capacity(frame.wire_len());
            frame.encode_into(&mut bytes);
            let _ = out_tx.send(bytes);
        }
        if session.is_closed() {
            break;
        }
    }
    drop(out_tx);
    reader.abort();
    let _ = writer.await;
}

fn apply(session: &mut Session, streams: &mut HashMap<u32, LocalStream>, down: Down) {
    match down {
        Down::Head(id, head) => {
            if session.send_head(id, &head).is_err() {
                streams.remove(&id);
            }
        }
        Down::Data(id, data) => {
            if let Some(stream) = streams.get_mut(&id) {
                stream.pending.push_back(data);
            }
        }
        Down::End(id) => {
            if let Some(stream) = streams.get_mut(&id) {
                stream.end_pending = true;
            }
        }
        Down::Error(id, error) => {
            // After the data already queued, as the protocol wants.
            if let Some(stream) = streams.get_mut(&id) {
                stream.error_pending = Some(error);
            }
        }
        Down::Released(id, n) => session.release(id, n),
    }
}

/// Moves waiting bytes into the session as far as the local client's credit allows.
fn flush_pending(session: &mut Session, streams: &mut HashMap<u32, LocalStream>) {
    let mut finished = Vec::new();
    for (&id, stream) in streams.iter_mut() {
        while let Some(mut data) = stream.pending.pop_front() {
            let room = session.send_capacity(id);
            if room == 0 {
                stream.pending.push_front(data);
                break;
            }
            let piece = data.split_to(data.len().min(room));
            let len = piece.len();
            if session.send_data(id, piece).is_err() {
                stream.pending.clear();
                break;
            }
            stream.room.add_permits(len);
            if !data.is_empty() {
                stream.pending.push_front(data);
                break;
            }
        }
        if stream.pending.is_empty() {
            if let Some(error) = stream.error_pending.take() {
                let _ = session.send_error(id, error);
                finished.push(id);
            } else if stream.end_pending {
                let _ = session.send_end(id, Vec::new());
                stream.end_pending = false;
                stream.host_ended = true;
                stream.room.close();
                if stream.local_ended {
                    finished.push(id);
                }
            }
        }
    }
    for id in finished {
        streams.remove(&id);
    }
}

/// One stream: the local client's call made upstream, and the bytes both ways.
async fn relay(
    client: Client,
    id: u32,
    call: MethodCall,
    mut up: mpsc::UnboundedReceiver<Up>,
    down: mpsc::UnboundedSender<Down>,
    room: Arc<Semaphore>,
) {
    let (mut upstream, mut sender) = match client.call(call).await {
        Ok(opened) => opened,
        Err(error) => {
            let _ = down.send(Down::Error(id, payload_of(error)));
            return;
        }
    };
    let mut up_open = true;
    loop {
        tokio::select! {
            message = up.recv(), if up_open => match message {
                Some(Up::Data(data)) => {
                    let len = data.len();
                    let sent = sender.send(data).await;
                    let _ = down.send(Down::Released(id, len));
                    if !matches!(sent, Ok(true)) {
                        up_open = false;
                    }
                }
                Some(Up::End) => {
                    let _ = sender.finish();
                    up_open = false;
                }
                // The local stream is gone (CANCEL, ERROR, the connection closed): drop the call.
                None => return,
            },
            event = upstream.next() => match event {
                Ok(Some(RawEvent::Head(head))) => {
                    let _ = down.send(Down::Head(id, head));
                }
                Ok(Some(RawEvent::Data(data))) => {
                    let len = u32::try_from(data.len()).unwrap_or(u32::MAX);
                    // Wait for the local client to make room before taking more from the PEP.
                    match room.acquire_many(len).await {
                        Ok(permit) => permit.forget(),
                        Err(_) => return,
                    }
                    let _ = down.send(Down::Data(id, data));
                }
                Ok(None) => {
                    let _ = down.send(Down::End(id));
                    // Keep passing the local client's bytes until it ends too.
                    while let Some(message) = up.recv().await {
                        match message {
                            Up::Data(data) => {
                                let _ = down.send(Down::Released(id, data.len()));
                            }
                            Up::End => break,
                        }
                    }
                    return;
                }
                Err(error) => {
                    let _ = down.send(Down::Error(id, payload_of(error)));
                    return;
                }
            },
        }
    }
}

fn payload_of(error: Error) -> ErrorPayload {
    match error {
        Error::Pep(payload) => payload,
        Error::Connect { .. } => {
            ErrorPayload::new(ErrorCode::Internal, error.to_string()).retryable(true)
        }
        other => ErrorPayload::new(ErrorCode::SessionReset, other.to_string()).retryable(true),
    }
}
