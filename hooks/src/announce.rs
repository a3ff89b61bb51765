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
/// a missing side counts as the empty tree), capped at [`MAX_PATHS`]; `true` when
/// capped or unreadable.
///
/// Only subtrees whose ids differ are read, so a one-line change in a tree of 100,000
/// files reads the few trees on its path. (libgit2's `diff_tree_to_tree` read every
/// tree of both sides: 0.3 s of the hook's CPU at that size.)
pub fn changed_paths(repo: &Repository, old: Option<Oid>, new: Option<Oid>) -> (Vec<String>, bool) {
    let (old_tree, new_tree) = (tree_of(repo, old), tree_of(repo, new));
    let mut paths = Vec::new();
    match compare(repo, old_tree.as_ref(), new_tree.as_ref(), "", &mut paths) {
        Ok(()) => (paths, false),
        Err(Stop::Full) => (paths, true),
        Err(Stop::Unreadable) => (Vec::new(), true),
    }
}

/// Why [`compare`] stopped early.
enum Stop {
    /// [`MAX_PATHS`] were found.
    Full,
    /// A tree could not be read.
    Unreadable,
}

/// Adds to `paths` every path under `prefix` that differs between `old` and `new`:
/// entries with the same id and mode are skipped whole, subtrees on both sides are
/// compared, and everything under a subtree on one side only is listed.
fn compare(
    repo: &Repository,
    old: Option<&git2::Tree<'_>>,
    new: Option<&git2::Tree<'_>>,
    prefix: &str,
    paths: &mut Vec<String>,
) -> Result<(), Stop> {
    type Entry = (Oid, i32);
    let entries = |tree: Option<&git2::Tree<'_>>| -> std::collections::BTreeMap<Vec<u8>, Entry> {
        tree.map(|t| t.iter().map(|e| (e.name_bytes().to_vec(), (e.id(), e.filemode()))).collect()).unwrap_or_default()
    };
    let (old_entries, new_entries) = (entries(old), entries(new));
    let mut names: Vec<&Vec<u8>> = old_entries.keys().chain(new_entries.keys()).collect();
    names.sort();
    names.dedup();
    let is_tree = |entry: Option<&Entry>| entry.is_some_and(|(_, mode)| *mode == i32::from(git2::FileMode::Tree));
    let subtree = |entry: Option<&Entry>| -> Result<Option<git2::Tree<'_>>, Stop> {
        match entry {
            Some((id, _)) if is_tree(entry) => repo.find_tree(*id).map(Some).map_err(|_| Stop::Unreadable),
            _ => Ok(None),
        }
    };
    for name in names {
        let (before, after) = (old_entries.get(name), new_entries.get(name));
        if before == after {
            continue;
        }
        let path = format!("{prefix}{}", String::from_utf8_lossy(name));
        let (old_sub, new_sub) = (subtree(before)?, subtree(after)?);
        if old_sub.is_some() || new_sub.is_some() {
            compare(repo, old_sub.as_ref(), new_sub.as_ref(), &format!("{path}/"), paths)?;
        }
        // A file on either side (beside a subtree on the other, when its type changed).
        let is_file = |entry: Option<&Entry>| entry.is_some() && !is_tree(entry);
        if is_file(before) || is_file(after) {
            if paths.len() == MAX_PATHS {
                return Err(Stop::Full);
            }
            paths.push(path);
        }
    }
    Ok(())
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

    /// A commit in `repo` whose tree holds `files` (path → content; mode 0o100755 when
    /// the content starts with `#!`).
    fn commit(repo: &Repository, files: &[(&str, &str)]) -> Oid {
        let mut index = git2::Index::new().expect("index");
        for (path, content) in files {
            let blob = repo.blob(content.as_bytes()).expect("blob");
            let mode = if content.starts_with("#!") { 0o100755 } else { 0o100644 };
            let entry = git2::IndexEntry {
                ctime: git2::IndexTime::new(0, 0),
                mtime: git2::IndexTime::new(0, 0),
                dev: 0,
                ino: 0,
                mode,
                uid: 0,
                gid: 0,
                file_size: content.len() as u32,
                id: blob,
                flags: 0,
                flags_extended: 0,
                path: path.as_bytes().to_vec(),
            };
            index.add(&entry).expect("add");
        }
        let tree = repo.find_tree(index.write_tree_to(repo).expect("tree")).expect("tree");
        let who = git2::Signature::now("t", "t@t").expect("signature");
        repo.commit(None, &who, &who, "c", &tree, &[]).expect("commit")
    }

    #[test]
    fn changed_paths_are_those_git_reports_reading_only_changed_subtrees() {
        let dir = tempfile::tempdir().expect("tempdir");
        let repo = Repository::init_bare(dir.path()).expect("repo");
        let old = commit(
            &repo,
            &[
                ("a/b/same", "1"),
                ("a/b/edited", "1"),
                ("a/gone/x", "1"),
                ("a/gone/y", "1"),
                ("f", "1"),
                ("m", "1"),
                ("t", "1"),
            ],
        );
        let new = commit(
            &repo,
            &[("a/b/same", "1"), ("a/b/edited", "2"), ("a/new/z", "1"), ("f", "1"), ("m", "#!1"), ("t/inside", "1")],
        );
        let (mut paths, truncated) = changed_paths(&repo, Some(old), Some(new));
        paths.sort();
        assert!(!truncated);
        let expected = ["a/b/edited", "a/gone/x", "a/gone/y", "a/new/z", "m", "t", "t/inside"];
        assert_eq!(paths, expected, "a mode change, a type change, subtrees added and removed");

        let (mut created, _) = changed_paths(&repo, None, Some(new));
        created.sort();
        assert_eq!(created, ["a/b/edited", "a/b/same", "a/new/z", "f", "m", "t/inside"], "a new ref: every path");
        assert_eq!(changed_paths(&repo, Some(new), Some(new)), (vec![], false));

        let many: Vec<(String, &str)> = (0..MAX_PATHS + 1).map(|i| (format!("d/{i:05}"), "x")).collect();
        let many: Vec<(&str, &str)> = many.iter().map(|(p, c)| (p.as_str(), *c)).collect();
        let big = commit(&repo, &many);
        let (paths, truncated) = changed_paths(&repo, None, Some(big));
        assert_eq!((paths.len(), truncated), (MAX_PATHS, true), "capped");
    }

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
