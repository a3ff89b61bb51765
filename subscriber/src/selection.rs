//! Which services a host follows, and when one leaves it.
//!
//! A host follows the services named on its command line (`--service`, ...) or, with
//! `--host ID`, those its entry in the datacenter's inventory lists. Taking a service
//! away removes `<dir>/<service>` under the processes that read it, so a host does it
//! only on an explicit word from the datacenter's published state, checked against a
//! second published fact, and never because something could not be resolved:
//!
//! - **The datacenter dropped the service** (its configuration no longer pins it): the
//!   relay publishes a removal on the update stream, after the removal snapshot. The host
//!   removes the service only if the service's latest snapshot says removed too; a
//!   snapshot holding a commit (the service came back since) is applied instead.
//! - **The host's inventory entry no longer lists the service** (it moved to other
//!   hosts, and still runs there, so the relay publishes no removal): the host removes it
//!   only if its entry is present and consistent — every service the entry names is one
//!   the datacenter publishes (its head holds a commit, or the host holds its tree). An
//!   entry that names something the datacenter does not publish (`"services": ["wbe"]`
//!   for `web`), or no entry for the host at all, removes nothing: the host keeps
//!   following what it has, says so at WARN, and reports the unknown name in its status.
//!   A host gives up services through an entry that lists the others (`"services": []`
//!   for none).
//! - **The command line no longer selects it** (the operator restarted the subscriber
//!   with other `--service` flags).
//!
//! A resolution error never reaches hosts as either word: a relay that cannot resolve
//! the datacenter keeps its last good pins, publishes no removal and no inventory, and a
//! pin whose ref is missing keeps its last published commit.
//!
//! A removal from the inventory does not also wait for a removal from the relay: the
//! relay publishes one only when the datacenter's configuration drops the service, so a
//! service moved from one host to others would never leave the first.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use confcast_schemas::document::HostInventory;
use confcast_schemas::{Kind, ServiceId};

/// Which services this host runs.
#[derive(Debug, Clone)]
pub enum Selection {
    /// Named on the command line.
    Services(Vec<ServiceId>),
    /// Whatever the datacenter's inventory lists for this host.
    Host(String),
}

impl fmt::Display for Selection {
    /// As the command line says it: `--service web --application billing`, `--host host-a`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Selection::Host(id) => write!(f, "--host {id}"),
            Selection::Services(list) if list.is_empty() => f.write_str("nothing"),
            Selection::Services(list) => {
                let flags: Vec<String> = list.iter().map(|id| format!("--{} {}", id.kind, id.name)).collect();
                f.write_str(&flags.join(" "))
            }
        }
    }
}

/// Why a service's tree is taken off this host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Removal {
    /// The relay published the service's removal and its latest snapshot agrees.
    Datacenter {
        /// The datacenter.
        dc: String,
    },
    /// The host's entry in the datacenter's inventory no longer lists it.
    Inventory {
        /// The datacenter.
        dc: String,
        /// The host's id in the inventory.
        host: String,
        /// The configuration the datacenter follows.
        conf_ref: String,
    },
    /// The subscriber's command line no longer selects it.
    CommandLine,
}

impl fmt::Display for Removal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Removal::Datacenter { dc } => write!(
                f,
                "datacenter {dc} no longer runs it: its relay published the removal and the service's latest snapshot agrees"
            ),
            Removal::Inventory { dc, host, conf_ref } => write!(
                f,
                "host {host}'s entry in the inventory of datacenter {dc} (following {conf_ref}) no longer lists it"
            ),
            Removal::CommandLine => f.write_str("the subscriber's command line no longer selects it"),
        }
    }
}

/// What a `--host` subscriber does with one published inventory.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// The services to follow.
    pub follow: BTreeSet<ServiceId>,
    /// Services on this host that its entry dropped, consistently: to remove.
    pub remove: BTreeSet<ServiceId>,
    /// Services on this host that its entry dropped, kept because the entry cannot be
    /// trusted (see [`Plan::unknown`], [`Plan::listed`]).
    pub held: BTreeSet<ServiceId>,
    /// Services the entry names that the datacenter does not publish. Followed too: one
    /// that is published later (a pin fixed) is applied.
    pub unknown: BTreeSet<ServiceId>,
    /// Whether the inventory has an entry for this host.
    pub listed: bool,
}

impl Plan {
    /// Whether the entry is trusted to take services away.
    pub fn consistent(&self) -> bool {
        self.listed && self.unknown.is_empty()
    }
}

/// Decides what a host follows and removes, given its inventory `entry` (`None`: the
/// host is not in the inventory), the services whose trees are on the host (`present`)
/// and those of the entry that the datacenter publishes (`published`).
pub fn plan(entry: Option<&HostInventory>, present: &BTreeSet<ServiceId>, published: &BTreeSet<ServiceId>) -> Plan {
    let wanted = entry.map(HostInventory::services).unwrap_or_default();
    let unknown: BTreeSet<ServiceId> = wanted.difference(published).cloned().collect();
    let dropped: BTreeSet<ServiceId> = present.difference(&wanted).cloned().collect();
    let mut plan = Plan { follow: wanted, unknown, listed: entry.is_some(), ..Plan::default() };
    if plan.consistent() {
        plan.remove = dropped;
    } else {
        plan.follow.extend(dropped.iter().cloned());
        plan.held = dropped;
    }
    plan
}

/// `service web, application billing`.
pub fn list(services: &BTreeSet<ServiceId>) -> String {
    let names: Vec<String> = services.iter().map(|id| format!("{} {}", id.kind, id.name)).collect();
    names.join(", ")
}

/// Why a followed service has nothing published, for logs and status reports.
pub fn unpublished(id: &ServiceId, dc: &str, conf_ref: Option<&str>) -> String {
    let conf = conf_ref.map(|c| format!(" {c}")).unwrap_or_default();
    let ServiceId { kind, name } = id;
    format!(
        "{kind} {name} is not published in datacenter {dc}: it is not in the datacenter's configuration{conf}, or \
         its pin does not resolve (the relay's error events say which)"
    )
}

/// A selection the host cannot follow.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SelectionError {
    /// The name cannot be a directory of `--dir`.
    #[error("{} name {:?} cannot be a directory name", .0.kind, .0.name)]
    NotADirectory(ServiceId),
    /// Two services of different kinds would share `<dir>/<name>`.
    #[error("{} and {} {:?} would share {:?} in --dir", .0, .1.kind, .1.name, .1.name)]
    Shared(Kind, ServiceId),
    /// Nothing to follow.
    #[error("no service selected")]
    Empty,
}

/// Refuses selections whose names cannot be directories of `--dir`, or would share one.
pub fn check_distinct(services: &BTreeSet<ServiceId>) -> Result<(), SelectionError> {
    let mut names = BTreeMap::new();
    for id in services {
        let name = &id.name;
        if name.is_empty() || name.contains('/') || name == "." || name == ".." {
            return Err(SelectionError::NotADirectory(id.clone()));
        }
        if let Some(other) = names.insert(name.clone(), id.kind) {
            return Err(SelectionError::Shared(other, id.clone()));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(names: &[&str]) -> BTreeSet<ServiceId> {
        names.iter().map(|n| ServiceId::service(*n)).collect()
    }

    fn entry(names: &[&str]) -> HostInventory {
        HostInventory { services: names.iter().map(|n| (*n).to_owned()).collect(), ..HostInventory::default() }
    }

    #[test]
    fn a_consistent_entry_moves_a_service_off_the_host() {
        let plan = plan(Some(&entry(&["api"])), &set(&["web", "api"]), &set(&["api", "web"]));
        assert_eq!(plan.follow, set(&["api"]));
        assert_eq!(plan.remove, set(&["web"]));
        assert!(plan.held.is_empty() && plan.consistent());
    }

    #[test]
    fn a_typo_in_the_entry_removes_nothing_and_waits_for_the_unknown_name() {
        // `"services": ["wbe"]` for `web`: wbe is published nowhere.
        let plan = plan(Some(&entry(&["wbe"])), &set(&["web"]), &set(&[]));
        assert_eq!(plan.unknown, set(&["wbe"]));
        assert_eq!(plan.held, set(&["web"]));
        assert!(plan.remove.is_empty());
        assert_eq!(plan.follow, set(&["web", "wbe"]), "web keeps its updates; wbe is applied if it appears");
        assert!(!plan.consistent());
    }

    #[test]
    fn a_host_missing_from_the_inventory_keeps_what_it_has() {
        let plan = plan(None, &set(&["web"]), &set(&[]));
        assert!(!plan.listed);
        assert_eq!((plan.held, plan.follow), (set(&["web"]), set(&["web"])));
        assert!(plan.remove.is_empty());
    }

    #[test]
    fn an_empty_entry_is_an_explicit_removal_of_everything() {
        let plan = plan(Some(&entry(&[])), &set(&["web", "api"]), &set(&[]));
        assert_eq!(plan.remove, set(&["web", "api"]));
        assert!(plan.follow.is_empty());
    }

    #[test]
    fn a_new_service_not_published_yet_holds_removals_until_it_is() {
        // The entry moves the host from web to api, whose pin does not resolve yet.
        let plan = plan(Some(&entry(&["api"])), &set(&["web"]), &set(&[]));
        assert_eq!((plan.held.clone(), plan.unknown.clone()), (set(&["web"]), set(&["api"])));
        // Once api is published, the same entry removes web.
        let plan = super::plan(Some(&entry(&["api"])), &set(&["web"]), &set(&["api"]));
        assert_eq!(plan.remove, set(&["web"]));
    }

    #[test]
    fn a_fresh_host_follows_its_entry() {
        let plan = plan(Some(&entry(&["web"])), &set(&[]), &set(&["web"]));
        assert_eq!(plan.follow, set(&["web"]));
        assert!(plan.remove.is_empty() && plan.held.is_empty() && plan.consistent());
    }

    #[test]
    fn selections_read_like_the_command_line() {
        let services =
            Selection::Services(vec![ServiceId::service("web"), ServiceId::new(Kind::Application, "billing")]);
        assert_eq!(services.to_string(), "--service web --application billing");
        assert_eq!(Selection::Host("host-a".into()).to_string(), "--host host-a");
        assert_eq!(list(&set(&["b", "a"])), "service a, service b");
    }

    #[test]
    fn names_that_cannot_be_directories_or_collide_are_refused() {
        assert!(check_distinct(&set(&["a", "b"])).is_ok());
        assert!(check_distinct(&set(&[".."])).is_err());
        let both: BTreeSet<ServiceId> = [ServiceId::service("x"), ServiceId::new(Kind::Device, "x")].into();
        assert!(check_distinct(&both).expect_err("shared").to_string().contains("would share"));
    }
}
