//! # pexi-protocol
//!
//! The wire protocol between a guest with no IP network and the host Policy Enforcement Point. The
//! normative description is `docs/protocol.md`; this crate is its reference implementation.
//!
//! Layers, bottom up:
//!
//! - [`frame`]: the 24-byte header with its two CRC-32C checksums, and a bounded push decoder that finds the
//!   next valid frame after garbage.
//! - [`payload`]: the typed, deterministic-CBOR payloads (HELLO, OPEN parameters, ERROR, ...), with JSON
//!   Schemas derived from the same types.
//! - [`session`]: the sans-IO state machine shared by guest and host: handshake, streams, flow control,
//!   resynchronisation. Bytes in, events and bytes out; no clock, no socket.
//! - [`io`] (feature `tokio`, on by default): a thin async loop that moves bytes between a
//!   [`session::Session`] and any `AsyncRead + AsyncWrite` transport.
//!
//! The README's example runs as a doc test, so it stays true:
#![doc = include_str!("../README.md")]
//!
//! ```
//! use pexi_protocol::payload::{HttpRequest, MethodCall};
//! use pexi_protocol::session::{Config, Event, Session};
//! use pexi_protocol::payload::Limits;
//!
//! let mut guest = Session::client(Config::new("example-guest", "0.1.0"));
//! let mut host = Session::server(Config::new("example-host", "0.1.0"), Limits::default());
//! // Move bytes both ways until both sides are quiet: this is all a transport adapter does.
//! fn pump(from: &mut Session, to: &mut Session) {
//!     while let Some(frame) = from.poll_transmit() {
//!         to.receive(&frame.encode());
//!     }
//! }
//! pump(&mut guest, &mut host);
//! pump(&mut host, &mut guest);
//! assert!(matches!(guest.poll_event(), Some(Event::Established(_))));
//!
//! let stream = guest
//!     .open(MethodCall::PolicyCheck(HttpRequest::new("GET", "https://example.com/")))
//!     .unwrap();
//! guest.send_end(stream, Vec::new()).unwrap();
//! pump(&mut guest, &mut host);
//! assert!(matches!(host.poll_event(), Some(Event::Established(_))));
//! assert!(matches!(host.poll_event(), Some(Event::Opened { stream_id: 1, .. })));
//! ```

pub mod frame;
#[cfg(feature = "tokio")]
pub mod io;
pub mod payload;
pub mod session;

/// Transport names fixed by the spec.
pub mod transport {
    /// The virtio-serial port name the guest opens (`/dev/virtio-ports/org.pexi.pep.0`).
    pub const VIRTIO_SERIAL_PORT_NAME: &str = "org.pexi.pep.0";
    /// The vsock port the host listens on (guest connects to CID 2, this port).
    pub const VSOCK_PORT: u32 = 4041;
}
