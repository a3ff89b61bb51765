//! The on-disk spool of commit events that could not be published.
//!
//! One file per event, named so that lexical order is arrival order, written with
//! write-to-temp, fsync, rename, so a crash leaves either the whole event or nothing.
//! Draining holds an exclusive lock on the spool, so two hooks running at once cannot
//! publish the same spool out of order.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use async_nats::jetstream;
use confcast_schemas::{decode, encode, CommitEvent};

use crate::bus::{publish_event, BusError};

/// Failures of the spool itself (disk, not bus).
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    /// Reading or writing the spool directory failed.
    #[error("spool {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A spooled event could not be published; it stays in the spool.
    #[error("publishing spooled event {path}")]
    Publish {
        /// The spooled file.
        path: PathBuf,
        /// Why.
        #[source]
        source: BusError,
    },
}

/// A spool directory.
#[derive(Debug, Clone)]
pub struct Spool {
    dir: PathBuf,
}

/// What a drain did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Drained {
    /// Events acknowledged and removed from the spool.
    pub published: usize,
    /// Of those, how many JetStream already had.
    pub duplicates: usize,
    /// Files that were not events and were moved aside as `*.bad`.
    pub quarantined: usize,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SpoolError + '_ {
    move |source| SpoolError::Io { path: path.to_owned(), source }
}

impl Spool {
    /// A spool in `dir` (created on first use).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Spool { dir: dir.into() }
    }

    /// Where it lives.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Durably appends an event.
    pub fn push(&self, event: &CommitEvent) -> Result<(), SpoolError> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        fs::create_dir_all(&self.dir).map_err(io(&self.dir))?;
        let nanos =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
        let name = format!("{nanos:024}-{:06}-{:08}", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed));
        let tmp = self.dir.join(format!(".{name}.tmp"));
        let path = self.dir.join(format!("{name}.event"));
        let mut file = File::create(&tmp).map_err(io(&tmp))?;
        file.write_all(&encode(event)).map_err(io(&tmp))?;
        file.sync_all().map_err(io(&tmp))?;
        fs::rename(&tmp, &path).map_err(io(&path))?;
        File::open(&self.dir).and_then(|d| d.sync_all()).map_err(io(&self.dir))?;
        Ok(())
    }

    /// Spooled event files, oldest first.
    pub fn pending(&self) -> Result<Vec<PathBuf>, SpoolError> {
        let entries = match fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(SpoolError::Io { path: self.dir.clone(), source: e }),
        };
        let mut files: Vec<PathBuf> = entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "event"))
            .collect();
        files.sort();
        Ok(files)
    }

    fn lock(&self) -> Result<File, SpoolError> {
        fs::create_dir_all(&self.dir).map_err(io(&self.dir))?;
        let path = self.dir.join(".lock");
        let file = OpenOptions::new().create(true).truncate(false).write(true).open(&path).map_err(io(&path))?;
        file.lock().map_err(io(&path))?;
        Ok(file)
    }
}

/// Publishes every spooled event in order, removing each once acknowledged. Stops at
/// the first failure, leaving it and everything after it in the spool.
pub async fn drain(js: &jetstream::Context, spool: &Spool, replicas: usize) -> Result<Drained, SpoolError> {
    let mut drained = Drained::default();
    if spool.pending()?.is_empty() {
        return Ok(drained);
    }
    let _lock = spool.lock()?;
    for path in spool.pending()? {
        let bytes = fs::read(&path).map_err(io(&path))?;
        let event: CommitEvent = match decode(&bytes) {
            Ok(event) => event,
            Err(_) => {
                // Not ours or truncated by a foreign tool: keep it for inspection, but
                // out of the way of the events behind it.
                fs::rename(&path, path.with_extension("bad")).map_err(io(&path))?;
                drained.quarantined += 1;
                continue;
            }
        };
        let duplicate = publish_event(js, &event, replicas)
            .await
            .map_err(|source| SpoolError::Publish { path: path.clone(), source })?;
        fs::remove_file(&path).map_err(io(&path))?;
        drained.published += 1;
        drained.duplicates += usize::from(duplicate);
    }
    Ok(drained)
}
