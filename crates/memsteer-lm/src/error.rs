//! The error type of `memsteer-lm`.

use std::path::PathBuf;

/// Errors loading or running a model.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LmError {
    /// A file could not be read.
    #[error("reading {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// `config.json` is malformed or lacks a field.
    #[error("{path}: {message}")]
    Config {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The weights file is malformed (truncated, bad header).
    #[error("{path}: not a readable safetensors file ({message})")]
    Weights {
        /// The file.
        path: PathBuf,
        /// The parser's message.
        message: String,
    },
    /// A tensor is missing or has the wrong shape or dtype.
    #[error("{path}: tensor `{name}`: {message}")]
    Tensor {
        /// The file.
        path: PathBuf,
        /// The tensor name.
        name: String,
        /// What is wrong.
        message: String,
    },
    /// A tokenizer file is malformed or unusable, or text could not be tokenized with it.
    #[error("{path}: {message}")]
    Tokenizer {
        /// The tokenizer file (`tokenizer.json`, or the vocabulary of a GPT-2 layout).
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// Invalid model input.
    #[error("{0}")]
    Input(String),
    /// Invalid input in one sequence of a batch.
    #[error("sequence {index} of the batch: {message}")]
    Sequence {
        /// The sequence's index in the batch.
        index: usize,
        /// What is wrong.
        message: String,
    },
    /// A kernel rejected its inputs.
    #[error(transparent)]
    Kernel(#[from] memsteer_kernels::KernelError),
}

/// `Result` with [`LmError`].
pub type Result<T, E = LmError> = std::result::Result<T, E>;

/// Adds the place of an error (a file and line, a flag) in front of its message, as one
/// [`LmError::Input`] line: what the file-level jobs ([`crate::instances`], [`crate::score`],
/// [`crate::train::run`]) report.
pub(crate) trait At<T> {
    /// The error's message after `place()` and a colon.
    fn at(self, place: impl FnOnce() -> String) -> Result<T>;
}

impl<T, E: std::fmt::Display> At<T> for std::result::Result<T, E> {
    fn at(self, place: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| LmError::Input(format!("{}: {e}", place())))
    }
}

/// Returns an [`LmError::Input`] with a formatted message when the condition fails.
macro_rules! ensure {
    ($cond:expr, $($msg:tt)+) => {
        if !$cond {
            return Err($crate::LmError::Input(format!($($msg)+)));
        }
    };
}

/// Returns an [`LmError::Input`] with a formatted message.
macro_rules! bail {
    ($($msg:tt)+) => {
        return Err($crate::LmError::Input(format!($($msg)+)))
    };
}

pub(crate) use {bail, ensure};
