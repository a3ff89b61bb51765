//! Running one of the operator's commands for a change: `sh -c CMD` with the change in
//! its environment, stdin closed, killed when it outlives its time limit (with every
//! process it started: it runs in its own process group) or the subscriber. `--exec` ([`crate::exec`]), `--check-cmd` and `--health-cmd`
//! ([`crate::checks`]) all run through [`run`].
//!
//! What the command writes on its stdout and stderr is read line by line and logged at
//! INFO, each line prefixed with the service (`web: reloading nginx`, fields `service`,
//! `stream` and `command`), so that it never interleaves raw with the subscriber's own
//! lines and a log collector keeps it with the host's other events. Its first lines,
//! both streams merged as they came, are kept ([`FirstLines`]) so that a report can say
//! why a check failed. A process the command leaves running in the background keeps its
//! output logged the same way for as long as it holds the pipe, without holding up the
//! next change.

use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use confcast_schemas::ServiceId;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};

/// The change a command runs for.
#[derive(Debug, Clone)]
pub struct Change<'a> {
    /// The service.
    pub service: &'a ServiceId,
    /// The commit now in place, or about to be (`None`: removed).
    pub commit: Option<&'a str>,
    /// The ref it came from.
    pub ref_name: &'a str,
    /// `CONFCAST_DIR`: `<dir>/<service>`, or the new tree a check looks at.
    pub dir: &'a Path,
}

/// How a command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// It exited, or a signal ended it, by itself.
    Exited(ExitStatus),
    /// It ran longer than its time limit and was killed.
    Killed {
        /// The limit.
        after: Duration,
    },
}

/// A command that ran: how it ended and the first lines it wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finished {
    /// How it ended.
    pub ended: Ended,
    /// Its first lines of output, stdout and stderr merged.
    pub output: FirstLines,
}

/// A command that could not be run or waited for.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// `sh` could not be started.
    #[error("cannot run {flag}: {source}")]
    Spawn {
        /// The flag the command came from (`--exec`).
        flag: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Waiting for it failed.
    #[error("{flag}: {source}")]
    Wait {
        /// The flag the command came from.
        flag: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Runs `cmd`, given by `flag`, with `sh -c` for `change`, and kills it if it has not
/// finished after `timeout`. `CONFCAST_SERVICE`, `CONFCAST_KIND`, `CONFCAST_COMMIT`,
/// `CONFCAST_REF` and `CONFCAST_DIR` describe the change.
pub async fn run(flag: &'static str, cmd: &str, change: &Change<'_>, timeout: Duration) -> Result<Finished, RunError> {
    let mut child = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .env("CONFCAST_SERVICE", &change.service.name)
        .env("CONFCAST_KIND", change.service.kind.as_str())
        .env("CONFCAST_COMMIT", change.commit.unwrap_or(""))
        .env("CONFCAST_REF", change.ref_name)
        .env("CONFCAST_DIR", change.dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        // Its own process group, so that a timeout kills what it started too.
        .process_group(0)
        .spawn()
        .map_err(|source| RunError::Spawn { flag, source })?;
    let group = child.id().and_then(|id| i32::try_from(id).ok()).map(nix::unistd::Pid::from_raw);
    let first = Arc::new(Mutex::new(FirstLines::default()));
    let pipe =
        |stream: &'static str| Output { service: change.service.name.clone(), stream, flag, first: first.clone() };
    let output: Vec<_> = [
        child.stdout.take().map(|out| tokio::spawn(log_lines(out, pipe("stdout")))),
        child.stderr.take().map(|err| tokio::spawn(log_lines(err, pipe("stderr")))),
    ]
    .into_iter()
    .flatten()
    .collect();
    let waited = tokio::time::timeout(timeout, child.wait()).await;
    if waited.is_err() {
        // The whole group: a command that outlives its limit leaves nothing running
        // (`sh -c 'a | b'`, or a process it started in the background).
        if let Some(group) = group {
            let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL);
        }
        let _ = child.kill().await;
    }
    // The command's last lines are logged before its outcome; a background process
    // that still holds the pipes is not waited for.
    for mut reader in output {
        let _ = tokio::time::timeout(OUTPUT_GRACE, &mut reader).await;
    }
    let ended = match waited {
        Ok(exit) => Ended::Exited(exit.map_err(|source| RunError::Wait { flag, source })?),
        Err(_) => Ended::Killed { after: timeout },
    };
    let output = first.lock().unwrap_or_else(|e| e.into_inner()).clone();
    Ok(Finished { ended, output })
}

/// How long the command's output may still be read after it exited, before its outcome
/// is reported.
const OUTPUT_GRACE: Duration = Duration::from_millis(200);

/// A longer line is logged in pieces of this many bytes.
const MAX_LINE: usize = 8 * 1024;

/// At most this many lines of a command's output are kept for a report.
pub const FIRST_LINES: usize = 10;

/// At most this many bytes of them.
pub const FIRST_BYTES: usize = 2048;

/// The first lines a command wrote, stdout and stderr merged as they came: at most
/// [`FIRST_LINES`] lines and [`FIRST_BYTES`] bytes, each line as it was logged (control
/// characters escaped).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FirstLines {
    lines: Vec<String>,
    bytes: usize,
    /// More was written than is kept.
    cut: bool,
}

impl FirstLines {
    /// Keeps `line` (without its line end) while there is room, as much of it as fits
    /// when there is room for part of it.
    pub fn push(&mut self, line: &str) {
        let room = FIRST_BYTES.saturating_sub(self.bytes);
        if self.lines.len() >= FIRST_LINES || room == 0 {
            self.cut = true;
            return;
        }
        let mut end = line.len().min(room);
        while !line.is_char_boundary(end) {
            end -= 1;
        }
        if end < line.len() {
            self.cut = true;
        }
        // The line end counts too: what is kept is at most FIRST_BYTES once joined.
        self.bytes += end + 1;
        self.lines.push(line[..end].to_owned());
    }

    /// Whether nothing was written.
    pub fn is_empty(&self) -> bool {
        self.lines.is_empty() && !self.cut
    }

    /// The lines kept, one per line, then `...` on a line of its own when more was
    /// written.
    pub fn text(&self) -> String {
        let mut text = self.lines.join("\n");
        if self.cut {
            if !text.is_empty() {
                text.push('\n');
            }
            text.push_str("...");
        }
        text
    }
}

/// Where the lines of one of a command's pipes go.
struct Output {
    /// The service, which prefixes each logged line.
    service: String,
    /// `stdout` or `stderr`.
    stream: &'static str,
    /// The flag the command came from.
    flag: &'static str,
    /// The first lines of both pipes.
    first: Arc<Mutex<FirstLines>>,
}

impl Output {
    fn line(&self, line: &[u8]) {
        let text = printable(line);
        let (service, stream, command) = (self.service.as_str(), self.stream, self.flag);
        tracing::info!(service, stream, command, "{service}: {text}");
        self.first.lock().unwrap_or_else(|e| e.into_inner()).push(&text);
    }
}

/// Logs what the command writes on one of its pipes, line by line, until the pipe closes.
async fn log_lines(pipe: impl AsyncRead + Unpin, output: Output) {
    let mut reader = BufReader::new(pipe);
    let mut line = Vec::new();
    loop {
        let chunk = match reader.fill_buf().await {
            Ok(chunk) if !chunk.is_empty() => chunk,
            _ => break,
        };
        let (take, ends) = match chunk.iter().position(|b| *b == b'\n') {
            Some(i) => (i + 1, true),
            None => (chunk.len().min(MAX_LINE - line.len()), false),
        };
        line.extend_from_slice(&chunk[..take]);
        reader.consume(take);
        if ends || line.len() >= MAX_LINE {
            output.line(&line);
            line.clear();
        }
    }
    if !line.is_empty() {
        output.line(&line);
    }
}

/// The line as text that cannot forge log lines: no line end, control characters escaped.
fn printable(line: &[u8]) -> String {
    let text = String::from_utf8_lossy(line);
    let text = text.strip_suffix('\n').unwrap_or(&text);
    let text = text.strip_suffix('\r').unwrap_or(text);
    text.chars()
        .map(|c| if c.is_control() && c != '\t' { c.escape_default().to_string() } else { c.to_string() })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_lines_are_kept_within_their_bounds() {
        let mut few = FirstLines::default();
        assert!(few.is_empty());
        few.push("one");
        few.push("");
        few.push("three");
        assert_eq!(few.text(), "one\n\nthree");

        let mut many = FirstLines::default();
        for i in 0..FIRST_LINES + 5 {
            many.push(&format!("line {i}"));
        }
        let text = many.text();
        assert_eq!(text.lines().count(), FIRST_LINES + 1, "{text}");
        assert!(text.starts_with("line 0\n") && text.ends_with("line 9\n..."), "{text}");

        let mut long = FirstLines::default();
        long.push(&"é".repeat(FIRST_BYTES));
        long.push("never kept");
        let text = long.text();
        assert!(text.ends_with("\n...") && !text.contains("never"), "a cut is said");
        let kept = text.trim_end_matches("\n...");
        assert!(kept.len() <= FIRST_BYTES && kept.len() >= FIRST_BYTES - 1, "{}", kept.len());
        assert!(kept.chars().all(|c| c == 'é'), "cut on a character boundary");

        let mut full = FirstLines::default();
        full.push(&"x".repeat(FIRST_BYTES - 1));
        full.push("y");
        assert_eq!(full.text(), format!("{}\n...", "x".repeat(FIRST_BYTES - 1)), "no room left for a line end");
    }

    /// Log lines written by the code under test, as text.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("buffer").extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Captured {
        fn text(&self) -> String {
            String::from_utf8_lossy(&self.0.lock().expect("buffer")).into_owned()
        }
    }

    #[tokio::test]
    async fn the_commands_output_is_logged_line_by_line_with_the_service_and_its_first_lines_kept() {
        let captured = Captured::default();
        let writer = captured.clone();
        let logs = tracing_subscriber::fmt().with_writer(move || writer.clone()).with_ansi(false).finish();
        let _guard = tracing::subscriber::set_default(logs);
        let cmd = r"echo reloaded; echo 'warning: old key' >&2; printf 'forged\nINFO fake\033[31m'";
        let web = ServiceId::service("web");
        let change = Change { service: &web, commit: Some("abc"), ref_name: "r", dir: Path::new("/d/web") };
        let finished = run("--exec", cmd, &change, Duration::from_secs(5)).await.expect("runs");
        assert!(matches!(finished.ended, Ended::Exited(status) if status.success()));
        let text = captured.text();
        let lines: Vec<&str> = text.lines().collect();
        let line_of = |needle: &str| lines.iter().find(|l| l.contains(needle)).copied().unwrap_or_default();
        assert!(
            line_of("reloaded").contains("web: reloaded") && line_of("reloaded").contains("stream=\"stdout\""),
            "{text}"
        );
        assert!(
            line_of("old key").contains("web: warning: old key") && line_of("old key").contains("stderr"),
            "{text}"
        );
        assert!(line_of("reloaded").contains("command=\"--exec\""), "{text}");
        // Every line of the command is one log line of its own, prefixed, escaped.
        assert!(line_of("INFO fake").contains("web: INFO fake\\u{1b}[31m"), "{text}");
        assert!(lines.iter().all(|l| l.contains("web: ")), "{text}");
        // Both pipes, merged: each pipe's lines in order.
        let first = finished.output.text();
        for line in ["reloaded", "warning: old key", "forged", "INFO fake\\u{1b}[31m"] {
            assert!(first.lines().any(|l| l == line), "{first}");
        }
        assert!(first.find("forged") < first.find("INFO fake"), "{first}");
    }

    #[tokio::test]
    async fn a_command_that_outlives_its_limit_is_killed_with_what_it_said() {
        let s0 = ServiceId::service("s0");
        let change = Change { service: &s0, commit: Some("abc"), ref_name: "r", dir: Path::new("/d/s0") };
        let cmd = "echo starting; exec sleep 5";
        let finished = run("--health-cmd", cmd, &change, Duration::from_millis(300)).await.expect("runs");
        assert_eq!(finished.ended, Ended::Killed { after: Duration::from_millis(300) });
        assert_eq!(finished.output.text(), "starting");
    }

    #[tokio::test]
    async fn a_timeout_kills_what_the_command_started_too() {
        let s0 = ServiceId::service("s0");
        let change = Change { service: &s0, commit: Some("abc"), ref_name: "r", dir: Path::new("/d/s0") };
        let dir = tempfile::tempdir().expect("tempdir");
        let pid_file = dir.path().join("pid");
        let cmd = format!("sleep 30 & echo $! > '{}'; wait", pid_file.display());
        let finished = run("--check-cmd", &cmd, &change, Duration::from_millis(300)).await.expect("runs");
        assert_eq!(finished.ended, Ended::Killed { after: Duration::from_millis(300) });
        let pid = std::fs::read_to_string(&pid_file).expect("the background pid");
        let stat = format!("/proc/{}/stat", pid.trim());
        // Gone, or dead and waiting for its new parent to reap it.
        let gone = || {
            std::fs::read_to_string(&stat)
                .map_or(true, |s| s.rsplit(')').next().is_some_and(|r| r.trim_start().starts_with('Z')))
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !gone() && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(gone(), "the background sleep outlived the killed command");
    }
}
