//! The guest runner: plays the host against a guest implementation (`protocol/conformance/guest/`).
//!
//! Each scenario starts the implementation's *driver* (a small program built on its public API) with
//! `PEXI_ENDPOINT=unix:<socket>` and the scenario's `action` as one JSON line on stdin; the driver performs
//! it and prints one JSON line with the outcome. The runner accepts the driver's connection, sends and
//! expects the frames the scenario states, and checks the outcome; every frame from the guest is also held
//! to the rules no scenario spells out (credit, max frame, stream ids, limits: [`Conn`]).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use pexi_protocol::frame::{Frame, FrameType};
use pexi_protocol::payload::{cbor, HelloAck, Implementation, Limits};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixListener;
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

use super::{
    as_json, contains, describe, reference_receive, substitute, Conn, Vars, EXPECT_WITHIN,
};

/// How long the runner waits for the driver to connect, and to finish its action.
const DRIVER_WITHIN: Duration = Duration::from_secs(15);

/// A guest implementation's driver: the command line that runs it.
#[derive(Clone, Debug)]
pub struct Driver {
    pub name: String,
    pub command: Vec<String>,
}

/// The default HELLO_ACK of a `handshake` step, before the scenario's overrides.
fn hello_ack(nonce: u64) -> HelloAck {
    HelloAck {
        version: 1,
        nonce,
        session_id: 0x2a3f,
        implementation: Implementation {
            name: "conformance".into(),
            version: "1".into(),
        },
        features: Vec::new(),
        receive: reference_receive(),
        // The reference host's limits; scenarios lower those they test.
        limits: Limits::default(),
        policy_revision: None,
    }
}

/// Merges `overrides` into `base` (objects recursively).
fn merge(base: &mut Value, overrides: &Value) {
    match (base, overrides) {
        (Value::Object(b), Value::Object(o)) => {
            for (k, v) in o {
                merge(b.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
        (b, o) => *b = o.clone(),
    }
}

struct Run<'a> {
    listener: &'a UnixListener,
    conn: Option<Conn>,
    vars: Vars,
    child: Child,
    /// Held open for the whole scenario: the driver exits when it closes.
    stdin: Option<ChildStdin>,
    stdout: Option<BufReader<ChildStdout>>,
    outcome: Option<Value>,
}

/// The guest's next connection.
async fn accept(listener: &UnixListener) -> Result<Conn, String> {
    let (stream, _) = tokio::time::timeout(DRIVER_WITHIN, listener.accept())
        .await
        .map_err(|_| "the guest did not connect".to_string())?
        .map_err(|e| format!("accept: {e}"))?;
    Ok(Conn::new(stream, "guest"))
}

impl Run<'_> {
    /// The current connection; the guest's first one is accepted when a step first needs it.
    async fn conn(&mut self) -> Result<&mut Conn, String> {
        if self.conn.is_none() {
            self.conn = Some(accept(self.listener).await?);
        }
        self.conn.as_mut().ok_or_else(|| "no connection".into())
    }

    /// A new session's HELLO, on the current connection or on a new one (a guest may start its next session
    /// either way once the old one is over).
    async fn hello_anywhere(&mut self) -> Result<Frame, String> {
        let listener = self.listener;
        if let Some(conn) = self.conn.as_mut() {
            tokio::select! {
                frame = conn.next(EXPECT_WITHIN, |_| false) => match frame? {
                    Some(frame) => return Ok(frame),
                    None => self.conn = Some(accept(listener).await?),
                },
                accepted = listener.accept() => {
                    let (stream, _) = accepted.map_err(|e| format!("accept: {e}"))?;
                    self.conn = Some(Conn::new(stream, "guest"));
                }
            }
        } else {
            self.conn = Some(accept(listener).await?);
        }
        let conn = self.conn.as_mut().ok_or("no connection")?;
        conn.next(EXPECT_WITHIN, |_| false)
            .await?
            .ok_or_else(|| "expected HELLO, the guest closed".to_string())
    }

    /// The driver's outcome: the first line it prints, as JSON.
    async fn outcome(&mut self) -> Result<Value, String> {
        if let Some(outcome) = &self.outcome {
            return Ok(outcome.clone());
        }
        let stdout = self.stdout.as_mut().ok_or("no driver output")?;
        let mut line = String::new();
        let read = tokio::time::timeout(DRIVER_WITHIN, stdout.read_line(&mut line))
            .await
            .map_err(|_| "the driver did not finish its action".to_string())?
            .map_err(|e| format!("driver output: {e}"))?;
        if read == 0 {
            let status = self
                .child
                .wait()
                .await
                .map_err(|e| format!("driver: {e}"))?;
            return Err(format!("the driver printed nothing (exit {status})"));
        }
        let outcome: Value = serde_json::from_str(line.trim())
            .map_err(|e| format!("the driver printed {line:?}, not JSON: {e}"))?;
        self.outcome = Some(outcome.clone());
        Ok(outcome)
    }

    async fn step(&mut self, step: &Value) -> Result<(), String> {
        if let Some(spec) = step.get("handshake") {
            let mut spec = spec.clone();
            let anywhere = spec
                .as_object_mut()
                .and_then(|o| o.remove("new_session"))
                .is_some_and(|v| v == true);
            let hello = if anywhere {
                self.hello_anywhere().await?
            } else {
                let conn = self.conn().await?;
                conn.next(EXPECT_WITHIN, |_| false)
                    .await?
                    .ok_or("expected HELLO, the guest closed")?
            };
            let json = as_json(&hello);
            let offered = json["versions"]
                .as_array()
                .is_some_and(|v| v.contains(&Value::from(1)));
            let nonce = json["nonce"].as_u64();
            let (FrameType::Hello, true, Some(nonce)) = (hello.frame_type, offered, nonce) else {
                return Err(format!(
                    "expected a HELLO offering version 1, got {}",
                    describe(&hello)
                ));
            };
            self.vars.insert("nonce".into(), Value::from(nonce));
            let mut ack = serde_json::to_value(hello_ack(nonce)).map_err(|e| e.to_string())?;
            merge(&mut ack, &spec);
            let ack: HelloAck =
                serde_json::from_value(ack).map_err(|e| format!("handshake: {e}"))?;
            let frame = Frame::new(FrameType::HelloAck, 0, cbor::encode(&ack));
            self.conn().await?.send(&frame).await?;
        } else if step.get("close").is_some() {
            self.conn = None;
        } else if step.get("accept").is_some() {
            self.conn = Some(accept(self.listener).await?);
        } else if let Some(expected) = step.get("expect_outcome") {
            let outcome = self.outcome().await?;
            if !contains(&outcome, expected) {
                return Err(format!("expected the outcome {expected}, got {outcome}"));
            }
        } else {
            self.conn().await?;
            let (Some(conn), vars) = (self.conn.as_mut(), &mut self.vars) else {
                return Err("no connection".into());
            };
            if !conn.step(step, vars).await? {
                return Err(format!("unknown step {step}"));
            }
        }
        Ok(())
    }
}

/// Runs one guest scenario with `driver`, in `workdir` (its socket goes there).
pub async fn run(driver: &Driver, scenario: &Value, workdir: &Path) -> Result<(), String> {
    let socket: PathBuf = workdir.join("pep.sock");
    let _ = std::fs::remove_file(&socket);
    let listener = UnixListener::bind(&socket).map_err(|e| format!("bind: {e}"))?;
    let (program, args) = driver
        .command
        .split_first()
        .ok_or("the driver has no command")?;
    let mut child = Command::new(program)
        .args(args)
        .env("PEXI_ENDPOINT", format!("unix:{}", socket.display()))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("start {program}: {e}"))?;
    let action = scenario.get("action").cloned().unwrap_or(json!(null));
    let mut stdin = child.stdin.take();
    if let Some(stdin) = stdin.as_mut() {
        stdin
            .write_all(format!("{action}\n").as_bytes())
            .await
            .map_err(|e| format!("driver stdin: {e}"))?;
    }
    let stdout = child.stdout.take().map(BufReader::new);
    // Read all along, so a chatty driver never blocks on a full pipe; shown when the scenario fails.
    let stderr = child.stderr.take().map(|mut err| {
        tokio::spawn(async move {
            let mut text = String::new();
            let _ = err.read_to_string(&mut text).await;
            text
        })
    });
    let mut run = Run {
        listener: &listener,
        conn: None,
        vars: Vars::new(),
        child,
        stdin,
        stdout,
        outcome: None,
    };
    let steps = scenario["steps"].as_array().ok_or("no steps")?;
    let mut result = Ok(());
    for (index, step) in steps.iter().enumerate() {
        let outcome = match substitute(step, &run.vars) {
            Ok(step) => run.step(&step).await,
            Err(e) => Err(e),
        };
        if let Err(what) = outcome {
            result = Err(format!("step {}: {what}", index + 1));
            break;
        }
    }
    // Closing stdin lets the driver exit by itself; one that does not is killed.
    run.stdin = None;
    if tokio::time::timeout(Duration::from_secs(2), run.child.wait())
        .await
        .is_err()
    {
        let _ = run.child.start_kill();
    }
    let _ = run.child.wait().await;
    if let (Err(why), Some(task)) = (&result, stderr) {
        let text = tokio::time::timeout(Duration::from_secs(2), task)
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or_default();
        let lines: Vec<_> = text.trim().lines().collect();
        if !lines.is_empty() {
            let tail = &lines[lines.len().saturating_sub(8)..];
            result = Err(format!("{why}\n    driver stderr: {}", tail.join("\n    ")));
        }
    }
    let _ = std::fs::remove_file(&socket);
    result
}
