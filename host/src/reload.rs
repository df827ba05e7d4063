//! Hot reload of the policy bundle. SIGHUP reloads at once; otherwise the config file, every file under
//! the policy directory and the approvals file are fingerprinted every `reload_check_ms`, and a change
//! triggers a reload (with the embedded config, of the approvals file alone). A
//! reload swaps in the new bundle only if it compiles, passes its own tests and decides a probe request
//! (see [`Pipeline::reload_policy`]); until then, and if it fails, the old bundle keeps deciding.

use std::hash::{Hash, Hasher};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::pipeline::Pipeline;
use crate::policy::PolicyRoot;

pub async fn watch(pipeline: Arc<Pipeline>, shutdown: CancellationToken) {
    // Installed even for the embedded config: SIGHUP's default action would end the process.
    let mut hangup = signal(SignalKind::hangup()).ok();
    let interval = Duration::from_millis(pipeline.config.pep.policy.reload_check_ms.max(50));
    let mut last = fingerprint(&pipeline.config);
    loop {
        let hup = async {
            match hangup.as_mut() {
                Some(h) => {
                    h.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = hup => reload(&pipeline, "SIGHUP").await,
            _ = tokio::time::sleep(interval) => {
                let now = fingerprint(&pipeline.config);
                if now != last {
                    last = now;
                    reload(&pipeline, "file change").await;
                }
            }
        }
    }
}

async fn reload(pipeline: &Arc<Pipeline>, trigger: &'static str) {
    // Compiling and testing a bundle is CPU work: keep it off the runtime's threads.
    let worker = pipeline.clone();
    match tokio::task::spawn_blocking(move || worker.reload_policy()).await {
        Ok(Ok(Some(revision))) => tracing::info!(trigger, %revision, "policy reloaded"),
        Ok(Ok(None)) => tracing::debug!(trigger, "policy unchanged"),
        Ok(Err(error)) => {
            tracing::error!(trigger, %error, "policy reload rejected; the previous policy keeps serving")
        }
        Err(err) => {
            tracing::error!(trigger, %err, "policy reload panicked; the previous policy keeps serving")
        }
    }
}

/// A hash of the config file and every file under the policy directory (names and contents).
fn fingerprint(config: &Config) -> u64 {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    if let Some(path) = &config.path {
        hash_file(path, &mut hasher);
    }
    hash_file(
        &config.pep.approvals.file_path(&config.pep.audit),
        &mut hasher,
    );
    if let PolicyRoot::Dir(dir) = &config.policy_root {
        let mut files = Vec::new();
        collect(dir, &mut files);
        files.sort();
        for file in files {
            hash_file(&file, &mut hasher);
        }
    }
    hasher.finish()
}

fn hash_file(path: &Path, hasher: &mut impl Hasher) {
    path.hash(hasher);
    std::fs::read(path).unwrap_or_default().hash(hasher);
}

fn collect(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            collect(&path, out);
        } else {
            out.push(path);
        }
    }
}
