//! Fuzzes the checks every door runs on a pushed tree (`confcast_schemas::path`):
//! `check_relative` and `check_name` on entry paths, `Links::check` and `Links::resolve`
//! on a tree's links. Nothing here needs a file system; what is asserted:
//!
//! * nothing panics, on any bytes;
//! * `check_relative` and `check_name` accept exactly the plain relative paths and names;
//! * `check` agrees with `resolve`: it names the first link, in path order, that is not
//!   plain or does not resolve, and passes only when every link resolves;
//! * a link with a plain path that resolves ends in plain names (no `..`, `.`, empty name, NUL) with no
//!   link among them: a fresh link aimed at that path resolves there without following
//!   anything;
//! * a refusal names a link of the tree, with its own target, and where it leads says
//!   how it left (`..` above the root, or an absolute target);
//! * `resolve` gives what a plain model of the rules gives: the whole path looked up at
//!   every step, as simple as it can be written, slow as it is.
//!
//! Paths and targets are spelled from a few tokens (`a`..`d`, `/`, `..`, `.`, NUL) and
//! now and then a raw byte, so that names collide and links lead through one another.
#![no_main]

use std::collections::BTreeMap;

use arbitrary::{Arbitrary, Unstructured};
use confcast_schemas::path::{check_name, check_relative, Links, PathError, MAX_LINK_HOPS};
use libfuzzer_sys::fuzz_target;

/// A path or target spelled from tokens.
#[derive(Debug)]
struct Spelled(Vec<u8>);

impl<'a> Arbitrary<'a> for Spelled {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Spelled> {
        let len = u.int_in_range(0..=12)?;
        let mut out = Vec::new();
        for _ in 0..len {
            let token: u8 = u.arbitrary()?;
            match token % 16 {
                0 => out.push(b'a'),
                1 => out.push(b'b'),
                2 => out.push(b'c'),
                3 => out.push(b'd'),
                4..=7 => out.push(b'/'),
                8 | 9 => out.extend_from_slice(b".."),
                10 => out.push(b'.'),
                11 => out.extend_from_slice(b"/.."),
                12 => out.extend_from_slice(b"../"),
                13 => out.push(0),
                _ => out.push(u.arbitrary()?),
            }
        }
        Ok(Spelled(out))
    }
}

#[derive(Debug, Arbitrary)]
struct Input {
    paths: Vec<Spelled>,
    links: Vec<(Spelled, Spelled)>,
}

/// What `check_relative` accepts: not empty, relative, every component a plain name.
fn plain(path: &[u8]) -> bool {
    !path.is_empty()
        && path[0] != b'/'
        && !path.contains(&0)
        && path.split(|&b| b == b'/').all(|c| !c.is_empty() && c != b"." && c != b"..")
}

fn shown(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The rules of `Links::resolve`, written as plainly as they can be: from the root,
/// the directory the link sits in, then its target, component by component; a name is
/// looked up as a whole path, and if it is a link its target is followed from the
/// link's directory.
fn model(links: &BTreeMap<Vec<u8>, Vec<u8>>, path: &[u8]) -> Result<Vec<Vec<u8>>, PathError> {
    let names = |p: &[u8]| -> Vec<Vec<u8>> {
        p.split(|&b| b == b'/').filter(|c| !c.is_empty() && *c != b".").map(<[u8]>::to_vec).collect()
    };
    let Some(target) = links.get(path) else { return Ok(names(path)) };
    let invalid = |p: &[u8], t: &[u8]| PathError::InvalidTarget { path: shown(p), target: shown(t) };
    let out = |leads: String, via: Option<&Vec<u8>>| PathError::EscapingSymlink {
        path: shown(path),
        target: shown(target),
        leads,
        via: via.map(|v| shown(v)),
    };
    if target.is_empty() || target.contains(&0) {
        return Err(invalid(path, target));
    }
    if target[0] == b'/' {
        return Err(out(shown(target), None));
    }
    // Walked from the root: the link's directory (through any link on the way), then
    // its target; components are taken from the end.
    let mut todo: Vec<Vec<u8>> = target.split(|&b| b == b'/').rev().map(<[u8]>::to_vec).collect();
    let mut parent = names(path);
    parent.pop();
    todo.extend(parent.into_iter().rev());
    let mut at: Vec<Vec<u8>> = Vec::new();
    let (mut hops, mut via) = (1, None);
    while let Some(c) = todo.pop() {
        if c.is_empty() || c == b"." {
            continue;
        }
        if c == b".." {
            if at.pop().is_none() {
                let rest: Vec<Vec<u8>> = todo.iter().rev().cloned().collect();
                let leads = if rest.is_empty() { "..".to_owned() } else { format!("../{}", shown(&rest.join(&b'/'))) };
                return Err(out(leads, via));
            }
            continue;
        }
        at.push(c);
        let whole = at.join(&b'/');
        // Only a plain path is ever reached by a walk.
        let Some((link, next)) = links.get_key_value(&whole).filter(|(p, _)| plain(p)) else { continue };
        at.pop();
        hops += 1;
        if hops > MAX_LINK_HOPS {
            return Err(PathError::SymlinkLoop { path: shown(path), target: shown(target) });
        }
        via = Some(link);
        if next.is_empty() || next.contains(&0) {
            return Err(invalid(link, next));
        }
        if next[0] == b'/' {
            return Err(out(shown(next), via));
        }
        todo.extend(next.split(|&b| b == b'/').rev().map(<[u8]>::to_vec));
    }
    Ok(at)
}

fuzz_target!(|input: Input| {
    for Spelled(path) in &input.paths {
        assert_eq!(check_relative(path).is_ok(), plain(path), "check_relative {path:?}");
        assert_eq!(check_name(path).is_ok(), plain(path) && !path.contains(&b'/'), "check_name {path:?}");
    }

    // Later insertions win, as in `Links::insert`.
    let map: BTreeMap<Vec<u8>, Vec<u8>> = input.links.iter().map(|(p, t)| (p.0.clone(), t.0.clone())).collect();
    let links: Links = map.iter().map(|(p, t)| (p.clone(), t.clone())).collect();
    assert_eq!(links.len(), map.len());
    let verdict = links.check();
    assert_eq!(verdict, links.check(), "check is deterministic");

    let mut first = Ok(());
    for (path, target) in &map {
        let resolved = links.resolve(path);
        assert_eq!(resolved, model(&map, path), "resolve {path:?} against the model");
        if first.is_ok() {
            first = check_relative(path).and(resolved.clone().map(drop));
        }
        match &resolved {
            // `check` refuses a link whose own path is not plain before resolving it.
            Ok(names) if plain(path) => {
                for name in names {
                    assert!(plain(name) && !name.contains(&b'/'), "{path:?} resolves through {name:?}");
                }
                // Where it ends holds no link on the way: aimed at directly, nothing is
                // followed.
                {
                    let probe = b"\xffprobe".to_vec();
                    if !map.keys().any(|k| k.starts_with(&probe)) && !names.contains(&probe) {
                        let mut aimed = links.clone();
                        let joined = if names.is_empty() { b".".to_vec() } else { names.join(&b'/') };
                        aimed.insert(probe.clone(), joined);
                        assert_eq!(aimed.resolve(&probe).as_ref(), Ok(names), "{path:?} ends on a link");
                    }
                }
            }
            Ok(_) => {}
            Err(PathError::EscapingSymlink { path: named, target: named_target, leads, via }) => {
                assert_eq!(
                    (named.as_bytes(), named_target.as_bytes()),
                    (shown(path).as_bytes(), shown(target).as_bytes())
                );
                if let Some(via) = via {
                    assert!(map.keys().any(|k| shown(k) == *via), "{via:?} is a link of the tree");
                }
                if leads.starts_with('/') {
                    // Names are shown lossily: any link shown as `via` will do.
                    let holds = match via {
                        None => shown(target) == *leads,
                        Some(via) => map.iter().any(|(k, t)| shown(k) == *via && shown(t) == *leads),
                    };
                    assert!(holds, "{leads:?} is the absolute target of the link that holds it");
                } else {
                    assert!(leads == ".." || leads.starts_with("../"), "leads {leads:?}");
                }
            }
            Err(PathError::SymlinkLoop { path: named, target: named_target }) => {
                assert_eq!((named.as_str(), named_target.as_str()), (shown(path).as_str(), shown(target).as_str()));
            }
            Err(PathError::InvalidTarget { path: named, target: bad }) => {
                assert!(bad.is_empty() || bad.contains('\0'), "invalid target {bad:?}");
                assert!(
                    map.iter().any(|(p, t)| shown(p) == *named && shown(t) == *bad),
                    "{named:?} -> {bad:?} is a link"
                );
            }
            Err(other) => panic!("resolve gave {other:?}"),
        }
    }
    assert_eq!(verdict, first, "check names the first link that fails, in path order");
});
