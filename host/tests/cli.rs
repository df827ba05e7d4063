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

    // A check is a question about the policy: nothing reaches the configured log unless asked.
    assert!(!dir.join("audit.jsonl").exists());
    let logged = pexi(
        &["check", "--audit", "GET", "https://example.com"],
        &[],
        &dir,
    );
    assert_eq!(logged.status.code(), Some(1));
    let again = pexi(
        &["check", "--audit", "POST", "https://api.example.com/v1"],
        &[("PEP_ALLOWED_DOMAINS", "api.example.com")],
        &dir,
    );
    assert_eq!(again.status.code(), Some(0));
    let log = std::fs::read_to_string(dir.join("audit.jsonl")).expect("audit log");
    assert_eq!(
        log.lines()
            .filter(|l| l.contains("\"kind\":\"decision\""))
            .count(),
        2
    );
}

/// `pexi` with a home folder of its own and no PEP_AUDIT_LOG: the embedded default's per-user paths.
fn pexi_at_home(args: &[&str], home: &std::path::Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_pexi"))
        .args(args)
        .env("HOME", home)
        .env_remove("XDG_STATE_HOME")
        .env_remove("XDG_RUNTIME_DIR")
        .env_remove("PEP_AUDIT_LOG")
        .env_remove("PEP_ALLOWED_DOMAINS")
        .env("RUST_LOG", "warn")
        .output()
        .expect("run pexi")
}

#[test]
fn the_default_state_folder_is_per_user_owner_only_and_a_shared_one_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let home = support::temp_dir("cli-home");
    let state = home.join(".local/state/pexi");

    let paths = pexi_at_home(&["paths"], &home);
    let listed = text(&paths.stdout);
    assert!(
        listed.contains(&format!("audit\t{}", state.join("audit.jsonl").display()))
            && listed.contains(&format!("socket\t{}", state.join("run/pep.sock").display())),
        "{listed}"
    );

    // A plain check leaves nothing behind; --audit makes the folder, owner-only, and logs there.
    let checked = pexi_at_home(&["check", "GET", "https://example.com"], &home);
    assert_eq!(checked.status.code(), Some(1), "{}", text(&checked.stderr));
    assert!(!state.exists());
    let logged = pexi_at_home(&["check", "--audit", "GET", "https://example.com"], &home);
    assert_eq!(logged.status.code(), Some(1), "{}", text(&logged.stderr));
    let mode = std::fs::metadata(&state)
        .expect("state folder")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o700);
    assert!(state.join("audit.jsonl").is_file());

    // A folder others may write (planted, or loosened) is refused before anything is written to it.
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    let refused = pexi_at_home(&["check", "--audit", "GET", "https://example.com"], &home);
    assert_eq!(refused.status.code(), Some(2));
    let stderr = text(&refused.stderr);
    assert!(
        stderr.contains(&state.display().to_string()) && stderr.contains("other users"),
        "{stderr}"
    );

    // So is one that is a link to somewhere else.
    std::fs::remove_dir_all(&state).expect("remove");
    let elsewhere = home.join("elsewhere");
    std::fs::create_dir_all(&elsewhere).expect("mkdir");
    std::os::unix::fs::symlink(&elsewhere, &state).expect("symlink");
    let refused = pexi_at_home(&["check", "--audit", "GET", "https://example.com"], &home);
    assert_eq!(refused.status.code(), Some(2));
    assert!(
        text(&refused.stderr).contains("symbolic link"),
        "{}",
        text(&refused.stderr)
    );
    assert_eq!(std::fs::read_dir(&elsewhere).expect("read").count(), 0);
}

#[test]
fn a_bad_config_or_policy_fails_at_start_naming_file_and_line() {
    let dir = support::temp_dir("cli-bad");
    support::copy_policies(&dir);
    let config =
        include_str!("../default-config.toml").replace("max_redirects = 5", "max_redirects = -1");
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

    std::fs::write(
        dir.join("config.toml"),
        include_str!("../default-config.toml"),
    )
    .expect("write");
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
            include_str!("../default-config.toml")
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
        keep_rotated_files: 0,
        keep_rotated_bytes: 0,
        sealing: None,
        force: false,
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

#[test]
fn logs_written_to_a_pipe_or_file_are_plain_text() {
    let dir = support::temp_dir("cli-plain-logs");
    let socket = dir.join("pep.sock");
    let mut child = Command::new(env!("CARGO_BIN_EXE_pexi"))
        .args(["serve", "--listen", &format!("unix:{}", socket.display())])
        .env("PEP_AUDIT_LOG", dir.join("audit.jsonl"))
        .env("RUST_LOG", "info")
        .env_remove("NO_COLOR")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn pexi");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !socket.exists() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // The socket exists from bind(); the "listening" line follows it: give a loaded machine a moment.
    std::thread::sleep(std::time::Duration::from_millis(500));
    // Only our own child, by PID.
    let _ = child.kill();
    let output = child.wait_with_output().expect("wait");
    let stderr = text(&output.stderr);
    assert!(stderr.contains("listening"), "{stderr}");
    assert!(!stderr.contains('\u{1b}'), "escape codes in {stderr:?}");
}

#[test]
fn policy_list_shows_every_entry_with_its_source_the_approvals_file_included() {
    let dir = support::temp_dir("cli-list");
    // PEP_AUDIT_LOG puts the log (and so the approvals file beside it) in `dir`.
    let none = pexi(&["policy", "list"], &[], &dir);
    assert!(none.status.success(), "{}", text(&none.stderr));
    assert_eq!(text(&none.stdout), "no entries: everything is denied\n");
    std::fs::write(
        dir.join("approvals.json"),
        r#"{"allow": [{"host": "new.example", "ports": [443], "schemes": ["https"]}], "deny": [{"host": "bad.example"}]}"#,
    )
    .expect("approvals file");
    let listed = pexi(
        &["policy", "list"],
        &[("PEP_ALLOWED_DOMAINS", "api.example")],
        &dir,
    );
    assert!(listed.status.success(), "{}", text(&listed.stderr));
    let file = dir.join("approvals.json").display().to_string();
    assert_eq!(
        text(&listed.stdout),
        format!(
            "allow  {{\"host\":\"api.example\"}}  (config)\n\
             allow  {{\"host\":\"new.example\",\"ports\":[443],\"schemes\":[\"https\"]}}  ({file})\n\
             deny   {{\"host\":\"bad.example\"}}  ({file})\n"
        )
    );
    // An entry that does not validate fails the listing as it fails a load, naming the file.
    std::fs::write(
        dir.join("approvals.json"),
        r#"{"allow": [{"host": "*.*"}]}"#,
    )
    .expect("approvals file");
    let bad = pexi(&["policy", "list"], &[], &dir);
    assert_eq!(bad.status.code(), Some(2));
    assert!(
        text(&bad.stderr).contains("approvals.json"),
        "{}",
        text(&bad.stderr)
    );
    std::fs::remove_dir_all(&dir).expect("cleanup");
}
