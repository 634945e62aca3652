//! The error type of `memsteer-panel`.

use std::path::PathBuf;

/// Everything that can go wrong while building, reading or writing a panel.
///
/// Every variant names its input (`source` is a file path or another label the caller gave) and, for
/// row problems, the 1-based line number, so a user can open the file at the right place.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PanelError {
    /// A file could not be read or written.
    #[error("{action} {path}: {source}")]
    Io {
        /// What was being done (`reading`, `writing`, …).
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The input holds no header or no data rows.
    #[error("{input}: {what}")]
    Empty {
        /// The input.
        input: String,
        /// What is missing.
        what: String,
    },
    /// A required column is not in the header.
    #[error("{input}: missing column `{column}` (the {role}); the header has: {available}")]
    MissingColumn {
        /// The input.
        input: String,
        /// The column that was looked for.
        column: String,
        /// What the column is used for.
        role: &'static str,
        /// The header's columns, comma separated.
        available: String,
    },
    /// A field could not be parsed or holds a value that is not allowed.
    #[error("{input}, {line}, column `{column}`: {expected}, found {value:?}")]
    Field {
        /// The input.
        input: String,
        /// Where in the input.
        line: Location,
        /// The column name.
        column: String,
        /// The offending text (truncated to 40 characters).
        value: String,
        /// What was expected there.
        expected: String,
    },
    /// A row has a different number of fields from the header.
    #[error("{input}, {line}: expected {expected} fields like the header, found {found}")]
    FieldCount {
        /// The input.
        input: String,
        /// Where in the input.
        line: Location,
        /// Fields in the header.
        expected: usize,
        /// Fields in the row.
        found: usize,
    },
    /// The same (instance, checkpoint) pair appears twice.
    #[error(
        "{input}, {line}: duplicate row for instance {instance:?} at checkpoint {checkpoint} (first seen on {first_line})"
    )]
    Duplicate {
        /// The input.
        input: String,
        /// The second occurrence.
        line: Location,
        /// The first occurrence.
        first_line: Location,
        /// The instance id.
        instance: String,
        /// The checkpoint step.
        checkpoint: u64,
    },
    /// Two rows of one instance disagree about its treatment step.
    #[error(
        "{input}, {line}: instance {instance:?} has treatment step {second} here but {first} on {first_line}; an instance is trained in exactly one batch"
    )]
    ConflictingTreatment {
        /// The input.
        input: String,
        /// The conflicting row.
        line: Location,
        /// Where the first value came from.
        first_line: Location,
        /// The instance id.
        instance: String,
        /// The first value (`never` for never-trained).
        first: String,
        /// The conflicting value.
        second: String,
    },
    /// An instance lacks outcomes at some checkpoints.
    #[error(
        "{input}: instance {instance:?} has no outcome at {missing} of {total} checkpoints (e.g. step {example_step}); a panel needs one row per instance and checkpoint (or drop incomplete instances)"
    )]
    Incomplete {
        /// The input.
        input: String,
        /// The first incomplete instance.
        instance: String,
        /// How many checkpoints it lacks.
        missing: usize,
        /// The number of checkpoints in the panel.
        total: usize,
        /// One missing checkpoint step.
        example_step: u64,
    },
    /// An instance's treatment step lies after the last checkpoint, so its cohort is undefined.
    #[error(
        "{input}: instance {instance:?} is trained at step {treatment} after the last checkpoint ({last_checkpoint}); cut the panel at a maximum step or fix the treatment step"
    )]
    TreatmentAfterLastCheckpoint {
        /// The input.
        input: String,
        /// The instance id.
        instance: String,
        /// Its treatment step.
        treatment: u64,
        /// The last checkpoint step.
        last_checkpoint: u64,
    },
    /// Far fewer rows than instances × checkpoints: nearly every instance lacks checkpoints, which is
    /// what a wrong column mapping looks like (e.g. an outcome column read as instance ids, or a
    /// column of large integers read as checkpoint steps). Detected before anything of that size is
    /// allocated.
    #[error(
        "{input}: {instances} distinct instance ids × {checkpoints} distinct checkpoint steps need one row each, but the file has {rows} rows; check that the instance and checkpoint columns are the right ones"
    )]
    Sparse {
        /// The input.
        input: String,
        /// Distinct instance ids.
        instances: usize,
        /// Distinct checkpoint steps.
        checkpoints: usize,
        /// Data rows (at or before the maximum step).
        rows: usize,
    },
    /// A reader option is out of range.
    #[error("invalid option `{option}`: {message}")]
    InvalidOption {
        /// The [`crate::read::ReadOptions`] setting (`batch_size` of the sequence-index encoding, …).
        option: &'static str,
        /// What was wrong and what is allowed.
        message: String,
    },
    /// The checkpoint grid is not a strictly increasing, non-empty list of steps.
    #[error("invalid checkpoint grid: {0}")]
    Grid(String),
    /// In-memory inputs disagree in length.
    #[error("invalid panel: {what}: expected {expected}, found {found}")]
    ShapeMismatch {
        /// Which input (`treatment steps`, `outcomes`, …).
        what: &'static str,
        /// The length the other inputs imply.
        expected: usize,
        /// The length given.
        found: usize,
    },
    /// An in-memory outcome is NaN or infinite.
    #[error(
        "invalid panel: outcome of instance {instance:?} at checkpoint {checkpoint} is {value}, expected a finite number"
    )]
    NonFiniteOutcome {
        /// The instance id.
        instance: String,
        /// The checkpoint step.
        checkpoint: u64,
        /// The value.
        value: f64,
    },
    /// An instance id appears twice among in-memory inputs.
    #[error("invalid panel: instance id {0:?} appears twice")]
    DuplicateId(String),
    /// The file needs a cargo feature this build lacks (Parquet without the `parquet` feature).
    #[error("{path}: this build cannot {action} {format} files; rebuild with the `{feature}` feature")]
    FeatureDisabled {
        /// The file.
        path: PathBuf,
        /// `read` or `write`.
        action: &'static str,
        /// The file format.
        format: &'static str,
        /// The cargo feature that adds it.
        feature: &'static str,
    },
    /// Other invalid inputs (synthetic-panel settings, Parquet encoding problems), described in words.
    #[error("invalid panel: {0}")]
    Invalid(String),
}

/// A place in an input file: a 1-based line of a text file or a 1-based data row of a columnar file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Location {
    /// Line of a text file (the header is line 1).
    Line(u32),
    /// Data row of a columnar file (the first row is row 1).
    Row(u32),
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Location::Line(n) => write!(f, "line {n}"),
            Location::Row(n) => write!(f, "row {n}"),
        }
    }
}

/// `Result` with [`PanelError`].
pub type Result<T, E = PanelError> = std::result::Result<T, E>;
