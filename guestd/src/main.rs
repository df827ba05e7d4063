//! `pexi-guestd`: the guest's daemon. It holds the one connection to the PEP (virtio-serial, vsock, or a
//! Unix socket in development) and runs the HTTP forward proxy that unmodified programs use
//! (`HTTP_PROXY`/`HTTPS_PROXY`, OpenClaw's `proxy.proxyUrl`); see docs/guest.md.
//!
//! ```sh
//! pexi-guestd --endpoint unix:/run/user/1000/pexi/pep.sock --listen 127.0.0.1:3128 --ca-cert /run/pexi/ca.pem
//! ```
//!
//! When everything is bound it prints `pexi-guestd: proxy http://ADDR ca PATH socket PATH` to stdout, so a
//! supervisor (or a test, with `--listen 127.0.0.1:0`) knows the address; with `--transparent` a second
//! line follows, `pexi-guestd: transparent dns ADDR range CIDR ports LIST`.

mod ca;
mod mux;
mod proxy;
mod transparent;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use clap::Parser;
use pexi_guest::{Client, Endpoint};

#[derive(Parser)]
#[command(
    name = "pexi-guestd",
    version,
    about = "The pexi guest daemon: a forward proxy whose only way out is the PEP"
)]
struct Args {
    /// The PEP: unix:PATH, virtio:NAME, virtio:/dev/PATH or vsock:CID:PORT. Default: $PEXI_ENDPOINT, else
    /// the virtio-serial port org.pexi.pep.0.
    #[arg(long)]
    endpoint: Option<String>,
    /// Where the proxy listens (loopback).
    #[arg(long, default_value = "127.0.0.1:3128")]
    listen: SocketAddr,
    /// Where the per-boot CA certificate (PEM) is written for programs to trust.
    #[arg(long, default_value = "/run/pexi/ca.pem")]
    ca_cert: PathBuf,
    /// How a CONNECT to a host no allowlist entry names is refused: `tunnel` (the default) opens the
    /// tunnel and answers each request inside with pexi's 403, reasons and decision id, since most clients
    /// (undici, hence OpenClaw; curl) do not show a refused CONNECT's body; `early` answers 403 before any
    /// TLS. Nothing reaches the host either way.
    #[arg(long, value_parser = ["early", "tunnel"], default_value = "tunnel")]
    deny_connect: String,
    /// The local pexi socket: other processes (the SDKs, by default) reach the PEP through it, sharing
    /// this daemon's one connection. "" for none.
    // An OsString, not a PathBuf: clap's path parser refuses the empty value that means "none".
    #[arg(long, default_value = pexi_guest::endpoint::GUESTD_SOCKET, value_parser = clap::value_parser!(std::ffi::OsString))]
    socket: std::ffi::OsString,
    /// Transparent mode, for programs that ignore proxy settings: a DNS stub on --dns answers every name
    /// with a synthetic address from --synthetic-range, and connections to those addresses on
    /// --capture-ports are carried through the PEP like CONNECTs. Point the resolver (/etc/resolv.conf) at
    /// the stub. Binding ports below 1024 needs root (or CAP_NET_BIND_SERVICE).
    #[arg(long)]
    transparent: bool,
    /// Where the DNS stub listens (UDP, loopback).
    #[arg(long, default_value = "127.0.0.53:53", requires = "transparent")]
    dns: SocketAddr,
    /// The reserved loopback range synthetic addresses come from.
    #[arg(long, default_value = "127.77.0.0/16", requires = "transparent")]
    synthetic_range: transparent::Range,
    /// The ports captured on synthetic addresses (comma-separated). Connections to other ports of a
    /// synthetic address are refused by the kernel: nothing listens there.
    #[arg(
        long,
        default_value = "80,443",
        value_delimiter = ',',
        requires = "transparent"
    )]
    capture_ports: Vec<u16>,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    // Warnings by default; RUST_LOG=debug shows each client connection's end.
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        // Init sends stderr to a file in the guest: colour only for a person at a terminal.
        .with_ansi(
            std::io::IsTerminal::is_terminal(&std::io::stderr())
                && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty()),
        )
        .init();
    let args = Args::parse();
    match run(args).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("pexi-guestd: {message}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<(), String> {
    let socket = PathBuf::from(&args.socket);
    if !args.listen.ip().is_loopback() {
        return Err(format!(
            "--listen {}: the proxy listens on loopback only",
            args.listen
        ));
    }
    // Never its own socket: the daemon is what that socket leads to.
    let client = match &args.endpoint {
        Some(text) => Client::new(text.parse::<Endpoint>().map_err(|err| err.to_string())?),
        None => Client::new(Endpoint::from_env_direct().map_err(|err| err.to_string())?),
    };
    if !socket.as_os_str().is_empty() {
        if let Some(dir) = socket.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|err| format!("{}: {err}", dir.display()))?;
        }
        // A socket file left by an earlier run would refuse the bind.
        let _ = std::fs::remove_file(&socket);
        let listener = tokio::net::UnixListener::bind(&socket)
            .map_err(|err| format!("{}: {err}", socket.display()))?;
        // Any local user may use it: the proxy is open to them too, and the PEP decides everything.
        std::fs::set_permissions(&socket, std::os::unix::fs::PermissionsExt::from_mode(0o666))
            .map_err(|err| format!("{}: {err}", socket.display()))?;
        let mux_client = client.clone();
        tokio::spawn(async move {
            loop {
                if let Some((stream, _)) =
                    accepted(listener.accept().await, "the local socket").await
                {
                    tokio::spawn(mux::serve(mux_client.clone(), stream));
                }
            }
        });
    }
    let ca = ca::Authority::generate()?;
    ca.write_certificate(&args.ca_cert)
        .map_err(|err| format!("{}: {err}", args.ca_cert.display()))?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|err| format!("listen on {}: {err}", args.listen))?;
    let local = listener
        .local_addr()
        .map_err(|err| format!("listen address: {err}"))?;
    let shown = if socket.as_os_str().is_empty() {
        "none".to_string()
    } else {
        socket.display().to_string()
    };
    let proxy = Arc::new(proxy::Proxy {
        client,
        ca,
        early_connect_refusal: args.deny_connect == "early",
    });
    let transparent = if args.transparent {
        Some(start_transparent(&args, proxy.clone()).await?)
    } else {
        None
    };
    // Ready: everything is bound. The proxy's line first (supervisors read it for the address).
    println!(
        "pexi-guestd: proxy http://{local} ca {} socket {shown}",
        args.ca_cert.display()
    );
    if let Some(line) = transparent {
        println!("{line}");
    }
    loop {
        let Some((stream, _)) = accepted(listener.accept().await, "the proxy port").await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(proxy.clone().serve_connection(stream, None));
    }
}

/// An accepted connection, or `None` after a failed accept (out of file descriptors and the like), logged
/// and followed by a short wait so that the accept loop does not spin.
async fn accepted<T>(result: std::io::Result<T>, what: &str) -> Option<T> {
    match result {
        Ok(accepted) => Some(accepted),
        Err(err) => {
            tracing::warn!(%err, "accept on {what} failed");
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            None
        }
    }
}

/// Binds the DNS stub and the capture ports and serves them in the background; returns the line that says
/// so. Every bind happens before the ready line, so a supervisor that saw it knows resolution works.
async fn start_transparent(args: &Args, proxy: Arc<proxy::Proxy>) -> Result<String, String> {
    if !args.dns.ip().is_loopback() {
        return Err(format!(
            "--dns {}: the stub listens on loopback only",
            args.dns
        ));
    }
    if args.capture_ports.is_empty() || args.capture_ports.contains(&0) {
        return Err("--capture-ports: one or more ports, none of them 0".into());
    }
    let names = Arc::new(transparent::Names::new(args.synthetic_range));
    let dns = tokio::net::UdpSocket::bind(args.dns)
        .await
        .map_err(|err| format!("DNS stub on {}: {err}", args.dns))?;
    tokio::spawn(transparent::serve_dns(dns, names.clone()));
    for &port in &args.capture_ports {
        // The wildcard address: a listener bound to one address would catch only that address, and the
        // synthetic range is thousands. Connections to any other local address are reset at once.
        let address = SocketAddr::from(([0, 0, 0, 0], port));
        let listener = tokio::net::TcpListener::bind(address)
            .await
            .map_err(|err| format!("capture port {port}: {err}"))?;
        let (names, proxy) = (names.clone(), proxy.clone());
        tokio::spawn(async move {
            loop {
                let Some((stream, _)) = accepted(listener.accept().await, "a capture port").await
                else {
                    continue;
                };
                let destination = stream
                    .local_addr()
                    .ok()
                    .and_then(|local| transparent::destination(&names, local));
                let Some(host) = destination else {
                    // Not a synthetic address (127.0.0.1:443, say): not ours to carry.
                    let _ = stream.set_zero_linger();
                    continue;
                };
                let _ = stream.set_nodelay(true);
                tracing::debug!(
                    name = host.as_deref().unwrap_or("-"),
                    port,
                    "captured connection"
                );
                let target = proxy::Target {
                    host,
                    port,
                    connect_authority: None,
                };
                tokio::spawn(proxy.clone().intercept(stream, target));
            }
        });
    }
    let ports: Vec<String> = args.capture_ports.iter().map(u16::to_string).collect();
    Ok(format!(
        "pexi-guestd: transparent dns {} range {} ports {}",
        args.dns,
        args.synthetic_range,
        ports.join(",")
    ))
}
