//! Questions to a person (docs/approvals.md): a request the policy answered with `ask` is held here until
//! someone answers, the question times out, or every request waiting on it goes away. Identical requests
//! (same method and canonical URL) waiting at the same time share one question. This module only keeps
//! the questions and hands answers to the requests that wait; the pipeline (`pipeline/approve.rs`) audits,
//! writes "always" answers into the approvals file and reloads the policy.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use serde::Serialize;
use tokio::sync::watch;

use crate::activity::now_ms;
use crate::policy::entries::{Entry, MethodName, PathPrefix, Port, Scheme, VmName};
use crate::policy::{ApprovalsFile, AskScope};

/// A hop as people are shown it (questions, the dashboard): from its redacted policy input, never from
/// the request itself.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Shown {
    /// The HTTP method.
    pub method: String,
    /// Canonical and redacted.
    pub url: String,
    pub scheme: String,
    pub host: String,
    pub port: u16,
    pub path: String,
    /// The guest's HELLO name and version, and its session.
    pub guest: String,
    pub session_id: String,
    /// The VM as the host knows it (`input.vm.name`); empty for a listener that names none.
    pub vm: String,
}

impl Shown {
    /// From a policy input document (docs/policy.md, "The input").
    pub fn of(input: &serde_json::Value) -> Shown {
        let request = &input["request"];
        let text = |value: &serde_json::Value| value.as_str().unwrap_or_default().to_string();
        Shown {
            method: text(&request["method"]),
            url: text(&request["url"]),
            scheme: text(&request["scheme"]),
            host: text(&request["host"]),
            port: request["port"]
                .as_u64()
                .and_then(|p| u16::try_from(p).ok())
                .unwrap_or(0),
            path: text(&request["path"]),
            guest: format!(
                "{} {}",
                text(&input["session"]["guest"]["name"]),
                text(&input["session"]["guest"]["version"])
            ),
            session_id: text(&input["session"]["id"]),
            vm: text(&input["vm"]["name"]),
        }
    }
}

/// A waiting question, as `pexi approve` and the dashboard show it. Everything in it is redacted.
#[derive(Clone, Debug, Serialize)]
pub struct Question {
    pub id: String,
    /// What is asked about (its fields appear at the top level of the JSON).
    #[serde(flatten)]
    pub request: Shown,
    /// The policy's reasons for asking.
    pub reasons: Vec<String>,
    pub scope: AskScope,
    /// When it was asked, and when it is denied unanswered (milliseconds since the epoch).
    pub asked_ms: u64,
    pub deadline_ms: u64,
    /// Requests waiting on it, and their decisions.
    pub waiting: usize,
    pub decision_ids: Vec<String>,
}

/// A person's answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer {
    AllowOnce,
    /// `path_prefix`: only the request's method under this prefix (else the whole host).
    AllowAlways {
        path_prefix: Option<String>,
    },
    DenyOnce,
    DenyAlways {
        path_prefix: Option<String>,
    },
}

impl Answer {
    pub fn name(&self) -> &'static str {
        match self {
            Answer::AllowOnce => "allow_once",
            Answer::AllowAlways { .. } => "allow_always",
            Answer::DenyOnce => "deny_once",
            Answer::DenyAlways { .. } => "deny_always",
        }
    }

    pub fn allows(&self) -> bool {
        matches!(self, Answer::AllowOnce | Answer::AllowAlways { .. })
    }

    /// Parses the wire form: `allow_once`, `allow_always`, `deny_once`, `deny_always`.
    pub fn parse(name: &str, path_prefix: Option<String>) -> Result<Answer, String> {
        match (name, path_prefix) {
            ("allow_once", None) => Ok(Answer::AllowOnce),
            ("deny_once", None) => Ok(Answer::DenyOnce),
            ("allow_always", path_prefix) => Ok(Answer::AllowAlways { path_prefix }),
            ("deny_always", path_prefix) => Ok(Answer::DenyAlways { path_prefix }),
            ("allow_once" | "deny_once", Some(_)) => Err(format!(
                "{name} takes no path_prefix: a once answer writes no entry"
            )),
            (other, _) => Err(format!(
                "answer {other:?} is not allow_once, allow_always, deny_once or deny_always"
            )),
        }
    }
}

/// How a question ended, as the requests waiting on it see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settled {
    pub allow: bool,
    /// `allow_once` ... `deny_always`, `no_answer`.
    pub answer: String,
    /// The reason a denied request is given.
    pub reason: String,
}

/// Why a request could not wait for a person.
#[derive(Debug, thiserror::Error)]
pub enum AskError {
    #[error("{0} questions are already waiting for a person (pep.approvals.max_waiting); denied without asking")]
    TooManyWaiting(usize),
    #[error("this session already has {0} questions waiting for a person (a quarter of pep.approvals.max_waiting); denied without asking")]
    TooManyFromSession(usize),
}

/// Why an answer was not taken.
#[derive(Debug, thiserror::Error)]
pub enum AnswerError {
    #[error("question {0} is not waiting (answered, timed out, or its requests went away)")]
    NotWaiting(String),
    #[error("{0}")]
    Invalid(String),
}

impl AnswerError {
    pub fn code(&self) -> &'static str {
        match self {
            AnswerError::NotWaiting(_) => "not_waiting",
            AnswerError::Invalid(_) => "invalid_answer",
        }
    }
}

struct Open {
    question: Question,
    key: (String, String, String),
    settle: watch::Sender<Option<Settled>>,
    /// An answer is being carried out (its entry written, its record made durable): no other answer is
    /// taken, and requests still join it.
    settling: bool,
}

#[derive(Default)]
struct State {
    open: HashMap<String, Open>,
    by_key: HashMap<(String, String, String), String>,
}

pub struct Broker {
    timeout: Duration,
    max_waiting: usize,
    prefix: String,
    next: AtomicU64,
    state: Mutex<State>,
    /// The approvals file is read, changed and replaced by one answer at a time.
    file: Mutex<()>,
}

/// What a held request asks about.
pub struct Asking {
    pub request: Shown,
    pub reasons: Vec<String>,
    pub scope: AskScope,
    pub decision_id: String,
}

/// A request's place in a question.
pub struct Place {
    pub question: Question,
    /// Whether this request opened the question (the others joined it).
    pub opened: bool,
    settled: watch::Receiver<Option<Settled>>,
    deadline: tokio::time::Instant,
}

impl Place {
    /// Waits for the answer; `None` once the deadline passed without one.
    pub async fn answer(&mut self) -> Option<Settled> {
        let waited = tokio::time::timeout_at(self.deadline, self.settled.wait_for(Option::is_some));
        match waited.await {
            Ok(Ok(settled)) => settled.clone(),
            // The sender went away without an answer: only when the broker is gone.
            Ok(Err(_)) | Err(_) => None,
        }
    }

    /// Waits up to `limit` more for an answer being carried out after the deadline.
    pub async fn answer_within(&mut self, limit: Duration) -> Option<Settled> {
        self.deadline = tokio::time::Instant::now() + limit;
        self.answer().await
    }
}

impl Broker {
    pub fn new(timeout: Duration, max_waiting: usize) -> Broker {
        let seed = std::hash::BuildHasher::hash_one(
            &std::collections::hash_map::RandomState::new(),
            std::process::id(),
        );
        Broker {
            timeout,
            max_waiting,
            prefix: format!("q{:06x}", seed as u32 & 0x00ff_ffff),
            next: AtomicU64::new(1),
            state: Mutex::new(State::default()),
            file: Mutex::new(()),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Opens a question for `asking`, or joins the identical one already waiting.
    pub fn ask(&self, asking: Asking) -> Result<Place, AskError> {
        // Per VM: an always answer for one VM writes an entry for that VM only (see `entry_for`).
        let key = (
            asking.request.method.clone(),
            asking.request.url.clone(),
            asking.request.vm.clone(),
        );
        let mut state = self.state();
        if let Some(id) = state.by_key.get(&key).cloned() {
            if let Some(open) = state.open.get_mut(&id) {
                open.question.waiting += 1;
                open.question.decision_ids.push(asking.decision_id);
                let remaining = open.question.deadline_ms.saturating_sub(now_ms());
                return Ok(Place {
                    question: open.question.clone(),
                    opened: false,
                    settled: open.settle.subscribe(),
                    deadline: tokio::time::Instant::now() + Duration::from_millis(remaining),
                });
            }
        }
        if state.open.len() >= self.max_waiting {
            return Err(AskError::TooManyWaiting(state.open.len()));
        }
        // One guest cannot take every place: the others' requests would be denied unasked.
        let mine = state
            .open
            .values()
            .filter(|open| open.question.request.session_id == asking.request.session_id)
            .count();
        if mine >= self.per_session() {
            return Err(AskError::TooManyFromSession(mine));
        }
        let id = format!(
            "{}-{:04}",
            self.prefix,
            self.next.fetch_add(1, Ordering::Relaxed)
        );
        let asked_ms = now_ms();
        let question = Question {
            id: id.clone(),
            request: asking.request,
            reasons: asking.reasons,
            scope: asking.scope,
            asked_ms,
            deadline_ms: asked_ms + u64::try_from(self.timeout.as_millis()).unwrap_or(u64::MAX),
            waiting: 1,
            decision_ids: vec![asking.decision_id],
        };
        let (settle, settled) = watch::channel(None);
        state.by_key.insert(key.clone(), id.clone());
        state.open.insert(
            id,
            Open {
                question: question.clone(),
                key,
                settle,
                settling: false,
            },
        );
        Ok(Place {
            question,
            opened: true,
            settled,
            deadline: tokio::time::Instant::now() + self.timeout,
        })
    }

    /// Questions one session may have opened and waiting at once.
    fn per_session(&self) -> usize {
        (self.max_waiting / 4).max(1)
    }

    /// The questions waiting now, oldest first.
    pub fn waiting(&self) -> Vec<Question> {
        let mut questions: Vec<Question> = self
            .state()
            .open
            .values()
            .filter(|open| !open.settling)
            .map(|open| open.question.clone())
            .collect();
        questions.sort_by(|a, b| a.asked_ms.cmp(&b.asked_ms).then(a.id.cmp(&b.id)));
        questions
    }

    /// Takes the question for one answer: no other answer is accepted from now on. Returns it as it
    /// stands (every request waiting on it).
    pub fn begin(&self, id: &str) -> Result<Question, AnswerError> {
        let mut state = self.state();
        match state.open.get_mut(id) {
            Some(open) if !open.settling => {
                open.settling = true;
                Ok(open.question.clone())
            }
            _ => Err(AnswerError::NotWaiting(id.to_string())),
        }
    }

    /// Lets a question taken with [`Broker::begin`] be answered again (its answer could not be carried
    /// out).
    pub fn abandon(&self, id: &str) {
        if let Some(open) = self.state().open.get_mut(id) {
            open.settling = false;
        }
    }

    /// Closes a question taken with [`Broker::begin`] to newcomers, right before its answer is recorded:
    /// the question it returns names every request the answer will settle, and an identical request
    /// that comes later opens a question of its own.
    pub fn seal(&self, id: &str) -> Option<Question> {
        let mut state = self.state();
        let open = state.open.get(id)?;
        let (question, key) = (open.question.clone(), open.key.clone());
        state.forget_key(&key, id);
        Some(question)
    }

    /// Ends a question: every request waiting on it gets `settled`. Returns the question as it ended.
    pub fn finish(&self, id: &str, settled: Settled) -> Option<Question> {
        let mut state = self.state();
        let open = state.open.remove(id)?;
        state.forget_key(&open.key, id);
        open.settle.send_replace(Some(settled));
        Some(open.question)
    }

    /// Adds an "always" answer's entry to the approvals file; see [`add_to_file`].
    pub fn add_entry(&self, path: &Path, list: &str, entry: &Entry) -> Result<bool, String> {
        let _one_at_a_time = self.file.lock().unwrap_or_else(PoisonError::into_inner);
        add_to_file(path, list, entry)
    }

    /// A waiting request went away (its stream was cancelled). When it was the last one and no answer is
    /// being carried out, the question is withdrawn and returned.
    pub fn leave(&self, id: &str) -> Option<Question> {
        let mut state = self.state();
        let open = state.open.get_mut(id)?;
        open.question.waiting = open.question.waiting.saturating_sub(1);
        if open.question.waiting > 0 || open.settling {
            return None;
        }
        let open = state.open.remove(id)?;
        state.forget_key(&open.key, id);
        Some(open.question)
    }
}

impl State {
    /// Unmaps `key` if it still leads to question `id` (after a seal it may lead to a newer one).
    fn forget_key(&mut self, key: &(String, String, String), id: &str) {
        if self.by_key.get(key).is_some_and(|mapped| mapped == id) {
            self.by_key.remove(key);
        }
    }
}

/// The entry an "always" answer writes, and its list: the question's host with its scheme and port (and
/// with a path prefix, the method too), so it covers the request asked about and nothing wider than the
/// policy's `scope` lets it.
pub fn entry_for(question: &Question, answer: &Answer) -> Result<(&'static str, Entry), String> {
    let asked = &question.request;
    let (list, path_prefix) = match answer {
        Answer::AllowAlways { path_prefix } => ("allow", path_prefix),
        Answer::DenyAlways { path_prefix } => ("deny", path_prefix),
        Answer::AllowOnce | Answer::DenyOnce => return Err("a once answer writes no entry".into()),
    };
    if question.scope == AskScope::Path && path_prefix.is_none() {
        return Err(format!(
            "the policy lets an always answer about {} cover a path prefix only: give path_prefix",
            asked.host
        ));
    }
    // An exact name, or for an IP literal the address itself: never a wildcard or a network, even if a
    // host spelled like one ever got this far (the URL parser refuses them today).
    if asked.host.contains(['*', '/']) {
        return Err(format!(
            "{:?} is not one exact host: no entry is written for it",
            asked.host
        ));
    }
    let mut entry = Entry::host(&asked.host)?;
    entry.ports = Some(vec![Port::new(asked.port)?]);
    entry.schemes = Some(vec![Scheme::parse(&asked.scheme)?]);
    if let Some(prefix) = path_prefix {
        let prefix = PathPrefix::parse(prefix)?;
        if !covers(prefix.as_str(), &asked.path) {
            return Err(format!(
                "path_prefix {:?} does not cover the request's path {:?}",
                prefix.as_str(),
                asked.path
            ));
        }
        entry.paths = Some(vec![prefix]);
        entry.methods = Some(vec![MethodName::parse(&asked.method)?]);
    }
    // A person answering for one VM answers for that VM: other VMs on this PEP are asked themselves.
    if !asked.vm.is_empty() {
        entry.vms = Some(vec![VmName::parse(&asked.vm)?]);
    }
    Ok((list, entry))
}

/// The policy's prefix rule (`path_has_prefix` in `policies/pexi/http.rego`).
fn covers(prefix: &str, path: &str) -> bool {
    path == prefix
        || (prefix.ends_with('/') && path.starts_with(prefix))
        || (!prefix.ends_with('/')
            && path.starts_with(prefix)
            && path.as_bytes().get(prefix.len()) == Some(&b'/'))
}

/// Adds `entry` to `list` of the approvals file at `path` (unless it is there already), atomically: the
/// file is written beside, synced and renamed over the old one, so a reader sees the old file or the new,
/// never half of one. Returns whether it was added.
fn add_to_file(path: &Path, list: &str, entry: &Entry) -> Result<bool, String> {
    let mut file = ApprovalsFile::read(path).map_err(|err| err.to_string())?;
    let entries = if list == "allow" {
        &mut file.allow
    } else {
        &mut file.deny
    };
    if entries.contains(entry) {
        return Ok(false);
    }
    entries.push(entry.clone());
    let text = serde_json::to_string_pretty(&file).map_err(|err| err.to_string())? + "\n";
    write_atomically(path, text.as_bytes())
        .map_err(|err| format!("cannot write {}: {err}", path.display()))?;
    Ok(true)
}

fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let mut name = path.file_name().unwrap_or_default().to_owned();
    name.push(format!(".{}.tmp", std::process::id()));
    let temporary = dir.join(name);
    let result = (|| {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&temporary)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&temporary, path)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&temporary);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn asking(url: &str, decision: &str) -> Asking {
        let parsed = url::Url::parse(url).expect("url");
        Asking {
            request: Shown {
                method: "GET".into(),
                url: url.into(),
                scheme: parsed.scheme().into(),
                host: parsed.host_str().unwrap_or_default().into(),
                port: parsed.port_or_known_default().unwrap_or(0),
                path: parsed.path().into(),
                guest: "g 1".into(),
                session_id: "s".into(),
                vm: String::new(),
            },
            reasons: vec!["host is not in the allowlist".into()],
            scope: AskScope::Host,
            decision_id: decision.into(),
        }
    }

    #[tokio::test]
    async fn identical_requests_share_one_question_and_one_answer() {
        let broker = Broker::new(Duration::from_secs(30), 8);
        let mut first = broker
            .ask(asking("https://a.example/x", "d1"))
            .expect("ask");
        let mut second = broker
            .ask(asking("https://a.example/x", "d2"))
            .expect("ask");
        let other = broker
            .ask(asking("https://a.example/y", "d3"))
            .expect("ask");
        assert!(first.opened && !second.opened && other.opened);
        assert_eq!(first.question.id, second.question.id);
        let waiting = broker.waiting();
        assert_eq!(waiting.len(), 2);
        assert_eq!(waiting[0].waiting, 2);
        assert_eq!(waiting[0].decision_ids, ["d1", "d2"]);
        let taken = broker.begin(&first.question.id).expect("begin");
        assert!(broker.begin(&first.question.id).is_err(), "one answer only");
        assert_eq!(taken.waiting, 2);
        let settled = Settled {
            allow: true,
            answer: "allow_once".into(),
            reason: String::new(),
        };
        broker.finish(&taken.id, settled.clone());
        assert_eq!(first.answer().await, Some(settled.clone()));
        assert_eq!(second.answer().await, Some(settled));
        assert_eq!(broker.waiting().len(), 1);
    }

    #[tokio::test]
    async fn a_sealed_question_names_every_request_it_settles_and_takes_no_newcomer() {
        let broker = Broker::new(Duration::from_secs(30), 8);
        let mut first = broker.ask(asking("https://a.example/", "d1")).expect("ask");
        broker.begin(&first.question.id).expect("begin");
        // Joins while the answer is being carried out (its entry written, the policy reloaded).
        let mut joined = broker
            .ask(asking("https://a.example/", "d2"))
            .expect("join");
        assert!(!joined.opened);
        let sealed = broker.seal(&first.question.id).expect("seal");
        assert_eq!(sealed.decision_ids, ["d1", "d2"]);
        // After the seal an identical request opens its own question, which the first one's end
        // leaves alone.
        let later = broker.ask(asking("https://a.example/", "d3")).expect("ask");
        assert!(later.opened);
        let settled = Settled {
            allow: true,
            answer: "allow_always".into(),
            reason: String::new(),
        };
        broker.finish(&first.question.id, settled.clone());
        assert_eq!(first.answer().await, Some(settled.clone()));
        assert_eq!(joined.answer().await, Some(settled));
        let again = broker
            .ask(asking("https://a.example/", "d4"))
            .expect("join");
        assert_eq!(
            again.question.id, later.question.id,
            "joins the newer question"
        );
    }

    #[test]
    fn concurrent_entries_all_reach_the_file() {
        let dir = std::env::temp_dir().join(format!("pexi-approvals-race-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("approvals.json");
        let broker = Broker::new(Duration::from_secs(1), 8);
        std::thread::scope(|scope| {
            for n in 0..8 {
                let (broker, path) = (&broker, &path);
                scope.spawn(move || {
                    let entry = Entry::host(&format!("h{n}.example")).expect("entry");
                    broker.add_entry(path, "allow", &entry).expect("add");
                });
            }
        });
        assert_eq!(ApprovalsFile::read(&path).expect("read").allow.len(), 8);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn one_session_gets_a_quarter_of_the_places() {
        let broker = Broker::new(Duration::from_secs(30), 8);
        let mut places = Vec::new();
        for n in 0..2 {
            places.push(
                broker
                    .ask(asking(&format!("https://h{n}.example/"), "d"))
                    .expect("ask"),
            );
        }
        assert!(matches!(
            broker.ask(asking("https://h9.example/", "d")),
            Err(AskError::TooManyFromSession(2))
        ));
        // Joining a question already open takes no place.
        assert!(broker.ask(asking("https://h0.example/", "d")).is_ok());
        let mut other = asking("https://h9.example/", "d");
        other.request.session_id = "another".into();
        assert!(broker.ask(other).is_ok(), "another guest still gets asked");
    }

    #[tokio::test]
    async fn a_question_without_an_answer_ends_at_its_deadline() {
        let broker = Broker::new(Duration::from_millis(50), 8);
        let mut place = broker.ask(asking("https://a.example/", "d1")).expect("ask");
        assert_eq!(place.answer().await, None);
    }

    #[test]
    fn questions_are_bounded_and_withdrawn_when_nobody_waits() {
        let broker = Broker::new(Duration::from_secs(30), 8);
        let from = |url: &str, session: usize| {
            let mut asking = asking(url, "d");
            asking.request.session_id = format!("s{session}");
            asking
        };
        let a = broker.ask(from("https://a.example/", 0)).expect("ask");
        for n in 1..8 {
            broker
                .ask(from(&format!("https://b{n}.example/"), n))
                .expect("ask");
        }
        assert!(matches!(
            broker.ask(from("https://c.example/", 9)),
            Err(AskError::TooManyWaiting(8))
        ));
        // Joining an open question needs no new place.
        let a2 = broker
            .ask(asking("https://a.example/", "d4"))
            .expect("join");
        assert!(broker.leave(&a.question.id).is_none(), "one still waits");
        assert!(broker.leave(&a2.question.id).is_some(), "withdrawn");
        assert!(broker.ask(from("https://c.example/", 9)).is_ok());
    }

    #[test]
    fn always_entries_cover_the_request_and_no_more_than_the_scope() {
        let mut question = broker_question("https://api.example.com:8443/v1/chat/x");
        let (list, entry) =
            entry_for(&question, &Answer::AllowAlways { path_prefix: None }).expect("entry");
        assert_eq!(list, "allow");
        assert_eq!(
            serde_json::to_value(&entry).expect("json"),
            serde_json::json!({"host": "api.example.com", "ports": [8443], "schemes": ["https"]})
        );
        let (_, entry) = entry_for(
            &question,
            &Answer::DenyAlways {
                path_prefix: Some("/v1/".into()),
            },
        )
        .expect("entry");
        assert_eq!(
            serde_json::to_value(&entry).expect("json"),
            serde_json::json!({"host": "api.example.com", "ports": [8443], "methods": ["GET"],
                "paths": ["/v1/"], "schemes": ["https"]})
        );
        for prefix in ["/v2/", "/v1/ch", "/v1/chat/x/y"] {
            assert!(
                entry_for(
                    &question,
                    &Answer::AllowAlways {
                        path_prefix: Some(prefix.into())
                    }
                )
                .is_err(),
                "{prefix} does not cover /v1/chat/x"
            );
        }
        question.scope = AskScope::Path;
        assert!(entry_for(&question, &Answer::AllowAlways { path_prefix: None }).is_err());
        question.scope = AskScope::Host;
        for pattern in ["*.example.com", "**.example.com", "10.0.0.0/8"] {
            question.request.host = pattern.into();
            assert!(
                entry_for(&question, &Answer::AllowAlways { path_prefix: None }).is_err(),
                "{pattern} would be a pattern, not the host asked about"
            );
        }
    }

    #[test]
    fn an_answer_for_a_named_vm_is_for_that_vm_only() {
        let mut question = broker_question("https://api.example.com/x");
        question.request.vm = "alice".into();
        let (_, entry) =
            entry_for(&question, &Answer::AllowAlways { path_prefix: None }).expect("entry");
        assert_eq!(
            serde_json::to_value(&entry).expect("json"),
            serde_json::json!({"host": "api.example.com", "ports": [443], "schemes": ["https"],
                "vms": ["alice"]})
        );
    }

    #[test]
    fn two_vms_asking_the_same_thing_get_a_question_each() {
        let broker = Broker::new(Duration::from_secs(30), 8);
        let from = |vm: &str, decision: &str| {
            let mut asked = asking("https://a.example/x", decision);
            asked.request.vm = vm.into();
            broker.ask(asked).expect("ask")
        };
        let (alice, bob, alice_again) =
            (from("alice", "d1"), from("bob", "d2"), from("alice", "d3"));
        assert!(alice.opened && bob.opened && !alice_again.opened);
        assert_ne!(alice.question.id, bob.question.id);
        assert_eq!(alice.question.id, alice_again.question.id);
    }

    fn broker_question(url: &str) -> Question {
        Broker::new(Duration::from_secs(1), 1)
            .ask(asking(url, "d"))
            .expect("ask")
            .question
    }

    #[test]
    fn entries_are_added_once_to_a_private_file() {
        let dir = std::env::temp_dir().join(format!("pexi-approvals-{}", std::process::id()));
        let path = dir.join("approvals.json");
        let _ = std::fs::remove_dir_all(&dir);
        let entry = Entry::host("a.example").expect("entry");
        assert!(add_to_file(&path, "allow", &entry).expect("add"));
        assert!(!add_to_file(&path, "allow", &entry).expect("again"));
        assert!(add_to_file(&path, "deny", &entry).expect("deny"));
        let file = ApprovalsFile::read(&path).expect("read");
        assert_eq!((file.allow.len(), file.deny.len()), (1, 1));
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
