//! Keeping the policy in step with an OPA bundle server (`[pep.policy.bundle]`, docs/fleet.md): a GET of
//! the bundle's URL at start and every `poll_seconds`, with the last ETag in `If-None-Match`. A new
//! bundle is verified (`crate::policy::opa_bundle`) and put in service through the reload gate
//! ([`Pipeline::activate_bundle`]), then kept on disk as the last good one. This is the PEP's own
//! traffic to a server its operator named: it goes through no guest policy, and every download, refusal
//! and outage is an audit record (`bundle`).

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::audit::records::BundleFetch;
use crate::metrics::BundlePollLabels;
use crate::pipeline::remote;
use crate::pipeline::Pipeline;
use crate::policy::opa_bundle::{OpaBundle, VerificationKey};

struct Sync {
    pipeline: Arc<Pipeline>,
    client: reqwest::Client,
    key: VerificationKey,
    url: String,
    /// The URL as records show it: no user info, no query.
    shown_url: String,
    etag: Option<String>,
    /// Set while the server cannot be reached, so an outage is one record, not one per poll.
    unreachable: bool,
    /// What the last refusal was about (the failure, or the digest of a bundle the reload gate refused),
    /// so the same bad bundle is one record, and one the gate refused is not tried again every poll.
    refused: Option<String>,
}

/// Polls once before guests are served (bounded by `timeout_ms`), so a reachable server's newest bundle
/// serves from the first request; then every `poll_seconds` until `shutdown`.
pub(crate) async fn start(
    pipeline: Arc<Pipeline>,
    shutdown: CancellationToken,
    tasks: &TaskTracker,
) -> Result<(), String> {
    let settings = pipeline.config.pep.policy.bundle.clone();
    if !settings.enabled() {
        return Ok(());
    }
    let mut builder = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_millis(settings.timeout_ms.max(100)))
        .redirect(reqwest::redirect::Policy::limited(5));
    if !settings.ca_file.as_os_str().is_empty() {
        let failed = |err: &dyn std::fmt::Display| {
            format!(
                "pep.policy.bundle.ca_file {}: {err}",
                settings.ca_file.display()
            )
        };
        let pem = std::fs::read(&settings.ca_file).map_err(|err| failed(&err))?;
        for cert in reqwest::Certificate::from_pem_bundle(&pem).map_err(|err| failed(&err))? {
            builder = builder.add_root_certificate(cert);
        }
    }
    let client = builder
        .build()
        .map_err(|err| format!("pep.policy.bundle: {err}"))?;
    let in_service = pipeline.remote_bundle();
    if let Some(bundle) = &in_service {
        pipeline.record(&BundleFetch {
            event: "last_good".into(),
            url: shown(&settings.url),
            digest: Some(bundle.digest.clone()),
            revision: Some(bundle.manifest_revision.clone()),
            bytes: None,
            etag: None,
            error: None,
        });
    }
    let mut sync = Sync {
        key: settings.verification_key()?,
        client,
        shown_url: shown(&settings.url),
        url: settings.url.clone(),
        etag: in_service.and_then(|_| remote::last_etag(&pipeline.config)),
        unreachable: false,
        refused: None,
        pipeline,
    };
    sync.poll().await;
    let every = Duration::from_secs(settings.poll_seconds.max(1));
    tasks.spawn(async move {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(every) => {}
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = sync.poll() => {}
            }
        }
    });
    Ok(())
}

fn shown(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut url) => {
            let _ = url.set_username("");
            let _ = url.set_password(None);
            url.set_query(None);
            url.to_string()
        }
        Err(_) => url.to_string(),
    }
}

/// Why a poll brought nothing new into service.
enum Fetched {
    NotModified,
    Bundle(Vec<u8>, Option<String>),
    /// Larger than `max_bytes`: refused without reading the rest.
    TooLarge(u64),
}

impl Sync {
    fn count(&self, result: &'static str) {
        self.pipeline
            .metrics
            .bundle_polls
            .get_or_create(&BundlePollLabels { result })
            .inc();
    }

    fn record(
        &self,
        event: &str,
        bundle: Option<&OpaBundle>,
        bytes: Option<u64>,
        error: Option<String>,
    ) {
        self.pipeline.record(&BundleFetch {
            event: event.into(),
            url: self.shown_url.clone(),
            digest: bundle.map(|b| b.digest.clone()),
            revision: bundle.map(|b| b.manifest_revision.clone()),
            bytes,
            etag: self.etag.clone(),
            error,
        });
    }

    async fn poll(&mut self) {
        let fetched = match self.fetch().await {
            Ok(fetched) => {
                self.unreachable = false;
                fetched
            }
            Err(err) => {
                self.count("unreachable");
                if !self.unreachable {
                    tracing::warn!(url = %self.shown_url, %err, "bundle server unreachable; the bundle in service keeps serving");
                    self.record("unreachable", None, None, Some(err));
                    self.unreachable = true;
                }
                return;
            }
        };
        let (archive, etag) = match fetched {
            Fetched::NotModified => {
                self.count("not_modified");
                return;
            }
            Fetched::Bundle(archive, etag) => (archive, etag),
            Fetched::TooLarge(max) => {
                self.count("refused");
                let error = format!("the bundle is over max_bytes ({max})");
                if self.refused.as_deref() != Some(error.as_str()) {
                    tracing::error!(url = %self.shown_url, %error, "bundle refused; the bundle in service keeps serving");
                    self.record("refused", None, None, Some(error.clone()));
                    self.refused = Some(error);
                }
                return;
            }
        };
        let key = self.key.clone();
        let limits = self.pipeline.config.pep.policy.bundle.limits();
        let size = archive.len() as u64;
        let checked = tokio::task::spawn_blocking(move || {
            let bundle = OpaBundle::parse(&archive, limits)?;
            bundle.verify(&key).map(|()| (bundle, archive))
        })
        .await;
        let (bundle, archive) = match checked {
            Ok(Ok(verified)) => verified,
            Ok(Err(err)) => {
                self.count("refused");
                let digest = format!("size {size}: {err}");
                if self.refused.as_deref() != Some(digest.as_str()) {
                    tracing::error!(url = %self.shown_url, %err, "bundle refused; the bundle in service keeps serving");
                    self.record("refused", None, Some(size), Some(err.to_string()));
                    self.refused = Some(digest);
                }
                return;
            }
            Err(err) => {
                tracing::error!(%err, "bundle verification stopped");
                return;
            }
        };
        if self.refused.as_deref() == Some(bundle.digest.as_str()) {
            self.etag = etag;
            self.count("refused");
            return;
        }
        self.refused = None;
        if self
            .pipeline
            .remote_bundle()
            .is_some_and(|current| current.digest == bundle.digest)
        {
            self.etag = etag;
            self.count("unchanged");
            return;
        }
        self.etag = etag;
        self.record("download", Some(&bundle), Some(size), None);
        let bundle = Arc::new(bundle);
        let pipeline = self.pipeline.clone();
        let activating = bundle.clone();
        let activated =
            tokio::task::spawn_blocking(move || pipeline.activate_bundle(activating)).await;
        match activated {
            Ok(Ok(_)) => {
                self.count("activated");
                tracing::info!(url = %self.shown_url, revision = %bundle.manifest_revision, digest = %bundle.digest, "bundle in service");
                let (config, etag) = (self.pipeline.clone(), self.etag.clone());
                let kept = tokio::task::spawn_blocking(move || {
                    remote::keep(&config.config, &archive, etag.as_deref())
                })
                .await;
                if let Ok(Err(err)) = kept {
                    tracing::warn!(%err, "the bundle in service could not be kept on disk");
                }
            }
            Ok(Err(err)) => {
                // Audited by the gate (`policy` reload_rejected); not tried again until the server
                // serves another bundle.
                self.count("refused");
                self.refused = Some(bundle.digest.clone());
                tracing::error!(url = %self.shown_url, %err, "bundle refused by the reload gate; the bundle in service keeps serving");
            }
            Err(err) => tracing::error!(%err, "bundle activation stopped"),
        }
    }

    async fn fetch(&self) -> Result<Fetched, String> {
        let mut request = self.client.get(&self.url);
        if let Some(etag) = &self.etag {
            request = request.header(reqwest::header::IF_NONE_MATCH, etag);
        }
        let mut response = request.send().await.map_err(|err| err.to_string())?;
        let status = response.status();
        if status == reqwest::StatusCode::NOT_MODIFIED {
            return Ok(Fetched::NotModified);
        }
        if !status.is_success() {
            return Err(format!("HTTP {status}"));
        }
        let etag = response
            .headers()
            .get(reqwest::header::ETAG)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let max = self.pipeline.config.pep.policy.bundle.max_bytes;
        let mut archive = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(|err| err.to_string())? {
            archive.extend_from_slice(&chunk);
            if archive.len() as u64 > max {
                return Ok(Fetched::TooLarge(max));
            }
        }
        Ok(Fetched::Bundle(archive, etag))
    }
}
