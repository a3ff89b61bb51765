//! A host: the real `subscriber` binary in a directory of its own, whose `--exec`
//! appends one line per run to an exec log. What a test asks of a host is read from
//! there and from disk: which commits ran exec, whether the tree on disk is exactly a
//! commit's, and whether it converged on the last push.

use std::fs;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::Duration;

use tempfile::TempDir;

use crate::git::disk_listing;
use crate::master::Master;
use crate::poll::wait_for;
use crate::procs::{bin, reap, spawn_logged, terminate};

/// A running `subscriber` whose `--exec` appends one line per run to a log:
/// `<service> <commit> <ref> <dir>`.
#[derive(Debug)]
pub struct Subscriber {
    child: Option<Child>,
    args: Vec<String>,
    nats_url: String,
    /// The `--dir`.
    pub dir: PathBuf,
    /// The exec log.
    pub exec_log: PathBuf,
    /// Run after the logging `--exec` (see [`Subscriber::start_with_exec`]).
    exec_then: Option<String>,
    /// Extra environment of the process (see [`Subscriber::with_env`]).
    env: Vec<(String, String)>,
    root: TempDir,
}

impl Subscriber {
    /// Starts a subscriber of `dc` with the given selection flags (e.g. `["--service", "s0"]`).
    pub fn start(nats_url: &str, dc: &str, selection: &[&str]) -> Subscriber {
        let mut sub = Subscriber::prepare(nats_url, dc, selection);
        sub.restart();
        sub
    }

    /// Like [`Subscriber::start`], but its `--exec` logs as usual and then runs `then`
    /// (e.g. `exit 1` for a failing command, `sleep 3` for a slow one), whose exit status
    /// is the command's; restarts keep it.
    pub fn start_with_exec(nats_url: &str, dc: &str, selection: &[&str], then: &str) -> Subscriber {
        let mut sub = Subscriber::prepare(nats_url, dc, selection).with_exec_then(then);
        sub.restart();
        sub
    }

    /// Like [`Subscriber::start`] but does not start it yet ([`Subscriber::restart`] does).
    pub fn prepare(nats_url: &str, dc: &str, selection: &[&str]) -> Subscriber {
        let root = tempfile::tempdir().expect("tempdir");
        let dir = root.path().join("etc");
        let exec_log = root.path().join("exec.log");
        fs::create_dir_all(root.path().join("state")).expect("state dir");
        let mut args: Vec<String> = vec!["--dc".into(), dc.into()];
        args.extend(selection.iter().map(|s| s.to_string()));
        Subscriber {
            child: None,
            args,
            nats_url: nats_url.to_owned(),
            dir,
            exec_log,
            exec_then: None,
            env: Vec::new(),
            root,
        }
    }

    /// Sets an environment variable for the process (from its next start on).
    pub fn with_env(mut self, name: &str, value: impl AsRef<std::ffi::OsStr>) -> Subscriber {
        self.env.push((name.to_owned(), value.as_ref().to_string_lossy().into_owned()));
        self
    }

    /// Runs `then` after the logging `--exec` (from its next start on); see
    /// [`Subscriber::start_with_exec`].
    pub fn with_exec_then(mut self, then: &str) -> Subscriber {
        self.exec_then = Some(then.to_owned());
        self
    }

    /// The subscriber's `--state-dir` (trees and position).
    pub fn state_dir(&self) -> PathBuf {
        self.root.path().join("state")
    }

    /// Starts it again (after [`Subscriber::stop`] or [`Subscriber::kill`]).
    pub fn restart(&mut self) {
        let mut exec = format!(
            "printf '%s %s %s %s\\n' \"$CONFCAST_SERVICE\" \"$CONFCAST_COMMIT\" \"$CONFCAST_REF\" \"$CONFCAST_DIR\" >> '{}'",
            self.exec_log.display()
        );
        if let Some(then) = &self.exec_then {
            exec.push_str("; ");
            exec.push_str(then);
        }
        let mut subscriber = Command::new(bin("subscriber"));
        subscriber
            .args(["--nats", &self.nats_url])
            .args(&self.args)
            // Relative directories, as an operator would type them: the links the
            // subscriber makes must not depend on its working directory.
            .current_dir(self.root.path())
            .args(["--dir", "etc", "--state-dir", "state"])
            .args(["--exec", &exec])
            .env("RUST_LOG", "info,confcast_subscriber=debug")
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        self.child = Some(spawn_logged(&mut subscriber, &self.root.path().join("subscriber.log")));
    }

    /// Stops it gracefully (SIGTERM) and waits.
    pub fn stop(&mut self) {
        terminate(&mut self.child);
    }

    /// SIGKILLs it, wherever it is.
    pub fn kill(&mut self) {
        reap(&mut self.child);
    }

    /// The process id, while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Runs `subscriber verify` on this host's directories: (exit success, stdout).
    pub fn verify(&self) -> (bool, String) {
        let out = Command::new(bin("subscriber"))
            .current_dir(self.root.path())
            .args(["verify", "--dir", "etc", "--state-dir", "state"])
            .output()
            .expect("subscriber verify runs");
        (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The subscriber's log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(self.root.path().join("subscriber.log")).unwrap_or_default()
    }

    /// Lines of the exec log.
    pub fn execs(&self) -> Vec<String> {
        fs::read_to_string(&self.exec_log).unwrap_or_default().lines().map(str::to_owned).collect()
    }

    /// Waits until the last exec for `service` reports `commit`, and returns all exec lines.
    pub fn wait_exec(&self, service: &str, commit: &str) -> Vec<String> {
        self.wait_exec_within(service, commit, Duration::from_secs(20))
    }

    /// [`Subscriber::wait_exec`] with another timeout.
    pub fn wait_exec_within(&self, service: &str, commit: &str, timeout: Duration) -> Vec<String> {
        let prefix = format!("{service} {commit} ");
        wait_for(timeout, &format!("exec of {service} at {commit}"), || {
            let execs = self.execs();
            execs
                .iter()
                .rev()
                .find(|l| l.starts_with(&format!("{service} ")))
                .filter(|l| l.starts_with(&prefix))
                .map(|_| execs.clone())
        })
    }

    /// `<dir>/<service>`.
    pub fn service_dir(&self, service: &str) -> PathBuf {
        self.dir.join(service)
    }

    /// Asserts that `<dir>/<service>` holds exactly the tree of `commit` of `master`.
    pub fn assert_tree(&self, master: &Master, service: &str, commit: &str) {
        let on_disk = disk_listing(&self.service_dir(service));
        let in_git = master.listing(commit);
        assert_eq!(on_disk, in_git, "{service} on disk differs from commit {commit}");
    }

    /// Checks the invariant of a converged host for `service`: its tree is exactly
    /// `commit`, its last exec was for `commit`, and every exec was for a commit that
    /// was pushed. Returns (execs, duplicate execs: the same state twice in a row).
    pub fn assert_converged(&self, master: &Master, service: &str, commit: &str, pushed: &[String]) -> (usize, usize) {
        let execs = self.wait_exec_within(service, commit, Duration::from_secs(90));
        self.assert_tree(master, service, commit);
        let mine: Vec<&String> = execs.iter().filter(|l| l.starts_with(&format!("{service} "))).collect();
        for line in &mine {
            let exec_commit = line.split(' ').nth(1).unwrap_or("");
            assert!(pushed.iter().any(|c| c == exec_commit), "exec for a state that was never pushed: {line}");
        }
        let duplicates = mine.windows(2).filter(|p| p[0] == p[1]).count();
        (mine.len(), duplicates)
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- subscriber log ({})\n{}", self.dir.display(), self.log());
        }
        reap(&mut self.child);
    }
}
