//! Building a tree as a hard-link farm: a fresh directory where every file the update
//! does not touch is hard-linked from the current tree.

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use confcast_schemas::{ChangeKind, ServiceUpdate};
use nix::fcntl::AtFlags;

use super::entries::{with_entries, write_entry, At};
use super::{errno_in, io_at, io_in, ApplyError, Objects};
use crate::beneath::Dirs;
use crate::perms::Perms;
use crate::tree_hash;

/// The manifest of `base` with the update's changes, the written entries hashed from
/// what is on disk now.
pub(super) fn derive(
    base: &tree_hash::Manifest,
    update: &ServiceUpdate,
    tmp: &Path,
) -> Result<tree_hash::Manifest, ApplyError> {
    let dirs = std::cell::RefCell::new(Dirs::open(tmp, None).map_err(io_at(tmp))?);
    with_entries(base, update, |entry| {
        let mut dirs = dirs.borrow_mut();
        let (parent, name) = dirs.parent(&entry.path).map_err(io_in(tmp, &entry.path))?;
        let shown = tmp.join(OsStr::from_bytes(&entry.path));
        tree_hash::entry_id_at(parent, name, &shown).map_err(io_at(&shown))
    })
}

/// Fills the new tree `tmp`: every file of `base` the update does not touch, by hard
/// link, then what the update adds, modifies and renames. Not flushed: the caller
/// flushes every tree it built at once ([`super::Materializer::flush`]).
pub(super) fn populate(
    tmp: &Path,
    base: Option<(&Path, &tree_hash::Manifest)>,
    update: &ServiceUpdate,
    objects: &Objects,
    perms: &Perms,
) -> Result<(), ApplyError> {
    if let Some((base_dir, manifest)) = base {
        // Everything the update does not touch is carried over by hard link: exactly
        // the base's manifest, so what is built is what `derive` computes.
        let touched: BTreeSet<&[u8]> = update
            .entries
            .iter()
            .flat_map(|e| std::iter::once(&e.path[..]).chain(e.from_path.as_deref().map(|p| &p[..])))
            .collect();
        let carried: Vec<&Vec<u8>> = manifest.keys().filter(|p| !touched.contains(&p[..])).collect();
        // link(2) is the cost of a large tree: spread it over the cores.
        let workers = if carried.len() < PARALLEL_LINKS_ABOVE {
            1
        } else {
            std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1).min(8)
        };
        let chunk = carried.len().div_ceil(workers).max(1);
        std::thread::scope(|scope| {
            let handles: Vec<_> =
                carried.chunks(chunk).map(|part| scope.spawn(move || link_all(base_dir, tmp, part, perms))).collect();
            handles.into_iter().try_for_each(|h| h.join().unwrap_or(Err(ApplyError::LinkWorker)))
        })?;
    }
    let mut dirs = Dirs::open(tmp, Some(perms.dirs())).map_err(io_at(tmp))?;
    let mut sources = match base {
        Some((base_dir, _)) => Some((base_dir, Dirs::open(base_dir, None).map_err(io_at(base_dir))?)),
        None => None,
    };
    for entry in &update.entries {
        let target = tmp.join(OsStr::from_bytes(&entry.path));
        match entry.change {
            ChangeKind::Delete => {}
            ChangeKind::Rename => {
                let (base_dir, sources) =
                    sources.as_mut().ok_or_else(|| ApplyError::Malformed("rename without a base tree".into()))?;
                let from =
                    entry.from_path.as_ref().ok_or_else(|| ApplyError::Malformed("rename without from_path".into()))?;
                let (from_dir, from_name) = sources.parent(from).map_err(io_in(base_dir, from))?;
                let (parent, name) = dirs.parent(&entry.path).map_err(io_at(&target))?;
                nix::unistd::linkat(from_dir, from_name, parent, name, AtFlags::empty())
                    .map_err(errno_in(base_dir, from))?;
            }
            ChangeKind::Add | ChangeKind::Modify => {
                let (parent, name) = dirs.parent(&entry.path).map_err(io_at(&target))?;
                write_entry(entry, &At { dir: parent, name, shown: &target }, objects, perms)?;
            }
        }
    }
    Ok(())
}

/// Above this many carried-over files, hard links are made by several threads.
const PARALLEL_LINKS_ABOVE: usize = 20_000;

fn link_all(base_dir: &Path, tmp: &Path, paths: &[&Vec<u8>], perms: &Perms) -> Result<(), ApplyError> {
    let mut sources = Dirs::open(base_dir, None).map_err(io_at(base_dir))?;
    let mut targets = Dirs::open(tmp, Some(perms.dirs())).map_err(io_at(tmp))?;
    for path in paths {
        let (from_dir, from_name) = sources.parent(path).map_err(io_in(base_dir, path))?;
        let (to_dir, to_name) = targets.parent(path).map_err(io_in(tmp, path))?;
        // Without AT_SYMLINK_FOLLOW, linkat(2) links a symlink as itself.
        nix::unistd::linkat(from_dir, from_name, to_dir, to_name, AtFlags::empty())
            .map_err(errno_in(base_dir, path))?;
    }
    Ok(())
}
