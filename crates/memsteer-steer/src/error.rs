//! The error type of `memsteer-steer`.

use std::path::PathBuf;

/// Errors building, reading, writing or training a steer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SteerError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A steer file is malformed: not safetensors, a tensor or metadata field missing, of the wrong shape or
    /// type, or holding a non-finite value.
    #[error("{path}: `{field}`: {message}")]
    Format {
        /// The steer file.
        path: PathBuf,
        /// The tensor or metadata field at fault.
        field: String,
        /// What was expected and what was found.
        message: String,
    },
    /// A steer does not belong to the model it is applied to (another hidden size, vocabulary or output
    /// embedding).
    #[error(
        "{source_name}: steer made for another model: {field} is {steer} in the steer but {model} in the model; use `transfer` to move a steer to another model"
    )]
    ModelMismatch {
        /// Where the steer came from (its file, or `steer` when it was built in memory).
        source_name: String,
        /// `hidden_size`, `vocab_size` or `embedding_fingerprint`.
        field: &'static str,
        /// The steer's value.
        steer: String,
        /// The model's value.
        model: String,
    },
    /// A setting is out of range.
    #[error("{field}: {message}")]
    Config {
        /// The setting (as the training configuration names it).
        field: &'static str,
        /// What was expected and what was found.
        message: String,
    },
    /// Invalid input data (a corpus, strengths, hidden states).
    #[error("{0}")]
    Input(String),
    /// The language model failed.
    #[error(transparent)]
    Lm(#[from] memsteer_lm::LmError),
    /// A kernel rejected its inputs.
    #[error(transparent)]
    Kernel(#[from] memsteer_kernels::KernelError),
}

/// `Result` with [`SteerError`].
pub type Result<T, E = SteerError> = std::result::Result<T, E>;
