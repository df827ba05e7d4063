//! The tamper matrix: a signed log of a few hundred records over several files, each trial applied to a
//! fresh copy, then `pexi audit verify` run as an auditor would (the files by their glob; the public key and
//! the checkpoints found at their default places). Each trial asserts the exit status and the exact line
//! named. docs/audit.md's table "what verify detects" is this list.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use pexi_host::audit::seal::Sealer;
use pexi_host::audit::{line_digest, log_files, AuditLog, AuditSettings, Durability, Sealing};
use serde_json::json;

const RECORDS: usize = 300;

fn settings(dir: &Path) -> AuditSettings {
    let path = dir.join("audit.jsonl");
    let sealer = Sealer::load_or_create(&dir.join("keys")).expect("key");
    AuditSettings {
        path: path.clone(),
        durability: Durability::None,
        batch_ms: 0,
        batch_records: 16,
        rotate_bytes: 24 * 1024,
        keep_rotated_files: 0,
        keep_rotated_bytes: 0,
        sealing: Some(Sealing {
            sealer: Arc::new(sealer),
            checkpoint_path: dir.join("checkpoints/audit.jsonl.checkpoints"),
            checkpoint_every: Duration::from_millis(5),
            checkpoint_records: 50,
        }),
        force: false,
    }
}

/// Writes the log under `dir`: `audit.jsonl` and its rotated files, `keys/`, `checkpoints/`.
fn write_log(dir: &Path) {
    let log = AuditLog::open(&settings(dir)).expect("open");
    for i in 0..RECORDS {
        log.record(
            "decision",
            json!({"decision_id": format!("d-{i}"), "request": {"host": format!("h{i}.test")}, "decision": {"allow": false}}),
        )
        .wait()
        .expect("written");
    }
    log.close();
}

/// The files an auditor's `audit.jsonl*` glob matches, oldest first.
fn glob(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("dir")
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("audit.jsonl"))
        })
        .collect();
    files.sort_by_key(|p| {
        let name = p.file_name().expect("name").to_string_lossy().into_owned();
        // The active file last.
        (name == "audit.jsonl", name)
    });
    files
}

fn verify(files: &[PathBuf]) -> (i32, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_pexi"))
        .args(["audit", "verify"])
        .args(files)
        .output()
        .expect("pexi audit verify");
    (
        output.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ),
    )
}

/// Every line of the log: (file, line text), oldest first.
fn lines(dir: &Path) -> Vec<(PathBuf, String)> {
    log_files(&dir.join("audit.jsonl"))
        .into_iter()
        .flat_map(|file| {
            std::fs::read_to_string(&file)
                .expect("read")
                .lines()
                .map(|l| (file.clone(), l.to_string()))
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Writes `lines` back into their files.
fn write_lines(dir: &Path, lines: &[(PathBuf, String)]) {
    for file in log_files(&dir.join("audit.jsonl")) {
        let text: String = lines
            .iter()
            .filter(|(f, _)| *f == file)
            .map(|(_, l)| format!("{l}\n"))
            .collect();
        std::fs::write(&file, text).expect("write");
    }
}

fn field_u64(line: &str, key: &str) -> u64 {
    let at = line.find(&format!("\"{key}\":")).expect(key) + key.len() + 3;
    line[at..]
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect::<String>()
        .parse()
        .expect("number")
}

fn set_field(line: &str, key: &str, value: &str) -> String {
    let start = line.find(&format!("\"{key}\":")).expect(key) + key.len() + 3;
    let end = if line[start..].starts_with('"') {
        start + 1 + line[start + 1..].find('"').expect("closing quote") + 1
    } else {
        start
            + line[start..]
                .find(|c: char| !c.is_ascii_digit())
                .expect("end of number")
    };
    format!("{}{value}{}", &line[..start], &line[end..])
}

/// What an attacker who can write the files but has no key does after a change at `from`: every later
/// `prev` recomputed, so the chain itself is whole again.
fn rechain(lines: &mut [(PathBuf, String)], from: usize) {
    for i in from.max(1)..lines.len() {
        let digest = line_digest(lines[i - 1].1.as_bytes());
        lines[i].1 = set_field(&lines[i].1, "prev", &format!("\"{digest}\""));
    }
}

/// The position (file, 1-based line) of line `index` of the whole log.
fn position(lines: &[(PathBuf, String)], index: usize) -> String {
    let file = &lines[index].0;
    let number = lines[..=index].iter().filter(|(f, _)| f == file).count();
    format!("{}:{number}:", file.display())
}

fn trial(name: &str, tamper: impl FnOnce(&Path) -> String) {
    let dir = support::temp_dir(&format!("tamper-{name}"));
    write_log(&dir);
    let expected = tamper(&dir);
    let (status, output) = verify(&glob(&dir));
    eprintln!("{name}: {output}");
    assert_eq!(status, 1, "{name}: exit status; output:\n{output}");
    assert!(
        output.contains(&format!("BROKEN {expected}")),
        "{name}: expected BROKEN {expected}; output:\n{output}"
    );
}

#[test]
fn an_untouched_log_verifies_with_its_signatures_and_checkpoints() {
    let dir = support::temp_dir("tamper-none");
    write_log(&dir);
    let files = glob(&dir);
    assert!(
        files.len() >= 3,
        "the log should span several files: {files:?}"
    );
    assert!(
        files.iter().all(|f| !f.to_string_lossy().contains("key")),
        "the glob matches a key: {files:?}"
    );
    let (status, output) = verify(&files);
    assert_eq!(status, 0, "{output}");
    assert!(output.contains("records signed by the key"), "{output}");
    assert!(output.contains("0 record(s) after it"), "{output}");
}

#[test]
fn every_tamper_is_named_at_its_line() {
    // An edit (deny -> allow) with every later prev recomputed: the edited record itself.
    trial("edit-rechained", |dir| {
        let mut all = lines(dir);
        let i = all.len() / 2;
        all[i].1 = all[i].1.replace("\"allow\":false", "\"allow\":true");
        rechain(&mut all, i + 1);
        write_lines(dir, &all);
        position(&all, i)
    });
    // A record deleted, the later seqs renumbered and the chain recomputed: the record now in its place.
    trial("delete-renumbered", |dir| {
        let mut all = lines(dir);
        let i = all.len() / 3;
        all.remove(i);
        for line in all.iter_mut().skip(i) {
            let seq = field_u64(&line.1, "seq");
            line.1 = set_field(&line.1, "seq", &(seq - 1).to_string());
        }
        rechain(&mut all, i);
        write_lines(dir, &all);
        position(&all, i)
    });
    // The last record edited.
    trial("last-edited", |dir| {
        let mut all = lines(dir);
        let i = all.len() - 1;
        let seq = field_u64(&all[i].1, "seq");
        all[i].1 =
            set_field(&all[i].1, "seq", &seq.to_string()).replace("\"kind\":\"", "\"kind\":\"x");
        write_lines(dir, &all);
        position(&all, i)
    });
    // A prev flipped: that line, not the one before.
    trial("prev-flipped", |dir| {
        let mut all = lines(dir);
        let i = all.len() / 4;
        let prev = all[i].1.clone();
        let at = prev.find("\"prev\":\"sha256:").expect("prev") + 15;
        let flipped = if &prev[at..at + 1] == "0" { "1" } else { "0" };
        all[i].1 = format!("{}{flipped}{}", &prev[..at], &prev[at + 1..]);
        write_lines(dir, &all);
        position(&all, i)
    });
    // A fitted insertion: a record made up in the middle, the later seqs renumbered and re-chained.
    trial("fitted-insertion", |dir| {
        let mut all = lines(dir);
        let i = all.len() / 2;
        let seq = field_u64(&all[i].1, "seq");
        let forged = format!(
            "{{\"decision\":{{\"allow\":true}},\"decision_id\":\"forged\",\"kind\":\"decision\",\"prev\":\"x\",\"seq\":{seq},\"ts\":\"2026-01-01T00:00:00.000Z\",\"v\":1}}"
        );
        let file = all[i].0.clone();
        all.insert(i, (file, forged));
        for line in all.iter_mut().skip(i + 1) {
            let seq = field_u64(&line.1, "seq");
            line.1 = set_field(&line.1, "seq", &(seq + 1).to_string());
        }
        rechain(&mut all, i);
        write_lines(dir, &all);
        position(&all, i)
    });
    // The last lines deleted: the line after the new end.
    trial("tail-deleted", |dir| {
        let mut all = lines(dir);
        all.truncate(all.len() - 3);
        write_lines(dir, &all);
        let (file, _) = &all[all.len() - 1];
        let number = all.iter().filter(|(f, _)| f == file).count() + 1;
        format!("{}:{number}:", file.display())
    });
    // The active file deleted.
    trial("active-deleted", |dir| {
        let active = dir.join("audit.jsonl");
        std::fs::remove_file(&active).expect("rm");
        format!("{}:0:", active.display())
    });
    // The active file and the newest rotated file deleted: the rotated one is named (the first missing).
    trial("active-and-newest-deleted", |dir| {
        let files = log_files(&dir.join("audit.jsonl"));
        let newest = files[files.len() - 2].clone();
        std::fs::remove_file(&newest).expect("rm");
        std::fs::remove_file(dir.join("audit.jsonl")).expect("rm");
        format!("{}:0:", newest.display())
    });
    // The oldest rotated file deleted.
    trial("oldest-deleted", |dir| {
        let oldest = log_files(&dir.join("audit.jsonl"))[0].clone();
        std::fs::remove_file(&oldest).expect("rm");
        format!("{}:0:", oldest.display())
    });
}

#[test]
fn the_pep_refuses_to_append_to_a_log_that_does_not_verify_and_force_moves_it_aside() {
    for (name, tamper) in [
        (
            "edited",
            Box::new(|dir: &Path| {
                let mut all = lines(dir);
                let i = all.len() - 5;
                all[i].1 = all[i].1.replace("\"allow\":false", "\"allow\":true");
                rechain(&mut all, i + 1);
                write_lines(dir, &all);
            }) as Box<dyn Fn(&Path)>,
        ),
        (
            "truncated",
            Box::new(|dir: &Path| {
                let mut all = lines(dir);
                all.truncate(all.len() - 3);
                write_lines(dir, &all);
            }),
        ),
    ] {
        let dir = support::temp_dir(&format!("refuse-{name}"));
        write_log(&dir);
        tamper(&dir);
        let err = AuditLog::open(&settings(&dir)).err().expect("refused");
        let message = err.to_string();
        assert!(
            message.contains("does not append to a log that does not verify")
                && message.contains("BROKEN"),
            "{name}: {message}"
        );
        // --force: the broken log and its checkpoints go aside, a new chain names them.
        let mut forced = settings(&dir);
        forced.force = true;
        let log = AuditLog::open(&forced).expect("forced open");
        log.record("decision", json!({"decision_id": "after"}))
            .wait()
            .expect("written");
        log.close();
        let aside: Vec<PathBuf> = std::fs::read_dir(&*dir)
            .expect("dir")
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("broken-"))
            })
            .collect();
        assert_eq!(aside.len(), 1, "{name}: {aside:?}");
        assert!(aside[0].join("audit.jsonl").exists());
        assert!(aside[0].join("audit.jsonl.checkpoints").exists());
        let first: serde_json::Value = serde_json::from_str(
            std::fs::read_to_string(dir.join("audit.jsonl"))
                .expect("new log")
                .lines()
                .next()
                .expect("a record"),
        )
        .expect("json");
        assert_eq!(first["kind"], "chain_start", "{name}: {first}");
        assert!(
            first["previous_log"]["problem"]
                .as_str()
                .is_some_and(|p| p.contains("BROKEN")),
            "{name}: {first}"
        );
        let (status, output) = verify(&glob(&dir));
        assert_eq!(status, 0, "{name}: the new log verifies: {output}");
    }
}
