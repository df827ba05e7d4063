//! Where each stream's worker starts: the method decides which part of the pipeline serves it.

use std::sync::Arc;

use pexi_protocol::payload::{ErrorPayload, MethodCall, ResponseHead};

use super::Pipeline;
use crate::audit::records::Outcome;
use crate::stream::StreamRequest;

impl Pipeline {
    /// The worker of one stream: runs the method and answers the guest. Cancellation (guest CANCEL,
    /// session reset, shutdown) drops the work in flight, which aborts the upstream connection.
    pub async fn serve_stream(self: Arc<Self>, request: StreamRequest) {
        let StreamRequest {
            caller,
            call,
            body,
            responder,
            cancel,
            slot,
        } = request;
        // The stream's place among all streams goes when this worker ends.
        let _slot = slot;
        match call {
            MethodCall::PolicyCheck(params) => match self.policy_check(&caller, &params).await {
                Ok(decision) => {
                    if responder
                        .head(ResponseHead::PolicyDecision(decision))
                        .is_ok()
                    {
                        responder.end();
                    }
                }
                Err(error) => {
                    let logged_decision = error.decision_id().is_some();
                    let error = ErrorPayload::from(error);
                    // A refusal before any decision (a malformed request, a secret it may not name) is
                    // the stream's outcome; a decision was logged already and needs none.
                    if !logged_decision {
                        self.log_outcome(
                            &caller,
                            "pep.policy.check",
                            None,
                            Outcome {
                                error: Some(error.code.as_str().to_string()),
                                message: Some(error.message.clone()),
                                ..Outcome::default()
                            },
                        );
                    }
                    responder.error(error)
                }
            },
            MethodCall::NetConnect(params) => {
                self.serve_tunnel(caller, params, body, responder, cancel)
                    .await;
            }
            MethodCall::HttpRequest(params) => {
                self.serve_http(caller, params, body, responder, cancel)
                    .await;
            }
        }
    }
}
