//! Path checks: a service tree may only ever write inside its own directory.
//!
//! Applied by the relay (which refuses to publish such a tree) and again by the
//! subscriber (which must not trust the bus).

use std::path::{Component, Path};

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
    /// A symlink whose target leaves the service tree.
    #[error("symlink {path:?} points outside the service tree ({target:?})")]
    EscapingSymlink {
        /// The link.
        path: String,
        /// Its target.
        target: String,
    },
}

/// Checks a path taken from a tree entry: relative, and every component a plain name.
pub fn check_relative(path: &[u8]) -> Result<(), PathError> {
    let shown = || String::from_utf8_lossy(path).into_owned();
    if path.is_empty() {
        return Err(PathError::Empty);
    }
    if path[0] == b'/' {
        return Err(PathError::Absolute(shown()));
    }
    if path.contains(&0) || path.split(|&b| b == b'/').any(|c| c.is_empty() || c == b"." || c == b"..") {
        return Err(PathError::Traversal(shown()));
    }
    Ok(())
}

/// Checks that a symlink at `path` with `target` stays inside the service tree once
/// resolved lexically (the tree holds no other links that could redirect it, since
/// every link is checked the same way).
pub fn check_symlink(path: &[u8], target: &[u8]) -> Result<(), PathError> {
    check_relative(path)?;
    let escaping = || PathError::EscapingSymlink {
        path: String::from_utf8_lossy(path).into_owned(),
        target: String::from_utf8_lossy(target).into_owned(),
    };
    if target.is_empty() || target[0] == b'/' || target.contains(&0) {
        return Err(escaping());
    }
    // Depth of the directory holding the link, then walk the target from there.
    let mut depth: isize = path.split(|&b| b == b'/').count() as isize - 1;
    let target_path = Path::new(std::str::from_utf8(target).unwrap_or(""));
    if std::str::from_utf8(target).is_err() {
        // Non-UTF-8 targets: judge by raw components.
        for c in target.split(|&b| b == b'/') {
            match c {
                b"" | b"." => {}
                b".." => depth -= 1,
                _ => depth += 1,
            }
            if depth < 0 {
                return Err(escaping());
            }
        }
        return Ok(());
    }
    for c in target_path.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => depth -= 1,
            Component::Normal(_) => depth += 1,
            Component::RootDir | Component::Prefix(_) => return Err(escaping()),
        }
        if depth < 0 {
            return Err(escaping());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_relative_paths_pass() {
        check_relative(b"a/b/c.conf").expect("ok");
        check_relative("é/\n/\u{1}".as_bytes()).expect("odd but contained");
        check_relative(b"\xff\xfe").expect("non-utf8 is fine");
    }

    #[test]
    fn escapes_are_refused() {
        assert_eq!(check_relative(b""), Err(PathError::Empty));
        assert!(matches!(check_relative(b"/etc/passwd"), Err(PathError::Absolute(_))));
        for bad in [&b"../x"[..], b"a/../../x", b"a//b", b"./a", b"a/\0"] {
            assert!(matches!(check_relative(bad), Err(PathError::Traversal(_))), "{bad:?}");
        }
    }

    #[test]
    fn symlinks_must_stay_inside() {
        check_symlink(b"a/link", b"../b").expect("sibling of parent dir is inside");
        check_symlink(b"link", b"b/c").expect("inside");
        check_symlink(b"a/b/link", b"./../../c").expect("root level is inside");
        for (p, t) in [
            (&b"link"[..], &b"../x"[..]),
            (b"link", b"/etc"),
            (b"a/link", b"../../x"),
            (b"a/link", b"x/../../../y"),
            (b"l", b""),
        ] {
            assert!(matches!(check_symlink(p, t), Err(PathError::EscapingSymlink { .. })), "{p:?} -> {t:?}");
        }
    }
}
