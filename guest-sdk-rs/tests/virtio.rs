//! The SDK over a simulated virtio-serial port. The guest keeps one end of a socket pair for good (a
//! virtio port never reports a disconnect); a relay carries bytes between the other end and the PEP's
//! Unix socket. Tests cut the host side in the middle of a frame and bring it back as a fresh connection
//! (a restarted host), and inject garbage in either direction.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use pexi_guest::endpoint::{BoxTransport, Connector};
use pexi_guest::{Client, Options};
use pexi_host::config::Config;
use pexi_host::server::Server;
use pexi_test_support::{loopback_options, temp_dir, write_config, TestDir, Upstream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;
use tokio::sync::mpsc;

enum Control {
    Attach(UnixStream),
    /// Drop the host connection, leaving the guest half a frame.
    Cut,
    /// A fresh host connection, as after a PEP restart.
    Restore,
    ToGuest(Vec<u8>),
    ToHost(Vec<u8>),
}

struct Port {
    control: mpsc::UnboundedSender<Control>,
}

impl Port {
    fn new(socket: PathBuf) -> Arc<Port> {
        let (control, queue) = mpsc::unbounded_channel();
        tokio::spawn(relay(socket, queue));
        Arc::new(Port { control })
    }

    fn send(&self, control: Control) {
        self.control.send(control).expect("relay alive");
    }
}

impl Connector for Port {
    fn connect(
        &self,
    ) -> std::pin::Pin<
        Box<dyn std::future::Future<Output = std::io::Result<BoxTransport>> + Send + '_>,
    > {
        Box::pin(async move {
            let (guest, relay_end) = UnixStream::pair()?;
            self.control
                .send(Control::Attach(relay_end))
                .map_err(|_| std::io::Error::other("relay gone"))?;
            Ok(Box::pin(guest) as BoxTransport)
        })
    }

    fn zero_read_is_eof(&self) -> bool {
        false
    }

    fn describe(&self) -> String {
        "simulated virtio-serial port".into()
    }
}

type Halves = (OwnedReadHalf, OwnedWriteHalf);

async fn read_side(side: &mut Option<Halves>, buf: &mut [u8]) -> std::io::Result<usize> {
    match side {
        Some((reader, _)) => reader.read(buf).await,
        None => std::future::pending().await,
    }
}

async fn relay(socket: PathBuf, mut control: mpsc::UnboundedReceiver<Control>) {
    let mut guest: Option<Halves> = None;
    let mut host: Option<Halves> = UnixStream::connect(&socket)
        .await
        .ok()
        .map(UnixStream::into_split);
    let mut guest_buf = vec![0u8; 65_536];
    let mut host_buf = vec![0u8; 65_536];
    loop {
        tokio::select! {
            command = control.recv() => match command {
                None => return,
                Some(Control::Attach(stream)) => guest = Some(stream.into_split()),
                Some(Control::Cut) => {
                    host = None;
                    if let Some((_, writer)) = guest.as_mut() {
                        // The start of a DATA header that never completes.
                        let _ = writer.write_all(b"PEXI\x01\x11\x00\x00\x00").await;
                    }
                }
                Some(Control::Restore) => {
                    host = UnixStream::connect(&socket).await.ok().map(UnixStream::into_split);
                }
                Some(Control::ToGuest(bytes)) => {
                    if let Some((_, writer)) = guest.as_mut() {
                        let _ = writer.write_all(&bytes).await;
                    }
                }
                Some(Control::ToHost(bytes)) => {
                    if let Some((_, writer)) = host.as_mut() {
                        let _ = writer.write_all(&bytes).await;
                    }
                }
            },
            read = read_side(&mut guest, &mut guest_buf) => match read {
                Ok(0) | Err(_) => guest = None,
                Ok(n) => {
                    // With no host the bytes are lost, as on a port whose host end is closed.
                    if let Some((_, writer)) = host.as_mut() {
                        let _ = writer.write_all(&guest_buf[..n]).await;
                    }
                }
            },
            read = read_side(&mut host, &mut host_buf) => match read {
                Ok(0) | Err(_) => host = None,
                Ok(n) => {
                    if let Some((_, writer)) = guest.as_mut() {
                        let _ = writer.write_all(&host_buf[..n]).await;
                    }
                }
            },
        }
    }
}

struct Setup {
    upstream: Upstream,
    port: Arc<Port>,
    client: Client,
    server: Server,
    /// The PEP's folder (socket, policy, audit): removed after the server, with the rest of the setup.
    _dir: TestDir,
}

async fn setup() -> Setup {
    let upstream = Upstream::http("127.0.0.1").await;
    let dir = temp_dir("virtio");
    let socket = dir.join("pep.sock");
    let options = loopback_options(&[("api.test", "127.0.0.1")], &["api.test"]);
    let config = Config::load(Some(&write_config(&dir, &socket, &options))).expect("config");
    let server = Server::start(config).await.expect("server");
    let port = Port::new(socket);
    let client = Client::with_connector(
        port.clone(),
        Options {
            keepalive: Duration::from_millis(300),
            ..Options::default()
        },
    );
    Setup {
        upstream,
        port,
        client,
        server,
        _dir: dir,
    }
}

impl Setup {
    fn url(&self, path: &str) -> String {
        format!("http://api.test:{}{path}", self.upstream.port())
    }

    async fn hello(&self) -> String {
        self.client
            .get(&self.url("/hello"))
            .send()
            .await
            .expect("request")
            .text()
            .await
            .expect("body")
    }

    async fn in_flight(&self) -> pexi_guest::Response {
        let mut response = self
            .client
            .get(&self.url("/forever?gap_ms=20"))
            .send()
            .await
            .expect("stream");
        assert!(response.chunk().await.expect("chunk").is_some());
        response
    }

    async fn stop(self) {
        self.server.stop().await.expect("stop");
    }
}

async fn fails_with_session_reset(mut response: pexi_guest::Response) {
    let err = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match response.chunk().await {
                Ok(Some(_)) => continue,
                Ok(None) => panic!("the stream ended normally"),
                Err(err) => return err,
            }
        }
    })
    .await
    .expect("the in-flight request fails in time");
    assert_eq!(err.code(), "session_reset", "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn garbage_towards_the_host_is_resynchronised() {
    let setup = setup().await;
    assert_eq!(setup.hello().await, "hello");
    let response = setup.in_flight().await;
    setup.port.send(Control::ToHost(vec![0xff; 64]));
    fails_with_session_reset(response).await;
    assert_eq!(
        setup.hello().await,
        "hello",
        "the session carries on after the resync"
    );
    setup.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn garbage_towards_the_guest_is_resynchronised() {
    let setup = setup().await;
    let response = setup.in_flight().await;
    setup
        .port
        .send(Control::ToGuest(b"\x00\xffnot a frame PEXI...".to_vec()));
    fails_with_session_reset(response).await;
    assert_eq!(setup.hello().await, "hello");
    setup.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_host_that_comes_back_mid_frame_gets_a_new_session() {
    let setup = setup().await;
    let response = setup.in_flight().await;
    setup.port.send(Control::Cut);
    tokio::time::sleep(Duration::from_millis(100)).await;
    setup.port.send(Control::Restore);
    fails_with_session_reset(response).await;
    assert_eq!(
        setup.hello().await,
        "hello",
        "a new session on the same port"
    );
    setup.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_silent_host_is_detected_by_keepalive() {
    let setup = setup().await;
    let response = setup.in_flight().await;
    // The host end goes away for longer than two keepalive periods, then returns.
    setup.port.send(Control::Cut);
    fails_with_session_reset(response).await;
    setup.port.send(Control::Restore);
    assert_eq!(setup.hello().await, "hello");
    setup.stop().await;
}

/// The endpoint's own character-device path, as inside a VM: a raw pty stands in for `/dev/vportNpM` and
/// threads copy bytes between its other side and the PEP's socket, as QEMU's chardev does. A client that
/// drove the device as a blocking file would wait forever here, its HELLO queued behind its own read.
#[tokio::test(flavor = "multi_thread")]
async fn a_character_device_path_carries_the_session() {
    use std::os::fd::AsRawFd;

    let upstream = Upstream::http("127.0.0.1").await;
    let dir = temp_dir("chardev");
    let socket = dir.join("pep.sock");
    let options = loopback_options(&[("api.test", "127.0.0.1")], &["api.test"]);
    let config = Config::load(Some(&write_config(&dir, &socket, &options))).expect("config");
    let server = Server::start(config).await.expect("server");

    let pty = nix::pty::openpty(None, None).expect("openpty");
    let mut termios = nix::sys::termios::tcgetattr(&pty.slave).expect("tcgetattr");
    nix::sys::termios::cfmakeraw(&mut termios);
    nix::sys::termios::tcsetattr(&pty.slave, nix::sys::termios::SetArg::TCSANOW, &termios)
        .expect("raw mode");
    let path =
        std::fs::read_link(format!("/proc/self/fd/{}", pty.slave.as_raw_fd())).expect("pty path");
    let master = std::fs::File::from(pty.master);
    let host = std::os::unix::net::UnixStream::connect(&socket).expect("connect");
    let (mut from_guest, mut to_host) = (
        master.try_clone().expect("dup"),
        host.try_clone().expect("dup"),
    );
    let (mut from_host, mut to_guest) = (host, master);
    std::thread::spawn(move || std::io::copy(&mut from_guest, &mut to_host));
    std::thread::spawn(move || std::io::copy(&mut from_host, &mut to_guest));

    let client = Client::new(
        format!("virtio:{}", path.display())
            .parse()
            .expect("endpoint"),
    );
    let url = format!("http://api.test:{}/hello", upstream.port());
    let body = tokio::time::timeout(Duration::from_secs(20), async {
        client.get(&url).send().await?.text().await
    })
    .await
    .expect("the request finished")
    .expect("allowed");
    assert_eq!(body, "hello");
    let denied = tokio::time::timeout(
        Duration::from_secs(20),
        client.get("http://denied.test/").send(),
    )
    .await
    .expect("the request finished");
    assert_eq!(
        denied.err().map(|e| e.code().to_string()).as_deref(),
        Some("policy_denied")
    );
    drop(pty.slave);
    server.stop().await.expect("stop");
}
