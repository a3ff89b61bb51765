//! Tree listings and the diff between two of them.
//!
//! A listing is every blob of a tree by path. Diffing listings rather than walking both
//! trees in lock-step keeps the logic obvious and makes exact renames (same blob, same
//! mode, new path) cheap to find: a subscriber applies those as hard links.

use std::collections::BTreeMap;

use confcast_schemas::{ChangeKind, FileMode};

/// A blob in a tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Item {
    /// Its mode.
    pub mode: FileMode,
    /// Its blob id.
    pub blob: gix::ObjectId,
}

/// Every blob of a tree by its full path (raw bytes).
pub type Listing = BTreeMap<Vec<u8>, Item>;

/// One change between two listings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// The path in the new tree (the old one for deletions).
    pub path: Vec<u8>,
    /// What happened.
    pub kind: ChangeKind,
    /// The new blob and mode; `None` for deletions.
    pub item: Option<Item>,
    /// The old path of a rename.
    pub from_path: Option<Vec<u8>>,
}

/// Changes turning `old` into `new`. A deleted path whose exact blob and mode reappear
/// at an added path becomes a rename; every other add, modify and delete stays as is.
pub fn diff(old: &Listing, new: &Listing) -> Vec<Change> {
    let mut changes = Vec::new();
    let mut deleted: BTreeMap<Item, Vec<Vec<u8>>> = BTreeMap::new();
    for (path, item) in old {
        if !new.contains_key(path) {
            deleted.entry(*item).or_default().push(path.clone());
        }
    }
    for (path, item) in new {
        match old.get(path) {
            Some(before) if before == item => {}
            Some(_) => changes.push(Change {
                path: path.clone(),
                kind: ChangeKind::Modify,
                item: Some(*item),
                from_path: None,
            }),
            None => match deleted.get_mut(item).and_then(Vec::pop) {
                Some(from) => changes.push(Change {
                    path: path.clone(),
                    kind: ChangeKind::Rename,
                    item: Some(*item),
                    from_path: Some(from),
                }),
                None => changes.push(Change {
                    path: path.clone(),
                    kind: ChangeKind::Add,
                    item: Some(*item),
                    from_path: None,
                }),
            },
        }
    }
    for paths in deleted.into_values() {
        for path in paths {
            changes.push(Change { path, kind: ChangeKind::Delete, item: None, from_path: None });
        }
    }
    changes
}

impl PartialOrd for Item {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Item {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.blob, self.mode as u8).cmp(&(other.blob, other.mode as u8))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(b: u8, mode: FileMode) -> Item {
        Item { mode, blob: gix::ObjectId::from([b; 20]) }
    }

    fn listing(items: &[(&str, Item)]) -> Listing {
        items.iter().map(|(p, i)| (p.as_bytes().to_vec(), *i)).collect()
    }

    fn kinds(changes: &[Change]) -> Vec<(String, ChangeKind, Option<String>)> {
        changes
            .iter()
            .map(|c| {
                (
                    String::from_utf8_lossy(&c.path).into(),
                    c.kind,
                    c.from_path.as_ref().map(|p| String::from_utf8_lossy(p).into()),
                )
            })
            .collect()
    }

    #[test]
    fn add_modify_delete_rename_and_mode_change() {
        let old = listing(&[
            ("a", item(1, FileMode::Regular)),
            ("b", item(2, FileMode::Regular)),
            ("c", item(3, FileMode::Regular)),
            ("d/x", item(4, FileMode::Regular)),
            ("run.sh", item(5, FileMode::Regular)),
        ]);
        let new = listing(&[
            ("a", item(1, FileMode::Regular)),
            ("b", item(9, FileMode::Regular)),
            ("e/y", item(4, FileMode::Regular)),
            ("n", item(7, FileMode::Symlink)),
            ("run.sh", item(5, FileMode::Executable)),
        ]);
        assert_eq!(
            kinds(&diff(&old, &new)),
            vec![
                ("b".into(), ChangeKind::Modify, None),
                ("e/y".into(), ChangeKind::Rename, Some("d/x".into())),
                ("n".into(), ChangeKind::Add, None),
                ("run.sh".into(), ChangeKind::Modify, None),
                ("c".into(), ChangeKind::Delete, None),
            ]
        );
    }

    #[test]
    fn a_rename_needs_the_same_mode() {
        let old = listing(&[("a", item(1, FileMode::Regular))]);
        let new = listing(&[("b", item(1, FileMode::Executable))]);
        assert_eq!(
            kinds(&diff(&old, &new)),
            vec![("b".into(), ChangeKind::Add, None), ("a".into(), ChangeKind::Delete, None)]
        );
    }

    #[test]
    fn identical_and_empty_listings() {
        let old = listing(&[("a", item(1, FileMode::Regular))]);
        assert!(diff(&old, &old).is_empty());
        assert!(diff(&Listing::new(), &Listing::new()).is_empty());
        assert_eq!(diff(&old, &Listing::new()).len(), 1);
    }
}
