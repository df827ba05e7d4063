//! Decision latency of the shipped policy (`policies/pexi/http.rego`) with 10 and with 10 000 allowlist
//! entries, measured side by side in one run:
//!
//! ```sh
//! cargo run --release -p pexi-host --example policy_bench
//! ```
//!
//! Each decision is one full evaluation as the PEP makes it per hop (a fresh clone of the prepared engine,
//! the input converted, the query evaluated, the result checked). Inputs alternate between a host that an
//! entry allows and one that no entry matches (the deny path walks every entry). Figures depend on the
//! machine; compare the two rows of one run, not runs on different days.

use std::time::{Duration, Instant};

use pexi_host::policy::entries::Entry;
use pexi_host::policy::{Bundle, PolicyEngine, PolicyRoot};

fn engine(entries: usize) -> PolicyEngine {
    let allow: Vec<Entry> = (0..entries)
        .map(|i| Entry::host(&format!("api{i}.example{}.test", i % 97)).expect("valid pattern"))
        .collect();
    let bundle = Bundle::load(&PolicyRoot::Embedded, &allow, &[]).expect("bundle");
    PolicyEngine::load(&bundle, "data.pexi.http.decision", 60_000).expect("policy loads")
}

fn input(host: &str) -> serde_json::Value {
    serde_json::json!({
        "method": "pep.http.request",
        "request": {"method": "POST", "scheme": "https", "host": host, "host_kind": "dns", "port": 443,
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

fn measure(entries: usize, decisions: usize) -> (Duration, Duration, Duration) {
    let policy = engine(entries);
    let allowed = input(&format!(
        "api{}.example{}.test",
        entries / 2,
        (entries / 2) % 97
    ));
    let denied = input("unlisted.example.net");
    // Warm up: first evaluations pay one-time costs.
    for _ in 0..3 {
        assert!(policy.decide(&allowed).allow);
        assert!(!policy.decide(&denied).allow);
    }
    let mut times = Vec::with_capacity(decisions);
    for i in 0..decisions {
        let doc = if i % 2 == 0 { &allowed } else { &denied };
        let start = Instant::now();
        let decision = policy.decide(doc);
        times.push(start.elapsed());
        assert_eq!(decision.allow, i % 2 == 0, "{decision:?}");
    }
    times.sort();
    let total: Duration = times.iter().sum();
    (
        percentile(&times, 0.5),
        percentile(&times, 0.99),
        total / decisions as u32,
    )
}

fn main() {
    let runs = [(10, 2_000), (10_000, 60)];
    println!("policy decision latency, shipped policy, one thread");
    println!(
        "{:>8} {:>10} {:>12} {:>12} {:>12}",
        "entries", "decisions", "p50", "p99", "mean"
    );
    let mut p50s = Vec::new();
    for (entries, decisions) in runs {
        let (p50, p99, mean) = measure(entries, decisions);
        p50s.push(p50);
        println!(
            "{entries:>8} {decisions:>10} {:>12.3?} {:>12.3?} {:>12.3?}",
            p50, p99, mean
        );
    }
    println!(
        "p50 ratio 10000/10 entries: {:.1}x",
        p50s[1].as_secs_f64() / p50s[0].as_secs_f64()
    );
}
