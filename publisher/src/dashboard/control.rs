//! `POST /api/v1/control/{dc}/{kind}/{name}/{action}`: the service page's rollout
//! buttons, sent with the code of `publisher rollout` to the datacenter's relay, naming
//! the rollout by its commit (so a push in between is not controlled by mistake).
//!
//! Refused (403) unless the dashboard runs with `--allow-control`, the request carries
//! `X-Confcast-Control: 1` (a header no cross-site form can set, and which makes a
//! cross-site script's request need a preflight this server never grants), and its
//! `Origin`, when there is one, is the page's own host.

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use confcast_schemas::rollout::Action;

use super::api::ControlOutcome;
use super::{App, BUS_WAIT};
use crate::control::{send_on, signer, ControlRequest};

/// The header a control request must carry, with the value `1`.
pub(crate) const CONTROL_HEADER: &str = "x-confcast-control";

/// A status with what to show.
type Reply = (StatusCode, Json<ControlOutcome>);

fn reply(status: StatusCode, ok: bool, line: String) -> Reply {
    (status, Json(ControlOutcome { ok, lines: vec![line] }))
}

/// Why a control request is refused before anything is sent, if it is.
pub(crate) fn refusal(allowed: bool, headers: &HeaderMap) -> Option<String> {
    if !allowed {
        return Some("controls are off: the dashboard runs without --allow-control".to_owned());
    }
    if headers.get(CONTROL_HEADER).and_then(|v| v.to_str().ok()) != Some("1") {
        return Some(format!("a control needs the header {CONTROL_HEADER}: 1"));
    }
    // No `Origin`: not a browser's cross-site request, nothing more to check.
    let origin = headers.get("origin")?;
    let host = headers.get("host").and_then(|h| h.to_str().ok());
    let origin_host = origin.to_str().ok().and_then(|o| o.split_once("://")).map(|(_, rest)| rest);
    match (origin_host, host) {
        (Some(o), Some(h)) if o.eq_ignore_ascii_case(h) => None,
        _ => Some("a control must come from the dashboard's own page".to_owned()),
    }
}

/// Sends the control asked for and answers with what the relay said.
pub(crate) async fn control(
    State(app): State<App>,
    Path((dc, kind, name, action)): Path<(String, String, String, String)>,
    headers: HeaderMap,
) -> Reply {
    if let Some(why) = refusal(app.request.allow_control, &headers) {
        return reply(StatusCode::FORBIDDEN, false, why);
    }
    let action: Action = match action.parse() {
        Ok(action) => action,
        Err(why) => return reply(StatusCode::BAD_REQUEST, false, why),
    };
    let commit =
        app.read(|fleet| fleet.service(&dc, &kind, &name).and_then(|s| s.service.rollout.map(|_| s.service.commit)));
    let Some(commit) = commit else {
        return reply(StatusCode::NOT_FOUND, false, format!("no rollout in waves of {kind} {name} in datacenter {dc}"));
    };
    let Some(client) = app.client.as_ref() else {
        return reply(StatusCode::SERVICE_UNAVAILABLE, false, "not connected to NATS".to_owned());
    };
    let signer = match app.request.signing_key.as_deref().map(signer).transpose() {
        Ok(signer) => signer,
        Err(e) => return reply(StatusCode::INTERNAL_SERVER_ERROR, false, format!("reading the signing key: {e}")),
    };
    let request = ControlRequest {
        action,
        target: commit.clone(),
        nats_url: app.request.nats_url.clone(),
        auth: app.request.auth.clone(),
        dcs: vec![dc],
        timeout: BUS_WAIT,
        signer,
    };
    match send_on(client, &request).await {
        Ok(answers) => {
            let ok = answers.succeeded();
            let lines = answers.lines(action, &crate::rollout::short(&commit), BUS_WAIT);
            (if ok { StatusCode::OK } else { StatusCode::BAD_GATEWAY }, Json(ControlOutcome { ok, lines }))
        }
        Err(e) => reply(StatusCode::BAD_GATEWAY, false, format!("sending the control: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::super::{router, DashboardRequest, Shared};
    use super::*;
    use axum::body::Body;
    use axum::http::Request;
    use tower::ServiceExt as _;

    fn request(allow_control: bool) -> DashboardRequest {
        DashboardRequest {
            listen: "0.0.0.0:0".parse().expect("address"),
            nats_url: "nats://127.0.0.1:1".into(),
            auth: Default::default(),
            dcs: vec![],
            domains: false,
            allow_control,
            signing_key: None,
        }
    }

    async fn status_of(allow_control: bool, headers: &[(&str, &str)]) -> StatusCode {
        let app = router(Shared::new(request(allow_control), None));
        let mut builder = Request::post("/api/v1/control/dc1/service/web/pause").header("host", "dash.example:8080");
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        let response = app.oneshot(builder.body(Body::empty()).expect("request")).await.expect("response");
        response.status()
    }

    #[tokio::test]
    async fn controls_are_refused_without_the_header_from_another_origin_or_when_not_allowed() {
        let header = (CONTROL_HEADER, "1");
        assert_eq!(status_of(true, &[]).await, StatusCode::FORBIDDEN, "no header");
        assert_eq!(status_of(true, &[(CONTROL_HEADER, "yes")]).await, StatusCode::FORBIDDEN, "wrong value");
        let evil = ("origin", "https://evil.example");
        assert_eq!(status_of(true, &[header, evil]).await, StatusCode::FORBIDDEN, "other origin");
        let lookalike = ("origin", "http://dash.example:8080.evil.example");
        assert_eq!(status_of(true, &[header, lookalike]).await, StatusCode::FORBIDDEN, "lookalike origin");
        assert_eq!(status_of(false, &[header]).await, StatusCode::FORBIDDEN, "not allowed");
        // Past the refusals, the service is unknown to an empty cache.
        let own = ("origin", "http://dash.example:8080");
        assert_eq!(status_of(true, &[header, own]).await, StatusCode::NOT_FOUND);
        assert_eq!(status_of(true, &[header]).await, StatusCode::NOT_FOUND);
    }

    #[tokio::test]
    async fn a_dashboard_on_a_loopback_address_answers_only_requests_naming_a_loopback_host() {
        let on_loopback = DashboardRequest { listen: "127.0.0.1:8080".parse().expect("address"), ..request(true) };
        for (host, expected) in [
            ("127.0.0.1:8080", StatusCode::OK),
            ("localhost:8080", StatusCode::OK),
            ("[::1]:8080", StatusCode::OK),
            ("rebound.example:8080", StatusCode::FORBIDDEN),
            ("127.0.0.1.rebound.example", StatusCode::FORBIDDEN),
        ] {
            let app = router(Shared::new(on_loopback.clone(), None));
            let get = Request::get("/api/v1/errors").header("host", host).body(Body::empty()).expect("request");
            assert_eq!(app.oneshot(get).await.expect("response").status(), expected, "{host}");
        }
    }
}
