//! Building a tree by recycling an old one of the service: only the paths where it
//! differs from the new commit are changed (see the module docs of [`super`]).

use std::collections::{BTreeSet, HashMap};
use std::ffi::OsStr;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use confcast_schemas::{ChangeKind, Entry, ServiceUpdate};
use nix::fcntl::AtFlags;
use nix::unistd::UnlinkatFlags;

use super::entries::{rewrite_entry, with_entries, write_entry, At};
use super::manifests::Manifests;
use super::prune::{kept_trees, stamp, RECYCLING};
use super::{contained, errno_in, io_at, io_in, ApplyError, Layout, Objects};
use crate::beneath::Dirs;
use crate::perms::Perms;
use crate::tree_hash::{self, Manifest};

/// The manifest the update leads to from `base`, from the update alone (modes and
/// blob ids it announces): what the recycled tree must become.
fn target_manifest(base: &Manifest, update: &ServiceUpdate) -> Result<Manifest, ApplyError> {
    with_entries(base, update, |entry| {
        let mode = entry.mode.ok_or_else(|| ApplyError::Malformed("added entry without mode".into()))?;
        let blob = entry.blob.as_deref().and_then(|b| hex::decode(b).ok()).and_then(|b| b.try_into().ok());
        let blob: tree_hash::ObjectId =
            blob.ok_or_else(|| ApplyError::Malformed("added entry without a valid blob id".into()))?;
        Ok((mode.git_mode(), blob))
    })
}

/// Paths of `old` that are not in `new` as they are, and paths of `new` not in `old`
/// as they are: one merge of the two sorted manifests.
fn differences<'a>(old: &'a Manifest, new: &'a Manifest) -> (Vec<&'a Vec<u8>>, Vec<&'a Vec<u8>>) {
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

/// The tree to recycle, with its commit and manifest: `spare` if given (a tree built
/// earlier in the same batch and never switched to, so nothing reads it), else the
/// oldest kept tree that is neither current, nor `base`, nor the newest of the others
/// (the one current before: applications may still be reading it; see
/// [`super::switch`]). `None` when there is none.
fn recyclable(
    manifests: &Manifests,
    layout: &Layout,
    base: &str,
    spare: Option<&str>,
) -> Option<(PathBuf, String, Arc<Manifest>)> {
    if let Some(spare) = spare {
        let current = layout.current().and_then(|p| p.file_name().map(|n| n.as_bytes() == spare.as_bytes()));
        if spare == base || current == Some(true) {
            return None;
        }
        let dir = layout.tree_dir(spare);
        return manifests.at(&layout.manifest(spare)).filter(|_| dir.is_dir()).map(|m| (dir, spare.to_owned(), m));
    }
    let mut trees = kept_trees(layout);
    trees.retain(|(_, commit)| commit != base);
    trees.pop();
    trees.into_iter().find_map(|(dir, commit)| {
        let manifest = manifests.at(&layout.manifest(&commit))?;
        Some((dir, commit, manifest))
    })
}

/// What a recycling build starts from: the commit in place (or staged) whose tree the
/// update applies to, and a tree to recycle in preference to the kept ones.
pub(super) struct Sources<'a> {
    pub(super) base: &'a str,
    pub(super) spare: Option<&'a str>,
}

/// Builds the update's tree by recycling an old tree of the service (see the module
/// docs); `None` when there is none to recycle. Not flushed (see
/// [`super::Materializer::flush`]).
pub(super) fn recycle(
    manifests: &Manifests,
    layout: &Layout,
    Sources { base, spare }: Sources<'_>,
    update: &ServiceUpdate,
    objects: &Objects,
    expected: &str,
    final_dir: &Path,
) -> Result<Option<PathBuf>, ApplyError> {
    let Some(base_manifest) = manifests.at(&layout.manifest(base)) else { return Ok(None) };
    let Some((old_dir, old_commit, old)) = recyclable(manifests, layout, base, spare) else { return Ok(None) };
    let target = target_manifest(&base_manifest, update)?;
    let built = tree_hash::tree_id_of(&target);
    if built != expected {
        return Err(ApplyError::Verify { expected: expected.to_owned(), built });
    }
    let commit = update.to.as_deref().unwrap_or_default();
    let work = layout.trees.join(format!("{RECYCLING}{commit}"));
    fs::rename(&old_dir, &work).map_err(io_at(&old_dir))?;
    // The recycled tree's manifest file becomes the new manifest's temporary file, so
    // no inode is freed and another allocated for it (see `position::put_in_place`).
    let old_manifest = layout.manifest(&old_commit);
    manifests.uncache(&old_manifest);
    if fs::rename(&old_manifest, layout.manifest(commit).with_extension("tmp")).is_err() {
        let _ = fs::remove_file(&old_manifest);
    }
    let rebuild = Rebuild {
        work: &work,
        base_dir: layout.tree_dir(base),
        old: &old,
        target: &target,
        written: update
            .entries
            .iter()
            .filter(|e| matches!(e.change, ChangeKind::Add | ChangeKind::Modify))
            .map(|e| (&e.path[..], e))
            .collect(),
        moved: update
            .entries
            .iter()
            .filter(|e| e.change == ChangeKind::Rename)
            .filter_map(|e| Some((&e.path[..], &e.from_path.as_ref()?[..])))
            .collect(),
        objects,
        perms: &layout.perms,
        expected,
    };
    let result = (|| {
        rebuild.run()?;
        contained(&work, &target)?;
        stamp(&work);
        fs::rename(&work, final_dir).map_err(io_at(final_dir))
    })();
    match result {
        Ok(()) => {
            manifests.store(&layout.manifest(commit), Arc::new(target));
            tracing::debug!(commit, recycled = old_commit, "built by recycling an old tree");
            Ok(Some(final_dir.to_owned()))
        }
        Err(e) => {
            let _ = fs::remove_dir_all(&work);
            Err(e)
        }
    }
}

/// An old tree, set aside as `work`, being brought to the `target` manifest.
struct Rebuild<'a> {
    work: &'a Path,
    /// The current tree: what the update leaves as it is comes from there.
    base_dir: PathBuf,
    old: &'a Manifest,
    target: &'a Manifest,
    /// What the update adds or modifies, by path.
    written: HashMap<&'a [u8], &'a Entry>,
    /// What the update moves unchanged: new path → its path in the current tree.
    moved: HashMap<&'a [u8], &'a [u8]>,
    objects: &'a Objects,
    perms: &'a Perms,
    expected: &'a str,
}

impl<'a> Rebuild<'a> {
    fn run(&self) -> Result<(), ApplyError> {
        // Paths to go (or to be replaced), then paths to come: deletions first, so a
        // file may become a directory and back.
        let (gone, come) = differences(self.old, self.target);
        let mut removing = Dirs::open(self.work, None).map_err(io_at(self.work))?;
        let rewritten = self.in_own_inode(&mut removing, &come);
        self.remove(&mut removing, &gone, &rewritten)?;
        drop(removing);
        self.write(&come, &rewritten)
    }

    /// A file whose content changes is rewritten in its own inode when nothing else
    /// shares that inode (trees share unchanged files by hard link, so only a file
    /// with a single link is this tree's alone): no inode freed and another allocated.
    fn in_own_inode(&self, dirs: &mut Dirs, come: &[&'a Vec<u8>]) -> BTreeSet<&'a [u8]> {
        let regular = |manifest: &Manifest, path: &[u8]| manifest.get(path).is_some_and(|(mode, _)| *mode != "120000");
        let mut rewritten = BTreeSet::new();
        for path in come {
            if regular(self.old, path) && regular(self.target, path) && self.written.contains_key(&path[..]) {
                let Ok((parent, name)) = dirs.parent(path) else { continue };
                let alone = nix::sys::stat::fstatat(parent, name, AtFlags::AT_SYMLINK_NOFOLLOW)
                    .is_ok_and(|st| st.st_mode & nix::libc::S_IFMT == nix::libc::S_IFREG && st.st_nlink == 1);
                if alone {
                    rewritten.insert(&path[..]);
                }
            }
        }
        rewritten
    }

    /// Unlinks what goes (but the files rewritten in place), then the directories
    /// left empty (git trees hold none), deepest first.
    fn remove(&self, dirs: &mut Dirs, gone: &[&Vec<u8>], rewritten: &BTreeSet<&[u8]>) -> Result<(), ApplyError> {
        for path in gone {
            if rewritten.contains(&path[..]) {
                continue;
            }
            let (parent, name) = dirs.parent(path).map_err(io_in(self.work, path))?;
            nix::unistd::unlinkat(parent, name, UnlinkatFlags::NoRemoveDir).map_err(errno_in(self.work, path))?;
        }
        let mut emptied: Vec<&[u8]> = gone
            .iter()
            .flat_map(|p| p.iter().enumerate().filter(|(_, &b)| b == b'/').map(move |(i, _)| &p[..i]))
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        emptied.sort_by_key(|p| std::cmp::Reverse(p.iter().filter(|&&b| b == b'/').count()));
        for dir in emptied {
            if let Ok((parent, name)) = dirs.parent(dir) {
                let _ = nix::unistd::unlinkat(parent, name, UnlinkatFlags::RemoveDir);
            }
        }
        Ok(())
    }

    /// Writes what comes: the update's entries, and from the current tree what the
    /// recycled tree has otherwise; each checked against the target manifest.
    fn write(&self, come: &[&Vec<u8>], rewritten: &BTreeSet<&[u8]>) -> Result<(), ApplyError> {
        let work = self.work;
        let mut writing = Dirs::open(work, Some(self.perms.dirs())).map_err(io_at(work))?;
        let mut carried: Option<Dirs> = None;
        for path in come {
            let (parent, name) = writing.parent(path).map_err(io_in(work, path))?;
            let at = work.join(OsStr::from_bytes(path));
            let place = At { dir: parent, name, shown: &at };
            match self.written.get(&path[..]) {
                Some(entry) if rewritten.contains(&path[..]) => rewrite_entry(entry, &place, self.objects, self.perms)?,
                Some(entry) => write_entry(entry, &place, self.objects, self.perms)?,
                // Unchanged by this update but different in the recycled tree: the
                // current tree has it as it must be (under its old path, for a rename).
                None => {
                    let base_dir = &self.base_dir;
                    let source = match &mut carried {
                        Some(dirs) => dirs,
                        None => carried.insert(Dirs::open(base_dir, None).map_err(io_at(base_dir))?),
                    };
                    let from_path = self.moved.get(&path[..]).copied().unwrap_or(&path[..]);
                    let (from, from_name) = source.parent(from_path).map_err(io_in(base_dir, from_path))?;
                    nix::unistd::linkat(from, from_name, parent, name, AtFlags::empty())
                        .map_err(errno_in(base_dir, from_path))?;
                }
            }
            // What is on disk now must be what the manifest says.
            let found = tree_hash::entry_id_at(parent, name, &at).map_err(io_at(&at))?;
            if Some(&found) != self.target.get(&path[..]) {
                return Err(ApplyError::Verify {
                    expected: self.expected.to_owned(),
                    built: format!("a tree where {} differs", String::from_utf8_lossy(path)),
                });
            }
        }
        Ok(())
    }
}
