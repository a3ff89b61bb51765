//! Plumbing shared by every process a test runs: where the workspace's binaries are,
//! killing a child for good, stopping one gracefully, and running a command that is
//! expected to end by itself under a time limit.

use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Path of a workspace binary next to the running test executable.
pub fn bin(name: &str) -> PathBuf {
    // Tests run from target/<profile>/deps, the bench from target/<profile>.
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe.parent().expect("executable directory");
    let candidates = [dir.join(name), dir.parent().map(|p| p.join(name)).unwrap_or_default()];
    let found = candidates.iter().find(|p| p.is_file());
    found
        .cloned()
        .unwrap_or_else(|| panic!("{} is missing: run `cargo build --workspace --bins` first", candidates[1].display()))
}

/// Spawns `command` as a long-running process: its stderr (where confcast logs) is
/// appended to `log`, kept across restarts; its stdout is discarded.
pub(crate) fn spawn_logged(command: &mut Command, log: &Path) -> Child {
    let log = std::fs::OpenOptions::new().create(true).append(true).open(log).expect("log");
    command.stdout(Stdio::null()).stderr(log).spawn().unwrap_or_else(|e| panic!("{command:?} runs: {e}"))
}

/// Kills and waits for a child process, if there is one.
pub(crate) fn reap(child: &mut Option<Child>) {
    if let Some(mut child) = child.take() {
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// Stops a child gracefully (SIGTERM), and kills it if it is still there after 10 s.
pub(crate) fn terminate(child: &mut Option<Child>) {
    if let Some(mut child) = child.take() {
        let _ = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if child.try_wait().ok().flatten().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// What a command that is expected to end by itself did.
pub struct Ran {
    /// Its exit code; `None` if it was killed (see [`run_within`]).
    pub code: Option<i32>,
    /// Its standard output.
    pub stdout: String,
    /// Its standard error.
    pub stderr: String,
    /// How long it ran.
    pub took: Duration,
}

impl std::fmt::Debug for Ran {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "exit {:?} after {:?}\n--- stdout\n{}--- stderr\n{}", self.code, self.took, self.stdout, self.stderr)
    }
}

/// Runs `command` to its end, capturing its output and how long it took.
pub fn run(command: &mut Command) -> Ran {
    let started = Instant::now();
    let out = command.output().expect("command runs");
    Ran {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        took: started.elapsed(),
    }
}

/// Runs `command` with stdin left open (a program that read it would hang) and kills
/// it after `limit`.
pub fn run_within(command: &mut Command, limit: Duration) -> Ran {
    let started = Instant::now();
    let mut child =
        command.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("command runs");
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break Some(status);
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let took = started.elapsed();
    let (mut stdout, mut stderr) = (String::new(), String::new());
    child.stdout.take().expect("stdout").read_to_string(&mut stdout).expect("read stdout");
    child.stderr.take().expect("stderr").read_to_string(&mut stderr).expect("read stderr");
    Ran { code: status.and_then(|s| s.code()), stdout, stderr, took }
}
