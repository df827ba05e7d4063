//! Policy from an OPA bundle server (docs/fleet.md), end to end: `pexi policy bundle build` signs a
//! bundle with an RSA key made by openssl, a loopback HTTP server serves it with ETags, and a real
//! `pexi serve` polls it. A new signed bundle is put in service; a tampered, unsigned or foreign-signed
//! one is refused and audited while the one in service keeps deciding; with the server down the PEP
//! restarts on the last good bundle from disk, and a last good bundle changed on disk is not used.
//! Runs alone in a loopback-only network namespace.

mod support;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use support::{loopback_options, TestPep, Upstream};

/// What the bundle server serves, and what it saw.
#[derive(Default)]
struct Served {
    archive: Vec<u8>,
    etag: String,
    requests: usize,
    not_modified: usize,
}

async fn bundle_server(served: Arc<Mutex<Served>>) -> (u16, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let app = axum::Router::new().route(
        "/bundles/pexi.tar.gz",
        axum::routing::get(move |headers: axum::http::HeaderMap| {
            let served = served.clone();
            async move {
                use axum::response::IntoResponse;
                let mut served = served.lock().expect("served");
                served.requests += 1;
                let wanted = headers
                    .get("if-none-match")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default();
                if served.etag.is_empty() {
                    // A server that keeps no ETags: every poll downloads.
                    return served.archive.clone().into_response();
                }
                if wanted == served.etag {
                    served.not_modified += 1;
                    return axum::http::StatusCode::NOT_MODIFIED.into_response();
                }
                ([("etag", served.etag.clone())], served.archive.clone()).into_response()
            }
        }),
    );
    let server = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (port, server)
}

fn openssl(args: &[&str]) {
    let status = Command::new("openssl")
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .expect("openssl (scripts/setup installs it)");
    assert!(status.success(), "openssl {args:?}");
}

/// An RSA key pair, as an operator makes one: (private, public).
fn rsa_keys(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let private = dir.join(format!("{name}.pem"));
    let public = dir.join(format!("{name}.pub.pem"));
    openssl(&[
        "genpkey",
        "-algorithm",
        "RSA",
        "-pkeyopt",
        "rsa_keygen_bits:2048",
        "-out",
        private.to_str().expect("path"),
    ]);
    openssl(&[
        "pkey",
        "-in",
        private.to_str().expect("path"),
        "-pubout",
        "-out",
        public.to_str().expect("path"),
    ]);
    (private, public)
}

/// The shipped policy with an allow list, built (and signed with `key`, if any) by `pexi policy bundle`.
fn bundle(work: &Path, revision: &str, hosts: &[&str], port: u16, key: Option<&Path>) -> Vec<u8> {
    bundle_with(work, revision, hosts, port, key, None)
}

/// As [`bundle`], with one more module.
fn bundle_with(
    work: &Path,
    revision: &str,
    hosts: &[&str],
    port: u16,
    key: Option<&Path>,
    module: Option<(&str, &str)>,
) -> Vec<u8> {
    let dir = work.join(format!("policy-{revision}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("data")).expect("dir");
    support::copy_policies(&dir);
    // copy_policies puts the repository's policies under dir/policies.
    let policies = dir.join("policies");
    let allow: Vec<Value> = hosts
        .iter()
        .map(|h| serde_json::json!({"host": h, "ports": [port]}))
        .collect();
    std::fs::create_dir_all(policies.join("data")).expect("data dir");
    if let Some((name, text)) = module {
        std::fs::write(policies.join("pexi").join(name), text).expect("module");
    }
    std::fs::write(
        policies.join("data/fleet.json"),
        serde_json::to_vec(&serde_json::json!({"allow": allow})).expect("json"),
    )
    .expect("data");
    let output = work.join(format!("{revision}.tar.gz"));
    let mut command = Command::new(env!("CARGO_BIN_EXE_pexi"));
    command
        .args(["policy", "bundle", "build"])
        .arg(&policies)
        .arg("--output")
        .arg(&output)
        .args(["--revision", revision]);
    if let Some(key) = key {
        command.arg("--signing-key").arg(key);
    }
    let done = command.output().expect("pexi policy bundle build");
    assert!(done.status.success(), "{done:?}");
    std::fs::read(&output).expect("bundle")
}

/// The same archive with one file's content replaced (its signature left as it was).
fn tampered(archive: &[u8], name: &str, content: &[u8]) -> Vec<u8> {
    let mut files = Vec::new();
    let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(archive));
    for entry in tar.entries().expect("entries") {
        let mut entry = entry.expect("entry");
        let path = entry.path().expect("path").to_string_lossy().into_owned();
        let mut bytes = Vec::new();
        entry.read_to_end(&mut bytes).expect("read");
        if path == name {
            bytes = content.to_vec();
        }
        files.push((path, bytes));
    }
    assert!(
        files.iter().any(|(path, _)| path == name),
        "{name} in the bundle"
    );
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    let mut out = tar::Builder::new(gz);
    for (path, bytes) in files {
        let mut header = tar::Header::new_ustar();
        header.set_size(bytes.len() as u64);
        header.set_mode(0o644);
        out.append_data(&mut header, path, bytes.as_slice())
            .expect("append");
    }
    out.into_inner().expect("tar").finish().expect("gz")
}

/// Serves `archive` with ETag `etag` ("" for none).
fn serve(served: &Arc<Mutex<Served>>, archive: Vec<u8>, etag: &str) {
    let mut served = served.lock().expect("served");
    served.archive = archive;
    served.etag = if etag.is_empty() {
        String::new()
    } else {
        format!("\"{etag}\"")
    };
}

async fn status_of(pep: &TestPep, url: &str) -> String {
    let mut guest = pep.guest().await;
    let reply = guest.get(url).await;
    if reply.error.is_some() {
        reply.error_code().to_string()
    } else {
        reply.status().to_string()
    }
}

/// Waits until `url` gets `want` (a status or an error code).
async fn wait_for(pep: &TestPep, url: &str, want: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let got = status_of(pep, url).await;
        if got == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{url}: {got}, not {want}, after 30 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn bundle_records(pep: &TestPep, event: &str) -> Vec<Value> {
    pep.audit_records()
        .into_iter()
        .filter(|r| r["kind"] == "bundle" && r["event"] == event)
        .collect()
}

async fn wait_record(pep: &TestPep, event: &str, count: usize) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let records = bundle_records(pep, event);
        if records.len() >= count {
            return records;
        }
        assert!(
            Instant::now() < deadline,
            "{count} bundle {event} record(s) within 30 s; have {}",
            records.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn signed_bundles_serve_and_tampered_unsigned_or_foreign_ones_are_refused() {
    if !support::in_isolated_netns(
        "signed_bundles_serve_and_tampered_unsigned_or_foreign_ones_are_refused",
    ) {
        return;
    }
    let api = Upstream::http("127.0.0.1").await;
    let port = api.port();
    let work = support::temp_dir("bundles");
    let (private, public) = rsa_keys(&work, "fleet");
    let (stranger, _) = rsa_keys(&work, "stranger");
    let served = Arc::new(Mutex::new(Served::default()));
    serve(
        &served,
        bundle(&work, "r1", &["one.test"], port, Some(&private)),
        "r1",
    );
    let (server_port, server) = bundle_server(served.clone()).await;
    let names = [
        ("one.test", "127.0.0.1"),
        ("two.test", "127.0.0.1"),
        ("evil.test", "127.0.0.1"),
    ];
    let mut pep = TestPep::start_with(loopback_options(&names, &[]), |doc| {
        let policy = doc["pep"]["policy"].as_table_mut().expect("[pep.policy]");
        let bundle: toml::Table = toml::from_str(&format!(
            "url = \"http://127.0.0.1:{server_port}/bundles/pexi.tar.gz\"\npoll_seconds = 1\npublic_key = \"{}\"\n",
            public.display()
        ))
        .expect("bundle table");
        policy.insert("bundle".into(), bundle.into());
    });
    let one = format!("http://one.test:{port}/headers");
    let two = format!("http://two.test:{port}/headers");
    let evil = format!("http://evil.test:{port}/headers");
    // The first poll happens before guests are served: r1 decides the first request.
    assert_eq!(status_of(&pep, &one).await, "200");
    assert_eq!(status_of(&pep, &two).await, "policy_denied");
    let downloads = wait_record(&pep, "download", 1).await;
    assert_eq!(downloads[0]["revision"], "r1");
    assert!(downloads[0]["digest"]
        .as_str()
        .is_some_and(|d| d.starts_with("sha256:")));
    let reload = pep.wait_record("the bundle's policy record", |r| {
        r["kind"] == "policy"
            && r["event"] == "reload"
            && r["source"]
                .as_str()
                .is_some_and(|s| s.contains("revision r1"))
    });
    assert!(reload["new_revision"].as_str().is_some());

    // A new signed bundle is put in service by the next poll.
    let r2 = bundle(&work, "r2", &["one.test", "two.test"], port, Some(&private));
    serve(&served, r2.clone(), "r2");
    wait_for(&pep, &two, "200").await;

    // Tampered (an entry added to the signed data), unsigned, signed by another key: each refused and
    // audited; r2 keeps deciding.
    let poisoned = serde_json::json!({"allow": [
        {"host": "two.test", "ports": [port]},
        {"host": "evil.test", "ports": [port]},
    ]});
    let attempts = [
        (
            "tampered",
            tampered(
                &r2,
                "pexi/data.json",
                &serde_json::to_vec(&poisoned).expect("json"),
            ),
            "digest does not match",
        ),
        (
            "unsigned",
            bundle(&work, "r3", &["evil.test"], port, None),
            "not signed",
        ),
        (
            "foreign",
            bundle(&work, "r4", &["evil.test"], port, Some(&stranger)),
            "does not verify",
        ),
    ];
    for (n, (what, archive, reason)) in attempts.into_iter().enumerate() {
        serve(&served, archive, what);
        let refused = wait_record(&pep, "refused", n + 1).await;
        let error = refused[n]["error"].as_str().unwrap_or_default();
        assert!(error.contains(reason), "{what}: {error}");
        assert_eq!(status_of(&pep, &evil).await, "policy_denied", "{what}");
        assert_eq!(
            status_of(&pep, &two).await,
            "200",
            "{what}: r2 still serves"
        );
    }
    assert!(
        api.hits().iter().all(|hit| !hit.host.contains("evil")),
        "nothing reached the upstream for evil.test"
    );

    // Signed, but its own tests fail: the reload gate refuses it (a `policy` record names it), r2 keeps
    // deciding, and it is not tried again on every poll.
    let failing = bundle_with(
        &work,
        "r5",
        &["evil.test"],
        port,
        Some(&private),
        Some((
            "broken_test.rego",
            "package pexi.broken_test\n\nimport rego.v1\n\ntest_that_fails if false\n",
        )),
    );
    // Served without an ETag, so every poll downloads it again.
    serve(&served, failing, "");
    let rejected = pep.wait_record("the gate's refusal", |r| {
        r["kind"] == "policy"
            && r["event"] == "reload_rejected"
            && r["source"]
                .as_str()
                .is_some_and(|s| s.contains("revision r5"))
    });
    assert!(
        rejected["error"]
            .as_str()
            .is_some_and(|e| e.contains("test")),
        "{rejected}"
    );
    assert_eq!(status_of(&pep, &evil).await, "policy_denied");
    assert_eq!(status_of(&pep, &two).await, "200");
    // Two more downloads of the same bundle.
    let polled = served.lock().expect("served").requests;
    let deadline = Instant::now() + Duration::from_secs(30);
    while served.lock().expect("served").requests < polled + 2 {
        assert!(Instant::now() < deadline, "no more polls");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let tries = bundle_records(&pep, "download")
        .iter()
        .filter(|r| r["revision"] == "r5")
        .count();
    assert_eq!(
        tries, 1,
        "a bundle the gate refused is not downloaded into service again"
    );

    // ETag polling: a bundle already held is not downloaded again.
    serve(&served, r2.clone(), "r2");
    let before = served.lock().expect("served").not_modified;
    let deadline = Instant::now() + Duration::from_secs(30);
    while served.lock().expect("served").not_modified < before + 2 {
        assert!(
            Instant::now() < deadline,
            "no conditional polls answered 304"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(served.lock().expect("served").requests > 6);

    // The server goes away and the PEP restarts: the last good bundle (r2) serves from disk.
    server.abort();
    let _ = server.await;
    pep.restart();
    assert_eq!(status_of(&pep, &two).await, "200", "r2 from disk");
    assert_eq!(status_of(&pep, &evil).await, "policy_denied");
    wait_record(&pep, "unreachable", 1).await;
    let last_good = wait_record(&pep, "last_good", 1).await;
    assert_eq!(last_good[0]["revision"], "r2");
    let loads: Vec<Value> = pep
        .audit_records()
        .into_iter()
        .filter(|r| r["kind"] == "policy" && r["event"] == "load")
        .collect();
    let source = loads
        .last()
        .and_then(|r| r["source"].as_str())
        .unwrap_or_default();
    assert!(
        source.contains("revision r2"),
        "the start's policy record names the bundle: {source}"
    );

    // A last good bundle changed on disk is not trusted: the PEP falls back to its local policy (deny).
    let kept = pep.dir.join("bundle/bundle.tar.gz");
    let on_disk = std::fs::read(&kept).expect("the last good bundle is kept");
    std::fs::write(
        &kept,
        tampered(
            &on_disk,
            "pexi/data.json",
            &serde_json::to_vec(&poisoned).expect("json"),
        ),
    )
    .expect("tamper");
    pep.restart();
    assert_eq!(status_of(&pep, &evil).await, "policy_denied");
    assert_eq!(
        status_of(&pep, &two).await,
        "policy_denied",
        "local policy: nothing listed"
    );
}
