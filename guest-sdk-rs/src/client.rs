//! The async client. One connection task owns the transport and the protocol session and multiplexes every
//! request over it; [`Client`] handles are cheap to clone and only send it commands.
//!
//! The task reconnects when the transport fails and starts a new session (HELLO) when the host lost the
//! old one; requests in flight at that moment fail with `session_reset` and are never replayed, and new
//! requests wait for the new session. Keepalive PINGs find a host that went quiet (a virtio-serial port
//! gives no disconnect signal); the session resynchronises on its own after garbage on the stream.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use pexi_protocol::io::{self, Ended, Handler, Inbound, Link, StreamIn, StreamOut};
use pexi_protocol::payload::{
    ErrorCode, HeaderField, HttpRequest, HttpResponseHead, MethodCall, NetConnect, NetConnectHead,
    PolicyDecision, RedirectMode, ResponseHead,
};
use pexi_protocol::session::{Config as SessionConfig, Event, Session};
use tokio::sync::{mpsc, oneshot};

use crate::endpoint::{Connector, Endpoint};
use crate::Error;

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
    commands: mpsc::UnboundedSender<Open>,
}

/// A request for a stream; the connection task answers once the session has room for it.
struct Open {
    call: MethodCall,
    reply: oneshot::Sender<Result<(StreamIn, StreamOut), Error>>,
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
        stream.end();
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
            .send(Open { call, reply })
            .map_err(|_| Error::Closed)?;
        let (input, output) = answer.await.map_err(|_| Error::Closed)??;
        Ok(StreamHandle {
            input,
            output,
            finished: false,
        })
    }
}

/// One open request on the client side; cancels the stream when dropped unfinished.
struct StreamHandle {
    input: StreamIn,
    output: StreamOut,
    finished: bool,
}

impl StreamHandle {
    /// Queues `data` for the PEP; `false` when the stream has already ended (the PEP answered or failed
    /// it), so an uploader stops producing a body nobody will read.
    async fn send(&mut self, data: Bytes) -> Result<bool, Error> {
        Ok(self.output.data(data).await.is_ok())
    }

    fn end(&mut self) {
        // A stream that is gone already has its answer (or its failure) waiting for the reader.
        let _ = self.output.end();
    }

    /// The next thing the host sent; the credit of DATA goes back as it is taken.
    async fn next(&mut self) -> Result<Option<Inbound>, Error> {
        if self.finished {
            return Ok(None);
        }
        let inbound = self.input.next().await;
        match &inbound {
            Inbound::End(_) => self.finished = true,
            Inbound::Failed { error, .. } => {
                self.finished = true;
                return Err(Error::Pep(error.clone()));
            }
            Inbound::Head(_) | Inbound::Data(_) => {}
        }
        Ok(Some(inbound))
    }

    /// The next piece of the host's bytes, `None` at their end.
    async fn read(&mut self) -> Result<Option<Bytes>, Error> {
        match self.next().await? {
            Some(Inbound::Data(data)) => Ok(Some(data)),
            None | Some(Inbound::End(_)) => Ok(None),
            Some(Inbound::Head(_)) => Err(Error::Pep(pexi_protocol::payload::ErrorPayload::new(
                ErrorCode::ProtocolError,
                "a second HEAD",
            ))),
            Some(Inbound::Failed { error, .. }) => Err(Error::Pep(error)),
        }
    }

    /// Waits for the stream's HEAD; `what` names the call for the error when something else comes.
    async fn head(&mut self, what: &str) -> Result<ResponseHead, Error> {
        match self.next().await? {
            Some(Inbound::Head(head)) => Ok(head),
            _ => Err(unexpected(what)),
        }
    }

    fn sender(&self) -> UpgradeSender {
        UpgradeSender {
            output: self.output.clone(),
            ended: false,
        }
    }
}

impl Drop for StreamHandle {
    fn drop(&mut self) {
        if !self.finished {
            self.output.cancel();
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
        stream.end();
        match stream.head("an HTTP request").await? {
            ResponseHead::Http(head) => Ok(Response { head, stream }),
            _ => Err(unexpected("an HTTP request")),
        }
    }
}

/// The guest's direction of an upgraded connection (see [`RequestBuilder::upgrade`]). Dropping it ends
/// that direction, as [`UpgradeSender::finish`] does.
pub struct UpgradeSender {
    output: StreamOut,
    ended: bool,
}

impl UpgradeSender {
    /// Sends bytes to the upstream, waiting for flow-control room; `false` when the connection has
    /// already ended (the upstream closed or the PEP failed it).
    pub async fn send(&mut self, data: Bytes) -> Result<bool, Error> {
        Ok(self.output.data(data).await.is_ok())
    }

    /// Ends the guest's direction (the upstream sees a half-close); the other keeps flowing.
    pub fn finish(&mut self) -> Result<(), Error> {
        if self.ended {
            return Ok(());
        }
        self.ended = true;
        let _ = self.output.end();
        Ok(())
    }
}

impl Drop for UpgradeSender {
    fn drop(&mut self) {
        let _ = self.finish();
    }
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
        match self.stream.next().await? {
            Some(Inbound::Head(head)) => Ok(Some(RawEvent::Head(head))),
            Some(Inbound::Data(data)) => Ok(Some(RawEvent::Data(data))),
            None | Some(Inbound::End(_)) => Ok(None),
            Some(Inbound::Failed { error, .. }) => Err(Error::Pep(error)),
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
        self.stream.input.buffered()
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
// The connection task: connects when a request needs it, and runs the protocol driver with [`Guest`] as
// its handler until the connection is lost (then it connects again) or every `Client` is gone.

/// An open waiting for a session, and since when.
type Waiting = (Open, tokio::time::Instant);

struct Connection {
    connector: Arc<dyn Connector>,
    options: Options,
    commands: mpsc::UnboundedReceiver<Open>,
    guest: Guest,
}

impl Connection {
    fn new(
        connector: Arc<dyn Connector>,
        options: Options,
        commands: mpsc::UnboundedReceiver<Open>,
    ) -> Connection {
        Connection {
            connector,
            options,
            commands,
            guest: Guest::default(),
        }
    }

    async fn run(mut self) {
        let mut backoff = Duration::from_millis(50);
        loop {
            // Connect only when a request waits for it.
            if self.guest.waiting.is_empty() {
                match self.commands.recv().await {
                    Some(open) => self.guest.waiting.push((open, tokio::time::Instant::now())),
                    None => return,
                }
                continue;
            }
            match self.connector.connect().await {
                Ok(transport) => {
                    backoff = Duration::from_millis(50);
                    let options = io::Options {
                        keepalive: Some(self.options.keepalive),
                        zero_read_is_eof: self.connector.zero_read_is_eof(),
                        ..io::Options::default()
                    };
                    let ended = io::drive(
                        transport,
                        new_session(),
                        &mut self.guest,
                        Some(&mut self.commands),
                        &options,
                    )
                    .await;
                    if ended == Ended::Dropped {
                        return;
                    }
                }
                Err(err) => {
                    let now = tokio::time::Instant::now();
                    let timeout = self.options.connect_timeout;
                    let endpoint = self.connector.describe();
                    let (expired, waiting): (Vec<_>, Vec<_>) =
                        std::mem::take(&mut self.guest.waiting)
                            .into_iter()
                            .partition(|(_, since)| now.duration_since(*since) >= timeout);
                    self.guest.waiting = waiting;
                    for (open, _) in expired {
                        let _ = open.reply.send(Err(Error::Connect {
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
}

fn new_session() -> Session {
    Session::client(SessionConfig::new("pexi-guest", env!("CARGO_PKG_VERSION")))
}

/// The guest's side of a connection: opens requests as the PEP's stream limit allows, and starts a new
/// session when the PEP lost the old one.
#[derive(Default)]
struct Guest {
    /// Opens that wait for a session, or for room under the PEP's stream limit.
    waiting: Vec<Waiting>,
    /// Set by this step's events, acted on after them.
    restart: bool,
    refused: bool,
}

impl Handler for Guest {
    type Command = Open;

    fn command(&mut self, link: &mut Link, open: Open) {
        self.waiting.push((open, tokio::time::Instant::now()));
        self.open_waiting(link);
    }

    fn event(&mut self, link: &mut Link, event: Event) {
        match event {
            Event::Established(info) => {
                tracing::debug!(session = info.session_id, "session established");
            }
            Event::End { stream_id, .. } => {
                let session = link.session_mut();
                // A stream the guest still had open (an upgraded connection whose upstream closed first):
                // the host reads nothing more, so end the guest's side too, or both sessions would keep a
                // half-open stream (and its concurrency slot) forever.
                if session.is_sending(stream_id) {
                    session.discard_unsent(stream_id);
                    let _ = session.write_end(stream_id, Vec::new());
                }
                // Nothing more arrives on this stream, so none of its bytes need credit any more: release
                // everything the session holds for it (unread bytes, and read bytes whose release is still
                // on its way), so the session finishes it now and the connection window gets all of it
                // back.
                session.release(stream_id, usize::MAX);
                link.detach(stream_id);
            }
            Event::PeerError(error) if error.code == ErrorCode::SessionReset => self.restart = true,
            Event::Refused(error) => {
                self.refused = true;
                for (open, _) in std::mem::take(&mut self.waiting) {
                    let _ = open.reply.send(Err(Error::Pep(error.clone())));
                }
            }
            Event::Closed => self.restart = true,
            // A graceful GOAWAY: the streams it names run on, nothing new opens (open_waiting) and the
            // connection ends once they are done (after). One over a protocol error is followed by Closed.
            Event::GoAway(_)
            | Event::PeerError(_)
            | Event::Rejected { .. }
            | Event::Pong(_)
            | Event::Resynced
            | Event::Opened { .. }
            | Event::Head { .. }
            | Event::Data { .. }
            | Event::StreamFailed { .. }
            | Event::SendCapacity { .. }
            | Event::Writable { .. } => {}
        }
    }

    fn after(&mut self, link: &mut Link) {
        if std::mem::take(&mut self.refused) {
            // The requests that waited have their answer; a new HELLO now would only be refused again, so
            // the next request connects afresh.
            self.restart = false;
            link.close();
        } else if std::mem::take(&mut self.restart) {
            link.restart(new_session(), "the PEP lost the session");
        } else {
            self.open_waiting(link);
            let session = link.session();
            if session.peer_going_away()
                && session.active_streams() == 0
                && !session.has_pending_transmit()
            {
                // The host's GOAWAY has been honoured: every stream it promised has finished. Requests
                // that came meanwhile wait for a new connection (a restarted host, or another one).
                link.abort();
            }
        }
    }

    fn ended(&mut self, link: &mut Link, why: Ended) {
        // What this connection's events asked for dies with it; the next one starts clean.
        self.restart = false;
        self.refused = false;
        if why == Ended::Lost {
            tracing::warn!("the connection to the PEP was lost; the next request connects again");
        }
        link.fail_all("the connection to the PEP was lost");
    }
}

impl Guest {
    /// Opens waiting requests while the session has room under the PEP's stream limit; the rest wait for
    /// a stream to finish.
    fn open_waiting(&mut self, link: &mut Link) {
        let session = link.session();
        if !session.is_established() || session.peer_going_away() {
            return;
        }
        let limit = session
            .info()
            .map_or(0, |info| info.limits.max_concurrent_streams as usize);
        while !self.waiting.is_empty() && link.session().active_streams() < limit {
            let (Open { call, reply }, _) = self.waiting.remove(0);
            match link.session_mut().open(call) {
                Ok(id) => {
                    if let Err(Ok(handles)) = reply.send(Ok(link.attach(id))) {
                        // The caller gave up before the stream opened.
                        drop(handles);
                        link.cancel(id);
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
    }
}
