//! "Did you mean ...?": the existing name nearest to a mistyped one, for every refusal
//! and note the hooks write.

/// The candidate closest to `value`, if it is close enough to be what was meant: at
/// most one edit (an adjacent transposition counts as one) per three characters, and
/// always one; case is ignored. Ties go to the first in alphabetical order.
pub fn nearest<'a>(value: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    let lower = value.to_lowercase();
    candidates
        .into_iter()
        .filter(|c| *c != value)
        .map(|c| (strsim::osa_distance(&lower, &c.to_lowercase()), c))
        .filter(|(distance, c)| *distance <= (c.chars().count().max(value.chars().count()) / 3).max(1))
        .min()
        .map(|(_, c)| c)
}

/// `; did you mean `x`?`, or nothing.
pub fn did_you_mean(nearest: &Option<String>) -> String {
    nearest.as_ref().map(|n| format!("; did you mean `{n}`?")).unwrap_or_default()
}
