//! The push options confcast understands (`git push -o ...`), as git hands them to
//! pre-receive.

use crate::suggest::{did_you_mean, nearest};

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
