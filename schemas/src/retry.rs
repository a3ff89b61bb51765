//! Waiting out what comes back by itself — the bus, the master — and telling the
//! operator about it without flooding the log.
//!
//! A failure that is retried is logged at WARN in one line with its cause, the URL it
//! concerns and when the next attempt is (`retry_in`); the same cause again is logged
//! at most once every [`REPEAT_AFTER`] (with how many attempts were not logged), so a
//! master down for an hour costs sixty lines, not thousands. Success after a logged
//! failure is logged at INFO, so the log also tells when it ended.

use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// How long the same failure stays out of the log once it was logged.
pub const REPEAT_AFTER: Duration = Duration::from_secs(60);

/// Exponential backoff from 100 ms (or [`Backoff::starting_at`]) to 10 s.
#[derive(Debug)]
pub struct Backoff(Duration);

impl Default for Backoff {
    fn default() -> Self {
        Backoff(Duration::from_millis(100))
    }
}

impl Backoff {
    /// Backoff whose first delay is `first`.
    pub fn starting_at(first: Duration) -> Backoff {
        Backoff(first)
    }

    /// The delay before the next attempt.
    pub fn next_delay(&mut self) -> Duration {
        let current = self.0;
        self.0 = (self.0 * 2).min(Duration::from_secs(10));
        current
    }
}

/// Which failures of one retried operation are worth a log line.
#[derive(Debug, Default)]
pub struct Warnings {
    /// When the last line was logged, and for what cause.
    last: Option<(Instant, String)>,
    /// Failures not logged since then.
    held_back: u64,
}

impl Warnings {
    /// Whether a failure with `cause` at `now` is to be logged: the first one, one with
    /// another cause, or the same one [`REPEAT_AFTER`] after it was last logged. When
    /// it is, returns how many failures were not logged since the last line.
    pub fn admit(&mut self, now: Instant, cause: &str) -> Option<u64> {
        let log = match &self.last {
            None => true,
            Some((at, last)) => last != cause || now.duration_since(*at) >= REPEAT_AFTER,
        };
        if !log {
            self.held_back += 1;
            return None;
        }
        self.last = Some((now, cause.to_owned()));
        Some(std::mem::take(&mut self.held_back))
    }

    /// Whether a line with no particular cause (a hint, a reminder) is due now: the
    /// first time, then once every [`REPEAT_AFTER`].
    pub fn due(&mut self) -> bool {
        self.admit(Instant::now(), "").is_some()
    }

    /// Whether a line was logged since the last [`Warnings::clear`].
    pub fn said(&self) -> bool {
        self.last.is_some()
    }

    /// Forgets past failures; true when one was logged (then the recovery is worth a line).
    pub fn clear(&mut self) -> bool {
        self.held_back = 0;
        self.last.take().is_some()
    }

    /// Logs a failure of `what` at WARN if [`Warnings::admit`] lets it through; `url`
    /// may be empty (a local failure), `retry_in` none (the client retries by itself).
    pub fn warn(&mut self, what: &str, url: &str, cause: &str, retry_in: impl Into<Option<Duration>>) {
        let retry_in = retry_in.into().map(tracing::field::debug);
        if let Some(held_back) = self.admit(Instant::now(), cause) {
            let url = (!url.is_empty()).then_some(tracing::field::display(url));
            let not_logged = (held_back > 0).then_some(held_back);
            tracing::warn!(url, error = %cause, retry_in, not_logged, "{what} failed; will retry");
        }
    }

    /// Logs at INFO that `what` works again, if a failure of it was logged.
    pub fn recovered(&mut self, what: &str, url: &str) {
        if self.clear() {
            let url = (!url.is_empty()).then_some(tracing::field::display(url));
            tracing::info!(url, "{what}: working again");
        }
    }
}

/// Retries `f` with backoff until it succeeds or shutdown (`None`), logging failures
/// through [`Warnings`] as `what` failing at `url`.
pub async fn retry<T, E, F>(what: &str, url: &str, shutdown: &CancellationToken, mut f: impl FnMut() -> F) -> Option<T>
where
    E: std::error::Error + 'static,
    F: std::future::Future<Output = Result<T, E>>,
{
    let mut backoff = Backoff::default();
    let mut warnings = Warnings::default();
    loop {
        let attempt = tokio::select! { attempt = f() => attempt, () = shutdown.cancelled() => return None };
        match attempt {
            Ok(v) => {
                warnings.recovered(what, url);
                return Some(v);
            }
            Err(e) => {
                let delay = backoff.next_delay();
                warnings.warn(what, url, &crate::process::error_chain(&e), delay);
                tokio::select! { () = tokio::time::sleep(delay) => {}, () = shutdown.cancelled() => return None }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_same_failure_is_logged_once_a_minute_and_a_new_one_at_once() {
        let mut warnings = Warnings::default();
        let start = Instant::now();
        assert_eq!(warnings.admit(start, "connection refused"), Some(0), "the first is logged");
        let mut backoff = Backoff::default();
        let mut now = start;
        let mut logged = 0;
        loop {
            now += backoff.next_delay();
            if now.duration_since(start) >= REPEAT_AFTER {
                break;
            }
            logged += usize::from(warnings.admit(now, "connection refused").is_some());
        }
        assert_eq!(logged, 0, "retries within the minute are not");
        let held_back = warnings.admit(start + REPEAT_AFTER, "connection refused");
        assert!(held_back.is_some_and(|n| n > 5), "a minute later, with the count: {held_back:?}");
        assert_eq!(warnings.admit(start + REPEAT_AFTER, "timed out"), Some(0), "another cause at once");
        assert!(warnings.clear(), "a failure was logged: the recovery is worth a line");
        assert!(!warnings.clear());
    }

    #[tokio::test(start_paused = true)]
    async fn a_hint_is_due_at_once_then_once_a_minute() {
        let mut hint = Warnings::default();
        assert!(!hint.said());
        assert!(hint.due());
        let mut said = 1;
        // Asked every 500 ms for just under five minutes.
        for _ in 0..599 {
            tokio::time::sleep(Duration::from_millis(500)).await;
            said += usize::from(hint.due());
        }
        assert_eq!(said, 5, "once at first, then once a minute");
        assert!(hint.said());
    }

    #[test]
    fn backoff_doubles_up_to_ten_seconds() {
        let mut backoff = Backoff::default();
        let delays: Vec<Duration> = (0..9).map(|_| backoff.next_delay()).collect();
        assert_eq!(delays[0], Duration::from_millis(100));
        assert_eq!(delays[1], Duration::from_millis(200));
        assert_eq!(delays[8], Duration::from_secs(10));
    }

    #[tokio::test(start_paused = true)]
    async fn retry_returns_the_first_success_and_stops_at_shutdown() {
        let shutdown = CancellationToken::new();
        let mut attempts = 0;
        let got = retry("opening", "nats://x", &shutdown, || {
            attempts += 1;
            let attempt = attempts;
            async move {
                if attempt < 3 {
                    Err(std::io::Error::other("refused"))
                } else {
                    Ok(attempt)
                }
            }
        })
        .await;
        assert_eq!(got, Some(3));
        shutdown.cancel();
        let never: Option<()> =
            retry("opening", "nats://x", &shutdown, || async { Err(std::io::Error::other("refused")) }).await;
        assert_eq!(never, None);
    }
}
