//! A service's kept trees: which they are, the lock that guards them against building
//! and pruning at once, and the deletion of the excess.

use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use super::manifests::Manifests;
use super::{io_at, ApplyError, Layout, KEEP_PREVIOUS};

/// Marks a tree as built (or current) now: trees are pruned and recycled oldest first.
pub(super) fn stamp(tree: &Path) {
    let _ = File::open(tree).and_then(|d| d.set_modified(std::time::SystemTime::now()));
}

/// Prefix of a tree being recycled: hidden from pruning and never a link target.
pub(super) const RECYCLING: &str = ".recycling-";

/// Removes the trees a crash left set aside under `prefix` (recycling or pruning).
pub(super) fn clear_leftovers(layout: &Layout, prefix: &str) {
    let Ok(entries) = fs::read_dir(&layout.trees) else { return };
    for entry in entries.filter_map(Result::ok) {
        if entry.file_name().as_bytes().starts_with(prefix.as_bytes()) {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

/// The service's kept trees other than the current one, oldest first (by their root's
/// mtime, set by [`stamp`] when built and when replaced as current), with their commits. Hidden entries (the lock,
/// trees set aside) are not trees.
pub(super) fn kept_trees(layout: &Layout) -> Vec<(PathBuf, String)> {
    // The link points at `<trees>/<commit>`: its name is enough (resolving every path
    // costs a dozen system calls per tree, on every update).
    let current = layout.current().and_then(|p| p.file_name().map(OsStr::to_owned));
    let Ok(entries) = fs::read_dir(&layout.trees) else { return Vec::new() };
    let mut trees: Vec<(std::time::SystemTime, PathBuf, String)> = entries
        .filter_map(Result::ok)
        .filter(|e| !e.file_name().as_bytes().starts_with(b".") && e.file_type().is_ok_and(|t| t.is_dir()))
        .filter(|e| Some(e.file_name()) != current)
        .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path(), e.file_name().to_str()?.to_owned())))
        .collect();
    trees.sort();
    trees.into_iter().map(|(_, dir, commit)| (dir, commit)).collect()
}

/// Holds the service's trees against concurrent building and pruning.
pub(super) fn lock_trees(layout: &Layout) -> Result<File, ApplyError> {
    fs::create_dir_all(&layout.trees).map_err(io_at(&layout.trees))?;
    let path = layout.trees.join(".lock");
    let file = OpenOptions::new().create(true).truncate(false).write(true).open(&path).map_err(io_at(&path))?;
    file.lock().map_err(io_at(&path))?;
    Ok(file)
}

/// Prefix of a tree being deleted.
const PRUNING: &str = ".pruning-";

/// Deletes all but the current tree and the [`KEEP_PREVIOUS`] most recent others.
/// The trees to delete are renamed aside under the lock (quick), then deleted without it.
pub(super) fn prune(layout: &Layout, manifests: &Manifests) {
    let victims = {
        let Ok(_lock) = lock_trees(layout) else { return };
        let trees = kept_trees(layout);
        let excess = trees.len().saturating_sub(KEEP_PREVIOUS);
        trees
            .into_iter()
            .take(excess)
            .map(|(old, _)| old)
            .filter_map(|old| {
                let name = old.file_name()?.to_owned();
                let aside = layout.trees.join(format!("{PRUNING}{}", name.to_string_lossy()));
                fs::rename(&old, &aside).ok()?;
                manifests.forget(&old.with_extension("manifest"));
                Some(aside)
            })
            .collect::<Vec<_>>()
    };
    for aside in victims {
        if let Err(e) = fs::remove_dir_all(&aside) {
            tracing::warn!(path = %aside.display(), error = %e, "cannot prune old tree");
        }
    }
    // Left by a crash while pruning.
    clear_leftovers(layout, PRUNING);
}
