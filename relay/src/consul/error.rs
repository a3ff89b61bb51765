//! What can go wrong talking to Consul, each failure naming the request, and which
//! failures a retry may cure ([`ConsulError::is_transient`]).

use std::path::PathBuf;

use reqwest::{Method, StatusCode};

use super::{MAX_TXN_BODY_BYTES, MAX_TXN_OPS, MAX_VALUE_BYTES};

/// Why a URL does not parse.
pub(super) type UrlError = <reqwest::Url as std::str::FromStr>::Err;

/// A failure talking to Consul, naming the request that failed.
#[derive(Debug, thiserror::Error)]
pub enum ConsulError {
    /// The request did not get an HTTP answer (connection refused, timeout, ...).
    #[error("consul {method} {path}")]
    Transport {
        /// HTTP method.
        method: Method,
        /// URL path (no query, no host).
        path: String,
        /// What went wrong (the URL left out).
        #[source]
        source: reqwest::Error,
    },
    /// Consul answered with an error status.
    #[error("consul {method} {path}: HTTP {status}: {message}")]
    Status {
        /// HTTP method.
        method: Method,
        /// URL path.
        path: String,
        /// The status Consul returned.
        status: StatusCode,
        /// Consul's message (the response body, shortened).
        message: String,
    },
    /// Consul answered 2xx (or 409) with a body that is not the JSON its API documents.
    #[error("consul {method} {path}: unexpected response")]
    Json {
        /// HTTP method.
        method: Method,
        /// URL path.
        path: String,
        /// Why it does not parse.
        #[source]
        source: serde_json::Error,
    },
    /// Consul answered with a value that is not base64.
    #[error("consul {method} {path}: unexpected response: value of {key} is not base64")]
    Base64 {
        /// HTTP method.
        method: Method,
        /// URL path.
        path: String,
        /// The key.
        key: String,
        /// Why it does not decode.
        #[source]
        source: base64::DecodeError,
    },
    /// Consul rolled a transaction back without saying why.
    #[error("consul PUT {path}: unexpected response: 409 without errors")]
    RolledBackWithoutErrors {
        /// URL path.
        path: String,
    },
    /// A value is larger than Consul accepts; nothing was sent.
    #[error("value of consul key {key} is {bytes} bytes, over Consul's limit of {MAX_VALUE_BYTES} bytes; not sent")]
    ValueTooLarge {
        /// The key.
        key: String,
        /// The value's size.
        bytes: usize,
    },
    /// A transaction has more operations than Consul accepts; nothing was sent.
    #[error("consul transaction of {ops} operations is over Consul's limit of {MAX_TXN_OPS}; not sent")]
    TooManyOps {
        /// How many operations it had.
        ops: usize,
    },
    /// A transaction's JSON body is larger than Consul accepts; nothing was sent.
    #[error("consul transaction body of {bytes} bytes is over Consul's limit of {MAX_TXN_BODY_BYTES} bytes; not sent")]
    TxnTooLarge {
        /// The body's size.
        bytes: usize,
    },
    /// Other writers kept changing the keys between reading and writing them.
    #[error("consul keys under {prefix} changed by another writer {attempts} times in a row: {what}")]
    Conflict {
        /// The prefix being written.
        prefix: String,
        /// How many times a transaction was rolled back.
        attempts: usize,
        /// Consul's reasons.
        what: String,
    },
    /// The Consul URL does not parse.
    #[error("consul URL {url:?}")]
    Url {
        /// The URL as given.
        url: String,
        /// Why.
        #[source]
        source: UrlError,
    },
    /// The Consul URL cannot be used: `problem` says why.
    #[error("consul URL {url:?}: {problem}")]
    UnusableUrl {
        /// The URL as given.
        url: String,
        /// What is wrong with it.
        problem: &'static str,
    },
    /// The HTTP client cannot be built.
    #[error("consul URL {url:?}")]
    HttpClient {
        /// The URL as given.
        url: String,
        /// What the HTTP client said.
        #[source]
        source: reqwest::Error,
    },
    /// The token file cannot be read.
    #[error("consul token file {}", path.display())]
    TokenFile {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The token file holds no usable token: `problem` says why.
    #[error("consul token file {}: {problem}", path.display())]
    BadToken {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        problem: &'static str,
    },
}

impl ConsulError {
    /// Whether retrying the same request later may succeed: Consul unreachable, busy or
    /// failing on its side. A refused token, a bad request or a limit is not.
    pub fn is_transient(&self) -> bool {
        match self {
            ConsulError::Transport { .. } => true,
            ConsulError::Status { status, .. } => status.is_server_error() || *status == StatusCode::TOO_MANY_REQUESTS,
            ConsulError::Json { .. }
            | ConsulError::Base64 { .. }
            | ConsulError::RolledBackWithoutErrors { .. }
            | ConsulError::Conflict { .. } => true,
            ConsulError::ValueTooLarge { .. }
            | ConsulError::TooManyOps { .. }
            | ConsulError::TxnTooLarge { .. }
            | ConsulError::Url { .. }
            | ConsulError::UnusableUrl { .. }
            | ConsulError::HttpClient { .. }
            | ConsulError::TokenFile { .. }
            | ConsulError::BadToken { .. } => false,
        }
    }
}
