//! The one thread that owns the audit file: numbers, chains, writes, syncs and rotates records, and
//! completes each record's ticket once the record is as durable as the setting promises.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime};

use serde_json::{json, Map, Value};

use super::records::{
    AuditRecord, AuditResumed, AuditRetention, ChainStart, PepStart, PreviousLog, RemovedFile,
    Rotate, TornTail,
};

use super::{
    line_digest, log_files, rotated_path, AuditSettings, Durability, Job, Sealing, FORMAT_VERSION,
};

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
    /// Set after a failed write or sync, with when: every waited-for record fails (effects are refused)
    /// until a retry succeeds ([`Writer::recover`]).
    failed: Option<(String, SystemTime)>,
    /// The file's length after the last write that succeeded: a failed write may have left part of a line
    /// behind, which recovery cuts off before the chain continues.
    written_len: u64,
    /// Records nobody waits for (outcomes, session events) that could not be written: kept, up to
    /// [`BACKLOG`], and written first when the log resumes.
    backlog: Vec<(String, Value)>,
    /// Such records beyond the backlog: counted in the `audit_resumed` record.
    lost: u64,
    keep_rotated_files: usize,
    keep_rotated_bytes: u64,
    sealing: Option<Checkpoints>,
    /// The log's files with the `seq` of their first record, oldest first (the active file last).
    files: Vec<(String, u64)>,
    /// Lines encoded but not yet written: a group goes to the file in one `write`.
    pending: Vec<u8>,
    /// Where the last line of `pending` starts: the line that is signed when the group is written.
    last_line: Option<usize>,
    /// Records nobody waits for, kept back (at most [`HOLD`]) to go out with the next group: one write and
    /// one signature for a request's decision and the previous request's resolve and outcome records.
    held: Vec<(String, Value)>,
    held_since: Option<Instant>,
    /// Records written but not yet `fsync`ed because nobody waited for them (batch mode).
    unsynced: bool,
    /// The `seq` after the last record in the file, for the metrics (read from other threads).
    pub(super) written_seq: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

/// Records kept in memory while the log cannot be written (a full disk): about a few MiB at most.
const BACKLOG: usize = 4096;
/// While failed, how often the writer tries again by itself (also on every new record).
const RETRY_FAILED: Duration = Duration::from_secs(1);

/// Batch mode syncs records nobody waits for (resolve and outcome records) with the next group that has a
/// waiter, or after this long without one.
const LAZY_SYNC: Duration = Duration::from_millis(100);
/// How long records nobody waits for may stay in memory before they are written (unless `durability` is
/// `always`): the crash window docs/audit.md states for them.
const HOLD: Duration = Duration::from_millis(10);
/// ...and how many: memory stays small, and a group never runs far past `rotate_bytes`.
const HOLD_RECORDS: usize = 64;

/// The signing side of the writer: the key, and the checkpoint file with where it stands.
struct Checkpoints {
    settings: Sealing,
    file: File,
    /// Digest of the last checkpoint line ("none" before the first).
    prev: String,
    /// Records written since the last checkpoint, and when the first of them was.
    uncovered: u64,
    since: Option<Instant>,
}

impl Checkpoints {
    fn open(settings: &Sealing) -> std::io::Result<Checkpoints> {
        let path = &settings.checkpoint_path;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
            std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
        }
        let prev = match read_tail(path) {
            Ok(tail) => tail
                .last_line
                .map_or_else(|| "none".to_string(), |line| line_digest(&line)),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => "none".to_string(),
            Err(err) => return Err(err),
        };
        Ok(Checkpoints {
            settings: settings.clone(),
            file: open_append(path)?,
            prev,
            uncovered: 0,
            since: None,
        })
    }

    fn due(&self) -> Option<Instant> {
        self.since.map(|at| at + self.settings.checkpoint_every)
    }
}

/// Before appending to `file` (the newest of the log): its records verify (chain and signatures), and it
/// still holds what the latest checkpoint covered, when that was in this file.
fn check_before_appending(file: &Path, sealing: &Sealing) -> Result<(), String> {
    use super::verify::{verify_with, Options};
    let public_key = hex::decode(sealing.sealer.public_hex()).map_err(|err| err.to_string())?;
    let options = Options {
        public_key: Some(public_key.clone()),
        checkpoints: None,
    };
    let report = match verify_with(&[file.to_path_buf()], &options) {
        Ok(report) => report,
        // A log written before signing was on: nothing to check the signatures of yet.
        Err(broken) if broken.problem.starts_with("no record is signed") => return Ok(()),
        Err(broken) => return Err(format!("BROKEN {broken}")),
    };
    let Ok(tail) = read_tail(&sealing.checkpoint_path) else {
        return Ok(());
    };
    let Some(line) = tail.last_line else {
        return Ok(());
    };
    super::seal::check(&line, &public_key).map_err(|_| {
        format!(
            "{}: the last checkpoint's signature does not match",
            sealing.checkpoint_path.display()
        )
    })?;
    let checkpoint: Value = serde_json::from_slice(&line).map_err(|err| err.to_string())?;
    let (Some(last_seq), Some(head)) =
        (checkpoint["last_seq"].as_u64(), checkpoint["head"].as_str())
    else {
        return Ok(());
    };
    let first = first_seq_of(file).unwrap_or(0);
    if last_seq < first {
        return Ok(());
    }
    let text = std::fs::read(file).map_err(|err| err.to_string())?;
    let found = text
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .find(|l| {
            serde_json::from_slice::<Value>(l)
                .ok()
                .and_then(|r| r["seq"].as_u64())
                == Some(last_seq)
        });
    match found {
        Some(l) if line_digest(l) == head => Ok(()),
        Some(_) => Err(format!(
            "BROKEN {}: the record at seq {last_seq} differs from the one the last checkpoint signed",
            file.display()
        )),
        None => Err(format!(
            "BROKEN {}: records are missing from the end (the last checkpoint covered up to seq {last_seq}, \
             {} record(s) remain)",
            file.display(),
            report.records
        )),
    }
}

/// Moves every file of the log at `path`, and its checkpoint file, into `broken-<time>/` beside it.
fn move_aside(path: &Path, checkpoints: &Path) -> std::io::Result<PathBuf> {
    let stamp = humantime::format_rfc3339_seconds(SystemTime::now())
        .to_string()
        .replace(':', "");
    let dir = path
        .parent()
        .unwrap_or(Path::new("."))
        .join(format!("broken-{stamp}"));
    std::fs::create_dir_all(&dir)?;
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
    for file in log_files(path) {
        std::fs::rename(&file, dir.join(file_name(&file)))?;
    }
    if checkpoints.exists() {
        std::fs::rename(checkpoints, dir.join(file_name(checkpoints)))?;
    }
    Ok(dir)
}

/// A record body as the writer takes it.
fn to_body<R: AuditRecord>(record: &R) -> Value {
    serde_json::to_value(record)
        .unwrap_or_else(|err| json!({"serialisation_error": err.to_string()}))
}

/// The `seq` of a log file's first record.
fn first_seq_of(path: &Path) -> Option<u64> {
    use std::io::BufRead;
    let mut line = String::new();
    std::io::BufReader::new(File::open(path).ok()?)
        .read_line(&mut line)
        .ok()?;
    serde_json::from_str::<Value>(&line).ok()?["seq"].as_u64()
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

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
        let mut newest = log_files(&path)
            .into_iter()
            .rev()
            .find(|p| std::fs::metadata(p).is_ok_and(|m| m.len() > 0));
        let mut torn_tail: Option<TornTail> = None;
        let mut previous_log: Option<PreviousLog> = None;
        if let (Some(file), Some(sealing)) = (&newest, &settings.sealing) {
            if let Err(problem) = check_before_appending(file, sealing) {
                if !settings.force {
                    return Err(std::io::Error::other(format!(
                        "{problem}: the PEP does not append to a log that does not verify. Inspect it with \
                         `pexi audit verify`; `pexi serve --force` moves the log and its checkpoints aside \
                         and starts a new chain that names them"
                    )));
                }
                let moved_to = move_aside(&path, &sealing.checkpoint_path)?;
                tracing::warn!(%problem, moved_to = %moved_to.display(), "the audit log did not verify; moved aside (--force)");
                previous_log = Some(PreviousLog {
                    moved_to: moved_to.display().to_string(),
                    problem,
                });
                newest = None;
            }
        }
        let (seq, prev, kind) = match newest {
            None => {
                let genesis = format!("genesis:{}", random_hex());
                (0, genesis, ChainStart::KIND)
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
                    torn_tail = Some(TornTail {
                        file: aside.file_name().map(|n| n.to_string_lossy().into_owned()),
                        line,
                        bytes,
                    });
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
                        (seq + 1, line_digest(&line), PepStart::KIND)
                    }
                    None => {
                        let genesis = format!("genesis:{}", random_hex());
                        (0, genesis, ChainStart::KIND)
                    }
                }
            }
        };
        let file = open_append(&path)?;
        let size = file.metadata()?.len();
        let files = log_files(&path)
            .iter()
            .filter(|p| **p != path)
            .filter_map(|p| Some((file_name(p), first_seq_of(p)?)))
            .chain(std::iter::once((
                file_name(&path),
                first_seq_of(&path).unwrap_or(seq),
            )))
            .collect();
        let sealing = match &settings.sealing {
            Some(sealing) => Some(Checkpoints::open(sealing)?),
            None => None,
        };
        let mut writer = Writer {
            path,
            file,
            durability: settings.durability,
            rotate_bytes: settings.rotate_bytes.max(4096),
            size,
            seq,
            prev,
            failed: None,
            written_len: size,
            backlog: Vec::new(),
            lost: 0,
            keep_rotated_files: settings.keep_rotated_files,
            keep_rotated_bytes: settings.keep_rotated_bytes,
            sealing,
            files,
            pending: Vec::new(),
            last_line: None,
            held: Vec::new(),
            held_since: None,
            unsynced: false,
            written_seq: std::sync::Arc::new(std::sync::atomic::AtomicU64::new(seq)),
        };
        let (pid, version) = (std::process::id(), env!("CARGO_PKG_VERSION").to_string());
        let first = if kind == ChainStart::KIND {
            to_body(&ChainStart {
                genesis: writer.prev.clone(),
                pid,
                version,
                torn_tail,
                previous_log,
            })
        } else {
            to_body(&PepStart {
                pid,
                version,
                torn_tail,
            })
        };
        writer.write(kind, first)?;
        writer.write_pending()?;
        writer.file.sync_all()?;
        writer.written_len = writer.file.metadata()?.len();
        writer.checkpoint("start")?;
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
        if let Some(checkpoints) = &mut self.sealing {
            checkpoints.uncovered += 1;
            checkpoints.since.get_or_insert_with(Instant::now);
        }
        let digest = line_digest(&self.pending[start..]);
        self.pending.push(b'\n');
        self.last_line = Some(start);
        self.prev = digest;
        self.seq += 1;
        self.size += (self.pending.len() - start) as u64;
        Ok(())
    }

    /// Signs the group's last line. Its `prev` is the digest of the line before, whose `prev` is the one
    /// before that, back to the previous signed line: one signature covers every line of the group.
    fn seal_last(&mut self) {
        let (Some(start), Some(checkpoints)) = (self.last_line.take(), &self.sealing) else {
            return;
        };
        self.pending.pop();
        let before = self.pending.len();
        checkpoints
            .settings
            .sealer
            .seal_from(&mut self.pending, start);
        self.size += (self.pending.len() - before) as u64;
        self.prev = line_digest(&self.pending[start..]);
        self.pending.push(b'\n');
    }

    /// Signs and writes the encoded lines in one `write`: a crash can tear only the last line of a group,
    /// which the next start moves aside (`torn_tail`).
    fn write_pending(&mut self) -> std::io::Result<()> {
        self.seal_last();
        let written = self.file.write_all(&self.pending);
        if written.is_ok() {
            self.written_len += self.pending.len() as u64;
            self.written_seq
                .store(self.seq, std::sync::atomic::Ordering::Relaxed);
        }
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
        self.written_len = 0;
        if let Some(active) = self.files.last_mut() {
            active.0 = file_name(&aside);
        }
        self.files.push((file_name(&self.path), self.seq));
        let previous = aside.file_name().map(|n| n.to_string_lossy().into_owned());
        self.write(
            Rotate::KIND,
            to_body(&Rotate {
                previous_file: previous,
            }),
        )?;
        self.write_pending()?;
        self.file.sync_all()?;
        self.apply_retention()?;
        self.checkpoint("rotate")
    }

    /// Writes a signed checkpoint of the log as it stands (all of it written and synced) and syncs it.
    fn checkpoint(&mut self, reason: &str) -> std::io::Result<()> {
        let Some(checkpoints) = &mut self.sealing else {
            return Ok(());
        };
        let files: Vec<Value> = self
            .files
            .iter()
            .map(|(name, first)| json!({"name": name, "first_seq": first}))
            .collect();
        let body = json!({
            "v": FORMAT_VERSION,
            "log": file_name(&self.path),
            "reason": reason,
            "first_seq": self.files.first().map(|(_, first)| *first),
            "last_seq": self.seq.checked_sub(1),
            "head": self.prev,
            "files": files,
            "ts": humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
            "prev": checkpoints.prev,
        });
        let mut line = serde_json::to_vec(&body)?;
        checkpoints.settings.sealer.seal(&mut line);
        checkpoints.prev = line_digest(&line);
        line.push(b'\n');
        checkpoints.file.write_all(&line)?;
        checkpoints.file.sync_data()?;
        checkpoints.uncovered = 0;
        checkpoints.since = None;
        Ok(())
    }

    /// A checkpoint when one is due (time or count), after the records it covers are durable.
    fn checkpoint_if_due(&mut self) {
        let due = self.sealing.as_ref().is_some_and(|c| {
            c.uncovered >= c.settings.checkpoint_records
                || c.due().is_some_and(|at| Instant::now() >= at)
        });
        if due && self.failed.is_none() {
            let synced = self.file.sync_data();
            if let Err(err) = synced.and_then(|()| self.checkpoint("interval")) {
                self.fail("checkpoint", err);
            }
        }
    }

    /// Removes the oldest rotated files past `keep_rotated_files` / `keep_rotated_bytes`, then records
    /// which (file, size, first seq) in the chain, so the shortened log explains its own start.
    fn apply_retention(&mut self) -> std::io::Result<()> {
        if self.keep_rotated_files == 0 && self.keep_rotated_bytes == 0 {
            return Ok(());
        }
        let rotated: Vec<(PathBuf, u64)> = log_files(&self.path)
            .into_iter()
            .filter(|p| *p != self.path)
            .map(|p| {
                let len = std::fs::metadata(&p).map_or(0, |m| m.len());
                (p, len)
            })
            .collect();
        let mut count = rotated.len();
        let mut bytes: u64 = rotated.iter().map(|(_, len)| len).sum();
        let mut removed = Vec::new();
        for (file, len) in &rotated {
            let over_count = self.keep_rotated_files > 0 && count > self.keep_rotated_files;
            let over_bytes = self.keep_rotated_bytes > 0 && bytes > self.keep_rotated_bytes;
            if !over_count && !over_bytes {
                break;
            }
            let first_seq = first_seq_of(file);
            match std::fs::remove_file(file) {
                Ok(()) => {
                    let gone = file_name(file);
                    self.files.retain(|(name, _)| *name != gone);
                    removed.push(RemovedFile {
                        file: file.file_name().map(|n| n.to_string_lossy().into_owned()),
                        bytes: *len,
                        first_seq,
                    });
                    count -= 1;
                    bytes -= len;
                }
                Err(err) => {
                    tracing::warn!(file = %file.display(), %err, "could not remove an old audit file");
                    break;
                }
            }
        }
        if removed.is_empty() {
            return Ok(());
        }
        self.write(
            AuditRetention::KIND,
            to_body(&AuditRetention {
                removed,
                kept_files: count,
                kept_bytes: bytes,
                keep_rotated_files: self.keep_rotated_files,
                keep_rotated_bytes: self.keep_rotated_bytes,
            }),
        )?;
        self.write_pending()?;
        self.file.sync_data()
    }

    /// Marks the log failed after a write or sync error: waited-for records fail (their effects are
    /// refused) until [`Writer::recover`] succeeds.
    fn fail(&mut self, what: &str, err: std::io::Error) -> String {
        let message = format!("audit {what} failed: {err}");
        if self.failed.is_none() {
            tracing::error!(%message, "the audit log cannot be written; refusing effects until it can");
            self.failed = Some((message.clone(), SystemTime::now()));
        }
        message
    }

    /// After a failure: cuts off whatever part of the failed write reached the file, writes the records
    /// kept meanwhile and an `audit_resumed` record, and syncs. On success the log is usable again.
    fn recover(&mut self) -> Result<(), String> {
        let Some((error, since)) = self.failed.clone() else {
            return Ok(());
        };
        let snapshot = (self.seq, self.prev.clone(), self.size, self.written_len);
        let kept = self.backlog.len();
        let backlog = std::mem::take(&mut self.backlog);
        let attempt = (|| -> std::io::Result<()> {
            self.file.set_len(self.written_len)?;
            self.size = self.written_len;
            for (kind, body) in &backlog {
                self.write(kind, body.clone())?;
            }
            self.write(
                AuditResumed::KIND,
                to_body(&AuditResumed {
                    error: error.clone(),
                    since: humantime::format_rfc3339_millis(since).to_string(),
                    kept_records: kept,
                    lost_records: self.lost,
                }),
            )?;
            self.write_pending()?;
            self.file.sync_data()
        })();
        match attempt {
            Ok(()) => {
                tracing::info!(kept, lost = self.lost, "the audit log is writable again");
                self.failed = None;
                self.lost = 0;
                self.unsynced = false;
                Ok(())
            }
            Err(err) => {
                // Back to the last record on disk, the backlog kept for the next try.
                (self.seq, self.prev, self.size, self.written_len) = snapshot;
                self.pending.clear();
                self.last_line = None;
                self.backlog = backlog;
                Err(format!("{error} (still failing: {err})"))
            }
        }
    }

    /// Encodes a group's records and writes them with one `write`; the result applies to all of them.
    /// Records nobody waits for survive a failure in the backlog.
    fn write_group(&mut self, records: Vec<(String, Value, bool)>) -> Result<(), String> {
        if let Err(err) = self.recover() {
            self.keep(records);
            return Err(err);
        }
        let snapshot = (self.seq, self.prev.clone(), self.size);
        let unwaited: Vec<(String, Value)> = records
            .iter()
            .filter(|(_, _, waited)| !waited)
            .map(|(kind, body, _)| (kind.clone(), body.clone()))
            .collect();
        let written = records
            .into_iter()
            .try_for_each(|(kind, body, _)| self.write(&kind, body))
            .and_then(|()| self.write_pending());
        match written {
            Ok(()) if self.size >= self.rotate_bytes => {
                self.rotate().map_err(|err| self.fail("rotation", err))
            }
            Ok(()) => Ok(()),
            Err(err) => {
                (self.seq, self.prev, self.size) = snapshot;
                self.pending.clear();
                self.last_line = None;
                let message = self.fail("write", err);
                self.keep(unwaited.into_iter().map(|(k, b)| (k, b, false)).collect());
                Err(message)
            }
        }
    }

    fn keep(&mut self, records: Vec<(String, Value, bool)>) {
        for (kind, body, waited) in records {
            if waited {
                continue;
            }
            if self.backlog.len() < BACKLOG {
                self.backlog.push((kind, body));
            } else {
                self.lost += 1;
            }
        }
    }

    fn sync(&mut self) -> Result<(), String> {
        if let Some((failed, _)) = &self.failed {
            return Err(failed.clone());
        }
        self.unsynced = false;
        self.file.sync_data().map_err(|err| self.fail("fsync", err))
    }

    pub(super) fn run(mut self, queue: mpsc::Receiver<Job>, batch: Option<(Duration, usize)>) {
        loop {
            let first = if self.failed.is_some() {
                match queue.recv_timeout(RETRY_FAILED) {
                    Ok(job) => job,
                    Err(mpsc::RecvTimeoutError::Timeout) => {
                        let _ = self.recover();
                        continue;
                    }
                    Err(mpsc::RecvTimeoutError::Disconnected) => break,
                }
            } else if let Some(wake) = self.next_wake() {
                match queue.recv_timeout(wake.saturating_duration_since(Instant::now())) {
                    Ok(job) => job,
                    Err(mpsc::RecvTimeoutError::Timeout) => {
                        if self.held_since.is_some_and(|since| since.elapsed() >= HOLD) {
                            let held = self.take_held();
                            if self.write_group(held).is_ok() && self.durability != Durability::None
                            {
                                self.unsynced = true;
                            }
                        }
                        if self.unsynced && self.held.is_empty() {
                            let _ = self.sync();
                        }
                        self.checkpoint_if_due();
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
                        records.push((kind, body, !done.is_closed()));
                        tickets.push(done);
                    }
                    Job::Flush(done) => {
                        flush = true;
                        tickets.push(done);
                    }
                }
            }
            // Nobody waits for any of these: they wait (briefly) for a group that someone does wait for.
            // (Not while the log is failing: such records go to the bounded backlog at once.)
            let hold = self.durability != Durability::Always
                && self.failed.is_none()
                && !flush
                && records.iter().all(|(_, _, waited)| !waited);
            if hold && self.held.len() + records.len() <= HOLD_RECORDS {
                self.held_since.get_or_insert_with(Instant::now);
                self.held
                    .extend(records.into_iter().map(|(kind, body, _)| (kind, body)));
                continue;
            }
            if !self.held.is_empty() {
                let mut group = self.take_held();
                group.extend(records);
                records = group;
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
            self.checkpoint_if_due();
        }
        let held = self.take_held();
        if !held.is_empty() {
            let _ = self.write_group(held);
        }
        let _ = self.recover();
        let _ = self.file.sync_all();
        if self.failed.is_none() {
            if let Err(err) = self.checkpoint("stop") {
                tracing::error!(%err, "the closing audit checkpoint could not be written");
            }
        }
    }

    /// The records held back, as a group nobody waits for.
    fn take_held(&mut self) -> Vec<(String, Value, bool)> {
        self.held_since = None;
        std::mem::take(&mut self.held)
            .into_iter()
            .map(|(kind, body)| (kind, body, false))
            .collect()
    }

    /// When the writer must wake up without a new record: held records to write, a lazy sync, or a
    /// checkpoint falling due.
    fn next_wake(&self) -> Option<Instant> {
        let held = self.held_since.map(|since| since + HOLD);
        let sync = self.unsynced.then(|| Instant::now() + LAZY_SYNC);
        let checkpoint = self.sealing.as_ref().and_then(Checkpoints::due);
        [held, sync, checkpoint].into_iter().flatten().min()
    }
}
