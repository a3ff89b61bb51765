//! pre-receive's check of the control documents a push writes: a `datacenter.json` or
//! `datacenter-configuration.json` must be there and validate (what they name is
//! [`crate::cross_refs`]'s to check), and a configuration tree must be deliverable
//! ([`crate::containment`]).

use confcast_schemas::document::{CONFIGURATION_FILE, DATACENTER_FILE};
use confcast_schemas::{refs, DatacenterConfiguration, DatacenterDoc};
use git2::Repository;

use crate::{containment, RefUpdate, Rejection};

/// Which control document a ref holds, if any.
pub fn control_file(ref_name: &str) -> Option<&'static str> {
    if ref_name.starts_with(refs::DATACENTER_BRANCHES) {
        Some(DATACENTER_FILE)
    } else if refs::is_configuration(ref_name) {
        Some(CONFIGURATION_FILE)
    } else {
        None
    }
}

/// Validates one ref update: its control document, or its configuration tree
/// (deletions always pass).
pub fn validate(repo: &Repository, update: &RefUpdate) -> Result<(), Rejection> {
    validate_document(repo, update)?;
    containment::check(repo, update)
}

/// Validates the control document of one ref update, if its ref holds one.
fn validate_document(repo: &Repository, update: &RefUpdate) -> Result<(), Rejection> {
    let (Some(file), Some(new)) = (control_file(&update.ref_name), update.new) else {
        return Ok(());
    };
    let git = |error| Rejection::Git { ref_name: update.ref_name.clone(), error };
    let tree = repo.find_object(new, None).and_then(|o| o.peel_to_tree()).map_err(git)?;
    let entry = tree.get_name(file).ok_or_else(|| Rejection::Missing { ref_name: update.ref_name.clone(), file })?;
    let blob = entry.to_object(repo).and_then(|o| o.peel_to_blob()).map_err(git)?;
    let invalid = |error| Rejection::Invalid { ref_name: update.ref_name.clone(), error };
    if file == DATACENTER_FILE {
        DatacenterDoc::parse(blob.content()).map_err(invalid)?;
    } else {
        DatacenterConfiguration::parse(blob.content()).map_err(invalid)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_files_by_namespace() {
        assert_eq!(control_file("refs/heads/datacenters/dc1"), Some(DATACENTER_FILE));
        assert_eq!(control_file("refs/tags/datacenter-configuration/big/v1"), Some(CONFIGURATION_FILE));
        assert_eq!(control_file("refs/heads/services/a/main"), None);
    }
}
