//! post-receive's side of a push: the repository's settings, one commit event per ref
//! update (with the paths it changed), and what the pusher is told of each.

use confcast_publisher::Settings;
use confcast_schemas::{message::now_ms, CommitEvent, WIRE_VERSION};
use git2::{Oid, Repository};

use crate::update::{short_range, RefUpdate};

/// At most this many changed paths travel in an event; the relay does not need them to
/// be complete (it diffs trees itself), they are for people reading the stream.
pub const MAX_PATHS: usize = 1000;

/// The `confcast.*` settings of the repository, read through libgit2 (no `git` run);
/// defaults for what is not set or cannot be read.
pub fn settings(repo: &Repository) -> Settings {
    let config = repo.config().ok();
    let get = |key: &str| config.as_ref().and_then(|c| c.get_string(key).ok()).filter(|v| !v.is_empty());
    Settings::from_config(get, repo.path())
}

fn tree_of(repo: &Repository, oid: Option<Oid>) -> Option<git2::Tree<'_>> {
    repo.find_object(oid?, None).ok()?.peel_to_tree().ok()
}

/// Paths that differ between the trees of `old` and `new` (each peeled to a tree;
/// a missing side counts as the empty tree), capped at [`MAX_PATHS`].
pub fn changed_paths(repo: &Repository, old: Option<Oid>, new: Option<Oid>) -> (Vec<String>, bool) {
    let (old_tree, new_tree) = (tree_of(repo, old), tree_of(repo, new));
    let diff = match repo.diff_tree_to_tree(old_tree.as_ref(), new_tree.as_ref(), None) {
        Ok(diff) => diff,
        Err(_) => return (Vec::new(), true),
    };
    let mut paths = Vec::new();
    let mut truncated = false;
    for delta in diff.deltas() {
        if paths.len() == MAX_PATHS {
            truncated = true;
            break;
        }
        if let Some(path) = delta.new_file().path().or(delta.old_file().path()) {
            paths.push(path.to_string_lossy().into_owned());
        }
    }
    (paths, truncated)
}

/// One commit event per ref update.
pub fn commit_events(repo: &Repository, repo_name: &str, updates: &[RefUpdate]) -> Vec<CommitEvent> {
    let now = now_ms();
    updates
        .iter()
        .map(|u| {
            let (paths, paths_truncated) = changed_paths(repo, u.old, u.new);
            CommitEvent {
                v: WIRE_VERSION,
                repo: repo_name.to_owned(),
                ref_name: u.ref_name.clone(),
                old: u.old.map(|o| o.to_string()),
                new: u.new.map(|o| o.to_string()),
                paths,
                paths_truncated,
                pushed_at_ms: now,
                backfill: false,
            }
        })
        .collect()
}

/// What the pusher is told about each ref: `published <ref> <old>..<new>`, or
/// `spooled ...` for the last `spooled` of them (the hook publishes in order and spools
/// what is left when the bus fails).
pub fn announcement_lines(updates: &[RefUpdate], spooled: usize) -> Vec<String> {
    let published = updates.len().saturating_sub(spooled);
    updates
        .iter()
        .enumerate()
        .map(|(i, u)| {
            let verb = if i < published { "published" } else { "spooled" };
            let deleted = if u.new.is_none() { " (deleted)" } else { "" };
            format!("confcast: {verb} {} {}{deleted}", u.ref_name, short_range(u))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::update::sample_push;

    #[test]
    fn tells_the_pusher_each_ref() {
        assert_eq!(
            announcement_lines(&sample_push(), 1),
            vec![
                "confcast: published refs/heads/x aaaaaaa..bbbbbbb",
                "confcast: published refs/tags/t 0000000..aaaaaaa",
                "confcast: spooled refs/heads/gone bbbbbbb..0000000 (deleted)",
            ]
        );
    }
}
