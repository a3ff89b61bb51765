//! Path checks: nothing in a service tree may reach outside the tree's own directory.
//!
//! Two questions, asked at every door a tree passes — `pre-receive` on the master, the
//! relay before it publishes, the subscriber before it applies (it must not trust the
//! bus):
//!
//! * is every entry's path a plain relative path ([`check_relative`])?
//! * does every symbolic link of the tree, followed the way the kernel follows it —
//!   through the tree's *other* links, a relative target taken from the directory the
//!   link sits in — stay inside the tree ([`Links::check`])?
//!
//! A link is never judged alone: `a -> b/..` is harmless until `b` is itself a link to
//! `../..`. So containment is a property of the whole tree, decided from all of its
//! links at once. The judgement is conservative where the kernel would fail: a
//! component that is not a link is taken as a directory even if the tree holds a file
//! there or nothing at all (the kernel would stop with `ENOTDIR`/`ENOENT`), so a target
//! that leaves the tree is refused even when it dangles today — exactly what
//! `realpath -m` computes. What is accepted resolves inside the tree, whatever the tree
//! holds at the paths it passes through.

use std::collections::{BTreeMap, HashMap};

/// Links followed while resolving one path before it counts as a loop: the kernel's
/// limit (`MAXSYMLINKS`, 40), so that what the kernel refuses with `ELOOP` is refused
/// here too.
pub const MAX_LINK_HOPS: usize = 40;

/// Why a path or link target is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// Empty path.
    #[error("empty path")]
    Empty,
    /// Starts at the file system root.
    #[error("absolute path {0:?}")]
    Absolute(String),
    /// Contains a `..`, `.` or empty component, or a NUL byte.
    #[error("path {0:?} contains '..', '.', an empty component or NUL")]
    Traversal(String),
    /// A symlink that, followed through the tree's links, leaves the service tree.
    #[error(
        "symlink {path:?} points outside the service tree: {target:?} leads to {leads:?}{}",
        via.as_ref().map(|v| format!(" through symlink {v:?}")).unwrap_or_default()
    )]
    EscapingSymlink {
        /// The link.
        path: String,
        /// Its target.
        target: String,
        /// Where it leads, relative to the tree's root (`../..`), or the absolute
        /// target.
        leads: String,
        /// The last other link it was followed through on its way out, if any.
        via: Option<String>,
    },
    /// A symlink that never resolves: a loop, or more than [`MAX_LINK_HOPS`] links deep.
    #[error("symlink {path:?} -> {target:?} never resolves: a loop, or more than {MAX_LINK_HOPS} links deep")]
    SymlinkLoop {
        /// The link.
        path: String,
        /// Its target.
        target: String,
    },
    /// A symlink whose target is empty or holds a NUL byte: no file system can hold it.
    #[error("symlink {path:?} has an invalid target {target:?} (empty, or holds NUL)")]
    InvalidTarget {
        /// The link.
        path: String,
        /// Its target.
        target: String,
    },
}

fn shown(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Checks a path taken from a tree entry: relative, and every component a plain name.
pub fn check_relative(path: &[u8]) -> Result<(), PathError> {
    if path.is_empty() {
        return Err(PathError::Empty);
    }
    if path[0] == b'/' {
        return Err(PathError::Absolute(shown(path)));
    }
    if path.contains(&0) || path.split(|&b| b == b'/').any(|c| c.is_empty() || c == b"." || c == b"..") {
        return Err(PathError::Traversal(shown(path)));
    }
    Ok(())
}

/// Checks one name of a tree entry (one component): what git's own `fsck` refuses and
/// what no directory can hold.
pub fn check_name(name: &[u8]) -> Result<(), PathError> {
    if name.contains(&b'/') {
        return Err(PathError::Traversal(shown(name)));
    }
    check_relative(name)
}

/// A tree's symbolic links, by path (relative to the tree's root, as in git): all that
/// decides whether the tree stays inside its directory.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Links {
    by_path: BTreeMap<Vec<u8>, Vec<u8>>,
}

impl Links {
    /// No links.
    pub fn new() -> Links {
        Links::default()
    }

    /// Adds the link at `path` with `target`.
    pub fn insert(&mut self, path: impl Into<Vec<u8>>, target: impl Into<Vec<u8>>) {
        self.by_path.insert(path.into(), target.into());
    }

    /// How many links the tree holds.
    pub fn len(&self) -> usize {
        self.by_path.len()
    }

    /// Whether the tree holds no link.
    pub fn is_empty(&self) -> bool {
        self.by_path.is_empty()
    }

    /// Checks that every link resolves inside the tree; the first that does not is
    /// named, with its target and where it leads.
    pub fn check(&self) -> Result<(), PathError> {
        let index = Index::of(self);
        for path in self.by_path.keys() {
            check_relative(path)?;
            self.resolve_with(&index, path)?;
        }
        Ok(())
    }

    /// Where the link at `path` leads, as components from the tree's root, following
    /// every link on the way (see the module docs for what a non-link component is
    /// taken to be).
    pub fn resolve(&self, path: &[u8]) -> Result<Vec<Vec<u8>>, PathError> {
        self.resolve_with(&Index::of(self), path)
    }

    fn resolve_with(&self, index: &Index<'_>, path: &[u8]) -> Result<Vec<Vec<u8>>, PathError> {
        let Some(target) = self.by_path.get(path) else {
            return Ok(components(path).map(<[u8]>::to_vec).collect());
        };
        let refused = |leads: String, via: Option<&[u8]>| PathError::EscapingSymlink {
            path: shown(path),
            target: shown(target),
            leads,
            via: via.map(shown),
        };
        if target.is_empty() || target.contains(&0) {
            return Err(PathError::InvalidTarget { path: shown(path), target: shown(target) });
        }
        if target[0] == b'/' {
            return Err(refused(shown(target), None));
        }
        // Components still to walk, consumed from the end (so each target is pushed
        // reversed): first the directory the link sits in, reached from the root as the
        // kernel reaches it — through any link on the way, which a git tree never holds
        // above another entry but an update off the bus may claim — then the target,
        // taken from there. `at` is where the walk stands, each name with its place in
        // the index.
        let mut pending: Vec<&[u8]> = target.split(|&b| b == b'/').rev().collect();
        let mut parent: Vec<&[u8]> = components(path).collect();
        parent.pop();
        pending.extend(parent.into_iter().rev());
        let mut at: Vec<(&[u8], Option<usize>)> = Vec::new();
        let mut via: Option<&[u8]> = None;
        let mut hops = 1;
        while let Some(component) = pending.pop() {
            match component {
                b"" | b"." => {}
                b".." => {
                    if at.pop().is_none() {
                        let rest: Vec<&[u8]> = pending.iter().rev().copied().collect();
                        let leads =
                            if rest.is_empty() { "..".to_owned() } else { format!("../{}", shown(&rest.join(&b'/'))) };
                        return Err(refused(leads, via));
                    }
                }
                name => {
                    let step = index.step(at.last().map_or(Some(Index::ROOT), |&(_, step)| step), name);
                    let Some((link, next)) = step.and_then(|step| index.link(step)) else {
                        at.push((name, step));
                        continue;
                    };
                    hops += 1;
                    if hops > MAX_LINK_HOPS {
                        return Err(PathError::SymlinkLoop { path: shown(path), target: shown(target) });
                    }
                    via = Some(link);
                    if next.is_empty() || next.contains(&0) {
                        // Dangling in every file system: nothing to follow, nothing leaves.
                        return Err(PathError::InvalidTarget { path: shown(link), target: shown(next) });
                    }
                    if next[0] == b'/' {
                        return Err(refused(shown(next), via));
                    }
                    pending.extend(next.split(|&b| b == b'/').rev());
                }
            }
        }
        Ok(at.into_iter().map(|(name, _)| name.to_vec()).collect())
    }
}

/// The links' paths as a tree of names, so that a walk learns whether the name it
/// steps into is a link from the step it stands on. Looking up the whole path at every
/// step cost the path's length each time: a target of a few hundred kilobytes took
/// minutes, which a push could hold every door with.
struct Index<'a> {
    steps: Vec<Step<'a>>,
}

/// One directory (or link) of [`Index`].
#[derive(Default)]
struct Step<'a> {
    names: HashMap<&'a [u8], usize>,
    /// The link's path and target, if this is a link.
    link: Option<(&'a [u8], &'a [u8])>,
}

impl<'a> Index<'a> {
    /// The tree's root.
    const ROOT: usize = 0;

    fn of(links: &'a Links) -> Index<'a> {
        let mut steps = vec![Step::default()];
        // A walk only steps through plain names; `check` refuses any other path.
        for (path, target) in links.by_path.iter().filter(|(path, _)| check_relative(path).is_ok()) {
            let mut at = Index::ROOT;
            for name in path.split(|&b| b == b'/') {
                at = match steps[at].names.get(name) {
                    Some(&next) => next,
                    None => {
                        steps.push(Step::default());
                        let next = steps.len() - 1;
                        steps[at].names.insert(name, next);
                        next
                    }
                };
            }
            steps[at].link = Some((path, target));
        }
        Index { steps }
    }

    /// Where `name` is in the index, stepping from `from`; `None` where no link lies
    /// at or below.
    fn step(&self, from: Option<usize>, name: &[u8]) -> Option<usize> {
        from.and_then(|at| self.steps[at].names.get(name).copied())
    }

    fn link(&self, step: usize) -> Option<(&'a [u8], &'a [u8])> {
        self.steps[step].link
    }
}

impl<P: Into<Vec<u8>>, T: Into<Vec<u8>>> FromIterator<(P, T)> for Links {
    fn from_iter<I: IntoIterator<Item = (P, T)>>(iter: I) -> Links {
        let mut links = Links::new();
        for (path, target) in iter {
            links.insert(path, target);
        }
        links
    }
}

fn components(path: &[u8]) -> impl Iterator<Item = &[u8]> {
    path.split(|&b| b == b'/').filter(|c| !c.is_empty() && *c != b".")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn links(pairs: &[(&str, &str)]) -> Links {
        pairs.iter().map(|(p, t)| (p.as_bytes(), t.as_bytes())).collect()
    }

    #[test]
    fn plain_relative_paths_pass() {
        check_relative(b"a/b/c.conf").expect("ok");
        check_relative("é/\n/\u{1}".as_bytes()).expect("odd but contained");
        check_relative(b"\xff\xfe").expect("non-utf8 is fine");
        check_name(b"app.conf").expect("a name");
    }

    #[test]
    fn escapes_are_refused() {
        assert_eq!(check_relative(b""), Err(PathError::Empty));
        assert!(matches!(check_relative(b"/etc/passwd"), Err(PathError::Absolute(_))));
        for bad in [&b"../x"[..], b"a/../../x", b"a//b", b"./a", b"a/\0"] {
            assert!(matches!(check_relative(bad), Err(PathError::Traversal(_))), "{bad:?}");
        }
        for bad in [&b""[..], b".", b"..", b"a/b", b"a\0"] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn links_alone_stay_inside_or_not() {
        links(&[("a/link", "../b"), ("link", "b/c"), ("a/b/link", "./../../c"), ("top", "."), ("a/up", "..")])
            .check()
            .expect("all inside");
        for (p, t) in [("link", "../x"), ("a/link", "../../x"), ("a/link", "x/../../../y"), ("l", "/etc")] {
            assert!(matches!(links(&[(p, t)]).check(), Err(PathError::EscapingSymlink { .. })), "{p:?} -> {t:?}");
        }
        assert!(matches!(links(&[("l", "")]).check(), Err(PathError::InvalidTarget { .. })));
    }

    #[test]
    fn links_are_followed_through_one_another() {
        // Each harmless on its own: `deep` climbs two levels from `a/b`, to the root;
        // `x` looks like it goes down into `a/b` and back up one level, but through
        // `deep` that level is above the root.
        let tree = links(&[("a/b/deep", "../.."), ("x", "a/b/deep/../etc/passwd")]);
        let err = tree.check().expect_err("x leaves through deep");
        assert_eq!(
            err,
            PathError::EscapingSymlink {
                path: "x".into(),
                target: "a/b/deep/../etc/passwd".into(),
                leads: "../etc/passwd".into(),
                via: Some("a/b/deep".into()),
            }
        );
        assert_eq!(
            err.to_string(),
            "symlink \"x\" points outside the service tree: \"a/b/deep/../etc/passwd\" leads to \"../etc/passwd\" through symlink \"a/b/deep\""
        );
        // A link to a directory link, then up: the kernel goes up from where the
        // directory really is.
        let tree = links(&[("d", "a/b/c"), ("l", "d/../../../..")]);
        assert!(matches!(tree.check(), Err(PathError::EscapingSymlink { .. })));
        let tree = links(&[("d", "a/b/c"), ("l", "d/../../..")]);
        assert_eq!(tree.resolve(b"l").expect("inside"), Vec::<Vec<u8>>::new());
        // A chain into an absolute target: named through the link that holds it.
        let tree = links(&[("a", "b"), ("b", "c"), ("c", "/etc")]);
        let err = tree.check().expect_err("absolute at the end of a chain");
        assert!(matches!(err, PathError::EscapingSymlink { ref via, .. } if via.as_deref() == Some("c")), "{err}");
    }

    #[test]
    fn a_link_below_another_link_is_reached_through_it() {
        // No git tree holds `b/x` under the link `b`, but an update off the bus may
        // claim to: written through `b`, `x` sits in the root, and `..` from there leaves.
        let tree = links(&[("b", "."), ("b/x", "../etc")]);
        let err = tree.check().expect_err("b/x leaves from where it really is");
        assert!(
            matches!(err, PathError::EscapingSymlink { ref path, ref via, .. } if path == "b/x" && via.as_deref() == Some("b")),
            "{err}"
        );
        let tree = links(&[("b", "c/d"), ("b/x", "../e")]);
        assert_eq!(tree.resolve(b"b/x").expect("inside"), vec![b"c".to_vec(), b"e".to_vec()]);
    }

    #[test]
    fn loops_and_deep_chains_are_refused() {
        assert!(matches!(links(&[("a", "b"), ("b", "a")]).check(), Err(PathError::SymlinkLoop { .. })));
        assert!(matches!(links(&[("a", "a/x")]).check(), Err(PathError::SymlinkLoop { .. })));
        let chain: Links = (0..MAX_LINK_HOPS + 1).map(|i| (format!("l{i}"), format!("l{}", i + 1))).collect();
        assert!(matches!(chain.check(), Err(PathError::SymlinkLoop { .. })));
        let chain: Links = (0..MAX_LINK_HOPS - 1).map(|i| (format!("l{i}"), format!("l{}", i + 1))).collect();
        chain.check().expect("a chain the kernel follows");
    }

    #[test]
    fn a_dangling_target_that_would_leave_is_refused() {
        // `missing` is not in the tree: the kernel would stop there, but whatever it
        // becomes, `..` twice from it leaves.
        assert!(matches!(links(&[("l", "missing/../../x")]).check(), Err(PathError::EscapingSymlink { .. })));
        links(&[("l", "missing/../x")]).check().expect("dangling inside");
    }
}
