//! Audit log throughput per durability mode, side by side in one run:
//!
//! ```sh
//! cargo run --release -p pexi-host --example audit_bench
//! ```
//!
//! Writer threads each write decision-sized records and wait for each record's ticket before the next, as
//! the PEP's request workers do (a decision must be durable before its effect): 4 writers, and 64 (the
//! 64-way load of `pexi-bench`), where group commit shares each fsync among more records. Records go to a
//! temporary directory on the same file system as the system temp dir; fsync cost depends on that disk.

use std::sync::Arc;
use std::time::Instant;

use pexi_host::audit::seal::Sealer;
use pexi_host::audit::{AuditLog, AuditSettings, Durability, Sealing};
use serde_json::json;

/// `signed`: every record signed and checkpoints written, as the PEP does by default.
fn run(durability: Durability, writers: usize, per_thread: usize, signed: bool) -> f64 {
    let dir = std::env::temp_dir().join(format!(
        "pexi-audit-bench-{}-{durability:?}-{writers}-{signed}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    let sealing = signed.then(|| Sealing {
        sealer: Arc::new(Sealer::load_or_create(&dir.join("keys")).expect("key")),
        checkpoint_path: dir.join("checkpoints/audit.jsonl.checkpoints"),
        checkpoint_every: std::time::Duration::from_secs(1),
        checkpoint_records: 10_000,
    });
    let log = Arc::new(
        AuditLog::open(&AuditSettings {
            path: dir.join("audit.jsonl"),
            durability,
            batch_ms: 0,
            batch_records: 256,
            rotate_bytes: 64 * 1024 * 1024,
            keep_rotated_files: 0,
            keep_rotated_bytes: 0,
            sealing,
            force: false,
        })
        .expect("open"),
    );
    let started = Instant::now();
    let threads: Vec<_> = (0..writers)
        .map(|t| {
            let log = log.clone();
            std::thread::spawn(move || {
                for i in 0..per_thread {
                    let record = json!({
                        "decision_id": format!("{t:02}-{i:08}"),
                        "session_id": "0123456789abcdef",
                        "stream_id": i,
                        "method": "pep.http.request",
                        "request": {"method": "POST", "scheme": "https", "host": "api.example.com",
                            "port": 443, "path": "/v1/messages", "query": null,
                            "headers": {"content-type": ["application/json"], "authorization": ["[redacted]"]}},
                        "hop": 0,
                        "decision": {"allow": true, "reasons": ["allowed by allowlist entry api.example.com"],
                            "policy_revision": "sha256:0000000000000000000000000000000000000000000000000000000000000000"},
                        "redacted": ["request.headers.authorization"],
                    });
                    log.record("decision", record).wait().expect("durable");
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().expect("thread");
    }
    let rate = (writers * per_thread) as f64 / started.elapsed().as_secs_f64();
    log.close();
    let _ = std::fs::remove_dir_all(&dir);
    rate
}

fn main() {
    println!("audit records/s, writers each waiting for durability, one run (unsigned | signed)");
    let mut rates = Vec::new();
    for (durability, writers, per_thread) in [
        (Durability::None, 4, 20_000),
        (Durability::Batch, 4, 2_000),
        (Durability::Batch, 64, 500),
        (Durability::Always, 4, 500),
    ] {
        // Alternating, so a noisy neighbour hits both alike.
        let rate = run(durability, writers, per_thread, false);
        let signed = run(durability, writers, per_thread, true);
        rates.push(rate);
        println!(
            "{:>8} {:>3} writers {:>10.0} records/s | signed {:>10.0} records/s ({:.2}x)  ({} records)",
            format!("{durability:?}").to_lowercase(),
            writers,
            rate,
            signed,
            signed / rate,
            writers * per_thread
        );
    }
    println!(
        "ratios (unsigned): none/batch(4) {:.1}x, batch(4)/always(4) {:.1}x, batch(64)/batch(4) {:.1}x",
        rates[0] / rates[1],
        rates[1] / rates[3],
        rates[2] / rates[1]
    );
}
