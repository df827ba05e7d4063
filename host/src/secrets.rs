//! Credential brokering (docs/secrets.md): API keys live only on the host. A guest sends a placeholder
//! (`pexi:secret:NAME`, or a secret's own configured placeholder) where its SDK puts the key; the PEP
//! swaps in the real value only on a request the policy allowed, to a host the secret is bound to, with a
//! method the secret allows, and on redirects only while the hop stays on the first hop's origin.
//! Everything else is refused with `secret_not_allowed` before anything is sent, or (a redirect to another
//! origin) sent without the credential. The value never reaches the audit log, the logs, an error message
//! or the policy: they see names.

use std::fmt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use http::{HeaderName, HeaderValue, Method};
use serde::Deserialize;

use crate::policy::entries::{HostPattern, MethodName};

/// The placeholder every secret answers to: `pexi:secret:` followed by its name.
pub const PLACEHOLDER_PREFIX: &str = "pexi:secret:";

/// `[[secrets]]` as written in `config.toml`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecretConfig {
    /// Letters, digits, `-`, `_` and `.`; the guest names it in `pexi:secret:NAME`.
    pub name: String,
    /// The PEP's environment variable holding the value.
    #[serde(default)]
    pub env: Option<String>,
    /// A file holding the value (trailing newline dropped), owned by the PEP's user and readable by no
    /// one else. Relative to the config file.
    #[serde(default)]
    pub file: Option<PathBuf>,
    /// The header the value goes in.
    pub header: String,
    /// The header value, `{secret}` standing for the value: `Bearer {secret}` for `authorization`.
    #[serde(default = "default_template")]
    pub template: String,
    /// Host patterns (the allowlist's language) the secret may be sent to; at least one.
    pub hosts: Vec<HostPattern>,
    /// Methods it may be sent with; any when absent (TRACE, TRACK and CONNECT never).
    #[serde(default)]
    pub methods: Option<Vec<MethodName>>,
    /// URL schemes it may travel over: `https` only unless `http` is listed too (anyone on a plain-HTTP
    /// path reads the header).
    #[serde(default = "default_schemes")]
    pub schemes: Vec<String>,
    /// Another string the guest may use instead of `pexi:secret:NAME` (for clients that check a key's
    /// shape, such as `sk-pexi-placeholder-openai`).
    #[serde(default)]
    pub placeholder: Option<String>,
    /// When false (the default), a request to one of `hosts` that carries its own value in `header` is
    /// refused: a key stolen into the guest cannot be used from there either.
    #[serde(default)]
    pub allow_guest_value: bool,
}

fn default_template() -> String {
    "{secret}".into()
}

fn default_schemes() -> Vec<String> {
    vec!["https".into()]
}

/// Methods that make an upstream send the request back (TRACE echoes it, TRACK is IIS's TRACE) or hand
/// the connection over (CONNECT): a secret on them would reach the guest.
const NEVER_WITH_SECRETS: [&str; 3] = ["TRACE", "TRACK", "CONNECT"];

fn never_with_secrets(method: &str) -> bool {
    NEVER_WITH_SECRETS
        .iter()
        .any(|never| method.eq_ignore_ascii_case(never))
}

/// The value itself. Its `Debug` never shows it, so no derived `Debug` up the tree can leak it.
#[derive(Clone)]
struct Value(String);

impl fmt::Debug for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[secret value]")
    }
}

#[derive(Clone, Debug)]
pub struct Secret {
    pub name: String,
    pub header: HeaderName,
    template: (String, String),
    value: Value,
    pub hosts: Vec<HostPattern>,
    pub methods: Option<Vec<Method>>,
    pub schemes: Vec<String>,
    /// Every string that stands for this secret in a guest's header.
    placeholders: Vec<String>,
    pub allow_guest_value: bool,
}

/// Why a configured secret cannot be loaded. Names the secret and its source, never the value.
#[derive(Debug, thiserror::Error)]
#[error("secret {name:?}: {message}")]
pub struct LoadError {
    pub name: String,
    pub message: String,
}

impl Secret {
    /// Reads the value from its source and checks everything about the entry. `env` is the PEP's
    /// environment; `base` the config file's folder.
    pub fn load(
        config: &SecretConfig,
        env: &[(String, String)],
        base: &Path,
    ) -> Result<Secret, LoadError> {
        let fail = |message: String| LoadError {
            name: config.name.clone(),
            message,
        };
        let valid_name = !config.name.is_empty()
            && config.name.len() <= 64
            && config
                .name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
        if !valid_name {
            return Err(fail(
                "a name is 1 to 64 letters, digits, '-', '_' or '.'".into(),
            ));
        }
        let header = HeaderName::from_bytes(config.header.as_bytes())
            .map_err(|_| fail(format!("{:?} is not a header name", config.header)))?;
        let template = match config.template.split_once("{secret}") {
            Some((before, after)) if !after.contains("{secret}") => {
                (before.to_string(), after.to_string())
            }
            _ => {
                return Err(fail(
                    "the template must contain {secret} exactly once".into(),
                ))
            }
        };
        if config.hosts.is_empty() {
            return Err(fail(
                "hosts names no host: the secret could go nowhere".into(),
            ));
        }
        let schemes: Vec<String> = config
            .schemes
            .iter()
            .map(|scheme| scheme.to_ascii_lowercase())
            .collect();
        if schemes.is_empty() || schemes.iter().any(|s| s != "https" && s != "http") {
            return Err(fail(format!(
                "schemes {:?}: list \"https\" (the default), and \"http\" only to send the key in the clear",
                config.schemes
            )));
        }
        if let Some(method) = config
            .methods
            .iter()
            .flatten()
            .find(|m| never_with_secrets(m.as_str()))
        {
            return Err(fail(format!(
                "methods lists {}: a secret is never sent with TRACE, TRACK or CONNECT",
                method.as_str()
            )));
        }
        let value = match (&config.env, &config.file) {
            (Some(var), None) => env
                .iter()
                .find(|(name, _)| name == var)
                .map(|(_, value)| value.clone())
                .ok_or_else(|| fail(format!("environment variable {var} is not set")))?,
            (None, Some(file)) => read_private_file(&base.join(file)).map_err(fail)?,
            _ => return Err(fail("give exactly one source: env or file".into())),
        };
        let value = value.trim_end_matches(['\r', '\n']).to_string();
        if value.is_empty() {
            return Err(fail("the value is empty".into()));
        }
        let rendered = format!("{}{value}{}", template.0, template.1);
        if HeaderValue::from_str(&rendered).is_err() {
            // Not the value itself: only that it cannot be a header.
            return Err(fail(
                "the value, in its template, is not a valid header value".into(),
            ));
        }
        let mut placeholders = vec![format!("{PLACEHOLDER_PREFIX}{}", config.name)];
        if let Some(own) = &config.placeholder {
            if own.len() < 8 || HeaderValue::from_str(own).is_err() {
                return Err(fail(
                    "a placeholder is at least 8 characters that can sit in a header".into(),
                ));
            }
            placeholders.push(own.clone());
        }
        Ok(Secret {
            name: config.name.clone(),
            header,
            template,
            value: Value(value),
            hosts: config.hosts.clone(),
            methods: config.methods.as_ref().map(|methods| {
                methods
                    .iter()
                    .filter_map(|m| Method::from_bytes(m.as_str().as_bytes()).ok())
                    .collect()
            }),
            schemes,
            placeholders,
            allow_guest_value: config.allow_guest_value,
        })
    }

    fn binds(&self, host: &str) -> bool {
        self.hosts.iter().any(|pattern| pattern.matches(host))
    }

    fn allows_method(&self, method: &Method) -> bool {
        !never_with_secrets(method.as_str())
            && self
                .methods
                .as_ref()
                .is_none_or(|methods| methods.contains(method))
    }

    fn allows_scheme(&self, scheme: &str) -> bool {
        self.schemes.iter().any(|s| s.eq_ignore_ascii_case(scheme))
    }

    fn header_value(&self) -> HeaderValue {
        let mut value = HeaderValue::from_str(&format!(
            "{}{}{}",
            self.template.0, self.value.0, self.template.1
        ))
        // Checked at load.
        .unwrap_or_else(|_| HeaderValue::from_static(""));
        value.set_sensitive(true);
        value
    }
}

/// A file holding a secret must be the PEP user's and unreadable to anyone else.
fn read_private_file(path: &Path) -> Result<String, String> {
    let shown = path.display();
    let meta = std::fs::metadata(path).map_err(|err| format!("{shown}: {err}"))?;
    if meta.mode() & 0o077 != 0 {
        return Err(format!(
            "{shown} is readable or writable by others (mode {:o}); chmod 600 it",
            meta.mode() & 0o777
        ));
    }
    // From the kernel, not /proc (which macOS does not have: a check through it would silently pass).
    let me = nix::unistd::geteuid().as_raw();
    if meta.uid() != me {
        return Err(format!(
            "{shown} belongs to uid {}, not to the PEP's user {me}",
            meta.uid()
        ));
    }
    std::fs::read_to_string(path).map_err(|err| format!("{shown}: {err}"))
}

/// Why a request's use of secrets is refused (`secret_not_allowed`). Names, hosts and headers only.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Refusal(pub String);

/// What one hop sends: its headers with placeholders resolved, and what happened to each secret.
#[derive(Debug)]
pub struct HopHeaders {
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// Secrets whose values this hop carries.
    pub injected: Vec<String>,
    /// Secrets requested but not carried because the hop left the first hop's origin.
    pub withheld: Vec<String>,
}

/// One hop as the broker sees it.
pub struct Hop<'a> {
    pub method: &'a Method,
    /// Canonical host of this hop.
    pub host: &'a str,
    /// (scheme, host, port) of this hop and of the request's first hop.
    pub origin: (&'a str, &'a str, u16),
    pub first_origin: (&'a str, &'a str, u16),
    /// Whether a header (lower-case name) carries credentials.
    pub is_credential: &'a dyn Fn(&str) -> bool,
}

/// The configured secrets.
#[derive(Clone, Debug, Default)]
pub struct Secrets {
    list: Vec<Secret>,
}

impl Secrets {
    pub fn new(list: Vec<Secret>) -> Result<Secrets, LoadError> {
        for (i, secret) in list.iter().enumerate() {
            if list[..i].iter().any(|other| other.name == secret.name) {
                return Err(LoadError {
                    name: secret.name.clone(),
                    message: "defined twice".into(),
                });
            }
            for placeholder in &secret.placeholders {
                if let Some(other) = list[..i]
                    .iter()
                    .find(|other| other.placeholders.contains(placeholder))
                {
                    return Err(LoadError {
                        name: secret.name.clone(),
                        message: format!("its placeholder is also secret {:?}'s", other.name),
                    });
                }
            }
        }
        Ok(Secrets { list })
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Secret> {
        self.list.iter()
    }

    fn named(&self, name: &str) -> Option<&Secret> {
        self.list.iter().find(|s| s.name == name)
    }

    /// The secrets a header value stands for, in order of appearance; unknown `pexi:secret:` names
    /// are refused.
    fn in_value(&self, value: &[u8]) -> Result<Vec<String>, Refusal> {
        let text = String::from_utf8_lossy(value);
        let mut names = Vec::new();
        let mut rest = text.as_ref();
        while let Some(at) = rest.find(PLACEHOLDER_PREFIX) {
            let after = &rest[at + PLACEHOLDER_PREFIX.len()..];
            let end = after
                .find(|c: char| !(c.is_ascii_alphanumeric() || "-_.".contains(c)))
                .unwrap_or(after.len());
            let name = &after[..end];
            if self.named(name).is_none() {
                return Err(Refusal(format!(
                    "the request names secret {name:?}, which the PEP does not have"
                )));
            }
            names.push(name.to_string());
            rest = &after[end..];
        }
        for secret in &self.list {
            if secret.placeholders[1..]
                .iter()
                .any(|own| text.contains(own.as_str()))
                && !names.contains(&secret.name)
            {
                names.push(secret.name.clone());
            }
        }
        Ok(names)
    }

    /// The secrets a request asks for (by placeholder, in its headers), for the policy input. A
    /// placeholder anywhere in the URL is refused: secrets go only into their headers.
    pub fn requested(
        &self,
        headers: &[(HeaderName, HeaderValue)],
        url: &url::Url,
    ) -> Result<Vec<String>, Refusal> {
        let decoded = percent_decoded(url.as_str());
        if decoded.contains(PLACEHOLDER_PREFIX)
            || self
                .list
                .iter()
                .flat_map(|s| &s.placeholders[1..])
                .any(|own| decoded.contains(own.as_str()))
        {
            return Err(Refusal(
                "a secret placeholder in the URL: secrets are only sent in their headers".into(),
            ));
        }
        let mut names: Vec<String> = Vec::new();
        for (_, value) in headers {
            for name in self.in_value(value.as_bytes())? {
                if !names.contains(&name) {
                    names.push(name);
                }
            }
        }
        Ok(names)
    }

    /// The headers one allowed hop sends. `granted` is the decision's list of secrets when the policy
    /// named one (obligations), else `None`: the requested ones. Enforces each secret's binding whatever
    /// the policy said.
    pub fn resolve(
        &self,
        hop: &Hop<'_>,
        headers: &[(HeaderName, HeaderValue)],
        requested: &[String],
        granted: Option<&[String]>,
    ) -> Result<HopHeaders, Refusal> {
        // A credential the guest brought itself, to a host whose credential is brokered: in the
        // secret's own header or in any other that carries credentials (`is_credential`: the audit's
        // redaction list and credential-like names), since an API usually accepts its key in several.
        for secret in self.list.iter().filter(|s| !s.allow_guest_value) {
            if !secret.binds(hop.host) {
                continue;
            }
            for (name, value) in headers {
                let credential = *name == secret.header || (hop.is_credential)(name.as_str());
                if credential && self.in_value(value.as_bytes())?.is_empty() {
                    return Err(Refusal(format!(
                        "the request carries its own {name} for {}, whose credential the PEP brokers \
                         (secret {:?}); send the placeholder {PLACEHOLDER_PREFIX}{} in {} instead",
                        hop.host, secret.name, secret.name, secret.header
                    )));
                }
            }
        }
        let wanted: Vec<String> = match granted {
            None => requested.to_vec(),
            Some(granted) => {
                if let Some(name) = requested.iter().find(|n| !granted.contains(n)) {
                    return Err(Refusal(format!(
                        "the policy did not grant secret {name:?} for this request"
                    )));
                }
                granted.to_vec()
            }
        };
        let mut out: Vec<(HeaderName, HeaderValue)> = Vec::with_capacity(headers.len() + 1);
        for (name, value) in headers {
            // Placeholders never go upstream as they are.
            if self.in_value(value.as_bytes())?.is_empty() {
                out.push((name.clone(), value.clone()));
            }
        }
        let mut hop_headers = HopHeaders {
            headers: Vec::new(),
            injected: Vec::new(),
            withheld: Vec::new(),
        };
        for name in &wanted {
            let secret = self.named(name).ok_or_else(|| {
                Refusal(format!(
                    "the policy granted secret {name:?}, which the PEP does not have"
                ))
            })?;
            if hop.origin != hop.first_origin {
                hop_headers.withheld.push(name.clone());
                continue;
            }
            if !secret.binds(hop.host) {
                return Err(Refusal(format!(
                    "secret {name:?} is not for {}; it is bound to {}",
                    hop.host,
                    secret
                        .hosts
                        .iter()
                        .map(|h| h.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )));
            }
            if !secret.allows_method(hop.method) {
                return Err(Refusal(format!(
                    "secret {name:?} may not be sent with {}",
                    hop.method
                )));
            }
            if !secret.allows_scheme(hop.origin.0) {
                return Err(Refusal(format!(
                    "secret {name:?} may not be sent over {}: it travels over {} only",
                    hop.origin.0,
                    secret.schemes.join(", ")
                )));
            }
            out.retain(|(header, _)| *header != secret.header);
            out.push((secret.header.clone(), secret.header_value()));
            hop_headers.injected.push(name.clone());
        }
        hop_headers.headers = out;
        Ok(hop_headers)
    }
}

fn percent_decoded(text: &str) -> String {
    percent_decode(text.as_bytes()).to_lowercase()
}

fn percent_decode(bytes: &[u8]) -> String {
    fn hex(b: u8) -> Option<u8> {
        char::from(b)
            .to_digit(16)
            .and_then(|d| u8::try_from(d).ok())
    }
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let (Some(high), Some(low)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                out.push(high * 16 + low);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "sk-test-0123456789abcdef";

    fn secret(name: &str, header: &str, template: &str, hosts: &[&str]) -> SecretConfig {
        SecretConfig {
            name: name.into(),
            env: Some("KEY_VAR".into()),
            file: None,
            header: header.into(),
            template: template.into(),
            hosts: hosts
                .iter()
                .map(|h| HostPattern::parse(h).expect("pattern"))
                .collect(),
            methods: None,
            schemes: default_schemes(),
            placeholder: None,
            allow_guest_value: false,
        }
    }

    fn load(configs: &[SecretConfig]) -> Secrets {
        let env = vec![("KEY_VAR".to_string(), format!("{KEY}\n"))];
        Secrets::new(
            configs
                .iter()
                .map(|c| Secret::load(c, &env, Path::new(".")).expect("loads"))
                .collect(),
        )
        .expect("secrets")
    }

    fn headers(pairs: &[(&str, &str)]) -> Vec<(HeaderName, HeaderValue)> {
        pairs
            .iter()
            .map(|(n, v)| {
                (
                    HeaderName::from_bytes(n.as_bytes()).expect("name"),
                    HeaderValue::from_str(v).expect("value"),
                )
            })
            .collect()
    }

    /// What the PEP's default redaction list calls a credential header.
    fn credential(name: &str) -> bool {
        ["authorization", "x-api-key", "cookie"].contains(&name) || name.contains("token")
    }

    fn hop<'a>(method: &'a Method, host: &'a str, first: &'a str) -> Hop<'a> {
        Hop {
            method,
            host,
            origin: ("https", host, 443),
            first_origin: ("https", first, 443),
            is_credential: &credential,
        }
    }

    fn url(text: &str) -> url::Url {
        url::Url::parse(text).expect("url")
    }

    #[test]
    fn a_placeholder_becomes_the_value_only_on_its_hosts() {
        let secrets = load(&[secret(
            "openai",
            "authorization",
            "Bearer {secret}",
            &["api.openai.com"],
        )]);
        let sent = headers(&[
            ("authorization", "Bearer pexi:secret:openai"),
            ("accept", "*/*"),
        ]);
        let requested = secrets
            .requested(&sent, &url("https://api.openai.com/v1/chat"))
            .expect("requested");
        assert_eq!(requested, vec!["openai"]);
        let post = Method::POST;
        let out = secrets
            .resolve(
                &hop(&post, "api.openai.com", "api.openai.com"),
                &sent,
                &requested,
                None,
            )
            .expect("allowed");
        assert_eq!(out.injected, vec!["openai"]);
        let auth: Vec<_> = out
            .headers
            .iter()
            .filter(|(n, _)| n == "authorization")
            .collect();
        assert_eq!(auth.len(), 1);
        assert_eq!(auth[0].1.as_bytes(), format!("Bearer {KEY}").as_bytes());
        assert!(auth[0].1.is_sensitive());

        let refused = secrets
            .resolve(
                &hop(&post, "evil.example", "evil.example"),
                &sent,
                &requested,
                None,
            )
            .expect_err("not its host");
        assert!(refused.0.contains("not for evil.example"), "{refused}");
        assert!(!refused.0.contains(KEY));
    }

    #[test]
    fn another_origin_on_a_redirect_gets_neither_value_nor_placeholder() {
        let secrets = load(&[secret("k", "x-api-key", "{secret}", &["**.api.test"])]);
        let sent = headers(&[("x-api-key", "pexi:secret:k")]);
        let get = Method::GET;
        let out = secrets
            .resolve(
                &hop(&get, "cdn.api.test", "api.test"),
                &sent,
                &["k".into()],
                None,
            )
            .expect("followed without the secret");
        assert!(out.injected.is_empty());
        assert_eq!(out.withheld, vec!["k"]);
        assert!(out.headers.iter().all(|(n, _)| n != "x-api-key"));
    }

    #[test]
    fn refusals() {
        let mut only_post = secret("k", "x-api-key", "{secret}", &["api.test"]);
        only_post.methods = Some(vec![MethodName::parse("POST").expect("method")]);
        let secrets = load(&[only_post]);
        let get = Method::GET;
        let at = hop(&get, "api.test", "api.test");
        // Unknown name.
        let err = secrets
            .requested(
                &headers(&[("x-api-key", "pexi:secret:nope")]),
                &url("https://api.test/"),
            )
            .expect_err("unknown");
        assert!(err.0.contains("\"nope\""), "{err}");
        // In the URL, plain or percent-encoded.
        for u in [
            "https://api.test/?key=pexi:secret:k",
            "https://api.test/pexi%3Asecret%3Ak",
        ] {
            assert!(secrets.requested(&[], &url(u)).is_err(), "{u}");
        }
        // Method outside the binding.
        let sent = headers(&[("x-api-key", "pexi:secret:k")]);
        let err = secrets
            .resolve(&at, &sent, &["k".into()], None)
            .expect_err("GET not allowed");
        assert!(err.0.contains("GET"), "{err}");
        // The guest's own key to a brokered host.
        let err = secrets
            .resolve(&at, &headers(&[("x-api-key", "sk-stolen")]), &[], None)
            .expect_err("own key");
        assert!(err.0.contains("brokers"), "{err}");
        assert!(!err.0.contains("sk-stolen"));
        // The policy names the secrets to inject and left this one out.
        let post = Method::POST;
        let err = secrets
            .resolve(
                &hop(&post, "api.test", "api.test"),
                &sent,
                &["k".into()],
                Some(&[]),
            )
            .expect_err("not granted");
        assert!(err.0.contains("did not grant"), "{err}");
        // The guest's own key in another credential header than the secret's: refused the same way.
        let err = secrets
            .resolve(
                &hop(&post, "api.test", "api.test"),
                &headers(&[("authorization", "Bearer sk-own")]),
                &[],
                None,
            )
            .expect_err("own key, another header");
        assert!(err.0.contains("own authorization"), "{err}");
        // Over plain http, and with a method that echoes or tunnels, the value never goes.
        let plain = Hop {
            origin: ("http", "api.test", 80),
            first_origin: ("http", "api.test", 80),
            ..hop(&post, "api.test", "api.test")
        };
        let err = secrets
            .resolve(&plain, &sent, &["k".into()], None)
            .expect_err("http");
        assert!(err.0.contains("over http"), "{err}");
        let trace = Method::TRACE;
        let any_method = load(&[secret("k", "x-api-key", "{secret}", &["api.test"])]);
        for method in [trace, Method::from_bytes(b"TRACK").expect("TRACK")] {
            let err = any_method
                .resolve(
                    &hop(&method, "api.test", "api.test"),
                    &sent,
                    &["k".into()],
                    None,
                )
                .expect_err("echoing method");
            assert!(err.0.contains("may not be sent with"), "{err}");
        }
    }

    #[test]
    fn schemes_and_methods_are_checked_at_load() {
        let env = vec![("KEY_VAR".to_string(), KEY.to_string())];
        let mut ftp = secret("k", "x-api-key", "{secret}", &["api.test"]);
        ftp.schemes = vec!["ftp".into()];
        let mut trace = secret("k", "x-api-key", "{secret}", &["api.test"]);
        trace.methods = Some(vec![MethodName::parse("TRACE").expect("method")]);
        for (config, why) in [(ftp, "schemes"), (trace, "TRACE")] {
            let err = Secret::load(&config, &env, Path::new(".")).expect_err(why);
            assert!(err.to_string().contains(why), "{err}");
        }
        let mut both = secret("k", "x-api-key", "{secret}", &["api.test"]);
        both.schemes = vec!["HTTPS".into(), "http".into()];
        let loaded = Secret::load(&both, &env, Path::new(".")).expect("http allowed explicitly");
        assert!(loaded.allows_scheme("http") && loaded.allows_scheme("https"));
    }

    #[test]
    fn the_policy_may_add_a_secret_the_guest_did_not_name() {
        let secrets = load(&[secret("k", "x-api-key", "{secret}", &["api.test"])]);
        let post = Method::POST;
        let out = secrets
            .resolve(
                &hop(&post, "api.test", "api.test"),
                &[],
                &[],
                Some(&["k".to_string()]),
            )
            .expect("granted");
        assert_eq!(out.injected, vec!["k"]);
        // And still not to another host.
        assert!(secrets
            .resolve(
                &hop(&post, "other.test", "other.test"),
                &[],
                &[],
                Some(&["k".to_string()]),
            )
            .is_err());
    }

    #[test]
    fn bad_entries_fail_to_load_without_showing_the_value() {
        let env = vec![("KEY_VAR".to_string(), "line\r\nbreak".to_string())];
        let err = Secret::load(
            &secret("k", "x-api-key", "{secret}", &["api.test"]),
            &env,
            Path::new("."),
        )
        .expect_err("not a header value");
        assert!(!err.to_string().contains("break"), "{err}");
        for (config, why) in [
            (
                secret("k", "x-api-key", "no marker", &["api.test"]),
                "{secret}",
            ),
            (secret("k", "x-api-key", "{secret}", &[]), "hosts"),
            (
                secret("bad name", "x-api-key", "{secret}", &["a.test"]),
                "name",
            ),
            (secret("k", "bad header", "{secret}", &["a.test"]), "header"),
        ] {
            let err = Secret::load(&config, &[("KEY_VAR".into(), "v".into())], Path::new("."))
                .expect_err(why);
            assert!(err.to_string().contains(why), "{why}: {err}");
        }
        let err = Secret::load(
            &secret("k", "x-api-key", "{secret}", &["api.test"]),
            &[],
            Path::new("."),
        )
        .expect_err("unset");
        assert!(err.to_string().contains("KEY_VAR is not set"), "{err}");
        // A file others can read is refused.
        let dir = std::env::temp_dir().join(format!("pexi-secret-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("key");
        std::fs::write(&path, "s3cr3t-from-file\n").expect("write");
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o644))
            .expect("chmod");
        let mut from_file = secret("k", "x-api-key", "{secret}", &["api.test"]);
        from_file.env = None;
        from_file.file = Some(path.clone());
        let err = Secret::load(&from_file, &[], Path::new(".")).expect_err("mode 644");
        assert!(err.to_string().contains("chmod 600"), "{err}");
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .expect("chmod");
        let loaded = Secret::load(&from_file, &[], Path::new(".")).expect("mode 600");
        assert_eq!(loaded.value.0, "s3cr3t-from-file");
        assert!(!format!("{loaded:?}").contains("s3cr3t"));
        // A file of another user is refused (checked only where the test may give a file away: as root).
        if nix::unistd::geteuid().is_root() {
            std::os::unix::fs::chown(&path, Some(65534), None).expect("chown");
            let err = Secret::load(&from_file, &[], Path::new(".")).expect_err("other owner");
            assert!(err.to_string().contains("belongs to uid 65534"), "{err}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
