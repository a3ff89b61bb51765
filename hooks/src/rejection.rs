//! Why pre-receive refuses a ref update: every check of the hook says it the same way.

use confcast_schemas::{path::PathError, DocumentError};

use crate::cross_refs;

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
