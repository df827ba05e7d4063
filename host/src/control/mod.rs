//! The PEP's surfaces for people (docs/approvals.md): one HTTP API, served on the control socket (owner-only
//! by its mode and by the peer's uid) for `pexi approve` and `pexi ui`, and on a loopback port for the
//! dashboard page, where a per-start token and same-origin checks stand in for the socket's permissions
//! (`access.rs`). The dashboard's address goes into the address guard before it accepts anything, so no
//! guest request can reach it whatever `allowed_cidrs` says. The Prometheus endpoint (`metrics.rs`) is
//! started here too, and guarded the same way.

mod access;
mod api;
pub mod client;
mod metrics;
mod page;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::pipeline::Pipeline;

/// Where the dashboard listens, and this start's token that opens it (given only to the PEP's user).
#[derive(Clone, Debug)]
pub(crate) struct Dashboard {
    pub addr: SocketAddr,
    pub token: String,
}

impl Dashboard {
    pub fn url(&self) -> String {
        format!("http://{}/?token={}", self.addr, self.token)
    }
}

/// Binds the control socket and the dashboard (if configured) and serves them until `shutdown`.
pub(crate) async fn start(
    pipeline: Arc<Pipeline>,
    shutdown: CancellationToken,
    tasks: &TaskTracker,
) -> Result<(), String> {
    let config = &pipeline.config.pep;
    let socket = config.control.socket_path(&config.audit);
    let dashboard_addr = config.control.dashboard_addr()?;
    if let Some(addr) = config.metrics.addr()? {
        metrics::start(pipeline.clone(), addr, shutdown.clone(), tasks).await?;
    }
    let dashboard = match dashboard_addr {
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|err| format!("pep.control.dashboard {addr}: {err}"))?;
            let addr = listener
                .local_addr()
                .map_err(|err| format!("pep.control.dashboard {addr}: {err}"))?;
            // Before the first connection is accepted, and before any guest is served.
            pipeline.add_own_surface(addr);
            let dashboard = Dashboard {
                addr,
                token: access::new_token()?,
            };
            Some((listener, dashboard))
        }
        None => None,
    };
    let unix = bind_socket(&socket)?;
    // Removed at the end only if it is still this PEP's (another PEP on the same paths may have
    // replaced it meanwhile).
    let inode = std::fs::symlink_metadata(&socket)
        .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
        .ok();
    let state = api::State::new(
        pipeline.clone(),
        dashboard.as_ref().map(|(_, d)| d.clone()),
        shutdown.clone(),
    );
    tracing::info!(socket = %socket.display(), "control socket listening");
    let app = api::router(state.clone()).layer(axum::middleware::from_fn(access::socket_peer));
    let stop = shutdown.clone();
    let path = socket.clone();
    tasks.spawn(async move {
        let served = axum::serve(
            unix,
            app.into_make_service_with_connect_info::<access::SocketPeer>(),
        )
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await;
        if let Err(err) = served {
            tracing::warn!(%err, "control socket stopped");
        }
        let still_ours = std::fs::symlink_metadata(&path)
            .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
            .ok();
        if inode.is_some() && still_ours == inode {
            let _ = std::fs::remove_file(&path);
        }
    });
    if let Some((listener, dashboard)) = dashboard {
        tracing::info!(addr = %dashboard.addr, "dashboard listening (pexi ui prints its address)");
        let app = api::router(state).layer(axum::middleware::from_fn_with_state(
            Arc::new(dashboard),
            access::dashboard,
        ));
        let stop = shutdown.clone();
        tasks.spawn(async move {
            let served = axum::serve(listener, app)
                .with_graceful_shutdown(async move { stop.cancelled().await })
                .await;
            if let Err(err) = served {
                tracing::warn!(%err, "dashboard stopped");
            }
        });
    }
    Ok(())
}

fn bind_socket(path: &Path) -> Result<tokio::net::UnixListener, String> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let failed = |err: std::io::Error| format!("control socket {}: {err}", path.display());
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(failed)?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => std::fs::remove_file(path).map_err(failed)?,
        Ok(_) => {
            return Err(failed(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "exists and is not a socket",
            )))
        }
        Err(_) => {}
    }
    let listener = tokio::net::UnixListener::bind(path).map_err(failed)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(failed)?;
    Ok(listener)
}
