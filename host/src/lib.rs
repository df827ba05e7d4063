//! # pexi-host
//!
//! The host Policy Enforcement Point: the only component of pexi with network access. It serves the pexi
//! protocol (`pexi-protocol`) to guests over Unix sockets, QEMU chardevs and vsock, and performs
//! `pep.http.request` only after a deny-by-default Rego decision, logging every decision before its effect.
//!
//! Data flows transport → session (`serve`, a handler of the protocol's driver) → pipeline → policy
//! ([`policy`]) → network → audit ([`audit`]); [`config`] and [`cli`] sit around them. docs/architecture.md
//! draws the layers; `tests/layers.rs` holds the modules to them.
//!
//! ## What an embedder uses
//!
//! - [`server::Server`]: start the PEP in this process on a [`config::Config`] (the embedded default, or a
//!   file laid over it) and stop it; this is what `pexi serve` runs and what the SDKs' tests start.
//! - [`audit`]: open, write, verify and seal the audit log ([`audit::AuditLog`], [`audit::verify`],
//!   [`audit::seal`]) and the record types ([`audit::records`]), for tools that read or check logs.
//! - [`policy`]: load a bundle and decide ([`policy::PolicyEngine`]), for tools that evaluate policies.
//! - [`control::client`]: talk to a running PEP's control socket (questions, answers, the dashboard's
//!   address), as `pexi approve` and `pexi ui` do.
//! - [`cli::main`]: the `pexi` command.
//!
//! Everything else (transports, sessions, the pipeline, secrets, the VM runner) is internal and may change
//! without notice.

mod activity;
mod approvals;
pub mod audit;
mod bundle_sync;
pub mod cli;
pub mod config;
pub mod control;
mod dirs;
mod export;
mod limits;
mod metrics;
mod pipeline;
pub mod policy;
mod reload;
mod secrets;
mod serve;
pub mod server;
mod stream;
mod transport;
mod vm;
