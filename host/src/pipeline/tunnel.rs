//! `pep.net.connect`: an opaque TCP tunnel, for destinations the policy marks tunnel-only (clients that pin
//! their server's certificate, so the guest proxy cannot terminate their TLS). The same steps as an HTTP
//! hop: the host canonicalised, a decision logged first, resolution only after an allow, the address
//! guard, a connection to exactly a checked address; then bytes both ways, counted, never inspected, no
//! credential injected. Bounded like upgraded connections: idle timeout and `max_upgraded_bytes`.

use crate::audit::records::{Outcome, TunnelBytes};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use pexi_protocol::payload::{ErrorPayload, NetConnect, NetConnectHead, ResponseHead};
use tokio_util::sync::CancellationToken;

use super::failure::RequestError;
use super::input::Asked;
use super::target::{Destination, Endpoint};
use super::{Caller, Pipeline};
use crate::stream::{RequestBody, Responder};

const METHOD: &str = "pep.net.connect";

impl Pipeline {
    /// The worker of one `pep.net.connect` stream.
    pub async fn serve_tunnel(
        self: &Arc<Self>,
        caller: Caller,
        params: NetConnect,
        body: RequestBody,
        responder: Responder,
        cancel: CancellationToken,
    ) {
        let started = std::time::Instant::now();
        let decided = std::sync::Mutex::new(None::<String>);
        let work = self.tunnel(&caller, &params, body, &responder, &decided);
        let result = tokio::select! {
            _ = cancel.cancelled() => Err(RequestError::Cancelled),
            result = work => result,
        };
        let decision_id = decided.lock().unwrap_or_else(|p| p.into_inner()).take();
        let duration_ms = started.elapsed().as_millis() as u64;
        match result {
            Ok((address, to_upstream, to_guest)) => {
                self.log_outcome(
                    &caller,
                    METHOD,
                    decision_id.as_deref(),
                    Outcome {
                        tunnel: Some(TunnelBytes {
                            address: address.to_string(),
                            bytes_to_upstream: to_upstream,
                            bytes_to_guest: to_guest,
                        }),
                        duration_ms: Some(duration_ms),
                        ..Outcome::default()
                    },
                );
                responder.end();
            }
            Err(error) => {
                let error = ErrorPayload::from(error);
                self.log_outcome(
                    &caller,
                    METHOD,
                    decision_id.as_deref(),
                    Outcome {
                        error: Some(error.code.as_str().to_string()),
                        message: Some(error.message.clone()),
                        duration_ms: Some(duration_ms),
                        ..Outcome::default()
                    },
                );
                responder.error(error);
            }
        }
    }

    async fn tunnel(
        &self,
        caller: &Caller,
        params: &NetConnect,
        body: RequestBody,
        responder: &Responder,
        decided: &std::sync::Mutex<Option<String>>,
    ) -> Result<(String, u64, u64), RequestError> {
        // A bare DNS name or IP literal only, canonicalised as an HTTP host is: URL syntax would let the
        // parsed destination differ from the one the guest names and the policy decides.
        let endpoint = Endpoint::parse(&params.host, params.port)?;
        let logged = self
            .decide(caller, METHOD, Asked::Tcp(&endpoint), 0, None)
            .await?;
        *decided.lock().unwrap_or_else(|p| p.into_inner()) = Some(logged.decision_id.clone());
        if !logged.decision.allow {
            return Err(Pipeline::denied(&logged));
        }
        let addrs = self
            .allowed_addresses(Destination::Tcp(&endpoint), &logged.decision_id)
            .await?;
        let timeout = Duration::from_millis(self.config.pep.limits.connect_timeout_ms);
        let mut last_error = String::from("no address");
        let mut stream = None;
        for ip in addrs {
            let address = SocketAddr::new(ip, endpoint.port);
            match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(address)).await {
                Ok(Ok(connected)) => {
                    stream = Some((address, connected));
                    break;
                }
                Ok(Err(err)) => last_error = format!("{address}: {err}"),
                Err(_) => last_error = format!("{address}: no answer within {timeout:?}"),
            }
        }
        let (address, stream) = stream.ok_or_else(|| RequestError::TunnelConnect {
            host: endpoint.host.to_string(),
            last: last_error,
        })?;
        let _ = stream.set_nodelay(true);
        let head = NetConnectHead {
            address: address.to_string(),
            decision_id: logged.decision_id.clone(),
        };
        responder
            .head(ResponseHead::NetConnect(head))
            .map_err(|refused| RequestError::head_refused(refused, None))?;
        let (to_upstream, to_guest) = self.relay_upgraded(stream, Some(body), responder).await?;
        Ok((address.to_string(), to_upstream, to_guest))
    }
}
