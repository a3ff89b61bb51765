//! The dashboard's JSON API: typed views of the cache, the same ones the page is drawn
//! from, so what a script reads is what a person sees.
//!
//! * `GET /api/v1/datacenters`: `[`[`DatacenterView`]`]`
//! * `GET /api/v1/datacenters/{dc}/services/{kind}/{name}`: [`ServiceDetail`]
//! * `GET /api/v1/errors`: `[`[`ErrorView`]`]`, newest first
//! * `POST /api/v1/control/{dc}/{kind}/{name}/{action}`: [`ControlOutcome`]

use std::collections::BTreeMap;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;

use super::App;

/// One datacenter and every service its relay published.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DatacenterView {
    /// Datacenter id.
    pub dc: String,
    /// Its services, applications and devices, by kind and name.
    pub services: Vec<ServiceView>,
}

/// One service as its relay last published it, and where its hosts stand.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServiceView {
    /// `service`, `application` or `device`.
    pub kind: String,
    /// Its name.
    pub name: String,
    /// The ref its pin resolved through (`services/web/master`, `refs/tags/...`).
    pub ref_name: String,
    /// The tag the pin names, or `latest`.
    pub version: String,
    /// The commit the relay published (40 hex digits).
    pub commit: String,
    /// The commit's subject line; `null` from relays that do not tell it.
    pub subject: Option<String>,
    /// The commit's author, `Name <email>`; `null` from relays that do not tell it.
    pub author: Option<String>,
    /// When the commit was pushed to the master, ms since the Unix epoch; `null` when
    /// the relay does not tell it.
    pub pushed_ms: Option<u64>,
    /// How many of its hosts stand where.
    pub hosts: HostCounts,
    /// Its rollout in waves of `commit`, when it has one.
    pub rollout: Option<RolloutView>,
    /// What the page's timeline draws (not part of the API).
    #[serde(skip)]
    pub timeline: Option<super::timeline::Timeline>,
}

/// How many hosts of a service stand where: every host that reports a status for it
/// is in exactly one count.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct HostCounts {
    /// At the published commit, applied, with a good status.
    pub at: usize,
    /// On their way to it.
    pub pending: usize,
    /// Not to take it yet: their wave of the rollout is not released.
    pub held: usize,
    /// Took it, the rollout halted, and went back to the previous commit.
    pub reverted: usize,
    /// Reported a failure: apply, `--check-cmd`, `--exec` or `--health-cmd`.
    pub failed: usize,
}

/// Where a rollout in waves stands, as the relay last wrote it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RolloutView {
    /// `waiting`, `rolling`, `paused`, `halted`, `complete` or `promoted`.
    pub phase: String,
    /// The current wave, counted from 0.
    pub wave: usize,
    /// The hosts of each wave.
    pub waves: Vec<Vec<String>>,
    /// When the current wave's bake ends, ms since the Unix epoch; `null` until every
    /// host of the released waves is healthy.
    pub bake_ends_ms: Option<u64>,
    /// The unhealthy hosts of a halted rollout, each with why.
    pub unhealthy: BTreeMap<String, String>,
    /// Why it is waiting, paused, halted or promoted, in words.
    pub reason: Option<String>,
    /// When the rollout began, ms since the Unix epoch.
    pub started_ms: u64,
}

/// A service with each of its hosts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServiceDetail {
    /// The service, as in `/api/v1/datacenters`.
    pub service: ServiceView,
    /// Its hosts, by id.
    pub hosts: Vec<HostView>,
}

/// One host of a service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HostView {
    /// Host id.
    pub host: String,
    /// `done`, `pending`, `held`, `reverted` or `failed` (the counts of [`HostCounts`]).
    pub state: String,
    /// The commit the host has in place; `null` when it has none.
    pub commit: Option<String>,
    /// The exit status of its `--exec`, when it ran.
    pub exec_status: Option<i32>,
    /// Why it failed, is unhealthy or went back; `null` otherwise.
    pub reason: Option<String>,
    /// When it last reported, ms since the Unix epoch.
    pub at_ms: u64,
}

/// Something a relay could not resolve (a bad document, an unknown pin).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ErrorView {
    /// Datacenter id.
    pub dc: String,
    /// The ref whose update caused it, if any.
    pub ref_name: Option<String>,
    /// The commit the ref pointed at, if any.
    pub commit: Option<String>,
    /// What is wrong, naming the ref, file and field.
    pub message: String,
    /// When, ms since the Unix epoch.
    pub at_ms: u64,
}

/// What became of a control sent from the page.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ControlOutcome {
    /// Whether the relay did what was asked.
    pub ok: bool,
    /// What happened, in the words of `publisher rollout`: what changed, or why not.
    pub lines: Vec<String>,
}

/// `GET /api/v1/datacenters`.
pub(crate) async fn datacenters(State(app): State<App>) -> Json<Vec<DatacenterView>> {
    Json(app.read(|fleet| fleet.datacenters(None)))
}

/// `GET /api/v1/datacenters/{dc}/services/{kind}/{name}`: 404 when there is no such
/// service.
pub(crate) async fn service(
    State(app): State<App>,
    Path((dc, kind, name)): Path<(String, String, String)>,
) -> Response {
    match app.read(|fleet| fleet.service(&dc, &kind, &name)) {
        Some(detail) => Json(detail).into_response(),
        None => (StatusCode::NOT_FOUND, format!("no {kind} {name} in datacenter {dc}")).into_response(),
    }
}

/// `GET /api/v1/errors`.
pub(crate) async fn errors(State(app): State<App>) -> Json<Vec<ErrorView>> {
    Json(app.read(|fleet| fleet.errors()))
}
