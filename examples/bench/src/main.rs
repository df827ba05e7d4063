//! `pexi-bench`: what the PEP costs, side by side in one run on loopback.
//!
//! ```sh
//! scripts/bench            # builds in release mode, runs this, the Node comparison and the crate benches
//! ```
//!
//! Three ways to the same upstream (a hyper server on 127.0.0.1 in its own runtime thread):
//! **direct** (reqwest with keep-alive), **pexi** (the Rust guest SDK → Unix socket → a `pexi serve`
//! process → upstream), **pexi-nosync** (the same through a second PEP whose audit durability is `none`,
//! to show what the decision's fsync costs) and **tinyproxy** (reqwest through tinyproxy with an allowlist
//! filter). Modes run in
//! alternating rounds so a noisy neighbour hits them all alike; figures are for comparing rows of one run.
//! With `--node` it also runs `bench.mjs` (Node's fetch against `@pexi/guest`) against the same servers.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pexi_guest::{Client, Endpoint};
use pexi_test_support::{loopback_options, repo_root, temp_dir, write_config, Upstream};

const SMALL: usize = 1024;
const BIG: usize = 10_000_000;
const ROUNDS: usize = 10;
const PER_ROUND: usize = 200;
const CONCURRENCY: usize = 64;
const PER_TASK: usize = 40;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Mode {
    Direct,
    Pexi,
    PexiNoSync,
    Tinyproxy,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Direct => "direct",
            Mode::Pexi => "pexi",
            Mode::PexiNoSync => "pexi-nosync",
            Mode::Tinyproxy => "tinyproxy",
        }
    }
}

struct Clients {
    direct: reqwest::Client,
    proxied: Option<reqwest::Client>,
    pexi: Client,
    pexi_nosync: Client,
}

impl Clients {
    async fn get(&self, mode: Mode, url: &str) -> usize {
        match mode {
            Mode::Direct => body_len(mode, self.direct.get(url).send().await).await,
            Mode::Tinyproxy => {
                let client = self.proxied.as_ref().expect("tinyproxy is running");
                body_len(mode, client.get(url).send().await).await
            }
            Mode::Pexi | Mode::PexiNoSync => {
                let client = if mode == Mode::Pexi {
                    &self.pexi
                } else {
                    &self.pexi_nosync
                };
                let mut response = client.get(url).send().await.expect("pexi request");
                assert_eq!(response.status(), 200, "pexi: {url}");
                let mut n = 0;
                while let Some(chunk) = response.chunk().await.expect("pexi body") {
                    n += chunk.len();
                }
                n
            }
        }
    }
}

async fn body_len(mode: Mode, response: reqwest::Result<reqwest::Response>) -> usize {
    let mut response = response.unwrap_or_else(|err| panic!("{}: {err:?}", mode.name()));
    assert_eq!(response.status(), 200, "{}", mode.name());
    let mut n = 0;
    while let Some(chunk) = response.chunk().await.expect("body") {
        n += chunk.len();
    }
    n
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// A `pexi serve` process (the release binary), so its memory can be measured on its own.
struct Pep {
    child: Child,
    socket: PathBuf,
}

impl Pep {
    /// A PEP with the repository's config and policy; `durability` overrides `[pep.audit] durability`.
    fn start(dir: &Path, durability: Option<&str>) -> Pep {
        std::fs::create_dir_all(dir).expect("PEP dir");
        let socket = dir.join("pep.sock");
        let config = write_config(dir, &socket, &loopback_options(&[], &["127.0.0.1"]));
        if let Some(durability) = durability {
            let text = std::fs::read_to_string(&config).expect("config");
            let mut doc: toml::Table = text.parse().expect("config is TOML");
            doc["pep"]["audit"]
                .as_table_mut()
                .expect("[pep.audit]")
                .insert("durability".into(), durability.into());
            std::fs::write(&config, toml::to_string(&doc).expect("TOML")).expect("config");
        }
        let binary = std::env::var_os("PEXI_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|| repo_root().join("target/release/pexi"));
        let mut command = Command::new(&binary);
        // PEXI_BENCH_PEP_THREADS sets the PEP's runtime worker threads (tokio reads TOKIO_WORKER_THREADS),
        // to compare how it scales without touching the bench's own runtime.
        if let Some(threads) = std::env::var_os("PEXI_BENCH_PEP_THREADS") {
            command.env("TOKIO_WORKER_THREADS", threads);
        }
        let child = command
            .args(["serve", "--config"])
            .arg(&config)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .unwrap_or_else(|err| {
                panic!(
                    "{}: {err} (cargo build --release -p pexi-host)",
                    binary.display()
                )
            });
        let deadline = Instant::now() + Duration::from_secs(20);
        while !socket.exists() {
            assert!(Instant::now() < deadline, "pexi serve did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Pep { child, socket }
    }

    /// Peak and current resident memory of the PEP process, in KiB.
    fn memory(&self) -> (u64, u64) {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        (field("VmHWM:"), field("VmRSS:"))
    }
}

impl Drop for Pep {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// tinyproxy with a default-deny filter that allows only the upstream's address: the allowlisting proxy a
/// user might put in front of an agent instead of pexi.
struct Tinyproxy {
    child: Child,
    port: u16,
}

impl Tinyproxy {
    fn start(dir: &Path) -> Option<Tinyproxy> {
        let port = free_port();
        let filter = dir.join("tinyproxy.filter");
        std::fs::write(&filter, "^127\\.0\\.0\\.1$\n").expect("filter");
        let config = dir.join("tinyproxy.conf");
        std::fs::write(
            &config,
            format!(
                "Port {port}\nListen 127.0.0.1\nTimeout 60\nMaxClients 256\nLogLevel Critical\n\
                 Filter \"{}\"\nFilterDefaultDeny Yes\nFilterExtended Yes\nDisableViaHeader Yes\n",
                filter.display()
            ),
        )
        .expect("config");
        let child = Command::new("tinyproxy")
            .args(["-d", "-c"])
            .arg(&config)
            .stdout(Stdio::null())
            .spawn()
            .ok()?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(Tinyproxy { child, port })
    }
}

impl Drop for Tinyproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// CPU time (user + system, all threads, live or ended) a process has used so far, from `/proc/PID/stat`
/// in clock ticks (10 ms here): summed over many requests, it is what a proxy costs per request, a figure
/// that moves far less with the machine's other load than latency does.
fn cpu_time(pid: u32) -> Duration {
    static TICK: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    let tick = *TICK.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .trim()
                    .parse::<f64>()
                    .ok()
            })
            .unwrap_or(100.0)
    });
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces): state is the 3rd field, utime the 14th.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks: u64 = fields
        .get(11..13)
        .map(|t| t.iter().filter_map(|v| v.parse::<u64>().ok()).sum())
        .unwrap_or(0);
    Duration::from_secs_f64(ticks as f64 / tick)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn main() {
    let with_node = std::env::args().any(|a| a == "--node");
    // The upstream runs on its own runtime and threads, away from the clients being measured.
    let (port_tx, port_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Runtime::new().expect("runtime");
        runtime.block_on(async move {
            let upstream = Upstream::http("127.0.0.1").await;
            port_tx.send(upstream.port()).expect("send port");
            std::future::pending::<()>().await;
        });
    });
    let port = port_rx.recv().expect("upstream port");
    let dir = temp_dir("bench");
    let pep = Pep::start(&dir, None);
    let nosync = Pep::start(&dir.join("nosync"), Some("none"));
    let tinyproxy = Tinyproxy::start(&dir);
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(run(
        port,
        &pep,
        &nosync,
        tinyproxy.as_ref(),
        with_node,
        &dir,
    ));
    drop(tinyproxy);
    drop(nosync);
    drop(pep);
    let _ = std::fs::remove_dir_all(&dir);
}

async fn run(
    port: u16,
    pep: &Pep,
    nosync: &Pep,
    tinyproxy: Option<&Tinyproxy>,
    with_node: bool,
    dir: &Path,
) {
    let small = format!("http://127.0.0.1:{port}/big?n={SMALL}");
    let big = format!("http://127.0.0.1:{port}/big?n={BIG}");
    let clients = Arc::new(Clients {
        direct: reqwest::Client::builder()
            .no_proxy()
            .build()
            .expect("client"),
        proxied: tinyproxy.map(|t| {
            reqwest::Client::builder()
                .proxy(reqwest::Proxy::http(format!("http://127.0.0.1:{}", t.port)).expect("proxy"))
                // tinyproxy closes the client connection after every response (without saying so), so
                // a pooled connection would be reused after it closed: one connection per request.
                .pool_max_idle_per_host(0)
                .build()
                .expect("client")
        }),
        pexi: Client::new(Endpoint::Unix(pep.socket.clone())),
        pexi_nosync: Client::new(Endpoint::Unix(nosync.socket.clone())),
    });
    // The proxy process each mode goes through, whose CPU time is measured.
    let proxy_pid = |mode: Mode| match mode {
        Mode::Direct => None,
        Mode::Pexi => Some(pep.child.id()),
        Mode::PexiNoSync => Some(nosync.child.id()),
        Mode::Tinyproxy => tinyproxy.map(|t| t.child.id()),
    };
    let cpu_of = |mode: Mode| proxy_pid(mode).map(cpu_time).unwrap_or_default();
    let mut modes = vec![Mode::Direct, Mode::Pexi, Mode::PexiNoSync];
    if tinyproxy.is_some() {
        modes.push(Mode::Tinyproxy);
    } else {
        println!("tinyproxy is not installed (apt-get install tinyproxy): its rows are missing");
    }

    // Warm up every path (connections, the PEP's policy engine, the audit file).
    for &mode in &modes {
        let start = Instant::now();
        for _ in 0..100 {
            assert_eq!(clients.get(mode, &small).await, SMALL);
        }
        eprintln!("warmed up {} in {:?}", mode.name(), start.elapsed());
    }

    // 1. Small requests, one at a time, keep-alive.
    let mut latencies: Vec<Vec<Duration>> = vec![Vec::new(); modes.len()];
    let mut cpu: Vec<Duration> = vec![Duration::ZERO; modes.len()];
    for _ in 0..ROUNDS {
        for (i, &mode) in modes.iter().enumerate() {
            let cpu_before = cpu_of(mode);
            for n in 0..PER_ROUND {
                let start = Instant::now();
                // A stall is a finding (this caught a connection-credit leak), not a figure.
                if tokio::time::timeout(Duration::from_secs(5), clients.get(mode, &small))
                    .await
                    .is_err()
                {
                    panic!("{}: request {n} of a round stalled for 5 s", mode.name());
                }
                latencies[i].push(start.elapsed());
            }
            cpu[i] += cpu_of(mode).saturating_sub(cpu_before);
        }
    }
    let per_request = |cpu: Duration, requests: usize| micros(cpu) / requests as f64;
    println!(
        "\n1. {SMALL}-byte responses, sequential, keep-alive ({} requests per mode)",
        ROUNDS * PER_ROUND
    );
    println!(
        "   {:<10} {:>10} {:>10} {:>16} {:>18}",
        "mode", "p50 µs", "p99 µs", "p50 over direct", "proxy CPU µs/req"
    );
    let mut p50 = Vec::new();
    for (i, &mode) in modes.iter().enumerate() {
        latencies[i].sort();
        let (a, b) = (
            percentile(&latencies[i], 0.5),
            percentile(&latencies[i], 0.99),
        );
        p50.push(micros(a));
        let cpu = match proxy_pid(mode) {
            Some(_) => format!("{:.0}", per_request(cpu[i], ROUNDS * PER_ROUND)),
            None => "-".into(),
        };
        println!(
            "   {:<10} {:>10.1} {:>10.1} {:>16.1} {:>18}",
            mode.name(),
            micros(a),
            micros(b),
            micros(a) - p50[0],
            cpu
        );
    }
    let pexi_overhead = p50[1] - p50[0];
    println!(
        "   the audit fsync of each decision: {:.1} µs of pexi's p50 (pexi − pexi-nosync)",
        p50[1] - p50[2]
    );
    if let Some(tiny) = p50.get(3) {
        let tiny_overhead = tiny - p50[0];
        println!(
            "   pexi adds {pexi_overhead:.1} µs, tinyproxy {tiny_overhead:.1} µs: pexi's overhead is {:.2}× tinyproxy's",
            pexi_overhead / tiny_overhead
        );
        println!(
            "   CPU per request: the PEP {:.0} µs, tinyproxy {:.0} µs: {:.2}× tinyproxy's (pexi-nosync {:.2}×)",
            per_request(cpu[1], ROUNDS * PER_ROUND),
            per_request(cpu[3], ROUNDS * PER_ROUND),
            cpu[1].as_secs_f64() / cpu[3].as_secs_f64().max(1e-9),
            cpu[2].as_secs_f64() / cpu[3].as_secs_f64().max(1e-9),
        );
    }

    // 2. Throughput: 64 concurrent requesters, pexi over one session.
    println!("\n2. {CONCURRENCY} concurrent requesters × {PER_TASK} requests of {SMALL} bytes");
    let mut rates = Vec::new();
    for &mode in &modes {
        let cpu_before = cpu_of(mode);
        let start = Instant::now();
        let tasks: Vec<_> = (0..CONCURRENCY)
            .map(|_| {
                let clients = clients.clone();
                let url = small.clone();
                tokio::spawn(async move {
                    for _ in 0..PER_TASK {
                        clients.get(mode, &url).await;
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.expect("task");
        }
        let rate = (CONCURRENCY * PER_TASK) as f64 / start.elapsed().as_secs_f64();
        let cpu = match proxy_pid(mode) {
            Some(_) => format!(
                ", proxy CPU {:.0} µs/req",
                per_request(
                    cpu_of(mode).saturating_sub(cpu_before),
                    CONCURRENCY * PER_TASK
                )
            ),
            None => String::new(),
        };
        rates.push(rate);
        println!(
            "   {:<10} {:>10.0} requests/s {:>8.0}% of direct{cpu}",
            mode.name(),
            rate,
            100.0 * rate / rates[0]
        );
    }
    if let Some(tiny) = rates.get(3) {
        println!(
            "   pexi's throughput is {:.2}× tinyproxy's, {:.0}% of direct",
            rates[1] / tiny,
            100.0 * rates[1] / rates[0]
        );
    }

    // 3. A 10 MB response streamed.
    println!(
        "\n3. a {} MB response, streamed (best of 5)",
        BIG / 1_000_000
    );
    let (_, rss_before) = pep.memory();
    let mut speeds = Vec::new();
    for &mode in &modes {
        let mut best = Duration::MAX;
        for _ in 0..5 {
            let start = Instant::now();
            assert_eq!(clients.get(mode, &big).await, BIG);
            best = best.min(start.elapsed());
        }
        let speed = BIG as f64 / 1e6 / best.as_secs_f64();
        speeds.push(speed);
        println!(
            "   {:<10} {:>10.0} MB/s {:>8.0}% of direct",
            mode.name(),
            speed,
            100.0 * speed / speeds[0]
        );
    }
    let (peak, rss_after) = pep.memory();
    println!(
        "   PEP process memory: {rss_before} KiB before, {rss_after} KiB after, peak {peak} KiB over the whole run"
    );

    if with_node {
        node(port, pep, dir);
    }
}

/// Node's built-in fetch (direct) against @pexi/guest (through the PEP), in a Node process.
fn node(port: u16, pep: &Pep, dir: &Path) {
    let script = repo_root().join("examples/bench/bench.mjs");
    let output = Command::new(std::env::var("NODE").unwrap_or_else(|_| "node".into()))
        .arg(&script)
        .env("UPSTREAM", format!("http://127.0.0.1:{port}"))
        .env("PEXI_ENDPOINT", format!("unix:{}", pep.socket.display()))
        .current_dir(dir)
        .output()
        .expect("node");
    print!("{}", String::from_utf8_lossy(&output.stdout));
    if !output.status.success() {
        eprintln!(
            "bench.mjs failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
}
