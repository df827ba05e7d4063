//! # pexi-guest
//!
//! Guest-side SDK for pexi. Inside a VM with no IP network, HTTP goes to the host Policy Enforcement Point
//! over virtio-serial, vsock or a Unix socket; the PEP decides with policy, performs the request and
//! streams the response back. This crate is that client: one [`Client`] multiplexes any number of
//! concurrent requests over one protocol session, with flow control, cancellation on drop, keepalive and
//! recovery when the host restarts.
//!
#![doc = include_str!("../README.md")]
#![warn(missing_docs)]

pub mod blocking;
mod client;
pub mod endpoint;
mod error;

pub use client::{
    Client, Options, RawCall, RawEvent, RequestBuilder, Response, Tunnel, UpgradeSender,
};
pub use endpoint::{Connector, Endpoint};
pub use error::Error;
pub use pexi_protocol::payload::{PolicyDecision, RedirectMode};
