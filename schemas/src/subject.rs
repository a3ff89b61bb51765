//! Names on the bus: streams, subjects, buckets and keys.
//!
//! NATS subjects split on `.` and reserve `*`, `>` and white space; stream and bucket
//! names allow even less. Datacenter, service and ref names come from operators and may
//! contain any of those, so every name is encoded into a token first. The encoding keeps
//! `[A-Za-z0-9_-]` as is and writes every other byte as `~XX` (upper-case hex), which is
//! reversible, deterministic and valid in subjects and stream names alike.

use crate::document::Kind;

/// Stream holding one `CommitEvent` per ref update of the master.
pub const COMMITS_STREAM: &str = "CONFCAST_COMMITS";
/// Subject prefix of commit events; the full subject is `confcast.commits.<ref token>`.
pub const COMMITS_PREFIX: &str = "confcast.commits";
/// Key/value bucket holding the configuration index of every datacenter.
pub const INDEX_BUCKET: &str = "confcast-index";
/// Header naming the object that holds a message's real payload (see principle 7).
pub const SPILLED_HEADER: &str = "Confcast-Spilled";

/// Errors decoding a token back into a name.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    /// The token is empty; names are never empty.
    #[error("empty token")]
    Empty,
    /// A `~` escape is not followed by two hex digits.
    #[error("malformed escape in token {0:?}")]
    BadEscape(String),
    /// The decoded bytes are not UTF-8.
    #[error("token {0:?} does not decode to UTF-8")]
    NotUtf8(String),
}

fn is_plain(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b'-'
}

/// Encodes `name` into a single subject token that is also a valid stream-name part.
///
/// An empty name encodes to `~` alone, which [`decode_token`] rejects: names are never
/// empty, but encoding must not panic on operator input.
pub fn encode_token(name: &str) -> String {
    if name.is_empty() {
        return "~".to_owned();
    }
    let mut out = String::with_capacity(name.len());
    for &b in name.as_bytes() {
        if is_plain(b) {
            out.push(b as char);
        } else {
            out.push('~');
            out.push_str(&format!("{b:02X}"));
        }
    }
    out
}

/// Reverses [`encode_token`].
pub fn decode_token(token: &str) -> Result<String, TokenError> {
    if token.is_empty() {
        return Err(TokenError::Empty);
    }
    let bytes = token.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'~' {
            let hex = token
                .get(i + 1..i + 3)
                .filter(|h| h.bytes().all(|c| c.is_ascii_hexdigit()))
                .ok_or_else(|| TokenError::BadEscape(token.to_owned()))?;
            out.push(u8::from_str_radix(hex, 16).map_err(|_| TokenError::BadEscape(token.to_owned()))?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| TokenError::NotUtf8(token.to_owned()))
}

/// Encodes one segment of a JetStream K/V key. K/V keys allow `[-/_=.A-Za-z0-9]` but
/// not a leading or trailing `.`; everything else, and `=` itself, becomes `=XX`.
pub fn encode_key_segment(segment: &str) -> String {
    let bytes = segment.as_bytes();
    let mut out = String::with_capacity(segment.len());
    for (i, &b) in bytes.iter().enumerate() {
        let edge_dot = b == b'.' && (i == 0 || i + 1 == bytes.len() || bytes.get(i + 1) == Some(&b'.'));
        if (b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.') && !edge_dot {
            out.push(b as char);
        } else {
            out.push('=');
            out.push_str(&format!("{b:02X}"));
        }
    }
    out
}

/// Name of a datacenter's update stream: every `ServiceUpdate` and `ErrorEvent` of `dc`.
pub fn updates_stream(dc: &str) -> String {
    format!("CONFCAST_DC_{}", encode_token(dc))
}

/// Object store bucket of a datacenter, holding file contents too large to travel
/// inline, named by git blob id, and messages too large for one NATS message, named by
/// their SHA-256. One per datacenter, so that NATS permissions can keep a datacenter's
/// hosts out of every other's files. Bucket names allow only `[A-Za-z0-9_-]`: other
/// bytes, and `_` itself, are written `_XX`.
pub fn blobs_bucket(dc: &str) -> String {
    bucket_of("confcast-blobs-", dc)
}

/// K/V bucket of a datacenter's exec slots: how many hosts are running their `--exec`
/// for the same update (`subscriber --max-parallel`).
pub fn exec_slots_bucket(dc: &str) -> String {
    bucket_of("confcast-exec-", dc)
}

fn bucket_of(prefix: &str, dc: &str) -> String {
    let mut name = String::from(prefix);
    for b in dc.bytes() {
        if b.is_ascii_alphanumeric() || b == b'-' {
            name.push(char::from(b));
        } else {
            name.push_str(&format!("_{b:02X}"));
        }
    }
    name
}

/// Name of a datacenter's state stream: the latest snapshot and head of every service
/// and the datacenter's inventory, one message per subject.
pub fn state_stream(dc: &str) -> String {
    format!("CONFCAST_DC_{}_STATE", encode_token(dc))
}

/// The datacenter whose state stream `stream` may be, the inverse of [`state_stream`].
/// A name of that shape can also be the update stream of a datacenter whose name ends
/// in `_STATE`: confirm with the stream's subjects ([`state_stream_subjects`]).
pub fn state_stream_datacenter(stream: &str) -> Option<String> {
    let token = stream.strip_prefix("CONFCAST_DC_")?.strip_suffix("_STATE")?;
    let dc = decode_token(token).ok()?;
    (state_stream(&dc) == stream).then_some(dc)
}

/// Subject of a commit event for `ref_name`.
pub fn commit_subject(ref_name: &str) -> String {
    format!("{COMMITS_PREFIX}.{}", encode_token(ref_name))
}

/// Wildcard covering every commit event.
pub fn commits_wildcard() -> String {
    format!("{COMMITS_PREFIX}.>")
}

fn dc_prefix(dc: &str) -> String {
    format!("confcast.dc.{}", encode_token(dc))
}

/// Subjects bound to the update stream of `dc`.
pub fn updates_stream_subjects(dc: &str) -> Vec<String> {
    vec![format!("{}.update.>", dc_prefix(dc)), error_subject(dc)]
}

/// Subjects bound to the state stream of `dc`.
pub fn state_stream_subjects(dc: &str) -> Vec<String> {
    vec![format!("{}.state.>", dc_prefix(dc))]
}

/// Subject of the incremental updates of one service of `dc`.
pub fn update_subject(dc: &str, kind: Kind, name: &str) -> String {
    format!("{}.update.{}.{}", dc_prefix(dc), kind.as_str(), encode_token(name))
}

/// The service an update subject of datacenter `dc` is about, if it is one.
pub fn parse_update_subject(dc: &str, subject: &str) -> Option<(Kind, String)> {
    let rest = subject.strip_prefix(&dc_prefix(dc))?.strip_prefix(".update.")?;
    let (kind, name) = rest.split_once('.')?;
    let kind = Kind::ALL.into_iter().find(|k| k.as_str() == kind)?;
    Some((kind, decode_token(name).ok()?))
}

/// Subject holding the latest full snapshot of one service of `dc`.
pub fn snapshot_subject(dc: &str, kind: Kind, name: &str) -> String {
    format!("{}.state.snapshot.{}.{}", dc_prefix(dc), kind.as_str(), encode_token(name))
}

/// Subject holding one git object (a blob or a tree, named by its id) of the trees of
/// one service of `dc`: the content a snapshot names by its tree id. One message per
/// object, so a push writes only the objects its change made.
pub fn object_subject(dc: &str, kind: Kind, name: &str, id: &str) -> String {
    format!("{}.state.object.{}.{}.{id}", dc_prefix(dc), kind.as_str(), encode_token(name))
}

/// Wildcard covering every object of one service of `dc`.
pub fn objects_wildcard(dc: &str, kind: Kind, name: &str) -> String {
    format!("{}.state.object.{}.{}.>", dc_prefix(dc), kind.as_str(), encode_token(name))
}

/// Subject holding the rollout state of one service of `dc` ([`crate::rollout::RolloutState`]).
pub fn rollout_subject(dc: &str, kind: Kind, name: &str) -> String {
    format!("{}.state.rollout.{}.{}", dc_prefix(dc), kind.as_str(), encode_token(name))
}

/// Wildcard covering the rollout states of every service of `dc`.
pub fn rollouts_wildcard(dc: &str) -> String {
    format!("{}.state.rollout.>", dc_prefix(dc))
}

/// Subject on which operators send rollout controls to the relay of `dc`
/// ([`crate::rollout::Control`], a NATS request): `confcast-control.dc.<dc>.rollout`.
/// Outside `confcast.>` on purpose: the leaf-node topology keeps `confcast.>` from
/// crossing the links between a datacenter and the hub, and a control must cross them,
/// from an operator on the hub to the datacenter's relay.
pub fn control_subject(dc: &str) -> String {
    format!("confcast-control.dc.{}.rollout", encode_token(dc))
}

/// Every status subject of one service of `dc`, whichever host reported it.
pub fn service_status_wildcard(dc: &str, kind: Kind, name: &str) -> String {
    format!("{}.status.*.{}.{}", dc_prefix(dc), kind.as_str(), encode_token(name))
}

/// Subject holding the last published head (commit and tree) of one service of `dc`.
pub fn head_subject(dc: &str, kind: Kind, name: &str) -> String {
    format!("{}.state.head.{}.{}", dc_prefix(dc), kind.as_str(), encode_token(name))
}

/// Wildcard covering the heads of every service of `dc`.
pub fn heads_wildcard(dc: &str) -> String {
    format!("{}.state.head.>", dc_prefix(dc))
}

/// Subject holding the datacenter's resolved inventory (host → services).
pub fn inventory_subject(dc: &str) -> String {
    format!("{}.state.inventory", dc_prefix(dc))
}

/// Subject of error events of `dc` (bad documents, unresolvable pins).
pub fn error_subject(dc: &str) -> String {
    format!("{}.error", dc_prefix(dc))
}

/// Subject on which a host reports its status for one service. Hosts publish with
/// core NATS; the datacenter's status stream keeps the latest report per subject.
pub fn status_subject(dc: &str, host: &str, kind: Kind, name: &str) -> String {
    format!("{}.status.{}.{}.{}", dc_prefix(dc), encode_token(host), kind.as_str(), encode_token(name))
}

/// Every status subject of one host of `dc` (what its NATS permissions allow it).
pub fn host_status_wildcard(dc: &str, host: &str) -> String {
    format!("{}.status.{}.>", dc_prefix(dc), encode_token(host))
}

/// Name of a datacenter's status stream: the latest report of every host per service.
pub fn status_stream(dc: &str) -> String {
    format!("CONFCAST_DC_{}_STATUS", encode_token(dc))
}

/// Subjects bound to the status stream of `dc`.
pub fn status_stream_subjects(dc: &str) -> Vec<String> {
    vec![format!("{}.status.>", dc_prefix(dc))]
}

/// Durable consumer name of the relay of `dc` on the commit stream.
pub fn relay_consumer(dc: &str) -> String {
    format!("relay-{}", encode_token(dc))
}

/// Key of the configuration index for `dc` (the seed's Consul layout, prefixed by the
/// datacenter because the bucket is shared): `confcast/<dc>/configurations/<kind>s/<name>/<version>`.
pub fn index_key(dc: &str, kind: Kind, name: &str, version: &str) -> String {
    format!(
        "confcast/{}/configurations/{}/{}/{}",
        encode_key_segment(dc),
        kind.plural(),
        encode_key_segment(name),
        encode_key_segment(version)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn plain_names_stay_readable() {
        assert_eq!(encode_token("service0"), "service0");
        assert_eq!(encode_token("test_service-0"), "test_service-0");
    }

    #[test]
    fn reserved_characters_are_escaped() {
        assert_eq!(encode_token("a.b"), "a~2Eb");
        assert_eq!(encode_token("a/b c*>~"), "a~2Fb~20c~2A~3E~7E");
        assert_eq!(commit_subject("refs/heads/x"), "confcast.commits.refs~2Fheads~2Fx");
    }

    #[test]
    fn malformed_tokens_are_rejected() {
        assert_eq!(decode_token(""), Err(TokenError::Empty));
        assert!(matches!(decode_token("~"), Err(TokenError::BadEscape(_))));
        assert!(matches!(decode_token("a~4"), Err(TokenError::BadEscape(_))));
        assert!(matches!(decode_token("~ZZ"), Err(TokenError::BadEscape(_))));
        assert!(matches!(decode_token("~FF"), Err(TokenError::NotUtf8(_))));
    }

    #[test]
    fn key_segments_are_valid_kv_keys() {
        assert_eq!(encode_key_segment("v1.0"), "v1.0");
        assert_eq!(encode_key_segment(".hidden."), "=2Ehidden=2E");
        assert_eq!(encode_key_segment("a b=c"), "a=20b=3Dc");
        assert_eq!(
            index_key("dc1", Kind::Service, "service0", "latest"),
            "confcast/dc1/configurations/services/service0/latest"
        );
    }

    #[test]
    fn state_streams_name_their_datacenter() {
        for dc in ["dc1", "eu west", "a_STATE"] {
            assert_eq!(state_stream_datacenter(&state_stream(dc)).as_deref(), Some(dc));
        }
        assert_eq!(state_stream_datacenter(&updates_stream("dc1")), None);
        assert_eq!(state_stream_datacenter("KV_confcast-index"), None);
    }

    proptest! {
        #[test]
        fn blob_buckets_are_valid_and_distinct(a in "\\PC{1,20}", b in "\\PC{1,20}") {
            let (x, y) = (blobs_bucket(&a), blobs_bucket(&b));
            prop_assert!(x.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_'));
            prop_assert_eq!(x == y, a == b);
        }

        #[test]
        fn update_subjects_parse_back(dc in "\\PC{1,12}", name in "\\PC{1,20}") {
            for kind in Kind::ALL {
                let parsed = parse_update_subject(&dc, &update_subject(&dc, kind, &name));
                prop_assert_eq!(parsed, Some((kind, name.clone())));
            }
        }

        #[test]
        fn tokens_round_trip(name in "\\PC{1,40}") {
            let token = encode_token(&name);
            prop_assert!(token.bytes().all(|b| is_plain(b) || b == b'~'));
            prop_assert_eq!(decode_token(&token).expect("decodes"), name);
        }

        #[test]
        fn key_segments_use_kv_alphabet(name in "\\PC{1,40}") {
            let seg = encode_key_segment(&name);
            prop_assert!(seg.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_=.".contains(&b)));
            prop_assert!(!seg.starts_with('.') && !seg.ends_with('.') && !seg.contains(".."));
        }
    }
}
