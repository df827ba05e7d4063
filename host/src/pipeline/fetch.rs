//! `pep.http.request`, hop by hop: decide, resolve and guard (`guard.rs`) after the allow, connect to exactly
//! the permitted addresses (`upstream.rs`), send, stream the response under its cap, and treat every
//! redirect (`redirect.rs`) as a new hop that goes through the whole pipeline again; an upgraded connection
//! continues in `relay.rs`.

use crate::audit::records::{BodyDigest, Outcome};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, StatusCode};
use pexi_protocol::payload::{
    ErrorCode, ErrorPayload, HeaderField, HttpRequest, HttpResponseHead, RedirectMode, ResponseHead,
};
use serde_json::json;

use super::failure::RequestError;
use super::input::Asked;
use super::request::Prepared;
use super::target::Destination;
use super::upstream::UpstreamError;
use super::{Caller, Pipeline};
use crate::stream::{RequestBody, Responder};
use tokio_util::sync::CancellationToken;

const METHOD: &str = "pep.http.request";
/// The longest any request deadline may be (a century), so the timer arithmetic stays finite whatever
/// the config or the guest's `timeout_ms` says; an upgraded connection's is lifted at the 101 instead.
const NO_DEADLINE_MS: u64 = 100 * 365 * 86_400_000;
/// Request bodies up to this size are kept so a 307/308 redirect can send them again.
const REPLAY_LIMIT: usize = 1024 * 1024;

/// Why a request ended without its effect, and the hop's decision if one was made.
struct Failure {
    error: RequestError,
    decision_id: Option<String>,
}

impl<E: Into<RequestError>> From<E> for Failure {
    fn from(error: E) -> Self {
        Failure {
            error: error.into(),
            decision_id: None,
        }
    }
}

struct Done {
    status: u16,
    final_url: String,
    redirects: u32,
    response_bytes: u64,
    response_sha256: String,
    decision_id: String,
    /// Brokered secrets some hop carried, and those withheld from a hop on another origin (names).
    secrets_injected: Vec<String>,
    secrets_withheld: Vec<String>,
    /// For an upgraded connection: protocol, bytes each way, how long it lasted.
    upgrade: Option<serde_json::Value>,
}

/// The request body as the first hop streams it, with what a redirect needs to resend it.
#[derive(Default)]
struct BodyTap {
    sent: AtomicU64,
    /// SHA-256 of the bytes sent upstream: bodies are never logged, their digests are.
    hash: Mutex<sha2::Sha256>,
    too_large: AtomicBool,
    /// A copy for 307/308, dropped once it passes [`REPLAY_LIMIT`] or the session's buffer budget has no
    /// room for it (the redirect then fails; the upload never waits for memory for a copy).
    replay: Mutex<Option<ReplayCopy>>,
    complete: AtomicBool,
    /// The upstream answered 101: from here the connection is bound by idle time and byte caps, not by
    /// the request's deadline.
    switched: AtomicBool,
}

/// The request body kept for a redirect's replay, and what it holds against the buffer budget.
#[derive(Default)]
struct ReplayCopy {
    collected: Vec<u8>,
    /// The copy as sent again (once frozen, further hops share it).
    frozen: Option<Bytes>,
    _charges: Vec<crate::limits::budget::Charge>,
}

impl Pipeline {
    /// `pep.http.request`: the request's whole life, its deadline, and its outcome record.
    pub(super) async fn serve_http(
        &self,
        caller: Caller,
        params: HttpRequest,
        body: RequestBody,
        responder: Responder,
        cancel: CancellationToken,
    ) {
        // The whole-request deadline holds until the upstream switches protocols (101); an
        // upgraded connection then lives as long as it is used (idle timeout and byte caps bound
        // it). Asking for an upgrade lifts nothing: an upstream answering 200 is a request.
        let total = Duration::from_millis(
            params
                .timeout_ms
                .unwrap_or(u64::MAX)
                .min(self.config.pep.limits.total_timeout_ms)
                .min(NO_DEADLINE_MS),
        );
        let started = std::time::Instant::now();
        let tap = Arc::new(BodyTap {
            replay: Mutex::new(Some(ReplayCopy::default())),
            ..BodyTap::default()
        });
        // The latest hop's decision, so an outcome cut short by CANCEL or the deadline still names it.
        let decided = Arc::new(Mutex::new(None));
        let work = self.http_request(
            &caller,
            &params,
            body,
            &responder,
            tap.clone(),
            decided.clone(),
        );
        let deadline = async {
            tokio::time::sleep(total).await;
            if tap.switched.load(Ordering::Acquire) {
                std::future::pending::<()>().await;
            }
        };
        let result = tokio::select! {
            _ = cancel.cancelled() => Err(Failure::from(RequestError::Cancelled)),
            result = work => result,
            _ = deadline => Err(Failure::from(RequestError::Deadline(total))),
        };
        let request_body = BodyDigest {
            bytes: Some(tap.sent.load(Ordering::Relaxed)),
            sha256: Some(hex::encode(sha2::Digest::finalize(
                tap.hash.lock().unwrap_or_else(|p| p.into_inner()).clone(),
            ))),
            bytes_delivered: None,
        };
        let duration_ms = started.elapsed().as_millis() as u64;
        match result {
            Ok(done) => {
                let outcome = Outcome {
                    status: Some(done.status),
                    final_url: Some(done.final_url),
                    redirects: Some(done.redirects),
                    request_body: Some(request_body),
                    response_body: Some(BodyDigest {
                        bytes: Some(done.response_bytes),
                        sha256: Some(done.response_sha256),
                        bytes_delivered: None,
                    }),
                    secrets_injected: Some(done.secrets_injected),
                    secrets_withheld: Some(done.secrets_withheld),
                    upgrade: done.upgrade,
                    duration_ms: Some(duration_ms),
                    ..Outcome::default()
                };
                self.log_outcome(&caller, METHOD, Some(&done.decision_id), outcome);
                responder.end();
            }
            Err(failure) => {
                let decision_id = failure
                    .decision_id
                    .or_else(|| decided.lock().unwrap_or_else(|p| p.into_inner()).take());
                let mut error = ErrorPayload::from(failure.error);
                // What the guest got before the end: a stream cut by a shutdown or a reset
                // still says which status and how many bytes reached it.
                let progress = responder.progress();
                let code = match progress.ended_by() {
                    Some(why) if error.code == ErrorCode::Cancelled => why.as_str(),
                    _ => error.code.as_str(),
                };
                let outcome = Outcome {
                    error: Some(code.to_string()),
                    message: Some(error.message.clone()),
                    status: progress.status(),
                    response_body: Some(BodyDigest {
                        bytes_delivered: Some(responder.delivered()),
                        ..BodyDigest::default()
                    }),
                    request_body: Some(request_body),
                    duration_ms: Some(duration_ms),
                    ..Outcome::default()
                };
                self.log_outcome(&caller, METHOD, decision_id.as_deref(), outcome);
                // Whatever ended a request after its decision (a secret it may not use there, an
                // upstream failure), the guest gets the decision's id to find its audit record.
                if error.details.decision_id.is_none() {
                    error.details.decision_id = decision_id;
                }
                responder.error(error);
            }
        }
    }

    async fn http_request(
        &self,
        caller: &Caller,
        params: &HttpRequest,
        body: RequestBody,
        responder: &Responder,
        tap: Arc<BodyTap>,
        decided: Arc<Mutex<Option<String>>>,
    ) -> Result<Done, Failure> {
        let limits = &self.config.pep.limits;
        let mut prepared = self.prepare(caller, METHOD, params)?;
        if let Some(length) = prepared
            .content_length
            .filter(|n| *n > limits.max_request_bytes)
        {
            return Err(RequestError::BodyTooLarge {
                limit: limits.max_request_bytes,
                length: Some(length),
            }
            .into());
        }
        let mut guest_body =
            (carries_body(&prepared) || prepared.upgrade.is_some()).then_some(body);
        // An upgrade sends no body: the guest's DATA is the upgraded connection's, after the 101.
        let mut upgrade_body = None;
        if prepared.upgrade.is_some() {
            upgrade_body = guest_body.take();
        }
        let mut replay_body: Option<Bytes> = None;
        let mut previous: Option<url::Url> = None;
        let mut hop = 0u32;
        let first_origin = (
            prepared.target.url.scheme().to_string(),
            prepared.target.host.to_string(),
            prepared.target.port,
        );
        let mut secrets_injected: Vec<String> = Vec::new();
        let mut secrets_withheld: Vec<String> = Vec::new();
        loop {
            let logged = self
                .decide(
                    caller,
                    METHOD,
                    Asked::Http(&prepared),
                    hop,
                    previous.as_ref(),
                )
                .await?;
            let decision_id = logged.decision_id.clone();
            *decided.lock().unwrap_or_else(|p| p.into_inner()) = Some(decision_id.clone());
            let fail = |error: RequestError| Failure {
                error,
                decision_id: Some(decision_id.clone()),
            };
            if !logged.decision.allow {
                if logged.decision.ask.is_none() {
                    return Err(fail(Pipeline::denied(&logged)));
                }
                // Held here, before anything is resolved or sent, until a person answers.
                self.ask_person(&logged).await.map_err(fail)?;
            }
            // The body bound this hop's decision sets (an obligation), counted as the body streams:
            // an announced length over it is refused before anything is sent, an unannounced body is cut.
            let body_limit = logged
                .decision
                .max_body_bytes
                .map_or(limits.max_request_bytes, |max| {
                    max.min(limits.max_request_bytes)
                });
            let known = prepared
                .content_length
                .unwrap_or(0)
                .max(tap.sent.load(Ordering::Relaxed));
            if known > body_limit {
                return Err(fail(body_too_large(body_limit)));
            }
            // Secrets before DNS: a refused one means nothing at all is sent.
            let host = prepared.target.host.to_string();
            let hop_headers = self
                .secrets
                .resolve(
                    &crate::secrets::Hop {
                        method: &prepared.method,
                        host: &host,
                        origin: (prepared.target.url.scheme(), &host, prepared.target.port),
                        first_origin: (&first_origin.0, &first_origin.1, first_origin.2),
                        is_credential: &|name| self.redactor.is_secret_header(name),
                    },
                    &prepared.headers,
                    &prepared.secrets,
                    logged.decision.secrets.as_deref(),
                )
                .map_err(|refusal| fail(RequestError::Secret(refusal.0)))?;
            for (names, into) in [
                (&hop_headers.injected, &mut secrets_injected),
                (&hop_headers.withheld, &mut secrets_withheld),
            ] {
                for name in names {
                    if !into.contains(name) {
                        into.push(name.clone());
                    }
                }
            }
            let addrs = self
                .allowed_addresses(Destination::Http(&prepared.target), &decision_id)
                .await
                .map_err(|err| fail(err.into()))?;
            let client = self.http.pinned(&prepared.target, &addrs).map_err(&fail)?;
            let mut builder = client.request(prepared.method.clone(), prepared.target.url.clone());
            for (name, value) in hop_headers.headers {
                builder = builder.header(name, value);
            }
            if let Some(protocol) = &prepared.upgrade {
                builder = builder
                    .header(http::header::CONNECTION, "upgrade")
                    .header(http::header::UPGRADE, protocol.as_str());
            }
            if let Some(length) = prepared
                .content_length
                .filter(|_| prepared.upgrade.is_none())
            {
                builder = builder.header(http::header::CONTENT_LENGTH, length);
            }
            if let Some(body) = guest_body.take() {
                builder = builder.body(reqwest::Body::wrap_stream(body_stream(
                    body,
                    tap.clone(),
                    body_limit,
                    prepared.content_length,
                    responder.budget().clone(),
                )));
            } else if let Some(bytes) = replay_body.take() {
                builder = builder.body(bytes);
            }
            let response = builder.send().await.map_err(|err| {
                if tap.too_large.load(Ordering::Relaxed) {
                    fail(body_too_large(body_limit))
                } else {
                    fail(UpstreamError::classify(&err).into())
                }
            })?;
            let status = response.status();
            let location = response
                .headers()
                .get(http::header::LOCATION)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            // An upgrade's redirect is answered as it is: following would replay a handshake elsewhere.
            let redirect_mode = if prepared.upgrade.is_some() {
                RedirectMode::Manual
            } else {
                prepared.redirect
            };
            if let (true, Some(location)) = (status.is_redirection(), location) {
                match redirect_mode {
                    RedirectMode::Manual => {}
                    RedirectMode::Error => {
                        return Err(fail(RequestError::RedirectRefused { status, location }));
                    }
                    RedirectMode::Follow => {
                        if hop >= limits.max_redirects {
                            return Err(fail(RequestError::TooManyRedirects {
                                limit: limits.max_redirects,
                            }));
                        }
                        let next =
                            super::redirect::next_hop(&prepared, status, &location, |name| {
                                self.redactor.is_secret_header(name)
                            })
                            .map_err(|err| fail(err.into()))?;
                        if carries_body(&next) && next.method == prepared.method {
                            replay_body = Some(replayable(&tap).map_err(&fail)?);
                        }
                        previous = Some(prepared.target.url.clone());
                        prepared = next;
                        hop += 1;
                        continue;
                    }
                }
            }
            let head = HttpResponseHead {
                status: status.as_u16(),
                headers: response_headers(response.headers()),
                final_url: prepared.target.url.to_string(),
                redirect_count: hop,
                decision_id: logged.decision_id.clone(),
            };
            let switching = status == StatusCode::SWITCHING_PROTOCOLS && prepared.upgrade.is_some();
            if switching {
                tap.switched.store(true, Ordering::Release);
            }
            let head = if switching {
                // The guest's client checks the handshake: it needs the pair a 101 carries.
                let mut head = head;
                if let Some(protocol) = &prepared.upgrade {
                    head.headers.push(HeaderField::new("connection", "upgrade"));
                    head.headers
                        .push(HeaderField::new("upgrade", protocol.as_str()));
                }
                head
            } else {
                head
            };
            if switching {
                responder
                    .head(ResponseHead::Http(head))
                    .map_err(|refused| fail(RequestError::head_refused(refused, Some(status))))?;
                let upgraded = response
                    .upgrade()
                    .await
                    .map_err(|err| fail(UpstreamError::classify(&err).into()))?;
                let started = std::time::Instant::now();
                let relayed = self
                    .relay_upgraded(upgraded, upgrade_body.take(), responder)
                    .await;
                let (to_upstream, to_guest) = relayed.map_err(&fail)?;
                return Ok(Done {
                    status: status.as_u16(),
                    final_url: self.redactor.url(&prepared.target.url),
                    redirects: hop,
                    response_bytes: to_guest,
                    response_sha256: String::new(),
                    decision_id: logged.decision_id,
                    secrets_injected,
                    secrets_withheld,
                    upgrade: Some(json!({
                        "protocol": prepared.upgrade,
                        "bytes_to_upstream": to_upstream,
                        "bytes_to_guest": to_guest,
                        "duration_ms": started.elapsed().as_millis() as u64,
                    })),
                });
            }
            let (response_bytes, response_sha256) = self
                .stream_response(response, ResponseHead::Http(head), status, responder)
                .await
                .map_err(&fail)?;
            return Ok(Done {
                status: status.as_u16(),
                final_url: self.redactor.url(&prepared.target.url),
                redirects: hop,
                response_bytes,
                response_sha256,
                decision_id: logged.decision_id,
                secrets_injected,
                secrets_withheld,
                upgrade: None,
            });
        }
    }

    /// Sends the head, then forwards the response body as it arrives, up to the cap; returns the bytes
    /// forwarded.
    async fn stream_response(
        &self,
        mut response: reqwest::Response,
        head: ResponseHead,
        status: StatusCode,
        responder: &Responder,
    ) -> Result<(u64, String), RequestError> {
        use futures_util::FutureExt;
        use sha2::Digest;
        let limits = &self.config.pep.limits;
        let idle = Duration::from_millis(limits.idle_timeout_ms);
        let mut total: u64 = 0;
        let mut hash = sha2::Sha256::new();
        // hyper hands a response's first body bytes over a scheduler round or two after its head, even
        // when they came in the same packet. Waiting those rounds (never longer: a stream or a slow upstream
        // does not hold the head back) lets HEAD, DATA and END of a small response reach the guest in one
        // burst it reads at once, instead of one wake-up and read each. `chunk` may be dropped unfinished:
        // an unready body gives up nothing.
        let mut first = None;
        for _ in 0..FIRST_BYTES_ROUNDS {
            first = response.chunk().now_or_never();
            if first.is_some() {
                break;
            }
            tokio::task::yield_now().await;
        }
        responder
            .head(head)
            .map_err(|refused| RequestError::head_refused(refused, Some(status)))?;
        loop {
            let next = match first.take() {
                Some(ready) => Ok(ready),
                None => tokio::time::timeout(idle, response.chunk()).await,
            };
            let chunk = match next {
                Err(_) => return Err(RequestError::ResponseIdle(idle)),
                Ok(Err(err)) => return Err(UpstreamError::classify(&err).into()),
                Ok(Ok(None)) => return Ok((total, hex::encode(hash.finalize()))),
                Ok(Ok(Some(chunk))) => chunk,
            };
            let room = limits.max_response_bytes.saturating_sub(total);
            let over = chunk.len() as u64 > room;
            let chunk = if over {
                chunk.slice(..room as usize)
            } else {
                chunk
            };
            total += chunk.len() as u64;
            hash.update(&chunk);
            responder.data(chunk).await?;
            if over {
                return Err(RequestError::ResponseTooLarge {
                    limit: limits.max_response_bytes,
                });
            }
        }
    }
}

/// How many scheduler rounds the head waits for the body's first bytes ([`Pipeline::stream_response`]).
const FIRST_BYTES_ROUNDS: usize = 2;

/// Whether the guest's body goes upstream: when it announced one, or may send one without a length.
fn carries_body(prepared: &Prepared) -> bool {
    match prepared.content_length {
        Some(n) => n > 0,
        None => !matches!(
            prepared.method,
            Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::DELETE
        ),
    }
}

fn body_too_large(limit: u64) -> RequestError {
    RequestError::BodyTooLarge {
        limit,
        length: None,
    }
}

/// The guest's body as a stream for the first hop: counted against the cap, copied for a possible replay.
/// With a known length the HTTP client stops polling after that many bytes, so reaching it is the end too.
fn body_stream(
    body: RequestBody,
    tap: Arc<BodyTap>,
    limit: u64,
    expected: Option<u64>,
    budget: crate::limits::budget::SessionBudget,
) -> impl futures_util::Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static {
    futures_util::stream::unfold(Some(body), move |body| {
        let tap = tap.clone();
        let budget = budget.clone();
        async move {
            let mut body = body?;
            match body.next().await {
                None => {
                    tap.complete.store(true, Ordering::Relaxed);
                    None
                }
                Some(chunk) => {
                    let sent = tap.sent.fetch_add(chunk.len() as u64, Ordering::Relaxed)
                        + chunk.len() as u64;
                    if sent > limit {
                        tap.too_large.store(true, Ordering::Relaxed);
                        return Some((Err(std::io::Error::other("request body too large")), None));
                    }
                    sha2::Digest::update(
                        &mut *tap.hash.lock().unwrap_or_else(|p| p.into_inner()),
                        &chunk,
                    );
                    let mut replay = tap.replay.lock().unwrap_or_else(|p| p.into_inner());
                    let room = replay
                        .as_ref()
                        .filter(|copy| copy.collected.len() + chunk.len() <= REPLAY_LIMIT)
                        .and_then(|_| budget.try_acquire(chunk.len()));
                    match (room, replay.as_mut()) {
                        (Some(charge), Some(copy)) => {
                            copy.collected.extend_from_slice(&chunk);
                            copy._charges.push(charge);
                        }
                        _ => *replay = None,
                    }
                    drop(replay);
                    if expected == Some(sent) {
                        tap.complete.store(true, Ordering::Relaxed);
                    }
                    Some((Ok(chunk), Some(body)))
                }
            }
        }
    })
}

fn replayable(tap: &BodyTap) -> Result<Bytes, RequestError> {
    let mut replay = tap.replay.lock().unwrap_or_else(|p| p.into_inner());
    match (tap.complete.load(Ordering::Relaxed), replay.as_mut()) {
        (true, Some(copy)) => Ok(copy
            .frozen
            .get_or_insert_with(|| Bytes::from(std::mem::take(&mut copy.collected)))
            .clone()),
        _ => Err(RequestError::NoReplay {
            limit: REPLAY_LIMIT,
        }),
    }
}

/// Response headers for the guest, minus the ones that describe this connection and any `x-pexi-*`:
/// those mark pexi's own answers (a refusal's `x-pexi-error`, `x-pexi-decision`), and an upstream must not
/// be able to forge a refusal, or hide a response behind one, in the eyes of the guest's programs.
fn response_headers(headers: &http::HeaderMap) -> Vec<HeaderField> {
    headers
        .iter()
        .filter(|(name, _)| {
            !matches!(
                name.as_str(),
                "connection" | "keep-alive" | "transfer-encoding" | "proxy-connection" | "upgrade"
            ) && !name.as_str().starts_with("x-pexi-")
        })
        .map(|(name, value)| HeaderField::new(name.as_str(), value.as_bytes().to_vec()))
        .collect()
}
