//! The host's own position: per service, the commit in place and the stream sequence
//! it was reached at (DESIGN principle 4: no per-host state on the server).
//!
//! Written to a temporary file, flushed and put in place atomically after changes
//! (see [`Position::save`]), so a crash leaves the previous or the new position, and
//! `exec_pending` records a change whose `--exec` has not finished yet so a restart
//! runs it. The file is `<state-dir>/position.json`, keyed by service as
//! `service/web` ([`ServiceId`]'s text).

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use confcast_schemas::ServiceId;
use serde::{Deserialize, Serialize};

/// Where one service stands on this host.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceState {
    /// The commit in place; `None` once removed.
    pub commit: Option<String>,
    /// Its git tree id.
    pub tree: Option<String>,
    /// The ref it was resolved through.
    pub ref_name: String,
    /// The pin's version (tag or `latest`).
    pub version: String,
    /// Stream sequence of the last update handled for this service.
    pub seq: u64,
    /// The change has been applied but `--exec` has not completed for it.
    pub exec_pending: bool,
    /// When the commit in place was applied, ms since the Unix epoch.
    #[serde(default)]
    pub applied_at_ms: Option<u64>,
}

/// The whole position file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Position {
    /// Datacenter the position belongs to; a state dir is never reused across them.
    pub dc: String,
    /// Per service, keyed `<kind>/<name>` in the file.
    pub services: BTreeMap<ServiceId, ServiceState>,
}

/// The name of the position file in the state directory.
pub const FILE: &str = "position.json";

/// Why the position cannot be read or written.
#[derive(Debug, thiserror::Error)]
pub enum PositionError {
    /// The file cannot be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The position file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The file is not a position.
    #[error("{}: {source}", path.display())]
    Unreadable {
        /// The position file.
        path: PathBuf,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// The state directory is another datacenter's.
    #[error("{} belongs to datacenter {found:?}, not {dc:?}; use another --state-dir", path.display())]
    OtherDatacenter {
        /// The position file.
        path: PathBuf,
        /// The datacenter it belongs to.
        found: String,
        /// The subscriber's datacenter.
        dc: String,
    },
}

impl PositionError {
    /// Whether there is no position file at all (nothing applied on this host yet).
    pub fn is_missing(&self) -> bool {
        matches!(self, PositionError::Io { source, .. } if source.kind() == io::ErrorKind::NotFound)
    }
}

impl Position {
    /// Loads the position, or an empty one for a new host.
    pub fn load(path: &Path, dc: &str) -> Result<Position, PositionError> {
        match Position::load_any(path) {
            Ok(position) if position.dc != dc => {
                Err(PositionError::OtherDatacenter { path: path.to_owned(), found: position.dc, dc: dc.to_owned() })
            }
            Ok(position) => Ok(position),
            Err(e) if e.is_missing() => Ok(Position { dc: dc.to_owned(), services: BTreeMap::new() }),
            Err(e) => Err(e),
        }
    }

    /// Loads a position whatever its datacenter (for inspection).
    pub fn load_any(path: &Path) -> Result<Position, PositionError> {
        let bytes = fs::read(path).map_err(|source| PositionError::Io { path: path.to_owned(), source })?;
        serde_json::from_slice(&bytes).map_err(|source| PositionError::Unreadable { path: path.to_owned(), source })
    }

    /// Where `id` stands; a service never seen stands nowhere (the default).
    pub fn of(&self, id: &ServiceId) -> ServiceState {
        self.services.get(id).cloned().unwrap_or_default()
    }

    /// Replaces the position file atomically: a crash leaves the previous position or
    /// this one, whole. The new content is flushed before the rename; the rename itself
    /// reaches the disk with the file system's next commit. A position that a crash
    /// set back is safe: a link found ahead of it is caught up at start from the
    /// service's snapshot, and the stream replays from there.
    pub fn save(&self, path: &Path) -> Result<(), PositionError> {
        self.write(path).map_err(|source| PositionError::Io { path: path.to_owned(), source })
    }

    fn write(&self, path: &Path) -> io::Result<()> {
        let dir = path.parent().map(Path::to_owned).unwrap_or_else(|| PathBuf::from("."));
        fs::create_dir_all(&dir)?;
        let tmp = path.with_extension("json.tmp");
        let mut file = File::create(&tmp)?;
        file.write_all(&serde_json::to_vec_pretty(self).expect("position serializes"))?;
        file.sync_all()?;
        put_in_place(&tmp, path)
    }
}

/// Puts the file `tmp` in place of `path`, atomically. Where the platform can, the two
/// are exchanged rather than `path` replaced: the old file then becomes the next write's
/// `tmp`, and no inode is freed or allocated per write. Freeing and allocating inodes
/// is what slows a file system down under a stream of updates (ext4 without a journal
/// scans past every inode freed in the last seconds before it reuses one).
pub fn put_in_place(tmp: &Path, path: &Path) -> io::Result<()> {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        use nix::fcntl::{renameat2, RenameFlags, AT_FDCWD};
        // Fails when `path` does not exist yet, or the file system cannot exchange.
        if renameat2(AT_FDCWD, tmp, AT_FDCWD, path, RenameFlags::RENAME_EXCHANGE).is_ok() {
            return Ok(());
        }
    }
    fs::rename(tmp, path)
}

#[cfg(test)]
mod tests {
    use confcast_schemas::Kind;

    use super::*;

    #[test]
    fn round_trips_and_refuses_another_datacenter() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("position.json");
        let mut position = Position::load(&path, "dc1").expect("empty");
        position
            .services
            .insert(ServiceId::service("s"), ServiceState { commit: Some("c".into()), seq: 7, ..Default::default() });
        position.services.insert(ServiceId::new(Kind::Device, "a/b"), ServiceState::default());
        position.save(&path).expect("save");
        assert_eq!(Position::load(&path, "dc1").expect("load"), position);
        let text = fs::read_to_string(&path).expect("read");
        assert!(text.contains("\"service/s\": {") && text.contains("\"device/a/b\": {"), "keys as before: {text}");
        let e = Position::load(&path, "dc2").expect_err("other dc");
        assert!(e.to_string().contains("belongs to datacenter \"dc1\""), "{e}");
    }

    #[test]
    fn saving_again_and_again_reuses_two_inodes() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("position.json");
        let ino = |p: &Path| fs::metadata(p).expect("exists").ino();
        let mut position = Position { dc: "dc1".into(), services: BTreeMap::new() };
        position.save(&path).expect("first save");
        position.save(&path).expect("second save");
        let (a, b) = (ino(&path), ino(&path.with_extension("json.tmp")));
        for seq in 1..5 {
            position.services.insert(ServiceId::service("s"), ServiceState { seq, ..Default::default() });
            position.save(&path).expect("save");
            assert_eq!(Position::load(&path, "dc1").expect("load"), position, "the last save is what loads");
            let now = (ino(&path), ino(&path.with_extension("json.tmp")));
            assert!(now == (a, b) || now == (b, a), "a save allocated an inode: {now:?}, not {a}/{b}");
        }
    }
}
