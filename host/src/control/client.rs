//! A client of the control socket (`pexi approve`, `pexi ui`, tests): HTTP/1.1 over the Unix socket, one
//! connection per request, JSON in and out.

use std::path::{Path, PathBuf};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use serde_json::Value;

pub struct Client {
    socket: PathBuf,
    /// Sent as `x-pexi-surface`: what answers are audited as coming through.
    surface: &'static str,
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the PEP's control socket {socket}: {source} (is `pexi serve` running with this config?)")]
    Connect {
        socket: String,
        source: std::io::Error,
    },
    #[error("control socket: {0}")]
    Http(String),
}

impl Client {
    pub fn new(socket: &Path, surface: &'static str) -> Client {
        Client {
            socket: socket.to_path_buf(),
            surface,
        }
    }

    /// `GET path`: the status and the JSON body.
    pub async fn get(&self, path: &str) -> Result<(u16, Value), ClientError> {
        self.send(hyper::Method::GET, path, None).await
    }

    /// `POST path` with a JSON body.
    pub async fn post(&self, path: &str, body: &Value) -> Result<(u16, Value), ClientError> {
        self.send(hyper::Method::POST, path, Some(body.to_string()))
            .await
    }

    async fn send(
        &self,
        method: hyper::Method,
        path: &str,
        body: Option<String>,
    ) -> Result<(u16, Value), ClientError> {
        let stream = tokio::net::UnixStream::connect(&self.socket)
            .await
            .map_err(|source| ClientError::Connect {
                socket: self.socket.display().to_string(),
                source,
            })?;
        let http = |err: &dyn std::fmt::Display| ClientError::Http(err.to_string());
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| http(&e))?;
        let driver = tokio::spawn(connection);
        let request = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, "pexi-control")
            .header("x-pexi-surface", self.surface)
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| http(&e))?;
        let response = sender.send_request(request).await.map_err(|e| http(&e))?;
        let status = response.status().as_u16();
        let bytes = response
            .into_body()
            .collect()
            .await
            .map_err(|e| http(&e))?
            .to_bytes();
        driver.abort();
        let value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        Ok((status, value))
    }
}
