// Over 500 lines: the generator, the model the kernel is held to and the properties belong together.
//! Containment of a whole tree ([`Links`]), held against a real file system.
//!
//! Trees of files, directories and symbolic links are generated with names from a small
//! alphabet, so that they collide: a link's target names another link (links resolve
//! through one another), a file (used as a directory), a name the tree lacks, climbs with
//! `..`, leaves and comes back through the root's own name, or is absolute. Each tree is
//! written to a real directory three levels below a temporary one, so that a way out
//! lands somewhere, read back the way a door reads a pushed tree, and judged by
//! [`Links::check`] and, link by link, [`Links::resolve`]. Then:
//!
//! * a link the checker resolves ends, on disk, where the checker says, never having
//!   left the root; if the whole tree is accepted, no entry and no request path (up to
//!   three names) leaves it on disk either, whatever links it passes;
//! * a link refused as leaving leaves on disk — above the root through the same last
//!   link, and `leads` is where it then ends; or through an absolute target, which
//!   `leads` names;
//! * a link refused as a loop runs, on disk, out of the kernel's 40 links;
//! * nothing else is refused (a file system holds no empty target, no NUL), and
//!   [`Links::check`] names the first refused link in path order.
//!
//! What "on disk" means is itself checked, in layers:
//!
//! * [`walk`] follows a path on disk, one `lstat`/`readlink` at a time, taking every
//!   component that is not a link as a directory (what the checker promises: the
//!   semantics of `realpath -m`), and counting links like the kernel;
//! * `realpath -m` (GNU coreutils) must end where [`walk`] ends;
//! * the kernel (`stat`, and `realpath(3)`) must agree with [`walk`] wherever the path
//!   exists, and refuse with `ELOOP` wherever [`walk`] ran out of links;
//! * the kernel on a *completed* copy of the tree, in which every file or missing name a
//!   walk passed through as a directory is made a directory: there the kernel follows
//!   exactly the links [`walk`] followed, so its `ELOOP` and its `realpath(3)` settle
//!   what the conservative reading promises even where the tree as written dangles.
//!
//! Linux only: the loop verdict is the kernel's `ELOOP`. `PROPTEST_CASES` sets the
//! number of generated trees.
#![cfg(target_os = "linux")]

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::fs;
use std::io;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use confcast_schemas::path::{Links, PathError, MAX_LINK_HOPS};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

/// `ELOOP` on Linux.
const ELOOP: i32 = 40;
/// The directories between the temporary directory and the tree's root: a target that
/// climbs a few levels out of the tree lands in them.
const ABOVE: [&str; 3] = ["o1", "o2", "o3"];
/// The tree root's own name, which a target may use to leave and come back.
const ROOT: &str = "root";
/// Entry names. Few, so that targets hit entries; none of them exists above the root.
const NAMES: [&str; 4] = ["a", "b", "c", "d"];
/// Stands for the root's absolute path in a generated target (known only once written).
const HERE: &str = "@ROOT";

/// One entry of a generated tree.
#[derive(Debug, Clone)]
enum Node {
    File,
    Dir(BTreeMap<String, Node>),
    Link(String),
}

/// A generated tree: the entries of its root.
#[derive(Clone, Default)]
struct Tree(BTreeMap<String, Node>);

/// One line per entry, `dir/`, `file` or `link -> target`, so that a failing case reads
/// like a listing.
impl fmt::Debug for Tree {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fn list(f: &mut fmt::Formatter<'_>, dir: &str, entries: &BTreeMap<String, Node>) -> fmt::Result {
            for (name, node) in entries {
                match node {
                    Node::File => writeln!(f, "  {dir}{name}")?,
                    Node::Link(target) => writeln!(f, "  {dir}{name} -> {target}")?,
                    Node::Dir(children) => {
                        writeln!(f, "  {dir}{name}/")?;
                        list(f, &format!("{dir}{name}/"), children)?;
                    }
                }
            }
            Ok(())
        }
        writeln!(f, "tree:")?;
        list(f, "", &self.0)
    }
}

impl Tree {
    /// A tree from a listing: `path` a file, `path/` a directory, `path -> target` a
    /// link; directories on the way are created.
    fn listed(lines: &[&str]) -> Tree {
        let mut tree = Tree::default();
        for line in lines {
            let (path, node) = match line.split_once(" -> ") {
                Some((path, target)) => (path, Node::Link(target.to_owned())),
                None => match line.strip_suffix('/') {
                    Some(dir) => (dir, Node::Dir(BTreeMap::new())),
                    None => (*line, Node::File),
                },
            };
            let mut names: Vec<&str> = path.split('/').collect();
            let last = names.pop().expect("split yields at least one name");
            let mut dir = &mut tree.0;
            for name in names {
                let Node::Dir(children) = dir.entry(name.to_owned()).or_insert_with(|| Node::Dir(BTreeMap::new()))
                else {
                    panic!("{name} in {path} is not a directory of the listing");
                };
                dir = children;
            }
            dir.insert(last.to_owned(), node);
        }
        tree
    }
}

/// A tree written to disk; removed when dropped.
struct Written {
    _dir: tempfile::TempDir,
    root: PathBuf,
}

fn write(tree: &Tree) -> Written {
    // Memory-backed where there is one: every case makes and removes a few dozen
    // entries, and on a busy disk each directory costs a journal write.
    let dir = tempfile::tempdir_in("/dev/shm").or_else(|_| tempfile::tempdir()).expect("a temporary directory");
    // Canonical, so that the root's path holds no link of its own.
    let mut root = dir.path().canonicalize().expect("the temporary directory resolves");
    root.extend(ABOVE);
    root.push(ROOT);
    fs::create_dir_all(&root).expect("create the root");
    let here = root.to_str().expect("a UTF-8 temporary directory").to_owned();
    fn put(dir: &Path, entries: &BTreeMap<String, Node>, here: &str) {
        for (name, node) in entries {
            let path = dir.join(name);
            match node {
                Node::File => fs::write(&path, name).expect("write a file"),
                Node::Dir(children) => {
                    fs::create_dir(&path).expect("create a directory");
                    put(&path, children, here);
                }
                Node::Link(target) => symlink(target.replace(HERE, here), &path).expect("create a link"),
            }
        }
    }
    put(&root, &tree.0, &here);
    Written { _dir: dir, root }
}

/// What a door sees of a tree on disk: every entry's path, and every link with its
/// target, in path order (the order [`Links::check`] names the first refused link in).
#[derive(Default)]
struct Scanned {
    entries: Vec<String>,
    links: BTreeMap<String, Vec<u8>>,
}

fn scan(root: &Path) -> Scanned {
    fn dir(root: &Path, rel: &str, out: &mut Scanned) {
        let mut names: Vec<String> = fs::read_dir(root.join(rel))
            .expect("read a directory of the tree")
            .map(|e| e.expect("a directory entry").file_name().into_string().expect("names are UTF-8"))
            .collect();
        names.sort();
        for name in names {
            let path = if rel.is_empty() { name } else { format!("{rel}/{name}") };
            let meta = fs::symlink_metadata(root.join(&path)).expect("lstat an entry");
            out.entries.push(path.clone());
            if meta.file_type().is_symlink() {
                let target = fs::read_link(root.join(&path)).expect("readlink").into_os_string().into_vec();
                out.links.insert(path, target);
            } else if meta.is_dir() {
                dir(root, &path, out);
            }
        }
    }
    let mut out = Scanned::default();
    dir(root, "", &mut out);
    out
}

/// How a walk first went wrong, if it did.
#[derive(Debug, Clone, PartialEq, Eq)]
enum First {
    /// It never left the root and never ran out of links.
    Inside,
    /// It went above the root with `..`; `via` is the last link followed before, other
    /// than the first (the link being judged).
    Up { via: Option<String> },
    /// It followed `link`, whose target is absolute; `via` as above.
    Absolute { link: String, via: Option<String> },
    /// It followed more links than the kernel does before either of the above.
    Loop,
}

/// A path followed on disk.
#[derive(Debug)]
struct Walk {
    first: First,
    /// Where it ends; `None` if it ran out of links.
    end: Option<PathBuf>,
    /// The positions inside the root that hold neither a directory nor a link but were
    /// walked through as directories (or ended at), relative to the root.
    passed: Vec<PathBuf>,
}

/// Follows `path` from `root` on disk the way the checker promises to: the kernel's
/// walk, component by component, each link's target read from disk and taken from the
/// directory the link sits in, `..` from where a directory really is; but a component
/// that is not a link is taken as a directory whatever the disk holds there, and up to
/// [`MAX_LINK_HOPS`] links are followed.
fn walk(root: &Path, path: &[u8]) -> Walk {
    fn reversed(path: &[u8]) -> impl Iterator<Item = Vec<u8>> + '_ {
        path.split(|&b| b == b'/').rev().map(<[u8]>::to_vec)
    }
    fn inside(root: &Path, at: &Path) -> String {
        let rel = at.strip_prefix(root).unwrap_or(at);
        rel.to_str().expect("UTF-8 paths").to_owned()
    }
    let via = |followed: &[String]| if followed.len() > 1 { followed.last().cloned() } else { None };
    let mut at = if path.starts_with(b"/") { PathBuf::from("/") } else { root.to_path_buf() };
    let mut pending: Vec<Vec<u8>> = reversed(path).collect();
    let mut first = None;
    let mut followed: Vec<String> = Vec::new();
    let mut passed = Vec::new();
    while let Some(component) = pending.pop() {
        match &component[..] {
            b"" | b"." => {}
            b".." => {
                if first.is_none() && at == root {
                    first = Some(First::Up { via: via(&followed) });
                }
                at.pop();
            }
            name => {
                at.push(std::ffi::OsStr::from_bytes(name));
                match fs::symlink_metadata(&at) {
                    Ok(meta) if meta.file_type().is_symlink() => {
                        followed.push(inside(root, &at));
                        if followed.len() > MAX_LINK_HOPS {
                            return Walk { first: first.unwrap_or(First::Loop), end: None, passed };
                        }
                        let target = fs::read_link(&at).expect("readlink").into_os_string().into_vec();
                        at.pop();
                        if target.starts_with(b"/") {
                            if first.is_none() {
                                let link = followed.last().cloned().expect("just followed");
                                first = Some(First::Absolute { link, via: via(&followed) });
                            }
                            at = PathBuf::from("/");
                        }
                        pending.extend(reversed(&target));
                    }
                    Ok(meta) if meta.is_dir() => {}
                    Ok(_) => record(root, &at, &mut passed),
                    Err(e) if matches!(e.kind(), io::ErrorKind::NotFound | io::ErrorKind::NotADirectory) => {
                        record(root, &at, &mut passed)
                    }
                    Err(e) => panic!("lstat {}: {e}", at.display()),
                }
            }
        }
    }
    Walk { first: first.unwrap_or(First::Inside), end: Some(at), passed }
}

fn name_of(name: &[u8]) -> &std::ffi::OsStr {
    std::ffi::OsStr::from_bytes(name)
}

fn record(root: &Path, at: &Path, passed: &mut Vec<PathBuf>) {
    if let Ok(rel) = at.strip_prefix(root) {
        passed.push(rel.to_path_buf());
    }
}

/// What the kernel says of a path.
#[derive(Debug, PartialEq, Eq)]
enum Kernel {
    Resolved(PathBuf),
    Loop,
    /// `ENOENT` or `ENOTDIR` on the way: no verdict.
    Missing,
}

fn kernel(path: &Path) -> Kernel {
    let is_loop = |e: &io::Error| e.raw_os_error() == Some(ELOOP);
    let missing = |e: &io::Error| matches!(e.kind(), io::ErrorKind::NotFound | io::ErrorKind::NotADirectory);
    // `stat` is the kernel's own walk; `realpath(3)` says where it ends.
    match fs::metadata(path) {
        Err(e) if missing(&e) => Kernel::Missing,
        stat => match (stat, fs::canonicalize(path)) {
            (Ok(_), Ok(end)) => Kernel::Resolved(end),
            (Err(a), Err(b)) if is_loop(&a) && is_loop(&b) => Kernel::Loop,
            other => panic!("stat and realpath(3) disagree on {}: {other:?}", path.display()),
        },
    }
}

/// `realpath -m` of each path. Bounded in time: it has no link limit, and some loops
/// keep it busy for ever (none should be asked).
fn realpath_m(paths: &[PathBuf]) -> Vec<PathBuf> {
    if paths.is_empty() {
        return Vec::new();
    }
    let mut child = Command::new("realpath")
        .args(["-m", "-z", "--"])
        .args(paths)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run realpath(1) of GNU coreutils");
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().expect("wait for realpath").is_none() {
        if Instant::now() > deadline {
            child.kill().ok();
            panic!("realpath -m still runs after 20 s on {paths:#?}");
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    let out = child.wait_with_output().expect("realpath's output");
    assert!(
        out.status.success(),
        "realpath -m failed ({}): {}\n{paths:#?}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let ends: Vec<PathBuf> = out
        .stdout
        .split(|&b| b == 0)
        .filter(|p| !p.is_empty())
        .map(|p| PathBuf::from(std::ffi::OsString::from_vec(p.to_vec())))
        .collect();
    assert_eq!(ends.len(), paths.len(), "one answer per path from realpath -m");
    ends
}

/// Every path of up to three names from [`NAMES`]: what a request to the local API
/// could ask for, whatever the tree holds.
fn requests() -> Vec<String> {
    let mut paths: Vec<String> = NAMES.iter().map(|n| (*n).to_owned()).collect();
    let mut last = paths.clone();
    for _ in 1..3 {
        last = last.iter().flat_map(|p| NAMES.iter().map(move |n| format!("{p}/{n}"))).collect();
        paths.extend(last.iter().cloned());
    }
    paths
}

/// Makes every position a directory in the tree at `root`: files are replaced, missing
/// names created. Positions come parents first.
fn complete(root: &Path, positions: &BTreeSet<PathBuf>) {
    let mut positions: Vec<&PathBuf> = positions.iter().collect();
    positions.sort_by_key(|p| p.components().count());
    for rel in positions {
        let path = root.join(rel);
        match fs::symlink_metadata(&path) {
            Ok(meta) if meta.is_dir() => {}
            Ok(meta) => {
                assert!(!meta.file_type().is_symlink(), "{} was walked through as a directory", path.display());
                fs::remove_file(&path).expect("remove a file in the way");
                fs::create_dir(&path).expect("create a directory");
            }
            Err(_) => fs::create_dir(&path).expect("create a missing directory"),
        }
    }
}

/// Writes `tree`, judges it and holds the verdict against the file system; returns the
/// verdict for the caller's own expectations.
fn judge(tree: &Tree) -> Result<Result<(), PathError>, TestCaseError> {
    let disk = write(tree);
    let root = &disk.root;
    let scanned = scan(root);
    let links: Links = scanned.links.iter().map(|(p, t)| (p.as_bytes(), t.as_slice())).collect();
    let verdict = links.check();

    let mut probes: BTreeSet<String> = requests().into_iter().collect();
    probes.extend(scanned.entries.iter().cloned());
    let walks: BTreeMap<&str, Walk> = probes.iter().map(|p| (p.as_str(), walk(root, p.as_bytes()))).collect();

    // The walk, against the kernel on the tree as written.
    for (probe, w) in &walks {
        let never_left = matches!(w.first, First::Inside | First::Loop);
        match kernel(&root.join(probe)) {
            Kernel::Resolved(end) => prop_assert_eq!(w.end.as_ref(), Some(&end), "kernel and walk of {}", probe),
            Kernel::Loop => prop_assert!(w.end.is_none(), "the kernel loops on {probe}, the walk ends: {w:?}"),
            Kernel::Missing => prop_assert!(
                !(never_left && w.passed.is_empty()),
                "the kernel finds {probe} missing, the walk passed only directories and links: {w:?}"
            ),
        }
    }

    // Each link, resolved by the checker, against its walk.
    let mut first_refused = None;
    // Where each `leads` is, and where its link ends, for realpath -m to confirm.
    let mut leads_ends: Vec<(PathBuf, PathBuf)> = Vec::new();
    for (path, target) in &scanned.links {
        let w = &walks[path.as_str()];
        let resolved = links.resolve(path.as_bytes());
        match &resolved {
            Ok(components) => {
                prop_assert_eq!(&w.first, &First::Inside, "{} is accepted; on disk: {:?}", path, w);
                let end: PathBuf = components.iter().map(|c| name_of(c)).collect();
                prop_assert_eq!(w.end.as_ref(), Some(&root.join(&end)), "{} resolves to {:?}", path, end);
            }
            Err(PathError::EscapingSymlink { path: named, target: named_target, leads, via }) => {
                prop_assert_eq!(named, path);
                prop_assert_eq!(named_target.as_bytes(), target.as_slice());
                match &w.first {
                    First::Up { via: walked } => {
                        prop_assert_eq!(via, walked, "the last link followed out of {}", path);
                        prop_assert!(leads.starts_with(".."), "{path} leaves upwards, said to lead to {leads:?}");
                        let from_leads = walk(root, leads.as_bytes());
                        if let (Some(end), Some(leads_end)) = (&w.end, &from_leads.end) {
                            prop_assert_eq!(end, leads_end, "{} leads to {:?}", path, leads);
                            leads_ends.push((root.join(leads), end.clone()));
                        }
                    }
                    First::Absolute { link, via: walked } => {
                        prop_assert_eq!(via, walked, "the link with the absolute target, reached from {}", path);
                        let absolute = &scanned.links[link.as_str()];
                        prop_assert_eq!(leads.as_bytes(), absolute.as_slice(), "{} leads to {}'s target", path, link);
                    }
                    other => prop_assert!(false, "{path} refused as leaving the tree; on disk: {other:?}"),
                }
            }
            Err(PathError::SymlinkLoop { path: named, target: named_target }) => {
                prop_assert_eq!(named, path);
                prop_assert_eq!(named_target.as_bytes(), target.as_slice());
                prop_assert_eq!(&w.first, &First::Loop, "{} refused as a loop; on disk: {:?}", path, w);
            }
            Err(other) => prop_assert!(false, "a tree on disk cannot give {other:?}"),
        }
        if first_refused.is_none() {
            first_refused = resolved.err();
        }
    }
    // `check` names the first refused link, in path order, and only if there is one.
    prop_assert_eq!(&verdict, &first_refused.map_or(Ok(()), Err));
    if verdict.is_ok() {
        for (probe, w) in &walks {
            prop_assert!(
                matches!(w.first, First::Inside | First::Loop),
                "accepted, yet {probe} leaves the tree on disk: {w:?}"
            );
        }
    }

    // The walk of each link that ends, and of every `leads`, against realpath -m.
    let mut paths = Vec::new();
    let mut expected = Vec::new();
    for path in scanned.links.keys() {
        if let Some(end) = &walks[path.as_str()].end {
            paths.push(root.join(path));
            expected.push(end.clone());
        }
    }
    for (leads, end) in leads_ends {
        paths.push(leads);
        expected.push(end);
    }
    for ((got, path), walked) in realpath_m(&paths).iter().zip(&paths).zip(&expected) {
        prop_assert_eq!(got, walked, "realpath -m {}", path.display());
    }

    // The walk of each entry that stays inside, against the kernel on a copy of the tree
    // where everything walked through as a directory is one: only links remain to stop
    // the kernel, and they are the walk's.
    let stayed: Vec<(&str, &Walk)> = scanned
        .entries
        .iter()
        .map(|p| (p.as_str(), &walks[p.as_str()]))
        .filter(|(_, w)| matches!(w.first, First::Inside | First::Loop))
        .collect();
    let positions: BTreeSet<PathBuf> = stayed.iter().flat_map(|(_, w)| w.passed.iter().cloned()).collect();
    let completed = write(tree);
    complete(&completed.root, &positions);
    for (probe, w) in stayed {
        let expected = match &w.end {
            Some(end) => Kernel::Resolved(completed.root.join(end.strip_prefix(root).expect("stayed inside"))),
            None => Kernel::Loop,
        };
        prop_assert_eq!(kernel(&completed.root.join(probe)), expected, "completed tree, {}", probe);
    }
    Ok(verdict)
}

fn name() -> impl Strategy<Value = String> {
    prop::sample::select(&NAMES[..]).prop_map(str::to_owned)
}

/// Link targets: `.`, `..`, a name (a sibling, a link, a file or nothing), chains of
/// names and `..` (through the root's own name too), with or without a trailing `/`,
/// and now and then an absolute path (into the tree itself too).
fn target() -> impl Strategy<Value = String> {
    let component =
        prop_oneof![8 => prop::sample::select(&NAMES[..]), 4 => Just(".."), 1 => Just("."), 1 => Just(ROOT)];
    let absolute =
        prop::sample::select(vec!["/", "/etc", "/etc/passwd", "/nonexistent/../etc", HERE, "@ROOT/a", "@ROOT/a/../.."]);
    prop_oneof![
        1 => Just(".".to_owned()),
        1 => Just("..".to_owned()),
        5 => name(),
        10 => (prop::collection::vec(component, 2..5), any::<bool>()).prop_map(|(components, slash)| {
            let mut target = components.join("/");
            if slash {
                target.push('/');
            }
            target
        }),
        1 => absolute.prop_map(str::to_owned),
    ]
}

/// How one link's target is made, once the tree's entries are known.
#[derive(Debug, Clone)]
struct Aim {
    /// 0–2: `free`; 3–7: up to the root (and `ups` more), then an entry of the tree, then
    /// `tail`; 8–9: an entry's path taken from the link's own directory, then `tail`.
    how: u8,
    entry: prop::sample::Index,
    ups: usize,
    tail: Vec<&'static str>,
    slash: bool,
    free: String,
}

fn aim() -> impl Strategy<Value = Aim> {
    let tail = prop_oneof![3 => Just(".."), 2 => prop::sample::select(&NAMES[..]), 1 => Just(".")];
    (
        0..10u8,
        any::<prop::sample::Index>(),
        prop_oneof![6 => Just(0usize), 2 => Just(1), 1 => Just(2)],
        prop::collection::vec(tail, 0..3),
        prop::bool::weighted(0.1),
        target(),
    )
        .prop_map(|(how, entry, ups, tail, slash, free)| Aim { how, entry, ups, tail, slash, free })
}

impl Aim {
    /// The target of a link `depth` directories below the root, in a tree with `entries`.
    fn target(&self, depth: usize, entries: &[String]) -> String {
        let mut parts: Vec<String> = match self.how {
            0..=2 => return self.free.clone(),
            3..=7 => vec![["..", "/"].concat().repeat(depth + self.ups), self.entry.get(entries).clone()],
            _ => vec![self.entry.get(entries).clone()],
        };
        parts.extend(self.tail.iter().map(|c| format!("/{c}")));
        if self.slash {
            parts.push("/".to_owned());
        }
        parts.concat()
    }
}

/// Trees whose links aim at the tree's own entries — other links, files used as
/// directories, directories — from the root or from where they sit, with `..` before
/// and after; or anywhere ([`target`]).
fn tree() -> impl Strategy<Value = Tree> {
    let leaf = prop_oneof![
        2 => Just(Node::File),
        5 => Just(Node::Link(String::new())),
        1 => Just(Node::Dir(BTreeMap::new())),
    ];
    let node =
        leaf.prop_recursive(3, 16, 4, |inner| prop::collection::btree_map(name(), inner, 1..4).prop_map(Node::Dir));
    let shape = prop::collection::btree_map(name(), node, 1..5);
    (shape, prop::collection::vec(aim(), 12)).prop_map(|(shape, aims)| {
        fn paths(dir: &str, entries: &BTreeMap<String, Node>, out: &mut Vec<String>) {
            for (name, node) in entries {
                out.push(format!("{dir}{name}"));
                if let Node::Dir(children) = node {
                    paths(&format!("{dir}{name}/"), children, out);
                }
            }
        }
        fn aimed(
            depth: usize,
            entries: &mut BTreeMap<String, Node>,
            all: &[String],
            aims: &mut impl Iterator<Item = Aim>,
        ) {
            for node in entries.values_mut() {
                match node {
                    Node::Link(target) => *target = aims.next().expect("aims cycle").target(depth, all),
                    Node::Dir(children) => aimed(depth + 1, children, all, aims),
                    Node::File => {}
                }
            }
        }
        let mut all = Vec::new();
        paths("", &shape, &mut all);
        let mut shape = shape;
        aimed(0, &mut shape, &all, &mut aims.into_iter().cycle());
        Tree(shape)
    })
}

/// A chain of links around the kernel's limit, `l00 -> … -> l{n-1} -> end`, spread over
/// the root and two directories, each target taking a detour through a real directory
/// now and then; every component on the way exists, so the kernel's `ELOOP` is exact.
fn chain() -> impl Strategy<Value = Tree> {
    (MAX_LINK_HOPS - 4..=MAX_LINK_HOPS + 4)
        .prop_flat_map(|n| (prop::collection::vec(0..3usize, n), prop::collection::vec(0..4usize, n), 0..5usize))
        .prop_map(|(homes, detours, end)| {
            let home = |i: usize| ["", "d0/", "d1/"][homes[i]];
            let up = |i: usize| if homes[i] == 0 { "" } else { "../" };
            let mut lines = vec!["d0/".to_owned(), "d1/".to_owned(), "f".to_owned(), "d0/f".to_owned()];
            for i in 0..homes.len() {
                let detour = ["", "./", "d1/../", "d0/../d1/.././"][detours[i]];
                let next = match homes.get(i + 1) {
                    Some(_) => format!("{}l{:02}", home(i + 1), i + 1),
                    None => ["f", "d0/f", "missing", "..", "."][end].to_owned(),
                };
                lines.push(format!("{}l{i:02} -> {}{detour}{next}", home(i), up(i)));
            }
            let lines: Vec<&str> = lines.iter().map(String::as_str).collect();
            Tree::listed(&lines)
        })
}

fn cases(default: u32) -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(default);
    // Regressions are kept as the named tests below, not in a file beside this one.
    ProptestConfig { cases, failure_persistence: None, ..ProptestConfig::default() }
}

proptest! {
    #![proptest_config(cases(512))]

    /// Whatever the tree, the checker's verdict is what the file system does.
    #[test]
    fn the_verdict_is_what_the_file_system_does(tree in tree()) {
        judge(&tree)?.ok();
    }
}

proptest! {
    #![proptest_config(cases(48))]

    /// Around 40 links deep, the checker refuses exactly what the kernel refuses.
    #[test]
    fn chains_are_refused_where_the_kernel_stops(tree in chain()) {
        judge(&tree)?.ok();
        let disk = write(&tree);
        let scanned = scan(&disk.root);
        let links: Links = scanned.links.iter().map(|(p, t)| (p.as_bytes(), t.as_slice())).collect();
        for path in scanned.links.keys() {
            let refused = matches!(links.resolve(path.as_bytes()), Err(PathError::SymlinkLoop { .. }));
            let looped = kernel(&disk.root.join(path)) == Kernel::Loop;
            prop_assert_eq!(refused, looped, "{} refused as a loop, and the kernel's ELOOP", path);
        }
    }
}

/// Judges a listed tree and returns its verdict.
fn verdict(lines: &[&str]) -> Result<(), PathError> {
    judge(&Tree::listed(lines)).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn a_link_that_leaves_through_another_is_refused() {
    let refused = verdict(&["a/b/deep -> ../..", "x -> a/b/deep/../etc/passwd"]);
    assert_eq!(
        refused,
        Err(PathError::EscapingSymlink {
            path: "x".into(),
            target: "a/b/deep/../etc/passwd".into(),
            leads: "../etc/passwd".into(),
            via: Some("a/b/deep".into()),
        })
    );
}

#[test]
fn chains_of_forty_links_resolve_and_forty_one_do_not() {
    let chain = |n: usize| -> Vec<String> {
        (0..n).map(|i| if i + 1 < n { format!("l{i:02} -> l{:02}", i + 1) } else { format!("l{i:02} -> f") }).collect()
    };
    let listed = |lines: &[String]| -> Vec<String> { [&["f".to_owned()][..], lines].concat() };
    let forty = listed(&chain(MAX_LINK_HOPS));
    verdict(&forty.iter().map(String::as_str).collect::<Vec<_>>()).expect("the kernel follows 40 links");
    let forty_one = listed(&chain(MAX_LINK_HOPS + 1));
    let refused = verdict(&forty_one.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(refused, Err(PathError::SymlinkLoop { path: "l00".into(), target: "l01".into() }));
}

#[test]
fn a_loop_behind_a_missing_name_is_refused() {
    // The kernel stops at `missing` (ENOENT) today; make it a directory and `a` loops.
    let refused = verdict(&["a -> missing/../a"]);
    assert!(matches!(refused, Err(PathError::SymlinkLoop { .. })), "{refused:?}");
}

#[test]
fn a_file_taken_as_a_directory_cannot_hide_a_way_out() {
    // The kernel says ENOTDIR at `f/..` today; the checker does not count on it.
    let refused = verdict(&["f", "l -> f/../../x"]);
    assert!(matches!(refused, Err(PathError::EscapingSymlink { ref leads, .. }) if leads == "../x"), "{refused:?}");
}

#[test]
fn leaving_and_coming_back_by_the_roots_own_name_is_refused() {
    // On disk `l` ends inside, but only through the name of the tree's own directory,
    // which the tree does not control.
    let refused = verdict(&["a", "l -> ../root/a"]);
    assert!(
        matches!(refused, Err(PathError::EscapingSymlink { ref leads, .. }) if leads == "../root/a"),
        "{refused:?}"
    );
}

#[test]
fn an_absolute_target_is_refused_even_into_the_tree() {
    let refused = verdict(&["a", "l -> b", "b -> @ROOT/a"]);
    assert!(
        matches!(refused, Err(PathError::EscapingSymlink { ref path, ref via, .. }) if path == "b" && via.is_none()),
        "{refused:?}"
    );
}

#[test]
fn links_through_links_that_stay_inside_are_accepted() {
    verdict(&["a/b/c/f", "d -> a/b/c", "l -> d/../../..", "m -> l/a/b/c/f", "n -> m/../../c"]).expect("all inside");
}

#[test]
fn a_long_target_costs_its_length_not_its_square() {
    // 200 KB of `a/`, next to a link two thousand directories down that shares its
    // names: looked up by whole path at every step, this took minutes.
    let deep = format!("{}x", "a/".repeat(2_000));
    let links: Links =
        [(deep.clone(), "../".repeat(2_000)), ("l".to_owned(), "a/".repeat(100_000))].into_iter().collect();
    let started = Instant::now();
    links.check().expect("both stay inside");
    assert!(started.elapsed() < Duration::from_secs(5), "took {:?}", started.elapsed());
}
