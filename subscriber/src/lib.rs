//! The subscriber of one host (the seed's *Conf-Local*).
//!
//! It follows its services' updates on the datacenter's stream ([`host`], with what
//! it needs in [`config`]), applies each ([`apply`]): builds the new tree beside the
//! current one and switches to it atomically after verifying its git tree id
//! ([`materialize`], [`tree_hash`]), once `--check-cmd` passed it ([`checks`]), and
//! remembers where it stands on local disk ([`position`]). It tells the host's processes
//! ([`exec`]; when: [`schedule`], from the host: [`execs`]) and judges their health
//! ([`checks`]), each command run alike ([`command`]), re-hashes what it applied
//! ([`integrity`]), reports to its datacenter ([`report`]) and serves what it applied as
//! JSON on localhost ([`api`], sharing [`live`]). Applications watch their configuration
//! with [`client`].
//!
//! Which services it follows, and when one leaves the host, is [`selection`] (with
//! `--host`, read from the datacenter's [`inventory`]); what it reads from the bus
//! besides its stream, [`bus`]; one subscriber per state directory, [`lock`]; what it
//! does and says while the datacenter's relay is not there, [`waiting`]; a commit rolled
//! out in waves, taken only once its wave is released, [`rollout`].

pub mod api;
pub mod apply;
pub mod beneath;
pub mod bus;
pub mod checks;
pub mod client;
pub mod command;
pub mod config;
pub mod exec;
pub mod execs;
pub mod host;
pub mod integrity;
pub mod inventory;
pub mod live;
pub mod lock;
pub mod materialize;
pub mod perms;
pub mod position;
pub mod report;
pub mod rollout;
pub mod schedule;
pub mod selection;
pub mod tree_hash;
pub mod tree_objects;
pub mod waiting;

pub use config::Config;
pub use host::{run, SubscriberError};
pub use integrity::verify;
pub use selection::Selection;
