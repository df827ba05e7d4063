//! `config.toml` is the project's single source of truth; its `[protocol]` section must say what the code
//! does.

mod support;

use pexi_protocol::frame::{DEFAULT_MAX_PAYLOAD, FRAME_FORMAT_VERSION, HARD_MAX_PAYLOAD};
use pexi_protocol::session::{DEFAULT_CONNECTION_WINDOW, DEFAULT_STREAM_WINDOW, PROTOCOL_VERSION};
use pexi_protocol::transport::{VIRTIO_SERIAL_PORT_NAME, VSOCK_PORT};

#[test]
fn protocol_section_matches_the_code() {
    let text =
        std::fs::read_to_string(support::repo_root().join("config.toml")).expect("config.toml");
    let config: toml::Table = text.parse().expect("config.toml parses");
    let protocol = config["protocol"].as_table().expect("[protocol]");
    let int = |key: &str| {
        protocol[key]
            .as_integer()
            .unwrap_or_else(|| panic!("{key} is an integer"))
    };
    assert_eq!(int("frame_format_version"), i64::from(FRAME_FORMAT_VERSION));
    assert_eq!(
        protocol["protocol_versions"],
        toml::Value::Array(vec![i64::from(PROTOCOL_VERSION).into()])
    );
    assert_eq!(
        protocol["virtio_serial_port"].as_str(),
        Some(VIRTIO_SERIAL_PORT_NAME)
    );
    assert_eq!(int("vsock_port"), i64::from(VSOCK_PORT));
    assert_eq!(int("default_max_frame"), i64::from(DEFAULT_MAX_PAYLOAD));
    assert_eq!(int("hard_max_frame"), i64::from(HARD_MAX_PAYLOAD));
    assert_eq!(
        int("default_stream_window"),
        i64::from(DEFAULT_STREAM_WINDOW)
    );
    assert_eq!(
        int("default_connection_window"),
        i64::from(DEFAULT_CONNECTION_WINDOW)
    );
}
