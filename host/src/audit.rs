//! The audit log as issue 3 needs it: one JSON object per line, appended, never rewritten, with secrets
//! redacted before anything is written. Decisions are written (and handed to the OS) before their effect
//! starts. The audit issue replaces this with the hash-chained, crash-safe log; the record shapes stay.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

pub struct AuditLog {
    path: PathBuf,
    file: Mutex<File>,
}

impl AuditLog {
    pub fn open(path: &Path) -> std::io::Result<AuditLog> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        // Owner-only: request metadata is sensitive even after redaction.
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(path)?;
        Ok(AuditLog {
            path: path.to_path_buf(),
            file: Mutex::new(file),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends `record` with a timestamp as one line. A failure to write is returned: the caller must not
    /// perform an effect whose decision could not be logged.
    pub fn append(&self, kind: &str, mut record: Value) -> std::io::Result<()> {
        let ts = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0);
        if let Some(object) = record.as_object_mut() {
            object.insert("ts_ms".into(), json!(ts));
            object.insert("kind".into(), json!(kind));
        }
        let mut line = serde_json::to_vec(&record)?;
        line.push(b'\n');
        // A poisoned lock only means another writer panicked mid-call; the file itself is still usable.
        let mut file = self
            .file
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        file.write_all(&line)
    }

    pub fn flush(&self) -> std::io::Result<()> {
        let file = self
            .file
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        file.sync_data()
    }
}

/// What must never reach the log or the policy input in clear.
#[derive(Clone, Debug)]
pub struct Redactor {
    headers: Vec<String>,
    query_params: Vec<String>,
}

pub const REDACTED: &str = "[redacted]";

impl Redactor {
    pub fn new(headers: &[String], query_params: &[String]) -> Self {
        Redactor {
            headers: headers.iter().map(|h| h.to_ascii_lowercase()).collect(),
            query_params: query_params
                .iter()
                .map(|q| q.to_ascii_lowercase())
                .collect(),
        }
    }

    pub fn is_secret_header(&self, name: &str) -> bool {
        self.headers.iter().any(|h| h.eq_ignore_ascii_case(name))
    }

    /// The URL with the values of secret query parameters replaced.
    pub fn url(&self, url: &url::Url) -> String {
        if url.query().is_none() {
            return url.to_string();
        }
        let pairs: Vec<(String, String)> = url
            .query_pairs()
            .map(|(k, v)| {
                let secret = self.query_params.iter().any(|q| q.eq_ignore_ascii_case(&k));
                (
                    k.into_owned(),
                    if secret {
                        REDACTED.to_string()
                    } else {
                        v.into_owned()
                    },
                )
            })
            .collect();
        let mut redacted = url.clone();
        redacted.query_pairs_mut().clear().extend_pairs(pairs);
        redacted.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_query_values_are_replaced() {
        let r = Redactor::new(
            &["authorization".into()],
            &["api_key".into(), "token".into()],
        );
        let url =
            url::Url::parse("https://a.example/p?api_key=s3cret&q=cats&TOKEN=x").expect("url");
        let out = r.url(&url);
        assert!(!out.contains("s3cret") && !out.contains("=x"), "{out}");
        assert!(out.contains("q=cats"), "{out}");
        assert!(r.is_secret_header("Authorization"));
        assert!(!r.is_secret_header("accept"));
    }

    #[test]
    fn records_are_appended_one_per_line() {
        let dir = std::env::temp_dir().join(format!("pexi-audit-test-{}", std::process::id()));
        let path = dir.join("audit.jsonl");
        let _ = std::fs::remove_file(&path);
        let log = AuditLog::open(&path).expect("open");
        log.append("decision", json!({"n": 1})).expect("write");
        drop(log);
        let log = AuditLog::open(&path).expect("reopen appends");
        log.append("decision", json!({"n": 2})).expect("write");
        let text = std::fs::read_to_string(&path).expect("read");
        let lines: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).expect("json"))
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["n"], 1);
        assert_eq!(lines[1]["kind"], "decision");
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
