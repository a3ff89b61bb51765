//! The git tree id of a directory on disk: the subscriber's integrity check.
//!
//! Computed exactly as git would for a commit of that directory: blobs hashed as
//! `blob <len>\0<content>`, symlinks as blobs of their target, any execute bit as mode
//! `100755`, trees sorted with directories compared as `name/`, empty directories
//! omitted (git cannot hold them). An update names the tree id it must produce; if what
//! was materialized hashes differently, the subscriber refuses to switch to it.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs;
use std::io::{self, Read};
use std::os::fd::BorrowedFd;
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
    hash_file(fs::File::open(path)?, len, path)
}

fn hash_file(mut file: fs::File, len: u64, path: &Path) -> io::Result<ObjectId> {
    let mut hasher = Sha1::new();
    hasher.update(format!("blob {len}\0").as_bytes());
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

/// What a tree holds: every file and symlink by path (raw bytes), with its git mode and
/// blob id. Directories are implied by paths, as in git: an empty one does not exist.
pub type Manifest = BTreeMap<Vec<u8>, (&'static str, ObjectId)>;

/// Git mode of a regular file with permission bits `mode`.
pub fn file_mode(mode: u32) -> &'static str {
    if mode & 0o111 != 0 {
        "100755"
    } else {
        "100644"
    }
}

/// The git tree id of the directory `root`, as lowercase hex: every file is read.
pub fn tree_id(root: &Path) -> io::Result<String> {
    Ok(tree_id_of(&scan(root)?))
}

/// Reads and hashes every file below `root`.
pub fn scan(root: &Path) -> io::Result<Manifest> {
    let mut manifest = Manifest::new();
    scan_into(root, &mut Vec::new(), &mut manifest)?;
    Ok(manifest)
}

/// Hashes one entry on disk (a file or a symlink), as git would record it.
pub fn entry_id(path: &Path) -> io::Result<(&'static str, ObjectId)> {
    let meta = fs::symlink_metadata(path)?;
    if meta.file_type().is_symlink() {
        Ok(("120000", blob_id(fs::read_link(path)?.as_os_str().as_bytes())))
    } else if meta.file_type().is_file() {
        Ok((file_mode(meta.permissions().mode()), file_blob_id(path, meta.len())?))
    } else {
        Err(io::Error::other(format!("{} is neither file nor symlink", path.display())))
    }
}

/// Hashes the entry `name` of the directory `dir` (a file or a symlink, never followed),
/// as git would record it. `shown` names it in errors.
pub fn entry_id_at(dir: BorrowedFd<'_>, name: &OsStr, shown: &Path) -> io::Result<(&'static str, ObjectId)> {
    use nix::fcntl::{AtFlags, OFlag};
    use nix::sys::stat::{Mode, SFlag};
    let stat = nix::sys::stat::fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW)?;
    let kind = SFlag::from_bits_truncate(stat.st_mode) & SFlag::S_IFMT;
    if kind == SFlag::S_IFLNK {
        Ok(("120000", blob_id(nix::fcntl::readlinkat(dir, name)?.as_bytes())))
    } else if kind == SFlag::S_IFREG {
        let fd = nix::fcntl::openat(dir, name, OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC, Mode::empty())?;
        Ok((file_mode(stat.st_mode), hash_file(fs::File::from(fd), stat.st_size as u64, shown)?))
    } else {
        Err(io::Error::other(format!("{} is neither file nor symlink", shown.display())))
    }
}

fn scan_into(dir: &Path, rel: &mut Vec<u8>, manifest: &mut Manifest) -> io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let len = rel.len();
        if !rel.is_empty() {
            rel.push(b'/');
        }
        rel.extend_from_slice(entry.file_name().as_bytes());
        let path = entry.path();
        if entry.file_type()?.is_dir() {
            scan_into(&path, rel, manifest)?;
        } else {
            manifest.insert(rel.clone(), entry_id(&path)?);
        }
        rel.truncate(len);
    }
    Ok(())
}

/// The git tree id of a manifest, computed in memory.
pub fn tree_id_of(manifest: &Manifest) -> String {
    let entries: Vec<(&[u8], &'static str, ObjectId)> = manifest.iter().map(|(p, (m, id))| (&p[..], *m, *id)).collect();
    hex::encode(hash_level(&entries).unwrap_or_else(empty_tree))
}

/// Hashes the tree of `entries` (sorted paths relative to this level).
fn hash_level(entries: &[(&[u8], &'static str, ObjectId)]) -> Option<ObjectId> {
    if entries.is_empty() {
        return None;
    }
    let mut items: Vec<(Vec<u8>, &'static str, ObjectId)> = Vec::new();
    let mut i = 0;
    while i < entries.len() {
        let (path, mode, id) = entries[i];
        match path.iter().position(|&b| b == b'/') {
            None => {
                items.push((path.to_vec(), mode, id));
                i += 1;
            }
            Some(slash) => {
                let name = &path[..slash];
                let mut j = i;
                let mut children = Vec::new();
                while j < entries.len()
                    && entries[j].0.len() > slash
                    && &entries[j].0[..slash] == name
                    && entries[j].0[slash] == b'/'
                {
                    children.push((&entries[j].0[slash + 1..], entries[j].1, entries[j].2));
                    j += 1;
                }
                if let Some(sub) = hash_level(&children) {
                    let mut key = name.to_vec();
                    key.push(b'/');
                    items.push((key, "40000", sub));
                }
                i = j;
            }
        }
    }
    // git sorts tree entries by name, comparing a directory as if its name ended in '/'.
    items.sort_by(|a, b| a.0.cmp(&b.0));
    let mut body = Vec::new();
    for (name, mode, id) in &items {
        let name = if *mode == "40000" { &name[..name.len() - 1] } else { &name[..] };
        body.extend_from_slice(mode.as_bytes());
        body.push(b' ');
        body.extend_from_slice(name);
        body.push(0);
        body.extend_from_slice(id);
    }
    let mut hasher = Sha1::new();
    hasher.update(format!("tree {}\0", body.len()).as_bytes());
    hasher.update(&body);
    Some(hasher.finalize().into())
}

fn empty_tree() -> ObjectId {
    let mut id = [0u8; 20];
    hex::decode_to_slice(EMPTY_TREE, &mut id).expect("constant is valid hex");
    id
}

/// Writes a manifest beside a tree: a cache that lets the next diff be verified without
/// re-reading unchanged files. Format: per entry, u32 path length (LE), path, mode byte
/// (0 regular, 1 executable, 2 symlink), 20-byte blob id.
pub fn write_manifest(path: &Path, manifest: &Manifest) -> io::Result<()> {
    let mut out = Vec::with_capacity(manifest.len() * 64);
    for (p, (mode, id)) in manifest {
        out.extend_from_slice(&(p.len() as u32).to_le_bytes());
        out.extend_from_slice(p);
        out.push(match *mode {
            "100755" => 1,
            "120000" => 2,
            _ => 0,
        });
        out.extend_from_slice(id);
    }
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, out)?;
    crate::state::put_in_place(&tmp, path)
}

/// Reads a manifest written by [`write_manifest`]; `None` if absent or damaged.
pub fn read_manifest(path: &Path) -> Option<Manifest> {
    let bytes = fs::read(path).ok()?;
    let mut manifest = Manifest::new();
    let mut i = 0;
    while i < bytes.len() {
        let len = u32::from_le_bytes(bytes.get(i..i + 4)?.try_into().ok()?) as usize;
        i += 4;
        let p = bytes.get(i..i + len)?.to_vec();
        i += len;
        let mode = match bytes.get(i)? {
            0 => "100644",
            1 => "100755",
            2 => "120000",
            _ => return None,
        };
        i += 1;
        let id: ObjectId = bytes.get(i..i + 20)?.try_into().ok()?;
        i += 20;
        manifest.insert(p, (mode, id));
    }
    Some(manifest)
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
    fn manifests_round_trip_and_hash_like_the_disk() {
        let dir = tempfile::tempdir().expect("tempdir");
        fs::create_dir_all(dir.path().join("a/b")).expect("mkdir");
        fs::write(dir.path().join("a/b/x"), "x").expect("write");
        fs::write(dir.path().join("a.y"), "y").expect("write");
        std::os::unix::fs::symlink("a/b/x", dir.path().join("l")).expect("symlink");
        let manifest = scan(dir.path()).expect("scan");
        let file = dir.path().join("m");
        write_manifest(&file, &manifest).expect("write");
        assert_eq!(read_manifest(&file), Some(manifest.clone()));
        fs::remove_file(&file).expect("rm");
        assert_eq!(tree_id_of(&manifest), tree_id(dir.path()).expect("hash"));
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
