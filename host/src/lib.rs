//! # pexi-host
//!
//! The host Policy Enforcement Point: the only component of pexi with network access. It serves the pexi
//! protocol (`pexi-protocol`) to guests over Unix sockets, QEMU chardevs and vsock, and performs
//! `pep.http.request` only after a deny-by-default Rego decision, logging every decision before its effect.
//!
//! Data flows transport ([`transport`]) → session ([`serve`]) → pipeline ([`pipeline`]) → policy
//! ([`policy`]) → network ([`pipeline::fetch`]) → audit ([`audit`]); [`config`] and [`cli`] sit around them.

pub mod audit;
pub mod cli;
pub mod config;
pub mod dirs;
pub mod limits;
pub mod pipeline;
pub mod policy;
pub mod reload;
pub mod secrets;
pub mod serve;
pub mod server;
pub mod stream;
pub mod transport;
pub mod vm;
