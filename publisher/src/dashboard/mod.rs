//! `publisher dashboard`: a live web page of the fleet.
//!
//! It reads what `publisher status` reads — each datacenter's heads, rollout states and
//! host statuses, and the relay's error events — into a cache ([`model`]) kept in step
//! with the bus ([`follow`]), and serves it as one server-rendered page ([`page`]), a
//! page per service, and JSON ([`api`]). Every change of the cache bumps a generation
//! and is announced on `/events` (server-sent events, at most one per
//! [`COALESCE`]); the page then fetches its fragment again and swaps it in: no
//! framework, no script beyond that, and no HTML built anywhere but the server's
//! templates, which escape every value (names, subjects, authors and messages come
//! from pushers).
//!
//! With `--allow-control`, the service page sends rollout controls ([`control`]) with
//! the code of `publisher rollout`.

pub mod api;
mod control;
mod follow;
mod model;
mod page;
pub mod timeline;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::response::sse::{Event, KeepAlive, Sse};
use axum::routing::{get, post};
use axum::Router;
use confcast_schemas::connect::{ConnectError, NatsAuth};
use futures::Stream;
use tokio::sync::watch;

use crate::bus::connect;
use crate::control::ControlError;
use crate::rollout::WatchError;
use model::Fleet;

/// At most one change event per this long on `/events`: a rollout of a thousand hosts
/// reporting at once redraws the page five times a second, not a thousand.
pub const COALESCE: Duration = Duration::from_millis(200);
/// The longest the dashboard waits for NATS at start, and for a relay's answer to a
/// control.
const BUS_WAIT: Duration = Duration::from_secs(10);

/// What `publisher dashboard` is asked.
#[derive(Debug, Clone)]
pub struct DashboardRequest {
    /// Where to serve the page.
    pub listen: SocketAddr,
    /// NATS URL of the datacenters' servers.
    pub nats_url: String,
    /// NATS credentials.
    pub auth: NatsAuth,
    /// Datacenters to show (none: every datacenter a relay published for).
    pub dcs: Vec<String>,
    /// Each datacenter's streams are in a JetStream domain named after it.
    pub domains: bool,
    /// Whether the page may pause, resume, abort and promote rollouts.
    pub allow_control: bool,
    /// The operator's nkey seed, to sign controls.
    pub signing_key: Option<PathBuf>,
}

/// Why the dashboard could not start.
#[derive(Debug, thiserror::Error)]
pub enum DashboardError {
    /// The address cannot be listened on.
    #[error("listening on {address}")]
    Listen {
        /// The address.
        address: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// NATS cannot be reached.
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// The datacenters cannot be listed.
    #[error("finding the datacenters")]
    Datacenters(#[source] WatchError),
    /// The signing key cannot be used.
    #[error("reading the signing key")]
    Key(#[source] ControlError),
    /// Serving failed.
    #[error("serving the dashboard")]
    Serve(#[source] std::io::Error),
}

/// What every route shares: the cache, its change announcements and how to reach the
/// bus.
pub(crate) type App = Arc<Shared>;

/// See [`App`].
#[derive(Debug)]
pub(crate) struct Shared {
    fleet: Mutex<Fleet>,
    changed: watch::Sender<u64>,
    /// Counts the connection's comebacks: readers reopen at once rather than wait for
    /// their heartbeats to tell them the server restarted.
    reconnected: watch::Sender<u64>,
    client: Option<async_nats::Client>,
    request: DashboardRequest,
}

impl Shared {
    /// A dashboard over `client` (none in tests: nothing to send controls through).
    pub(crate) fn new(request: DashboardRequest, client: Option<async_nats::Client>) -> App {
        let fleet = Fleet { bus_ok: client.is_some(), ..Fleet::default() };
        Arc::new(Shared {
            fleet: Mutex::new(fleet),
            changed: watch::Sender::new(0),
            reconnected: watch::Sender::new(0),
            client,
            request,
        })
    }

    /// Reads the cache.
    pub(crate) fn read<T>(&self, f: impl FnOnce(&Fleet) -> T) -> T {
        f(&self.fleet.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Changes the cache; when `f` says it changed anything, bumps the generation and
    /// tells the pages.
    pub(crate) fn update(&self, f: impl FnOnce(&mut Fleet) -> bool) {
        let mut fleet = self.fleet.lock().unwrap_or_else(PoisonError::into_inner);
        if f(&mut fleet) {
            fleet.generation += 1;
            self.changed.send_replace(fleet.generation);
        }
    }
}

/// Serves the dashboard until SIGINT or SIGTERM. Fails at once when the address cannot
/// be listened on, NATS cannot be reached or the signing key cannot be read; once
/// running, it outlives NATS restarts.
pub async fn serve(request: DashboardRequest) -> Result<(), DashboardError> {
    if let Some(path) = request.signing_key.as_ref().filter(|_| request.allow_control) {
        crate::control::signer(path).map_err(DashboardError::Key)?;
    }
    let address = request.listen;
    let listener =
        tokio::net::TcpListener::bind(address).await.map_err(|source| DashboardError::Listen { address, source })?;
    let client = connect(&request.nats_url, &request.auth, BUS_WAIT).await?;
    // What status would refuse (a domain it cannot reach, streams it cannot list) is
    // refused at start; datacenters appearing later are found by `discover`.
    crate::rollout::datacenters_to_follow(&client, &request.dcs, request.domains)
        .await
        .map_err(DashboardError::Datacenters)?;
    let app = Shared::new(request.clone(), Some(client.clone()));
    tokio::spawn(follow::discover(app.clone(), client.clone(), request.dcs.clone(), request.domains));
    tokio::spawn(follow::watch_connection(app.clone(), client));
    let served = axum::serve(listener, router(app));
    tokio::select! {
        served = served => served.map_err(DashboardError::Serve),
        () = shutdown() => Ok(()),
    }
}

/// Every route.
pub(crate) fn router(app: App) -> Router {
    Router::new()
        .route("/", get(page::fleet))
        .route("/fragment", get(page::fleet_fragment))
        .route("/services/{dc}/{kind}/{name}", get(page::service))
        .route("/fragment/services/{dc}/{kind}/{name}", get(page::service_fragment))
        .route("/dashboard.js", get(page::script))
        .route("/events", get(events))
        .route("/api/v1/datacenters", get(api::datacenters))
        .route("/api/v1/datacenters/{dc}/services/{kind}/{name}", get(api::service))
        .route("/api/v1/errors", get(api::errors))
        .route("/api/v1/control/{dc}/{kind}/{name}/{action}", post(control::control))
        .layer(axum::middleware::from_fn_with_state(app.clone(), loopback_only))
        .with_state(app)
}

/// Refuses requests naming another host than a loopback one when the dashboard listens
/// on a loopback address: a site whose name an attacker points at 127.0.0.1 (DNS
/// rebinding) must not read the fleet or send controls from a browser on this machine.
async fn loopback_only(
    axum::extract::State(app): axum::extract::State<App>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse as _;
    let host = request.headers().get(axum::http::header::HOST).and_then(|h| h.to_str().ok());
    if app.request.listen.ip().is_loopback() && !host.is_some_and(is_loopback_host) {
        let why = "the dashboard listens on a loopback address: reach it as localhost or by its address";
        return (axum::http::StatusCode::FORBIDDEN, why).into_response();
    }
    next.run(request).await
}

/// Whether a `Host` header (`name[:port]`) names this machine: `localhost` or a
/// loopback address.
fn is_loopback_host(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        Some(bracketed) => bracketed.split_once(']').map_or(bracketed, |(name, _)| name),
        None => host.rsplit_once(':').map_or(host, |(name, _)| name),
    };
    name.eq_ignore_ascii_case("localhost") || name.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// `GET /events`: one event at once (so a page catches up with what changed while it
/// loaded), then one per change, at most one per [`COALESCE`]; its data is the
/// generation. Keep-alive comments hold the connection open through proxies.
async fn events(
    axum::extract::State(app): axum::extract::State<App>,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let changes = app.changed.subscribe();
    let stream = futures::stream::unfold((changes, true), |(mut changes, first)| async move {
        if !first {
            tokio::time::sleep(COALESCE).await;
            changes.changed().await.ok()?;
        }
        let generation = *changes.borrow_and_update();
        Some((Ok(Event::default().data(generation.to_string())), (changes, false)))
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}

/// Resolves at SIGINT or SIGTERM.
async fn shutdown() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = terminate => {}
    }
}
