//! A fetch whose negotiation costs what the fetch changes, not the number of refs.
//!
//! Before it asks the master for anything, a fetch marks every ref of the local
//! repository as complete, reading each ref and the commit it points at (gix does as
//! git's `fetch-pack` does). A mirror holds one ref per service its datacenter runs, so
//! with 3,000 services that walk was most of what a one-service push cost the relay.
//!
//! The relay knows what matters to the negotiation: the refs it fetches, which the
//! mirror already holds at their previous commits. So a fetch of refs the mirror
//! already has runs in the *narrow* repository, `narrow.git` inside the mirror: its
//! `objects` is the mirror's own (a symbolic link, so the received pack lands in the
//! mirror), and its refs are only the refs being fetched, set to the mirror's values
//! just before. Afterwards their new values are carried over to the mirror and the
//! narrow repository's refs are removed. A fetch that names a ref the mirror does not
//! have yet (the first fetch, a newly pinned service) runs in the mirror itself, where
//! the other refs help the negotiation find what the master and the mirror share.
//!
//! A relay killed half-way leaves at worst refs in the narrow repository, which the next
//! fetch clears, and mirror refs at their old commits, which the next sync fetches
//! again (the objects are already there, so it costs a negotiation).

use std::path::{Path, PathBuf};

use gix::refs::transaction::{Change, LogChange, PreviousValue, RefEdit, RefLog};
use gix::refs::{FullName, Target};

/// The narrow repository's directory inside the mirror.
pub(super) const DIR: &str = "narrow.git";

/// Opens the narrow repository of the mirror at `mirror`, creating it on first use.
pub(super) fn open(mirror: &Path, options: gix::open::Options) -> gix::Result<gix::ThreadSafeRepository> {
    let path = mirror.join(DIR);
    if !path.join("HEAD").exists() {
        create(&path).map_err(gix::Error::from_error)?;
    }
    Ok(gix::open_opts(&path, options).map_err(gix::Error::from_error)?.into_sync())
}

/// A bare repository at `path` whose objects are the mirror's: written under a
/// temporary name and renamed into place, so a half-made one is never opened.
fn create(path: &Path) -> std::io::Result<()> {
    let partial: PathBuf = path.with_extension("partial");
    if partial.exists() {
        std::fs::remove_dir_all(&partial)?;
    }
    std::fs::create_dir_all(partial.join("refs/heads"))?;
    std::fs::create_dir_all(partial.join("refs/tags"))?;
    std::fs::write(partial.join("HEAD"), "ref: refs/heads/main\n")?;
    std::fs::write(partial.join("config"), "[core]\n\trepositoryformatversion = 0\n\tbare = true\n")?;
    std::os::unix::fs::symlink("../objects", partial.join("objects"))?;
    std::fs::rename(&partial, path)
}

/// Makes `narrow`'s object store see the packs the mirror received since it last
/// looked, by looking up the commits its refs are about to point at: a lookup that
/// misses rescans the pack directory, while the negotiation's own lookups never do.
pub(super) fn see_packs(narrow: &gix::Repository, refs: &[(FullName, gix::ObjectId)]) {
    for (_, id) in refs {
        narrow.has_object(id);
    }
}

/// Sets the refs of `narrow` to exactly `refs`: every other ref goes.
pub(super) fn set_refs(narrow: &gix::Repository, refs: &[(FullName, gix::ObjectId)]) -> gix::Result<()> {
    let mut edits: Vec<RefEdit> = Vec::new();
    for reference in narrow.references()?.all()? {
        let reference = reference.map_err(gix::Error::from_error)?;
        if !refs.iter().any(|(name, _)| name.as_ref() == reference.name()) {
            edits.push(delete(reference.name().to_owned()));
        }
    }
    edits.extend(refs.iter().map(|(name, id)| update(name.clone(), *id)));
    narrow.edit_references(edits)?;
    Ok(())
}

/// Where `refs` point in `narrow` now, for those that exist there.
pub(super) fn targets<'a>(
    narrow: &gix::Repository,
    refs: impl IntoIterator<Item = &'a String>,
) -> gix::Result<Vec<(FullName, gix::ObjectId)>> {
    let mut targets = Vec::new();
    for name in refs {
        if let Some(reference) = narrow.try_find_reference(name.as_str())? {
            if let Some(id) = reference.target().try_id() {
                targets.push((reference.name().to_owned(), id.to_owned()));
            }
        }
    }
    Ok(targets)
}

/// An edit that points `name` at `id`, whatever it pointed at.
pub(super) fn update(name: FullName, id: gix::ObjectId) -> RefEdit {
    RefEdit {
        change: Change::Update {
            log: LogChange { mode: RefLog::AndReference, force_create_reflog: false, message: "fetch".into() },
            expected: PreviousValue::Any,
            new: Target::Object(id),
        },
        name,
        deref: false,
    }
}

/// An edit that deletes `name`.
pub(super) fn delete(name: FullName) -> RefEdit {
    RefEdit { change: Change::Delete { expected: PreviousValue::Any, log: RefLog::AndReference }, name, deref: false }
}
