//! A host's verdict on a service, carried by its status reports ([`crate::HostStatus`])
//! and shown by its local API.

use serde::{Deserialize, Serialize};

/// A host's judgement of one service: the last word of its checks.
///
/// Its fields are declared in alphabetical order: the host's local API serves it as JSON,
/// whose keys are in that order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Health {
    /// When it was judged, ms since the Unix epoch.
    pub at_ms: u64,
    /// Why it is not healthy: the command, how it ended and the first lines it wrote.
    #[serde(default)]
    pub reason: Option<String>,
    /// The verdict.
    pub state: HealthState,
}

/// The verdict of a [`Health`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HealthState {
    /// Every check passed.
    Healthy,
    /// A check failed, or a change was refused: see [`Health::reason`].
    Unhealthy,
    /// The host went back to the previous commit because a rollout halted.
    Reverted,
}

impl Health {
    /// Every check passed, at `at_ms`.
    pub fn healthy(at_ms: u64) -> Health {
        Health { at_ms, reason: None, state: HealthState::Healthy }
    }

    /// A check failed at `at_ms`, for `reason`.
    pub fn unhealthy(at_ms: u64, reason: impl Into<String>) -> Health {
        Health { at_ms, reason: Some(reason.into()), state: HealthState::Unhealthy }
    }

    /// Whether every check passed.
    pub fn is_healthy(&self) -> bool {
        self.state == HealthState::Healthy
    }
}
