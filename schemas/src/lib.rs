//! Everything confcast puts on the wire or reads from the master repository.
//!
//! This crate sits underneath every other confcast crate and depends on none of them:
//!
//! * [`subject`]: stream, subject, bucket and key names, with a reversible encoding of
//!   arbitrary names (datacenters, services, refs) into NATS-safe tokens;
//! * [`message`]: the versioned MessagePack messages (`CommitEvent`, `ServiceUpdate`,
//!   `ErrorEvent`, `HostStatus`, `Inventory`);
//! * [`kind`]: what a tree configures and the one name of a tree, [`ServiceId`];
//! * [`refs`]: every ref namespace of the master repository;
//! * [`streams`]: every stream, consumer and bucket confcast creates, configured;
//! * [`document`]: the control documents `datacenter.json` and
//!   `datacenter-configuration.json`, their validation and the refs they point at;
//! * [`connect`]: the NATS credential and TLS flags every binary shares, and connecting;
//! * [`sign`]: ed25519 signatures of the relay's messages, checked by hosts;
//! * [`process`]: readiness for systemd, shutdown on signals, logging, exit codes;
//! * [`retry`]: backoff, and failure lines that do not flood the log;
//! * [`path`]: the checks that keep a service tree from writing outside its directory.

pub mod connect;
pub mod document;
mod health;
pub mod kind;
pub mod message;
pub mod path;
pub mod process;
pub mod refs;
pub mod retry;
pub mod rollout;
pub mod sign;
pub mod streams;
pub mod subject;

pub use document::{DatacenterConfiguration, DatacenterDoc, DocumentError, Pin};
pub use kind::{Kind, ServiceId};
pub use message::{
    decode, encode, ChangeKind, CommitEvent, DecodeError, Entry, ErrorEvent, FileMode, HostStatus, Inventory,
    ServiceHead, ServiceUpdate, READ_VERSION, SNAPSHOT_BY_OBJECTS, WIRE_VERSION,
};
