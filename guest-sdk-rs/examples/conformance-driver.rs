//! The Rust SDK's driver for the guest conformance runner (protocol/conformance/README.md): reads one
//! action as a JSON line on stdin, performs it through the public `pexi_guest::Client` API against
//! `PEXI_ENDPOINT`, prints the outcome as one JSON line, and exits when stdin closes.
//!
//!     cargo run -p pexi-test-support --bin pexi-conformance -- guest --name rust -- \
//!         target/debug/examples/conformance-driver

use std::future::Future;
use std::pin::Pin;

use pexi_guest::{Client, Error};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};

/// Byte `offset` of every body the scenarios move: `a` to `z`, repeating.
fn pattern(offset: usize) -> u8 {
    b'a' + (offset % 26) as u8
}

fn failure(error: &Error) -> Value {
    json!({"error": {
        "code": error.code(),
        "retryable": error.retryable(),
        "reasons": error.reasons(),
    }})
}

fn perform<'a>(client: &'a Client, action: &'a Value) -> Pin<Box<dyn Future<Output = Value> + 'a>> {
    Box::pin(async move {
        if let Some(check) = action.get("check") {
            let method = check["method"].as_str().unwrap_or("GET");
            let url = check["url"].as_str().unwrap_or_default();
            return match client.check(method, url).await {
                Ok(decision) => json!({
                    "allow": decision.allow,
                    "reasons": decision.reasons,
                    "decision_id": decision.decision_id,
                }),
                Err(error) => failure(&error),
            };
        }
        if let Some(request) = action.get("request") {
            return perform_request(client, request).await;
        }
        if let Some(actions) = action["sequence"].as_array() {
            let mut results = Vec::new();
            for action in actions {
                results.push(perform(client, action).await);
            }
            return json!({"results": results});
        }
        if let Some(actions) = action["concurrent"].as_array() {
            let results =
                futures_util::future::join_all(actions.iter().map(|a| perform(client, a))).await;
            return json!({"results": results});
        }
        if let Some(ms) = action["sleep_ms"].as_u64() {
            tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
            return json!({"slept": ms});
        }
        json!({"error": {"code": "driver", "message": format!("unknown action {action}")}})
    })
}

async fn perform_request(client: &Client, request: &Value) -> Value {
    let method = request["method"].as_str().unwrap_or("GET");
    let url = request["url"].as_str().unwrap_or_default();
    let mut builder = client.request(method, url);
    for header in request["headers"].as_array().into_iter().flatten() {
        if let (Some(name), Some(value)) = (header[0].as_str(), header[1].as_str()) {
            builder = builder.header(name, value);
        }
    }
    if let Some(size) = request["body_bytes"].as_u64() {
        builder = builder.body((0..size as usize).map(pattern).collect::<Vec<u8>>());
    } else if let Some(text) = request["body"].as_str() {
        builder = builder.body(text.to_string());
    }
    let response = match builder.send().await {
        Ok(response) => response,
        Err(error) => return failure(&error),
    };
    let status = response.status();
    if request["cancel_after_head"].as_bool() == Some(true) {
        drop(response);
        return json!({"status": status, "cancelled": true});
    }
    match response.bytes().await {
        Ok(body) => {
            let mut outcome = json!({
                "status": status,
                "body_bytes": body.len(),
                "body_sha256": hex(&Sha256::digest(&body)),
            });
            if let Ok(text) = std::str::from_utf8(&body) {
                if text.len() <= 4096 {
                    outcome["body"] = json!(text);
                }
            }
            outcome
        }
        Err(error) => {
            let mut outcome = failure(&error);
            outcome["status"] = json!(status);
            outcome
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::main]
async fn main() {
    let mut stdin = BufReader::new(tokio::io::stdin());
    let mut line = String::new();
    let client = Client::from_env();
    let outcome = match (stdin.read_line(&mut line).await, &client) {
        (Ok(_), Ok(client)) => match serde_json::from_str::<Value>(&line) {
            Ok(action) => perform(client, &action).await,
            Err(e) => json!({"error": {"code": "driver", "message": e.to_string()}}),
        },
        (Err(e), _) => json!({"error": {"code": "driver", "message": e.to_string()}}),
        (_, Err(e)) => failure(e),
    };
    println!("{outcome}");
    // The client (and its session) stays up until the runner is done with it: it closes stdin.
    let mut rest = Vec::new();
    let _ = stdin.read_to_end(&mut rest).await;
    drop(client);
}
