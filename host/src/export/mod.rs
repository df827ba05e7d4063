//! The audit export (docs/fleet.md, "Audit export"): every record and signed checkpoint leaves the machine
//! at least once and in order, to OpenTelemetry (`otlp.rs`) and/or syslog (`syslog.rs`). Each sink is a
//! task of its own that reads the log files ([`tail`]) from a cursor it keeps on disk, sends a batch, and
//! moves the cursor only once the receiver has it. Nothing here is on a decision's path: the audit writer
//! neither waits for nor knows about the sinks, so a receiver that is down or slow delays shipping and
//! nothing else; the lag is a metric.

mod otlp;
mod syslog;
pub mod tail;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::metrics::SinkLabels;
use crate::pipeline::Pipeline;
use tail::{CheckpointTail, Line, Tail};

/// How often an idle sink looks for new records.
const POLL: Duration = Duration::from_millis(100);
/// A confirmed cursor is written at most this often (and at the end): a crash in between ships a few
/// records again, which at-least-once allows.
const SAVE_EVERY: Duration = Duration::from_millis(500);

/// What goes out, in the order it goes: records, and each checkpoint after the records it covers.
#[derive(Clone, Debug)]
pub enum Item {
    Record(Line),
    Checkpoint(Line),
}

impl Item {
    pub fn line(&self) -> &Line {
        match self {
            Item::Record(line) | Item::Checkpoint(line) => line,
        }
    }
}

/// Where a sink has got to, kept on disk.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cursor {
    /// The `seq` of the next record to ship.
    pub next_seq: u64,
    /// Bytes of the checkpoint file shipped.
    pub checkpoint_offset: u64,
    /// The digest of the last record shipped, to tell this log from a new one that restarted at `seq` 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_digest: Option<String>,
}

impl Cursor {
    /// This cursor checked against the log at `log`: when the record before it is not the one it shipped
    /// last (the log was replaced, say by `pexi serve --force`, and a new chain started at `seq` 0),
    /// shipping starts over from the new log's beginning rather than waiting for a `seq` it may never
    /// reach.
    fn resume(self, log: &Path) -> Cursor {
        let Some(last) = self.next_seq.checked_sub(1) else {
            return self;
        };
        let same = match Tail::new(log, last).read(1) {
            Ok(read) => match read.lines.first() {
                Some(line) if line.seq == last => self
                    .last_digest
                    .as_deref()
                    .is_none_or(|digest| digest == crate::audit::line_digest(line.text.as_bytes())),
                // Retention removed it: the same log, with a gap the sink reports.
                Some(_) => true,
                // The log ends before what was shipped: not the log the cursor was made on.
                None => false,
            },
            Err(_) => true,
        };
        if same {
            self
        } else {
            tracing::warn!(log = %log.display(), shipped_up_to = last, "audit export: the log is not the one the cursor was made on (a new chain); shipping it from its start");
            Cursor::default()
        }
    }

    fn load(path: &Path) -> Result<Cursor, String> {
        match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|err| {
                format!(
                    "{}: {err}; move it aside to ship the whole log again",
                    path.display()
                )
            }),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(Cursor::default()),
            Err(err) => Err(format!("{}: {err}", path.display())),
        }
    }

    /// Written beside and renamed over, so a crash leaves the old cursor or the new one.
    fn save(&self, path: &Path) -> std::io::Result<()> {
        use std::io::Write;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let temp = path.with_extension("cursor.tmp");
        let mut file = std::fs::File::create(&temp)?;
        file.write_all(&serde_json::to_vec(self).unwrap_or_default())?;
        file.sync_data()?;
        std::fs::rename(&temp, path)
    }
}

/// A receiver: sends one batch, and succeeds only once the receiver has it.
enum Sink {
    Otlp(otlp::Otlp),
    Syslog(syslog::Syslog),
}

impl Sink {
    fn name(&self) -> &'static str {
        match self {
            Sink::Otlp(_) => "otlp",
            Sink::Syslog(_) => "syslog",
        }
    }

    async fn send(&mut self, items: &[Item]) -> Result<(), String> {
        match self {
            Sink::Otlp(sink) => sink.send(items).await,
            Sink::Syslog(sink) => sink.send(items).await,
        }
    }
}

/// Starts a task per configured sink; each ends at `shutdown` with its cursor saved.
pub(crate) fn start(
    pipeline: Arc<Pipeline>,
    shutdown: CancellationToken,
    tasks: &TaskTracker,
) -> Result<(), String> {
    let config = &pipeline.config.pep;
    let export = &config.export;
    let mut sinks = Vec::new();
    if !export.otlp.endpoint.is_empty() {
        sinks.push(Sink::Otlp(otlp::Otlp::new(&export.otlp)?));
    }
    if !export.syslog.address.is_empty() {
        sinks.push(Sink::Syslog(syslog::Syslog::new(&export.syslog)?));
    }
    for sink in sinks {
        let cursor_path = export.cursor_path(&config.audit, sink.name());
        let cursor = Cursor::load(&cursor_path)?.resume(&config.audit.path);
        tracing::info!(
            sink = sink.name(),
            next_seq = cursor.next_seq,
            "audit export starting"
        );
        let reader = Reader {
            tail: Tail::new(&config.audit.path, cursor.next_seq),
            checkpoints: CheckpointTail::new(
                &config.audit.checkpoint_path(),
                cursor.checkpoint_offset,
            ),
            waiting: Default::default(),
            batch: export.batch_records,
        };
        let shipper = Shipper {
            pipeline: pipeline.clone(),
            reader: Some(reader),
            saved: cursor.clone(),
            cursor,
            cursor_path,
            labels: SinkLabels { sink: sink.name() },
            retry_max: Duration::from_millis(export.retry_max_ms.max(100)),
            sink,
        };
        tasks.spawn(shipper.run(shutdown.clone()));
    }
    Ok(())
}

struct Shipper {
    pipeline: Arc<Pipeline>,
    sink: Sink,
    reader: Option<Reader>,
    cursor: Cursor,
    saved: Cursor,
    cursor_path: PathBuf,
    labels: SinkLabels,
    retry_max: Duration,
}

/// The files' side of a shipper: moved to a blocking thread for each read, since reading files blocks.
struct Reader {
    tail: Tail,
    checkpoints: CheckpointTail,
    /// Checkpoints read but not yet sent: each waits for the records it covers.
    waiting: std::collections::VecDeque<(Line, u64)>,
    batch: usize,
}

/// A batch to send, and where the checkpoint file's cursor stands once it is sent.
#[derive(Default)]
struct Batch {
    items: Vec<Item>,
    checkpoint_offset: Option<u64>,
    gap: Option<(u64, u64)>,
}

impl Reader {
    fn next_batch(&mut self) -> std::io::Result<Batch> {
        let read = self.tail.read(self.batch)?;
        if self.waiting.is_empty() {
            self.waiting.extend(self.checkpoints.read(64)?);
        }
        let mut batch = Batch {
            gap: read.gap,
            ..Batch::default()
        };
        for line in read.lines {
            self.checkpoints_before(line.seq, &mut batch);
            batch.items.push(Item::Record(line));
        }
        self.checkpoints_before(self.tail.next(), &mut batch);
        Ok(batch)
    }

    /// Moves the waiting checkpoints that cover only records before `seq` into the batch.
    fn checkpoints_before(&mut self, seq: u64, batch: &mut Batch) {
        while self.waiting.front().is_some_and(|(line, _)| line.seq < seq) {
            if let Some((line, offset)) = self.waiting.pop_front() {
                batch.items.push(Item::Checkpoint(line));
                batch.checkpoint_offset = Some(offset);
            }
        }
    }
}

impl Shipper {
    async fn run(mut self, shutdown: CancellationToken) {
        let mut pending = Batch::default();
        let mut backoff = Duration::from_millis(100);
        let mut last_save = Instant::now();
        let mut last_warning: Option<Instant> = None;
        while !shutdown.is_cancelled() {
            if pending.items.is_empty() {
                pending = self.read().await;
                if let Some((from, to)) = pending.gap.take() {
                    self.report_gap(from, to);
                }
            }
            self.show_lag(pending.items.iter().find_map(|item| match item {
                Item::Record(line) => Some(line),
                Item::Checkpoint(_) => None,
            }));
            if pending.items.is_empty() {
                self.save(&mut last_save, false).await;
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(POLL) => continue,
                }
            }
            let sent = tokio::select! {
                _ = shutdown.cancelled() => break,
                sent = self.sink.send(&pending.items) => sent,
            };
            match sent {
                Ok(()) => {
                    for item in pending.items.drain(..) {
                        if let Item::Record(line) = item {
                            self.cursor.next_seq = line.seq + 1;
                            self.cursor.last_digest =
                                Some(crate::audit::line_digest(line.text.as_bytes()));
                        }
                    }
                    if let Some(offset) = pending.checkpoint_offset.take() {
                        self.cursor.checkpoint_offset = offset;
                    }
                    backoff = Duration::from_millis(100);
                    self.save(&mut last_save, false).await;
                }
                Err(err) => {
                    self.pipeline
                        .metrics
                        .shipping_errors
                        .get_or_create(&self.labels)
                        .inc();
                    // Once a minute at most: a receiver that is down for an hour is one problem.
                    if last_warning.is_none_or(|at| at.elapsed() >= Duration::from_secs(60)) {
                        tracing::warn!(sink = self.labels.sink, %err, "audit export: sending failed; retrying (records wait, decisions do not)");
                        last_warning = Some(Instant::now());
                    }
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(self.retry_max);
                }
            }
        }
        self.save(&mut last_save, true).await;
    }

    async fn read(&mut self) -> Batch {
        let Some(mut reader) = self.reader.take() else {
            return Batch::default();
        };
        let done = tokio::task::spawn_blocking(move || {
            let batch = reader.next_batch();
            (reader, batch)
        })
        .await;
        match done {
            Ok((reader, batch)) => {
                self.reader = Some(reader);
                batch.unwrap_or_else(|err| {
                    tracing::warn!(sink = self.labels.sink, %err, "audit export: reading the log failed");
                    Batch::default()
                })
            }
            Err(err) => {
                // Only a panic in the reader gets here: that sink stops, and says so.
                tracing::error!(sink = self.labels.sink, %err, "audit export: the reader failed; this sink stops");
                Batch::default()
            }
        }
    }

    /// Records retention removed before they were shipped: said in the log and in the audit log itself
    /// (whose next records the sink then ships), so the receiver learns of the hole.
    fn report_gap(&self, from: u64, to: u64) {
        tracing::error!(sink = self.labels.sink, from, to, "audit export: records were removed before they were shipped (raise keep_rotated_files)");
        self.pipeline.record(&crate::audit::records::ExportGap {
            sink: self.labels.sink.to_string(),
            from_seq: from,
            to_seq: to,
        });
    }

    fn show_lag(&self, oldest: Option<&Line>) {
        let metrics = &self.pipeline.metrics;
        let written = self.pipeline.audit().written_seq();
        let behind = written.saturating_sub(self.cursor.next_seq);
        metrics
            .shipping_lag_records
            .get_or_create(&self.labels)
            .set(i64::try_from(behind).unwrap_or(i64::MAX));
        let age = oldest
            .and_then(|line| humantime::parse_rfc3339_weak(&line.ts).ok())
            .and_then(|ts| ts.elapsed().ok())
            .map_or(0, |age| age.as_secs() as i64);
        metrics
            .shipping_lag_seconds
            .get_or_create(&self.labels)
            .set(age);
    }

    /// Saves the cursor when it moved, at most every [`SAVE_EVERY`] unless `now`.
    async fn save(&mut self, last_save: &mut Instant, now: bool) {
        if self.cursor == self.saved || (!now && last_save.elapsed() < SAVE_EVERY) {
            return;
        }
        let (cursor, path) = (self.cursor.clone(), self.cursor_path.clone());
        let saved = tokio::task::spawn_blocking(move || cursor.save(&path)).await;
        match saved {
            Ok(Ok(())) => self.saved = self.cursor.clone(),
            Ok(Err(err)) => {
                tracing::warn!(sink = self.labels.sink, %err, path = %self.cursor_path.display(), "audit export: the cursor could not be saved")
            }
            Err(err) => {
                tracing::warn!(sink = self.labels.sink, %err, "audit export: saving the cursor failed")
            }
        }
        *last_save = Instant::now();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_log(path: &Path, texts: &[&str]) {
        let lines: String = texts
            .iter()
            .enumerate()
            .map(|(seq, text)| {
                format!("{{\"v\":1,\"seq\":{seq},\"ts\":\"2026-12-02T00:00:00Z\",\"kind\":\"{text}\"}}\n")
            })
            .collect();
        std::fs::write(path, lines).expect("log");
    }

    #[test]
    fn a_cursor_made_on_another_log_starts_over() {
        let dir = std::env::temp_dir().join(format!("pexi-cursor-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let log = dir.join("audit.jsonl");
        write_log(&log, &["a", "b", "c", "d"]);
        let line = Tail::new(&log, 2).read(1).expect("read").lines.remove(0);
        let cursor = Cursor {
            next_seq: 3,
            checkpoint_offset: 10,
            last_digest: Some(crate::audit::line_digest(line.text.as_bytes())),
        };
        assert_eq!(cursor.clone().resume(&log), cursor, "the same log");
        // A new chain, longer than what was shipped: the record at seq 2 differs.
        write_log(&log, &["x", "y", "z", "w", "v"]);
        assert_eq!(cursor.clone().resume(&log), Cursor::default());
        // A new chain, shorter than what was shipped.
        write_log(&log, &["x"]);
        assert_eq!(cursor.clone().resume(&log), Cursor::default());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
