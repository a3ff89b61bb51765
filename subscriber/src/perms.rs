//! Who may read a service's files: the owner, group and modes of its applied trees.
//!
//! Configuration often holds secrets. As consul-template's `perms`, `user` and `group`
//! do for a template, `--owner`, `--group`, `--file-mode` and `--dir-mode` set them for
//! every service of a host, and `SERVICE=VALUE` overrides one service
//! (`--file-mode 0640 --file-mode db=0600`). They are applied to what the materializer
//! writes, before the tree goes live, and checked with the tree's hash by the integrity
//! check, which sets them again where they drifted.
//!
//! Git records one permission bit, "executable": a file of the tree that git marks
//! executable gets `--file-mode` plus an execute bit wherever it has a read bit (0640
//! becomes 0750), the others `--file-mode` as given. So `--file-mode` takes no execute
//! bit: it would turn every file into an executable in the tree's hash.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use nix::unistd::{Gid, Group, Uid, User};

use crate::beneath::DirCreation;

/// Owner, group and modes of one service's files and directories; `None` leaves the
/// subscriber's defaults (its own user, 0644/0755 files, directories by the umask).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Perms {
    /// Owner of every file, link and directory.
    pub owner: Option<Uid>,
    /// Group of every file, link and directory.
    pub group: Option<Gid>,
    /// Mode of a regular file (no execute bits); executables get `r` → `x` added.
    pub file_mode: Option<u32>,
    /// Mode of a directory.
    pub dir_mode: Option<u32>,
}

impl Perms {
    /// The mode of a regular file, executable or not.
    pub fn file_mode(&self, executable: bool) -> u32 {
        match (self.file_mode, executable) {
            (None, false) => 0o644,
            (None, true) => 0o755,
            (Some(mode), false) => mode,
            (Some(mode), true) => mode | ((mode & 0o444) >> 2),
        }
    }

    /// How the materializer creates directories.
    pub fn dirs(&self) -> DirCreation {
        DirCreation { mode: self.dir_mode, owner: self.owner, group: self.group }
    }

    /// Whether files need an owner or group set.
    pub fn chown(&self) -> bool {
        self.owner.is_some() || self.group.is_some()
    }

    /// The first entry under `root` whose owner, group or mode differs from these, and
    /// how; `None` when all match.
    pub fn check(&self, root: &Path) -> io::Result<Option<String>> {
        let mut found = None;
        walk(root, &mut |path, meta| {
            if found.is_some() {
                return Ok(());
            }
            found = self.mismatch(meta).map(|why| format!("{}: {why}", path.display()));
            Ok(())
        })?;
        Ok(found)
    }

    /// Sets owner, group and modes on every entry under `root` (the tree's root too).
    pub fn apply(&self, root: &Path) -> io::Result<()> {
        walk(root, &mut |path, meta| {
            if self.chown() && self.mismatch_owner(meta) {
                std::os::unix::fs::lchown(path, self.owner.map(Uid::as_raw), self.group.map(Gid::as_raw))?;
            }
            if let Some(mode) = self.mode_for(meta) {
                if meta.permissions().mode() & 0o7777 != mode {
                    fs::set_permissions(path, fs::Permissions::from_mode(mode))?;
                }
            }
            Ok(())
        })
    }

    fn mode_for(&self, meta: &fs::Metadata) -> Option<u32> {
        let kind = meta.file_type();
        if kind.is_dir() {
            self.dir_mode
        } else if kind.is_file() {
            Some(self.file_mode(meta.permissions().mode() & 0o111 != 0))
        } else {
            None
        }
    }

    fn mismatch_owner(&self, meta: &fs::Metadata) -> bool {
        self.owner.is_some_and(|o| o.as_raw() != meta.uid()) || self.group.is_some_and(|g| g.as_raw() != meta.gid())
    }

    fn mismatch(&self, meta: &fs::Metadata) -> Option<String> {
        if self.mismatch_owner(meta) {
            return Some(format!("owned by {}:{}, not {}", meta.uid(), meta.gid(), self.owner_text()));
        }
        let mode = self.mode_for(meta)?;
        let have = meta.permissions().mode() & 0o7777;
        (have != mode).then(|| format!("mode {have:04o}, not {mode:04o}"))
    }

    fn owner_text(&self) -> String {
        let id = |v: Option<u32>| v.map(|v| v.to_string()).unwrap_or_else(|| "-".into());
        format!("{}:{}", id(self.owner.map(Uid::as_raw)), id(self.group.map(Gid::as_raw)))
    }
}

/// Calls `visit` for `root` and every entry below it, links not followed.
fn walk(root: &Path, visit: &mut dyn FnMut(&Path, &fs::Metadata) -> io::Result<()>) -> io::Result<()> {
    let meta = fs::symlink_metadata(root)?;
    visit(root, &meta)?;
    if meta.file_type().is_dir() {
        for entry in fs::read_dir(root)? {
            walk(&entry?.path(), visit)?;
        }
    }
    Ok(())
}

/// `--owner`, `--group`, `--file-mode`, `--dir-mode` as given: each a default
/// (`VALUE`) and per-service overrides (`SERVICE=VALUE`), repeatable.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PermsConfig {
    default: Perms,
    by_service: BTreeMap<String, Perms>,
}

impl PermsConfig {
    /// Parses the four flags' values; the error names the flag and the value.
    pub fn parse(
        owner: &[String],
        group: &[String],
        file_mode: &[String],
        dir_mode: &[String],
    ) -> Result<PermsConfig, String> {
        let mut config = PermsConfig::default();
        for value in owner {
            let (service, user) = split(value);
            let uid = parse_user(user).map_err(|e| format!("--owner {value}: {e}"))?;
            config.slot(service).owner = Some(uid);
        }
        for value in group {
            let (service, name) = split(value);
            let gid = parse_group(name).map_err(|e| format!("--group {value}: {e}"))?;
            config.slot(service).group = Some(gid);
        }
        for value in file_mode {
            let (service, mode) = split(value);
            let mode = parse_mode(mode).map_err(|e| format!("--file-mode {value}: {e}"))?;
            if mode & 0o111 != 0 {
                return Err(format!(
                    "--file-mode {value}: has execute bits; they are git's executable flag and are added to \
                     executables only (0640 gives 0750)"
                ));
            }
            config.slot(service).file_mode = Some(mode);
        }
        for value in dir_mode {
            let (service, mode) = split(value);
            let mode = parse_mode(mode).map_err(|e| format!("--dir-mode {value}: {e}"))?;
            if mode & 0o100 == 0 {
                return Err(format!("--dir-mode {value}: the owner could not enter the directories (no 0100 bit)"));
            }
            config.slot(service).dir_mode = Some(mode);
        }
        Ok(config)
    }

    fn slot(&mut self, service: Option<&str>) -> &mut Perms {
        match service {
            Some(name) => self.by_service.entry(name.to_owned()).or_default(),
            None => &mut self.default,
        }
    }

    /// What applies to `service`: its own settings, field by field over the defaults.
    pub fn for_service(&self, service: &str) -> Perms {
        let own = self.by_service.get(service).copied().unwrap_or_default();
        Perms {
            owner: own.owner.or(self.default.owner),
            group: own.group.or(self.default.group),
            file_mode: own.file_mode.or(self.default.file_mode),
            dir_mode: own.dir_mode.or(self.default.dir_mode),
        }
    }

    /// Services named in an override, to check against what the host follows.
    pub fn services(&self) -> impl Iterator<Item = &str> {
        self.by_service.keys().map(String::as_str)
    }
}

fn split(value: &str) -> (Option<&str>, &str) {
    match value.split_once('=') {
        Some((service, v)) => (Some(service), v),
        None => (None, value),
    }
}

fn parse_user(user: &str) -> Result<Uid, String> {
    if let Ok(id) = user.parse::<u32>() {
        return Ok(Uid::from_raw(id));
    }
    match User::from_name(user) {
        Ok(Some(u)) => Ok(u.uid),
        Ok(None) => Err(format!("no user {user:?} on this host")),
        Err(e) => Err(format!("cannot look up user {user:?}: {e}")),
    }
}

/// A group name or gid.
pub fn parse_group(group: &str) -> Result<Gid, String> {
    if let Ok(id) = group.parse::<u32>() {
        return Ok(Gid::from_raw(id));
    }
    match Group::from_name(group) {
        Ok(Some(g)) => Ok(g.gid),
        Ok(None) => Err(format!("no group {group:?} on this host")),
        Err(e) => Err(format!("cannot look up group {group:?}: {e}")),
    }
}

/// An octal mode such as `0640` or `640`.
pub fn parse_mode(mode: &str) -> Result<u32, String> {
    let digits = mode.strip_prefix("0o").unwrap_or(mode);
    match u32::from_str_radix(digits, 8) {
        Ok(m) if m <= 0o7777 => Ok(m),
        _ => Err(format!("{mode:?} is not an octal mode like 0640")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(values: &[&str]) -> Vec<String> {
        values.iter().map(|v| v.to_string()).collect()
    }

    #[test]
    fn defaults_and_per_service_overrides() {
        let config = PermsConfig::parse(
            &strings(&["0", "db=1"]),
            &strings(&["root"]),
            &strings(&["0640", "db=600"]),
            &strings(&["db=0o700"]),
        )
        .expect("valid");
        let web = config.for_service("web");
        assert_eq!(web.owner, Some(Uid::from_raw(0)));
        assert_eq!(web.group, Some(Gid::from_raw(0)));
        assert_eq!((web.file_mode(false), web.file_mode(true)), (0o640, 0o750));
        assert_eq!(web.dir_mode, None);
        let db = config.for_service("db");
        assert_eq!(db.owner, Some(Uid::from_raw(1)));
        assert_eq!(db.group, Some(Gid::from_raw(0)), "the default group still applies");
        assert_eq!((db.file_mode(false), db.file_mode(true), db.dir_mode), (0o600, 0o700, Some(0o700)));
        assert_eq!(config.services().collect::<Vec<_>>(), ["db"]);
        assert_eq!(PermsConfig::default().for_service("x").file_mode(true), 0o755);
    }

    #[test]
    fn bad_values_are_named() {
        let none: Vec<String> = Vec::new();
        let err = PermsConfig::parse(&none, &none, &strings(&["0755"]), &none).expect_err("x bits");
        assert!(err.starts_with("--file-mode 0755: has execute bits"), "{err}");
        let err = PermsConfig::parse(&strings(&["web=no-such-user-here"]), &none, &none, &none).expect_err("user");
        assert!(err.contains("no user \"no-such-user-here\""), "{err}");
        let err = PermsConfig::parse(&none, &none, &none, &strings(&["rwx"])).expect_err("mode");
        assert!(err.contains("not an octal mode"), "{err}");
        let err = PermsConfig::parse(&none, &none, &none, &strings(&["0644"])).expect_err("dir without x");
        assert!(err.contains("could not enter"), "{err}");
    }

    #[test]
    fn check_finds_and_apply_mends_drift() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = tmp.path().join("tree");
        fs::create_dir_all(root.join("d")).expect("mkdir");
        fs::write(root.join("d/secret"), b"x").expect("write");
        fs::write(root.join("run.sh"), b"x").expect("write");
        fs::set_permissions(root.join("run.sh"), fs::Permissions::from_mode(0o755)).expect("chmod");
        std::os::unix::fs::symlink("d/secret", root.join("link")).expect("link");
        let perms = Perms { file_mode: Some(0o600), dir_mode: Some(0o750), ..Perms::default() };
        assert!(perms.check(&root).expect("check").is_some());
        perms.apply(&root).expect("apply");
        assert_eq!(perms.check(&root).expect("check"), None);
        let mode = |p: &str| fs::metadata(root.join(p)).expect("meta").permissions().mode() & 0o7777;
        assert_eq!((mode("d/secret"), mode("run.sh"), mode("d"), mode("")), (0o600, 0o700, 0o750, 0o750));
        fs::set_permissions(root.join("d/secret"), fs::Permissions::from_mode(0o644)).expect("chmod");
        let drift = perms.check(&root).expect("check").expect("drift found");
        assert!(drift.ends_with("d/secret: mode 0644, not 0600"), "{drift}");
    }
}
