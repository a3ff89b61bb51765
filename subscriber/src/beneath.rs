//! Reaching the files of a tree through directory handles, never through a link that
//! leads out of it.
//!
//! A tree's links are checked to stay inside it before the tree goes live
//! (`confcast_schemas::path`), but the host does not rely on that check alone: what the
//! subscriber reads for the local API and what the materializer creates, rewrites and
//! removes is reached from a handle on the tree's root, with the kernel refusing any
//! resolution that would leave it (`openat2(2)` with `RESOLVE_BENEATH`), and the
//! materializer refusing to pass through any link at all (`RESOLVE_NO_SYMLINKS`): a
//! link that a previous or recycled tree left where the new tree has a directory makes
//! the build fail, it is never followed.
//!
//! On kernels without `openat2` (before 5.6) the same rules are kept by walking one
//! component at a time with `O_NOFOLLOW`, reading each link and following it by hand.

use std::collections::VecDeque;
use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use nix::errno::Errno;
use nix::fcntl::{openat, openat2, OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::{fstat, mkdirat, Mode, SFlag};

/// Links followed while opening one path before it counts as a loop (the kernel's
/// `MAXSYMLINKS`).
const MAX_HOPS: usize = confcast_schemas::path::MAX_LINK_HOPS;

/// How links under the root are treated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Links {
    /// Followed while they stay beneath the root (reads for the local API).
    FollowBeneath,
    /// Never followed, not even to another place inside (the materializer).
    Refuse,
}

/// Opens the directory `root` itself (the one link allowed is the path to it).
pub fn open_root(root: &Path) -> io::Result<OwnedFd> {
    Ok(nix::fcntl::open(root, OFlag::O_DIRECTORY | OFlag::O_RDONLY | OFlag::O_CLOEXEC, Mode::empty())?)
}

/// Opens the file `rel` beneath `root` for reading, following the tree's own links as
/// long as they stay beneath it. A path that leaves the tree fails with `EXDEV`, a loop
/// with `ELOOP`, anything that is not a regular file with `EINVAL`.
pub fn open_file(root: BorrowedFd<'_>, rel: &[u8]) -> io::Result<File> {
    // O_NONBLOCK: a FIFO put in the tree by hand must not hang the reader.
    let flags = OFlag::O_RDONLY | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK | OFlag::O_NOCTTY;
    let fd = open(root, rel, flags, Links::FollowBeneath)?;
    let stat = fstat(&fd)?;
    if SFlag::from_bits_truncate(stat.st_mode) & SFlag::S_IFMT != SFlag::S_IFREG {
        return Err(io::Error::from(Errno::EINVAL));
    }
    Ok(File::from(fd))
}

/// Opens the directory `rel` beneath `root` without following any link.
pub fn open_dir(root: BorrowedFd<'_>, rel: &[u8]) -> io::Result<OwnedFd> {
    open(root, rel, OFlag::O_DIRECTORY | OFlag::O_RDONLY | OFlag::O_CLOEXEC, Links::Refuse)
}

fn open(root: BorrowedFd<'_>, rel: &[u8], flags: OFlag, links: Links) -> io::Result<OwnedFd> {
    if rel.is_empty() || rel.first() == Some(&b'/') || rel.contains(&0) {
        return Err(io::Error::from(Errno::EINVAL));
    }
    let resolve = match links {
        Links::FollowBeneath => ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_MAGICLINKS,
        Links::Refuse => ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_SYMLINKS,
    };
    match openat2(root, OsStr::from_bytes(rel), OpenHow::new().flags(flags).resolve(resolve)) {
        Err(Errno::ENOSYS) => walk(root, rel, flags, links),
        // Interrupted by a concurrent rename somewhere in the file system: try once more.
        Err(Errno::EAGAIN) => Ok(openat2(root, OsStr::from_bytes(rel), OpenHow::new().flags(flags).resolve(resolve))?),
        other => Ok(other?),
    }
}

/// What `openat2` does, one component at a time: every component is opened with
/// `O_NOFOLLOW`; a link is read and, when allowed, followed by hand from the directory
/// it sits in; `..` never climbs above `root`.
fn walk(root: BorrowedFd<'_>, rel: &[u8], flags: OFlag, links: Links) -> io::Result<OwnedFd> {
    let mut pending: VecDeque<Vec<u8>> = rel.split(|&b| b == b'/').map(<[u8]>::to_vec).collect();
    // The directories entered so far, below the root.
    let mut stack: Vec<OwnedFd> = Vec::new();
    let mut hops = 0;
    while let Some(component) = pending.pop_front() {
        let here = match stack.last() {
            Some(fd) => fd.as_fd(),
            None => root,
        };
        match &component[..] {
            b"" | b"." => {}
            b".." => {
                if stack.pop().is_none() {
                    return Err(io::Error::from(Errno::EXDEV));
                }
            }
            name => {
                let name = OsStr::from_bytes(name);
                let last = pending.iter().all(|c| c.is_empty() || c == b".");
                // O_PATH opens the entry itself, whatever it is, without following it.
                let entry = openat(here, name, OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC, Mode::empty())?;
                let kind = SFlag::from_bits_truncate(fstat(&entry)?.st_mode) & SFlag::S_IFMT;
                if kind == SFlag::S_IFLNK {
                    if links == Links::Refuse {
                        return Err(io::Error::from(Errno::ELOOP));
                    }
                    hops += 1;
                    if hops > MAX_HOPS {
                        return Err(io::Error::from(Errno::ELOOP));
                    }
                    let target = nix::fcntl::readlinkat(here, name)?;
                    let target = target.as_bytes();
                    if target.first() == Some(&b'/') {
                        return Err(io::Error::from(Errno::EXDEV));
                    }
                    for c in target.split(|&b| b == b'/').rev() {
                        pending.push_front(c.to_vec());
                    }
                } else if last {
                    return Ok(openat(here, name, flags | OFlag::O_NOFOLLOW, Mode::empty())?);
                } else if kind == SFlag::S_IFDIR {
                    let dir =
                        openat(here, name, OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC, Mode::empty())?;
                    stack.push(dir);
                } else {
                    return Err(io::Error::from(Errno::ENOTDIR));
                }
            }
        }
    }
    // The path named a directory reached through `..` or a link (e.g. `a/..`).
    let here = match stack.last() {
        Some(fd) => fd.as_fd(),
        None => root,
    };
    Ok(openat(here, ".", flags, Mode::empty())?)
}

/// Handles on the directories of one tree, for the materializer: the directory that
/// holds an entry is reached from the root without following any link, and created
/// (with `dir_mode`) when `create` is set. The last directory used is kept open:
/// entries come in path order, so siblings share one lookup.
#[derive(Debug)]
pub struct Dirs {
    root: OwnedFd,
    create: Option<DirCreation>,
    last: Option<(Vec<u8>, OwnedFd)>,
}

/// How [`Dirs`] creates missing directories.
#[derive(Debug, Clone, Copy)]
pub struct DirCreation {
    /// Mode of new directories; `None`: 0o777 less the process's umask.
    pub mode: Option<u32>,
    /// Owner and group of new directories.
    pub owner: Option<nix::unistd::Uid>,
    /// Group of new directories.
    pub group: Option<nix::unistd::Gid>,
}

impl Dirs {
    /// Handles beneath the tree at `root`, which must be a directory (not a link).
    pub fn open(root: &Path, create: Option<DirCreation>) -> io::Result<Dirs> {
        let root = nix::fcntl::open(
            root,
            OFlag::O_DIRECTORY | OFlag::O_RDONLY | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW,
            Mode::empty(),
        )?;
        Ok(Dirs { root, create, last: None })
    }

    /// The tree's root.
    pub fn root(&self) -> BorrowedFd<'_> {
        self.root.as_fd()
    }

    /// Forgets the directory kept open (after directories were removed).
    pub fn forget(&mut self) {
        self.last = None;
    }

    /// The directory holding `path` and the entry's name in it.
    pub fn parent<'p>(&mut self, path: &'p [u8]) -> io::Result<(BorrowedFd<'_>, &'p OsStr)> {
        let (dir, name) = match path.iter().rposition(|&b| b == b'/') {
            Some(i) => (&path[..i], &path[i + 1..]),
            None => (&b""[..], path),
        };
        if name.is_empty() || name == b"." || name == b".." {
            return Err(io::Error::from(Errno::EINVAL));
        }
        let name = OsStr::from_bytes(name);
        if dir.is_empty() {
            return Ok((self.root.as_fd(), name));
        }
        if self.last.as_ref().is_none_or(|(at, _)| at[..] != *dir) {
            let fd = match self.create {
                Some(creation) => self.make_dirs(dir, creation)?,
                None => open_dir(self.root.as_fd(), dir)?,
            };
            self.last = Some((dir.to_vec(), fd));
        }
        let (_, fd) = self.last.as_ref().expect("just set");
        Ok((fd.as_fd(), name))
    }

    /// Opens `dir`, creating each missing component; never follows a link.
    fn make_dirs(&self, dir: &[u8], creation: DirCreation) -> io::Result<OwnedFd> {
        if let Ok(fd) = open_dir(self.root.as_fd(), dir) {
            return Ok(fd);
        }
        let mut here: Option<OwnedFd> = None;
        for component in dir.split(|&b| b == b'/') {
            if component.is_empty() || component == b"." || component == b".." {
                return Err(io::Error::from(Errno::EINVAL));
            }
            let name = OsStr::from_bytes(component);
            let at = here.as_ref().map(|fd| fd.as_fd()).unwrap_or(self.root.as_fd());
            let made = match mkdirat(at, name, Mode::from_bits_truncate(creation.mode.unwrap_or(0o777))) {
                Ok(()) => true,
                Err(Errno::EEXIST) => false,
                Err(e) => return Err(e.into()),
            };
            let fd = openat(
                at,
                name,
                OFlag::O_DIRECTORY | OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                Mode::empty(),
            )?;
            if made {
                if let Some(mode) = creation.mode {
                    // The umask may have cleared bits the operator asked for.
                    nix::sys::stat::fchmod(&fd, Mode::from_bits_truncate(mode))?;
                }
                if creation.owner.is_some() || creation.group.is_some() {
                    nix::unistd::fchown(&fd, creation.owner, creation.group)?;
                }
            }
            here = Some(fd);
        }
        here.ok_or_else(|| io::Error::from(Errno::EINVAL))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::unix::fs::symlink;

    /// tmp/secret (outside), tmp/root/{a/file, in -> a/file, up -> .., out -> ../secret,
    /// abs -> /etc/hostname, via -> a/../in, loop1 <-> loop2, d -> a}.
    fn tree() -> (tempfile::TempDir, std::path::PathBuf) {
        let tmp = tempfile::tempdir().expect("tempdir");
        std::fs::write(tmp.path().join("secret"), b"outside").expect("secret");
        let root = tmp.path().join("root");
        std::fs::create_dir_all(root.join("a")).expect("mkdir");
        std::fs::write(root.join("a/file"), b"inside").expect("file");
        for (link, target) in [
            ("in", "a/file"),
            ("up", ".."),
            ("out", "../secret"),
            ("abs", "/etc/hostname"),
            ("via", "a/../in"),
            ("loop1", "loop2"),
            ("loop2", "loop1"),
            ("d", "a"),
            ("a/sneaky", "../up/secret"),
        ] {
            symlink(target, root.join(link)).expect("symlink");
        }
        (tmp, root)
    }

    fn read(root: BorrowedFd<'_>, rel: &str, how: fn(BorrowedFd<'_>, &[u8]) -> io::Result<File>) -> io::Result<String> {
        let mut text = String::new();
        how(root, rel.as_bytes())?.read_to_string(&mut text)?;
        Ok(text)
    }

    fn by_walk(root: BorrowedFd<'_>, rel: &[u8]) -> io::Result<File> {
        let fd = walk(root, rel, OFlag::O_RDONLY | OFlag::O_CLOEXEC, Links::FollowBeneath)?;
        Ok(File::from(fd))
    }

    #[test]
    fn reads_follow_links_only_while_they_stay_beneath() {
        let (_tmp, root) = tree();
        let fd = open_root(&root).expect("root");
        // The kernel's answer (openat2) and the hand-made walk must agree.
        for how in [open_file as fn(BorrowedFd<'_>, &[u8]) -> io::Result<File>, by_walk] {
            for inside in ["a/file", "in", "via", "d/file", "a/../a/file"] {
                assert_eq!(read(fd.as_fd(), inside, how).expect(inside), "inside", "{inside}");
            }
            for outside in ["up/secret", "out", "abs", "a/sneaky", "../secret", "a/../../secret"] {
                let err = read(fd.as_fd(), outside, how).expect_err(outside);
                assert_eq!(err.raw_os_error(), Some(libc_exdev()), "{outside}: {err}");
            }
            let err = read(fd.as_fd(), "loop1", how).expect_err("loop");
            assert_eq!(err.raw_os_error(), Some(Errno::ELOOP as i32), "{err}");
        }
        let err = open_file(fd.as_fd(), b"a").expect_err("a directory is not a file");
        assert_eq!(err.raw_os_error(), Some(Errno::EINVAL as i32));
    }

    fn libc_exdev() -> i32 {
        Errno::EXDEV as i32
    }

    #[test]
    fn the_materializer_never_passes_through_a_link() {
        let (_tmp, root) = tree();
        let fd = open_root(&root).expect("root");
        open_dir(fd.as_fd(), b"a").expect("a real directory");
        for through in ["d", "up", "d/x"] {
            let err = open_dir(fd.as_fd(), through.as_bytes()).expect_err(through);
            assert!(
                matches!(err.raw_os_error(), Some(e) if e == Errno::ELOOP as i32 || e == Errno::EXDEV as i32),
                "{through}: {err}"
            );
            let err = walk(fd.as_fd(), through.as_bytes(), OFlag::O_DIRECTORY, Links::Refuse).expect_err(through);
            assert_eq!(err.raw_os_error(), Some(Errno::ELOOP as i32), "{through}: {err}");
        }
        // Creating `d/new` where a link `d` was left: refused, nothing made behind it.
        let mut dirs = Dirs::open(&root, Some(DirCreation { mode: None, owner: None, group: None })).expect("dirs");
        dirs.parent(b"d/new/file").expect_err("d is a link");
        assert!(!root.join("a/new").exists());
        let (_, name) = dirs.parent(b"made/here/file").expect("created");
        assert_eq!(name, "file");
        assert!(root.join("made/here").is_dir());
    }
}
