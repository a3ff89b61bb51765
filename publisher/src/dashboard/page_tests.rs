//! The pages as rendered: the DOM the browser test relies on, and text from pushers
//! shown as text.

use super::super::model::tests::{fleet, SCRIPT};
use super::*;

#[test]
fn text_from_pushers_is_escaped_everywhere() {
    let html = fleet_content(&fleet(), None).into_string();
    assert!(html.contains("&lt;script&gt;alert(1)&lt;/script&gt;"), "{html}");
    assert!(!html.contains("<script>alert"), "{html}");
    assert!(!html.contains("<b>web</b>"), "{html}");
    assert!(!html.contains(SCRIPT));
    let page = layout("fleet", SCRIPT, 1, fleet_content(&fleet(), None), None).into_string();
    assert_eq!(page.matches("<script").count(), 1, "only the page's own script: {page}");
    assert!(page.contains(r#"<script src="/dashboard.js"></script>"#), "{page}");
}

#[test]
fn the_fleet_page_follows_the_dom_contract() {
    let html = fleet_content(&fleet(), None).into_string();
    assert!(html.starts_with(r#"<div id="fleet-content" data-generation="42"><div id="bus" class="ok">"#), "{html}");
    assert!(html.contains(r#"<section class="dc" data-dc="dc1"><h2>dc1</h2>"#), "{html}");
    assert!(html.contains(r#"<tr class="service" data-dc="dc1" data-kind="service" data-name="web">"#), "{html}");
    assert!(html.contains(r#"<td class="name"><a href="/services/dc1/service/web">web</a></td>"#), "{html}");
    assert!(html.contains(r#"<td class="commit" title="bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb">bbbbbbb</td>"#));
    for cell in [r#"class="at">1<"#, r#"class="pending">2<"#] {
        assert!(html.contains(cell), "{cell} in {html}");
    }
    // Hosts that failed or went back stand out; none does not.
    for cell in [r#"class="failed"><span class="bad">1<"#, r#"class="reverted"><span class="bad">1<"#] {
        assert!(html.contains(cell), "{cell} in {html}");
    }
    assert!(html.contains(r#"class="failed"><span>0<"#), "{html}");
    assert!(html.contains(r#"<td class="rollout">rolling, wave 1/2</td>"#), "{html}");
    assert!(html.contains(r#"<td class="timeline-cell"><svg class="timeline""#), "{html}");
    assert!(html.contains(r#"<td class="pushed" title="1970-01-01T00:00:02Z">"#), "{html}");
    assert!(html.contains(r#"<ul id="errors"><li class="error" data-dc="dc1">"#), "{html}");
    let mut lost = fleet();
    lost.bus_ok = false;
    assert!(fleet_content(&lost, None).into_string().contains(r#"<div id="bus" class="lost">"#));
    assert!(!fleet_content(&fleet(), Some("dc2")).into_string().contains("class=\"dc\""));
}

#[test]
fn the_service_page_lists_hosts_and_offers_controls_only_when_allowed() {
    let html = service_content(&fleet(), "dc1", "service", "web", true).expect("web").into_string();
    assert!(html.contains(r#"<tr class="host" data-host="h3">"#), "{html}");
    assert!(html.contains(r#"<td class="state">failed</td><td class="commit">bbbbbbb</td><td class="exec-status">1</td><td class="reason">exec exited 1</td>"#), "{html}");
    assert!(html.contains(r#"<td class="state">held</td>"#));
    assert!(
        html.contains(
            r#"<button class="control" data-action="pause" data-url="/api/v1/control/dc1/service/web/pause">"#
        ),
        "{html}"
    );
    assert_eq!(html.matches("<button").count(), 4);
    let without = service_content(&fleet(), "dc1", "service", "web", false).expect("web").into_string();
    assert!(!without.contains("<button"));
    let no_rollout = service_content(&fleet(), "dc1", "application", "evil", true).expect("evil").into_string();
    assert!(!no_rollout.contains("<button"), "nothing to control");
    assert!(service_content(&fleet(), "dc1", "service", "nope", true).is_none());
}

#[test]
fn times_are_relative_with_the_exact_time_as_title() {
    assert_eq!(ago(1_000, 13_500), "12 s ago");
    assert_eq!(ago(0, 5 * 60_000), "5 min ago");
    assert_eq!(ago(0, 3 * 3_600_000), "3 h ago");
    assert_eq!(ago(5_000, 1_000), "0 s ago", "a clock behind says now");
    assert_eq!(iso(0), "1970-01-01T00:00:00Z");
    assert_eq!(iso(1_796_682_306_000), "2026-12-07T22:25:06Z");
    assert_eq!(iso(951_825_600_000), "2000-02-29T12:00:00Z");
    assert_eq!(service_path("/services", "dc 1", "service", "a/b?"), "/services/dc%201/service/a%2Fb%3F");
}
