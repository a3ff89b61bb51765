//! The pages: the fleet (`/`) and one service (`/services/{dc}/{kind}/{name}`), each
//! with its fragment (`/fragment...`), the part the page's script swaps in on every
//! change. Written with maud, which escapes every value it interpolates: names, ref
//! names, subjects, authors, reasons and error messages come from pushers and hosts.

use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use confcast_schemas::message::now_ms;
use maud::{html, Markup, DOCTYPE};
use serde::Deserialize;

use super::api::{ErrorView, HostView, RolloutView, ServiceDetail, ServiceView};
use super::model::Fleet;
use super::App;
use crate::rollout::short;

/// What the pages may load: their own script and styles only, and no framing (the
/// control buttons cannot be clicked through another site's page). Should a value ever
/// slip through unescaped, an inline script it carries would still not run.
const CONTENT_SECURITY_POLICY: &str =
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; frame-ancestors 'none'";

/// The page's script (`/dashboard.js`), the same for both pages: on each change event, fetch the
/// fragment of the page's own path and swap it in (one fetch at a time, one more if
/// changes came meanwhile); the control buttons post and show the answer as text.
const SCRIPT: &str = r#"
const es = new EventSource('/events');
const fragment = '/fragment' + (location.pathname === '/' ? '' : location.pathname) + location.search;
let busy = false, again = false;
async function refresh() {
  if (busy) { again = true; return; }
  busy = true;
  try {
    const response = await fetch(fragment);
    if (response.ok) {
      const fleet = document.getElementById('fleet');
      fleet.innerHTML = await response.text();
      const content = document.getElementById('fleet-content');
      if (content) fleet.dataset.generation = content.dataset.generation;
    }
  } catch (e) {}
  busy = false;
  if (again) { again = false; refresh(); }
}
es.onmessage = refresh;
document.addEventListener('click', async (event) => {
  const button = event.target.closest('button.control');
  if (!button) return;
  const result = document.getElementById('control-result');
  result.textContent = button.dataset.action + '...';
  try {
    const response = await fetch(button.dataset.url, { method: 'POST', headers: { 'X-Confcast-Control': '1' } });
    const outcome = await response.json();
    result.textContent = outcome.lines.join('\n');
  } catch (e) {
    result.textContent = 'no answer: ' + e;
  }
});
"#;

const STYLE: &str = "body{font-family:sans-serif;margin:1em}table{border-collapse:collapse}\
td,th{padding:2px 8px;border-bottom:1px solid #ddd;text-align:left}#bus.ok{color:#080}\
#bus.lost{background:#c00;color:#fff;padding:4px}.bad{color:#c00;font-weight:bold}\
td.rollout{min-width:10em}#control-result{white-space:pre-wrap}";

/// The fleet page's query: `?dc=DC` shows only that datacenter.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct Only {
    dc: Option<String>,
}

/// `GET /`.
pub(crate) async fn fleet(State(app): State<App>, Query(only): Query<Only>) -> Response {
    let (generation, content) = app.read(|f| (f.generation, fleet_content(f, only.dc.as_deref())));
    page_response(layout("fleet", "confcast fleet", generation, content, None))
}

/// `GET /fragment`.
pub(crate) async fn fleet_fragment(State(app): State<App>, Query(only): Query<Only>) -> Html<String> {
    Html(app.read(|f| fleet_content(f, only.dc.as_deref())).into_string())
}

/// `GET /services/{dc}/{kind}/{name}`.
pub(crate) async fn service(
    State(app): State<App>,
    Path((dc, kind, name)): Path<(String, String, String)>,
) -> Response {
    let read = app.read(|f| Some((f.generation, service_content(f, &dc, &kind, &name, app.request.allow_control)?)));
    let Some((generation, content)) = read else {
        return (StatusCode::NOT_FOUND, format!("no {kind} {name} in datacenter {dc}")).into_response();
    };
    let title = format!("{kind} {name} in {dc}");
    let result = html! { div id="control-result" {} };
    page_response(layout("service", &title, generation, content, Some(result)))
}

/// `GET /fragment/services/{dc}/{kind}/{name}`.
pub(crate) async fn service_fragment(
    State(app): State<App>,
    Path((dc, kind, name)): Path<(String, String, String)>,
) -> Response {
    match app.read(|f| service_content(f, &dc, &kind, &name, app.request.allow_control)) {
        Some(content) => Html(content.into_string()).into_response(),
        None => (StatusCode::NOT_FOUND, format!("no {kind} {name} in datacenter {dc}")).into_response(),
    }
}

/// `GET /dashboard.js`.
pub(crate) async fn script() -> Response {
    ([(header::CONTENT_TYPE, "text/javascript; charset=utf-8")], SCRIPT).into_response()
}

/// A page, with its [`CONTENT_SECURITY_POLICY`].
fn page_response(page: Markup) -> Response {
    let mut response = Html(page.into_string()).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CONTENT_SECURITY_POLICY));
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    response
}

/// A whole page around its live content.
fn layout(page: &str, title: &str, generation: u64, content: Markup, after: Option<Markup>) -> Markup {
    html! {
        (DOCTYPE)
        html {
            head { meta charset="utf-8"; title { (title) } style { (STYLE) } }
            body data-page=(page) {
                h1 { (title) }
                (after.unwrap_or_default())
                main id="fleet" data-generation=(generation) { (content) }
                script src="/dashboard.js" {}
            }
        }
    }
}

/// The banner saying whether the bus is reachable.
fn bus(fleet: &Fleet) -> Markup {
    match fleet.bus_ok {
        true => html! { div id="bus" class="ok" { "NATS connected" } },
        false => html! { div id="bus" class="lost" { "NATS unreachable: showing what was last read" } },
    }
}

/// The fleet: every datacenter's services, then the errors.
pub(crate) fn fleet_content(fleet: &Fleet, only: Option<&str>) -> Markup {
    let now = now_ms();
    let errors: Vec<ErrorView> = fleet.errors().into_iter().filter(|e| only.is_none_or(|o| o == e.dc)).collect();
    html! {
        div id="fleet-content" data-generation=(fleet.generation) {
            (bus(fleet))
            @for dc in fleet.datacenters(only) {
                section class="dc" data-dc=(dc.dc) {
                    h2 { (dc.dc) }
                    table {
                        tr { th { "service" } th { "commit" } th { "ref" } th { "version" } th { "subject" } th { "author" }
                             th { "pushed" } th { "at" } th { "pending" } th { "failed" } th { "reverted" } th { "rollout" } th {} }
                        @for service in &dc.services { (service_row(&dc.dc, service, now)) }
                    }
                }
            }
            h2 { "Errors" }
            ul id="errors" { @for error in &errors { (error_item(error, now)) } }
        }
    }
}

/// One service's row of the fleet page.
fn service_row(dc: &str, s: &ServiceView, now: u64) -> Markup {
    html! {
        tr class="service" data-dc=(dc) data-kind=(s.kind) data-name=(s.name) {
            td class="name" { a href=(service_path("/services", dc, &s.kind, &s.name)) { (s.name) } }
            td class="commit" title=(s.commit) { (short(&s.commit)) }
            td class="ref" { (s.ref_name) }
            td class="version" { (s.version) }
            td class="subject" { (s.subject.as_deref().unwrap_or("")) }
            td class="author" { (s.author.as_deref().unwrap_or("")) }
            (time_cell("pushed", s.pushed_ms, now))
            td class="at" { (s.hosts.at) }
            td class="pending" { (s.hosts.pending + s.hosts.held) }
            td class="failed" { span class=[(s.hosts.failed > 0).then_some("bad")] { (s.hosts.failed) } }
            td class="reverted" { span class=[(s.hosts.reverted > 0).then_some("bad")] { (s.hosts.reverted) } }
            td class="rollout" { (s.rollout.as_ref().map(|r| rollout_text(r, now)).unwrap_or_default()) }
            td class="timeline-cell" { @if let Some(t) = &s.timeline { (t.render()) } }
        }
    }
}

/// Where a rollout stands, short: `rolling, wave 1/3, bake 20 s left`.
fn rollout_text(r: &RolloutView, now: u64) -> String {
    let mut text = r.phase.clone();
    if !matches!(r.phase.as_str(), "complete" | "promoted") {
        text.push_str(&format!(", wave {}/{}", r.wave + 1, r.waves.len()));
    }
    if let Some(end) = r.bake_ends_ms.filter(|end| *end > now && r.phase == "rolling") {
        text.push_str(&format!(", bake {} s left", (end - now).div_ceil(1000)));
    }
    text
}

/// One error event.
fn error_item(e: &ErrorView, now: u64) -> Markup {
    html! {
        li class="error" data-dc=(e.dc) {
            time datetime=(iso(e.at_ms)) title=(iso(e.at_ms)) { (ago(e.at_ms, now)) } " "
            span class="dc" { (e.dc) } " "
            span class="ref" { (e.ref_name.as_deref().unwrap_or("")) } " "
            span class="commit" { (e.commit.as_deref().map(short).unwrap_or_default()) } " "
            span class="message" { (e.message) }
        }
    }
}

/// One service with its hosts; `None` when there is no such service.
pub(crate) fn service_content(fleet: &Fleet, dc: &str, kind: &str, name: &str, allow_control: bool) -> Option<Markup> {
    let ServiceDetail { service, hosts } = fleet.service(dc, kind, name)?;
    let now = now_ms();
    let controls = allow_control
        && service.rollout.as_ref().is_some_and(|r| !matches!(r.phase.as_str(), "halted" | "complete" | "promoted"));
    Some(html! {
        div id="fleet-content" data-generation=(fleet.generation) {
            (bus(fleet))
            table { (service_row(dc, &service, now)) }
            @if controls {
                div class="controls" {
                    @for action in ["pause", "resume", "abort", "promote"] {
                        button class="control" data-action=(action)
                            data-url=(format!("{}/{action}", service_path("/api/v1/control", dc, kind, name))) { (action) }
                    }
                }
            }
            table class="hosts" {
                tr { th { "host" } th { "state" } th { "commit" } th { "exec status" } th { "reason" } th { "reported" } }
                @for host in &hosts { (host_row(host, now)) }
            }
        }
    })
}

/// One host's row of the service page.
fn host_row(h: &HostView, now: u64) -> Markup {
    html! {
        tr class="host" data-host=(h.host) {
            td class="host" { (h.host) }
            td class="state" { (h.state) }
            td class="commit" { (h.commit.as_deref().map(short).unwrap_or_default()) }
            td class="exec-status" { @if let Some(code) = h.exec_status { (code) } }
            td class="reason" { (h.reason.as_deref().unwrap_or("")) }
            (time_cell("reported", Some(h.at_ms).filter(|at| *at > 0), now))
        }
    }
}

/// A time, relative (`12 s ago`) with the exact time as its title.
fn time_cell(class: &str, at_ms: Option<u64>, now: u64) -> Markup {
    match at_ms {
        Some(at) => html! { td class=(class) title=(iso(at)) { (ago(at, now)) } },
        None => html! { td class=(class) {} },
    }
}

/// `/prefix/dc/kind/name`, each part percent-encoded.
fn service_path(prefix: &str, dc: &str, kind: &str, name: &str) -> String {
    let encode = |s: &str| {
        s.bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => (b as char).to_string(),
                _ => format!("%{b:02X}"),
            })
            .collect::<String>()
    };
    format!("{prefix}/{}/{}/{}", encode(dc), encode(kind), encode(name))
}

/// How long ago, in the largest unit that fits: `12 s ago`, `5 min ago`, `3 h ago`, `2 d ago`.
pub(crate) fn ago(at_ms: u64, now_ms: u64) -> String {
    let secs = now_ms.saturating_sub(at_ms) / 1000;
    match secs {
        0..60 => format!("{secs} s ago"),
        60..3600 => format!("{} min ago", secs / 60),
        3600..86400 => format!("{} h ago", secs / 3600),
        _ => format!("{} d ago", secs / 86400),
    }
}

/// `2026-12-07T22:25:06Z`: ms since the Unix epoch in UTC (days to a civil date by
/// Howard Hinnant's algorithm, which needs no calendar library).
pub(crate) fn iso(at_ms: u64) -> String {
    let secs = at_ms / 1000;
    let (days, rest) = ((secs / 86400) as i64, secs % 86400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z", rest / 3600, rest % 3600 / 60, rest % 60)
}

#[cfg(test)]
#[path = "page_tests.rs"]
mod tests;
