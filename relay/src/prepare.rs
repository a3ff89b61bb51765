//! A service's new state, prepared from the mirror: the update (the diff from the
//! commit last published for it, or the whole tree when there is none to start from),
//! the snapshot that names the new tree, and the git objects of the new tree that the
//! bus does not hold yet. Only subtrees whose ids changed are read
//! ([`crate::objects::compare`]), so the work follows the change, not the tree.
//! Contents too large to travel inline are set apart for the blob store. A tree that
//! would write outside its service's directory is refused ([`BadTree`]). Blocking:
//! reads the mirror, so the relay runs it off the async runtime.

use std::collections::BTreeMap;

use confcast_schemas::message::now_ms;
use confcast_schemas::message::CommitAbout;
use confcast_schemas::path::{self, PathError};
use confcast_schemas::{
    ChangeKind, Entry, FileMode, ServiceHead, ServiceId, ServiceUpdate, SNAPSHOT_BY_OBJECTS, WIRE_VERSION,
};
use gix::ObjectId;
use serde_bytes::ByteBuf;

use crate::bus::{blob_object, INLINE_LIMIT};
use crate::cause::Cause;
use crate::diff::{diff, Item, Listing};
use crate::mirror::{Mirror, MirrorError};
use crate::objects::{compare, TreeChange};
use crate::resolve::Target;

/// A service's new state, ready to publish.
pub(crate) struct Prepared {
    /// What hosts that follow the service apply.
    pub(crate) update: ServiceUpdate,
    /// What a host that resyncs starts from: the new tree's id, whose objects are
    /// `objects` and those the bus already holds.
    pub(crate) snapshot: ServiceUpdate,
    /// Contents too large to travel inline: (blob id, bytes).
    pub(crate) large: Vec<(ObjectId, Vec<u8>)>,
    /// Git objects of the new tree the bus does not hold yet, root last.
    pub(crate) objects: Vec<(ObjectId, Vec<u8>)>,
    /// Objects of the old tree the new one replaced (see [`crate::reclaim`]).
    pub(crate) replaced: usize,
    /// The commit as people know it, for the head; `None` if it could not be read.
    pub(crate) about: Option<CommitAbout>,
}

/// Why a service's new state cannot be prepared.
#[derive(Debug, thiserror::Error)]
pub(crate) enum PrepareError {
    /// The mirror could not be read: retried.
    #[error(transparent)]
    Mirror(#[from] MirrorError),
    /// The tree is unsafe: never published, reported.
    #[error(transparent)]
    BadTree(Box<BadTree>),
}

impl From<BadTree> for PrepareError {
    fn from(bad: BadTree) -> Self {
        PrepareError::BadTree(Box::new(bad))
    }
}

/// A tree with a path or a link that leaves its service's directory.
#[derive(Debug, thiserror::Error)]
#[error("{} {:?} at {commit} ({ref_name}): {source}; not published", service.kind, service.name)]
pub(crate) struct BadTree {
    /// The service.
    pub(crate) service: ServiceId,
    /// The commit whose tree it is.
    pub(crate) commit: ObjectId,
    /// The ref it was resolved through.
    ref_name: String,
    /// What is wrong.
    #[source]
    source: PathError,
}

/// Builds the update of one service from its last published commit (`head`; none, or
/// a commit the mirror no longer has, publishes the whole tree), its snapshot, and the
/// objects to store. `head` must be a commit whose objects the bus holds in full: the
/// caller passes none when it does not know that. Blocking: reads the mirror.
pub(crate) fn prepare(
    mirror: &Mirror,
    dc: &str,
    cause: &Cause,
    service: &ServiceId,
    target: &Target,
    head: Option<&ServiceHead>,
) -> Result<Prepared, PrepareError> {
    let tree = mirror.tree_of(&target.commit)?;
    let bad =
        |source| BadTree { service: service.clone(), commit: target.commit, ref_name: target.ref_name.clone(), source };
    // Diff against what was last published, if the mirror still has it; otherwise
    // (a new service, or a mirror rebuilt from scratch) the update is a full tree.
    let base = head
        .and_then(|h| h.commit.as_deref())
        .and_then(|commit| ObjectId::from_hex(commit.as_bytes()).ok())
        .and_then(|commit| mirror.tree_of(&commit).ok().map(|tree| (commit, tree)));
    let change = compare(mirror, base.map(|(_, tree)| tree), tree)?;
    // Containment: every new path is checked; the links of the whole tree are judged
    // again only when a link changed (or nothing was published before): a change that
    // touches no link cannot change where any link leads.
    for p in change.new.keys() {
        path::check_relative(p).map_err(&bad)?;
    }
    let links = if base.is_none() || change.links_changed {
        checked_links(mirror, &mirror.listing(&target.commit)?, bad)?
    } else {
        BTreeMap::new()
    };
    let TreeChange { old, new, objects, replaced, .. } = change;
    let changes = diff(&old, &new);
    let known: BTreeMap<ObjectId, &[u8]> = objects.iter().map(|(id, data)| (*id, data.as_slice())).collect();
    let mut contents = Contents { mirror, links, known, large: Vec::new() };
    let mut entries = Vec::with_capacity(changes.len());
    for c in &changes {
        entries.push(contents.entry(&c.path, c.kind, c.item, c.from_path.clone())?);
    }
    let large = contents.large;
    let update = ServiceUpdate {
        v: WIRE_VERSION,
        dc: dc.to_owned(),
        kind: service.kind,
        name: service.name.clone(),
        ref_name: target.ref_name.clone(),
        branch: target.branch.clone(),
        version: target.version.clone(),
        snapshot: base.is_none(),
        from: base.map(|(commit, _)| commit.to_string()),
        to: Some(target.commit.to_string()),
        tree: Some(tree.to_string()),
        entries,
        event_seq: cause.event_seq,
        pushed_at_ms: cause.pushed_at_ms,
        published_at_ms: now_ms(),
        staged: false,
    };
    let snapshot =
        ServiceUpdate { v: SNAPSHOT_BY_OBJECTS, from: None, snapshot: true, entries: Vec::new(), ..update.clone() };
    let about = match mirror.about(&target.commit) {
        Ok((subject, author, authored_secs)) => Some(CommitAbout {
            subject,
            author,
            authored_ms: u64::try_from(authored_secs).unwrap_or(0).saturating_mul(1000),
            pushed_ms: cause.pushed_at_ms,
        }),
        Err(e) => {
            tracing::warn!(commit = %target.commit, error = %e, "cannot read the commit's subject and author");
            None
        }
    };
    Ok(Prepared { update, snapshot, large, objects, replaced, about })
}

/// Checks that no path of the tree leaves it, and that no link does. Containment is a
/// property of the whole tree (a link can leave through another one), so every link
/// is gathered first and judged once; files need only their path. Returns the links'
/// targets by blob, read on the way.
fn checked_links(
    mirror: &Mirror,
    listing: &Listing,
    bad: impl Fn(PathError) -> BadTree,
) -> Result<BTreeMap<ObjectId, Vec<u8>>, PrepareError> {
    let mut contents = BTreeMap::new();
    let mut links = path::Links::new();
    for (p, item) in listing {
        path::check_relative(p).map_err(&bad)?;
        if item.mode == FileMode::Symlink {
            let link = mirror.blob(&item.blob)?;
            links.insert(p.clone(), link.clone());
            contents.insert(item.blob, link);
        }
    }
    links.check().map_err(&bad)?;
    Ok(contents)
}

/// The contents of the entries of one service's update.
struct Contents<'a> {
    mirror: &'a Mirror,
    /// Contents already read: the links'.
    links: BTreeMap<ObjectId, Vec<u8>>,
    /// Contents already read: the new objects'.
    known: BTreeMap<ObjectId, &'a [u8]>,
    /// Contents that go to the blob store, each once.
    large: Vec<(ObjectId, Vec<u8>)>,
}

impl Contents<'_> {
    /// The entry of one change: added and modified files carry their content inline, or
    /// name it in the blob store when it is larger than [`INLINE_LIMIT`].
    fn entry(
        &mut self,
        path: &[u8],
        change: ChangeKind,
        item: Option<Item>,
        from_path: Option<Vec<u8>>,
    ) -> Result<Entry, MirrorError> {
        let (mut content, mut object) = (None, None);
        if let (Some(item), ChangeKind::Add | ChangeKind::Modify) = (item, change) {
            let bytes = match (self.known.get(&item.blob), self.links.get(&item.blob)) {
                (Some(bytes), _) => bytes.to_vec(),
                (None, Some(bytes)) => bytes.clone(),
                (None, None) => self.mirror.blob(&item.blob)?,
            };
            if bytes.len() > INLINE_LIMIT {
                object = Some(blob_object(&item.blob));
                if !self.large.iter().any(|(blob, _)| *blob == item.blob) {
                    self.large.push((item.blob, bytes));
                }
            } else {
                content = Some(ByteBuf::from(bytes));
            }
        }
        Ok(Entry {
            path: ByteBuf::from(path.to_vec()),
            change,
            mode: item.map(|i| i.mode),
            blob: item.map(|i| i.blob.to_string()),
            content,
            object,
            from_path: from_path.map(ByteBuf::from),
        })
    }
}
