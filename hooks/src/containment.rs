//! pre-receive's check of a pushed configuration tree (the refs of `services/`,
//! `applications/` and `devices/`): every entry has a name a directory can hold, and the
//! tree's symbolic links, taken together, stay inside it (`confcast_schemas::path`). The
//! relay and the subscriber refuse such a tree too; refusing it at the door means a push
//! that could never be delivered is never accepted, and the pusher hears why at once.
//!
//! Cost follows the change. When the ref had a commit, only the entries the push adds or
//! changes are read (a subtree with the same id is skipped, as git's own diff does), and
//! their names checked. Links are judged all together, because one link can lead another
//! out: so only when the push adds, changes or removes a link is the whole new tree
//! walked for its links. Files never change that verdict (a component that is not a link
//! is taken as a directory whatever the tree holds there), so a push that touches no link
//! keeps the verdict of the tree it replaces. A new ref, or one whose previous commit
//! cannot be read, is walked whole.
//!
//! Trees are compared entry by entry rather than with libgit2's diff, whose paths are
//! joined with `/`: a name holding a `/` could not be told from a directory there.

use confcast_schemas::{
    path::{self, Links},
    refs, Kind,
};
use git2::{Oid, Repository, Tree, TreeEntry};

use crate::{RefUpdate, Rejection};

/// Mode of a tree entry that is a directory.
const DIRECTORY: i32 = 0o040000;
/// Mode of a tree entry that is a symbolic link.
const SYMLINK: i32 = 0o120000;

/// Whether a ref holds a configuration tree that hosts materialize.
pub fn holds_tree(ref_name: &str) -> bool {
    let Some(rest) = refs::short_name(ref_name) else {
        return false;
    };
    Kind::ALL.iter().any(|kind| rest.strip_prefix(kind.plural()).is_some_and(|name| name.starts_with('/')))
}

/// Checks the tree of one ref update. Deletions, and refs that hold no configuration
/// tree, pass.
pub fn check(repo: &Repository, update: &RefUpdate) -> Result<(), Rejection> {
    let Some(new) = update.new.filter(|_| holds_tree(&update.ref_name)) else {
        return Ok(());
    };
    let ref_name = &update.ref_name;
    let new_tree = tree_of(repo, new).map_err(|error| Refusal::Git(error).rejection(ref_name))?;
    if let Some(old_tree) = update.old.and_then(|old| tree_of(repo, old).ok()) {
        match changed(repo, Some(&old_tree), &new_tree, &mut Vec::new()) {
            Ok(()) => return Ok(()),
            Err(Stop::Refused(name @ Refusal::Name { .. })) => return Err(name.rejection(ref_name)),
            // A link moved, or part of the diff cannot be read: judge the whole tree.
            Err(Stop::LinksTouched | Stop::Refused(Refusal::Git(_))) => {}
        }
    }
    let mut links = Links::new();
    gather(repo, &new_tree, &mut Vec::new(), &mut links).map_err(|refusal| refusal.rejection(ref_name))?;
    links.check().map_err(|error| Rejection::Link { ref_name: ref_name.clone(), error: Box::new(error) })
}

/// Why an entry of the pushed tree is refused, before the ref is known.
enum Refusal {
    /// A name no directory can hold, at `path`.
    Name { path: String, error: path::PathError },
    /// An object cannot be read.
    Git(git2::Error),
}

impl Refusal {
    fn rejection(self, ref_name: &str) -> Rejection {
        let ref_name = ref_name.to_owned();
        match self {
            Refusal::Name { path, error } => Rejection::Name { ref_name, path, error: Box::new(error) },
            Refusal::Git(error) => Rejection::Git { ref_name, error },
        }
    }
}

impl From<git2::Error> for Refusal {
    fn from(error: git2::Error) -> Refusal {
        Refusal::Git(error)
    }
}

/// Why the comparison of two trees stopped.
enum Stop {
    /// The push adds, changes or removes a link: the change alone cannot be judged.
    LinksTouched,
    /// An entry is refused, or cannot be read.
    Refused(Refusal),
}

impl From<Refusal> for Stop {
    fn from(refusal: Refusal) -> Stop {
        Stop::Refused(refusal)
    }
}

impl From<git2::Error> for Stop {
    fn from(error: git2::Error) -> Stop {
        Stop::Refused(Refusal::Git(error))
    }
}

fn tree_of(repo: &Repository, oid: Oid) -> Result<Tree<'_>, git2::Error> {
    repo.find_object(oid, None)?.peel_to_tree()
}

/// `dir` (empty, or ending in `/`) followed by `name`.
fn joined(dir: &[u8], name: &[u8]) -> Vec<u8> {
    [dir, name].concat()
}

fn check_name(dir: &[u8], entry: &TreeEntry<'_>) -> Result<(), Refusal> {
    path::check_name(entry.name_bytes()).map_err(|error| Refusal::Name {
        path: String::from_utf8_lossy(&joined(dir, entry.name_bytes())).into_owned(),
        error,
    })
}

/// Runs `f` with `dir` extended by the directory `name`, then restores it.
fn within<T>(dir: &mut Vec<u8>, name: &[u8], f: impl FnOnce(&mut Vec<u8>) -> T) -> T {
    let len = dir.len();
    dir.extend_from_slice(name);
    dir.push(b'/');
    let out = f(dir);
    dir.truncate(len);
    out
}

/// Checks the names of every entry under `tree` (at `dir`) and adds its links to `links`.
fn gather(repo: &Repository, tree: &Tree<'_>, dir: &mut Vec<u8>, links: &mut Links) -> Result<(), Refusal> {
    for entry in tree.iter() {
        check_name(dir, &entry)?;
        match entry.filemode() {
            DIRECTORY => {
                let sub = repo.find_tree(entry.id())?;
                within(dir, entry.name_bytes(), |dir| gather(repo, &sub, dir, links))?;
            }
            SYMLINK => links.insert(joined(dir, entry.name_bytes()), repo.find_blob(entry.id())?.content()),
            _ => {}
        }
    }
    Ok(())
}

/// Checks the names of the entries `new` adds or changes against `old` (`None`: an
/// empty tree), skipping what did not change; stops at the first link added, changed
/// or removed.
fn changed(repo: &Repository, old: Option<&Tree<'_>>, new: &Tree<'_>, dir: &mut Vec<u8>) -> Result<(), Stop> {
    for entry in new.iter() {
        let before = old.and_then(|old| old.get_name_bytes(entry.name_bytes()));
        let before_mode = before.as_ref().map(TreeEntry::filemode);
        if before.as_ref().is_some_and(|b| b.id() == entry.id()) && before_mode == Some(entry.filemode()) {
            continue;
        }
        check_name(dir, &entry)?;
        if entry.filemode() == SYMLINK || before_mode == Some(SYMLINK) {
            return Err(Stop::LinksTouched);
        }
        let before_tree = match &before {
            Some(b) if b.filemode() == DIRECTORY => Some(repo.find_tree(b.id())?),
            _ => None,
        };
        if entry.filemode() == DIRECTORY {
            let sub = repo.find_tree(entry.id())?;
            within(dir, entry.name_bytes(), |dir| changed(repo, before_tree.as_ref(), &sub, dir))?;
        } else if let Some(gone) = &before_tree {
            removed(repo, gone)?;
        }
    }
    for entry in old.into_iter().flat_map(Tree::iter) {
        if new.get_name_bytes(entry.name_bytes()).is_none() {
            match entry.filemode() {
                SYMLINK => return Err(Stop::LinksTouched),
                DIRECTORY => removed(repo, &repo.find_tree(entry.id())?)?,
                _ => {}
            }
        }
    }
    Ok(())
}

/// Stops if the removed `tree` held a link: without it, another link may lead elsewhere.
fn removed(repo: &Repository, tree: &Tree<'_>) -> Result<(), Stop> {
    for entry in tree.iter() {
        match entry.filemode() {
            SYMLINK => return Err(Stop::LinksTouched),
            DIRECTORY => removed(repo, &repo.find_tree(entry.id())?)?,
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    const FILE: i32 = 0o100644;
    const REF: &str = "refs/heads/services/service0/master";

    /// A bare repository to write trees into, entry by entry, names unchecked (libgit2's
    /// tree builder refuses the names this check is about).
    struct Repo {
        _dir: tempfile::TempDir,
        repo: Repository,
    }

    /// One entry of a tree given by paths.
    enum Node<'a> {
        File(&'a str),
        Link(&'a str),
    }

    impl Repo {
        fn new() -> Repo {
            let dir = tempfile::tempdir().expect("tempdir");
            let repo = Repository::init_bare(dir.path()).expect("init");
            Repo { _dir: dir, repo }
        }

        fn blob(&self, content: &[u8]) -> Oid {
            self.repo.blob(content).expect("blob")
        }

        /// Writes one tree object holding exactly `entries`, in git's order.
        fn raw_tree(&self, entries: &[(i32, &[u8], Oid)]) -> Oid {
            let mut sorted = entries.to_vec();
            let key =
                |(mode, name, _): &(i32, &[u8], Oid)| [*name, if *mode == DIRECTORY { b"/" } else { b"" }].concat();
            sorted.sort_by_key(key);
            let mut bytes = Vec::new();
            for (mode, name, oid) in sorted {
                bytes.extend_from_slice(format!("{mode:o} ").as_bytes());
                bytes.extend_from_slice(name);
                bytes.push(0);
                bytes.extend_from_slice(oid.as_bytes());
            }
            self.repo.odb().expect("odb").write(git2::ObjectType::Tree, &bytes).expect("write tree")
        }

        /// A commit of the tree holding `entries` at their paths.
        fn commit(&self, entries: &[(&str, Node<'_>)]) -> Oid {
            let tree = self.nested(entries.iter().map(|(path, node)| (path.as_bytes(), node)).collect());
            self.commit_tree(tree)
        }

        fn nested(&self, entries: Vec<(&[u8], &Node<'_>)>) -> Oid {
            let mut here = Vec::new();
            let mut dirs: BTreeMap<&[u8], Vec<(&[u8], &Node<'_>)>> = BTreeMap::new();
            for (path, node) in entries {
                match path.iter().position(|&b| b == b'/') {
                    Some(i) => dirs.entry(&path[..i]).or_default().push((&path[i + 1..], node)),
                    None => here.push(match node {
                        Node::File(content) => (FILE, path, self.blob(content.as_bytes())),
                        Node::Link(target) => (SYMLINK, path, self.blob(target.as_bytes())),
                    }),
                }
            }
            for (name, inner) in dirs {
                here.push((DIRECTORY, name, self.nested(inner)));
            }
            self.raw_tree(&here)
        }

        fn commit_tree(&self, tree: Oid) -> Oid {
            let tree = self.repo.find_tree(tree).expect("tree");
            let sig = git2::Signature::now("confcast test", "test@confcast.invalid").expect("signature");
            self.repo.commit(None, &sig, &sig, "test", &tree, &[]).expect("commit")
        }

        /// Checks the update of [`REF`] from `old` to `new`.
        fn check(&self, old: Option<Oid>, new: Oid) -> Result<(), Rejection> {
            check(&self.repo, &RefUpdate { old, new: Some(new), ref_name: REF.into() })
        }
    }

    #[test]
    fn trees_of_services_applications_and_devices_are_checked() {
        for ours in [
            "refs/heads/services/s/master",
            "refs/tags/services/s/v1",
            "refs/heads/applications/a/main",
            "refs/tags/devices/d/v2",
        ] {
            assert!(holds_tree(ours), "{ours}");
        }
        for other in [
            "refs/heads/datacenters/dc1",
            "refs/heads/datacenter-configuration/big",
            "refs/heads/servicesx/s/master",
            "refs/notes/services/s",
            "refs/heads/main",
        ] {
            assert!(!holds_tree(other), "{other}");
        }
    }

    #[test]
    fn links_that_leave_through_one_another_are_refused() {
        let repo = Repo::new();
        let evil = repo.commit(&[
            ("app.conf", Node::File("x")),
            ("a/b/deep", Node::Link("../..")),
            ("x", Node::Link("a/b/deep/../etc/passwd")),
        ]);
        let err = repo.check(None, evil).expect_err("x leaves through deep");
        assert!(matches!(err, Rejection::Link { .. }), "{err}");
        assert_eq!(
            err.to_string(),
            "refs/heads/services/service0/master: symlink \"x\" points outside the service tree: \
             \"a/b/deep/../etc/passwd\" leads to \"../etc/passwd\" through symlink \"a/b/deep\""
        );
        // The same links, on top of a good commit of the ref.
        let good = repo.commit(&[("app.conf", Node::File("x")), ("a/b/deep", Node::Link("../.."))]);
        repo.check(None, good).expect("deep alone stays inside");
        let err = repo.check(Some(good), evil).expect_err("the added link is judged with the others");
        assert!(err.to_string().contains("through symlink \"a/b/deep\""), "{err}");

        let absolute = repo.commit(&[("conf/passwd", Node::Link("/etc/passwd"))]);
        let err = repo.check(Some(good), absolute).expect_err("absolute target");
        assert!(err.to_string().contains("symlink \"conf/passwd\" points outside the service tree"), "{err}");
    }

    #[test]
    fn loops_are_refused() {
        let repo = Repo::new();
        let looping = repo.commit(&[("a", Node::Link("b")), ("b", Node::Link("a"))]);
        let err = repo.check(None, looping).expect_err("a loop");
        assert!(err
            .to_string()
            .starts_with("refs/heads/services/service0/master: symlink \"a\" -> \"b\" never resolves"));
    }

    #[test]
    fn names_no_directory_can_hold_are_refused() {
        let repo = Repo::new();
        let content = repo.blob(b"x");
        let good = repo.commit(&[("app.conf", Node::File("x")), ("conf/a", Node::File("y"))]);
        // A NUL ends a name in git's tree format, so no tree can hold one; the other
        // names are written as they are, as a hand-made object would hold them.
        for bad in [&b".."[..], b".", b"a/b", b".git/../.."] {
            let conf = repo.raw_tree(&[(FILE, b"a", content), (FILE, bad, content)]);
            let root = repo.raw_tree(&[(FILE, b"app.conf", content), (DIRECTORY, b"conf", conf)]);
            let commit = repo.commit_tree(root);
            for old in [None, Some(good)] {
                let err = repo.check(old, commit).expect_err("refused");
                let shown = String::from_utf8_lossy(bad);
                assert!(matches!(&err, Rejection::Name { path, .. } if *path == format!("conf/{shown}")), "{err}");
                assert!(
                    err.to_string().starts_with(&format!("{REF}: tree entry \"conf/{shown}\" is refused")),
                    "{err}"
                );
            }
        }
        // libgit2 cannot even read a tree with an empty name (so no commit of it can be
        // made here; the update names the tree itself): refused all the same.
        let root = repo.raw_tree(&[(FILE, b"", content)]);
        let err = repo.check(None, root).expect_err("empty name");
        assert!(matches!(err, Rejection::Git { .. }), "{err}");
        // Odd but plain names pass.
        let odd = repo.raw_tree(&[(FILE, b"\xff\xfe latin1", content), (FILE, b"line\nbreak", content)]);
        repo.check(Some(good), repo.commit_tree(odd)).expect("plain names");
    }

    #[test]
    fn a_push_that_touches_no_link_is_judged_by_its_change() {
        let repo = Repo::new();
        // A tree that was on the ref before the check existed: its link leaves.
        let before = repo.commit(&[("app.conf", Node::File("1")), ("conf/passwd", Node::Link("../../etc/passwd"))]);
        let files_only = repo.commit(&[("app.conf", Node::File("2")), ("conf/passwd", Node::Link("../../etc/passwd"))]);
        repo.check(Some(before), files_only).expect("no link read: the change is only a file");
        // Any change of a link judges every link of the tree.
        let one_more = repo.commit(&[
            ("app.conf", Node::File("2")),
            ("conf/passwd", Node::Link("../../etc/passwd")),
            ("conf/harmless", Node::Link("../app.conf")),
        ]);
        let err = repo.check(Some(files_only), one_more).expect_err("the whole tree is judged");
        assert!(err.to_string().contains("symlink \"conf/passwd\""), "{err}");
        // An old side that cannot be read (not in this repository) judges the whole tree.
        repo.check(Some(Oid::from_bytes(&[7; 20]).expect("oid")), files_only).expect_err("whole tree");
    }

    #[test]
    fn removing_a_link_judges_the_links_left() {
        let repo = Repo::new();
        // Through the link `dir/d`, three levels down, `x` stays inside; once the
        // directory holding it goes, `dir/d` is taken as a plain directory and `x` leaves.
        let with_link = repo.commit(&[("dir/d", Node::Link("../p/q/r")), ("x", Node::Link("dir/d/../../../y"))]);
        repo.check(None, with_link).expect("inside through dir/d");
        for without in [
            repo.commit(&[("x", Node::Link("dir/d/../../../y"))]),
            repo.commit(&[("dir", Node::File("now a file")), ("x", Node::Link("dir/d/../../../y"))]),
            repo.commit(&[("dir/d", Node::File("now a file")), ("x", Node::Link("dir/d/../../../y"))]),
        ] {
            let err = repo.check(Some(with_link), without).expect_err("x leaves");
            assert!(err.to_string().contains("symlink \"x\" points outside the service tree"), "{err}");
        }
    }

    #[test]
    fn deletions_and_other_refs_pass() {
        let repo = Repo::new();
        let evil = repo.commit(&[("l", Node::Link("../x"))]);
        check(&repo.repo, &RefUpdate { old: Some(evil), new: None, ref_name: REF.into() }).expect("deletion");
        check(&repo.repo, &RefUpdate { old: None, new: Some(evil), ref_name: "refs/heads/main".into() })
            .expect("not a configuration tree");
    }
}
