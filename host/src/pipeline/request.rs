//! Step 1: validate the guest's request parameters and turn them into what the rest of the pipeline works
//! with. Everything refused here is answered with `invalid_request` before policy, DNS or the network.

use http::{HeaderName, HeaderValue, Method};
use pexi_protocol::payload::{HeaderField, HttpRequest, RedirectMode};

use super::target::{Target, UrlError};

/// A request that passed validation.
#[derive(Clone, Debug)]
pub struct Prepared {
    pub method: Method,
    pub target: Target,
    /// End-to-end headers only, in the guest's order; `Host` and framing headers are the PEP's to set.
    pub headers: Vec<(HeaderName, HeaderValue)>,
    pub content_length: Option<u64>,
    pub redirect: RedirectMode,
    pub timeout_ms: Option<u64>,
    /// Brokered secrets the request names by placeholder (filled in by the pipeline, which has them).
    pub secrets: Vec<String>,
    /// The protocol the request asks to upgrade to (`websocket`): after a 101 the stream carries the
    /// upgraded connection's bytes both ways.
    pub upgrade: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum InvalidRequest {
    #[error(transparent)]
    Url(#[from] UrlError),
    #[error("invalid method {0:?}")]
    Method(String),
    #[error(
        "method {0:?} has lower-case letters: methods are case-sensitive, and servers disagree on what \
         {0:?} means; send it in upper case"
    )]
    MethodCase(String),
    #[error("invalid header name {0:?}")]
    HeaderName(String),
    #[error("invalid header value for {0}")]
    HeaderValue(String),
    #[error("Host header {given:?} disagrees with the URL's authority {expected:?}")]
    HostMismatch { given: String, expected: String },
    #[error("Content-Length header {header} disagrees with content_length {param}")]
    LengthMismatch { header: String, param: u64 },
    #[error("{0} may not carry a request body")]
    BodyNotAllowed(Method),
    #[error("upgrade to {0:?} is not supported (only websocket)")]
    UpgradeProtocol(String),
    #[error("an upgrade request must be a GET without a body, with Connection: upgrade")]
    UpgradeShape,
}

/// The protocols a request may upgrade to.
const UPGRADES: &[&str] = &["websocket"];

/// Connection-specific headers (RFC 9110 §7.6.1) that a proxy never forwards, plus the framing headers the
/// HTTP client sets itself.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Claims about the client's network path (RFC 7239 and the de facto X-Forwarded-* family, `Via`). The
/// PEP is the client an upstream talks to; a guest's claim to be someone else (an internal address an
/// upstream trusts, say) is dropped, never forwarded.
const FORWARDING: &[&str] = &[
    "forwarded",
    "via",
    "x-forwarded-for",
    "x-forwarded-host",
    "x-forwarded-proto",
    "x-forwarded-port",
    "x-forwarded-server",
    "x-real-ip",
    "x-client-ip",
    "client-ip",
    "true-client-ip",
];

/// The methods whose spelling is fixed (RFC 9110 §9 and PATCH): any case of these is upper-cased, as
/// WHATWG fetch does, so the policy and the upstream see the same method.
const STANDARD_METHODS: &[&str] = &[
    "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
];

/// The method as it is decided and sent. Any other method with a lower-case letter is refused: the policy
/// compares methods exactly, so a deny on `PURGE` must not be passed by `purge`, which some servers treat
/// as PURGE and others not.
fn canonical_method(given: &str) -> Result<Method, InvalidRequest> {
    let upper = given.to_ascii_uppercase();
    let spelled = if STANDARD_METHODS.contains(&upper.as_str()) {
        upper
    } else if given.bytes().any(|b| b.is_ascii_lowercase()) {
        return Err(InvalidRequest::MethodCase(given.to_string()));
    } else {
        given.to_string()
    };
    Method::from_bytes(spelled.as_bytes()).map_err(|_| InvalidRequest::Method(given.to_string()))
}

pub fn prepare(request: &HttpRequest) -> Result<Prepared, InvalidRequest> {
    let method = canonical_method(&request.method)?;
    let target = Target::parse(&request.url)?;
    let mut content_length = request.content_length;
    let mut parsed = Vec::with_capacity(request.headers.len());
    for HeaderField(name, value) in &request.headers {
        let name = HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| InvalidRequest::HeaderName(name.clone()))?;
        let value = HeaderValue::from_bytes(value)
            .map_err(|_| InvalidRequest::HeaderValue(name.to_string()))?;
        parsed.push((name, value));
    }
    // Headers named in Connection are hop-by-hop too.
    let named_by_connection: Vec<String> = parsed
        .iter()
        .filter(|(name, _)| name == http::header::CONNECTION)
        .filter_map(|(_, value)| value.to_str().ok())
        .flat_map(|v| v.split(',').map(|t| t.trim().to_ascii_lowercase()))
        .collect();
    let upgrade = match parsed
        .iter()
        .find(|(name, _)| name == http::header::UPGRADE)
    {
        None => None,
        Some((_, value)) => {
            let protocol = String::from_utf8_lossy(value.as_bytes())
                .trim()
                .to_ascii_lowercase();
            if !UPGRADES.contains(&protocol.as_str()) {
                return Err(InvalidRequest::UpgradeProtocol(protocol));
            }
            let asked = named_by_connection.iter().any(|n| n == "upgrade");
            let bodyless = request.content_length.unwrap_or(0) == 0;
            if !asked || method != Method::GET || !bodyless {
                return Err(InvalidRequest::UpgradeShape);
            }
            Some(protocol)
        }
    };
    let mut headers = Vec::with_capacity(parsed.len());
    for (name, value) in parsed {
        if name == http::header::HOST {
            let given = String::from_utf8_lossy(value.as_bytes()).to_ascii_lowercase();
            let expected = target.authority();
            let with_default_port = format!("{expected}:{}", target.port);
            if given != expected && given != with_default_port {
                return Err(InvalidRequest::HostMismatch { given, expected });
            }
            continue;
        }
        if name == http::header::CONTENT_LENGTH {
            let header = String::from_utf8_lossy(value.as_bytes()).trim().to_string();
            match (header.parse::<u64>(), content_length) {
                (Ok(n), None) => content_length = Some(n),
                (Ok(n), Some(param)) if n == param => {}
                (_, Some(param)) => return Err(InvalidRequest::LengthMismatch { header, param }),
                (Err(_), None) => {
                    return Err(InvalidRequest::HeaderValue("content-length".into()));
                }
            }
            continue;
        }
        if HOP_BY_HOP.contains(&name.as_str())
            || FORWARDING.contains(&name.as_str())
            || named_by_connection.iter().any(|n| n == name.as_str())
        {
            continue;
        }
        headers.push((name, value));
    }
    if matches!(method, Method::GET | Method::HEAD | Method::TRACE)
        && content_length.is_some_and(|n| n > 0)
    {
        return Err(InvalidRequest::BodyNotAllowed(method));
    }
    Ok(Prepared {
        method,
        target,
        headers,
        content_length,
        redirect: request.redirect,
        timeout_ms: request.timeout_ms,
        secrets: Vec::new(),
        upgrade,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standard_methods_are_upper_cased_and_other_lower_case_methods_refused() {
        for (given, sent) in [
            ("get", "GET"),
            ("Delete", "DELETE"),
            ("patch", "PATCH"),
            ("PURGE", "PURGE"),
        ] {
            assert_eq!(canonical_method(given).expect(given).as_str(), sent);
        }
        for given in ["purge", "Propfind", "m-search"] {
            assert!(
                matches!(canonical_method(given), Err(InvalidRequest::MethodCase(_))),
                "{given}"
            );
        }
        assert!(matches!(
            canonical_method("GE T"),
            Err(InvalidRequest::Method(_))
        ));
    }

    fn req(method: &str, url: &str, headers: &[(&str, &[u8])]) -> HttpRequest {
        HttpRequest {
            headers: headers
                .iter()
                .map(|(n, v)| HeaderField::new(*n, v.to_vec()))
                .collect(),
            ..HttpRequest::new(method, url)
        }
    }

    #[test]
    fn hop_by_hop_and_framing_headers_are_stripped() {
        let p = prepare(&req(
            "POST",
            "https://a.example/",
            &[
                ("Connection", b"close, X-Secret-Hop"),
                ("x-secret-hop", b"1"),
                ("Transfer-Encoding", b"chunked"),
                ("Keep-Alive", b"timeout=5"),
                ("Proxy-Authorization", b"Basic x"),
                ("Content-Length", b"4"),
                ("Host", b"A.example"),
                ("accept", b"*/*"),
                ("x-keep", b"2"),
                ("x-keep", b"3"),
            ],
        ))
        .expect("valid");
        let names: Vec<&str> = p.headers.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, vec!["accept", "x-keep", "x-keep"]);
        assert_eq!(p.content_length, Some(4));
    }

    #[test]
    fn malformed_requests_are_refused() {
        let bad: Vec<(HttpRequest, &str)> = vec![
            (req("GE T", "https://a.example/", &[]), "method"),
            (req("", "https://a.example/", &[]), "method"),
            (
                req("GET", "https://a.example/", &[("bad name", b"x")]),
                "header name",
            ),
            (
                req("GET", "https://a.example/", &[("x", b"a\r\nInjected: 1")]),
                "header value",
            ),
            (
                req("GET", "https://a.example/", &[("x", b"a\0b")]),
                "header value",
            ),
            (
                req("GET", "https://a.example/", &[("host", b"evil.example")]),
                "Host",
            ),
            (
                req("GET", "https://a.example/", &[("host", b"a.example:8443")]),
                "Host",
            ),
            (
                req("GET", "https://a.example/", &[("content-length", b"5")]),
                "body",
            ),
            (
                req("POST", "https://a.example/", &[("content-length", b"x")]),
                "content-length",
            ),
            (req("GET", "ftp://a.example/", &[]), "URL"),
        ];
        for (request, what) in bad {
            let err = prepare(&request).expect_err(what);
            assert!(
                err.to_string()
                    .to_lowercase()
                    .contains(&what.to_lowercase()),
                "{what}: {err}"
            );
        }
        let mut both = req("POST", "https://a.example/", &[("content-length", b"5")]);
        both.content_length = Some(6);
        assert!(matches!(
            prepare(&both),
            Err(InvalidRequest::LengthMismatch { .. })
        ));
    }

    #[test]
    fn websocket_upgrades_are_recognised_and_others_refused() {
        let ok = prepare(&req(
            "GET",
            "https://a.example/chat",
            &[
                ("Connection", b"keep-alive, Upgrade"),
                ("Upgrade", b"WebSocket"),
                ("Sec-WebSocket-Key", b"dGhlIHNhbXBsZSBub25jZQ=="),
            ],
        ))
        .expect("valid upgrade");
        assert_eq!(ok.upgrade.as_deref(), Some("websocket"));
        // The hop-by-hop pair is the PEP's to send; the handshake's end-to-end headers are kept.
        let names: Vec<&str> = ok.headers.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, vec!["sec-websocket-key"]);
        for (method, headers, what) in [
            (
                "GET",
                vec![("Connection", &b"upgrade"[..]), ("Upgrade", b"h2c")],
                "h2c",
            ),
            (
                "GET",
                vec![("Upgrade", &b"websocket"[..])],
                "no Connection: upgrade",
            ),
            (
                "POST",
                vec![("Connection", &b"upgrade"[..]), ("Upgrade", b"websocket")],
                "POST",
            ),
        ] {
            assert!(
                prepare(&req(method, "https://a.example/", &headers)).is_err(),
                "{what}"
            );
        }
        assert!(prepare(&req("GET", "https://a.example/", &[]))
            .expect("plain")
            .upgrade
            .is_none());
    }

    #[test]
    fn a_host_header_that_agrees_is_accepted() {
        for host in [&b"a.example"[..], b"A.EXAMPLE", b"a.example:443"] {
            assert!(prepare(&req("GET", "https://a.example/", &[("host", host)])).is_ok());
        }
        assert!(prepare(&req(
            "GET",
            "http://[::1]:8080/",
            &[("host", b"[::1]:8080")]
        ))
        .is_ok());
    }
}
