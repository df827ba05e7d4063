//! `schemas/` holds one JSON Schema per CBOR payload type, generated from the Rust types. This test fails
//! when the checked-in files differ from what the code generates; `PEXI_BLESS=1 cargo test -p
//! pexi-protocol --test schemas` rewrites them.

mod support;

use pexi_protocol::payload::{
    End, ErrorPayload, GoAway, Hello, HelloAck, HttpResponseHead, MethodCall, NetConnectHead,
    PolicyDecision,
};
use schemars::{generate::SchemaSettings, JsonSchema, Schema};

/// The schema of what is *sent*: a field that is always serialised is required, even where a receiver
/// accepts its absence (`features`, `headers`, `reasons`, `retryable`).
fn schema_for<T: JsonSchema>() -> Schema {
    SchemaSettings::draft2020_12()
        .for_serialize()
        .into_generator()
        .into_root_schema_for::<T>()
}
use support::{check_generated, repo_root};

fn schemas() -> Vec<(&'static str, &'static str, Schema)> {
    vec![
        (
            "hello.schema.json",
            "HELLO payload (frame 0x01)",
            schema_for::<Hello>(),
        ),
        (
            "hello-ack.schema.json",
            "HELLO_ACK payload (frame 0x02)",
            schema_for::<HelloAck>(),
        ),
        (
            "goaway.schema.json",
            "GOAWAY payload (frame 0x06)",
            schema_for::<GoAway>(),
        ),
        (
            "open.schema.json",
            "OPEN payload (frame 0x10): method and its params",
            schema_for::<MethodCall>(),
        ),
        (
            "head.pep.http.request.schema.json",
            "HEAD payload (frame 0x12) of a pep.http.request stream",
            schema_for::<HttpResponseHead>(),
        ),
        (
            "head.pep.net.connect.schema.json",
            "HEAD payload (frame 0x12) of a pep.net.connect stream",
            schema_for::<NetConnectHead>(),
        ),
        (
            "head.pep.policy.check.schema.json",
            "HEAD payload (frame 0x12) of a pep.policy.check stream",
            schema_for::<PolicyDecision>(),
        ),
        (
            "end.schema.json",
            "END payload (frame 0x13) when it carries trailers",
            schema_for::<End>(),
        ),
        (
            "error.schema.json",
            "ERROR payload (frame 0x14)",
            schema_for::<ErrorPayload>(),
        ),
    ]
}

fn render(file: &str, title: &str, schema: Schema) -> String {
    let mut value = schema.to_value();
    let object = value.as_object_mut().expect("schema is an object");
    object.insert(
        "$id".into(),
        format!("https://pexi.invalid/schemas/{file}").into(),
    );
    object.insert("title".into(), title.into());
    serde_json::to_string_pretty(&value).expect("json") + "\n"
}

#[test]
fn checked_in_schemas_match_the_code() {
    let dir = repo_root().join("schemas");
    let mut expected_files = Vec::new();
    for (file, title, schema) in schemas() {
        check_generated(&dir.join(file), &render(file, title, schema));
        expected_files.push(file.to_string());
    }
    // A schema left behind for a type that no longer exists is as wrong as a stale one.
    let mut on_disk: Vec<String> = std::fs::read_dir(&dir)
        .expect("schemas dir")
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|name| name.ends_with(".schema.json"))
        .collect();
    on_disk.sort();
    expected_files.sort();
    assert_eq!(on_disk, expected_files);
}

#[test]
fn schemas_are_valid_json_schema_and_describe_byte_strings() {
    for (file, title, schema) in schemas() {
        let value: serde_json::Value =
            serde_json::from_str(&render(file, title, schema)).expect("json");
        if let Err(err) = jsonschema::meta::validate(&value) {
            panic!("{file} is not a valid JSON Schema: {err}");
        }
    }
    let head: serde_json::Value =
        serde_json::from_str(&render("h", "t", schema_for::<HttpResponseHead>())).expect("json");
    let text = head.to_string();
    assert!(
        text.contains("\"x-cbor-type\":\"bytes\""),
        "header values must be marked as CBOR byte strings"
    );
}

/// The schema a conformance scenario's `send` payload must match, by frame type (a HEAD by its keys).
fn scenario_schema(frame: &serde_json::Value) -> Option<&'static str> {
    let payload = frame.get("payload")?;
    Some(match frame["type"].as_str()? {
        "HELLO" => "hello.schema.json",
        "HELLO_ACK" => "hello-ack.schema.json",
        "GOAWAY" => "goaway.schema.json",
        "OPEN" => "open.schema.json",
        "END" => "end.schema.json",
        "ERROR" => "error.schema.json",
        "HEAD" if payload.get("status").is_some() => "head.pep.http.request.schema.json",
        "HEAD" if payload.get("allow").is_some() => "head.pep.policy.check.schema.json",
        "HEAD" => "head.pep.net.connect.schema.json",
        _ => return None,
    })
}

/// A scenario's whole-string `"$name"` placeholders stand for captured stream ids and nonces (unsigned
/// integers); `${name}` inside a string for text (the upstream's `http://host:port`).
fn with_placeholders_filled(value: &serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    match value {
        Value::String(s) if s.starts_with('$') && !s.starts_with("${") => Value::from(1),
        Value::String(s) if s.contains("${") => {
            let mut out = String::new();
            let mut rest = s.as_str();
            while let (Some(start), Some(end)) = (rest.find("${"), rest.find('}')) {
                out.push_str(&rest[..start]);
                out.push_str("http://upstream.example:8080");
                rest = &rest[end + 1..];
            }
            out.push_str(rest);
            Value::from(out)
        }
        Value::Array(items) => Value::Array(items.iter().map(with_placeholders_filled).collect()),
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| (k.clone(), with_placeholders_filled(v)))
                .collect(),
        ),
        other => other.clone(),
    }
}

#[test]
fn every_conformance_scenario_payload_matches_its_schema() {
    let mut checked = 0;
    let mut failures = Vec::new();
    for side in ["host", "guest"] {
        let dir = repo_root().join("protocol/conformance").join(side);
        let mut files: Vec<_> = std::fs::read_dir(&dir)
            .expect("scenario directory")
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "json"))
            .collect();
        files.sort();
        assert!(!files.is_empty(), "no scenarios in {}", dir.display());
        for file in files {
            let scenario: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(&file).expect("read"))
                    .unwrap_or_else(|e| panic!("{}: {e}", file.display()));
            for step in scenario["steps"].as_array().expect("steps") {
                let Some(frame) = step.get("send") else {
                    continue;
                };
                let Some(schema_file) = scenario_schema(frame) else {
                    continue;
                };
                let schema: serde_json::Value = serde_json::from_str(
                    &std::fs::read_to_string(repo_root().join("schemas").join(schema_file))
                        .expect("schema"),
                )
                .expect("schema json");
                let payload = with_placeholders_filled(&frame["payload"]);
                // A payload sent to test a refusal says why it is invalid; the schema must reject it too.
                match (
                    jsonschema::validate(&schema, &payload),
                    frame.get("invalid"),
                ) {
                    (Err(err), None) => failures.push(format!("{} {frame}: {err}", file.display())),
                    (Ok(()), Some(why)) => failures.push(format!(
                        "{} {frame}: {schema_file} accepts it, but it is invalid ({why})",
                        file.display()
                    )),
                    _ => {}
                }
                checked += 1;
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(checked >= 80, "only {checked} scenario payloads checked");
}
