//! The messages confcast publishes, encoded as MessagePack maps (`to_vec_named`) so
//! that a message can gain fields without breaking older readers.
//!
//! Every message carries `v`, the wire version. A reader refuses a message whose `v`
//! is newer than [`WIRE_VERSION`]: a field it does not know may change the meaning.
//! Which message a payload holds is told by its subject (see [`crate::subject`]).

use std::collections::BTreeMap;

use serde::{de::DeserializeOwned, Deserialize, Serialize};
use serde_bytes::ByteBuf;

use crate::document::{HostInventory, Kind};
use crate::kind::ServiceId;

pub use crate::health::{Health, HealthState};

/// Version of the wire format of the messages this build writes, except snapshots.
pub const WIRE_VERSION: u16 = 1;

/// Version of a snapshot that names its tree and leaves the contents to the service's
/// objects on the state stream ([`crate::subject::object_subject`]): its `entries` are
/// empty. A reader of version 1 would take that for an empty tree, so such a snapshot
/// is marked 2 and older hosts refuse it instead.
pub const SNAPSHOT_BY_OBJECTS: u16 = 2;

/// The newest wire version this build reads.
pub const READ_VERSION: u16 = SNAPSHOT_BY_OBJECTS;

/// Implemented by every wire message, so [`decode`] can check its version.
pub trait Versioned {
    /// The message's `v` field.
    fn version(&self) -> u16;
}

macro_rules! versioned {
    ($($t:ty),*) => { $(impl Versioned for $t { fn version(&self) -> u16 { self.v } })* };
}
versioned!(CommitEvent, ServiceUpdate, ServiceHead, Inventory, ErrorEvent, HostStatus);

/// Why a payload could not be read.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// Not MessagePack of the expected shape.
    #[error("malformed message: {0}")]
    Malformed(#[from] rmp_serde::decode::Error),
    /// Written by a newer confcast.
    #[error("message has wire version {found}, this build reads up to {READ_VERSION}")]
    TooNew {
        /// The message's version.
        found: u16,
    },
}

/// Encodes a message as a MessagePack map.
pub fn encode<T: Serialize>(message: &T) -> Vec<u8> {
    rmp_serde::to_vec_named(message).expect("confcast messages always serialize")
}

/// Decodes and version-checks a message.
pub fn decode<T: DeserializeOwned + Versioned>(bytes: &[u8]) -> Result<T, DecodeError> {
    let message: T = rmp_serde::from_slice(bytes)?;
    match message.version() {
        v if v > READ_VERSION => Err(DecodeError::TooNew { found: v }),
        _ => Ok(message),
    }
}

/// One ref update of the master, published by its post-receive hook.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommitEvent {
    /// Wire version.
    pub v: u16,
    /// Name of the master repository (`confcast.repo` in its git config).
    pub repo: String,
    /// Full ref name, e.g. `refs/heads/services/service0/master`.
    pub ref_name: String,
    /// Previous object id, `None` for a created ref.
    pub old: Option<String>,
    /// New object id, `None` for a deleted ref.
    pub new: Option<String>,
    /// Paths changed between the old and new trees (capped, see `paths_truncated`).
    pub paths: Vec<String>,
    /// True when `paths` was cut short.
    pub paths_truncated: bool,
    /// When the hook saw the push, in milliseconds since the Unix epoch.
    pub pushed_at_ms: u64,
    /// True for events re-announced by `publisher backfill` rather than made by a push.
    #[serde(default)]
    pub backfill: bool,
}

impl CommitEvent {
    /// The JetStream dedup id: the same ref update always gets the same id, so a hook
    /// retried after a lost ack, or a drained spool, is stored once. A backfill is a new
    /// announcement of the same state, identified by when it was made.
    pub fn dedup_id(&self) -> String {
        let prefix = if self.backfill { format!("backfill@{}:", self.pushed_at_ms) } else { String::new() };
        format!(
            "{prefix}{}:{}:{}:{}",
            self.repo,
            self.ref_name,
            self.old.as_deref().unwrap_or("0"),
            self.new.as_deref().unwrap_or("0")
        )
    }
}

/// A file's git mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FileMode {
    /// `100644`.
    Regular,
    /// `100755`.
    Executable,
    /// `120000`: the content is the link target.
    Symlink,
}

impl FileMode {
    /// The mode as git writes it in a tree object.
    pub fn git_mode(self) -> &'static str {
        match self {
            FileMode::Regular => "100644",
            FileMode::Executable => "100755",
            FileMode::Symlink => "120000",
        }
    }
}

/// How an entry changed between the two commits of an update.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChangeKind {
    /// A new path.
    Add,
    /// Same path, new content or mode.
    Modify,
    /// The path is gone.
    Delete,
    /// Moved unchanged from `from_path` (same blob, same mode).
    Rename,
}

/// One changed path of a [`ServiceUpdate`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Path relative to the service tree, as raw bytes (git paths need not be UTF-8).
    pub path: ByteBuf,
    /// What happened to it.
    pub change: ChangeKind,
    /// The new mode; `None` for deletions.
    pub mode: Option<FileMode>,
    /// The new git blob id (hex); `None` for deletions.
    pub blob: Option<String>,
    /// The content, when it travels inline.
    pub content: Option<ByteBuf>,
    /// The object store name holding the content, when it is too large to travel inline.
    pub object: Option<String>,
    /// The old path of a rename.
    pub from_path: Option<ByteBuf>,
}

/// A change of one service in one datacenter: the diff from the last commit the relay
/// published for it to the newly resolved one, or (`snapshot`) the whole tree.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceUpdate {
    /// Wire version.
    pub v: u16,
    /// Datacenter id.
    pub dc: String,
    /// Service, application or device.
    pub kind: Kind,
    /// Its name.
    pub name: String,
    /// Ref resolved to `to` (the branch or the tag), empty when removed.
    pub ref_name: String,
    /// Branch named by the pin.
    pub branch: String,
    /// Tag named by the pin, or `latest`.
    pub version: String,
    /// The commit the diff starts from; `None` for a first publish and for snapshots.
    pub from: Option<String>,
    /// The new commit; `None` when the service was dropped from the datacenter.
    pub to: Option<String>,
    /// Git tree id of `to`: what the subscriber must obtain, or refuse the update.
    pub tree: Option<String>,
    /// True when `entries` is the complete tree rather than a diff.
    pub snapshot: bool,
    /// The changed paths (every path, as adds, for a snapshot).
    pub entries: Vec<Entry>,
    /// Stream sequence of the commit event that caused this update.
    pub event_seq: u64,
    /// When the push happened (from the commit event), ms since the Unix epoch.
    pub pushed_at_ms: u64,
    /// When the relay published this, ms since the Unix epoch.
    pub published_at_ms: u64,
    /// The commit rolls out in waves: a host applies it only once the service's
    /// rollout state ([`crate::rollout::RolloutState`]) releases it. Absent (false)
    /// without a rollout policy.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub staged: bool,
}

impl ServiceUpdate {
    /// True when the service is no longer part of the datacenter.
    pub fn is_removal(&self) -> bool {
        self.to.is_none()
    }

    /// True for a snapshot whose files are the service's objects on the state stream,
    /// reached from its `tree`, rather than its `entries`.
    pub fn is_by_objects(&self) -> bool {
        self.snapshot && self.v >= SNAPSHOT_BY_OBJECTS && self.to.is_some()
    }
}

/// The last commit a relay published for a service; small, so a relay can learn where
/// every service stands without reading snapshots.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceHead {
    /// Wire version.
    pub v: u16,
    /// Service, application or device.
    pub kind: Kind,
    /// Its name.
    pub name: String,
    /// The ref it resolved through.
    pub ref_name: String,
    /// Branch named by the pin.
    pub branch: String,
    /// Tag named by the pin, or `latest`.
    pub version: String,
    /// The published commit; `None` once removed.
    pub commit: Option<String>,
    /// Its tree.
    pub tree: Option<String>,
    /// Who wrote the commit and what it says, for people looking at the datacenter
    /// (`publisher dashboard`); absent from heads of older relays.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub about: Option<CommitAbout>,
}

/// A commit as people know it: its subject line, its author, when it was written and
/// when it was pushed. Text from pushers: whoever shows it must escape it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommitAbout {
    /// The first line of the commit message.
    pub subject: String,
    /// The author, `Name <email>`.
    pub author: String,
    /// The author's time, ms since the Unix epoch.
    pub authored_ms: u64,
    /// When the push reached the master (the commit event), ms since the Unix epoch.
    pub pushed_ms: u64,
}

/// The datacenter's inventory as last resolved, so hosts can find their services
/// without reading git.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Inventory {
    /// Wire version.
    pub v: u16,
    /// Datacenter id.
    pub dc: String,
    /// The configuration ref the datacenter follows.
    pub conf_ref: String,
    /// Hosts and what each runs.
    pub hosts: BTreeMap<String, HostInventory>,
}

/// Something an operator must look at: a bad document or an unresolvable pin reached
/// a relay. The relay keeps the last good resolution.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorEvent {
    /// Wire version.
    pub v: u16,
    /// Datacenter id.
    pub dc: String,
    /// The ref whose update triggered the error, if any.
    pub ref_name: Option<String>,
    /// The commit it pointed at, if any.
    pub commit: Option<String>,
    /// What is wrong, naming the ref, file and field.
    pub message: String,
    /// When, ms since the Unix epoch.
    pub at_ms: u64,
}

/// What a host reports after handling an update of one service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostStatus {
    /// Wire version.
    pub v: u16,
    /// Datacenter id.
    pub dc: String,
    /// Host id.
    pub host: String,
    /// Service, application or device.
    pub kind: Kind,
    /// Its name.
    pub name: String,
    /// The commit now in place (`None` when removed or never applied).
    pub commit: Option<String>,
    /// Whether the last update was applied.
    pub ok: bool,
    /// Why not, if not.
    pub error: Option<String>,
    /// Exit status of `--exec`, if it ran.
    pub exec_status: Option<i32>,
    /// When, ms since the Unix epoch.
    pub at_ms: u64,
    /// What the host's checks say of the service (`--check-cmd`, `--exec`,
    /// `--health-cmd`); `None` before they judged it, and from a host that does not
    /// report health (an older one: the field is optional both ways).
    #[serde(default)]
    pub health: Option<Health>,
}

/// How often a host repeats its status reports even when nothing changed, so that the
/// status stream's age limit only forgets hosts that are gone.
pub const STATUS_REFRESH: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

/// Milliseconds since the Unix epoch, for message timestamps.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

impl ServiceUpdate {
    /// The JetStream dedup id of this update, published by the relay's sync `cause`
    /// (`e17`, `e12-15`, `boot<ms>`): `<dc>/<kind>/<name>/<from>..<to>@<cause>`, with
    /// `none` for no `from` and `removed` for no `to`.
    pub fn dedup_id(&self, cause: &str) -> String {
        let from = self.from.as_deref().unwrap_or("none");
        let to = self.to.as_deref().unwrap_or("removed");
        format!("{}/{}/{}/{from}..{to}@{cause}", self.dc, self.kind, self.name)
    }

    /// The dedup id of the snapshot published along with this update.
    pub fn snapshot_dedup_id(&self, cause: &str) -> String {
        format!("{}/snapshot", self.dedup_id(cause))
    }
}

impl ServiceHead {
    /// The JetStream dedup id of this head in datacenter `dc`, published by the relay's
    /// sync `cause`: `<dc>/<kind>/<name>/head/<commit or removed>@<cause>`.
    pub fn dedup_id(&self, dc: &str, cause: &str) -> String {
        let commit = self.commit.as_deref().unwrap_or("removed");
        format!("{dc}/{}/{}/head/{commit}@{cause}", self.kind, self.name)
    }

    /// The value of the service's key in the configuration index: `<branch>/<commit>`;
    /// `None` once removed.
    pub fn index_value(&self) -> Option<String> {
        self.commit.as_ref().map(|commit| format!("{}/{commit}", self.branch))
    }
}

impl Inventory {
    /// The JetStream dedup id of this inventory, published by the relay's sync `cause`.
    pub fn dedup_id(&self, cause: &str) -> String {
        format!("{}/inventory@{cause}", self.dc)
    }
}

impl ErrorEvent {
    /// The JetStream dedup id of this error event, published by the relay's sync
    /// `cause`: one per distinct message per cause.
    pub fn dedup_id(&self, cause: &str) -> String {
        use std::hash::{Hash, Hasher};
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        self.message.hash(&mut hasher);
        format!("{}/error/{cause}/{:016x}", self.dc, hasher.finish())
    }
}

/// Messages about one service, application or device.
macro_rules! about_a_service {
    ($($message:ty),*) => {$(
        impl $message {
            /// The service this message is about.
            pub fn service(&self) -> ServiceId {
                ServiceId::new(self.kind, self.name.clone())
            }
        }
    )*};
}

about_a_service!(ServiceUpdate, ServiceHead, HostStatus);

#[cfg(test)]
mod tests {
    use super::*;

    fn event() -> CommitEvent {
        CommitEvent {
            v: WIRE_VERSION,
            repo: "master".into(),
            ref_name: "refs/heads/services/a/main".into(),
            old: None,
            new: Some("ab".repeat(20)),
            paths: vec!["x".into()],
            paths_truncated: false,
            pushed_at_ms: 1,
            backfill: false,
        }
    }

    #[test]
    fn round_trips_as_named_map() {
        let bytes = encode(&event());
        // Named encoding: field names are on the wire, so readers tolerate new fields.
        assert!(bytes.windows(8).any(|w| w == b"ref_name"));
        assert_eq!(decode::<CommitEvent>(&bytes).expect("decodes"), event());
    }

    #[test]
    fn newer_versions_and_garbage_are_refused() {
        let mut e = event();
        e.v = READ_VERSION + 1;
        assert!(matches!(decode::<CommitEvent>(&encode(&e)), Err(DecodeError::TooNew { .. })));
        assert!(matches!(decode::<CommitEvent>(b"\xc1garbage"), Err(DecodeError::Malformed(_))));
    }

    fn status(health: Option<Health>) -> HostStatus {
        HostStatus {
            v: WIRE_VERSION,
            dc: "dc1".into(),
            host: "h0".into(),
            kind: Kind::Service,
            name: "web".into(),
            commit: Some("ab".repeat(20)),
            ok: false,
            error: Some("--check-cmd refused it".into()),
            exec_status: None,
            at_ms: 1,
            health,
        }
    }

    /// A host status as hosts wrote it before they reported health.
    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct StatusWithoutHealth {
        v: u16,
        dc: String,
        host: String,
        kind: Kind,
        name: String,
        commit: Option<String>,
        ok: bool,
        error: Option<String>,
        exec_status: Option<i32>,
        at_ms: u64,
    }

    #[test]
    fn health_is_optional_on_the_wire_both_ways() {
        let health = Health::unhealthy(2, "--check-cmd exited with exit status: 1");
        let new = status(Some(health.clone()));
        let bytes = encode(&new);
        assert!(bytes.windows(9).any(|w| w == b"unhealthy"), "the state travels as a lowercase word");
        assert_eq!(decode::<HostStatus>(&bytes).expect("decodes"), new);
        // An older reader ignores the field; a newer one reads an older status as no health.
        let old: StatusWithoutHealth = rmp_serde::from_slice(&bytes).expect("an older reader reads it");
        assert_eq!(old.error, new.error);
        let from_old = decode::<HostStatus>(&encode(&old)).expect("a newer reader reads an older status");
        assert_eq!(from_old, status(None));
        assert!(Health::healthy(3).is_healthy() && !health.is_healthy());
        let states = [HealthState::Healthy, HealthState::Unhealthy, HealthState::Reverted];
        let names: Vec<String> = states.iter().map(|s| serde_json::to_string(s).expect("json")).collect();
        assert_eq!(names, [r#""healthy""#, r#""unhealthy""#, r#""reverted""#]);
    }

    #[test]
    fn dedup_id_is_derived_from_content() {
        assert_eq!(event().dedup_id(), format!("master:refs/heads/services/a/main:0:{}", "ab".repeat(20)));
        let backfill = CommitEvent { backfill: true, ..event() };
        assert_eq!(backfill.dedup_id(), format!("backfill@1:master:refs/heads/services/a/main:0:{}", "ab".repeat(20)));
    }
}
