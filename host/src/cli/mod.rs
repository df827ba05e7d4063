//! The `pexi` command line.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use pexi_protocol::payload::{HttpRequest, Implementation};

mod bundle;
mod people;

use crate::config::{Config, Listen, Listener};
use crate::pipeline::{Caller, Pipeline};

#[derive(Parser)]
#[command(name = "pexi", version, about = "pexi host Policy Enforcement Point")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the pexi protocol to guests until SIGINT or SIGTERM.
    Serve {
        /// Configuration file (default: the embedded host/default-config.toml).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Listen here instead of the configured listeners (repeatable): unix:PATH, connect:PATH, vsock:PORT.
        #[arg(long = "listen")]
        listen: Vec<Listen>,
        /// When the audit log does not verify (an edited or truncated file), move it and its checkpoints
        /// aside into `broken-<time>/` and start a new chain that names them, instead of refusing to start.
        #[arg(long)]
        force: bool,
    },
    /// Decide a request with the configured policy, as pep.policy.check does: no DNS, no network.
    /// Exit status 0 on allow, 1 on deny, 2 on error.
    Check {
        #[arg(long)]
        config: Option<PathBuf>,
        /// Also append the decision to the configured audit log (by default a check leaves no record: it
        /// is a question about the policy, not a request).
        #[arg(long)]
        audit: bool,
        /// Decide as for the VM of this name (`input.vm.name`; entries with `vms`).
        #[arg(long, value_parser = parse_vm_name)]
        vm: Option<String>,
        /// ... and of this profile (`input.vm.profile`).
        #[arg(long, value_parser = parse_vm_name, requires = "vm")]
        profile: Option<String>,
        /// HTTP method, e.g. GET.
        method: String,
        /// Absolute http(s) URL.
        url: String,
    },
    /// Print where the configured PEP listens and logs, after `{state_dir}` / `{runtime_dir}` are filled
    /// in: `pexi paths socket` prints the first Unix socket alone (for PEXI_ENDPOINT=unix:...).
    Paths {
        #[arg(long)]
        config: Option<PathBuf>,
        /// One of socket, audit, checkpoints, public_key, control (the control socket), approvals (the
        /// approvals file), state_dir, runtime_dir; all of them when left out.
        which: Option<String>,
    },
    /// Answer the questions a running PEP holds for a person (docs/approvals.md), one key per answer:
    /// a allow once, A allow always, p allow always for this method under the request's folder, d deny
    /// once, D deny always, P deny always for the path, n next question, q quit.
    Approve {
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Print the address of the running PEP's dashboard, with this start's token.
    Ui {
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Work with policy bundles.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// Check and read audit logs.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Run guests whose only way out is this PEP.
    Vm {
        #[command(subcommand)]
        command: VmCommand,
    },
}

#[derive(Subcommand)]
enum VmCommand {
    /// Boot the guest of `[vm]` with no network device, its only way out a virtio-serial port and vsock to
    /// a PEP this command runs with the `[pep]` tables; run COMMAND in it (a shell command line), print its
    /// output, stop everything. Exit status: the guest command's; 125 when the VM could not run.
    Run {
        #[arg(long)]
        config: Option<PathBuf>,
        /// auto (KVM if it boots the guest, else software emulation), kvm or tcg.
        #[arg(long)]
        accel: Option<crate::config::Accel>,
        /// Guest memory in MiB.
        #[arg(long)]
        memory: Option<u32>,
        /// Virtual CPUs (more than one runs multi-threaded TCG under software emulation).
        #[arg(long)]
        cpus: Option<u32>,
        /// Uncompressed kernel (ELF vmlinux) to boot.
        #[arg(long)]
        kernel: Option<PathBuf>,
        /// Initramfs to boot with.
        #[arg(long)]
        initrd: Option<PathBuf>,
        /// Host folder mounted read-only at /share in the guest.
        #[arg(long)]
        share: Option<PathBuf>,
        /// Mount the share writable.
        #[arg(long)]
        share_writable: bool,
        /// Run without vsock (virtio-serial only).
        #[arg(long)]
        no_vsock: bool,
        /// Where the VM's console goes (default: <run_dir>/console.log).
        #[arg(long)]
        console_log: Option<PathBuf>,
        /// NAME=VALUE for the guest command's environment (repeatable).
        #[arg(long = "env", value_parser = parse_env)]
        env: Vec<(String, String)>,
        /// Stop the VM after this many seconds.
        #[arg(long)]
        timeout: Option<u64>,
        /// A ready-made guest, built in (`openclaw`: pexi-guestd started first, OpenClaw mounted at
        /// /opt/openclaw, one agent turn unless COMMAND is given; docs/openclaw.md) or a profile file
        /// (NAME.toml, the keys of vm/profiles/openclaw.toml). `[vm.profiles.NAME]` overrides its folder,
        /// memory, vCPUs and command.
        #[arg(long, value_parser = parse_profile)]
        profile: Option<Box<pexi_vm::Profile>>,
        /// The profile's config file for the guest, read-only (for `openclaw`: OpenClaw's JSON5 config at
        /// /run/openclaw/openclaw.json).
        #[arg(long, alias = "openclaw-config")]
        profile_config: Option<PathBuf>,
        /// A host folder the guest may write, mounted at /out (to hand files back).
        #[arg(long)]
        output: Option<PathBuf>,
        /// This VM's name for the policy (`input.vm.name`, with `input.vm.profile` the profile's name),
        /// the audit records and the metrics; allow and deny entries with `vms` apply to the VMs they
        /// name (docs/fleet.md). Set here, by the host: nothing in the guest can change it.
        #[arg(long, value_parser = parse_vm_name)]
        name: Option<String>,
        /// The guest command (default: `[vm] command`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        command: Vec<String>,
    },
}

fn parse_profile(spec: &str) -> Result<Box<pexi_vm::Profile>, String> {
    pexi_vm::Profile::load(spec).map(Box::new)
}

fn parse_vm_name(name: &str) -> Result<String, String> {
    crate::policy::entries::vm_label("--name", name).map(|()| name.to_string())
}

fn parse_env(text: &str) -> Result<(String, String), String> {
    let (name, value) = text
        .split_once('=')
        .ok_or_else(|| format!("{text:?} is not NAME=VALUE"))?;
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err(format!("{name:?} is not a variable name"));
    }
    if value.contains(char::is_whitespace) {
        return Err(format!(
            "the value of {name} contains whitespace, which the guest's init cannot pass"
        ));
    }
    Ok((name.to_string(), value.to_string()))
}

/// One shell command line from COMMAND's words: a single word is taken as a command line as it is.
fn shell_command(words: &[String]) -> Option<String> {
    match words {
        [] => None,
        [line] => Some(line.clone()),
        words => Some(
            words
                .iter()
                .map(|w| format!("'{}'", w.replace('\'', "'\\''")))
                .collect::<Vec<_>>()
                .join(" "),
        ),
    }
}

fn vm(command: VmCommand) -> ExitCode {
    let VmCommand::Run {
        config,
        accel,
        memory,
        cpus,
        kernel,
        initrd,
        share,
        share_writable,
        no_vsock,
        console_log,
        env,
        timeout,
        profile,
        profile_config,
        output,
        name,
        command,
    } = command;
    let config = match Config::load(config.as_deref()) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("pexi: {err}");
            return ExitCode::from(125);
        }
    };
    let identity = crate::config::VmIdentity {
        name: name.unwrap_or_default(),
        profile: profile
            .as_ref()
            .map(|profile| profile.name.clone())
            .unwrap_or_default(),
    };
    let options = pexi_vm::RunOptions {
        command: shell_command(&command),
        env,
        accel,
        memory_mb: memory,
        cpus,
        kernel,
        initrd,
        share,
        share_writable,
        no_vsock,
        console_log,
        timeout: timeout.map(std::time::Duration::from_secs),
        echo: true,
        profile: profile.map(|profile| *profile),
        profile_config,
        output,
    };
    let runtime = match runtime(tokio::runtime::Builder::new_multi_thread()) {
        Ok(runtime) => runtime,
        Err(_) => return ExitCode::from(125),
    };
    match runtime.block_on(crate::vm::run(config, options, identity)) {
        Ok(status) => ExitCode::from(u8::try_from(status).unwrap_or(125)),
        Err(err) => {
            eprintln!("pexi vm: {err}");
            ExitCode::from(125)
        }
    }
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Check that FILEs (a log and its rotated files, any order) form one unbroken hash chain: JSON, format
    /// version, consecutive seq, each prev matching the previous line. Reports the first broken record with
    /// its line. Exit status 0 when intact (a torn last line from a crash is reported, not a failure), 1
    /// when broken, 2 on error.
    Verify {
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// The PEP's public key (`audit-signing.pub`): every record's signature is checked. Default:
        /// `keys/audit-signing.pub` beside the files, when it is there.
        #[arg(long)]
        public_key: Option<PathBuf>,
        /// The checkpoint file: the log must still hold what the latest checkpoint covered. Default:
        /// `checkpoints/<name>.checkpoints` beside the files, when it is there.
        #[arg(long)]
        checkpoints: Option<PathBuf>,
    },
    /// Print records of FILEs (oldest first) as indented JSON, filtered.
    Show {
        files: Vec<PathBuf>,
        /// Only this record kind (decision, outcome, resolve, session, policy, ...).
        #[arg(long)]
        kind: Option<String>,
        /// Only records of this decision id.
        #[arg(long)]
        decision: Option<String>,
        /// Only records about this host.
        #[arg(long)]
        host: Option<String>,
        /// Only records at or after this time (RFC 3339, e.g. 2026-11-28T19:00:00Z).
        #[arg(long)]
        since: Option<String>,
        /// Only records before this time (RFC 3339).
        #[arg(long)]
        until: Option<String>,
    },
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Run every test_* rule of the *_test.rego files under DIR (OPA's `opa test` layout) with the data in
    /// DIR/data/*.json. Exit status 0 when all pass, 1 when any fails, 2 when the bundle does not load.
    Test {
        #[arg(default_value = "policies")]
        dir: PathBuf,
    },
    /// List every allow and deny entry in force (config, data files, the approvals file) with its source.
    List {
        #[arg(long)]
        config: Option<PathBuf>,
        /// One JSON document instead of lines.
        #[arg(long)]
        json: bool,
    },
    /// Evaluate the configured query for the input document in FILE and print the whole result.
    Eval {
        #[arg(long)]
        config: Option<PathBuf>,
        /// A JSON input document (see docs/policy.md); `-` reads standard input.
        #[arg(long)]
        input: PathBuf,
        /// INPUT holds one input document per line; one result per line is printed (compact JSON):
        /// for a corpus, or to compare with another engine (scripts/test-opa).
        #[arg(long)]
        jsonl: bool,
    },
    /// OPA-format bundles for a bundle server (docs/fleet.md): build, sign, verify.
    Bundle {
        #[command(subcommand)]
        command: bundle::BundleCommand,
    },
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    // `vm run` prints the guest's output on the same terminal: only the PEP's warnings join it.
    let default_level = if matches!(cli.command, Command::Vm { .. }) {
        "warn"
    } else {
        "info"
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level)),
        )
        .with_writer(std::io::stderr)
        // Colour only for a person at a terminal: a log file or a pipe gets plain text.
        .with_ansi(
            std::io::IsTerminal::is_terminal(&std::io::stderr())
                && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty()),
        )
        .init();
    match cli.command {
        Command::Serve {
            config,
            listen,
            force,
        } => serve(config, listen, force),
        Command::Vm { command } => vm(command),
        Command::Check {
            config,
            audit,
            vm,
            profile,
            method,
            url,
        } => check(
            config,
            audit,
            crate::config::VmIdentity {
                name: vm.unwrap_or_default(),
                profile: profile.unwrap_or_default(),
            },
            method,
            url,
        ),
        Command::Paths { config, which } => paths(config, which),
        Command::Approve { config } => people::approve(config),
        Command::Ui { config } => people::ui(config),
        Command::Policy {
            command: PolicyCommand::List { config, json },
        } => people::policy_list(config, json),
        Command::Policy {
            command: PolicyCommand::Test { dir },
        } => policy_test(&dir),
        Command::Policy {
            command:
                PolicyCommand::Eval {
                    config,
                    input,
                    jsonl,
                },
        } => policy_eval(config, &input, jsonl),
        Command::Policy {
            command: PolicyCommand::Bundle { command },
        } => bundle::run(command),
        Command::Audit {
            command:
                AuditCommand::Verify {
                    files,
                    public_key,
                    checkpoints,
                },
        } => audit_verify(&files, public_key, checkpoints),
        Command::Audit {
            command:
                AuditCommand::Show {
                    files,
                    kind,
                    decision,
                    host,
                    since,
                    until,
                },
        } => audit_show(&files, kind, decision, host, since, until),
    }
}

fn paths(config: Option<PathBuf>, which: Option<String>) -> ExitCode {
    let config = match Config::load(config.as_deref()) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("pexi: {err}");
            return ExitCode::from(2);
        }
    };
    let socket = config
        .pep
        .listen
        .iter()
        .find_map(|listen| match &listen.at {
            Listen::Unix(path) => Some(path.display().to_string()),
            _ => None,
        });
    let dirs = crate::dirs::UserDirs::from_env().ok();
    let shown = |dir: Option<&PathBuf>| dir.map(|d| d.display().to_string());
    let all = [
        ("socket", socket),
        ("audit", Some(config.pep.audit.path.display().to_string())),
        (
            "checkpoints",
            Some(config.pep.audit.checkpoint_path().display().to_string()),
        ),
        (
            "public_key",
            Some(
                config
                    .pep
                    .audit
                    .keys_dir()
                    .join(crate::audit::seal::PUBLIC_KEY_FILE)
                    .display()
                    .to_string(),
            ),
        ),
        (
            "control",
            Some(
                config
                    .pep
                    .control
                    .socket_path(&config.pep.audit)
                    .display()
                    .to_string(),
            ),
        ),
        (
            "approvals",
            Some(
                config
                    .pep
                    .approvals
                    .file_path(&config.pep.audit)
                    .display()
                    .to_string(),
            ),
        ),
        ("state_dir", shown(dirs.as_ref().map(|d| &d.state))),
        ("runtime_dir", shown(dirs.as_ref().map(|d| &d.runtime))),
    ];
    match which {
        None => {
            for (name, value) in &all {
                println!("{name}\t{}", value.as_deref().unwrap_or("-"));
            }
            ExitCode::SUCCESS
        }
        Some(which) => match all.iter().find(|(name, _)| *name == which) {
            Some((_, Some(value))) => {
                println!("{value}");
                ExitCode::SUCCESS
            }
            Some((name, None)) => {
                eprintln!("pexi: the config has no {name}");
                ExitCode::from(1)
            }
            None => {
                eprintln!(
                    "pexi: {which:?} is not one of socket, audit, checkpoints, public_key, state_dir, runtime_dir"
                );
                ExitCode::from(2)
            }
        },
    }
}

/// The log's active path for a set of its files: a rotated name `<path>.NNNNNN` without its suffix.
fn active_log_path(files: &[PathBuf]) -> Option<PathBuf> {
    let file = files.last()?;
    let name = file.file_name()?.to_string_lossy().into_owned();
    let active = match name.rsplit_once('.') {
        Some((stem, n)) if n.len() == 6 && n.bytes().all(|b| b.is_ascii_digit()) => {
            stem.to_string()
        }
        _ => name,
    };
    Some(file.with_file_name(active))
}

fn audit_verify(
    files: &[PathBuf],
    public_key: Option<PathBuf>,
    checkpoints: Option<PathBuf>,
) -> ExitCode {
    use crate::audit::seal;
    let active = active_log_path(files);
    let public_key = public_key.or_else(|| {
        active
            .as_deref()
            .map(|a| seal::default_keys_dir(a).join(seal::PUBLIC_KEY_FILE))
            .filter(|p| p.exists())
    });
    let checkpoints = checkpoints.or_else(|| {
        active
            .as_deref()
            .map(seal::default_checkpoint_path)
            .filter(|p| p.exists())
    });
    let key = match public_key.as_deref().map(seal::read_public_key).transpose() {
        Ok(key) => key,
        Err(err) => {
            eprintln!("pexi: {err}");
            return ExitCode::from(2);
        }
    };
    let options = crate::audit::verify::Options {
        public_key: key,
        checkpoints: checkpoints.clone(),
    };
    match crate::audit::verify::verify_with(files, &options) {
        Ok(report) => {
            println!(
                "ok: {} records in {} file(s) form one chain",
                report.records,
                report.files.len()
            );
            match &public_key {
                Some(path) => println!(
                    "signatures: {} records signed by the key in {} ({} signed themselves, {} by the last \
                     record of their write group){}",
                    report.signed + report.covered,
                    path.display(),
                    report.signed,
                    report.covered,
                    if report.unsigned_prefix > 0 {
                        format!(
                            "; the first {} were written before signing was on",
                            report.unsigned_prefix
                        )
                    } else {
                        String::new()
                    }
                ),
                None => println!(
                    "note: no public key (--public-key): signatures not checked, so a rewritten and \
                     re-chained log would pass"
                ),
            }
            match (&report.checkpoints, &checkpoints) {
                (Some(c), Some(path)) => println!(
                    "checkpoints: {} in {}, the latest of {} covering up to seq {}; {} record(s) after it \
                     (removing those from the end could not be detected)",
                    c.count,
                    path.display(),
                    c.last_ts,
                    c.last_seq.map_or("-".to_string(), |s| s.to_string()),
                    c.uncovered
                ),
                _ => println!(
                    "note: no checkpoints (--checkpoints): records or files removed from the end cannot be \
                     detected"
                ),
            }
            if report.starts_mid_chain {
                println!(
                    "note: the chain starts before the first file given (earlier files missing)"
                );
            }
            if let Some((file, line)) = &report.torn_end {
                println!(
                    "warning: {}:{line} is a torn final record (a write interrupted by a crash); every record before it verifies",
                    file.display()
                );
            }
            if report.unauthenticated > 0 {
                println!(
                    "warning: {} record(s) just before a torn line are not authenticated: the crash cut the \
                     write whose last line would have signed them (a decision among them never took effect: \
                     effects wait for their group's write)",
                    report.unauthenticated
                );
            }
            if let Some(head) = &report.head {
                println!(
                    "head: {head} (record it elsewhere to detect removal of records from the end)"
                );
            }
            ExitCode::SUCCESS
        }
        Err(broken) if broken.is_read_error() => {
            eprintln!("pexi: {broken}");
            ExitCode::from(2)
        }
        Err(broken) => {
            println!("BROKEN {broken}");
            ExitCode::from(1)
        }
    }
}

fn audit_show(
    files: &[PathBuf],
    kind: Option<String>,
    decision: Option<String>,
    host: Option<String>,
    since: Option<String>,
    until: Option<String>,
) -> ExitCode {
    let parse_time = |text: &Option<String>| -> Result<Option<std::time::SystemTime>, String> {
        text.as_deref()
            .map(|t| humantime::parse_rfc3339_weak(t).map_err(|err| format!("{t}: {err}")))
            .transpose()
    };
    let (since, until) = match (parse_time(&since), parse_time(&until)) {
        (Ok(since), Ok(until)) => (since, until),
        (Err(err), _) | (_, Err(err)) => {
            eprintln!("pexi: {err}");
            return ExitCode::from(2);
        }
    };
    let mut records: Vec<serde_json::Value> = Vec::new();
    for file in files {
        let text = match std::fs::read_to_string(file) {
            Ok(text) => text,
            Err(err) => {
                eprintln!("pexi: {}: {err}", file.display());
                return ExitCode::from(2);
            }
        };
        records.extend(text.lines().filter_map(|l| serde_json::from_str(l).ok()));
    }
    records.sort_by_key(|r| r["seq"].as_u64().unwrap_or(u64::MAX));
    let mut out = std::io::stdout().lock();
    for record in records {
        let matches = kind.as_deref().is_none_or(|k| record["kind"] == k)
            && decision
                .as_deref()
                .is_none_or(|d| record["decision_id"] == d)
            && host
                .as_deref()
                .is_none_or(|h| record["request"]["host"] == h || record["host"] == h)
            && record["ts"]
                .as_str()
                .and_then(|ts| humantime::parse_rfc3339_weak(ts).ok())
                .is_none_or(|ts| since.is_none_or(|s| ts >= s) && until.is_none_or(|u| ts < u));
        if matches {
            let text = serde_json::to_string_pretty(&record).unwrap_or_default();
            if writeln!(out, "{text}").is_err() {
                break;
            }
        }
    }
    ExitCode::SUCCESS
}

fn policy_test(dir: &std::path::Path) -> ExitCode {
    use crate::policy::{compile, run_tests, Bundle, PolicyRoot};
    let outcomes = Bundle::load(&PolicyRoot::Dir(dir.to_path_buf()), &[], &[])
        .and_then(|bundle| run_tests(&compile(&bundle, 10_000)?, &bundle.tests));
    let outcomes = match outcomes {
        Ok(outcomes) => outcomes,
        Err(err) => {
            eprintln!("pexi: {err}");
            return ExitCode::from(2);
        }
    };
    let failed = outcomes.iter().filter(|t| !t.passed).count();
    // writeln!, not println!: a closed pipe (`| head`) ends the listing instead of panicking.
    let mut out = std::io::stdout().lock();
    for test in &outcomes {
        let written = match (&test.passed, &test.detail) {
            (true, _) => writeln!(out, "PASS {}", test.name),
            (false, detail) => writeln!(
                out,
                "FAIL {}: {}",
                test.name,
                detail.as_deref().unwrap_or("")
            ),
        };
        if written.is_err() {
            break;
        }
    }
    let _ = writeln!(
        out,
        "policy: {} passed, {failed} failed",
        outcomes.len() - failed
    );
    if outcomes.is_empty() {
        eprintln!("pexi: no test_* rules found under {}", dir.display());
        return ExitCode::from(1);
    }
    ExitCode::from(if failed == 0 { 0 } else { 1 })
}

fn policy_eval(config: Option<PathBuf>, input: &std::path::Path, jsonl: bool) -> ExitCode {
    let text = if input == std::path::Path::new("-") {
        let mut text = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut text).map(|_| text)
    } else {
        std::fs::read_to_string(input)
    };
    let documents: Vec<serde_json::Value> =
        match text.map_err(|err| err.to_string()).and_then(|t| {
            if jsonl {
                t.lines()
                    .filter(|line| !line.trim().is_empty())
                    .enumerate()
                    .map(|(n, line)| {
                        serde_json::from_str(line).map_err(|err| format!("line {}: {err}", n + 1))
                    })
                    .collect()
            } else {
                serde_json::from_str(&t)
                    .map(|document| vec![document])
                    .map_err(|err| err.to_string())
            }
        }) {
            Ok(documents) => documents,
            Err(err) => {
                eprintln!("pexi: input {}: {err}", input.display());
                return ExitCode::from(2);
            }
        };
    let engine = match Config::load(config.as_deref())
        .map_err(|err| err.to_string())
        .and_then(|config| crate::pipeline::load_policy(&config).map_err(|err| err.to_string()))
    {
        Ok(engine) => engine,
        Err(err) => {
            eprintln!("pexi: {err}");
            return ExitCode::from(2);
        }
    };
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    for document in &documents {
        let result = match engine.evaluate(document) {
            Ok(value) => {
                serde_json::json!({"revision": engine.revision(), "query": engine.query(), "result": value})
            }
            Err(error) => {
                serde_json::json!({"revision": engine.revision(), "query": engine.query(), "error": error})
            }
        };
        let text = if jsonl {
            serde_json::to_string(&result)
        } else {
            serde_json::to_string_pretty(&result)
        };
        if writeln!(out, "{}", text.unwrap_or_default()).is_err() {
            return ExitCode::from(2);
        }
    }
    if out.flush().is_err() {
        return ExitCode::from(2);
    }
    ExitCode::SUCCESS
}

/// A folder of our own under the system's temporary folder (owner-only), removed when dropped.
struct ScratchDir(PathBuf);

impl ScratchDir {
    fn new(tag: &str) -> std::io::Result<ScratchDir> {
        use std::os::unix::fs::DirBuilderExt;
        let mut bytes = [0u8; 8];
        getrandom::fill(&mut bytes).map_err(|err| std::io::Error::other(err.to_string()))?;
        let dir = std::env::temp_dir().join(format!("pexi-{tag}-{}", hex::encode(bytes)));
        // Not recursive: the name is fresh, and creating it ourselves is what makes it ours.
        std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
        Ok(ScratchDir(dir))
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn check(
    config: Option<PathBuf>,
    audit: bool,
    vm: crate::config::VmIdentity,
    method: String,
    url: String,
) -> ExitCode {
    let mut config = match Config::load(config.as_deref()) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("pexi: {err}");
            return ExitCode::from(2);
        }
    };
    // Without --audit the decision goes to a throwaway log: the pipeline is the same one `serve` runs.
    let _scratch = if audit {
        None
    } else {
        let scratch = match ScratchDir::new("check") {
            Ok(scratch) => scratch,
            Err(err) => {
                eprintln!("pexi: cannot make a temporary folder: {err}");
                return ExitCode::from(2);
            }
        };
        config.pep.audit.path = scratch.0.join("audit.jsonl");
        config.pep.audit.key_file = "none".into();
        config.pep.audit.durability = crate::audit::Durability::None;
        config.private_dirs.clear();
        Some(scratch)
    };
    let pipeline = match Pipeline::new(config) {
        Ok(pipeline) => pipeline,
        Err(err) => {
            eprintln!("pexi: {err}");
            return ExitCode::from(2);
        }
    };
    let caller = Caller {
        session_id: 0,
        guest: Implementation {
            name: "pexi check".into(),
            version: env!("CARGO_PKG_VERSION").into(),
        },
        vm: std::sync::Arc::new(vm),
        stream_id: 0,
    };
    // A one-thread runtime for the decision's audit ticket; check itself does no I/O beyond the log.
    let runtime = match runtime(tokio::runtime::Builder::new_current_thread()) {
        Ok(runtime) => runtime,
        Err(code) => return code,
    };
    let decided = runtime.block_on(pipeline.policy_check(&caller, &HttpRequest::new(method, url)));
    match decided {
        Ok(decision) => {
            println!(
                "{} (decision {})",
                if decision.allow { "allow" } else { "deny" },
                decision.decision_id
            );
            for reason in &decision.reasons {
                println!("  {reason}");
            }
            ExitCode::from(if decision.allow { 0 } else { 1 })
        }
        Err(error) => {
            eprintln!("pexi: {}: {error}", error.code());
            ExitCode::from(2)
        }
    }
}

fn serve(config: Option<PathBuf>, listen: Vec<Listen>, force: bool) -> ExitCode {
    let mut config = match Config::load(config.as_deref()) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("pexi: {err}");
            return ExitCode::from(2);
        }
    };
    config.pep.audit.force = force;
    if !listen.is_empty() {
        config.pep.listen = listen.into_iter().map(Listener::anonymous).collect();
    }
    match runtime(tokio::runtime::Builder::new_multi_thread()) {
        Ok(runtime) => runtime.block_on(run(config)),
        Err(code) => code,
    }
}

fn runtime(mut builder: tokio::runtime::Builder) -> Result<tokio::runtime::Runtime, ExitCode> {
    builder.enable_all().build().map_err(|err| {
        eprintln!("pexi: cannot start the runtime: {err}");
        ExitCode::from(2)
    })
}

async fn run(config: Config) -> ExitCode {
    let server = match crate::server::Server::start(config).await {
        Ok(server) => server,
        Err(err) => {
            eprintln!("pexi: {err}");
            return ExitCode::from(2);
        }
    };
    let pipeline = server.pipeline();
    tracing::info!(
        config = %pipeline.config.source,
        policy = %pipeline.policy_revision(),
        audit = %pipeline.audit().path().display(),
        "pexi serving"
    );
    wait_for_signal().await;
    tracing::info!("shutting down: in-flight streams get session_reset");
    if let Err(err) = server.stop().await {
        tracing::error!(%err, "audit flush failed");
        return ExitCode::from(1);
    }
    ExitCode::SUCCESS
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut int), Ok(mut term)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        // Without signal handlers the process would be killed by the default action anyway.
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = int.recv() => {}
        _ = term.recv() => {}
    }
}
