//! The QEMU runner (Linux): QEMU's command line for a [`Plan`], x86_64 (`pc`) or aarch64 (`virt`, under
//! software emulation on an x86_64 host), with no network device, the PEP's virtio-serial port, vsock
//! through vhost-device-vsock and the shares over virtio-9p.

use super::{Plan, VmError};
use crate::config::GuestArch;

impl Plan {
    /// QEMU's arguments for `accel` (kvm or tcg).
    pub fn qemu_args(&self, accel: &str) -> Result<Vec<String>, VmError> {
        let vm = &self.vm;
        let cpus = vm.cpus.max(1);
        // x86's PC, or arm64's generic `virt` board (PCIe, so the same virtio-*-pci devices).
        let machine = match vm.arch {
            GuestArch::X86_64 => "pc",
            GuestArch::Aarch64 => "virt",
        };
        // Several vCPUs under TCG are only parallel with one host thread each (MTTCG).
        let accel_arg = if accel == "tcg" && cpus > 1 {
            "tcg,thread=multi".to_string()
        } else {
            accel.to_string()
        };
        let mut args: Vec<String> =
            vec!["-accel".into(), accel_arg, "-smp".into(), cpus.to_string()];
        if vm.arch == GuestArch::Aarch64 {
            // The virt board has no default CPU model; Cortex-A72 (ARMv8.0) is cheaper to emulate than
            // `max` (pointer authentication in software) and runs Debian's kernel and Node.
            let cpu = if accel == "kvm" { "host" } else { "cortex-a72" };
            args.extend(["-cpu".into(), cpu.into()]);
        }
        if self.vsock {
            // vhost-user needs guest memory the backend process can map.
            args.extend([
                "-machine".into(),
                format!("{machine},memory-backend=mem"),
                "-object".into(),
                format!(
                    "memory-backend-memfd,id=mem,size={}M,share=on",
                    vm.memory_mb
                ),
            ]);
        } else {
            args.extend(["-machine".into(), machine.into()]);
        }
        args.extend([
            "-m".into(),
            vm.memory_mb.to_string(),
            // No network device at all: the guest has loopback and nothing else.
            "-nic".into(),
            "none".into(),
            "-no-reboot".into(),
            "-display".into(),
            "none".into(),
            "-monitor".into(),
            "none".into(),
            "-serial".into(),
            format!("file:{}", self.console_log.display()),
            "-kernel".into(),
            vm.kernel.display().to_string(),
            "-initrd".into(),
            vm.initrd.display().to_string(),
            "-append".into(),
            self.cmdline()?,
            "-device".into(),
            "virtio-serial-pci".into(),
            "-chardev".into(),
            format!(
                "socket,id=pep,path={},reconnect=1",
                self.virtio_socket.display()
            ),
            "-device".into(),
            format!(
                "virtserialport,chardev=pep,name={}",
                pexi_protocol::transport::VIRTIO_SERIAL_PORT_NAME
            ),
        ]);
        if !vm.share.as_os_str().is_empty() {
            args.extend([
                "-fsdev".into(),
                format!(
                    "local,id=share,path={},security_model=none{}",
                    vm.share.display(),
                    if vm.share_writable {
                        ""
                    } else {
                        ",readonly=on"
                    }
                ),
                "-device".into(),
                "virtio-9p-pci,fsdev=share,mount_tag=pexishare".into(),
            ]);
        }
        for (i, mount) in self.mounts.iter().enumerate() {
            args.extend([
                "-fsdev".into(),
                format!(
                    "local,id=pexim{i},path={},security_model=none{}",
                    mount.host.display(),
                    if mount.writable { "" } else { ",readonly=on" }
                ),
                "-device".into(),
                format!("virtio-9p-pci,fsdev=pexim{i},mount_tag=pexim{i}"),
            ]);
        }
        if self.vsock {
            args.extend([
                "-chardev".into(),
                format!("socket,id=vsock,path={}", self.vhost_socket.display()),
                "-device".into(),
                "vhost-user-vsock-pci,chardev=vsock".into(),
            ]);
        }
        check_devices(&args)?;
        Ok(args)
    }
}

/// The only devices a pexi guest gets from QEMU: the virtio-serial port, vsock, the 9p shares.
const DEVICES: [&str; 4] = [
    "virtio-serial-pci",
    "virtserialport",
    "virtio-9p-pci",
    "vhost-user-vsock-pci",
];

/// Refuses a QEMU command line with a network (`-netdev`, `-net`, a `-nic` other than `none`) or any
/// device but the ones above, whatever put it there. The guest's only way out is the PEP.
pub fn check_devices(args: &[String]) -> Result<(), VmError> {
    let mut nic_none = false;
    for pair in args.windows(2) {
        let (flag, value) = (pair[0].as_str(), pair[1].as_str());
        let driver = value.split(',').next().unwrap_or_default();
        let refused = match flag {
            "-netdev" | "-net" => true,
            "-nic" => {
                nic_none |= value == "none";
                value != "none"
            }
            "-device" => !DEVICES.contains(&driver),
            _ => false,
        };
        if refused {
            return Err(VmError::Setup(format!(
                "refusing to start a VM with {flag} {value}: a pexi guest has no network device and gets only {}",
                DEVICES.join(", ")
            )));
        }
    }
    // Without `-nic none` QEMU adds its default NIC.
    if !nic_none {
        return Err(VmError::Setup(
            "refusing to start QEMU without -nic none: it would add its default network device"
                .into(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Runner;
    use crate::RunOptions;
    use base64::Engine;

    #[test]
    fn the_arm64_qemu_command_line_is_exactly_this() {
        let plan = crate::golden_plan(
            GuestArch::Aarch64,
            Runner::Qemu,
            1,
            768,
            &RunOptions {
                command: Some("true".into()),
                ..RunOptions::default()
            },
        );
        let cmd = base64::engine::general_purpose::STANDARD.encode("true");
        let expected = [
            "-accel",
            "tcg",
            "-smp",
            "1",
            "-cpu",
            "cortex-a72",
            "-machine",
            "virt,memory-backend=mem",
            "-object",
            "memory-backend-memfd,id=mem,size=768M,share=on",
            "-m",
            "768",
            "-nic",
            "none",
            "-no-reboot",
            "-display",
            "none",
            "-monitor",
            "none",
            "-serial",
            "file:/run/pexi-vm/console.log",
            "-kernel",
            "/img/Image",
            "-initrd",
            "/img/initramfs.cpio.gz",
            "-append",
            &format!("console=ttyAMA0 quiet panic=-1 pexi.cmd={cmd} pexi.share=ro"),
            "-device",
            "virtio-serial-pci",
            "-chardev",
            "socket,id=pep,path=/run/pexi-vm/virtio.sock,reconnect=1",
            "-device",
            "virtserialport,chardev=pep,name=org.pexi.pep.0",
            "-fsdev",
            "local,id=share,path=/img/share,security_model=none,readonly=on",
            "-device",
            "virtio-9p-pci,fsdev=share,mount_tag=pexishare",
            "-chardev",
            "socket,id=vsock,path=/run/pexi-vm/vhost-vsock.sock",
            "-device",
            "vhost-user-vsock-pci,chardev=vsock",
        ];
        assert_eq!(plan.qemu_args("tcg").expect("args"), expected);
        assert!(plan
            .qemu_args("kvm")
            .expect("args")
            .windows(2)
            .any(|w| w == ["-cpu", "host"]));
    }

    #[test]
    fn a_network_or_any_other_device_is_refused() {
        let plan = Plan::new(&crate::embedded_vm(), &RunOptions::default()).expect("plan");
        let args = plan.qemu_args("tcg").expect("args");
        assert!(check_devices(&args).is_ok());
        for extra in [
            ["-netdev", "user,id=n0"],
            ["-net", "nic"],
            ["-nic", "user"],
            ["-device", "virtio-net-pci,netdev=n0"],
            ["-device", "e1000"],
            ["-device", "usb-net"],
        ] {
            let mut bad = args.clone();
            bad.extend(extra.iter().map(|s| s.to_string()));
            let err = check_devices(&bad).expect_err(extra[1]);
            assert!(err.to_string().contains("refusing"), "{err}");
        }
        let without: Vec<String> = args
            .iter()
            .filter(|a| *a != "-nic" && *a != "none")
            .cloned()
            .collect();
        assert!(check_devices(&without).is_err(), "no -nic none");
    }
}
