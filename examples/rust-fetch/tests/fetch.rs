//! `pexi-fetch` run as a process against an in-process PEP and a loopback upstream.

use pexi_host::config::Config;
use pexi_host::server::Server;
use pexi_test_support::{loopback_options, temp_dir, write_config, Upstream};
use std::process::Output;

async fn fetch(socket: &std::path::Path, args: &[&str]) -> Output {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_pexi-fetch"));
    command
        .args(args)
        .env("PEXI_ENDPOINT", format!("unix:{}", socket.display()));
    command.output().await.expect("run pexi-fetch")
}

#[tokio::test(flavor = "multi_thread")]
async fn pexi_fetch_through_the_pep() {
    let upstream = Upstream::http("127.0.0.1").await;
    let dir = temp_dir("fetch");
    let socket = dir.join("pep.sock");
    let options = loopback_options(&[("api.test", "127.0.0.1")], &["api.test"]);
    let config = Config::load(Some(&write_config(&dir, &socket, &options))).expect("config");
    let server = Server::start(config).await.expect("server");
    let port = upstream.port();

    let out = fetch(&socket, &[&format!("http://api.test:{port}/hello")]).await;
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.stdout, b"hello");

    std::fs::write(dir.join("body.json"), b"{\"a\":1}").expect("body");
    let data = format!("@{}", dir.join("body.json").display());
    let out = fetch(
        &socket,
        &[
            "-X",
            "PUT",
            "-H",
            "content-type: application/json",
            "-d",
            &data,
            "-i",
            &format!("http://api.test:{port}/echo"),
        ],
    )
    .await;
    assert_eq!(out.stdout, b"{\"a\":1}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("HTTP 200") && stderr.contains("x-method: PUT"),
        "{stderr}"
    );

    let out = fetch(
        &socket,
        &[&format!("http://api.test:{port}/status?status=503")],
    )
    .await;
    assert_eq!(out.status.code(), Some(22));

    let out = fetch(&socket, &["https://evil.test/"]).await;
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("policy_denied") && stderr.contains("evil.test is not in the allowlist"),
        "{stderr}"
    );

    let out = fetch(
        &socket,
        &["--check", &format!("http://api.test:{port}/hello")],
    )
    .await;
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stderr).starts_with("allow (decision "));
    let out = fetch(&socket, &["--check", "https://evil.test/"]).await;
    assert_eq!(out.status.code(), Some(1));

    let out = fetch(
        &socket,
        &["--endpoint", "tcp:1.2.3.4:80", "https://a.test/"],
    )
    .await;
    assert_eq!(out.status.code(), Some(2));

    assert_eq!(
        upstream.hits().len(),
        3,
        "check and deny never reach upstream"
    );
    server.stop().await.expect("stop");
    std::fs::remove_dir_all(&dir).expect("cleanup");
}
