//! Decision latency of the shipped policy (`policies/pexi/http.rego`) with 10, 1 000, 10 000 and 100 000
//! allowlist entries, measured side by side in one run:
//!
//! ```sh
//! cargo run --release -p pexi-host --example policy_bench
//! ```
//!
//! Each decision is one full evaluation as the PEP makes it per hop (a fresh clone of the prepared engine,
//! the input converted, the query evaluated, the result checked). The lists mix exact names (8 in 10),
//! `*.` wildcards and CIDRs; inputs alternate between a host an exact entry allows, one a wildcard allows,
//! an IP address a CIDR allows, and a host no entry matches. Figures depend on the machine; compare the rows of one run, not runs on
//! different days.

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

fn measure(entries: usize, decisions: usize) -> (Duration, Duration, Duration, Duration) {
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
    let mut times = Vec::with_capacity(decisions);
    for i in 0..decisions {
        let (doc, allow) = &docs[i % docs.len()];
        let start = Instant::now();
        let decision = policy.decide(doc);
        times.push(start.elapsed());
        assert_eq!(decision.allow, *allow, "{decision:?}");
    }
    times.sort();
    let total: Duration = times.iter().sum();
    (
        percentile(&times, 0.5),
        percentile(&times, 0.99),
        total / decisions as u32,
        load,
    )
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
    let decisions = if sizes.len() == 1 { 100_000 } else { 3_000 };
    let runs: Vec<(usize, usize)> = sizes.iter().map(|&n| (n, decisions)).collect();
    println!("policy decision latency, shipped policy, one thread");
    println!(
        "{:>8} {:>10} {:>12} {:>12} {:>12} {:>12}",
        "entries", "decisions", "p50", "p99", "mean", "load"
    );
    let mut p50s = Vec::new();
    for (entries, decisions) in runs {
        let (p50, p99, mean, load) = measure(entries, decisions);
        p50s.push(p50);
        println!(
            "{entries:>8} {decisions:>10} {:>12.3?} {:>12.3?} {:>12.3?} {:>12.3?}",
            p50, p99, mean, load
        );
    }
    if let (Some(first), Some(last)) = (p50s.first(), p50s.last()) {
        println!(
            "p50 ratio {}/{} entries: {:.2}x",
            sizes[sizes.len() - 1],
            sizes[0],
            last.as_secs_f64() / first.as_secs_f64()
        );
    }
}
