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

mod deletions;
mod named;
pub mod unresolved;

use std::collections::BTreeSet;

use confcast_schemas::document::{CONFIGURATION_FILE, DATACENTER_FILE};
use confcast_schemas::{refs, DatacenterConfiguration, DocumentError};
use git2::{Oid, Repository};

use crate::after_push::AfterPush;
use crate::push_options::PushOptions;
use crate::{containment::holds_tree, documents::control_file, RefUpdate, Rejection};

pub use unresolved::Unresolved;

/// What the cross-reference check found.
#[derive(Debug, Default)]
pub struct Verdict {
    /// Why the push must be refused.
    pub rejections: Vec<Rejection>,
    /// What the pusher should know if the push goes through.
    pub notes: Vec<String>,
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
            named::check_datacenter(&master, &update.ref_name, *new)
        } else {
            named::check_configuration(&master, &update.ref_name, *new, &mut verdict.notes)
        };
        outcome.unwrap_or_else(|e| verdict.rejections.extend(e));
    }
    if !plan.deleted.is_empty() {
        deletions::check_deletions(&master, &plan.deleted, options, &mut verdict)
            .unwrap_or_else(|e| verdict.rejections.push(e));
    }
    verdict
}

/// Reading `ref_name` failed.
pub(super) fn unreadable(ref_name: &str) -> impl FnOnce(git2::Error) -> Vec<Rejection> + '_ {
    move |error| vec![Rejection::Git { ref_name: ref_name.to_owned(), error }]
}

pub(super) fn rejection(ref_name: &str, error: Unresolved) -> Rejection {
    Rejection::Reference { ref_name: ref_name.to_owned(), error: Box::new(error) }
}

/// A configuration document as the push leaves it: `Ok(None)` when the ref is gone.
pub(super) fn configuration_at(
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

#[cfg(test)]
mod tests;
