//! Telling the host's processes: `--exec` runs `sh -c CMD`, `--signal` with `--pidfile`
//! signals a process. Both run only after a change is in place.
//!
//! What the command writes on its stdout and stderr is read line by line and logged at
//! INFO, each line prefixed with the service (`web: reloading nginx`, fields `service`
//! and `stream`), so that it never interleaves raw with the subscriber's own lines and a
//! log collector keeps it with the host's other events. A process the command leaves
//! running in the background keeps its output logged the same way for as long as it
//! holds the pipe, without holding up the next change.

use std::path::{Path, PathBuf};
use std::time::Duration;

use confcast_schemas::ServiceId;

pub use crate::schedule::Failure;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};

/// What to do after a change.
#[derive(Debug, Clone, Default)]
pub struct Notify {
    /// Shell command run with `sh -c`.
    pub exec: Option<String>,
    /// Signal sent to the process in `pidfile`.
    pub signal: Option<(Signal, PathBuf)>,
    /// How long `--exec` may run before it is killed.
    pub timeout: Duration,
}

/// The change being announced.
#[derive(Debug, Clone)]
pub struct Change<'a> {
    /// The service.
    pub service: &'a ServiceId,
    /// The commit now in place (`None`: removed).
    pub commit: Option<&'a str>,
    /// The ref it came from.
    pub ref_name: &'a str,
    /// `<dir>/<service>`.
    pub dir: &'a Path,
}

/// Runs the command and sends the signal; returns the command's exit status (`None`
/// if there is no command), or what failed.
pub async fn notify(notify: &Notify, change: &Change<'_>) -> Result<Option<i32>, Failure> {
    let fail = |message: String| Failure { message, status: None };
    let mut status = None;
    if let Some(cmd) = &notify.exec {
        let mut child = tokio::process::Command::new("sh")
            .arg("-c")
            .arg(cmd)
            .env("CONFCAST_SERVICE", &change.service.name)
            .env("CONFCAST_KIND", change.service.kind.as_str())
            .env("CONFCAST_COMMIT", change.commit.unwrap_or(""))
            .env("CONFCAST_REF", change.ref_name)
            .env("CONFCAST_DIR", change.dir)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| fail(format!("cannot run --exec: {e}")))?;
        let output: Vec<_> = [
            child.stdout.take().map(|out| tokio::spawn(log_lines(out, change.service.name.clone(), "stdout"))),
            child.stderr.take().map(|err| tokio::spawn(log_lines(err, change.service.name.clone(), "stderr"))),
        ]
        .into_iter()
        .flatten()
        .collect();
        let waited = tokio::time::timeout(notify.timeout, child.wait()).await;
        if waited.is_err() {
            let _ = child.kill().await;
        }
        // The command's last lines are logged before its outcome; a background process
        // that still holds the pipes is not waited for.
        for mut reader in output {
            let _ = tokio::time::timeout(OUTPUT_GRACE, &mut reader).await;
        }
        let exit = match waited {
            Ok(exit) => exit.map_err(|e| fail(format!("--exec: {e}")))?,
            Err(_) => {
                return Err(fail(format!("--exec did not finish within {:?} and was killed", notify.timeout)));
            }
        };
        status = Some(exit.code().unwrap_or(-1));
        if !exit.success() {
            return Err(Failure { message: format!("--exec exited with {exit}"), status });
        }
    }
    if let Some((signal, pidfile)) = &notify.signal {
        let text =
            std::fs::read_to_string(pidfile).map_err(|e| fail(format!("--pidfile {}: {e}", pidfile.display())))?;
        let pid: i32 =
            text.trim().parse().map_err(|_| fail(format!("--pidfile {} holds no pid: {text:?}", pidfile.display())))?;
        kill(Pid::from_raw(pid), *signal).map_err(|e| fail(format!("sending {signal} to {pid}: {e}")))?;
    }
    Ok(status)
}

/// How long the command's output may still be read after it exited, before its outcome
/// is reported.
const OUTPUT_GRACE: Duration = Duration::from_millis(200);

/// A longer line is logged in pieces of this many bytes.
const MAX_LINE: usize = 8 * 1024;

/// Logs what the command writes on one of its pipes, line by line, until the pipe closes.
async fn log_lines(pipe: impl AsyncRead + Unpin, service: String, stream: &'static str) {
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
            log_line(&service, stream, &line);
            line.clear();
        }
    }
    if !line.is_empty() {
        log_line(&service, stream, &line);
    }
}

fn log_line(service: &str, stream: &'static str, line: &[u8]) {
    let text = printable(line);
    tracing::info!(service, stream, "{service}: {text}");
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

/// Parses `HUP`, `SIGHUP` or a number.
pub fn parse_signal(s: &str) -> Result<Signal, String> {
    if let Ok(n) = s.parse::<i32>() {
        return Signal::try_from(n).map_err(|e| format!("signal {n}: {e}"));
    }
    let upper = s.to_ascii_uppercase();
    let name = if upper.starts_with("SIG") { upper } else { format!("SIG{upper}") };
    name.parse().map_err(|_| format!("unknown signal {s:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals_by_name_or_number() {
        assert_eq!(parse_signal("HUP"), Ok(Signal::SIGHUP));
        assert_eq!(parse_signal("sigusr1"), Ok(Signal::SIGUSR1));
        assert_eq!(parse_signal("15"), Ok(Signal::SIGTERM));
        assert!(parse_signal("NOPE").is_err());
    }

    #[tokio::test]
    async fn exec_sees_the_change_and_failures_are_reported() {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = dir.path().join("out");
        let notify_ok = Notify {
            exec: Some(format!(
                "echo \"$CONFCAST_SERVICE $CONFCAST_COMMIT $CONFCAST_REF $CONFCAST_DIR\" > {}",
                out.display()
            )),
            signal: None,
            timeout: Duration::from_secs(5),
        };
        let s0 = ServiceId::service("s0");
        let change = Change { service: &s0, commit: Some("abc"), ref_name: "refs/heads/x", dir: Path::new("/d/s0") };
        assert_eq!(notify(&notify_ok, &change).await, Ok(Some(0)));
        assert_eq!(std::fs::read_to_string(&out).expect("ran"), "s0 abc refs/heads/x /d/s0\n");
        let failing = Notify { exec: Some("exit 3".into()), ..notify_ok.clone() };
        assert_eq!(
            notify(&failing, &change).await,
            Err(Failure { message: "--exec exited with exit status: 3".into(), status: Some(3) })
        );
        let slow = Notify { exec: Some("sleep 5".into()), timeout: Duration::from_millis(100), ..notify_ok };
        assert!(notify(&slow, &change).await.expect_err("killed").message.contains("killed"));
    }

    /// Log lines written by the code under test, as text.
    #[derive(Clone, Default)]
    struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

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
    async fn the_commands_output_is_logged_line_by_line_with_the_service() {
        let captured = Captured::default();
        let writer = captured.clone();
        let logs = tracing_subscriber::fmt().with_writer(move || writer.clone()).with_ansi(false).finish();
        let _guard = tracing::subscriber::set_default(logs);
        let config = Notify {
            exec: Some(r"echo reloaded; echo 'warning: old key' >&2; printf 'forged\nINFO fake\033[31m'".into()),
            signal: None,
            timeout: Duration::from_secs(5),
        };
        let web = ServiceId::service("web");
        let change = Change { service: &web, commit: Some("abc"), ref_name: "r", dir: Path::new("/d/web") };
        assert_eq!(notify(&config, &change).await, Ok(Some(0)));
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
        // Every line of the command is one log line of its own, prefixed, escaped.
        assert!(line_of("INFO fake").contains("web: INFO fake\\u{1b}[31m"), "{text}");
        assert!(lines.iter().all(|l| l.contains("web: ")), "{text}");
    }
}
