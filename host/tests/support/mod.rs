//! The `pexi serve` process for the host's end-to-end tests; everything else comes from
//! `pexi-test-support`, shared with the guest SDK's tests.
#![allow(dead_code)]

pub use pexi_test_support::*;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub struct TestPep {
    child: Child,
    /// Removed after the process is gone (fields drop after `drop`).
    pub dir: TestDir,
    pub socket: PathBuf,
    pub audit: PathBuf,
    options: PepOptions,
}

/// `pexi serve` on the config in `dir`, as `options` say (a loopback-only namespace, logs to a file).
fn spawn(dir: &std::path::Path, options: &PepOptions) -> Child {
    let config_path = dir.join("config.toml");
    let pexi = env!("CARGO_BIN_EXE_pexi");
    let mut command = if options.isolated_network {
        let mut c = Command::new("unshare");
        c.args([
            "-n",
            "sh",
            "-c",
            "ip link set lo up && exec \"$0\" \"$@\"",
            pexi,
        ]);
        c
    } else {
        Command::new(pexi)
    };
    command
        .args(["serve", "--config"])
        .arg(&config_path)
        .env("RUST_LOG", "warn")
        .env_remove("PEP_ALLOWED_DOMAINS")
        .env_remove("PEP_AUDIT_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(if options.log_to_file {
            Stdio::from(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(dir.join("pep.log"))
                    .expect("pep.log"),
            )
        } else {
            Stdio::inherit()
        });
    for (key, value) in &options.env {
        command.env(key, value);
    }
    command.spawn().expect("spawn pexi")
}

impl TestPep {
    pub fn start(options: PepOptions) -> TestPep {
        TestPep::start_with(options, |_| {})
    }

    /// Like [`TestPep::start`], with a last edit of the config document.
    pub fn start_with(options: PepOptions, edit: impl FnOnce(&mut toml::Table)) -> TestPep {
        let dir = temp_dir("pep");
        let socket = dir.join("pep.sock");
        let audit = dir.join("audit.jsonl");
        let mut doc = test_config(&dir, &socket, &audit, &options);
        edit(&mut doc);
        let config = toml::to_string(&doc).expect("serialise config");
        copy_policies(&dir);
        std::fs::write(dir.join("config.toml"), config).expect("config");
        let child = spawn(&dir, &options);
        let pep = TestPep {
            child,
            dir,
            socket,
            audit,
            options,
        };
        pep.wait_listening();
        pep
    }

    /// Stops the PEP (SIGTERM) and starts it again on the same folder: the same config, audit log and
    /// keys, as a restart of the service would.
    pub fn restart(&mut self) {
        let status = self.terminate();
        assert!(status.success(), "pexi exited with {status}");
        self.child = spawn(&self.dir, &self.options);
        self.wait_listening();
    }

    fn wait_listening(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !self.socket.exists() {
            assert!(Instant::now() < deadline, "pexi did not start listening");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub async fn guest(&self) -> Guest {
        Guest::connect(&self.socket).await
    }

    /// Every audit record so far.
    pub fn audit_records(&self) -> Vec<Value> {
        let text = std::fs::read_to_string(&self.audit).unwrap_or_default();
        // The PEP may be appending right now: a last line without its newline is not written yet.
        let complete = text.rfind('\n').map_or("", |end| &text[..end]);
        complete
            .lines()
            .map(|line| serde_json::from_str(line).expect("audit line is JSON"))
            .collect()
    }

    /// Waits until records of every kind in `kinds` exist for `decision_id` (only decision records are
    /// written before the guest hears back; the rest follow within the batch window), then returns all of
    /// that decision's records.
    pub fn wait_records(&self, decision_id: &str, kinds: &[&str]) -> Vec<Value> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let records = self.records_for(decision_id);
            if kinds
                .iter()
                .all(|k| records.iter().any(|r| r["kind"] == *k))
            {
                return records;
            }
            assert!(
                Instant::now() < deadline,
                "no {kinds:?} records for {decision_id}: {records:?}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The first record matching `wanted`, waiting up to 10 s for it (records nobody waits for are written
    /// after the guest hears back).
    pub fn wait_record(&self, what: &str, wanted: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(record) = self.audit_records().into_iter().find(|r| wanted(r)) {
                return record;
            }
            assert!(Instant::now() < deadline, "no {what} record");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn records_for(&self, decision_id: &str) -> Vec<Value> {
        self.audit_records()
            .into_iter()
            .filter(|r| r["decision_id"] == decision_id)
            .collect()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL: no chance to flush or clean up, as in a crash.
    pub fn kill_now(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success());
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status;
            }
            assert!(Instant::now() < deadline, "pexi did not exit after SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for TestPep {
    fn drop(&mut self) {
        // Only our own child, by PID.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
