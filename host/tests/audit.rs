//! The audit log on its own: the chain across rotations, tampering of every kind found at the right line,
//! crash recovery, and restart continuity. (Redaction and SIGKILL under load are in `audit_e2e.rs`.)

mod support;

use std::path::Path;

use pexi_host::audit::verify::verify;
use pexi_host::audit::{log_files, AuditLog, AuditSettings, Durability};
use serde_json::json;

fn settings(dir: &Path, rotate_bytes: u64) -> AuditSettings {
    AuditSettings {
        path: dir.join("audit.jsonl"),
        durability: Durability::None,
        batch_ms: 1,
        batch_records: 64,
        rotate_bytes,
        keep_rotated_files: 0,
        keep_rotated_bytes: 0,
        sealing: None,
        force: false,
    }
}

fn write_records(settings: &AuditSettings, n: usize) {
    let log = AuditLog::open(settings).expect("open");
    for i in 0..n {
        drop(log.record("decision", json!({"decision_id": format!("d-{i}"), "i": i})));
    }
    log.flush().expect("flush");
    log.close();
}

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .expect("read")
        .lines()
        .map(str::to_string)
        .collect()
}

#[test]
fn ten_thousand_records_across_rotations_form_one_chain() {
    let dir = support::temp_dir("audit-chain");
    let settings = settings(&dir, 300_000);
    write_records(&settings, 10_000);
    let files = log_files(&settings.path);
    assert!(files.len() >= 4, "at least 3 rotations: {files:?}");
    let report = verify(&files).expect("intact");
    // 10 000 records, the chain_start, and one `rotate` record opening each rotated-into file.
    assert_eq!(report.records as usize, 10_000 + 1 + (files.len() - 1));
    assert!(!report.starts_mid_chain && report.torn_end.is_none());
    // Order of the arguments does not matter.
    let mut reversed = files.clone();
    reversed.reverse();
    assert_eq!(verify(&reversed).expect("intact").head, report.head);
    // Missing the first file: still a chain, but said to start mid-way.
    assert!(verify(&files[1..]).expect("intact").starts_mid_chain);
    std::fs::remove_dir_all(&dir).expect("cleanup");
}

/// A folder holding `audit.jsonl`: the original lines, changed.
fn tampered(original: &[String], change: impl FnOnce(&mut Vec<String>)) -> support::TestDir {
    let dir = support::temp_dir("audit-tamper");
    let mut lines = original.to_vec();
    change(&mut lines);
    std::fs::write(dir.join("audit.jsonl"), lines.join("\n") + "\n").expect("write");
    dir
}

#[test]
fn every_kind_of_tampering_is_found_at_its_line() {
    let dir = support::temp_dir("audit-original");
    let settings = settings(&dir, u64::MAX);
    write_records(&settings, 40);
    let original = lines(&settings.path);
    assert!(verify(std::slice::from_ref(&settings.path)).is_ok());

    // Line numbers are 1-based; line 1 is the chain_start.
    type Tamper = Box<dyn FnOnce(&mut Vec<String>)>;
    let cases: Vec<(&str, Tamper, usize, &str)> = vec![
        (
            "edited",
            Box::new(|l: &mut Vec<String>| l[10] = l[10].replace("\"d-9\"", "\"d-X\"")),
            11,
            "altered",
        ),
        (
            "deleted",
            Box::new(|l: &mut Vec<String>| {
                l.remove(20);
            }),
            21,
            "missing",
        ),
        (
            "reordered",
            Box::new(|l: &mut Vec<String>| l.swap(5, 6)),
            6,
            "out of order",
        ),
        (
            "inserted copy",
            Box::new(|l: &mut Vec<String>| {
                let copy = l[3].clone();
                l.insert(30, copy);
            }),
            31,
            "out of order",
        ),
        (
            "inserted garbage",
            Box::new(|l: &mut Vec<String>| l.insert(15, "{\"not\": \"a record\"".into())),
            16,
            "not a valid record",
        ),
        (
            "truncated mid-file",
            Box::new(|l: &mut Vec<String>| {
                let cut = l[25].len() / 2;
                l[25].truncate(cut);
            }),
            26,
            "not a valid record",
        ),
    ];
    for (what, change, line, problem) in cases {
        let dir = tampered(&original, change);
        let path = dir.join("audit.jsonl");
        let broken = verify(std::slice::from_ref(&path)).expect_err(what);
        assert_eq!(broken.line, line, "{what}: {broken}");
        assert!(broken.problem.contains(problem), "{what}: {broken}");
    }
    std::fs::remove_dir_all(&dir).expect("cleanup");
}

#[test]
fn a_torn_last_line_is_reported_and_a_restart_recovers_around_it() {
    let dir = support::temp_dir("audit-torn");
    let settings = settings(&dir, u64::MAX);
    write_records(&settings, 10);
    // A crash in the middle of writing the next record.
    let mut bytes = std::fs::read(&settings.path).expect("read");
    bytes.extend_from_slice(b"{\"v\":1,\"seq\":11,\"ts\":\"2026-");
    std::fs::write(&settings.path, &bytes).expect("write");
    let report = verify(std::slice::from_ref(&settings.path)).expect("complete records verify");
    assert_eq!(report.torn_end, Some((settings.path.clone(), 12)));
    assert_eq!(report.records, 11);

    // The PEP starts again: the torn file is moved aside, the chain continues and explains the tear.
    write_records(&settings, 5);
    let files = log_files(&settings.path);
    assert_eq!(files.len(), 2, "{files:?}");
    let report = verify(&files).expect("one chain around the tear");
    assert_eq!(report.records, 11 + 1 + 5);
    assert!(report.torn_end.is_none());
    // A tear that no restart explains, in the middle of the set, is a break.
    let first = lines(&files[0]);
    let forged = dir.join("forged.jsonl");
    std::fs::write(&forged, first[..5].join("\n") + "\n" + &first[5][..10]).expect("write");
    let tail = dir.join("tail.jsonl");
    std::fs::write(&tail, first[6..].join("\n") + "\n").expect("write");
    assert!(verify(&[forged, tail]).is_err());
    std::fs::remove_dir_all(&dir).expect("cleanup");
}

#[test]
fn a_restart_continues_the_same_chain() {
    let dir = support::temp_dir("audit-restart");
    let settings = settings(&dir, u64::MAX);
    write_records(&settings, 3);
    write_records(&settings, 3);
    let all = lines(&settings.path);
    let kinds: Vec<String> = all
        .iter()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).expect("json")["kind"]
                .as_str()
                .expect("kind")
                .to_string()
        })
        .collect();
    assert_eq!(kinds[0], "chain_start");
    assert_eq!(kinds[4], "pep_start", "{kinds:?}");
    let report = verify(std::slice::from_ref(&settings.path)).expect("one chain");
    assert_eq!(report.records, 8);
    std::fs::remove_dir_all(&dir).expect("cleanup");
}

#[test]
fn durable_modes_complete_tickets_and_records_keep_reserved_fields() {
    for durability in [Durability::Always, Durability::Batch, Durability::None] {
        let dir = support::temp_dir("audit-modes");
        let mut s = settings(&dir, u64::MAX);
        s.durability = durability;
        let log = AuditLog::open(&s).expect("open");
        log.record("decision", json!({"seq": 999, "prev": "forged", "x": 1}))
            .wait()
            .expect("durable");
        log.close();
        let last: serde_json::Value =
            serde_json::from_str(lines(&s.path).last().expect("line")).expect("json");
        assert_eq!(last["seq"], 1, "{durability:?}: the writer's seq wins");
        assert_ne!(last["prev"], "forged");
        assert_eq!(last["x"], 1);
        assert!(verify(std::slice::from_ref(&s.path)).is_ok());
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
