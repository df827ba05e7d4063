//! The guest's HTTP forward proxy: the only way unmodified programs (curl, git, OpenClaw's own HTTP
//! stack) reach anything, and its only way out is the PEP.
//!
//! - An absolute-form request (`GET http://host/path`) becomes one `pep.http.request`.
//! - `CONNECT host:port` is answered 200 unless the policy cannot allow the host at all (then 403, before
//!   any TLS). Inside the tunnel the first byte tells TLS (0x16) from plain HTTP: TLS is terminated here with
//!   a certificate from the per-boot CA ([`crate::ca`]), and each HTTP/1.1 request inside becomes a
//!   `pep.http.request` for the real `https://` URL, so policy, credential brokering and audit see whole
//!   requests. Plain HTTP inside a tunnel (OpenClaw tunnels even `http://` destinations) is served the same
//!   way with `http://` URLs.
//! - Redirects are returned to the client (`redirect: manual`), which follows them through the proxy again.
//! - Refusals answer like proxies do: 403 for policy refusals, 502 for upstream failures, 504 for timeouts,
//!   with `x-pexi-error: <code>` and a JSON body `{code, message, reasons, decision_id, error}`; one that
//!   followed a decision also names it in `x-pexi-decision`. The reason phrase carries the summary too, git
//!   gets it as `text/plain`, and a refused WebSocket handshake is closed with 1008 and the summary.
//! - A connection captured in transparent mode ([`crate::transparent`]) takes the CONNECT path
//!   ([`Proxy::intercept`]) for the name its address stands for.
//! - An `Upgrade: websocket` request becomes an upgraded `pep.http.request`: after the PEP's 101 the
//!   client's connection and the PEP stream carry the WebSocket's bytes both ways.
//! - Bodies stream both ways under the PEP's flow control; a client that goes away drops its request, which
//!   cancels the upstream request at the PEP.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::{StreamExt, TryStreamExt};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, BodyStream, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use pexi_guest::{Client, Error, RedirectMode};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

use crate::ca::Authority;

type Body = BoxBody<Bytes, std::io::Error>;

pub struct Proxy {
    pub client: Client,
    pub ca: Authority,
    /// Refuse a CONNECT to a host no allowlist entry names with 403 before any TLS (true), or open the
    /// tunnel and answer the requests inside with pexi's 403 (false): clients such as undici drop a
    /// refused CONNECT's body, so only the second shows them pexi's reasons.
    pub early_connect_refusal: bool,
}

/// Where requests on a connection go when they are in origin form: set inside a CONNECT tunnel and on a
/// transparently captured connection.
#[derive(Clone, Debug)]
pub struct Origin {
    scheme: &'static str,
    /// `host:port`; `None` on a captured connection whose address stands for no name, where each request's
    /// `Host` names the host (and the connection's port is the port).
    authority: Option<String>,
    port: u16,
}

/// Where an intercepted connection (a CONNECT tunnel or a transparently captured connection) leads.
#[derive(Clone, Debug)]
pub struct Target {
    /// The name: a CONNECT's host, or the name a synthetic address stands for (`None` if it stands for
    /// none: then the TLS server name or the `Host` header says).
    pub host: Option<String>,
    pub port: u16,
    /// A CONNECT's `host:port` as the client wrote it; `None` for a captured connection.
    pub connect_authority: Option<String>,
}

/// Request headers a proxy never forwards (RFC 9110 §7.6.1), plus `Host`, which the URL decides.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
    "content-length",
];

impl Proxy {
    /// Serves one client connection until it closes.
    pub async fn serve_connection<IO>(self: Arc<Self>, io: IO, origin: Option<Origin>)
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let proxy = self.clone();
        let service = hyper::service::service_fn(move |request| {
            let (proxy, origin) = (proxy.clone(), origin.clone());
            async move { Ok::<_, Infallible>(proxy.handle(request, origin).await) }
        });
        let served = hyper::server::conn::http1::Builder::new()
            .keep_alive(true)
            .serve_connection(TokioIo::new(io), service)
            .with_upgrades()
            .await;
        if let Err(err) = served {
            tracing::debug!(%err, "client connection ended");
        }
    }

    async fn handle(
        self: Arc<Self>,
        request: Request<Incoming>,
        origin: Option<Origin>,
    ) -> Response<Body> {
        if request.method() == Method::CONNECT && origin.is_none() {
            return self.connect(request).await;
        }
        let url = match (
            &origin,
            request.uri().scheme_str(),
            request.uri().authority(),
        ) {
            (Some(origin), None, None) => {
                let authority = match &origin.authority {
                    Some(authority) => authority.clone(),
                    None => match host_header(request.headers()) {
                        Some(host) => format!("{host}:{}", origin.port),
                        None => {
                            return refusal(
                                StatusCode::BAD_REQUEST,
                                "invalid_request",
                                "this connection's address stands for no name and the request has no Host",
                                &[],
                            )
                        }
                    },
                };
                format!(
                    "{}://{authority}{}",
                    origin.scheme,
                    request.uri().path_and_query().map_or("/", |p| p.as_str())
                )
            }
            (None, Some("http" | "https"), Some(_)) => request.uri().to_string(),
            _ => {
                return refusal(
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    "a proxy request needs an absolute http:// URL (or CONNECT host:port)",
                    &[],
                )
            }
        };
        // git shows a failed request's body to its user only when it is text/plain ("remote: ..."); every
        // other client gets the JSON body.
        let plain_refusal = request
            .headers()
            .get(http::header::USER_AGENT)
            .is_some_and(|agent| agent.as_bytes().starts_with(b"git/"));
        let response = if is_upgrade(request.headers()) {
            self.upgrade(request, &url).await
        } else {
            self.forward(request, &url).await
        };
        if plain_refusal {
            return as_plain_text(response);
        }
        response
    }

    /// A WebSocket (or other) upgrade: the PEP performs the handshake upstream; after its 101 the client's
    /// connection and the PEP's upgraded stream are joined, bytes both ways.
    async fn upgrade(&self, mut request: Request<Incoming>, url: &str) -> Response<Body> {
        let on_client = hyper::upgrade::on(&mut request);
        let headers = request.headers();
        let protocol = headers
            .get(http::header::UPGRADE)
            .map(|v| v.as_bytes().to_vec())
            .unwrap_or_default();
        let mut builder = self
            .client
            .request(request.method().as_str(), url)
            .redirect(RedirectMode::Manual)
            .header("connection", "upgrade")
            .header("upgrade", &protocol);
        for (name, value) in headers {
            if !HOP_BY_HOP.contains(&name.as_str()) && !named_by_connection(headers, name) {
                builder = builder.header(name.as_str(), value.as_bytes());
            }
        }
        let (response, sender) = match builder.upgrade().await {
            Ok(answer) => answer,
            Err(error) => {
                let refusal = error_response(&error);
                return match websocket_accept(request.headers()) {
                    Some(accept) if refusal.status() == StatusCode::FORBIDDEN => {
                        websocket_refusal(on_client, accept, refusal)
                    }
                    _ => refusal,
                };
            }
        };
        let switching = response.status() == StatusCode::SWITCHING_PROTOCOLS.as_u16();
        let mut out = Response::builder().status(response.status());
        for field in response.headers() {
            let hop = matches!(
                field.name(),
                "keep-alive" | "transfer-encoding" | "proxy-connection" | "trailer"
            ) || (!switching && matches!(field.name(), "connection" | "upgrade"));
            if hop {
                continue;
            }
            if let (Ok(name), Ok(value)) = (
                HeaderName::from_bytes(field.name().as_bytes()),
                HeaderValue::from_bytes(field.value()),
            ) {
                out = out.header(name, value);
            }
        }
        if !switching {
            let stream = response
                .into_stream()
                .map(|chunk| chunk.map(Frame::data).map_err(std::io::Error::other));
            return out
                .body(BodyExt::boxed(StreamBody::new(stream)))
                .unwrap_or_else(|_| Response::new(empty()));
        }
        tokio::spawn(async move {
            match on_client.await {
                Ok(upgraded) => {
                    relay(
                        TokioIo::new(upgraded),
                        response.into_stream().boxed(),
                        sender,
                    )
                    .await
                }
                Err(err) => tracing::debug!(%err, "the client did not take the upgrade"),
            }
        });
        out.body(empty()).unwrap_or_else(|_| Response::new(empty()))
    }

    /// One request to the PEP, its response streamed back.
    async fn forward(&self, request: Request<Incoming>, url: &str) -> Response<Body> {
        let (parts, body) = request.into_parts();
        let mut builder = self
            .client
            .request(parts.method.as_str(), url)
            .redirect(RedirectMode::Manual);
        for (name, value) in &parts.headers {
            if !HOP_BY_HOP.contains(&name.as_str()) && !named_by_connection(&parts.headers, name) {
                builder = builder.header(name.as_str(), value.as_bytes());
            }
        }
        let length = parts
            .headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
        let chunked = parts.headers.contains_key(http::header::TRANSFER_ENCODING);
        if length.is_some_and(|n| n > 0) || chunked {
            let stream = BodyStream::new(body)
                .try_filter_map(|frame| async move { Ok(frame.into_data().ok()) })
                .map_err(std::io::Error::other);
            builder = builder.body_stream(length, stream);
        }
        match builder.send().await {
            Ok(response) => {
                let mut out = Response::builder().status(response.status());
                for field in response.headers() {
                    let name = field.name();
                    if matches!(
                        name,
                        "connection"
                            | "keep-alive"
                            | "transfer-encoding"
                            | "proxy-connection"
                            | "trailer"
                            | "upgrade"
                    ) {
                        continue;
                    }
                    if let (Ok(name), Ok(value)) = (
                        HeaderName::from_bytes(name.as_bytes()),
                        HeaderValue::from_bytes(field.value()),
                    ) {
                        out = out.header(name, value);
                    }
                }
                let stream = response
                    .into_stream()
                    .map(|chunk| chunk.map(Frame::data).map_err(std::io::Error::other));
                out.body(BodyExt::boxed(StreamBody::new(stream)))
                    .unwrap_or_else(|err| {
                        refusal(
                            StatusCode::BAD_GATEWAY,
                            "invalid_response",
                            &format!("the upstream response cannot be relayed: {err}"),
                            &[],
                        )
                    })
            }
            Err(error) => error_response(&error),
        }
    }

    /// `CONNECT host:port`: refuse hosts the policy can never allow, else open the tunnel.
    async fn connect(self: Arc<Self>, request: Request<Incoming>) -> Response<Body> {
        let Some(authority) = request.uri().authority().cloned() else {
            return refusal(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "CONNECT needs host:port",
                &[],
            );
        };
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let port = authority.port_u16().unwrap_or(443);
        // One decision per CONNECT: first as an opaque tunnel (pep.net.connect), which only destinations
        // the policy marks tunnel-only get. The shipped policy's deny reasons then tell "not a tunnel
        // destination" (inspect it: terminate TLS, decide each request) from "not in the allowlist"
        // (refused here, before any TLS, unless refusals go inside the tunnel).
        match self.client.tunnel(&host, port).await {
            Ok((tunnel, sender)) => {
                tokio::spawn(async move {
                    match hyper::upgrade::on(request).await {
                        Ok(upgraded) => {
                            relay(TokioIo::new(upgraded), tunnel.into_stream().boxed(), sender)
                                .await
                        }
                        Err(err) => tracing::debug!(%err, "CONNECT upgrade failed"),
                    }
                });
                return Response::new(empty());
            }
            Err(Error::Pep(payload))
                if payload.code.as_str() == "policy_denied"
                    && payload
                        .details
                        .reasons
                        .iter()
                        .any(|r| r.ends_with("is not a tunnel destination")) => {}
            Err(Error::Pep(payload))
                if payload.code.as_str() == "policy_denied" && !self.early_connect_refusal => {}
            // Not in the allowlist (refused before any TLS), or a tunnel destination that failed.
            Err(error) => return error_response(&error),
        }
        let target = Target {
            host: Some(host),
            port,
            connect_authority: Some(authority.to_string()),
        };
        tokio::spawn(async move {
            match hyper::upgrade::on(request).await {
                Ok(upgraded) => self.tunnel(TokioIo::new(upgraded), target).await,
                Err(err) => tracing::debug!(%err, "CONNECT upgrade failed"),
            }
        });
        Response::new(empty())
    }

    /// A transparently captured connection (see [`crate::transparent`]): like a CONNECT with the refusal
    /// inside, since the client is already connected and can only be answered in its own protocol. A name
    /// the policy marks tunnel-only gets an opaque `pep.net.connect` tunnel; any other is inspected.
    pub async fn intercept<IO>(self: Arc<Self>, io: IO, target: Target)
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        if let Some(host) = &target.host {
            match self.client.tunnel(host, target.port).await {
                Ok((tunnel, sender)) => {
                    return relay(io, tunnel.into_stream().boxed(), sender).await;
                }
                // Not a tunnel destination (or not allowed at all): inspect, and let each request inside be
                // decided and, if refused, answered with pexi's 403.
                Err(Error::Pep(payload)) if payload.code.as_str() == "policy_denied" => {}
                Err(error) => {
                    // A tunnel destination the PEP could not reach, a PEP that is gone: the client cannot
                    // be told in a protocol we do not know, so the connection ends.
                    tracing::info!(%error, host, port = target.port, "captured connection not carried");
                    return;
                }
            }
        }
        self.tunnel(io, target).await
    }

    /// Inside a tunnel: TLS terminated with a certificate for the host, or plain HTTP. Boxed as `Send`:
    /// a tunnel serves requests that may open tunnels, and naming the type ends that cycle for the compiler.
    fn tunnel<IO>(
        self: Arc<Self>,
        io: IO,
        target: Target,
    ) -> Pin<Box<dyn std::future::Future<Output = ()> + Send>>
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        Box::pin(self.tunnel_inner(io, target))
    }

    async fn tunnel_inner<IO>(self: Arc<Self>, mut io: IO, target: Target)
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let mut first = [0u8; 1];
        match io.read(&mut first).await {
            Ok(1) => {}
            _ => return,
        }
        let io = Prefixed {
            prefix: Some(first[0]),
            inner: io,
        };
        let known = target
            .connect_authority
            .clone()
            .or_else(|| target.host.as_ref().map(|h| format!("{h}:{}", target.port)));
        if first[0] != 0x16 {
            let origin = Origin {
                scheme: "http",
                authority: known,
                port: target.port,
            };
            return self.serve_connection(io, Some(origin)).await;
        }
        let acceptor = tokio_rustls::LazyConfigAcceptor::new(
            tokio_rustls::rustls::server::Acceptor::default(),
            io,
        );
        let start = match acceptor.await {
            Ok(start) => start,
            Err(err) => {
                tracing::debug!(%err, "TLS ClientHello unreadable");
                return;
            }
        };
        // The certificate's name. Through CONNECT: the name the client asked for, else the CONNECT host
        // (IP destinations send no SNI). On a captured connection whose address stands for a name: that
        // name, whatever the client asked for (as a real server at that address would), so a client that
        // sends another name fails verification rather than talk to one host believing it is another.
        let sni = start.client_hello().server_name().map(str::to_string);
        let name = match (&target.connect_authority, &target.host, sni) {
            (None, Some(host), _) => host.clone(),
            (_, _, Some(sni)) => sni,
            (_, Some(host), None) => host.clone(),
            (_, None, None) => {
                tracing::debug!(
                    "a captured TLS connection with no name: no SNI, no address mapping"
                );
                return;
            }
        };
        let authority = known.unwrap_or_else(|| format!("{name}:{}", target.port));
        let config = match self.ca.server_config(&name) {
            Ok(config) => config,
            Err(err) => {
                tracing::warn!(%err, "no certificate");
                return;
            }
        };
        match start.into_stream(config).await {
            Ok(tls) => {
                let origin = Origin {
                    scheme: "https",
                    authority: Some(authority),
                    port: target.port,
                };
                self.serve_connection(tls, Some(origin)).await;
            }
            Err(err) => tracing::debug!(%err, "TLS handshake with the client failed"),
        }
    }
}

/// Joins a client's connection to a PEP stream (an upgraded connection or an opaque tunnel): the client's
/// bytes go out through `sender`, `incoming`'s come back, until the far end closes or the client goes.
async fn relay<IO>(
    io: IO,
    mut incoming: futures_util::stream::BoxStream<'static, Result<Bytes, Error>>,
    mut sender: pexi_guest::UpgradeSender,
) where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let (mut from_client, mut to_client) = tokio::io::split(io);
    let upward = async {
        let mut buffer = vec![0u8; 64 * 1024];
        loop {
            match from_client.read(&mut buffer).await {
                Ok(0) | Err(_) => break,
                Ok(n) => match sender.send(Bytes::copy_from_slice(&buffer[..n])).await {
                    Ok(true) => {}
                    _ => break,
                },
            }
        }
        let _ = sender.finish();
        // The other direction decides when the connection is over.
        std::future::pending::<()>().await;
    };
    let downward = async {
        while let Some(Ok(chunk)) = incoming.next().await {
            if to_client.write_all(&chunk).await.is_err() {
                return;
            }
        }
        let _ = to_client.shutdown().await;
    };
    tokio::select! {
        () = upward => {}
        () = downward => {}
    }
}

/// The host part of a request's `Host`, if it is a valid authority.
fn host_header(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(http::header::HOST)?.to_str().ok()?;
    let authority: http::uri::Authority = value.parse().ok()?;
    (!authority.host().is_empty()).then(|| authority.host().to_string())
}

/// `Sec-WebSocket-Accept` for a WebSocket handshake request (RFC 6455 §4.2.2), if it is one.
fn websocket_accept(headers: &HeaderMap) -> Option<String> {
    use base64::Engine as _;
    use sha1::Digest as _;
    let upgrade = headers.get(http::header::UPGRADE)?.to_str().ok()?;
    if !upgrade.eq_ignore_ascii_case("websocket") {
        return None;
    }
    let key = headers.get(http::header::SEC_WEBSOCKET_KEY)?.as_bytes();
    let mut hash = sha1::Sha1::new();
    hash.update(key);
    hash.update(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
    Some(base64::engine::general_purpose::STANDARD.encode(hash.finalize()))
}

/// A refused WebSocket handshake, told the WebSocket way: the WebSocket API (browsers, Node's global
/// WebSocket) gives a program nothing of a refused handshake's status or body, only "close 1006", so the
/// handshake completes here (never upstream: the PEP refused it) and the connection is closed at once with
/// 1008 (policy violation) and pexi's summary as the close reason, the one text that API shows. The 101
/// carries `x-pexi-error` and `x-pexi-decision` like any refusal.
fn websocket_refusal(
    on_client: hyper::upgrade::OnUpgrade,
    accept: String,
    refusal: Response<Body>,
) -> Response<Body> {
    let summary = refusal
        .extensions()
        .get::<Summary>()
        .map(|s| s.0.clone())
        .unwrap_or_default();
    let mut out = Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(http::header::CONNECTION, "upgrade")
        .header(http::header::UPGRADE, "websocket")
        .header(http::header::SEC_WEBSOCKET_ACCEPT, accept);
    for name in ["x-pexi-error", "x-pexi-decision"] {
        if let Some(value) = refusal.headers().get(name) {
            out = out.header(name, value);
        }
    }
    tokio::spawn(async move {
        let Ok(upgraded) = on_client.await else {
            return;
        };
        let mut io = TokioIo::new(upgraded);
        let _ = io.write_all(&close_frame(1008, &summary)).await;
        // Wait (briefly) for the client's close frame or its end, then hang up.
        let mut sink = [0u8; 256];
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), io.read(&mut sink)).await;
        let _ = io.shutdown().await;
    });
    out.body(empty()).unwrap_or_else(|_| Response::new(empty()))
}

/// An unmasked close frame (server to client) with `code` and as much of `reason` as fits: a control
/// frame's payload is at most 125 bytes, and the reason is cut at a character boundary.
fn close_frame(code: u16, reason: &str) -> Vec<u8> {
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let reason = &reason.as_bytes()[..end];
    let mut frame = vec![0x88, (2 + reason.len()) as u8];
    frame.extend_from_slice(&code.to_be_bytes());
    frame.extend_from_slice(reason);
    frame
}

fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(http::header::UPGRADE)
}

/// Whether `Connection` names this header (which makes it hop-by-hop too).
fn named_by_connection(headers: &HeaderMap, name: &HeaderName) -> bool {
    headers
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|token| token.trim().eq_ignore_ascii_case(name.as_str()))
}

fn empty() -> Body {
    BodyExt::boxed(Full::new(Bytes::new()).map_err(|never| match never {}))
}

/// An answer the proxy makes itself, with no decision to name.
fn refusal(status: StatusCode, code: &str, message: &str, reasons: &[String]) -> Response<Body> {
    refusal_with_decision(status, code, message, reasons, None)
}

/// A refusal that followed a logged decision also names it (`decision_id` in the body,
/// `x-pexi-decision`), so that whoever reads the 403 can find its audit record.
fn refusal_with_decision(
    status: StatusCode,
    code: &str,
    message: &str,
    reasons: &[String],
    decision_id: Option<&str>,
) -> Response<Body> {
    // `message` says it all (code, reasons, decision), at the top and inside `error`, the shape LLM APIs
    // answer with: SDKs print one or the other.
    let why = if reasons.is_empty() {
        message.to_string()
    } else {
        reasons.join("; ")
    };
    let summary = match decision_id {
        Some(id) => format!("pexi refused this request ({code}): {why} [decision {id}]"),
        None => format!("pexi refused this request ({code}): {why}"),
    };
    let body = serde_json::json!({
        "code": code,
        "message": summary,
        "reasons": reasons,
        "decision_id": decision_id,
        "error": {
            "type": "pexi_refusal",
            "code": code,
            "message": summary,
            "reasons": reasons,
            "decision_id": decision_id,
        },
    })
    .to_string();
    let mut response = Response::new(BodyExt::boxed(
        Full::new(Bytes::from(body)).map_err(|never| match never {}),
    ));
    *response.status_mut() = status;
    // The status line's reason phrase carries the summary too: the one part of a refusal that curl -v,
    // busybox wget, Python's urllib ("HTTP Error 403: ...") and got ("Response code 403 (...)") print
    // without being asked.
    let phrase = format!(
        "{} - {summary}",
        status.canonical_reason().unwrap_or("Refused")
    );
    let phrase: String = phrase
        .chars()
        .map(|c| {
            if c == ' ' || c.is_ascii_graphic() {
                c
            } else {
                '?'
            }
        })
        .take(400)
        .collect();
    if let Ok(phrase) = hyper::ext::ReasonPhrase::try_from(phrase) {
        response.extensions_mut().insert(phrase);
    }
    response.extensions_mut().insert(Summary(summary));
    let headers = response.headers_mut();
    headers.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if let Ok(value) = HeaderValue::from_str(code) {
        headers.insert("x-pexi-error", value);
    }
    if let Some(value) = decision_id.and_then(|id| HeaderValue::from_str(id).ok()) {
        headers.insert("x-pexi-decision", value);
    }
    response
}

/// A refusal's one-line summary, kept on the response for clients that read text.
#[derive(Clone)]
struct Summary(String);

/// A refusal of this proxy's own, with its body as one line of text instead of JSON; any other response
/// as it is.
fn as_plain_text(response: Response<Body>) -> Response<Body> {
    let Some(Summary(summary)) = response.extensions().get::<Summary>().cloned() else {
        return response;
    };
    let (mut parts, _) = response.into_parts();
    parts.headers.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    let body = Full::new(Bytes::from(format!("{summary}\n"))).map_err(|never| match never {});
    Response::from_parts(parts, BodyExt::boxed(body))
}

/// The answer for a request the PEP refused or could not complete.
fn error_response(error: &Error) -> Response<Body> {
    let code = error.code();
    let status = match code {
        "policy_denied" | "secret_not_allowed" | "blocked_address" | "redirect_not_allowed" => {
            StatusCode::FORBIDDEN
        }
        "invalid_request" => StatusCode::BAD_REQUEST,
        "body_too_large" => StatusCode::PAYLOAD_TOO_LARGE,
        "upstream_timeout" => StatusCode::GATEWAY_TIMEOUT,
        _ => StatusCode::BAD_GATEWAY,
    };
    let reasons = match error {
        Error::Pep(payload) => payload.details.reasons.clone(),
        _ => Vec::new(),
    };
    let message = match error {
        Error::Pep(payload) => payload.message.clone(),
        other => other.to_string(),
    };
    refusal_with_decision(status, code, &message, &reasons, error.decision_id())
}

/// A stream with one byte put back in front (the byte read to tell TLS from plain HTTP).
struct Prefixed<IO> {
    prefix: Option<u8>,
    inner: IO,
}

impl<IO: AsyncRead + Unpin> AsyncRead for Prefixed<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if let Some(byte) = self.prefix.take() {
            if buf.remaining() > 0 {
                buf.put_slice(&[byte]);
                return Poll::Ready(Ok(()));
            }
            self.prefix = Some(byte);
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Prefixed<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_websocket_accept_is_rfc_6455s() {
        let mut headers = HeaderMap::new();
        headers.insert(http::header::UPGRADE, HeaderValue::from_static("websocket"));
        headers.insert(
            http::header::SEC_WEBSOCKET_KEY,
            HeaderValue::from_static("dGhlIHNhbXBsZSBub25jZQ=="),
        );
        // RFC 6455 §1.3's example.
        assert_eq!(
            websocket_accept(&headers).as_deref(),
            Some("s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")
        );
        headers.insert(http::header::UPGRADE, HeaderValue::from_static("h2c"));
        assert_eq!(websocket_accept(&headers), None);
    }

    #[test]
    fn a_close_frame_fits_a_control_frame() {
        let long = "é".repeat(200);
        let frame = close_frame(1008, &long);
        assert_eq!(frame[0], 0x88);
        assert!(frame.len() <= 127, "{}", frame.len());
        assert_eq!(usize::from(frame[1]), frame.len() - 2);
        assert_eq!(&frame[2..4], &1008u16.to_be_bytes());
        assert!(std::str::from_utf8(&frame[4..]).is_ok());
    }
}
