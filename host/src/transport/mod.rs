//! Where guest connections come from. Each transport hands byte streams to [`serve_connection`]; nothing
//! here knows the protocol.
//!
//! - `unix:PATH`: a Unix listener — development clients, QEMU chardevs in client mode, and hybrid vsock
//!   (Firecracker, Cloud Hypervisor), whose guest connections to port P arrive on `<uds>_P`.
//! - `connect:PATH`: the PEP connects to a QEMU chardev that listens (`server=on`), and connects again with
//!   back-off when the VM restarts. virtio-serial gives no disconnect signal inside the guest, so the
//!   session re-handshakes (a new HELLO) or resynchronises on its own.
//! - `vsock:PORT`: an `AF_VSOCK` listener for Linux hosts with vhost-vsock (refused elsewhere: macOS has
//!   no host `AF_VSOCK`; there vfkit forwards the guest's port to a `unix:` socket).

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Listen, Listener, VmIdentity};
use crate::limits::admission::ListenerSlots;
use crate::pipeline::Pipeline;
use crate::serve::{serve_connection, Admitted, Peer};

/// Starts serving `listen`; connections are tracked in `tasks` so shutdown can wait for them.
pub async fn start(
    listener: &Listener,
    pipeline: Arc<Pipeline>,
    shutdown: CancellationToken,
    tasks: &TaskTracker,
) -> std::io::Result<()> {
    // Each listener holds at most max_sessions_per_listener sessions, all of them max_sessions.
    let slots = pipeline.admission.listener();
    let listen = &listener.at;
    let vm = listener.vm.clone();
    match listen {
        Listen::Unix(path) => {
            let bound = bind_unix(path)?;
            tracing::info!(listen = %listener, "listening");
            tasks.spawn(accept_unix(
                bound,
                path.clone(),
                vm,
                pipeline,
                shutdown,
                tasks.clone(),
                slots,
            ));
        }
        Listen::Connect(path) => {
            tracing::info!(listen = %listener, "connecting");
            tasks.spawn(connect_loop(path.clone(), vm, pipeline, shutdown, slots));
        }
        Listen::Vsock(port) => {
            // macOS has no AF_VSOCK for the host: Virtualization.framework's runner (vfkit) forwards the
            // guest's vsock port to a `unix:` socket instead, which `pexi vm run` sets up.
            if !cfg!(target_os = "linux") {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::Unsupported,
                    format!(
                        "vsock:{port}: vsock listeners need Linux's AF_VSOCK; on macOS listen on a unix: socket \
                         that the VM runner forwards the guest's vsock port to (pexi vm run does this with vfkit)"
                    ),
                ));
            }
            let addr = tokio_vsock::VsockAddr::new(tokio_vsock::VMADDR_CID_ANY, *port);
            let bound = tokio_vsock::VsockListener::bind(addr)?;
            tracing::info!(listen = %listener, "listening");
            tasks.spawn(accept_vsock(
                bound,
                vm,
                pipeline,
                shutdown,
                tasks.clone(),
                slots,
            ));
        }
    }
    Ok(())
}

fn bind_unix(path: &Path) -> std::io::Result<tokio::net::UnixListener> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    // A socket left by an earlier run is replaced; anything else at that path is not ours to delete.
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => std::fs::remove_file(path)?,
        Ok(_) => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket", path.display()),
            ))
        }
        Err(_) => {}
    }
    let listener = tokio::net::UnixListener::bind(path)?;
    // Only the owner (the VM runner, the developer) may connect.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

async fn accept_unix(
    listener: tokio::net::UnixListener,
    path: std::path::PathBuf,
    vm: Arc<VmIdentity>,
    pipeline: Arc<Pipeline>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
    slots: ListenerSlots,
) {
    let mut serial = 0u64;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    serial += 1;
                    let peer = Peer { place: format!("unix:{}#{serial}", path.display()), vm: vm.clone() };
                    let admitted = admit(&pipeline, &slots);
                    tasks.spawn(serve_connection(stream, pipeline.clone(), shutdown.clone(), peer, admitted));
                }
                Err(err) => {
                    tracing::warn!(%err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
    let _ = std::fs::remove_file(&path);
}

async fn connect_loop(
    path: std::path::PathBuf,
    vm: Arc<VmIdentity>,
    pipeline: Arc<Pipeline>,
    shutdown: CancellationToken,
    slots: ListenerSlots,
) {
    let mut backoff = Duration::from_millis(100);
    let mut serial = 0u64;
    while !shutdown.is_cancelled() {
        let connected = tokio::select! {
            _ = shutdown.cancelled() => break,
            connected = tokio::net::UnixStream::connect(&path) => connected,
        };
        match connected {
            Ok(stream) => {
                backoff = Duration::from_millis(100);
                serial += 1;
                let peer = Peer {
                    place: format!("connect:{}#{serial}", path.display()),
                    vm: vm.clone(),
                };
                tracing::info!(%peer, "connected");
                let admitted = admit(&pipeline, &slots);
                let refused = matches!(admitted, Admitted::No(_));
                serve_connection(stream, pipeline.clone(), shutdown.clone(), peer, admitted).await;
                if refused {
                    // The VM is still there and will HELLO again: try again once sessions may have ended.
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
            Err(err) => {
                tracing::debug!(path = %path.display(), %err, "connect failed; retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

async fn accept_vsock(
    listener: tokio_vsock::VsockListener,
    vm: Arc<VmIdentity>,
    pipeline: Arc<Pipeline>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
    slots: ListenerSlots,
) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, addr)) => {
                    let peer = Peer { place: format!("vsock:cid{}:{}", addr.cid(), addr.port()), vm: vm.clone() };
                    let admitted = admit(&pipeline, &slots);
                    tasks.spawn(serve_connection(stream, pipeline.clone(), shutdown.clone(), peer, admitted));
                }
                Err(err) => {
                    tracing::warn!(%err, "vsock accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
}

fn admit(pipeline: &Pipeline, slots: &ListenerSlots) -> Admitted {
    match pipeline.admission.admit(slots) {
        Ok(slot) => Admitted::Yes(slot),
        Err(refusal) => Admitted::No(refusal),
    }
}
