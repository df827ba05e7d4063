//! The control API (docs/approvals.md, "The control API"), the same on the socket and the dashboard:
//!
//! | | |
//! |---|---|
//! | `GET /api/status` | policy revision, approvals on or off, questions waiting |
//! | `GET /api/questions` | the waiting questions |
//! | `POST /api/questions/{id}/answer` | `{"answer": "allow_once" \| "allow_always" \| "deny_once" \| "deny_always", "path_prefix": "/v1/"?}` |
//! | `GET /api/events` | server-sent events: `decision`, `outcome`, `question`, `answer` (recent ones first), `lagged` |
//! | `GET /api/entries` | the allow and deny entries in force, with their sources |
//! | `GET /api/hosts` | decisions per host: allowed, denied, asked |
//! | `GET /api/audit` | the audit chain's verification (a result is reused while the log has not grown, 5 s at most) |
//! | `GET /api/dashboard` | the dashboard's URL with its token (the socket only) |
//!
//! Errors are `{"error": {"code", "message"}}` with a stable code.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{Extension, Path, State as Shared};
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};

use super::access::refuse;
use super::{page, Dashboard};
use crate::approvals::{Answer, AnswerError};
use crate::pipeline::{Answerer, Pipeline};

/// Event streams open at once (browser tabs, terminals): each holds a task and a receiver.
const WATCHERS: usize = 32;
/// A verification of the whole log is reused this long.
const AUDIT_FRESH: Duration = Duration::from_secs(5);

#[derive(Clone)]
pub struct State {
    pipeline: Arc<Pipeline>,
    /// The dashboard's address and token, when it listens.
    dashboard: Option<Dashboard>,
    watchers: Arc<AtomicUsize>,
    audit: Arc<tokio::sync::Mutex<Option<(Instant, Value)>>>,
    /// Ends the event streams, so an open page does not hold a shutdown.
    shutdown: tokio_util::sync::CancellationToken,
}

impl State {
    pub fn new(
        pipeline: Arc<Pipeline>,
        dashboard: Option<Dashboard>,
        shutdown: tokio_util::sync::CancellationToken,
    ) -> State {
        State {
            pipeline,
            dashboard,
            shutdown,
            watchers: Arc::new(AtomicUsize::new(0)),
            audit: Arc::new(tokio::sync::Mutex::new(None)),
        }
    }
}

pub fn router(state: State) -> Router {
    Router::new()
        .route("/", get(page::index))
        .route("/app.js", get(page::script))
        .route("/style.css", get(page::style))
        .route("/favicon.ico", get(|| async { StatusCode::NO_CONTENT }))
        .route("/api/status", get(status))
        .route("/api/questions", get(questions))
        .route("/api/questions/{id}/answer", post(answer))
        .route("/api/events", get(events))
        .route("/api/entries", get(entries))
        .route("/api/hosts", get(hosts))
        .route("/api/audit", get(audit))
        .route("/api/dashboard", get(dashboard))
        .with_state(state)
}

async fn status(Shared(state): Shared<State>) -> Json<Value> {
    let config = &state.pipeline.config.pep;
    Json(json!({
        "policy_revision": state.pipeline.policy_revision(),
        "approvals": {
            "enabled": config.approvals.enabled,
            "approval_timeout_ms": config.approvals.approval_timeout_ms,
            "max_waiting": config.approvals.max_waiting,
            "file": config.approvals.file_path(&config.audit),
        },
        "waiting": state.pipeline.questions().len(),
        "audit_log": config.audit.path,
        "version": env!("CARGO_PKG_VERSION"),
    }))
}

async fn questions(Shared(state): Shared<State>) -> Json<Value> {
    Json(json!({ "questions": state.pipeline.questions() }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AnswerBody {
    answer: String,
    #[serde(default)]
    path_prefix: Option<String>,
}

async fn answer(
    Shared(state): Shared<State>,
    Extension(answerer): Extension<Answerer>,
    Path(id): Path<String>,
    body: Result<Json<AnswerBody>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let Json(body) = match body {
        Ok(body) => body,
        Err(rejected) => {
            return refuse(
                StatusCode::BAD_REQUEST,
                "invalid_answer",
                &rejected.body_text(),
            )
        }
    };
    let answer = match Answer::parse(&body.answer, body.path_prefix) {
        Ok(answer) => answer,
        Err(message) => return refuse(StatusCode::BAD_REQUEST, "invalid_answer", &message),
    };
    match state.pipeline.answer(&id, answer, answerer).await {
        Ok(settled) => Json(json!({
            "question_id": id,
            "answer": settled.answer,
            "allow": settled.allow,
            "reason": (!settled.allow).then_some(settled.reason),
        }))
        .into_response(),
        Err(err @ AnswerError::NotWaiting(_)) => {
            refuse(StatusCode::CONFLICT, err.code(), &err.to_string())
        }
        Err(err @ AnswerError::Invalid(_)) => {
            refuse(StatusCode::BAD_REQUEST, err.code(), &err.to_string())
        }
    }
}

/// Gives a watcher's place back when its stream ends.
struct Watching(Arc<AtomicUsize>);

impl Drop for Watching {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn events(Shared(state): Shared<State>) -> Response {
    if state.watchers.fetch_add(1, Ordering::Relaxed) >= WATCHERS {
        state.watchers.fetch_sub(1, Ordering::Relaxed);
        return refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            "too_many_watchers",
            &format!("{WATCHERS} event streams are open already; close one"),
        );
    }
    let watching = Watching(state.watchers.clone());
    let receiver = state.pipeline.activity.subscribe();
    let recent: std::collections::VecDeque<Arc<Value>> =
        state.pipeline.activity.recent().into_iter().collect();
    let shutdown = state.shutdown.clone();
    let stream = futures_util::stream::unfold(
        (recent, receiver, watching),
        move |(mut recent, mut receiver, watching)| {
            let shutdown = shutdown.clone();
            async move {
                use tokio::sync::broadcast::error::RecvError;
                if shutdown.is_cancelled() {
                    return None;
                }
                let event = match recent.pop_front() {
                    Some(event) => to_event(&event),
                    None => {
                        let received = tokio::select! {
                            () = shutdown.cancelled() => return None,
                            received = receiver.recv() => received,
                        };
                        match received {
                            Ok(event) => to_event(&event),
                            Err(RecvError::Lagged(missed)) => Event::default()
                                .event("lagged")
                                .data(json!({"type": "lagged", "missed": missed}).to_string()),
                            Err(RecvError::Closed) => return None,
                        }
                    }
                };
                Some((
                    Ok::<_, std::convert::Infallible>(event),
                    (recent, receiver, watching),
                ))
            }
        },
    );
    Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response()
}

fn to_event(event: &Value) -> Event {
    Event::default()
        .event(event["type"].as_str().unwrap_or("event"))
        .data(event.to_string())
}

async fn entries(Shared(state): Shared<State>) -> Json<Value> {
    let policy = state.pipeline.policy();
    Json(json!({
        "policy_revision": policy.revision(),
        "entries": policy.listed(),
    }))
}

async fn hosts(Shared(state): Shared<State>) -> Json<Value> {
    Json(json!({ "hosts": state.pipeline.activity.hosts() }))
}

async fn audit(Shared(state): Shared<State>) -> Json<Value> {
    // One verification at a time; a recent result of the log as it still is (same length) is shared.
    let mut cached = state.audit.lock().await;
    let config = state.pipeline.config.pep.audit.clone();
    let length = std::fs::metadata(&config.path).map_or(0, |m| m.len());
    if let Some((at, report)) = cached.as_ref() {
        if at.elapsed() < AUDIT_FRESH && report["bytes"] == length {
            return Json(report.clone());
        }
    }
    let mut report = tokio::task::spawn_blocking(move || verify(&config))
        .await
        .unwrap_or_else(|err| json!({"ok": false, "problem": err.to_string()}));
    report["bytes"] = json!(length);
    *cached = Some((Instant::now(), report.clone()));
    Json(report)
}

fn verify(config: &crate::config::AuditConfig) -> Value {
    use crate::audit::{seal, verify};
    let files = crate::audit::log_files(&config.path);
    let key_path = config.keys_dir().join(seal::PUBLIC_KEY_FILE);
    let public_key = match key_path.exists().then(|| seal::read_public_key(&key_path)) {
        Some(Ok(key)) => Some(key),
        Some(Err(err)) => return json!({"ok": false, "problem": err.to_string()}),
        None => None,
    };
    let checkpoints = config.checkpoint_path();
    let options = verify::Options {
        checkpoints: (public_key.is_some() && checkpoints.exists()).then_some(checkpoints),
        public_key,
    };
    let checked_at = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
    match verify::verify_with(&files, &options) {
        Ok(report) => json!({
            "ok": true,
            "records": report.records,
            "files": report.files.len(),
            "signed": report.signed + report.covered,
            "head": report.head,
            "checked_at": checked_at,
        }),
        Err(broken) => json!({
            "ok": false,
            "problem": broken.to_string(),
            "checked_at": checked_at,
        }),
    }
}

async fn dashboard(
    Shared(state): Shared<State>,
    Extension(asking): Extension<Answerer>,
) -> Response {
    // The page itself has no use for its token, and must not be able to hand it on.
    if asking.surface == "dashboard" {
        return refuse(
            StatusCode::NOT_FOUND,
            "not_here",
            "the dashboard's address is given on the control socket only",
        );
    }
    match &state.dashboard {
        Some(dashboard) => Json(json!({
            "url": dashboard.url(),
            "address": dashboard.addr.to_string(),
        }))
        .into_response(),
        None => refuse(
            StatusCode::NOT_FOUND,
            "no_dashboard",
            "the dashboard is off (pep.control.dashboard = \"\")",
        ),
    }
}
