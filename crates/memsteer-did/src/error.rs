//! The error type of `memsteer-did`.

/// Errors from configuring or running an estimation.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DidError {
    /// A configuration value is out of range.
    #[error("invalid setting {name}: {message}")]
    Config {
        /// The setting (as the CLI spells it).
        name: &'static str,
        /// What was wrong and what is allowed.
        message: String,
    },
    /// The panel cannot support the requested estimation.
    #[error("{0}")]
    Panel(String),
    /// An estimates file could not be read.
    #[error("{input}, line {line}: {message}")]
    Estimates {
        /// The file.
        input: String,
        /// 1-based line (0 for the whole file).
        line: usize,
        /// What was wrong.
        message: String,
    },
    /// An error from the panel crate.
    #[error(transparent)]
    PanelData(#[from] memsteer_panel::PanelError),
}

/// `Result` with [`DidError`].
pub type Result<T, E = DidError> = std::result::Result<T, E>;
