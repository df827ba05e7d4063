//! A policy bundle: the Rego modules, their tests, and the data they decide on, with a revision digest
//! that names exactly this combination in HELLO_ACK and on every audit record.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::entries::Entry;
use super::PolicyError;

/// The default bundle, compiled in beside the embedded config (no data files: everything is denied).
const EMBEDDED: &[(&str, &str)] = &[
    (
        "pexi/http.rego",
        include_str!("../../../policies/pexi/http.rego"),
    ),
    (
        "pexi/http_test.rego",
        include_str!("../../../policies/pexi/http_test.rego"),
    ),
];

/// Where the Rego and data files come from.
#[derive(Clone, Debug)]
pub enum PolicyRoot {
    Embedded,
    Dir(PathBuf),
    /// A verified OPA bundle from a bundle server (docs/fleet.md), and where it came from.
    Remote(std::sync::Arc<super::opa_bundle::OpaBundle>, String),
}

impl PartialEq for PolicyRoot {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (PolicyRoot::Embedded, PolicyRoot::Embedded) => true,
            (PolicyRoot::Dir(a), PolicyRoot::Dir(b)) => a == b,
            (PolicyRoot::Remote(a, x), PolicyRoot::Remote(b, y)) => a.digest == b.digest && x == y,
            _ => false,
        }
    }
}

impl Eq for PolicyRoot {}

impl std::fmt::Display for PolicyRoot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PolicyRoot::Embedded => f.write_str("<embedded policies>"),
            PolicyRoot::Dir(dir) => write!(f, "{}", dir.display()),
            PolicyRoot::Remote(bundle, url) if bundle.manifest_revision.is_empty() => {
                write!(f, "bundle {url} ({})", bundle.digest)
            }
            PolicyRoot::Remote(bundle, url) => write!(
                f,
                "bundle {url} (revision {}, {})",
                bundle.manifest_revision, bundle.digest
            ),
        }
    }
}

#[derive(Clone, Debug)]
pub struct Bundle {
    /// `(relative path, text)` of every `*.rego` that is not a test, sorted by path.
    pub modules: Vec<(String, String)>,
    /// `*_test.rego` files: run before a bundle may serve.
    pub tests: Vec<(String, String)>,
    /// `{"pexi": {"allow": [...], "deny": [...], "index": {...}}}` (the index: `index.rs`).
    pub data: serde_json::Value,
    /// `sha256:` and the hex digest of every file and the merged data.
    pub revision: String,
    /// Every allow and deny entry with where it came from, in list order (`pexi policy list`).
    pub listed: Vec<Listed>,
}

/// One entry of the merged lists and its source.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Listed {
    /// `allow` or `deny`.
    pub list: &'static str,
    /// `config`, a data file's path, or the approvals file's.
    pub source: String,
    pub entry: Entry,
}

/// The approvals settings a bundle is built with: whether the shipped policy asks, and the file that
/// holds the people's "always" answers (docs/approvals.md).
#[derive(Clone, Debug, Default)]
pub struct Approvals {
    pub enabled: bool,
    pub file: Option<PathBuf>,
}

/// The approvals file: entries in the data files' format, so they can be moved into `policies/data`.
#[derive(Clone, Debug, Default, serde::Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApprovalsFile {
    #[serde(default)]
    pub allow: Vec<Entry>,
    #[serde(default)]
    pub deny: Vec<Entry>,
}

impl ApprovalsFile {
    /// Reads `path`; a missing file is an empty one (nothing answered yet).
    pub fn read(path: &Path) -> Result<ApprovalsFile, PolicyError> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                return Ok(ApprovalsFile::default())
            }
            Err(err) => {
                return Err(PolicyError {
                    file: path.display().to_string(),
                    message: err.to_string(),
                })
            }
        };
        serde_json::from_str(&text).map_err(|err| PolicyError {
            file: format!("{}:{}:{}", path.display(), err.line(), err.column()),
            message: err.to_string(),
        })
    }
}

/// A `policies/data/*.json` file (and a bundle's `data.pexi`).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct DataFile {
    #[serde(default)]
    pub allow: Vec<Entry>,
    #[serde(default)]
    pub deny: Vec<Entry>,
}

impl Bundle {
    /// Reads `root` and merges its data files after the configured entries (config.toml and
    /// PEP_ALLOWED_DOMAINS, already validated).
    pub fn load(root: &PolicyRoot, allow: &[Entry], deny: &[Entry]) -> Result<Bundle, PolicyError> {
        Bundle::load_with(root, allow, deny, &Approvals::default())
    }

    /// As [`Bundle::load`], with the approvals file's entries merged last and `data.pexi.approvals`
    /// telling the policy whether it may ask.
    pub fn load_with(
        root: &PolicyRoot,
        allow: &[Entry],
        deny: &[Entry],
        approvals: &Approvals,
    ) -> Result<Bundle, PolicyError> {
        let mut files = match root {
            PolicyRoot::Embedded => EMBEDDED
                .iter()
                .map(|(name, text)| (name.to_string(), text.to_string()))
                .collect(),
            PolicyRoot::Dir(dir) => read_rego_files(dir)?,
            PolicyRoot::Remote(bundle, _) => bundle.rego_files().map_err(|err| PolicyError {
                file: root.to_string(),
                message: err.to_string(),
            })?,
        };
        files.sort();
        let (tests, modules): (Vec<_>, Vec<_>) = files
            .into_iter()
            .partition(|(name, _)| name.ends_with("_test.rego"));
        if modules.is_empty() {
            return Err(PolicyError {
                file: root.to_string(),
                message: "no .rego policy files".into(),
            });
        }
        let mut listed = Vec::new();
        let mut add = |source: &str, allow: &[Entry], deny: &[Entry]| {
            for (list, entries) in [("allow", allow), ("deny", deny)] {
                listed.extend(entries.iter().map(|entry| Listed {
                    list,
                    source: source.to_string(),
                    entry: entry.clone(),
                }));
            }
        };
        add("config", allow, deny);
        let mut allow = allow.to_vec();
        let mut deny = deny.to_vec();
        match root {
            PolicyRoot::Dir(dir) => {
                for (path, file) in read_data_files(&dir.join("data"))? {
                    tracing::debug!(file = %path.display(), allow = file.allow.len(), deny = file.deny.len(), "policy data");
                    add(&path.display().to_string(), &file.allow, &file.deny);
                    allow.extend(file.allow);
                    deny.extend(file.deny);
                }
            }
            PolicyRoot::Remote(bundle, _) => {
                let (bundle_allow, bundle_deny) = bundle.lists().map_err(|err| PolicyError {
                    file: root.to_string(),
                    message: err.to_string(),
                })?;
                add(&root.to_string(), &bundle_allow, &bundle_deny);
                allow.extend(bundle_allow);
                deny.extend(bundle_deny);
            }
            PolicyRoot::Embedded => {}
        }
        if let Some(path) = &approvals.file {
            let file = ApprovalsFile::read(path)?;
            add(&path.display().to_string(), &file.allow, &file.deny);
            allow.extend(file.allow);
            deny.extend(file.deny);
        }
        for entry in &allow {
            let extra = entry.methods.is_some() || entry.paths.is_some() || entry.schemes.is_some();
            if entry.tunnel == Some(true) && extra {
                return Err(PolicyError {
                    file: "policy data".into(),
                    message: format!(
                        "allow entry {}: a tunnel entry names a host and ports only (no methods, paths or schemes: the bytes are opaque)",
                        entry.host
                    ),
                });
            }
        }
        if let Some(entry) = deny.iter().find(|e| e.tunnel.is_some()) {
            return Err(PolicyError {
                file: "policy data".into(),
                message: format!(
                    "deny entry {}: `tunnel` belongs on allow entries (a deny entry refuses tunnels too)",
                    entry.host
                ),
            });
        }
        let index = super::index::build(&allow, &deny);
        let data = serde_json::json!({"pexi": {
            "allow": allow,
            "deny": deny,
            "index": index,
            "approvals": {"enabled": approvals.enabled},
        }});
        let mut hash = Sha256::new();
        for (name, text) in modules.iter().chain(&tests) {
            hash.update(name.as_bytes());
            hash.update([0]);
            hash.update(text.as_bytes());
            hash.update([0]);
        }
        hash.update(data.to_string().as_bytes());
        let revision = format!("sha256:{}", hex::encode(hash.finalize()));
        Ok(Bundle {
            modules,
            tests,
            data,
            revision,
            listed,
        })
    }
}

pub(super) fn read_rego_files(dir: &Path) -> Result<Vec<(String, String)>, PolicyError> {
    let mut out = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(current) = pending.pop() {
        let entries = std::fs::read_dir(&current).map_err(|err| PolicyError {
            file: current.display().to_string(),
            message: err.to_string(),
        })?;
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                pending.push(path);
            } else if path.extension().is_some_and(|e| e == "rego") {
                let text = std::fs::read_to_string(&path).map_err(|err| PolicyError {
                    file: path.display().to_string(),
                    message: err.to_string(),
                })?;
                let name = path
                    .strip_prefix(dir)
                    .unwrap_or(&path)
                    .display()
                    .to_string();
                out.push((name, text));
            }
        }
    }
    Ok(out)
}

pub(super) fn read_data_files(dir: &Path) -> Result<Vec<(PathBuf, DataFile)>, PolicyError> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(Vec::new());
    };
    let mut paths: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    paths.sort();
    paths
        .into_iter()
        .map(|path| {
            let text = std::fs::read_to_string(&path).map_err(|err| PolicyError {
                file: path.display().to_string(),
                message: err.to_string(),
            })?;
            let file: DataFile = serde_json::from_str(&text).map_err(|err| PolicyError {
                file: format!("{}:{}:{}", path.display(), err.line(), err.column()),
                message: err.to_string(),
            })?;
            Ok((path, file))
        })
        .collect()
}
