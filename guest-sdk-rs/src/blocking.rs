//! A blocking facade for tools that are not async. Each [`Client`] runs the async client on a small
//! runtime of its own (one worker thread), so the connection keeps answering keepalives between calls.
//!
//! ```no_run
//! let client = pexi_guest::blocking::Client::from_env()?;
//! let mut response = client.get("https://api.example.com/v1/models").send()?;
//! println!("{}", response.status());
//! let mut body = String::new();
//! std::io::Read::read_to_string(&mut response, &mut body).expect("read");
//! # Ok::<(), pexi_guest::Error>(())
//! ```

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use crate::{Endpoint, Error, PolicyDecision, RedirectMode};

/// A blocking handle to the PEP; clones share one session.
#[derive(Clone)]
pub struct Client {
    runtime: Arc<tokio::runtime::Runtime>,
    inner: crate::Client,
}

impl Client {
    /// A client for `endpoint`.
    pub fn new(endpoint: Endpoint) -> Result<Client, Error> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("pexi-guest")
            .enable_all()
            .build()
            .map_err(|err| Error::Connect {
                endpoint: endpoint.to_string(),
                message: format!("cannot start a runtime: {err}"),
            })?;
        let inner = {
            let _entered = runtime.enter();
            crate::Client::new(endpoint)
        };
        Ok(Client {
            runtime: Arc::new(runtime),
            inner,
        })
    }

    /// A client for `PEXI_ENDPOINT`, or the default virtio port.
    pub fn from_env() -> Result<Client, Error> {
        Client::new(Endpoint::from_env()?)
    }

    /// Starts a request.
    pub fn request(&self, method: &str, url: &str) -> RequestBuilder {
        RequestBuilder {
            runtime: self.runtime.clone(),
            inner: self.inner.request(method, url),
        }
    }

    /// Starts a GET request.
    pub fn get(&self, url: &str) -> RequestBuilder {
        self.request("GET", url)
    }

    /// Asks the PEP's policy without performing the request.
    pub fn check(&self, method: &str, url: &str) -> Result<PolicyDecision, Error> {
        self.runtime.block_on(self.inner.check(method, url))
    }
}

/// A blocking request being built.
pub struct RequestBuilder {
    runtime: Arc<tokio::runtime::Runtime>,
    inner: crate::RequestBuilder,
}

impl RequestBuilder {
    /// Adds a header.
    pub fn header(self, name: &str, value: impl AsRef<[u8]>) -> Self {
        RequestBuilder {
            inner: self.inner.header(name, value),
            ..self
        }
    }

    /// A body known in full.
    pub fn body(self, body: impl Into<Bytes>) -> Self {
        RequestBuilder {
            inner: self.inner.body(body),
            ..self
        }
    }

    /// What the PEP does with redirects.
    pub fn redirect(self, mode: RedirectMode) -> Self {
        RequestBuilder {
            inner: self.inner.redirect(mode),
            ..self
        }
    }

    /// A deadline for the whole request.
    pub fn timeout(self, timeout: Duration) -> Self {
        RequestBuilder {
            inner: self.inner.timeout(timeout),
            ..self
        }
    }

    /// Sends the request and waits for the response head.
    pub fn send(self) -> Result<Response, Error> {
        let inner = self.runtime.block_on(self.inner.send())?;
        Ok(Response {
            runtime: self.runtime,
            inner,
            leftover: Bytes::new(),
        })
    }
}

/// A blocking response; also an [`std::io::Read`] of its body. Dropping it before the end cancels.
pub struct Response {
    runtime: Arc<tokio::runtime::Runtime>,
    inner: crate::Response,
    leftover: Bytes,
}

impl Response {
    /// The HTTP status.
    pub fn status(&self) -> u16 {
        self.inner.status()
    }

    /// The first value of header `name`.
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.inner.header(name)
    }

    /// The URL after redirects.
    pub fn final_url(&self) -> &str {
        self.inner.final_url()
    }

    /// The audit record of the decision.
    pub fn decision_id(&self) -> &str {
        self.inner.decision_id()
    }

    /// The next piece of the body, `None` at its end.
    pub fn chunk(&mut self) -> Result<Option<Bytes>, Error> {
        if !self.leftover.is_empty() {
            return Ok(Some(std::mem::take(&mut self.leftover)));
        }
        self.runtime.block_on(self.inner.chunk())
    }

    /// The rest of the body.
    pub fn bytes(mut self) -> Result<Bytes, Error> {
        let mut body = self.leftover.to_vec();
        while let Some(chunk) = self.runtime.block_on(self.inner.chunk())? {
            body.extend_from_slice(&chunk);
        }
        Ok(Bytes::from(body))
    }

    /// The rest of the body as text (lossy UTF-8).
    pub fn text(self) -> Result<String, Error> {
        Ok(String::from_utf8_lossy(&self.bytes()?).into_owned())
    }
}

impl std::io::Read for Response {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.leftover.is_empty() {
            match self.runtime.block_on(self.inner.chunk()) {
                Ok(Some(chunk)) => self.leftover = chunk,
                Ok(None) => return Ok(0),
                Err(err) => return Err(std::io::Error::other(err)),
            }
        }
        let n = buf.len().min(self.leftover.len());
        buf[..n].copy_from_slice(&self.leftover.split_to(n));
        Ok(n)
    }
}
