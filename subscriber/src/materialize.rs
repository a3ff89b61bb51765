//! Building a service's new tree on disk and switching to it atomically.
//!
//! A new tree is built beside the current one, as `<state>/trees/<service>/<commit>`,
//! everything is flushed with one `syncfs(2)`, and the tree's git id — computed from
//! the base's manifest plus the written files, read back from disk — must equal the
//! update's. Only then is `<dir>/<service>` — a symlink — replaced with one pointing at
//! the new tree, by `rename(2)`: a reader sees the old tree or the new one, never a mix.
//!
//! Two ways to build, both leaving the current tree and the one before it untouched:
//!
//! * **recycling** (the usual case once a service has had a few updates): the oldest
//!   kept tree that is neither current nor the previous one is renamed aside and brought
//!   to the new commit by changing only the paths where it differs — found by comparing
//!   its manifest with the new one, in memory. Files are never changed in place (trees
//!   share inodes by hard link): a differing path is unlinked and created anew, its
//!   content written from the update or hard-linked from the current tree. The cost
//!   grows with what changed since that tree's commit (the last two or three updates),
//!   not with the tree;
//! * **a hard-link farm**: a fresh directory where every file the update does not touch
//!   is hard-linked from the current tree — one `link(2)` per file. Used for the first
//!   updates of a service and whenever no tree can be recycled.
//!
//! Every entry is created, rewritten and removed relative to a handle on the directory
//! that holds it, reached from the tree's root without passing through any link
//! ([`crate::beneath::Dirs`]): a link a previous or recycled tree left where the new
//! tree has a directory fails the build, it is never followed. Before a tree is
//! switched to, its links, taken together, must stay inside it
//! (`confcast_schemas::path::Links`): the host does not trust the relay's check.

use std::collections::{BTreeSet, HashMap};
use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::BorrowedFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use confcast_schemas::{path, ChangeKind, Entry, FileMode, ServiceUpdate};
use nix::fcntl::{AtFlags, OFlag};
use nix::sys::stat::Mode;
use nix::unistd::UnlinkatFlags;

use crate::beneath::Dirs;
use crate::perms::Perms;
use crate::tree_hash;

/// How many trees per service are kept besides the current one, for rollback.
pub const KEEP_PREVIOUS: usize = 3;

/// Why an update could not be applied. The current tree is untouched in every case.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// The update names a path, or the tree holds a link, that would leave the
    /// service directory.
    #[error("refused: {0}")]
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

/// [`io_at`] for an entry of a tree, named by its path in the tree.
fn io_in<'a>(tree: &'a Path, rel: &'a [u8]) -> impl FnOnce(io::Error) -> ApplyError + 'a {
    move |source| ApplyError::Io { path: tree.join(OsStr::from_bytes(rel)), source }
}

/// [`io_in`] for an error of a system call.
fn errno_in<'a>(tree: &'a Path, rel: &'a [u8]) -> impl FnOnce(nix::errno::Errno) -> ApplyError + 'a {
    move |errno| io_in(tree, rel)(errno.into())
}

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
    pub fn for_service(dir: &Path, state_dir: &Path, kind: confcast_schemas::Kind, name: &str) -> Layout {
        Layout {
            trees: state_dir.join("trees").join(format!("{kind}-{}", confcast_schemas::subject::encode_token(name))),
            link: dir.join(name),
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

/// Content of entries stored in the object store, fetched before materializing.
pub type Objects = HashMap<String, Vec<u8>>;

/// Builds and verifies the tree of `update` from the tree of commit `base` (for a
/// diff) and returns its directory. Does not switch the link.
///
/// A diff is verified against the manifest of its base plus the files it wrote (read
/// back from disk), so its cost grows with the diff; unchanged files are hard links to
/// the base, which was verified when it was built and is re-hashed in full by the
/// integrity check. A snapshot is verified by hashing everything it wrote.
pub fn build(
    layout: &Layout,
    base: Option<&str>,
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
        let manifest = tree_hash::scan(&final_dir).map_err(io_at(&final_dir))?;
        if tree_hash::tree_id_of(&manifest) == expected {
            contained(&final_dir, &manifest)?;
            store_manifest(&layout.manifest(commit), Arc::new(manifest));
            return Ok(final_dir);
        }
        fs::remove_dir_all(&final_dir).map_err(io_at(&final_dir))?;
    }
    let base = if update.snapshot { None } else { base };
    // Pruning runs in the background: it must not take a tree being recycled.
    let _lock = lock_trees(layout)?;
    clear_leftovers(layout, RECYCLING);
    if let Some(b) = base {
        if let Some(recycled) = recycle(layout, b, update, objects, expected, &final_dir)? {
            return Ok(recycled);
        }
    }
    let base_manifest = match base {
        Some(b) => Some(match manifest_at(&layout.manifest(b)) {
            Some(manifest) => manifest,
            None => Arc::new(tree_hash::scan(&layout.tree_dir(b)).map_err(io_at(&layout.tree_dir(b)))?),
        }),
        None => None,
    };
    // Built in place: nothing reads `<trees>/<commit>` before the link is swapped to it,
    // and a half-built one left by a crash fails verification above and is rebuilt.
    let dir = &final_dir;
    fs::create_dir(dir).map_err(io_at(dir))?;
    let result = (|| {
        set_root_perms(dir, &layout.perms)?;
        let manifest = match (base, &base_manifest) {
            (Some(b), Some(m)) => {
                populate(dir, Some((&layout.tree_dir(b), m)), update, objects, &layout.perms)?;
                derive(m, update, dir)?
            }
            _ => {
                populate(dir, None, update, objects, &layout.perms)?;
                tree_hash::scan(dir).map_err(io_at(dir))?
            }
        };
        let built = tree_hash::tree_id_of(&manifest);
        if built != expected {
            return Err(ApplyError::Verify { expected: expected.to_owned(), built });
        }
        contained(dir, &manifest)?;
        store_manifest(&layout.manifest(commit), Arc::new(manifest));
        stamp(dir);
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_dir_all(dir);
    }
    result.map(|()| final_dir)
}

/// Refuses a tree whose links, followed through one another as the kernel would, lead
/// outside it. Only the links are read (the manifest says which entries they are).
fn contained(dir: &Path, manifest: &tree_hash::Manifest) -> Result<(), ApplyError> {
    let mut links = path::Links::new();
    let mut dirs: Option<Dirs> = None;
    for (rel, (mode, _)) in manifest {
        if *mode != "120000" {
            continue;
        }
        let dirs = match &mut dirs {
            Some(dirs) => dirs,
            None => dirs.insert(Dirs::open(dir, None).map_err(io_at(dir))?),
        };
        let (parent, name) = dirs.parent(rel).map_err(io_in(dir, rel))?;
        let target = nix::fcntl::readlinkat(parent, name).map_err(errno_in(dir, rel))?;
        links.insert(rel.clone(), target.as_bytes());
    }
    Ok(links.check()?)
}

/// Gives the root of a new tree the directories' owner and mode.
fn set_root_perms(dir: &Path, perms: &Perms) -> Result<(), ApplyError> {
    if perms.chown() {
        std::os::unix::fs::chown(dir, perms.owner.map(|u| u.as_raw()), perms.group.map(|g| g.as_raw()))
            .map_err(io_at(dir))?;
    }
    if let Some(mode) = perms.dir_mode {
        fs::set_permissions(dir, fs::Permissions::from_mode(mode)).map_err(io_at(dir))?;
    }
    Ok(())
}

/// The manifests of the last trees built or read, kept in memory: reading a large
/// tree's manifest from disk costs more than the rest of a one-file update.
static MANIFESTS: std::sync::Mutex<Vec<(PathBuf, Arc<tree_hash::Manifest>)>> = std::sync::Mutex::new(Vec::new());
/// How many manifests [`MANIFESTS`] holds (a few per service: current, previous,
/// recyclable).
const MANIFESTS_KEPT: usize = 16;

/// The manifest at `path`, from memory or disk.
fn manifest_at(path: &Path) -> Option<Arc<tree_hash::Manifest>> {
    {
        let cache = MANIFESTS.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, manifest)) = cache.iter().find(|(p, _)| p == path) {
            return Some(manifest.clone());
        }
    }
    let manifest = Arc::new(tree_hash::read_manifest(path)?);
    remember(path, manifest.clone());
    Some(manifest)
}

/// Writes the manifest beside its tree and keeps it in memory.
fn store_manifest(path: &Path, manifest: Arc<tree_hash::Manifest>) {
    // A cache: if it is lost, the next diff scans the tree instead.
    let _ = tree_hash::write_manifest(path, &manifest);
    remember(path, manifest);
}

fn remember(path: &Path, manifest: Arc<tree_hash::Manifest>) {
    let mut cache = MANIFESTS.lock().unwrap_or_else(|e| e.into_inner());
    cache.retain(|(p, _)| p != path);
    cache.push((path.to_owned(), manifest));
    if cache.len() > MANIFESTS_KEPT {
        cache.remove(0);
    }
}

/// Removes a manifest from disk and memory.
fn forget_manifest(path: &Path) {
    uncache_manifest(path);
    let _ = fs::remove_file(path);
}

/// Drops a manifest from memory only.
fn uncache_manifest(path: &Path) {
    MANIFESTS.lock().unwrap_or_else(|e| e.into_inner()).retain(|(p, _)| p != path);
}

/// Marks a tree as built now: trees are pruned and recycled oldest first.
fn stamp(tree: &Path) {
    let _ = File::open(tree).and_then(|d| d.set_modified(std::time::SystemTime::now()));
}

/// Prefix of a tree being recycled: hidden from pruning and never a link target.
const RECYCLING: &str = ".recycling-";

/// Removes the trees a crash left set aside under `prefix` (recycling or pruning).
fn clear_leftovers(layout: &Layout, prefix: &str) {
    let Ok(entries) = fs::read_dir(&layout.trees) else { return };
    for entry in entries.filter_map(Result::ok) {
        if entry.file_name().as_bytes().starts_with(prefix.as_bytes()) {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

/// The service's kept trees other than the current one, oldest built first (by their
/// root's mtime, set by [`stamp`]), with their commits. Hidden entries (the lock,
/// trees set aside) are not trees.
fn kept_trees(layout: &Layout) -> Vec<(PathBuf, String)> {
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

/// The manifest the update leads to from `base`, from the update alone (modes and
/// blob ids it announces): what the recycled tree must become.
fn target_manifest(base: &tree_hash::Manifest, update: &ServiceUpdate) -> Result<tree_hash::Manifest, ApplyError> {
    with_entries(base, update, |entry| {
        let mode = entry.mode.ok_or_else(|| ApplyError::Malformed("added entry without mode".into()))?;
        let blob = entry.blob.as_deref().and_then(|b| hex::decode(b).ok()).and_then(|b| b.try_into().ok());
        let blob: tree_hash::ObjectId =
            blob.ok_or_else(|| ApplyError::Malformed("added entry without a valid blob id".into()))?;
        Ok((mode.git_mode(), blob))
    })
}

/// `base` with the update's deletions and renames, and `item(entry)` for what it adds
/// or modifies.
fn with_entries(
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

/// Paths of `old` that are not in `new` as they are, and paths of `new` not in `old`
/// as they are: one merge of the two sorted manifests.
fn differences<'a>(old: &'a tree_hash::Manifest, new: &'a tree_hash::Manifest) -> (Vec<&'a Vec<u8>>, Vec<&'a Vec<u8>>) {
    let (mut gone, mut come) = (Vec::new(), Vec::new());
    let (mut a, mut b) = (old.iter().peekable(), new.iter().peekable());
    loop {
        match (a.peek(), b.peek()) {
            (None, None) => break,
            (Some((p, _)), None) => {
                gone.push(*p);
                a.next();
            }
            (None, Some((p, _))) => {
                come.push(*p);
                b.next();
            }
            (Some((pa, ia)), Some((pb, ib))) => match pa.cmp(pb) {
                std::cmp::Ordering::Less => {
                    gone.push(*pa);
                    a.next();
                }
                std::cmp::Ordering::Greater => {
                    come.push(*pb);
                    b.next();
                }
                std::cmp::Ordering::Equal => {
                    if ia != ib {
                        gone.push(*pa);
                        come.push(*pb);
                    }
                    a.next();
                    b.next();
                }
            },
        }
    }
    (gone, come)
}

/// The oldest kept tree that is neither current, nor `base`, nor the newest of the
/// others (the one current before: applications may still be reading it), with its
/// manifest.
fn recyclable(layout: &Layout, base: &str) -> Option<(PathBuf, String, Arc<tree_hash::Manifest>)> {
    let mut trees = kept_trees(layout);
    trees.retain(|(_, commit)| commit != base);
    trees.pop();
    trees.into_iter().find_map(|(dir, commit)| {
        let manifest = manifest_at(&layout.manifest(&commit))?;
        Some((dir, commit, manifest))
    })
}

/// Builds the update's tree by recycling an old tree of the service (see the module
/// docs); `None` when there is none to recycle.
fn recycle(
    layout: &Layout,
    base: &str,
    update: &ServiceUpdate,
    objects: &Objects,
    expected: &str,
    final_dir: &Path,
) -> Result<Option<PathBuf>, ApplyError> {
    let Some(base_manifest) = manifest_at(&layout.manifest(base)) else { return Ok(None) };
    let Some((old_dir, old_commit, old)) = recyclable(layout, base) else { return Ok(None) };
    let target = target_manifest(&base_manifest, update)?;
    let built = tree_hash::tree_id_of(&target);
    if built != expected {
        return Err(ApplyError::Verify { expected: expected.to_owned(), built });
    }
    let commit = update.to.as_deref().unwrap_or_default();
    let work = layout.trees.join(format!("{RECYCLING}{commit}"));
    fs::rename(&old_dir, &work).map_err(io_at(&old_dir))?;
    // The recycled tree's manifest file becomes the new manifest's temporary file, so
    // no inode is freed and another allocated for it (see `state::put_in_place`).
    let old_manifest = layout.manifest(&old_commit);
    uncache_manifest(&old_manifest);
    if fs::rename(&old_manifest, layout.manifest(commit).with_extension("tmp")).is_err() {
        let _ = fs::remove_file(&old_manifest);
    }
    let result = (|| {
        let base_dir = layout.tree_dir(base);
        let written: HashMap<&[u8], &Entry> = update
            .entries
            .iter()
            .filter(|e| matches!(e.change, ChangeKind::Add | ChangeKind::Modify))
            .map(|e| (&e.path[..], e))
            .collect();
        // Paths to go (or to be replaced), then paths to come: deletions first, so a
        // file may become a directory and back.
        let (gone, come) = differences(&old, &target);
        let mut removing = Dirs::open(&work, None).map_err(io_at(&work))?;
        // A file whose content changes is rewritten in its own inode when nothing else
        // shares that inode (trees share unchanged files by hard link, so only a file
        // with a single link is this tree's alone): no inode freed and another allocated.
        let mut rewritten: BTreeSet<&[u8]> = BTreeSet::new();
        for path in &come {
            let regular = |mode: &str| mode != "120000";
            if old.get(&path[..]).is_some_and(|(mode, _)| regular(mode))
                && target.get(&path[..]).is_some_and(|(mode, _)| regular(mode))
                && written.contains_key(&path[..])
            {
                let Ok((parent, name)) = removing.parent(path) else { continue };
                let alone = nix::sys::stat::fstatat(parent, name, AtFlags::AT_SYMLINK_NOFOLLOW)
                    .is_ok_and(|st| st.st_mode & nix::libc::S_IFMT == nix::libc::S_IFREG && st.st_nlink == 1);
                if alone {
                    rewritten.insert(&path[..]);
                }
            }
        }
        for path in &gone {
            if rewritten.contains(&path[..]) {
                continue;
            }
            let (parent, name) = removing.parent(path).map_err(io_in(&work, path))?;
            nix::unistd::unlinkat(parent, name, UnlinkatFlags::NoRemoveDir).map_err(errno_in(&work, path))?;
        }
        // Directories left empty go too (git trees hold none), deepest first.
        let mut emptied: Vec<&[u8]> = gone
            .iter()
            .flat_map(|p| p.iter().enumerate().filter(|(_, &b)| b == b'/').map(move |(i, _)| &p[..i]))
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        emptied.sort_by_key(|p| std::cmp::Reverse(p.iter().filter(|&&b| b == b'/').count()));
        for dir in emptied {
            if let Ok((parent, name)) = removing.parent(dir) {
                let _ = nix::unistd::unlinkat(parent, name, UnlinkatFlags::RemoveDir);
            }
        }
        drop(removing);
        let mut writing = Dirs::open(&work, Some(layout.perms.dirs())).map_err(io_at(&work))?;
        let mut carried: Option<Dirs> = None;
        for path in &come {
            let (parent, name) = writing.parent(path).map_err(io_in(&work, path))?;
            let at = work.join(OsStr::from_bytes(path));
            match written.get(&path[..]) {
                Some(entry) if rewritten.contains(&path[..]) => {
                    rewrite_entry(entry, parent, name, &at, objects, &layout.perms)?
                }
                Some(entry) => write_entry(entry, parent, name, &at, objects, &layout.perms)?,
                // Unchanged by this update but different in the recycled tree: the
                // current tree has it as it must be.
                None => {
                    let source = match &mut carried {
                        Some(dirs) => dirs,
                        None => carried.insert(Dirs::open(&base_dir, None).map_err(io_at(&base_dir))?),
                    };
                    let (from, from_name) = source.parent(path).map_err(io_in(&base_dir, path))?;
                    nix::unistd::linkat(from, from_name, parent, name, AtFlags::empty())
                        .map_err(errno_in(&base_dir, path))?;
                }
            }
            // What is on disk now must be what the manifest says.
            let found = tree_hash::entry_id_at(parent, name, &at).map_err(io_at(&at))?;
            if Some(&found) != target.get(&path[..]) {
                return Err(ApplyError::Verify {
                    expected: expected.to_owned(),
                    built: format!("a tree where {} differs", String::from_utf8_lossy(path)),
                });
            }
        }
        contained(&work, &target)?;
        flush(&work)?;
        stamp(&work);
        fs::rename(&work, final_dir).map_err(io_at(final_dir))?;
        store_manifest(&layout.manifest(commit), Arc::new(target));
        Ok(())
    })();
    match result {
        Ok(()) => {
            tracing::debug!(commit, recycled = old_commit, "built by recycling an old tree");
            Ok(Some(final_dir.to_owned()))
        }
        Err(e) => {
            let _ = fs::remove_dir_all(&work);
            Err(e)
        }
    }
}

/// The manifest of `base` with the update's changes, the written entries hashed from
/// what is on disk now.
fn derive(base: &tree_hash::Manifest, update: &ServiceUpdate, tmp: &Path) -> Result<tree_hash::Manifest, ApplyError> {
    let dirs = std::cell::RefCell::new(Dirs::open(tmp, None).map_err(io_at(tmp))?);
    with_entries(base, update, |entry| {
        let mut dirs = dirs.borrow_mut();
        let (parent, name) = dirs.parent(&entry.path).map_err(io_in(tmp, &entry.path))?;
        let shown = tmp.join(OsStr::from_bytes(&entry.path));
        tree_hash::entry_id_at(parent, name, &shown).map_err(io_at(&shown))
    })
}

fn populate(
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
            handles.into_iter().try_for_each(|h| {
                h.join().unwrap_or_else(|_| Err(ApplyError::Malformed("link worker panicked".into())))
            })
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
                write_entry(entry, parent, name, &target, objects, perms)?;
            }
        }
    }
    // One flush of the file system makes every file and directory entry durable before
    // the link is swapped; far cheaper than a fsync per file and per directory.
    flush(tmp)
}

/// Flushes the file system holding `dir` (everything written so far is on disk when
/// this returns) with `syncfs(2)`, shared by every caller in this process: a caller
/// waits for the next flush to start, and one flush serves all callers waiting for it.
/// A lone subscriber flushes exactly as before; many subscribers in one process (or
/// several trees built at once) wait for one flush together instead of queueing one
/// each on the same disk.
fn flush(dir: &Path) -> Result<(), ApplyError> {
    let io = |e: io::Error| ApplyError::Io { path: dir.to_owned(), source: e };
    let root = File::open(dir).map_err(io)?;
    let device = root.metadata().map_err(io)?.dev();
    let group = FLUSHES.lock().unwrap_or_else(|e| e.into_inner()).entry(device).or_default().clone();
    let mut state = group.state.lock().unwrap_or_else(|e| e.into_inner());
    // A flush already running may have started before this caller's writes ended:
    // only one that starts from now on covers them.
    let ticket = state.started + 1;
    loop {
        if state.finished >= ticket {
            return match &state.failed {
                Some((flush, message)) if *flush >= ticket => Err(io(io::Error::other(message.clone()))),
                _ => Ok(()),
            };
        }
        if !state.running {
            state.running = true;
            state.started += 1;
            let flush = state.started;
            drop(state);
            let result = nix::unistd::syncfs(&root);
            state = group.state.lock().unwrap_or_else(|e| e.into_inner());
            state.running = false;
            state.finished = flush;
            if let Err(e) = result {
                state.failed = Some((flush, format!("syncfs: {e}")));
            }
            group.done.notify_all();
            continue;
        }
        state = group.done.wait(state).unwrap_or_else(|e| e.into_inner());
    }
}

/// The flushes of one file system (see [`flush`]).
#[derive(Default)]
struct Flushes {
    state: std::sync::Mutex<FlushState>,
    done: std::sync::Condvar,
}

#[derive(Default)]
struct FlushState {
    /// Flushes started and finished so far; at most one runs at a time.
    started: u64,
    finished: u64,
    running: bool,
    /// The last flush that failed, and why.
    failed: Option<(u64, String)>,
}

static FLUSHES: std::sync::LazyLock<std::sync::Mutex<HashMap<u64, Arc<Flushes>>>> =
    std::sync::LazyLock::new(Default::default);

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

/// Creates the entry `name` in the directory `dir` (`shown` names it in errors), never
/// through a link: `O_EXCL | O_NOFOLLOW`, `symlinkat(2)`.
fn write_entry(
    entry: &Entry,
    dir: BorrowedFd<'_>,
    name: &OsStr,
    shown: &Path,
    objects: &Objects,
    perms: &Perms,
) -> Result<(), ApplyError> {
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

/// Replaces the content and mode of the regular file `name` in `dir`, which nothing
/// else links to, with the entry's (a regular file too).
fn rewrite_entry(
    entry: &Entry,
    dir: BorrowedFd<'_>,
    name: &OsStr,
    shown: &Path,
    objects: &Objects,
    perms: &Perms,
) -> Result<(), ApplyError> {
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
    // Not flushed here: the tree it points to already is (the link never points at
    // anything a crash could lose), and the position saved next flushes after it. If a
    // crash keeps the link but loses that position, the host finds at start that its
    // link and its position disagree, and bootstraps the service from its snapshot.
    fs::rename(&tmp, &layout.link).map_err(io_at(&layout.link))
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

/// Holds the service's trees against concurrent building and pruning.
fn lock_trees(layout: &Layout) -> Result<File, ApplyError> {
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
pub fn prune(layout: &Layout) {
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
                forget_manifest(&old.with_extension("manifest"));
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
    /// The content is intact, but an entry's owner, group or mode is not what the
    /// service's `--owner`/`--group`/`--file-mode`/`--dir-mode` say.
    Permissions {
        /// The first entry that differs, and how.
        problem: String,
    },
}

/// Sets the service's owner, group and modes again on the tree behind
/// `<dir>/<service>` (after [`Integrity::Permissions`]).
pub fn restore_perms(layout: &Layout) -> Result<(), ApplyError> {
    let current = layout.current().ok_or_else(|| ApplyError::Occupied(layout.link.clone()))?;
    layout.perms.apply(&current).map_err(io_at(&current))
}

/// Hashes the tree behind `<dir>/<service>` and compares it with `expected`, then
/// checks owners and modes.
pub fn verify(layout: &Layout, expected: &str) -> Result<Integrity, ApplyError> {
    let Some(current) = layout.current() else {
        return Ok(Integrity::Missing);
    };
    let found = tree_hash::tree_id(&current).map_err(io_at(&current))?;
    if found != expected {
        return Ok(Integrity::Altered { found });
    }
    // Without settings, files are still checked for git's 0644/0755 (nothing else
    // writes them); directories and owners are what the subscriber's user made them.
    if let Some(problem) = layout.perms.check(&current).map_err(io_at(&current))? {
        return Ok(Integrity::Permissions { problem });
    }
    Ok(Integrity::Intact)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flushes_started(dir: &Path) -> u64 {
        let device = fs::metadata(dir).expect("dir").dev();
        let group = FLUSHES.lock().expect("flushes").get(&device).cloned().expect("a flush ran");
        let started = group.state.lock().expect("state").started;
        started
    }

    #[test]
    fn a_caller_alone_always_gets_a_flush_of_its_own() {
        let dir = tempfile::tempdir().expect("tempdir");
        flush(dir.path()).expect("flush");
        let before = flushes_started(dir.path());
        flush(dir.path()).expect("flush");
        flush(dir.path()).expect("flush");
        // Other tests may flush the same file system meanwhile: at least two more.
        assert!(flushes_started(dir.path()) >= before + 2);
    }

    #[test]
    fn callers_at_once_share_flushes_and_all_return() {
        let dir = tempfile::tempdir().expect("tempdir");
        flush(dir.path()).expect("flush");
        let before = flushes_started(dir.path());
        let callers = 32;
        let barrier = std::sync::Barrier::new(callers);
        std::thread::scope(|scope| {
            for i in 0..callers {
                let (dir, barrier) = (dir.path(), &barrier);
                scope.spawn(move || {
                    fs::write(dir.join(format!("f{i}")), b"x").expect("write");
                    barrier.wait();
                    flush(dir).expect("flush");
                });
            }
        });
        let flushes = flushes_started(dir.path()) - before;
        assert!((1..=callers as u64).contains(&flushes), "{flushes} flushes for {callers} callers");
    }
}
