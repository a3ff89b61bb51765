//! Telling the host's processes: `--exec` runs `sh -c CMD` ([`crate::command`], which
//! also logs what it writes), `--signal` with `--pidfile` signals a process. Both run
//! only after a change is in place.

use std::path::PathBuf;
use std::time::Duration;

use crate::checks::Checks;
pub use crate::command::Change;
use crate::command::{self, Ended};
pub use crate::schedule::Failure;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// What the host runs around a change.
#[derive(Debug, Clone, Default)]
pub struct Notify {
    /// Shell command run with `sh -c` after a change.
    pub exec: Option<String>,
    /// Signal sent to the process in `pidfile` after a change.
    pub signal: Option<(Signal, PathBuf)>,
    /// How long `--exec` may run before it is killed.
    pub timeout: Duration,
    /// `--check-cmd`, before a change goes live, and `--health-cmd`, after the processes
    /// were told of it.
    pub checks: Checks,
}

/// Runs the command and sends the signal; returns the command's exit status (`None`
/// if there is no command), or what failed.
pub async fn notify(notify: &Notify, change: &Change<'_>) -> Result<Option<i32>, Failure> {
    let fail = |message: String| Failure { message, status: None };
    let mut status = None;
    if let Some(cmd) = &notify.exec {
        let finished = command::run("--exec", cmd, change, notify.timeout).await.map_err(|e| fail(e.to_string()))?;
        let exit = match finished.ended {
            Ended::Exited(exit) => exit,
            Ended::Killed { after } => {
                return Err(fail(format!("--exec did not finish within {after:?} and was killed")));
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
    use std::path::Path;

    use confcast_schemas::ServiceId;

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
            checks: Checks::default(),
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
}
