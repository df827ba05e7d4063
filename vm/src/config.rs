//! `[vm]`: what `pexi vm run` boots, as the PEP's configuration file holds it (the host's config loader
//! reads the file, lays it over the default and resolves the paths; this crate only defines the table).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::str::FromStr;

use serde::Deserialize;

fn from_text<'de, D: serde::Deserializer<'de>, T: FromStr<Err = String>>(
    deserializer: D,
) -> Result<T, D::Error> {
    String::deserialize(deserializer)?
        .parse()
        .map_err(serde::de::Error::custom)
}

/// `[vm]`: what `pexi vm run` boots. Paths are relative to the config file (to the current directory for
/// the embedded default, which names the outputs of `scripts/vm-image` under `target/vm`).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub memory_mb: u32,
    /// Virtual CPUs. Under software emulation more than one runs multi-threaded TCG: worth it for a guest
    /// whose work is spread over threads (Node's workers), not for a single-threaded command.
    pub cpus: u32,
    /// A host folder the guest mounts at /share over virtio-9p; empty for none.
    pub share: PathBuf,
    pub share_writable: bool,
    pub accel: Accel,
    pub kvm_probe_seconds: u64,
    /// QEMU's system emulator; by default `qemu-system-x86_64` or, for an aarch64 guest,
    /// `qemu-system-aarch64`.
    pub qemu: String,
    /// The guest's architecture: `auto` in the file is this machine's. An aarch64 guest's defaults for
    /// `kernel`, `initrd`, `share` and `qemu` are `scripts/vm-image --arch arm64`'s outputs
    /// (`target/vm-arm64/`) and `qemu-system-aarch64` (a profile's folder has a default per architecture
    /// too).
    #[serde(default)]
    pub arch: GuestArch,
    /// What boots the VM: `auto` in the file is vfkit (Apple's Virtualization.framework) on macOS and
    /// QEMU elsewhere.
    #[serde(default)]
    pub runner: Runner,
    /// The vfkit program (`brew install vfkit`).
    #[serde(default = "default_vfkit")]
    pub vfkit: String,
    /// The vhost-user vsock backend; empty runs the guest without vsock.
    pub vhost_device_vsock: String,
    pub guest_cid: u32,
    /// Sockets and the console log of a run.
    pub run_dir: PathBuf,
    /// The guest command when none is given.
    pub command: String,
    /// `[vm.profiles.NAME]`: this configuration's settings over a profile's own (vm/profiles/NAME.toml).
    #[serde(default)]
    pub profiles: BTreeMap<String, ProfileSettings>,
    /// The per-user folders `run_dir` lies in (the `{runtime_dir}` folders); `pexi vm run` makes them.
    #[serde(skip)]
    pub private_dirs: Vec<PathBuf>,
}

/// What a configuration may change of a profile: its folder (relative to the config file), memory, vCPUs and
/// default command.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProfileSettings {
    pub dir: Option<PathBuf>,
    pub memory_mb: Option<u32>,
    pub cpus: Option<u32>,
    pub command: Option<String>,
}

fn default_vfkit() -> String {
    "vfkit".into()
}

/// A guest architecture pexi builds images for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuestArch {
    X86_64,
    Aarch64,
}

impl GuestArch {
    /// This machine's architecture (the default: a guest that runs without emulation).
    pub fn host() -> GuestArch {
        if cfg!(target_arch = "aarch64") {
            GuestArch::Aarch64
        } else {
            GuestArch::X86_64
        }
    }

    /// Where `scripts/vm-image` puts this architecture's image, and its kernel's file name.
    pub fn image_defaults(self) -> (&'static str, &'static str) {
        match self {
            GuestArch::X86_64 => ("target/vm", "vmlinux"),
            GuestArch::Aarch64 => ("target/vm-arm64", "Image"),
        }
    }

    pub fn qemu(self) -> &'static str {
        match self {
            GuestArch::X86_64 => "qemu-system-x86_64",
            GuestArch::Aarch64 => "qemu-system-aarch64",
        }
    }
}

impl Default for GuestArch {
    fn default() -> Self {
        GuestArch::host()
    }
}

impl FromStr for GuestArch {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "auto" => Ok(GuestArch::host()),
            "x86_64" | "amd64" => Ok(GuestArch::X86_64),
            "aarch64" | "arm64" => Ok(GuestArch::Aarch64),
            other => Err(format!("{other:?} is not auto, x86_64 or aarch64")),
        }
    }
}

impl<'de> Deserialize<'de> for GuestArch {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        from_text(deserializer)
    }
}

/// What boots the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Runner {
    /// QEMU, with vhost-device-vsock for vsock (Linux).
    Qemu,
    /// vfkit, Virtualization.framework's command-line runner (macOS): vsock to a Unix socket, virtio-fs.
    Vfkit,
}

impl Default for Runner {
    fn default() -> Self {
        if cfg!(target_os = "macos") {
            Runner::Vfkit
        } else {
            Runner::Qemu
        }
    }
}

impl FromStr for Runner {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "auto" => Ok(Runner::default()),
            "qemu" => Ok(Runner::Qemu),
            "vfkit" => Ok(Runner::Vfkit),
            other => Err(format!("{other:?} is not auto, qemu or vfkit")),
        }
    }
}

impl<'de> Deserialize<'de> for Runner {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        from_text(deserializer)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// KVM when it boots the guest, software emulation otherwise.
    Auto,
    Kvm,
    Tcg,
}

impl FromStr for Accel {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "auto" => Ok(Accel::Auto),
            "kvm" => Ok(Accel::Kvm),
            "tcg" => Ok(Accel::Tcg),
            other => Err(format!("{other:?} is not auto, kvm or tcg")),
        }
    }
}
