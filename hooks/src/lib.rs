//! The git side of a confcast master: what the `post-receive` and `pre-receive` hooks
//! read from git.
//!
//! Both hooks get `<old> <new> <ref>` lines on stdin ([`update`]). `post-receive` turns
//! each into a `CommitEvent` with the paths it changed ([`announce`]), hands them to
//! `confcast_publisher::announce`, and may wait for the hosts to converge ([`rollout`]);
//! `pre-receive` refuses ([`Rejection`]) a push whose control documents do not parse
//! ([`documents`]) or name what the push would leave missing, or that deletes what a
//! datacenter pins ([`cross_refs`], with the [`push_options`] that override it), or
//! whose configuration trees could never be delivered ([`containment`]), before any ref
//! moves.

pub mod after_push;
pub mod announce;
pub mod containment;
pub mod cross_refs;
pub mod documents;
pub mod push_options;
pub mod rejection;
pub mod rollout;
pub mod suggest;
pub mod update;

pub use announce::{announcement_lines, commit_events, settings};
pub use documents::{control_file, validate};
pub use rejection::Rejection;
pub use rollout::wait_rollout;
pub use update::{parse_updates, RefUpdate};
