//! Syslog: each audit line as the MSG of an RFC 5424 message (facility 13, "log audit"; severity 6; MSGID
//! the record's kind), octet-counted over TCP (RFC 6587), in TLS by default (RFC 5425).
//!
//! TCP syslog has no acknowledgement of its own. A batch counts as delivered once the receiver's TCP
//! stack has acknowledged every byte of it (the send queue is empty: `SIOCOUTQ` on Linux, `SO_NWRITE` on
//! macOS) and the connection is still open; otherwise it is sent again on a new connection. A receiver
//! may so see a record twice, never miss one its kernel did not take (docs/fleet.md says what that leaves).

use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_rustls::rustls;

use super::Item;
use crate::config::SyslogConfig;

/// "log audit" (RFC 5424, table 1) × 8 + informational.
const PRI: u8 = 13 * 8 + 6;
/// How long a batch may wait for the receiver's acknowledgement, and a connection for its handshake.
const ACK_LIMIT: Duration = Duration::from_secs(15);

pub struct Syslog {
    address: String,
    tls: Option<(
        tokio_rustls::TlsConnector,
        rustls::pki_types::ServerName<'static>,
    )>,
    hostname: String,
    conn: Option<Conn>,
}

enum Conn {
    Tcp(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl Conn {
    fn tcp(&self) -> &TcpStream {
        match self {
            Conn::Tcp(stream) => stream,
            Conn::Tls(stream) => stream.get_ref().0,
        }
    }

    async fn write_all(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        match self {
            Conn::Tcp(stream) => {
                stream.write_all(bytes).await?;
                stream.flush().await
            }
            Conn::Tls(stream) => {
                stream.write_all(bytes).await?;
                stream.flush().await
            }
        }
    }
}

impl Syslog {
    pub fn new(config: &SyslogConfig) -> Result<Syslog, String> {
        let tls = if config.transport == "tls" {
            let host = config
                .address
                .rsplit_once(':')
                .map(|(host, _)| host.trim_start_matches('[').trim_end_matches(']'))
                .unwrap_or_default();
            let name = if config.server_name.is_empty() {
                host
            } else {
                config.server_name.as_str()
            };
            let server_name = rustls::pki_types::ServerName::try_from(name.to_string())
                .map_err(|err| format!("pep.export.syslog server name {name:?}: {err}"))?;
            Some((connector(config)?, server_name))
        } else {
            None
        };
        Ok(Syslog {
            address: config.address.clone(),
            tls,
            hostname: if config.hostname.is_empty() {
                host_name()
            } else {
                config.hostname.clone()
            },
            conn: None,
        })
    }

    pub async fn send(&mut self, items: &[Item]) -> Result<(), String> {
        let mut bytes = Vec::new();
        for item in items {
            frame(&mut bytes, &self.message(item));
        }
        let conn = match self.conn.take() {
            Some(conn) => conn,
            None => self.connect().await?,
        };
        let mut conn = conn;
        let written = tokio::time::timeout(ACK_LIMIT, conn.write_all(&bytes)).await;
        match written {
            Ok(Ok(())) => {}
            Ok(Err(err)) => return Err(format!("{}: {err}", self.address)),
            Err(_) => {
                return Err(format!(
                    "{}: the receiver took no data for {ACK_LIMIT:?}",
                    self.address
                ))
            }
        }
        acknowledged(conn.tcp())
            .await
            .map_err(|err| format!("{}: {err}", self.address))?;
        self.conn = Some(conn);
        Ok(())
    }

    async fn connect(&self) -> Result<Conn, String> {
        let failed = |err: &dyn std::fmt::Display| format!("{}: {err}", self.address);
        let tcp = tokio::time::timeout(ACK_LIMIT, TcpStream::connect(&self.address))
            .await
            .map_err(|_| failed(&"connecting timed out"))?
            .map_err(|err| failed(&err))?;
        let _ = tcp.set_nodelay(true);
        match &self.tls {
            None => Ok(Conn::Tcp(tcp)),
            Some((connector, name)) => {
                let stream = tokio::time::timeout(ACK_LIMIT, connector.connect(name.clone(), tcp))
                    .await
                    .map_err(|_| failed(&"the TLS handshake timed out"))?
                    .map_err(|err| failed(&format!("TLS: {err}")))?;
                Ok(Conn::Tls(Box::new(stream)))
            }
        }
    }

    /// `<PRI>1 TIMESTAMP HOSTNAME APP-NAME PROCID MSGID STRUCTURED-DATA MSG`.
    fn message(&self, item: &Item) -> String {
        let line = item.line();
        let timestamp = if !line.ts.is_empty() && line.ts.bytes().all(|b| b.is_ascii_graphic()) {
            line.ts.as_str()
        } else {
            "-"
        };
        format!(
            "<{PRI}>1 {timestamp} {} pexi {} {} - {}",
            header_field(&self.hostname, 255),
            std::process::id(),
            header_field(&line.kind, 32),
            line.text
        )
    }
}

/// A header field: printable US-ASCII without spaces, at most `max` long; `-` when nothing is left.
fn header_field(value: &str, max: usize) -> String {
    let kept: String = value
        .chars()
        .filter(|c| c.is_ascii_graphic())
        .take(max)
        .collect();
    if kept.is_empty() {
        "-".into()
    } else {
        kept
    }
}

/// RFC 6587 octet counting: `MSG-LEN SP SYSLOG-MSG`.
fn frame(out: &mut Vec<u8>, message: &str) {
    out.extend_from_slice(message.len().to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(message.as_bytes());
}

/// Waits until the receiver's TCP stack has acknowledged everything sent, and checks the connection is
/// still open (a reset empties the send queue too).
async fn acknowledged(stream: &TcpStream) -> Result<(), String> {
    let fd = stream.as_raw_fd();
    let deadline = Instant::now() + ACK_LIMIT;
    let mut wait = Duration::from_micros(200);
    loop {
        let unacked = unacknowledged(fd).map_err(|err| format!("send queue: {err}"))?;
        if unacked == 0 {
            break;
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "{unacked} bytes not acknowledged by the receiver in {ACK_LIMIT:?}"
            ));
        }
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(Duration::from_millis(50));
    }
    if let Ok(Some(err)) = stream.take_error() {
        return Err(err.to_string());
    }
    // Closed by the receiver (EOF) or reset: what was "acknowledged" may be gone with it.
    use nix::sys::socket::{recv, MsgFlags};
    let mut byte = [0u8; 1];
    match recv(fd, &mut byte, MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT) {
        Ok(0) => Err("the receiver closed the connection".into()),
        Ok(_) | Err(nix::errno::Errno::EAGAIN) => Ok(()),
        Err(err) => Err(err.to_string()),
    }
}

/// Bytes in the socket's send queue not yet acknowledged by the peer.
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
fn unacknowledged(fd: std::os::fd::RawFd) -> std::io::Result<i64> {
    let mut n: libc::c_int = 0;
    // SAFETY: TIOCOUTQ (SIOCOUTQ for a TCP socket) writes one c_int into `n`.
    let done = unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &mut n) };
    if done < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(i64::from(n))
}

#[cfg(target_os = "macos")]
#[allow(unsafe_code)]
fn unacknowledged(fd: std::os::fd::RawFd) -> std::io::Result<i64> {
    let mut n: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: SO_NWRITE writes one c_int into `n`, its size given in `len`.
    let done = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_NWRITE,
            (&mut n as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if done < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(i64::from(n))
}

#[cfg(not(any(target_os = "linux", target_os = "macos")))]
fn unacknowledged(_fd: std::os::fd::RawFd) -> std::io::Result<i64> {
    Ok(0)
}

fn connector(config: &SyslogConfig) -> Result<tokio_rustls::TlsConnector, String> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if !config.ca_file.as_os_str().is_empty() {
        let failed = |err: &dyn std::fmt::Display| {
            format!(
                "pep.export.syslog.ca_file {}: {err}",
                config.ca_file.display()
            )
        };
        let pem = std::fs::read(&config.ca_file).map_err(|err| failed(&err))?;
        for cert in rustls::pki_types::CertificateDer::pem_slice_iter(&pem) {
            roots
                .add(cert.map_err(|err| failed(&err))?)
                .map_err(|err| failed(&err))?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|err| format!("pep.export.syslog TLS: {err}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

/// This machine's host name, for syslog's HOSTNAME and OTLP's `host.name`.
pub fn host_name() -> String {
    nix::unistd::gethostname()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_else(|_| "-".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::export::tail::Line;

    #[test]
    fn a_record_is_one_octet_counted_rfc5424_message() {
        let syslog = Syslog {
            address: "x:1".into(),
            tls: None,
            hostname: "host one".into(),
            conn: None,
        };
        let line = Line {
            seq: 7,
            kind: "decision".into(),
            ts: "2026-12-02T21:00:00.123Z".into(),
            text: r#"{"v":1,"seq":7,"kind":"decision"}"#.into(),
        };
        let message = syslog.message(&Item::Record(line));
        assert_eq!(
            message,
            format!(
                "<110>1 2026-12-02T21:00:00.123Z hostone pexi {} decision - {{\"v\":1,\"seq\":7,\"kind\":\"decision\"}}",
                std::process::id()
            )
        );
        let mut framed = Vec::new();
        frame(&mut framed, &message);
        assert_eq!(framed, format!("{} {message}", message.len()).into_bytes());
        assert_eq!(header_field("", 32), "-");
        assert_eq!(header_field(&"k".repeat(40), 32).len(), 32);
    }
}
