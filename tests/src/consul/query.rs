//! Query parameters as Consul's agent reads them: percent-decoded, flags without a
//! value, numbers with Go's error text, and Go durations for `wait`.

use std::collections::BTreeMap;
use std::time::Duration;

/// A request's query parameters; a parameter without `=` has no value.
pub(super) type Query = BTreeMap<String, Option<String>>;

/// Query parameters, percent-decoded; a parameter without `=` has no value.
pub(super) fn parse_query(query: Option<&str>) -> Query {
    query
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (decode(k, true), Some(decode(v, true))),
            None => (decode(p, true), None),
        })
        .collect()
}

/// Percent-decoding; in a query (not in a path) `+` is a space, as Go decodes them.
pub(super) fn decode(text: &str, in_query: bool) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = (bytes[i] == b'%')
            .then(|| bytes.get(i + 1..i + 3))
            .flatten()
            .and_then(|hex| std::str::from_utf8(hex).ok())
            .and_then(|hex| u8::from_str_radix(hex, 16).ok());
        match (escaped, bytes[i]) {
            (Some(b), _) => {
                out.push(b);
                i += 3;
                continue;
            }
            (None, b'+') if in_query => out.push(b' '),
            (None, b) => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A Go duration (`300ms`, `10s`, `1m30s`).
pub(super) fn parse_go_duration(text: &str) -> Option<Duration> {
    let mut total = 0f64;
    let mut rest = text;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let number_len = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(rest.len());
        let number: f64 = rest[..number_len].parse().ok()?;
        rest = &rest[number_len..];
        let unit_len = rest.find(|c: char| c.is_ascii_digit() || c == '.').unwrap_or(rest.len());
        let scale = match &rest[..unit_len] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return None,
        };
        rest = &rest[unit_len..];
        total += number * scale;
    }
    Some(Duration::from_secs_f64(total))
}

/// A numeric parameter, or the message of Consul's 400 for it.
pub(super) fn parse_u64(query: &Query, name: &str) -> Result<Option<u64>, String> {
    match query.get(name) {
        None => Ok(None),
        Some(value) => match value.as_deref().unwrap_or("").parse::<u64>() {
            Ok(n) => Ok(Some(n)),
            Err(e) => Err(format!("strconv.ParseUint: parsing {value:?}: {e}")),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_durations_parse() {
        assert_eq!(parse_go_duration("10s"), Some(Duration::from_secs(10)));
        assert_eq!(parse_go_duration("1500ms"), Some(Duration::from_millis(1500)));
        assert_eq!(parse_go_duration("1m30s"), Some(Duration::from_secs(90)));
        assert_eq!(parse_go_duration("10"), None);
        assert_eq!(parse_go_duration(""), None);
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(decode("a%20b%2Fc+d", false), "a b/c+d");
        assert_eq!(decode("a+b", true), "a b");
        assert_eq!(decode("100%", false), "100%");
        assert_eq!(decode("%4", false), "%4");
    }
}
