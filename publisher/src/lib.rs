//! Turning ref updates of the master into `CommitEvent`s on JetStream, and following
//! where they lead.
//!
//! The post-receive hook (crate `confcast-hooks`) builds the events and calls
//! [`announce`]: it publishes each event with a content-derived dedup id and awaits the
//! ack, all under one short deadline. When the bus cannot be reached in time the events
//! go to an on-disk [`spool`] instead, so a push never hangs or fails because NATS is
//! down; the next hook run, or `publisher drain`, publishes the spool in order.
//!
//! * [`settings`]: the `confcast.*` git config of a master, for the hooks and the
//!   commands alike;
//! * [`announce`], [`bus`], [`spool`]: publishing commit events, or keeping them;
//! * [`rollout`]: how far a change has reached the hosts, and following it live;
//! * the commands: [`install`] (`install-hooks`), [`backfill`], [`keygen`], [`status`]
//!   with its [`screen`], [`control`] (`rollout pause|resume|abort|promote`),
//!   [`dashboard`] (a live web page of the fleet).

pub mod announce;
pub mod backfill;
pub mod bus;
pub mod control;
pub mod dashboard;
pub mod git;
pub mod install;
pub mod keygen;
pub mod rollout;
pub mod screen;
pub mod settings;
pub mod spool;
pub mod status;

pub use announce::{announce, Outcome};
pub use bus::{ensure_commit_stream, publish_event, BusError};
pub use confcast_schemas::connect::NatsAuth;
pub use settings::{config_keys, BusTarget, Settings};
pub use spool::{drain, Spool, SpoolError};
