//! The git tree id of a directory on disk: the subscriber's integrity check.
//!
//! Computed exactly as git would for a commit of that directory: blobs hashed as
//! `blob <len>\0<content>`, symlinks as blobs of their target, any execute bit as mode
//! `100755`, trees sorted with directories compared as `name/`, empty directories
//! omitted (git cannot hold them). An update names the tree id it must produce; if what
//! was materialized hashes differently, the subscriber refuses to switch to it.

use std::fs;
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use sha1::{Digest, Sha1};

/// A 20-byte git object id.
pub type ObjectId = [u8; 20];

/// The id of git's empty tree.
pub const EMPTY_TREE: &str = "4b825dc642cb6eb9a060e54bf8d69288fbee4904";

/// Hashes `content` as a git blob.
pub fn blob_id(content: &[u8]) -> ObjectId {
    let mut hasher = Sha1::new();
    hasher.update(format!("blob {}\0", content.len()).as_bytes());
    hasher.update(content);
    hasher.finalize().into()
}

fn file_blob_id(path: &Path, len: u64) -> io::Result<ObjectId> {
    let mut hasher = Sha1::new();
    hasher.update(format!("blob {len}\0").as_bytes());
    let mut file = fs::File::open(path)?;
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0u64;
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        total += n as u64;
        hasher.update(&buf[..n]);
    }
    if total != len {
        return Err(io::Error::other(format!("{} changed size while hashing", path.display())));
    }
    Ok(hasher.finalize().into())
}

/// The git tree id of the directory `root`, as lowercase hex.
pub fn tree_id(root: &Path) -> io::Result<String> {
    Ok(hex::encode(hash_dir(root)?.unwrap_or_else(empty_tree)))
}

fn empty_tree() -> ObjectId {
    let mut id = [0u8; 20];
    hex::decode_to_slice(EMPTY_TREE, &mut id).expect("constant is valid hex");
    id
}

/// `None` for a directory with no files below it.
fn hash_dir(dir: &Path) -> io::Result<Option<ObjectId>> {
    let mut entries: Vec<(Vec<u8>, &'static str, ObjectId, bool)> = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name().as_bytes().to_vec();
        let path = entry.path();
        let meta = fs::symlink_metadata(&path)?;
        let file_type = meta.file_type();
        if file_type.is_dir() {
            if let Some(id) = hash_dir(&path)? {
                entries.push((name, "40000", id, true));
            }
        } else if file_type.is_symlink() {
            let target = fs::read_link(&path)?;
            entries.push((name, "120000", blob_id(target.as_os_str().as_bytes()), false));
        } else if file_type.is_file() {
            let mode = if meta.permissions().mode() & 0o111 != 0 { "100755" } else { "100644" };
            entries.push((name, mode, file_blob_id(&path, meta.len())?, false));
        } else {
            return Err(io::Error::other(format!("{} is neither file, directory nor symlink", path.display())));
        }
    }
    if entries.is_empty() {
        return Ok(None);
    }
    // git sorts tree entries by name, comparing a directory as if its name ended in '/'.
    entries.sort_by(|a, b| {
        let key = |e: &(Vec<u8>, &str, ObjectId, bool)| {
            let mut k = e.0.clone();
            if e.3 {
                k.push(b'/');
            }
            k
        };
        key(a).cmp(&key(b))
    });
    let mut body = Vec::new();
    for (name, mode, id, _) in &entries {
        body.extend_from_slice(mode.as_bytes());
        body.push(b' ');
        body.extend_from_slice(name);
        body.push(0);
        body.extend_from_slice(id);
    }
    let mut hasher = Sha1::new();
    hasher.update(format!("tree {}\0", body.len()).as_bytes());
    hasher.update(&body);
    Ok(Some(hasher.finalize().into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn git(dir: &Path, args: &[&str]) -> String {
        let out = Command::new("git").arg("-C").arg(dir).args(args).output().expect("git runs");
        assert!(out.status.success(), "git {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    #[test]
    fn empty_directory_is_the_empty_tree() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(tree_id(dir.path()).expect("hash"), EMPTY_TREE);
    }

    #[test]
    fn matches_git_for_modes_links_nesting_and_ordering() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        fs::create_dir_all(root.join("a/b")).expect("mkdir");
        fs::create_dir_all(root.join("empty")).expect("mkdir");
        fs::write(root.join("a/b/c.conf"), "x = 1\n").expect("write");
        fs::write(root.join("a.txt"), "sorts before the directory a/").expect("write");
        fs::write(root.join("a-b"), "").expect("write");
        fs::write(root.join("run.sh"), "#!/bin/sh\n").expect("write");
        fs::set_permissions(root.join("run.sh"), fs::Permissions::from_mode(0o755)).expect("chmod");
        fs::write(root.join("bin.dat"), [0u8, 159, 146, 150, 255]).expect("write");
        std::os::unix::fs::symlink("a/b/c.conf", root.join("link")).expect("symlink");
        fs::write(root.join("\u{e9}t\u{e9}"), "utf8 name").expect("write");

        let ours = tree_id(root).expect("hash");
        git(root, &["init", "-q"]);
        git(root, &["add", "-A"]);
        let theirs = git(root, &["write-tree"]);
        fs::remove_dir_all(root.join(".git")).expect("cleanup");
        assert_eq!(ours, theirs);
    }
}
