//! A service's trees as git objects: what changed between two trees, found by walking
//! only the subtrees whose ids differ, and the objects a host needs that the bus does
//! not hold yet.
//!
//! This is what keeps a push O(change): git's trees are a Merkle structure, so two
//! trees that share a subtree share its id, and nothing below an equal id is read. The
//! changed paths come out as two partial listings (old side, new side) that
//! [`crate::diff::diff`] turns into an update exactly as it would two full ones: paths
//! outside them are equal on both sides and would produce no change.

use std::collections::{BTreeMap, HashSet};

use confcast_schemas::FileMode;
use gix::bstr::BString;
use gix::objs::tree::EntryKind;
use gix::ObjectId;

use crate::diff::{Item, Listing};
use crate::mirror::{Mirror, MirrorError};

/// The difference between an old and a new tree of one service.
#[derive(Debug, Default)]
pub(crate) struct TreeChange {
    /// The changed paths as they were (absent: the path is new).
    pub(crate) old: Listing,
    /// The changed paths as they are (absent: the path is gone).
    pub(crate) new: Listing,
    /// Objects of the new tree that the old one does not have, each with its content:
    /// blobs and trees, children before their parents, so the root comes last. A
    /// reader that finds the root finds everything below it.
    pub(crate) objects: Vec<(ObjectId, Vec<u8>)>,
    /// Objects of the old tree that the new one replaced: what may have become garbage.
    pub(crate) replaced: usize,
    /// A symlink is among the changed paths, on either side.
    pub(crate) links_changed: bool,
}

/// One entry of a tree, as the walk needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Node {
    Tree(ObjectId),
    File(Item),
    /// A submodule: carries no content, skipped as a listing skips it.
    Gitlink,
}

/// The difference between `old` (none for a first publish: everything is new) and
/// `new`, two tree ids of the mirror. Blocking: reads the mirror.
pub(crate) fn compare(mirror: &Mirror, old: Option<ObjectId>, new: ObjectId) -> Result<TreeChange, MirrorError> {
    let mut walk =
        Walk { mirror, repo: mirror.repo(), change: TreeChange::default(), sent: HashSet::new(), old: HashSet::new() };
    walk.tree(&[], old, Some(new))?;
    // What the old tree had is stored already: a moved directory or file is not sent
    // again.
    let Walk { mut change, old, .. } = walk;
    change.objects.retain(|(id, _)| !old.contains(id));
    Ok(change)
}

/// Every object id reachable from `tree`: what a service's objects on the bus must
/// hold, and all they need hold. Blocking, and O(tree): used only to reclaim.
pub(crate) fn reachable(mirror: &Mirror, tree: ObjectId) -> Result<HashSet<ObjectId>, MirrorError> {
    let repo = mirror.repo();
    let mut seen = HashSet::new();
    let mut pending = vec![tree];
    while let Some(id) = pending.pop() {
        if !seen.insert(id) {
            continue;
        }
        for node in entries(mirror, &repo, id)?.into_values() {
            match node {
                Node::Tree(id) => pending.push(id),
                Node::File(item) => {
                    seen.insert(item.blob);
                }
                Node::Gitlink => {}
            }
        }
    }
    Ok(seen)
}

struct Walk<'a> {
    mirror: &'a Mirror,
    repo: gix::Repository,
    change: TreeChange,
    /// Objects already in `change.objects`: a blob at two new paths is sent once.
    sent: HashSet<ObjectId>,
    /// Objects of the old tree met on the way.
    old: HashSet<ObjectId>,
}

impl Walk<'_> {
    /// Compares the trees at `path` (either may be absent) and records what differs.
    fn tree(&mut self, path: &[u8], old: Option<ObjectId>, new: Option<ObjectId>) -> Result<(), MirrorError> {
        if old == new {
            return Ok(());
        }
        let before = match old {
            Some(id) => entries(self.mirror, &self.repo, id)?,
            None => BTreeMap::new(),
        };
        let after = match new {
            Some(id) => entries(self.mirror, &self.repo, id)?,
            None => BTreeMap::new(),
        };
        let names: std::collections::BTreeSet<&BString> = before.keys().chain(after.keys()).collect();
        for name in names {
            let (o, n) = (before.get(name).copied(), after.get(name).copied());
            if o == n {
                continue;
            }
            let child = join(path, name);
            let subtree = |node: Option<Node>| match node {
                Some(Node::Tree(id)) => Some(id),
                _ => None,
            };
            let (old_tree, new_tree) = (subtree(o), subtree(n));
            if old_tree.is_some() || new_tree.is_some() {
                self.tree(&child, old_tree, new_tree)?;
            }
            if let Some(Node::File(item)) = o {
                self.old.insert(item.blob);
                self.change.links_changed |= item.mode == FileMode::Symlink;
                self.change.replaced += 1;
                self.change.old.insert(child.clone(), item);
            }
            if let Some(Node::File(item)) = n {
                self.change.links_changed |= item.mode == FileMode::Symlink;
                if self.sent.insert(item.blob) {
                    let content = self.content(item.blob)?;
                    self.change.objects.push((item.blob, content));
                }
                self.change.new.insert(child, item);
            }
        }
        if let Some(id) = old {
            self.old.insert(id);
            self.change.replaced += 1;
        }
        if let Some(id) = new {
            if self.sent.insert(id) {
                let content = self.content(id)?;
                self.change.objects.push((id, content));
            }
        }
        Ok(())
    }

    fn content(&self, id: ObjectId) -> Result<Vec<u8>, MirrorError> {
        Ok(self.repo.find_object(id).map_err(self.mirror.local())?.detach().data)
    }
}

/// `path/name`, or `name` at the root.
fn join(path: &[u8], name: &[u8]) -> Vec<u8> {
    let mut child = Vec::with_capacity(path.len() + 1 + name.len());
    if !path.is_empty() {
        child.extend_from_slice(path);
        child.push(b'/');
    }
    child.extend_from_slice(name);
    child
}

/// The entries of tree `id` by name.
fn entries(mirror: &Mirror, repo: &gix::Repository, id: ObjectId) -> Result<BTreeMap<BString, Node>, MirrorError> {
    let tree = repo.find_tree(id).map_err(mirror.local())?;
    let decoded = tree.decode().map_err(|e| (mirror.local())(gix::Error::from_error(e)))?;
    let mut out = BTreeMap::new();
    for entry in &decoded.entries {
        let id = entry.oid.to_owned();
        let node = match entry.mode.kind() {
            EntryKind::Tree => Node::Tree(id),
            EntryKind::Blob => Node::File(Item { mode: FileMode::Regular, blob: id }),
            EntryKind::BlobExecutable => Node::File(Item { mode: FileMode::Executable, blob: id }),
            EntryKind::Link => Node::File(Item { mode: FileMode::Symlink, blob: id }),
            EntryKind::Commit => Node::Gitlink,
        };
        out.insert(entry.filename.to_owned(), node);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::process::Command;

    use super::*;
    use crate::diff::diff;
    use crate::mirror::GitCredentials;
    use confcast_schemas::ChangeKind;

    fn git(dir: &Path, args: &[&str]) -> String {
        let out = Command::new("git").arg("-C").arg(dir).args(args).output().expect("git runs");
        assert!(out.status.success(), "git {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    fn write(dir: &Path, path: &str, content: &str) {
        let file = dir.join(path);
        std::fs::create_dir_all(file.parent().expect("parent")).expect("mkdir");
        std::fs::write(file, content).expect("write");
    }

    /// Commits what the work tree holds; returns its tree id.
    fn commit(work: &Path) -> ObjectId {
        git(work, &["add", "-A"]);
        git(work, &["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty", "-m", "c"]);
        ObjectId::from_hex(git(work, &["rev-parse", "HEAD^{tree}"]).as_bytes()).expect("tree id")
    }

    #[test]
    fn only_changed_subtrees_are_read_and_their_objects_sent_root_last() {
        let dir = tempfile::tempdir().expect("tempdir");
        let work = dir.path();
        git(work, &["init", "-q"]);
        for d in 0..3 {
            for f in 0..3 {
                write(work, &format!("d{d}/f{f}"), &format!("{d}{f}\n"));
            }
        }
        write(work, "same/a", "x\n");
        write(work, "same/b", "x\n");
        let old = commit(work);
        write(work, "d1/f1", "changed\n");
        std::fs::remove_file(work.join("d2/f0")).expect("rm");
        std::fs::rename(work.join("d0"), work.join("e0")).expect("mv");
        let new = commit(work);
        let mirror =
            Mirror::open_or_init(&work.join(".git"), "file:///nowhere", &GitCredentials::default()).expect("opens");

        let change = compare(&mirror, Some(old), new).expect("compares");
        // Only the paths under changed directories appear; `same/` was never entered.
        let changes: Vec<(String, ChangeKind)> = diff(&change.old, &change.new)
            .into_iter()
            .map(|c| (String::from_utf8(c.path).expect("utf-8"), c.kind))
            .collect();
        assert!(changes.contains(&("d1/f1".into(), ChangeKind::Modify)), "{changes:?}");
        assert!(changes.contains(&("d2/f0".into(), ChangeKind::Delete)), "{changes:?}");
        assert!(changes.contains(&("e0/f2".into(), ChangeKind::Rename)), "{changes:?}");
        assert_eq!(changes.len(), 1 + 1 + 3, "{changes:?}");
        assert!(!change.new.keys().chain(change.old.keys()).any(|p| p.starts_with(b"same/")));
        // Sent: the new blob, the new trees d1, d2 (e0 is d0's tree, already stored),
        // and the root, last.
        let sent: Vec<ObjectId> = change.objects.iter().map(|(id, _)| *id).collect();
        assert_eq!(sent.last(), Some(&new), "the root comes last");
        assert_eq!(sent.len(), 4, "{sent:?}");
        assert!(!change.links_changed);

        // A first publish sends every object the tree reaches (`same/a` and `same/b`
        // share one blob), and lists all ten files.
        let all = compare(&mirror, None, new).expect("compares");
        assert_eq!(all.objects.len(), reachable(&mirror, new).expect("walks").len());
        assert_eq!(all.new.len(), 10);
    }
}
