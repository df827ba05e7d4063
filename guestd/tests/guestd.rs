//! `pexi-guestd`'s forward proxy, end to end: the real binary, a real PEP (in-process), real upstream
//! servers on loopback (HTTPS with a test CA the PEP trusts), and real clients: curl, git and reqwest.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Instant;

use pexi_host::config::Config;
use pexi_host::server::Server;
use pexi_test_support::{
    loopback_options, temp_dir, write_config, GitServer, TestCa, TestDir, Upstream,
};

struct Guestd {
    child: Child,
    proxy: String,
    ca: PathBuf,
    /// Its local pexi socket.
    socket: PathBuf,
}

impl Guestd {
    fn start(socket: &Path, dir: &Path) -> Guestd {
        Guestd::start_with(socket, dir, &dir.join("guestd.sock"), &[]).0
    }

    /// With `local` as its `--socket` ("" for none) and `extra` arguments; also returns its ready line.
    fn start_with(socket: &Path, dir: &Path, local: &Path, extra: &[&str]) -> (Guestd, String) {
        let ca = dir.join("guest-ca.pem");
        let mut child = Command::new(env!("CARGO_BIN_EXE_pexi-guestd"))
            .args(["--endpoint", &format!("unix:{}", socket.display())])
            .args(["--listen", "127.0.0.1:0", "--ca-cert"])
            .arg(&ca)
            .arg("--socket")
            .arg(local)
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn pexi-guestd");
        let stdout = child.stdout.take().expect("stdout");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("ready line");
        let proxy = line
            .split_whitespace()
            .find(|w| w.starts_with("http://"))
            .unwrap_or_else(|| panic!("no proxy address in {line:?}"))
            .to_string();
        assert!(ca.exists(), "the CA certificate was written");
        let guestd = Guestd {
            child,
            proxy,
            ca,
            socket: local.to_path_buf(),
        };
        (guestd, line)
    }

    /// Peak resident memory of the daemon, in KiB.
    fn peak_kib(&self) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for Guestd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Curl {
    status: u16,
    headers: String,
    body: Vec<u8>,
    exit: i32,
    stderr: String,
}

/// curl through the proxy, trusting only the guest CA. `-w` prints the status after the body.
fn curl(guestd: &Guestd, args: &[&str], stdin: Option<&[u8]>) -> Curl {
    let headers = tempfile_path("headers");
    let mut command = Command::new("curl");
    command
        .args(["-sS", "--noproxy", "", "-x", &guestd.proxy, "--cacert"])
        .arg(&guestd.ca)
        .arg("-D")
        .arg(&headers)
        .args(["-w", "\n%{http_code}"])
        .args(args)
        .env_remove("http_proxy")
        .env_remove("https_proxy")
        .env_remove("HTTPS_PROXY")
        .env_remove("ALL_PROXY")
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command.spawn().expect("curl (apt-get install curl)");
    if let Some(bytes) = stdin {
        let mut pipe = child.stdin.take().expect("stdin");
        let bytes = bytes.to_vec();
        std::thread::spawn(move || {
            let _ = pipe.write_all(&bytes);
        });
    }
    let output = child.wait_with_output().expect("curl output");
    let mut body = output.stdout;
    let split = body.iter().rposition(|b| *b == b'\n').unwrap_or(0);
    let status = String::from_utf8_lossy(&body[split..])
        .trim()
        .parse()
        .unwrap_or(0);
    body.truncate(split);
    let headers_text = std::fs::read_to_string(&headers).unwrap_or_default();
    let _ = std::fs::remove_file(&headers);
    Curl {
        status,
        headers: headers_text.to_ascii_lowercase(),
        body,
        exit: output.status.code().unwrap_or(-1),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

fn tempfile_path(tag: &str) -> PathBuf {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    std::env::temp_dir().join(format!(
        "pexi-guestd-test-{}-{}-{tag}",
        std::process::id(),
        NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ))
}

struct Setup {
    _server: Server,
    guestd: Guestd,
    plain: Upstream,
    tls: Upstream,
    git: GitServer,
    /// Last: removed after everything that uses it has stopped.
    dir: TestDir,
}

async fn setup() -> Setup {
    let ca = TestCa::new(&["secure.test", "git.test"]);
    let plain = Upstream::http("127.0.0.1").await;
    let tls = Upstream::https("127.0.0.1", &ca).await;
    let dir = temp_dir("guestd");
    let git = GitServer::https("127.0.0.1", &ca, dir.join("repos")).await;
    let socket = dir.join("pep.sock");
    let mut options = loopback_options(
        &[
            ("api.test", "127.0.0.1"),
            ("secure.test", "127.0.0.1"),
            ("git.test", "127.0.0.1"),
        ],
        &["api.test", "secure.test", "git.test"],
    );
    options.extra_ca_pem = Some(ca.ca_pem.clone());
    options.websocket = true;
    let config = Config::load(Some(&write_config(&dir, &socket, &options))).expect("config");
    let server = Server::start(config).await.expect("PEP");
    let guestd = Guestd::start(&socket, &dir);
    Setup {
        _server: server,
        guestd,
        plain,
        tls,
        git,
        dir,
    }
}

fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> tokio::task::JoinHandle<T> {
    tokio::task::spawn_blocking(f)
}

#[tokio::test(flavor = "multi_thread")]
async fn curl_through_the_proxy() {
    let s = setup().await;
    let plain = format!("http://api.test:{}", s.plain.port());
    let tls = format!("https://secure.test:{}", s.tls.port());
    let guestd = std::sync::Arc::new(s.guestd);
    let g = guestd.clone();
    let (p, t) = (plain.clone(), tls.clone());
    let results = blocking(move || {
        vec![
            curl(&g, &[&format!("{p}/hello")], None),
            curl(&g, &[&format!("{t}/hello")], None),
            curl(&g, &["http://denied.test/x"], None),
            curl(&g, &["https://denied.test/x"], None),
            curl(&g, &["-L", &format!("{t}/redirect?to=/hello")], None),
            curl(&g, &[&format!("{t}/redirect?to=/hello")], None),
        ]
    })
    .await
    .expect("curl");
    // Allowed, http and https (TLS terminated in the guest, with the guest CA).
    assert_eq!(
        (results[0].status, results[0].body.as_slice()),
        (200, &b"hello"[..]),
        "{}",
        results[0].stderr
    );
    assert_eq!(
        (results[1].status, results[1].body.as_slice()),
        (200, &b"hello"[..]),
        "{}",
        results[1].stderr
    );
    // Denied: 403, x-pexi-error, and the policy's reasons in the JSON body.
    assert_eq!(results[2].status, 403);
    assert!(
        results[2].headers.contains("x-pexi-error: policy_denied"),
        "{}",
        results[2].headers
    );
    // By default a CONNECT to a host the policy refuses is let in and answered inside (TLS terminated
    // with the guest CA), so https clients read the refusal as plain http ones do.
    for denied in &results[2..4] {
        assert_eq!(denied.status, 403, "{}", denied.stderr);
        assert!(
            denied.headers.contains("x-pexi-error: policy_denied"),
            "{}",
            denied.headers
        );
        let body: serde_json::Value = serde_json::from_slice(&denied.body).expect("JSON refusal");
        assert_eq!(body["code"], "policy_denied");
        assert_eq!(
            body["reasons"][0],
            "host denied.test is not in the allowlist"
        );
        // The decision is named, in the body and a header, and is the audit log's.
        let id = body["decision_id"].as_str().expect("decision_id");
        // What an SDK prints (`message`, at the top and in the `error` object LLM APIs answer with)
        // says it all.
        let summary = format!(
            "pexi refused this request (policy_denied): host denied.test is not in the allowlist [decision {id}]"
        );
        assert_eq!(body["message"], summary.as_str());
        assert_eq!(body["error"]["message"], summary.as_str());
        assert_eq!(body["error"]["type"], "pexi_refusal");
        assert!(
            denied.headers.contains(&format!("x-pexi-decision: {id}")),
            "{}",
            denied.headers
        );
        let audit = std::fs::read_to_string(s.dir.join("audit.jsonl")).expect("audit");
        assert!(
            audit.lines().any(|l| l.contains("\"kind\":\"decision\"")
                && l.contains(&format!("\"decision_id\":\"{id}\""))),
            "decision {id} in the audit log"
        );
    }
    // Redirects are the client's to follow (each hop through the proxy and the PEP again).
    assert_eq!(
        (results[4].status, results[4].body.as_slice()),
        (200, &b"hello"[..])
    );
    assert_eq!(results[5].status, 302);
    let tls_hosts: Vec<String> = s.tls.hits().iter().map(|h| h.host.clone()).collect();
    assert!(tls_hosts
        .iter()
        .all(|h| h == &format!("secure.test:{}", s.tls.port())));

    // A 10 MB download through TLS, whole, and a streamed (chunked) upload of 3 MB.
    let g = guestd.clone();
    let (t2, p2) = (tls.clone(), plain.clone());
    let (big, upload) = blocking(move || {
        let big = curl(&g, &[&format!("{t2}/big?n=10000000")], None);
        let data = vec![b'u'; 3 * 1024 * 1024];
        let upload = curl(
            &g,
            &[
                "-T",
                "-",
                "-H",
                "content-type: application/octet-stream",
                &format!("{p2}/echo"),
            ],
            Some(&data),
        );
        (big, upload)
    })
    .await
    .expect("curl");
    assert_eq!(big.status, 200, "{}", big.stderr);
    assert_eq!(big.body.len(), 10_000_000);
    assert!(big.body.iter().all(|b| *b == b'x'));
    assert_eq!(upload.status, 200, "{}", upload.stderr);
    assert_eq!(upload.body.len(), 3 * 1024 * 1024);
    let hit = s.plain.hits().pop().expect("upload hit");
    assert_eq!(hit.body_len, 3 * 1024 * 1024);
    assert!(hit
        .headers
        .iter()
        .any(|(n, v)| n == "transfer-encoding" && v == "chunked"));
    let _ = std::fs::remove_dir_all(&s.dir);
}

#[tokio::test(flavor = "multi_thread")]
async fn two_hundred_concurrent_connections_with_bounded_memory() {
    let s = setup().await;
    let proxy = reqwest::Proxy::all(&s.guestd.proxy).expect("proxy");
    let ca =
        reqwest::Certificate::from_pem(&std::fs::read(&s.guestd.ca).expect("ca")).expect("pem");
    let before = s.guestd.peak_kib();
    let started = Instant::now();
    let tasks: Vec<_> = (0..200)
        .map(|i| {
            // A client per task: 200 separate connections to the proxy.
            let client = reqwest::Client::builder()
                .proxy(proxy.clone())
                .add_root_certificate(ca.clone())
                .tls_built_in_root_certs(false)
                .pool_max_idle_per_host(0)
                .build()
                .expect("client");
            let url = if i % 2 == 0 {
                format!("https://secure.test:{}/sse?n=2&gap_ms=200", s.tls.port())
            } else {
                format!("http://api.test:{}/big?n=100000", s.plain.port())
            };
            tokio::spawn(async move {
                let response = client.get(&url).send().await.expect("response");
                assert_eq!(response.status(), 200);
                response.bytes().await.expect("body").len()
            })
        })
        .collect();
    for (i, task) in tasks.into_iter().enumerate() {
        let len = task.await.expect("task");
        assert_eq!(len, if i % 2 == 0 { 24 } else { 100_000 });
    }
    let peak = s.guestd.peak_kib();
    eprintln!(
        "200 proxied connections in {:?}; pexi-guestd peak RSS {before} -> {peak} KiB",
        started.elapsed()
    );
    // Bounded: flow control keeps each stream's buffers small; 200 streams fit well under 100 MiB.
    assert!(peak < 100 * 1024, "peak RSS {peak} KiB");
    assert!(s.tls.connections() >= 1);
    let _ = std::fs::remove_dir_all(&s.dir);
}

fn git(dir: &Path, args: &[&str], env: &[(&str, String)]) -> std::process::Output {
    let mut command = Command::new("git");
    command
        .current_dir(dir)
        .args(args)
        .env("HOME", dir)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_TERMINAL_PROMPT", "0")
        .env_remove("http_proxy")
        .env_remove("HTTPS_PROXY")
        .env_remove("ALL_PROXY");
    for (name, value) in env {
        command.env(name, value);
    }
    command.output().expect("git")
}

#[tokio::test(flavor = "multi_thread")]
async fn git_clone_over_https_through_the_proxy() {
    let s = setup().await;
    let work = s.dir.join("work");
    std::fs::create_dir_all(s.dir.join("repos")).expect("repos");
    std::fs::create_dir_all(&work).expect("work");
    let ident = [
        ("GIT_AUTHOR_NAME", "pexi".to_string()),
        ("GIT_AUTHOR_EMAIL", "pexi@example.test".to_string()),
        ("GIT_COMMITTER_NAME", "pexi".to_string()),
        ("GIT_COMMITTER_EMAIL", "pexi@example.test".to_string()),
    ];
    // A repository on the "hosting service": one commit, served bare.
    assert!(git(&work, &["init", "-q", "-b", "main", "src"], &ident)
        .status
        .success());
    std::fs::write(work.join("src/README"), "cloned through pexi\n").expect("file");
    assert!(git(&work.join("src"), &["add", "README"], &ident)
        .status
        .success());
    assert!(
        git(&work.join("src"), &["commit", "-q", "-m", "first"], &ident)
            .status
            .success()
    );
    let bare = s.dir.join("repos/repo.git");
    assert!(git(
        &work,
        &[
            "clone",
            "-q",
            "--bare",
            "src",
            bare.to_str().expect("utf-8")
        ],
        &ident
    )
    .status
    .success());

    let url = format!("https://git.test:{}/repo.git", s.git.port);
    let env = vec![
        ("https_proxy", s.guestd.proxy.clone()),
        ("GIT_SSL_CAINFO", s.guestd.ca.display().to_string()),
    ];
    // git.test resolves nowhere but in the PEP's DNS overrides: the clone can only go through the proxy.
    let work2 = work.clone();
    let output = blocking(move || git(&work2, &["clone", "-q", &url, "copy"], &env))
        .await
        .expect("clone");
    assert!(
        output.status.success(),
        "git clone: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(
        std::fs::read_to_string(work.join("copy/README")).expect("cloned file"),
        "cloned through pexi\n"
    );
    let _ = std::fs::remove_dir_all(&s.dir);
}

#[tokio::test(flavor = "multi_thread")]
async fn websocket_upgrades_through_the_proxy() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let s = setup().await;
    let ca =
        reqwest::Certificate::from_pem(&std::fs::read(&s.guestd.ca).expect("ca")).expect("pem");
    let client = reqwest::Client::builder()
        .proxy(reqwest::Proxy::all(&s.guestd.proxy).expect("proxy"))
        .add_root_certificate(ca)
        .tls_built_in_root_certs(false)
        .http1_only()
        .build()
        .expect("client");
    // ws:// (absolute form through the proxy) and wss:// (CONNECT, TLS in the guest, upgrade inside).
    for url in [
        format!("http://api.test:{}/ws-echo", s.plain.port()),
        format!("https://secure.test:{}/ws-echo", s.tls.port()),
    ] {
        let response = client
            .get(&url)
            .header("connection", "upgrade")
            .header("upgrade", "websocket")
            .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
            .header("sec-websocket-version", "13")
            .send()
            .await
            .expect("handshake");
        assert_eq!(response.status(), 101, "{url}");
        let mut io = response.upgrade().await.expect("upgraded");
        for message in [&b"hello"[..], b"from the guest", &[0u8, 1, 2, 255]] {
            io.write_all(message).await.expect("write");
            let mut got = vec![0u8; message.len()];
            io.read_exact(&mut got).await.expect("echo");
            assert_eq!(got, message, "{url}");
        }
        io.shutdown().await.expect("half-close");
        let mut rest = Vec::new();
        io.read_to_end(&mut rest).await.expect("close");
        assert!(rest.is_empty());
    }
    // A WebSocket to a denied host: refused with pexi's 403, no handshake upstream.
    let response = client
        .get("http://ws.denied.test/ws-echo")
        .header("connection", "upgrade")
        .header("upgrade", "websocket")
        .send()
        .await
        .expect("answer");
    assert_eq!(response.status(), 403);
    assert_eq!(response.headers()["x-pexi-error"], "policy_denied");
    let _ = std::fs::remove_dir_all(&s.dir);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tunnel_only_destination_gets_an_opaque_tunnel() {
    // A server whose clients pin its certificate: only its own CA is trusted below, never the guest CA,
    // so the request can only succeed if the proxy does not terminate TLS.
    let pinned_ca = TestCa::new(&["pinned.test"]);
    let pinned = Upstream::https("127.0.0.1", &pinned_ca).await;
    let dir = temp_dir("guestd-tunnel");
    let socket = dir.join("pep.sock");
    let options = loopback_options(&[("pinned.test", "127.0.0.1")], &["api.test"]);
    let path = write_config(&dir, &socket, &options);
    let mut text = std::fs::read_to_string(&path).expect("config");
    text.push_str(&format!(
        "\n[[pep.policy.allow]]\nhost = \"pinned.test\"\ntunnel = true\nports = [{}]\n",
        pinned.port()
    ));
    std::fs::write(&path, text).expect("config");
    let _server = Server::start(Config::load(Some(&path)).expect("config"))
        .await
        .expect("PEP");
    let guestd = std::sync::Arc::new(Guestd::start(&socket, &dir));
    let ca_file = dir.join("pinned-ca.pem");
    std::fs::write(&ca_file, &pinned_ca.ca_pem).expect("ca");
    let url = format!("https://pinned.test:{}/hello", pinned.port());
    let g = guestd.clone();
    let reply = blocking(move || {
        let mut command = Command::new("curl");
        command
            .args(["-sS", "--noproxy", "", "-x", &g.proxy, "--cacert"])
            .arg(&ca_file)
            .arg(&url)
            .env_remove("https_proxy")
            .env_remove("HTTPS_PROXY");
        command.output().expect("curl")
    })
    .await
    .expect("curl");
    assert!(
        reply.status.success(),
        "{}",
        String::from_utf8_lossy(&reply.stderr)
    );
    assert_eq!(reply.stdout, b"hello");
    assert_eq!(pinned.hits().len(), 1);
    let audit = std::fs::read_to_string(dir.join("audit.jsonl")).expect("audit");
    assert!(audit.contains("\"method\":\"pep.net.connect\""));
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread")]
async fn processes_share_the_pep_through_the_local_socket() {
    use bytes::Bytes;
    use pexi_guest::{Client, Endpoint};
    let s = setup().await;
    // Three clients (as three processes would be), each with its own connection to pexi-guestd.
    let clients: Vec<Client> = (0..3)
        .map(|_| Client::new(Endpoint::Unix(s.guestd.socket.clone())))
        .collect();
    let plain = format!("http://api.test:{}", s.plain.port());
    let tls = format!("https://secure.test:{}", s.tls.port());

    let text = clients[0]
        .get(&format!("{plain}/hello"))
        .send()
        .await
        .expect("GET")
        .text()
        .await
        .expect("body");
    assert_eq!(text, "hello");
    let decision = clients[1]
        .check("GET", "https://denied.test/")
        .await
        .expect("check");
    assert!(!decision.allow);
    let denied = clients[2]
        .get("https://denied.test/")
        .send()
        .await
        .err()
        .expect("denied");
    assert_eq!(denied.code(), "policy_denied");
    match &denied {
        pexi_guest::Error::Pep(payload) => assert_eq!(
            payload.details.reasons,
            vec!["host denied.test is not in the allowlist".to_string()]
        ),
        other => panic!("{other:?}"),
    }

    // Streams both ways under flow control, concurrently on all three: a 2 MB upload echoed back and a
    // 5 MB download, several at once.
    let mut tasks = Vec::new();
    for (i, client) in clients.iter().enumerate() {
        for j in 0..4 {
            let client = client.clone();
            let (plain, tls) = (plain.clone(), tls.clone());
            tasks.push(tokio::spawn(async move {
                if (i + j) % 2 == 0 {
                    let body = vec![(i * 4 + j) as u8; 2_000_000];
                    let echoed = client
                        .request("POST", &format!("{plain}/echo"))
                        .body(Bytes::from(body.clone()))
                        .send()
                        .await
                        .expect("upload")
                        .bytes()
                        .await
                        .expect("echo");
                    assert_eq!(echoed.as_ref(), body.as_slice());
                } else {
                    let got = client
                        .get(&format!("{tls}/big?n=5000000"))
                        .send()
                        .await
                        .expect("download")
                        .bytes()
                        .await
                        .expect("body");
                    assert_eq!(got.len(), 5_000_000);
                }
            }));
        }
    }
    for task in tasks {
        task.await.expect("stream");
    }

    // A WebSocket through the socket too.
    let (mut response, mut sender) = clients[0]
        .get(&format!("{plain}/ws-echo"))
        .header("connection", "upgrade")
        .header("upgrade", "websocket")
        .upgrade()
        .await
        .expect("upgrade");
    assert_eq!(response.status(), 101);
    assert!(sender
        .send(Bytes::from_static(b"ping"))
        .await
        .expect("send"));
    sender.finish().expect("finish");
    let mut echo = Vec::new();
    while let Some(chunk) = response.chunk().await.expect("chunk") {
        echo.extend_from_slice(&chunk);
    }
    assert_eq!(echo, b"ping");

    // Everything went over pexi-guestd's one session with the PEP.
    let audit = std::fs::read_to_string(s.dir.join("audit.jsonl")).expect("audit");
    let sessions: std::collections::BTreeSet<String> = audit
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|r| r["kind"] == "decision")
        .filter_map(|r| r["session_id"].as_str().map(str::to_string))
        .collect();
    assert_eq!(sessions.len(), 1, "{sessions:?}");
    let _ = std::fs::remove_dir_all(&s.dir);
}

/// `--socket ""` means no local socket (docs/guest.md): the daemon starts, says so, and its proxy works.
#[tokio::test(flavor = "multi_thread")]
async fn an_empty_socket_means_none() {
    let plain = Upstream::http("127.0.0.1").await;
    let dir = temp_dir("guestd-nosocket");
    let socket = dir.join("pep.sock");
    let options = loopback_options(&[("api.test", "127.0.0.1")], &["api.test"]);
    let config = Config::load(Some(&write_config(&dir, &socket, &options))).expect("config");
    let _server = Server::start(config).await.expect("PEP");
    let (guestd, line) = Guestd::start_with(&socket, &dir, Path::new(""), &[]);
    assert!(line.trim_end().ends_with("socket none"), "{line:?}");
    let url = format!("http://api.test:{}/hello", plain.port());
    let answer = blocking(move || curl(&guestd, &[&url], None))
        .await
        .expect("curl");
    assert_eq!(answer.status, 200, "{}", answer.stderr);
    assert_eq!(answer.body, b"hello");
}

/// `--deny-connect early`: a CONNECT to a host the policy can never allow is refused before any TLS,
/// with the code and decision in the CONNECT's own 403.
#[tokio::test(flavor = "multi_thread")]
async fn an_early_connect_refusal_answers_before_any_tls() {
    let dir = temp_dir("guestd-early");
    let socket = dir.join("pep.sock");
    let options = loopback_options(&[("api.test", "127.0.0.1")], &["api.test"]);
    let config = Config::load(Some(&write_config(&dir, &socket, &options))).expect("config");
    let _server = Server::start(config).await.expect("PEP");
    let (guestd, _) = Guestd::start_with(
        &socket,
        &dir,
        &dir.join("guestd.sock"),
        &["--deny-connect", "early"],
    );
    let answer = blocking(move || curl(&guestd, &["https://denied.test/x"], None))
        .await
        .expect("curl");
    assert_ne!(answer.exit, 0);
    assert!(answer.headers.contains("403"), "{}", answer.headers);
    assert!(
        answer.headers.contains("x-pexi-error: policy_denied"),
        "{}",
        answer.headers
    );
    assert!(
        answer.headers.contains("x-pexi-decision: "),
        "{}",
        answer.headers
    );
}

/// Transparent mode, as a hostile guest would use it. pexi-guestd runs in a network namespace of its own
/// (only loopback), so it can capture the upstream's port while the upstream and the PEP live in this
/// test's namespace; clients run in its namespace (nsenter), resolve through its DNS stub, and connect to
/// the synthetic addresses. The name an address stands for decides, whatever the client's TLS server name
/// or `Host` say; a local address that is not synthetic is not carried.
#[tokio::test(flavor = "multi_thread")]
async fn transparent_mode_carries_names_and_cannot_be_pointed_elsewhere() {
    if !pexi_test_support::in_isolated_netns(
        "transparent_mode_carries_names_and_cannot_be_pointed_elsewhere",
    ) {
        return;
    }
    let s = setup().await;
    let port = s.tls.port().to_string();
    let dir = s.dir.join("transparent");
    std::fs::create_dir_all(&dir).expect("dir");
    let ca = dir.join("ca.pem");
    let mut guestd = Command::new("unshare")
        .args(["-n", "sh", "-c", "ip link set lo up && exec \"$0\" \"$@\""])
        .arg(env!("CARGO_BIN_EXE_pexi-guestd"))
        .arg("--endpoint")
        .arg(format!("unix:{}", s.dir.join("pep.sock").display()))
        .args(["--listen", "127.0.0.1:3128", "--socket", "", "--ca-cert"])
        .arg(&ca)
        .args(["--transparent", "--capture-ports", &format!("443,{port}")])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("unshare pexi-guestd");
    let mut lines = BufReader::new(guestd.stdout.take().expect("stdout")).lines();
    let ready: Vec<String> = (0..2).map_while(|_| lines.next()?.ok()).collect();
    assert!(
        ready.len() == 2 && ready[1].contains("transparent dns 127.0.0.53:53 range 127.77.0.0/16"),
        "{ready:?}"
    );
    let guestd = Guestd {
        child: guestd,
        proxy: String::new(),
        ca: ca.clone(),
        socket: PathBuf::new(),
    };
    let net = format!("--net=/proc/{}/ns/net", guestd.child.id());
    let inside = move |program: &str, args: &[&str]| {
        let output = Command::new("nsenter")
            .arg(&net)
            .arg(program)
            .args(args)
            .env_remove("http_proxy")
            .env_remove("https_proxy")
            .env_remove("HTTPS_PROXY")
            .env_remove("ALL_PROXY")
            .output()
            .expect("nsenter (util-linux)");
        (
            output.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&output.stdout).into_owned()
                + &String::from_utf8_lossy(&output.stderr),
        )
    };
    let lookup = |name: &str| -> String {
        let (_, out) = inside("busybox", &["nslookup", "-type=a", name, "127.0.0.53"]);
        out.lines()
            .filter_map(|l| l.split_whitespace().last())
            .find(|a| a.starts_with("127.77."))
            .unwrap_or_else(|| panic!("no synthetic address for {name}: {out}"))
            .to_string()
    };
    let secure = lookup("secure.test");
    let denied = lookup("denied.test");
    assert_ne!(secure, denied);
    assert_eq!(lookup("SECURE.test."), secure, "one name, one address");
    let ca_arg = ca.display().to_string();
    let curl = |name: &str, address: &str, extra: &[&str]| {
        let resolve = format!("{name}:{port}:{address}");
        let url = format!("https://{name}:{port}/hello");
        let mut args = vec!["-sS", "--cacert", &ca_arg, "--resolve", &resolve];
        args.extend_from_slice(extra);
        args.push(&url);
        inside("curl", &args)
    };

    // Allowed: the name's address, TLS with the per-boot CA, the PEP's decision, the upstream's answer.
    let (code, out) = curl("secure.test", &secure, &[]);
    assert_eq!((code, out.as_str()), (0, "hello"));
    // Denied: pexi's 403 inside the client's own TLS, with the reason.
    let (code, out) = curl("denied.test", &denied, &[]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("host denied.test is not in the allowlist"),
        "{out}"
    );
    // An allowed name's SNI (and Host) on a denied name's address: the certificate is for the address's
    // name, so a verifying client refuses it; one that does not verify reaches only that name, refused.
    let (code, out) = curl("secure.test", &denied, &[]);
    assert_eq!(code, 60, "certificate verification must fail: {out}");
    let (code, out) = curl("secure.test", &denied, &["--insecure"]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("host denied.test is not in the allowlist"),
        "{out}"
    );
    assert!(!out.contains("hello"), "{out}");
    // An address in the range that was never handed out: named by the TLS server name.
    let (code, out) = curl("secure.test", "127.77.200.200", &[]);
    assert_eq!((code, out.as_str()), (0, "hello"));
    // A local address that is not synthetic is not pexi's to carry: reset, nothing decided.
    let (code, out) = curl("secure.test", "127.0.0.1", &[]);
    assert!(code == 35 || code == 56 || code == 7, "exit {code}: {out}");
    drop(guestd);
    let _ = std::fs::remove_dir_all(&s.dir);
}
