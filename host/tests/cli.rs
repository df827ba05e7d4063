//! The `pexi` command line, run as a process.

mod support;

use std::process::{Command, Output};

fn pexi(args: &[&str], env: &[(&str, &str)], audit_dir: &std::path::Path) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_pexi"));
    command
        .args(args)
        .env("PEP_AUDIT_LOG", audit_dir.join("audit.jsonl"))
        .env_remove("PEP_ALLOWED_DOMAINS")
        .env("RUST_LOG", "warn");
    for (k, v) in env {
        command.env(k, v);
    }
    command.output().expect("run pexi")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn check_exits_0_on_allow_1_on_deny_2_on_error() {
    let dir = support::temp_dir("cli");
    let denied = pexi(&["check", "GET", "https://example.com"], &[], &dir);
    assert_eq!(denied.status.code(), Some(1));
    assert!(
        text(&denied.stdout).starts_with("deny (decision "),
        "{}",
        text(&denied.stdout)
    );
    assert!(text(&denied.stdout).contains("not in the allowlist"));

    let allowed = pexi(
        &["check", "POST", "https://API.example.com./v1"],
        &[("PEP_ALLOWED_DOMAINS", "api.example.com")],
        &dir,
    );
    assert_eq!(allowed.status.code(), Some(0), "{}", text(&allowed.stderr));
    assert!(text(&allowed.stdout).contains("allowed by allowlist entry api.example.com"));

    let invalid = pexi(&["check", "GET", "https://user@example.com/"], &[], &dir);
    assert_eq!(invalid.status.code(), Some(2));
    assert!(
        text(&invalid.stderr).contains("invalid_request"),
        "{}",
        text(&invalid.stderr)
    );

    // Every decision went to the audit log named by PEP_AUDIT_LOG.
    let log = std::fs::read_to_string(dir.join("audit.jsonl")).expect("audit log");
    assert_eq!(
        log.lines()
            .filter(|l| l.contains("\"kind\":\"decision\""))
            .count(),
        2
    );
    std::fs::remove_dir_all(&dir).expect("cleanup");
}

#[test]
fn a_bad_config_or_policy_fails_at_start_naming_file_and_line() {
    let dir = support::temp_dir("cli-bad");
    support::copy_policies(&dir);
    let config =
        include_str!("../../config.toml").replace("max_redirects = 5", "max_redirects = -1");
    std::fs::write(dir.join("config.toml"), &config).expect("write");
    let line = config
        .lines()
        .position(|l| l.starts_with("max_redirects"))
        .expect("line")
        + 1;
    let config_path = dir.join("config.toml");
    let out = pexi(
        &["serve", "--config", config_path.to_str().expect("utf8")],
        &[],
        &dir,
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains(&format!("config.toml:{line}:")),
        "{}",
        text(&out.stderr)
    );

    std::fs::write(dir.join("config.toml"), include_str!("../../config.toml")).expect("write");
    std::fs::write(
        dir.join("policies/pexi/http.rego"),
        "package pexi.http\ndecision := {\n",
    )
    .expect("write");
    let out = pexi(
        &[
            "check",
            "--config",
            config_path.to_str().expect("utf8"),
            "GET",
            "https://a.test/",
        ],
        &[],
        &dir,
    );
    assert_eq!(out.status.code(), Some(2));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("pexi/http.rego:3:"), "{stderr}");
    std::fs::remove_dir_all(&dir).expect("cleanup");
}

#[test]
fn help_lists_every_subcommand() {
    let dir = support::temp_dir("cli-help");
    let out = pexi(&["--help"], &[], &dir);
    assert!(out.status.success());
    let help = text(&out.stdout);
    for sub in ["serve", "check"] {
        assert!(help.contains(sub), "{help}");
        let sub_help = pexi(&[sub, "--help"], &[], &dir);
        assert!(sub_help.status.success(), "{sub} --help");
        assert!(text(&sub_help.stdout).contains("--config"));
    }
    std::fs::remove_dir_all(&dir).expect("cleanup");
}

#[test]
fn policy_test_passes_on_the_shipped_bundle_and_fails_on_a_broken_test() {
    let dir = support::temp_dir("cli-policy-test");
    let policies = support::repo_root().join("policies");
    let out = pexi(
        &["policy", "test", policies.to_str().expect("utf8")],
        &[],
        &dir,
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stdout));
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("PASS pexi.http_test.test_deny_wins_over_allow"),
        "{stdout}"
    );
    assert!(
        stdout
            .lines()
            .last()
            .is_some_and(|l| l.ends_with(" passed, 0 failed")),
        "{stdout}"
    );

    support::copy_policies(&dir);
    std::fs::write(
        dir.join("policies/pexi/broken_test.rego"),
        "package pexi.broken_test\nimport rego.v1\nimport data.pexi.http\n\ntest_example_is_allowed if {\n\thttp.decision.allow with input as {\"request\": {\"host\": \"example.com\"}}\n}\n",
    )
    .expect("write");
    let out = pexi(
        &[
            "policy",
            "test",
            dir.join("policies").to_str().expect("utf8"),
        ],
        &[],
        &dir,
    );
    assert_eq!(out.status.code(), Some(1));
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("FAIL pexi.broken_test.test_example_is_allowed"),
        "{stdout}"
    );
    assert!(stdout.contains(" passed, 1 failed"), "{stdout}");
    std::fs::remove_dir_all(&dir).expect("cleanup");
}

#[test]
fn policy_eval_prints_the_whole_decision() {
    let dir = support::temp_dir("cli-policy-eval");
    let input = dir.join("input.json");
    std::fs::write(
        &input,
        r#"{"request": {"method": "DELETE", "scheme": "https", "host": "api.example.com", "host_kind": "dns",
            "port": 443, "path": "/v1/x", "query": null, "headers": {}, "body_length": null}}"#,
    )
    .expect("write");
    let config = dir.join("config.toml");
    support::copy_policies(&dir);
    std::fs::write(
        &config,
        format!(
            "{}\n[[pep.policy.allow]]\nhost = \"api.example.com\"\nmethods = [\"GET\"]\n",
            include_str!("../../config.toml")
        ),
    )
    .expect("write");
    let out = pexi(
        &[
            "policy",
            "eval",
            "--config",
            config.to_str().expect("utf8"),
            "--input",
            input.to_str().expect("utf8"),
        ],
        &[],
        &dir,
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let result: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(result["query"], "data.pexi.http.decision");
    assert!(result["revision"]
        .as_str()
        .expect("revision")
        .starts_with("sha256:"));
    assert_eq!(
        result["result"],
        serde_json::json!({"allow": false, "reasons": ["method DELETE not allowed for api.example.com"]})
    );
    std::fs::remove_dir_all(&dir).expect("cleanup");
}

#[test]
fn audit_verify_and_show() {
    use pexi_host::audit::{AuditLog, AuditSettings, Durability};
    let dir = support::temp_dir("cli-audit");
    let path = dir.join("audit.jsonl");
    let log = AuditLog::open(&AuditSettings {
        path: path.clone(),
        durability: Durability::None,
        batch_ms: 1,
        batch_records: 1,
        rotate_bytes: u64::MAX,
    })
    .expect("open");
    for i in 0..5 {
        drop(log.record(
            "decision",
            serde_json::json!({"decision_id": format!("d-{i}"), "request": {"host": format!("h{i}.test")}}),
        ));
    }
    log.close();
    let file = path.to_str().expect("utf8");

    let ok = pexi(&["audit", "verify", file], &[], &dir);
    assert_eq!(ok.status.code(), Some(0), "{}", text(&ok.stdout));
    assert!(
        text(&ok.stdout).starts_with("ok: 6 records in 1 file(s)"),
        "{}",
        text(&ok.stdout)
    );
    assert!(text(&ok.stdout).contains("head: sha256:"));

    let shown = pexi(&["audit", "show", "--decision", "d-3", file], &[], &dir);
    let shown = text(&shown.stdout);
    assert!(
        shown.contains("\"d-3\"") && !shown.contains("\"d-2\""),
        "{shown}"
    );
    let by_host = pexi(
        &[
            "audit", "show", "--host", "h1.test", "--kind", "decision", file,
        ],
        &[],
        &dir,
    );
    assert!(text(&by_host.stdout).contains("\"d-1\""));
    let future = pexi(
        &["audit", "show", "--since", "2100-01-01T00:00:00Z", file],
        &[],
        &dir,
    );
    assert!(text(&future.stdout).is_empty());

    let original = std::fs::read_to_string(&path).expect("read");
    std::fs::write(&path, original.replacen("\"d-2\"", "\"d-9\"", 1)).expect("tamper");
    let broken = pexi(&["audit", "verify", file], &[], &dir);
    assert_eq!(broken.status.code(), Some(1));
    assert!(
        text(&broken.stdout).contains("audit.jsonl:4: altered"),
        "{}",
        text(&broken.stdout)
    );
    std::fs::remove_dir_all(&dir).expect("cleanup");
}
