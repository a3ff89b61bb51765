//! pre-receive's check of what the control documents name, against the master as the
//! push would leave it ([`AfterPush`]):
//!
//! * `datacenter.json`: `conf` names a datacenter-configuration branch or tag that
//!   exists, and every service, application and device a host's inventory lists is in
//!   that configuration;
//! * `datacenter-configuration.json`: every pin's branch or tag exists;
//! * a push that deletes a branch or tag some datacenter pins (through the configuration
//!   it follows), or a configuration a datacenter follows, is refused unless the pusher
//!   says they mean it with the push option `confcast.allow-unpin`.
//!
//! A pin of a service, application or device that has no branch and no tag at all yet
//! is let through with a note: configurations are often written before the trees they
//! pin, and the relay delivers such a pin as soon as its ref is pushed. Once a service
//! has refs, a pin to one it does not have is a mistake (`"mastr"`, a tag not pushed yet)
//! and is refused.
//!
//! Cost: a push that holds no control document and deletes nothing reads nothing here.
//! Only a deletion needs to know who pins what, and only then is every datacenter's
//! document read, with the configuration it follows.
//!
//! Every refusal names the ref, the file, the field, the value, and the nearest existing
//! name when one is close ("did you mean `web`?"). The relay checks all of this again
//! (hooks can be bypassed) and keeps the last good state when a reference is broken.

use std::collections::{btree_map::Entry, BTreeMap, BTreeSet};
use std::fmt;

use confcast_schemas::document::{CONFIGURATION_FILE, DATACENTER_FILE};
use confcast_schemas::refs::{self, CONFIGURATION_BRANCHES, CONFIGURATION_TAGS, DATACENTER_BRANCHES};
use confcast_schemas::{DatacenterConfiguration, DatacenterDoc, DocumentError, Kind};
use git2::{Oid, Repository};

use crate::after_push::AfterPush;
use crate::{containment::holds_tree, control_file, RefUpdate, Rejection};

/// How every `conf` value starts.
const CONFIGURATION_PREFIX: &str = "datacenter-configuration/";

/// The push option that lets a push delete a branch, tag or configuration a datacenter
/// still pins: `git push -o confcast.allow-unpin ...`.
///
/// A push option rather than a setting on the master or a marker in a commit: it holds
/// for one push only, so it cannot be left on by mistake; the pusher types it, so no one
/// deletes a pinned ref without having read why it was refused; it needs no access to
/// the master's server; and a deletion has no commit to carry a marker. git passes it
/// only when the master advertises push options (`receive.advertisePushOptions`, which
/// `publisher install-hooks` sets); a server that does not refuses `-o` outright, so
/// the override is never silently dropped.
pub const ALLOW_UNPIN: &str = "confcast.allow-unpin";

/// The push options confcast understands.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PushOptions {
    /// [`ALLOW_UNPIN`] was given.
    pub allow_unpin: bool,
    /// Options under `confcast.` that mean nothing to confcast (typos, most likely).
    pub unknown: Vec<String>,
}

impl PushOptions {
    /// Reads the options of the push from `values` (`GIT_PUSH_OPTION_<i>`). Options
    /// outside `confcast.` belong to other hooks and are left alone.
    pub fn parse(values: impl IntoIterator<Item = String>) -> PushOptions {
        let mut options = PushOptions::default();
        for value in values {
            if value == ALLOW_UNPIN {
                options.allow_unpin = true;
            } else if value.starts_with("confcast.") {
                options.unknown.push(value);
            }
        }
        options
    }

    /// What the pusher is told about the options confcast ignores, whether the push goes
    /// through or not: a mistyped override is most often noticed in a refused push.
    pub fn notes(&self) -> Vec<String> {
        self.unknown
            .iter()
            .map(|unknown| {
                let nearest = nearest(unknown, [ALLOW_UNPIN]).map(str::to_owned);
                format!("confcast: note: ignoring push option {unknown:?}{}", did_you_mean(&nearest))
            })
            .collect()
    }

    /// The options git hands the hook in `GIT_PUSH_OPTION_COUNT` and
    /// `GIT_PUSH_OPTION_0`...
    pub fn from_env() -> PushOptions {
        let count = std::env::var("GIT_PUSH_OPTION_COUNT").ok().and_then(|c| c.parse::<usize>().ok()).unwrap_or(0);
        PushOptions::parse((0..count).filter_map(|i| std::env::var(format!("GIT_PUSH_OPTION_{i}")).ok()))
    }
}

/// What the cross-reference check found.
#[derive(Debug, Default)]
pub struct Verdict {
    /// Why the push must be refused.
    pub rejections: Vec<Rejection>,
    /// What the pusher should know if the push goes through.
    pub notes: Vec<String>,
}

/// A name a control document gives that the push would leave without its target, or a
/// deleted ref a control document still names.
#[derive(Debug, thiserror::Error)]
pub enum Unresolved {
    /// `conf` names a configuration that does not exist.
    NoConfiguration {
        /// The value of `conf`.
        conf: String,
        /// The ref it names.
        conf_ref: String,
        /// The existing configuration whose name is closest.
        nearest: Option<String>,
    },
    /// `conf` names a ref that holds no valid configuration document.
    BadConfiguration {
        /// The value of `conf`.
        conf: String,
        /// The ref it names.
        conf_ref: String,
        /// What is wrong with its document; `None` when it has none.
        error: Option<DocumentError>,
    },
    /// A host's inventory lists something the followed configuration does not pin.
    NotInConfiguration {
        /// The inventory entry, `inventories.hosts.<host>.<kind>s[<i>]`.
        field: String,
        /// What it lists.
        kind: Kind,
        /// The name listed.
        name: String,
        /// The `conf` of the datacenter.
        conf: String,
        /// The pinned name closest to it.
        nearest: Option<String>,
    },
    /// A pin's branch or tag does not exist.
    NoPinnedRef {
        /// The pin's field naming the ref: `<kind>s[<i>].branch` or `.tag`.
        field: String,
        /// Its value.
        value: String,
        /// The ref it names.
        ref_name: String,
        /// The existing branch (or tag) of the same service closest to it.
        nearest: Option<String>,
    },
    /// The push deletes a ref that a datacenter pins or follows.
    Pinned {
        /// The ref holding the document that names the deleted ref.
        doc_ref: String,
        /// That document.
        file: &'static str,
        /// The field naming the deleted ref.
        field: String,
        /// Its value.
        value: String,
        /// The datacenters that would lose it.
        datacenters: Vec<String>,
    },
}

/// `; did you mean `x`?`, or nothing.
fn did_you_mean(nearest: &Option<String>) -> String {
    nearest.as_ref().map(|n| format!("; did you mean `{n}`?")).unwrap_or_default()
}

/// `datacenter dc1`, `datacenters dc1, dc2`.
fn datacenters(dcs: &[String]) -> String {
    let s = if dcs.len() == 1 { "" } else { "s" };
    format!("datacenter{s} {}", dcs.join(", "))
}

impl fmt::Display for Unresolved {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Unresolved::NoConfiguration { conf, conf_ref, nearest } => write!(
                f,
                "{DATACENTER_FILE}: field `conf`: {conf:?} names {conf_ref}, which does not exist on the master{}",
                did_you_mean(nearest)
            ),
            Unresolved::BadConfiguration { conf, conf_ref, error: None } => write!(
                f,
                "{DATACENTER_FILE}: field `conf`: {conf:?} names {conf_ref}, which holds no {CONFIGURATION_FILE}"
            ),
            Unresolved::BadConfiguration { conf, conf_ref, error: Some(error) } => write!(
                f,
                "{DATACENTER_FILE}: field `conf`: {conf:?} names {conf_ref}, whose document does not validate ({error})"
            ),
            Unresolved::NotInConfiguration { field, kind, name, conf, nearest } => write!(
                f,
                "{DATACENTER_FILE}: field `{field}`: {kind} {name:?} is not in {conf}, the configuration this \
                 datacenter follows{}",
                did_you_mean(nearest)
            ),
            Unresolved::NoPinnedRef { field, value, ref_name, nearest } => write!(
                f,
                "{CONFIGURATION_FILE}: field `{field}`: {value:?} names {ref_name}, which does not exist on the \
                 master{}",
                did_you_mean(nearest)
            ),
            Unresolved::Pinned { doc_ref, file, field, value, datacenters: dcs } => {
                let loses = if *file == DATACENTER_FILE {
                    format!("{} without a configuration", datacenters(dcs))
                } else {
                    format!("the pin unresolvable in {}", datacenters(dcs))
                };
                write!(
                    f,
                    "{file} in {doc_ref}: field `{field}`: {value:?} still names this ref; deleting it would leave \
                     {loses} (to delete it anyway, push with `-o {ALLOW_UNPIN}`; hosts then keep what they have)"
                )
            }
        }
    }
}

/// The candidate closest to `value`, if it is close enough to be what was meant: at
/// most one edit (an adjacent transposition counts as one) per three characters, and
/// always one; case is ignored. Ties go to the first in alphabetical order.
pub fn nearest<'a>(value: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    let lower = value.to_lowercase();
    candidates
        .into_iter()
        .filter(|c| *c != value)
        .map(|c| (strsim::osa_distance(&lower, &c.to_lowercase()), c))
        .filter(|(distance, c)| *distance <= (c.chars().count().max(value.chars().count()) / 3).max(1))
        .min()
        .map(|(_, c)| c)
}

/// What a push asks of this check: the control documents it writes, and the refs it
/// deletes that a datacenter could depend on.
#[derive(Debug, Default)]
struct Plan<'u> {
    /// Updates writing a `datacenter.json` or a `datacenter-configuration.json`.
    documents: Vec<(&'u RefUpdate, Oid, &'static str)>,
    /// Deleted branches and tags of pinned trees and of configurations.
    deleted: BTreeSet<&'u str>,
}

impl<'u> Plan<'u> {
    fn of(updates: &'u [RefUpdate]) -> Plan<'u> {
        let mut plan = Plan::default();
        for update in updates {
            match update.new {
                Some(new) => {
                    if let Some(file) = control_file(&update.ref_name) {
                        plan.documents.push((update, new, file));
                    }
                }
                None if holds_tree(&update.ref_name) || refs::conf_naming(&update.ref_name).is_some() => {
                    plan.deleted.insert(&update.ref_name);
                }
                None => {}
            }
        }
        plan
    }

    fn is_empty(&self) -> bool {
        self.documents.is_empty() && self.deleted.is_empty()
    }
}

/// Checks what the control documents of a push name, and what its deletions leave
/// unresolved, against the master as the push would leave it. Documents that do not
/// parse are skipped here: [`crate::validate`] refuses them.
pub fn check(repo: &Repository, updates: &[RefUpdate], options: &PushOptions) -> Verdict {
    let mut verdict = Verdict::default();
    let plan = Plan::of(updates);
    if plan.is_empty() {
        return verdict;
    }
    let master = AfterPush::new(repo, updates);
    for (update, new, file) in &plan.documents {
        let outcome = if *file == DATACENTER_FILE {
            check_datacenter(&master, &update.ref_name, *new)
        } else {
            check_configuration(&master, &update.ref_name, *new, &mut verdict.notes)
        };
        outcome.unwrap_or_else(|e| verdict.rejections.extend(e));
    }
    if !plan.deleted.is_empty() {
        check_deletions(&master, &plan.deleted, options, &mut verdict).unwrap_or_else(|e| verdict.rejections.push(e));
    }
    verdict
}

/// Reading `ref_name` failed.
fn unreadable(ref_name: &str) -> impl FnOnce(git2::Error) -> Vec<Rejection> + '_ {
    move |error| vec![Rejection::Git { ref_name: ref_name.to_owned(), error }]
}

fn rejection(ref_name: &str, error: Unresolved) -> Rejection {
    Rejection::Reference { ref_name: ref_name.to_owned(), error: Box::new(error) }
}

/// A configuration document as the push leaves it: `Ok(None)` when the ref is gone.
fn configuration_at(
    master: &AfterPush<'_>,
    conf_ref: &str,
) -> Result<Option<Result<DatacenterConfiguration, Option<DocumentError>>>, git2::Error> {
    let Some(commit) = master.commit_of(conf_ref)? else {
        return Ok(None);
    };
    Ok(Some(match master.root_file(commit, CONFIGURATION_FILE)? {
        Some(bytes) => DatacenterConfiguration::parse(&bytes).map_err(Some),
        None => Err(None),
    }))
}

fn check_datacenter(master: &AfterPush<'_>, ref_name: &str, new: Oid) -> Result<(), Vec<Rejection>> {
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
            let mut existing = master.refs_under(CONFIGURATION_BRANCHES).map_err(unreadable(CONFIGURATION_BRANCHES))?;
            existing.extend(master.refs_under(CONFIGURATION_TAGS).map_err(unreadable(CONFIGURATION_TAGS))?);
            // Compared without the prefix they all share, which would make any two look alike.
            let names: Vec<String> = existing.iter().filter_map(|r| refs::conf_naming(r)).collect();
            let rest = |conf: &'_ str| conf.strip_prefix(CONFIGURATION_PREFIX).unwrap_or(conf).to_owned();
            let rests: Vec<String> = names.iter().map(|n| rest(n)).collect();
            let nearest = nearest(&rest(&doc.conf), rests.iter().map(String::as_str))
                .map(|n| format!("{CONFIGURATION_PREFIX}{n}"));
            let error = Unresolved::NoConfiguration { conf: doc.conf.clone(), conf_ref, nearest };
            return Err(vec![rejection(ref_name, error)]);
        }
    };
    let mut rejections = Vec::new();
    for (host, inventory) in &doc.inventories.hosts {
        for kind in Kind::ALL {
            let pinned: Vec<&str> = conf.pins(kind).iter().map(|p| p.name.as_str()).collect();
            for (i, name) in inventory.names(kind).iter().enumerate() {
                if pinned.contains(&name.as_str()) {
                    continue;
                }
                let error = Unresolved::NotInConfiguration {
                    field: DatacenterDoc::inventory_field(host, kind, i),
                    kind,
                    name: name.clone(),
                    conf: doc.conf.clone(),
                    nearest: nearest(name, pinned.iter().copied()).map(str::to_owned),
                };
                rejections.push(rejection(ref_name, error));
            }
        }
    }
    if rejections.is_empty() {
        Ok(())
    } else {
        Err(rejections)
    }
}

fn check_configuration(
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
    for prefix in [format!("refs/heads/{}/", kind.plural()), format!("refs/tags/{}/", kind.plural())] {
        for ref_name in master.refs_under(&prefix)? {
            names.extend(Kind::of_ref(&ref_name).map(|(_, name)| name.to_owned()));
        }
    }
    Ok(names)
}

/// Where a deleted ref is still named: (deleted ref, document ref, file, field, value).
type Naming<'d> = (&'d str, String, &'static str, String, String);

/// Finds every datacenter that pins or follows a ref the push deletes: reads each
/// datacenter's document as the push leaves it, and the configuration it follows (each
/// configuration once). Datacenters whose documents do not resolve are passed over: the
/// relay already keeps their last good state.
fn check_deletions(
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
        let dc = dc_ref[DATACENTER_BRANCHES.len()..].to_owned();
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

#[cfg(test)]
mod tests;
