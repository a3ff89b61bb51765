//! Signed updates: a host applies only what its datacenter's relay published.
//!
//! NATS permissions decide who may publish on a datacenter's subjects; signatures make
//! the content itself verifiable, so that a leaked or misconfigured credential cannot
//! push configuration to hosts. The relay signs every message it publishes for its
//! datacenter with an ed25519 key (an nkey seed, `S...`), and a subscriber given the
//! public keys (`U...`, `A...`, any nkey) refuses a message that is unsigned or not
//! signed by one of them. Several trusted keys at once make rotation possible: trust
//! the new key on the hosts, switch the relay to it, then drop the old one.
//!
//! The signature covers the subject, the real payload (after a spilled message is
//! read back from the object store) and the message's
//! `Nats-Expected-Last-Subject-Sequence`: the relay publishes each message on the
//! condition that the subject's last message is the one it published before, and
//! JetStream stores it only then. A genuine message replayed later, with its
//! header, is refused by the server (the subject has moved on); without the header,
//! its signature no longer matches. So a signed message can be neither moved to
//! another subject nor replayed to roll a host back. Contents kept in the object
//! store are covered through the tree id the signed update carries, which the
//! subscriber checks before switching.
//!
//! Header: `Confcast-Signature: <public key>.<base64url signature>`.

use std::path::Path;

use base64::Engine as _;
use nkeys::KeyPair;

/// Header carrying a message's signature.
pub const SIGNATURE_HEADER: &str = "Confcast-Signature";

/// A key that cannot be used, or a message that fails verification.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SignatureError {
    /// The signing key file cannot be read or holds no valid seed.
    #[error("signing key {path}: {problem}")]
    Key {
        /// The file.
        path: String,
        /// What is wrong (never the seed).
        problem: String,
    },
    /// A trusted key is not a valid public nkey.
    #[error("trusted key {key:?}: {problem}")]
    Trusted {
        /// The key as given.
        key: String,
        /// What is wrong.
        problem: String,
    },
    /// The message carries no signature.
    #[error("unsigned message (this host accepts only messages signed by its relays' keys)")]
    Unsigned,
    /// The signature header is not `<key>.<signature>`.
    #[error("malformed signature header")]
    Malformed,
    /// Signed by a key this host does not trust.
    #[error("signed by {0}, which this host does not trust")]
    Untrusted(String),
    /// The signature does not match the message.
    #[error("signature by {0} does not match the message")]
    Mismatch(String),
}

/// The nkey seed in a seed file's `text` (its first line starting with `S`: files made
/// by `nk` or `publisher keygen`, or a `.nk` with comments) and its key pair. The error
/// says what is wrong, never the seed.
pub(crate) fn seed_in(text: &str) -> Result<(String, KeyPair), String> {
    let seed = text
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with('S'))
        .ok_or_else(|| "no nkey seed (a line starting with 'S')".to_owned())?;
    let key = KeyPair::from_seed(seed).map_err(|e| e.to_string())?;
    Ok((seed.to_owned(), key))
}

/// Signs messages with one key.
pub struct Signer {
    key: KeyPair,
    public: String,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer").field("public", &self.public).finish_non_exhaustive()
    }
}

/// Header JetStream checks before storing: the subject's last stream sequence must be
/// this one. Part of what is signed.
pub const EXPECTED_SEQUENCE_HEADER: &str = "Nats-Expected-Last-Subject-Sequence";

fn signed_bytes(subject: &str, expected_sequence: Option<&str>, payload: &[u8]) -> Vec<u8> {
    let expected = expected_sequence.unwrap_or("");
    let mut bytes = Vec::with_capacity(subject.len() + expected.len() + 2 + payload.len());
    bytes.extend_from_slice(subject.as_bytes());
    bytes.push(0);
    bytes.extend_from_slice(expected.as_bytes());
    bytes.push(0);
    bytes.extend_from_slice(payload);
    bytes
}

impl Signer {
    /// Reads an nkey seed from `path` (the first line starting with `S`).
    pub fn from_file(path: &Path) -> Result<Signer, SignatureError> {
        let fail = |problem: String| SignatureError::Key { path: path.display().to_string(), problem };
        let text = std::fs::read_to_string(path).map_err(|e| fail(e.to_string()))?;
        let (_, key) = seed_in(&text).map_err(fail)?;
        Ok(Signer { public: key.public_key(), key })
    }

    /// A new random key (for `publisher keygen` and tests).
    pub fn generate() -> Signer {
        let key = KeyPair::new_account();
        Signer { public: key.public_key(), key }
    }

    /// The seed, to be written to a file only its owner can read.
    pub fn seed(&self) -> Result<String, nkeys::error::Error> {
        self.key.seed()
    }

    /// The public key hosts are given.
    pub fn public_key(&self) -> &str {
        &self.public
    }

    /// The header value for `payload` published on `subject` with
    /// [`EXPECTED_SEQUENCE_HEADER`] set to `expected_sequence`.
    pub fn sign(&self, subject: &str, expected_sequence: Option<u64>, payload: &[u8]) -> String {
        let expected = expected_sequence.map(|s| s.to_string());
        // Signing with a key holding its seed cannot fail.
        let signature = self.key.sign(&signed_bytes(subject, expected.as_deref(), payload)).unwrap_or_default();
        format!("{}.{}", self.public, base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(signature))
    }
}

/// Verifies messages against the trusted public keys.
#[derive(Default)]
pub struct Verifier {
    keys: Vec<(String, KeyPair)>,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.keys.iter().map(|(k, _)| k)).finish()
    }
}

impl Verifier {
    /// A verifier trusting `keys` (public nkeys); with none, every message is accepted.
    pub fn new<S: AsRef<str>>(keys: &[S]) -> Result<Verifier, SignatureError> {
        let keys = keys
            .iter()
            .map(|k| k.as_ref().trim())
            .filter(|k| !k.is_empty())
            .map(|k| {
                KeyPair::from_public_key(k)
                    .map(|pair| (k.to_owned(), pair))
                    .map_err(|e| SignatureError::Trusted { key: k.to_owned(), problem: e.to_string() })
            })
            .collect::<Result<_, _>>()?;
        Ok(Verifier { keys })
    }

    /// Whether any key is trusted (else verification is off).
    pub fn is_enabled(&self) -> bool {
        !self.keys.is_empty()
    }

    /// Checks the signature header of `payload` published on `subject` with
    /// `expected_sequence` (the message's [`EXPECTED_SEQUENCE_HEADER`], if any).
    pub fn verify(
        &self,
        subject: &str,
        expected_sequence: Option<&str>,
        payload: &[u8],
        header: Option<&str>,
    ) -> Result<(), SignatureError> {
        if self.keys.is_empty() {
            return Ok(());
        }
        let header = header.ok_or(SignatureError::Unsigned)?;
        let (public, signature) = header.split_once('.').ok_or(SignatureError::Malformed)?;
        let (_, key) =
            self.keys.iter().find(|(k, _)| k == public).ok_or_else(|| SignatureError::Untrusted(public.to_owned()))?;
        let signature = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(signature)
            .map_err(|_| SignatureError::Malformed)?;
        key.verify(&signed_bytes(subject, expected_sequence, payload), &signature)
            .map_err(|_| SignatureError::Mismatch(public.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signed_message_verifies_with_any_trusted_key() {
        let (old, new) = (Signer::generate(), Signer::generate());
        let verifier = Verifier::new(&[old.public_key(), new.public_key()]).expect("keys");
        for signer in [&old, &new] {
            let header = signer.sign("confcast.dc.dc1.update.service.a", Some(7), b"payload");
            assert_eq!(
                verifier.verify("confcast.dc.dc1.update.service.a", Some("7"), b"payload", Some(&header)),
                Ok(())
            );
        }
    }

    #[test]
    fn forged_replayed_or_unsigned_messages_are_refused() {
        let (relay, intruder) = (Signer::generate(), Signer::generate());
        let verifier = Verifier::new(&[relay.public_key()]).expect("keys");
        let subject = "confcast.dc.dc1.update.service.a";
        let header = relay.sign(subject, Some(3), b"payload");
        assert_eq!(verifier.verify(subject, Some("3"), b"payload", Some(&header)), Ok(()));
        assert_eq!(verifier.verify(subject, Some("3"), b"payload", None), Err(SignatureError::Unsigned));
        assert_eq!(
            verifier.verify(subject, Some("3"), b"changed", Some(&header)),
            Err(SignatureError::Mismatch(relay.public_key().to_owned()))
        );
        // Replayed on another subject, or without (or with another) sequence condition.
        for (subject, expected) in
            [("confcast.dc.dc1.update.service.b", Some("3")), (subject, None), (subject, Some("4"))]
        {
            assert!(matches!(
                verifier.verify(subject, expected, b"payload", Some(&header)),
                Err(SignatureError::Mismatch(_))
            ));
        }
        let forged = intruder.sign(subject, Some(3), b"payload");
        assert_eq!(
            verifier.verify(subject, Some("3"), b"payload", Some(&forged)),
            Err(SignatureError::Untrusted(intruder.public_key().to_owned()))
        );
        // A trusted key name with a signature made by another key.
        let spliced = format!("{}.{}", relay.public_key(), forged.split_once('.').map(|(_, s)| s).unwrap_or(""));
        assert!(matches!(
            verifier.verify(subject, Some("3"), b"payload", Some(&spliced)),
            Err(SignatureError::Mismatch(_))
        ));
        assert_eq!(verifier.verify(subject, Some("3"), b"payload", Some("garbage")), Err(SignatureError::Malformed));
    }

    #[test]
    fn without_trusted_keys_everything_passes_and_bad_keys_are_named() {
        assert_eq!(Verifier::default().verify("s", None, b"p", None), Ok(()));
        let error = Verifier::new(&["not-a-key"]).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(error.starts_with("trusted key \"not-a-key\""), "{error}");
    }

    #[test]
    fn a_seed_file_round_trips_and_a_bad_one_is_named_without_its_content() {
        let dir = tempfile::tempdir().expect("tempdir");
        let signer = Signer::generate();
        let path = dir.path().join("relay.nk");
        std::fs::write(&path, format!("{}\n", signer.seed().expect("seed"))).expect("write");
        assert_eq!(Signer::from_file(&path).expect("reads").public_key(), signer.public_key());
        std::fs::write(&path, "SXSECRETBUTINVALID\n").expect("write");
        let error = Signer::from_file(&path).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(error.contains("relay.nk") && !error.contains("SECRET"), "{error}");
    }
}
