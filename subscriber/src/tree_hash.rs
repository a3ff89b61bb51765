//! The git tree id of a directory on disk: the subscriber's integrity check.
//!
//! Computed exactly as git would for a commit of that directory, with gitoxide's own
//! object encoding (`gix-object`) and hashing (`gix-hash`: SHA-1 with git's collision
//! detection): symlinks are blobs of their target, any execute bit is mode `100755`,
//! trees are sorted in git's order, empty directories are omitted (git cannot hold
//! them). An update names the tree id it must produce; if what was materialized hashes
//! differently, the subscriber refuses to switch to it. Content that the collision
//! detection flags is refused: reading it from disk fails, and in memory it hashes to
//! the null id, which no update announces.
//!
//! What gitoxide costs, measured against the hand-written encoding with plain `sha1`
//! it replaced (same commit otherwise, release builds without LTO, a loaded 2-core
//! machine): the subscriber binary's code and data (`size`) grew from 11,292,262 to
//! 11,414,514 bytes (+1.1%; the file, line tables included, from 67.6 to 71.3 MB).
//! Hashing a tree of 100,000 small files, alternated three times each, took 1.41, 1.63,
//! 1.52 s before and 1.61, 1.73, 1.07 s after from disk (page cache warm), and 23, 31,
//! 24 ms before and 32, 28, 20 ms after from its manifest: no difference beyond the
//! spread. Per byte the collision detection is slower: a 256 MiB blob took 176 ms with
//! `sha1` and 227 to 252 ms with `gix-hash`, the price git pays too. Reproduce with
//! `CARGO_PROFILE_RELEASE_LTO=false CARGO_PROFILE_RELEASE_CODEGEN_UNITS=16 cargo build
//! --release -p confcast-subscriber` (then `size target/release/subscriber`) and, with
//! the same variables, `cargo test --release -p confcast-subscriber --lib tree_hash --
//! --ignored --nocapture`.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs;
use std::io::{self, Read};
use std::os::fd::BorrowedFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use gix_object::tree::{Entry, EntryKind};
use gix_object::WriteTo as _;

/// A 20-byte git object id.
pub type ObjectId = [u8; 20];

/// The id of git's empty tree.
pub const EMPTY_TREE: &str = "4b825dc642cb6eb9a060e54bf8d69288fbee4904";

/// Why a file on disk could not be hashed (carried as the [`io::Error`] of the hashing
/// functions, kind `InvalidData`).
#[derive(Debug, thiserror::Error)]
pub enum HashError {
    /// The file was written to while it was read.
    #[error("{} changed size while hashing", path.display())]
    ChangedSize {
        /// The file.
        path: PathBuf,
    },
    /// Its content is made to collide with other content under SHA-1.
    #[error("{}: refused", path.display())]
    Collision {
        /// The file.
        path: PathBuf,
        /// What the detection found.
        #[source]
        source: gix_error::Error,
    },
}

impl From<HashError> for io::Error {
    fn from(e: HashError) -> io::Error {
        io::Error::new(io::ErrorKind::InvalidData, e)
    }
}

/// The id of the object of `kind` whose encoding is `object`; the error says it is part
/// of a collision attack.
fn object_id(kind: gix_object::Kind, object: &[u8]) -> Result<ObjectId, gix_error::Error> {
    gix_object::compute_hash(gix_hash::Kind::Sha1, kind, object).map(raw)
}

fn raw(id: gix_hash::ObjectId) -> ObjectId {
    id.as_slice().try_into().expect("SHA-1 ids are 20 bytes")
}

/// Hashes `content` as a git blob (the null id if it is part of a collision attack).
pub fn blob_id(content: &[u8]) -> ObjectId {
    object_id(gix_object::Kind::Blob, content).unwrap_or_default()
}

fn file_blob_id(path: &Path, len: u64) -> io::Result<ObjectId> {
    hash_file(fs::File::open(path)?, len, path)
}

/// Hashes the `len` bytes of `file` as a blob; `path` names it in errors.
fn hash_file(mut file: fs::File, len: u64, path: &Path) -> io::Result<ObjectId> {
    let mut hasher = gix_hash::hasher(gix_hash::Kind::Sha1);
    hasher.update(&gix_object::encode::loose_header(gix_object::Kind::Blob, len));
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
        return Err(HashError::ChangedSize { path: path.to_owned() }.into());
    }
    let id = hasher.try_finalize().map_err(|source| HashError::Collision { path: path.to_owned(), source })?;
    Ok(raw(id))
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

/// The tree entry kind of a manifest's mode.
fn entry_kind(mode: &str) -> EntryKind {
    match mode {
        "100755" => EntryKind::BlobExecutable,
        "120000" => EntryKind::Link,
        "40000" => EntryKind::Tree,
        _ => EntryKind::Blob,
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
        Ok(("120000", link_id(fs::read_link(path)?.as_os_str().as_bytes(), path)?))
    } else if meta.file_type().is_file() {
        Ok((file_mode(meta.permissions().mode()), file_blob_id(path, meta.len())?))
    } else {
        Err(io::Error::other(format!("{} is neither file nor symlink", path.display())))
    }
}

/// The blob id of a symlink's `target`; `shown` names the link in errors.
fn link_id(target: &[u8], shown: &Path) -> io::Result<ObjectId> {
    object_id(gix_object::Kind::Blob, target)
        .map_err(|source| HashError::Collision { path: shown.to_owned(), source }.into())
}

/// Hashes the entry `name` of the directory `dir` (a file or a symlink, never followed),
/// as git would record it. `shown` names it in errors.
pub fn entry_id_at(dir: BorrowedFd<'_>, name: &OsStr, shown: &Path) -> io::Result<(&'static str, ObjectId)> {
    use nix::fcntl::{AtFlags, OFlag};
    use nix::sys::stat::{Mode, SFlag};
    let stat = nix::sys::stat::fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW)?;
    let kind = SFlag::from_bits_truncate(stat.st_mode) & SFlag::S_IFMT;
    if kind == SFlag::S_IFLNK {
        Ok(("120000", link_id(nix::fcntl::readlinkat(dir, name)?.as_bytes(), shown)?))
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

/// The git tree id of a manifest, computed in memory (the null id if a tree is part of
/// a collision attack).
pub fn tree_id_of(manifest: &Manifest) -> String {
    let entries: Vec<(&[u8], &'static str, ObjectId)> = manifest.iter().map(|(p, (m, id))| (&p[..], *m, *id)).collect();
    let id = match hash_level(&entries, &mut Vec::new()) {
        Ok(Some(id)) => id,
        // Nothing at all: git's empty tree.
        Ok(None) => object_id(gix_object::Kind::Tree, &[]).unwrap_or_default(),
        Err(Unhashable) => ObjectId::default(),
    };
    hex::encode(id)
}

/// A manifest git could not record: a tree made to collide under SHA-1, or a name
/// holding NUL (only a forged update has one). It hashes to the null id.
#[derive(Debug)]
struct Unhashable;

/// Hashes the tree of `entries` (sorted paths relative to this level); `None` if it
/// holds nothing. `encoded` is a buffer for the trees' encodings.
fn hash_level(
    entries: &[(&[u8], &'static str, ObjectId)],
    encoded: &mut Vec<u8>,
) -> Result<Option<ObjectId>, Unhashable> {
    let mut tree = gix_object::Tree::empty();
    let mut i = 0;
    while i < entries.len() {
        let (path, mode, id) = entries[i];
        let Some(slash) = path.iter().position(|&b| b == b'/') else {
            tree.entries.push(Entry { mode: entry_kind(mode).into(), filename: path.into(), oid: id.into() });
            i += 1;
            continue;
        };
        // A directory: every following path that starts with `name/` is in it.
        let name = &path[..=slash];
        let len = entries[i..].iter().take_while(|(p, _, _)| p.starts_with(name)).count();
        let children: Vec<_> = entries[i..i + len].iter().map(|&(p, m, id)| (&p[slash + 1..], m, id)).collect();
        if let Some(sub) = hash_level(&children, encoded)? {
            tree.entries.push(Entry { mode: EntryKind::Tree.into(), filename: path[..slash].into(), oid: sub.into() });
        }
        i += len;
    }
    if tree.entries.is_empty() {
        return Ok(None);
    }
    // Git's order, which compares a directory as if its name ended in '/'.
    tree.entries.sort();
    encoded.clear();
    tree.write_to(encoded).map_err(|_| Unhashable)?;
    object_id(gix_object::Kind::Tree, encoded).map(Some).map_err(|_| Unhashable)
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
    crate::position::put_in_place(&tmp, path)
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

    /// The time to hash a tree of 100,000 files (1,000 directories of 100), from disk
    /// (page cache warm) and from its manifest in memory. Run with
    /// `cargo test --release -p confcast-subscriber --lib tree_hash -- --ignored --nocapture`.
    #[test]
    #[ignore = "a measurement, not a check"]
    fn hashing_a_hundred_thousand_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        for d in 0..1000 {
            let sub = dir.path().join(format!("d{d:03}"));
            fs::create_dir(&sub).expect("mkdir");
            for f in 0..100 {
                fs::write(sub.join(format!("f{f:02}.conf")), format!("key = {d}.{f}\n")).expect("write");
            }
        }
        let manifest = scan(dir.path()).expect("warm the page cache");
        let started = std::time::Instant::now();
        let from_disk = tree_id(dir.path()).expect("hash");
        let disk = started.elapsed();
        let started = std::time::Instant::now();
        let rounds = 10;
        for _ in 0..rounds {
            assert_eq!(tree_id_of(&manifest), from_disk);
        }
        let memory = started.elapsed() / rounds;
        eprintln!("100,000 files: from disk {disk:?}, from the manifest {memory:?}");
    }

    #[test]
    fn ids_are_gits() {
        assert_eq!(hex::encode(blob_id(b"")), "e69de29bb2d1d6434b8b29ae775ad8c2e48c5391");
        assert_eq!(tree_id_of(&Manifest::new()), EMPTY_TREE);
        // Modes and names as git writes them, a directory sorting as `a/` after `a.txt`.
        let manifest = Manifest::from([
            (b"a.txt".to_vec(), ("100644", blob_id(b"x"))),
            (b"a/run".to_vec(), ("100755", blob_id(b"y"))),
            (b"l".to_vec(), ("120000", blob_id(b"a.txt"))),
        ]);
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        fs::create_dir(root.join("a")).expect("mkdir");
        fs::write(root.join("a.txt"), "x").expect("write");
        fs::write(root.join("a/run"), "y").expect("write");
        fs::set_permissions(root.join("a/run"), fs::Permissions::from_mode(0o700)).expect("chmod");
        std::os::unix::fs::symlink("a.txt", root.join("l")).expect("symlink");
        git(root, &["init", "-q"]);
        git(root, &["add", "-A"]);
        assert_eq!(tree_id_of(&manifest), git(root, &["write-tree"]));
    }

    #[test]
    fn a_name_git_cannot_hold_hashes_to_the_null_id() {
        let manifest = Manifest::from([(b"a\0b".to_vec(), ("100644", blob_id(b"x")))]);
        assert_eq!(tree_id_of(&manifest), hex::encode(ObjectId::default()));
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
