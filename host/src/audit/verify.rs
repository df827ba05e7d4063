//! `pexi audit verify`: checks that a set of audit files is one unbroken chain.
//!
//! Files are put in order by the `seq` of their first record, then every line is checked: it is a JSON
//! object of format version 1; its `seq` is one more than the previous record's; its `prev` is the SHA-256
//! of the previous line. The first problem is reported with its file and line. A line cut short by a crash
//! is accepted only where a crash explains it: as the very last line, or at the end of a file whose
//! successor's first record names it (`torn_tail`), which is what the PEP writes when it restarts after one.
//!
//! What a chain cannot show by itself: records removed from the very end. `verify` prints the head digest so
//! it can be recorded elsewhere and compared later.

use std::path::{Path, PathBuf};

use serde_json::Value;

use super::{line_digest, FORMAT_VERSION};

#[derive(Debug, PartialEq, Eq)]
pub struct Report {
    pub records: u64,
    pub files: Vec<PathBuf>,
    /// Digest of the last record: anchor it elsewhere to detect truncation of the end.
    pub head: Option<String>,
    /// A torn final line (an interrupted write): `(file, line)`.
    pub torn_end: Option<(PathBuf, usize)>,
    /// The chain began before the first file given (earlier files were not supplied).
    pub starts_mid_chain: bool,
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}:{line}: {problem}", file.display())]
pub struct Broken {
    pub file: PathBuf,
    pub line: usize,
    pub problem: String,
}

struct Line<'a> {
    file: &'a Path,
    number: usize,
    bytes: &'a [u8],
    /// The file ends without a newline after this line.
    unterminated: bool,
}

pub fn verify(paths: &[PathBuf]) -> Result<Report, Broken> {
    let mut files: Vec<(u64, PathBuf, Vec<u8>)> = Vec::new();
    for path in paths {
        let bytes = std::fs::read(path).map_err(|err| Broken {
            file: path.clone(),
            line: 0,
            problem: format!("cannot read: {err}"),
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
        records: 0,
        files: files.iter().map(|(_, p, _)| p.clone()).collect(),
        head: None,
        torn_end: None,
        starts_mid_chain: false,
    };
    // Every seq present, so a gap can be told apart from records that were moved.
    let present: std::collections::HashSet<u64> = lines
        .iter()
        .filter_map(|l| serde_json::from_slice::<Value>(l.bytes).ok())
        .filter_map(|record| record["seq"].as_u64())
        .collect();
    let mut previous: Option<(&Line, u64)> = None;
    let mut torn: Option<(PathBuf, usize)> = None;
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
        previous = Some((line, seq));
    }
    if let Some((file, line)) = torn {
        return Err(Broken {
            file,
            line,
            problem: "an incomplete record in the middle of the chain".into(),
        });
    }
    Ok(report)
}
