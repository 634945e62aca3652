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
