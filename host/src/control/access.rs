//! Who may use the control surfaces. The socket: only the user the PEP runs as (its mode is 0600, and each
//! connection's peer uid is checked). The dashboard: whoever holds the per-start token, from this host's
//! loopback only, through a browser that is on the dashboard's own origin:
//!
//! - `Host` must name the dashboard's address exactly (a page elsewhere cannot rebind a name of its own to
//!   127.0.0.1 and read the answers);
//! - `GET /?token=T` trades the token for an `HttpOnly`, `SameSite=Strict` cookie and sends the browser on
//!   to `/` without it; everything else needs that cookie or `Authorization: Bearer T`;
//! - a request that changes something needs `Origin` equal to the dashboard's, or the bearer header (which
//!   a cross-site form cannot send);
//! - every answer forbids framing and caching and allows scripts and styles from the dashboard only.

use std::sync::Arc;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::serve::IncomingStream;

use super::Dashboard;
use crate::pipeline::Answerer;

const COOKIE: &str = "pexi_dashboard";

/// 256 random bits, hex.
pub fn new_token() -> Result<String, String> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes)
        .map_err(|err| format!("no randomness for the dashboard token: {err}"))?;
    Ok(hex::encode(bytes))
}

/// The control socket's peer, as the kernel names it.
#[derive(Clone, Debug)]
pub struct SocketPeer {
    pub uid: Option<u32>,
}

impl axum::extract::connect_info::Connected<IncomingStream<'_, tokio::net::UnixListener>>
    for SocketPeer
{
    fn connect_info(stream: IncomingStream<'_, tokio::net::UnixListener>) -> Self {
        SocketPeer {
            uid: stream.io().peer_cred().ok().map(|cred| cred.uid()),
        }
    }
}

pub async fn socket_peer(
    ConnectInfo(peer): ConnectInfo<SocketPeer>,
    mut request: Request,
    next: Next,
) -> Response {
    let ours = nix::unistd::geteuid().as_raw();
    let Some(uid) = peer.uid.filter(|uid| *uid == ours) else {
        return refuse(
            StatusCode::FORBIDDEN,
            "forbidden",
            "the control socket serves only the user the PEP runs as",
        );
    };
    let name = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
        .ok()
        .flatten()
        .map(|user| user.name)
        .unwrap_or_default();
    // Who is asking, for the audit of answers: `pexi approve` says it is the terminal; any other client
    // of the socket is `control` (never `dashboard`, which only the dashboard's own check sets).
    let terminal = request
        .headers()
        .get("x-pexi-surface")
        .map(HeaderValue::as_bytes)
        == Some(b"terminal");
    let surface = if terminal { "terminal" } else { "control" };
    request.extensions_mut().insert(Answerer {
        by: format!("uid {uid} ({name})"),
        surface: surface.into(),
    });
    next.run(request).await
}

pub async fn dashboard(
    State(dashboard): State<Arc<Dashboard>>,
    mut request: Request,
    next: Next,
) -> Response {
    let mut response = match check_dashboard(&dashboard, &mut request) {
        Ok(()) => next.run(request).await,
        Err(refused) => refused,
    };
    harden(response.headers_mut());
    response
}

// The refusal is the response itself, built once per refused request: its size does not matter here.
#[allow(clippy::result_large_err)]
fn check_dashboard(dashboard: &Dashboard, request: &mut Request) -> Result<(), Response> {
    let origin = format!("http://{}", dashboard.addr);
    let host = request
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or_default();
    if host != dashboard.addr.to_string() {
        return Err(refuse(
            StatusCode::MISDIRECTED_REQUEST,
            "wrong_host",
            "the dashboard answers only to its own address (open the URL pexi ui prints)",
        ));
    }
    let token = dashboard.token.as_bytes();
    let bearer = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.strip_prefix("Bearer "))
        .is_some_and(|t| same(t.as_bytes(), token));
    let cookie = request
        .headers()
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|h| h.to_str().ok())
        .flat_map(|h| h.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .any(|(name, value)| name == COOKIE && same(value.as_bytes(), token));
    if request.method() == Method::GET && request.uri().path() == "/" {
        let offered = request.uri().query().and_then(|query| {
            query
                .split('&')
                .filter_map(|pair| pair.split_once('='))
                .find(|(name, _)| *name == "token")
                .map(|(_, value)| value.to_string())
        });
        if let Some(offered) = offered {
            if !same(offered.as_bytes(), token) {
                return Err(refuse(
                    StatusCode::UNAUTHORIZED,
                    "bad_token",
                    "this token is not the running PEP's (it changes at every start: run pexi ui again)",
                ));
            }
            // The token leaves the address bar and the history; the cookie carries it from now on.
            let mut response = (StatusCode::SEE_OTHER, [(header::LOCATION, "/")]).into_response();
            if let Ok(value) = HeaderValue::from_str(&format!(
                "{COOKIE}={}; HttpOnly; SameSite=Strict; Path=/",
                dashboard.token
            )) {
                response.headers_mut().insert(header::SET_COOKIE, value);
            }
            return Err(response);
        }
    }
    if !(bearer || cookie) {
        return Err(refuse(
            StatusCode::UNAUTHORIZED,
            "no_token",
            "open the dashboard with the URL pexi ui prints (it holds this start's token)",
        ));
    }
    let changes = !matches!(*request.method(), Method::GET | Method::HEAD);
    if changes {
        let same_origin = request
            .headers()
            .get(header::ORIGIN)
            .is_some_and(|o| o.as_bytes() == origin.as_bytes());
        if !(same_origin || bearer) {
            return Err(refuse(
                StatusCode::FORBIDDEN,
                "cross_origin",
                "changes are taken from the dashboard's own page only",
            ));
        }
    }
    request.extensions_mut().insert(Answerer {
        by: "dashboard".into(),
        surface: "dashboard".into(),
    });
    Ok(())
}

/// Compares without stopping at the first difference.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn harden(headers: &mut HeaderMap) {
    for (name, value) in [
        (
            header::CONTENT_SECURITY_POLICY,
            "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; \
             frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
        ),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::REFERRER_POLICY, "no-referrer"),
        (header::CACHE_CONTROL, "no-store"),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
}

/// A refusal with a machine-readable code.
pub fn refuse(status: StatusCode, code: &str, message: &str) -> Response {
    (
        status,
        axum::Json(serde_json::json!({"error": {"code": code, "message": message}})),
    )
        .into_response()
}
