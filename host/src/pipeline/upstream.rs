//! The upstream client cache: one `reqwest` client per pinned destination, and what its errors mean.

use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::Duration;

use super::failure::RequestError;
use super::resolve::Resolver;
use super::target::{CanonicalHost, Target};
use crate::config::Config;

/// Upstream clients, one per pinned destination, so connections are reused across requests and hops.
///
/// A `reqwest` client is pinned to the addresses its hop was allowed to reach (`resolve_to_addrs`), and
/// its connection pool only ever holds connections to those addresses. Keying the cache by the canonical
/// host, the port and the exact set of checked addresses keeps that guarantee: a request whose resolution
/// (or DNS override) now gives other addresses gets another client, never a pooled connection to an
/// address it was not allowed. Every request is still decided and address-checked before its client is
/// picked; the cache only saves the TLS setup and the TCP (and TLS) handshakes. See docs/benchmarks.md.
pub struct HttpClient {
    extra_roots: Vec<reqwest::Certificate>,
    connect_timeout: Duration,
    idle_timeout: Duration,
    pub(super) resolver: Resolver,
    clients: Mutex<ClientCache>,
}

/// Destinations kept with a warm client; the least recently used is dropped (closing its idle
/// connections) when a new one needs room.
const CLIENT_CACHE_SIZE: usize = 64;
/// Idle upstream connections kept per destination.
const IDLE_PER_DESTINATION: usize = 32;
/// An idle upstream connection is closed after this long.
const POOL_IDLE: Duration = Duration::from_secs(30);

#[derive(Clone, PartialEq, Eq, Hash)]
struct PinnedKey {
    host: String,
    port: u16,
    addrs: Vec<IpAddr>,
}

#[derive(Default)]
struct ClientCache {
    clients: std::collections::HashMap<PinnedKey, (reqwest::Client, u64)>,
    clock: u64,
}

impl HttpClient {
    pub fn new(config: &Config) -> Result<HttpClient, String> {
        let extra_roots = match &config.extra_ca_pem {
            Some(pem) => reqwest::Certificate::from_pem_bundle(pem).map_err(|err| {
                format!("extra CA file {}: {err}", config.pep.network.extra_ca_file)
            })?,
            None => Vec::new(),
        };
        let limits = &config.pep.limits;
        Ok(HttpClient {
            extra_roots,
            connect_timeout: Duration::from_millis(limits.connect_timeout_ms),
            idle_timeout: Duration::from_millis(limits.idle_timeout_ms),
            resolver: Resolver::new(&config.pep.network.dns_overrides, limits.dns_timeout()),
            clients: Mutex::new(ClientCache::default()),
        })
    }

    /// The client for `target` at exactly `addrs`, from the cache or built now.
    pub(super) fn pinned(
        &self,
        target: &Target,
        addrs: &[IpAddr],
    ) -> Result<reqwest::Client, RequestError> {
        let mut sorted = addrs.to_vec();
        sorted.sort();
        sorted.dedup();
        let key = PinnedKey {
            host: target.host.to_string(),
            port: target.port,
            addrs: sorted,
        };
        let mut cache = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        cache.clock += 1;
        let now = cache.clock;
        if let Some((client, used)) = cache.clients.get_mut(&key) {
            *used = now;
            return Ok(client.clone());
        }
        let client = self.build(target, addrs)?;
        if cache.clients.len() >= CLIENT_CACHE_SIZE {
            let oldest = cache
                .clients
                .iter()
                .min_by_key(|(_, (_, used))| *used)
                .map(|(key, _)| key.clone());
            if let Some(oldest) = oldest {
                cache.clients.remove(&oldest);
            }
        }
        cache.clients.insert(key, (client.clone(), now));
        Ok(client)
    }

    /// A client that can reach `target` only at `addrs`: no system DNS, no environment proxies, no
    /// redirects of its own, certificate verification against the Mozilla roots plus the configured CA.
    fn build(&self, target: &Target, addrs: &[IpAddr]) -> Result<reqwest::Client, RequestError> {
        let mut builder = reqwest::Client::builder()
            .use_rustls_tls()
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .referer(false)
            .http1_only()
            .pool_max_idle_per_host(IDLE_PER_DESTINATION)
            .pool_idle_timeout(POOL_IDLE)
            .connect_timeout(self.connect_timeout)
            .read_timeout(self.idle_timeout);
        for root in &self.extra_roots {
            builder = builder.add_root_certificate(root.clone());
        }
        if let CanonicalHost::Dns(name) = &target.host {
            let socket_addrs: Vec<SocketAddr> = addrs
                .iter()
                .map(|ip| SocketAddr::new(*ip, target.port))
                .collect();
            builder = builder.resolve_to_addrs(name, &socket_addrs);
        }
        builder
            .build()
            .map_err(|err| RequestError::Client(err.to_string()))
    }
}

/// Why the upstream request failed, from the error's types rather than its text.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("{0}")]
    Timeout(String),
    /// TLS failed: a certificate that does not verify, or a peer that does not speak TLS.
    #[error("{0}")]
    Tls(String),
    #[error("{0}")]
    Connect(String),
}

impl UpstreamError {
    pub fn classify(err: &reqwest::Error) -> UpstreamError {
        let mut chain = err.to_string();
        let mut source = std::error::Error::source(err);
        while let Some(cause) = source {
            chain.push_str(": ");
            chain.push_str(&cause.to_string());
            source = cause.source();
        }
        if err.is_timeout() {
            UpstreamError::Timeout(chain)
        } else if is_tls_failure(err) {
            UpstreamError::Tls(chain)
        } else {
            UpstreamError::Connect(chain)
        }
    }
}

/// Whether rustls failed somewhere in the chain (a bad certificate, or a peer that does not speak TLS:
/// "received corrupt message" names neither), directly or inside I/O errors (hyper wraps its connector's
/// io::Error in another).
fn is_tls_failure(err: &reqwest::Error) -> bool {
    use tokio_rustls::rustls;
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(err);
    while let Some(cause) = source {
        let mut layer = cause;
        loop {
            if layer.is::<rustls::Error>() {
                return true;
            }
            // io::Error::source skips the error it wraps; look inside it instead.
            match layer
                .downcast_ref::<std::io::Error>()
                .and_then(|io| io.get_ref())
            {
                Some(inner) => layer = inner,
                None => break,
            }
        }
        source = cause.source();
    }
    false
}
