//! The error type of `memsteer-kernels`.

/// Invalid kernel inputs or an unavailable device.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KernelError {
    /// A buffer has the wrong length.
    #[error("{what}: expected {expected} values, found {found}")]
    Shape {
        /// Which buffer.
        what: &'static str,
        /// What was expected.
        expected: String,
        /// Its length.
        found: usize,
    },
    /// A target id is outside the vocabulary.
    #[error("target {id} at position {position} is outside the vocabulary of {vocab}")]
    Target {
        /// Token position.
        position: usize,
        /// The id.
        id: u32,
        /// Vocabulary size.
        vocab: usize,
    },
    /// A shape product does not fit in memory addresses.
    #[error("{what}: a {rows} × {cols} matrix overflows the address space")]
    Overflow {
        /// Which matrix.
        what: &'static str,
        /// Rows asked for.
        rows: usize,
        /// Columns asked for.
        cols: usize,
    },
    /// CUDA is compiled in, but the device cannot be used here (no driver, no library, no such device).
    #[error("CUDA device {ordinal} is not available: {reason}")]
    CudaUnavailable {
        /// The device asked for.
        ordinal: usize,
        /// What is missing.
        reason: String,
    },
    /// A CUDA call failed.
    #[error("CUDA {op} failed: {message}")]
    Cuda {
        /// The operation.
        op: &'static str,
        /// The driver's, NVRTC's or cuBLAS's message.
        message: String,
    },
    /// An operation that this device or these operands do not support.
    #[error("{what}: {message}")]
    Unsupported {
        /// The operation.
        what: &'static str,
        /// Why not, and what would work.
        message: String,
    },
    /// A device buffer passed to an operation on another device.
    #[error("{op}: {what} lives on CUDA device {found}, the operation runs on device {expected}")]
    WrongDevice {
        /// The operation.
        op: &'static str,
        /// The operand.
        what: &'static str,
        /// The operation's device.
        expected: usize,
        /// The buffer's device.
        found: usize,
    },
    /// An output that overlaps an input or another output of the same operation.
    #[error("{op}: output {output} overlaps {other} in device memory (outputs may not alias other operands)")]
    Aliasing {
        /// The operation.
        op: &'static str,
        /// The output.
        output: &'static str,
        /// What it overlaps.
        other: &'static str,
    },
    /// A device name that is not `cpu`, `cuda` or `cuda:N`.
    #[error("unknown device {0:?}: expected `cpu`, `cuda` or `cuda:N`")]
    UnknownDevice(String),
    /// CUDA was requested from a build without it.
    #[error(
        "CUDA device {ordinal} requested, but this build has no CUDA support: rebuild with `--features cuda` (e.g. `cargo install --path crates/memsteer-cli --features cuda`)"
    )]
    NotCompiledWithCuda {
        /// The device asked for.
        ordinal: usize,
    },
}

/// `Result` with [`KernelError`].
pub type Result<T, E = KernelError> = std::result::Result<T, E>;
