//! The native half of `@pexi/guest`: a thin N-API layer over the `pexi-guest` async client.
//!
//! Everything that can wait runs on napi-rs's tokio runtime and comes back to JavaScript as a promise, so
//! the addon never blocks Node's event loop. Failures the guest is meant to read (a policy denial, an
//! unreachable PEP, an upstream timeout) resolve as values carrying an [`ErrorInfo`] rather than
//! rejecting: the JavaScript side turns them into the `TypeError('fetch failed', { cause })` that Node's
//! own `fetch` throws, with pexi's code, reasons and retryable flag in the cause. The fetch semantics
//! themselves (Request parsing, Response building, AbortSignal) live in `fetch.js`.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use futures_util::FutureExt;
use napi::bindgen_prelude::{within_runtime_if_available, Buffer};
use napi_derive::napi;
use pexi_guest::{Client, Endpoint, Error, Options, RedirectMode, Response};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

/// How many body chunks JavaScript may hand over ahead of the upload; the SDK adds its own window.
const BODY_QUEUE: usize = 4;

/// Why a call failed, in the shape the JavaScript side puts in `error.cause`.
#[napi(object)]
pub struct ErrorInfo {
    /// The stable code: the protocol's (`policy_denied`, `blocked_address`, ...) or the SDK's
    /// (`endpoint`, `connect`, `closed`, `body`), or `aborted`.
    pub code: String,
    pub message: String,
    pub retryable: bool,
    /// The policy's reasons, for `policy_denied`.
    pub reasons: Vec<String>,
    /// The audit record of the decision, when there was one.
    pub decision_id: Option<String>,
}

impl From<&Error> for ErrorInfo {
    fn from(error: &Error) -> Self {
        ErrorInfo {
            code: error.code().to_string(),
            message: error.to_string(),
            retryable: error.retryable(),
            reasons: error.reasons().to_vec(),
            decision_id: error.decision_id().map(str::to_string),
        }
    }
}

fn aborted() -> ErrorInfo {
    ErrorInfo {
        code: "aborted".to_string(),
        message: "the request was aborted".to_string(),
        retryable: false,
        reasons: Vec::new(),
        decision_id: None,
    }
}

/// The response head.
#[napi(object)]
pub struct Head {
    pub status: u32,
    /// Flattened `[name, value, name, value, ...]` in arrival order; values are the header's bytes as
    /// latin-1 characters, the ByteString form the Fetch standard's `Headers` holds.
    pub headers: Vec<String>,
    /// The URL that produced the response, after redirects.
    pub url: String,
    pub redirect_count: u32,
    pub decision_id: String,
}

/// Either a head or why there is none.
#[napi(object)]
pub struct HeadResult {
    pub head: Option<Head>,
    pub error: Option<ErrorInfo>,
    /// Body bytes that had already arrived with the head (a small response is often all there): saves
    /// `read` round trips through the event loop. `read` continues after them.
    pub body: Option<Buffer>,
    /// The body ended within `body`: no `read` is needed (one would say done).
    pub ended: bool,
}

/// One step of reading a body: a chunk, the end (`done`), or an error after the data before it.
#[napi(object)]
pub struct ChunkResult {
    pub chunk: Option<Buffer>,
    pub done: bool,
    pub error: Option<ErrorInfo>,
}

/// The answer of `pep.policy.check`.
#[napi(object)]
pub struct Decision {
    pub allow: bool,
    pub reasons: Vec<String>,
    pub decision_id: String,
}

#[napi(object)]
pub struct DecisionResult {
    pub decision: Option<Decision>,
    pub error: Option<ErrorInfo>,
}

/// What JavaScript passes to start a request.
#[napi(object)]
pub struct RequestOptions {
    pub method: String,
    pub url: String,
    /// Flattened `[name, value, ...]`; values are ByteStrings (each char one byte).
    pub headers: Vec<String>,
    /// `follow`, `manual` or `error`.
    pub redirect: String,
    /// `none`: no body; `bytes`: `body` holds it all; `stream`: chunks follow through `Call.write`.
    pub body_kind: String,
    pub body: Option<Buffer>,
    pub timeout_ms: Option<u32>,
}

/// Tuning of the session's connection task.
#[napi(object)]
pub struct SessionOptions {
    /// How long a request waits for the PEP to be reachable before failing with `connect` (10 s).
    pub connect_timeout_ms: Option<u32>,
    /// How often an idle session is PINGed to notice a PEP that went away (15 s).
    pub keepalive_ms: Option<u32>,
}

/// One shared protocol session with the PEP. All calls of a process multiplex over it.
#[napi]
pub struct Session {
    client: Client,
    endpoint: String,
}

#[napi]
impl Session {
    /// A session with the PEP at `endpoint` (`unix:PATH`, `virtio:NAME`, `vsock:CID:PORT`), or at
    /// `PEXI_ENDPOINT` / the default virtio port when omitted. Connecting happens on first use.
    #[napi(factory)]
    pub fn open(
        endpoint: Option<String>,
        options: Option<SessionOptions>,
    ) -> napi::Result<Session> {
        let endpoint = match endpoint {
            Some(text) => text.parse::<Endpoint>(),
            None => Endpoint::from_env(),
        }
        .map_err(|error| napi::Error::from_reason(format!("{error}")))?;
        let name = endpoint.to_string();
        // The client's connection task is spawned on the runtime napi-rs drives async fns with.
        let mut tuning = Options::default();
        if let Some(ms) = options.as_ref().and_then(|o| o.connect_timeout_ms) {
            tuning.connect_timeout = Duration::from_millis(u64::from(ms));
        }
        if let Some(ms) = options.as_ref().and_then(|o| o.keepalive_ms) {
            tuning.keepalive = Duration::from_millis(u64::from(ms.max(100)));
        }
        let client =
            within_runtime_if_available(|| Client::with_connector(Arc::new(endpoint), tuning));
        Ok(Session {
            client,
            endpoint: name,
        })
    }

    /// The endpoint this session talks to.
    #[napi(getter)]
    pub fn endpoint(&self) -> String {
        self.endpoint.clone()
    }

    /// Starts a request; the head comes from `Call.head()`.
    #[napi]
    pub fn request(&self, options: RequestOptions) -> napi::Result<Call> {
        let redirect = match options.redirect.as_str() {
            "follow" => RedirectMode::Follow,
            "manual" => RedirectMode::Manual,
            "error" => RedirectMode::Error,
            other => {
                return Err(napi::Error::from_reason(format!(
                    "redirect mode {other:?} is not follow, manual or error"
                )))
            }
        };
        let mut builder = self
            .client
            .request(&options.method, &options.url)
            .redirect(redirect);
        for pair in options.headers.chunks(2) {
            if let [name, value] = pair {
                builder = builder.header(name, byte_string(value)?);
            }
        }
        if let Some(ms) = options.timeout_ms {
            builder = builder.timeout(Duration::from_millis(u64::from(ms)));
        }
        let mut body_sender = None;
        match options.body_kind.as_str() {
            "none" => {}
            "bytes" => {
                let body = options.body.map(|b| b.to_vec()).unwrap_or_default();
                builder = builder.body(body);
            }
            "stream" => {
                let (sender, receiver) = mpsc::channel::<Result<Bytes, std::io::Error>>(BODY_QUEUE);
                builder = builder.body_stream(None, ReceiverStream(receiver));
                body_sender = Some(sender);
            }
            other => {
                return Err(napi::Error::from_reason(format!(
                    "body kind {other:?} is not none, bytes or stream"
                )))
            }
        }

        let cancel = CancellationToken::new();
        let (head_sender, head_receiver) = oneshot::channel();
        let task_cancel = cancel.clone();
        within_runtime_if_available(|| {
            tokio::spawn(async move {
                // Dropping the send future on cancel sends CANCEL for the stream.
                tokio::select! {
                    result = builder.send() => { let _ = head_sender.send(result); }
                    () = task_cancel.cancelled() => {}
                }
            })
        });
        Ok(Call {
            inner: Arc::new(CallInner {
                cancel,
                body: Mutex::new(body_sender),
                head: tokio::sync::Mutex::new(Some(head_receiver)),
                response: tokio::sync::Mutex::new(None),
                failure: Mutex::new(None),
            }),
        })
    }

    /// Asks the policy about a request without performing it.
    #[napi]
    pub async fn check(&self, method: String, url: String) -> DecisionResult {
        match self.client.check(&method, &url).await {
            Ok(decision) => DecisionResult {
                decision: Some(Decision {
                    allow: decision.allow,
                    reasons: decision.reasons,
                    decision_id: decision.decision_id,
                }),
                error: None,
            },
            Err(error) => DecisionResult {
                decision: None,
                error: Some(ErrorInfo::from(&error)),
            },
        }
    }
}

/// A header value from JavaScript: a ByteString, so every char must fit in a byte.
fn byte_string(value: &str) -> napi::Result<Vec<u8>> {
    value
        .chars()
        .map(|c| u8::try_from(u32::from(c)).ok())
        .collect::<Option<Vec<u8>>>()
        .ok_or_else(|| {
            napi::Error::from_reason(format!("header value {value:?} is not a ByteString"))
        })
}

fn latin1(bytes: &[u8]) -> String {
    bytes.iter().map(|&b| char::from(b)).collect()
}

/// A `Stream` over an mpsc receiver (what `tokio-stream`'s wrapper does, without its dependency).
struct ReceiverStream(mpsc::Receiver<Result<Bytes, std::io::Error>>);

impl futures_util::Stream for ReceiverStream {
    type Item = Result<Bytes, std::io::Error>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        self.0.poll_recv(cx)
    }
}

struct CallInner {
    cancel: CancellationToken,
    body: Mutex<Option<mpsc::Sender<Result<Bytes, std::io::Error>>>>,
    head: tokio::sync::Mutex<Option<oneshot::Receiver<Result<Response, Error>>>>,
    response: tokio::sync::Mutex<Option<Response>>,
    /// A body error met while gathering ready chunks: reported by the next `read`, after the data.
    failure: Mutex<Option<ErrorInfo>>,
}

/// `read` hands JavaScript every chunk that has already arrived, up to this many bytes, in one Buffer:
/// each `read` is a promise settled through the event loop (~0.15 ms), paid per 64 KiB frame before.
const READ_GATHER: usize = 1024 * 1024;

impl CallInner {
    /// Appends to `gathered` the body chunks that have already arrived, up to [`READ_GATHER`] bytes,
    /// without waiting. At the end of the body the response is dropped (the next `read` says done); an
    /// error is kept for the next `read`, after the data.
    fn gather(&self, response: &mut Option<Response>, mut gathered: Vec<u8>) -> Vec<u8> {
        while gathered.len() < READ_GATHER {
            let Some(body) = response.as_mut() else { break };
            match body.chunk().now_or_never() {
                Some(Ok(Some(more))) => gathered.extend_from_slice(&more),
                Some(Ok(None)) => {
                    response.take();
                }
                Some(Err(error)) => {
                    response.take();
                    *self.failure.lock().unwrap_or_else(PoisonError::into_inner) =
                        Some(ErrorInfo::from(&error));
                }
                None => break,
            }
        }
        gathered
    }

    fn body_sender(&self) -> Option<mpsc::Sender<Result<Bytes, std::io::Error>>> {
        self.body
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// One request in flight. Cancelling it (or aborting from JavaScript) sends CANCEL to the PEP, which
/// stops the upstream request.
#[napi]
pub struct Call {
    inner: Arc<CallInner>,
}

#[napi]
impl Call {
    /// Queues a chunk of a streamed request body; resolves when there is room for the next one.
    /// `false` means the request already ended (answered, failed or cancelled): stop producing.
    #[napi]
    pub async fn write(&self, chunk: Buffer) -> bool {
        let data = Bytes::copy_from_slice(&chunk);
        let Some(sender) = self.inner.body_sender() else {
            return false;
        };
        tokio::select! {
            sent = sender.send(Ok(data)) => sent.is_ok(),
            () = self.inner.cancel.cancelled() => false,
        }
    }

    /// Ends a streamed request body.
    #[napi]
    pub fn finish(&self) {
        self.inner
            .body
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
    }

    /// Fails a streamed request body (the JavaScript stream errored): the request fails with `body`.
    #[napi]
    pub fn fail_body(&self, message: String) {
        if let Some(sender) = self
            .inner
            .body
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        {
            let _ = sender.try_send(Err(std::io::Error::other(message)));
        }
    }

    /// Waits for the response head.
    #[napi]
    pub async fn head(&self) -> HeadResult {
        let failed = |error: ErrorInfo| HeadResult {
            head: None,
            error: Some(error),
            body: None,
            ended: false,
        };
        let Some(receiver) = self.inner.head.lock().await.take() else {
            return failed(ErrorInfo {
                code: "closed".to_string(),
                message: "the head was already taken".to_string(),
                retryable: false,
                reasons: Vec::new(),
                decision_id: None,
            });
        };
        let result = tokio::select! {
            result = receiver => result,
            () = self.inner.cancel.cancelled() => return failed(aborted()),
        };
        match result {
            Ok(Ok(response)) => {
                let head = Head {
                    status: u32::from(response.status()),
                    headers: response
                        .headers()
                        .iter()
                        .flat_map(|h| [h.name().to_string(), latin1(h.value())])
                        .collect(),
                    url: response.final_url().to_string(),
                    redirect_count: response.redirect_count(),
                    decision_id: response.decision_id().to_string(),
                };
                let mut guard = self.inner.response.lock().await;
                *guard = Some(response);
                if self.inner.cancel.is_cancelled() {
                    guard.take();
                }
                let body = self.inner.gather(&mut guard, Vec::new());
                HeadResult {
                    head: Some(head),
                    error: None,
                    body: (!body.is_empty()).then(|| Buffer::from(body)),
                    // An error met while gathering is not an end: the next `read` reports it.
                    ended: guard.is_none()
                        && !self.inner.cancel.is_cancelled()
                        && self
                            .inner
                            .failure
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .is_none(),
                }
            }
            Ok(Err(error)) => failed(ErrorInfo::from(&error)),
            // The request task ended without an answer: it was cancelled.
            Err(_) => failed(aborted()),
        }
    }

    /// Reads the next piece of the response body.
    #[napi]
    pub async fn read(&self) -> ChunkResult {
        if let Some(error) = self
            .inner
            .failure
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        {
            return chunk_error(error);
        }
        let mut guard = self.inner.response.lock().await;
        let Some(response) = guard.as_mut() else {
            return if self.inner.cancel.is_cancelled() {
                chunk_error(aborted())
            } else {
                ChunkResult {
                    chunk: None,
                    done: true,
                    error: None,
                }
            };
        };
        let step = tokio::select! {
            step = response.chunk() => step,
            () = self.inner.cancel.cancelled() => {
                guard.take();
                return chunk_error(aborted());
            }
        };
        match step {
            Ok(Some(chunk)) => {
                let gathered = self.inner.gather(&mut guard, chunk.to_vec());
                ChunkResult {
                    chunk: Some(Buffer::from(gathered)),
                    done: false,
                    error: None,
                }
            }
            Ok(None) => {
                guard.take();
                ChunkResult {
                    chunk: None,
                    done: true,
                    error: None,
                }
            }
            Err(error) => {
                guard.take();
                chunk_error(ErrorInfo::from(&error))
            }
        }
    }

    /// Cancels the request: the PEP gets CANCEL and stops the upstream; pending reads end `aborted`.
    #[napi]
    pub fn cancel(&self) {
        self.inner.cancel.cancel();
        self.finish();
        // Drop an idle response now; a read in progress drops it when it sees the cancellation.
        if let Ok(mut response) = self.inner.response.try_lock() {
            within_runtime_if_available(|| response.take());
        }
    }
}

fn chunk_error(error: ErrorInfo) -> ChunkResult {
    ChunkResult {
        chunk: None,
        done: false,
        error: Some(error),
    }
}
