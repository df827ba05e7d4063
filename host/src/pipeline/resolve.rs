//! Step 4: resolve a name, only after policy allowed it (a lookup of a denied name would itself leak data).
//! Configured overrides answer first, so tests use real names that lead to loopback without touching DNS;
//! otherwise the system resolver runs under a timeout.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Duration;

use super::target::{unmap, CanonicalHost};

/// Why a name has no addresses; answered with `dns_failure`.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ResolveError {
    #[error("resolving {name} timed out after {after:?}")]
    Timeout { name: String, after: Duration },
    #[error("resolving {name} failed: {message}")]
    Failed { name: String, message: String },
    #[error("{name} has no addresses")]
    NoAddresses { name: String },
}

pub struct Resolver {
    overrides: BTreeMap<String, Vec<IpAddr>>,
    timeout: Duration,
}

/// Where the addresses came from, for the audit log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    Literal,
    Override,
    Dns,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Literal => "literal",
            Source::Override => "override",
            Source::Dns => "dns",
        }
    }
}

impl Resolver {
    pub fn new(overrides: &BTreeMap<String, Vec<IpAddr>>, timeout: Duration) -> Self {
        Resolver {
            overrides: overrides
                .iter()
                .map(|(name, addrs)| {
                    let name = name.trim_end_matches('.').to_ascii_lowercase();
                    (name, addrs.clone())
                })
                .collect(),
            timeout,
        }
    }

    pub async fn resolve(
        &self,
        host: &CanonicalHost,
        port: u16,
    ) -> Result<(Source, Vec<IpAddr>), ResolveError> {
        let name = match host {
            CanonicalHost::Ip(ip) => return Ok((Source::Literal, vec![*ip])),
            CanonicalHost::Dns(name) => name,
        };
        if let Some(addrs) = self.overrides.get(name) {
            return Ok((Source::Override, addrs.clone()));
        }
        let lookup = tokio::net::lookup_host((name.as_str(), port));
        match tokio::time::timeout(self.timeout, lookup).await {
            Err(_) => Err(ResolveError::Timeout {
                name: name.clone(),
                after: self.timeout,
            }),
            Ok(Err(err)) => Err(ResolveError::Failed {
                name: name.clone(),
                message: err.to_string(),
            }),
            Ok(Ok(addrs)) => {
                let mut ips: Vec<IpAddr> = Vec::new();
                for addr in addrs {
                    let ip = match addr.ip() {
                        IpAddr::V6(v6) => unmap(v6),
                        v4 => v4,
                    };
                    if !ips.contains(&ip) {
                        ips.push(ip);
                    }
                }
                if ips.is_empty() {
                    Err(ResolveError::NoAddresses { name: name.clone() })
                } else {
                    Ok((Source::Dns, ips))
                }
            }
        }
    }
}
