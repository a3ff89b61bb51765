//! Waiting on the datacenter: its NATS server to answer, its relay's streams to exist.
//!
//! A host keeps serving its last good configuration while it waits, and says why once,
//! at WARN, naming the server or the stream and what would end the wait; then it waits
//! quietly, repeating the line at most once a minute ([`Warnings::due`]), so that a host
//! left waiting for days does not fill its log. Connecting to the server itself is
//! `confcast_schemas::connect::connect`, which says the same of its failures.

use std::time::Duration;

use confcast_schemas::connect::redact_url;
use confcast_schemas::retry::Warnings;
use confcast_schemas::{streams, subject};
use tokio_util::sync::CancellationToken;

/// How often the streams are looked for.
const POLL: Duration = Duration::from_millis(500);

/// The line that tells an operator a datacenter has no relay.
pub fn no_relay(dc: &str, stream: &str, nats: &str) -> String {
    format!(
        "datacenter {dc} has no relay: stream {stream} does not exist on {nats}; start the datacenter's relay \
         (relay --dc {dc} --nats {nats} --master <the master's git URL> --state-dir <its directory>); waiting for it"
    )
}

/// Waits until the relay of `dc` has created the datacenter's streams. Says once (then
/// once a minute) that the datacenter has no relay, or that JetStream cannot be
/// reached. `false` on shutdown.
pub async fn wait_for_streams(
    js: &async_nats::jetstream::Context,
    dc: &str,
    nats_url: &str,
    shutdown: &CancellationToken,
) -> bool {
    let shown = redact_url(nats_url);
    let (mut no_relay_hint, mut unreachable) = (Warnings::default(), Warnings::default());
    loop {
        let mut missing = None;
        for stream in [subject::updates_stream(dc), subject::state_stream(dc)] {
            match js.get_stream(&stream).await {
                Ok(_) => {}
                Err(e) if streams::is_missing(&e) => {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_no_relay_hint_names_the_stream_and_the_command_to_start() {
        let line = no_relay("dc1", "CONFCAST_DC_dc1", "nats://10.0.0.1:4222");
        assert!(line.contains("stream CONFCAST_DC_dc1 does not exist on nats://10.0.0.1:4222"), "{line}");
        assert!(line.contains("relay --dc dc1 --nats nats://10.0.0.1:4222 --master"), "{line}");
    }
}
