//! One PEP, several VMs (docs/fleet.md): each listener tells the PEP which VM its guests are, the policy
//! decides on that identity, and nothing a guest says of itself changes it. Runs alone in a loopback-only
//! network namespace.

mod support;

use support::{loopback_options, Guest, TestPep, Upstream};

fn listener(socket: &std::path::Path, vm: &str, profile: &str) -> toml::Value {
    let mut table = toml::Table::new();
    table.insert("at".into(), format!("unix:{}", socket.display()).into());
    table.insert("vm".into(), vm.into());
    table.insert("profile".into(), profile.into());
    table.into()
}

fn entry(host: &str, port: u16, vms: &[&str]) -> toml::Value {
    let mut table = toml::Table::new();
    table.insert("host".into(), host.into());
    table.insert(
        "ports".into(),
        vec![toml::Value::from(i64::from(port))].into(),
    );
    table.insert(
        "vms".into(),
        vms.iter()
            .map(|v| toml::Value::from(*v))
            .collect::<Vec<_>>()
            .into(),
    );
    table.into()
}

#[tokio::test(flavor = "multi_thread")]
async fn two_vms_on_one_pep_get_the_decisions_of_their_own_identity() {
    if !support::in_isolated_netns("two_vms_on_one_pep_get_the_decisions_of_their_own_identity") {
        return;
    }
    let api = Upstream::http("127.0.0.1").await;
    let port = api.port();
    let options = loopback_options(
        &[
            ("alice.test", "127.0.0.1"),
            ("bob.test", "127.0.0.1"),
            ("both.test", "127.0.0.1"),
        ],
        &[],
    );
    let mut bob_socket = None;
    let pep = TestPep::start_with(options, |doc| {
        let pep = doc["pep"].as_table_mut().expect("[pep]");
        let alice = std::path::PathBuf::from(
            pep["listen"][0]
                .as_str()
                .and_then(|s| s.strip_prefix("unix:"))
                .expect("unix listener"),
        );
        let bob = alice.with_file_name("bob.sock");
        pep.insert(
            "listen".into(),
            vec![
                listener(&alice, "alice", "research"),
                listener(&bob, "bob", "coding"),
            ]
            .into(),
        );
        let policy = pep["policy"].as_table_mut().expect("[pep.policy]");
        policy.insert(
            "allow".into(),
            vec![
                entry("alice.test", port, &["alice"]),
                entry("bob.test", port, &["bob"]),
                entry("both.test", port, &["alice", "bob"]),
            ]
            .into(),
        );
        bob_socket = Some(bob);
    });
    let bob_socket = bob_socket.expect("bob's socket");
    // Each guest claims to be the other one: the HELLO name is the guest's word, the listener the host's.
    let mut alice = Guest::connect_as(&pep.socket, "bob", "1").await;
    let mut bob = Guest::connect_as(&bob_socket, "alice", "1").await;

    let alice_own = alice
        .get(&format!("http://alice.test:{port}/headers?from=a"))
        .await;
    let alice_other = alice
        .get(&format!("http://bob.test:{port}/headers?from=a"))
        .await;
    let bob_own = bob
        .get(&format!("http://bob.test:{port}/headers?from=b"))
        .await;
    let bob_other = bob
        .get(&format!("http://alice.test:{port}/headers?from=b"))
        .await;
    assert_eq!(alice_own.status(), 200, "{alice_own:?}");
    assert_eq!(bob_own.status(), 200, "{bob_own:?}");
    for (who, reply) in [("alice", &alice_other), ("bob", &bob_other)] {
        assert_eq!(reply.error_code(), "policy_denied", "{who}: {reply:?}");
    }
    // An entry for both serves both.
    assert_eq!(
        alice
            .get(&format!("http://both.test:{port}/headers"))
            .await
            .status(),
        200
    );
    assert_eq!(
        bob.get(&format!("http://both.test:{port}/headers"))
            .await
            .status(),
        200
    );
    assert_eq!(
        api.hits().len(),
        4,
        "only the allowed requests reached the upstream"
    );

    // The audit says which VM asked: on the session and on every decision, as the host named it.
    let records = pep.audit_records();
    let vm_of = |host: &str, from: &str| -> Vec<String> {
        records
            .iter()
            .filter(|r| r["kind"] == "decision" && r["request"]["host"] == host)
            .filter(|r| r["request"]["query"] == format!("from={from}").as_str())
            .map(|r| {
                format!(
                    "{}/{}",
                    r["vm"]["name"].as_str().unwrap_or("?"),
                    r["vm"]["profile"].as_str().unwrap_or("?")
                )
            })
            .collect()
    };
    assert_eq!(vm_of("alice.test", "a"), ["alice/research"]);
    assert_eq!(vm_of("bob.test", "a"), ["alice/research"]);
    assert_eq!(vm_of("bob.test", "b"), ["bob/coding"]);
    assert_eq!(vm_of("alice.test", "b"), ["bob/coding"]);
    let sessions: Vec<(String, String)> = records
        .iter()
        .filter(|r| r["kind"] == "session" && r["event"] == "open")
        .map(|r| {
            (
                r["vm"]["name"].as_str().unwrap_or("?").to_string(),
                r["guest"]["name"].as_str().unwrap_or("?").to_string(),
            )
        })
        .collect();
    assert!(
        sessions.contains(&("alice".into(), "bob".into())),
        "{sessions:?}"
    );
    assert!(
        sessions.contains(&("bob".into(), "alice".into())),
        "{sessions:?}"
    );
}

/// `pexi check --vm` decides as for that VM, so a policy author can try entries per VM.
#[test]
fn pexi_check_decides_for_the_vm_it_is_given() {
    let dir = support::temp_dir("fleet-check");
    let config = dir.join("config.toml");
    std::fs::write(
        &config,
        format!(
            "[pep]\nlisten = [\"unix:{}\"]\n[pep.audit]\npath = \"{}\"\n[[pep.policy.allow]]\nhost = \"api.example.com\"\nvms = [\"alice\"]\n",
            dir.join("pep.sock").display(),
            dir.join("audit.jsonl").display()
        ),
    )
    .expect("config");
    support::copy_policies(&dir);
    let check = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_pexi"))
            .arg("check")
            .arg("--config")
            .arg(&config)
            .args(args)
            .args(["GET", "https://api.example.com/"])
            .output()
            .expect("pexi check")
    };
    let alice = check(&["--vm", "alice"]);
    assert_eq!(alice.status.code(), Some(0), "{alice:?}");
    let bob = check(&["--vm", "bob"]);
    assert_eq!(bob.status.code(), Some(1), "{bob:?}");
    let nobody = check(&[]);
    assert_eq!(nobody.status.code(), Some(1), "{nobody:?}");
    let bad = check(&["--vm", "al ice"]);
    assert_eq!(bad.status.code(), Some(2), "{bad:?}");
}
