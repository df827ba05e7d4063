//! Step 3, when the policy asks (docs/approvals.md): the hop is held while a person is asked, through the
//! question [`crate::approvals::Broker`] keeps. Nothing of the request is resolved or sent meanwhile. An
//! answer is audited, and durable, before any request waiting on it goes on; an "always" answer is first
//! written into the approvals file and the policy reloaded, so the next identical request is decided by
//! the policy without a question.

use serde_json::json;

use super::failure::RequestError;
use super::{Logged, Pipeline};
use crate::approvals::{entry_for, Answer, AnswerError, Asking, Question, Settled};
use crate::audit::records::{ApprovalAnswer, ApprovalQuestion};
use crate::policy::AskScope;

/// Who answered, and through which surface.
#[derive(Clone, Debug)]
pub struct Answerer {
    pub by: String,
    pub surface: String,
}

impl Answerer {
    fn pep() -> Answerer {
        Answerer {
            by: "pep".into(),
            surface: "pep".into(),
        }
    }
}

/// Leaves a question when the request waiting on it goes away (its stream cancelled, the session gone):
/// the last one to leave withdraws it.
struct Leave<'a> {
    pipeline: &'a Pipeline,
    id: String,
    armed: bool,
}

impl Drop for Leave<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        if let Some(question) = self.pipeline.approvals.leave(&self.id) {
            self.pipeline
                .settled(&question, "withdrawn", &Answerer::pep(), None);
        }
    }
}

impl Pipeline {
    /// Holds a hop whose decision asks until a person answers: `Ok` to go on as allowed, or the denial.
    pub(super) async fn ask_person(&self, logged: &Logged) -> Result<(), RequestError> {
        let seen = &logged.seen;
        let denied = |reason: String| RequestError::Denied {
            reasons: vec![reason],
            decision_id: logged.decision_id.clone(),
        };
        let scope = logged
            .decision
            .ask
            .as_ref()
            .map_or(AskScope::Host, |ask| ask.scope);
        let asking = Asking {
            request: seen.clone(),
            reasons: logged.decision.reasons.clone(),
            scope,
            decision_id: logged.decision_id.clone(),
        };
        let mut place = self
            .approvals
            .ask(asking)
            .map_err(|err| denied(err.to_string()))?;
        let id = place.question.id.clone();
        if place.opened {
            self.record(&ApprovalQuestion {
                question_id: id.clone(),
                decision_id: logged.decision_id.clone(),
                session_id: seen.session_id.clone(),
                guest: seen.guest.clone(),
                method: seen.method.clone(),
                url: seen.url.clone(),
                host: seen.host.clone(),
                reasons: logged.decision.reasons.clone(),
                scope: scope.as_str().to_string(),
                timeout_ms: self.config.pep.approvals.approval_timeout_ms,
            });
        }
        self.activity.publish(json!({
            "type": "question",
            "question": self.approvals.waiting().into_iter().find(|q| q.id == id),
        }));
        let mut leave = Leave {
            pipeline: self,
            id: id.clone(),
            armed: true,
        };
        let settled = match place.answer().await {
            Some(settled) => settled,
            None => self.no_answer(&mut place).await,
        };
        leave.armed = false;
        if settled.allow {
            Ok(())
        } else {
            Err(denied(settled.reason))
        }
    }

    /// The deadline passed: the first request to see it ends the question for all of them, unless an
    /// answer is being carried out (an entry written, a reload, an audit write): then that answer counts.
    async fn no_answer(&self, place: &mut crate::approvals::Place) -> Settled {
        let timeout = self.config.pep.approvals.approval_timeout_ms;
        let settled = Settled {
            allow: false,
            answer: "no_answer".into(),
            reason: format!("no answer: nobody answered within {timeout} ms"),
        };
        let id = place.question.id.clone();
        match self.approvals.begin(&id) {
            Ok(question) => {
                let question = self.approvals.seal(&id).unwrap_or(question);
                // Denied either way: no need to wait for the record before saying so.
                drop(self.settled(&question, "no_answer", &Answerer::pep(), None));
                self.approvals.finish(&id, settled.clone());
                settled
            }
            Err(_) => place
                .answer_within(std::time::Duration::from_secs(30))
                .await
                .unwrap_or(settled),
        }
    }

    /// The questions waiting now.
    pub fn questions(&self) -> Vec<Question> {
        self.approvals.waiting()
    }

    /// A person's answer to question `id`. Carried out before it returns: an "always" entry written and in
    /// force, the answer durable in the audit log, then the waiting requests released.
    pub async fn answer(
        self: &std::sync::Arc<Self>,
        id: &str,
        answer: Answer,
        answerer: Answerer,
    ) -> Result<Settled, AnswerError> {
        let question = self.approvals.begin(id)?;
        let mut written = None;
        if matches!(
            answer,
            Answer::AllowAlways { .. } | Answer::DenyAlways { .. }
        ) {
            let (list, entry) = match entry_for(&question, &answer) {
                Ok(found) => found,
                Err(err) => {
                    self.approvals.abandon(id);
                    return Err(AnswerError::Invalid(err));
                }
            };
            let path = self.config.pep.approvals.file_path(&self.config.pep.audit);
            let pipeline = self.clone();
            let (saved_path, saved_entry) = (path.clone(), entry.clone());
            // Writing, syncing and recompiling the bundle are blocking work.
            let saved = tokio::task::spawn_blocking(move || {
                pipeline
                    .approvals
                    .add_entry(&saved_path, list, &saved_entry)?;
                pipeline.reload_policy().map(|_| ())
            })
            .await
            .unwrap_or_else(|err| Err(err.to_string()));
            if let Err(err) = saved {
                self.approvals.abandon(id);
                return Err(AnswerError::Invalid(format!(
                    "the entry could not be put in force, so nothing was answered: {err}"
                )));
            }
            written = Some((list, entry, path));
        }
        let settled = Settled {
            allow: answer.allows(),
            answer: answer.name().into(),
            reason: format!(
                "denied by {} through {} ({})",
                answerer.by,
                answerer.surface,
                answer.name()
            ),
        };
        // Requests that joined while the entry was written are settled too: the record names them.
        let question = self.approvals.seal(id).unwrap_or(question);
        let ticket = self.settled(&question, answer.name(), &answerer, written);
        if let Err(err) = ticket.done().await {
            // Not durable: nothing may act on it. The requests are denied; the entry (if any) stays,
            // as its own reload record says.
            let failed = Settled {
                allow: false,
                answer: settled.answer.clone(),
                reason: format!("the answer could not be logged: {err}"),
            };
            self.approvals.finish(id, failed.clone());
            return Ok(failed);
        }
        self.approvals.finish(id, settled.clone());
        Ok(settled)
    }

    /// Audits how a question ended (the ticket completes once it is durable) and tells the watchers.
    fn settled(
        &self,
        question: &Question,
        answer: &str,
        answerer: &Answerer,
        written: Option<(&str, crate::policy::entries::Entry, std::path::PathBuf)>,
    ) -> crate::audit::Ticket {
        let record = ApprovalAnswer {
            question_id: question.id.clone(),
            answer: answer.to_string(),
            by: answerer.by.clone(),
            surface: answerer.surface.clone(),
            decision_ids: question.decision_ids.clone(),
            entry: written.as_ref().map(|(_, entry, _)| json!(entry)),
            list: written.as_ref().map(|(list, _, _)| list.to_string()),
            file: written
                .as_ref()
                .map(|(_, _, path)| path.display().to_string()),
        };
        self.activity.publish(json!({
            "type": "answer",
            "question_id": question.id,
            "answer": answer,
            "by": answerer.by,
            "surface": answerer.surface,
            "host": question.request.host,
        }));
        self.record_ticket(&record)
    }
}
