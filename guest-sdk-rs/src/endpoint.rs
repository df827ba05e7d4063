//! Where the PEP is: a virtio-serial port, vsock, or a Unix socket.

use std::fmt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::str::FromStr;

use tokio::io::{AsyncRead, AsyncWrite};

use crate::Error;

/// The virtio-serial port name the host exposes.
pub const DEFAULT_PORT_NAME: &str = pexi_protocol::transport::VIRTIO_SERIAL_PORT_NAME;
/// The host's CID as seen from a guest.
pub const HOST_CID: u32 = 2;

#[derive(Clone, Debug, PartialEq, Eq)]
/// Where the PEP is. Parse one with `str::parse` or [`Endpoint::from_env`].
pub enum Endpoint {
    /// `virtio:NAME`: the virtio-serial port with that name (`/sys/class/virtio-ports/*/name`), or
    /// `virtio:/dev/PATH`: a character device given by its path.
    Virtio(String),
    /// `vsock:CID:PORT` (`vsock` alone is CID 2, port 4041).
    Vsock {
        /// The host's context id (2 from inside a guest).
        cid: u32,
        /// The port the PEP listens on (4041).
        port: u32,
    },
    /// `unix:PATH`: development without a VM, and tests.
    Unix(PathBuf),
}

impl FromStr for Endpoint {
    type Err = Error;

    fn from_str(text: &str) -> Result<Endpoint, Error> {
        let bad = || {
            Error::Endpoint(format!(
                "{text:?}: expected virtio:NAME, vsock:CID:PORT or unix:PATH"
            ))
        };
        let (kind, rest) = text.split_once(':').unwrap_or((text, ""));
        match kind {
            "virtio" if !rest.is_empty() => Ok(Endpoint::Virtio(rest.to_string())),
            "virtio" => Ok(Endpoint::Virtio(DEFAULT_PORT_NAME.to_string())),
            "vsock" if rest.is_empty() => Ok(Endpoint::Vsock {
                cid: HOST_CID,
                port: pexi_protocol::transport::VSOCK_PORT,
            }),
            "vsock" => {
                let (cid, port) = rest.split_once(':').ok_or_else(bad)?;
                Ok(Endpoint::Vsock {
                    cid: cid.parse().map_err(|_| bad())?,
                    port: port.parse().map_err(|_| bad())?,
                })
            }
            "unix" if !rest.is_empty() => Ok(Endpoint::Unix(PathBuf::from(rest))),
            _ => Err(bad()),
        }
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Virtio(name) => write!(f, "virtio:{name}"),
            Endpoint::Vsock { cid, port } => write!(f, "vsock:{cid}:{port}"),
            Endpoint::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

/// Where pexi-guestd serves the pexi protocol for the guest's other processes (`pexi-guestd --socket`).
pub const GUESTD_SOCKET: &str = "/run/pexi/pep.sock";

impl Endpoint {
    /// `PEXI_ENDPOINT` if set; otherwise pexi-guestd's socket ([`GUESTD_SOCKET`]) when it exists, so
    /// processes share its one connection (a virtio-serial port admits one opener); otherwise the
    /// default virtio port if this guest has it.
    pub fn from_env() -> Result<Endpoint, Error> {
        if std::env::var_os("PEXI_ENDPOINT").is_none() && Path::new(GUESTD_SOCKET).exists() {
            return Ok(Endpoint::Unix(GUESTD_SOCKET.into()));
        }
        Endpoint::from_env_direct()
    }

    /// Like [`Endpoint::from_env`] without pexi-guestd's socket: `PEXI_ENDPOINT`, else the default
    /// virtio port. What pexi-guestd itself uses.
    pub fn from_env_direct() -> Result<Endpoint, Error> {
        match std::env::var("PEXI_ENDPOINT") {
            Ok(text) => text.parse(),
            Err(_) => match find_virtio_port(Path::new("/sys/class/virtio-ports"), DEFAULT_PORT_NAME) {
                Some(_) => Ok(Endpoint::Virtio(DEFAULT_PORT_NAME.to_string())),
                None => Err(Error::Endpoint(format!(
                    "PEXI_ENDPOINT is not set and there is no virtio port named {DEFAULT_PORT_NAME}; \
                     set PEXI_ENDPOINT=virtio:NAME, vsock:CID:PORT or unix:PATH"
                ))),
            },
        }
    }
}

/// A byte stream to the PEP.
pub trait Transport: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Transport for T {}

/// A boxed transport as a connector returns it.
pub type BoxTransport = Pin<Box<dyn Transport>>;
type ConnectFuture<'a> =
    Pin<Box<dyn std::future::Future<Output = std::io::Result<BoxTransport>> + Send + 'a>>;

/// Makes transports; the client calls it again after the transport fails. Implement it to run the SDK over
/// something else (tests use it to simulate a virtio-serial port that disconnects mid-frame).
pub trait Connector: Send + Sync + 'static {
    /// Opens a new transport.
    fn connect(&self) -> ConnectFuture<'_>;

    /// A virtio-serial port reads 0 bytes while the host end is closed; that is a pause, not the end.
    fn zero_read_is_eof(&self) -> bool {
        true
    }

    /// Where this connector goes, for error messages.
    fn describe(&self) -> String;
}

impl Connector for Endpoint {
    fn connect(&self) -> ConnectFuture<'_> {
        Box::pin(async move {
            match self {
                Endpoint::Unix(path) => {
                    let stream = tokio::net::UnixStream::connect(path).await?;
                    Ok(Box::pin(stream) as BoxTransport)
                }
                Endpoint::Vsock { cid, port } => {
                    let addr = tokio_vsock::VsockAddr::new(*cid, *port);
                    let stream = tokio_vsock::VsockStream::connect(addr).await?;
                    Ok(Box::pin(stream) as BoxTransport)
                }
                Endpoint::Virtio(name) => {
                    let dev = if name.starts_with('/') {
                        PathBuf::from(name)
                    } else {
                        find_virtio_port(Path::new("/sys/class/virtio-ports"), name).ok_or_else(
                            || {
                                std::io::Error::new(
                                    std::io::ErrorKind::NotFound,
                                    format!("no virtio port named {name}"),
                                )
                            },
                        )?
                    };
                    Ok(Box::pin(PortStream::open(&dev)?) as BoxTransport)
                }
            }
        })
    }

    fn zero_read_is_eof(&self) -> bool {
        !matches!(self, Endpoint::Virtio(_))
    }

    fn describe(&self) -> String {
        self.to_string()
    }
}

/// A virtio-serial port (any character device) opened non-blocking and driven by readiness. A blocking
/// file cannot carry the protocol: `tokio::fs::File` runs one operation at a time, so a read waiting for the
/// host holds up the HELLO that would answer it (and a blocked writer beside a poller can hang older
/// kernels' virtio-serial driver). With readiness, reading and writing proceed independently.
pub struct PortStream {
    // Two handles on one open port (dup'd): tokio drives a receiving and a sending end independently.
    rx: tokio::net::unix::pipe::Receiver,
    tx: tokio::net::unix::pipe::Sender,
}

impl PortStream {
    /// Opens `path` read-write, non-blocking, never as a controlling terminal. Must run on a tokio runtime.
    pub fn open(path: &Path) -> std::io::Result<PortStream> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
            .open(path)?;
        let writer = file.try_clone()?;
        Ok(PortStream {
            // "unchecked": these are character devices, not FIFOs; only readiness is borrowed from pipes.
            rx: tokio::net::unix::pipe::Receiver::from_file_unchecked(file)?,
            tx: tokio::net::unix::pipe::Sender::from_file_unchecked(writer)?,
        })
    }
}

impl AsyncRead for PortStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        Pin::new(&mut self.rx).poll_read(cx, buf)
    }
}

impl AsyncWrite for PortStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        data: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        Pin::new(&mut self.tx).poll_write(cx, data)
    }

    // The driver sends a burst of frames (headers and payloads) with one writev when the transport can.
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        slices: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        Pin::new(&mut self.tx).poll_write_vectored(cx, slices)
    }

    fn is_write_vectored(&self) -> bool {
        self.tx.is_write_vectored()
    }

    fn poll_flush(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        Pin::new(&mut self.tx).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        Pin::new(&mut self.tx).poll_shutdown(cx)
    }
}

/// `/dev/vportNpM` of the port whose `/sys/class/virtio-ports/vportNpM/name` is `name`.
pub fn find_virtio_port(sys: &Path, name: &str) -> Option<PathBuf> {
    std::fs::read_dir(sys).ok()?.flatten().find_map(|entry| {
        let port_name = std::fs::read_to_string(entry.path().join("name")).ok()?;
        (port_name.trim() == name).then(|| PathBuf::from("/dev").join(entry.file_name()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_parse_and_print() {
        for (text, want) in [
            (
                "unix:/run/pexi.sock",
                Endpoint::Unix("/run/pexi.sock".into()),
            ),
            ("vsock:2:4041", Endpoint::Vsock { cid: 2, port: 4041 }),
            ("vsock", Endpoint::Vsock { cid: 2, port: 4041 }),
            (
                "virtio:org.pexi.pep.0",
                Endpoint::Virtio("org.pexi.pep.0".into()),
            ),
            ("virtio", Endpoint::Virtio("org.pexi.pep.0".into())),
        ] {
            assert_eq!(text.parse::<Endpoint>(), Ok(want.clone()), "{text}");
            assert_eq!(want.to_string().parse::<Endpoint>(), Ok(want));
        }
        for bad in ["", "tcp:1.2.3.4:80", "vsock:x:1", "vsock:2", "unix:"] {
            assert!(bad.parse::<Endpoint>().is_err(), "{bad}");
        }
    }

    #[test]
    fn virtio_ports_are_found_by_name() {
        let sys = std::env::temp_dir().join(format!("pexi-sys-{}", std::process::id()));
        for (port, name) in [
            ("vport1p1", "org.qemu.guest_agent.0"),
            ("vport2p1", "org.pexi.pep.0"),
        ] {
            std::fs::create_dir_all(sys.join(port)).expect("mkdir");
            std::fs::write(sys.join(port).join("name"), format!("{name}\n")).expect("write");
        }
        assert_eq!(
            find_virtio_port(&sys, "org.pexi.pep.0"),
            Some(PathBuf::from("/dev/vport2p1"))
        );
        assert_eq!(find_virtio_port(&sys, "missing"), None);
        std::fs::remove_dir_all(&sys).expect("cleanup");
    }
}
