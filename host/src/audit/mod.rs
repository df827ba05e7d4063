//! The audit log: append-only JSONL with a hash chain, written by one thread that owns the file.
//!
//! Every record is one JSON object on one line with `v` (format version), `seq` (consecutive across files),
//! `ts` (RFC 3339, UTC), `kind` and `prev`: the SHA-256 of the previous record's line, byte for byte. The
//! first record of a chain is a `chain_start` whose `prev` is its own random `genesis` value. When the file
//! passes `rotate_bytes` it is renamed `<path>.NNNNNN` and the chain continues in a fresh `<path>`. A start
//! after a crash that tore the last line moves the torn file aside the same way and names the torn line in
//! the next record, so the break is explained rather than hidden. `pexi audit verify` checks all of it
//! ([`verify`]); `docs/audit.md` has the format and the guarantees.
//!
//! Callers get a [`Ticket`] per record; a decision's effect waits on it, so a decision is on disk (to the
//! degree `durability` promises) before anything it allows happens.

pub mod records;
pub mod redact;
pub mod seal;
pub mod verify;
mod writer;

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::Mutex;
use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;

pub use redact::{Redaction, Redactor, REDACTED};

/// Format version written in every record's `v`.
pub const FORMAT_VERSION: u64 = 1;

/// How durable a record is before its ticket completes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// `fsync` after every record: a completed ticket survives power loss.
    Always,
    /// Group commit: the records queued while the previous `fsync` ran are written and `fsync`ed together
    /// (at most `batch_records`; `batch_ms` > 0 waits that long for more); a ticket completes after its
    /// group's `fsync`.
    Batch,
    /// Written to the OS, never `fsync`ed: survives a crash of the PEP (but for records nobody waits for
    /// of the last 10 ms, which are held back to ride with the next group), not of the machine. For tests.
    None,
}

#[derive(Clone, Debug)]
pub struct AuditSettings {
    pub path: PathBuf,
    pub durability: Durability,
    pub batch_ms: u64,
    pub batch_records: usize,
    pub rotate_bytes: u64,
    /// Rotated files kept: past either bound the oldest are removed, and the removal is itself a record.
    pub keep_rotated_files: usize,
    pub keep_rotated_bytes: u64,
    /// A signature on every write group and signed checkpoints (see [`seal`]); `None` writes an unsigned
    /// log.
    pub sealing: Option<Sealing>,
    /// A log that does not verify is moved aside (with its checkpoints) and a new chain started, instead
    /// of refusing to start (`pexi serve --force`).
    pub force: bool,
}

/// How the log is signed.
#[derive(Clone, Debug)]
pub struct Sealing {
    pub sealer: std::sync::Arc<seal::Sealer>,
    /// The checkpoint file, kept apart from the log.
    pub checkpoint_path: PathBuf,
    /// A checkpoint is written this long after the first record it does not cover yet...
    pub checkpoint_every: Duration,
    /// ...or once this many records are not covered, whichever comes first.
    pub checkpoint_records: u64,
}

/// Completes when the record is as durable as the setting promises, or the write failed.
pub struct Ticket(tokio::sync::oneshot::Receiver<Result<(), String>>);

impl Ticket {
    /// Waits in async code.
    pub async fn done(self) -> Result<(), String> {
        self.0
            .await
            .unwrap_or_else(|_| Err("the audit writer stopped".into()))
    }

    /// Waits outside a runtime (the CLI).
    pub fn wait(self) -> Result<(), String> {
        self.0
            .blocking_recv()
            .unwrap_or_else(|_| Err("the audit writer stopped".into()))
    }
}

enum Job {
    Record {
        kind: String,
        body: Value,
        done: tokio::sync::oneshot::Sender<Result<(), String>>,
    },
    Flush(tokio::sync::oneshot::Sender<Result<(), String>>),
}

pub struct AuditLog {
    path: PathBuf,
    jobs: Mutex<Option<mpsc::Sender<Job>>>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    written_seq: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl AuditLog {
    /// Opens (or continues) the log at `settings.path` and starts its writer thread.
    pub fn open(settings: &AuditSettings) -> std::io::Result<AuditLog> {
        let writer = writer::Writer::open(settings)?;
        let written_seq = writer.written_seq.clone();
        let (jobs, queue) = mpsc::channel();
        let batch = (settings.durability == Durability::Batch).then(|| {
            (
                Duration::from_millis(settings.batch_ms),
                settings.batch_records.max(1),
            )
        });
        let thread = std::thread::Builder::new()
            .name("pexi-audit".into())
            .spawn(move || writer.run(queue, batch))?;
        Ok(AuditLog {
            path: settings.path.clone(),
            jobs: Mutex::new(Some(jobs)),
            thread: Mutex::new(Some(thread)),
            written_seq,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The `seq` the next record will get: every record before it is in the file (not necessarily
    /// synced).
    pub fn written_seq(&self) -> u64 {
        self.written_seq.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Queues a record. `body` must be a JSON object; the writer adds `v`, `seq`, `ts`, `kind`, `prev`.
    pub fn record(&self, kind: &str, body: Value) -> Ticket {
        let (done, ticket) = tokio::sync::oneshot::channel();
        let job = Job::Record {
            kind: kind.to_string(),
            body,
            done,
        };
        let sent = self
            .jobs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|jobs| jobs.send(job));
        if let Some(Err(mpsc::SendError(Job::Record { done, .. }))) = sent {
            let _ = done.send(Err("the audit writer stopped".into()));
        }
        Ticket(ticket)
    }

    /// Writes and `fsync`s everything queued so far, whatever the durability setting.
    pub fn flush(&self) -> Result<(), String> {
        let (done, ticket) = tokio::sync::oneshot::channel();
        if let Some(jobs) = self.jobs.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            let _ = jobs.send(Job::Flush(done));
        }
        Ticket(ticket).wait()
    }

    /// Drains the queue, syncs and stops the writer. Records after this fail their tickets.
    pub fn close(&self) {
        drop(self.jobs.lock().unwrap_or_else(|p| p.into_inner()).take());
        if let Some(thread) = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = thread.join();
        }
    }
}

impl Drop for AuditLog {
    fn drop(&mut self) {
        self.close();
    }
}

/// SHA-256 of a record line (without its newline), as written in the next record's `prev`.
pub fn line_digest(line: &[u8]) -> String {
    use sha2::Digest;
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(line)))
}

/// `<path>.NNNNNN`: where the `n`th rotated file of `path` goes.
pub fn rotated_path(path: &Path, n: u32) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".{n:06}"));
    PathBuf::from(name)
}

/// Every file of the log at `path`, oldest first: the rotated ones, then the active one.
pub fn log_files(path: &Path) -> Vec<PathBuf> {
    let mut files: Vec<(u32, PathBuf)> = Vec::new();
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return vec![path.to_path_buf()];
    };
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    let prefix = format!("{}.", name.to_string_lossy());
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            let file_name = entry.file_name().to_string_lossy().into_owned();
            if let Some(n) = file_name
                .strip_prefix(&prefix)
                .filter(|rest| rest.len() == 6)
                .and_then(|rest| rest.parse::<u32>().ok())
            {
                files.push((n, entry.path()));
            }
        }
    }
    files.sort();
    let mut out: Vec<PathBuf> = files.into_iter().map(|(_, p)| p).collect();
    if path.exists() {
        out.push(path.to_path_buf());
    }
    out
}
