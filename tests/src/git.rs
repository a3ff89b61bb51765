//! Real git, run the way the tests need it: a command that must succeed, and the
//! listing of a tree (path → mode and blob) as git records it, of a commit or of a
//! directory on a host, so the two can be compared independently of confcast's own
//! tree hashing.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

/// A tree as git records it: path → (mode, blob id).
pub type Listing = BTreeMap<String, (String, String)>;

/// Runs git, panicking with its output on failure.
pub fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git").arg("-C").arg(dir).args(args).output().expect("git runs");
    assert!(out.status.success(), "git {args:?} in {}: {}", dir.display(), String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// The listing of a directory on disk as git would record it (computed by git itself,
/// in a scratch repository, so it is independent of confcast's own tree hashing).
pub fn disk_listing(dir: &Path) -> Listing {
    let scratch = tempfile::tempdir().expect("tempdir");
    let git_dir = scratch.path().join("scratch.git");
    git(scratch.path(), &["init", "-q", "--bare", git_dir.to_str().expect("utf-8")]);
    let run = |args: &[&str]| {
        let out = Command::new("git")
            .arg("--git-dir")
            .arg(&git_dir)
            .arg("--work-tree")
            .arg(dir)
            .args(["-c", "core.symlinks=true", "-c", "core.filemode=true"])
            .args(args)
            .output()
            .expect("git");
        assert!(out.status.success(), "git {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    run(&["add", "-A", "-f", "."]);
    let tree = run(&["write-tree"]);
    parse_ls_tree(&run(&["ls-tree", "-r", "-z", "--full-tree", tree.trim()]))
}

/// The output of `git ls-tree -r -z`, as a listing.
pub(crate) fn parse_ls_tree(out: &str) -> Listing {
    out.split('\0')
        .filter(|l| !l.is_empty())
        .filter_map(|l| {
            let (meta, path) = l.split_once('\t')?;
            let mut parts = meta.split(' ');
            let mode = parts.next()?.to_owned();
            let _kind = parts.next()?;
            let blob = parts.next()?.to_owned();
            Some((path.to_owned(), (mode, blob)))
        })
        .collect()
}
