//! Telling the host's processes: `--exec` runs `sh -c CMD`, `--signal` with `--pidfile`
//! signals a process. Both run only after a change is in place.

use std::path::{Path, PathBuf};
use std::time::Duration;

use confcast_schemas::Kind;

pub use crate::schedule::Failure;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

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
    /// Kind of the service.
    pub kind: Kind,
    /// Its name.
    pub name: &'a str,
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
            .env("CONFCAST_SERVICE", change.name)
            .env("CONFCAST_KIND", change.kind.as_str())
            .env("CONFCAST_COMMIT", change.commit.unwrap_or(""))
            .env("CONFCAST_REF", change.ref_name)
            .env("CONFCAST_DIR", change.dir)
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| fail(format!("cannot run --exec: {e}")))?;
        let exit = match tokio::time::timeout(notify.timeout, child.wait()).await {
            Ok(exit) => exit.map_err(|e| fail(format!("--exec: {e}")))?,
            Err(_) => {
                let _ = child.kill().await;
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
        let change = Change {
            kind: Kind::Service,
            name: "s0",
            commit: Some("abc"),
            ref_name: "refs/heads/x",
            dir: Path::new("/d/s0"),
        };
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
