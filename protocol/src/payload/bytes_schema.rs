//! How CBOR byte strings appear in the JSON Schemas.
//!
//! JSON has no byte strings, so the schemas describe a CBOR byte string (major type 2) as a JSON string
//! holding its base64 (RFC 4648 §4, padded) encoding, marked with `contentEncoding` and with the extension
//! keyword `x-cbor-type: "bytes"` so that a validator working on CBOR can tell the two apart. The mapping is
//! documented in `docs/protocol.md` and used by the vector tests.

use schemars::{json_schema, Schema, SchemaGenerator};

pub fn byte_string(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "string",
        "contentEncoding": "base64",
        "x-cbor-type": "bytes"
    })
}
