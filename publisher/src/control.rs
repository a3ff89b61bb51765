//! `publisher rollout pause|resume|abort|promote`: an operator's control of the
//! rollouts in waves of a ref or commit, sent to each datacenter's relay.
//!
//! A control is a NATS request on `confcast-control.dc.<dc>.rollout` carrying a
//! [`Control`], signed with the operator's key when one is given; the relay holding the
//! datacenter's lease answers with a [`ControlReply`]: what changed, or why nothing did.
//! Without `--dc`, it goes to every datacenter whose relay has a rollout state naming
//! the target (or, when the states cannot be read, to every datacenter found), and a
//! datacenter that has no such rollout is then not an error as long as another one
//! changed something.

use std::io::Read as _;
use std::path::Path;
use std::time::Duration;

use async_nats::jetstream;
use async_nats::{HeaderMap, RequestErrorKind};
use confcast_schemas::connect::{redact_url, ConnectError, NatsAuth};
use confcast_schemas::message::now_ms;
use confcast_schemas::rollout::{Action, Control, ControlReply, RolloutState};
use confcast_schemas::sign::{SignatureError, Signer, SIGNATURE_HEADER};
use confcast_schemas::{decode, encode, streams, subject, WIRE_VERSION};
use futures::StreamExt;

use crate::bus::connect;
use crate::rollout::{datacenters, WatchError};

/// How a relay words a refusal because it has no rollout the target names (the start
/// of [`ControlReply::refused`]).
const NO_ROLLOUT_NAMED: &str = "no rollout named";

/// What `publisher rollout` is asked.
#[derive(Debug)]
pub struct ControlRequest {
    /// What to do.
    pub action: Action,
    /// Which rollouts: a ref or a commit, as the relay matches it
    /// ([`RolloutState::is_named`]).
    pub target: String,
    /// NATS URL of the datacenters' servers.
    pub nats_url: String,
    /// NATS credentials.
    pub auth: NatsAuth,
    /// Datacenters to address (none: those with a rollout of the target).
    pub dcs: Vec<String>,
    /// How long each relay has to answer.
    pub timeout: Duration,
    /// The operator's key, when the relays verify controls.
    pub signer: Option<Signer>,
}

/// Why no control was sent.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// NATS cannot be reached.
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// The datacenters cannot be listed.
    #[error("finding the datacenters")]
    Datacenters(#[source] WatchError),
    /// No relay has published on the server.
    #[error("no datacenter on {url}: no relay has published there")]
    NoDatacenter {
        /// The server, credentials redacted.
        url: String,
    },
    /// The signing key cannot be used.
    #[error(transparent)]
    Key(#[from] SignatureError),
}

/// What one datacenter's relay said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// It answered.
    Reply(ControlReply),
    /// No relay answered in time.
    NoAnswer,
    /// Nobody listens on the datacenter's control subject: its relay is not running, or
    /// does not know controls.
    NoResponder,
    /// The request failed, or the reply could not be read: why.
    Error(String),
}

/// One datacenter addressed, and its answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DcAnswer {
    /// Datacenter id.
    pub dc: String,
    /// What its relay said.
    pub answer: Answer,
}

/// Every answer, and whether the datacenters were named by the operator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answers {
    /// One per datacenter addressed, by id.
    pub dcs: Vec<DcAnswer>,
    /// The operator named the datacenters (`--dc`): each must do what was asked.
    pub named: bool,
}

/// Reads the operator's signing key (an nkey seed file, as `publisher keygen` writes).
pub fn signer(path: &Path) -> Result<Signer, ControlError> {
    Ok(Signer::from_file(path)?)
}

/// Sends the control to every datacenter addressed, at once, and collects the answers.
pub async fn send(request: &ControlRequest) -> Result<Answers, ControlError> {
    let client = connect(&request.nats_url, &request.auth, request.timeout).await?;
    send_on(&client, request).await
}

/// [`send`] through a connection already open (`publisher dashboard` keeps one).
pub(crate) async fn send_on(client: &async_nats::Client, request: &ControlRequest) -> Result<Answers, ControlError> {
    let named = !request.dcs.is_empty();
    let dcs = match named {
        true => request.dcs.clone(),
        false => datacenters_with_rollout(client, &request.target, request.timeout).await?,
    };
    if dcs.is_empty() {
        return Err(ControlError::NoDatacenter { url: redact_url(&request.nats_url) });
    }
    let by = operator();
    let answers = futures::future::join_all(dcs.iter().map(|dc| {
        let control = Control {
            v: WIRE_VERSION,
            dc: dc.clone(),
            action: request.action,
            target: request.target.clone(),
            by: by.clone(),
            at_ms: now_ms(),
            nonce: nonce(),
        };
        ask(client, control, request.signer.as_ref(), request.timeout)
    }))
    .await;
    let dcs = dcs.into_iter().zip(answers).map(|(dc, answer)| DcAnswer { dc, answer }).collect();
    Ok(Answers { dcs, named })
}

/// The datacenters whose relay has a rollout state naming `target`; when there is none
/// or the states cannot be read, every datacenter found (each relay then says whether
/// it has such a rollout).
async fn datacenters_with_rollout(
    client: &async_nats::Client,
    target: &str,
    wait: Duration,
) -> Result<Vec<String>, ControlError> {
    let js = jetstream::new(client.clone());
    let all = datacenters(&js).await.map_err(ControlError::Datacenters)?;
    let mut naming = Vec::new();
    for dc in &all {
        let states = tokio::time::timeout(wait, rollout_states(&js, dc)).await.ok().flatten();
        match states {
            Some(states) if states.iter().any(|s| s.is_named(target)) => naming.push(dc.clone()),
            Some(_) => {}
            None => return Ok(all),
        }
    }
    Ok(if naming.is_empty() { all } else { naming })
}

/// The latest rollout state of every service of `dc`; `None` when they cannot be read.
async fn rollout_states(js: &jetstream::Context, dc: &str) -> Option<Vec<RolloutState>> {
    let stream = js.get_stream(subject::state_stream(dc)).await.ok()?;
    let consumer = stream.create_consumer(streams::last_per_subject(subject::rollouts_wildcard(dc))).await.ok()?;
    let mut pending = consumer.cached_info().num_pending;
    let mut states = Vec::new();
    if pending == 0 {
        return Some(states);
    }
    let mut messages = consumer.messages().await.ok()?;
    while let Some(message) = messages.next().await {
        let message = message.ok()?;
        if let Ok(state) = decode::<RolloutState>(&message.payload) {
            states.push(state);
        }
        pending = message.info().map(|i| i.pending).unwrap_or(0).min(pending.saturating_sub(1));
        if pending == 0 {
            break;
        }
    }
    Some(states)
}

/// Sends one control as a request, signed when a key is given, and reads the answer.
async fn ask(client: &async_nats::Client, control: Control, signer: Option<&Signer>, timeout: Duration) -> Answer {
    let subject = subject::control_subject(&control.dc);
    let payload = encode(&control);
    let mut headers = HeaderMap::new();
    if let Some(signer) = signer {
        headers.insert(SIGNATURE_HEADER, signer.sign(&subject, None, &payload).as_str());
    }
    let request = async_nats::Request::new().payload(payload.into()).headers(headers).timeout(Some(timeout));
    let reply = match client.send_request(subject, request).await {
        Ok(reply) => reply,
        Err(e) if e.kind() == RequestErrorKind::TimedOut => return Answer::NoAnswer,
        Err(e) if e.kind() == RequestErrorKind::NoResponders => return Answer::NoResponder,
        Err(e) => return Answer::Error(format!("sending the request: {e}")),
    };
    match decode::<ControlReply>(&reply.payload) {
        Ok(reply) => Answer::Reply(reply),
        Err(e) => Answer::Error(format!("unreadable reply: {e}")),
    }
}

/// Who asks: `user@host`, for the relay's logs and the rollout state's reason.
fn operator() -> String {
    let user = ["USER", "LOGNAME"]
        .iter()
        .find_map(|v| std::env::var(v).ok().filter(|u| !u.is_empty()))
        .unwrap_or_else(|| "unknown".to_owned());
    let host = ["/proc/sys/kernel/hostname", "/etc/hostname"]
        .iter()
        .find_map(|p| std::fs::read_to_string(p).ok().map(|h| h.trim().to_owned()).filter(|h| !h.is_empty()))
        .unwrap_or_else(|| "unknown".to_owned());
    format!("{user}@{host}")
}

/// 16 random bytes in hex, so that the relay can refuse a control seen before. Falls
/// back to the time and process id should the system's random source be unreadable:
/// still unique for one operator, which is what the relay needs.
fn nonce() -> String {
    let mut bytes = [0u8; 16];
    let random = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut bytes));
    if random.is_err() {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos();
        bytes[..8].copy_from_slice(&(nanos as u64).to_be_bytes());
        bytes[8..12].copy_from_slice(&std::process::id().to_be_bytes());
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl Answers {
    /// Whether every datacenter addressed did what was asked: each answered, none
    /// refused — except, when the datacenters were not named, one that has no rollout
    /// of the target while another one changed something.
    pub fn succeeded(&self) -> bool {
        let changed = self.dcs.iter().any(|d| matches!(&d.answer, Answer::Reply(r) if r.refused.is_none()));
        self.dcs.iter().all(|d| match &d.answer {
            Answer::Reply(ControlReply { refused: None, .. }) => true,
            Answer::Reply(ControlReply { refused: Some(why), .. }) => {
                !self.named && changed && why.starts_with(NO_ROLLOUT_NAMED)
            }
            Answer::NoAnswer | Answer::NoResponder | Answer::Error(_) => false,
        })
    }

    /// What to print: per datacenter, each rollout changed, or why nothing was.
    pub fn lines(&self, action: Action, target: &str, timeout: Duration) -> Vec<String> {
        let mut lines = Vec::new();
        for DcAnswer { dc, answer } in &self.dcs {
            match answer {
                Answer::Reply(ControlReply { refused: Some(why), .. }) => {
                    lines.push(format!("{dc}: {} {target} refused: {why}", action.as_str()));
                }
                Answer::Reply(ControlReply { changed, .. }) if changed.is_empty() => {
                    lines.push(format!("{dc}: {} {target}: nothing to change", action.as_str()));
                }
                Answer::Reply(ControlReply { changed, .. }) => {
                    lines.extend(changed.iter().map(|c| format!("{dc}: {c}")));
                }
                Answer::NoAnswer => {
                    lines.push(format!(
                        "{dc}: {} {target}: no relay answered within {}s",
                        action.as_str(),
                        timeout.as_secs()
                    ));
                }
                Answer::NoResponder => lines.push(format!(
                    "{dc}: {} {target}: no relay answered: none listens on {} (is the datacenter's relay running?)",
                    action.as_str(),
                    subject::control_subject(dc)
                )),
                Answer::Error(why) => lines.push(format!("{dc}: {} {target}: {why}", action.as_str())),
            }
        }
        lines
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(dc: &str, changed: &[&str], refused: Option<&str>) -> DcAnswer {
        DcAnswer {
            dc: dc.into(),
            answer: Answer::Reply(ControlReply {
                v: WIRE_VERSION,
                dc: dc.into(),
                changed: changed.iter().map(|c| (*c).to_owned()).collect(),
                refused: refused.map(Into::into),
            }),
        }
    }

    #[test]
    fn a_datacenter_without_the_rollout_is_no_failure_only_when_another_changed_and_none_were_named() {
        let changed = reply("dc1", &["service s0 1a2b3c4: rolling -> paused"], None);
        let absent = reply("dc2", &[], Some("no rollout named services/s0/main"));
        let found = Answers { dcs: vec![changed.clone(), absent.clone()], named: false };
        assert!(found.succeeded());
        assert!(!Answers { dcs: vec![changed.clone(), absent.clone()], named: true }.succeeded());
        assert!(!Answers { dcs: vec![absent], named: false }.succeeded(), "nothing changed anywhere");
        let wrong_phase = reply("dc2", &[], Some("service s0 1a2b3c4 is complete: nothing to pause"));
        assert!(!Answers { dcs: vec![changed.clone(), wrong_phase], named: false }.succeeded());
        let silent = DcAnswer { dc: "dc3".into(), answer: Answer::NoAnswer };
        assert!(!Answers { dcs: vec![changed, silent], named: false }.succeeded());
    }

    #[test]
    fn lines_say_what_changed_what_was_refused_and_who_did_not_answer() {
        let answers = Answers {
            dcs: vec![
                reply("dc1", &["service s0 1a2b3c4: rolling -> paused"], None),
                reply("dc2", &[], Some("signature refused")),
                DcAnswer { dc: "dc3".into(), answer: Answer::NoAnswer },
            ],
            named: true,
        };
        assert_eq!(
            answers.lines(Action::Pause, "services/s0/main", Duration::from_secs(5)),
            vec![
                "dc1: service s0 1a2b3c4: rolling -> paused",
                "dc2: pause services/s0/main refused: signature refused",
                "dc3: pause services/s0/main: no relay answered within 5s",
            ]
        );
    }

    #[test]
    fn nonces_differ_and_the_operator_is_user_at_host() {
        assert_ne!(nonce(), nonce());
        assert_eq!(nonce().len(), 32);
        assert!(operator().contains('@'));
    }
}
