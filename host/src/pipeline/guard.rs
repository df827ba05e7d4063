//! Steps 4–5 of a hop, after its allow: resolve the destination and keep only the addresses the guard
//! permits (docs/threat-model.md), logging what was found and what was refused.

use std::net::IpAddr;

use super::resolve::ResolveError;
use super::target::Destination;
use super::Pipeline;
use crate::audit::records::{RefusedAddress, Resolve};

/// Why a hop has no address to connect to.
#[derive(Debug, thiserror::Error)]
pub enum GuardError {
    #[error(transparent)]
    Resolve(#[from] ResolveError),
    /// Every address the name has is of a refused class (loopback, private, metadata, ...).
    #[error("{host} resolves only to refused addresses")]
    AllRefused {
        host: String,
        /// `address: class` for each.
        refused: Vec<String>,
        decision_id: String,
    },
}

impl Pipeline {
    /// Steps 4–5: the addresses this hop may connect to, or why there are none. Logged either way.
    pub(super) async fn allowed_addresses(
        &self,
        destination: Destination<'_>,
        decision_id: &str,
    ) -> Result<Vec<IpAddr>, GuardError> {
        let host = destination.host();
        let resolved = self.http.resolver.resolve(host, destination.port()).await;
        let (source, addrs) = match resolved {
            Ok(found) => found,
            Err(error) => {
                self.record(&Resolve {
                    decision_id: decision_id.to_string(),
                    host: host.to_string(),
                    source: None,
                    allowed: None,
                    refused: None,
                    error: Some(error.to_string()),
                });
                return Err(error.into());
            }
        };
        let mut allowed = Vec::new();
        let mut refused = Vec::new();
        for ip in addrs {
            match self.guard.check_to(ip, destination.port()) {
                Ok(()) => allowed.push(ip),
                Err(class) => refused.push((ip, class.0)),
            }
        }
        self.record(&Resolve {
            decision_id: decision_id.to_string(),
            host: host.to_string(),
            source: Some(source.as_str().to_string()),
            allowed: Some(allowed.iter().map(ToString::to_string).collect()),
            refused: Some(
                refused
                    .iter()
                    .map(|(ip, class)| RefusedAddress {
                        address: ip.to_string(),
                        class: class.to_string(),
                    })
                    .collect(),
            ),
            error: None,
        });
        if allowed.is_empty() {
            return Err(GuardError::AllRefused {
                host: host.to_string(),
                refused: refused
                    .iter()
                    .map(|(ip, class)| format!("{ip}: {class}"))
                    .collect(),
                decision_id: decision_id.to_string(),
            });
        }
        Ok(allowed)
    }
}
