//! OpenTelemetry logs over OTLP/HTTP, protobuf-encoded (the OTLP specification's default): one
//! `ExportLogsServiceRequest` per batch, POSTed to the collector's logs URL; a 2xx response means the
//! collector has the batch. Each log record's body is the audit line exactly as written, so the hash chain
//! and signatures can still be checked on the far side; `pexi.audit.seq` and `pexi.audit.kind` are
//! attributes for queries.
//!
//! The few messages sent are declared here with the field numbers of OpenTelemetry's
//! `opentelemetry/proto/{collector/logs,logs,common,resource}/v1/*.proto`; the export tests decode them
//! with OpenTelemetry's own generated types.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prost::Message;

use super::Item;
use crate::config::OtlpConfig;

#[derive(Clone, PartialEq, prost::Message)]
pub struct ExportLogsServiceRequest {
    #[prost(message, repeated, tag = "1")]
    pub resource_logs: Vec<ResourceLogs>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ExportLogsServiceResponse {
    #[prost(message, optional, tag = "1")]
    pub partial_success: Option<ExportLogsPartialSuccess>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ExportLogsPartialSuccess {
    #[prost(int64, tag = "1")]
    pub rejected_log_records: i64,
    #[prost(string, tag = "2")]
    pub error_message: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ResourceLogs {
    #[prost(message, optional, tag = "1")]
    pub resource: Option<Resource>,
    #[prost(message, repeated, tag = "2")]
    pub scope_logs: Vec<ScopeLogs>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Resource {
    #[prost(message, repeated, tag = "1")]
    pub attributes: Vec<KeyValue>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ScopeLogs {
    #[prost(message, optional, tag = "1")]
    pub scope: Option<InstrumentationScope>,
    #[prost(message, repeated, tag = "2")]
    pub log_records: Vec<LogRecord>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct InstrumentationScope {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(string, tag = "2")]
    pub version: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct LogRecord {
    #[prost(fixed64, tag = "1")]
    pub time_unix_nano: u64,
    #[prost(fixed64, tag = "11")]
    pub observed_time_unix_nano: u64,
    /// SEVERITY_NUMBER_INFO = 9.
    #[prost(int32, tag = "2")]
    pub severity_number: i32,
    #[prost(string, tag = "3")]
    pub severity_text: String,
    #[prost(message, optional, tag = "5")]
    pub body: Option<AnyValue>,
    #[prost(message, repeated, tag = "6")]
    pub attributes: Vec<KeyValue>,
    #[prost(string, tag = "12")]
    pub event_name: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct KeyValue {
    #[prost(string, tag = "1")]
    pub key: String,
    #[prost(message, optional, tag = "2")]
    pub value: Option<AnyValue>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct AnyValue {
    #[prost(oneof = "Value", tags = "1, 3")]
    pub value: Option<Value>,
}

#[derive(Clone, PartialEq, prost::Oneof)]
pub enum Value {
    #[prost(string, tag = "1")]
    StringValue(String),
    #[prost(int64, tag = "3")]
    IntValue(i64),
}

fn text(value: &str) -> Option<AnyValue> {
    Some(AnyValue {
        value: Some(Value::StringValue(value.to_string())),
    })
}

fn attribute(key: &str, value: Option<AnyValue>) -> KeyValue {
    KeyValue {
        key: key.to_string(),
        value,
    }
}

pub struct Otlp {
    client: reqwest::Client,
    endpoint: String,
    resource: Resource,
}

impl Otlp {
    pub fn new(config: &OtlpConfig) -> Result<Otlp, String> {
        let mut builder = reqwest::Client::builder()
            // The PEP's own traffic to a collector the operator named: no environment proxy.
            .no_proxy()
            .timeout(Duration::from_millis(config.timeout_ms.max(100)))
            .redirect(reqwest::redirect::Policy::none());
        if !config.ca_file.as_os_str().is_empty() {
            let pem = std::fs::read(&config.ca_file).map_err(|err| {
                format!(
                    "pep.export.otlp.ca_file {}: {err}",
                    config.ca_file.display()
                )
            })?;
            for cert in reqwest::Certificate::from_pem_bundle(&pem).map_err(|err| {
                format!(
                    "pep.export.otlp.ca_file {}: {err}",
                    config.ca_file.display()
                )
            })? {
                builder = builder.add_root_certificate(cert);
            }
        }
        let mut headers = reqwest::header::HeaderMap::new();
        for (name, value) in &config.headers {
            let name = reqwest::header::HeaderName::from_bytes(name.as_bytes())
                .map_err(|err| format!("pep.export.otlp.headers {name:?}: {err}"))?;
            let mut value = reqwest::header::HeaderValue::from_str(value)
                .map_err(|err| format!("pep.export.otlp.headers {name}: {err}"))?;
            value.set_sensitive(true);
            headers.insert(name, value);
        }
        let client = builder
            .default_headers(headers)
            .build()
            .map_err(|err| format!("pep.export.otlp: {err}"))?;
        Ok(Otlp {
            client,
            endpoint: config.endpoint.clone(),
            resource: Resource {
                attributes: vec![
                    attribute("service.name", text("pexi")),
                    attribute("service.version", text(env!("CARGO_PKG_VERSION"))),
                    attribute("host.name", text(&super::syslog::host_name())),
                ],
            },
        })
    }

    pub async fn send(&mut self, items: &[Item]) -> Result<(), String> {
        let body = self.request(items).encode_to_vec();
        let response = self
            .client
            .post(&self.endpoint)
            .header(reqwest::header::CONTENT_TYPE, "application/x-protobuf")
            .body(body)
            .send()
            .await
            .map_err(|err| format!("{}: {err}", self.endpoint))?;
        let status = response.status();
        let bytes = response
            .bytes()
            .await
            .map_err(|err| format!("{}: reading the response: {err}", self.endpoint))?;
        if !status.is_success() {
            // 429 and 5xx are the collector asking for a retry; anything else is a configuration to fix,
            // retried all the same: audit records are never dropped to make an error go away.
            return Err(format!("{}: HTTP {status}", self.endpoint));
        }
        if let Ok(ExportLogsServiceResponse {
            partial_success: Some(partial),
        }) = ExportLogsServiceResponse::decode(bytes.as_ref())
        {
            if partial.rejected_log_records > 0 {
                // The collector took the batch and refused some of it on purpose: sending it again would
                // be refused again (the specification says not to retry).
                tracing::warn!(rejected = partial.rejected_log_records, message = %partial.error_message, "audit export: the OTLP collector rejected records");
            }
        }
        Ok(())
    }

    fn request(&self, items: &[Item]) -> ExportLogsServiceRequest {
        let observed = nanos(SystemTime::now());
        let log_records = items
            .iter()
            .map(|item| {
                let line = item.line();
                let time = humantime::parse_rfc3339_weak(&line.ts)
                    .map(nanos)
                    .unwrap_or(observed);
                let (seq_key, event) = match item {
                    Item::Record(_) => ("pexi.audit.seq", format!("pexi.audit.{}", line.kind)),
                    Item::Checkpoint(_) => ("pexi.audit.last_seq", "pexi.audit.checkpoint".into()),
                };
                LogRecord {
                    time_unix_nano: time,
                    observed_time_unix_nano: observed,
                    severity_number: 9,
                    severity_text: "INFO".into(),
                    body: text(&line.text),
                    attributes: vec![
                        attribute(
                            seq_key,
                            Some(AnyValue {
                                value: Some(Value::IntValue(
                                    i64::try_from(line.seq).unwrap_or(i64::MAX),
                                )),
                            }),
                        ),
                        attribute("pexi.audit.kind", text(&line.kind)),
                    ],
                    event_name: event,
                }
            })
            .collect();
        ExportLogsServiceRequest {
            resource_logs: vec![ResourceLogs {
                resource: Some(self.resource.clone()),
                scope_logs: vec![ScopeLogs {
                    scope: Some(InstrumentationScope {
                        name: "pexi.audit".into(),
                        version: env!("CARGO_PKG_VERSION").into(),
                    }),
                    log_records,
                }],
            }],
        }
    }
}

fn nanos(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}
