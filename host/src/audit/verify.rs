//! `pexi audit verify`: checks that a set of audit files is one unbroken, signed chain.
//!
//! Files are put in order by the `seq` of their first record, then every line is checked: it is a JSON
//! object of format version 1; with a public key, its signature holds, or it has none and the next signed
//! line (the last of its write group) covers it through the chain (so an edited, inserted, renumbered or
//! re-chained record is named as itself, or as the first line of its group); its `seq` is one more than
//! the previous record's; its `prev` is the SHA-256 of the previous line. The first problem is reported
//! with its file and line. A line cut short by a crash is accepted only where a crash explains it: as the
//! very last line, or at the end of a file whose successor's first record names it (`torn_tail`), which is
//! what the PEP writes when it restarts after one; unsigned records of a group whose signed line was torn
//! are counted as not authenticated.
//!
//! With the checkpoint file, the log must also still hold everything the latest checkpoint covered: every
//! file it names, the record at its `last_seq` with its `head` digest, and nothing missing before its
//! `first_seq`. What remains undetectable is what was written after the latest checkpoint (the report says
//! how many records that is), or the log and the checkpoint file cut back together to an earlier checkpoint
//! — unless the checkpoints were kept somewhere else.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::seal::{self, Unsealed};
use super::{line_digest, FORMAT_VERSION};

#[derive(Debug, Default, PartialEq, Eq)]
pub struct Report {
    pub records: u64,
    pub files: Vec<PathBuf>,
    /// Digest of the last record: anchor it elsewhere to detect truncation of the end.
    pub head: Option<String>,
    /// A torn final line (an interrupted write): `(file, line)`.
    pub torn_end: Option<(PathBuf, usize)>,
    /// The chain began before the first file given (earlier files were not supplied).
    pub starts_mid_chain: bool,
    /// Records whose signature was checked (0 without a public key).
    pub signed: u64,
    /// Records covered by the signature of a later record of their write group (0 without a public key).
    pub covered: u64,
    /// Unsigned records just before a torn line: the write that would have signed them (their group's
    /// last line) was cut by a crash. They chain, but nothing authenticates them, and the PEP's next
    /// signature does not vouch for them either.
    pub unauthenticated: u64,
    /// Records before the first signed one, written before signing was on.
    pub unsigned_prefix: u64,
    /// What the checkpoints showed, when a checkpoint file was given.
    pub checkpoints: Option<CheckpointReport>,
}

#[derive(Debug, PartialEq, Eq)]
pub struct CheckpointReport {
    pub count: usize,
    /// The latest checkpoint's last seq and time.
    pub last_seq: Option<u64>,
    pub last_ts: String,
    /// Records after the latest checkpoint: a removal of these from the end could not be detected.
    pub uncovered: u64,
}

/// What `verify` checks against, beyond the files themselves.
#[derive(Debug, Default)]
pub struct Options {
    /// The PEP's Ed25519 public key (32 bytes): every record is checked against its own signature or its
    /// write group's.
    pub public_key: Option<Vec<u8>>,
    /// The checkpoint file (its lines are checked with the public key, which it requires).
    pub checkpoints: Option<PathBuf>,
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}:{line}: {problem}", file.display())]
pub struct Broken {
    pub file: PathBuf,
    /// The line at fault; 0 for a whole file (missing, unreadable).
    pub line: usize,
    pub problem: String,
}

const CANNOT_READ: &str = "cannot read";

impl Broken {
    /// The files could not be read at all: an error of the command, not a finding about the log.
    pub fn is_read_error(&self) -> bool {
        self.problem.starts_with(CANNOT_READ)
    }
}

struct Line<'a> {
    file: &'a Path,
    number: usize,
    bytes: &'a [u8],
    /// The file ends without a newline after this line.
    unterminated: bool,
}

/// The chain alone (no signatures, no checkpoints).
pub fn verify(paths: &[PathBuf]) -> Result<Report, Broken> {
    verify_with(paths, &Options::default())
}

pub fn verify_with(paths: &[PathBuf], options: &Options) -> Result<Report, Broken> {
    // The checkpoints are read before the log: a running PEP writes a checkpoint only after the records
    // it covers, so every checkpoint read here covers records the log read below already holds.
    let checkpoint_text = match &options.checkpoints {
        Some(path) => Some(std::fs::read(path).map_err(|err| Broken {
            file: path.clone(),
            line: 0,
            problem: format!("{CANNOT_READ}: {err}"),
        })?),
        None => None,
    };
    let mut files: Vec<(u64, PathBuf, Vec<u8>)> = Vec::new();
    for path in paths {
        let bytes = std::fs::read(path).map_err(|err| Broken {
            file: path.clone(),
            line: 0,
            problem: format!("{CANNOT_READ}: {err}"),
        })?;
        let first_seq = bytes
            .split(|b| *b == b'\n')
            .next()
            .and_then(|line| serde_json::from_slice::<Value>(line).ok())
            .and_then(|record| record["seq"].as_u64())
            .ok_or_else(|| Broken {
                file: path.clone(),
                line: 1,
                problem: "the first line is not a record with a seq".into(),
            })?;
        files.push((first_seq, path.clone(), bytes));
    }
    files.sort_by_key(|(seq, _, _)| *seq);

    let mut lines: Vec<Line> = Vec::new();
    for (_, path, bytes) in &files {
        let terminated = bytes.ends_with(b"\n");
        let body = bytes.strip_suffix(b"\n").unwrap_or(bytes);
        let count = body.split(|b| *b == b'\n').count();
        for (i, line) in body.split(|b| *b == b'\n').enumerate() {
            lines.push(Line {
                file: path,
                number: i + 1,
                bytes: line,
                unterminated: !terminated && i + 1 == count,
            });
        }
    }

    let mut report = Report {
        files: files.iter().map(|(_, p, _)| p.clone()).collect(),
        ..Report::default()
    };
    // seq -> (file, line number, digest), for the checkpoints.
    let mut by_seq: HashMap<u64, (&Path, usize, String)> = HashMap::new();
    let mut signing_seen = false;
    // Every seq present, so a gap can be told apart from records that were moved.
    let present: std::collections::HashSet<u64> = lines
        .iter()
        .filter_map(|l| serde_json::from_slice::<Value>(l.bytes).ok())
        .filter_map(|record| record["seq"].as_u64())
        .collect();
    let mut previous: Option<(&Line, u64)> = None;
    let mut torn: Option<(PathBuf, usize)> = None;
    // Unsigned records since the last signed one (the earlier lines of a write group): how many, and the
    // first of them.
    let mut awaiting: Option<(u64, PathBuf, usize)> = None;
    for (index, line) in lines.iter().enumerate() {
        let broken = |problem: String| Broken {
            file: line.file.to_path_buf(),
            line: line.number,
            problem,
        };
        let record: Value = match serde_json::from_slice(line.bytes) {
            Ok(Value::Object(map)) => Value::Object(map),
            _ if line.unterminated && index + 1 == lines.len() => {
                report.torn_end = Some((line.file.to_path_buf(), line.number));
                if let Some((count, _, _)) = awaiting.take() {
                    report.unauthenticated += count;
                }
                break;
            }
            _ if line.unterminated => {
                torn = Some((line.file.to_path_buf(), line.number));
                continue;
            }
            _ => {
                return Err(broken(
                    "not a valid record: truncated, edited or inserted".into(),
                ))
            }
        };
        if let Some((torn_file, torn_line)) = torn.take() {
            if let Some((count, _, _)) = awaiting.take() {
                report.unauthenticated += count;
            }
            let acknowledged = record["torn_tail"]["line"].as_u64() == Some(torn_line as u64)
                && record["torn_tail"]["file"].as_str()
                    == torn_file.file_name().and_then(|n| n.to_str());
            if !acknowledged {
                return Err(Broken {
                    file: torn_file,
                    line: torn_line,
                    problem: "an incomplete record in the middle of the chain".into(),
                });
            }
        }
        if let Some(key) = &options.public_key {
            // Before anything else about the record: a record that was edited, inserted, renumbered or
            // re-chained is this line, whatever the chain says about its neighbours.
            match seal::check(line.bytes, key) {
                Ok(()) => {
                    signing_seen = true;
                    report.signed += 1;
                    // Its `prev` pins the line before it, and so on back: the group is authentic once the
                    // chain checks below hold for each of its lines.
                    if let Some((count, _, _)) = awaiting.take() {
                        report.covered += count;
                    }
                }
                Err(Unsealed::Missing) if !signing_seen => report.unsigned_prefix += 1,
                Err(Unsealed::Missing) => {
                    // An earlier line of a write group: the group's last line signs it.
                    let entry =
                        awaiting.get_or_insert_with(|| (0, line.file.to_path_buf(), line.number));
                    entry.0 += 1;
                }
                Err(Unsealed::Invalid) => {
                    return Err(match awaiting {
                        // The signature covers the whole group: the first line that may be at fault.
                        Some((count, file, first)) => Broken {
                            file,
                            line: first,
                            problem: format!(
                                "the signature of its write group ({}:{}) does not match: this record or \
                                 one of the {count} after it was edited, inserted, renumbered or re-chained",
                                line.file.display(),
                                line.number
                            ),
                        },
                        None => broken(
                            "the signature does not match: this record was edited, inserted, renumbered \
                             or re-chained"
                                .into(),
                        ),
                    });
                }
            }
        }
        if record["v"].as_u64() != Some(FORMAT_VERSION) {
            return Err(broken(format!(
                "format version {} is not {FORMAT_VERSION}",
                record["v"]
            )));
        }
        let Some(seq) = record["seq"].as_u64() else {
            return Err(broken("no seq".into()));
        };
        let Some(prev) = record["prev"].as_str() else {
            return Err(broken("no prev".into()));
        };
        match previous {
            None => {
                if record["kind"] == "chain_start" && record["genesis"].as_str() == Some(prev) {
                    // The genuine start of a chain.
                } else {
                    report.starts_mid_chain = true;
                }
            }
            Some((before, before_seq)) => {
                if seq > before_seq + 1 && present.contains(&(before_seq + 1)) {
                    return Err(broken(format!(
                        "out of order: seq {seq} follows {before_seq}, and seq {} comes later",
                        before_seq + 1
                    )));
                }
                if seq > before_seq + 1 {
                    return Err(broken(format!(
                        "{} record(s) missing before this one (seq {seq} follows {before_seq})",
                        seq - before_seq - 1
                    )));
                }
                if seq <= before_seq {
                    return Err(broken(format!(
                        "out of order or inserted: seq {seq} follows {before_seq}"
                    )));
                }
                if prev != line_digest(before.bytes) {
                    // The sequence is intact, so the previous line's content is what changed.
                    return Err(Broken {
                        file: before.file.to_path_buf(),
                        line: before.number,
                        problem: "altered: its digest does not match the next record's prev".into(),
                    });
                }
            }
        }
        report.records += 1;
        report.head = Some(line_digest(line.bytes));
        by_seq.insert(seq, (line.file, line.number, line_digest(line.bytes)));
        previous = Some((line, seq));
    }
    if let Some((file, line)) = torn {
        return Err(Broken {
            file,
            line,
            problem: "an incomplete record in the middle of the chain".into(),
        });
    }
    if let Some((count, file, line)) = awaiting {
        return Err(Broken {
            file,
            line,
            problem: format!(
                "no signature in a signed log: this record and the {} after it are signed by no later \
                 record (appended, or their group's signed last record removed)",
                count - 1
            ),
        });
    }
    if options.public_key.is_some() && report.unsigned_prefix > 0 && !signing_seen {
        return Err(Broken {
            file: report.files.last().cloned().unwrap_or_default(),
            line: 0,
            problem:
                "no record is signed, but a public key was given: signatures were stripped, or the \
                      log was written without signing"
                    .into(),
        });
    }
    if let Some(path) = &options.checkpoints {
        let key = options.public_key.as_deref().ok_or_else(|| Broken {
            file: path.clone(),
            line: 0,
            problem: "checkpoints need the public key to be checked".into(),
        })?;
        let last = lines
            .iter()
            .rev()
            .find(|l| !l.unterminated)
            .map(|l| (l.file.to_path_buf(), l.number));
        let text = checkpoint_text.unwrap_or_default();
        report.checkpoints = Some(check_checkpoints(path, &text, key, &report, &by_seq, last)?);
    }
    Ok(report)
}

/// Checks the checkpoint file's own signatures and chain, then that the log still holds what the latest
/// checkpoint covered.
fn check_checkpoints(
    path: &Path,
    text: &[u8],
    key: &[u8],
    report: &Report,
    by_seq: &HashMap<u64, (&Path, usize, String)>,
    last_line: Option<(PathBuf, usize)>,
) -> Result<CheckpointReport, Broken> {
    let mut prev = "none".to_string();
    let mut latest: Option<Value> = None;
    let mut count = 0;
    // A last line without its newline is being written right now (or was cut by a crash): not yet a
    // checkpoint.
    let complete = match text.iter().rposition(|b| *b == b'\n') {
        Some(end) => &text[..end],
        None => &[][..],
    };
    for (index, line) in complete.split(|b| *b == b'\n').enumerate() {
        if line.is_empty() {
            continue;
        }
        let broken = |problem: &str| Broken {
            file: path.to_path_buf(),
            line: index + 1,
            problem: problem.to_string(),
        };
        seal::check(line, key).map_err(|_| broken("the checkpoint's signature does not match"))?;
        let checkpoint: Value =
            serde_json::from_slice(line).map_err(|_| broken("not a checkpoint"))?;
        if checkpoint["prev"].as_str() != Some(prev.as_str()) {
            return Err(broken(
                "the checkpoint does not follow the one before it (checkpoints removed or reordered)",
            ));
        }
        prev = line_digest(line);
        count += 1;
        // Every checkpoint's head still in the log must match it.
        if let (Some(seq), Some(head)) =
            (checkpoint["last_seq"].as_u64(), checkpoint["head"].as_str())
        {
            if let Some((file, number, digest)) = by_seq.get(&seq) {
                if digest != head {
                    return Err(Broken {
                        file: file.to_path_buf(),
                        line: *number,
                        problem: format!(
                            "differs from the record the checkpoint of {} signed (checkpoints line {})",
                            checkpoint["ts"].as_str().unwrap_or("?"),
                            index + 1
                        ),
                    });
                }
            }
        }
        latest = Some(checkpoint);
    }
    let Some(latest) = latest else {
        return Ok(CheckpointReport {
            count: 0,
            last_seq: None,
            last_ts: String::new(),
            uncovered: report.records,
        });
    };
    let ts = latest["ts"].as_str().unwrap_or("?").to_string();
    let given: Vec<String> = report
        .files
        .iter()
        .filter_map(|f| f.file_name().map(|n| n.to_string_lossy().into_owned()))
        .collect();
    let dir = report
        .files
        .last()
        .and_then(|f| f.parent())
        .map(Path::to_path_buf)
        .unwrap_or_default();
    // Every file the latest checkpoint names must be there.
    for file in latest["files"].as_array().into_iter().flatten() {
        let name = file["name"].as_str().unwrap_or("");
        if !given.iter().any(|g| g == name) {
            return Err(Broken {
                file: dir.join(name),
                line: 0,
                problem: format!(
                    "missing: the checkpoint of {ts} names this file (records from seq {}); it was deleted, \
                     or not given",
                    file["first_seq"]
                ),
            });
        }
    }
    let last_seq = latest["last_seq"].as_u64();
    if let Some(last_seq) = last_seq {
        if !by_seq.contains_key(&last_seq) {
            let (file, line) = last_line.unwrap_or_default();
            let have = by_seq.keys().max().copied();
            return Err(Broken {
                file,
                line: line + 1,
                problem: format!(
                    "records are missing from the end: the log stops at seq {}, the checkpoint of {ts} \
                     covered up to seq {last_seq}",
                    have.map_or("-".to_string(), |h| h.to_string())
                ),
            });
        }
    }
    if let Some(first) = latest["first_seq"].as_u64() {
        if let Some(present) = by_seq.keys().min() {
            if *present > first {
                return Err(Broken {
                    file: report.files.first().cloned().unwrap_or_default(),
                    line: 1,
                    problem: format!(
                        "records seq {first}..{} are missing from the start: the checkpoint of {ts} still \
                         had them",
                        present - 1
                    ),
                });
            }
        }
    }
    let uncovered = match (last_seq, by_seq.keys().max()) {
        (Some(covered), Some(max)) => max.saturating_sub(covered),
        _ => report.records,
    };
    Ok(CheckpointReport {
        count,
        last_seq,
        last_ts: ts,
        uncovered,
    })
}
