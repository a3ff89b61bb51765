//! Building a service's new tree on disk and switching to it atomically.
//!
//! A new tree is built beside the current one, as `<state>/trees/<service>/<commit>`,
//! and the tree's git id — computed from the base's manifest plus the written files,
//! read back from disk — must equal the update's ([`Materializer::stage`]). Everything
//! is flushed with one `syncfs(2)` per file system — one for every tree staged at once,
//! however many services they are of ([`Materializer::flush`]). Only then is
//! `<dir>/<service>` — a symlink — replaced with one pointing at the new tree, by
//! `rename(2)`: a reader sees the old tree or the new one, never a mix. A [`Staged`]
//! tree cannot be switched to: only [`Materializer::flush`] gives its directory.
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
//!   not with the tree. Several updates of one service applied in one step build each
//!   commit in turn, the next recycling the one before last, which was never switched
//!   to;
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
//!
//! What one build leaves for the next — the manifests of recent trees
//! (`manifests.rs`) and the file systems' flushes (`flush.rs`) — is a [`Materializer`],
//! owned by the host that builds. The rest is one concern a file: where a service's
//! trees are (`layout.rs`), building by recycling (`recycle.rs`) or by hard-link farm
//! (`farm.rs`), writing one entry (`entries.rs`), the atomic switch (`switch.rs`), the
//! kept trees and their pruning (`prune.rs`), and checking what is on disk (`verify.rs`).

mod entries;
mod farm;
mod flush;
mod layout;
mod manifests;
mod prune;
mod recycle;
mod switch;
mod verify;

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use confcast_schemas::{path, ServiceUpdate};

use crate::beneath::Dirs;
use crate::perms::Perms;
use crate::tree_hash;

pub use flush::Flushes;
pub use layout::Layout;
pub use switch::{switch, unlink};
pub use verify::{restore_perms, verify, Integrity};

use manifests::Manifests;

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
        #[source]
        source: io::Error,
    },
    /// The file system could not be flushed: what was written may not be on disk.
    #[error("{path}: syncfs: {source}")]
    Flush {
        /// The tree being flushed.
        path: PathBuf,
        /// What.
        #[source]
        source: io::Error,
    },
    /// A thread linking files into the new tree panicked.
    #[error("a link worker panicked")]
    LinkWorker,
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

/// Content of entries stored in the object store, fetched before materializing.
pub type Objects = HashMap<String, Vec<u8>>;

/// What a build starts from.
#[derive(Debug, Clone, Copy, Default)]
pub struct Start<'a> {
    /// The commit whose tree a diff applies to (ignored for a snapshot).
    pub base: Option<&'a str>,
    /// A tree of the service built earlier in the same step and never switched to
    /// (nothing reads it): recycled in preference to the kept trees, which the
    /// previous current tree is among.
    pub spare: Option<&'a str>,
}

/// A tree built and verified but not flushed yet: what was written may not be on
/// disk, so it cannot be switched to until [`Materializer::flush`] gives its directory.
#[derive(Debug)]
#[must_use = "a staged tree is flushed before it is switched to"]
pub struct Staged(PathBuf);

/// What building a host's trees keeps from one build to the next: the manifests of its
/// recent trees, and the flushes of the file systems they are on. Created by the host
/// (see [`crate::host`]); cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Materializer {
    manifests: Arc<Manifests>,
    flushes: Flushes,
}

impl Materializer {
    /// A materializer whose trees share `flushes` with every other holder of them (the
    /// subscribers of one process).
    pub fn new(flushes: Flushes) -> Materializer {
        Materializer { manifests: Arc::default(), flushes }
    }

    /// Builds, verifies and flushes the tree of `update` from the tree of commit `base`
    /// (for a diff) and returns its directory, ready to be switched to ([`switch`]).
    pub fn build(
        &self,
        layout: &Layout,
        base: Option<&str>,
        update: &ServiceUpdate,
        objects: &Objects,
    ) -> Result<PathBuf, ApplyError> {
        let staged = self.stage(layout, Start { base, spare: None }, update, objects)?;
        let (mut dirs, _) = self.flush(vec![staged])?;
        Ok(dirs.pop().expect("flush gives back every tree it is given"))
    }

    /// Builds and verifies the tree of `update` from `start` (the tree of its base
    /// commit, for a diff), without flushing it: see [`Materializer::flush`].
    ///
    /// A diff is verified against the manifest of its base plus the files it wrote (read
    /// back from disk), so its cost grows with the diff; unchanged files are hard links to
    /// the base, which was verified when it was built and is re-hashed in full by the
    /// integrity check. A snapshot is verified by hashing everything it wrote.
    pub fn stage(
        &self,
        layout: &Layout,
        start: Start<'_>,
        update: &ServiceUpdate,
        objects: &Objects,
    ) -> Result<Staged, ApplyError> {
        let commit =
            update.to.as_deref().ok_or_else(|| ApplyError::Malformed("removal has no tree to build".into()))?;
        let expected =
            update.tree.as_deref().ok_or_else(|| ApplyError::Malformed("update announces no tree id".into()))?;
        for entry in &update.entries {
            path::check_relative(&entry.path)?;
            if let Some(from) = &entry.from_path {
                path::check_relative(from)?;
            }
        }
        fs::create_dir_all(&layout.trees).map_err(io_at(&layout.trees))?;
        let final_dir = layout.tree_dir(commit);
        // A tree from an earlier attempt (crash after build, or staged earlier in the
        // same batch) is reused only if it verifies; it is flushed like a new one.
        if final_dir.is_dir() {
            let manifest = tree_hash::scan(&final_dir).map_err(io_at(&final_dir))?;
            if tree_hash::tree_id_of(&manifest) == expected {
                contained(&final_dir, &manifest)?;
                self.manifests.store(&layout.manifest(commit), Arc::new(manifest));
                return Ok(Staged(final_dir));
            }
            fs::remove_dir_all(&final_dir).map_err(io_at(&final_dir))?;
        }
        let base = if update.snapshot { None } else { start.base };
        // Pruning runs in the background: it must not take a tree being recycled.
        let _lock = prune::lock_trees(layout)?;
        prune::clear_leftovers(layout, prune::RECYCLING);
        if let Some(base) = base {
            let from = recycle::Sources { base, spare: start.spare };
            if let Some(recycled) =
                recycle::recycle(&self.manifests, layout, from, update, objects, expected, &final_dir)?
            {
                return Ok(Staged(recycled));
            }
        }
        self.build_farm(layout, base, update, objects, expected)?;
        Ok(Staged(final_dir))
    }

    /// Flushes the file systems of `staged` trees, one `syncfs(2)` per file system
    /// however many trees it holds, and returns their directories, in the same order,
    /// now safe to switch to, with how many file systems were flushed. On failure none
    /// of them may be switched to.
    pub fn flush(&self, staged: Vec<Staged>) -> Result<(Vec<PathBuf>, usize), ApplyError> {
        let dirs: Vec<PathBuf> = staged.into_iter().map(|Staged(dir)| dir).collect();
        let flushes = self.flushes.flush_all(dirs.iter().map(PathBuf::as_path))?;
        Ok((dirs, flushes))
    }

    /// Builds the update's tree as a hard-link farm of the tree of `base` (or from
    /// nothing), in place: nothing reads `<trees>/<commit>` before the link is swapped
    /// to it, and a half-built one left by a crash fails verification and is rebuilt.
    fn build_farm(
        &self,
        layout: &Layout,
        base: Option<&str>,
        update: &ServiceUpdate,
        objects: &Objects,
        expected: &str,
    ) -> Result<(), ApplyError> {
        let commit = update.to.as_deref().unwrap_or_default();
        let base = match base {
            Some(b) => Some(match self.manifests.at(&layout.manifest(b)) {
                Some(manifest) => (layout.tree_dir(b), manifest),
                None => (
                    layout.tree_dir(b),
                    Arc::new(tree_hash::scan(&layout.tree_dir(b)).map_err(io_at(&layout.tree_dir(b)))?),
                ),
            }),
            None => None,
        };
        let dir = &layout.tree_dir(commit);
        fs::create_dir(dir).map_err(io_at(dir))?;
        let result = (|| {
            set_root_perms(dir, &layout.perms)?;
            let base = base.as_ref().map(|(dir, manifest)| (dir.as_path(), &**manifest));
            farm::populate(dir, base, update, objects, &layout.perms)?;
            let manifest = match base {
                Some((_, manifest)) => farm::derive(manifest, update, dir)?,
                None => tree_hash::scan(dir).map_err(io_at(dir))?,
            };
            let built = tree_hash::tree_id_of(&manifest);
            if built != expected {
                return Err(ApplyError::Verify { expected: expected.to_owned(), built });
            }
            contained(dir, &manifest)?;
            self.manifests.store(&layout.manifest(commit), Arc::new(manifest));
            prune::stamp(dir);
            Ok(())
        })();
        if result.is_err() {
            let _ = fs::remove_dir_all(dir);
        }
        result
    }

    /// Deletes all but the current tree and the [`KEEP_PREVIOUS`] most recent others
    /// (see `prune.rs`).
    pub fn prune(&self, layout: &Layout) {
        prune::prune(layout, &self.manifests);
    }
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
