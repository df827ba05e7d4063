//! `pexi vm run`: boots a guest with no NIC whose only ways out are a virtio-serial port and/or vsock,
//! served by a PEP running in this process, and returns the guest command's exit status.
//!
//! Two runners boot it. With QEMU ([`qemu`], Linux) the pieces, started in this order and stopped in
//! reverse, are: the PEP (listening on `<run>/virtio.sock` for QEMU's chardev and on
//! `<run>/vsock.sock_4041`, the hybrid-vsock convention), `vhost-device-vsock` (the vhost-user vsock backend
//! that turns a guest connection to CID 2 port 4041 into a connection to that Unix socket), and QEMU. With
//! vfkit ([`vfkit`], macOS: Apple's Virtualization.framework) vfkit itself forwards the guest's vsock port
//! 4041 to `<run>/vsock.sock_4041`, and there is no virtio-serial port. The guest's init (from
//! `scripts/vm-image`) takes its command from the kernel command line, runs it, prints `pexi-exit: N` on
//! the console and powers off; the console goes to a log file, which this module follows to show the
//! command's output and read its status.

mod config;
mod profile;
mod qemu;
pub mod vfkit;

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;

pub use config::{Accel, GuestArch, ProfileSettings, Runner, VmConfig};
pub use profile::Profile;

/// The console line the guest's init prints before running the command.
const STARTED: &str = "pexi-init: started";
/// The console line that carries the command's exit status.
const EXIT: &str = "pexi-exit: ";
/// The kernel command line limit (COMMAND_LINE_SIZE, 2048 on x86 and arm64).
const CMDLINE_MAX: usize = 2048;
/// The host's vsock CID (VMADDR_CID_HOST): where a guest connects to reach the PEP over vsock.
const HOST_CID: u32 = 2;

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("{0}")]
    Setup(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("the guest ran longer than {0:?}; stopped it (console log: {1})")]
    Timeout(Duration, PathBuf),
    #[error("the guest stopped without reporting its command's exit status (console log: {0})")]
    NoStatus(PathBuf),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> VmError {
    let what = what.into();
    move |source| VmError::Io { what, source }
}

/// What one run changes from `[vm]`.
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    pub command: Option<String>,
    pub env: Vec<(String, String)>,
    pub accel: Option<Accel>,
    pub memory_mb: Option<u32>,
    pub cpus: Option<u32>,
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    pub share: Option<PathBuf>,
    pub share_writable: bool,
    pub no_vsock: bool,
    pub console_log: Option<PathBuf>,
    pub timeout: Option<Duration>,
    /// Copy the guest command's console output to stdout as it comes.
    pub echo: bool,
    pub profile: Option<Profile>,
    /// `--profile-config FILE`: the profile's config file for the guest (OpenClaw's JSON5 for `openclaw`).
    pub profile_config: Option<PathBuf>,
    /// A host folder the guest may write, at /out: how a run hands files back.
    pub output: Option<PathBuf>,
}

/// An extra folder for the guest (over 9p under QEMU, virtio-fs under vfkit): host folder, where the
/// guest mounts it, writable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mount {
    pub host: PathBuf,
    pub guest: String,
    pub writable: bool,
}

/// Everything a run needs, resolved.
#[derive(Clone, Debug)]
pub struct Plan {
    pub vm: VmConfig,
    pub command: String,
    pub env: Vec<(String, String)>,
    pub vsock: bool,
    pub virtio_socket: PathBuf,
    /// The hybrid vsock base path: vhost-device-vsock's `--uds-path`; the PEP listens on `<this>_4041`.
    pub vsock_uds: PathBuf,
    pub vhost_socket: PathBuf,
    pub console_log: PathBuf,
    /// Extra folders (OpenClaw's packages and config read-only, `--output` writable).
    pub mounts: Vec<Mount>,
    /// Start pexi-guestd from init before the command.
    pub guestd: bool,
}

impl Plan {
    pub fn new(vm: &VmConfig, options: &RunOptions) -> Result<Plan, VmError> {
        let mut vm = vm.clone();
        if let Some(accel) = options.accel {
            vm.accel = accel;
        }
        if let Some(memory) = options.memory_mb {
            vm.memory_mb = memory;
        }
        if let Some(kernel) = &options.kernel {
            vm.kernel = kernel.clone();
        }
        if let Some(initrd) = &options.initrd {
            vm.initrd = initrd.clone();
        }
        if let Some(share) = &options.share {
            vm.share = share.clone();
        }
        vm.share_writable |= options.share_writable;
        let run = vm.run_dir.clone();
        let mut mounts = Vec::new();
        let mut env = options.env.clone();
        let mut command = options.command.clone();
        let mut guestd = false;
        if let Some(profile) = &options.profile {
            let settings = vm.profiles.get(&profile.name).cloned().unwrap_or_default();
            guestd = profile.guestd;
            if let Some(memory) = settings.memory_mb.or(profile.memory_mb) {
                vm.memory_mb = vm.memory_mb.max(memory);
            }
            if let Some(cpus) = settings.cpus.or(profile.cpus) {
                vm.cpus = vm.cpus.max(cpus);
            }
            if let Some(spec) = &profile.dir {
                let dir = settings
                    .dir
                    .clone()
                    .unwrap_or_else(|| spec.for_arch(vm.arch).to_path_buf());
                if let Some(required) = &spec.requires {
                    if !dir.join(required).exists() {
                        return Err(VmError::Setup(format!(
                            "profile {}: no {} under {} ({})",
                            profile.name,
                            required.display(),
                            dir.display(),
                            spec.install(vm.arch, &dir)
                        )));
                    }
                }
                for mount in &profile.mounts {
                    mounts.push(Mount {
                        host: dir.join(&mount.from),
                        guest: mount.guest.clone(),
                        writable: mount.writable,
                    });
                }
            }
            if let Some(file) = &options.profile_config {
                let target = profile.config_file.as_ref().ok_or_else(|| {
                    VmError::Setup(format!("profile {} takes no config file", profile.name))
                })?;
                let guest = Path::new(&target.guest);
                let (Some(guest_dir), Some(name)) = (guest.parent(), guest.file_name()) else {
                    return Err(VmError::Setup(format!(
                        "profile {}: config_file.guest {:?} is not a file path",
                        profile.name, target.guest
                    )));
                };
                let folder = run.join(&profile.name);
                std::fs::create_dir_all(&folder).map_err(io(format!("{}", folder.display())))?;
                std::fs::copy(file, folder.join(name))
                    .map_err(io(format!("{}", file.display())))?;
                mounts.push(Mount {
                    host: folder,
                    guest: guest_dir.display().to_string(),
                    writable: false,
                });
                env.push((target.env.clone(), target.guest.clone()));
            }
            command = command
                .or(settings.command)
                .or_else(|| profile.command.clone());
        } else if options.profile_config.is_some() {
            return Err(VmError::Setup("--profile-config needs --profile".into()));
        }
        // An explicit --cpus wins over the profile's: OpenClaw runs on one vCPU, just not in less memory.
        if let Some(cpus) = options.cpus {
            vm.cpus = cpus;
        }
        if vm.runner == Runner::Qemu && !cfg!(target_os = "linux") {
            // vhost-device-vsock and QEMU's memfd memory backend are Linux's.
            return Err(VmError::Setup(
                "the QEMU runner needs Linux (vhost-user vsock, a memfd memory backend); on macOS set \
                 [vm] runner = \"vfkit\" (the default there; brew install vfkit)"
                    .into(),
            ));
        }
        if vm.runner == Runner::Vfkit && options.no_vsock {
            return Err(VmError::Setup(
                "--no-vsock: under vfkit (Virtualization.framework) vsock is the guest's only channel to the PEP"
                    .into(),
            ));
        }
        if let Some(output) = &options.output {
            std::fs::create_dir_all(output).map_err(io(format!("{}", output.display())))?;
            mounts.push(Mount {
                host: output.clone(),
                guest: "/out".into(),
                writable: true,
            });
        }
        Ok(Plan {
            command: command.unwrap_or_else(|| vm.command.clone()),
            env,
            mounts,
            guestd,
            vsock: vm.runner == Runner::Vfkit
                || (!options.no_vsock && !vm.vhost_device_vsock.is_empty()),
            virtio_socket: run.join("virtio.sock"),
            vsock_uds: run.join("vsock.sock"),
            vhost_socket: run.join("vhost-vsock.sock"),
            console_log: options
                .console_log
                .clone()
                .unwrap_or_else(|| run.join("console.log")),
            vm,
        })
    }

    /// The Unix sockets the PEP listens on for this VM: the virtio-serial port's socket (QEMU only: Virtualization.framework
    /// has no named virtio-serial ports) and vsock's.
    pub fn pep_sockets(&self) -> Vec<PathBuf> {
        let mut sockets = Vec::new();
        if self.vm.runner == Runner::Qemu {
            sockets.push(self.virtio_socket.clone());
        }
        if self.vsock {
            sockets.push(hybrid_port(&self.vsock_uds));
        }
        sockets
    }

    /// The kernel command line: the guest's init reads its command, environment and share mode from it.
    pub fn cmdline(&self) -> Result<String, VmError> {
        let b64 = |text: &str| base64::engine::general_purpose::STANDARD.encode(text);
        // The console each machine has: x86's first UART, the arm64 virt machine's PL011, and under
        // Virtualization.framework the virtio console vfkit's `virtio-serial` device gives.
        let console = match (self.vm.runner, self.vm.arch) {
            (Runner::Vfkit, _) => "hvc0",
            (Runner::Qemu, GuestArch::Aarch64) => "ttyAMA0",
            (Runner::Qemu, GuestArch::X86_64) => "ttyS0",
        };
        let mut line = format!(
            "console={console} quiet panic=-1 pexi.cmd={}",
            b64(&self.command)
        );
        if self.vm.runner == Runner::Vfkit {
            // Folders over virtio-fs (no 9p), the PEP over vsock (no virtio-serial port).
            line.push_str(&format!(
                " pexi.fs=virtiofs pexi.endpoint=vsock:{HOST_CID}:{}",
                pexi_protocol::transport::VSOCK_PORT
            ));
        }
        if !self.env.is_empty() {
            let env: Vec<String> = self.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
            line.push_str(&format!(" pexi.env={}", b64(&env.join("\n"))));
        }
        if !self.vm.share.as_os_str().is_empty() {
            line.push_str(if self.vm.share_writable {
                " pexi.share=rw"
            } else {
                " pexi.share=ro"
            });
        }
        if !self.mounts.is_empty() {
            let mounts: Vec<String> = self
                .mounts
                .iter()
                .enumerate()
                .map(|(i, mount)| {
                    let mode = if mount.writable { "rw" } else { "ro" };
                    format!("pexim{i}:{mode}:{}", mount.guest)
                })
                .collect();
            line.push_str(&format!(" pexi.mounts={}", b64(&mounts.join("\n"))));
        }
        if self.guestd {
            line.push_str(" pexi.guestd=1");
        }
        if line.len() >= CMDLINE_MAX {
            return Err(VmError::Setup(format!(
                "the guest command and environment make a kernel command line of {} bytes (limit {CMDLINE_MAX}); \
                 put the command in a script on the share",
                line.len()
            )));
        }
        Ok(line)
    }
}

/// A plan on the embedded config for `arch` and `runner`, with the image at /img and the run folder at
/// /run/pexi-vm: what the runners' golden tests build their command lines from.
#[cfg(test)]
pub(crate) fn golden_plan(
    arch: GuestArch,
    runner: Runner,
    cpus: u32,
    memory_mb: u32,
    options: &RunOptions,
) -> Plan {
    let mut vm = embedded_vm();
    vm.arch = arch;
    vm.runner = runner;
    vm.kernel = "/img/Image".into();
    vm.initrd = "/img/initramfs.cpio.gz".into();
    vm.share = "/img/share".into();
    vm.run_dir = "/run/pexi-vm".into();
    vm.cpus = cpus;
    vm.memory_mb = memory_mb;
    Plan::new(&vm, options).expect("plan")
}

/// The `[vm]` table of the PEP's embedded default configuration, as the tests' starting point.
#[cfg(test)]
pub(crate) fn embedded_vm() -> VmConfig {
    #[derive(serde::Deserialize)]
    struct File {
        vm: VmConfig,
    }
    let text = include_str!("../../host/default-config.toml");
    let table: toml::Table = text.parse().expect("default config");
    let vm = toml::Table::from_iter([("vm".to_string(), table["vm"].clone())]);
    let file: File = vm.try_into().expect("[vm]");
    file.vm
}

/// `<uds>_4041`: where a hybrid-vsock backend delivers guest connections to the PEP's port.
pub fn hybrid_port(uds: &Path) -> PathBuf {
    let mut name = uds.as_os_str().to_owned();
    name.push(format!("_{}", pexi_protocol::transport::VSOCK_PORT));
    PathBuf::from(name)
}

/// The exit status in a console log, if the guest reported one.
pub fn exit_status(console: &str) -> Option<i32> {
    console
        .lines()
        .rev()
        .find_map(|line| line.trim_end_matches('\r').strip_prefix(EXIT))
        .and_then(|status| status.trim().parse().ok())
}

/// The PEP a run serves its guest with, started on the VM's sockets by the caller's `start_pep`.
pub trait Pep {
    fn stop(self) -> impl std::future::Future<Output = ()>;
}

/// Boots the guest, runs its command, stops everything. Returns the command's exit status. `start_pep`
/// gets the Unix sockets the guest's channels arrive on ([`Plan::pep_sockets`]) and starts the PEP on
/// them; the run stops it at the end, however the run ends. The caller checks `vm.private_dirs` first.
pub async fn run<F, Fut, P>(
    vm: &VmConfig,
    options: RunOptions,
    start_pep: F,
) -> Result<i32, VmError>
where
    F: FnOnce(Vec<PathBuf>) -> Fut,
    Fut: std::future::Future<Output = Result<P, String>>,
    P: Pep,
{
    let plan = Plan::new(vm, &options)?;
    let vm = &plan.vm;
    for (what, path) in [("kernel", &vm.kernel), ("initrd", &vm.initrd)] {
        if !path.is_file() {
            return Err(VmError::Setup(format!(
                "the guest {what} {} is missing: build the image with scripts/vm-image",
                path.display()
            )));
        }
    }
    if !vm.share.as_os_str().is_empty() && !vm.share.is_dir() {
        return Err(VmError::Setup(format!(
            "the share {} is not a folder",
            vm.share.display()
        )));
    }
    std::fs::create_dir_all(&vm.run_dir).map_err(io(format!("create {}", vm.run_dir.display())))?;
    for stale in [
        &plan.virtio_socket,
        &hybrid_port(&plan.vsock_uds),
        &plan.vsock_uds,
        &plan.vhost_socket,
    ] {
        let _ = std::fs::remove_file(stale);
    }

    let pep = start_pep(plan.pep_sockets())
        .await
        .map_err(|err| VmError::Setup(format!("PEP: {err}")))?;
    let mut children = Children::default();
    let result = boot(&plan, &options, &mut children).await;
    children.stop();
    pep.stop().await;
    result
}

async fn boot(plan: &Plan, options: &RunOptions, children: &mut Children) -> Result<i32, VmError> {
    match plan.vm.runner {
        Runner::Qemu => start_qemu_runner(plan, children).await?,
        Runner::Vfkit => start_vfkit(plan, children)?,
    }
    let started = Instant::now();
    let mut follow = Follow::default();
    loop {
        if options.echo {
            follow.echo(&plan.console_log);
        }
        let exited = match children.vm.as_mut().map(Child::try_wait) {
            Some(Ok(Some(status))) => Some(status),
            Some(Err(err)) => return Err(io("wait for the VM")(err)),
            _ => None,
        };
        if let Some(status) = exited {
            if options.echo {
                follow.echo(&plan.console_log);
            }
            let console = std::fs::read_to_string(&plan.console_log).unwrap_or_default();
            return match exit_status(&console) {
                Some(code) => Ok(code),
                None => {
                    let stderr = std::fs::read_to_string(stderr_file(plan)).unwrap_or_default();
                    if !status.success() && !stderr.trim().is_empty() {
                        Err(VmError::Setup(format!(
                            "{} failed ({status}): {}",
                            runner_name(plan),
                            stderr.trim()
                        )))
                    } else {
                        Err(VmError::NoStatus(plan.console_log.clone()))
                    }
                }
            };
        }
        if options
            .timeout
            .is_some_and(|limit| started.elapsed() > limit)
        {
            return Err(VmError::Timeout(
                options.timeout.unwrap_or_default(),
                plan.console_log.clone(),
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn runner_name(plan: &Plan) -> &str {
    match plan.vm.runner {
        Runner::Qemu => &plan.vm.qemu,
        Runner::Vfkit => &plan.vm.vfkit,
    }
}

/// Where the runner's own error output goes (read when it fails without a status from the guest).
fn stderr_file(plan: &Plan) -> PathBuf {
    plan.vm.run_dir.join(match plan.vm.runner {
        Runner::Qemu => "qemu.stderr",
        Runner::Vfkit => "vfkit.stderr",
    })
}

/// A fresh console log per boot (the status is read from it) and the runner's stderr file.
fn fresh_logs(plan: &Plan) -> Result<std::fs::File, VmError> {
    std::fs::write(&plan.console_log, b"")
        .map_err(io(format!("create {}", plan.console_log.display())))?;
    let path = stderr_file(plan);
    std::fs::File::create(&path).map_err(io(format!("create {}", path.display())))
}

/// vfkit boots the guest; it forwards vsock itself and exits when the guest powers off.
fn start_vfkit(plan: &Plan, children: &mut Children) -> Result<(), VmError> {
    let shares_dir = plan.vm.run_dir.join("shares");
    children.shares = Some(shares_dir.clone());
    let shares = vfkit::prepare_shares(plan, &shares_dir)?;
    let args = plan.vfkit_args(&shares)?;
    let child = spawn_runner(
        plan,
        &plan.vm.vfkit,
        &args,
        "install it with `brew install vfkit` (docs/macos.md)",
    )?;
    children.vm = Some(child);
    Ok(())
}

/// Starts the VM runner (QEMU or vfkit) with a fresh console log and its stderr to a file; `install`
/// says how to get it when it cannot be started.
fn spawn_runner(
    plan: &Plan,
    program: &str,
    args: &[String],
    install: &str,
) -> Result<Child, VmError> {
    let stderr = fresh_logs(plan)?;
    Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .map_err(|err| VmError::Setup(format!("cannot start {program} ({err}); {install}")))
}

async fn start_qemu_runner(plan: &Plan, children: &mut Children) -> Result<(), VmError> {
    let vm = &plan.vm;
    if plan.vsock {
        let backend = Command::new(&vm.vhost_device_vsock)
            .args([
                "--guest-cid",
                &vm.guest_cid.to_string(),
                "--socket",
                &plan.vhost_socket.display().to_string(),
                "--uds-path",
                &plan.vsock_uds.display().to_string(),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .map_err(|err| {
                VmError::Setup(format!(
                    "cannot start {} ({err}); install it with `cargo install vhost-device-vsock`, or run without vsock (--no-vsock)",
                    vm.vhost_device_vsock
                ))
            })?;
        children.vhost = Some(backend);
        wait_for(&plan.vhost_socket, Duration::from_secs(10))
            .await
            .map_err(|_| {
                VmError::Setup(format!(
                    "{} did not create {}",
                    vm.vhost_device_vsock,
                    plan.vhost_socket.display()
                ))
            })?;
    }

    let accel = match vm.accel {
        Accel::Tcg => "tcg",
        Accel::Kvm => "kvm",
        // KVM runs only a guest of this machine's own architecture.
        Accel::Auto if vm.arch != GuestArch::host() => "tcg",
        Accel::Auto if kvm_usable() => "kvm",
        Accel::Auto => {
            eprintln!("pexi vm: no usable /dev/kvm; using software emulation (TCG)");
            "tcg"
        }
    };
    let mut qemu = start_qemu(plan, accel)?;
    if accel == "kvm" && vm.accel == Accel::Auto {
        let probe = Duration::from_secs(vm.kvm_probe_seconds);
        if !booted(plan, &mut qemu, probe).await {
            let _ = qemu.kill();
            let _ = qemu.wait();
            eprintln!(
                "pexi vm: KVM did not boot the guest within {probe:?}; falling back to software emulation (TCG)"
            );
            qemu = start_qemu(plan, "tcg")?;
        }
    }
    children.vm = Some(qemu);
    Ok(())
}

fn start_qemu(plan: &Plan, accel: &str) -> Result<Child, VmError> {
    let package = match plan.vm.arch {
        GuestArch::X86_64 => "qemu-system-x86",
        GuestArch::Aarch64 => "qemu-system-arm",
    };
    spawn_runner(
        plan,
        &plan.vm.qemu,
        &plan.qemu_args(accel)?,
        &format!("install QEMU (apt-get install {package})"),
    )
}

/// Whether the guest's init announced itself within `limit` (QEMU still running).
async fn booted(plan: &Plan, qemu: &mut Child, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if std::fs::read_to_string(&plan.console_log).is_ok_and(|log| log.contains(STARTED)) {
            return true;
        }
        if !matches!(qemu.try_wait(), Ok(None)) {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

/// /dev/kvm exists and this user may use it. Whether it can boot our kernel is learnt by trying.
fn kvm_usable() -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}

async fn wait_for(path: &Path, limit: Duration) -> Result<(), ()> {
    let deadline = Instant::now() + limit;
    while !path.exists() {
        if Instant::now() > deadline {
            return Err(());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// The processes of a run (the VM runner, QEMU or vfkit, and vhost-device-vsock) and the per-run share
/// copies; stopped (and reaped) and removed when the run ends, however it ends.
#[derive(Default)]
struct Children {
    vm: Option<Child>,
    vhost: Option<Child>,
    shares: Option<PathBuf>,
}

impl Children {
    fn stop(&mut self) {
        for child in [self.vm.take(), self.vhost.take()].into_iter().flatten() {
            stop_child(child);
        }
        if let Some(dir) = self.shares.take() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

impl Drop for Children {
    fn drop(&mut self) {
        self.stop();
    }
}

/// SIGTERM first, so that a runner that owns processes or a VM of its own (vfkit asks the guest to stop,
/// then forces it) can end them; SIGKILL if it has not exited within `STOP_GRACE`.
fn stop_child(mut child: Child) {
    if matches!(child.try_wait(), Ok(None)) {
        if let Ok(pid) = i32::try_from(child.id()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        let deadline = Instant::now() + STOP_GRACE;
        while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        if matches!(child.try_wait(), Ok(None)) {
            let _ = child.kill();
        }
    }
    let _ = child.wait();
}

/// How long a runner has to stop after SIGTERM (vfkit waits up to 5 s for the guest, then forces it).
const STOP_GRACE: Duration = Duration::from_secs(6);

/// Copies what the guest command prints (the console after init's start line) to stdout.
#[derive(Default)]
struct Follow {
    offset: u64,
    started: bool,
    partial: String,
}

impl Follow {
    fn echo(&mut self, log: &Path) {
        let Ok(mut file) = std::fs::File::open(log) else {
            return;
        };
        if file.seek(SeekFrom::Start(self.offset)).is_err() {
            return;
        }
        let mut fresh = Vec::new();
        if file.read_to_end(&mut fresh).is_err() {
            return;
        }
        self.offset += fresh.len() as u64;
        self.partial.push_str(&String::from_utf8_lossy(&fresh));
        let mut stdout = std::io::stdout().lock();
        while let Some(end) = self.partial.find('\n') {
            let line: String = self.partial.drain(..=end).collect();
            if self.started && !line.starts_with(EXIT) && !is_kernel_message(&line) {
                let _ = stdout.write_all(line.replace('\r', "").as_bytes());
            }
            if line.contains(STARTED) {
                self.started = true;
            }
        }
        let _ = stdout.flush();
    }
}

/// `[   28.518221] reboot: Power down`: the kernel's own console lines are not the command's output.
fn is_kernel_message(line: &str) -> bool {
    line.strip_prefix('[')
        .and_then(|rest| rest.split_once(']'))
        .is_some_and(|(stamp, _)| {
            let stamp = stamp.trim();
            !stamp.is_empty() && stamp.chars().all(|c| c.is_ascii_digit() || c == '.')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The embedded `[vm]` as on an x86_64 Linux machine, whatever machine runs the test.
    fn linux_x86_64() -> VmConfig {
        let mut vm = embedded_vm();
        vm.arch = GuestArch::X86_64;
        vm.runner = Runner::Qemu;
        vm
    }

    fn plan(vsock: bool, share: &str) -> Plan {
        let mut vm = linux_x86_64();
        vm.share = PathBuf::from(share);
        Plan::new(
            &vm,
            &RunOptions {
                command: Some("pexi-fetch https://example.com/ && echo done".into()),
                env: vec![("A".into(), "1".into())],
                no_vsock: !vsock,
                ..RunOptions::default()
            },
        )
        .expect("plan")
    }

    #[test]
    fn the_guest_has_no_nic_and_the_pep_port() {
        let args = plan(true, "share").qemu_args("tcg").expect("args");
        let text = args.join(" ");
        assert!(text.contains("-nic none"), "{text}");
        assert!(
            !text.contains("netdev") && !text.contains("virtio-net"),
            "{text}"
        );
        assert!(text.contains("virtserialport,chardev=pep,name=org.pexi.pep.0"));
        assert!(text.contains("vhost-user-vsock-pci"));
        assert!(text.contains("memory-backend-memfd"));
        assert!(
            text.contains("readonly=on"),
            "the share is read-only by default"
        );
        assert!(text.contains("-accel tcg"));
        let plain = plan(false, "").qemu_args("kvm").expect("args").join(" ");
        assert!(!plain.contains("vsock") && !plain.contains("9p") && !plain.contains("memfd"));
    }

    #[test]
    fn the_command_and_environment_travel_on_the_kernel_command_line() {
        let plan = plan(true, "share");
        let line = plan.cmdline().expect("fits");
        let field = |name: &str| {
            line.split(' ')
                .find_map(|part| part.strip_prefix(name))
                .map(|b64| {
                    String::from_utf8(
                        base64::engine::general_purpose::STANDARD
                            .decode(b64)
                            .expect("base64"),
                    )
                    .expect("utf-8")
                })
        };
        assert_eq!(
            field("pexi.cmd=").as_deref(),
            Some("pexi-fetch https://example.com/ && echo done")
        );
        assert_eq!(field("pexi.env=").as_deref(), Some("A=1"));
        assert!(line.contains("pexi.share=ro"));
        let mut long = plan.clone();
        long.command = "x".repeat(3000);
        assert!(matches!(long.cmdline(), Err(VmError::Setup(_))));
    }

    #[test]
    fn the_openclaw_profile_mounts_openclaw_starts_guestd_and_raises_memory() {
        let dir = std::env::temp_dir().join(format!("pexi-vm-profile-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("node_modules/openclaw")).expect("mkdir");
        let config_file = dir.join("openclaw.json");
        std::fs::write(&config_file, "{}").expect("config");
        let mut vm = linux_x86_64();
        vm.profiles.insert(
            "openclaw".into(),
            ProfileSettings {
                dir: Some(dir.clone()),
                ..Default::default()
            },
        );
        vm.run_dir = dir.join("run");
        vm.memory_mb = 768;
        let options = RunOptions {
            profile: Some(Profile::load("openclaw").expect("built in")),
            profile_config: Some(config_file),
            ..RunOptions::default()
        };
        let plan = Plan::new(&vm, &options).expect("plan");
        assert_eq!(plan.vm.memory_mb, 2048);
        // Two vCPUs on multi-threaded TCG: OpenClaw's workers run beside its main thread.
        assert_eq!(plan.vm.cpus, 2);
        assert!(plan.guestd);
        assert!(plan.command.starts_with("openclaw agent exec"));
        let line = plan.cmdline().expect("fits");
        assert!(line.contains(" pexi.guestd=1"), "{line}");
        let mounts = line
            .split(' ')
            .find_map(|w| w.strip_prefix("pexi.mounts="))
            .expect("mounts");
        let mounts = String::from_utf8(
            base64::engine::general_purpose::STANDARD
                .decode(mounts)
                .expect("base64"),
        )
        .expect("utf-8");
        assert_eq!(
            mounts,
            "pexim0:ro:/opt/openclaw/node_modules\npexim1:ro:/run/openclaw"
        );
        assert!(plan.env.contains(&(
            "OPENCLAW_CONFIG_PATH".into(),
            "/run/openclaw/openclaw.json".into()
        )));
        let args = plan.qemu_args("tcg").expect("args").join(" ");
        assert!(args.contains("id=pexim0,path="), "{args}");
        assert!(args.contains("security_model=none,readonly=on"));
        assert!(args.contains("-accel tcg,thread=multi -smp 2"), "{args}");
        assert!(plan
            .qemu_args("kvm")
            .expect("args")
            .join(" ")
            .contains("-accel kvm -smp 2"));
        let one = Plan::new(
            &vm,
            &RunOptions {
                cpus: Some(1),
                ..options.clone()
            },
        )
        .expect("plan");
        assert!(one
            .qemu_args("tcg")
            .expect("args")
            .join(" ")
            .contains("-accel tcg -smp 1"));
        assert!(dir.join("run/openclaw/openclaw.json").is_file());
        // Without OpenClaw installed the profile says what to do.
        let mut missing = vm.clone();
        missing.profiles.insert(
            "openclaw".into(),
            ProfileSettings {
                dir: Some(dir.join("nowhere")),
                ..Default::default()
            },
        );
        let err = Plan::new(&missing, &options).expect_err("no openclaw");
        assert!(err.to_string().contains("npm install"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn listeners_follow_the_hybrid_vsock_convention() {
        let plan = plan(true, "share");
        let sockets: Vec<String> = plan
            .pep_sockets()
            .iter()
            .map(|path| path.display().to_string())
            .collect();
        assert_eq!(
            sockets,
            vec![
                plan.virtio_socket.display().to_string(),
                format!("{}_4041", plan.vsock_uds.display()),
            ]
        );
    }

    #[test]
    fn kernel_lines_are_told_from_the_command_output() {
        assert!(is_kernel_message("[   28.518221] reboot: Power down\n"));
        assert!(!is_kernel_message("[ok] done\n"));
        assert!(!is_kernel_message("hello\n"));
    }

    #[test]
    fn the_exit_status_is_the_last_one_reported() {
        assert_eq!(exit_status("boot\r\npexi-exit: 3\r\n"), Some(3));
        assert_eq!(exit_status("pexi-exit: 1\npexi-exit: 0\n"), Some(0));
        assert_eq!(exit_status("kernel panic\n"), None);
    }
}
