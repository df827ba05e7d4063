//! The async client. One connection task owns the transport and the protocol session and multiplexes every
//! request over it; [`Client`] handles are cheap to clone and only send it commands.
//!
//! The task reconnects when the transport fails and starts a new session (HELLO) when the host lost the
//! old one; requests in flight at that moment fail with `session_reset` and are never replayed, and new
//! requests wait for the new session. Keepalive PINGs find a host that went quiet (a virtio-serial port
//! gives no disconnect signal); the session resynchronises on its own after garbage on the stream.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use pexi_protocol::payload::{
    ErrorCode, HeaderField, HttpRequest, HttpResponseHead, MethodCall, NetConnect, NetConnectHead,
    PolicyDecision, RedirectMode, ResponseHead,
};
use pexi_protocol::session::{Config as SessionConfig, Event, Session};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot, Semaphore};

use crate::endpoint::{BoxTransport, Connector, Endpoint};
use crate::Error;

// Upload bytes handed to the connection task ahead of the PEP's credit, per request.
use pexi_protocol::session::DATA_CHUNK as CHUNK;
use pexi_protocol::session::STREAM_SEND_BUFFER as UPLOAD_BUFFER;

/// Tuning for the connection task.
#[derive(Clone, Debug)]
pub struct Options {
    /// How often an idle session is PINGed; a host that misses two is taken for dead.
    pub keepalive: Duration,
    /// How long a request waits for a session before failing with `connect`.
    pub connect_timeout: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            keepalive: Duration::from_secs(15),
            connect_timeout: Duration::from_secs(10),
        }
    }
}

/// A handle to the PEP. Clone it freely; all clones share one session.
#[derive(Clone)]
pub struct Client {
    commands: mpsc::UnboundedSender<Command>,
}

enum Command {
    Open {
        call: MethodCall,
        reply: oneshot::Sender<Result<Opened, Error>>,
    },
    Data(u64, Bytes),
    End(u64),
    Cancel(u64),
    Release(u64, usize),
}

struct Opened {
    key: u64,
    events: mpsc::UnboundedReceiver<StreamEvent>,
    buffer: Arc<Semaphore>,
    received: Arc<AtomicUsize>,
}

enum StreamEvent {
    Head(ResponseHead),
    Data(Bytes),
    End,
    Failed(Error),
}

impl Client {
    /// A client for `endpoint`. The connection is made by a background task (on the current tokio
    /// runtime) when the first request needs it.
    pub fn new(endpoint: Endpoint) -> Client {
        Client::with_connector(Arc::new(endpoint), Options::default())
    }

    /// A client for the endpoint in `PEXI_ENDPOINT`, or the default virtio port.
    pub fn from_env() -> Result<Client, Error> {
        Ok(Client::new(Endpoint::from_env()?))
    }

    /// A client over any [`Connector`], with explicit options.
    pub fn with_connector(connector: Arc<dyn Connector>, options: Options) -> Client {
        let (commands, queue) = mpsc::unbounded_channel();
        tokio::spawn(Connection::new(connector, options, queue).run());
        Client { commands }
    }

    /// Starts a request: `client.request("POST", url).header(..).body(..).send().await`.
    pub fn request(&self, method: &str, url: &str) -> RequestBuilder {
        RequestBuilder {
            client: self.clone(),
            request: HttpRequest::new(method, url),
            body: Body::Empty,
        }
    }

    /// Starts a GET request.
    pub fn get(&self, url: &str) -> RequestBuilder {
        self.request("GET", url)
    }

    /// Any method call, as the protocol carries it: for relays (pexi-guestd's local socket) that pass
    /// calls through without interpreting them. The [`RawCall`] yields the HEAD, then the host's bytes,
    /// then the end; the [`UpgradeSender`] carries the guest's bytes (`finish` is END). Dropping the
    /// call before its end cancels it.
    pub async fn call(&self, call: MethodCall) -> Result<(RawCall, UpgradeSender), Error> {
        let stream = self.open(call).await?;
        let sender = stream.sender();
        Ok((RawCall { stream }, sender))
    }

    /// Opens an opaque TCP tunnel to `host`:`port` (`pep.net.connect`), for destinations the policy marks
    /// tunnel-only. Read the far end's bytes from the [`Tunnel`], write with the [`UpgradeSender`]
    /// (its `finish` half-closes). Dropping the tunnel closes it.
    pub async fn tunnel(&self, host: &str, port: u16) -> Result<(Tunnel, UpgradeSender), Error> {
        let mut stream = self
            .open(MethodCall::NetConnect(NetConnect {
                host: host.to_string(),
                port,
            }))
            .await?;
        match stream.head("a tunnel").await? {
            ResponseHead::NetConnect(head) => {
                let sender = stream.sender();
                Ok((Tunnel { head, stream }, sender))
            }
            _ => Err(unexpected("a tunnel")),
        }
    }

    /// Asks the PEP's policy about a request without performing it (`pep.policy.check`).
    pub async fn check(&self, method: &str, url: &str) -> Result<PolicyDecision, Error> {
        let mut stream = self
            .open(MethodCall::PolicyCheck(HttpRequest::new(method, url)))
            .await?;
        stream.end()?;
        match stream.head("a policy check").await? {
            ResponseHead::PolicyDecision(decision) => {
                stream.finished = true;
                Ok(decision)
            }
            _ => Err(unexpected("a policy check")),
        }
    }

    async fn open(&self, call: MethodCall) -> Result<StreamHandle, Error> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(Command::Open { call, reply })
            .map_err(|_| Error::Closed)?;
        let opened = answer.await.map_err(|_| Error::Closed)??;
        Ok(StreamHandle {
            key: opened.key,
            events: opened.events,
            buffer: opened.buffer,
            received: opened.received,
            commands: self.commands.clone(),
            finished: false,
        })
    }
}

/// One open request on the client side; cancels the stream when dropped unfinished.
struct StreamHandle {
    key: u64,
    events: mpsc::UnboundedReceiver<StreamEvent>,
    buffer: Arc<Semaphore>,
    /// Response bytes delivered to this handle and not yet read.
    received: Arc<AtomicUsize>,
    commands: mpsc::UnboundedSender<Command>,
    finished: bool,
}

impl StreamHandle {
    /// Queues `data` for the PEP; `false` when the stream has already ended (the PEP answered or failed
    /// it), so an uploader stops producing a body nobody will read.
    async fn send(&mut self, data: Bytes) -> Result<bool, Error> {
        send_data(self.key, &self.buffer, &self.commands, data).await
    }

    fn end(&mut self) -> Result<(), Error> {
        self.commands
            .send(Command::End(self.key))
            .map_err(|_| Error::Closed)
    }

    async fn next_event(&mut self) -> Result<StreamEvent, Error> {
        self.events.recv().await.ok_or(Error::Closed)
    }

    /// The next piece of the host's bytes, `None` at their end; the credit goes back as it is taken.
    async fn read(&mut self) -> Result<Option<Bytes>, Error> {
        if self.finished {
            return Ok(None);
        }
        match self.next_event().await? {
            StreamEvent::Data(data) => {
                self.received.fetch_sub(data.len(), Ordering::Relaxed);
                let _ = self.commands.send(Command::Release(self.key, data.len()));
                Ok(Some(data))
            }
            StreamEvent::End => {
                self.finished = true;
                Ok(None)
            }
            StreamEvent::Failed(error) => {
                self.finished = true;
                Err(error)
            }
            StreamEvent::Head(_) => Err(Error::Pep(pexi_protocol::payload::ErrorPayload::new(
                ErrorCode::ProtocolError,
                "a second HEAD",
            ))),
        }
    }

    /// Waits for the stream's HEAD; `what` names the call for the error when something else comes.
    async fn head(&mut self, what: &str) -> Result<ResponseHead, Error> {
        match self.next_event().await? {
            StreamEvent::Head(head) => Ok(head),
            StreamEvent::Failed(error) => {
                self.finished = true;
                Err(error)
            }
            _ => Err(unexpected(what)),
        }
    }

    fn sender(&self) -> UpgradeSender {
        UpgradeSender {
            key: self.key,
            buffer: self.buffer.clone(),
            commands: self.commands.clone(),
            ended: false,
        }
    }
}

impl Drop for StreamHandle {
    fn drop(&mut self) {
        if !self.finished {
            let _ = self.commands.send(Command::Cancel(self.key));
        }
    }
}

enum Body {
    Empty,
    Bytes(Bytes),
    Stream(futures_util::stream::BoxStream<'static, Result<Bytes, std::io::Error>>),
}

/// A request being built. Nothing is sent until [`RequestBuilder::send`].
pub struct RequestBuilder {
    client: Client,
    request: HttpRequest,
    body: Body,
}

impl RequestBuilder {
    /// Adds a header; order and repetition are kept.
    pub fn header(mut self, name: &str, value: impl AsRef<[u8]>) -> Self {
        self.request
            .headers
            .push(HeaderField::new(name, value.as_ref().to_vec()));
        self
    }

    /// A body known in full; its length is announced to the PEP.
    pub fn body(mut self, body: impl Into<Bytes>) -> Self {
        let body = body.into();
        self.request.content_length = Some(body.len() as u64);
        self.body = Body::Bytes(body);
        self
    }

    /// A body streamed as it is produced (an upload); `length` is announced when known.
    pub fn body_stream(
        mut self,
        length: Option<u64>,
        stream: impl Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static,
    ) -> Self {
        self.request.content_length = length;
        self.body = Body::Stream(stream.boxed());
        self
    }

    /// What the PEP does with 3xx responses (default: follow, each hop policy-checked).
    pub fn redirect(mut self, mode: RedirectMode) -> Self {
        self.request.redirect = mode;
        self
    }

    /// A deadline for the whole request, enforced by the PEP (capped by its own limit).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.request.timeout_ms = Some(timeout.as_millis().try_into().unwrap_or(u64::MAX));
        self
    }

    /// Sends an upgrade request (add `upgrade: websocket`, `connection: upgrade` and the protocol's own
    /// headers) and waits for the head, without ending the request side. With status 101 the
    /// [`Response`]'s body is the upgraded connection's bytes from the upstream ([`Response::chunk`]) and
    /// the [`UpgradeSender`] carries bytes to it; [`UpgradeSender::finish`] half-closes. Any other status
    /// is an ordinary response. Dropping the response before its end cancels the whole connection.
    pub async fn upgrade(self) -> Result<(Response, UpgradeSender), Error> {
        let mut stream = self
            .client
            .open(MethodCall::HttpRequest(self.request))
            .await?;
        match stream.head("an upgrade request").await? {
            ResponseHead::Http(head) => {
                let sender = stream.sender();
                Ok((Response { head, stream }, sender))
            }
            _ => Err(unexpected("an upgrade request")),
        }
    }

    /// Sends the request and waits for the response head. Dropping the future cancels the request.
    pub async fn send(self) -> Result<Response, Error> {
        let mut stream = self
            .client
            .open(MethodCall::HttpRequest(self.request))
            .await?;
        match self.body {
            Body::Empty => {}
            Body::Bytes(bytes) => {
                stream.send(bytes).await?;
            }
            Body::Stream(mut chunks) => {
                while let Some(chunk) = chunks.next().await {
                    let chunk = chunk.map_err(|err| Error::Body(err.to_string()))?;
                    if !stream.send(chunk).await? {
                        break;
                    }
                }
            }
        }
        stream.end()?;
        match stream.head("an HTTP request").await? {
            ResponseHead::Http(head) => Ok(Response { head, stream }),
            _ => Err(unexpected("an HTTP request")),
        }
    }
}

/// The guest's direction of an upgraded connection (see [`RequestBuilder::upgrade`]). Dropping it ends
/// that direction, as [`UpgradeSender::finish`] does.
pub struct UpgradeSender {
    key: u64,
    buffer: Arc<Semaphore>,
    commands: mpsc::UnboundedSender<Command>,
    ended: bool,
}

impl UpgradeSender {
    /// Sends bytes to the upstream, waiting for flow-control room; `false` when the connection has
    /// already ended (the upstream closed or the PEP failed it).
    pub async fn send(&mut self, data: Bytes) -> Result<bool, Error> {
        send_data(self.key, &self.buffer, &self.commands, data).await
    }

    /// Ends the guest's direction (the upstream sees a half-close); the other keeps flowing.
    pub fn finish(&mut self) -> Result<(), Error> {
        if self.ended {
            return Ok(());
        }
        self.ended = true;
        self.commands
            .send(Command::End(self.key))
            .map_err(|_| Error::Closed)
    }
}

impl Drop for UpgradeSender {
    fn drop(&mut self) {
        let _ = self.finish();
    }
}

/// Queues `data` for a stream in pieces, each waiting for room in the stream's upload buffer; `false` once
/// the stream has ended (the PEP answered or failed it: the caller reads why).
async fn send_data(
    key: u64,
    buffer: &Semaphore,
    commands: &mpsc::UnboundedSender<Command>,
    mut data: Bytes,
) -> Result<bool, Error> {
    while !data.is_empty() {
        let chunk = data.split_to(data.len().min(CHUNK));
        // Fits: CHUNK does.
        match buffer.acquire_many(chunk.len() as u32).await {
            Ok(permit) => permit.forget(),
            Err(_) => return Ok(false),
        }
        commands
            .send(Command::Data(key, chunk))
            .map_err(|_| Error::Closed)?;
    }
    Ok(true)
}

/// The error for a HEAD of the wrong kind, or none where one was due.
fn unexpected(what: &str) -> Error {
    Error::Pep(pexi_protocol::payload::ErrorPayload::new(
        ErrorCode::ProtocolError,
        format!("the PEP answered {what} with something else"),
    ))
}

/// What the host sends on a [`RawCall`].
#[derive(Debug)]
pub enum RawEvent {
    /// The method's HEAD.
    Head(ResponseHead),
    /// Bytes from the host (its credit is returned as this is handed out).
    Data(Bytes),
}

/// The host's direction of a call made with [`Client::call`].
pub struct RawCall {
    stream: StreamHandle,
}

impl RawCall {
    /// The next HEAD or DATA; `None` after the host's END. An ERROR from the host (or a session reset)
    /// is the `Err`, after everything sent before it.
    pub async fn next(&mut self) -> Result<Option<RawEvent>, Error> {
        if self.stream.finished {
            return Ok(None);
        }
        match self.stream.next_event().await? {
            StreamEvent::Head(head) => Ok(Some(RawEvent::Head(head))),
            StreamEvent::Data(data) => {
                self.stream
                    .received
                    .fetch_sub(data.len(), Ordering::Relaxed);
                let _ = self
                    .stream
                    .commands
                    .send(Command::Release(self.stream.key, data.len()));
                Ok(Some(RawEvent::Data(data)))
            }
            StreamEvent::End => {
                self.stream.finished = true;
                Ok(None)
            }
            StreamEvent::Failed(error) => {
                self.stream.finished = true;
                Err(error)
            }
        }
    }
}

/// The far end's side of a `pep.net.connect` tunnel.
pub struct Tunnel {
    head: NetConnectHead,
    stream: StreamHandle,
}

impl Tunnel {
    /// The address the PEP connected to.
    pub fn address(&self) -> &str {
        &self.head.address
    }

    /// The audit record of the decision.
    pub fn decision_id(&self) -> &str {
        &self.head.decision_id
    }

    /// The next bytes from the far end, `None` once it closed.
    pub async fn read(&mut self) -> Result<Option<Bytes>, Error> {
        self.stream.read().await
    }

    /// The far end's bytes as a stream.
    pub fn into_stream(self) -> impl Stream<Item = Result<Bytes, Error>> {
        futures_util::stream::unfold(self.stream, read_next)
    }
}

/// One step of a stream of the host's bytes: the next chunk, or the end (an error is the last item).
async fn read_next(mut stream: StreamHandle) -> Option<(Result<Bytes, Error>, StreamHandle)> {
    match stream.read().await {
        Ok(Some(chunk)) => Some((Ok(chunk), stream)),
        Ok(None) => None,
        Err(error) => Some((Err(error), stream)),
    }
}

/// A response whose body streams as it arrives. Dropping it before the end cancels the request.
pub struct Response {
    head: HttpResponseHead,
    stream: StreamHandle,
}

impl Response {
    /// The HTTP status; 4xx and 5xx are responses, not errors.
    pub fn status(&self) -> u16 {
        self.head.status
    }

    /// The response headers, in order, repeated names kept.
    pub fn headers(&self) -> &[HeaderField] {
        &self.head.headers
    }

    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.head
            .headers
            .iter()
            .find(|h| h.name().eq_ignore_ascii_case(name))
            .map(HeaderField::value)
    }

    /// The URL that produced this response, after redirects.
    pub fn final_url(&self) -> &str {
        &self.head.final_url
    }

    /// How many redirects the PEP followed.
    pub fn redirect_count(&self) -> u32 {
        self.head.redirect_count
    }

    /// The audit record of the decision that allowed this response.
    pub fn decision_id(&self) -> &str {
        &self.head.decision_id
    }

    /// Body bytes received and not yet read. Flow control bounds it by the stream window (256 KiB): a
    /// reader that stops reading stops the PEP, and the PEP stops its upstream.
    pub fn buffered(&self) -> usize {
        self.stream.received.load(Ordering::Relaxed)
    }

    /// The next piece of the body, `None` at its end. An error here (`response_too_large`,
    /// `upstream_timeout`, `session_reset`) comes after the data before it.
    pub async fn chunk(&mut self) -> Result<Option<Bytes>, Error> {
        self.stream.read().await
    }

    /// The whole body.
    pub async fn bytes(mut self) -> Result<Bytes, Error> {
        let mut body = Vec::new();
        while let Some(chunk) = self.chunk().await? {
            body.extend_from_slice(&chunk);
        }
        Ok(Bytes::from(body))
    }

    /// The whole body as text (lossy UTF-8).
    pub async fn text(self) -> Result<String, Error> {
        let bytes = self.bytes().await?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    /// The whole body parsed as JSON.
    pub async fn json<T: serde::de::DeserializeOwned>(self) -> Result<T, Error> {
        let bytes = self.bytes().await?;
        serde_json::from_slice(&bytes).map_err(|err| Error::Body(err.to_string()))
    }

    /// The body as a `Stream` of chunks.
    pub fn into_stream(self) -> impl Stream<Item = Result<Bytes, Error>> {
        futures_util::stream::unfold(self.stream, read_next)
    }
}

// ------------------------------------------------------------------------------------------------------
// The connection task.

enum Out {
    Data(Bytes),
    End,
}

struct StreamState {
    /// The stream id in the current session.
    id: u32,
    events: mpsc::UnboundedSender<StreamEvent>,
    pending: VecDeque<Out>,
    buffer: Arc<Semaphore>,
    received: Arc<AtomicUsize>,
    /// The guest's END went into the session.
    end_sent: bool,
}

/// An open waiting for a session: the call, where to answer, and since when.
type Waiting = (
    MethodCall,
    oneshot::Sender<Result<Opened, Error>>,
    tokio::time::Instant,
);

struct Connection {
    connector: Arc<dyn Connector>,
    options: Options,
    commands: mpsc::UnboundedReceiver<Command>,
    next_key: u64,
    streams: HashMap<u64, StreamState>,
    by_id: HashMap<u32, u64>,
    /// Opens that wait for a session.
    waiting: Vec<Waiting>,
}

/// What becomes of a session after its events.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Next {
    Go,
    /// Over: start a new one on the same transport.
    NewSession,
    /// Refused: end the connection; the next request makes a new one.
    Reconnect,
}

/// Why a connection ended.
enum Ended {
    /// Every `Client` handle is gone.
    Dropped,
    /// The transport failed or the host went away: connect again.
    Lost,
}

impl Connection {
    fn new(
        connector: Arc<dyn Connector>,
        options: Options,
        commands: mpsc::UnboundedReceiver<Command>,
    ) -> Connection {
        Connection {
            connector,
            options,
            commands,
            next_key: 0,
            streams: HashMap::new(),
            by_id: HashMap::new(),
            waiting: Vec::new(),
        }
    }

    async fn run(mut self) {
        let mut backoff = Duration::from_millis(50);
        loop {
            // Connect only when a request waits for it.
            if self.waiting.is_empty() {
                match self.commands.recv().await {
                    Some(command) => self.apply_idle(command),
                    None => return,
                }
                continue;
            }
            match self.connector.connect().await {
                Ok(transport) => {
                    backoff = Duration::from_millis(50);
                    match self.serve(transport).await {
                        Ended::Dropped => return,
                        Ended::Lost => continue,
                    }
                }
                Err(err) => {
                    let now = tokio::time::Instant::now();
                    let timeout = self.options.connect_timeout;
                    let endpoint = self.connector.describe();
                    let (expired, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.waiting)
                        .into_iter()
                        .partition(|(_, _, since)| now.duration_since(*since) >= timeout);
                    self.waiting = waiting;
                    for (_, reply, _) in expired {
                        let _ = reply.send(Err(Error::Connect {
                            endpoint: endpoint.clone(),
                            message: err.to_string(),
                        }));
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
            }
        }
    }

    /// Commands while no session exists: opens wait, everything else concerns streams that are gone.
    fn apply_idle(&mut self, command: Command) {
        if let Command::Open { call, reply } = command {
            self.waiting
                .push((call, reply, tokio::time::Instant::now()));
        }
    }

    async fn serve(&mut self, transport: BoxTransport) -> Ended {
        let (reader, writer) = tokio::io::split(transport);
        let (in_tx, mut input) = mpsc::channel::<Bytes>(8);
        let (out_tx, out_rx) = mpsc::channel::<Vec<u8>>(16);
        let zero_is_eof = self.connector.zero_read_is_eof();
        let read_task = tokio::spawn(read_loop(reader, in_tx, zero_is_eof));
        let write_task = tokio::spawn(write_loop(writer, out_rx));
        let mut session =
            Session::client(SessionConfig::new("pexi-guest", env!("CARGO_PKG_VERSION")));
        // Any byte from the host proves it alive; a keepalive period of silence sends a PING, and a second
        // one without a byte declares the host gone.
        let keepalive = self.options.keepalive;
        let mut pinged = false;
        let mut keepalive_at = tokio::time::Instant::now() + keepalive;
        let ended = loop {
            tokio::select! {
                biased;
                permit = out_tx.reserve(), if session.has_pending_transmit() => {
                    let Ok(permit) = permit else { break Ended::Lost };
                    if let Some(frame) = session.poll_transmit() {
                        permit.send(frame.encode());
                    }
                }
                bytes = input.recv() => match bytes {
                    Some(bytes) => {
                        pinged = false;
                        keepalive_at = tokio::time::Instant::now() + keepalive;
                        session.receive(&bytes);
                    }
                    None => {
                        session.transport_closed();
                        self.route_events(&mut session);
                        break Ended::Lost;
                    }
                },
                command = self.commands.recv() => match command {
                    Some(command) => self.apply(&mut session, command),
                    None => break Ended::Dropped,
                },
                _ = tokio::time::sleep(Duration::from_secs(1)), if session.awaiting_answer() => session.retry(),
                _ = tokio::time::sleep_until(keepalive_at) => {
                    if pinged {
                        tracing::warn!("the PEP stopped answering; starting a new session");
                        session.transport_closed();
                        self.route_events(&mut session);
                        break Ended::Lost;
                    }
                    pinged = session.ping(*b"pexi-ka!").is_ok();
                    keepalive_at = tokio::time::Instant::now() + keepalive;
                }
            }
            let next = self.route_events(&mut session);
            if next != Next::Go {
                // The session is over (the host lost it, or it ended over a protocol error): what it still
                // has to say (a GOAWAY) goes out first, then a new session starts on the same transport.
                while let Some(frame) = session.poll_transmit() {
                    if out_tx.send(frame.encode()).await.is_err() {
                        break;
                    }
                }
                if next == Next::Reconnect {
                    break Ended::Lost;
                }
                session =
                    Session::client(SessionConfig::new("pexi-guest", env!("CARGO_PKG_VERSION")));
            } else if session.peer_going_away()
                && session.active_streams() == 0
                && !session.has_pending_transmit()
            {
                // The host's GOAWAY has been honoured: every stream it promised has finished. Requests
                // that came meanwhile wait for a new connection (a restarted host, or another one).
                break Ended::Lost;
            }
        };
        read_task.abort();
        drop(out_tx);
        let _ = write_task.await;
        self.fail_all("the connection to the PEP was lost");
        ended
    }

    fn apply(&mut self, session: &mut Session, command: Command) {
        match command {
            Command::Open { call, reply } => {
                self.waiting
                    .push((call, reply, tokio::time::Instant::now()));
                self.open_waiting(session);
            }
            Command::Data(key, data) => self.queue(session, key, Out::Data(data)),
            Command::End(key) => self.queue(session, key, Out::End),
            Command::Release(key, n) => {
                if let Some(state) = self.streams.get(&key) {
                    session.release(state.id, n);
                }
            }
            Command::Cancel(key) => {
                if let Some(state) = self.streams.remove(&key) {
                    self.by_id.remove(&state.id);
                    state.buffer.close();
                    let _ = session.cancel(state.id);
                }
            }
        }
    }

    fn open(
        &mut self,
        session: &mut Session,
        call: MethodCall,
        reply: oneshot::Sender<Result<Opened, Error>>,
    ) {
        match session.open(call) {
            Ok(id) => {
                let key = self.next_key;
                self.next_key += 1;
                let (events, receiver) = mpsc::unbounded_channel();
                let buffer = Arc::new(Semaphore::new(UPLOAD_BUFFER));
                let received = Arc::new(AtomicUsize::new(0));
                self.streams.insert(
                    key,
                    StreamState {
                        id,
                        events,
                        pending: VecDeque::new(),
                        buffer: buffer.clone(),
                        received: received.clone(),
                        end_sent: false,
                    },
                );
                self.by_id.insert(id, key);
                let opened = Opened {
                    key,
                    events: receiver,
                    buffer,
                    received,
                };
                if let Err(Ok(opened)) = reply.send(Ok(opened)) {
                    // The caller gave up before the stream opened.
                    drop(opened);
                    self.apply(session, Command::Cancel(key));
                }
            }
            Err(err) => {
                let _ = reply.send(Err(Error::Pep(
                    pexi_protocol::payload::ErrorPayload::new(
                        ErrorCode::ResourceExhausted,
                        err.to_string(),
                    )
                    .retryable(true),
                )));
            }
        }
    }

    fn queue(&mut self, session: &mut Session, key: u64, out: Out) {
        if let Some(state) = self.streams.get_mut(&key) {
            state.pending.push_back(out);
            self.flush(session, key);
        }
    }

    /// Moves a stream's pending upload into the session as far as the PEP's credit allows.
    fn flush(&mut self, session: &mut Session, key: u64) {
        let Some(state) = self.streams.get_mut(&key) else {
            return;
        };
        while let Some(out) = state.pending.pop_front() {
            match out {
                Out::Data(mut data) => {
                    let room = session.send_capacity(state.id);
                    if room == 0 {
                        state.pending.push_front(Out::Data(data));
                        return;
                    }
                    let piece = data.split_to(data.len().min(room));
                    let len = piece.len();
                    if session.send_data(state.id, piece).is_err() {
                        state.pending.clear();
                        return;
                    }
                    state.buffer.add_permits(len);
                    if !data.is_empty() {
                        state.pending.push_front(Out::Data(data));
                        return;
                    }
                }
                Out::End => {
                    let _ = session.send_end(state.id, Vec::new());
                    state.end_sent = true;
                }
            }
        }
    }

    /// Hands session events to their requests, and says what becomes of the session.
    fn route_events(&mut self, session: &mut Session) -> Next {
        let mut restart = false;
        let mut refused = false;
        while let Some(event) = session.poll_event() {
            match event {
                Event::Established(info) => {
                    tracing::debug!(session = info.session_id, "session established");
                }
                Event::Head { stream_id, head } => {
                    self.deliver(stream_id, StreamEvent::Head(head));
                }
                Event::Data { stream_id, data } => {
                    let len = data.len();
                    if let Some(state) =
                        self.by_id.get(&stream_id).and_then(|k| self.streams.get(k))
                    {
                        state.received.fetch_add(len, Ordering::Relaxed);
                    }
                    if !self.deliver(stream_id, StreamEvent::Data(data)) {
                        session.release(stream_id, len);
                    }
                }
                Event::End { stream_id, .. } => {
                    self.deliver(stream_id, StreamEvent::End);
                    // A stream the guest still had open (an upgraded connection whose upstream closed
                    // first): the host reads nothing more, so end the guest's side too, or both sessions
                    // would keep a half-open stream (and its concurrency slot) forever.
                    if let Some(state) = self
                        .by_id
                        .get(&stream_id)
                        .and_then(|k| self.streams.get_mut(k))
                    {
                        if !state.end_sent {
                            state.pending.clear();
                            state.end_sent = true;
                            let _ = session.send_end(stream_id, Vec::new());
                        }
                    }
                    // Nothing more arrives on this stream, so none of its bytes need credit any more:
                    // release everything the session holds for it (unread bytes, and read bytes whose
                    // Release command is still queued and will find the stream forgotten), so the
                    // session finishes it now and the connection window gets all of it back.
                    session.release(stream_id, usize::MAX);
                    self.forget(stream_id);
                }
                Event::StreamFailed {
                    stream_id, error, ..
                } => {
                    self.deliver(stream_id, StreamEvent::Failed(Error::Pep(error)));
                    self.forget(stream_id);
                }
                Event::SendCapacity { stream_id: 0 } => {
                    let keys: Vec<u64> = self.streams.keys().copied().collect();
                    for key in keys {
                        self.flush(session, key);
                    }
                }
                Event::SendCapacity { stream_id } => {
                    if let Some(key) = self.by_id.get(&stream_id).copied() {
                        self.flush(session, key);
                    }
                }
                Event::PeerError(error) if error.code == ErrorCode::SessionReset => restart = true,
                Event::Refused(error) => {
                    refused = true;
                    for (_, reply, _) in std::mem::take(&mut self.waiting) {
                        let _ = reply.send(Err(Error::Pep(error.clone())));
                    }
                }
                // A graceful GOAWAY: the streams it names run on, nothing new opens (open_waiting) and the
                // connection ends once they are done (serve). One over a protocol error is followed by
                // Closed.
                Event::GoAway(_) => {}
                Event::Closed => restart = true,
                Event::PeerError(_)
                | Event::Rejected { .. }
                | Event::Pong(_)
                | Event::Resynced
                | Event::Opened { .. } => {}
            }
        }
        if refused {
            // The requests that waited have their answer; a new HELLO now would only be refused again, so
            // the next request connects afresh.
            Next::Reconnect
        } else if restart {
            self.fail_all("the PEP lost the session");
            Next::NewSession
        } else {
            self.open_waiting(session);
            Next::Go
        }
    }

    /// Opens waiting requests while the session has room under the PEP's stream limit; the rest wait for
    /// a stream to finish.
    fn open_waiting(&mut self, session: &mut Session) {
        if !session.is_established() || session.peer_going_away() {
            return;
        }
        let limit = session
            .info()
            .map_or(0, |info| info.limits.max_concurrent_streams as usize);
        while !self.waiting.is_empty() && session.active_streams() < limit {
            let (call, reply, _) = self.waiting.remove(0);
            self.open(session, call, reply);
        }
    }

    fn deliver(&mut self, stream_id: u32, event: StreamEvent) -> bool {
        self.by_id
            .get(&stream_id)
            .and_then(|key| self.streams.get(key))
            .is_some_and(|state| state.events.send(event).is_ok())
    }

    fn forget(&mut self, stream_id: u32) {
        if let Some(key) = self.by_id.remove(&stream_id) {
            if let Some(state) = self.streams.remove(&key) {
                state.buffer.close();
            }
        }
    }

    fn fail_all(&mut self, why: &str) {
        for (_, state) in self.streams.drain() {
            let _ = state
                .events
                .send(StreamEvent::Failed(Error::session_reset(why)));
            state.buffer.close();
        }
        self.by_id.clear();
    }
}

async fn read_loop<R: tokio::io::AsyncRead + Unpin>(
    mut reader: R,
    tx: mpsc::Sender<Bytes>,
    zero_is_eof: bool,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match reader.read(&mut buf).await {
            Ok(0) if zero_is_eof => return,
            // A virtio-serial port with the host end closed: wait, do not spin.
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

async fn write_loop<W: tokio::io::AsyncWrite + Unpin>(
    mut writer: W,
    mut rx: mpsc::Receiver<Vec<u8>>,
) {
    while let Some(bytes) = rx.recv().await {
        if writer.write_all(&bytes).await.is_err() {
            return;
        }
        if rx.is_empty() && writer.flush().await.is_err() {
            return;
        }
    }
    let _ = writer.shutdown().await;
}
