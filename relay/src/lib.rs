//! The relay of one datacenter (the seed's *Conf-Slave*).
//!
//! It consumes the master's commit events, keeps a bare [`mirror`] of only the refs its
//! datacenter depends on, [`resolve`]s what the datacenter runs, and for every service
//! whose resolved commit changed publishes a `ServiceUpdate` — the [`diff`] from the
//! commit it last published — on the datacenter's stream ([`publish`]), then writes the
//! configuration index (in NATS K/V, and in Consul with [`consul`]). The loop itself
//! lives in [`run`]; what it waits out (the bus, the master), and how it says so, in
//! [`retry`].

pub mod consul;
pub mod diff;
pub mod lease;
pub mod metrics;
pub mod mirror;
pub mod publish;
pub mod resolve;
pub mod retry;
pub mod run;

pub use metrics::Metrics;
pub use publish::StreamLayout;
pub use run::{run, Config};
