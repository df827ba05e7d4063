//! The tokio side of the protocol (feature `tokio`).
//!
//! - [`driver`]: the connection driver every component runs ([`drive`] with a role's [`Handler`]): reader
//!   and writer tasks, bounded queues, retry and keepalive timers, and per-stream handles ([`StreamIn`],
//!   [`StreamOut`]) so that request tasks never touch the session.
//! - [`Connection`]: a single-task loop for tools and tests that script a peer frame by frame (commands on
//!   [`Connection::session_mut`] between calls to [`Connection::next_event`]).

mod connection;
pub mod driver;
mod streams;

pub use connection::{Connection, RETRY_AFTER};
pub use driver::{drive, Ended, Handler, Link, Options};
pub use streams::{Hold, Inbound, Reserved, SendError, StreamIn, StreamOut};
