//! One `syncfs(2)` for every tree built at once on a file system.

use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex};

use super::ApplyError;

/// The flushes of every file system written by its holders: one `syncfs(2)` serves
/// every caller waiting for it. Cheap to clone; clones share their flushes. A lone
/// subscriber flushes exactly as with a flush per tree; many subscribers of one process
/// given the same `Flushes` (or several trees built at once) wait for one flush together
/// instead of queueing one each on the same disk.
#[derive(Clone, Default)]
pub struct Flushes {
    devices: Arc<Mutex<HashMap<u64, Arc<Group>>>>,
}

impl std::fmt::Debug for Flushes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Flushes").finish_non_exhaustive()
    }
}

/// The flushes of one file system.
#[derive(Default)]
struct Group {
    state: Mutex<GroupState>,
    done: Condvar,
}

#[derive(Default)]
struct GroupState {
    /// Flushes started and finished so far; at most one runs at a time.
    started: u64,
    finished: u64,
    running: bool,
    /// The last flush that failed, and why.
    failed: Option<(u64, nix::errno::Errno)>,
}

impl Flushes {
    /// Flushes the file system holding `dir` (everything written so far is on disk
    /// when this returns): a caller waits for the next flush to start, and one flush
    /// serves all callers waiting for it.
    pub(super) fn flush(&self, dir: &Path) -> Result<(), ApplyError> {
        let io = |source: io::Error| ApplyError::Io { path: dir.to_owned(), source };
        let root = File::open(dir).map_err(io)?;
        let device = root.metadata().map_err(io)?.dev();
        let group = self.devices.lock().unwrap_or_else(|e| e.into_inner()).entry(device).or_default().clone();
        let mut state = group.state.lock().unwrap_or_else(|e| e.into_inner());
        // A flush already running may have started before this caller's writes ended:
        // only one that starts from now on covers them.
        let ticket = state.started + 1;
        loop {
            if state.finished >= ticket {
                return match state.failed {
                    Some((flush, errno)) if flush >= ticket => {
                        Err(ApplyError::Flush { path: dir.to_owned(), source: errno.into() })
                    }
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
                if let Err(errno) = result {
                    state.failed = Some((flush, errno));
                }
                group.done.notify_all();
                continue;
            }
            state = group.done.wait(state).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Flushes the file systems holding `dirs`: one flush per file system, however many
    /// of `dirs` it holds. Returns how many file systems were flushed.
    pub(super) fn flush_all<'a>(&self, dirs: impl IntoIterator<Item = &'a Path>) -> Result<usize, ApplyError> {
        let mut devices = BTreeSet::new();
        for dir in dirs {
            let device =
                std::fs::metadata(dir).map_err(|source| ApplyError::Io { path: dir.to_owned(), source })?.dev();
            if devices.insert(device) {
                self.flush(dir)?;
            }
        }
        Ok(devices.len())
    }

    #[cfg(test)]
    fn started(&self, dir: &Path) -> u64 {
        let device = std::fs::metadata(dir).expect("dir").dev();
        let group = self.devices.lock().expect("flushes").get(&device).cloned().expect("a flush ran");
        let started = group.state.lock().expect("state").started;
        started
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_caller_alone_always_gets_a_flush_of_its_own() {
        let dir = tempfile::tempdir().expect("tempdir");
        let flushes = Flushes::default();
        flushes.flush(dir.path()).expect("flush");
        let before = flushes.started(dir.path());
        flushes.flush(dir.path()).expect("flush");
        flushes.flush(dir.path()).expect("flush");
        assert_eq!(flushes.started(dir.path()), before + 2);
    }

    #[test]
    fn callers_at_once_share_flushes_and_all_return() {
        let dir = tempfile::tempdir().expect("tempdir");
        let flushes = Flushes::default();
        flushes.flush(dir.path()).expect("flush");
        let before = flushes.started(dir.path());
        let callers = 32;
        let barrier = std::sync::Barrier::new(callers);
        std::thread::scope(|scope| {
            for i in 0..callers {
                let (dir, barrier, flushes) = (dir.path(), &barrier, flushes.clone());
                scope.spawn(move || {
                    std::fs::write(dir.join(format!("f{i}")), b"x").expect("write");
                    barrier.wait();
                    flushes.flush(dir).expect("flush");
                });
            }
        });
        let flushes = flushes.started(dir.path()) - before;
        assert!((1..=callers as u64).contains(&flushes), "{flushes} flushes for {callers} callers");
    }

    #[test]
    fn many_trees_on_one_file_system_take_one_flush() {
        let dir = tempfile::tempdir().expect("tempdir");
        let trees: Vec<std::path::PathBuf> = (0..20).map(|i| dir.path().join(format!("t{i}"))).collect();
        for tree in &trees {
            std::fs::create_dir(tree).expect("mkdir");
            std::fs::write(tree.join("f"), b"x").expect("write");
        }
        let flushes = Flushes::default();
        assert_eq!(flushes.flush_all(trees.iter().map(|t| t.as_path())).expect("flush"), 1);
        assert_eq!(flushes.started(dir.path()), 1);
        assert_eq!(flushes.flush_all(std::iter::empty()).expect("nothing to flush"), 0);
    }
}
