//! The double's data: keys with their create and modify indexes, the raft index every
//! write request moves, the K/V table's index, and the tombstones of deleted keys that
//! keep a prefix's index right after a deletion (Consul's `state/kvs.go`).

use std::collections::BTreeMap;

/// One key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Kv {
    pub(super) value: Vec<u8>,
    pub(super) flags: u64,
    pub(super) create: u64,
    pub(super) modify: u64,
}

/// The K/V table, its indexes and its graveyard, as Consul's state store keeps them.
#[derive(Debug, Clone, Default)]
pub(super) struct Store {
    /// The raft index: the last write request.
    pub(super) raft: u64,
    /// The K/V table's index: the last change to any key.
    table: u64,
    /// The live keys.
    pub(super) entries: BTreeMap<String, Kv>,
    /// Deleted keys and the index of their deletion (Consul's graveyard).
    tombstones: BTreeMap<String, u64>,
}

impl Store {
    pub(super) fn set(&mut self, index: u64, key: &str, value: Vec<u8>, flags: u64) {
        match self.entries.get_mut(key) {
            Some(kv) if kv.value == value && kv.flags == flags => {}
            Some(kv) => {
                kv.value = value;
                kv.flags = flags;
                kv.modify = index;
                self.table = index;
            }
            None => {
                self.entries.insert(key.to_owned(), Kv { value, flags, create: index, modify: index });
                self.tombstones.remove(key);
                self.table = index;
            }
        }
    }

    /// Check-and-set: `cas` 0 creates only, otherwise the modify index must match.
    pub(super) fn set_cas(&mut self, index: u64, key: &str, value: Vec<u8>, flags: u64, cas: u64) -> bool {
        let ok = match self.entries.get(key) {
            None => cas == 0,
            Some(kv) => cas != 0 && kv.modify == cas,
        };
        if ok {
            self.set(index, key, value, flags);
        }
        ok
    }

    pub(super) fn delete(&mut self, index: u64, key: &str) {
        if self.entries.remove(key).is_some() {
            self.tombstones.insert(key.to_owned(), index);
            self.table = index;
        }
    }

    /// A missing key counts as deleted.
    pub(super) fn delete_cas(&mut self, index: u64, key: &str, cas: u64) -> bool {
        match self.entries.get(key) {
            None => true,
            Some(kv) if kv.modify == cas => {
                self.delete(index, key);
                true
            }
            Some(_) => false,
        }
    }

    pub(super) fn delete_tree(&mut self, index: u64, prefix: &str) {
        let keys: Vec<String> = self.entries.keys().filter(|k| k.starts_with(prefix)).cloned().collect();
        for key in keys {
            self.delete(index, &key);
        }
    }

    pub(super) fn under<'a>(&'a self, prefix: &'a str) -> impl Iterator<Item = (&'a String, &'a Kv)> + 'a {
        self.entries.range(prefix.to_owned()..).take_while(move |(k, _)| k.starts_with(prefix))
    }

    /// The last change to `key`, or under `prefix` (tombstones included).
    pub(super) fn touched(&self, scope: &Scope) -> u64 {
        match scope {
            Scope::Key(key) => self
                .entries
                .get(key)
                .map(|kv| kv.modify)
                .unwrap_or(0)
                .max(self.tombstones.get(key).copied().unwrap_or(0)),
            Scope::Prefix(prefix) => {
                let live = self.under(prefix).map(|(_, kv)| kv.modify).max().unwrap_or(0);
                let dead =
                    self.tombstones.iter().filter(|(k, _)| k.starts_with(prefix.as_str())).map(|(_, i)| *i).max();
                live.max(dead.unwrap_or(0))
            }
        }
    }

    /// `X-Consul-Index` for a read of `scope`.
    pub(super) fn index_of(&self, scope: &Scope) -> u64 {
        let index = match scope {
            Scope::Key(_) => self.table,
            Scope::Prefix(prefix) if prefix.is_empty() => self.table,
            Scope::Prefix(_) => match self.touched(scope) {
                0 => self.table,
                index => index,
            },
        };
        index.max(1)
    }
}

/// What a read covers.
#[derive(Debug, Clone)]
pub(super) enum Scope {
    Key(String),
    Prefix(String),
}
