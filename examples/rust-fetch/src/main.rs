//! `pexi-fetch`: curl for a guest with no network. Every request goes to the host PEP, which decides it
//! with policy and performs it; the body streams to stdout as it arrives.
//!
//! ```sh
//! PEXI_ENDPOINT=unix:$(pexi paths socket) pexi-fetch https://api.example.com/v1/models
//! pexi-fetch -X POST -H 'content-type: application/json' -d @request.json https://api.example.com/v1/messages
//! pexi-fetch --check https://evil.example/      # ask the policy only
//! ```
//!
//! Exit status: 0 for a 2xx/3xx response (or an allowing `--check`), 22 for a 4xx/5xx response (as curl
//! `-f`), 1 for a denial, 2 for any other error.

use std::process::ExitCode;

use clap::Parser;
use pexi_guest::{Client, Error};
use tokio::io::AsyncWriteExt;

#[derive(Parser)]
#[command(name = "pexi-fetch", version, about = "HTTP through the pexi PEP")]
struct Args {
    /// HTTP method (default GET, or POST with -d).
    #[arg(short = 'X', long = "request")]
    method: Option<String>,
    /// A request header, `Name: value` (repeatable).
    #[arg(short = 'H', long = "header")]
    headers: Vec<String>,
    /// Request body: text, or @FILE to send a file.
    #[arg(short = 'd', long = "data")]
    data: Option<String>,
    /// Only ask the policy (pep.policy.check); nothing is sent upstream.
    #[arg(long)]
    check: bool,
    /// Print the status line and headers to stderr.
    #[arg(short = 'i', long)]
    include: bool,
    /// The PEP endpoint (default: PEXI_ENDPOINT, else the virtio port).
    #[arg(long)]
    endpoint: Option<String>,
    url: String,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("pexi-fetch: {err}");
            return ExitCode::from(2);
        }
    };
    runtime.block_on(run(args)).unwrap_or_else(|err| {
        eprintln!("pexi-fetch: {err}");
        if !err.reasons().is_empty() {
            for reason in err.reasons() {
                eprintln!("  {reason}");
            }
        }
        if let Some(id) = err.decision_id() {
            eprintln!("  decision {id}");
        }
        ExitCode::from(if err.code() == "policy_denied" { 1 } else { 2 })
    })
}

async fn run(args: Args) -> Result<ExitCode, Error> {
    let client = match &args.endpoint {
        Some(endpoint) => Client::new(endpoint.parse()?),
        None => Client::from_env()?,
    };
    let method = args
        .method
        .clone()
        .unwrap_or_else(|| if args.data.is_some() { "POST" } else { "GET" }.to_string());
    if args.check {
        let decision = client.check(&method, &args.url).await?;
        eprintln!(
            "{} (decision {})",
            if decision.allow { "allow" } else { "deny" },
            decision.decision_id
        );
        for reason in &decision.reasons {
            eprintln!("  {reason}");
        }
        return Ok(ExitCode::from(if decision.allow { 0 } else { 1 }));
    }
    let mut request = client.request(&method, &args.url);
    for header in &args.headers {
        let (name, value) = header
            .split_once(':')
            .ok_or_else(|| Error::Body(format!("header {header:?} is not `Name: value`")))?;
        request = request.header(name.trim(), value.trim());
    }
    if let Some(data) = &args.data {
        let body = match data.strip_prefix('@') {
            Some(file) => tokio::fs::read(file)
                .await
                .map_err(|err| Error::Body(format!("{file}: {err}")))?,
            None => data.clone().into_bytes(),
        };
        request = request.body(body);
    }
    let mut response = request.send().await?;
    if args.include {
        eprintln!("HTTP {} ({})", response.status(), response.final_url());
        for header in response.headers() {
            eprintln!(
                "{}: {}",
                header.name(),
                String::from_utf8_lossy(header.value())
            );
        }
    }
    let status = response.status();
    let mut stdout = tokio::io::stdout();
    while let Some(chunk) = response.chunk().await? {
        stdout
            .write_all(&chunk)
            .await
            .map_err(|err| Error::Body(format!("stdout: {err}")))?;
        // Flush per chunk: a stream of events must reach whoever reads stdout as it arrives.
        let _ = stdout.flush().await;
    }
    Ok(ExitCode::from(if status >= 400 { 22 } else { 0 }))
}
