//! What a pinned tree configures ([`Kind`]) and which tree it is ([`ServiceId`]).
//!
//! Services, applications and devices are handled alike everywhere; they differ only in
//! their ref namespace (`services/`, `applications/`, `devices/`) and the document field
//! that pins them. A [`ServiceId`] is the one name of a tree in every process: written
//! `service/web`, the same text in logs, position files and the local API.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// What a pinned tree configures; each has its own ref namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// `services/<name>/<branch>`.
    Service,
    /// `applications/<name>/<branch>`.
    Application,
    /// `devices/<name>/<branch>`.
    Device,
}

impl Kind {
    /// Every kind, in resolution order.
    pub const ALL: [Kind; 3] = [Kind::Service, Kind::Application, Kind::Device];

    /// Singular name, used in subjects.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Service => "service",
            Kind::Application => "application",
            Kind::Device => "device",
        }
    }

    /// Plural name: the ref namespace and the document field.
    pub fn plural(self) -> &'static str {
        match self {
            Kind::Service => "services",
            Kind::Application => "applications",
            Kind::Device => "devices",
        }
    }

    /// The kind a singular (`service`) or plural (`services`) name stands for.
    pub fn from_name(name: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|kind| kind.as_str() == name || kind.plural() == name)
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A kind or service name that is not one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// Not `service`, `application` or `device` (nor their plurals).
    #[error("unknown kind {0:?}: expected service, application or device")]
    Kind(String),
    /// Not `<kind>/<name>` with a non-empty name.
    #[error("{0:?} is not <kind>/<name> (e.g. service/web)")]
    Service(String),
}

impl FromStr for Kind {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Kind, ParseError> {
        Kind::from_name(s).ok_or_else(|| ParseError::Kind(s.to_owned()))
    }
}

/// One service, application or device: its kind and its name.
///
/// Ordered by kind, then name: the order in which a datacenter's trees are resolved
/// and listed.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceId {
    /// What it configures.
    pub kind: Kind,
    /// Its name: its refs live under `<kind>s/<name>/`.
    pub name: String,
}

impl ServiceId {
    /// The tree `name` of `kind`.
    pub fn new(kind: Kind, name: impl Into<String>) -> ServiceId {
        ServiceId { kind, name: name.into() }
    }

    /// A service (the common kind).
    pub fn service(name: impl Into<String>) -> ServiceId {
        ServiceId::new(Kind::Service, name)
    }
}

impl fmt::Display for ServiceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.kind, self.name)
    }
}

impl FromStr for ServiceId {
    type Err = ParseError;

    /// `service/web`; the kind may be plural (`services/web`), as in the master's refs.
    fn from_str(s: &str) -> Result<ServiceId, ParseError> {
        let (kind, name) = s.split_once('/').ok_or_else(|| ParseError::Service(s.to_owned()))?;
        if name.is_empty() {
            return Err(ParseError::Service(s.to_owned()));
        }
        Ok(ServiceId::new(kind.parse()?, name))
    }
}

impl From<(Kind, String)> for ServiceId {
    fn from((kind, name): (Kind, String)) -> ServiceId {
        ServiceId { kind, name }
    }
}

/// Written as its text (`service/web`), where a document or a file keys by service.
impl Serialize for ServiceId {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ServiceId {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<ServiceId, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_service_id_reads_back_what_it_writes() {
        let id = ServiceId::new(Kind::Application, "billing/eu");
        assert_eq!(id.to_string(), "application/billing/eu");
        assert_eq!("application/billing/eu".parse::<ServiceId>(), Ok(id));
        assert_eq!("services/web".parse::<ServiceId>(), Ok(ServiceId::service("web")));
        assert!(matches!("web".parse::<ServiceId>(), Err(ParseError::Service(_))));
        assert!(matches!("service/".parse::<ServiceId>(), Err(ParseError::Service(_))));
        assert_eq!("daemon/x".parse::<ServiceId>(), Err(ParseError::Kind("daemon".into())));
    }

    #[test]
    fn kinds_parse_singular_and_plural() {
        for kind in Kind::ALL {
            assert_eq!(kind.as_str().parse::<Kind>(), Ok(kind));
            assert_eq!(kind.plural().parse::<Kind>(), Ok(kind));
        }
    }

    #[test]
    fn service_ids_sort_by_kind_then_name() {
        let mut ids = [ServiceId::new(Kind::Device, "a"), ServiceId::service("b"), ServiceId::service("a")];
        ids.sort();
        assert_eq!(ids.iter().map(ToString::to_string).collect::<Vec<_>>(), ["service/a", "service/b", "device/a"]);
    }
}
