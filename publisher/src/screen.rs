//! What `publisher status` prints: on a terminal, one progress bar per datacenter
//! redrawn in place; otherwise (a pipe, a log, a script), a plain summary line each time
//! a datacenter's line changes; and at the end, one line with the verdict. A commit
//! rolled out in waves shows, in its datacenter's line, the phase, the current wave and
//! its hosts, the bake left, and for a halted rollout every unhealthy host and why.

use std::io::Write as _;
use std::time::Duration;

use crate::rollout::{DcProgress, Rollout, Target, Verdict};
use crate::status::Followed;

/// Width of a progress bar, in cells.
const BAR: usize = 24;

/// The output of `publisher status`.
#[derive(Debug)]
pub struct Screen {
    tty: bool,
    /// Lines drawn last (the terminal's block, or the last line printed per datacenter).
    shown: Vec<String>,
}

impl Screen {
    /// Draws bars when `tty`, plain lines otherwise.
    pub fn new(tty: bool) -> Screen {
        Screen { tty, shown: Vec::new() }
    }

    /// Shows a new state of the rollout.
    pub fn show(&mut self, rollout: &Rollout, target: &str) {
        let lines = rollout.lines(target);
        let mut out = std::io::stdout().lock();
        if self.tty {
            // Back to the top of the block drawn last, then redraw every line.
            if !self.shown.is_empty() {
                let _ = write!(out, "\x1b[{}A", self.shown.len());
            }
            for (dc, line) in rollout.dcs.iter().zip(&lines) {
                let _ = writeln!(out, "\r\x1b[2K{} {line}", bar(dc));
            }
            self.shown = lines;
        } else {
            for (i, line) in lines.iter().enumerate() {
                if self.shown.get(i) != Some(line) {
                    let _ = writeln!(out, "{line}");
                }
            }
            self.shown = lines;
        }
        let _ = out.flush();
    }

    /// Leaves the output ready for the final message.
    pub fn finish(&mut self) {
        let _ = std::io::stdout().flush();
    }
}

/// `[#########---------------]` for the share of hosts done.
fn bar(dc: &DcProgress) -> String {
    let (done, total) = (dc.done(), dc.total());
    let filled = match total {
        0 if dc.complete() => BAR,
        0 => 0,
        _ => done * BAR / total,
    };
    format!("[{}{}]", "#".repeat(filled), "-".repeat(BAR - filled))
}

/// The last line of `publisher status`, followed for `timeout`: complete, concerning
/// nobody (and why), halted, or not complete yet.
pub fn conclusion(target: &Target, followed: &Followed, timeout: Duration) -> String {
    let label = target.to_string();
    match followed.rollout.verdict() {
        Verdict::Complete => format!("rollout of {label} complete"),
        Verdict::NothingAffected => {
            match target {
                Target::Commit(prefix) if followed.pushed.known => {
                    let refs: Vec<&str> = followed.pushed.refs_at(prefix).map(|(r, _)| r).collect();
                    if refs.is_empty() {
                        format!("commit {label} is unknown: no datacenter has published it, and no ref was last pushed to it")
                    } else {
                        format!("no datacenter follows {}, where {label} was pushed", refs.join(", "))
                    }
                }
                _ => format!("no datacenter follows {label}"),
            }
        }
        Verdict::InProgress if followed.rollout.stopped() => {
            let halted: Vec<&str> = followed.rollout.halted().map(|d| d.dc.as_str()).collect();
            let (failed, pending) = followed.rollout.counts();
            format!("rollout of {label} halted in {}: {failed} host(s) failed, {pending} pending", halted.join(", "))
        }
        Verdict::InProgress => {
            let (failed, pending) = followed.rollout.counts();
            format!(
                "rollout of {label} not complete after {}s: {failed} host(s) failed, {pending} pending",
                timeout.as_secs()
            )
        }
    }
}
