//! The host's own position: per service, the commit in place and the stream sequence
//! it was reached at (DESIGN principle 4: no per-host state on the server).
//!
//! Written with write-to-temp, fsync, rename after changes, so a crash leaves the
//! previous or the new position, and `exec_pending` records a change whose `--exec`
//! has not finished yet so a restart runs it.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use confcast_schemas::Kind;
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
    /// Per service, keyed `<kind>/<name>`.
    pub services: BTreeMap<String, ServiceState>,
}

/// The key of a service in [`Position::services`].
pub fn key(kind: Kind, name: &str) -> String {
    format!("{kind}/{name}")
}

/// The service a [`key`] names.
pub fn parse_key(key: &str) -> Option<(Kind, String)> {
    let (kind, name) = key.split_once('/')?;
    let kind = Kind::ALL.into_iter().find(|k| k.as_str() == kind)?;
    Some((kind, name.to_owned()))
}

impl Position {
    /// Loads the position, or an empty one for a new host.
    pub fn load(path: &Path, dc: &str) -> io::Result<Position> {
        match fs::read(path) {
            Ok(bytes) => {
                let position: Position =
                    serde_json::from_slice(&bytes).map_err(|e| io::Error::other(format!("{}: {e}", path.display())))?;
                if position.dc != dc {
                    return Err(io::Error::other(format!(
                        "{} belongs to datacenter {:?}, not {dc:?}; use another --state-dir",
                        path.display(),
                        position.dc
                    )));
                }
                Ok(position)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                Ok(Position { dc: dc.to_owned(), services: BTreeMap::new() })
            }
            Err(e) => Err(e),
        }
    }

    /// Loads a position whatever its datacenter (for inspection).
    pub fn load_any(path: &Path) -> io::Result<Position> {
        let bytes = fs::read(path)?;
        serde_json::from_slice(&bytes).map_err(|e| io::Error::other(format!("{}: {e}", path.display())))
    }

    /// Replaces the position file atomically: a crash leaves the previous position or
    /// this one, whole. The new content is flushed before the rename; the rename itself
    /// reaches the disk with the file system's next commit. A position that a crash
    /// set back is safe: a link found ahead of it is caught up at start from the
    /// service's snapshot, and the stream replays from there.
    pub fn save(&self, path: &Path) -> io::Result<()> {
        let dir = path.parent().map(Path::to_owned).unwrap_or_else(|| PathBuf::from("."));
        fs::create_dir_all(&dir)?;
        let tmp = path.with_extension("json.tmp");
        let mut file = File::create(&tmp)?;
        file.write_all(&serde_json::to_vec_pretty(self).expect("position serializes"))?;
        file.sync_all()?;
        fs::rename(&tmp, path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_refuses_another_datacenter() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("position.json");
        let mut position = Position::load(&path, "dc1").expect("empty");
        position
            .services
            .insert(key(Kind::Service, "s"), ServiceState { commit: Some("c".into()), seq: 7, ..Default::default() });
        position.save(&path).expect("save");
        assert_eq!(Position::load(&path, "dc1").expect("load"), position);
        assert_eq!(parse_key(&key(Kind::Device, "a/b")), Some((Kind::Device, "a/b".to_owned())));
        assert_eq!(parse_key("nonsense/x"), None);
        let e = Position::load(&path, "dc2").expect_err("other dc");
        assert!(e.to_string().contains("belongs to datacenter \"dc1\""), "{e}");
    }
}
