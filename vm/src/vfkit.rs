//! The vfkit runner (macOS): vfkit's command line for a [`Plan`]. vfkit (crc-org/vfkit, `brew install
//! vfkit`) boots the guest with Apple's Virtualization.framework; it forwards the guest's connections to
//! vsock port 4041 to a host Unix socket (its `virtio-vsock` device in `listen` mode: the guest connects,
//! vfkit dials the socket), which is the PEP's `unix:` listener; it shares folders over virtio-fs, writes
//! the guest's console (`hvc0`) to a file, and gives the guest no network device unless asked for one.
//!
//! Two things differ from QEMU: there is no named virtio-serial port (vsock is the only channel), and
//! virtio-fs has no read-only mode, so a read-only folder is shared as a per-run copy ([`prepare_shares`]):
//! a guest that remounted it read-write would otherwise change the host's files for every later run.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::{hybrid_port, io, Plan, VmError};

/// The only devices a pexi guest gets from vfkit: the console, vsock to the PEP, the shared folders.
const DEVICES: [&str; 3] = ["virtio-serial", "virtio-vsock", "virtio-fs"];

/// A folder the guest mounts over virtio-fs: the tag init mounts it by, and the host folder shared.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Share {
    pub tag: String,
    pub host: PathBuf,
    pub writable: bool,
}

impl Plan {
    /// The folders this run shares: the share (`pexishare`, at /share) and the extra mounts (`pexim<i>`).
    pub fn shares(&self) -> Vec<Share> {
        let mut shares = Vec::new();
        if !self.vm.share.as_os_str().is_empty() {
            shares.push(Share {
                tag: "pexishare".into(),
                host: self.vm.share.clone(),
                writable: self.vm.share_writable,
            });
        }
        for (i, mount) in self.mounts.iter().enumerate() {
            shares.push(Share {
                tag: format!("pexim{i}"),
                host: mount.host.clone(),
                writable: mount.writable,
            });
        }
        shares
    }

    /// vfkit's arguments, with `shared` the folders as [`prepare_shares`] made them.
    pub fn vfkit_args(&self, shared: &[Share]) -> Result<Vec<String>, VmError> {
        let vm = &self.vm;
        let socket = hybrid_port(&self.vsock_uds);
        let mut args: Vec<String> = vec![
            "--cpus".into(),
            vm.cpus.max(1).to_string(),
            "--memory".into(),
            vm.memory_mb.to_string(),
            // The plain flags rather than `--bootloader linux,...`: their values are not split at commas.
            "--kernel".into(),
            vm.kernel.display().to_string(),
            "--initrd".into(),
            vm.initrd.display().to_string(),
            "--kernel-cmdline".into(),
            self.cmdline()?,
            "--device".into(),
            format!(
                "virtio-serial,logFilePath={}",
                option_path(&self.console_log)?
            ),
            "--device".into(),
            format!(
                "virtio-vsock,port={},socketURL={},listen",
                pexi_protocol::transport::VSOCK_PORT,
                option_path(&socket)?
            ),
        ];
        for share in shared {
            args.extend([
                "--device".into(),
                format!(
                    "virtio-fs,sharedDir={},mountTag={}",
                    option_path(&share.host)?,
                    share.tag
                ),
            ]);
        }
        check_devices(&args)?;
        Ok(args)
    }
}

/// A path inside one of vfkit's `--device` option lists, which are split at commas and give quotes a
/// meaning of their own: a path holding either could not be passed faithfully, so it is refused.
fn option_path(path: &Path) -> Result<String, VmError> {
    let text = path.display().to_string();
    if text.contains([',', '"']) || !path.is_absolute() {
        return Err(VmError::Setup(format!(
            "{text}: vfkit needs an absolute path without commas or quotes here"
        )));
    }
    Ok(text)
}

/// Refuses any vfkit device but the console, vsock and virtio-fs: above all a network device
/// (`virtio-net`), whatever put it there. The guest's only way out is the PEP.
pub fn check_devices(args: &[String]) -> Result<(), VmError> {
    let mut items = args.iter();
    while let Some(arg) = items.next() {
        let value = if arg == "--device" || arg == "-d" {
            items.next().map(String::as_str).unwrap_or_default()
        } else if let Some(value) = arg
            .strip_prefix("--device=")
            .or_else(|| arg.strip_prefix("-d="))
        {
            value
        } else {
            continue;
        };
        let kind = value.split(',').next().unwrap_or_default();
        if kind == "virtio-net" {
            return Err(VmError::Setup(format!(
                "refusing to start a VM with a network device ({value}): the guest's only way out is the PEP"
            )));
        }
        if !DEVICES.contains(&kind) {
            return Err(VmError::Setup(format!(
                "refusing to start a VM with the device {value}: a pexi guest gets only {}",
                DEVICES.join(", ")
            )));
        }
    }
    Ok(())
}

/// Makes the folders vfkit shares under `dir` (emptied first): writable folders as they are, read-only
/// ones as per-run copies, since virtio-fs under vfkit cannot be read-only.
pub fn prepare_shares(plan: &Plan, dir: &Path) -> Result<Vec<Share>, VmError> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).map_err(io(format!("create {}", dir.display())))?;
    let mut shares = plan.shares();
    for share in &mut shares {
        if share.writable {
            continue;
        }
        let copy = dir.join(&share.tag);
        // The folder itself, not a link to it: `cp -R` copies a link given on its command line as a
        // link, and the guest would then be given the original, writable.
        let original =
            std::fs::canonicalize(&share.host).map_err(io(format!("{}", share.host.display())))?;
        copy_tree(&original, &copy)?;
        share.host = copy;
    }
    Ok(shares)
}

/// `cp -R`, as copy-on-write clones where the file system has them: APFS clones on macOS (`cp -c`,
/// instant and taking no space), reflinks on Linux file systems that have them; a plain copy otherwise.
fn copy_tree(from: &Path, to: &Path) -> Result<(), VmError> {
    let clone = if cfg!(target_os = "macos") {
        ["-c", "-Rp"]
    } else {
        ["--reflink=auto", "-Rp"]
    };
    let attempts: [&[&str]; 2] = [&clone, &["-Rp"]];
    let mut last = String::new();
    for flags in attempts {
        let _ = std::fs::remove_dir_all(to);
        let output = Command::new("cp")
            .args(flags)
            .arg(from)
            .arg(to)
            .output()
            .map_err(io("run cp"))?;
        if output.status.success() {
            return Ok(());
        }
        last = String::from_utf8_lossy(&output.stderr).trim().to_string();
    }
    Err(VmError::Setup(format!(
        "copying the read-only folder {} for the guest failed: {last}",
        from.display()
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{GuestArch, Runner};
    use crate::RunOptions;
    use base64::Engine;

    fn plan(options: RunOptions) -> Plan {
        crate::golden_plan(GuestArch::Aarch64, Runner::Vfkit, 2, 1024, &options)
    }

    fn command(text: &str) -> RunOptions {
        RunOptions {
            command: Some(text.into()),
            ..RunOptions::default()
        }
    }

    #[test]
    fn the_vfkit_command_line_is_exactly_this() {
        let plan = plan(command("pexi-fetch https://example.com/"));
        let shares = vec![Share {
            tag: "pexishare".into(),
            host: "/run/pexi-vm/shares/pexishare".into(),
            writable: false,
        }];
        let cmd =
            base64::engine::general_purpose::STANDARD.encode("pexi-fetch https://example.com/");
        let expected = [
            "--cpus",
            "2",
            "--memory",
            "1024",
            "--kernel",
            "/img/Image",
            "--initrd",
            "/img/initramfs.cpio.gz",
            "--kernel-cmdline",
            &format!(
                "console=hvc0 quiet panic=-1 pexi.cmd={cmd} pexi.fs=virtiofs pexi.endpoint=vsock:2:4041 pexi.share=ro"
            ),
            "--device",
            "virtio-serial,logFilePath=/run/pexi-vm/console.log",
            "--device",
            "virtio-vsock,port=4041,socketURL=/run/pexi-vm/vsock.sock_4041,listen",
            "--device",
            "virtio-fs,sharedDir=/run/pexi-vm/shares/pexishare,mountTag=pexishare",
        ];
        assert_eq!(plan.vfkit_args(&shares).expect("args"), expected);
        // The PEP listens where vfkit dials, and nowhere for a virtio-serial port the VM does not have.
        assert_eq!(
            plan.pep_sockets(),
            [std::path::PathBuf::from("/run/pexi-vm/vsock.sock_4041")]
        );
    }

    #[test]
    fn every_folder_gets_a_tag_and_read_only_ones_are_copied_for_the_run() {
        let dir = std::env::temp_dir().join(format!("pexi-vfkit-shares-{}", std::process::id()));
        let share = dir.join("share");
        let output = dir.join("out");
        std::fs::create_dir_all(share.join("bin")).expect("mkdir");
        std::fs::write(share.join("bin/tool"), "#!/bin/sh\n").expect("write");
        std::fs::set_permissions(
            share.join("bin/tool"),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .expect("chmod");
        let mut vm = crate::embedded_vm();
        vm.runner = Runner::Vfkit;
        vm.share = share.clone();
        vm.run_dir = dir.join("run");
        let plan = Plan::new(
            &vm,
            &RunOptions {
                output: Some(output.clone()),
                ..RunOptions::default()
            },
        )
        .expect("plan");
        let shares = prepare_shares(&plan, &dir.join("run/shares")).expect("shares");
        let copy = dir.join("run/shares/pexishare");
        assert_eq!(
            shares,
            [
                Share {
                    tag: "pexishare".into(),
                    host: copy.clone(),
                    writable: false
                },
                Share {
                    tag: "pexim0".into(),
                    host: output,
                    writable: true
                },
            ]
        );
        // The copy is whole, modes included; the guest writing to it leaves the original alone.
        let tool = std::fs::metadata(copy.join("bin/tool")).expect("copied");
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&tool.permissions()) & 0o777,
            0o755
        );
        std::fs::write(copy.join("planted"), "x").expect("write the copy");
        assert!(!share.join("planted").exists());
        // A share configured through a symbolic link is copied all the same, not shared as the link.
        let link = dir.join("share-link");
        std::os::unix::fs::symlink(&share, &link).expect("symlink");
        vm.share = link;
        let linked = Plan::new(&vm, &RunOptions::default()).expect("plan");
        prepare_shares(&linked, &dir.join("run/shares")).expect("shares");
        assert!(!std::fs::symlink_metadata(&copy)
            .expect("copy")
            .file_type()
            .is_symlink());
        std::fs::write(copy.join("planted-through-link"), "x").expect("write the copy");
        assert!(!share.join("planted-through-link").exists());
        let line = plan.cmdline().expect("cmdline");
        assert!(line.contains(" pexi.mounts="), "{line}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_network_device_or_any_other_is_refused() {
        let mut args = plan(command("true")).vfkit_args(&[]).expect("args");
        assert!(check_devices(&args).is_ok());
        for device in [
            "virtio-net,nat",
            "virtio-net,unixSocketPath=/tmp/net.sock,mac=52:54:00:00:00:01",
            "virtio-blk,path=/tmp/disk.img",
            "rosetta,mountTag=rosetta",
        ] {
            for form in [
                vec!["--device".to_string(), device.to_string()],
                vec![format!("--device={device}")],
                vec!["-d".to_string(), device.to_string()],
            ] {
                let mut bad = args.clone();
                bad.extend(form);
                let err = check_devices(&bad).expect_err(device);
                assert!(err.to_string().contains("refusing"), "{err}");
                if device.starts_with("virtio-net") {
                    assert!(err.to_string().contains("network device"), "{err}");
                }
            }
        }
        args.push("--device".into());
        assert!(check_devices(&args).is_err(), "a --device without a value");
    }

    #[test]
    fn paths_vfkit_would_split_are_refused() {
        let plan = plan(command("true"));
        for path in ["/tmp/a,b", "/tmp/\"q\"", "relative/share"] {
            let share = Share {
                tag: "pexishare".into(),
                host: path.into(),
                writable: false,
            };
            let err = plan.vfkit_args(&[share]).expect_err(path);
            assert!(err.to_string().contains("without commas"), "{err}");
        }
    }

    #[test]
    fn vsock_cannot_be_turned_off_under_vfkit() {
        let mut vm = crate::embedded_vm();
        vm.runner = Runner::Vfkit;
        let err = Plan::new(
            &vm,
            &RunOptions {
                no_vsock: true,
                ..RunOptions::default()
            },
        )
        .expect_err("no vsock");
        assert!(err.to_string().contains("only channel"), "{err}");
    }
}
