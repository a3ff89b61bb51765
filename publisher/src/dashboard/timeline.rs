//! The small timeline drawn next to a service rolling out in waves: hosts at the new
//! commit over the time since the rollout began, one step per host, with a mark where
//! each wave began. Drawn from the hosts' reports alone (the time of each host's last
//! report at the commit), so it needs no history beyond the status stream.

use confcast_schemas::HostStatus;
use maud::{html, Markup};

use crate::rollout::short;

/// Drawing size, in SVG user units (the page scales it).
const WIDTH: f64 = 160.0;
const HEIGHT: f64 = 32.0;

/// What a timeline shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Timeline {
    /// When the rollout began, ms since the Unix epoch: the left edge.
    pub started_ms: u64,
    /// Now: the right edge.
    pub now_ms: u64,
    /// When each wave began, as far as known, oldest first.
    pub wave_starts: Vec<u64>,
    /// When each host at the commit reported it, oldest first (never before the start).
    pub arrivals: Vec<u64>,
    /// Hosts of the service in all: the top of the drawing.
    pub hosts: usize,
    /// The commit rolled out, short.
    pub commit: String,
}

impl Timeline {
    /// The timeline of the rollout of `commit` begun at `started_ms`, from the hosts'
    /// latest reports.
    pub(crate) fn new<'a>(
        started_ms: u64,
        now_ms: u64,
        mut wave_starts: Vec<u64>,
        statuses: impl Iterator<Item = &'a HostStatus>,
        commit: &str,
    ) -> Timeline {
        let mut hosts = 0;
        let mut arrivals = Vec::new();
        for status in statuses {
            hosts += 1;
            if status.ok && status.commit.as_deref() == Some(commit) {
                arrivals.push(status.at_ms.max(started_ms));
            }
        }
        arrivals.sort_unstable();
        wave_starts.sort_unstable();
        Timeline { started_ms, now_ms: now_ms.max(started_ms), wave_starts, arrivals, hosts, commit: short(commit) }
    }

    /// The x of a moment.
    fn x(&self, at_ms: u64) -> f64 {
        let span = (self.now_ms - self.started_ms).max(1) as f64;
        (at_ms.clamp(self.started_ms, self.now_ms) - self.started_ms) as f64 / span * WIDTH
    }

    /// The y of a host count.
    fn y(&self, count: usize) -> f64 {
        HEIGHT - count as f64 / self.hosts.max(1) as f64 * HEIGHT
    }

    /// The step line's points: flat until a host arrives, then one step up per host.
    pub(crate) fn points(&self) -> Vec<(f64, f64)> {
        let mut points = vec![(0.0, self.y(0))];
        for (i, at) in self.arrivals.iter().enumerate() {
            let x = self.x(*at);
            points.push((x, self.y(i)));
            points.push((x, self.y(i + 1)));
        }
        points.push((WIDTH, self.y(self.arrivals.len())));
        points
    }

    /// What it shows, in words (the SVG's `<title>`, which browsers show on hover).
    fn describe(&self) -> String {
        let minutes = (self.now_ms - self.started_ms) / 60_000;
        let mut text = format!(
            "{} of {} hosts at {} over the {minutes} min since the rollout began",
            self.arrivals.len(),
            self.hosts,
            self.commit
        );
        if !self.wave_starts.is_empty() {
            let starts: Vec<String> =
                self.wave_starts.iter().map(|s| format!("+{} s", (s.saturating_sub(self.started_ms)) / 1000)).collect();
            text.push_str(&format!("; waves began at {}", starts.join(", ")));
        }
        text
    }

    /// The inline SVG.
    pub(crate) fn render(&self) -> Markup {
        let points: Vec<String> = self.points().iter().map(|(x, y)| format!("{x:.1},{y:.1}")).collect();
        html! {
            svg class="timeline" xmlns="http://www.w3.org/2000/svg" width="160" height="32" viewBox="0 0 160 32" {
                title { (self.describe()) }
                @for start in &self.wave_starts {
                    @let x = format!("{:.1}", self.x(*start));
                    line class="wave" x1=(x) x2=(x) y1="0" y2="32" stroke="#bbb" stroke-dasharray="2,2" {}
                }
                polyline class="hosts" points=(points.join(" ")) fill="none" stroke="currentColor" {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use confcast_schemas::{Kind, WIRE_VERSION};

    fn status(host: &str, commit: &str, at_ms: u64) -> HostStatus {
        HostStatus {
            v: WIRE_VERSION,
            dc: "dc1".into(),
            host: host.into(),
            kind: Kind::Service,
            name: "web".into(),
            commit: Some(commit.into()),
            ok: true,
            error: None,
            exec_status: None,
            at_ms,
            health: None,
        }
    }

    #[test]
    fn each_host_at_the_commit_is_one_step_up_at_its_report() {
        let new = "b".repeat(40);
        let statuses = [status("h1", &new, 3_000), status("h2", &"a".repeat(40), 2_000), status("h3", &new, 7_000)];
        let timeline = Timeline::new(1_000, 11_000, vec![1_000, 5_000], statuses.iter(), &new);
        assert_eq!(timeline.arrivals, vec![3_000, 7_000]);
        let points = timeline.points();
        // Start, two points per step, end.
        assert_eq!(points.len(), 2 + 2 * 2);
        let steps = points.windows(2).filter(|w| w[0].0 == w[1].0 && w[1].1 < w[0].1).count();
        assert_eq!(steps, 2, "{points:?}");
        assert_eq!(points[1], (32.0, 32.0));
        let top = points.last().expect("end point").1;
        assert!((top - 32.0 / 3.0).abs() < 1e-9, "2 of 3 hosts: {top}");
        let svg = timeline.render().into_string();
        assert!(svg.starts_with("<svg class=\"timeline\""), "{svg}");
        assert_eq!(svg.matches("class=\"wave\"").count(), 2);
        assert!(svg.contains("<title>2 of 3 hosts at bbbbbbb"), "{svg}");
    }
}
