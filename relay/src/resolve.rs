//! Resolution: what a datacenter runs, as `{ service → (ref, commit) }`.
//!
//! `refs/heads/datacenters/<dc>` → `datacenter.json` → `conf` → the configuration's
//! pins → each pin's branch head or tag. Pure logic over [`RefSource`], so it is tested
//! on maps as well as on the relay's real mirror.

use std::collections::{BTreeMap, BTreeSet};

use confcast_schemas::document::{HostInventory, CONFIGURATION_FILE, DATACENTER_FILE};
use confcast_schemas::rollout::Policy;
use confcast_schemas::{refs, DatacenterConfiguration, DatacenterDoc, DocumentError, Kind, ServiceId};
use gix::ObjectId;

use crate::mirror::MirrorError;

/// Read access to the refs and files the resolution needs.
pub trait RefSource {
    /// The commit a ref points at (annotated tags peeled), if the ref exists.
    fn commit_of(&self, ref_name: &str) -> Result<Option<ObjectId>, MirrorError>;
    /// A file at the root of a commit's tree, if present.
    fn root_file(&self, commit: &ObjectId, file: &str) -> Result<Option<Vec<u8>>, MirrorError>;
}

/// What a configuration pins a service to: a branch head or a tag, whether or not the
/// ref exists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pin {
    /// The ref followed (branch head or tag).
    pub ref_name: String,
    /// Branch named by the pin.
    pub branch: String,
    /// Tag named by the pin, or `latest`.
    pub version: String,
    /// How a change of it rolls out; `None`: every host at once.
    pub policy: Option<Policy>,
}

impl Pin {
    /// Where the pin leads in `source`: its target, or `None` when its ref does not exist.
    pub fn follow(&self, source: &impl RefSource) -> Result<Option<Target>, MirrorError> {
        Ok(source.commit_of(&self.ref_name)?.map(|commit| self.at(commit)))
    }

    /// The target of this pin at `commit`.
    pub fn at(&self, commit: ObjectId) -> Target {
        Target {
            ref_name: self.ref_name.clone(),
            branch: self.branch.clone(),
            version: self.version.clone(),
            policy: self.policy.clone(),
            commit,
        }
    }
}

/// Where one service of the datacenter resolves to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The ref followed (branch head or tag).
    pub ref_name: String,
    /// Branch named by the pin.
    pub branch: String,
    /// Tag named by the pin, or `latest`.
    pub version: String,
    /// How a change of it rolls out; `None`: every host at once.
    pub policy: Option<Policy>,
    /// The commit it resolves to.
    pub commit: ObjectId,
}

impl Target {
    /// The pin this target follows.
    pub fn pin(&self) -> Pin {
        Pin {
            ref_name: self.ref_name.clone(),
            branch: self.branch.clone(),
            version: self.version.clone(),
            policy: self.policy.clone(),
        }
    }
}

/// A complete, good resolution (individual pins may still be unresolvable).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolution {
    /// The configuration ref the datacenter follows.
    pub conf_ref: String,
    /// Services that resolved.
    pub targets: BTreeMap<ServiceId, Target>,
    /// Pins whose ref does not exist: these keep what was last published.
    pub unresolved: BTreeMap<ServiceId, Pin>,
    /// Hosts and what they run.
    pub hosts: BTreeMap<String, HostInventory>,
    /// The datacenters a commit must have completed its rollout in before this one
    /// starts it (`datacenter.json`'s `rollout.after`).
    pub after: Vec<String>,
}

/// Why a datacenter cannot be resolved at all; the last good resolution stays.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    /// `refs/heads/datacenters/<dc>` does not exist.
    #[error("{0} does not exist on the master")]
    NoDatacenter(String),
    /// A control document is missing from its ref.
    #[error("{ref_name}: {file} is missing")]
    MissingDocument {
        /// The ref.
        ref_name: String,
        /// The file.
        file: &'static str,
    },
    /// A control document does not validate.
    #[error("{ref_name}: {error}")]
    BadDocument {
        /// The ref.
        ref_name: String,
        /// What is wrong.
        error: DocumentError,
    },
    /// `conf` names a configuration that does not exist.
    #[error("{dc_ref}: datacenter.json: field `conf`: {conf_ref} does not exist on the master")]
    NoConfiguration {
        /// The datacenter ref.
        dc_ref: String,
        /// The missing ref.
        conf_ref: String,
    },
    /// Reading the mirror failed.
    #[error("reading the mirror")]
    Mirror(#[from] MirrorError),
}

impl ResolveError {
    /// Only mirror read failures are worth retrying; the others wait for a new push.
    pub fn is_transient(&self) -> bool {
        matches!(self, ResolveError::Mirror(_))
    }
}

/// A resolution attempt and the refs it depends on, known even when it failed, so the
/// relay knows which pushes can change it.
#[derive(Debug)]
pub struct Resolved {
    /// Every ref read or named along the way.
    pub watched: BTreeSet<String>,
    /// The result.
    pub outcome: Result<Resolution, ResolveError>,
}

/// The ref holding a datacenter's document.
pub fn datacenter_ref(dc: &str) -> String {
    format!("{}{dc}", refs::DATACENTER_BRANCHES)
}

/// Resolves datacenter `dc` from `source`.
pub fn resolve(dc: &str, source: &impl RefSource) -> Resolved {
    let mut watched = BTreeSet::new();
    let outcome = resolve_into(dc, source, &mut watched);
    Resolved { watched, outcome }
}

fn read_document(source: &impl RefSource, ref_name: &str, file: &'static str) -> Result<Option<Vec<u8>>, ResolveError> {
    let Some(commit) = source.commit_of(ref_name)? else {
        return Ok(None);
    };
    match source.root_file(&commit, file)? {
        Some(bytes) => Ok(Some(bytes)),
        None => Err(ResolveError::MissingDocument { ref_name: ref_name.to_owned(), file }),
    }
}

fn resolve_into(dc: &str, source: &impl RefSource, watched: &mut BTreeSet<String>) -> Result<Resolution, ResolveError> {
    let dc_ref = datacenter_ref(dc);
    watched.insert(dc_ref.clone());
    let bytes =
        read_document(source, &dc_ref, DATACENTER_FILE)?.ok_or_else(|| ResolveError::NoDatacenter(dc_ref.clone()))?;
    let bad = |ref_name: &str| {
        let ref_name = ref_name.to_owned();
        move |error| ResolveError::BadDocument { ref_name, error }
    };
    let doc = DatacenterDoc::parse(&bytes).map_err(bad(&dc_ref))?;
    let conf_ref = doc.conf_ref().map_err(bad(&dc_ref))?;
    watched.insert(conf_ref.clone());
    let bytes = read_document(source, &conf_ref, CONFIGURATION_FILE)?
        .ok_or_else(|| ResolveError::NoConfiguration { dc_ref: dc_ref.clone(), conf_ref: conf_ref.clone() })?;
    let conf = DatacenterConfiguration::parse(&bytes).map_err(bad(&conf_ref))?;

    let mut targets = BTreeMap::new();
    let mut unresolved = BTreeMap::new();
    for kind in Kind::ALL {
        for entry in conf.pins(kind) {
            let pin = Pin {
                ref_name: entry.ref_name(kind),
                branch: entry.branch.clone(),
                version: entry.version().to_owned(),
                policy: conf.policy_of(entry).cloned(),
            };
            watched.insert(pin.ref_name.clone());
            let service = ServiceId::new(kind, entry.name.clone());
            match pin.follow(source)? {
                Some(target) => {
                    targets.insert(service, target);
                }
                None => {
                    unresolved.insert(service, pin);
                }
            }
        }
    }
    let after = doc.rollout.map(|r| r.after).unwrap_or_default();
    Ok(Resolution { conf_ref, targets, unresolved, hosts: doc.inventories.hosts, after })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A commit id named for what it stands for (`s0-v1`): the name's bytes, padded.
    pub(crate) fn commit(name: &str) -> ObjectId {
        let mut bytes = [0u8; 20];
        bytes[..name.len()].copy_from_slice(name.as_bytes());
        ObjectId::from(bytes)
    }

    /// A map-backed [`RefSource`]: `refs` maps ref → commit, `files` (commit, file) → bytes.
    #[derive(Default)]
    pub(crate) struct Fake {
        pub(crate) refs: BTreeMap<String, ObjectId>,
        pub(crate) files: BTreeMap<(ObjectId, String), Vec<u8>>,
    }

    impl Fake {
        pub(crate) fn with(mut self, ref_name: &str, name: &str, file: Option<(&str, &str)>) -> Self {
            self.refs.insert(ref_name.into(), commit(name));
            if let Some((file, body)) = file {
                self.files.insert((commit(name), file.into()), body.as_bytes().to_vec());
            }
            self
        }
    }

    impl RefSource for Fake {
        fn commit_of(&self, ref_name: &str) -> Result<Option<ObjectId>, MirrorError> {
            Ok(self.refs.get(ref_name).copied())
        }
        fn root_file(&self, commit: &ObjectId, file: &str) -> Result<Option<Vec<u8>>, MirrorError> {
            Ok(self.files.get(&(*commit, file.to_owned())).cloned())
        }
    }

    fn master() -> Fake {
        Fake::default()
            .with(
                "refs/heads/datacenters/dc1",
                "d1",
                Some((
                    DATACENTER_FILE,
                    r#"{"conf":"datacenter-configuration/big/v1","inventories":{"hosts":{"h":{"services":["s0"]}}}}"#,
                )),
            )
            .with(
                "refs/tags/datacenter-configuration/big/v1",
                "c1",
                Some((
                    CONFIGURATION_FILE,
                    r#"{"services":[{"name":"s0","branch":"master","tag":"v1.0"},{"name":"s1","branch":"exp"}],
                        "applications":[{"name":"app","branch":"main"}]}"#,
                )),
            )
            .with("refs/tags/services/s0/v1.0", "s0-v1", None)
            .with("refs/heads/services/s0/master", "s0-head", None)
            .with("refs/heads/services/s1/exp", "s1-head", None)
    }

    #[test]
    fn follows_datacenter_conf_and_pins() {
        let resolved = resolve("dc1", &master());
        let res = resolved.outcome.expect("resolves");
        assert_eq!(res.conf_ref, "refs/tags/datacenter-configuration/big/v1");
        assert_eq!(res.targets[&ServiceId::service("s0")].commit, commit("s0-v1"), "tag pin, not the branch head");
        assert_eq!(res.targets[&ServiceId::service("s0")].version, "v1.0");
        assert_eq!(res.targets[&ServiceId::service("s1")].commit, commit("s1-head"), "latest follows the branch");
        assert_eq!(
            res.unresolved[&ServiceId::new(Kind::Application, "app")].ref_name,
            "refs/heads/applications/app/main"
        );
        assert!(resolved.watched.contains("refs/heads/applications/app/main"), "a missing pin is still watched");
        assert!(!resolved.watched.contains("refs/heads/services/s0/master"), "the branch of a tag pin is not watched");
        assert_eq!(res.hosts["h"].services, vec!["s0".to_owned()]);
    }

    #[test]
    fn conf_can_follow_a_branch() {
        let fake = master()
            .with(
                "refs/heads/datacenters/dc2",
                "d2",
                Some((DATACENTER_FILE, r#"{"conf":"datacenter-configuration/small"}"#)),
            )
            .with(
                "refs/heads/datacenter-configuration/small",
                "c2",
                Some((CONFIGURATION_FILE, r#"{"services":[{"name":"s0","branch":"master"}]}"#)),
            );
        let res = resolve("dc2", &fake).outcome.expect("resolves");
        assert_eq!(res.targets[&ServiceId::service("s0")].commit, commit("s0-head"));
    }

    #[test]
    fn failures_name_what_is_wrong_and_keep_watching() {
        let missing_dc = resolve("nowhere", &master());
        assert_eq!(
            missing_dc.outcome.expect_err("no dc").to_string(),
            "refs/heads/datacenters/nowhere does not exist on the master"
        );
        assert!(missing_dc.watched.contains("refs/heads/datacenters/nowhere"));

        let fake = master().with(
            "refs/heads/datacenters/dc3",
            "d3",
            Some((DATACENTER_FILE, r#"{"conf":"datacenter-configuration/none"}"#)),
        );
        let resolved = resolve("dc3", &fake);
        assert_eq!(
            resolved.outcome.expect_err("no conf").to_string(),
            "refs/heads/datacenters/dc3: datacenter.json: field `conf`: refs/heads/datacenter-configuration/none does not exist on the master"
        );
        assert!(
            resolved.watched.contains("refs/heads/datacenter-configuration/none"),
            "creating it later must trigger"
        );

        let fake = master().with("refs/heads/datacenters/dc4", "d4", Some((DATACENTER_FILE, "{ nope")));
        let e = resolve("dc4", &fake).outcome.expect_err("bad json");
        assert!(e.to_string().starts_with("refs/heads/datacenters/dc4: datacenter.json: key must be a string"), "{e}");

        let fake = master().with("refs/heads/datacenters/dc5", "d5", None);
        assert_eq!(
            resolve("dc5", &fake).outcome.expect_err("no file").to_string(),
            "refs/heads/datacenters/dc5: datacenter.json is missing"
        );
    }
}
