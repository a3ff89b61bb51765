//! Keeping the mirror in shape, with C git where gix cannot (repack, pack-refs,
//! commit-graph; a relay host has git, the `file://` transport needs it too): packs
//! rolled up, refs packed, the commit-graph kept, and the locks a killed relay left
//! removed.

use std::path::Path;
use std::sync::atomic::Ordering;

use super::{narrow, Mirror};

/// Repack the mirror when it has this many packs.
pub(super) const REPACK_AT: usize = 32;
/// Pack the mirror's refs and write its commit-graph once fetches wrote this many refs.
pub(super) const PACK_REFS_AT: usize = 64;

/// Removes the lock files a relay killed in the middle of a fetch leaves in its mirror
/// (`refs/**/*.lock`, `packed-refs.lock`, ...): left in place, every later fetch fails
/// to update those refs. Only called by the relay holding the state directory's lock,
/// so no other process can be using them.
pub(super) fn remove_stale_locks(mirror: &Path) {
    let mut dirs =
        vec![mirror.to_owned(), mirror.join("refs"), mirror.join(narrow::DIR), mirror.join(narrow::DIR).join("refs")];
    while let Some(dir) = dirs.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for entry in entries.filter_map(Result::ok) {
            let path = entry.path();
            let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
            if is_dir && dir != *mirror && dir != mirror.join(narrow::DIR) {
                dirs.push(path);
            } else if !is_dir && path.extension().is_some_and(|e| e == "lock") {
                match std::fs::remove_file(&path) {
                    Ok(()) => {
                        tracing::warn!(path = %path.display(), "removed a lock left by a relay that stopped mid-fetch")
                    }
                    Err(e) => tracing::warn!(path = %path.display(), error = %e, "cannot remove a stale lock"),
                }
            }
        }
    }
}

impl Mirror {
    /// Packs in the mirror.
    pub(super) fn pack_count(&self) -> usize {
        std::fs::read_dir(self.path.join("objects/pack"))
            .map(|d| d.filter_map(Result::ok).filter(|e| e.path().extension().is_some_and(|x| x == "idx")).count())
            .unwrap_or(0)
    }

    /// Keeps the mirror cheap to fetch into, with C git (gix cannot repack; a relay
    /// host has git, the `file://` transport needs it too; without it the mirror keeps
    /// working, slower, and says so):
    ///
    /// - Once there are [`REPACK_AT`] packs, rolls the small packs fetches left into
    ///   one, so object lookups stay fast and index slots free. The repack is
    ///   geometric: packs are merged only into a pack at least twice their size, so the
    ///   mirror's big pack is left alone and a repack costs what recent pushes brought,
    ///   not the size of the repository.
    /// - Once fetches wrote [`PACK_REFS_AT`] refs, packs the refs into `packed-refs` and
    ///   adds the new commits to the commit-graph. A fetch's negotiation reads every ref
    ///   of the mirror and the commit it points at, as git's does; from loose ref files
    ///   and compressed commits that cost the relay of a datacenter running 3,000
    ///   services ~45 ms of CPU a push, from one file and the commit-graph ~1 µs a ref
    ///   (`bench -- --only services`, BENCHMARKS.md).
    pub(super) fn consolidate(&self, refs_written: usize) {
        let packs = self.pack_count();
        if packs >= REPACK_AT {
            self.git(&["repack", "-d", "-q", "--geometric=2"], packs);
        }
        if self.loose_refs.fetch_add(refs_written, Ordering::Relaxed) + refs_written >= PACK_REFS_AT {
            self.loose_refs.store(0, Ordering::Relaxed);
            self.git(&["pack-refs", "--all"], packs);
            self.git(&["commit-graph", "write", "--reachable", "--split", "--no-progress"], packs);
        }
    }

    /// Runs `git ARGS` in the mirror for [`Mirror::consolidate`]: a failure is logged,
    /// never fatal.
    fn git(&self, args: &[&str], packs: usize) {
        let started = std::time::Instant::now();
        match std::process::Command::new("git").arg("-C").arg(&self.path).args(args).output() {
            Ok(out) if out.status.success() => {
                tracing::debug!(?args, packs, elapsed_ms = started.elapsed().as_millis() as u64, "tidied the mirror")
            }
            Ok(out) => tracing::warn!(
                ?args,
                packs,
                stderr = %String::from_utf8_lossy(&out.stderr).trim(),
                "git failed to tidy the mirror"
            ),
            Err(e) => tracing::warn!(?args, packs, error = %e, "cannot run git to tidy the mirror"),
        }
    }
}
