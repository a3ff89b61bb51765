//! The git side of a confcast master: what the `post-receive` and `pre-receive` hooks
//! read from git.
//!
//! Both hooks get `<old> <new> <ref>` lines on stdin. `post-receive` turns each into a
//! `CommitEvent` (with the paths it changed) and hands them to
//! `confcast_publisher::announce`; `pre-receive` refuses a push whose control documents
//! do not parse or name what the push would leave missing (see [`cross_refs`]), that
//! deletes what a datacenter pins, or whose configuration trees could never be delivered
//! (see [`containment`]), before any ref moves.

pub mod after_push;
pub mod containment;
pub mod cross_refs;

use std::time::Duration;

use confcast_publisher::{config_keys, default_repo_name, default_spool_dir, DEFAULT_HOOK_TIMEOUT};
use confcast_schemas::{
    document::{CONFIGURATION_FILE, DATACENTER_FILE},
    message::now_ms,
    path::PathError,
    CommitEvent, DatacenterConfiguration, DatacenterDoc, DocumentError, WIRE_VERSION,
};
use git2::{Oid, Repository};

/// At most this many changed paths travel in an event; the relay does not need them to
/// be complete (it diffs trees itself), they are for people reading the stream.
pub const MAX_PATHS: usize = 1000;

/// One `<old> <new> <ref>` line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefUpdate {
    /// Previous id, `None` when the ref was created.
    pub old: Option<Oid>,
    /// New id, `None` when the ref was deleted.
    pub new: Option<Oid>,
    /// Full ref name.
    pub ref_name: String,
}

/// Parses the hook's stdin; malformed lines are reported, not fatal.
pub fn parse_updates(input: &str) -> (Vec<RefUpdate>, Vec<String>) {
    let mut updates = Vec::new();
    let mut bad = Vec::new();
    for line in input.lines().filter(|l| !l.trim().is_empty()) {
        let mut parts = line.splitn(3, ' ');
        let parsed = (|| {
            let old = Oid::from_str(parts.next()?).ok()?;
            let new = Oid::from_str(parts.next()?).ok()?;
            let ref_name = parts.next()?.trim_end().to_owned();
            let non_zero = |o: Oid| (!o.is_zero()).then_some(o);
            Some(RefUpdate { old: non_zero(old), new: non_zero(new), ref_name })
        })();
        match parsed {
            Some(update) => updates.push(update),
            None => bad.push(line.to_owned()),
        }
    }
    (updates, bad)
}

/// Hook settings from the repository's git config.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The master's NATS.
    pub bus: confcast_publisher::BusTarget,
    /// Repository name in events.
    pub repo_name: String,
    /// Spool directory.
    pub spool_dir: std::path::PathBuf,
    /// How long the hook may wait for the bus.
    pub timeout: Duration,
    /// How long to wait for the rollout of what was announced (`confcast.waitRollout`),
    /// if at all.
    pub wait_rollout: Option<Duration>,
    /// Datacenters read in their own JetStream domains (`confcast.rolloutDomains`).
    pub rollout_domains: Vec<String>,
}

impl Settings {
    /// Reads `confcast.*` from the repository's config, with defaults.
    pub fn from_repo(repo: &Repository) -> Settings {
        let config = repo.config().ok();
        let get = |key: &str| config.as_ref().and_then(|c| c.get_string(key).ok()).filter(|v| !v.is_empty());
        let repo_name = get(config_keys::REPO).unwrap_or_else(|| default_repo_name(repo.path()));
        Settings {
            bus: confcast_publisher::BusTarget {
                nats_url: get(config_keys::NATS).unwrap_or_else(|| "nats://127.0.0.1:4222".into()),
                auth: confcast_publisher::auth_from_config(get),
                replicas: get(config_keys::REPLICAS).and_then(|r| r.parse().ok()).unwrap_or(1),
            },
            repo_name,
            spool_dir: get(config_keys::SPOOL_DIR).map(Into::into).unwrap_or_else(|| default_spool_dir(repo.path())),
            timeout: get(config_keys::TIMEOUT_MS)
                .and_then(|ms| ms.parse().ok())
                .map(Duration::from_millis)
                .unwrap_or(DEFAULT_HOOK_TIMEOUT),
            wait_rollout: get(config_keys::WAIT_ROLLOUT)
                .and_then(|secs| secs.trim().parse::<f64>().ok())
                .filter(|secs| secs.is_finite() && *secs > 0.0)
                .map(Duration::from_secs_f64),
            rollout_domains: get(config_keys::ROLLOUT_DOMAINS)
                .map(|dcs| dcs.split(',').map(str::trim).filter(|d| !d.is_empty()).map(str::to_owned).collect())
                .unwrap_or_default(),
        }
    }
}

/// `<old>..<new>` of a ref update, shortened as git does (`0000000` for a created or
/// deleted ref).
pub fn short_range(update: &RefUpdate) -> String {
    let short = |o: Option<Oid>| o.map(|o| o.to_string()[..7].to_owned()).unwrap_or_else(|| "0000000".into());
    format!("{}..{}", short(update.old), short(update.new))
}

/// What the pusher is told about each ref: `published <ref> <old>..<new>`, or
/// `spooled ...` for the last `spooled` of them (the hook publishes in order and spools
/// what is left when the bus fails).
pub fn announcement_lines(updates: &[RefUpdate], spooled: usize) -> Vec<String> {
    let published = updates.len().saturating_sub(spooled);
    updates
        .iter()
        .enumerate()
        .map(|(i, u)| {
            let verb = if i < published { "published" } else { "spooled" };
            let deleted = if u.new.is_none() { " (deleted)" } else { "" };
            format!("confcast: {verb} {} {}{deleted}", u.ref_name, short_range(u))
        })
        .collect()
}

/// What the hook waits for after announcing `updates`: every service following a
/// pushed ref reaching the pushed commit.
pub fn rollout_targets(updates: &[RefUpdate]) -> Vec<confcast_publisher::status::Target> {
    updates
        .iter()
        .filter_map(|u| {
            Some(confcast_publisher::status::Target::RefAt {
                ref_name: u.ref_name.clone(),
                commit: u.new?.to_string(),
                old: u.old.map(|o| o.to_string()),
            })
        })
        .collect()
}

/// Waits up to `wait` for the rollout of `updates` in every datacenter and returns the
/// lines to show the pusher. Never fails: what went wrong is one of the lines.
pub async fn wait_rollout(settings: &Settings, updates: &[RefUpdate], wait: Duration) -> Vec<String> {
    use confcast_publisher::status;
    let started = tokio::time::Instant::now();
    let deadline = started + wait;
    let targets = rollout_targets(updates);
    if targets.is_empty() {
        return Vec::new();
    }
    let label = match targets.as_slice() {
        [one] => one.to_string(),
        _ => format!("{} refs", targets.len()),
    };
    let watched = tokio::time::timeout_at(deadline, async {
        let client = confcast_publisher::connect(&settings.bus.nats_url, &settings.bus.auth, settings.timeout).await?;
        let contexts: Vec<(String, async_nats::jetstream::Context)> = if settings.rollout_domains.is_empty() {
            let js = async_nats::jetstream::new(client);
            status::datacenters(&js).await?.into_iter().map(|dc| (dc, js.clone())).collect()
        } else {
            let domain = |dc: &String| async_nats::jetstream::with_domain(client.clone(), dc);
            settings.rollout_domains.iter().map(|dc| (dc.clone(), domain(dc))).collect()
        };
        if contexts.is_empty() {
            return Ok(None);
        }
        Ok::<_, Box<dyn std::error::Error>>(Some(status::watch(&contexts, &targets, deadline, |_| {}).await?))
    })
    .await;
    let rollout = match watched {
        Ok(Ok(Some(rollout))) => rollout,
        Ok(Ok(None)) => {
            return vec![format!(
                "confcast: no datacenter's state is visible on {}; not waiting for a rollout",
                settings.bus.nats_url
            )]
        }
        Ok(Err(e)) => return vec![format!("confcast: cannot follow the rollout: {e}")],
        Err(_) => {
            return vec![format!(
                "confcast: no rollout seen within {wait:?} (NATS did not answer in time); the push itself succeeded"
            )]
        }
    };
    let affected: Vec<&status::DcProgress> = rollout.dcs.iter().filter(|d| d.affected()).collect();
    let mut lines: Vec<String> = affected.iter().map(|d| format!("confcast: {}", d.line(&label))).collect();
    let elapsed = started.elapsed();
    lines.push(match rollout.verdict() {
        status::Verdict::Complete => format!("confcast: rollout complete in {:.1}s", elapsed.as_secs_f64()),
        status::Verdict::NothingAffected => {
            format!("confcast: no datacenter follows {label} directly; not waiting for a rollout")
        }
        status::Verdict::InProgress => {
            let (failed, pending) = rollout.counts();
            format!(
                "confcast: rollout not complete after {}s ({failed} host(s) failed, {pending} pending); \
                 the push itself succeeded: follow it with `publisher status <commit>`",
                wait.as_secs_f64()
            )
        }
    });
    lines
}

fn tree_of(repo: &Repository, oid: Option<Oid>) -> Option<git2::Tree<'_>> {
    repo.find_object(oid?, None).ok()?.peel_to_tree().ok()
}

/// Paths that differ between the trees of `old` and `new` (each peeled to a tree;
/// a missing side counts as the empty tree), capped at [`MAX_PATHS`].
pub fn changed_paths(repo: &Repository, old: Option<Oid>, new: Option<Oid>) -> (Vec<String>, bool) {
    let (old_tree, new_tree) = (tree_of(repo, old), tree_of(repo, new));
    let diff = match repo.diff_tree_to_tree(old_tree.as_ref(), new_tree.as_ref(), None) {
        Ok(diff) => diff,
        Err(_) => return (Vec::new(), true),
    };
    let mut paths = Vec::new();
    let mut truncated = false;
    for delta in diff.deltas() {
        if paths.len() == MAX_PATHS {
            truncated = true;
            break;
        }
        if let Some(path) = delta.new_file().path().or(delta.old_file().path()) {
            paths.push(path.to_string_lossy().into_owned());
        }
    }
    (paths, truncated)
}

/// One commit event per ref update.
pub fn commit_events(repo: &Repository, repo_name: &str, updates: &[RefUpdate]) -> Vec<CommitEvent> {
    let now = now_ms();
    updates
        .iter()
        .map(|u| {
            let (paths, paths_truncated) = changed_paths(repo, u.old, u.new);
            CommitEvent {
                v: WIRE_VERSION,
                repo: repo_name.to_owned(),
                ref_name: u.ref_name.clone(),
                old: u.old.map(|o| o.to_string()),
                new: u.new.map(|o| o.to_string()),
                paths,
                paths_truncated,
                pushed_at_ms: now,
                backfill: false,
            }
        })
        .collect()
}

/// Why pre-receive refuses a ref update.
#[derive(Debug, thiserror::Error)]
pub enum Rejection {
    /// The document is missing from the pushed tree.
    #[error("{ref_name}: {file} is missing from the pushed tree")]
    Missing {
        /// The ref.
        ref_name: String,
        /// The expected file.
        file: &'static str,
    },
    /// The document does not validate.
    #[error("{ref_name}: {error}")]
    Invalid {
        /// The ref.
        ref_name: String,
        /// What is wrong, naming file and field.
        error: DocumentError,
    },
    /// An entry of a pushed configuration tree has a name no directory can hold.
    #[error("{ref_name}: tree entry {path:?} is refused: {error}")]
    Name {
        /// The ref.
        ref_name: String,
        /// The entry's path in the tree.
        path: String,
        /// What is wrong with its name.
        error: Box<PathError>,
    },
    /// The symbolic links of a pushed configuration tree, followed through one another,
    /// leave the tree, loop, or have a target no file system can hold.
    #[error("{ref_name}: {error}")]
    Link {
        /// The ref.
        ref_name: String,
        /// Which link, its target, and where it leads.
        error: Box<PathError>,
    },
    /// A control document names a configuration, a service or a ref that the push would
    /// leave missing, or the push deletes a ref that a datacenter still pins.
    #[error("{ref_name}: {error}")]
    Reference {
        /// The ref refused: the document's, or the deleted one.
        ref_name: String,
        /// What is named, where, and what is missing.
        error: Box<cross_refs::Unresolved>,
    },
    /// The pushed object, or a ref or document the check of the push needs, cannot be
    /// read.
    #[error("{ref_name}: cannot be read: {error}")]
    Git {
        /// The ref.
        ref_name: String,
        /// libgit2's message.
        error: git2::Error,
    },
}

/// Which control document a ref holds, if any.
pub fn control_file(ref_name: &str) -> Option<&'static str> {
    if ref_name.starts_with("refs/heads/datacenters/") {
        Some(DATACENTER_FILE)
    } else if ref_name.starts_with("refs/heads/datacenter-configuration/")
        || ref_name.starts_with("refs/tags/datacenter-configuration/")
    {
        Some(CONFIGURATION_FILE)
    } else {
        None
    }
}

/// Validates one ref update: its control document, or its configuration tree
/// (deletions always pass).
pub fn validate(repo: &Repository, update: &RefUpdate) -> Result<(), Rejection> {
    validate_document(repo, update)?;
    containment::check(repo, update)
}

/// Validates the control document of one ref update, if its ref holds one.
fn validate_document(repo: &Repository, update: &RefUpdate) -> Result<(), Rejection> {
    let (Some(file), Some(new)) = (control_file(&update.ref_name), update.new) else {
        return Ok(());
    };
    let git = |error| Rejection::Git { ref_name: update.ref_name.clone(), error };
    let tree = repo.find_object(new, None).and_then(|o| o.peel_to_tree()).map_err(git)?;
    let entry = tree.get_name(file).ok_or_else(|| Rejection::Missing { ref_name: update.ref_name.clone(), file })?;
    let blob = entry.to_object(repo).and_then(|o| o.peel_to_blob()).map_err(git)?;
    let invalid = |error| Rejection::Invalid { ref_name: update.ref_name.clone(), error };
    if file == DATACENTER_FILE {
        DatacenterDoc::parse(blob.content()).map_err(invalid)?;
    } else {
        DatacenterConfiguration::parse(blob.content()).map_err(invalid)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_hook_input() {
        let zero = "0".repeat(40);
        let a = "a".repeat(40);
        let input = format!("{zero} {a} refs/heads/x\n{a} {zero} refs/tags/t y\n\nnot a line\n");
        let (updates, bad) = parse_updates(&input);
        assert_eq!(updates.len(), 2);
        assert_eq!(updates[0].old, None);
        assert_eq!(updates[0].new.map(|o| o.to_string()), Some(a.clone()));
        assert_eq!(updates[1].ref_name, "refs/tags/t y");
        assert_eq!(updates[1].new, None);
        assert_eq!(bad, vec!["not a line".to_owned()]);
    }

    #[test]
    fn tells_the_pusher_each_ref() {
        let zero = "0".repeat(40);
        let (a, b) = ("a".repeat(40), "b".repeat(40));
        let input = format!("{a} {b} refs/heads/x\n{zero} {a} refs/tags/t\n{b} {zero} refs/heads/gone\n");
        let (updates, _) = parse_updates(&input);
        assert_eq!(
            announcement_lines(&updates, 1),
            vec![
                "confcast: published refs/heads/x aaaaaaa..bbbbbbb",
                "confcast: published refs/tags/t 0000000..aaaaaaa",
                "confcast: spooled refs/heads/gone bbbbbbb..0000000 (deleted)",
            ]
        );
        let targets = rollout_targets(&updates);
        assert_eq!(targets.len(), 2, "a deleted ref has nothing to roll out");
        assert_eq!(
            targets[0],
            confcast_publisher::status::Target::RefAt { ref_name: "refs/heads/x".into(), commit: b, old: Some(a) }
        );
    }

    #[test]
    fn control_files_by_namespace() {
        assert_eq!(control_file("refs/heads/datacenters/dc1"), Some(DATACENTER_FILE));
        assert_eq!(control_file("refs/tags/datacenter-configuration/big/v1"), Some(CONFIGURATION_FILE));
        assert_eq!(control_file("refs/heads/services/a/main"), None);
    }
}
