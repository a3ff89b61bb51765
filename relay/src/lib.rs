//! The relay of one datacenter (the seed's *Conf-Slave*).
//!
//! It consumes the master's commit events, keeps a bare [`mirror`] of only the refs its
//! datacenter depends on, [`resolve`]s what the datacenter runs, and for every service
//! whose resolved commit changed publishes a `ServiceUpdate` — the [`diff`] from the
//! commit it last published — on the datacenter's streams, then writes the
//! configuration index (in NATS K/V, and in Consul with [`consul`]).
//!
//! Where each part lives:
//!
//! * lifecycle — [`config`] (what a relay is given), `server` (state-directory lock,
//!   connect, the [`lease`] loop: [`run`]), [`metrics`] (`/metrics`, `/healthz`,
//!   readiness);
//! * per event — `events` (the commit consumer, batching, ack/nak), `sync` (fetch,
//!   resolve, decide what to publish), `prepare` (an update and snapshot from the
//!   mirror), `publish` (the messages, in order, with their dedup ids), [`bus`] (the
//!   streams, the blob store, the index bucket);
//! * pure logic — [`resolve`], [`diff`];
//! * the master and Consul — [`mirror`], [`consul`].
//!
//! [`error`] holds why the relay stops, why a sync is retried, and what fails on the
//! bus.

pub mod bus;
mod cause;
pub mod config;
pub mod consul;
pub mod diff;
pub mod error;
mod events;
pub mod lease;
pub mod metrics;
pub mod mirror;
mod objects;
mod prepare;
mod publish;
mod reclaim;
pub mod resolve;
mod rollout;
mod server;
mod sync;

pub use config::{Config, StreamLayout};
pub use error::{BusError, RelayError};
pub use metrics::Metrics;
pub use rollout::Peers;
pub use server::run;
