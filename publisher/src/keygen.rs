//! `publisher keygen`: a new relay signing key, its seed written where only its owner
//! reads it.

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

use confcast_schemas::sign::Signer;

/// Why no key was written.
#[derive(Debug, thiserror::Error)]
pub enum KeygenError {
    /// The new key's seed could not be encoded.
    #[error("encoding the seed")]
    Seed(#[source] nkeys::error::Error),
    /// The file exists, or cannot be created.
    #[error("{}", path.display())]
    Create {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The seed could not be written out.
    #[error("{}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Writes a new seed to `file` (mode 0600; never overwrites) and returns the public key
/// hosts are given with `subscriber --trusted-key`.
pub fn keygen(file: &Path) -> Result<String, KeygenError> {
    let signer = Signer::generate();
    let seed = signer.seed().map_err(KeygenError::Seed)?;
    let mut out = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(file)
        .map_err(|source| KeygenError::Create { path: file.to_owned(), source })?;
    out.write_all(format!("{seed}\n").as_bytes())
        .and_then(|()| out.sync_all())
        .map_err(|source| KeygenError::Write { path: file.to_owned(), source })?;
    Ok(signer.public_key().to_owned())
}
