//! Decision latency of the shipped policy (`policies/pexi/http.rego`) with 10, 1 000, 10 000 and 100 000
//! allowlist entries, measured side by side in one run:
//!
//! ```sh
//! cargo run --release -p pexi-host --example policy_bench
//! ```
//!
//! Each decision is one full evaluation as the PEP makes it per hop (a pooled VM of the prepared program,
//! the input converted, the query evaluated, the result read). The lists mix exact names (8 in 10), `*.`
//! wildcards and CIDRs; inputs alternate between a host an exact entry allows, one a wildcard allows, an
//! IP address a CIDR allows, and a host no entry matches. The sizes take turns in batches; each row gives
//! the best batch's p50 (least disturbed by other work on a shared machine) and the median batch's.
//! Figures depend on the machine; compare the rows of one run, not runs on different days.

use std::time::{Duration, Instant};

use pexi_host::policy::entries::Entry;
use pexi_host::policy::{Bundle, PolicyEngine, PolicyRoot};

fn pattern(i: usize) -> String {
    match i % 10 {
        8 => format!("*.zone{i}.example{}.test", i % 97),
        9 => format!("10.{}.{}.0/24", (i / 256) % 256, i % 256),
        _ => format!("api{i}.example{}.test", i % 97),
    }
}

fn engine(entries: usize) -> (PolicyEngine, Duration) {
    let started = Instant::now();
    let allow: Vec<Entry> = (0..entries)
        .map(|i| Entry::host(&pattern(i)).expect("valid pattern"))
        .collect();
    let bundle = Bundle::load(&PolicyRoot::Embedded, &allow, &[]).expect("bundle");
    let policy =
        PolicyEngine::load(&bundle, "data.pexi.http.decision", 60_000).expect("policy loads");
    assert!(policy.compiled(), "decisions must run on the bytecode VM");
    (policy, started.elapsed())
}

fn input(host: &str) -> serde_json::Value {
    serde_json::json!({
        "method": "pep.http.request",
        "request": {"method": "POST", "scheme": "https", "host": host,
            "host_kind": if host.parse::<std::net::IpAddr>().is_ok() { "ipv4" } else { "dns" }, "port": 443,
            "path": "/v1/messages", "query": null, "headers": {"content-type": ["application/json"]},
            "body_length": 512, "url": format!("https://{host}/v1/messages")},
        "hop": 0,
        "previous_url": null,
        "session": {"id": "0123456789abcdef", "guest": {"name": "bench", "version": "0"}},
    })
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index]
}

/// One list size: its engine, how long the bundle took to load, and the four inputs with the answer each
/// must get.
struct Size {
    entries: usize,
    policy: PolicyEngine,
    load: Duration,
    docs: [(serde_json::Value, bool); 4],
    times: Vec<Duration>,
    batch_p50s: Vec<Duration>,
}

fn size(entries: usize) -> Size {
    let (policy, load) = engine(entries);
    let exact = entries / 2 / 10 * 10;
    let wildcard = exact + 8;
    let docs = [
        (
            input(&format!("api{exact}.example{}.test", exact % 97)),
            true,
        ),
        (
            input(&format!("a.b.zone{wildcard}.example{}.test", wildcard % 97)),
            true,
        ),
        (
            input(&format!(
                "10.{}.{}.7",
                ((exact + 9) / 256) % 256,
                (exact + 9) % 256
            )),
            true,
        ),
        (input("unlisted.example.net"), false),
    ];
    // Warm up: first evaluations pay one-time costs.
    for (doc, allow) in &docs {
        assert_eq!(policy.decide(doc).allow, *allow);
    }
    Size {
        entries,
        policy,
        load,
        docs,
        times: Vec::new(),
        batch_p50s: Vec::new(),
    }
}

/// One batch of `decisions` for one size; its p50 is kept, its times join the size's p99 and mean.
fn batch(size: &mut Size, decisions: usize) {
    let mut times = Vec::with_capacity(decisions);
    for i in 0..decisions {
        let (doc, allow) = &size.docs[i % size.docs.len()];
        let start = Instant::now();
        let decision = size.policy.decide(doc);
        times.push(start.elapsed());
        assert_eq!(decision.allow, *allow, "{decision:?}");
    }
    times.sort();
    size.batch_p50s.push(percentile(&times, 0.5));
    size.times.extend(times);
}

fn main() {
    // `policy_bench 10 100000` measures only those sizes (for a profiler); by default all four.
    let sizes: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let sizes = if sizes.is_empty() {
        vec![10, 1_000, 10_000, 100_000]
    } else {
        sizes
    };
    let (batches, per_batch) = if sizes.len() == 1 {
        (20, 5_000)
    } else {
        (BATCHES, 1_000)
    };
    let mut measured: Vec<Size> = sizes.iter().map(|&n| size(n)).collect();
    // The sizes take turns, batch by batch, so that a noisy stretch of a shared machine lands on all of
    // them rather than on whichever size was running.
    for _ in 0..batches {
        for size in &mut measured {
            batch(size, per_batch);
        }
    }
    println!(
        "policy decision latency, shipped policy, one thread ({batches} batches of {per_batch} per size, taking turns)"
    );
    println!(
        "{:>8} {:>10} {:>12} {:>12} {:>12} {:>12} {:>12}",
        "entries", "decisions", "p50 best", "p50 median", "p99", "mean", "load"
    );
    let mut p50s = Vec::new();
    for size in &mut measured {
        size.times.sort();
        size.batch_p50s.sort();
        let best = size.batch_p50s[0];
        let median = size.batch_p50s[size.batch_p50s.len() / 2];
        let total: Duration = size.times.iter().sum();
        p50s.push(best);
        println!(
            "{:>8} {:>10} {:>12.3?} {:>12.3?} {:>12.3?} {:>12.3?} {:>12.3?}",
            size.entries,
            size.times.len(),
            best,
            median,
            percentile(&size.times, 0.99),
            total / size.times.len() as u32,
            size.load
        );
    }
    if let (Some(first), Some(last)) = (p50s.first(), p50s.last()) {
        println!(
            "p50 (best batch) ratio {}/{} entries: {:.2}x",
            sizes[sizes.len() - 1],
            sizes[0],
            last.as_secs_f64() / first.as_secs_f64()
        );
    }
}

/// Batches per size: the best batch's p50 is the figure least disturbed by other work on the machine, the
/// median batch's says how typical it is.
const BATCHES: usize = 7;
