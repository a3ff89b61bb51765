//! One subscriber per state directory.
//!
//! Two subscribers on one `--state-dir` would build into the same trees, overwrite each
//! other's position and both run `--exec`. The first to start holds an exclusive lock on
//! `<state-dir>/subscriber.lock` for its whole life (the kernel releases it when the
//! process ends, however it ends) and writes its pid there; a second one fails at start,
//! before it touches anything, naming the directory and that pid.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

/// Name of the lock file in the state directory.
pub const LOCK_FILE: &str = "subscriber.lock";

/// Why the state directory cannot be taken.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another subscriber holds it.
    #[error(
        "state directory {} is in use by another subscriber{}: one subscriber per --state-dir",
        state_dir.display(),
        pid.map(|p| format!(" (pid {p})")).unwrap_or_default()
    )]
    InUse {
        /// The state directory.
        state_dir: PathBuf,
        /// The holder's pid, when it wrote it already.
        pid: Option<u32>,
    },
    /// The directory or its lock file cannot be created or locked.
    #[error("cannot lock state directory {}: {source}", path.display())]
    Io {
        /// The lock file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// The state directory, held until dropped.
#[derive(Debug)]
pub struct StateDirLock {
    _file: File,
}

impl StateDirLock {
    /// Creates `state_dir` if needed and locks it for this process.
    pub fn take(state_dir: &Path) -> Result<StateDirLock, LockError> {
        let path = state_dir.join(LOCK_FILE);
        let io = |source| LockError::Io { path: path.clone(), source };
        std::fs::create_dir_all(state_dir).map_err(io)?;
        let mut file =
            OpenOptions::new().create(true).truncate(false).read(true).write(true).open(&path).map_err(io)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let mut text = String::new();
                let pid = file.read_to_string(&mut text).ok().and_then(|_| text.trim().parse().ok());
                return Err(LockError::InUse { state_dir: state_dir.to_owned(), pid });
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(io(e)),
        }
        // The pid is for the message of a second subscriber; the lock is what counts.
        let _ = file.set_len(0).and_then(|()| file.rewind()).and_then(|()| writeln!(file, "{}", std::process::id()));
        Ok(StateDirLock { _file: file })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_with_the_first_ones_pid_until_it_lets_go() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = dir.path().join("state");
        let held = StateDirLock::take(&state).expect("first");
        // A second open file description of the same file conflicts like another process.
        match StateDirLock::take(&state) {
            Err(LockError::InUse { state_dir, pid }) => {
                assert_eq!(state_dir, state);
                assert_eq!(pid, Some(std::process::id()));
            }
            other => panic!("expected InUse, got {other:?}"),
        }
        let message = StateDirLock::take(&state).expect_err("in use").to_string();
        assert!(message.contains(&state.display().to_string()) && message.contains("(pid "), "{message}");
        drop(held);
        // Another test of this process that spawns a child shares the lock's open file
        // between its fork and its exec (close-on-exec closes it only then): free again
        // within that moment.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        while let Err(e) = StateDirLock::take(&state) {
            assert!(std::time::Instant::now() < deadline, "free again: {e}");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }
}
