//! `pexi-soak`: hostile guests at once against one release `pexi serve`, with its default limits, while a
//! well-behaved guest on its own transport sends a request every 100 ms. Run by `scripts/soak`, which
//! puts it in a network namespace that has only loopback; docs/reliability.md has the figures.
//!
//! The attackers share one listener (one VM's transport), the well-behaved guest has another, as two VMs
//! would. The attack mix is the one of the issue that introduced the limits:
//!
//! - **hoarders**: sessions announcing 2^31-1 windows, each opening 128 downloads of 10 MB and never
//!   reading its socket again;
//! - **credit starvers**: sessions that read their socket but never grant credit back;
//! - **slow HELLOs**: connections sending their HELLO one byte a second, reconnecting when closed;
//! - **idle connections**: connections that send nothing, reconnecting when closed;
//! - **audit volume**: a session sending policy checks with 60 KB of headers to a denied host, back to back;
//! - **GOAWAY**: sessions that open a stream, send GOAWAY with `last_stream_id = 0` and wait for the answer.
//!
//! It prints the PEP's peak RSS and open descriptors, the well-behaved guest's p50/p99 before and during the
//! attack, what the attackers got, and how long SIGTERM took; it exits non-zero past the documented bounds.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pexi_protocol::payload::{ErrorCode, HeaderField, HttpRequest, MethodCall, MAX_WINDOW};
use pexi_protocol::session::{Config as SessionConfig, Event, Session};
use pexi_test_support::{copy_policies, loopback_options, temp_dir, test_config, Guest, Upstream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// The bound docs/reliability.md promises for the PEP's peak RSS under all of this, default settings.
const MAX_RSS_MIB: u64 = 256;
/// The well-behaved guest's p99 under attack may be this many times its baseline p99...
const P99_FACTOR: f64 = 5.0;
/// ...or this much above it, whichever is larger (a baseline of 1 ms makes a bare factor meaningless).
const P99_SLACK_MS: f64 = 20.0;
/// The default retention: 16 rotated files of 64 MiB (and at most 1 GiB of them) beside the active file,
/// which may pass 64 MiB by one group of records before it rotates.
const MAX_AUDIT_BYTES: u64 = (1 << 30) + 2 * (64 << 20);
const GOOD_EVERY: Duration = Duration::from_millis(100);
const HOARDERS: usize = 24;
const STARVERS: usize = 2;
const SLOW_HELLOS: usize = 100;
const IDLERS: usize = 100;
const DOWNLOAD: usize = 10 << 20;

#[derive(Default)]
struct Stats {
    sessions_admitted: AtomicU64,
    sessions_refused: AtomicU64,
    streams_opened: AtomicU64,
    slow_hello_connections: AtomicU64,
    idle_connections: AtomicU64,
    denied_checks: AtomicU64,
    goaway_sessions: AtomicU64,
    goaway_answers: AtomicU64,
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

struct Args {
    seconds: u64,
    baseline_seconds: u64,
    /// Hostile VMs, each with its own transport and the full attack mix (the well-behaved guest's
    /// session is opened first, so it keeps its place among `max_sessions`).
    hostile: usize,
    pexi: PathBuf,
}

fn args() -> Result<Args, String> {
    let mut args = Args {
        seconds: 60,
        baseline_seconds: 10,
        hostile: 1,
        pexi: PathBuf::from("target/release/pexi"),
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--seconds" => {
                args.seconds = value()?.parse().map_err(|e| format!("--seconds: {e}"))?
            }
            "--baseline-seconds" => {
                args.baseline_seconds = value()?
                    .parse()
                    .map_err(|e| format!("--baseline-seconds: {e}"))?
            }
            "--hostile" => {
                args.hostile = value()?.parse().map_err(|e| format!("--hostile: {e}"))?
            }
            "--pexi" => args.pexi = PathBuf::from(value()?),
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if !(1..=8).contains(&args.hostile) {
        return Err("--hostile must be 1..=8".into());
    }
    if args.seconds == 0 || args.seconds > 3600 {
        return Err("--seconds must be 1..=3600".into());
    }
    Ok(args)
}

/// A session on the attackers' socket, or `None` (refused, closed, or the socket's backlog full).
async fn connect(socket: &Path, config: SessionConfig) -> Option<Guest> {
    let stream = UnixStream::connect(socket).await.ok()?;
    Guest::handshake(stream, config).await.ok()
}

fn get(url: &str) -> MethodCall {
    MethodCall::HttpRequest(HttpRequest::new("GET", url))
}

/// `(VmRSS, VmHWM)` in bytes, and the number of open descriptors, of `pid`.
fn sample(pid: u32) -> Option<(u64, u64, usize)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| -> Option<u64> {
        let kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix(name))?
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()?;
        Some(kib * 1024)
    };
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count();
    Some((field("VmRSS:")?, field("VmHWM:")?, fds))
}

/// Rotated audit files removed by retention so far: rotation numbers files 000001, 000002, ... and never
/// reuses a number, so the highest number minus the files present is what was removed.
fn retained(dir: &Path) -> u64 {
    let numbers: Vec<u64> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            e.file_name()
                .to_string_lossy()
                .strip_prefix("audit.jsonl.")
                .and_then(|n| n.parse().ok())
        })
        .collect();
    numbers
        .iter()
        .max()
        .map_or(0, |max| max - numbers.len() as u64)
}

/// Bytes in the audit log's files (the active one and the rotated ones retention kept).
fn audit_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .filter(|e| {
                    let name = e.file_name().to_string_lossy().into_owned();
                    name.starts_with("audit.jsonl") && !name.ends_with(".key")
                })
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// User plus system CPU time of `pid`, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or(Vec::new(), |(_, rest)| rest.split_whitespace().collect());
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name; 100 ticks a second on
    // Linux.
    (ticks(11) + ticks(12)) / 100.0
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

/// One request every [`GOOD_EVERY`] until `until`; latencies in ms, and failures.
async fn good_guest(guest: &mut Guest, url: &str, until: Instant) -> (Vec<f64>, Vec<String>) {
    let mut latencies = Vec::new();
    let mut failures = Vec::new();
    let mut next = tokio::time::Instant::now();
    while Instant::now() < until {
        next += GOOD_EVERY;
        let started = Instant::now();
        let reply = guest.call(get(url), b"").await;
        match (&reply.error, reply.ended) {
            (None, true) => latencies.push(started.elapsed().as_secs_f64() * 1000.0),
            _ => failures.push(format!("{:?}", reply.error)),
        }
        tokio::time::sleep_until(next).await;
    }
    latencies.sort_by(f64::total_cmp);
    (latencies, failures)
}

/// A session announcing `config` that opens `n` downloads of `url` and sends their END; `None` when it was
/// refused (counted, and a second's pause before the caller tries again).
async fn downloads(
    socket: &Path,
    config: SessionConfig,
    n: usize,
    url: &str,
    stats: &Stats,
) -> Option<Guest> {
    let Some(mut guest) = connect(socket, config).await else {
        bump(&stats.sessions_refused);
        tokio::time::sleep(Duration::from_secs(1)).await;
        return None;
    };
    bump(&stats.sessions_admitted);
    for _ in 0..n {
        let Ok(id) = guest.session().open(get(url)) else {
            break;
        };
        let _ = guest.session().send_end(id, vec![]);
        bump(&stats.streams_opened);
    }
    Some(guest)
}

async fn hoarder(socket: PathBuf, url: String, stats: Arc<Stats>) {
    loop {
        let mut config = SessionConfig::new("soak-hoarder", "1");
        config.receive.initial_stream_window = MAX_WINDOW;
        config.receive.initial_connection_window = MAX_WINDOW;
        let Some(mut guest) = downloads(&socket, config, 128, &url, &stats).await else {
            continue;
        };
        if guest.conn.flush().await.is_err() {
            continue;
        }
        // Reads nothing from here on: everything the PEP sends piles up in front of it.
        std::future::pending::<()>().await;
    }
}

async fn starver(socket: PathBuf, url: String, stats: Arc<Stats>) {
    loop {
        let mut config = SessionConfig::new("soak-starver", "1");
        config.receive.initial_stream_window = 64 * 1024;
        let Some(mut guest) = downloads(&socket, config, 32, &url, &stats).await else {
            continue;
        };
        // Reads, never releases: no WINDOW_UPDATE ever goes back.
        while let Ok(Some(_)) = guest.conn.next_event().await {}
    }
}

fn hello_bytes() -> Vec<u8> {
    let mut session = Session::client(SessionConfig::new("soak-slow", "1"));
    session
        .poll_transmit()
        .map(|frame| frame.encode())
        .unwrap_or_default()
}

async fn slow_hello(socket: PathBuf, stats: Arc<Stats>) {
    let hello = hello_bytes();
    loop {
        if let Ok(mut stream) = UnixStream::connect(&socket).await {
            bump(&stats.slow_hello_connections);
            for byte in &hello {
                if stream.write_all(&[*byte]).await.is_err() {
                    break;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn idler(socket: PathBuf, stats: Arc<Stats>) {
    let mut buf = [0u8; 4096];
    loop {
        if let Ok(mut stream) = UnixStream::connect(&socket).await {
            bump(&stats.idle_connections);
            while matches!(stream.read(&mut buf).await, Ok(n) if n > 0) {}
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn audit_volume(socket: PathBuf, stats: Arc<Stats>) {
    let mut request = HttpRequest::new("GET", "https://denied.test/");
    request.headers = (0..60)
        .map(|i| HeaderField::new(format!("x-filler-{i}"), "f".repeat(1000)))
        .collect();
    loop {
        let Some(mut guest) = connect(&socket, SessionConfig::new("soak-audit", "1")).await else {
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        };
        loop {
            let reply = guest
                .call(MethodCall::PolicyCheck(request.clone()), b"")
                .await;
            if reply.head.is_none() {
                break;
            }
            bump(&stats.denied_checks);
        }
    }
}

async fn goaway_loop(socket: PathBuf, url: String, stats: Arc<Stats>) {
    loop {
        let Some(mut guest) = connect(&socket, SessionConfig::new("soak-goaway", "1")).await else {
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        };
        bump(&stats.goaway_sessions);
        let Ok(id) = guest.session().open(get(&url)) else {
            continue;
        };
        let _ = guest.session().send_end(id, vec![]);
        guest
            .session()
            .go_away(ErrorCode::SessionReset, "soak guest leaving");
        let wait = async {
            while let Ok(Some(event)) = guest.conn.next_event().await {
                match event {
                    Event::Data { stream_id, data } => {
                        guest.session().release(stream_id, data.len())
                    }
                    Event::End { .. } => bump(&stats.goaway_answers),
                    _ => {}
                }
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(30), wait).await;
    }
}

fn start_pep(pexi: &Path, dir: &Path, attack: &[PathBuf], good: &Path) -> std::process::Child {
    let audit = dir.join("audit.jsonl");
    let options = loopback_options(&[("api.test", "127.0.0.1")], &["api.test"]);
    let mut doc = test_config(dir, good, &audit, &options);
    let pep = doc["pep"].as_table_mut().expect("[pep]");
    pep.insert(
        "listen".into(),
        toml::Value::Array(
            attack
                .iter()
                .chain(std::iter::once(&good.to_path_buf()))
                .map(|path| format!("unix:{}", path.display()).into())
                .collect(),
        ),
    );
    copy_policies(dir);
    let config = dir.join("config.toml");
    std::fs::write(&config, toml::to_string(&doc).expect("config")).expect("write config");
    let log = std::fs::File::create(dir.join("pep.log")).expect("pep.log");
    Command::new(pexi)
        .args(["serve", "--config"])
        .arg(&config)
        .env("RUST_LOG", "warn")
        .env_remove("PEP_ALLOWED_DOMAINS")
        .env_remove("PEP_AUDIT_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(log))
        .spawn()
        .expect("spawn pexi serve")
}

fn main() -> ExitCode {
    let args = match args() {
        Ok(args) => args,
        Err(err) => {
            eprintln!("pexi-soak: {err}\nusage: pexi-soak [--seconds N] [--baseline-seconds N] [--hostile VMS] [--pexi PATH]");
            return ExitCode::from(2);
        }
    };
    // The upstream runs in its own runtime thread, so serving the attackers' downloads does not share
    // worker threads with the guests being measured.
    let (port_tx, port_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Runtime::new().expect("upstream runtime");
        runtime.block_on(async {
            let upstream = Upstream::http("127.0.0.1").await;
            let _ = port_tx.send(upstream.port());
            std::future::pending::<()>().await;
        });
    });
    let port = port_rx.recv().expect("upstream port");
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(run(args, port))
}

async fn run(args: Args, port: u16) -> ExitCode {
    let dir = temp_dir("soak");
    let sockets: Vec<PathBuf> = (0..args.hostile)
        .map(|i| dir.join(format!("attack-{i}.sock")))
        .collect();
    let good = dir.join("good.sock");
    let mut pep = start_pep(&args.pexi, &dir, &sockets, &good);
    let pid = pep.id();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !(sockets.iter().all(|s| s.exists()) && good.exists()) {
        if Instant::now() > deadline {
            eprintln!(
                "pexi serve did not start; see {}",
                dir.join("pep.log").display()
            );
            let _ = pep.kill();
            let _ = pep.wait();
            return ExitCode::FAILURE;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let hello = format!("http://api.test:{port}/hello");
    let download = format!("http://api.test:{port}/zeros?n={DOWNLOAD}");
    let short = format!("http://api.test:{port}/sse?n=3&gap_ms=50");
    let mut guest = Guest::connect(&good).await;
    println!(
        "soak: {} s baseline, then {} s of attack; PEP pid {pid} ({}), default limits",
        args.baseline_seconds,
        args.seconds,
        args.pexi.display()
    );
    let (baseline, baseline_failures) = good_guest(
        &mut guest,
        &hello,
        Instant::now() + Duration::from_secs(args.baseline_seconds),
    )
    .await;
    let (rss_before, _, fds_before) = sample(pid).unwrap_or_default();
    let cpu_before = cpu_seconds(pid);
    let attack_started = Instant::now();
    let audit_before = audit_bytes(&dir);

    let stats = Arc::new(Stats::default());
    let mut attackers = tokio::task::JoinSet::new();
    // Stopped before SIGTERM: their SDK-style loops treat the PEP's GOAWAY as a bug, which it is not.
    let mut audit_tasks = Vec::new();
    for attack in &sockets {
        audit_tasks.push(tokio::spawn(audit_volume(attack.clone(), stats.clone())));
        attackers.spawn(goaway_loop(attack.clone(), short.clone(), stats.clone()));
        for _ in 0..STARVERS {
            attackers.spawn(starver(attack.clone(), download.clone(), stats.clone()));
        }
        for _ in 0..HOARDERS {
            attackers.spawn(hoarder(attack.clone(), download.clone(), stats.clone()));
        }
    }
    // The connection floods start once the sessions above had a moment to be admitted: otherwise which
    // attacker gets the transport's session places is a race, and the run measures a different mix
    // each time.
    tokio::time::sleep(Duration::from_secs(2)).await;
    for attack in &sockets {
        for _ in 0..SLOW_HELLOS {
            attackers.spawn(slow_hello(attack.clone(), stats.clone()));
        }
        for _ in 0..IDLERS {
            attackers.spawn(idler(attack.clone(), stats.clone()));
        }
    }
    let peak = Arc::new(AtomicU64::new(0));
    let peak_fds = Arc::new(AtomicU64::new(0));
    let sampler = {
        let (peak, peak_fds) = (peak.clone(), peak_fds.clone());
        tokio::spawn(async move {
            loop {
                if let Some((rss, _, fds)) = sample(pid) {
                    peak.fetch_max(rss, Ordering::Relaxed);
                    peak_fds.fetch_max(fds as u64, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        })
    };
    let (attacked, attacked_failures) = good_guest(
        &mut guest,
        &hello,
        Instant::now() + Duration::from_secs(args.seconds),
    )
    .await;
    let (rss_end, hwm, fds_end) = sample(pid).unwrap_or_default();
    let cpu_attack = cpu_seconds(pid) - cpu_before;
    let attack_wall = attack_started.elapsed().as_secs_f64();
    let audit_after = audit_bytes(&dir);
    sampler.abort();
    for task in &audit_tasks {
        task.abort();
    }
    drop(guest);
    // SIGTERM with the attackers still connected: the drain deadline bounds the exit.
    let stop = Instant::now();
    let _ = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
    let exited = loop {
        match pep.try_wait() {
            Ok(Some(status)) => break Some(status),
            _ if stop.elapsed() > Duration::from_secs(60) => break None,
            _ => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    };
    let shutdown = stop.elapsed();
    attackers.abort_all();
    if exited.is_none() {
        let _ = pep.kill();
        let _ = pep.wait();
    }

    let log = std::fs::read_to_string(dir.join("pep.log")).unwrap_or_default();
    let logged = |what: &str| log.lines().filter(|l| l.contains(what)).count();
    // Logged at most every 10 s with a count: `closed=N`.
    let closed_at_once: u64 = log
        .lines()
        .filter(|l| l.contains("connections closed at once"))
        .filter_map(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix("closed="))
                .and_then(|n| n.parse::<u64>().ok())
        })
        .sum();
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    let s = &stats;
    let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
    println!(
        "{} hostile VM(s), each on its own transport: {HOARDERS} hoarders (128 × 10 MB each, windows 2^31-1, never read), \
         {STARVERS} credit starvers (32 × 10 MB, never grant), {SLOW_HELLOS} slow HELLOs (1 byte/s), \
         {IDLERS} idle connections, 1 denied check with 60 KB of headers back to back, 1 GOAWAY loop",
        args.hostile
    );
    println!(
        "  sessions admitted {}; HELLOs refused with resource_exhausted {}, connections closed unanswered ≥ {} (logged every 10 s); \
         streams opened {}, refused with resource_exhausted {}",
        load(&s.sessions_admitted),
        logged("refusing the session"),
        closed_at_once,
        load(&s.streams_opened),
        logged("stream refused"),
    );
    println!(
        "  slow-HELLO connections {}, idle connections {}, denied checks {} (audit files +{:.1} MiB, {} rotated files removed), GOAWAY sessions {} with {} answers complete",
        load(&s.slow_hello_connections),
        load(&s.idle_connections),
        load(&s.denied_checks),
        mib(audit_after.saturating_sub(audit_before)),
        retained(&dir),
        load(&s.goaway_sessions),
        load(&s.goaway_answers)
    );
    let peak_rss = peak.load(Ordering::Relaxed).max(hwm);
    println!(
        "PEP: peak RSS {:.1} MiB (bound {MAX_RSS_MIB}), {:.1} MiB before the attack, {:.1} MiB at its end; open fds {} before, peak {}, {} at the end",
        mib(peak_rss),
        mib(rss_before),
        mib(rss_end),
        fds_before,
        peak_fds.load(Ordering::Relaxed),
        fds_end
    );
    println!(
        "PEP CPU during the attack: {cpu_attack:.1} s in {attack_wall:.0} s ({:.0}% of one core)",
        100.0 * cpu_attack / attack_wall
    );
    let (b50, b99) = (percentile(&baseline, 0.5), percentile(&baseline, 0.99));
    let (a50, a99) = (percentile(&attacked, 0.5), percentile(&attacked, 0.99));
    println!(
        "well-behaved guest (own transport, GET every 100 ms): baseline p50 {b50:.2} ms p99 {b99:.2} ms ({} requests); \
         under attack p50 {a50:.2} ms p99 {a99:.2} ms ({} requests, {} failed)",
        baseline.len(),
        attacked.len(),
        attacked_failures.len() + baseline_failures.len()
    );
    println!(
        "SIGTERM with the attackers connected: exited in {:.1} s ({})",
        shutdown.as_secs_f64(),
        exited.map_or("killed after 60 s".to_string(), |s| s.to_string())
    );
    let mut failed = Vec::new();
    if mib(peak_rss) > MAX_RSS_MIB as f64 {
        failed.push(format!(
            "peak RSS {:.1} MiB over {MAX_RSS_MIB} MiB",
            mib(peak_rss)
        ));
    }
    let p99_bound = (b99 * P99_FACTOR).max(b99 + P99_SLACK_MS);
    if a99 > p99_bound {
        failed.push(format!(
            "p99 under attack {a99:.2} ms over {p99_bound:.2} ms"
        ));
    }
    if audit_after > MAX_AUDIT_BYTES {
        failed.push(format!(
            "audit files hold {:.1} MiB, over the retention bound of {:.1} MiB",
            mib(audit_after),
            mib(MAX_AUDIT_BYTES)
        ));
    }
    if !attacked_failures.is_empty() || !baseline_failures.is_empty() {
        failed.push(format!(
            "the well-behaved guest saw failures: {:?}",
            attacked_failures
                .iter()
                .chain(&baseline_failures)
                .take(5)
                .collect::<Vec<_>>()
        ));
    }
    if exited.is_none_or(|status| !status.success()) {
        failed.push("pexi serve did not exit cleanly on SIGTERM".into());
    }
    if failed.is_empty() {
        println!("PASS");
        ExitCode::SUCCESS
    } else {
        println!("FAIL: {}", failed.join("; "));
        println!("(PEP log: {})", dir.join("pep.log").display());
        std::mem::forget(dir);
        ExitCode::FAILURE
    }
}
