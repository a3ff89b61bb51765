//! Synthetic services for the scenarios that need large trees or many services, written
//! straight into the master's work clone with `git fast-import` (no work tree, no index:
//! a 100,000-file service costs seconds) and pushed with real `git push`.
//!
//! The layout is that of a generated configuration repository (rendered Helm charts, one
//! file per object): file `i` of a service is
//! `dNNN/sNN/fNNN.yaml` = `d{i / 10000}/s{(i / 100) % 100}/f{i % 100}.yaml`, so no
//! directory holds more than 100 entries (100 files per `sNN`, 100 `sNN` per `dNNN`) and
//! a 100,000-file tree is 10 `dNNN` × 100 `sNN` × 100 files, three levels deep. Each file
//! is a small YAML document (~250 bytes); a one-line change rewrites its `replicas:` line.

use std::io::Write as _;
use std::path::Path;
use std::process::{Command, Stdio};

use confcast_tests::Master;

/// Path of file `i` of a synthetic service.
pub(crate) fn path(i: usize) -> String {
    format!("d{:03}/s{:02}/f{:03}.yaml", i / 10_000, (i / 100) % 100, i % 100)
}

/// Content of file `i` at `revision` (0 for the first commit): only the `replicas:`
/// line depends on the revision.
pub(crate) fn content(i: usize, revision: usize) -> String {
    format!(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: app-{i}\n  labels:\n    tier: t{}\n\
         spec:\n  replicas: {}\n  template:\n    spec:\n      containers:\n        - name: app-{i}\n          \
         image: registry.example.com/app-{i}:1.{}\n          resources: {{limits: {{memory: 256Mi}}}}\n",
        i % 7,
        3 + revision,
        i % 13
    )
}

/// The file a series of one-line changes touches at push `k`: spread over the tree, so
/// that successive pushes land in different directories.
pub(crate) fn changed_file(files: usize, k: usize) -> usize {
    (k * 7919 + files / 2) % files
}

/// A `git fast-import` stream being written: commits, each with a mark (1, 2, …) by
/// which later commits name their parent and [`Import::run`] returns its id.
pub(crate) struct Import {
    stream: Vec<u8>,
    marks: usize,
}

impl Import {
    pub(crate) fn new() -> Import {
        Import { stream: Vec::new(), marks: 0 }
    }

    /// A commit on `ref_name` after `parent` (a mark; none for a root commit) writing
    /// `files` as `(path, content)`; returns its mark. A root commit's ref must not
    /// exist in the repository yet.
    pub(crate) fn commit<P: AsRef<str>, C: AsRef<[u8]>>(
        &mut self,
        ref_name: &str,
        parent: Option<usize>,
        files: impl IntoIterator<Item = (P, C)>,
    ) -> usize {
        self.marks += 1;
        let mark = self.marks;
        let message = format!("bench commit {mark}");
        // Distinct, increasing timestamps: two commits never share an id by accident.
        let mut head = format!(
            "commit {ref_name}\nmark :{mark}\ncommitter confcast bench <bench@confcast.invalid> {} +0000\ndata {}\n{message}\n",
            1_700_000_000 + mark,
            message.len()
        );
        if let Some(parent) = parent {
            head.push_str(&format!("from :{parent}\n"));
        }
        self.stream.extend_from_slice(head.as_bytes());
        for (path, content) in files {
            let content = content.as_ref();
            self.stream
                .extend_from_slice(format!("M 100644 inline {}\ndata {}\n", path.as_ref(), content.len()).as_bytes());
            self.stream.extend_from_slice(content);
            self.stream.push(b'\n');
        }
        self.stream.push(b'\n');
        mark
    }

    /// A root commit on `ref_name` holding files `0..files` at revision 0.
    pub(crate) fn tree(&mut self, ref_name: &str, files: usize) -> usize {
        self.commit(ref_name, None, (0..files).map(|i| (path(i), content(i, 0))))
    }

    /// `changes` commits on `ref_name`, each after the previous one (the first after
    /// `parent`), each rewriting one line of one file of a `files`-file tree; returns
    /// their marks.
    pub(crate) fn one_line_changes(
        &mut self,
        ref_name: &str,
        parent: usize,
        files: usize,
        changes: usize,
    ) -> Vec<usize> {
        let mut parent = parent;
        (1..=changes)
            .map(|k| {
                let i = changed_file(files, k);
                parent = self.commit(ref_name, Some(parent), [(path(i), content(i, k))]);
                parent
            })
            .collect()
    }

    /// Runs `git fast-import` in `repo`; returns every commit's id, indexed by mark − 1.
    pub(crate) fn run(self, repo: &Path) -> Vec<String> {
        let marks_file = tempfile::NamedTempFile::new().expect("marks file");
        let mut child = Command::new("git")
            .arg("-C")
            .arg(repo)
            .args(["fast-import", "--quiet", "--done"])
            .arg(format!("--export-marks={}", marks_file.path().display()))
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("git fast-import runs");
        let mut stdin = child.stdin.take().expect("stdin");
        stdin.write_all(&self.stream).expect("fast-import reads its stream");
        stdin.write_all(b"done\n").expect("fast-import reads its stream");
        drop(stdin);
        assert!(child.wait().expect("fast-import").success(), "git fast-import failed");
        let marks = std::fs::read_to_string(marks_file.path()).expect("marks");
        let mut ids = vec![String::new(); self.marks];
        for line in marks.lines() {
            let (mark, id) = line.trim_start_matches(':').split_once(' ').expect("`:mark id`");
            ids[mark.parse::<usize>().expect("mark") - 1] = id.to_owned();
        }
        ids
    }
}

/// Pushes `commit` to `refs/heads/services/<service>/master` of the master; panics if
/// the push is refused. Returns when `git push` started and how long it took.
pub(crate) fn push(master: &Master, service: &str, commit: &str) -> (std::time::Instant, std::time::Duration) {
    let pushed = master.push_refspec(&format!("+{commit}:refs/heads/services/{service}/master"));
    let returned = std::time::Instant::now();
    assert!(pushed.ok, "push of {service} at {commit}: {}", pushed.stderr);
    (returned - pushed.took, pushed.took)
}

/// Pushes `commit` as [`push`] does, with the master's hooks moved aside: what git
/// itself costs for that push. Nothing announces it; the next announced push carries
/// its change along.
pub(crate) fn push_without_hooks(master: &Master, service: &str, commit: &str) -> std::time::Duration {
    let (hooks, off) = (master.bare.join("hooks"), master.bare.join("hooks.off"));
    std::fs::rename(&hooks, &off).expect("hooks moved aside");
    let pushed = master.push_refspec(&format!("+{commit}:refs/heads/services/{service}/master"));
    std::fs::rename(&off, &hooks).expect("hooks put back");
    assert!(pushed.ok, "push of {service} at {commit} without hooks: {}", pushed.stderr);
    pushed.took
}

/// How many pushes without hooks follow `pushes` measured ones.
pub(crate) fn plain_pushes(pushes: usize) -> usize {
    (pushes / 5).max(3)
}
