//! The error type of `memsteer-did`.
//!
//! Messages describe the problem in the library's terms (settings by their [`crate::ProfileConfig`]
//! field names); a front end such as the `memsteer` CLI adds its own flag names as context.

/// Errors from configuring or running an estimation.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DidError {
    /// An output file could not be written.
    #[error("writing {path}: {source}")]
    Io {
        /// The file.
        path: std::path::PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A configuration value is out of range.
    #[error("invalid setting `{field}`: {message}")]
    Config {
        /// The [`crate::ProfileConfig`] field (`alpha`, `bootstrap`, `pretrend_window`, …).
        field: &'static str,
        /// What was wrong and what is allowed.
        message: String,
    },
    /// Never-treated controls were requested but the panel has no never-trained instances.
    #[error(
        "the panel has no never-trained (validation) instances, which never-treated controls need; mark them with treatment step `never` or use not-yet-treated controls"
    )]
    NoNeverTreated,
    /// Every treated instance was trained at or before the first checkpoint, so no cohort has a
    /// pre-treatment period.
    #[error(
        "no treated cohort has a pre-treatment checkpoint: all {dropped} treated instances were trained at or before the first checkpoint"
    )]
    NoPrePeriod {
        /// Treated instances dropped for lack of a pre-treatment period.
        dropped: usize,
    },
    /// The panel has no trained instance.
    #[error("the panel has no trained instances: every treatment step is `never`")]
    NoTreated,
    /// Difference-in-differences needs a base period before each cohort.
    #[error("difference-in-differences needs at least two checkpoints, found {found}")]
    TooFewCheckpoints {
        /// Checkpoints in the panel.
        found: usize,
    },
    /// No cell has both treated and control instances.
    #[error("no cell has both treated and control instances")]
    NoEstimableCell,
    /// A matrix shape's element count does not fit in `usize` (or a stride in `isize`).
    #[error("matrix shape overflows: {what} ({rows} × {cols})")]
    ShapeOverflow {
        /// Which operand.
        what: &'static str,
        /// Rows.
        rows: usize,
        /// Columns.
        cols: usize,
    },
    /// A buffer is shorter than its matrix shape needs.
    #[error("matrix {what} holds {found} values, its shape needs {needed}")]
    ShapeMismatch {
        /// Which operand.
        what: &'static str,
        /// Values the shape needs.
        needed: usize,
        /// Values the buffer holds.
        found: usize,
    },
    /// An index or weight passed to the influence-function API is out of range.
    #[error("{0}")]
    Argument(String),
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
