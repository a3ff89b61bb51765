//! The fallback when the datacenter cannot be resolved (a bad document that bypassed
//! pre-receive): every service stays on the ref it was last published from, and those
//! refs keep flowing, so one bad document does not freeze the datacenter.

use std::collections::{BTreeMap, BTreeSet};

use confcast_schemas::rollout::Policy;
use confcast_schemas::{ServiceHead, ServiceId};

use super::Datacenter;
use crate::error::SyncError;
use crate::mirror::{Mirror, MirrorError};
use crate::resolve::{Pin, Resolution};

impl Datacenter {
    /// The last good pins: the published heads. Their refs stay watched, with those of
    /// the failed resolution, whose repair must trigger a sync.
    pub(super) async fn last_good(
        &mut self,
        watched: BTreeSet<String>,
        fetched: &BTreeSet<String>,
    ) -> Result<Resolution, SyncError> {
        let heads: Vec<ServiceHead> = self.heads.values().filter(|h| h.commit.is_some()).cloned().collect();
        let fallback_refs: BTreeSet<String> = heads.iter().map(|h| h.ref_name.clone()).collect();
        let missing: BTreeSet<String> =
            fallback_refs.iter().filter(|r| !self.watched.contains(*r) && !fetched.contains(*r)).cloned().collect();
        if !missing.is_empty() {
            self.fetch(missing).await?;
        }
        self.watched = watched.into_iter().chain(fallback_refs).collect();
        let (policies, after) = (self.policies.clone(), self.after.clone());
        self.blocking(move |m| Ok(last_good(&m, &heads, &policies, after)?)).await
    }
}

/// The last good resolution, rebuilt from the published heads: each service stays on
/// the ref it was published from, at that ref's current commit, and rolls out as the
/// last good resolution said (`policies`, `after`): a bad document does not make a
/// staged service's next push reach every host at once.
fn last_good(
    mirror: &Mirror,
    heads: &[ServiceHead],
    policies: &BTreeMap<ServiceId, Policy>,
    after: Vec<String>,
) -> Result<Resolution, MirrorError> {
    let mut resolution = Resolution {
        conf_ref: String::new(),
        targets: BTreeMap::new(),
        unresolved: BTreeMap::new(),
        hosts: BTreeMap::new(),
        after,
    };
    for head in heads {
        let pin = Pin {
            ref_name: head.ref_name.clone(),
            branch: head.branch.clone(),
            version: head.version.clone(),
            policy: policies.get(&head.service()).cloned(),
        };
        match pin.follow(mirror)? {
            Some(target) => {
                resolution.targets.insert(head.service(), target);
            }
            None => {
                resolution.unresolved.insert(head.service(), pin);
            }
        }
    }
    Ok(resolution)
}
