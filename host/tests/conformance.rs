//! Host conformance: runs every scenario of `protocol/conformance/host/` against a live `pexi serve`, each on
//! a fresh connection. The scenarios are data (protocol/conformance/README.md); the runner
//! (`pexi_test_support::conformance::host`) only sends the frames they state and checks what comes back.

mod support;

use pexi_test_support::conformance::{self, host::HostControl, Vars};
use serde_json::Value;
use support::{loopback_options, TestPep, Upstream};

/// `signal` steps go to the PEP the scenario runs against.
struct Signals<'a>(&'a TestPep);

impl HostControl for Signals<'_> {
    fn signal(&mut self, name: &str) -> Result<(), String> {
        let status = std::process::Command::new("kill")
            .args([
                format!("-{}", name.trim_start_matches("SIG")),
                self.0.pid().to_string(),
            ])
            .status()
            .map_err(|e| format!("kill: {e}"))?;
        status
            .success()
            .then_some(())
            .ok_or_else(|| format!("kill -{name} failed"))
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_host_passes_every_conformance_scenario() {
    // In a network namespace of its own with only loopback: the upstream, the PEP and the runner live there,
    // and nothing a scenario asks for can leave the machine.
    if !support::in_isolated_netns("the_host_passes_every_conformance_scenario") {
        return;
    }
    let dir = support::repo_root().join("protocol/conformance/host");
    let files = conformance::scenario_files(&dir).expect("scenarios");
    assert!(files.len() >= 41, "{} scenarios", files.len());
    let upstream = Upstream::http("127.0.0.1").await;
    // `allowed.example` resolves to loopback: requests to it are allowed; on port 80 nothing listens.
    // `blocked.example` is allowed by name and resolves only to a link-local address, which the address
    // guard refuses. `unresolvable.example` is allowed and resolves nowhere: the namespace has no DNS server.
    let mut options = loopback_options(
        &[
            ("allowed.example", "127.0.0.1"),
            ("blocked.example", "169.254.169.254"),
        ],
        &["allowed.example", "blocked.example", "unresolvable.example"],
    );
    // Small limits, so that scenarios reach them with a few frames.
    options.limits = vec![
        ("max_concurrent_streams", 4),
        ("max_request_bytes", 1 << 20),
        ("max_response_bytes", 1 << 20),
    ];
    let mut vars = Vars::new();
    vars.insert(
        "upstream".into(),
        Value::from(format!("http://allowed.example:{}", upstream.port())),
    );
    // The same plain-HTTP server addressed with https: its answer to a ClientHello is no TLS.
    vars.insert(
        "upstream_tls".into(),
        Value::from(format!("https://allowed.example:{}", upstream.port())),
    );
    let shared = TestPep::start(options.clone());
    let mut failures = Vec::new();
    for file in &files {
        let scenario = conformance::load(file).unwrap_or_else(|e| panic!("{e}"));
        let name = file
            .file_stem()
            .expect("name")
            .to_string_lossy()
            .into_owned();
        // A scenario that stops the host gets one of its own.
        let own = (scenario["own_host"] == true).then(|| TestPep::start(options.clone()));
        let pep = own.as_ref().unwrap_or(&shared);
        let outcome =
            conformance::host::run(&pep.socket, &scenario, &vars, &mut Signals(pep)).await;
        if let Err(why) = outcome {
            failures.push(format!("{name} ({}): {why}", scenario["covers"]));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} scenarios failed:\n{}",
        failures.len(),
        files.len(),
        failures.join("\n")
    );
}
