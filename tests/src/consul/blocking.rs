//! Blocking queries (`?index=N&wait=D`): a read that waits until what it covers changes
//! past index `N`, or `D` passes, as Consul's agent does (without its jitter).

use std::time::Duration;

use axum::http::StatusCode;

use super::http::Refusal;
use super::query::{parse_go_duration, Query};
use super::store::Scope;
use super::Shared;

/// Consul's cap on a blocking query's wait.
const MAX_WAIT: Duration = Duration::from_secs(600);
/// Consul's default wait.
const DEFAULT_WAIT: Duration = Duration::from_secs(300);

/// A read's blocking parameters: `None` for a read that does not block, and Consul's 400
/// for an unreadable index or wait.
pub(super) fn parse(query: &Query) -> Result<Option<(u64, Duration)>, Refusal> {
    let Some(index) = query.get("index") else { return Ok(None) };
    let Some(index) = index.as_deref().and_then(|i| i.parse::<u64>().ok()) else {
        return Err(Refusal::new(StatusCode::BAD_REQUEST, "Invalid index"));
    };
    let wait = match query.get("wait") {
        Some(Some(wait)) => match parse_go_duration(wait) {
            Some(wait) => wait.min(MAX_WAIT),
            None => return Err(Refusal::new(StatusCode::BAD_REQUEST, "Invalid wait time")),
        },
        _ => DEFAULT_WAIT,
    };
    Ok(Some((index, wait)))
}

/// Returns at once if the index of `scope` is already above `min_index`; otherwise
/// when something in `scope` is written or deleted, or when `wait` has passed.
pub(super) async fn wait(shared: &Shared, scope: &Scope, min_index: u64, wait: Duration) {
    // Subscribe first, so no write between the check and the wait is missed.
    let mut changed = shared.changed.subscribe();
    let (index, baseline) = {
        let store = shared.store();
        (store.index_of(scope), store.touched(scope))
    };
    if index > min_index {
        return;
    }
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        tokio::select! {
            result = changed.changed() => {
                if result.is_err() || shared.store().touched(scope) > baseline {
                    break;
                }
            }
            () = tokio::time::sleep_until(deadline) => break,
        }
    }
}
