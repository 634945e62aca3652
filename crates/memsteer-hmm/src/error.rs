//! The error type of `memsteer-hmm`.

/// Invalid model parameters or inputs.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HmmError {
    /// A matrix or vector has the wrong length.
    #[error("{what}: expected {expected} values, found {found}")]
    Shape {
        /// Which parameter.
        what: &'static str,
        /// Expected length.
        expected: usize,
        /// Actual length.
        found: usize,
    },
    /// A probability is negative or not finite.
    #[error("{what}[{index}] = {value}: expected a finite, non-negative probability")]
    Value {
        /// Which parameter.
        what: &'static str,
        /// Flat index of the value.
        index: usize,
        /// The value.
        value: f64,
    },
    /// A distribution does not sum to one.
    #[error("{what}, row {row}: sums to {sum}, expected 1 (±1e-9)")]
    NotStochastic {
        /// Which parameter.
        what: &'static str,
        /// The row.
        row: usize,
        /// Its sum.
        sum: f64,
    },
    /// An observation is outside the vocabulary.
    #[error("observation {value} at position {position} is outside the vocabulary of {vocab}")]
    Observation {
        /// Position in the sequence.
        position: usize,
        /// The symbol.
        value: usize,
        /// Vocabulary size.
        vocab: usize,
    },
    /// An output file could not be written.
    #[error("writing {path}: {message}")]
    Write {
        /// The file.
        path: std::path::PathBuf,
        /// The cause.
        message: String,
    },
    /// A construction was asked for impossible sizes.
    #[error("invalid construction: {0}")]
    Construction(String),
}

/// `Result` with [`HmmError`].
pub type Result<T, E = HmmError> = std::result::Result<T, E>;
