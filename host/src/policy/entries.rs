//! Allowlist and denylist entries: the data the default policy decides on. Every field is validated while
//! it is deserialised, so a bad entry fails the load with the file and line (TOML, JSON) or the variable
//! that holds it, before any policy sees it.

use std::fmt;

use serde::{Deserialize, Serialize};

/// One allow or deny entry. Absent fields take the policy's defaults (see `policies/pexi/http.rego`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    pub host: HostPattern,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ports: Option<Vec<Port>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub methods: Option<Vec<MethodName>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paths: Option<Vec<PathPrefix>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schemes: Option<Vec<Scheme>>,
    /// A tunnel-only destination: `pep.net.connect` only (host and ports).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tunnel: Option<bool>,
    /// Protocols a request to this entry may upgrade to (`["websocket"]`); none unless listed, since an
    /// upgraded connection carries bytes both ways past what `methods` and `paths` say.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upgrade: Option<Vec<UpgradeProtocol>>,
    /// The VMs (by the name the host gives them: `input.vm.name`) this entry is for; any VM when absent.
    /// To every other VM the entry is as if it were not listed.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "some_vms"
    )]
    pub vms: Option<Vec<VmName>>,
}

impl Entry {
    pub fn host(host: &str) -> Result<Entry, String> {
        Ok(Entry {
            host: HostPattern::parse(host)?,
            ports: None,
            methods: None,
            paths: None,
            schemes: None,
            tunnel: None,
            upgrade: None,
            vms: None,
        })
    }
}

/// Declares a string newtype that is validated (and normalised) by `parse` whenever it is deserialised.
macro_rules! validated_string {
    ($(#[$doc:meta])* $name:ident, $parse:expr) => {
        $(#[$doc])*
        #[derive(Clone, Debug, PartialEq, Eq, Serialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            pub fn parse(text: &str) -> Result<$name, String> {
                let parse: fn(&str) -> Result<String, String> = $parse;
                parse(text).map($name)
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                let text = String::deserialize(deserializer)?;
                $name::parse(&text).map_err(serde::de::Error::custom)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

validated_string!(
    /// `example.com`, `*.example.com` (subdomains only), `**.example.com` (apex and subdomains), an IP
    /// address or a CIDR. Lowercased; a trailing dot is dropped.
    HostPattern,
    parse_host_pattern
);
validated_string!(
    /// An HTTP method token, uppercased.
    MethodName,
    |text| {
        let upper = text.to_ascii_uppercase();
        match http::Method::from_bytes(upper.as_bytes()) {
            Ok(_) if !upper.is_empty() => Ok(upper),
            _ => Err(format!("{text:?} is not an HTTP method")),
        }
    }
);
validated_string!(
    /// A path prefix: starts with `/`.
    PathPrefix,
    |text| {
        if text.starts_with('/') && !text.chars().any(|c| c.is_ascii_control() || c == ' ') {
            Ok(text.to_string())
        } else {
            Err(format!("path prefix {text:?} must start with / and contain no spaces"))
        }
    }
);
validated_string!(
    /// `http` or `https`.
    Scheme,
    |text| match text.to_ascii_lowercase().as_str() {
        s @ ("http" | "https") => Ok(s.to_string()),
        _ => Err(format!("scheme {text:?} is not http or https")),
    }
);

validated_string!(
    /// A protocol a request may upgrade to: `websocket`.
    UpgradeProtocol,
    |text| match text.to_ascii_lowercase().as_str() {
        s @ "websocket" => Ok(s.to_string()),
        _ => Err(format!("upgrade {text:?} is not websocket")),
    }
);

validated_string!(
    /// A VM's name as the host gives it (`[pep] listen` tables, `pexi vm run --name`).
    VmName,
    |text| vm_label("vm name", text).map(|()| text.to_string())
);

/// `vms` names at least one VM: an empty list would be an entry for no VM at all, surely a mistake.
fn some_vms<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<Vec<VmName>>, D::Error> {
    let vms = Vec::<VmName>::deserialize(deserializer)?;
    if vms.is_empty() {
        return Err(serde::de::Error::custom(
            "vms = [] names no VM: leave vms out for an entry for every VM",
        ));
    }
    Ok(Some(vms))
}

/// A VM name or profile: 1–64 of `A-Z a-z 0-9 . _ -`, so it reads the same in a policy, an audit record,
/// a metric label and a log line.
pub fn vm_label(what: &str, label: &str) -> Result<(), String> {
    let fine = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
    if label.is_empty() || label.len() > 64 || !label.chars().all(fine) {
        return Err(format!(
            "{what} {label:?}: 1 to 64 of the letters A-Z a-z, digits, '.', '_' and '-'"
        ));
    }
    Ok(())
}

/// A port number, 1 to 65535.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct Port(u16);

impl Port {
    pub fn new(port: u16) -> Result<Port, String> {
        if port == 0 {
            return Err("port 0 is not in 1..=65535".into());
        }
        Ok(Port(port))
    }
}

impl<'de> Deserialize<'de> for Port {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let n = i64::deserialize(deserializer)?;
        match u16::try_from(n) {
            Ok(port) if port > 0 => Ok(Port(port)),
            _ => Err(serde::de::Error::custom(format!(
                "port {n} is not in 1..=65535"
            ))),
        }
    }
}

impl HostPattern {
    /// Whether `host` (a canonical, lowercased name or IP literal) matches, with the meaning
    /// `policies/pexi/http.rego` gives patterns: names never match IP patterns and IPs never match names.
    /// The PEP itself uses this where it must not depend on the policy (the binding of brokered secrets).
    pub fn matches(&self, host: &str) -> bool {
        let pattern = self.0.as_str();
        if let Ok(ip) = host.parse::<std::net::IpAddr>() {
            return match pattern.parse::<ipnet::IpNet>() {
                Ok(net) => net.contains(&ip),
                Err(_) => pattern.parse::<std::net::IpAddr>() == Ok(ip),
            };
        }
        if pattern.parse::<std::net::IpAddr>().is_ok() || pattern.contains('/') {
            return false;
        }
        if let Some(apex) = pattern.strip_prefix("**.") {
            host == apex
                || host
                    .strip_suffix(apex)
                    .is_some_and(|rest| rest.ends_with('.'))
        } else if let Some(parent) = pattern.strip_prefix("*.") {
            host.strip_suffix(parent)
                .is_some_and(|rest| rest.len() > 1 && rest.ends_with('.'))
        } else {
            host == pattern
        }
    }
}

fn parse_host_pattern(text: &str) -> Result<String, String> {
    let refuse = |why: &str| Err(format!("host pattern {text:?}: {why}"));
    if text.is_empty() {
        return refuse("empty");
    }
    if !text.is_ascii() {
        return refuse("write international names in punycode (xn--...)");
    }
    let lower = text.to_ascii_lowercase();
    if let Ok(ip) = lower.parse::<std::net::IpAddr>() {
        return Ok(ip.to_string());
    }
    if lower.contains('/') {
        return match lower.parse::<ipnet::IpNet>() {
            Ok(net) if net == net.trunc() => Ok(net.to_string()),
            Ok(net) => refuse(&format!(
                "CIDR has host bits set; did you mean {}?",
                net.trunc()
            )),
            Err(_) => refuse("not a valid CIDR"),
        };
    }
    let (wildcard, name) = if let Some(rest) = lower.strip_prefix("**.") {
        ("**.", rest)
    } else if let Some(rest) = lower.strip_prefix("*.") {
        ("*.", rest)
    } else {
        ("", lower.as_str())
    };
    let name = name.strip_suffix('.').unwrap_or(name);
    if name.contains('*') {
        return refuse("a wildcard may only be the whole first label (*. or **.)");
    }
    let labels: Vec<&str> = name.split('.').collect();
    if labels.iter().any(|l| l.is_empty()) {
        return refuse("empty label");
    }
    if let Some(bad) = labels.iter().find(|l| {
        l.len() > 63
            || !l
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    }) {
        return refuse(&format!("label {bad:?} is not a DNS label"));
    }
    if !wildcard.is_empty() && labels.len() < 2 {
        return refuse("a wildcard must sit below at least two labels (not *.com)");
    }
    if labels.iter().all(|l| l.bytes().all(|b| b.is_ascii_digit())) {
        return refuse("looks like a partial IP address; write the address or a CIDR");
    }
    Ok(format!("{wildcard}{name}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_as_the_policy_matches_them() {
        let cases = [
            ("api.example.com", "api.example.com", true),
            ("api.example.com", "x.api.example.com", false),
            ("*.example.com", "a.example.com", true),
            ("*.example.com", "a.b.example.com", true),
            ("*.example.com", "example.com", false),
            ("*.example.com", "badexample.com", false),
            ("**.example.com", "example.com", true),
            ("**.example.com", "a.example.com", true),
            ("**.example.com", "notexample.com", false),
            ("10.1.2.3", "10.1.2.3", true),
            ("10.1.2.3", "10.1.2.4", false),
            ("10.0.0.0/8", "10.200.0.1", true),
            ("2001:db8::/32", "2001:db8::1", true),
            ("10.0.0.0/8", "ten.example", false),
            ("**.example.com", "10.0.0.1", false),
        ];
        for (pattern, host, expected) in cases {
            let parsed = HostPattern::parse(pattern).expect("pattern");
            assert_eq!(parsed.matches(host), expected, "{pattern} vs {host}");
        }
    }

    #[test]
    fn valid_patterns_are_normalised() {
        for (input, want) in [
            ("Example.COM", "example.com"),
            ("example.com.", "example.com"),
            ("*.Example.com", "*.example.com"),
            ("**.example.com", "**.example.com"),
            ("xn--bcher-kva.example", "xn--bcher-kva.example"),
            ("10.1.2.3", "10.1.2.3"),
            ("10.0.0.0/8", "10.0.0.0/8"),
            ("2001:DB8::/32", "2001:db8::/32"),
            ("::1", "::1"),
        ] {
            assert_eq!(
                HostPattern::parse(input).map(|p| p.0),
                Ok(want.to_string()),
                "{input}"
            );
        }
    }

    #[test]
    fn invalid_patterns_are_refused_with_a_reason() {
        for input in [
            "",
            "*",
            "**",
            "*.com",
            "**.com",
            "*.",
            "a.*.com",
            "*example.com",
            "ex*ample.com",
            "bücher.example",
            "a..b",
            ".example.com",
            "exa mple.com",
            "10.0.0.1/8",
            "10.0.0.0/33",
            "127.1",
        ] {
            assert!(HostPattern::parse(input).is_err(), "{input:?} accepted");
        }
    }

    #[test]
    fn entries_reject_unknown_fields_and_bad_values() {
        let ok: Entry = serde_json::from_str(
            r#"{"host": "api.example.com", "ports": [443, 8443], "methods": ["get"], "paths": ["/v1"], "schemes": ["HTTPS"]}"#,
        )
        .expect("valid");
        assert_eq!(ok.methods.as_deref().map(|m| m[0].as_str()), Some("GET"));
        assert_eq!(ok.schemes.as_deref().map(|s| s[0].as_str()), Some("https"));
        let for_two: Entry =
            serde_json::from_str(r#"{"host": "a.example", "vms": ["alice", "bob.2"]}"#)
                .expect("valid");
        assert_eq!(for_two.vms.map(|v| v.len()), Some(2));
        for bad in [
            r#"{"host": "a.example", "port": [443]}"#,
            r#"{"host": "a.example", "ports": [0]}"#,
            r#"{"host": "a.example", "ports": [70000]}"#,
            r#"{"host": "a.example", "methods": ["GE T"]}"#,
            r#"{"host": "a.example", "paths": ["v1"]}"#,
            r#"{"host": "a.example", "schemes": ["ftp"]}"#,
            r#"{"ports": [443]}"#,
            r#"{"host": "a.example", "vms": []}"#,
            r#"{"host": "a.example", "vms": ["a b"]}"#,
            r#"{"host": "a.example", "vms": "alice"}"#,
        ] {
            assert!(
                serde_json::from_str::<Entry>(bad).is_err(),
                "{bad} accepted"
            );
        }
    }
}
