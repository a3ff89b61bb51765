//! Rollout convergence: how far a change has reached the hosts of each datacenter.
//!
//! Two things on the bus say where a rollout stands. Each datacenter's relay records the
//! commit it published for every service (its *head*, in the state stream
//! `CONFCAST_DC_<dc>_STATE`), and every host reports, per service it follows, the commit
//! it has in place and whether applying it and running `--exec` went well (the status
//! stream `CONFCAST_DC_<dc>_STATUS`, latest report per host and service).
//!
//! * [`target`]: what to look for ([`Target`]: a commit, a ref, a ref just pushed);
//! * [`progress`]: the computation, plain and without I/O: given what was seen of both
//!   ([`Observed`]) it tells per datacenter which hosts are at the target with a good
//!   status, which failed and which are still pending;
//! * [`summary`]: the one-line summary per datacenter that `publisher status` and the
//!   post-receive hook print;
//! * [`pushed`]: what every ref was last pushed to, from the commit stream;
//! * [`watch`]: follows both streams live and recomputes on every change until the
//!   rollout is complete or a deadline passes.
//!
//! The hosts of a service are the hosts that report a status for it in that datacenter:
//! a host that never reported is not counted, and a host that was removed is counted
//! until its last report ages out of the status stream (7 days).

pub mod progress;
pub mod pushed;
pub mod summary;
pub mod target;
pub mod watch;

pub use progress::{
    progress, progress_pushed, DcProgress, HostProgress, HostState, Observed, Rollout, ServiceProgress, Verdict,
};
pub use pushed::{pushed, Pushed};
pub use target::short;
pub use target::Target;
pub use watch::{datacenters, datacenters_to_follow, watch, watch_pushed, WatchError};

#[cfg(test)]
mod tests;
