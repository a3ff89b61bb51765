//! Where one service's trees live, and where it is exposed.

use std::fs;
use std::path::{Path, PathBuf};

use confcast_schemas::{subject, ServiceId};

use crate::perms::Perms;

/// Where one service's trees live and where it is exposed.
#[derive(Debug, Clone)]
pub struct Layout {
    /// `<state>/trees/<service token>`.
    pub trees: PathBuf,
    /// `<dir>/<service>`: the symlink applications read through.
    pub link: PathBuf,
    /// Owner, group and modes of the service's files and directories.
    pub perms: Perms,
}

impl Layout {
    /// The layout of one service: trees under `<state_dir>/trees/<kind>-<name token>`,
    /// exposed as `<dir>/<name>`.
    pub fn for_service(dir: &Path, state_dir: &Path, id: &ServiceId) -> Layout {
        Layout {
            trees: state_dir.join("trees").join(format!("{}-{}", id.kind, subject::encode_token(&id.name))),
            link: dir.join(&id.name),
            perms: Perms::default(),
        }
    }

    /// The same layout, its files given `perms`.
    pub fn with_perms(self, perms: Perms) -> Layout {
        Layout { perms, ..self }
    }

    /// The directory of the tree of `commit`.
    pub fn tree_dir(&self, commit: &str) -> PathBuf {
        self.trees.join(commit)
    }

    /// The manifest kept beside the tree of `commit`.
    pub fn manifest(&self, commit: &str) -> PathBuf {
        self.trees.join(format!("{commit}.manifest"))
    }

    /// The tree the link currently points at, if any.
    pub fn current(&self) -> Option<PathBuf> {
        fs::read_link(&self.link).ok().filter(|p| p.is_dir())
    }
}
