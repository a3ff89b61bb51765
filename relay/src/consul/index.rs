//! The datacenter's configuration index, kept in Consul for consul-template, Nomad
//! `template` stanzas and anything else that reads Consul's K/V store.
//!
//! Consul holds a copy, in addition to the NATS K/V bucket (the embedded default that
//! confcast's own readers use): Consul is optional, and when it is down, unreachable or
//! refusing writes the relay keeps publishing on NATS and brings Consul up to date as
//! soon as it answers again. So the relay never waits on Consul; once per handled batch
//! of events it hands what it wants — the whole index of its datacenter after a full
//! resolution, only the keys that moved otherwise — to a background task ([`Feed`]),
//! which makes Consul's `confcast/<dc>/` prefix equal to it:
//!
//! 1. read the prefix (`GET ?recurse`) unless the last pass left it known;
//! 2. compute the difference: `cas` for every key whose value differs (modify index 0 for
//!    a new key), `delete-cas` for every key the relay does not publish (a service dropped
//!    from the datacenter, the old version of a repinned one, leftovers from before a
//!    restart). A pass that starts from a prefix it knows compares only the keys changed
//!    since the last pass, so a push of one service costs one key's work whatever the
//!    size of the index; a pass that reads the prefix compares every key;
//! 3. apply it in `/v1/txn` transactions. A transaction holds at most 64 operations, so a
//!    change of more than 64 keys takes several; each is atomic, and the operations of one
//!    service (its new version key and the removal of its old one) always travel in the
//!    same transaction, so a reader never sees a service with two versions or none, and a
//!    datacenter switch of up to 64 keys (some 30 repinned services) is seen all at once.
//!    A larger switch is seen as a few consecutive atomic steps, each a set of whole
//!    services. (Making it one step would need readers to follow a pointer to a new copy
//!    of the whole index, which `{{ key "..." }}` templates cannot do.)
//! 4. every write is check-and-set against the modify index read in step 1: if anything
//!    else changed a key meanwhile (another relay of the datacenter taking over, an
//!    operator), Consul rolls the transaction back with 409, and the task re-reads the
//!    prefix and starts over from step 2 — nothing is overwritten blindly.
//!
//! Any failure drops what the task knew of Consul and retries the whole pass with
//! backoff; changes from the relay that arrive meanwhile join the pass being retried. A
//! value Consul would refuse (over 512 KiB) is never sent: the key keeps its last value
//! and the relay reports it.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use confcast_schemas::subject;
use tokio::sync::mpsc;
use tokio_util::sync::{CancellationToken, DropGuard};

use super::{txn_op_bytes, Client, ConsulError, TxnOp, TxnOutcome, MAX_TXN_BODY_BYTES, MAX_TXN_OPS, MAX_VALUE_BYTES};

/// The index as the relay wants it in Consul: key → value.
pub type Desired = BTreeMap<String, Vec<u8>>;

/// Keys of the index that change: key → its new value, or `None` for a key that goes.
pub type Changes = BTreeMap<String, Option<Vec<u8>>>;

/// How often a pass may run into concurrent writers before it gives up and backs off.
const MAX_CONFLICTS: usize = 5;

/// The prefix of a datacenter's keys, as [`subject::index_key`] writes them.
pub fn dc_prefix(dc: &str) -> String {
    format!("confcast/{}/", subject::encode_key_segment(dc))
}

/// What one pass changed in Consul.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Written {
    /// Transactions applied.
    pub transactions: usize,
    /// Keys written.
    pub set: usize,
    /// Keys removed.
    pub deleted: usize,
}

/// Makes a datacenter's prefix in Consul equal to the index the relay wants.
#[derive(Debug)]
pub struct IndexWriter {
    client: Client,
    prefix: String,
    /// What the prefix holds (value, modify index), as of the last pass; `None` when it
    /// must be read again.
    known: Option<BTreeMap<String, (Vec<u8>, u64)>>,
}

impl IndexWriter {
    /// A writer of datacenter `dc`'s prefix.
    pub fn new(client: Client, dc: &str) -> IndexWriter {
        IndexWriter { client, prefix: dc_prefix(dc), known: None }
    }

    /// One pass (see the module docs). Keys of `desired` outside the prefix are ignored.
    /// `changed`: the keys changed since the last pass that succeeded, the only ones
    /// compared while the prefix is known; `None` compares every key.
    pub async fn reconcile(
        &mut self,
        desired: &Desired,
        changed: Option<&BTreeSet<String>>,
    ) -> Result<Written, ConsulError> {
        let wanted = |(k, v): &(&String, &Vec<u8>)| k.starts_with(&self.prefix) && v.len() <= MAX_VALUE_BYTES;
        let mut written = Written::default();
        let mut conflicts = Vec::new();
        while conflicts.len() < MAX_CONFLICTS {
            let (mut known, ops) = match (self.known.take(), changed) {
                (Some(known), Some(keys)) => {
                    let desired: Desired = keys
                        .iter()
                        .filter_map(|k| desired.get_key_value(k))
                        .filter(wanted)
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect();
                    let known_keys = keys.iter().filter_map(|k| Some((k.clone(), known.get(k)?.clone())));
                    let ops = plan(&known_keys.collect(), &desired);
                    (known, ops)
                }
                (known, _) => {
                    let known = match known {
                        Some(known) => known,
                        None => self.read().await?,
                    };
                    let desired: Desired = desired.iter().filter(wanted).map(|(k, v)| (k.clone(), v.clone())).collect();
                    let ops = plan(&known, &desired);
                    (known, ops)
                }
            };
            let mut rolled_back = false;
            for ops in ops {
                match self.client.txn(&ops).await {
                    Ok(TxnOutcome::Committed(results)) => {
                        written.transactions += 1;
                        for op in &ops {
                            match op {
                                TxnOp::DeleteCas { key, .. } => {
                                    known.remove(key);
                                    written.deleted += 1;
                                }
                                TxnOp::Cas { key, value, .. } => {
                                    let index = results.iter().find(|e| e.key == *key).map(|e| e.modify_index);
                                    // Without its new index the key cannot be written
                                    // again with CAS: read it back next time.
                                    match index {
                                        Some(index) => known.insert(key.clone(), (value.clone(), index)),
                                        None => known.insert(key.clone(), (value.clone(), u64::MAX)),
                                    };
                                    written.set += 1;
                                }
                            }
                        }
                    }
                    Ok(TxnOutcome::RolledBack(failures)) => {
                        let what = failures.iter().map(|f| f.what.as_str()).collect::<Vec<_>>().join("; ");
                        tracing::debug!(prefix = %self.prefix, %what, "consul index changed under the relay; reading it again");
                        conflicts.push(what);
                        rolled_back = true;
                        break;
                    }
                    Err(e) => return Err(e),
                }
            }
            if !rolled_back {
                if known.values().all(|(_, index)| *index != u64::MAX) {
                    self.known = Some(known);
                }
                return Ok(written);
            }
        }
        Err(ConsulError::Conflict { prefix: self.prefix.clone(), attempts: MAX_CONFLICTS, what: conflicts.join(" | ") })
    }

    async fn read(&self) -> Result<BTreeMap<String, (Vec<u8>, u64)>, ConsulError> {
        let listed = self.client.list(&self.prefix).await?;
        Ok(listed.into_iter().map(|e| (e.key, (e.value, e.modify_index))).collect())
    }
}

/// The service a key belongs to: everything up to its last `/`.
fn service_of(key: &str) -> &str {
    key.rsplit_once('/').map(|(dir, _)| dir).unwrap_or("")
}

/// The transactions that turn `known` into `desired`: check-and-set writes and removals,
/// the operations of one service (keys sharing everything up to the last `/`) always in
/// the same transaction, each transaction within Consul's limits.
pub fn plan(known: &BTreeMap<String, (Vec<u8>, u64)>, desired: &Desired) -> Vec<Vec<TxnOp>> {
    let mut groups: BTreeMap<&str, Vec<TxnOp>> = BTreeMap::new();
    for (key, value) in desired {
        let current = known.get(key);
        if current.is_some_and(|(v, _)| v == value) {
            continue;
        }
        let index = current.map(|(_, i)| *i).unwrap_or(0);
        groups.entry(service_of(key)).or_default().push(TxnOp::Cas { key: key.clone(), value: value.clone(), index });
    }
    for (key, (_, index)) in known {
        if !desired.contains_key(key) {
            groups.entry(service_of(key)).or_default().push(TxnOp::DeleteCas { key: key.clone(), index: *index });
        }
    }
    // Room for the body's brackets.
    let budget = MAX_TXN_BODY_BYTES - 2;
    let mut txns: Vec<Vec<TxnOp>> = Vec::new();
    let (mut current, mut bytes) = (Vec::new(), 0);
    for (_, group) in groups {
        let group_bytes: usize = group.iter().map(txn_op_bytes).sum();
        let units = if group.len() > MAX_TXN_OPS || group_bytes > budget {
            // Cannot be atomic: one operation at a time.
            group.into_iter().map(|op| vec![op]).collect()
        } else {
            vec![group]
        };
        for unit in units {
            let unit_bytes: usize = unit.iter().map(txn_op_bytes).sum();
            if !current.is_empty() && (current.len() + unit.len() > MAX_TXN_OPS || bytes + unit_bytes > budget) {
                txns.push(std::mem::take(&mut current));
                bytes = 0;
            }
            current.extend(unit);
            bytes += unit_bytes;
        }
    }
    if !current.is_empty() {
        txns.push(current);
    }
    txns
}

/// The relay's side of the background writer: hands it what changed, never waits.
#[derive(Debug)]
pub struct Feed {
    changes: mpsc::UnboundedSender<Changes>,
    /// The index as handed over so far.
    sent: Desired,
    /// Values refused for their size, by key, so each is reported once.
    refused: BTreeMap<String, Vec<u8>>,
    /// Whether anything was handed over yet: the first hand-over always starts a pass,
    /// which removes what an earlier life of the datacenter left.
    started: bool,
    _stop: DropGuard,
}

impl Feed {
    /// Starts the background writer of datacenter `dc`'s index; it stops when the feed is
    /// dropped. Nothing is written before the first [`Feed::update`] or [`Feed::change`].
    pub fn start(client: Client, dc: &str) -> Feed {
        let (changes, receiver) = mpsc::unbounded_channel();
        let stop = CancellationToken::new();
        tokio::spawn(keep(IndexWriter::new(client, dc), receiver, stop.clone()));
        Feed::to(changes, stop)
    }

    /// A feed handing its changes to `changes`, whose writer `stop` stops.
    fn to(changes: mpsc::UnboundedSender<Changes>, stop: CancellationToken) -> Feed {
        Feed { changes, sent: Desired::new(), refused: BTreeMap::new(), started: false, _stop: stop.drop_guard() }
    }

    /// Hands over the whole index the relay now publishes: the writer gets the keys that
    /// differ from what it was handed before. A value too large for Consul is left out
    /// (its key keeps the value Consul has); returns one message for each such value not
    /// reported before.
    pub fn update(&mut self, index: Desired) -> Vec<String> {
        self.refused.retain(|k, _| index.get(k).is_some_and(|v| v.len() > MAX_VALUE_BYTES));
        let mut changes: Changes =
            self.sent.keys().filter(|k| !index.contains_key(*k)).map(|k| (k.clone(), None)).collect();
        changes.extend(index.into_iter().filter(|(k, v)| self.sent.get(k) != Some(v)).map(|(k, v)| (k, Some(v))));
        self.change(changes)
    }

    /// Hands over the keys that moved since the last hand-over, as [`Feed::update`] does
    /// the whole index.
    pub fn change(&mut self, changes: Changes) -> Vec<String> {
        let mut messages = Vec::new();
        let mut forward = Changes::new();
        for (key, value) in changes {
            match value {
                Some(value) if value.len() > MAX_VALUE_BYTES => {
                    if self.refused.get(&key) != Some(&value) {
                        messages.push(format!(
                            "consul index key {key}: value of {} bytes is over Consul's limit of {MAX_VALUE_BYTES} bytes; not written, Consul keeps {}",
                            value.len(),
                            if self.sent.contains_key(&key) { "the previous value" } else { "no value" }
                        ));
                        self.refused.insert(key, value);
                    }
                }
                Some(value) => {
                    self.refused.remove(&key);
                    if self.sent.get(&key) != Some(&value) {
                        self.sent.insert(key.clone(), value.clone());
                        forward.insert(key, Some(value));
                    }
                }
                None => {
                    self.refused.remove(&key);
                    if self.sent.remove(&key).is_some() {
                        forward.insert(key, None);
                    }
                }
            }
        }
        if !forward.is_empty() || !self.started {
            self.started = true;
            // The writer runs until the feed is dropped, so it is there to receive.
            let _ = self.changes.send(forward);
        }
        messages
    }
}

/// Applies `changes` to the index the writer wants, noting the keys they touch.
fn merge(desired: &mut Desired, changed: &mut BTreeSet<String>, changes: Changes) {
    for (key, value) in changes {
        match value {
            Some(value) => desired.insert(key.clone(), value),
            None => desired.remove(&key),
        };
        changed.insert(key);
    }
}

/// The background writer: one pass per batch of changes, retried with backoff until it
/// succeeds; changes that arrive meanwhile join the pass.
async fn keep(mut writer: IndexWriter, mut changes: mpsc::UnboundedReceiver<Changes>, stop: CancellationToken) {
    let mut desired = Desired::new();
    // Keys changed since the last pass that succeeded.
    let mut changed = BTreeSet::new();
    let mut backoff = Duration::from_millis(100);
    let mut retry = false;
    loop {
        if !retry {
            tokio::select! {
                got = changes.recv() => match got {
                    Some(got) => merge(&mut desired, &mut changed, got),
                    None => return,
                },
                () = stop.cancelled() => return,
            }
        }
        while let Ok(got) = changes.try_recv() {
            merge(&mut desired, &mut changed, got);
        }
        let result = tokio::select! {
            result = writer.reconcile(&desired, Some(&changed)) => result,
            () = stop.cancelled() => return,
        };
        match result {
            Ok(written) => {
                if retry {
                    tracing::info!(prefix = %writer.prefix, "consul index reachable again");
                }
                changed.clear();
                retry = false;
                backoff = Duration::from_millis(100);
                if written == Written::default() {
                    tracing::debug!(prefix = %writer.prefix, keys = desired.len(), "consul index up to date");
                } else {
                    tracing::info!(
                        prefix = %writer.prefix,
                        transactions = written.transactions,
                        set = written.set,
                        deleted = written.deleted,
                        "consul index updated"
                    );
                }
            }
            Err(e) => {
                writer.known = None;
                retry = true;
                let error = confcast_schemas::process::error_chain(&e);
                if e.is_transient() {
                    tracing::warn!(%error, retry_in = ?backoff, "consul index not updated; NATS publishing goes on");
                } else {
                    tracing::error!(%error, retry_in = ?backoff, "consul refuses the index; NATS publishing goes on");
                }
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    // Newer changes are tried at once (the same backoff stays in force if it fails too).
                    got = changes.recv() => match got {
                        Some(got) => merge(&mut desired, &mut changed, got),
                        None => return,
                    },
                    () = stop.cancelled() => return,
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use confcast_schemas::Kind;

    fn known(entries: &[(&str, &str, u64)]) -> BTreeMap<String, (Vec<u8>, u64)> {
        entries.iter().map(|(k, v, i)| (k.to_string(), (v.as_bytes().to_vec(), *i))).collect()
    }

    fn desired(entries: &[(&str, &str)]) -> Desired {
        entries.iter().map(|(k, v)| (k.to_string(), v.as_bytes().to_vec())).collect()
    }

    #[test]
    fn the_prefix_is_the_one_index_keys_start_with() {
        for dc in ["dc1", "a b", "x.y"] {
            assert!(subject::index_key(dc, Kind::Service, "s", "latest").starts_with(&dc_prefix(dc)));
        }
        assert!(!dc_prefix("dc10").starts_with(&dc_prefix("dc1")), "a datacenter never covers another");
    }

    #[test]
    fn a_repinned_service_moves_in_one_transaction_with_check_and_set() {
        let p = "confcast/dc1/configurations/services";
        let have = known(&[(&format!("{p}/s0/v1"), "master/a", 10), (&format!("{p}/s1/latest"), "main/b", 11)]);
        let want = desired(&[(&format!("{p}/s0/v2"), "master/c"), (&format!("{p}/s1/latest"), "main/b")]);
        let txns = plan(&have, &want);
        assert_eq!(
            txns,
            vec![vec![
                TxnOp::Cas { key: format!("{p}/s0/v2"), value: b"master/c".to_vec(), index: 0 },
                TxnOp::DeleteCas { key: format!("{p}/s0/v1"), index: 10 },
            ]]
        );
        assert!(plan(&have, &desired(&[(&format!("{p}/s0/v1"), "master/a"), (&format!("{p}/s1/latest"), "main/b")]))
            .is_empty());
    }

    #[test]
    fn large_changes_split_between_services_never_within_one() {
        let p = "confcast/dc1/configurations/services";
        // 100 services each moving from v1 to v2: 200 operations.
        let have: BTreeMap<String, (Vec<u8>, u64)> =
            (0..100).map(|i| (format!("{p}/s{i:03}/v1"), (b"m/a".to_vec(), 5))).collect();
        let want: Desired = (0..100).map(|i| (format!("{p}/s{i:03}/v2"), b"m/b".to_vec())).collect();
        let txns = plan(&have, &want);
        assert_eq!(txns.iter().map(Vec::len).sum::<usize>(), 200);
        assert_eq!(txns.len(), 4, "64 + 64 + 64 + 8 operations");
        for txn in &txns {
            assert!(txn.len() <= MAX_TXN_OPS);
            let services: std::collections::BTreeSet<&str> =
                txn.iter().map(|op| op.key().rsplit_once('/').expect("slash").0).collect();
            assert_eq!(services.len() * 2, txn.len(), "each service's two operations together: {txn:?}");
        }
    }

    #[test]
    fn transactions_stay_under_the_body_limit() {
        let p = "confcast/dc1/configurations/services";
        let value = vec![b'x'; 200 * 1024];
        let want: Desired = (0..4).map(|i| (format!("{p}/s{i}/latest"), value.clone())).collect();
        let txns = plan(&BTreeMap::new(), &want);
        assert_eq!(txns.len(), 4, "base64 of 200 KiB is 267 KiB: one per transaction");
        for txn in &txns {
            assert!(txn.iter().map(txn_op_bytes).sum::<usize>() < MAX_TXN_BODY_BYTES);
        }
    }

    #[test]
    fn the_writer_is_handed_only_the_keys_that_moved() {
        let (sender, mut writer) = mpsc::unbounded_channel();
        let mut feed = Feed::to(sender, CancellationToken::new());
        let mut handed = || writer.try_recv().ok();
        let changes = |entries: &[(&str, Option<&str>)]| -> Changes {
            entries.iter().map(|(k, v)| (k.to_string(), v.map(|v| v.as_bytes().to_vec()))).collect()
        };

        assert!(feed.update(Desired::new()).is_empty());
        assert_eq!(handed(), Some(Changes::new()), "the first hand-over starts a pass even when empty");
        feed.update(desired(&[("a", "1"), ("b", "2")]));
        assert_eq!(handed(), Some(changes(&[("a", Some("1")), ("b", Some("2"))])));
        feed.change(changes(&[("a", Some("1"))]));
        assert_eq!(handed(), None, "nothing moved");
        feed.change(changes(&[("b", None), ("c", Some("3")), ("ghost", None)]));
        assert_eq!(handed(), Some(changes(&[("b", None), ("c", Some("3"))])));
        feed.update(desired(&[("a", "1"), ("c", "3")]));
        assert_eq!(handed(), None, "the whole index, unchanged");
        feed.update(desired(&[("c", "4")]));
        assert_eq!(handed(), Some(changes(&[("a", None), ("c", Some("4"))])));
    }

    #[tokio::test]
    async fn oversized_values_are_reported_once_and_keep_the_previous_value() {
        let client = Client::new("http://127.0.0.1:9", None).expect("client");
        let mut feed = Feed::start(client, "dc1");
        let key = "confcast/dc1/configurations/services/s/latest".to_owned();
        assert!(feed.update(desired(&[(&key, "master/a")])).is_empty());
        let huge: Desired = [(key.clone(), vec![b'b'; MAX_VALUE_BYTES + 1])].into();
        let messages = feed.update(huge.clone());
        assert_eq!(messages.len(), 1, "{messages:?}");
        assert!(messages[0].contains(&key) && messages[0].contains("keeps the previous value"), "{}", messages[0]);
        assert_eq!(feed.sent.get(&key), Some(&b"master/a".to_vec()));
        assert!(feed.update(huge).is_empty(), "reported once");
        assert!(feed.update(desired(&[(&key, "master/c")])).is_empty());
        assert_eq!(feed.sent.get(&key), Some(&b"master/c".to_vec()));
    }
}
