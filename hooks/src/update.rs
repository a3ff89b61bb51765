//! What git hands both hooks on stdin: one `<old> <new> <ref>` line per ref update.

use confcast_publisher::rollout::short;
use git2::Oid;

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

/// `<old>..<new>` of a ref update, shortened as git does (`0000000` for a created or
/// deleted ref).
pub fn short_range(update: &RefUpdate) -> String {
    let abbrev = |o: Option<Oid>| o.map_or_else(|| "0000000".into(), |o| short(&o.to_string()));
    format!("{}..{}", abbrev(update.old), abbrev(update.new))
}

/// A push of three refs, as git hands it over: `refs/heads/x` moved from `aaa...` to
/// `bbb...`, `refs/tags/t` created at `aaa...`, `refs/heads/gone` deleted from `bbb...`.
#[cfg(test)]
pub(crate) fn sample_push() -> Vec<RefUpdate> {
    let (zero, a, b) = ("0".repeat(40), "a".repeat(40), "b".repeat(40));
    let input = format!("{a} {b} refs/heads/x\n{zero} {a} refs/tags/t\n{b} {zero} refs/heads/gone\n");
    parse_updates(&input).0
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
}
