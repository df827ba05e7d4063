//! The isolation proof, end to end: `pexi vm run` boots the no-NIC guest built by `scripts/vm-image`; inside,
//! the guest shows it has no network and is the expected architecture, then over each channel its runner
//! gives (virtio-serial and vsock under QEMU, vsock alone under vfkit) the static `pexi-fetch` and an
//! unmodified Node script under `--import @pexi/guest/register` get an allowed URL from an HTTPS server on
//! the host's loopback and are refused a denied one with the policy's reason; then pexi-guestd runs in the
//! guest, and the same Node script through its local socket and an unmodified HTTPS client through its
//! proxy (TLS terminated in the guest) do the same; last, the guest tries to write through its read-only
//! share. The host's audit log must hold every decision and outcome and verify, and the host's share must
//! be unchanged.
//!
//! Three ways: the x86_64 guest under QEMU (`scripts/test-vm`), the arm64 guest a Mac boots under
//! `qemu-system-aarch64`, and the arm64 guest from the vfkit command line `pexi vm run` builds for macOS,
//! booted by test-support/vfkit-shim (`scripts/test-vm-arm64`). Ignored by `cargo test`: they need QEMU,
//! vhost-device-vsock (and virtiofsd) and the guest images, which those scripts build.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use pexi_test_support::{loopback_options, repo_root, temp_dir, write_config, TestCa, Upstream};

const GUEST_SCRIPT: &str = r#"#!/bin/sh
# Runs inside the guest. One "CHECK <name> ok" or "CHECK <name> FAIL <detail>" line per check. From the
# test: ENDPOINTS (the channels to try), SHARE_FS (9p or virtiofs), ARCH (what uname -m must say).
failed=0
check() {
    if [ "$1" = 0 ]; then echo "CHECK $2 ok"; else echo "CHECK $2 FAIL $3"; failed=1; fi
}
others=$(ip -o link show | grep -vc ': lo:')
[ "$others" = 0 ]
check $? only-loopback "$(ip -o link show | tr '\n' ' ')"
for addr in $(echo "$HOST_ADDRS" | tr ',' ' '); do
    if nc -w 3 "$addr" "$UPSTREAM_PORT" </dev/null >/dev/null 2>&1; then
        check 1 "no-tcp-to-$addr" "a TCP connection to $addr:$UPSTREAM_PORT succeeded"
    else
        check 0 "no-tcp-to-$addr"
    fi
done
[ "$(uname -m)" = "$ARCH" ]
check $? "arch-$ARCH" "$(uname -m)"
grep -q "^pexishare /share $SHARE_FS " /proc/mounts
check $? "share-$SHARE_FS" "$(grep /share /proc/mounts)"
for endpoint in $(echo "$ENDPOINTS" | tr "," " "); do
    out=$(PEXI_ENDPOINT=$endpoint pexi-fetch "$URL_OK" 2>&1); rc=$?
    [ "$rc" = 0 ] && [ "$out" = hello ]
    check $? "pexi-fetch-allowed-$endpoint" "rc=$rc out=$out"
    err=$(PEXI_ENDPOINT=$endpoint pexi-fetch "$URL_DENIED" 2>&1 >/dev/null); rc=$?
    [ "$rc" = 1 ] && echo "$err" | grep -q "host denied.pexi.test is not in the allowlist"
    check $? "pexi-fetch-denied-$endpoint" "rc=$rc err=$err"
    out=$(cd /share/app && PEXI_ENDPOINT=$endpoint node --import @pexi/guest/register /share/e2e/fetch.mjs "$URL_OK" "$URL_DENIED" 2>&1); rc=$?
    [ "$rc" = 0 ] && [ "$out" = "allowed 200 hello | denied 403 policy_denied host denied.pexi.test is not in the allowlist" ]
    check $? "node-register-$endpoint" "rc=$rc out=$out"
done
mkdir -p /run/pexi
# Transparent mode as the image's init sets it up, plus the upstream's port among the captured ones.
printf 'nameserver 127.0.0.53\n' > /etc/resolv.conf
RUST_LOG=pexi_guestd=debug pexi-guestd --endpoint vsock:2:4041 --listen 127.0.0.1:3128 --ca-cert /run/pexi/ca.pem --socket /run/pexi/pep.sock --deny-connect tunnel \
    --transparent --capture-ports "80,443,$UPSTREAM_PORT" > /tmp/guestd.out 2> /tmp/guestd.err &
for i in $(seq 150); do [ "$(wc -l < /tmp/guestd.out)" -ge 2 ] && break; sleep 0.2; done
# Node's own fetch with no proxy variable and no preload: resolved by the DNS stub, carried in
# transparent mode (pexi-guestd logs the captured connections), refused readably.
out=$(cd /tmp && env -u PEXI_ENDPOINT -u HTTP_PROXY -u HTTPS_PROXY -u http_proxy -u https_proxy NODE_EXTRA_CA_CERTS=/run/pexi/ca.pem node /share/e2e/fetch.mjs "$URL_OK" "$URL_DENIED" 2>&1); rc=$?
[ "$rc" = 0 ] && [ "$out" = "allowed 200 hello | denied 403 policy_denied host denied.pexi.test is not in the allowlist" ] && grep -q "captured connection" /tmp/guestd.err
check $? node-fetch-transparent "rc=$rc out=$out $(cat /tmp/guestd.out /tmp/guestd.err)"
out=$(cd /share/app && env -u PEXI_ENDPOINT node --import @pexi/guest/register /share/e2e/fetch.mjs "$URL_OK" "$URL_DENIED" 2>&1); rc=$?
[ "$rc" = 0 ] && [ "$out" = "allowed 200 hello | denied 403 policy_denied host denied.pexi.test is not in the allowlist" ]
check $? node-register-guestd-socket "rc=$rc out=$out $(cat /tmp/guestd.err)"
out=$(cd /tmp && env -u PEXI_ENDPOINT HTTPS_PROXY=http://127.0.0.1:3128 NODE_EXTRA_CA_CERTS=/run/pexi/ca.pem node /share/e2e/proxy.mjs "$URL_OK" "$URL_DENIED" 2>&1); rc=$?
[ "$rc" = 0 ] && [ "$out" = "allowed 200 hello | denied 403 policy_denied" ]
check $? node-https-via-guest-proxy "rc=$rc out=$out $(cat /tmp/guestd.err)"
# A hostile guest tries to change the host's files through its share; the host checks they did not.
mount -o remount,rw /share 2>/dev/null && echo pwned > /share/guest-was-here 2>/dev/null
echo "share write attempt: $?"
exit $failed
"#;

/// An unmodified HTTPS client with Node's own proxy support (no pexi in it): through pexi-guestd, which
/// terminates TLS with its per-boot CA (trusted via NODE_EXTRA_CA_CERTS) and hands each request to the PEP.
const PROXY_SCRIPT: &str = r#"import https from 'node:https';
const [allowed, denied] = process.argv.slice(2);
const agent = new https.Agent({ proxyEnv: process.env });
const get = (url) =>
  new Promise((resolve, reject) => {
    https
      .get(url, { agent }, (res) => {
        let body = '';
        res.on('data', (chunk) => (body += chunk));
        res.on('end', () => resolve({ status: res.statusCode, body, error: res.headers['x-pexi-error'] }));
      })
      .on('error', reject);
  });
const ok = await get(allowed);
let refused;
try {
  const answer = await get(denied);
  refused = `${answer.status} ${answer.error}`;
} catch (error) {
  refused = `error ${error.message}`;
}
console.log(`allowed ${ok.status} ${ok.body} | denied ${refused}`);
agent.destroy();
"#;

/// An unmodified program: a plain global fetch, nothing of pexi in it. Under the preload a refusal is a
/// 403 whose JSON body carries pexi's code and reasons.
const NODE_SCRIPT: &str = r#"const [allowed, denied] = process.argv.slice(2);
const response = await fetch(allowed);
const text = await response.text();
let refusal;
try {
  const answer = await fetch(denied);
  const body = await answer.json();
  refusal = `${answer.status} ${body.code} ${(body.reasons ?? []).join('; ')}`;
} catch (error) {
  refusal = `error ${error.cause?.code ?? error.message}`;
}
console.log(`allowed ${response.status} ${text} | denied ${refusal}`);
"#;

/// The host's own addresses (not loopback) and QEMU's usual user-network gateway: a guest with a network
/// path could reach one of them; this one must reach none.
fn host_addresses() -> Vec<String> {
    let mut addrs = vec!["10.0.2.2".to_string()];
    if let Ok(out) = Command::new("hostname").arg("-I").output() {
        addrs.extend(
            String::from_utf8_lossy(&out.stdout)
                .split_whitespace()
                .filter(|a| !a.contains(':'))
                .map(str::to_string),
        );
    }
    addrs
}

/// Processes whose command line mentions `needle` (this test's run folder).
fn processes_mentioning(needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        if let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) {
            let text = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            if text.contains(needle) {
                found.push(format!("{}: {text}", entry.file_name().to_string_lossy()));
            }
        }
    }
    found
}

/// One way of booting the guest that the isolation proof runs.
struct Variant {
    /// The image folder (scripts/vm-image's output) and its kernel's file name.
    image: PathBuf,
    kernel: &'static str,
    /// `[vm]` keys beyond the image paths.
    vm: Vec<(&'static str, String)>,
    /// Environment for the guest script.
    env: Vec<(&'static str, String)>,
    /// The checks the guest script must report passing.
    checks: Vec<String>,
    /// How many allowed (and as many denied) decisions the guest's requests make.
    decisions: usize,
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target"))
}

fn set_vm_paths(config: &Path, run_dir: &Path, variant: &Variant) {
    let mut doc: toml::Table = std::fs::read_to_string(config)
        .expect("config")
        .parse()
        .expect("toml");
    let vm = doc
        .get_mut("vm")
        .and_then(toml::Value::as_table_mut)
        .expect("[vm]");
    let image = &variant.image;
    for (key, path) in [
        ("kernel", image.join(variant.kernel)),
        ("initrd", image.join("initramfs.cpio.gz")),
        ("share", image.join("share")),
        ("run_dir", run_dir.to_path_buf()),
    ] {
        vm.insert(key.into(), path.display().to_string().into());
    }
    for (key, value) in &variant.vm {
        vm.insert((*key).into(), value.clone().into());
    }
    std::fs::write(config, toml::to_string(&doc).expect("toml")).expect("write config");
}

/// Boots the guest as `variant` says with a script on its share and an HTTPS server on the host's
/// loopback, then checks the guest's report, the audit log, and that nothing of the run is left.
fn prove(variant: Variant) {
    let image = &variant.image;
    assert!(
        image.join(variant.kernel).is_file() && image.join("share/node/bin/node").is_file(),
        "no guest image in {}: run scripts/vm-image",
        image.display()
    );
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let ca = TestCa::new(&["api.pexi.test"]);
    let upstream = runtime.block_on(Upstream::https("127.0.0.1", &ca));
    let dir = temp_dir("vm");
    let mut options = loopback_options(&[("api.pexi.test", "127.0.0.1")], &["api.pexi.test"]);
    options.extra_ca_pem = Some(ca.ca_pem.clone());
    let config = write_config(&dir, &dir.join("unused.sock"), &options);
    let run_dir = dir.join("run");
    set_vm_paths(&config, &run_dir, &variant);
    let scripts = image.join("share").join("e2e");
    std::fs::create_dir_all(&scripts).expect("mkdir");
    std::fs::write(scripts.join("e2e.sh"), GUEST_SCRIPT).expect("guest script");
    std::fs::write(scripts.join("fetch.mjs"), NODE_SCRIPT).expect("node script");
    std::fs::write(scripts.join("proxy.mjs"), PROXY_SCRIPT).expect("proxy script");
    let planted = image.join("share").join("guest-was-here");
    let _ = std::fs::remove_file(&planted);

    let url_ok = format!("https://api.pexi.test:{}/hello", upstream.port());
    let arch = variant
        .env
        .iter()
        .find(|(name, _)| *name == "ARCH")
        .map_or("guest", |(_, arch)| arch.as_str());
    let vm_name = format!("proof-{arch}");
    let url_denied = "https://denied.pexi.test/exfiltrate?secret=1".to_string();
    let started = Instant::now();
    let mut command = Command::new(env!("CARGO_BIN_EXE_pexi"));
    command
        .args(["vm", "run", "--config"])
        .arg(&config)
        // The 3-minute budget is enforced by the run itself: past it, pexi vm run stops the VM and fails.
        .args(["--timeout", "170"])
        // The host names the VM; every session and decision must say so (docs/fleet.md).
        .args(["--name", &vm_name])
        .arg(format!("--env=URL_OK={url_ok}"))
        .arg(format!("--env=URL_DENIED={url_denied}"))
        .arg(format!("--env=UPSTREAM_PORT={}", upstream.port()))
        .arg(format!("--env=HOST_ADDRS={}", host_addresses().join(",")));
    for (name, value) in &variant.env {
        command.arg(format!("--env={name}={value}"));
    }
    let output = command
        .args(["--", "sh /share/e2e/e2e.sh"])
        .output()
        .expect("pexi vm run");
    let took = started.elapsed();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let console = std::fs::read_to_string(run_dir.join("console.log")).unwrap_or_default();
    let context = format!("stdout:\n{stdout}\nstderr:\n{stderr}\nconsole:\n{console}");
    println!("the VM ran for {took:?}\n{stdout}{stderr}");

    let checks: Vec<&str> = stdout.lines().filter(|l| l.starts_with("CHECK ")).collect();
    let failed: Vec<&&str> = checks.iter().filter(|l| !l.ends_with(" ok")).collect();
    assert!(
        failed.is_empty(),
        "guest checks failed: {failed:#?}\n{context}"
    );
    for name in &variant.checks {
        assert!(
            checks.contains(&format!("CHECK {name} ok").as_str()),
            "no passing check {name}\n{context}"
        );
    }
    assert_eq!(output.status.code(), Some(0), "{context}");
    // Whatever the guest did to its share (remounting it read-write, writing), the host's folder is
    // untouched.
    assert!(
        !planted.exists(),
        "the guest wrote into the host's share: {}",
        planted.display()
    );

    // The host side: every request decided and recorded, and the log intact.
    let audit = dir.join("audit.jsonl");
    let records: Vec<serde_json::Value> = std::fs::read_to_string(&audit)
        .expect("audit log")
        .lines()
        .map(|line| serde_json::from_str(line).expect("json"))
        .collect();
    let decisions = |url: &str, allow: bool| -> Vec<&serde_json::Value> {
        records
            .iter()
            .filter(|r| {
                r["kind"] == "decision"
                    && r["request"]["url"]
                        .as_str()
                        .is_some_and(|u| u.starts_with(url))
                    && r["decision"]["allow"] == allow
            })
            .collect()
    };
    let allowed = decisions(&url_ok, true);
    assert_eq!(
        allowed.len(),
        variant.decisions,
        "one allowed request per client and channel\n{context}"
    );
    for decision in &allowed {
        let outcome = records
            .iter()
            .find(|r| r["kind"] == "outcome" && r["decision_id"] == decision["decision_id"])
            .expect("an outcome for every allowed request");
        assert_eq!(outcome["status"], 200);
    }
    let denied = decisions("https://denied.pexi.test/exfiltrate", false);
    assert_eq!(denied.len(), variant.decisions, "{context}");
    for decision in &denied {
        assert_eq!(
            decision["decision"]["reasons"][0],
            "host denied.pexi.test is not in the allowlist"
        );
        // The refusal was reported after its record: an outcome names the refused decision too.
        assert!(records
            .iter()
            .any(|r| r["kind"] == "outcome" && r["decision_id"] == decision["decision_id"]));
    }
    assert!(
        !std::fs::read_to_string(&audit)
            .expect("log")
            .contains("secret=1"),
        "query values are redacted"
    );
    let guests: std::collections::BTreeSet<String> = records
        .iter()
        .filter(|r| r["kind"] == "session" && r["event"] == "open")
        .map(|r| r["guest"]["name"].as_str().unwrap_or("").to_string())
        .collect();
    assert!(guests.contains("pexi-guest"), "{guests:?}");
    // Whatever each guest program called itself, the host's name for the VM is on every session and
    // every decision.
    for record in records
        .iter()
        .filter(|r| r["kind"] == "decision" || (r["kind"] == "session" && r["event"] == "open"))
    {
        assert_eq!(record["vm"]["name"], vm_name.as_str(), "{record}");
    }
    let verify = Command::new(env!("CARGO_BIN_EXE_pexi"))
        .args(["audit", "verify"])
        .arg(&audit)
        .output()
        .expect("audit verify");
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stdout)
    );

    // Nothing the run started is left behind: processes, and (vfkit) the per-run share copies.
    let leftovers = processes_mentioning(&run_dir.display().to_string());
    assert!(leftovers.is_empty(), "still running: {leftovers:#?}");
    assert!(
        !run_dir.join("shares").exists(),
        "the per-run share copies were not removed"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// The proof for one guest: the static Rust client and an unmodified Node script under the @pexi/guest
/// preload over each of `endpoints`, then pexi-guestd's socket, an unmodified Node HTTPS client through
/// its proxy, and Node's own fetch with no proxy setting through its transparent mode; the share must be
/// mounted over `fs`.
fn variant(
    arm64: bool,
    mut vm: Vec<(&'static str, String)>,
    endpoints: &[&str],
    fs: &str,
) -> Variant {
    let arch = if arm64 { "aarch64" } else { "x86_64" };
    let mut checks = vec![
        "only-loopback".to_string(),
        "no-tcp-to-10.0.2.2".to_string(),
        format!("arch-{arch}"),
        format!("share-{fs}"),
        "node-register-guestd-socket".to_string(),
        "node-https-via-guest-proxy".to_string(),
        "node-fetch-transparent".to_string(),
    ];
    for endpoint in endpoints {
        for check in ["pexi-fetch-allowed", "pexi-fetch-denied", "node-register"] {
            checks.push(format!("{check}-{endpoint}"));
        }
    }
    vm.push(("arch", arch.into()));
    vm.push((
        "qemu",
        if arm64 {
            "qemu-system-aarch64"
        } else {
            "qemu-system-x86_64"
        }
        .into(),
    ));
    Variant {
        image: target_dir().join(if arm64 { "vm-arm64" } else { "vm" }),
        kernel: if arm64 { "Image" } else { "vmlinux" },
        vm,
        env: vec![
            ("ENDPOINTS", endpoints.join(",")),
            ("SHARE_FS", fs.into()),
            ("ARCH", arch.into()),
        ],
        checks,
        // pexi-fetch and Node per channel, Node through pexi-guestd's socket, its proxy and its
        // transparent mode.
        decisions: 2 * endpoints.len() + 3,
    }
}

#[test]
#[ignore = "boots a VM: needs QEMU, vhost-device-vsock and the scripts/vm-image image; scripts/test-vm runs it"]
fn the_guest_reaches_the_world_only_through_the_pep() {
    prove(variant(
        false,
        vec![("runner", "qemu".into())],
        &["virtio:org.pexi.pep.0", "vsock:2:4041"],
        "9p",
    ));
}

#[test]
#[ignore = "boots an arm64 VM under emulation: needs qemu-system-aarch64 and scripts/vm-image --arch arm64; scripts/test-vm-arm64 runs it"]
fn the_arm64_guest_reaches_the_world_only_through_the_pep() {
    prove(variant(
        true,
        vec![("runner", "qemu".into())],
        &["virtio:org.pexi.pep.0", "vsock:2:4041"],
        "9p",
    ));
}

/// The macOS path: `pexi vm run` builds vfkit's command line, and test-support/vfkit-shim boots it with
/// QEMU (virtio console, vsock to the socket vfkit would serve, virtio-fs through virtiofsd).
#[test]
#[ignore = "boots an arm64 VM through the vfkit shim: needs qemu-system-aarch64, virtiofsd and scripts/vm-image --arch arm64; scripts/test-vm-arm64 runs it"]
fn the_arm64_guest_through_vfkit_reaches_the_world_only_through_the_pep() {
    prove(variant(
        true,
        vec![
            ("runner", "vfkit".into()),
            (
                "vfkit",
                repo_root()
                    .join("test-support")
                    .join("vfkit-shim")
                    .display()
                    .to_string(),
            ),
        ],
        &["vsock:2:4041"],
        "virtiofs",
    ));
}
