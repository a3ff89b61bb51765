//! What a rollout is about: a commit, a ref, or a ref just pushed.

use confcast_schemas::refs;

/// A commit id shortened as git does (7 digits).
pub fn short(commit: &str) -> String {
    commit.chars().take(7).collect()
}

/// What a rollout is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A commit id or a prefix of one (at least 7 hex digits, lower case): every service
    /// whose relay published a commit starting with it, and the same service in the
    /// datacenters whose relays have not published it yet.
    Commit(String),
    /// A ref, as `refs/heads/...`, `refs/tags/...` or short (`services/web/master`,
    /// tried as a branch, then as a tag): every service that follows it, at the commit
    /// the datacenter's relay published for it.
    Ref(String),
    /// A ref that was just pushed to `commit` (what the post-receive hook waits for):
    /// every service that follows `ref_name` must reach `commit`, or the commit the ref
    /// moved on to when a later push overtook this one.
    RefAt {
        /// The full ref name.
        ref_name: String,
        /// The pushed commit.
        commit: String,
        /// The commit the ref pointed at before the push, if any.
        old: Option<String>,
    },
}

impl Target {
    /// Reads a `publisher status` argument: 7 to 40 hex digits are a commit (prefix),
    /// anything else a ref.
    pub fn parse(arg: &str) -> Target {
        let arg = arg.trim();
        if (7..=40).contains(&arg.len()) && arg.bytes().all(|b| b.is_ascii_hexdigit()) {
            Target::Commit(arg.to_ascii_lowercase())
        } else {
            Target::Ref(arg.to_owned())
        }
    }

    /// Whether the target is known to be final as soon as the heads are read: a ref is
    /// followed or not, while a commit may still be on its way to the relays.
    pub(crate) fn known_from_heads(&self) -> bool {
        !matches!(self, Target::Commit(_))
    }

    /// Whether a service following `ref_name` is concerned.
    pub(crate) fn follows_ref(&self, ref_name: &str) -> bool {
        match self {
            Target::Commit(_) => false,
            Target::Ref(r) => ref_name == r || refs::short_name(ref_name) == Some(r.as_str()),
            Target::RefAt { ref_name: r, .. } => ref_name == r,
        }
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Commit(c) => f.write_str(c),
            Target::Ref(r) => f.write_str(r),
            Target::RefAt { ref_name, commit, .. } => write!(f, "{ref_name} at {}", short(commit)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    const REF: &str = "refs/heads/services/service0/master";

    #[test]
    fn parses_commits_and_refs() {
        assert_eq!(Target::parse("1A2B3C4"), Target::Commit("1a2b3c4".into()));
        assert_eq!(Target::parse(A), Target::Commit(A.into()));
        assert_eq!(Target::parse("1a2b3c"), Target::Ref("1a2b3c".into()), "too short for a commit");
        assert_eq!(Target::parse("services/web/master"), Target::Ref("services/web/master".into()));
    }

    #[test]
    fn refs_match_full_short_and_tag_names() {
        let short = Target::Ref("services/service0/master".into());
        assert!(short.follows_ref(REF));
        assert!(Target::Ref(REF.into()).follows_ref(REF));
        assert!(Target::Ref("services/s/v1".into()).follows_ref("refs/tags/services/s/v1"));
        assert!(!short.follows_ref("refs/heads/services/service0/master2"));
    }
}
