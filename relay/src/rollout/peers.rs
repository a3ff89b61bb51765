//! `rollout.after`: where the rollout of a commit stands in the datacenters this one
//! follows, read from their state streams (in their own JetStream domains with
//! `relay --rollout-domains`).

use confcast_schemas::message::now_ms;
use confcast_schemas::rollout::{Phase, RolloutState};
use confcast_schemas::{decode, subject, ServiceHead};

use super::Rollouts;
use crate::error::BusError;

impl Rollouts {
    /// The state of a waiting rollout once every datacenter it follows completed the
    /// commit; `None` while it must wait (the reason updated when it changed).
    pub(super) async fn after_done(&self, state: &RolloutState) -> Result<Option<RolloutState>, BusError> {
        let mut waiting_for = Vec::new();
        for dc in self.after() {
            match self.peer_state(&dc, state).await {
                PeerState::Complete => {}
                PeerState::Halted => waiting_for.push(format!("{dc} halted it")),
                PeerState::Under(phase) => waiting_for.push(format!("{dc} ({phase})")),
                PeerState::Unknown(why) => waiting_for.push(format!("{dc} ({why})")),
            }
        }
        let now = now_ms();
        let next = match waiting_for.is_empty() {
            true => RolloutState {
                phase: Phase::Rolling,
                started: true,
                reason: None,
                wave_started_ms: now,
                healthy_since_ms: None,
                ..state.clone()
            },
            false => {
                let reason = Some(format!("waiting for {}", waiting_for.join(", ")));
                if reason == state.reason {
                    return Ok(None);
                }
                RolloutState { reason, ..state.clone() }
            }
        };
        Ok(Some(next))
    }

    /// Where the rollout of `state`'s commit stands in datacenter `dc`.
    async fn peer_state(&self, dc: &str, state: &RolloutState) -> PeerState {
        let js = match self.peers.domains {
            true => async_nats::jetstream::with_domain(self.bus.client().clone(), dc),
            false => async_nats::jetstream::new(self.bus.client().clone()),
        };
        let stream = match js.get_stream(subject::state_stream(dc)).await {
            Ok(stream) => stream,
            Err(e) => return PeerState::Unknown(format!("its state cannot be read: {e}")),
        };
        let last = |subject: String| {
            let stream = stream.clone();
            async move { stream.get_last_raw_message_by_subject(&subject).await.ok().map(|m| m.payload.to_vec()) }
        };
        let service = state.service();
        let theirs = last(subject::rollout_subject(dc, service.kind, &service.name)).await;
        match theirs.and_then(|p| decode::<RolloutState>(&p).ok()) {
            Some(theirs) if theirs.commit == state.commit => match theirs.phase {
                Phase::Complete | Phase::Promoted => PeerState::Complete,
                Phase::Halted => PeerState::Halted,
                phase => PeerState::Under(phase),
            },
            // No rollout of this commit there: it rolled out at once if its head is there.
            _ => {
                let head = last(subject::head_subject(dc, service.kind, &service.name)).await;
                match head.and_then(|p| decode::<ServiceHead>(&p).ok()) {
                    Some(head) if head.commit.as_deref() == Some(state.commit.as_str()) => PeerState::Complete,
                    _ => PeerState::Unknown("not published there yet".to_owned()),
                }
            }
        }
    }
}

/// Where a commit's rollout stands in another datacenter.
enum PeerState {
    Complete,
    Halted,
    Under(Phase),
    Unknown(String),
}
