//! Writing one entry of an update into a tree, never through a link, and what the
//! update's entries make of a manifest.

use std::ffi::OsStr;
use std::fs::{self, File};
use std::io::Write;
use std::os::fd::BorrowedFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use confcast_schemas::{ChangeKind, Entry, FileMode, ServiceUpdate};
use nix::fcntl::{AtFlags, OFlag};
use nix::sys::stat::Mode;

use super::{io_at, ApplyError, Objects};
use crate::perms::Perms;
use crate::tree_hash;

/// `base` with the update's deletions and renames, and `item(entry)` for what it adds
/// or modifies.
pub(super) fn with_entries(
    base: &tree_hash::Manifest,
    update: &ServiceUpdate,
    item: impl Fn(&Entry) -> Result<(&'static str, tree_hash::ObjectId), ApplyError>,
) -> Result<tree_hash::Manifest, ApplyError> {
    let mut manifest = base.clone();
    for entry in &update.entries {
        match entry.change {
            ChangeKind::Delete => {
                manifest.remove(&entry.path[..]);
            }
            ChangeKind::Rename => {
                let from = entry.from_path.as_deref().map(|p| &p[..]).unwrap_or_default();
                let moved = manifest
                    .remove(from)
                    .ok_or_else(|| ApplyError::Malformed("rename of a path not in the base".into()))?;
                manifest.insert(entry.path.to_vec(), moved);
            }
            ChangeKind::Add | ChangeKind::Modify => {
                manifest.insert(entry.path.to_vec(), item(entry)?);
            }
        }
    }
    Ok(manifest)
}

/// The content of an added or modified entry, checked against its blob id.
fn entry_content<'a>(entry: &'a Entry, objects: &'a Objects) -> Result<&'a [u8], ApplyError> {
    let content: &[u8] = match (&entry.content, &entry.object) {
        (Some(inline), _) => inline,
        (None, Some(name)) => {
            objects.get(name).ok_or_else(|| ApplyError::Malformed(format!("content object {name} was not fetched")))?
        }
        (None, None) => {
            return Err(ApplyError::Malformed(format!("{} has no content", String::from_utf8_lossy(&entry.path))))
        }
    };
    if let Some(blob) = &entry.blob {
        if hex::encode(tree_hash::blob_id(content)) != *blob {
            return Err(ApplyError::Malformed(format!(
                "content of {} does not match blob {blob}",
                String::from_utf8_lossy(&entry.path)
            )));
        }
    }
    Ok(content)
}

/// Where an entry is written: the entry `name` of the directory `dir`, reached without
/// passing through a link; `shown` names it in errors.
pub(super) struct At<'a> {
    pub(super) dir: BorrowedFd<'a>,
    pub(super) name: &'a OsStr,
    pub(super) shown: &'a Path,
}

/// Creates the entry at `at`, never through a link: `O_EXCL | O_NOFOLLOW`,
/// `symlinkat(2)`.
pub(super) fn write_entry(entry: &Entry, at: &At<'_>, objects: &Objects, perms: &Perms) -> Result<(), ApplyError> {
    let At { dir, name, shown } = *at;
    let content = entry_content(entry, objects)?;
    let errno = |e: nix::errno::Errno| ApplyError::Io { path: shown.to_owned(), source: e.into() };
    match entry.mode.ok_or_else(|| ApplyError::Malformed("added entry without mode".into()))? {
        FileMode::Symlink => {
            nix::unistd::symlinkat(OsStr::from_bytes(content), dir, name).map_err(errno)?;
            if perms.chown() {
                nix::unistd::fchownat(dir, name, perms.owner, perms.group, AtFlags::AT_SYMLINK_NOFOLLOW)
                    .map_err(errno)?;
            }
        }
        mode => {
            let perm = perms.file_mode(mode == FileMode::Executable);
            let flags = OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
            let fd = nix::fcntl::openat(dir, name, flags, Mode::from_bits_truncate(perm)).map_err(errno)?;
            fill(File::from(fd), content, perm, perms, shown)?;
        }
    }
    Ok(())
}

/// Replaces the content and mode of the regular file at `at`, which nothing else links
/// to, with the entry's (a regular file too).
pub(super) fn rewrite_entry(entry: &Entry, at: &At<'_>, objects: &Objects, perms: &Perms) -> Result<(), ApplyError> {
    let At { dir, name, shown } = *at;
    let content = entry_content(entry, objects)?;
    let perm = perms.file_mode(entry.mode == Some(FileMode::Executable));
    let flags = OFlag::O_WRONLY | OFlag::O_TRUNC | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let fd = nix::fcntl::openat(dir, name, flags, Mode::empty())
        .map_err(|e| ApplyError::Io { path: shown.to_owned(), source: e.into() })?;
    fill(File::from(fd), content, perm, perms, shown)
}

/// Writes `content` to `file`, then gives it its owner and mode (owner first: a change
/// of owner may clear mode bits).
fn fill(mut file: File, content: &[u8], mode: u32, perms: &Perms, shown: &Path) -> Result<(), ApplyError> {
    file.write_all(content).map_err(io_at(shown))?;
    if perms.chown() {
        nix::unistd::fchown(&file, perms.owner, perms.group)
            .map_err(|e| ApplyError::Io { path: shown.to_owned(), source: e.into() })?;
    }
    // The umask may have cleared bits; the mode is part of the verified tree.
    file.set_permissions(fs::Permissions::from_mode(mode)).map_err(io_at(shown))?;
    Ok(())
}
