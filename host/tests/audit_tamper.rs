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

/// Writes a log whose records come in write groups, as a busy PEP's do: records nobody waits for (resolve
/// and outcome records) are held back and written, unsigned, ahead of the next awaited record, whose
/// signature covers them through the chain.
fn write_grouped_log(dir: &Path) {
    let log = AuditLog::open(&settings(dir)).expect("open");
    for i in 0..RECORDS {
        let ticket = log.record(
            "decision",
            json!({"decision_id": format!("d-{i}"), "request": {"host": format!("h{i}.test")}, "decision": {"allow": false}}),
        );
        if i % 5 == 4 {
            ticket.wait().expect("written");
        }
    }
    log.close();
}

fn signed(line: &str) -> bool {
    line.contains(",\"sig\":\"")
}

/// Where the write group of line `index` starts: the line after the previous signed one.
fn group_start(lines: &[(PathBuf, String)], index: usize) -> usize {
    let mut start = index;
    while start > 0 && !signed(&lines[start - 1].1) {
        start -= 1;
    }
    start
}

/// A line of the grouped log that is not the last of its group (unsigned), past `from`.
fn unsigned_line(lines: &[(PathBuf, String)], from: usize) -> usize {
    (from..lines.len())
        .find(|i| !signed(&lines[*i].1) && lines[*i].1.contains("\"kind\":\"decision\""))
        .expect("an unsigned record")
}

/// The signed last line of a group of several lines, past `from`.
fn group_end(lines: &[(PathBuf, String)], from: usize) -> usize {
    (from.max(1)..lines.len())
        .find(|i| signed(&lines[*i].1) && !signed(&lines[i - 1].1))
        .expect("a group's signed line")
}

/// `line` as an earlier line of a group would be: its `,"sig":"…"` suffix removed.
fn without_signature(line: &str) -> String {
    let cut = line.find(",\"sig\":\"").expect("sig");
    format!("{}}}", &line[..cut])
}

fn grouped_trial(name: &str, tamper: impl FnOnce(&Path) -> String) {
    trial_on(write_grouped_log, name, tamper);
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
    trial_on(write_log, name, tamper);
}

/// Writes a log with `write`, tampers with it, and checks that `verify` fails at the line `tamper` names.
fn trial_on(write: fn(&Path), name: &str, tamper: impl FnOnce(&Path) -> String) {
    let dir = support::temp_dir(&format!("tamper-{name}"));
    write(&dir);
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

#[test]
fn a_grouped_log_verifies_with_one_signature_per_write_group() {
    let dir = support::temp_dir("tamper-grouped");
    write_grouped_log(&dir);
    let all = lines(&dir);
    let unsigned = all.iter().filter(|(_, l)| !signed(l)).count();
    assert!(
        unsigned > all.len() / 2,
        "most records ride in a group: {unsigned} of {} unsigned",
        all.len()
    );
    assert!(signed(&all[all.len() - 1].1), "the last line is signed");
    let (status, output) = verify(&glob(&dir));
    assert_eq!(status, 0, "{output}");
    assert!(
        output.contains(&format!("{} records signed by the key", all.len()))
            && output.contains(&format!(
                "{unsigned} by the last record of their write group"
            )),
        "{output}"
    );
}

#[test]
fn every_tamper_within_a_write_group_is_found() {
    // An unsigned record edited, the chain left alone: the chain names it.
    grouped_trial("group-edited", |dir| {
        let mut all = lines(dir);
        let i = unsigned_line(&all, all.len() / 2);
        all[i].1 = all[i].1.replace("\"allow\":false", "\"allow\":true");
        write_lines(dir, &all);
        position(&all, i)
    });
    // The same with every later prev recomputed: the group's signature fails; its first line is named.
    grouped_trial("group-edited-rechained", |dir| {
        let mut all = lines(dir);
        let i = unsigned_line(&all, all.len() / 3);
        all[i].1 = all[i].1.replace("\"allow\":false", "\"allow\":true");
        rechain(&mut all, i + 1);
        write_lines(dir, &all);
        position(&all, group_start(&all, i))
    });
    // A group's signature removed (its last line made to look like an earlier line of a group): nothing
    // signs the group any more, and the next group's chain check fails at the changed line.
    grouped_trial("signature-stripped", |dir| {
        let mut all = lines(dir);
        let i = group_end(&all, all.len() / 2);
        all[i].1 = without_signature(&all[i].1);
        write_lines(dir, &all);
        position(&all, i)
    });
    // The same, re-chained: the next group's signature fails.
    grouped_trial("signature-stripped-rechained", |dir| {
        let mut all = lines(dir);
        let i = group_end(&all, all.len() / 2);
        all[i].1 = without_signature(&all[i].1);
        rechain(&mut all, i + 1);
        write_lines(dir, &all);
        position(&all, group_start(&all, i))
    });
    // The last group's signature removed: its records end the log signed by nothing.
    grouped_trial("last-signature-stripped", |dir| {
        let mut all = lines(dir);
        let i = all.len() - 1;
        all[i].1 = without_signature(&all[i].1);
        write_lines(dir, &all);
        position(&all, group_start(&all, i))
    });
    // A record made up and appended, fitted to the chain (seq, prev) but unsigned: named itself.
    grouped_trial("unsigned-appended", |dir| {
        let mut all = lines(dir);
        let last = all.len() - 1;
        let seq = field_u64(&all[last].1, "seq") + 1;
        let prev = line_digest(all[last].1.as_bytes());
        let forged = format!(
            "{{\"decision\":{{\"allow\":true}},\"decision_id\":\"forged\",\"kind\":\"decision\",\"prev\":\"{prev}\",\"seq\":{seq},\"ts\":\"2026-01-01T00:00:00.000Z\",\"v\":1}}"
        );
        let file = all[last].0.clone();
        all.push((file, forged));
        write_lines(dir, &all);
        position(&all, all.len() - 1)
    });
}

#[test]
fn a_crash_that_tears_a_groups_signed_line_leaves_its_records_unauthenticated_not_vouched_for() {
    let dir = support::temp_dir("tamper-torn-group");
    write_grouped_log(&dir);
    let active = dir.join("audit.jsonl");
    let all = lines(&dir);
    let last = all.len() - 1;
    let unsigned_before = last - group_start(&all, last);
    assert!(unsigned_before > 0, "the last group has unsigned lines");
    // The crash: the group's last (signed) line cut in half, before any checkpoint covered it.
    let text = std::fs::read_to_string(&active).expect("read");
    let keep = text.len() - all[last].1.len() / 2 - 1;
    std::fs::write(&active, &text[..keep]).expect("write");
    let torn_seq = field_u64(&all[last].1, "seq");
    let checkpoints = dir.join("checkpoints/audit.jsonl.checkpoints");
    let kept: String = std::fs::read_to_string(&checkpoints)
        .expect("checkpoints")
        .lines()
        .filter(|l| field_u64(l, "last_seq") < torn_seq)
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&checkpoints, kept).expect("write");
    let warning = format!(
        "warning: {unsigned_before} record(s) just before a torn line are not authenticated"
    );
    let (status, output) = verify(&glob(&dir));
    assert_eq!(status, 0, "{output}");
    assert!(output.contains(&warning), "{output}");
    // The PEP starts again on it: the torn file goes aside, the new chain names the torn line, and its
    // first signature does not make those records count as signed.
    let log = AuditLog::open(&settings(&dir)).expect("reopen after the crash");
    log.record("decision", json!({"decision_id": "after"}))
        .wait()
        .expect("written");
    log.close();
    let (status, output) = verify(&glob(&dir));
    assert_eq!(status, 0, "{output}");
    assert!(output.contains(&warning), "{output}");
}
