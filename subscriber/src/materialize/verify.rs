//! Whether the tree behind `<dir>/<service>` is still the one applied.

use super::{io_at, ApplyError, Layout};
use crate::tree_hash;

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
