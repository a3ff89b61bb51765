//! The subscriber of one host (the seed's *Conf-Local*).
//!
//! It follows its services' updates on the datacenter's stream ([`run`]), builds each
//! new tree beside the current one and switches to it atomically after verifying its
//! git tree id ([`materialize`], [`tree_hash`]), remembers where it stands on local disk
//! ([`state`]), tells the host's processes ([`exec`], when: [`schedule`]) and serves what it applied as JSON
//! on localhost ([`serve`]). Applications watch their configuration with [`client`].
//!
//! Which services it follows, and when one leaves the host, is [`selection`]; one
//! subscriber per state directory, [`lock`]; what it does and says while NATS or the
//! datacenter's relay is not there, [`waiting`].

pub mod beneath;
pub mod bus;
pub mod client;
pub mod exec;
pub mod live;
pub mod lock;
pub mod materialize;
pub mod perms;
pub mod run;
pub mod schedule;
pub mod selection;
pub mod serve;
pub mod state;
pub mod tree_hash;
pub mod waiting;

pub use run::{run, verify, Config, SubscriberError};
pub use selection::Selection;
