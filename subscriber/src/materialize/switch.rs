//! Pointing `<dir>/<service>` at a tree atomically, and taking it away.

use std::ffi::OsStr;
use std::fs::{self, File};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use super::prune::stamp;
use super::{io_at, ApplyError, Layout};

fn sync_dir(dir: &Path) -> Result<(), ApplyError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io_at(dir))
}

/// Points `<dir>/<service>` at `tree` atomically. The tree it pointed at before is
/// stamped as if just built: applications may still be reading it, and trees are
/// recycled and pruned oldest first, sparing the newest (see `prune.rs`) — which it is
/// now even when trees were built after it and never switched to (several updates of
/// one service applied in one step).
pub fn switch(layout: &Layout, tree: &Path) -> Result<(), ApplyError> {
    let parent = layout.link.parent().ok_or_else(|| ApplyError::Occupied(layout.link.clone()))?;
    fs::create_dir_all(parent).map_err(io_at(parent))?;
    if let Ok(meta) = fs::symlink_metadata(&layout.link) {
        if !meta.file_type().is_symlink() {
            return Err(ApplyError::Occupied(layout.link.clone()));
        }
    }
    let name = layout.link.file_name().map(|n| n.as_bytes().to_vec()).unwrap_or_default();
    let tmp = parent.join(OsStr::from_bytes(&[b".", &name[..], b".confcast-tmp"].concat()));
    let _ = fs::remove_file(&tmp);
    std::os::unix::fs::symlink(tree, &tmp).map_err(io_at(&tmp))?;
    // Not flushed here: the tree it points to already is (the link never points at
    // anything a crash could lose), and the position saved next flushes after it. If a
    // crash keeps the link but loses that position, the host finds at start that its
    // link and its position disagree, and bootstraps the service from its snapshot.
    let outgoing = fs::read_link(&layout.link).ok();
    fs::rename(&tmp, &layout.link).map_err(io_at(&layout.link))?;
    if let Some(old) = outgoing.filter(|old| old != tree) {
        stamp(&old);
    }
    Ok(())
}

/// Removes `<dir>/<service>` (the service left this host).
pub fn unlink(layout: &Layout) -> Result<(), ApplyError> {
    match fs::symlink_metadata(&layout.link) {
        Ok(meta) if meta.file_type().is_symlink() => {
            fs::remove_file(&layout.link).map_err(io_at(&layout.link))?;
            if let Some(parent) = layout.link.parent() {
                sync_dir(parent)?;
            }
            Ok(())
        }
        Ok(_) => Err(ApplyError::Occupied(layout.link.clone())),
        Err(_) => Ok(()),
    }
}
