//! Staged rollout policies, as the control documents write them: in
//! `datacenter-configuration.json`, a top-level `"rollout"` is the default of every
//! entry and an entry's own `"rollout"` overrides it ([`Policy`]); in
//! `datacenter.json`, `"rollout": {"after": [...]}` names the datacenters a commit must
//! have completed in, healthy, before this one starts it ([`DatacenterRollout`]).
//!
//! Validation is strict and names the field, as for every other part of the
//! documents: waves are cumulative targets that never shrink and end at `"100%"`, so a
//! reader of the document sees where a rollout ends.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::kind::{Kind, ServiceId};

/// The longest bake a wave may ask for: a day. Longer is surely a unit mistake.
pub const MAX_BAKE_SECS: u64 = 24 * 3600;
/// How long a wave host has to report, unless the policy says otherwise.
pub const DEFAULT_REPORT_TIMEOUT_SECS: u64 = 60;

/// How a change of one service rolls out in a datacenter.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// Cumulative targets, each a host count (`1`) or a percentage of the hosts that
    /// follow the service (`"25%"`); the last must be `"100%"`.
    pub waves: Vec<Wave>,
    /// How long a wave must stay healthy before the next begins.
    #[serde(default)]
    pub bake_secs: u64,
    /// Unhealthy hosts a wave tolerates.
    #[serde(default)]
    pub max_unhealthy: u32,
    /// A wave host that has not reported by then counts as unhealthy.
    #[serde(default = "default_report_timeout")]
    pub report_timeout_secs: u64,
}

fn default_report_timeout() -> u64 {
    DEFAULT_REPORT_TIMEOUT_SECS
}

/// One wave's cumulative target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum Wave {
    /// This many hosts in all.
    Hosts(u32),
    /// This share of the hosts that follow the service, e.g. `"25%"`.
    Percent(String),
}

/// `datacenter.json`'s rollout settings.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DatacenterRollout {
    /// Datacenters in which a commit must be complete and healthy before this one
    /// starts rolling it out.
    #[serde(default)]
    pub after: Vec<String>,
}

impl Wave {
    /// The share of hosts this wave reaches, in hundredths of a percent, for a
    /// percentage; `None` for a host count. The error says what is wrong.
    fn basis_points(&self) -> Result<Option<u32>, String> {
        let Wave::Percent(text) = self else { return Ok(None) };
        let number = text.strip_suffix('%').ok_or_else(|| format!("{text:?} is neither a host count nor \"N%\""))?;
        let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
        let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        if !digits(whole) || !(fraction.is_empty() || digits(fraction) && fraction.len() <= 2) {
            return Err(format!("{text:?} is not a percentage like \"25%\" or \"12.5%\""));
        }
        let whole: u32 = whole.parse().map_err(|_| format!("{text:?} is too large"))?;
        let fraction: u32 = format!("{fraction:0<2}").parse().unwrap_or(0);
        let points = whole.saturating_mul(100).saturating_add(fraction);
        if points == 0 || points > 10_000 {
            return Err(format!("{text:?} must be more than 0% and at most 100%"));
        }
        Ok(Some(points))
    }

    /// How many of `hosts` hosts this wave reaches in all (a percentage rounds up, so
    /// a wave is never empty; a count is capped at `hosts`).
    pub fn target(&self, hosts: usize) -> usize {
        match (self, self.basis_points()) {
            (Wave::Hosts(n), _) => (*n as usize).min(hosts),
            (Wave::Percent(_), Ok(Some(points))) => (hosts * points as usize).div_ceil(10_000),
            // Refused by `validate`: never reached for a parsed document.
            (Wave::Percent(_), _) => hosts,
        }
    }
}

impl Policy {
    /// One wave of every host, no bake: how a datacenter that follows others
    /// (`rollout.after`) rolls out a service without a policy of its own.
    pub fn all_at_once() -> Policy {
        Policy {
            waves: vec![Wave::Percent("100%".to_owned())],
            bake_secs: 0,
            max_unhealthy: 0,
            report_timeout_secs: DEFAULT_REPORT_TIMEOUT_SECS,
        }
    }

    /// Checks the policy; the error names the field (below `at`) and the problem.
    pub fn validate(&self, at: &str) -> Result<(), (String, String)> {
        let field = |name: &str| format!("{at}.{name}");
        if self.waves.is_empty() {
            return Err((field("waves"), "must list at least one wave, the last \"100%\"".to_owned()));
        }
        let (mut last_count, mut last_points) = (0u32, 0u32);
        for (i, wave) in self.waves.iter().enumerate() {
            let here = field(&format!("waves[{i}]"));
            match (wave, wave.basis_points().map_err(|why| (here.clone(), why))?) {
                (Wave::Hosts(0), _) => return Err((here, "a wave reaches at least 1 host".to_owned())),
                (Wave::Hosts(n), _) if *n < last_count => {
                    return Err((
                        here,
                        format!("waves are cumulative: {n} hosts is fewer than the {last_count} before"),
                    ))
                }
                (Wave::Hosts(n), _) => last_count = *n,
                (_, Some(points)) if points < last_points => {
                    return Err((here, "waves are cumulative: a smaller share than the wave before".to_owned()))
                }
                (_, Some(points)) => last_points = points,
                (_, None) => {}
            }
        }
        if self.waves.last().and_then(|w| w.basis_points().ok().flatten()) != Some(10_000) {
            return Err((
                field("waves"),
                "the last wave must be \"100%\", so the rollout reaches every host".to_owned(),
            ));
        }
        if self.bake_secs > MAX_BAKE_SECS {
            return Err((field("bake_secs"), format!("{} s is more than a day ({MAX_BAKE_SECS} s)", self.bake_secs)));
        }
        if self.report_timeout_secs == 0 {
            return Err((field("report_timeout_secs"), "must be at least 1 second".to_owned()));
        }
        Ok(())
    }

    /// The cumulative host count of each wave among `hosts` hosts: never shrinking,
    /// the last one all of them.
    pub fn targets(&self, hosts: usize) -> Vec<usize> {
        let mut reached = 0;
        self.waves
            .iter()
            .map(|wave| {
                reached = wave.target(hosts).max(reached);
                reached
            })
            .collect()
    }
}

/// The hosts of each wave of the rollout of `commit` of `service` in datacenter `dc`:
/// `hosts` (those that reported a status for the service) ordered by
/// `sha256(dc/kind/name/commit/host)` — stable for a commit, whatever order they are
/// given in, and a different canary for each commit — and cut at the policy's
/// cumulative targets. Each host is in exactly one wave; wave *i* reaches the hosts of
/// waves 0 to *i*.
pub fn plan(policy: &Policy, dc: &str, service: &ServiceId, commit: &str, hosts: &[String]) -> Vec<Vec<String>> {
    use sha2::{Digest, Sha256};
    let mut ranked: Vec<([u8; 32], &String)> = hosts
        .iter()
        .map(|host| {
            let key = format!("{dc}/{}/{}/{commit}/{host}", service.kind, service.name);
            (Sha256::digest(key.as_bytes()).into(), host)
        })
        .collect();
    ranked.sort();
    ranked.dedup_by(|a, b| a.1 == b.1);
    let mut waves = Vec::new();
    let mut taken = 0;
    for target in policy.targets(ranked.len()) {
        waves.push(ranked[taken..target].iter().map(|(_, host)| (*host).clone()).collect());
        taken = target;
    }
    waves
}

/// Where the rollout of one commit of one service stands in a datacenter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// Waiting for the datacenters of `datacenter.json`'s `rollout.after` to complete
    /// the commit: no host takes it yet.
    Waiting,
    /// A wave is being applied or is baking.
    Rolling,
    /// An operator paused it: no further wave starts.
    Paused,
    /// A wave failed, or an operator aborted it: hosts that took the commit go back.
    Halted,
    /// Every wave passed.
    Complete,
    /// An operator skipped the remaining waves.
    Promoted,
}

impl Phase {
    /// The phase as `publisher status` and the logs write it.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Waiting => "waiting",
            Phase::Rolling => "rolling",
            Phase::Paused => "paused",
            Phase::Halted => "halted",
            Phase::Complete => "complete",
            Phase::Promoted => "promoted",
        }
    }

    /// Whether the rollout is over: every host takes the commit (complete, promoted)
    /// or none does any more (halted).
    pub fn is_final(self) -> bool {
        matches!(self, Phase::Halted | Phase::Complete | Phase::Promoted)
    }
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The rollout of one commit of one service in a datacenter, as its relay writes it on
/// the state stream (one message per service, [`crate::subject::rollout_subject`]),
/// signed like every message of the relay. Hosts read it to know whether they may take
/// the commit; `publisher status` to show where it stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutState {
    /// Wire version.
    pub v: u16,
    /// Datacenter id.
    pub dc: String,
    /// The service.
    pub kind: Kind,
    /// Its name.
    pub name: String,
    /// The ref the commit was resolved through.
    pub ref_name: String,
    /// The commit rolled out.
    pub commit: String,
    /// Its tree: what a released host builds.
    pub tree: Option<String>,
    /// The last commit whose rollout completed: what hosts outside the released waves
    /// hold, what new hosts get, and what hosts go back to when the rollout halts.
    pub previous: Option<String>,
    /// Its tree.
    pub previous_tree: Option<String>,
    /// The policy it follows.
    pub policy: Policy,
    /// Each wave's hosts ([`plan`]).
    pub waves: Vec<Vec<String>>,
    /// The current wave.
    pub wave: usize,
    /// When the current wave began, ms since the Unix epoch.
    pub wave_started_ms: u64,
    /// Since when every host of the released waves has been healthy at the commit;
    /// the next wave begins `policy.bake_secs` after it.
    #[serde(default)]
    pub healthy_since_ms: Option<u64>,
    /// Where it stands.
    pub phase: Phase,
    /// Whether its first wave was released: false while it waits for the datacenters
    /// it follows (`after`), and while paused before that.
    #[serde(default)]
    pub started: bool,
    /// Why it is waiting, paused, halted or promoted, in words.
    #[serde(default)]
    pub reason: Option<String>,
    /// The unhealthy hosts of a halted rollout, with each reason.
    #[serde(default)]
    pub unhealthy: BTreeMap<String, String>,
    /// When the rollout began (the relay published the commit), ms since the Unix epoch.
    pub started_ms: u64,
    /// When this state was written, ms since the Unix epoch.
    pub updated_ms: u64,
}

impl crate::message::Versioned for RolloutState {
    fn version(&self) -> u16 {
        self.v
    }
}

impl RolloutState {
    /// Whether `host` may apply [`RolloutState::commit`]: its wave is released, or the
    /// rollout completed or was promoted. Never while waiting or halted.
    pub fn releases(&self, host: &str) -> bool {
        match self.phase {
            Phase::Complete | Phase::Promoted => true,
            Phase::Halted | Phase::Waiting => false,
            Phase::Rolling | Phase::Paused => self.released().any(|h| h == host),
        }
    }

    /// The hosts of the waves released so far (none before it started).
    pub fn released(&self) -> impl Iterator<Item = &String> {
        let waves = if self.started && self.phase != Phase::Waiting { self.wave + 1 } else { 0 };
        self.waves.iter().take(waves).flatten()
    }

    /// The service.
    pub fn service(&self) -> ServiceId {
        ServiceId::new(self.kind, self.name.clone())
    }

    /// When the current wave's bake ends, if every host of it is healthy.
    pub fn bake_ends_ms(&self) -> Option<u64> {
        self.healthy_since_ms.map(|since| since + self.policy.bake_secs * 1000)
    }

    /// Whether `target`, as an operator names a rollout, is this one: its ref (in full,
    /// or without `refs/heads/` or `refs/tags/`), its commit, or an unambiguous prefix
    /// of the commit of at least 7 hex digits.
    pub fn is_named(&self, target: &str) -> bool {
        let short = |prefix: &str| self.ref_name.strip_prefix(prefix).is_some_and(|rest| rest == target);
        target == self.ref_name
            || short("refs/heads/")
            || short("refs/tags/")
            || target.len() >= 7 && target.bytes().all(|b| b.is_ascii_hexdigit()) && self.commit.starts_with(target)
    }
}

/// What an operator asks of a rollout ([`Control`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// No further wave starts; the hosts keep what they hold.
    Pause,
    /// A paused rollout goes on; a halted one starts again from its first wave.
    Resume,
    /// Halt now: every host that took the commit goes back.
    Abort,
    /// Skip the remaining waves: every host takes the commit now.
    Promote,
}

impl Action {
    /// The action as the command line writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Pause => "pause",
            Action::Resume => "resume",
            Action::Abort => "abort",
            Action::Promote => "promote",
        }
    }
}

impl std::str::FromStr for Action {
    type Err = String;

    fn from_str(s: &str) -> Result<Action, String> {
        match s {
            "pause" => Ok(Action::Pause),
            "resume" => Ok(Action::Resume),
            "abort" => Ok(Action::Abort),
            "promote" => Ok(Action::Promote),
            other => Err(format!("{other:?} is not pause, resume, abort or promote")),
        }
    }
}

/// How long a control message stays valid: one older (or further in the future) is
/// refused, so a signed control captured on the wire cannot be replayed later.
pub const CONTROL_VALIDITY_MS: u64 = 60_000;

/// An operator's request about the rollouts of one datacenter, sent by `publisher
/// rollout` on [`crate::subject::control_subject`] as a NATS request, signed with the
/// operator's key when the relay trusts keys (`relay --trusted-key`). The relay that
/// holds the datacenter's lease answers with a [`ControlReply`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Control {
    /// Wire version.
    pub v: u16,
    /// Datacenter id.
    pub dc: String,
    /// What to do.
    pub action: Action,
    /// Which rollouts: a ref or a commit ([`RolloutState::is_named`]).
    pub target: String,
    /// Who asks (the operator's user and host), for the logs and the state's reason.
    pub by: String,
    /// When it was sent, ms since the Unix epoch ([`CONTROL_VALIDITY_MS`]).
    pub at_ms: u64,
    /// A random value, so that the relay can refuse the same message twice.
    pub nonce: String,
}

impl crate::message::Versioned for Control {
    fn version(&self) -> u16 {
        self.v
    }
}

/// The relay's answer to a [`Control`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControlReply {
    /// Wire version.
    pub v: u16,
    /// Datacenter id.
    pub dc: String,
    /// The rollouts changed, each as `<kind> <name> <commit>: <old phase> -> <new phase>`.
    pub changed: Vec<String>,
    /// Why nothing was done, when nothing was: a refused signature, no rollout named
    /// `target`, or an action that does not apply to the rollout's phase.
    pub refused: Option<String>,
}

impl crate::message::Versioned for ControlReply {
    fn version(&self) -> u16 {
        self.v
    }
}

#[cfg(test)]
mod tests;
