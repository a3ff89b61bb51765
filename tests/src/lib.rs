//! Test harness for confcast's integration tests: a real `nats-server` on an ephemeral
//! port with its own store, a real bare master repository with the hooks installed and
//! pushed to with real `git push`, and the real `relay` and `subscriber` binaries.
//!
//! Binaries are taken from the cargo target directory this test runs from; run
//! `cargo build --workspace --bins` first (the project's test command does).
//!
//! One module per thing a test runs or reads:
//!
//! | module | owns |
//! | --- | --- |
//! | `datacenter` | [`Datacenter`]: bus, master, relay and host in one call, the set-up most tests start from |
//! | `nats` | [`NatsServer`]: the `nats-server` process |
//! | `bus` | what is on the bus, as typed values: error events, host status, the index; forged messages |
//! | `master` | [`Master`]: the bare master repository with hooks, and pushes to it |
//! | `git` | running git, and a tree's listing as git records it |
//! | `git_daemon`, [`git_http`] | the master over the network |
//! | `relay`, `subscriber` | [`Relay`] and [`Subscriber`] (a host): the processes, their logs, exec and trees |
//! | `procs` | where the binaries are; stopping, killing and timing processes |
//! | `fault` | [`FaultProxy`] and the seeded schedule of fault tests |
//! | `net`, `notify`, `poll` | free ports and HTTP; systemd's `NOTIFY_SOCKET`; [`wait_for`] |
//! | [`topology`] | the production NATS topology: a hub cluster and a leaf server per datacenter |
//! | [`consul`] | a Consul K/V double |

pub use tempfile::TempDir;

pub mod consul;
pub mod git_http;
pub mod staged;
pub mod store;
pub mod topology;

mod bus;
mod datacenter;
mod fault;
mod git;
mod git_daemon;
mod master;
mod nats;
mod net;
mod notify;
mod poll;
mod procs;
mod relay;
mod subscriber;

pub use bus::{
    block_on, commit_events, forged_update, host_status, index_value, latest_error, publish_raw, rollout_state,
    wait_error, wait_rollout,
};
pub use datacenter::{Datacenter, DatacenterSetup};
pub use fault::{count_from_env, Fault, FaultProxy, Rng};
pub use git::{disk_listing, git, Listing};
pub use git_daemon::GitDaemon;
pub use master::{Master, Pushed};
pub use nats::NatsServer;
pub use net::{free_port, free_ports, get_monitoring, http_get};
pub use notify::NotifySocket;
pub use poll::wait_for;
pub use procs::{bin, run, run_within, Ran};
pub use relay::Relay;
pub use subscriber::Subscriber;
