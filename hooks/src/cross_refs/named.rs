//! What a pushed control document names must exist once the push is done: the
//! configuration a `datacenter.json` follows and what its inventory lists, the branch or
//! tag of every pin of a `datacenter-configuration.json`.

use std::collections::{btree_map::Entry, BTreeMap, BTreeSet};

use confcast_schemas::document::{CONFIGURATION_FILE, DATACENTER_FILE};
use confcast_schemas::refs::{self, CONFIGURATION_BRANCHES, CONFIGURATION_NAMESPACE, CONFIGURATION_TAGS, HEADS, TAGS};
use confcast_schemas::{DatacenterConfiguration, DatacenterDoc, Kind};
use git2::Oid;

use super::unresolved::Unresolved;
use super::{configuration_at, rejection, unreadable};
use crate::after_push::AfterPush;
use crate::suggest::{did_you_mean, nearest};
use crate::Rejection;

pub(super) fn check_datacenter(master: &AfterPush<'_>, ref_name: &str, new: Oid) -> Result<(), Vec<Rejection>> {
    let bytes = master.root_file(new, DATACENTER_FILE).map_err(unreadable(ref_name))?;
    let Some(doc) = bytes.and_then(|b| DatacenterDoc::parse(&b).ok()) else {
        return Ok(());
    };
    let Ok(conf_ref) = doc.conf_ref() else {
        return Ok(());
    };
    let conf = match configuration_at(master, &conf_ref).map_err(unreadable(&conf_ref))? {
        Some(Ok(conf)) => conf,
        // Pushed along with this document: its own check names what is wrong with it.
        Some(Err(_)) if master.pushes(&conf_ref) => return Ok(()),
        Some(Err(error)) => {
            let error = Unresolved::BadConfiguration { conf: doc.conf.clone(), conf_ref, error };
            return Err(vec![rejection(ref_name, error)]);
        }
        None => {
            let nearest = nearest_configuration(master, &doc.conf)?;
            let error = Unresolved::NoConfiguration { conf: doc.conf.clone(), conf_ref, nearest };
            return Err(vec![rejection(ref_name, error)]);
        }
    };
    let rejections: Vec<Rejection> =
        not_in_configuration(&doc, &conf).into_iter().map(|error| rejection(ref_name, error)).collect();
    if rejections.is_empty() {
        Ok(())
    } else {
        Err(rejections)
    }
}

/// The existing configuration whose name is closest to `conf`, as a `conf` value.
fn nearest_configuration(master: &AfterPush<'_>, conf: &str) -> Result<Option<String>, Vec<Rejection>> {
    let mut existing = master.refs_under(CONFIGURATION_BRANCHES).map_err(unreadable(CONFIGURATION_BRANCHES))?;
    existing.extend(master.refs_under(CONFIGURATION_TAGS).map_err(unreadable(CONFIGURATION_TAGS))?);
    // Compared without the prefix they all share, which would make any two look alike.
    let names: Vec<String> = existing.iter().filter_map(|r| refs::conf_naming(r)).collect();
    let rest = |conf: &'_ str| conf.strip_prefix(CONFIGURATION_NAMESPACE).unwrap_or(conf).to_owned();
    let rests: Vec<String> = names.iter().map(|n| rest(n)).collect();
    Ok(nearest(&rest(conf), rests.iter().map(String::as_str)).map(|n| format!("{CONFIGURATION_NAMESPACE}{n}")))
}

/// Every entry of a host's inventory in `doc` that `conf` does not pin.
fn not_in_configuration(doc: &DatacenterDoc, conf: &DatacenterConfiguration) -> Vec<Unresolved> {
    let mut unresolved = Vec::new();
    for (host, inventory) in &doc.inventories.hosts {
        for (kind, i, name) in inventory.entries() {
            let pinned = || conf.pins(kind).iter().map(|p| p.name.as_str());
            if pinned().any(|p| p == name) {
                continue;
            }
            unresolved.push(Unresolved::NotInConfiguration {
                field: DatacenterDoc::inventory_field(host, kind, i),
                kind,
                name: name.to_owned(),
                conf: doc.conf.clone(),
                nearest: nearest(name, pinned()).map(str::to_owned),
            });
        }
    }
    unresolved
}

pub(super) fn check_configuration(
    master: &AfterPush<'_>,
    ref_name: &str,
    new: Oid,
    notes: &mut Vec<String>,
) -> Result<(), Vec<Rejection>> {
    let bytes = master.root_file(new, CONFIGURATION_FILE).map_err(unreadable(ref_name))?;
    let Some(conf) = bytes.and_then(|b| DatacenterConfiguration::parse(&b).ok()) else {
        return Ok(());
    };
    let mut rejections = Vec::new();
    let mut names_of_kind: BTreeMap<Kind, BTreeSet<String>> = BTreeMap::new();
    for (kind, i, pin) in conf.all_pins() {
        let pinned = pin.ref_name(kind);
        if master.commit_of(&pinned).map_err(unreadable(&pinned))?.is_some() {
            continue;
        }
        let (field, value) = pin.ref_field();
        // The pin's own kind of ref (branches for a branch, tags for a tag) and the other.
        let (prefix, other_prefix) = match field {
            "branch" => (kind.branch_prefix(&pin.name), kind.tag_prefix(&pin.name)),
            _ => (kind.tag_prefix(&pin.name), kind.branch_prefix(&pin.name)),
        };
        let same = master.refs_under(&prefix).map_err(unreadable(&prefix))?;
        let others = master.refs_under(&other_prefix).map_err(unreadable(&other_prefix))?;
        if same.is_empty() && others.is_empty() {
            // A tree not pushed yet: the relay delivers it once it is.
            let names = match names_of_kind.entry(kind) {
                Entry::Occupied(known) => known.into_mut(),
                Entry::Vacant(new) => new.insert(existing_names(master, kind).map_err(unreadable(kind.plural()))?),
            };
            let nearest = nearest(&pin.name, names.iter().map(String::as_str)).map(str::to_owned);
            notes.push(format!(
                "confcast: note: {ref_name}: {CONFIGURATION_FILE}: field `{}`: {kind} {:?} has no branch or tag on \
                 the master yet; it is delivered once {pinned} is pushed{}",
                DatacenterConfiguration::pin_field(kind, i, "name"),
                pin.name,
                did_you_mean(&nearest)
            ));
            continue;
        }
        let candidates: Vec<&str> = same.iter().filter_map(|r| r.strip_prefix(prefix.as_str())).collect();
        let error = Unresolved::NoPinnedRef {
            field: DatacenterConfiguration::pin_field(kind, i, field),
            value: value.to_owned(),
            ref_name: pinned,
            nearest: nearest(value, candidates).map(str::to_owned),
        };
        rejections.push(rejection(ref_name, error));
    }
    if rejections.is_empty() {
        Ok(())
    } else {
        Err(rejections)
    }
}

/// The names of every service (application, device) with a branch or a tag once the
/// push is done.
fn existing_names(master: &AfterPush<'_>, kind: Kind) -> Result<BTreeSet<String>, git2::Error> {
    let mut names = BTreeSet::new();
    for prefix in [format!("{HEADS}{}/", kind.plural()), format!("{TAGS}{}/", kind.plural())] {
        for ref_name in master.refs_under(&prefix)? {
            names.extend(Kind::of_ref(&ref_name).map(|(_, name)| name.to_owned()));
        }
    }
    Ok(names)
}
