//! Every ref namespace of the master repository, in one place.
//!
//! | refs | hold |
//! |---|---|
//! | `refs/heads/datacenters/<dc>` | `datacenter.json` of datacenter `<dc>` |
//! | `refs/heads/datacenter-configuration/<name>` | a configuration's branch |
//! | `refs/tags/datacenter-configuration/<name>/<version>` | a configuration's version |
//! | `refs/heads/<kind>s/<name>/<branch>` | a service's (application's, device's) branch |
//! | `refs/tags/<kind>s/<name>/<tag>` | a service's tag |
//!
//! Documents name configurations as `datacenter-configuration/<name>[/<version>]`
//! (the `conf` field); [`conf_naming`] turns a ref back into that form.

use crate::kind::Kind;

/// Where branches live.
pub const HEADS: &str = "refs/heads/";
/// Where tags live.
pub const TAGS: &str = "refs/tags/";
/// How a document's `conf` field starts.
pub const CONFIGURATION_NAMESPACE: &str = "datacenter-configuration/";
/// Where the branches of the datacenter-configurations live.
pub const CONFIGURATION_BRANCHES: &str = "refs/heads/datacenter-configuration/";
/// Where the versions (tags) of the datacenter-configurations live.
pub const CONFIGURATION_TAGS: &str = "refs/tags/datacenter-configuration/";
/// Where the datacenters' documents live, one branch per datacenter.
pub const DATACENTER_BRANCHES: &str = "refs/heads/datacenters/";

/// A branch or tag name without `refs/heads/` or `refs/tags/`; `None` for other refs.
pub fn short_name(ref_name: &str) -> Option<&str> {
    ref_name.strip_prefix(HEADS).or_else(|| ref_name.strip_prefix(TAGS))
}

/// The datacenter whose document a ref holds: `refs/heads/datacenters/dc1` is `dc1`'s.
pub fn datacenter_of(ref_name: &str) -> Option<&str> {
    ref_name.strip_prefix(DATACENTER_BRANCHES).filter(|dc| !dc.is_empty())
}

/// Whether a ref is a branch or tag of a datacenter-configuration.
pub fn is_configuration(ref_name: &str) -> bool {
    ref_name.starts_with(CONFIGURATION_BRANCHES) || ref_name.starts_with(CONFIGURATION_TAGS)
}

impl Kind {
    /// The prefix of the branches of `<kind>s/<name>`: `refs/heads/<kind>s/<name>/`.
    pub fn branch_prefix(self, name: &str) -> String {
        format!("{HEADS}{}/{name}/", self.plural())
    }

    /// The prefix of the tags of `<kind>s/<name>`: `refs/tags/<kind>s/<name>/`.
    pub fn tag_prefix(self, name: &str) -> String {
        format!("{TAGS}{}/{name}/", self.plural())
    }

    /// The kind and name a branch or tag of a pinned tree belongs to:
    /// `refs/tags/services/web/v1` is service `web`'s.
    pub fn of_ref(ref_name: &str) -> Option<(Kind, &str)> {
        let rest = short_name(ref_name)?;
        Kind::ALL.into_iter().find_map(|kind| {
            let (name, version) = rest.strip_prefix(kind.plural())?.strip_prefix('/')?.split_once('/')?;
            (!name.is_empty() && !version.is_empty()).then_some((kind, name))
        })
    }
}

/// The `conf` value that names a datacenter-configuration ref, the inverse of
/// [`crate::DatacenterDoc::conf_ref`]: `refs/tags/datacenter-configuration/big/v1` is
/// `datacenter-configuration/big/v1`. `None` for any other ref.
pub fn conf_naming(ref_name: &str) -> Option<String> {
    let (rest, parts) = match ref_name.strip_prefix(CONFIGURATION_BRANCHES) {
        Some(name) => (name, 1),
        None => (ref_name.strip_prefix(CONFIGURATION_TAGS)?, 2),
    };
    let valid = rest.split('/').count() == parts && rest.split('/').all(valid_component);
    valid.then(|| format!("{CONFIGURATION_NAMESPACE}{rest}"))
}

/// The part of git's `check-ref-format` rules that applies to one path component.
pub fn valid_component(c: &str) -> bool {
    !c.is_empty()
        && !c.starts_with('.')
        && !c.ends_with(".lock")
        && !c.contains("..")
        && !c.contains("@{")
        && !c.bytes().any(|b| b < 0x20 || b == 0x7f || b" ~^:?*[\\".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespaces_name_their_owner() {
        assert_eq!(short_name("refs/tags/services/web/v1"), Some("services/web/v1"));
        assert_eq!(short_name("refs/notes/x"), None);
        assert_eq!(datacenter_of("refs/heads/datacenters/dc1"), Some("dc1"));
        assert_eq!(datacenter_of("refs/heads/datacenters/"), None);
        assert!(is_configuration("refs/tags/datacenter-configuration/big/v1"));
        assert!(!is_configuration("refs/heads/services/big/v1"));
        assert!(!valid_component("a..b") && !valid_component(".x") && valid_component("v1.0"));
    }
}
