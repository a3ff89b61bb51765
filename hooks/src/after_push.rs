//! The master as a push would leave it, seen from `pre-receive`.
//!
//! While pre-receive runs no ref has moved yet, and the pushed objects are readable
//! (git's quarantine, which `Repository::open_from_env` sees). A ref the push updates
//! reads as its new value, a ref it deletes as gone, every other ref as it is: so a push
//! that creates a branch and pins it, or unpins a branch and deletes it, is judged as
//! the whole it is. Only the refs asked for are looked up.

use std::collections::{BTreeMap, BTreeSet};

use git2::{ErrorCode, Oid, Repository};

use crate::RefUpdate;

/// The refs of the master once the push is done.
pub struct AfterPush<'r> {
    repo: &'r Repository,
    /// What the push sets each of its refs to: `None` for a deletion.
    pushed: BTreeMap<String, Option<Oid>>,
}

impl std::fmt::Debug for AfterPush<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AfterPush").field("repo", &self.repo.path()).field("pushed", &self.pushed).finish()
    }
}

impl<'r> AfterPush<'r> {
    /// The master `repo` once `updates` are applied.
    pub fn new(repo: &'r Repository, updates: &[RefUpdate]) -> AfterPush<'r> {
        AfterPush { repo, pushed: updates.iter().map(|u| (u.ref_name.clone(), u.new)).collect() }
    }

    /// Whether the push creates, updates or deletes `ref_name`.
    pub fn pushes(&self, ref_name: &str) -> bool {
        self.pushed.contains_key(ref_name)
    }

    /// The commit `ref_name` points at once the push is done (annotated tags peeled);
    /// `None` when it does not exist then.
    pub fn commit_of(&self, ref_name: &str) -> Result<Option<Oid>, git2::Error> {
        let target = match self.pushed.get(ref_name) {
            Some(None) => return Ok(None),
            Some(Some(new)) => self.repo.find_object(*new, None)?,
            None => match self.repo.find_reference(ref_name) {
                Ok(reference) => reference.peel(git2::ObjectType::Any)?,
                Err(e) if e.code() == ErrorCode::NotFound || e.code() == ErrorCode::InvalidSpec => return Ok(None),
                Err(e) => return Err(e),
            },
        };
        Ok(Some(target.peel_to_commit()?.id()))
    }

    /// The names of the refs under `prefix` (which ends in `/`) once the push is done,
    /// sorted.
    pub fn refs_under(&self, prefix: &str) -> Result<Vec<String>, git2::Error> {
        let mut names = BTreeSet::new();
        // `*` matches `/` too, which branch names may hold. git refuses `*`, `?` and `[`
        // in ref names, so a prefix holding one has no refs the glob could miss; what
        // it matches beyond the prefix is dropped here.
        for name in self.repo.references_glob(&format!("{prefix}*"))?.names() {
            let name = name?;
            if name.starts_with(prefix) {
                names.insert(name.to_owned());
            }
        }
        for (name, new) in self.pushed.range::<str, _>((std::ops::Bound::Included(prefix), std::ops::Bound::Unbounded))
        {
            if !name.starts_with(prefix) {
                break;
            }
            match new {
                Some(_) => names.insert(name.clone()),
                None => names.remove(name),
            };
        }
        Ok(names.into_iter().collect())
    }

    /// The file `file` at the root of the tree of `object` (a commit, or an annotated
    /// tag of one), if it is there.
    pub fn root_file(&self, object: Oid, file: &str) -> Result<Option<Vec<u8>>, git2::Error> {
        let tree = self.repo.find_object(object, None)?.peel_to_tree()?;
        let Some(entry) = tree.get_name(file) else {
            return Ok(None);
        };
        Ok(Some(entry.to_object(self.repo)?.peel_to_blob()?.content().to_vec()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A bare master holding `refs`, each a commit of a tree with one file.
    fn master(refs: &[&str]) -> (tempfile::TempDir, Repository) {
        let dir = tempfile::tempdir().expect("tempdir");
        let repo = Repository::init_bare(dir.path()).expect("init");
        for name in refs {
            let commit = commit(&repo, "f", name);
            repo.reference(name, commit, true, "test").expect("ref");
        }
        (dir, repo)
    }

    fn commit(repo: &Repository, file: &str, content: &str) -> Oid {
        let blob = repo.blob(content.as_bytes()).expect("blob");
        let mut tree = repo.treebuilder(None).expect("builder");
        tree.insert(file, blob, 0o100644).expect("insert");
        let tree = repo.find_tree(tree.write().expect("tree")).expect("tree");
        let sig = git2::Signature::now("confcast test", "test@confcast.invalid").expect("signature");
        repo.commit(None, &sig, &sig, "test", &tree, &[]).expect("commit")
    }

    #[test]
    fn pushed_refs_read_as_their_new_value_and_deleted_refs_as_gone() {
        let (_dir, repo) = master(&[
            "refs/heads/services/web/master",
            "refs/heads/services/web/feature/x",
            "refs/heads/services/webby/master",
            "refs/tags/services/web/v1",
        ]);
        let new = commit(&repo, "f", "new");
        let updates = [
            RefUpdate { old: None, new: Some(new), ref_name: "refs/heads/services/web/dev".into() },
            RefUpdate { old: Some(new), new: None, ref_name: "refs/heads/services/web/master".into() },
        ];
        let master = AfterPush::new(&repo, &updates);
        assert_eq!(
            master.refs_under("refs/heads/services/web/").expect("list"),
            vec!["refs/heads/services/web/dev", "refs/heads/services/web/feature/x"],
            "created and nested branches are there, the deleted one and another service's are not"
        );
        assert_eq!(master.commit_of("refs/heads/services/web/dev").expect("read"), Some(new));
        assert_eq!(master.commit_of("refs/heads/services/web/master").expect("read"), None);
        assert!(master.commit_of("refs/tags/services/web/v1").expect("read").is_some());
        assert_eq!(master.commit_of("refs/tags/services/web/v2").expect("read"), None);
        assert_eq!(master.root_file(new, "f").expect("read").as_deref(), Some(&b"new"[..]));
        assert_eq!(master.root_file(new, "g").expect("read"), None);
        assert!(master.pushes("refs/heads/services/web/master") && !master.pushes("refs/tags/services/web/v1"));
    }

    #[test]
    fn annotated_tags_are_peeled() {
        let (_dir, repo) = master(&["refs/heads/services/web/master"]);
        let head = repo.refname_to_id("refs/heads/services/web/master").expect("head");
        let sig = git2::Signature::now("confcast test", "test@confcast.invalid").expect("signature");
        let object = repo.find_object(head, None).expect("object");
        let tag = repo.tag("services/web/v1", &object, &sig, "v1", false).expect("tag");
        let pushed = repo.tag_annotation_create("services/web/v2", &object, &sig, "v2").expect("tag object");
        let updates = [RefUpdate { old: None, new: Some(pushed), ref_name: "refs/tags/services/web/v2".into() }];
        let master = AfterPush::new(&repo, &updates);
        assert_ne!(tag, head);
        assert_eq!(master.commit_of("refs/tags/services/web/v1").expect("read"), Some(head));
        assert_eq!(master.commit_of("refs/tags/services/web/v2").expect("read"), Some(head));
    }
}
