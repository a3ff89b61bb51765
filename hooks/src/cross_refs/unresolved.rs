//! What the cross-reference check refuses, worded as the pusher reads it: the file,
//! the field, the value, and the nearest existing name when one is close.

use std::fmt;

use confcast_schemas::document::{CONFIGURATION_FILE, DATACENTER_FILE};
use confcast_schemas::{DocumentError, Kind};

use crate::push_options::ALLOW_UNPIN;
use crate::suggest::did_you_mean;

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

/// `datacenter dc1`, `datacenters dc1, dc2`.
pub(crate) fn datacenters(dcs: &[String]) -> String {
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
