//! `publisher backfill`: re-announcing every current ref head, to seed relays after
//! the commit stream was lost or a relay was away longer than the stream keeps events.

use std::path::Path;

use confcast_schemas::{message::now_ms, CommitEvent, WIRE_VERSION};

use crate::git::{git, GitError};

/// One event per ref of `repo`, as if each ref had just been created, in the name of
/// `repo_name`.
pub fn current_refs(repo: &Path, repo_name: &str) -> Result<Vec<CommitEvent>, GitError> {
    let listing = git(repo, &["for-each-ref", "--format=%(objectname) %(refname)"])?;
    let now = now_ms();
    Ok(listing
        .lines()
        .filter_map(|line| line.split_once(' '))
        .map(|(oid, ref_name)| CommitEvent {
            v: WIRE_VERSION,
            repo: repo_name.to_owned(),
            ref_name: ref_name.to_owned(),
            old: None,
            new: Some(oid.to_owned()),
            paths: Vec::new(),
            paths_truncated: true,
            pushed_at_ms: now,
            backfill: true,
        })
        .collect())
}
