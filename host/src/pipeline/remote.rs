//! The last good bundle from the bundle server (docs/fleet.md), kept on disk so a PEP that starts while
//! the server is unreachable serves what it served before: `bundle.tar.gz` with its `bundle.etag`, in
//! `[pep.policy.bundle] dir`, written whole (beside, synced, renamed). Read back, it is verified again with
//! the configured key: the disk is trusted no more than the network.

use std::path::Path;
use std::sync::Arc;

use crate::config::Config;
use crate::policy::opa_bundle::OpaBundle;

const ARCHIVE: &str = "bundle.tar.gz";
const ETAG: &str = "bundle.etag";

/// The last good bundle on disk, verified, or `None` (none kept, no bundle configured, or it fails to
/// verify now, which is logged).
pub fn last_good(config: &Config) -> Option<Arc<OpaBundle>> {
    let settings = &config.pep.policy.bundle;
    if !settings.enabled() {
        return None;
    }
    let path = settings.dir_path(&config.pep.audit).join(ARCHIVE);
    let archive = match std::fs::read(&path) {
        Ok(archive) => archive,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return None,
        Err(err) => {
            tracing::warn!(path = %path.display(), %err, "the last good bundle cannot be read");
            return None;
        }
    };
    let verified = settings.verification_key().and_then(|key| {
        let bundle = OpaBundle::parse(&archive, settings.limits()).map_err(|e| e.to_string())?;
        bundle.verify(&key).map_err(|e| e.to_string())?;
        Ok(bundle)
    });
    match verified {
        Ok(bundle) => Some(Arc::new(bundle)),
        Err(err) => {
            tracing::error!(path = %path.display(), %err, "the last good bundle on disk does not verify; not used");
            None
        }
    }
}

/// The ETag the kept bundle was served with, for `If-None-Match`.
pub fn last_etag(config: &Config) -> Option<String> {
    let dir = config.pep.policy.bundle.dir_path(&config.pep.audit);
    if !dir.join(ARCHIVE).exists() {
        return None;
    }
    std::fs::read_to_string(dir.join(ETAG))
        .ok()
        .map(|etag| etag.trim().to_string())
        .filter(|etag| !etag.is_empty())
}

/// Keeps `archive` (verified and in service) as the last good bundle.
pub fn keep(config: &Config, archive: &[u8], etag: Option<&str>) -> std::io::Result<()> {
    let dir = config.pep.policy.bundle.dir_path(&config.pep.audit);
    crate::dirs::ensure_private_all(std::slice::from_ref(&dir))
        .map_err(|err| std::io::Error::other(err.to_string()))?;
    write_whole(&dir, ARCHIVE, archive)?;
    write_whole(&dir, ETAG, etag.unwrap_or_default().as_bytes())
}

fn write_whole(dir: &Path, name: &str, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let temp = dir.join(format!(".{name}.tmp"));
    let mut file = std::fs::File::create(&temp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&temp, dir.join(name))?;
    std::fs::File::open(dir)?.sync_all()
}
