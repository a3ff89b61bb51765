//! The control documents of the master repository and the refs they point at.
//!
//! `refs/heads/datacenters/<dc>` holds `datacenter.json` ([`DatacenterDoc`]): which
//! datacenter-configuration the datacenter follows and its inventory. That
//! configuration (`datacenter-configuration.json`, [`DatacenterConfiguration`]) pins
//! each service, application and device to a branch head or a tag.
//!
//! Parsing is strict (unknown fields are errors, so a typo cannot silently drop a pin)
//! and every error names the file, the field and the problem.

use std::collections::{BTreeMap, BTreeSet};

pub use crate::kind::Kind;
use crate::kind::ServiceId;
use crate::refs;
use crate::rollout::{DatacenterRollout, Policy};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// File holding a datacenter's document at the root of `refs/heads/datacenters/<dc>`.
pub const DATACENTER_FILE: &str = "datacenter.json";
/// File holding a configuration at the root of a `datacenter-configuration` ref.
pub const CONFIGURATION_FILE: &str = "datacenter-configuration.json";
/// The tag value that follows a branch head instead of pinning a tag.
pub const LATEST: &str = "latest";

/// One pinned service, application or device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Pin {
    /// Name of the service: its refs live under `<kind>s/<name>/`.
    pub name: String,
    /// Branch followed when `tag` is `latest`, and reported in the index.
    pub branch: String,
    /// A tag under `refs/tags/<kind>s/<name>/`, or `latest` to follow the branch head.
    #[serde(default = "latest")]
    pub tag: String,
    /// How a change of it rolls out, instead of the configuration's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<Policy>,
}

fn latest() -> String {
    LATEST.to_owned()
}

impl Pin {
    /// The full ref this pin resolves through.
    pub fn ref_name(&self, kind: Kind) -> String {
        if self.tag == LATEST {
            format!("{}{}", kind.branch_prefix(&self.name), self.branch)
        } else {
            format!("{}{}", kind.tag_prefix(&self.name), self.tag)
        }
    }

    /// The version under which the index records this pin: the tag, or `latest`.
    pub fn version(&self) -> &str {
        &self.tag
    }
}

/// `datacenter-configuration.json`: what a class of datacenter runs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DatacenterConfiguration {
    /// Services and the branch or tag each one runs.
    #[serde(default)]
    pub services: Vec<Pin>,
    /// Applications, pinned like services.
    #[serde(default)]
    pub applications: Vec<Pin>,
    /// Devices, pinned like services.
    #[serde(default)]
    pub devices: Vec<Pin>,
    /// How a change rolls out, for every entry without its own `rollout`; absent:
    /// every host at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<Policy>,
}

impl DatacenterConfiguration {
    /// Pins of one kind.
    pub fn pins(&self, kind: Kind) -> &[Pin] {
        match kind {
            Kind::Service => &self.services,
            Kind::Application => &self.applications,
            Kind::Device => &self.devices,
        }
    }

    /// Parses and validates the document.
    pub fn parse(bytes: &[u8]) -> Result<Self, DocumentError> {
        let doc: Self = parse_json(CONFIGURATION_FILE, bytes)?;
        doc.validate()?;
        Ok(doc)
    }

    /// The rollout policy of one entry: its own, or the configuration's default.
    pub fn policy_of<'a>(&'a self, pin: &'a Pin) -> Option<&'a Policy> {
        pin.rollout.as_ref().or(self.rollout.as_ref())
    }

    fn validate(&self) -> Result<(), DocumentError> {
        let policy = |policy: Option<&Policy>, at: &str| match policy.map(|p| p.validate(at)) {
            Some(Err((field, problem))) => Err(DocumentError::invalid(CONFIGURATION_FILE, field, problem)),
            _ => Ok(()),
        };
        policy(self.rollout.as_ref(), "rollout")?;
        for kind in Kind::ALL {
            let mut seen = BTreeSet::new();
            for (i, pin) in self.pins(kind).iter().enumerate() {
                let at = |field: &str| format!("{}[{i}].{field}", kind.plural());
                check_name(CONFIGURATION_FILE, &at("name"), &pin.name)?;
                check_ref_component(CONFIGURATION_FILE, &at("branch"), &pin.branch)?;
                check_ref_component(CONFIGURATION_FILE, &at("tag"), &pin.tag)?;
                policy(pin.rollout.as_ref(), &at("rollout"))?;
                if !seen.insert(pin.name.as_str()) {
                    return Err(DocumentError::invalid(
                        CONFIGURATION_FILE,
                        at("name"),
                        format!("{} {:?} is pinned more than once", kind, pin.name),
                    ));
                }
            }
        }
        Ok(())
    }
}

/// The services, applications and devices one host runs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HostInventory {
    /// Names of services this host runs.
    #[serde(default)]
    pub services: Vec<String>,
    /// Names of applications this host runs.
    #[serde(default)]
    pub applications: Vec<String>,
    /// Names of devices this host configures.
    #[serde(default)]
    pub devices: Vec<String>,
}

impl HostInventory {
    /// Names of one kind.
    pub fn names(&self, kind: Kind) -> &[String] {
        match kind {
            Kind::Service => &self.services,
            Kind::Application => &self.applications,
            Kind::Device => &self.devices,
        }
    }

    /// Every entry with its kind and its place in its list, in resolution order (what
    /// [`DatacenterDoc::inventory_field`] names).
    pub fn entries(&self) -> impl Iterator<Item = (Kind, usize, &str)> {
        Kind::ALL
            .into_iter()
            .flat_map(move |kind| self.names(kind).iter().enumerate().map(move |(i, name)| (kind, i, name.as_str())))
    }

    /// Every service, application and device the entry names.
    pub fn services(&self) -> BTreeSet<ServiceId> {
        self.entries().map(|(kind, _, name)| ServiceId::new(kind, name)).collect()
    }
}

/// The inventory part of `datacenter.json`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Inventories {
    /// Hosts by id.
    #[serde(default)]
    pub hosts: BTreeMap<String, HostInventory>,
}

/// `datacenter.json`: the configuration a datacenter follows, and its inventory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DatacenterDoc {
    /// `datacenter-configuration/<name>/<version>` (a tag) or
    /// `datacenter-configuration/<name>` (follow that branch's head).
    pub conf: String,
    /// Which host runs what.
    #[serde(default)]
    pub inventories: Inventories,
    /// How this datacenter's rollouts follow other datacenters'.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<DatacenterRollout>,
}

impl DatacenterDoc {
    /// Parses and validates the document.
    pub fn parse(bytes: &[u8]) -> Result<Self, DocumentError> {
        let doc: Self = parse_json(DATACENTER_FILE, bytes)?;
        doc.conf_ref()?;
        for (i, dc) in doc.rollout.iter().flat_map(|r| r.after.iter()).enumerate() {
            check_name(DATACENTER_FILE, &format!("rollout.after[{i}]"), dc)?;
        }
        for (host, inv) in &doc.inventories.hosts {
            check_name(DATACENTER_FILE, "inventories.hosts", host)?;
            for (kind, i, name) in inv.entries() {
                check_name(DATACENTER_FILE, &DatacenterDoc::inventory_field(host, kind, i), name)?;
            }
        }
        Ok(doc)
    }

    /// The ref named by `conf`: a tag for `<name>/<version>`, a branch for `<name>`.
    pub fn conf_ref(&self) -> Result<String, DocumentError> {
        let bad = |why: &str| DocumentError::invalid(DATACENTER_FILE, "conf", format!("{:?} {why}", self.conf));
        let rest = self
            .conf
            .strip_prefix(refs::CONFIGURATION_NAMESPACE)
            .ok_or_else(|| bad("must start with \"datacenter-configuration/\""))?;
        let parts: Vec<&str> = rest.split('/').collect();
        if parts.iter().any(|p| p.is_empty() || !refs::valid_component(p)) {
            return Err(bad("is not a valid ref name"));
        }
        match parts.as_slice() {
            [name] => Ok(format!("{}{name}", refs::CONFIGURATION_BRANCHES)),
            [name, version] => Ok(format!("{}{name}/{version}", refs::CONFIGURATION_TAGS)),
            _ => Err(bad("must be datacenter-configuration/<name> or datacenter-configuration/<name>/<version>")),
        }
    }
}

/// What is wrong with a control document.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DocumentError {
    /// Not JSON, or JSON of the wrong shape.
    #[error("{file}: {message}")]
    Syntax {
        /// The file name.
        file: &'static str,
        /// serde_json's description, with line and column.
        message: String,
    },
    /// Well-formed but a field's value is not acceptable.
    #[error("{file}: field `{field}`: {problem}")]
    Invalid {
        /// The file name.
        file: &'static str,
        /// Path of the field, e.g. `services[2].tag`.
        field: String,
        /// What is wrong with it.
        problem: String,
    },
}

impl DocumentError {
    fn invalid(file: &'static str, field: impl Into<String>, problem: impl Into<String>) -> Self {
        DocumentError::Invalid { file, field: field.into(), problem: problem.into() }
    }
}

fn parse_json<T: serde::de::DeserializeOwned>(file: &'static str, bytes: &[u8]) -> Result<T, DocumentError> {
    serde_json::from_slice(bytes).map_err(|e| DocumentError::Syntax { file, message: e.to_string() })
}

/// Names end up in ref names, paths and subjects: they must be non-empty, contain no
/// `/`, and no control characters. Everything else is encoded where needed.
fn check_name(file: &'static str, field: &str, name: &str) -> Result<(), DocumentError> {
    if name.is_empty() {
        return Err(DocumentError::invalid(file, field, "must not be empty"));
    }
    if name.contains('/') || name.chars().any(char::is_control) || name == "." || name == ".." {
        return Err(DocumentError::invalid(
            file,
            field,
            format!("{name:?} is not a valid name (no '/', control characters, '.' or '..')"),
        ));
    }
    Ok(())
}

fn check_ref_component(file: &'static str, field: &str, value: &str) -> Result<(), DocumentError> {
    if value.is_empty() {
        return Err(DocumentError::invalid(file, field, "must not be empty"));
    }
    if !value.split('/').all(refs::valid_component) {
        return Err(DocumentError::invalid(file, field, format!("{value:?} is not a valid git ref name")));
    }
    Ok(())
}

/// JSON Schema of `datacenter.json`, as checked in under `schemas/json/`.
pub fn datacenter_schema() -> serde_json::Value {
    serde_json::to_value(schemars::schema_for!(DatacenterDoc)).expect("a schema serializes to JSON")
}

/// JSON Schema of `datacenter-configuration.json`, as checked in under `schemas/json/`.
pub fn configuration_schema() -> serde_json::Value {
    serde_json::to_value(schemars::schema_for!(DatacenterConfiguration)).expect("a schema serializes to JSON")
}

impl Pin {
    /// The field that names the ref this pin resolves through, and its value:
    /// `("branch", "master")` when it follows the branch head, else `("tag", "v1.0")`.
    pub fn ref_field(&self) -> (&'static str, &str) {
        if self.tag == LATEST {
            ("branch", &self.branch)
        } else {
            ("tag", &self.tag)
        }
    }
}

impl DatacenterConfiguration {
    /// Every pin with its kind and its place in its list, in resolution order.
    pub fn all_pins(&self) -> impl Iterator<Item = (Kind, usize, &Pin)> {
        Kind::ALL.into_iter().flat_map(move |kind| self.pins(kind).iter().enumerate().map(move |(i, p)| (kind, i, p)))
    }

    /// How errors name a field of a pin: `services[2].tag`.
    pub fn pin_field(kind: Kind, index: usize, field: &str) -> String {
        format!("{}[{index}].{field}", kind.plural())
    }
}

impl DatacenterDoc {
    /// How errors name an entry of a host's inventory: `inventories.hosts.host-a.services[0]`.
    pub fn inventory_field(host: &str, kind: Kind, index: usize) -> String {
        format!("inventories.hosts.{host}.{}[{index}]", kind.plural())
    }
}

#[cfg(test)]
mod reference_tests {
    use super::*;

    #[test]
    fn refs_of_pinned_trees_name_their_owner() {
        assert_eq!(Kind::of_ref("refs/tags/services/web/v1"), Some((Kind::Service, "web")));
        assert_eq!(Kind::of_ref("refs/heads/devices/sw-1/prod/eu"), Some((Kind::Device, "sw-1")));
        assert_eq!(Kind::of_ref("refs/heads/services/web"), None, "a name without a branch");
        assert_eq!(Kind::of_ref("refs/heads/datacenters/dc1"), None);
        assert_eq!(Kind::Application.branch_prefix("billing"), "refs/heads/applications/billing/");
        assert_eq!(Kind::Service.tag_prefix("web"), "refs/tags/services/web/");
        let pin = Pin { name: "web".into(), branch: "master".into(), tag: "v1".into(), rollout: None };
        assert_eq!(pin.ref_field(), ("tag", "v1"));
        assert!(pin.ref_name(Kind::Service).starts_with(&Kind::Service.tag_prefix("web")));
        let pin = Pin { tag: LATEST.into(), ..pin };
        assert_eq!(pin.ref_field(), ("branch", "master"));
        assert!(pin.ref_name(Kind::Service).starts_with(&Kind::Service.branch_prefix("web")));
    }

    #[test]
    fn conf_naming_is_the_inverse_of_conf_ref() {
        for conf in ["datacenter-configuration/big", "datacenter-configuration/big/v1.1"] {
            let doc = DatacenterDoc { conf: conf.into(), inventories: Inventories::default(), rollout: None };
            assert_eq!(refs::conf_naming(&doc.conf_ref().expect("valid")).as_deref(), Some(conf));
        }
        assert_eq!(refs::conf_naming("refs/heads/datacenter-configuration/a/b"), None);
        assert_eq!(refs::conf_naming("refs/heads/services/web/master"), None);
    }

    #[test]
    fn fields_are_named_as_validation_names_them() {
        let conf = DatacenterConfiguration::parse(
            br#"{"services":[{"name":"a","branch":"m"}],"devices":[{"name":"d","branch":"m"},{"name":"a/b","branch":"m"}]}"#,
        )
        .expect_err("bad device name");
        assert!(conf.to_string().contains(&DatacenterConfiguration::pin_field(Kind::Device, 1, "name")), "{conf}");
        let conf = DatacenterConfiguration::parse(
            br#"{"services":[{"name":"a","branch":"m"}],"devices":[{"name":"d","branch":"m"}]}"#,
        )
        .expect("valid");
        let pins: Vec<(Kind, usize, &str)> = conf.all_pins().map(|(k, i, p)| (k, i, p.name.as_str())).collect();
        assert_eq!(pins, vec![(Kind::Service, 0, "a"), (Kind::Device, 0, "d")]);
        let dc = DatacenterDoc::parse(
            br#"{"conf":"datacenter-configuration/a","inventories":{"hosts":{"h":{"services":["x","a/b"]}}}}"#,
        )
        .expect_err("bad name");
        assert!(dc.to_string().contains(&DatacenterDoc::inventory_field("h", Kind::Service, 1)), "{dc}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_seed_examples() {
        let conf = DatacenterConfiguration::parse(
            br#"{ "services": [ { "name": "service0", "branch": "master", "tag": "v1.0" },
                { "name": "test_service0", "branch": "experimental_branch", "tag": "latest" } ],
              "applications": [], "devices": [] }"#,
        )
        .expect("valid");
        assert_eq!(conf.services[0].ref_name(Kind::Service), "refs/tags/services/service0/v1.0");
        assert_eq!(conf.services[1].ref_name(Kind::Service), "refs/heads/services/test_service0/experimental_branch");

        let dc = DatacenterDoc::parse(
            br#"{ "conf": "datacenter-configuration/bigdatacenter/v1.1",
                  "inventories": { "hosts": { "host-a": { "services": ["service0"] } } } }"#,
        )
        .expect("valid");
        assert_eq!(dc.conf_ref().expect("ref"), "refs/tags/datacenter-configuration/bigdatacenter/v1.1");
        let dc = DatacenterDoc::parse(br#"{ "conf": "datacenter-configuration/big" }"#).expect("valid");
        assert_eq!(dc.conf_ref().expect("ref"), "refs/heads/datacenter-configuration/big");
    }

    #[test]
    fn tag_defaults_to_latest() {
        let conf = DatacenterConfiguration::parse(br#"{"services":[{"name":"a","branch":"main"}]}"#).expect("valid");
        assert_eq!(conf.services[0].tag, LATEST);
    }

    #[test]
    fn errors_name_file_field_and_problem() {
        let e = DatacenterDoc::parse(br#"{ "conf": "bigdatacenter/v1" }"#).expect_err("bad conf");
        assert_eq!(
            e.to_string(),
            "datacenter.json: field `conf`: \"bigdatacenter/v1\" must start with \"datacenter-configuration/\""
        );
        let e =
            DatacenterDoc::parse(br#"{ "conf": "datacenter-configuration/a", "inventory": {} }"#).expect_err("typo");
        assert!(e.to_string().contains("unknown field `inventory`"), "{e}");
        let e = DatacenterDoc::parse(b"{ \"conf\": ").expect_err("truncated");
        assert!(e.to_string().starts_with("datacenter.json: EOF while parsing"), "{e}");
        let e =
            DatacenterConfiguration::parse(br#"{"services":[{"name":"a","branch":"m"},{"name":"a","branch":"n"}]}"#)
                .expect_err("duplicate");
        assert_eq!(
            e.to_string(),
            "datacenter-configuration.json: field `services[1].name`: service \"a\" is pinned more than once"
        );
        let e =
            DatacenterConfiguration::parse(br#"{"services":[{"name":"a","branch":"m..x"}]}"#).expect_err("bad branch");
        assert!(e.to_string().contains("field `services[0].branch`"), "{e}");
        let e = DatacenterConfiguration::parse(br#"{"devices":[{"name":"a/b","branch":"m"}]}"#).expect_err("bad name");
        assert!(e.to_string().contains("field `devices[0].name`"), "{e}");
    }

    #[test]
    fn checked_in_schemas_match_the_types() {
        for (file, schema) in [
            ("datacenter.schema.json", datacenter_schema()),
            ("datacenter-configuration.schema.json", configuration_schema()),
        ] {
            let path = format!("{}/json/{file}", env!("CARGO_MANIFEST_DIR"));
            let checked_in = std::fs::read_to_string(&path).unwrap_or_default();
            let generated = serde_json::to_string_pretty(&schema).expect("serializes") + "\n";
            if std::env::var_os("CONFCAST_BLESS").is_some() {
                std::fs::write(&path, &generated).expect("write schema");
                continue;
            }
            assert_eq!(checked_in, generated, "{path} is stale: rerun with CONFCAST_BLESS=1");
        }
    }
}
