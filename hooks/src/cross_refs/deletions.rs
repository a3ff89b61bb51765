//! A push that deletes a branch, tag or configuration some datacenter still pins or
//! follows is refused, unless the pusher says they mean it ([`ALLOW_UNPIN`]).

use std::collections::{btree_map::Entry, BTreeMap, BTreeSet};

use confcast_schemas::document::{CONFIGURATION_FILE, DATACENTER_FILE};
use confcast_schemas::refs::{self, DATACENTER_BRANCHES};
use confcast_schemas::{DatacenterConfiguration, DatacenterDoc};

use super::unresolved::{datacenters, Unresolved};
use super::{configuration_at, rejection, Verdict};
use crate::after_push::AfterPush;
use crate::push_options::{PushOptions, ALLOW_UNPIN};
use crate::Rejection;

/// Where a deleted ref is still named: (deleted ref, document ref, file, field, value).
type Naming<'d> = (&'d str, String, &'static str, String, String);

/// Finds every datacenter that pins or follows a ref the push deletes: reads each
/// datacenter's document as the push leaves it, and the configuration it follows (each
/// configuration once). Datacenters whose documents do not resolve are passed over: the
/// relay already keeps their last good state.
pub(super) fn check_deletions(
    master: &AfterPush<'_>,
    deleted: &BTreeSet<&str>,
    options: &PushOptions,
    verdict: &mut Verdict,
) -> Result<(), Rejection> {
    let git = |ref_name: &str| {
        let ref_name = ref_name.to_owned();
        move |error| Rejection::Git { ref_name, error }
    };
    let mut configurations: BTreeMap<String, Option<DatacenterConfiguration>> = BTreeMap::new();
    let mut namings: BTreeMap<Naming<'_>, Vec<String>> = BTreeMap::new();
    for dc_ref in master.refs_under(DATACENTER_BRANCHES).map_err(git(DATACENTER_BRANCHES))? {
        let Some(dc) = refs::datacenter_of(&dc_ref).map(str::to_owned) else { continue };
        let Some(commit) = master.commit_of(&dc_ref).map_err(git(&dc_ref))? else { continue };
        let bytes = master.root_file(commit, DATACENTER_FILE).map_err(git(&dc_ref))?;
        let Some(doc) = bytes.and_then(|b| DatacenterDoc::parse(&b).ok()) else { continue };
        let Ok(conf_ref) = doc.conf_ref() else { continue };
        if let Some(gone) = deleted.get(conf_ref.as_str()) {
            let naming = (*gone, dc_ref.clone(), DATACENTER_FILE, "conf".to_owned(), doc.conf.clone());
            namings.entry(naming).or_default().push(dc);
            continue;
        }
        let conf = match configurations.entry(conf_ref.clone()) {
            Entry::Occupied(known) => known.into_mut(),
            Entry::Vacant(new) => {
                new.insert(configuration_at(master, &conf_ref).map_err(git(&conf_ref))?.and_then(Result::ok))
            }
        };
        let Some(conf) = conf else { continue };
        for (kind, i, pin) in conf.all_pins() {
            if let Some(gone) = deleted.get(pin.ref_name(kind).as_str()) {
                let (field, value) = pin.ref_field();
                let field = DatacenterConfiguration::pin_field(kind, i, field);
                let naming = (*gone, conf_ref.clone(), CONFIGURATION_FILE, field, value.to_owned());
                namings.entry(naming).or_default().push(dc.clone());
            }
        }
    }
    for ((gone, doc_ref, file, field, value), dcs) in namings {
        if options.allow_unpin {
            let (keep, their) = if dcs.len() == 1 { ("keeps", "its") } else { ("keep", "their") };
            verdict.notes.push(format!(
                "confcast: note: deleting {gone} as asked ({ALLOW_UNPIN}): {file} in {doc_ref}: field `{field}`: \
                 {value:?} still names it; {} {keep} what {their} hosts have until that changes",
                datacenters(&dcs)
            ));
        } else {
            let error = Unresolved::Pinned { doc_ref, file, field, value, datacenters: dcs };
            verdict.rejections.push(rejection(gone, error));
        }
    }
    Ok(())
}
