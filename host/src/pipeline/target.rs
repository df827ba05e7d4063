//! Step 1–2 of every hop: parse the URL strictly (WHATWG, via the `url` crate) and canonicalise its host
//! before policy sees it.
//!
//! The `url` crate already does most of the canonicalisation the WHATWG standard prescribes: IDNA to
//! punycode, lowercase, percent-decoding of hosts, IPv4 written in decimal, octal, hex or short forms to a
//! dotted quad, and it refuses IPv6 zone ids. On top of that we refuse userinfo, non-HTTP schemes, port 0,
//! backslashes, whitespace and control characters in the raw text (where other parsers disagree with WHATWG
//! and an attacker finds a differential), strip one trailing dot, and unwrap IPv4-mapped IPv6. The URL we
//! then connect to is rebuilt from the canonical parts, so policy, DNS, SNI and `Host` all see one host.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use url::Url;

/// Why a URL is refused; always answered with `invalid_request`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid URL: {0}")]
pub struct UrlError(pub String);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostKind {
    Dns,
    Ipv4,
    Ipv6,
}

impl HostKind {
    pub fn as_str(self) -> &'static str {
        match self {
            HostKind::Dns => "dns",
            HostKind::Ipv4 => "ipv4",
            HostKind::Ipv6 => "ipv6",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CanonicalHost {
    Dns(String),
    Ip(IpAddr),
}

impl CanonicalHost {
    pub fn kind(&self) -> HostKind {
        match self {
            CanonicalHost::Dns(_) => HostKind::Dns,
            CanonicalHost::Ip(IpAddr::V4(_)) => HostKind::Ipv4,
            CanonicalHost::Ip(IpAddr::V6(_)) => HostKind::Ipv6,
        }
    }
}

impl fmt::Display for CanonicalHost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CanonicalHost::Dns(name) => f.write_str(name),
            CanonicalHost::Ip(ip) => write!(f, "{ip}"),
        }
    }
}

/// Why a tunnel destination is refused; answered with `invalid_request`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("tunnel destination {host:?}: {why}")]
pub struct EndpointError {
    pub host: String,
    pub why: String,
}

/// A TCP destination (`pep.net.connect`): a host canonicalised exactly as an HTTP host is, and a port. No
/// URL: a tunnel has no scheme, path or query, and none is made up for it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub host: CanonicalHost,
    pub port: u16,
}

impl Endpoint {
    /// A bare DNS name or IP address (an IPv6 one without brackets) and a port. URL syntax (`a.test/`,
    /// `a.test:8443`, `user@a.test`) is refused: the destination decided must be the one named.
    pub fn parse(host: &str, port: u16) -> Result<Endpoint, EndpointError> {
        let refuse = |why: &str| {
            Err(EndpointError {
                host: host.to_string(),
                why: why.to_string(),
            })
        };
        if port == 0 {
            return refuse("port 0");
        }
        if let Ok(ip) = host.parse::<Ipv6Addr>() {
            return Ok(Endpoint {
                host: CanonicalHost::Ip(unmap(ip)),
                port,
            });
        }
        if host.is_empty()
            || host.len() > 253
            || host
                .chars()
                .any(|c| c.is_whitespace() || c.is_control() || "/\\?#@:%[]<>\"'`|^{}".contains(c))
        {
            return refuse("give a bare DNS name or IP address (no URL syntax)");
        }
        // The WHATWG host parser, as for a URL's host: IDNA, lower case, IPv4 in any of its forms.
        let host = match url::Host::parse(host) {
            Ok(url::Host::Domain(name)) => match canonical_domain(&name) {
                Ok(host) => host,
                Err(UrlError(why)) => return refuse(&why),
            },
            Ok(url::Host::Ipv4(ip)) => CanonicalHost::Ip(IpAddr::V4(ip)),
            Ok(url::Host::Ipv6(ip)) => CanonicalHost::Ip(unmap(ip)),
            Err(err) => return refuse(&err.to_string()),
        };
        Ok(Endpoint { host, port })
    }

    /// `tcp://host:port`, as the policy and the audit log name a tunnel.
    pub fn tcp_url(&self) -> String {
        match &self.host {
            CanonicalHost::Ip(IpAddr::V6(ip)) => format!("tcp://[{ip}]:{}", self.port),
            other => format!("tcp://{other}:{}", self.port),
        }
    }
}

/// What a hop asks to reach: an HTTP URL, or a TCP endpoint.
#[derive(Clone, Copy, Debug)]
pub enum Destination<'a> {
    Http(&'a Target),
    Tcp(&'a Endpoint),
}

impl Destination<'_> {
    pub fn host(&self) -> &CanonicalHost {
        match self {
            Destination::Http(target) => &target.host,
            Destination::Tcp(endpoint) => &endpoint.host,
        }
    }

    pub fn port(&self) -> u16 {
        match self {
            Destination::Http(target) => target.port,
            Destination::Tcp(endpoint) => endpoint.port,
        }
    }
}

/// A URL that passed validation, with its canonical parts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// Rebuilt from the canonical parts, fragment dropped: what is actually requested.
    pub url: Url,
    pub host: CanonicalHost,
    pub port: u16,
}

impl Target {
    pub fn scheme(&self) -> &str {
        self.url.scheme()
    }

    /// `host[:port]` as it belongs in a `Host` header (port omitted when it is the scheme's default).
    pub fn authority(&self) -> String {
        let host = match &self.host {
            CanonicalHost::Ip(IpAddr::V6(ip)) => format!("[{ip}]"),
            other => other.to_string(),
        };
        match self.url.port() {
            Some(port) => format!("{host}:{port}"),
            None => host,
        }
    }

    pub fn parse(raw: &str) -> Result<Target, UrlError> {
        Target::resolve_against(None, raw)
    }

    /// Parses `raw` relative to `base` (a redirect's `Location`), with the same checks.
    pub fn resolve_against(base: Option<&Url>, raw: &str) -> Result<Target, UrlError> {
        let refuse = |why: &str| Err(UrlError(why.to_string()));
        if raw.is_empty() {
            return refuse("empty URL");
        }
        if raw.len() > 8192 {
            return refuse("longer than 8192 bytes");
        }
        if raw.chars().any(|c| c.is_ascii_control() || c == ' ') {
            return refuse("contains whitespace or a control character");
        }
        if raw.contains('\\') {
            return refuse("contains a backslash");
        }
        let parsed = match base {
            Some(base) => base.join(raw),
            None => Url::parse(raw),
        }
        .map_err(|err| UrlError(err.to_string()))?;
        match parsed.scheme() {
            "http" | "https" => {}
            other => return Err(UrlError(format!("scheme {other:?} is not http or https"))),
        }
        if !parsed.username().is_empty() || parsed.password().is_some() {
            return refuse("userinfo (user:password@) is not allowed");
        }
        let host = match parsed.host() {
            Some(url::Host::Domain(name)) => canonical_domain(name)?,
            Some(url::Host::Ipv4(ip)) => CanonicalHost::Ip(IpAddr::V4(ip)),
            Some(url::Host::Ipv6(ip)) => CanonicalHost::Ip(unmap(ip)),
            None => return refuse("no host"),
        };
        let port = parsed
            .port_or_known_default()
            .ok_or_else(|| UrlError("no port".into()))?;
        if port == 0 {
            return refuse("port 0");
        }
        let mut url = parsed;
        url.set_fragment(None);
        let path = canonical_path(url.path())?;
        url.set_path(&path);
        let host_text = match &host {
            CanonicalHost::Ip(IpAddr::V6(ip)) => format!("[{ip}]"),
            other => other.to_string(),
        };
        url.set_host(Some(&host_text))
            .map_err(|err| UrlError(format!("canonical host rejected: {err}")))?;
        Ok(Target { url, host, port })
    }
}

/// The path as the policy decides it and the upstream receives it, in one spelling: percent-escapes of
/// unreserved characters decoded (`/%61dmin` is `/admin`), other escapes in upper case. Forms that
/// servers route differently from one another are refused rather than guessed at: an empty segment
/// (`//admin`, one segment or two?), a `;` parameter (`/admin;x`, which Tomcat and Jetty route to
/// `/admin`), an encoded separator (`%2F`, `%5C`, which some proxies decode before routing). Dot segments
/// were resolved by the URL parser, encoded ones included (`/%2e%2e/admin` is `/admin`).
fn canonical_path(path: &str) -> Result<String, UrlError> {
    let refuse = |why: &str| Err(UrlError(format!("path {path:?}: {why}")));
    let bytes = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'%' && i + 2 < bytes.len() && bytes[i + 1..i + 3].iter().all(u8::is_ascii_hexdigit)
        {
            let hex = &path[i + 1..i + 3];
            if let Ok(value) = u8::from_str_radix(hex, 16) {
                let c = char::from(value);
                if c.is_ascii_alphanumeric() || "-._~".contains(c) {
                    out.push(c);
                } else if value == b'/' || value == b'\\' {
                    return refuse("an encoded / or \\ (%2F, %5C): servers disagree on whether it separates segments");
                } else {
                    out.push('%');
                    out.push_str(&hex.to_ascii_uppercase());
                }
                i += 3;
                continue;
            }
        }
        if b == b';' {
            return refuse("a ; parameter in a segment: some servers route /a;x to /a, others not");
        }
        out.push(char::from(b));
        i += 1;
    }
    if out.contains("//") {
        return refuse(
            "an empty segment (//): servers disagree on whether it is one segment or two",
        );
    }
    if out
        .split('/')
        .any(|segment| segment == "." || segment == "..")
    {
        return refuse("a dot segment spelt so the URL parser kept it");
    }
    Ok(out)
}

fn canonical_domain(name: &str) -> Result<CanonicalHost, UrlError> {
    let name = name.strip_suffix('.').unwrap_or(name);
    if name.is_empty() || name.ends_with('.') || name.starts_with('.') || name.contains("..") {
        return Err(UrlError(format!("malformed host name {name:?}")));
    }
    // After the trailing dot is gone a name may turn out to be a dotted quad the URL parser left alone.
    if let Ok(ip) = name.parse::<Ipv4Addr>() {
        return Ok(CanonicalHost::Ip(IpAddr::V4(ip)));
    }
    if name.len() > 253 || name.split('.').any(|label| label.len() > 63) {
        return Err(UrlError(format!("host name {name:?} is too long")));
    }
    if !name.bytes().all(|b| {
        b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.' || b == b'_'
    }) {
        return Err(UrlError(format!(
            "host name {name:?} has characters DNS names do not"
        )));
    }
    Ok(CanonicalHost::Dns(name.to_string()))
}

/// `::ffff:a.b.c.d` is IPv4 in IPv6 clothing: policy and the address guard judge the IPv4 address.
pub fn unmap(ip: Ipv6Addr) -> IpAddr {
    match ip.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(ip),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tunnel_endpoint_is_a_bare_name_or_address_canonicalised_like_a_url_host() {
        let parse = |host: &str| Endpoint::parse(host, 443).map(|e| e.host.to_string());
        assert_eq!(parse("Tun.TEST.").as_deref(), Ok("tun.test"));
        assert_eq!(parse("0x7f.1").as_deref(), Ok("127.0.0.1"));
        assert_eq!(parse("::ffff:10.0.0.1").as_deref(), Ok("10.0.0.1"));
        assert_eq!(
            parse("bücher.example").as_deref(),
            Ok("xn--bcher-kva.example")
        );
        for bad in [
            "tun.test/",
            "tun.test:443",
            "user@tun.test",
            "[::1]",
            "a b",
            "",
            "tun%2Etest",
            "a..b",
        ] {
            assert!(parse(bad).is_err(), "{bad:?} accepted");
        }
        assert!(Endpoint::parse("tun.test", 0).is_err());
        let v6 = Endpoint::parse("2001:db8::1", 5432).expect("endpoint");
        assert_eq!(v6.tcp_url(), "tcp://[2001:db8::1]:5432");
    }

    fn host(raw: &str) -> Result<String, UrlError> {
        Target::parse(raw).map(|t| format!("{} {} {}", t.host.kind().as_str(), t.host, t.port))
    }

    #[test]
    fn hosts_are_canonicalised_before_policy() {
        let cases = [
            ("https://Example.COM/", "dns example.com 443"),
            ("https://example.com./a", "dns example.com 443"),
            ("http://EXAMPLE.com:8080", "dns example.com 8080"),
            ("https://bücher.example/", "dns xn--bcher-kva.example 443"),
            ("https://%65xample.com/", "dns example.com 443"),
            ("http://2130706433/", "ipv4 127.0.0.1 80"),
            ("http://0x7f.1/", "ipv4 127.0.0.1 80"),
            ("http://0177.0.0.01/", "ipv4 127.0.0.1 80"),
            ("http://127.1/", "ipv4 127.0.0.1 80"),
            ("http://127.0.0.1./", "ipv4 127.0.0.1 80"),
            (
                "http://[::ffff:169.254.169.254]/",
                "ipv4 169.254.169.254 80",
            ),
            ("http://[0:0:0:0:0:ffff:7f00:1]/", "ipv4 127.0.0.1 80"),
            ("http://[::1]:8443/", "ipv6 ::1 8443"),
            ("https://[2001:DB8::1]/", "ipv6 2001:db8::1 443"),
            ("https://example.com:443/", "dns example.com 443"),
        ];
        for (raw, want) in cases {
            assert_eq!(host(raw).as_deref(), Ok(want), "{raw}");
        }
    }

    #[test]
    fn bypass_spellings_are_refused() {
        let cases = [
            "https://allowed.com@evil.com/",
            "https://user:pass@allowed.com/",
            "https://:pass@allowed.com/",
            "ftp://allowed.com/",
            "file:///etc/passwd",
            "gopher://allowed.com/",
            "javascript:alert(1)",
            "https://allowed.com\\@evil.com/",
            "https://allowed.com/\\..\\",
            "https://allowed .com/",
            "https://allowed.com\t/",
            "https://allowed.com\n.evil/",
            "https://[fe80::1%25eth0]/",
            "https://allowed.com:0/",
            "https://allowed.com:65536/",
            "https://allowed.com:443.evil.com/",
            "https:///",
            "https://",
            "https://../",
            "https://a..b/",
            "//allowed.com/",
            "/relative",
            "",
            "https://[allowed.com]/",
            "https://allowed.com%00.evil/",
            "https://allowed.com%2f.evil/",
        ];
        for raw in cases {
            assert!(host(raw).is_err(), "{raw:?} accepted as {:?}", host(raw));
        }
    }

    #[test]
    fn the_requested_url_is_rebuilt_from_canonical_parts() {
        let t = Target::parse("https://Example.com.:8443/p/a?q=1#frag").expect("valid");
        assert_eq!(t.url.as_str(), "https://example.com:8443/p/a?q=1");
        assert_eq!(t.authority(), "example.com:8443");
        let t = Target::parse("http://[::ffff:127.0.0.1]/").expect("valid");
        assert_eq!(t.url.as_str(), "http://127.0.0.1/");
        assert_eq!(t.authority(), "127.0.0.1");
    }

    #[test]
    fn redirect_locations_resolve_against_the_previous_hop() {
        let base = Target::parse("https://a.example/x/y").expect("valid").url;
        let next = Target::resolve_against(Some(&base), "../z?q").expect("valid");
        assert_eq!(next.url.as_str(), "https://a.example/z?q");
        let next = Target::resolve_against(Some(&base), "//b.example/").expect("valid");
        assert_eq!(next.host, CanonicalHost::Dns("b.example".into()));
        assert!(Target::resolve_against(Some(&base), "ftp://b.example/").is_err());
    }
}
