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
    /// Two models share no token, so no map between their embeddings can be fitted.
    #[error(
        "transfer: the two vocabularies share no token (source vocabulary {from_vocab}, target vocabulary {to_vocab})"
    )]
    NoSharedTokens {
        /// Source vocabulary size.
        from_vocab: usize,
        /// Target vocabulary size.
        to_vocab: usize,
    },
    /// Fewer shared tokens than the hidden size the fit regresses on, and no ridge: the least-squares fit
    /// is underdetermined.
    #[error(
        "transfer: {shared} shared tokens for a fit on embeddings of hidden size {hidden_size}: the least-squares fit is underdetermined; pass a ridge > 0 or use more shared tokens"
    )]
    Underdetermined {
        /// Shared tokens used in the fit.
        shared: usize,
        /// Hidden size of the embeddings the fit regresses on (unknowns per column of the map).
        hidden_size: usize,
    },
    /// Arrays whose sizes do not agree.
    #[error("{what}: expected {expected}, found {found}")]
    Shape {
        /// The array at fault.
        what: String,
        /// The size expected.
        expected: String,
        /// The size found.
        found: String,
    },
    /// A numerical procedure failed (a system singular even after regularisation, a non-finite result).
    #[error("{0}")]
    Numerical(String),
    /// The language model failed.
    #[error(transparent)]
    Lm(#[from] memsteer_lm::LmError),
    /// A kernel rejected its inputs.
    #[error(transparent)]
    Kernel(#[from] memsteer_kernels::KernelError),
}

/// `Result` with [`SteerError`].
pub type Result<T, E = SteerError> = std::result::Result<T, E>;

/// Adds the place of an error (a file and line, a flag) in front of its message, as one
/// [`SteerError::Input`] line: what the readers of [`crate::data`] report.
pub(crate) trait At<T> {
    /// The error's message after `place()` and a colon.
    fn at(self, place: impl FnOnce() -> String) -> Result<T>;
}

impl<T, E: std::fmt::Display> At<T> for std::result::Result<T, E> {
    fn at(self, place: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| SteerError::Input(format!("{}: {e}", place())))
    }
}

/// Returns a [`SteerError::Input`] with a formatted message when the condition fails.
macro_rules! ensure {
    ($cond:expr, $($msg:tt)+) => {
        if !$cond {
            return Err($crate::SteerError::Input(format!($($msg)+)));
        }
    };
}

/// Returns a [`SteerError::Input`] with a formatted message.
macro_rules! bail {
    ($($msg:tt)+) => {
        return Err($crate::SteerError::Input(format!($($msg)+)))
    };
}

pub(crate) use {bail, ensure};
