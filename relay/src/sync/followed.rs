//! The datacenter's last good resolution, kept between syncs with the services pinned
//! to each ref, so that a push of pinned refs alone moves only the services pinned to
//! them ([`Followed::advance`]) instead of resolving the whole datacenter again.
//!
//! What the datacenter runs, its pins and its inventory come from its document and its
//! configuration, which the relay's mirror only changes in a full resolution (that is
//! where they are fetched): so while a sync fetches nothing but pinned refs, moving the
//! services of those refs gives exactly what resolving everything again would. A push
//! of anything else is not covered ([`Followed::covers`]) and takes a full resolution.
//! Pure logic over [`RefSource`], like [`crate::resolve`].

use std::collections::{BTreeMap, BTreeSet};

use confcast_schemas::ServiceId;

use crate::mirror::MirrorError;
use crate::resolve::{datacenter_ref, Pin, RefSource, Resolution};

/// The last good resolution and, for every ref it pins, the services pinned to it.
#[derive(Debug)]
pub(crate) struct Followed {
    resolution: Resolution,
    /// The datacenter's document: a push of it always resolves fully.
    dc_ref: String,
    /// Every pinned ref, resolved or not, with the services pinned to it and how.
    pins: BTreeMap<String, Vec<(ServiceId, Pin)>>,
}

impl Followed {
    /// Datacenter `dc`'s good `resolution`, as a full resolution found it.
    pub(crate) fn new(dc: &str, resolution: Resolution) -> Followed {
        let mut pins: BTreeMap<String, Vec<(ServiceId, Pin)>> = BTreeMap::new();
        let resolved = resolution.targets.iter().map(|(service, target)| (service, target.pin()));
        let unresolved = resolution.unresolved.iter().map(|(service, pin)| (service, pin.clone()));
        for (service, pin) in resolved.chain(unresolved) {
            pins.entry(pin.ref_name.clone()).or_default().push((service.clone(), pin));
        }
        Followed { resolution, dc_ref: datacenter_ref(dc), pins }
    }

    /// The resolution, as the last [`Followed::advance`] left it.
    pub(crate) fn resolution(&self) -> &Resolution {
        &self.resolution
    }

    /// Whether a push of `refs` can only move pinned services: every ref is pinned, and
    /// none is the datacenter's document or its configuration.
    pub(crate) fn covers(&self, refs: &BTreeSet<String>) -> bool {
        !refs.is_empty()
            && refs.iter().all(|r| *r != self.dc_ref && *r != self.resolution.conf_ref && self.pins.contains_key(r))
    }

    /// Reads `refs` again from `source` and moves the services pinned to them to where
    /// the refs now lead, or among the unresolved when a ref is gone. Returns those
    /// services, moved or not: what to publish is judged against what was published,
    /// which a failed publish leaves behind the resolution.
    pub(crate) fn advance(
        &mut self,
        refs: &BTreeSet<String>,
        source: &impl RefSource,
    ) -> Result<BTreeSet<ServiceId>, MirrorError> {
        let mut services = BTreeSet::new();
        for ref_name in refs {
            let Some(pinned) = self.pins.get(ref_name) else { continue };
            let commit = source.commit_of(ref_name)?;
            for (service, pin) in pinned {
                match commit {
                    Some(commit) => {
                        self.resolution.unresolved.remove(service);
                        self.resolution.targets.insert(service.clone(), pin.at(commit));
                    }
                    None => {
                        self.resolution.targets.remove(service);
                        self.resolution.unresolved.insert(service.clone(), pin.clone());
                    }
                }
                services.insert(service.clone());
            }
        }
        Ok(services)
    }
}

#[cfg(test)]
mod tests {
    use confcast_schemas::document::{CONFIGURATION_FILE, DATACENTER_FILE};

    use super::*;
    use crate::resolve::resolve;
    use crate::resolve::tests::{commit, Fake};

    const S0: &str = "refs/heads/services/s0/master";
    const S1: &str = "refs/tags/services/s1/v1";
    const S2: &str = "refs/heads/services/s2/main";
    const CONF: &str = "refs/heads/datacenter-configuration/big";

    fn master() -> Fake {
        Fake::default()
            .with(
                "refs/heads/datacenters/dc1",
                "d1",
                Some((DATACENTER_FILE, r#"{"conf":"datacenter-configuration/big"}"#)),
            )
            .with(
                CONF,
                "c1",
                Some((
                    CONFIGURATION_FILE,
                    r#"{"services":[{"name":"s0","branch":"master"},{"name":"s1","branch":"master","tag":"v1"},
                                    {"name":"s2","branch":"main"}]}"#,
                )),
            )
            .with(S0, "s0-a", None)
            .with(S1, "s1-a", None)
    }

    fn followed(fake: &Fake) -> Followed {
        Followed::new("dc1", resolve("dc1", fake).outcome.expect("resolves"))
    }

    fn refs(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|r| r.to_string()).collect()
    }

    #[test]
    fn only_pinned_refs_are_covered() {
        let followed = followed(&master());
        assert!(followed.covers(&refs(&[S0])));
        assert!(followed.covers(&refs(&[S0, S1, S2])), "a missing pin is followed too");
        assert!(!followed.covers(&refs(&[S0, CONF])), "the configuration resolves fully");
        assert!(!followed.covers(&refs(&["refs/heads/datacenters/dc1"])), "the document resolves fully");
        assert!(!followed.covers(&refs(&["refs/heads/services/s1/master"])), "the branch of a tag pin is not pinned");
        assert!(!followed.covers(&refs(&[])));
    }

    #[test]
    fn advancing_moves_only_the_pushed_services_and_matches_a_full_resolution() {
        let mut fake = master();
        let mut followed = followed(&fake);
        fake = fake.with(S0, "s0-b", None).with(S1, "s1-b", None);
        let moved = followed.advance(&refs(&[S0]), &fake).expect("advances");
        assert_eq!(moved, [ServiceId::service("s0")].into());
        let res = followed.resolution();
        assert_eq!(res.targets[&ServiceId::service("s0")].commit, commit("s0-b"));
        assert_eq!(res.targets[&ServiceId::service("s1")].commit, commit("s1-a"), "s1 was not pushed");

        followed.advance(&refs(&[S1]), &fake).expect("advances");
        assert_eq!(followed.resolution(), &resolve("dc1", &fake).outcome.expect("resolves"));
    }

    #[test]
    fn refs_that_come_and_go_move_their_services_in_and_out_of_the_unresolved() {
        let mut fake = master();
        let mut followed = followed(&fake);
        assert_eq!(followed.resolution().unresolved[&ServiceId::service("s2")].ref_name, S2);

        fake = fake.with(S2, "s2-a", None);
        fake.refs.remove(S0);
        let moved = followed.advance(&refs(&[S0, S2]), &fake).expect("advances");
        assert_eq!(moved, [ServiceId::service("s0"), ServiceId::service("s2")].into());
        let res = followed.resolution();
        let target = &res.targets[&ServiceId::service("s2")];
        assert_eq!(
            (target.commit, target.branch.as_str(), target.version.as_str()),
            (commit("s2-a"), "main", "latest")
        );
        assert_eq!(res.unresolved[&ServiceId::service("s0")].ref_name, S0);
        assert!(!res.targets.contains_key(&ServiceId::service("s0")));
        assert_eq!(res, &resolve("dc1", &fake).outcome.expect("resolves"));
    }
}
