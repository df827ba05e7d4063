//! Configuration: the `[pep]`, `[[secrets]]` and `[vm]` tables; `host/default-config.toml` is embedded as the
//! default, a `--config` file is laid over it, and the `PEP_*` environment variables override both. Every value is checked while parsing, so a bad file fails at start with
//! a message that names the file, the line and the problem.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::Deserialize;

use crate::policy::entries::Entry;
use crate::policy::PolicyRoot;

/// `host/default-config.toml`, compiled in: `pexi serve` with no flags runs on it.
pub const EMBEDDED_CONFIG: &str = include_str!("../default-config.toml");
const EMBEDDED_NAME: &str = "<embedded default-config.toml>";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}:{line}:{column}: {message}")]
    Parse {
        file: String,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("{file}: {message}")]
    Invalid { file: String, message: String },
    #[error("cannot read {file}: {source}")]
    Read {
        file: String,
        source: std::io::Error,
    },
    #[error("{file}: {source}")]
    Dirs {
        file: String,
        source: crate::dirs::DirError,
    },
    #[error("environment variable {name}={value:?}: {message}")]
    Env {
        name: &'static str,
        value: String,
        message: String,
    },
}

/// The whole file: `[pep]` is ours; the other tables belong to other tools and are only checked to exist
/// under known names, so that a misspelt table is an error rather than silently ignored.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    pep: PepConfig,
    #[serde(default)]
    vm: Option<VmConfig>,
    #[serde(default)]
    secrets: Vec<crate::secrets::SecretConfig>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PepConfig {
    pub listen: Vec<Listener>,
    pub limits: LimitsConfig,
    pub policy: PolicyConfig,
    pub network: NetworkConfig,
    pub audit: AuditConfig,
    pub approvals: ApprovalsConfig,
    pub control: ControlConfig,
    pub metrics: MetricsConfig,
    pub export: ExportConfig,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    pub max_concurrent_streams: u32,
    pub max_request_bytes: u64,
    pub max_response_bytes: u64,
    pub max_redirects: u32,
    pub connect_timeout_ms: u64,
    pub idle_timeout_ms: u64,
    pub total_timeout_ms: u64,
    pub dns_timeout_ms: u64,
    /// Bytes each way over one upgraded connection (WebSocket); it is closed with an error past this.
    #[serde(default = "default_max_upgraded_bytes")]
    pub max_upgraded_bytes: u64,
    /// A connection whose guest has not completed HELLO within this is closed (a slow or silent client
    /// must not hold a connection slot).
    pub handshake_timeout_ms: u64,
    /// An established session with no open stream that sends nothing (not even PING) for this long is
    /// closed. The SDK pings every 15 s, so only a silent, abandoned connection reaches it.
    pub idle_connection_timeout_ms: u64,
    /// After SIGTERM, or after the guest's GOAWAY, streams already open get this long to finish; the rest
    /// are then cut with `session_reset` and their outcome records say `shutdown`.
    pub drain_timeout_ms: u64,
    /// Sessions (connections) served at once: per listener and in total. Over either, a guest's HELLO is
    /// answered with `resource_exhausted`.
    pub max_sessions: u32,
    pub max_sessions_per_listener: u32,
    /// Streams served at once across all sessions (each session is also held to max_concurrent_streams),
    /// beyond the `session_reserved_streams` each session has to itself.
    pub max_streams_total: u32,
    pub session_reserved_streams: u32,
    /// Bytes buffered on guests' behalf (response data not yet taken by the transport, replay copies):
    /// the shared host pool, one session's most, and one session's own reserve (outside the pool).
    pub buffer_budget_bytes: u64,
    pub session_buffer_bytes: u64,
    pub session_reserved_bytes: u64,
}

fn default_max_upgraded_bytes() -> u64 {
    1 << 30
}

impl LimitsConfig {
    pub fn protocol_limits(&self) -> pexi_protocol::payload::Limits {
        pexi_protocol::payload::Limits {
            max_concurrent_streams: self.max_concurrent_streams,
            max_request_bytes: self.max_request_bytes,
            max_response_bytes: self.max_response_bytes,
            max_redirects: self.max_redirects,
            connect_timeout_ms: self.connect_timeout_ms,
            idle_timeout_ms: self.idle_timeout_ms,
            total_timeout_ms: self.total_timeout_ms,
        }
    }

    /// Limits that would make the PEP refuse everything, or wait forever, are configuration errors.
    fn check(&self) -> Result<(), String> {
        // A worker hands over up to this much at once; a pool smaller than one chunk never grants it.
        let chunk = pexi_protocol::session::DATA_CHUNK as u64;
        for (key, value) in [
            ("buffer_budget_bytes", self.buffer_budget_bytes),
            ("session_buffer_bytes", self.session_buffer_bytes),
            ("session_reserved_bytes", self.session_reserved_bytes),
        ] {
            if value < chunk {
                return Err(format!(
                    "pep.limits.{key} = {value} is below one chunk ({chunk} bytes)"
                ));
            }
        }
        for (key, value) in [
            ("max_sessions", self.max_sessions),
            ("max_sessions_per_listener", self.max_sessions_per_listener),
            ("max_streams_total", self.max_streams_total),
            ("max_concurrent_streams", self.max_concurrent_streams),
        ] {
            if value == 0 {
                return Err(format!("pep.limits.{key} = 0 would refuse every guest"));
            }
        }
        for (key, value) in [
            ("handshake_timeout_ms", self.handshake_timeout_ms),
            ("idle_timeout_ms", self.idle_timeout_ms),
            (
                "idle_connection_timeout_ms",
                self.idle_connection_timeout_ms,
            ),
        ] {
            if value == 0 {
                return Err(format!("pep.limits.{key} = 0 would end everything at once"));
            }
        }
        Ok(())
    }

    pub fn dns_timeout(&self) -> Duration {
        Duration::from_millis(self.dns_timeout_ms)
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    /// Directory of `*.rego` (and `*_test.rego`) files, with data files in its `data/`.
    pub dir: PathBuf,
    pub query: String,
    pub timeout_ms: u64,
    /// How often the files are checked for changes (hot reload); SIGHUP reloads at once.
    pub reload_check_ms: u64,
    #[serde(default)]
    pub allow: Vec<Entry>,
    #[serde(default)]
    pub deny: Vec<Entry>,
    pub bundle: BundleConfig,
}

/// `[pep.policy.bundle]`: policy from an OPA bundle server (docs/fleet.md).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BundleConfig {
    /// The bundle's URL (`https://bundles.example/pexi.tar.gz`); "" for none.
    pub url: String,
    pub poll_seconds: u64,
    /// The PEM public key its signature must verify with.
    pub public_key: PathBuf,
    pub algorithm: String,
    /// When set, the signature must name this key.
    pub key_id: String,
    /// Must equal the signature's `scope`, as in OPA.
    pub scope: String,
    /// Extra CA certificates (PEM) for the bundle server; "" for the public roots only.
    pub ca_file: PathBuf,
    /// Where the last good bundle is kept; "" is `bundle/` beside the audit log.
    pub dir: PathBuf,
    pub timeout_ms: u64,
    /// The largest archive accepted.
    pub max_bytes: u64,
}

impl BundleConfig {
    pub fn enabled(&self) -> bool {
        !self.url.is_empty()
    }

    pub fn dir_path(&self, audit: &AuditConfig) -> PathBuf {
        audit.or_beside(&self.dir, "bundle")
    }

    /// The key bundles must be signed with.
    pub fn verification_key(&self) -> Result<crate::policy::opa_bundle::VerificationKey, String> {
        let algorithm = crate::policy::opa_bundle::algorithm(&self.algorithm)
            .map_err(|err| format!("pep.policy.bundle.{err}"))?;
        if self.public_key.as_os_str().is_empty() {
            return Err(
                "pep.policy.bundle.public_key: a bundle is verified before it serves; name the PEM \
                 public key its signature must verify with"
                    .into(),
            );
        }
        let pem = std::fs::read(&self.public_key).map_err(|err| {
            format!(
                "pep.policy.bundle.public_key {}: {err}",
                self.public_key.display()
            )
        })?;
        crate::policy::opa_bundle::VerificationKey::from_pem(
            &pem,
            algorithm,
            (!self.key_id.is_empty()).then(|| self.key_id.clone()),
            self.scope.clone(),
        )
        .map_err(|err| {
            format!(
                "pep.policy.bundle.public_key {}: {err}",
                self.public_key.display()
            )
        })
    }

    pub fn limits(&self) -> crate::policy::opa_bundle::Limits {
        crate::policy::opa_bundle::Limits {
            max_bytes: self.max_bytes,
            max_unpacked_bytes: self.max_bytes.saturating_mul(4),
            ..Default::default()
        }
    }

    fn check(&self) -> Result<(), String> {
        if !self.enabled() {
            return Ok(());
        }
        let url = url::Url::parse(&self.url)
            .map_err(|err| format!("pep.policy.bundle.url = {:?}: {err}", self.url))?;
        if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
            return Err(format!(
                "pep.policy.bundle.url = {:?}: an http(s) URL",
                self.url
            ));
        }
        if self.poll_seconds == 0 {
            return Err("pep.policy.bundle.poll_seconds: at least 1".into());
        }
        self.verification_key().map(drop)
    }
}

/// `[pep.approvals]`: asking a person about requests the policy holds (docs/approvals.md).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApprovalsConfig {
    /// Whether the shipped policy asks (`data.pexi.approvals.enabled`); off, it denies as before.
    pub enabled: bool,
    /// How long a held request waits for an answer before it is denied ("no answer").
    pub approval_timeout_ms: u64,
    /// Questions waiting at once, over all guests (a quarter of them per guest session); a request that
    /// would open one more is denied at once.
    pub max_waiting: usize,
    /// The "always" answers: a policy data file of their own. "" is `approvals.json` beside the audit log.
    pub file: PathBuf,
}

impl ApprovalsConfig {
    /// The approvals file, once the audit path is known.
    pub fn file_path(&self, audit: &AuditConfig) -> PathBuf {
        audit.or_beside(&self.file, "approvals.json")
    }
}

/// `[pep.control]`: the PEP's own surfaces for people (docs/approvals.md).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlConfig {
    /// The control socket `pexi approve` and `pexi ui` use (owner-only). "" is `control.sock` beside the
    /// audit log.
    pub socket: PathBuf,
    /// Where the dashboard listens: a loopback `address:port` (port 0 picks one), or "" for none.
    pub dashboard: String,
}

impl ControlConfig {
    pub fn socket_path(&self, audit: &AuditConfig) -> PathBuf {
        audit.or_beside(&self.socket, "control.sock")
    }

    /// The dashboard's address; only loopback addresses are accepted, so the page is host-only.
    pub fn dashboard_addr(&self) -> Result<Option<std::net::SocketAddr>, String> {
        loopback_addr("pep.control.dashboard", &self.dashboard, "127.0.0.1:0")
    }
}

/// `[pep.export]`: the audit log shipped to a SIEM (docs/fleet.md, "Audit export"). Each sink reads the
/// log files on its own with a cursor of its own; none is on a decision's path.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportConfig {
    /// Where each sink keeps its cursor (`export-otlp.cursor`, `export-syslog.cursor`). "" is beside the
    /// audit log.
    pub cursor_dir: PathBuf,
    /// Records per OTLP request or syslog write.
    pub batch_records: usize,
    /// The longest wait between attempts while a sink is down (the first is 100 ms, then doubling).
    pub retry_max_ms: u64,
    pub otlp: OtlpConfig,
    pub syslog: SyslogConfig,
}

impl ExportConfig {
    pub fn cursor_path(&self, audit: &AuditConfig, sink: &str) -> PathBuf {
        let name = format!("export-{sink}.cursor");
        if self.cursor_dir.as_os_str().is_empty() {
            audit.or_beside(Path::new(""), &name)
        } else {
            self.cursor_dir.join(name)
        }
    }

    fn check(&self) -> Result<(), String> {
        if self.batch_records == 0 || self.batch_records > 10_000 {
            return Err(format!(
                "pep.export.batch_records = {}: 1 to 10000",
                self.batch_records
            ));
        }
        if !self.otlp.endpoint.is_empty() {
            let url = url::Url::parse(&self.otlp.endpoint).map_err(|err| {
                format!("pep.export.otlp.endpoint = {:?}: {err}", self.otlp.endpoint)
            })?;
            if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
                return Err(format!(
                    "pep.export.otlp.endpoint = {:?}: an http(s) URL such as \"https://collector:4318/v1/logs\"",
                    self.otlp.endpoint
                ));
            }
        }
        if !self.syslog.address.is_empty() {
            let (host, port) = self.syslog.address.rsplit_once(':').ok_or_else(|| {
                format!(
                    "pep.export.syslog.address = {:?}: host:port, such as \"siem.example:6514\"",
                    self.syslog.address
                )
            })?;
            if host.is_empty() || port.parse::<u16>().map_or(true, |p| p == 0) {
                return Err(format!(
                    "pep.export.syslog.address = {:?}: host:port with a port 1-65535",
                    self.syslog.address
                ));
            }
            if !matches!(self.syslog.transport.as_str(), "tls" | "tcp") {
                return Err(format!(
                    "pep.export.syslog.transport = {:?}: \"tls\" or \"tcp\"",
                    self.syslog.transport
                ));
            }
        }
        Ok(())
    }
}

/// `[pep.export.otlp]`: OpenTelemetry logs over OTLP/HTTP (protobuf).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OtlpConfig {
    /// The collector's logs URL (`https://collector:4318/v1/logs`); "" for none.
    pub endpoint: String,
    /// Extra CA certificates (PEM) for a collector with a private CA; "" for the public roots only.
    pub ca_file: PathBuf,
    /// Extra request headers (a tenant, an API key the collector wants).
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    pub timeout_ms: u64,
}

/// `[pep.export.syslog]`: RFC 5424 messages over TCP, octet-counted (RFC 6587), TLS by default (RFC 5425).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyslogConfig {
    /// The receiver's `host:port`; "" for none.
    pub address: String,
    /// `tls` (RFC 5425) or `tcp`.
    pub transport: String,
    /// Extra CA certificates (PEM) for the receiver's certificate; "" for the public roots only.
    pub ca_file: PathBuf,
    /// The name the certificate must carry; "" is the address's host.
    pub server_name: String,
    /// The HOSTNAME field; "" is this machine's host name.
    pub hostname: String,
}

/// `[pep.metrics]`: the Prometheus endpoint (docs/fleet.md).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// A loopback `address:port` serving `GET /metrics`, or "" for none.
    pub listen: String,
}

impl MetricsConfig {
    /// The endpoint's address; loopback only, so the counts stay on the host (a fleet scrapes them with
    /// an agent on each host).
    pub fn addr(&self) -> Result<Option<std::net::SocketAddr>, String> {
        loopback_addr("pep.metrics.listen", &self.listen, "127.0.0.1:9464")
    }
}

/// A loopback `address:port` from a config value ("" is none).
fn loopback_addr(
    key: &str,
    value: &str,
    example: &str,
) -> Result<Option<std::net::SocketAddr>, String> {
    if value.is_empty() {
        return Ok(None);
    }
    let addr: std::net::SocketAddr = value.parse().map_err(|_| {
        format!(
            "{key} = {value:?}: expected a loopback address and port such as \"{example}\", or \"\" for none"
        )
    })?;
    if !addr.ip().is_loopback() {
        return Err(format!(
            "{key} = {value:?}: it listens on loopback only (127.0.0.0/8 or ::1)"
        ));
    }
    Ok(Some(addr))
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkConfig {
    #[serde(default)]
    pub allowed_cidrs: Vec<ipnet::IpNet>,
    #[serde(default)]
    pub extra_ca_file: String,
    #[serde(default)]
    pub dns_overrides: BTreeMap<String, Vec<IpAddr>>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    pub path: PathBuf,
    pub durability: crate::audit::Durability,
    pub batch_ms: u64,
    pub batch_records: usize,
    pub rotate_bytes: u64,
    /// Retention of rotated files (0 for no bound of that kind): the oldest go first, and each removal is
    /// recorded in the chain (`audit_retention`).
    pub keep_rotated_files: usize,
    pub keep_rotated_bytes: u64,
    /// The host-only folder of the signing key (and the public key beside it) and of the redaction key;
    /// "" for `keys/` beside the log (not matched by the log's `<path>*` glob).
    pub keys_dir: String,
    /// Sign every record and write signed checkpoints (docs/audit.md).
    pub sign: bool,
    /// The checkpoint file; "" for `checkpoints/<name>.checkpoints` beside the log.
    pub checkpoint_path: String,
    pub checkpoint_ms: u64,
    pub checkpoint_records: u64,
    /// `pexi serve --force`: a log that does not verify is moved aside instead of refusing to start.
    #[serde(skip)]
    pub force: bool,
    /// Host-only key for digests of redacted values: a path, "" for `<path>.key`, "none" for no digests.
    pub key_file: String,
    pub redact_headers: Vec<String>,
    pub redact_query_params: Vec<String>,
}

impl AuditConfig {
    /// `configured`, or when it is empty the file `name` beside the log (the PEP's own files default
    /// there: private, and apart for each PEP).
    pub fn or_beside(&self, configured: &Path, name: &str) -> PathBuf {
        if configured.as_os_str().is_empty() {
            self.path.parent().unwrap_or(Path::new(".")).join(name)
        } else {
            configured.to_path_buf()
        }
    }

    pub fn settings(&self) -> crate::audit::AuditSettings {
        crate::audit::AuditSettings {
            path: self.path.clone(),
            durability: self.durability,
            batch_ms: self.batch_ms,
            batch_records: self.batch_records,
            rotate_bytes: self.rotate_bytes,
            keep_rotated_files: self.keep_rotated_files,
            keep_rotated_bytes: self.keep_rotated_bytes,
            sealing: None,
            force: self.force,
        }
    }

    /// The settings with the signing key loaded (or created) when `sign` is on.
    pub fn settings_with_keys(&self) -> std::io::Result<crate::audit::AuditSettings> {
        let mut settings = self.settings();
        if self.sign {
            let sealer = crate::audit::seal::Sealer::load_or_create(&self.keys_dir())?;
            settings.sealing = Some(crate::audit::Sealing {
                sealer: std::sync::Arc::new(sealer),
                checkpoint_path: self.checkpoint_path(),
                checkpoint_every: Duration::from_millis(self.checkpoint_ms),
                checkpoint_records: self.checkpoint_records.max(1),
            });
        }
        Ok(settings)
    }

    pub fn keys_dir(&self) -> PathBuf {
        match self.keys_dir.as_str() {
            "" => crate::audit::seal::default_keys_dir(&self.path),
            dir => PathBuf::from(dir),
        }
    }

    pub fn checkpoint_path(&self) -> PathBuf {
        match self.checkpoint_path.as_str() {
            "" => crate::audit::seal::default_checkpoint_path(&self.path),
            path => PathBuf::from(path),
        }
    }

    /// Where the redaction key lives, if digests are kept: in the keys folder by default. A key left at
    /// the old place (`<path>.key`, which the log's glob matched) is moved there on first use.
    pub fn key_path(&self) -> Option<PathBuf> {
        match self.key_file.as_str() {
            "none" => None,
            "" => Some(self.keys_dir().join("audit-redaction.key")),
            path => Some(PathBuf::from(path)),
        }
    }

    /// `<path>.key`: where the redaction key was kept before it moved to the keys folder.
    pub fn legacy_key_path(&self) -> PathBuf {
        let mut name = self.path.as_os_str().to_owned();
        name.push(".key");
        PathBuf::from(name)
    }
}

/// One place guests reach the PEP.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Listen {
    Unix(PathBuf),
    Connect(PathBuf),
    Vsock(u32),
}

impl FromStr for Listen {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (kind, rest) = s
            .split_once(':')
            .ok_or_else(|| format!("{s:?}: expected unix:PATH, connect:PATH or vsock:PORT"))?;
        match kind {
            "unix" if !rest.is_empty() => Ok(Listen::Unix(PathBuf::from(rest))),
            "connect" if !rest.is_empty() => Ok(Listen::Connect(PathBuf::from(rest))),
            "vsock" => rest
                .parse()
                .map(Listen::Vsock)
                .map_err(|_| format!("{s:?}: vsock port must be a number")),
            _ => Err(format!(
                "{s:?}: expected unix:PATH, connect:PATH or vsock:PORT"
            )),
        }
    }
}

impl fmt::Display for Listen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Listen::Unix(path) => write!(f, "unix:{}", path.display()),
            Listen::Connect(path) => write!(f, "connect:{}", path.display()),
            Listen::Vsock(port) => write!(f, "vsock:{port}"),
        }
    }
}

impl<'de> Deserialize<'de> for Listen {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        // Written as text; `FromStr`'s message names what is accepted.
        String::deserialize(deserializer)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// Which VM a listener's guests are, as the host sets it up (`[pep] listen` entries written as tables,
/// `pexi vm run --name`): the policy input's `vm`. Never taken from anything the guest says, so rules may
/// trust it where they must not trust `session.guest`. Empty for a listener that names no VM.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct VmIdentity {
    pub name: String,
    pub profile: String,
}

impl VmIdentity {
    pub fn is_named(&self) -> bool {
        !self.name.is_empty()
    }
}

/// One `[pep] listen` entry: where guests connect, and which VM they are. Written as `"unix:PATH"` (no
/// identity) or `{ at = "unix:PATH", vm = "alice", profile = "openclaw" }`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Listener {
    pub at: Listen,
    pub vm: std::sync::Arc<VmIdentity>,
}

impl Listener {
    pub fn anonymous(at: Listen) -> Listener {
        Listener {
            at,
            vm: Default::default(),
        }
    }
}

impl fmt::Display for Listener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.vm.name.as_str(), self.vm.profile.as_str()) {
            ("", _) => write!(f, "{}", self.at),
            (name, "") => write!(f, "{} (vm {name})", self.at),
            (name, profile) => write!(f, "{} (vm {name}, profile {profile})", self.at),
        }
    }
}

impl<'de> Deserialize<'de> for Listener {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Table {
            at: Listen,
            vm: String,
            #[serde(default)]
            profile: String,
        }
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Written {
            Text(String),
            Table(Table),
        }
        use serde::de::Error;
        match Written::deserialize(deserializer).map_err(|_| {
            D::Error::custom(
                "a listener is \"unix:PATH\", \"connect:PATH\", \"vsock:PORT\" or a table \
                 { at = \"unix:PATH\", vm = \"NAME\", profile = \"PROFILE\" } (profile optional)",
            )
        })? {
            Written::Text(text) => text
                .parse()
                .map(Listener::anonymous)
                .map_err(D::Error::custom),
            Written::Table(table) => {
                crate::policy::entries::vm_label("vm", &table.vm).map_err(D::Error::custom)?;
                if !table.profile.is_empty() {
                    crate::policy::entries::vm_label("profile", &table.profile)
                        .map_err(D::Error::custom)?;
                }
                Ok(Listener {
                    at: table.at,
                    vm: std::sync::Arc::new(VmIdentity {
                        name: table.vm,
                        profile: table.profile,
                    }),
                })
            }
        }
    }
}

pub use pexi_vm::{Accel, GuestArch, ProfileSettings, Runner, VmConfig};

/// The configuration the PEP runs on, with the policy sources it names already read.
#[derive(Clone, Debug)]
pub struct Config {
    /// Where it came from, for messages.
    pub source: String,
    pub pep: PepConfig,
    /// Where the policy bundle is read from: compiled in for the embedded config, else `pep.policy.dir`
    /// relative to the config file.
    pub policy_root: PolicyRoot,
    /// The config file, for hot reload; `None` for the embedded default.
    pub path: Option<PathBuf>,
    /// The extra CA bundle's PEM text, if one is configured.
    pub extra_ca_pem: Option<Vec<u8>>,
    /// `[vm]`, its paths resolved; `None` when the file has no such table.
    pub vm: Option<VmConfig>,
    /// `[[secrets]]`, their values read (docs/secrets.md).
    pub secrets: crate::secrets::Secrets,
    /// Folders named by `{state_dir}` / `{runtime_dir}`: created owner-only, refused when shared
    /// ([`Config::ensure_private_dirs`]).
    pub private_dirs: Vec<PathBuf>,
}

impl Config {
    /// The embedded default, with environment overrides applied.
    pub fn embedded() -> Result<Config, ConfigError> {
        Config::load(None)
    }

    /// Reads `path` (or the embedded default when `None`) and applies the environment overrides.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let env: Vec<(String, String)> = std::env::vars().collect();
        Config::load_with_env(path, &env)
    }

    pub fn load_with_env(
        path: Option<&Path>,
        env: &[(String, String)],
    ) -> Result<Config, ConfigError> {
        let (source, text, base) = match path {
            None => (EMBEDDED_NAME.to_string(), EMBEDDED_CONFIG.to_string(), None),
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    file: path.display().to_string(),
                    source,
                })?;
                // Absolute, so that messages name the folder even for `--config pexi.toml`.
                let base = std::path::absolute(path)
                    .ok()
                    .and_then(|p| p.parent().map(Path::to_path_buf))
                    .unwrap_or_else(|| path.parent().map(Path::to_path_buf).unwrap_or_default());
                (path.display().to_string(), text, Some(base))
            }
        };
        let Parsed {
            mut pep,
            vm,
            secrets: secret_configs,
            user_keys,
        } = parse(&source, &text, path.is_some())?;
        apply_env(&mut pep, env)?;
        let invalid = |message: String| ConfigError::Invalid {
            file: source.clone(),
            message,
        };
        if pep.listen.is_empty() {
            return Err(invalid("pep.listen names no listener".into()));
        }
        pep.limits.check().map_err(invalid)?;
        // A path the file itself sets is relative to the file's folder; one it leaves to the default is
        // the default's (the compiled-in policy, the repository's `target/vm`).
        let set_here = |key: &str| base.is_some() && user_keys.contains(key);
        pep.control.dashboard_addr().map_err(invalid)?;
        pep.metrics.addr().map_err(invalid)?;
        pep.export.check().map_err(invalid)?;
        for (key, path) in [
            ("pep.approvals.file", &mut pep.approvals.file),
            ("pep.control.socket", &mut pep.control.socket),
            ("pep.export.cursor_dir", &mut pep.export.cursor_dir),
            ("pep.export.otlp.ca_file", &mut pep.export.otlp.ca_file),
            ("pep.export.syslog.ca_file", &mut pep.export.syslog.ca_file),
            (
                "pep.policy.bundle.public_key",
                &mut pep.policy.bundle.public_key,
            ),
            ("pep.policy.bundle.ca_file", &mut pep.policy.bundle.ca_file),
            ("pep.policy.bundle.dir", &mut pep.policy.bundle.dir),
        ] {
            if let Some(base) = base.as_deref().filter(|_| set_here(key)) {
                if !path.as_os_str().is_empty() && !crate::dirs::is_placeholder(path) {
                    *path = base.join(&*path);
                }
            }
        }
        pep.policy.bundle.check().map_err(invalid)?;
        let relative_note = |key: &str, value: &Path, resolved: &Path| {
            format!(
                "{key} = {value:?} names {}, which does not exist (a relative path in a config file is relative \
                 to the file's folder{}); give an absolute path, or leave {key} out to use the default",
                resolved.display(),
                base.as_deref()
                    .map(|b| format!(", {}", b.display()))
                    .unwrap_or_default()
            )
        };
        let policy_root = match &base {
            Some(base) if set_here("pep.policy.dir") => {
                let dir = base.join(&pep.policy.dir);
                if !dir.is_dir() {
                    return Err(invalid(relative_note(
                        "pep.policy.dir",
                        &pep.policy.dir,
                        &dir,
                    )));
                }
                PolicyRoot::Dir(dir)
            }
            _ => PolicyRoot::Embedded,
        };
        let extra_ca_pem = match pep.network.extra_ca_file.as_str() {
            "" => None,
            file => {
                let path = base.as_deref().unwrap_or(Path::new(".")).join(file);
                if !path.exists() {
                    return Err(invalid(relative_note(
                        "pep.network.extra_ca_file",
                        Path::new(file),
                        &path,
                    )));
                }
                Some(std::fs::read(&path).map_err(|source| ConfigError::Read {
                    file: path.display().to_string(),
                    source,
                })?)
            }
        };
        let mut vm = vm.map(|mut vm| {
            // An aarch64 guest's image and emulator, where the file leaves them to the default.
            if vm.arch != GuestArch::X86_64 {
                let (image, kernel) = vm.arch.image_defaults();
                let image = Path::new(image);
                for (key, path, default) in [
                    ("vm.kernel", &mut vm.kernel, image.join(kernel)),
                    ("vm.initrd", &mut vm.initrd, image.join("initramfs.cpio.gz")),
                    ("vm.share", &mut vm.share, image.join("share")),
                ] {
                    if !set_here(key) {
                        *path = default;
                    }
                }
                if !set_here("vm.qemu") {
                    vm.qemu = vm.arch.qemu().into();
                }
            }
            for (key, path) in [
                ("vm.kernel", &mut vm.kernel),
                ("vm.initrd", &mut vm.initrd),
                ("vm.share", &mut vm.share),
                ("vm.run_dir", &mut vm.run_dir),
            ] {
                if let Some(base) = base.as_deref().filter(|_| set_here(key)) {
                    if !path.as_os_str().is_empty() && !crate::dirs::is_placeholder(path) {
                        *path = base.join(&*path);
                    }
                }
            }
            for (name, settings) in vm.profiles.iter_mut() {
                let key = format!("vm.profiles.{name}.dir");
                if let (Some(base), Some(dir)) = (base.as_deref(), settings.dir.as_mut()) {
                    if set_here(&key) && !dir.as_os_str().is_empty() {
                        *dir = base.join(&*dir);
                    }
                }
            }
            vm
        });
        let private_dirs =
            expand_user_dirs(&mut pep, vm.as_mut()).map_err(|err| ConfigError::Dirs {
                file: source.clone(),
                source: err,
            })?;
        let secret_base = base.as_deref().unwrap_or(Path::new("."));
        let secrets = secret_configs
            .iter()
            .map(|config| crate::secrets::Secret::load(config, env, secret_base))
            .collect::<Result<Vec<_>, _>>()
            .and_then(crate::secrets::Secrets::new)
            .map_err(|err| invalid(err.to_string()))?;
        Ok(Config {
            source,
            pep,
            policy_root,
            path: path.map(Path::to_path_buf),
            extra_ca_pem,
            vm,
            secrets,
            private_dirs,
        })
    }

    /// Creates the per-user folders this config names (mode 0700), or checks that they are this user's
    /// and written by nobody else. Everything that writes there calls this first.
    pub fn ensure_private_dirs(&self) -> Result<(), ConfigError> {
        crate::dirs::ensure_private_all(&self.private_dirs).map_err(|source| ConfigError::Dirs {
            file: self.source.clone(),
            source,
        })
    }
}

/// Replaces `{state_dir}` / `{runtime_dir}` in the paths that may hold them; returns the folders that
/// must be private (each placeholder's folder and the folder of each path under it).
fn expand_user_dirs(
    pep: &mut PepConfig,
    vm: Option<&mut VmConfig>,
) -> Result<Vec<PathBuf>, crate::dirs::DirError> {
    let mut user_dirs = None;
    if let Some(vm) = vm {
        vm.private_dirs = expand_paths(vec![(&mut vm.run_dir, true)], &mut user_dirs)?;
    }
    let mut paths: Vec<(&mut PathBuf, bool)> = Vec::new();
    for listen in pep.listen.iter_mut() {
        if let Listen::Unix(path) | Listen::Connect(path) = &mut listen.at {
            paths.push((path, false));
        }
    }
    paths.push((&mut pep.audit.path, false));
    paths.push((&mut pep.approvals.file, false));
    paths.push((&mut pep.control.socket, false));
    paths.push((&mut pep.policy.bundle.dir, false));
    paths.push((&mut pep.export.cursor_dir, false));
    let mut key_file = PathBuf::from(&pep.audit.key_file);
    paths.push((&mut key_file, false));
    let private = expand_paths(paths, &mut user_dirs)?;
    if crate::dirs::is_placeholder(Path::new(&pep.audit.key_file)) {
        pep.audit.key_file = key_file.display().to_string();
    }
    Ok(private)
}

fn expand_paths(
    paths: Vec<(&mut PathBuf, bool)>,
    user_dirs: &mut Option<crate::dirs::UserDirs>,
) -> Result<Vec<PathBuf>, crate::dirs::DirError> {
    let mut private = Vec::new();
    for (path, is_dir) in paths {
        if !crate::dirs::is_placeholder(path) {
            continue;
        }
        let dirs = match &user_dirs {
            Some(dirs) => dirs,
            None => user_dirs.insert(crate::dirs::UserDirs::from_env()?),
        };
        let root = dirs.root_of(path);
        *path = dirs.expand(path);
        let folder = if is_dir {
            Some(path.clone())
        } else {
            path.parent().map(Path::to_path_buf)
        };
        for dir in [root, folder].into_iter().flatten() {
            if dirs.holds(&dir) && !private.contains(&dir) {
                private.push(dir);
            }
        }
    }
    // Ancestors first: a folder is checked (not a link, ours, private) before anything is made inside it.
    private.sort_by_key(|dir| dir.components().count());
    Ok(private)
}

struct Parsed {
    pep: PepConfig,
    vm: Option<VmConfig>,
    secrets: Vec<crate::secrets::SecretConfig>,
    /// The dotted keys the file itself sets (`pep.policy.dir`), as opposed to the default's.
    user_keys: std::collections::BTreeSet<String>,
}

/// Parses `text` laid over the embedded default: a file names only what it changes. Tables merge key by
/// key; any other value (an array, `[[pep.policy.allow]]` and `[[secrets]]` among them) replaces the
/// default's whole. A key the default does not have is still an error at its line, as is a bad value.
fn parse(source: &str, text: &str, over_default: bool) -> Result<Parsed, ConfigError> {
    let parse_error = |err: toml::de::Error| {
        let (line, column) = err
            .span()
            .map(|span| line_and_column(text, span.start))
            .unwrap_or((0, 0));
        ConfigError::Parse {
            file: source.to_string(),
            line,
            column,
            message: err.message().to_string(),
        }
    };
    let user = toml::de::DeTable::parse(text).map_err(parse_error)?;
    let mut user_keys = std::collections::BTreeSet::new();
    collect_keys(user.get_ref(), "", &mut user_keys);
    let merged = if !over_default {
        user
    } else {
        let mut base =
            toml::de::DeTable::parse(EMBEDDED_CONFIG).map_err(|err| ConfigError::Invalid {
                file: EMBEDDED_NAME.into(),
                message: err.to_string(),
            })?;
        overlay(base.get_mut(), user.into_inner());
        base
    };
    // The embedded default's spans index its own text, a user's value's index the user's: only the
    // user's values can be wrong, so line numbers are computed against `text`.
    File::deserialize(toml::de::Deserializer::from(merged))
        .map(|file| Parsed {
            pep: file.pep,
            vm: file.vm,
            secrets: file.secrets,
            user_keys,
        })
        .map_err(parse_error)
}

fn collect_keys(
    table: &toml::de::DeTable<'_>,
    prefix: &str,
    keys: &mut std::collections::BTreeSet<String>,
) {
    for (key, value) in table {
        let name = format!("{prefix}{}", key.get_ref());
        if let toml::de::DeValue::Table(inner) = value.get_ref() {
            collect_keys(inner, &format!("{name}."), keys);
        }
        keys.insert(name);
    }
}

/// Lays `over` onto `base`: tables recursively, everything else replaced.
fn overlay<'i>(base: &mut toml::de::DeTable<'i>, over: toml::de::DeTable<'i>) {
    use toml::de::DeValue;
    for (key, value) in over {
        let existing = base
            .iter_mut()
            .find(|(name, _)| name.get_ref() == key.get_ref())
            .map(|(_, existing)| existing);
        match existing {
            Some(existing)
                if matches!(existing.get_ref(), DeValue::Table(_))
                    && matches!(value.get_ref(), DeValue::Table(_)) =>
            {
                if let (DeValue::Table(inner), DeValue::Table(table)) =
                    (existing.get_mut(), value.into_inner())
                {
                    overlay(inner, table);
                }
            }
            Some(existing) => *existing = value,
            None => {
                base.insert(key, value);
            }
        }
    }
}

fn line_and_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
    (line, column)
}

/// The spike's environment variables, applied over the file.
fn apply_env(pep: &mut PepConfig, env: &[(String, String)]) -> Result<(), ConfigError> {
    fn number<T: FromStr>(name: &'static str, value: &str) -> Result<T, ConfigError> {
        value.trim().parse().map_err(|_| ConfigError::Env {
            name,
            value: value.to_string(),
            message: "expected a non-negative whole number".into(),
        })
    }
    for (name, value) in env {
        match name.as_str() {
            "PEP_ALLOWED_DOMAINS" => {
                for domain in value.split(',').map(str::trim).filter(|d| !d.is_empty()) {
                    let entry = Entry::host(domain).map_err(|message| ConfigError::Env {
                        name: "PEP_ALLOWED_DOMAINS",
                        value: value.to_string(),
                        message,
                    })?;
                    pep.policy.allow.push(entry);
                }
            }
            "PEP_MAX_REQUEST_BYTES" => {
                pep.limits.max_request_bytes = number("PEP_MAX_REQUEST_BYTES", value)?
            }
            "PEP_MAX_RESPONSE_BYTES" => {
                pep.limits.max_response_bytes = number("PEP_MAX_RESPONSE_BYTES", value)?
            }
            "PEP_MAX_REDIRECTS" => pep.limits.max_redirects = number("PEP_MAX_REDIRECTS", value)?,
            "PEP_AUDIT_LOG" => pep.audit.path = PathBuf::from(value),
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn the_embedded_default_loads_and_denies_everything() {
        let config = Config::load_with_env(None, &[]).expect("embedded config loads");
        assert!(config.pep.policy.allow.is_empty() && config.pep.policy.deny.is_empty());
        assert_eq!(config.policy_root, PolicyRoot::Embedded);
        assert!(config.pep.network.allowed_cidrs.is_empty());
        assert_eq!(config.pep.limits.max_redirects, 5);
    }

    #[test]
    fn environment_overrides_the_file() {
        let config = Config::load_with_env(
            None,
            &env(&[
                ("PEP_ALLOWED_DOMAINS", " Example.com, *.api.test ,"),
                ("PEP_MAX_REQUEST_BYTES", "10"),
                ("PEP_MAX_RESPONSE_BYTES", "20"),
                ("PEP_MAX_REDIRECTS", "0"),
                ("PEP_AUDIT_LOG", "/var/log/pexi.jsonl"),
            ]),
        )
        .expect("loads");
        let hosts: Vec<&str> = config
            .pep
            .policy
            .allow
            .iter()
            .map(|e| e.host.as_str())
            .collect();
        assert_eq!(hosts, vec!["example.com", "*.api.test"]);
        assert_eq!(config.pep.limits.max_request_bytes, 10);
        assert_eq!(config.pep.limits.max_response_bytes, 20);
        assert_eq!(config.pep.limits.max_redirects, 0);
        assert_eq!(config.pep.audit.path, PathBuf::from("/var/log/pexi.jsonl"));
    }

    #[test]
    fn a_bad_environment_value_names_the_variable() {
        let err = Config::load_with_env(None, &env(&[("PEP_MAX_REDIRECTS", "five")]))
            .expect_err("refused");
        assert!(err.to_string().contains("PEP_MAX_REDIRECTS"), "{err}");
        let err = Config::load_with_env(None, &env(&[("PEP_ALLOWED_DOMAINS", "ok.test,*.com")]))
            .expect_err("refused");
        let text = err.to_string();
        assert!(
            text.contains("PEP_ALLOWED_DOMAINS") && text.contains("*.com"),
            "{text}"
        );
    }

    fn parse_error(edit: impl Fn(&str) -> String) -> String {
        let dir = std::env::temp_dir().join(format!("pexi-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let path = dir.join(format!("config-{}.toml", rand_suffix()));
        std::fs::write(&path, edit(EMBEDDED_CONFIG)).expect("write config");
        let result = Config::load_with_env(Some(&path), &[]);
        std::fs::remove_file(&path).expect("cleanup");
        // Other tests may still be writing theirs into the folder: only the last one out removes it.
        let _ = std::fs::remove_dir(&dir);
        match result {
            Ok(_) => "loaded".to_string(),
            Err(err) => err.to_string(),
        }
    }

    fn rand_suffix() -> u64 {
        use std::sync::atomic::{AtomicU64, Ordering};
        static N: AtomicU64 = AtomicU64::new(0);
        N.fetch_add(1, Ordering::Relaxed)
    }

    /// The product's default is not the developers' task list: it has no such tables, and the repository's
    /// `config.toml` given as `--config` is refused by name instead of being half-read.
    #[test]
    fn the_default_is_the_pep_configuration_and_nothing_else() {
        let tables: toml::Table = EMBEDDED_CONFIG.parse().expect("default parses");
        let mut names: Vec<&str> = tables.keys().map(String::as_str).collect();
        names.sort_unstable();
        assert_eq!(names, ["pep", "vm"]);
        let err = parse_error(|_| include_str!("../../config.toml").to_string());
        assert!(err.contains("commands"), "{err}");
    }

    #[test]
    fn bad_files_fail_with_file_line_and_problem() {
        let line_of = |needle: &str| {
            EMBEDDED_CONFIG
                .lines()
                .position(|l| l.starts_with(needle))
                .expect("line present")
                + 1
        };
        let err =
            parse_error(|t| t.replace("allowed_cidrs = []", "allowed_cidrs = [\"10.0.0.0/33\"]"));
        assert!(
            err.contains(&format!(".toml:{}:", line_of("allowed_cidrs"))),
            "{err}"
        );
        assert!(err.contains("invalid IP address"), "{err}");

        let err = parse_error(|t| {
            t.replace(
                "listen = [\"unix:{runtime_dir}/pep.sock\"]",
                "listen = [\"tcp:0.0.0.0:80\"]",
            )
        });
        assert!(
            err.contains(&format!(".toml:{}:", line_of("listen ="))),
            "{err}"
        );
        assert!(err.contains("expected unix:PATH"), "{err}");

        let err = parse_error(|t| t.replace("max_redirects = 5", "max_redirect = 5"));
        assert!(err.contains("unknown field `max_redirect`"), "{err}");

        let err = parse_error(|t| t.replace("[pep.audit]", "[pep.audti]"));
        assert!(err.contains("pep.audti") || err.contains("audti"), "{err}");

        let err = parse_error(|t| format!("{t}\n[[pep.policy.allow]]\nhost = \"*.com\"\n"));
        let line = EMBEDDED_CONFIG.lines().count() + 3;
        assert!(
            err.contains(&format!(".toml:{line}:")) && err.contains("*.com"),
            "{err}"
        );

        // A whole copy of the default elsewhere names `policies` next to itself, which is not there.
        let err = parse_error(|t| t.to_string());
        assert!(err.contains("relative to the file's folder"), "{err}");
        assert_eq!(
            parse_error(|t| t.replace("dir = \"policies\"\n", "")),
            "loaded"
        );
    }

    /// Writes `text` as a config file in a folder of its own and loads it.
    fn load_text(text: &str) -> (Result<Config, ConfigError>, PathBuf) {
        let dir = std::env::temp_dir().join(format!(
            "pexi-config-test-{}-{}",
            std::process::id(),
            rand_suffix()
        ));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let path = dir.join("mine.toml");
        std::fs::write(&path, text).expect("write config");
        let result = Config::load_with_env(Some(&path), &[]);
        std::fs::remove_dir_all(&dir).expect("cleanup");
        (result, dir)
    }

    #[test]
    fn fleet_settings_are_checked_when_the_file_loads() {
        let refused = |text: &str, wanted: &str| {
            let (result, _) = load_text(text);
            let err = result.err().map(|e| e.to_string()).unwrap_or_default();
            assert!(err.contains(wanted), "{text}: {err}");
        };
        refused(
            "[pep.policy.bundle]\nurl = \"https://b.example/p.tar.gz\"\n",
            "pep.policy.bundle.public_key",
        );
        refused(
            "[pep.policy.bundle]\nurl = \"ftp://b.example/p.tar.gz\"\npublic_key = \"k.pem\"\n",
            "an http(s) URL",
        );
        refused(
            "[pep.policy.bundle]\nurl = \"https://b.example/p\"\npublic_key = \"k.pem\"\nalgorithm = \"HS256\"\n",
            "algorithm",
        );
        refused(
            "[pep.policy.bundle]\nurl = \"https://b.example/p\"\npublic_key = \"missing.pem\"\n",
            "missing.pem",
        );
        refused(
            "[pep.export.otlp]\nendpoint = \"collector:4318\"\n",
            "pep.export.otlp.endpoint",
        );
        refused(
            "[pep.export.syslog]\naddress = \"siem.example\"\n",
            "host:port",
        );
        refused(
            "[pep.export.syslog]\naddress = \"siem.example:6514\"\ntransport = \"udp\"\n",
            "transport",
        );
        refused(
            "[pep.metrics]\nlisten = \"0.0.0.0:9464\"\n",
            "loopback only",
        );
        refused("[pep.export]\nbatch_records = 0\n", "batch_records");
    }

    #[test]
    fn a_file_names_only_what_it_changes() {
        let (config, _) = load_text(
            "[pep.limits]\nmax_redirects = 2\n\n[pep.audit]\nbatch_ms = 7\n\n[[pep.policy.allow]]\nhost = \"api.example.com\"\n",
        );
        let config = config.expect("a partial file loads");
        let embedded = Config::load_with_env(None, &[]).expect("embedded");
        assert_eq!(config.pep.limits.max_redirects, 2);
        assert_eq!(config.pep.audit.batch_ms, 7);
        // Everything else is the default's, the built-in policy and the per-user paths among it.
        assert_eq!(
            config.pep.limits.max_request_bytes,
            embedded.pep.limits.max_request_bytes
        );
        assert_eq!(config.pep.audit.durability, embedded.pep.audit.durability);
        assert_eq!(config.pep.audit.path, embedded.pep.audit.path);
        assert_eq!(config.pep.listen, embedded.pep.listen);
        assert_eq!(config.policy_root, PolicyRoot::Embedded);
        assert_eq!(config.pep.policy.allow.len(), 1);
        let vm = config.vm.expect("[vm] from the default");
        let (image, kernel) = GuestArch::host().image_defaults();
        assert_eq!(vm.kernel, Path::new(image).join(kernel));
    }

    #[test]
    fn a_misspelt_key_in_a_partial_file_is_refused_at_its_line() {
        let (err, _) = load_text("# mine\n[pep.limits]\nmax_redirect = 2\n");
        let err = err.expect_err("misspelt").to_string();
        assert!(err.contains("mine.toml:3:"), "{err}");
        assert!(err.contains("unknown field `max_redirect`"), "{err}");
        let (err, _) = load_text("[pep.limits]\nmax_redirects = \"two\"\n");
        let err = err.expect_err("bad value").to_string();
        assert!(err.contains("mine.toml:2:"), "{err}");
        let (err, _) = load_text("[pep.audti]\npath = \"/x\"\n");
        assert!(err.expect_err("bad table").to_string().contains("audti"));
    }

    #[test]
    fn paths_a_file_sets_are_relative_to_it_and_a_missing_one_says_so() {
        let (err, dir) = load_text("[pep.policy]\ndir = \"policies\"\n");
        let err = err.expect_err("no policies next to the file").to_string();
        assert!(
            err.contains("pep.policy.dir")
                && err.contains(&dir.join("policies").display().to_string())
                && err.contains("relative to the file's folder"),
            "{err}"
        );
        let (config, dir) = load_text("[vm]\nkernel = \"k/vmlinux\"\nrun_dir = \"/abs/run\"\n");
        let vm = config.expect("loads").vm.expect("vm");
        assert_eq!(vm.kernel, dir.join("k/vmlinux"));
        assert_eq!(vm.run_dir, PathBuf::from("/abs/run"));
        // Left to the default: the default's meaning, not the file's folder.
        let (image, _) = GuestArch::host().image_defaults();
        assert_eq!(vm.initrd, Path::new(image).join("initramfs.cpio.gz"));
        // A profile's folder set in the file is relative to the file too.
        let (config, dir) = load_text(
            "[vm.profiles.openclaw]
dir = \"oc\"
memory_mb = 3000
",
        );
        let vm = config.expect("loads").vm.expect("vm");
        let openclaw = &vm.profiles["openclaw"];
        assert_eq!(openclaw.dir.as_deref(), Some(dir.join("oc").as_path()));
        assert_eq!(openclaw.memory_mb, Some(3000));
    }

    #[test]
    fn an_aarch64_guest_defaults_to_the_arm64_image_and_emulator() {
        let (config, dir) = load_text("[vm]\narch = \"aarch64\"\nkernel = \"k/Image\"\n");
        let vm = config.expect("loads").vm.expect("vm");
        assert_eq!(vm.arch, GuestArch::Aarch64);
        // What the file sets stays; what it leaves is scripts/vm-image --arch arm64's and QEMU's for arm64.
        assert_eq!(vm.kernel, dir.join("k/Image"));
        assert_eq!(
            vm.initrd,
            PathBuf::from("target/vm-arm64/initramfs.cpio.gz")
        );
        assert_eq!(vm.share, PathBuf::from("target/vm-arm64/share"));
        assert_eq!(vm.qemu, "qemu-system-aarch64");
        let (config, _) =
            load_text("[vm]\narch = \"arm64\"\nqemu = \"/opt/qemu\"\nrunner = \"vfkit\"\n");
        let vm = config.expect("loads").vm.expect("vm");
        assert_eq!(vm.qemu, "/opt/qemu");
        assert_eq!(vm.kernel, PathBuf::from("target/vm-arm64/Image"));
        assert_eq!(vm.runner, Runner::Vfkit);
        // "auto" is this machine's; x86_64 keeps the x86_64 image.
        let (config, _) = load_text("[vm]\narch = \"x86_64\"\n");
        let vm = config.expect("loads").vm.expect("vm");
        assert_eq!(vm.kernel, PathBuf::from("target/vm/vmlinux"));
        assert_eq!(vm.qemu, "qemu-system-x86_64");
        let embedded = Config::embedded().expect("embedded").vm.expect("vm");
        assert_eq!(embedded.arch, GuestArch::host());
        assert_eq!(
            embedded.runner,
            if cfg!(target_os = "macos") {
                Runner::Vfkit
            } else {
                Runner::Qemu
            }
        );
        for (text, message) in [
            ("[vm]\narch = \"riscv64\"\n", "not auto, x86_64 or aarch64"),
            (
                "[vm]\nrunner = \"firecracker\"\n",
                "not auto, qemu or vfkit",
            ),
        ] {
            let (config, _) = load_text(text);
            let err = config.expect_err(text).to_string();
            assert!(err.contains(message), "{err}");
        }
    }

    #[test]
    fn the_default_paths_are_per_user_folders() {
        let config = Config::load_with_env(None, &[]).expect("embedded");
        let dirs = crate::dirs::UserDirs::from_env().expect("a home folder");
        assert_eq!(config.pep.audit.path, dirs.state.join("audit.jsonl"));
        assert_eq!(
            config.pep.listen,
            vec![Listener::anonymous(Listen::Unix(
                dirs.runtime.join("pep.sock")
            ))]
        );
        assert!(config.private_dirs.contains(&dirs.state));
        assert!(config.private_dirs.contains(&dirs.runtime));
        assert!(!config.pep.audit.path.starts_with("/tmp"));
        // No folder comes before one of its ancestors: each is checked before anything is made in it.
        for (i, dir) in config.private_dirs.iter().enumerate() {
            assert!(
                !config.private_dirs[i + 1..]
                    .iter()
                    .any(|later| dir.starts_with(later) && dir != later),
                "{:?}",
                config.private_dirs
            );
        }
    }

    #[test]
    fn listen_specs_parse() {
        assert_eq!(
            "unix:/run/p.sock".parse(),
            Ok(Listen::Unix("/run/p.sock".into()))
        );
        assert_eq!(
            "connect:/run/qemu.sock".parse(),
            Ok(Listen::Connect("/run/qemu.sock".into()))
        );
        assert_eq!("vsock:4041".parse(), Ok(Listen::Vsock(4041)));
        assert!("vsock:x".parse::<Listen>().is_err());
        assert!("unix:".parse::<Listen>().is_err());
    }

    #[test]
    fn a_listener_names_its_vm_in_a_table() {
        #[derive(Deserialize)]
        struct Doc {
            listen: Vec<Listener>,
        }
        let doc: Doc = toml::from_str(
            r#"listen = ["unix:/run/p.sock", { at = "vsock:4041", vm = "alice", profile = "openclaw" }, { at = "connect:/q", vm = "bob" }]"#,
        )
        .expect("parses");
        assert_eq!(
            doc.listen[0],
            Listener::anonymous(Listen::Unix("/run/p.sock".into()))
        );
        assert_eq!(doc.listen[1].at, Listen::Vsock(4041));
        assert_eq!(
            (
                doc.listen[1].vm.name.as_str(),
                doc.listen[1].vm.profile.as_str()
            ),
            ("alice", "openclaw")
        );
        assert_eq!(
            (
                doc.listen[2].vm.name.as_str(),
                doc.listen[2].vm.profile.as_str()
            ),
            ("bob", "")
        );
        for bad in [
            r#"listen = [{ at = "unix:/p", vm = "" }]"#,
            r#"listen = [{ at = "unix:/p", vm = "al ice" }]"#,
            r#"listen = [{ at = "unix:/p", vm = "a", profile = "x/y" }]"#,
            r#"listen = [{ at = "unix:/p" }]"#,
            r#"listen = [{ at = "unix:/p", vm = "a", name = "b" }]"#,
            r#"listen = ["tcp:1.2.3.4:5"]"#,
        ] {
            assert!(toml::from_str::<Doc>(bad).is_err(), "{bad}");
        }
    }
}
