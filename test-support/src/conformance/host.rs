//! The host runner: plays a guest against a live host over one fresh connection per scenario
//! (`protocol/conformance/host/`); every frame from the host is also held to the rules no scenario spells
//! out (credit, max frame: [`Conn`]).

use std::path::Path;

use pexi_protocol::frame::{Frame, FrameType};
use pexi_protocol::payload::{cbor, Hello, Implementation, ReceiveParams};
use serde_json::Value;
use tokio::net::UnixStream;

use super::{as_json, describe, reference_receive, substitute, Conn, Vars, EXPECT_WITHIN};

/// The nonce of the runner's HELLO in a `handshake` step.
pub const HANDSHAKE_NONCE: u64 = 0x5eed;

/// What a scenario may do to the host beyond frames: `{"signal": "SIGTERM"}` asks the test that started it.
pub trait HostControl {
    fn signal(&mut self, name: &str) -> Result<(), String>;
}

/// Runs one host scenario against the host listening at `socket`. `vars` are values the test provides
/// (`$upstream`); `control` carries out `signal` steps.
pub async fn run(
    socket: &Path,
    scenario: &Value,
    vars: &Vars,
    control: &mut dyn HostControl,
) -> Result<(), String> {
    let stream = UnixStream::connect(socket)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let mut conn = Conn::new(stream, "host");
    let mut vars = vars.clone();
    let steps = scenario["steps"].as_array().ok_or("no steps")?;
    for (index, step) in steps.iter().enumerate() {
        let at = |what: String| format!("step {}: {what}", index + 1);
        let step = substitute(step, &vars).map_err(at)?;
        if let Some(spec) = step.get("handshake") {
            handshake(&mut conn, spec, &mut vars).await.map_err(at)?;
        } else if let Some(name) = step["signal"].as_str() {
            control.signal(name).map_err(at)?;
        } else if !conn.step(&step, &mut vars).await.map_err(at)? {
            return Err(at(format!("unknown step {step}")));
        }
    }
    Ok(())
}

/// HELLO (version 1, nonce 0x5eed, the reference defaults for `receive` unless `spec.receive` overrides
/// them), then a HELLO_ACK echoing the nonce; its `limits` are captured as `$max_concurrent_streams`.
async fn handshake(conn: &mut Conn, spec: &Value, vars: &mut Vars) -> Result<(), String> {
    let mut receive = serde_json::to_value(reference_receive()).map_err(|e| e.to_string())?;
    if let Some(overrides) = spec["receive"].as_object() {
        for (k, v) in overrides {
            receive[k] = v.clone();
        }
    }
    let receive: ReceiveParams =
        serde_json::from_value(receive).map_err(|e| format!("handshake receive: {e}"))?;
    let hello = Hello {
        versions: vec![1],
        nonce: HANDSHAKE_NONCE,
        implementation: Implementation {
            name: "conformance".into(),
            version: "1".into(),
        },
        features: Vec::new(),
        receive,
    };
    conn.send(&Frame::new(FrameType::Hello, 0, cbor::encode(&hello)))
        .await?;
    match conn.next(EXPECT_WITHIN, |_| false).await? {
        Some(f)
            if f.frame_type == FrameType::HelloAck && as_json(&f)["nonce"] == HANDSHAKE_NONCE =>
        {
            let limit = &as_json(&f)["limits"]["max_concurrent_streams"];
            vars.insert("max_concurrent_streams".into(), limit.clone());
            Ok(())
        }
        other => Err(format!(
            "handshake answered with {:?}",
            other.as_ref().map(describe)
        )),
    }
}
