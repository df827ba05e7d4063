//! `schemas/audit/<kind>.schema.json` are generated from the record types (`host/src/audit/records.rs`):
//! this test fails when the checked-in files differ from what the code generates (`PEXI_BLESS=1 cargo test
//! -p pexi-host --test audit_schemas` rewrites them), and checks every example line in docs/audit.md against
//! the schema of its kind.

mod support;

use std::collections::BTreeMap;

use pexi_host::audit::records;
use serde_json::Value;

fn blessing() -> bool {
    std::env::var_os("PEXI_BLESS").is_some_and(|v| v == "1")
}

/// Every kind's schema as checked in: the type's schema with `kind` fixed and required.
fn rendered() -> BTreeMap<&'static str, Value> {
    records::schemas()
        .into_iter()
        .map(|(kind, schema)| {
            let mut value = schema.to_value();
            let object = value.as_object_mut().expect("schema is an object");
            object.insert(
                "$id".into(),
                format!("https://pexi.invalid/schemas/audit/{kind}.schema.json").into(),
            );
            object.insert(
                "title".into(),
                format!("pexi audit record of kind {kind} (one line of the audit log, format version 1)")
                    .into(),
            );
            object["properties"]["kind"] = serde_json::json!({"const": kind});
            (kind, value)
        })
        .collect()
}

/// The schema of each kind, as a validator.
fn validators() -> BTreeMap<String, jsonschema::Validator> {
    rendered()
        .into_iter()
        .map(|(kind, schema)| {
            (
                kind.to_string(),
                jsonschema::validator_for(&schema).expect("valid schema"),
            )
        })
        .collect()
}

#[test]
fn checked_in_audit_schemas_match_the_record_types() {
    let dir = support::repo_root().join("schemas/audit");
    for (kind, schema) in rendered() {
        let path = dir.join(format!("{kind}.schema.json"));
        let text = serde_json::to_string_pretty(&schema).expect("json") + "\n";
        if blessing() {
            std::fs::write(&path, text).expect("write");
            continue;
        }
        let checked_in = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            checked_in == text,
            "{} differs from what the record types generate; run `PEXI_BLESS=1 cargo test -p pexi-host \
             --test audit_schemas` and review the diff",
            path.display()
        );
    }
}

#[test]
fn the_examples_in_docs_audit_md_match_their_schemas() {
    let docs = std::fs::read_to_string(support::repo_root().join("docs/audit.md")).expect("docs");
    let validators = validators();
    let mut seen = std::collections::BTreeSet::new();
    // Each example is a ```json block right after a line `<!-- example record -->`.
    let mut rest = docs.as_str();
    while let Some(at) = rest.find("<!-- example record -->") {
        rest = &rest[at..];
        let start = rest
            .find("```json\n")
            .expect("a json block after the marker")
            + 8;
        let end = start + rest[start..].find("```").expect("closing fence");
        let text = &rest[start..end];
        let record: Value =
            serde_json::from_str(text).unwrap_or_else(|err| panic!("{err}: {text}"));
        let kind = record["kind"].as_str().expect("kind").to_string();
        let validator = validators
            .get(&kind)
            .unwrap_or_else(|| panic!("no schema for kind {kind}"));
        if let Err(err) = validator.validate(&record) {
            panic!("docs/audit.md example of {kind}: {err}");
        }
        seen.insert(kind);
        rest = &rest[end..];
    }
    for (kind, _) in records::schemas() {
        assert!(
            seen.contains(kind),
            "docs/audit.md has no example record of kind {kind}"
        );
    }
}
