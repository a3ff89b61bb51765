//! The manifests of the last trees built or read, kept in memory: reading a large
//! tree's manifest from disk costs more than the rest of a one-file update.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::tree_hash::{self, Manifest};

/// How many manifests are kept (a few per service: current, previous, recyclable).
const KEPT: usize = 16;

/// The manifests of the last trees built or read, by the path of their file, oldest
/// first.
#[derive(Debug, Default)]
pub(super) struct Manifests {
    kept: Mutex<Vec<(PathBuf, Arc<Manifest>)>>,
}

impl Manifests {
    /// The manifest at `path`, from memory or disk.
    pub(super) fn at(&self, path: &Path) -> Option<Arc<Manifest>> {
        {
            let kept = self.kept.lock().unwrap_or_else(|e| e.into_inner());
            if let Some((_, manifest)) = kept.iter().find(|(p, _)| p == path) {
                return Some(manifest.clone());
            }
        }
        let manifest = Arc::new(tree_hash::read_manifest(path)?);
        self.remember(path, manifest.clone());
        Some(manifest)
    }

    /// Writes the manifest beside its tree and keeps it in memory.
    pub(super) fn store(&self, path: &Path, manifest: Arc<Manifest>) {
        // A cache: if it is lost, the next diff scans the tree instead.
        let _ = tree_hash::write_manifest(path, &manifest);
        self.remember(path, manifest);
    }

    fn remember(&self, path: &Path, manifest: Arc<Manifest>) {
        let mut kept = self.kept.lock().unwrap_or_else(|e| e.into_inner());
        kept.retain(|(p, _)| p != path);
        kept.push((path.to_owned(), manifest));
        if kept.len() > KEPT {
            kept.remove(0);
        }
    }

    /// Removes a manifest from disk and memory.
    pub(super) fn forget(&self, path: &Path) {
        self.uncache(path);
        let _ = fs::remove_file(path);
    }

    /// Drops a manifest from memory only.
    pub(super) fn uncache(&self, path: &Path) {
        self.kept.lock().unwrap_or_else(|e| e.into_inner()).retain(|(p, _)| p != path);
    }
}
