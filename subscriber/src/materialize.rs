//! Building a service's new tree on disk and switching to it atomically.
//!
//! A new tree is built beside the old one under `<state>/trees/<service>/`: files the
//! update does not touch are hard-linked from the current tree (so the cost grows with
//! the diff), changed files are written and fsynced, then the whole tree is hashed and
//! must equal the update's git tree id. Only then is `<dir>/<service>` — a symlink —
//! replaced with one pointing at the new tree, by `rename(2)`: a reader sees the old
//! tree or the new one, never a mix.

use std::collections::{BTreeSet, HashMap};
use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use confcast_schemas::{path, ChangeKind, Entry, FileMode, ServiceUpdate};

use crate::tree_hash;

/// How many trees per service are kept besides the current one, for rollback.
pub const KEEP_PREVIOUS: usize = 3;

/// Why an update could not be applied. The current tree is untouched in every case.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// The update names a path or link that would leave the service directory.
    #[error("refused {0}")]
    UnsafePath(#[from] path::PathError),
    /// The update is inconsistent (missing content, rename of an unknown file).
    #[error("malformed update: {0}")]
    Malformed(String),
    /// What was built does not hash to the announced tree.
    #[error("verification failed: built tree {built}, update announced {expected}")]
    Verify {
        /// The announced tree id.
        expected: String,
        /// What was built.
        built: String,
    },
    /// Disk trouble (full disk, permissions).
    #[error("{path}: {source}")]
    Io {
        /// Where.
        path: PathBuf,
        /// What.
        source: io::Error,
    },
    /// `<dir>/<service>` exists and is not a symlink confcast manages.
    #[error("{0} exists and is not a symlink managed by confcast; move it away")]
    Occupied(PathBuf),
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> ApplyError + '_ {
    move |source| ApplyError::Io { path: path.to_owned(), source }
}

/// Where one service's trees live and where it is exposed.
#[derive(Debug, Clone)]
pub struct Layout {
    /// `<state>/trees/<service token>`.
    pub trees: PathBuf,
    /// `<dir>/<service>`: the symlink applications read through.
    pub link: PathBuf,
}

impl Layout {
    /// The layout of one service: trees under `<state_dir>/trees/<kind>-<name token>`,
    /// exposed as `<dir>/<name>`.
    pub fn for_service(dir: &Path, state_dir: &Path, kind: confcast_schemas::Kind, name: &str) -> Layout {
        Layout {
            trees: state_dir.join("trees").join(format!("{kind}-{}", confcast_schemas::subject::encode_token(name))),
            link: dir.join(name),
        }
    }

    /// The directory of the tree of `commit`.
    pub fn tree_dir(&self, commit: &str) -> PathBuf {
        self.trees.join(commit)
    }

    /// The tree the link currently points at, if any.
    pub fn current(&self) -> Option<PathBuf> {
        fs::read_link(&self.link).ok().filter(|p| p.is_dir())
    }
}

/// Content of entries stored in the object store, fetched before materializing.
pub type Objects = HashMap<String, Vec<u8>>;

/// Builds and verifies the tree of `update` from `base` (the current tree, for a
/// diff) and returns its directory. Does not switch the link.
pub fn build(
    layout: &Layout,
    base: Option<&Path>,
    update: &ServiceUpdate,
    objects: &Objects,
) -> Result<PathBuf, ApplyError> {
    let commit = update.to.as_deref().ok_or_else(|| ApplyError::Malformed("removal has no tree to build".into()))?;
    let expected = update.tree.as_deref().ok_or_else(|| ApplyError::Malformed("update announces no tree id".into()))?;
    for entry in &update.entries {
        path::check_relative(&entry.path)?;
        if let Some(from) = &entry.from_path {
            path::check_relative(from)?;
        }
    }
    fs::create_dir_all(&layout.trees).map_err(io_at(&layout.trees))?;
    let final_dir = layout.tree_dir(commit);
    // A tree from an earlier attempt (crash after build) is reused only if it verifies.
    if final_dir.is_dir() {
        if tree_hash::tree_id(&final_dir).map_err(io_at(&final_dir))? == expected {
            return Ok(final_dir);
        }
        fs::remove_dir_all(&final_dir).map_err(io_at(&final_dir))?;
    }
    let tmp = layout.trees.join(format!(".{commit}.{}.tmp", std::process::id()));
    if tmp.exists() {
        fs::remove_dir_all(&tmp).map_err(io_at(&tmp))?;
    }
    fs::create_dir(&tmp).map_err(io_at(&tmp))?;
    let result = populate(&tmp, base, update, objects).and_then(|()| {
        let built = tree_hash::tree_id(&tmp).map_err(io_at(&tmp))?;
        if built != expected {
            return Err(ApplyError::Verify { expected: expected.to_owned(), built });
        }
        fs::rename(&tmp, &final_dir).map_err(io_at(&final_dir))?;
        sync_dir(&layout.trees)
    });
    if result.is_err() {
        let _ = fs::remove_dir_all(&tmp);
    }
    result.map(|()| final_dir)
}

/// Above this many written files, one `syncfs(2)` replaces a fsync per file and per
/// directory: same durability before the swap, far fewer disk flushes.
const SYNCFS_ABOVE: usize = 64;

fn populate(tmp: &Path, base: Option<&Path>, update: &ServiceUpdate, objects: &Objects) -> Result<(), ApplyError> {
    let mut dirty_dirs: BTreeSet<PathBuf> = BTreeSet::from([tmp.to_owned()]);
    let writes = update.entries.iter().filter(|e| matches!(e.change, ChangeKind::Add | ChangeKind::Modify)).count();
    let per_file_sync = writes <= SYNCFS_ABOVE;
    if let (Some(base), false) = (base, update.snapshot) {
        // Everything the update does not touch is carried over by hard link.
        let touched: BTreeSet<&[u8]> = update
            .entries
            .iter()
            .flat_map(|e| std::iter::once(&e.path[..]).chain(e.from_path.as_deref().map(|p| &p[..])))
            .collect();
        link_tree(base, tmp, &mut Vec::new(), &touched, &mut dirty_dirs)?;
    }
    for entry in &update.entries {
        let target = tmp.join(OsStr::from_bytes(&entry.path));
        match entry.change {
            ChangeKind::Delete => {}
            ChangeKind::Rename => {
                let base = base
                    .filter(|_| !update.snapshot)
                    .ok_or_else(|| ApplyError::Malformed("rename without a base tree".into()))?;
                let from =
                    entry.from_path.as_ref().ok_or_else(|| ApplyError::Malformed("rename without from_path".into()))?;
                let source = base.join(OsStr::from_bytes(from));
                ensure_parent(tmp, &target, &mut dirty_dirs)?;
                let meta = fs::symlink_metadata(&source).map_err(io_at(&source))?;
                if meta.file_type().is_symlink() {
                    let link = fs::read_link(&source).map_err(io_at(&source))?;
                    std::os::unix::fs::symlink(link, &target).map_err(io_at(&target))?;
                } else {
                    fs::hard_link(&source, &target).map_err(io_at(&target))?;
                }
            }
            ChangeKind::Add | ChangeKind::Modify => {
                ensure_parent(tmp, &target, &mut dirty_dirs)?;
                write_entry(entry, &target, objects, per_file_sync)?;
            }
        }
    }
    if per_file_sync {
        for dir in dirty_dirs {
            sync_dir(&dir)?;
        }
    } else {
        let root = File::open(tmp).map_err(io_at(tmp))?;
        nix::unistd::syncfs(&root).map_err(|e| ApplyError::Io { path: tmp.to_owned(), source: e.into() })?;
    }
    Ok(())
}

fn link_tree(
    from: &Path,
    to: &Path,
    rel: &mut Vec<u8>,
    touched: &BTreeSet<&[u8]>,
    dirty: &mut BTreeSet<PathBuf>,
) -> Result<(), ApplyError> {
    for entry in fs::read_dir(from).map_err(io_at(from))? {
        let entry = entry.map_err(io_at(from))?;
        let name = entry.file_name();
        let len = rel.len();
        if !rel.is_empty() {
            rel.push(b'/');
        }
        rel.extend_from_slice(name.as_bytes());
        let source = entry.path();
        let target = to.join(&name);
        let file_type = entry.file_type().map_err(io_at(&source))?;
        if file_type.is_dir() {
            link_tree(&source, &target, rel, touched, dirty)?;
        } else if !touched.contains(&rel[..]) {
            if let Some(parent) = target.parent() {
                if !parent.exists() {
                    fs::create_dir_all(parent).map_err(io_at(parent))?;
                    dirty.insert(parent.to_owned());
                }
            }
            if file_type.is_symlink() {
                let link = fs::read_link(&source).map_err(io_at(&source))?;
                std::os::unix::fs::symlink(link, &target).map_err(io_at(&target))?;
            } else {
                fs::hard_link(&source, &target).map_err(io_at(&target))?;
            }
        }
        rel.truncate(len);
    }
    Ok(())
}

fn ensure_parent(root: &Path, target: &Path, dirty: &mut BTreeSet<PathBuf>) -> Result<(), ApplyError> {
    let parent = target.parent().unwrap_or(root);
    if !parent.is_dir() {
        fs::create_dir_all(parent).map_err(io_at(parent))?;
        let mut p = parent;
        while p != root {
            dirty.insert(p.to_owned());
            p = match p.parent() {
                Some(p) => p,
                None => break,
            };
        }
    }
    dirty.insert(parent.to_owned());
    Ok(())
}

fn write_entry(entry: &Entry, target: &Path, objects: &Objects, sync: bool) -> Result<(), ApplyError> {
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
    match entry.mode.ok_or_else(|| ApplyError::Malformed("added entry without mode".into()))? {
        FileMode::Symlink => {
            path::check_symlink(&entry.path, content)?;
            std::os::unix::fs::symlink(OsStr::from_bytes(content), target).map_err(io_at(target))?;
        }
        mode => {
            let perm = if mode == FileMode::Executable { 0o755 } else { 0o644 };
            let mut file =
                OpenOptions::new().write(true).create_new(true).mode(perm).open(target).map_err(io_at(target))?;
            file.write_all(content).map_err(io_at(target))?;
            // The umask may have cleared bits; the mode is part of the verified tree.
            file.set_permissions(fs::Permissions::from_mode(perm)).map_err(io_at(target))?;
            if sync {
                file.sync_all().map_err(io_at(target))?;
            }
        }
    }
    Ok(())
}

fn sync_dir(dir: &Path) -> Result<(), ApplyError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io_at(dir))
}

/// Points `<dir>/<service>` at `tree` atomically.
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
    fs::rename(&tmp, &layout.link).map_err(io_at(&layout.link))?;
    sync_dir(parent)
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

/// Deletes all but the current tree and the [`KEEP_PREVIOUS`] most recent others.
pub fn prune(layout: &Layout) {
    let current = layout.current().and_then(|p| p.canonicalize().ok());
    let Ok(entries) = fs::read_dir(&layout.trees) else { return };
    let mut trees: Vec<(std::time::SystemTime, PathBuf)> = entries
        .filter_map(Result::ok)
        .filter(|e| !e.file_name().as_bytes().starts_with(b"."))
        .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
        .filter(|(_, p)| p.canonicalize().ok() != current)
        .collect();
    trees.sort();
    let excess = trees.len().saturating_sub(KEEP_PREVIOUS);
    for (_, old) in trees.into_iter().take(excess) {
        if let Err(e) = fs::remove_dir_all(&old) {
            tracing::warn!(path = %old.display(), error = %e, "cannot prune old tree");
        }
    }
}

/// What [`verify`] found for one service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Integrity {
    /// The tree on disk is the recorded one.
    Intact,
    /// `<dir>/<service>` is missing or points nowhere.
    Missing,
    /// The tree on disk hashes differently: a file was edited, added or deleted by hand.
    Altered {
        /// What it hashes to now.
        found: String,
    },
}

/// Hashes the tree behind `<dir>/<service>` and compares it with `expected`.
pub fn verify(layout: &Layout, expected: &str) -> Result<Integrity, ApplyError> {
    let Some(current) = layout.current() else {
        return Ok(Integrity::Missing);
    };
    let found = tree_hash::tree_id(&current).map_err(io_at(&current))?;
    Ok(if found == expected { Integrity::Intact } else { Integrity::Altered { found } })
}
