//! The local API's answers as types: the server serializes them, [`crate::client`]
//! deserializes them, and nothing in between builds or takes apart JSON by hand.
//!
//! The wire format is JSON objects with their keys in alphabetical order (what the API
//! has always answered): every struct here declares its fields in that order, and a
//! field that is absent from some answers is skipped rather than sent as `null`.

use std::collections::BTreeMap;
use std::path::PathBuf;

use confcast_schemas::message::Health;
use confcast_schemas::Kind;
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;

/// `GET /v1/services`: every service of the host.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Services {
    /// The host's datacenter (empty before the first apply).
    pub dc: String,
    /// Every service, in the order of their `<kind>/<name>` keys.
    pub services: Vec<Service>,
}

/// One service: an item of `GET /v1/services`, or the answer of
/// `GET /v1/services/<name>`, which adds its [`files`](Service::files).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Service {
    /// When the commit in place was applied, ms since the Unix epoch.
    pub applied_at_ms: Option<u64>,
    /// The commit in place; `None` once the service was dropped.
    pub commit: Option<String>,
    /// The service's directory on the host (the link to its live tree).
    pub dir: PathBuf,
    /// Why the last update, check or exec failed; `None` when all went well.
    pub error: Option<String>,
    /// The change is applied but `--exec` has not completed for it.
    pub exec_pending: bool,
    /// Exit status of the last `--exec` run (-1: it did not exit).
    pub exec_status: Option<i32>,
    /// Every file of the tree, by path; only in `GET /v1/services/<name>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub files: Option<BTreeMap<String, TreeFile>>,
    /// What the host's checks (`--check-cmd`, `--exec`, `--health-cmd`) last said of the
    /// service; absent until they judged it since the subscriber started or the commit
    /// in place was applied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<Health>,
    /// The service's change index (see `X-Confcast-Index`).
    pub index: u64,
    /// Service, application or device.
    pub kind: Kind,
    /// Its name.
    pub name: String,
    /// A commit of a staged rollout this host holds, not released to it yet; absent
    /// when none is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending: Option<String>,
    /// The ref it was resolved through.
    #[serde(rename = "ref")]
    pub ref_name: String,
    /// Whether the last update, check and exec went well.
    pub status: Status,
    /// The git tree id of the commit in place.
    pub tree: Option<String>,
    /// The pin's version (tag or `latest`).
    pub version: String,
}

/// A service's [`Service::status`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// All went well.
    Ok,
    /// See [`Service::error`].
    Error,
}

/// One file of a tree, as `GET /v1/services/<name>` lists it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TreeFile {
    /// A UTF-8 file.
    Text {
        /// A `.json`, `.yaml`/`.yml` or `.toml` file's document, parsed.
        #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "present")]
        document: Option<Value>,
        /// Why such a file's document could not be parsed.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        document_error: Option<String>,
        /// The content.
        text: String,
    },
    /// Any other file, its content in standard base64.
    Binary {
        /// The content, encoded.
        base64: String,
    },
    /// A symbolic link.
    Symlink {
        /// Its target.
        symlink: String,
    },
}

/// An error answer: any status other than 200.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorAnswer {
    /// What went wrong.
    pub error: String,
}

/// A field that is present is `Some`, even when it holds `null` (a document that
/// parses to null).
fn present<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<Value>, D::Error> {
    Value::deserialize(deserializer).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(files: Option<BTreeMap<String, TreeFile>>) -> Service {
        Service {
            applied_at_ms: Some(1_700_000_000_000),
            commit: Some("c0ffee".into()),
            dir: "/srv/conf/service0".into(),
            error: None,
            exec_pending: false,
            exec_status: Some(3),
            files,
            health: None,
            index: 42,
            kind: Kind::Service,
            name: "service0".into(),
            pending: None,
            ref_name: "refs/heads/services/service0/master".into(),
            status: Status::Ok,
            tree: None,
            version: "latest".into(),
        }
    }

    /// The bytes the API answered before its answers were typed, for the same values.
    #[test]
    fn the_wire_format_is_the_one_documented() {
        let listed = Services { dc: "dc1".into(), services: vec![service(None)] };
        assert_eq!(
            serde_json::to_string(&listed).expect("json"),
            r#"{"dc":"dc1","services":[{"applied_at_ms":1700000000000,"commit":"c0ffee","dir":"/srv/conf/service0","error":null,"exec_pending":false,"exec_status":3,"index":42,"kind":"service","name":"service0","ref":"refs/heads/services/service0/master","status":"ok","tree":null,"version":"latest"}]}"#
        );
        let files = BTreeMap::from([
            (
                "a.json".to_owned(),
                TreeFile::Text { document: Some(Value::Null), document_error: None, text: "null".into() },
            ),
            (
                "b.yaml".to_owned(),
                TreeFile::Text { document: None, document_error: Some("bad".into()), text: ":".into() },
            ),
            ("c".to_owned(), TreeFile::Text { document: None, document_error: None, text: "x".into() }),
            ("d".to_owned(), TreeFile::Binary { base64: "/w==".into() }),
            ("e".to_owned(), TreeFile::Symlink { symlink: "c".into() }),
        ]);
        let one = Service { error: Some("exec failed".into()), status: Status::Error, ..service(Some(files)) };
        let text = serde_json::to_string(&one).expect("json");
        assert_eq!(
            text,
            r#"{"applied_at_ms":1700000000000,"commit":"c0ffee","dir":"/srv/conf/service0","error":"exec failed","exec_pending":false,"exec_status":3,"files":{"a.json":{"document":null,"text":"null"},"b.yaml":{"document_error":"bad","text":":"},"c":{"text":"x"},"d":{"base64":"/w=="},"e":{"symlink":"c"}},"index":42,"kind":"service","name":"service0","ref":"refs/heads/services/service0/master","status":"error","tree":null,"version":"latest"}"#
        );
        assert_eq!(serde_json::from_str::<Service>(&text).expect("reads back"), one);
        // Judged: the health comes between the files and the index.
        let judged = Service {
            error: Some("0badc0de refused: --check-cmd exited with exit status: 1".into()),
            health: Some(Health::unhealthy(1_700_000_000_001, "--check-cmd exited with exit status: 1; output:\nbad")),
            status: Status::Error,
            ..service(None)
        };
        let text = serde_json::to_string(&judged).expect("json");
        assert_eq!(
            text,
            r#"{"applied_at_ms":1700000000000,"commit":"c0ffee","dir":"/srv/conf/service0","error":"0badc0de refused: --check-cmd exited with exit status: 1","exec_pending":false,"exec_status":3,"health":{"at_ms":1700000000001,"reason":"--check-cmd exited with exit status: 1; output:\nbad","state":"unhealthy"},"index":42,"kind":"service","name":"service0","ref":"refs/heads/services/service0/master","status":"error","tree":null,"version":"latest"}"#
        );
        assert_eq!(serde_json::from_str::<Service>(&text).expect("reads back"), judged);
        let healthy = Service { health: Some(Health::healthy(5)), ..service(None) };
        let text = serde_json::to_string(&healthy).expect("json");
        assert!(text.contains(r#""health":{"at_ms":5,"reason":null,"state":"healthy"},"index""#), "{text}");
        let error = ErrorAnswer { error: "no service \"x\" on this host".into() };
        assert_eq!(serde_json::to_string(&error).expect("json"), r#"{"error":"no service \"x\" on this host"}"#);
    }
}
