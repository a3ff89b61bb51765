//! Operators' controls of the rollouts (`publisher rollout pause|resume|abort|promote`):
//! NATS requests on the datacenter's control subject, answered by the relay that holds
//! the lease. With trusted keys (`relay --trusted-key`), a control must be signed by one
//! of them, recent ([`CONTROL_VALIDITY_MS`]) and not seen before: a forged or replayed
//! "promote" or "abort" is refused and said.

use std::collections::HashMap;
use std::sync::Arc;

use confcast_schemas::message::now_ms;
use confcast_schemas::rollout::{Action, Control, ControlReply, Phase, RolloutState, CONTROL_VALIDITY_MS};
use confcast_schemas::sign::{Verifier, SIGNATURE_HEADER};
use confcast_schemas::{decode, encode, subject, WIRE_VERSION};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use super::Rollouts;

/// Answers the datacenter's rollout controls until `stop`.
pub(crate) async fn serve(rollouts: Arc<Rollouts>, verifier: Arc<Verifier>, stop: CancellationToken) {
    let client = rollouts.bus.client().clone();
    let subject = subject::control_subject(&rollouts.dc);
    let mut requests = match client.subscribe(subject.clone()).await {
        Ok(requests) => requests,
        Err(e) => {
            tracing::error!(%subject, error = %e, "cannot take rollout controls");
            return;
        }
    };
    let mut seen = Seen::default();
    loop {
        let request = tokio::select! {
            request = requests.next() => request,
            () = stop.cancelled() => return,
        };
        let Some(request) = request else { return };
        let reply = rollouts.answer(&request, &verifier, &mut seen).await;
        if let Some(refused) = &reply.refused {
            tracing::warn!(dc = %rollouts.dc, "refused a rollout control: {refused}");
        }
        if let Some(to) = request.reply {
            if let Err(e) = client.publish(to, encode(&reply).into()).await {
                tracing::warn!(error = %e, "could not answer a rollout control");
            }
        }
    }
}

/// The nonces of the controls accepted within their validity.
#[derive(Default)]
struct Seen(HashMap<String, u64>);

impl Seen {
    /// Records `nonce`; false when it was seen already.
    fn first(&mut self, nonce: &str, now: u64) -> bool {
        self.0.retain(|_, at| now.saturating_sub(*at) <= 2 * CONTROL_VALIDITY_MS);
        self.0.insert(nonce.to_owned(), now).is_none()
    }
}

impl Rollouts {
    /// What to answer `request`, after doing what it asks if it may.
    async fn answer(&self, request: &async_nats::Message, verifier: &Verifier, seen: &mut Seen) -> ControlReply {
        let refuse = |why: String| ControlReply {
            v: WIRE_VERSION,
            dc: self.dc.clone(),
            changed: Vec::new(),
            refused: Some(why),
        };
        let signature = request.headers.as_ref().and_then(|h| h.get(SIGNATURE_HEADER)).map(|v| v.as_str());
        if let Err(e) = verifier.verify(request.subject.as_str(), None, &request.payload, signature) {
            return refuse(format!("control refused: {e}"));
        }
        let control = match decode::<Control>(&request.payload) {
            Ok(control) => control,
            Err(e) => return refuse(format!("control refused: {e}")),
        };
        let now = now_ms();
        if control.dc != self.dc {
            return refuse(format!("control refused: it is for datacenter {:?}, this is {:?}", control.dc, self.dc));
        }
        if now.abs_diff(control.at_ms) > CONTROL_VALIDITY_MS {
            return refuse(format!(
                "control refused: sent at {} ms, more than {} s from this relay's clock ({now} ms)",
                control.at_ms,
                CONTROL_VALIDITY_MS / 1000
            ));
        }
        if !seen.first(&control.nonce, now) {
            return refuse("control refused: the same control was received before (a replay)".to_owned());
        }
        match self.apply(&control).await {
            Ok(changed) if changed.is_empty() => refuse(format!(
                "no rollout named {:?} can be {}d in {}",
                control.target,
                control.action.as_str(),
                self.dc
            )),
            Ok(changed) => ControlReply { v: WIRE_VERSION, dc: self.dc.clone(), changed, refused: None },
            Err(e) => {
                refuse(format!("could not write the rollout state: {}", confcast_schemas::process::error_chain(&e)))
            }
        }
    }

    /// Applies `control` to every rollout it names whose phase it applies to; says
    /// what changed.
    async fn apply(&self, control: &Control) -> Result<Vec<String>, crate::error::BusError> {
        let mut states = self.states.lock().await;
        let named: Vec<RolloutState> = states.values().filter(|s| s.is_named(&control.target)).cloned().collect();
        let mut changed = Vec::new();
        for state in named {
            let Some(next) = act(&state, control, !self.after().is_empty(), now_ms()) else { continue };
            let (kind, name, commit) = (state.kind, &state.name, &state.commit);
            let line = format!("{kind} {name} {}: {} -> {}", &commit[..commit.len().min(12)], state.phase, next.phase);
            tracing::warn!(%kind, %name, %commit, by = %control.by, action = control.action.as_str(), "{line}");
            self.write(&mut states, next).await?;
            changed.push(line);
        }
        Ok(changed)
    }
}

/// The state `control` makes of `state` at `now`, if it applies to its phase. A
/// datacenter that follows others (`after`) resumes into `waiting`, which goes on at
/// once with the same wave when they completed the commit.
fn act(state: &RolloutState, control: &Control, after: bool, now: u64) -> Option<RolloutState> {
    let by = format!("{}d by {}", control.action.as_str(), control.by);
    let resumed = if after { Phase::Waiting } else { Phase::Rolling };
    let restarted = |phase: Phase| RolloutState {
        phase,
        // Resumed straight into rolling (no datacenter to wait for), its waves are
        // released from the current one.
        started: state.started || phase == Phase::Rolling,
        reason: Some(by.clone()),
        wave_started_ms: now,
        healthy_since_ms: None,
        ..state.clone()
    };
    match (control.action, state.phase) {
        (Action::Pause, Phase::Rolling | Phase::Waiting) => {
            Some(RolloutState { phase: Phase::Paused, reason: Some(by), ..state.clone() })
        }
        // A paused rollout goes on with its current wave, whose bake starts again.
        (Action::Resume, Phase::Paused) => Some(restarted(resumed)),
        // A halted one starts again from its first wave.
        (Action::Resume, Phase::Halted) => {
            Some(RolloutState { wave: 0, unhealthy: Default::default(), ..restarted(resumed) })
        }
        (Action::Abort, Phase::Rolling | Phase::Waiting | Phase::Paused) => {
            Some(RolloutState { phase: Phase::Halted, reason: Some(by), ..state.clone() })
        }
        (Action::Promote, Phase::Rolling | Phase::Waiting | Phase::Paused | Phase::Halted) => Some(RolloutState {
            phase: Phase::Promoted,
            reason: Some(by),
            unhealthy: Default::default(),
            ..state.clone()
        }),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn control(action: Action) -> Control {
        Control {
            v: WIRE_VERSION,
            dc: "dc1".into(),
            action,
            target: "c1".into(),
            by: "ops@laptop".into(),
            at_ms: 5,
            nonce: "n".into(),
        }
    }

    fn state(phase: Phase) -> RolloutState {
        RolloutState {
            v: WIRE_VERSION,
            dc: "dc1".into(),
            kind: confcast_schemas::Kind::Service,
            name: "s0".into(),
            ref_name: "refs/heads/services/s0/master".into(),
            commit: "c1".into(),
            tree: None,
            previous: Some("c0".into()),
            previous_tree: None,
            policy: serde_json::from_str(r#"{"waves": [1, "100%"]}"#).expect("policy"),
            waves: vec![vec!["a".into()], vec!["b".into()]],
            wave: 1,
            wave_started_ms: 1,
            healthy_since_ms: Some(2),
            phase,
            started: true,
            reason: None,
            unhealthy: [("a".to_owned(), "sick".to_owned())].into(),
            started_ms: 1,
            updated_ms: 1,
        }
    }

    #[test]
    fn each_action_applies_to_the_phases_it_names() {
        let paused = act(&state(Phase::Rolling), &control(Action::Pause), false, 9).expect("pauses");
        assert_eq!((paused.phase, paused.reason.as_deref()), (Phase::Paused, Some("paused by ops@laptop")));
        let resumed = act(&paused, &control(Action::Resume), false, 9).expect("resumes");
        assert_eq!((resumed.phase, resumed.wave, resumed.healthy_since_ms), (Phase::Rolling, 1, None));
        let again = act(&state(Phase::Halted), &control(Action::Resume), false, 9).expect("starts again");
        assert_eq!((again.phase, again.wave, again.unhealthy.len()), (Phase::Rolling, 0, 0));
        assert_eq!(act(&state(Phase::Paused), &control(Action::Abort), false, 9).expect("aborts").phase, Phase::Halted);
        assert_eq!(
            act(&state(Phase::Halted), &control(Action::Promote), false, 9).expect("promotes").phase,
            Phase::Promoted
        );
        assert!(act(&state(Phase::Complete), &control(Action::Abort), false, 9).is_none(), "a complete rollout stays");
        assert!(act(&state(Phase::Rolling), &control(Action::Resume), false, 9).is_none());
        let never_started = RolloutState { started: false, ..paused.clone() };
        let resumed = act(&never_started, &control(Action::Resume), false, 9).expect("resumes");
        assert!(resumed.started && resumed.released().count() > 0, "resumed into rolling, its waves are released");
        let following = act(&paused, &control(Action::Resume), true, 9).expect("resumes");
        assert_eq!((following.phase, following.wave), (Phase::Waiting, 1), "waits for the others again");
    }

    #[test]
    fn a_nonce_is_accepted_once() {
        let mut seen = Seen::default();
        assert!(seen.first("n", 1) && !seen.first("n", 2) && seen.first("m", 2));
    }
}
