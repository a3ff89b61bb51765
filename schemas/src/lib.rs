//! Everything confcast puts on the wire or reads from the master repository.
//!
//! This crate sits underneath every other confcast crate and depends on none of them:
//!
//! * [`subject`]: stream, subject, bucket and key names, with a reversible encoding of
//!   arbitrary names (datacenters, services, refs) into NATS-safe tokens;
//! * [`message`]: the versioned MessagePack messages (`CommitEvent`, `ServiceUpdate`,
//!   `ErrorEvent`, `HostStatus`, `Inventory`);
//! * [`document`]: the control documents `datacenter.json` and
//!   `datacenter-configuration.json`, their validation and the refs they point at;
//! * [`connect`]: the NATS credential and TLS flags every binary shares;
//! * [`sign`]: ed25519 signatures of the relay's messages, checked by hosts;
//! * [`process`]: readiness for systemd and shutdown on signals;
//! * [`path`]: the checks that keep a service tree from writing outside its directory.

pub mod connect;
pub mod document;
pub mod message;
pub mod path;
pub mod process;
pub mod sign;
pub mod subject;

pub use document::{DatacenterConfiguration, DatacenterDoc, DocumentError, Kind, Pin};
pub use message::{
    decode, encode, ChangeKind, CommitEvent, DecodeError, Entry, ErrorEvent, FileMode, HostStatus, Inventory,
    ServiceHead, ServiceUpdate, WIRE_VERSION,
};
