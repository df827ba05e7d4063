//! Real parts shared by the end-to-end tests of `pexi-host` and `pexi-guest`: PEP configs written for a
//! test, a guest speaking the protocol over a Unix socket, and HTTP(S) upstream servers on loopback with a
//! test CA. Test-only: nothing here is built into the product.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use pexi_protocol::io::Connection;
use pexi_protocol::payload::{ErrorPayload, HttpRequest, MethodCall, ResponseHead};
use pexi_protocol::session::{Config as SessionConfig, Event, Session};
use tokio::net::UnixStream;

pub mod conformance;

// ---------------------------------------------------------------------------------------------------------
// The PEP process

/// What a test changes in the embedded config.
#[derive(Clone, Debug, Default)]
pub struct PepOptions {
    pub allowed_domains: Vec<String>,
    pub allowed_cidrs: Vec<String>,
    pub dns_overrides: Vec<(String, Vec<String>)>,
    pub extra_ca_pem: Option<String>,
    /// `[pep.limits]` keys to override.
    pub limits: Vec<(&'static str, i64)>,
    /// Run the PEP in a fresh network namespace with only loopback up.
    pub isolated_network: bool,
    /// Extra environment for the PEP process.
    pub env: Vec<(String, String)>,
    /// Write the PEP's stderr (its logs) to `pep.log` in its directory instead of the test's stderr.
    pub log_to_file: bool,
    /// The allow entries of `allowed_domains` also allow WebSocket upgrades (`upgrade = ["websocket"]`).
    pub websocket: bool,
}

static NEXT_DIR: AtomicUsize = AtomicUsize::new(0);

/// Ports of every upstream server this test binary started: the test configs allow them (with 80, 443
/// and 8080), since the default policy allows only a scheme's default port.
static UPSTREAM_PORTS: Mutex<Vec<u16>> = Mutex::new(Vec::new());

fn allowed_ports() -> Vec<toml::Value> {
    let mut ports = vec![80, 443, 8080];
    ports.extend(UPSTREAM_PORTS.lock().expect("ports").iter().copied());
    ports
        .into_iter()
        .map(|p| toml::Value::Integer(p.into()))
        .collect()
}

/// A test's own folder under the system's temporary folder, removed when the value is dropped (kept when
/// `PEXI_KEEP` is set, to look at after a failure). Derefs to its path.
#[derive(Debug)]
pub struct TestDir(PathBuf);

impl TestDir {
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl std::ops::Deref for TestDir {
    type Target = Path;

    fn deref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<Path> for TestDir {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        if std::env::var_os("PEXI_KEEP").is_none() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

pub fn temp_dir(tag: &str) -> TestDir {
    let dir = std::env::temp_dir().join(format!(
        "pexi-host-test-{}-{}-{tag}",
        std::process::id(),
        NEXT_DIR.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    TestDir(dir)
}

/// The embedded default configuration (`host/default-config.toml`) with the test's listener, audit path, allowlist, CIDRs, DNS overrides and CA.
pub fn test_config(dir: &Path, socket: &Path, audit: &Path, options: &PepOptions) -> toml::Table {
    let mut doc: toml::Table = include_str!("../../host/default-config.toml")
        .parse()
        .expect("config.toml parses");
    let pep = doc["pep"].as_table_mut().expect("[pep]");
    pep.insert(
        "listen".into(),
        toml::Value::Array(vec![format!("unix:{}", socket.display()).into()]),
    );
    let policy = pep["policy"].as_table_mut().expect("policy");
    let allow: Vec<toml::Value> = options
        .allowed_domains
        .iter()
        .map(|d| {
            let mut entry = toml::Table::new();
            entry.insert("host".into(), d.clone().into());
            entry.insert("ports".into(), toml::Value::Array(allowed_ports()));
            if options.websocket {
                entry.insert(
                    "upgrade".into(),
                    toml::Value::Array(vec!["websocket".into()]),
                );
            }
            toml::Value::Table(entry)
        })
        .collect();
    policy.insert("allow".into(), toml::Value::Array(allow));
    policy.insert("reload_check_ms".into(), 100.into());
    let limits = pep["limits"].as_table_mut().expect("limits");
    for (key, value) in &options.limits {
        assert!(limits.contains_key(*key), "no limit {key}");
        limits.insert((*key).into(), (*value).into());
    }
    let network = pep["network"].as_table_mut().expect("network");
    network.insert(
        "allowed_cidrs".into(),
        toml::Value::Array(
            options
                .allowed_cidrs
                .iter()
                .map(|c| c.clone().into())
                .collect(),
        ),
    );
    let overrides: toml::Table = options
        .dns_overrides
        .iter()
        .map(|(name, addrs)| {
            (
                name.clone(),
                toml::Value::Array(addrs.iter().map(|a| a.clone().into()).collect()),
            )
        })
        .collect();
    network.insert("dns_overrides".into(), toml::Value::Table(overrides));
    if let Some(pem) = &options.extra_ca_pem {
        std::fs::write(dir.join("test-ca.pem"), pem).expect("ca");
        network.insert("extra_ca_file".into(), "test-ca.pem".into());
    }
    let audit_table = pep["audit"].as_table_mut().expect("audit");
    audit_table.insert("path".into(), audit.display().to_string().into());
    doc
}

// ---------------------------------------------------------------------------------------------------------
// The guest

pub struct Guest {
    pub conn: Connection<UnixStream>,
}

/// Everything the guest saw of one stream.
#[derive(Debug, Default)]
pub struct Reply {
    pub head: Option<ResponseHead>,
    pub body: Vec<u8>,
    /// When each DATA arrived, and how large it was.
    pub chunks: Vec<(Instant, usize)>,
    pub error: Option<ErrorPayload>,
    pub ended: bool,
}

impl Reply {
    pub fn status(&self) -> u16 {
        match &self.head {
            Some(ResponseHead::Http(head)) => head.status,
            other => panic!("no HTTP head: {other:?}, error {:?}", self.error),
        }
    }

    pub fn error_code(&self) -> &str {
        self.error
            .as_ref()
            .map(|e| e.code.as_str())
            .unwrap_or("none")
    }

    pub fn http_head(&self) -> &pexi_protocol::payload::HttpResponseHead {
        match &self.head {
            Some(ResponseHead::Http(head)) => head,
            other => panic!("no HTTP head: {other:?}, error {:?}", self.error),
        }
    }
}

impl Guest {
    pub async fn connect(path: &Path) -> Guest {
        Guest::connect_as(path, "pexi-test-guest", "1").await
    }

    /// Like [`Guest::connect`], announcing itself in HELLO with `name` and `version`.
    pub async fn connect_as(path: &Path, name: &str, version: &str) -> Guest {
        match Guest::try_connect_with(path, SessionConfig::new(name, version)).await {
            Ok(guest) => guest,
            Err(other) => panic!("handshake: {other:?}"),
        }
    }

    /// Connects with a session announcing `config` (windows, frame size); the handshake's first event when
    /// it is not `Established` (a refusal).
    pub async fn try_connect_with(
        path: &Path,
        config: SessionConfig,
    ) -> Result<Guest, Option<Event>> {
        // The socket file appears at bind(), a moment before listen(): a connection in between is refused,
        // which a loaded machine makes likely. Retry that for a while; anything else fails at once.
        let deadline = Instant::now() + Duration::from_secs(10);
        let stream = loop {
            match UnixStream::connect(path).await {
                Ok(stream) => break stream,
                Err(err)
                    if err.kind() == std::io::ErrorKind::ConnectionRefused
                        && Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(err) => panic!("connect to pexi at {}: {err}", path.display()),
            }
        };
        Guest::handshake(stream, config).await
    }

    /// HELLO on a connected stream; the handshake's first event when it is not `Established` (a refusal,
    /// or `None` when the host closed the connection).
    pub async fn handshake(
        stream: UnixStream,
        config: SessionConfig,
    ) -> Result<Guest, Option<Event>> {
        let mut conn = Connection::new(stream, Session::client(config));
        match conn.next_event().await {
            Ok(Some(Event::Established(_))) => Ok(Guest { conn }),
            Ok(other) => Err(other),
            Err(_) => Err(None),
        }
    }

    pub fn session(&mut self) -> &mut Session {
        self.conn.session_mut()
    }

    /// Opens a stream, sends `body` under flow control, ends it, and collects the reply.
    pub async fn call(&mut self, call: MethodCall, body: &[u8]) -> Reply {
        let id = self.session().open(call).expect("open");
        // The host may end the stream while the body is still going (a bound on it, a refusal).
        if let Some(error) = self.send_body(id, body).await {
            return Reply {
                error: Some(error),
                ..Reply::default()
            };
        }
        self.session().send_end(id, vec![]).expect("end");
        self.collect(id).await
    }

    pub async fn get(&mut self, url: &str) -> Reply {
        self.call(MethodCall::HttpRequest(HttpRequest::new("GET", url)), b"")
            .await
    }

    /// Sends `body` on `id`, waiting for credit as needed; the host's error if it ended the stream first.
    pub async fn send_body(&mut self, id: u32, mut body: &[u8]) -> Option<ErrorPayload> {
        while !body.is_empty() {
            let room = self.session().send_capacity(id);
            if room == 0 {
                match self.conn.next_event().await.expect("io") {
                    Some(Event::SendCapacity { .. }) => continue,
                    Some(Event::StreamFailed {
                        stream_id, error, ..
                    }) if stream_id == id => return Some(error),
                    Some(_) => continue,
                    None => panic!("transport closed while sending"),
                }
            }
            let n = room.min(body.len());
            self.session()
                .send_data(id, Bytes::copy_from_slice(&body[..n]))
                .expect("within capacity");
            body = &body[n..];
            self.conn.flush().await.expect("flush");
        }
        None
    }

    /// Reads events until stream `id` ends or fails, consuming (releasing) its data as it comes.
    pub async fn collect(&mut self, id: u32) -> Reply {
        let mut reply = Reply::default();
        loop {
            match self.conn.next_event().await.expect("io") {
                Some(Event::Head { stream_id, head }) if stream_id == id => reply.head = Some(head),
                Some(Event::Data { stream_id, data }) if stream_id == id => {
                    reply.chunks.push((Instant::now(), data.len()));
                    reply.body.extend_from_slice(&data);
                    self.session().release(id, data.len());
                }
                Some(Event::End { stream_id, .. }) if stream_id == id => {
                    reply.ended = true;
                    return reply;
                }
                Some(Event::StreamFailed {
                    stream_id, error, ..
                }) if stream_id == id => {
                    reply.error = Some(error);
                    return reply;
                }
                Some(_) => {}
                None => panic!("transport closed before stream {id} finished: {reply:?}"),
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------------------
// Upstream servers

/// One request an upstream server received.
#[derive(Clone, Debug)]
pub struct Hit {
    pub method: String,
    pub path: String,
    pub host: String,
    pub headers: Vec<(String, String)>,
    pub body_len: usize,
}

pub struct Upstream {
    pub addr: SocketAddr,
    pub hits: Arc<Mutex<Vec<Hit>>>,
    /// Set when a streaming response's body was dropped before it finished: the client went away.
    pub aborted: Arc<AtomicBool>,
    /// TCP connections accepted so far.
    pub connections: Arc<std::sync::atomic::AtomicUsize>,
    /// Body bytes `/zeros` responses have handed to their connections so far (the client's read pace
    /// bounds it: a client that stops reading stops it, past the socket buffers).
    pub streamed: Arc<std::sync::atomic::AtomicU64>,
    /// A header every request must carry with exactly this value, else 401 (a mock API's key check).
    required: Arc<Mutex<Option<(String, String)>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

type Body = BoxBody<Bytes, Infallible>;

fn full(bytes: impl Into<Bytes>) -> Body {
    http_body_util::Full::new(bytes.into()).boxed()
}

/// `/ws-echo` with `Upgrade`: answers 101 and echoes every byte of the upgraded connection until the
/// client half-closes. (The handshake's accept key is not computed: pexi carries the bytes, the test's
/// client does not check it.)
fn echo_upgrade(mut req: Request<Incoming>, hits: Arc<Mutex<Vec<Hit>>>) -> Response<Body> {
    let headers: Vec<(String, String)> = req
        .headers()
        .iter()
        .map(|(n, v)| {
            (
                n.to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    hits.lock().expect("hits").push(Hit {
        method: req.method().to_string(),
        path: "/ws-echo".into(),
        host: req
            .headers()
            .get(http::header::HOST)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string(),
        headers,
        body_len: 0,
    });
    let on_upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let Ok(upgraded) = on_upgrade.await else {
            return;
        };
        let mut io = TokioIo::new(upgraded);
        let mut buffer = vec![0u8; 16 * 1024];
        loop {
            match io.read(&mut buffer).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if io.write_all(&buffer[..n]).await.is_err() {
                        break;
                    }
                }
            }
        }
        let _ = io.shutdown().await;
    });
    Response::builder()
        .status(101)
        .header("connection", "upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-accept", "not-checked")
        .body(full(""))
        .expect("response")
}

/// Sets `aborted` if dropped before `done` was set: the response stream was abandoned.
struct AbortFlag {
    aborted: Arc<AtomicBool>,
    done: bool,
}

impl AbortFlag {
    fn finish(&mut self) {
        self.done = true;
    }
}

impl Drop for AbortFlag {
    fn drop(&mut self) {
        if !self.done {
            self.aborted.store(true, Ordering::SeqCst);
        }
    }
}

/// A body that yields `chunks` with `gap` before each one after the first; `None` count means forever.
fn paced(chunk: Bytes, count: Option<usize>, gap: Duration, aborted: Arc<AtomicBool>) -> Body {
    let flag = AbortFlag {
        aborted,
        done: false,
    };
    let stream = futures_util::stream::unfold((0usize, flag), move |(n, mut flag)| {
        let chunk = chunk.clone();
        async move {
            if count.is_some_and(|c| n >= c) {
                flag.finish();
                return None;
            }
            if n > 0 {
                tokio::time::sleep(gap).await;
            }
            Some((Ok::<_, Infallible>(Frame::data(chunk)), (n + 1, flag)))
        }
    });
    StreamBody::new(stream).boxed()
}

fn query(req: &impl HasUri, key: &str) -> Option<String> {
    req.uri_ref().query().and_then(|q| {
        url::form_urlencoded::parse(q.as_bytes())
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.into_owned())
    })
}

trait HasUri {
    fn uri_ref(&self) -> &http::Uri;
}

impl HasUri for Request<Incoming> {
    fn uri_ref(&self) -> &http::Uri {
        self.uri()
    }
}

impl HasUri for http::Uri {
    fn uri_ref(&self) -> &http::Uri {
        self
    }
}

async fn handle(
    req: Request<Incoming>,
    hits: Arc<Mutex<Vec<Hit>>>,
    aborted: Arc<AtomicBool>,
    required: Arc<Mutex<Option<(String, String)>>>,
    streamed: Arc<std::sync::atomic::AtomicU64>,
) -> Result<Response<Body>, Infallible> {
    if req.uri().path() == "/ws-echo" && req.headers().contains_key(http::header::UPGRADE) {
        return Ok(echo_upgrade(req, hits));
    }
    let method = req.method().to_string();
    let path = req.uri().path().to_string();
    let host = req
        .headers()
        .get(http::header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let headers: Vec<(String, String)> = req
        .headers()
        .iter()
        .map(|(n, v)| {
            (
                n.to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let req_uri_only = req.uri().clone();
    let status = query(&req, "status").and_then(|s| s.parse::<u16>().ok());
    let to = query(&req, "to");
    let n: usize = query(&req, "n").and_then(|n| n.parse().ok()).unwrap_or(0);
    let gap = Duration::from_millis(
        query(&req, "gap_ms")
            .and_then(|n| n.parse().ok())
            .unwrap_or(300),
    );
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    hits.lock().expect("hits").push(Hit {
        method: method.clone(),
        path: path.clone(),
        host,
        headers: headers.clone(),
        body_len: body.len(),
    });
    let required = required.lock().expect("required").clone();
    if let Some((name, value)) = required {
        if !headers.iter().any(|(n, v)| *n == name && *v == value) {
            return Ok(Response::builder()
                .status(401)
                .body(full("missing or wrong API key"))
                .expect("response"));
        }
    }
    let response = match path.as_str() {
        "/hello" => Response::new(full("hello")),
        "/echo" => Response::builder()
            .header("x-method", method)
            .body(full(body))
            .expect("response"),
        "/headers" => Response::new(full(serde_json::to_vec(&headers).expect("json"))),
        "/status" => Response::builder()
            .status(status.unwrap_or(200))
            .body(full("status"))
            .expect("response"),
        "/redirect" => Response::builder()
            .status(status.unwrap_or(302))
            .header("location", to.unwrap_or_else(|| "/hello".into()))
            .body(full(""))
            .expect("response"),
        "/big" => Response::new(full(vec![b'x'; n])),
        // `n` response headers of 1000 bytes each.
        "/bigheaders" => {
            let mut response = Response::builder();
            for i in 0..n {
                response = response.header(format!("x-filler-{i}"), "f".repeat(1000));
            }
            response.body(full("small body")).expect("response")
        }
        // An upstream dressing its answer as one of pexi's refusals.
        "/forged-refusal" => Response::builder()
            .status(403)
            .header("x-pexi-error", "policy_denied")
            .header("X-Pexi-Decision", "forged-00000001")
            .header("x-upstream", "yes")
            .body(full("{\"code\":\"policy_denied\"}"))
            .expect("response"),
        "/setcookie" => Response::builder()
            .header(
                "set-cookie",
                query(&req_uri_only, "cookie").unwrap_or_default(),
            )
            .body(full("cookie set"))
            .expect("response"),
        "/sse" => Response::builder()
            .header("content-type", "text/event-stream")
            .body(paced(
                Bytes::from_static(b"data: tick\n\n"),
                Some(n.max(1)),
                gap,
                aborted,
            ))
            .expect("response"),
        "/forever" => Response::new(paced(Bytes::from(vec![b'f'; 1024]), None, gap, aborted)),
        // `n` zero bytes in 64 KiB chunks, each counted in `streamed` when hyper asks for it.
        "/zeros" => {
            let chunk = Bytes::from(vec![0u8; 64 * 1024]);
            let stream = futures_util::stream::unfold(n, move |left| {
                let chunk = chunk.slice(..left.min(chunk.len()));
                let streamed = streamed.clone();
                async move {
                    if chunk.is_empty() {
                        return None;
                    }
                    streamed.fetch_add(chunk.len() as u64, Ordering::SeqCst);
                    let left = left - chunk.len();
                    Some((Ok::<_, Infallible>(Frame::data(chunk)), left))
                }
            });
            Response::builder()
                .header("content-length", n)
                .body(StreamBody::new(stream).boxed())
                .expect("response")
        }
        "/stall" => {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            Response::new(full(""))
        }
        _ => Response::builder()
            .status(404)
            .body(full("no such path"))
            .expect("response"),
    };
    Ok(response)
}

impl Upstream {
    /// An HTTP server on `ip`:0.
    pub async fn http(ip: &str) -> Upstream {
        Upstream::start(ip, None).await
    }

    pub async fn https(ip: &str, ca: &TestCa) -> Upstream {
        Upstream::start(ip, Some(ca.server_config())).await
    }

    async fn start(ip: &str, tls: Option<Arc<tokio_rustls::rustls::ServerConfig>>) -> Upstream {
        let listener = tokio::net::TcpListener::bind((ip, 0))
            .await
            .expect("bind upstream");
        let addr = listener.local_addr().expect("addr");
        UPSTREAM_PORTS.lock().expect("ports").push(addr.port());
        let hits = Arc::new(Mutex::new(Vec::new()));
        let aborted = Arc::new(AtomicBool::new(false));
        let connections = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let required = Arc::new(Mutex::new(None));
        let streamed = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (h, a, c, r, z) = (
            hits.clone(),
            aborted.clone(),
            connections.clone(),
            required.clone(),
            streamed.clone(),
        );
        let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                c.fetch_add(1, Ordering::SeqCst);
                let (h, a, r, z, acceptor) =
                    (h.clone(), a.clone(), r.clone(), z.clone(), acceptor.clone());
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        handle(req, h.clone(), a.clone(), r.clone(), z.clone())
                    });
                    let builder = hyper::server::conn::http1::Builder::new();
                    match acceptor {
                        Some(acceptor) => {
                            if let Ok(tls) = acceptor.accept(tcp).await {
                                let _ = builder
                                    .serve_connection(TokioIo::new(tls), service)
                                    .with_upgrades()
                                    .await;
                            }
                        }
                        None => {
                            let _ = builder
                                .serve_connection(TokioIo::new(tcp), service)
                                .with_upgrades()
                                .await;
                        }
                    }
                });
            }
        });
        Upstream {
            addr,
            hits,
            aborted,
            connections,
            streamed,
            required,
            task,
        }
    }

    pub fn hits(&self) -> Vec<Hit> {
        self.hits.lock().expect("hits").clone()
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    /// From now on every request must carry `header: value` (lowercase name), or gets 401.
    pub fn require(&self, header: &str, value: &str) {
        *self.required.lock().expect("required") = Some((header.to_string(), value.to_string()));
    }
}

/// A throwaway CA and a server certificate it signed for the given names.
pub struct TestCa {
    pub ca_pem: String,
    /// The server certificate and its key, PEM, for servers that read files (rsyslog).
    pub cert_pem: String,
    pub key_pem: String,
    cert_der: Vec<u8>,
    key_der: Vec<u8>,
}

impl TestCa {
    pub fn new(names: &[&str]) -> TestCa {
        let ca_key = rcgen::KeyPair::generate().expect("key");
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "pexi test CA");
        let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).expect("ca");
        let leaf_key = rcgen::KeyPair::generate().expect("key");
        let leaf_params =
            rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .expect("params");
        let leaf = leaf_params.signed_by(&leaf_key, &ca).expect("leaf");
        TestCa {
            ca_pem: ca.pem(),
            cert_pem: leaf.pem(),
            key_pem: leaf_key.serialize_pem(),
            cert_der: leaf.der().to_vec(),
            key_der: leaf_key.serialize_der(),
        }
    }

    pub fn server_config(&self) -> Arc<tokio_rustls::rustls::ServerConfig> {
        use tokio_rustls::rustls;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_no_client_auth()
            .with_single_cert(
                vec![rustls::pki_types::CertificateDer::from(
                    self.cert_der.clone(),
                )],
                rustls::pki_types::PrivateKeyDer::Pkcs8(self.key_der.clone().into()),
            )
            .expect("server config");
        Arc::new(config)
    }
}

/// Options for the common case: names that lead to loopback through DNS overrides, loopback allowed.
/// Runs the calling test again, alone, inside a fresh network namespace that has only loopback (`unshare -n`
/// with `lo` up), so that a refusal that fails lets no packet leave the machine: its upstreams, its PEP and
/// its guest all live in there. Returns true in that inner run (go on with the test) and false in the outer
/// one, after the inner run passed; panics with the inner run's output when it did not. Needs root.
pub fn in_isolated_netns(test_name: &str) -> bool {
    rerun_inside(
        test_name,
        &["-n"],
        "PEXI_TEST_ISOLATED_NETNS",
        "a loopback-only network namespace",
    )
}

/// Like [`in_isolated_netns`], with a private mount namespace as well (`unshare -m -n`), so the test may
/// mount a small tmpfs (a disk that fills) that nothing outside sees and that goes away with it.
pub fn in_private_mounts(test_name: &str) -> bool {
    rerun_inside(
        test_name,
        &["-m", "--propagation", "private", "-n"],
        "PEXI_TEST_PRIVATE_MOUNTS",
        "private mount and network namespaces",
    )
}

/// Runs the calling test again, alone, under `unshare` with `namespaces` and loopback up; `inside` marks
/// the inner run. True in the inner run, false in the outer one after the inner run passed.
fn rerun_inside(test_name: &str, namespaces: &[&str], inside: &str, what: &str) -> bool {
    if std::env::var_os(inside).is_some() {
        return true;
    }
    let exe = std::env::current_exe().expect("the test binary's path");
    let output = std::process::Command::new("unshare")
        .args(namespaces)
        .args(["sh", "-c", "ip link set lo up && exec \"$0\" \"$@\""])
        .arg(&exe)
        .args([test_name, "--exact", "--nocapture", "--test-threads=1"])
        .env(inside, "1")
        .output()
        .expect("run unshare (util-linux; needs root)");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success() && stdout.contains("1 passed"),
        "{test_name} in {what}: {}\n{stdout}\n{stderr}",
        output.status
    );
    false
}

/// A port free on 127.0.0.1 now, for a server that must be told its port before it starts (Prometheus,
/// rsyslog). Tests that use it run alone in a namespace of their own, so nothing takes it meanwhile.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

pub fn loopback_options(names: &[(&str, &str)], allowed: &[&str]) -> PepOptions {
    PepOptions {
        allowed_domains: allowed.iter().map(|d| d.to_string()).collect(),
        allowed_cidrs: vec!["127.0.0.0/8".into()],
        dns_overrides: names
            .iter()
            .map(|(name, ip)| (name.to_string(), vec![ip.to_string()]))
            .collect(),
        ..PepOptions::default()
    }
}

pub fn overrides(map: &BTreeMap<&str, &str>) -> Vec<(String, Vec<String>)> {
    map.iter()
        .map(|(k, v)| (k.to_string(), vec![v.to_string()]))
        .collect()
}

/// The repository's policy bundle, copied under `dir/policies`.
pub fn copy_policies(dir: &Path) {
    let policies = dir.join("policies/pexi");
    std::fs::create_dir_all(&policies).expect("mkdir");
    std::fs::write(
        policies.join("http.rego"),
        include_str!("../../policies/pexi/http.rego"),
    )
    .expect("policy");
    std::fs::write(
        policies.join("http_test.rego"),
        include_str!("../../policies/pexi/http_test.rego"),
    )
    .expect("policy tests");
}

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("test-support/ has a parent")
        .to_path_buf()
}

/// Writes a test config (listening on `socket`) and the policy bundle into `dir`; returns the config path.
pub fn write_config(dir: &Path, socket: &Path, options: &PepOptions) -> PathBuf {
    let doc = test_config(dir, socket, &dir.join("audit.jsonl"), options);
    copy_policies(dir);
    let path = dir.join("config.toml");
    std::fs::write(&path, toml::to_string(&doc).expect("serialise config")).expect("write config");
    path
}

// ---------------------------------------------------------------------------------------------------------
// A git smart-HTTP server

/// An HTTPS git server on `ip`:0 serving the repositories under `root` through `git http-backend` (CGI),
/// as a hosting service would; for `git clone` through the guest proxy.
pub struct GitServer {
    pub port: u16,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for GitServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl GitServer {
    pub async fn https(ip: &str, ca: &TestCa, root: PathBuf) -> GitServer {
        let listener = tokio::net::TcpListener::bind((ip, 0))
            .await
            .expect("bind git server");
        let port = listener.local_addr().expect("addr").port();
        UPSTREAM_PORTS.lock().expect("ports").push(port);
        let acceptor = tokio_rustls::TlsAcceptor::from(ca.server_config());
        let root = Arc::new(root);
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (acceptor, root) = (acceptor.clone(), root.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let service = hyper::service::service_fn(move |req| {
                        let root = root.clone();
                        async move { Ok::<_, Infallible>(git_cgi(req, &root).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        GitServer { port, task }
    }
}

/// One request through `git http-backend`, per the CGI interface it implements.
async fn git_cgi(req: Request<Incoming>, root: &Path) -> Response<Body> {
    let method = req.method().to_string();
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    let header = |name: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    };
    let (content_type, encoding, protocol) = (
        header("content-type"),
        header("content-encoding"),
        header("git-protocol"),
    );
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let mut child = tokio::process::Command::new("git")
        .arg("http-backend")
        .env("GIT_PROJECT_ROOT", root)
        .env("GIT_HTTP_EXPORT_ALL", "1")
        .env("REQUEST_METHOD", &method)
        .env("PATH_INFO", &path)
        .env("QUERY_STRING", &query)
        .env("CONTENT_TYPE", &content_type)
        .env("CONTENT_LENGTH", body.len().to_string())
        .env("HTTP_CONTENT_ENCODING", &encoding)
        .env("GIT_PROTOCOL", &protocol)
        .env("REMOTE_ADDR", "127.0.0.1")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .expect("git http-backend");
    if let Some(mut stdin) = child.stdin.take() {
        use tokio::io::AsyncWriteExt;
        let _ = stdin.write_all(&body).await;
    }
    let output = child
        .wait_with_output()
        .await
        .expect("git http-backend output");
    let out = output.stdout;
    let split = out
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| (i, 4))
        .or_else(|| out.windows(2).position(|w| w == b"\n\n").map(|i| (i, 2)));
    let Some((end, gap)) = split else {
        return Response::builder()
            .status(500)
            .body(full("git http-backend wrote no headers"))
            .expect("response");
    };
    let mut response = Response::builder();
    for line in String::from_utf8_lossy(&out[..end]).lines() {
        if let Some((name, value)) = line.split_once(':') {
            if name.eq_ignore_ascii_case("status") {
                let code = value.trim().split(' ').next().unwrap_or("200");
                response = response.status(code.parse::<u16>().unwrap_or(500));
            } else {
                response = response.header(name.trim(), value.trim());
            }
        }
    }
    response
        .body(full(out[end + gap..].to_vec()))
        .expect("response")
}
