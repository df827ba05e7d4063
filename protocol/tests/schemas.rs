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
