//! The one thread that owns the audit file: numbers, chains, writes, syncs and rotates records, and
//! completes each record's ticket once the record is as durable as the setting promises.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime};

use serde_json::{json, Map, Value};

use super::{line_digest, log_files, rotated_path, AuditSettings, Durability, Job, FORMAT_VERSION};

/// Keys the writer sets; a record body cannot override them.
const RESERVED: &[&str] = &["v", "seq", "ts", "kind", "prev"];

pub(super) struct Writer {
    path: PathBuf,
    file: File,
    durability: Durability,
    rotate_bytes: u64,
    size: u64,
    /// The `seq` of the next record.
    seq: u64,
    /// Digest of the last record written (or the genesis value before the first).
    prev: String,
    /// Set after a failed write: nothing more is written, every ticket fails, effects are refused.
    failed: Option<String>,
    /// Lines encoded but not yet written: a group goes to the file in one `write`.
    pending: Vec<u8>,
    /// Records written but not yet `fsync`ed because nobody waited for them (batch mode).
    unsynced: bool,
}

/// Batch mode syncs records nobody waits for (resolve and outcome records) with the next group that has a
/// waiter, or after this long without one.
const LAZY_SYNC: Duration = Duration::from_millis(100);

/// The end of an existing log file.
struct Tail {
    last_line: Option<Vec<u8>>,
    /// `(line number, bytes)` of an incomplete last line.
    torn: Option<(usize, usize)>,
}

fn read_tail(path: &Path) -> std::io::Result<Tail> {
    let mut bytes = Vec::new();
    File::open(path)?.read_to_end(&mut bytes)?;
    let complete_end = bytes.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
    let torn = (complete_end < bytes.len()).then(|| {
        let line = bytes[..complete_end]
            .iter()
            .filter(|b| **b == b'\n')
            .count()
            + 1;
        (line, bytes.len() - complete_end)
    });
    let complete = &bytes[..complete_end];
    let last_line = complete
        .strip_suffix(b"\n")
        .map(|body| match body.iter().rposition(|b| *b == b'\n') {
            Some(i) => body[i + 1..].to_vec(),
            None => body.to_vec(),
        })
        .filter(|line| !line.is_empty());
    Ok(Tail { last_line, torn })
}

fn open_append(path: &Path) -> std::io::Result<File> {
    // Owner-only: request metadata is sensitive even after redaction.
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
}

fn next_rotation_index(path: &Path) -> u32 {
    log_files(path)
        .iter()
        .filter_map(|p| {
            p.extension()
                .and_then(|e| e.to_str())
                .filter(|e| e.len() == 6)
                .and_then(|e| e.parse::<u32>().ok())
        })
        .max()
        .map_or(1, |n| n + 1)
}

fn random_hex() -> String {
    let mut bytes = [0u8; 16];
    // Without OS randomness the genesis value is merely less unique; the chain stays verifiable.
    if getrandom::fill(&mut bytes).is_err() {
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        bytes.copy_from_slice(&nanos.to_be_bytes());
    }
    hex::encode(bytes)
}

impl Writer {
    /// Continues the chain found at `settings.path` (or its newest rotated file), or starts one.
    pub(super) fn open(settings: &AuditSettings) -> std::io::Result<Writer> {
        let path = settings.path.clone();
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let newest = log_files(&path)
            .into_iter()
            .rev()
            .find(|p| std::fs::metadata(p).is_ok_and(|m| m.len() > 0));
        let mut start = Map::new();
        let (seq, prev, kind) = match newest {
            None => {
                let genesis = format!("genesis:{}", random_hex());
                start.insert("genesis".into(), json!(genesis));
                (0, genesis, "chain_start")
            }
            Some(file) => {
                let tail = read_tail(&file)?;
                if let Some((line, bytes)) = tail.torn {
                    // Never append after a torn line: move the file aside and say so in the next record.
                    let aside = if file == path {
                        let aside = rotated_path(&path, next_rotation_index(&path));
                        std::fs::rename(&path, &aside)?;
                        aside
                    } else {
                        file.clone()
                    };
                    start.insert(
                        "torn_tail".into(),
                        json!({"file": aside.file_name().map(|n| n.to_string_lossy().into_owned()), "line": line, "bytes": bytes}),
                    );
                }
                match tail.last_line {
                    Some(line) => {
                        let last: Value = serde_json::from_slice(&line).map_err(|err| {
                            std::io::Error::other(format!(
                                "{}: the last complete record is not JSON ({err}); run `pexi audit verify`",
                                file.display()
                            ))
                        })?;
                        let seq = last["seq"].as_u64().ok_or_else(|| {
                            std::io::Error::other(format!(
                                "{}: the last record has no seq; run `pexi audit verify`",
                                file.display()
                            ))
                        })?;
                        (seq + 1, line_digest(&line), "pep_start")
                    }
                    None => {
                        let genesis = format!("genesis:{}", random_hex());
                        start.insert("genesis".into(), json!(genesis));
                        (0, genesis, "chain_start")
                    }
                }
            }
        };
        let file = open_append(&path)?;
        let size = file.metadata()?.len();
        let mut writer = Writer {
            path,
            file,
            durability: settings.durability,
            rotate_bytes: settings.rotate_bytes.max(4096),
            size,
            seq,
            prev,
            failed: None,
            pending: Vec::new(),
            unsynced: false,
        };
        start.insert("pid".into(), json!(std::process::id()));
        start.insert("version".into(), json!(env!("CARGO_PKG_VERSION")));
        writer.write(kind, Value::Object(start))?;
        writer.write_pending()?;
        writer.file.sync_all()?;
        Ok(writer)
    }

    fn write(&mut self, kind: &str, body: Value) -> std::io::Result<()> {
        let mut record = Map::new();
        record.insert("v".into(), json!(FORMAT_VERSION));
        record.insert("seq".into(), json!(self.seq));
        record.insert(
            "ts".into(),
            json!(humantime::format_rfc3339_millis(SystemTime::now()).to_string()),
        );
        record.insert("kind".into(), json!(kind));
        record.insert("prev".into(), json!(self.prev));
        if let Value::Object(fields) = body {
            for (key, value) in fields {
                if !RESERVED.contains(&key.as_str()) {
                    record.insert(key, value);
                }
            }
        }
        let start = self.pending.len();
        serde_json::to_writer(&mut self.pending, &Value::Object(record))?;
        let digest = line_digest(&self.pending[start..]);
        self.pending.push(b'\n');
        self.prev = digest;
        self.seq += 1;
        self.size += (self.pending.len() - start) as u64;
        if self.size >= self.rotate_bytes && kind != "rotate" {
            self.rotate()?;
        }
        Ok(())
    }

    /// Writes the encoded lines in one `write`: a crash can tear only the last line of a group, which
    /// the next start moves aside (`torn_tail`).
    fn write_pending(&mut self) -> std::io::Result<()> {
        let written = self.file.write_all(&self.pending);
        self.pending.clear();
        written
    }

    /// Closes the full file under its rotated name and continues the chain in a new one.
    fn rotate(&mut self) -> std::io::Result<()> {
        self.write_pending()?;
        self.file.sync_all()?;
        let aside = rotated_path(&self.path, next_rotation_index(&self.path));
        std::fs::rename(&self.path, &aside)?;
        self.file = open_append(&self.path)?;
        self.size = 0;
        let previous = aside.file_name().map(|n| n.to_string_lossy().into_owned());
        self.write("rotate", json!({"previous_file": previous}))?;
        self.write_pending()?;
        self.file.sync_all()
    }

    /// Stops the log for good after a failed write or sync: every later ticket fails.
    fn fail(&mut self, what: &str, err: std::io::Error) -> String {
        let message = format!("audit {what} failed: {err}");
        tracing::error!(%message, "the audit log stops; effects will be refused");
        self.failed = Some(message.clone());
        message
    }

    /// Encodes a group's records and writes them with one `write`; the result applies to all of them.
    fn write_group(&mut self, records: Vec<(String, Value)>) -> Result<(), String> {
        if let Some(failed) = &self.failed {
            return Err(failed.clone());
        }
        let written = records
            .into_iter()
            .try_for_each(|(kind, body)| self.write(&kind, body))
            .and_then(|()| self.write_pending());
        written.map_err(|err| self.fail("write", err))
    }

    fn sync(&mut self) -> Result<(), String> {
        if let Some(failed) = &self.failed {
            return Err(failed.clone());
        }
        self.unsynced = false;
        self.file.sync_data().map_err(|err| self.fail("fsync", err))
    }

    pub(super) fn run(mut self, queue: mpsc::Receiver<Job>, batch: Option<(Duration, usize)>) {
        loop {
            let first = if self.unsynced {
                match queue.recv_timeout(LAZY_SYNC) {
                    Ok(job) => job,
                    Err(mpsc::RecvTimeoutError::Timeout) => {
                        let _ = self.sync();
                        continue;
                    }
                    Err(mpsc::RecvTimeoutError::Disconnected) => break,
                }
            } else {
                match queue.recv() {
                    Ok(job) => job,
                    Err(_) => break,
                }
            };
            let mut jobs = vec![first];
            if let Some((window, max)) = batch {
                // Group commit: everything that queued up while the previous group was syncing goes into
                // this group, with no added wait...
                while jobs.len() < max {
                    match queue.try_recv() {
                        Ok(job) => jobs.push(job),
                        Err(_) => break,
                    }
                }
                // ...unless a window is configured, which trades latency for fewer fsyncs.
                let deadline = Instant::now() + window;
                while jobs.len() < max && !window.is_zero() {
                    let left = deadline.saturating_duration_since(Instant::now());
                    match queue.recv_timeout(left) {
                        Ok(job) => jobs.push(job),
                        Err(_) => break,
                    }
                }
            }
            let mut records = Vec::with_capacity(jobs.len());
            let mut tickets = Vec::with_capacity(jobs.len());
            let mut flush = false;
            for job in jobs {
                match job {
                    Job::Record { kind, body, done } => {
                        records.push((kind, body));
                        tickets.push(done);
                    }
                    Job::Flush(done) => {
                        flush = true;
                        tickets.push(done);
                    }
                }
            }
            let wrote_any = !records.is_empty();
            let written = if wrote_any {
                self.write_group(records)
            } else {
                Ok(())
            };
            // A dropped ticket means nobody waits for that record (resolve, outcome): its fsync can ride
            // with a later group. A decision's ticket is always awaited, so it is synced now.
            let someone_waits = tickets.iter().any(|done| !done.is_closed());
            let must_sync = flush
                || match self.durability {
                    Durability::Always => wrote_any,
                    Durability::Batch => someone_waits && (wrote_any || self.unsynced),
                    Durability::None => false,
                };
            let result = if written.is_ok() && must_sync {
                self.sync()
            } else {
                if wrote_any && self.durability != Durability::None {
                    self.unsynced = true;
                }
                written
            };
            for done in tickets {
                let _ = done.send(result.clone());
            }
        }
        let _ = self.file.sync_all();
    }
}
