//! Waiting on the datacenter: its NATS server to answer, its relay's streams to exist.
//!
//! A host keeps serving its last good configuration while it waits, and says why once,
//! at WARN, naming the server or the stream and what would end the wait; then it waits
//! quietly, repeating the line at most every [`REPEAT`], so that a host left waiting for
//! days does not fill its log.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::context::GetStreamErrorKind;
use async_nats::jetstream::ErrorCode;
use confcast_schemas::connect::{redact_url, servers, AuthError, NatsAuth};
use confcast_schemas::subject;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// The same hint is repeated at most this often.
pub const REPEAT: Duration = Duration::from_secs(60);

/// How often the streams are looked for.
const POLL: Duration = Duration::from_millis(500);

/// A rate limit for one kind of log line: due the first time, then once per period.
#[derive(Debug, Clone)]
pub struct Every {
    period: Duration,
    next: Option<Instant>,
}

impl Every {
    /// Due at once, then at most once per `period`.
    pub fn new(period: Duration) -> Every {
        Every { period, next: None }
    }

    /// Whether the line is due now; if so, the next one is a period away.
    pub fn due(&mut self) -> bool {
        let now = Instant::now();
        if self.next.is_some_and(|next| now < next) {
            return false;
        }
        self.next = Some(now + self.period);
        true
    }

    /// Whether the line was ever said.
    pub fn said(&self) -> bool {
        self.next.is_some()
    }
}

/// Connects to the datacenter's NATS, retrying with backoff until it answers (a host
/// starts whether or not the bus is up). Each failure is said at WARN with the server
/// and the cause, at most every [`REPEAT`]; later disconnections and server errors too.
/// `None` on shutdown; an error only for credentials that can never work.
pub async fn connect(
    url: &str,
    auth: &NatsAuth,
    name: String,
    shutdown: &CancellationToken,
) -> Result<Option<async_nats::Client>, AuthError> {
    let addresses = servers(url)?;
    let shown = redact_url(url);
    let events = Arc::new(Mutex::new(Every::new(REPEAT)));
    let mut failures = Every::new(REPEAT);
    let mut backoff = Duration::from_millis(250);
    loop {
        let (shown2, events) = (shown.clone(), events.clone());
        let options =
            auth.apply(async_nats::ConnectOptions::new()).await?.name(name.clone()).event_callback(move |event| {
                let (shown, events) = (shown2.clone(), events.clone());
                async move { connection_event(&shown, &events, event) }
            });
        let attempt = tokio::select! {
            attempt = options.connect(addresses.clone()) => attempt,
            () = shutdown.cancelled() => return Ok(None),
        };
        match attempt {
            // Said by the client's `Connected` event.
            Ok(client) => return Ok(Some(client)),
            Err(e) if failures.due() => {
                tracing::warn!(nats = %shown, retry_in = ?backoff, "cannot connect to NATS at {shown}: {e}; retrying")
            }
            Err(e) => tracing::debug!(nats = %shown, retry_in = ?backoff, "cannot connect to NATS at {shown}: {e}"),
        }
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            () = shutdown.cancelled() => return Ok(None),
        }
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
}

/// What the NATS client tells of its connection, said with the server's URL.
fn connection_event(shown: &str, rate: &Mutex<Every>, event: async_nats::Event) {
    let due = || rate.lock().unwrap_or_else(|e| e.into_inner()).due();
    match event {
        async_nats::Event::Connected => tracing::info!(nats = %shown, "connected to NATS"),
        async_nats::Event::Disconnected if due() => {
            tracing::warn!(nats = %shown, "lost the connection to NATS at {shown}; reconnecting (the configuration in place stays)")
        }
        async_nats::Event::ServerError(e) if due() => tracing::warn!(nats = %shown, error = %e, "NATS server error"),
        async_nats::Event::ClientError(e) if due() => tracing::warn!(nats = %shown, error = %e, "NATS client error"),
        async_nats::Event::SlowConsumer(_) if due() => {
            tracing::warn!(nats = %shown, "slow consumer: the NATS client dropped messages for this host")
        }
        async_nats::Event::LameDuckMode => {
            tracing::info!(nats = %shown, "the NATS server is shutting down (lame duck mode)")
        }
        other => tracing::debug!(nats = %shown, event = %other, "NATS connection event"),
    }
}

/// The line that tells an operator a datacenter has no relay.
pub fn no_relay(dc: &str, stream: &str, nats: &str) -> String {
    format!(
        "datacenter {dc} has no relay: stream {stream} does not exist on {nats}; start the datacenter's relay \
         (relay --dc {dc} --nats {nats} --master <the master's git URL> --state-dir <its directory>); waiting for it"
    )
}

/// Waits until the relay of `dc` has created the datacenter's streams. Says once (then
/// every [`REPEAT`]) that the datacenter has no relay, or that JetStream cannot be
/// reached. `false` on shutdown.
pub async fn wait_for_streams(
    js: &async_nats::jetstream::Context,
    dc: &str,
    nats_url: &str,
    shutdown: &CancellationToken,
) -> bool {
    let shown = redact_url(nats_url);
    let (mut no_relay_hint, mut unreachable) = (Every::new(REPEAT), Every::new(REPEAT));
    loop {
        let mut missing = None;
        for stream in [subject::updates_stream(dc), subject::state_stream(dc)] {
            match js.get_stream(&stream).await {
                Ok(_) => {}
                Err(e) if is_not_found(&e) => {
                    if no_relay_hint.due() {
                        tracing::warn!(%dc, %stream, nats = %shown, "{}", no_relay(dc, &stream, &shown));
                    }
                    missing = Some(stream);
                    break;
                }
                Err(e) => {
                    if unreachable.due() {
                        tracing::warn!(nats = %shown, %stream, error = %e, "cannot reach NATS JetStream at {shown}; retrying");
                    }
                    missing = Some(stream);
                    break;
                }
            }
        }
        if missing.is_none() {
            if no_relay_hint.said() {
                tracing::info!(%dc, "the datacenter's relay is up: its streams exist");
            }
            return true;
        }
        tokio::select! {
            () = tokio::time::sleep(POLL) => {}
            () = shutdown.cancelled() => return false,
        }
    }
}

fn is_not_found(e: &async_nats::jetstream::context::GetStreamError) -> bool {
    matches!(e.kind(), GetStreamErrorKind::JetStream(js) if js.error_code() == ErrorCode::STREAM_NOT_FOUND)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_hint_is_due_at_once_then_once_per_period() {
        let mut every = Every::new(Duration::from_secs(60));
        assert!(!every.said());
        assert!(every.due());
        let mut said = 1;
        // Asked every 500 ms for just under five minutes.
        for _ in 0..599 {
            tokio::time::sleep(Duration::from_millis(500)).await;
            said += usize::from(every.due());
        }
        assert_eq!(said, 5, "once at first, then once a minute");
        assert!(every.said());
    }

    #[test]
    fn the_no_relay_hint_names_the_stream_and_the_command_to_start() {
        let line = no_relay("dc1", "CONFCAST_DC_dc1", "nats://10.0.0.1:4222");
        assert!(line.contains("stream CONFCAST_DC_dc1 does not exist on nats://10.0.0.1:4222"), "{line}");
        assert!(line.contains("relay --dc dc1 --nats nats://10.0.0.1:4222 --master"), "{line}");
    }
}
