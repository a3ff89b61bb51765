//! How `publisher status` shows a rollout: on a terminal, one progress bar per
//! datacenter redrawn in place; otherwise (a pipe, a log, a script), a plain summary line
//! each time a datacenter's line changes.

use std::io::Write as _;

use confcast_publisher::status::{DcProgress, Rollout};

/// Width of a progress bar, in cells.
const BAR: usize = 24;

/// The output of `publisher status`.
#[derive(Debug)]
pub(crate) struct Screen {
    tty: bool,
    /// Lines drawn last (the terminal's block, or the last line printed per datacenter).
    shown: Vec<String>,
}

impl Screen {
    pub(crate) fn new(tty: bool) -> Screen {
        Screen { tty, shown: Vec::new() }
    }

    /// Shows a new state of the rollout.
    pub(crate) fn show(&mut self, rollout: &Rollout, target: &str) {
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
    pub(crate) fn finish(&mut self) {
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
