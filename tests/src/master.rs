//! The master: a bare repository with confcast's hooks installed, and a work clone that
//! pushes to it with real `git push`, as an operator would. Every control document and
//! service tree a test needs is written, committed and pushed through it.

use std::fs;
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::git::{git, parse_ls_tree, Listing};
use crate::procs::bin;

/// Datacenter `dc1`'s document: it follows configuration `big`.
const DC1_FOLLOWS_BIG: &str = r#"{"conf":"datacenter-configuration/big"}"#;
/// Configuration `big`: `service0` on its master branch.
const BIG_PINS_SERVICE0: &str = r#"{"services":[{"name":"service0","branch":"master"}]}"#;

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
        git(dir.path(), &["init", "-q", work.to_str().expect("utf-8 path")]);
        git(&work, &["config", "user.name", "confcast test"]);
        git(&work, &["config", "user.email", "test@confcast.invalid"]);
        git(&work, &["config", "core.symlinks", "true"]);
        git(&work, &["remote", "add", "origin", bare.to_str().expect("utf-8 path")]);
        let master = Master { bare, work, _dir: dir };
        master.install_hooks(nats_url, &[]);
        master
    }

    /// A master with datacenter `dc1` following `datacenter-configuration/big`, which
    /// pins `service0` to its master branch; returns it and service0's first commit.
    pub fn with_service0(nats_url: &str) -> (Master, String) {
        let master = Master::new(nats_url);
        let first = master.publish_service0();
        (master, first)
    }

    /// Pushes configuration `big` pinning `service0` to its master branch, datacenter
    /// `dc1` following it, and service0's first commit (`app.conf` holding `0`), which
    /// it returns.
    pub fn publish_service0(&self) -> String {
        self.configuration("big", BIG_PINS_SERVICE0);
        self.datacenter("dc1", DC1_FOLLOWS_BIG);
        self.on("services/service0/master").write("app.conf", "0\n").commit_push("first").commit
    }

    /// Runs `publisher install-hooks` on the master (again): its hooks publish to
    /// `nats_url`, with `extra` flags (credentials, `--replicas`, `--wait-rollout`).
    pub fn install_hooks(&self, nats_url: &str, extra: &[&str]) {
        let out = Command::new(bin("publisher"))
            .arg("install-hooks")
            .arg(&self.bare)
            .args(["--nats", nats_url])
            .args(extra)
            .output()
            .expect("publisher runs");
        assert!(out.status.success(), "install-hooks: {}", String::from_utf8_lossy(&out.stderr));
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

    /// Commits everything as `author` (`name <email>`) with `message`, pushes, and
    /// returns the commit: what any pusher can write, hostile markup included.
    pub fn commit_as(&self, message: &str, name: &str, email: &str) -> String {
        git(&self.work, &["add", "-A"]);
        let author = format!("{name} <{email}>");
        git(&self.work, &["commit", "-q", "--allow-empty", "--author", &author, "-m", message]);
        let pushed = self.push();
        assert!(pushed.ok, "push failed: {}", pushed.stderr);
        pushed.commit
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

    /// Deletes a ref of the master with `git push origin :<ref>`.
    pub fn delete(&self, ref_name: &str) {
        let pushed = self.push_refspec(&format!(":{ref_name}"));
        assert!(pushed.ok, "delete {ref_name}: {}", pushed.stderr);
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

    /// Runs `f` with the master's pre-receive hook disabled, as an operator bypassing it would.
    pub fn without_pre_receive<T>(&self, f: impl FnOnce() -> T) -> T {
        let hook = self.bare.join("hooks/pre-receive");
        let off = self.bare.join("hooks/pre-receive.off");
        fs::rename(&hook, &off).expect("disable hook");
        let out = f();
        fs::rename(&off, &hook).expect("enable hook");
        out
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
    pub fn listing(&self, commit: &str) -> Listing {
        parse_ls_tree(&git(&self.bare, &["ls-tree", "-r", "-z", "--full-tree", commit]))
    }

    /// How many events the hooks have spooled for want of NATS and not yet published.
    pub fn spooled_events(&self) -> usize {
        let spool = self.bare.join("confcast/spool");
        fs::read_dir(spool)
            .map(|d| d.filter(|e| e.as_ref().is_ok_and(|e| e.path().extension().is_some_and(|x| x == "event"))).count())
            .unwrap_or(0)
    }
}
