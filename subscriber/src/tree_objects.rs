//! A snapshot rebuilt from its service's git objects: the files a snapshot by objects
//! names by its tree id, read from the state stream ([`crate::bus::Reader::snapshot`])
//! and turned into the entries of a full snapshot.
//!
//! Every object is checked against its id before it is used, and the walk starts from
//! the tree id the (signed) snapshot names, so what the relay stored is trusted the way
//! git trusts a tree: by its hash. An object that is missing or does not hash to its
//! id fails the whole snapshot before anything is written; the host tries again later,
//! when the relay's next snapshot is complete. Never a partial tree.

use std::collections::HashMap;

use confcast_schemas::{ChangeKind, Entry, FileMode};
use gix_object::tree::EntryKind;
use serde_bytes::ByteBuf;

/// Why a service's objects do not make the tree its snapshot names.
#[derive(Debug, thiserror::Error)]
pub enum ObjectsError {
    /// The snapshot names no tree, or not a git object id.
    #[error("snapshot names no valid tree id ({0:?})")]
    NoTree(Option<String>),
    /// An object the tree needs is not on the bus (not yet, or no longer).
    #[error("snapshot incomplete: object {id} of {path:?} is missing")]
    Missing {
        /// The object.
        id: String,
        /// Where in the tree it is needed.
        path: String,
    },
    /// An object's content does not hash to its id.
    #[error("snapshot corrupt: object {id} of {path:?} does not hash to its id")]
    Corrupt {
        /// The object.
        id: String,
        /// Where in the tree it is needed.
        path: String,
    },
    /// A tree object cannot be parsed.
    #[error("snapshot corrupt: tree {id} of {path:?} cannot be read")]
    BadTree {
        /// The object.
        id: String,
        /// Where in the tree it is.
        path: String,
    },
}

/// A service's objects by id, as read from the bus.
pub type TreeObjects = HashMap<gix_hash::ObjectId, Vec<u8>>;

/// The files of the tree `root` as the entries of a full snapshot (every path an add,
/// content inline), from `objects`. Gitlinks (submodules) carry no content and are
/// skipped, as the relay skips them.
pub fn entries(root: Option<&str>, objects: &TreeObjects) -> Result<Vec<Entry>, ObjectsError> {
    let root = root
        .and_then(|hex| gix_hash::ObjectId::from_hex(hex.as_bytes()).ok())
        .ok_or_else(|| ObjectsError::NoTree(root.map(str::to_owned)))?;
    let mut out = Vec::new();
    let mut pending = vec![(Vec::new(), root)];
    while let Some((path, id)) = pending.pop() {
        let data = object(objects, gix_object::Kind::Tree, &id, &path)?;
        let tree = gix_object::TreeRef::from_bytes(data, gix_hash::Kind::Sha1).map_err(|_| ObjectsError::BadTree {
            id: id.to_string(),
            path: String::from_utf8_lossy(&path).into_owned(),
        })?;
        for entry in tree.entries {
            let mut child = path.clone();
            if !child.is_empty() {
                child.push(b'/');
            }
            child.extend_from_slice(entry.filename);
            let mode = match entry.mode.kind() {
                EntryKind::Tree => {
                    pending.push((child, entry.oid.to_owned()));
                    continue;
                }
                EntryKind::Commit => continue,
                EntryKind::Blob => FileMode::Regular,
                EntryKind::BlobExecutable => FileMode::Executable,
                EntryKind::Link => FileMode::Symlink,
            };
            let content = object(objects, gix_object::Kind::Blob, entry.oid, &child)?;
            out.push(Entry {
                path: ByteBuf::from(child),
                change: ChangeKind::Add,
                mode: Some(mode),
                blob: Some(entry.oid.to_string()),
                content: Some(ByteBuf::from(content.to_vec())),
                object: None,
                from_path: None,
            });
        }
    }
    Ok(out)
}

/// The content of object `id`, checked against its id.
fn object<'a>(
    objects: &'a TreeObjects,
    kind: gix_object::Kind,
    id: &gix_hash::oid,
    path: &[u8],
) -> Result<&'a [u8], ObjectsError> {
    let shown = || String::from_utf8_lossy(path).into_owned();
    let data = objects.get(id).ok_or_else(|| ObjectsError::Missing { id: id.to_string(), path: shown() })?;
    match gix_object::compute_hash(gix_hash::Kind::Sha1, kind, data) {
        Ok(hashed) if hashed == id => Ok(data),
        _ => Err(ObjectsError::Corrupt { id: id.to_string(), path: shown() }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gix_object::WriteTo as _;

    fn hash(kind: gix_object::Kind, data: &[u8]) -> gix_hash::ObjectId {
        gix_object::compute_hash(gix_hash::Kind::Sha1, kind, data).expect("hashes")
    }

    /// A tree `a` (regular), `bin/run` (executable), `l` (link to `a`), as objects.
    fn service() -> (gix_hash::ObjectId, TreeObjects) {
        let mut objects = TreeObjects::new();
        let mut blob = |data: &[u8]| {
            let id = hash(gix_object::Kind::Blob, data);
            objects.insert(id, data.to_vec());
            id
        };
        let (a, run, link) = (blob(b"a\n"), blob(b"#!/bin/sh\n"), blob(b"a"));
        let encode = |entries: Vec<gix_object::tree::Entry>| {
            let mut data = Vec::new();
            gix_object::Tree { entries }.write_to(&mut data).expect("encodes");
            data
        };
        let entry = |kind: EntryKind, name: &str, oid| gix_object::tree::Entry {
            mode: kind.into(),
            filename: name.into(),
            oid,
        };
        let bin = encode(vec![entry(EntryKind::BlobExecutable, "run", run)]);
        let bin_id = hash(gix_object::Kind::Tree, &bin);
        let root = encode(vec![
            entry(EntryKind::Blob, "a", a),
            entry(EntryKind::Tree, "bin", bin_id),
            entry(EntryKind::Link, "l", link),
        ]);
        let root_id = hash(gix_object::Kind::Tree, &root);
        objects.insert(bin_id, bin);
        objects.insert(root_id, root);
        (root_id, objects)
    }

    #[test]
    fn a_complete_tree_becomes_every_file() {
        let (root, objects) = service();
        let mut found: Vec<(String, FileMode, Vec<u8>)> = entries(Some(&root.to_string()), &objects)
            .expect("complete")
            .into_iter()
            .map(|e| {
                let content = e.content.expect("inline").into_vec();
                (String::from_utf8(e.path.into_vec()).expect("utf-8"), e.mode.expect("mode"), content)
            })
            .collect();
        found.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(
            found,
            vec![
                ("a".into(), FileMode::Regular, b"a\n".to_vec()),
                ("bin/run".into(), FileMode::Executable, b"#!/bin/sh\n".to_vec()),
                ("l".into(), FileMode::Symlink, b"a".to_vec()),
            ]
        );
    }

    #[test]
    fn a_missing_or_altered_object_fails_the_whole_snapshot() {
        let (root, objects) = service();
        let run = hash(gix_object::Kind::Blob, b"#!/bin/sh\n");
        let mut missing = objects.clone();
        missing.remove(&run);
        let e = entries(Some(&root.to_string()), &missing).expect_err("incomplete");
        assert!(matches!(&e, ObjectsError::Missing { path, .. } if path == "bin/run"), "{e}");
        let mut altered = objects.clone();
        altered.insert(run, b"#!/bin/sh\nrm -rf /\n".to_vec());
        let e = entries(Some(&root.to_string()), &altered).expect_err("corrupt");
        assert!(matches!(e, ObjectsError::Corrupt { .. }), "{e}");
        assert!(matches!(entries(Some("nope"), &objects), Err(ObjectsError::NoTree(_))));
        assert!(matches!(entries(Some(&run.to_string()), &objects), Err(ObjectsError::Corrupt { .. })));
    }
}
