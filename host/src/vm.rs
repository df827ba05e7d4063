//! `pexi vm run` on the host's side: the VM runner is its own crate (`pexi-vm`: plans, QEMU and vfkit,
//! profiles); this starts the PEP it needs, in this process, on the sockets the run names.

use pexi_vm::{Pep, RunOptions, VmError};

use crate::config::{Config, Listen, Listener, VmIdentity};
use crate::server::Server;

/// The PEP of one run.
struct RunPep(Server);

impl Pep for RunPep {
    async fn stop(self) {
        if let Err(err) = self.0.stop().await {
            tracing::warn!("stopping the PEP: {err}");
        }
    }
}

/// Boots the guest of `config`'s `[vm]`, served by a PEP on `config`'s other tables, its guest known to
/// the policy as `identity`; returns the guest command's exit status.
pub async fn run(
    mut config: Config,
    options: RunOptions,
    identity: VmIdentity,
) -> Result<i32, VmError> {
    let vm = config
        .vm
        .clone()
        .ok_or_else(|| VmError::Setup(format!("{} has no [vm] table", config.source)))?;
    // The run folder lies in the user's owner-only folders: made and checked before anything goes there.
    crate::dirs::ensure_private_all(&vm.private_dirs)
        .map_err(|err| VmError::Setup(err.to_string()))?;
    pexi_vm::run(&vm, options, |sockets| async move {
        let vm = std::sync::Arc::new(identity);
        config.pep.listen = sockets
            .into_iter()
            .map(|path| Listener {
                at: Listen::Unix(path),
                vm: vm.clone(),
            })
            .collect();
        Server::start(config)
            .await
            .map(RunPep)
            .map_err(|err| err.to_string())
    })
    .await
}
