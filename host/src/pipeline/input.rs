//! The policy's input document, typed: what the Rego sees of one hop (docs/policy.md, "The input"). Built
//! from the prepared request with the secret headers and query parameters already redacted, so the policy,
//! and the audit record that copies `request`, never hold a credential.

use serde::Serialize;

use super::request::Prepared;
use super::target::Endpoint;
use crate::audit::{Redaction, Redactor};
use crate::config::VmIdentity;
use crate::stream::Caller;

#[derive(Clone, Debug, Serialize)]
pub struct PolicyInput {
    /// The protocol method: `pep.http.request`, `pep.net.connect`, `pep.policy.check`.
    pub method: String,
    pub request: RequestInput,
    /// 0 for the guest's request, 1.. for the redirects followed from it.
    pub hop: u32,
    /// The hop before this one (redacted), for redirects.
    pub previous_url: Option<String>,
    pub session: SessionInput,
    /// The VM as the host set it up (its listener, `pexi vm run --name`): trustworthy, unlike
    /// `session.guest`; empty strings for a listener that names none.
    pub vm: VmIdentity,
}

#[derive(Clone, Debug, Serialize)]
pub struct RequestInput {
    pub method: String,
    /// `http`, `https`, or `tcp` for a tunnel.
    pub scheme: String,
    pub host: String,
    pub host_kind: &'static str,
    pub port: u16,
    pub path: String,
    pub query: Option<String>,
    /// Lower-case names, each with its values in the guest's order; secret ones redacted.
    pub headers: serde_json::Map<String, serde_json::Value>,
    pub body_length: Option<u64>,
    pub url: String,
    /// The brokered secrets the request names by placeholder.
    pub secrets: Vec<String>,
    pub upgrade: Option<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct SessionInput {
    pub id: String,
    pub guest: GuestInput,
}

#[derive(Clone, Debug, Serialize)]
pub struct GuestInput {
    pub name: String,
    pub version: String,
}

/// What a hop asks for: an HTTP request, or a TCP tunnel to an endpoint.
#[derive(Clone, Copy, Debug)]
pub enum Asked<'a> {
    Http(&'a Prepared),
    Tcp(&'a Endpoint),
}

impl PolicyInput {
    /// The input for one hop, and what was redacted from it.
    pub fn build(
        redactor: &Redactor,
        caller: &Caller,
        method: &str,
        asked: Asked<'_>,
        hop: u32,
        previous: Option<&url::Url>,
    ) -> (PolicyInput, Vec<Redaction>) {
        let session = SessionInput {
            id: format!("{:016x}", caller.session_id),
            guest: GuestInput {
                name: caller.guest.name.clone(),
                version: caller.guest.version.clone(),
            },
        };
        let mut redactions = Vec::new();
        let prepared = match asked {
            Asked::Http(prepared) => prepared,
            // A tunnel has no URL of its own: the policy sees scheme `tcp` and the endpoint it names.
            Asked::Tcp(endpoint) => {
                let input = PolicyInput {
                    method: method.to_string(),
                    request: RequestInput {
                        method: "CONNECT".into(),
                        scheme: "tcp".into(),
                        host: endpoint.host.to_string(),
                        host_kind: endpoint.host.kind().as_str(),
                        port: endpoint.port,
                        path: String::new(),
                        query: None,
                        headers: serde_json::Map::new(),
                        body_length: None,
                        url: endpoint.tcp_url(),
                        secrets: Vec::new(),
                        upgrade: None,
                    },
                    hop,
                    previous_url: None,
                    session,
                    vm: caller.vm.as_ref().clone(),
                };
                return (input, redactions);
            }
        };
        let target = &prepared.target;
        let mut headers = serde_json::Map::new();
        for (name, value) in &prepared.headers {
            let (shown, redaction) = redactor.header(name.as_str(), value.as_bytes());
            redactions.extend(redaction);
            if let Some(values) = headers
                .entry(name.as_str().to_string())
                .or_insert_with(|| serde_json::Value::Array(Vec::new()))
                .as_array_mut()
            {
                values.push(serde_json::Value::String(shown));
            }
        }
        let url = &target.url;
        let (shown_url, url_redactions) = redactor.url_with_redactions(url);
        redactions.extend(url_redactions);
        let query = url
            .query()
            .and_then(|_| shown_url.split_once('?').map(|(_, q)| q.to_string()));
        let input = PolicyInput {
            method: method.to_string(),
            request: RequestInput {
                method: prepared.method.as_str().to_string(),
                scheme: url.scheme().to_string(),
                host: target.host.to_string(),
                host_kind: target.host.kind().as_str(),
                port: target.port,
                path: url.path().to_string(),
                query,
                headers,
                body_length: prepared.content_length,
                url: shown_url,
                secrets: prepared.secrets.clone(),
                upgrade: prepared.upgrade.clone(),
            },
            hop,
            previous_url: previous.map(|u| redactor.url(u)),
            session,
            vm: caller.vm.as_ref().clone(),
        };
        (input, redactions)
    }

    /// The document the policy engine evaluates.
    pub fn to_json(&self) -> serde_json::Value {
        // Serialising plain strings, numbers and maps cannot fail.
        serde_json::to_value(self).unwrap_or(serde_json::Value::Null)
    }
}

#[cfg(test)]
mod tests {
    use http::{HeaderName, HeaderValue, Method};
    use pexi_protocol::payload::{Implementation, RedirectMode};

    use super::*;
    use crate::pipeline::target::Target;

    fn caller() -> Caller {
        Caller {
            session_id: 0x2a,
            guest: Implementation {
                name: "g".into(),
                version: "1".into(),
            },
            vm: Default::default(),
            stream_id: 3,
        }
    }

    fn prepared(url: &str) -> Prepared {
        Prepared {
            method: Method::POST,
            target: Target::parse(url).expect("url"),
            headers: vec![
                (
                    HeaderName::from_static("authorization"),
                    HeaderValue::from_static("Bearer sk-secret"),
                ),
                (
                    HeaderName::from_static("accept"),
                    HeaderValue::from_static("a"),
                ),
                (
                    HeaderName::from_static("accept"),
                    HeaderValue::from_static("b"),
                ),
            ],
            content_length: Some(5),
            redirect: RedirectMode::Follow,
            timeout_ms: None,
            secrets: vec!["openai".into()],
            upgrade: None,
        }
    }

    fn redactor() -> Redactor {
        Redactor::new(&["authorization".into()], &["token".into()], None)
    }

    #[test]
    fn an_http_hop_is_described_with_its_secrets_redacted() {
        let (input, redactions) = PolicyInput::build(
            &redactor(),
            &caller(),
            "pep.http.request",
            Asked::Http(&prepared("https://API.example.com:8443/v1/x?token=t0p&q=1")),
            1,
            Some(&url::Url::parse("https://a.example/?token=old").expect("url")),
        );
        let json = input.to_json();
        assert_eq!(json["request"]["host"], "api.example.com");
        assert_eq!(json["request"]["port"], 8443);
        assert_eq!(json["request"]["path"], "/v1/x");
        assert_eq!(
            json["request"]["headers"]["accept"],
            serde_json::json!(["a", "b"])
        );
        let text = json.to_string();
        assert!(
            !text.contains("sk-secret") && !text.contains("t0p") && !text.contains("old"),
            "{text}"
        );
        assert_eq!(json["session"]["id"], "000000000000002a");
        assert_eq!(json["hop"], 1);
        let paths: Vec<&str> = redactions.iter().map(|r| r.path.as_str()).collect();
        assert!(
            paths.contains(&"request.headers.authorization"),
            "{paths:?}"
        );
    }

    #[test]
    fn a_tunnel_is_tcp_to_an_address_with_nothing_else() {
        let (input, redactions) = PolicyInput::build(
            &redactor(),
            &caller(),
            "pep.net.connect",
            Asked::Tcp(&Endpoint::parse("2001:db8::1", 5432).expect("endpoint")),
            0,
            None,
        );
        let request = &input.request;
        assert_eq!(
            (
                request.method.as_str(),
                request.scheme.as_str(),
                request.url.as_str()
            ),
            ("CONNECT", "tcp", "tcp://[2001:db8::1]:5432")
        );
        assert!(request.headers.is_empty() && request.secrets.is_empty());
        assert!(redactions.is_empty());
    }
}
