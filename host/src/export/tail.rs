//! Reading the audit log the way Vector and Fluent Bit tail files: from a cursor (the `seq` of the next
//! record to ship), across rotations, complete lines only. The file being read is held open, so a rotation
//! (a rename) or retention (an unlink) under it loses nothing: it is read to its end, then the file whose
//! first record comes next is found by `seq`. The checkpoint file is tailed by byte offset.

use std::fs::File;
use std::io::{BufRead, BufReader, Seek, SeekFrom};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::audit::log_files;

/// One line of the log (or of the checkpoint file), exactly as written, without its newline.
#[derive(Clone, Debug)]
pub struct Line {
    pub seq: u64,
    /// The record's `kind`; `checkpoint` for a checkpoint.
    pub kind: String,
    /// The record's `ts` (RFC 3339).
    pub ts: String,
    pub text: String,
}

/// What a read found besides lines.
#[derive(Debug, Default)]
pub struct Read {
    pub lines: Vec<Line>,
    /// Records before the oldest one on disk were never shipped (retention removed their file first):
    /// `(from, to)`, the missing `seq`s, to be reported.
    pub gap: Option<(u64, u64)>,
}

pub struct Tail {
    log: PathBuf,
    /// The `seq` of the next record to read.
    next: u64,
    open: Option<Open>,
}

struct Open {
    reader: BufReader<File>,
    inode: u64,
}

impl Tail {
    pub fn new(log: &Path, next: u64) -> Tail {
        Tail {
            log: log.to_path_buf(),
            next,
            open: None,
        }
    }

    /// The `seq` of the next record to read.
    pub fn next(&self) -> u64 {
        self.next
    }

    /// Up to `max` records from the cursor on; fewer (or none) when the log has no more yet.
    pub fn read(&mut self, max: usize) -> std::io::Result<Read> {
        let mut read = Read::default();
        while read.lines.len() < max {
            if self.open.is_none() && !self.locate(&mut read)? {
                break;
            }
            let Some(open) = self.open.as_mut() else {
                break;
            };
            let mut raw = Vec::new();
            let start = open.reader.stream_position()?;
            let n = open.reader.read_until(b'\n', &mut raw)?;
            if n == 0 || raw.last() != Some(&b'\n') {
                // The end for now, or a line the writer is still writing: read it again next time.
                open.reader.seek(SeekFrom::Start(start))?;
                let rotated = std::fs::metadata(&self.log)
                    .map(|m| m.ino() != open.inode)
                    .unwrap_or(true);
                if rotated && n == 0 {
                    // This file is complete (renamed aside); its successor starts with `next`.
                    self.open = None;
                    continue;
                }
                break;
            }
            raw.pop();
            let Some(line) = parse(raw) else {
                // Not a record (the writer never leaves one): skipped, and shown to whoever reads the log.
                tracing::warn!(log = %self.log.display(), "audit export: a line that is no record; skipped");
                continue;
            };
            if line.seq < self.next {
                continue;
            }
            if line.seq > self.next {
                read.gap = Some((self.next, line.seq - 1));
            }
            self.next = line.seq + 1;
            read.lines.push(line);
        }
        Ok(read)
    }

    /// Opens the file that holds `next` (or the oldest one, past a gap), positioned at the first line
    /// of `next` or later; `false` when the log has nothing from `next` on.
    fn locate(&mut self, read: &mut Read) -> std::io::Result<bool> {
        let mut chosen: Option<(PathBuf, u64)> = None;
        for file in log_files(&self.log) {
            let Some(first) = first_seq(&file) else {
                continue;
            };
            if first <= self.next || chosen.is_none() {
                chosen = Some((file, first));
            }
            if first > self.next {
                break;
            }
        }
        let Some((path, first)) = chosen else {
            return Ok(false);
        };
        if first > self.next {
            read.gap = Some((self.next, first - 1));
            self.next = first;
        }
        let file = match File::open(&path) {
            Ok(file) => file,
            // Removed since it was listed (retention): look again next time.
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(false),
            Err(err) => return Err(err),
        };
        let inode = file.metadata()?.ino();
        self.open = Some(Open {
            reader: BufReader::new(file),
            inode,
        });
        Ok(true)
    }
}

fn first_seq(path: &Path) -> Option<u64> {
    let file = File::open(path).ok()?;
    let mut line = Vec::new();
    BufReader::new(file).read_until(b'\n', &mut line).ok()?;
    if line.last() != Some(&b'\n') {
        return None;
    }
    line.pop();
    parse(line).map(|l| l.seq)
}

fn parse(raw: Vec<u8>) -> Option<Line> {
    let text = String::from_utf8(raw).ok()?;
    let value: Value = serde_json::from_str(&text).ok()?;
    Some(Line {
        seq: value["seq"].as_u64()?,
        kind: value["kind"].as_str()?.to_string(),
        ts: value["ts"].as_str().unwrap_or_default().to_string(),
        text,
    })
}

/// The signed checkpoints (`checkpoints/<log>.checkpoints`), by byte offset. Each carries the `last_seq`
/// it covers, kept in [`Line::seq`], so it is shipped only after those records.
pub struct CheckpointTail {
    path: PathBuf,
    pub offset: u64,
}

impl CheckpointTail {
    pub fn new(path: &Path, offset: u64) -> CheckpointTail {
        CheckpointTail {
            path: path.to_path_buf(),
            offset,
        }
    }

    /// The complete checkpoint lines after the offset, with the offset after each.
    pub fn read(&mut self, max: usize) -> std::io::Result<Vec<(Line, u64)>> {
        let mut file = match File::open(&self.path) {
            Ok(file) => file,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(err) => return Err(err),
        };
        if file.metadata()?.len() < self.offset {
            // A new file (the old one was moved aside with its log): from its start.
            self.offset = 0;
        }
        file.seek(SeekFrom::Start(self.offset))?;
        let mut reader = BufReader::new(file);
        let mut out = Vec::new();
        let mut at = self.offset;
        while out.len() < max {
            let mut raw = Vec::new();
            let n = reader.read_until(b'\n', &mut raw)?;
            if n == 0 || raw.last() != Some(&b'\n') {
                break;
            }
            at += n as u64;
            raw.pop();
            let Ok(text) = String::from_utf8(raw) else {
                continue;
            };
            let Ok(value) = serde_json::from_str::<Value>(&text) else {
                continue;
            };
            let line = Line {
                seq: value["last_seq"].as_u64().unwrap_or(0),
                kind: "checkpoint".into(),
                ts: value["ts"].as_str().unwrap_or_default().to_string(),
                text,
            };
            out.push((line, at));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn record(seq: u64) -> String {
        format!("{{\"v\":1,\"seq\":{seq},\"ts\":\"2026-12-02T00:00:00Z\",\"kind\":\"k{seq}\"}}\n")
    }

    #[test]
    fn reads_across_a_rotation_from_a_cursor_and_waits_for_a_torn_line() {
        let dir = std::env::temp_dir().join(format!("pexi-tail-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let log = dir.join("audit.jsonl");
        let mut text = String::new();
        for seq in 0..5 {
            text.push_str(&record(seq));
        }
        std::fs::write(&log, &text).expect("write");
        let mut tail = Tail::new(&log, 2);
        let first = tail.read(2).expect("read");
        assert_eq!(
            first.lines.iter().map(|l| l.seq).collect::<Vec<_>>(),
            [2, 3]
        );
        // The writer rotates: the file is renamed aside, a new one continues the chain.
        std::fs::rename(&log, crate::audit::rotated_path(&log, 1)).expect("rotate");
        let mut active = std::fs::File::create(&log).expect("new file");
        active.write_all(record(5).as_bytes()).expect("write");
        // Half a line: not read until it is whole.
        active.write_all(b"{\"v\":1,\"seq\":6,").expect("write");
        let second = tail.read(10).expect("read");
        assert_eq!(
            second.lines.iter().map(|l| l.seq).collect::<Vec<_>>(),
            [4, 5]
        );
        assert!(second.gap.is_none());
        active
            .write_all(b"\"ts\":\"2026-12-02T00:00:01Z\",\"kind\":\"k6\"}\n")
            .expect("write");
        let third = tail.read(10).expect("read");
        assert_eq!(third.lines.iter().map(|l| l.seq).collect::<Vec<_>>(), [6]);
        assert_eq!(third.lines[0].kind, "k6");
        // A new reader from a cursor in the rotated file finds it by seq.
        let again = Tail::new(&log, 3).read(10).expect("read");
        assert_eq!(
            again.lines.iter().map(|l| l.seq).collect::<Vec<_>>(),
            [3, 4, 5, 6]
        );
        // Records retention removed before they were shipped are a gap, reported once.
        std::fs::remove_file(crate::audit::rotated_path(&log, 1)).expect("retention");
        let gapped = Tail::new(&log, 1).read(10).expect("read");
        assert_eq!(gapped.gap, Some((1, 4)));
        assert_eq!(
            gapped.lines.iter().map(|l| l.seq).collect::<Vec<_>>(),
            [5, 6]
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
