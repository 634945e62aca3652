//! The hot operations of memsteer's language-model work, behind one [`Device`].
//!
//! - [`log_prob_targets`]: `log softmax(h Eᵀ)[target]` for every token, fused — vocabulary tiles are
//!   streamed through an online log-sum-exp, so no `[tokens, vocab]` buffer ever exists (memory is
//!   `O(block × tile)`).
//! - [`matmul`]: row-major `f32` matrix products (the transformer's linear layers).
//! - [`steered_projection`]: LM-Steer's `c' = c + ε Σ_i s_i (c P1_i) P2_iᵀ` for a batch of hidden states.
//!
//! The CPU implementations are always built. The `cuda` feature adds `Device::Cuda` (module
//! `cuda`: NVRTC-compiled kernels and cuBLAS) behind the same functions, which then copy their host
//! slices to the device and back, plus device-resident operations for the runtime's GPU forward
//! pass. Without the feature, [`Device::cuda`] returns [`KernelError::NotCompiledWithCuda`], so
//! callers carry no `cfg`.
//!
//! ```
//! use memsteer_kernels::{log_prob_targets, Device};
//! // Two tokens, hidden size 2, vocabulary of 3.
//! let hidden = [1.0f32, 0.0, 0.0, 1.0];
//! let embedding = [1.0f32, 0.0, 0.0, 1.0, 0.0, 0.0];
//! let mut out = [0.0f32; 2];
//! log_prob_targets(&Device::Cpu, &hidden, &embedding, 2, &[0, 2], &mut out).unwrap();
//! let lse = (1.0f32.exp() + 2.0).ln();
//! assert!((out[0] - (1.0 - lse)).abs() < 1e-6);
//! assert!((out[1] - (0.0 - lse)).abs() < 1e-6);
//! ```
#![deny(missing_docs)]

pub mod bf16;
mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod dispatch;
mod error;
mod f32panels;
mod native;
mod operands;
mod packed;
pub mod vmath;
#[cfg(target_arch = "x86_64")]
mod x86;

pub use bf16::PackedBf16;
pub use dispatch::{CpuKernels, cpu_kernels};
pub use f32panels::PackedF32;

pub use error::{KernelError, Result};

/// Where a kernel runs.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Device {
    /// The CPU (multi-threaded with rayon).
    #[default]
    Cpu,
    /// A CUDA device (feature `cuda`).
    #[cfg(feature = "cuda")]
    Cuda(CudaDevice),
}

/// A CUDA device opened by [`Device::cuda`]; equal when the ordinals are.
#[cfg(feature = "cuda")]
#[derive(Debug, Clone)]
pub struct CudaDevice(pub std::sync::Arc<cuda::Gpu>);

#[cfg(feature = "cuda")]
impl PartialEq for CudaDevice {
    fn eq(&self, other: &Self) -> bool {
        self.0.ordinal() == other.0.ordinal()
    }
}
#[cfg(feature = "cuda")]
impl Eq for CudaDevice {}

impl Device {
    /// The CUDA device `ordinal`: opened once per process (kernels compiled by NVRTC on first use).
    /// A build without the `cuda` feature returns [`KernelError::NotCompiledWithCuda`]; a build with
    /// it on a machine without a driver, the CUDA libraries or that device returns
    /// [`KernelError::CudaUnavailable`] saying which.
    pub fn cuda(ordinal: usize) -> Result<Device> {
        #[cfg(feature = "cuda")]
        {
            Ok(Device::Cuda(CudaDevice(cuda::Gpu::open(ordinal)?)))
        }
        #[cfg(not(feature = "cuda"))]
        {
            Err(KernelError::NotCompiledWithCuda { ordinal })
        }
    }

    /// Parses `cpu`, `cuda` (device 0) or `cuda:N`, opening a CUDA device as [`Device::cuda`] does.
    pub fn parse(name: &str) -> Result<Device> {
        match name.trim() {
            "cpu" => Ok(Device::Cpu),
            "cuda" | "gpu" => Device::cuda(0),
            other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(n)) => Device::cuda(n),
                _ => Err(KernelError::UnknownDevice(other.to_string())),
            },
        }
    }

    /// Whether this is a CUDA device.
    pub fn is_cuda(&self) -> bool {
        !matches!(self, Device::Cpu)
    }
}

/// Fused target log-probabilities.
///
/// `hidden` is `tokens × dim` row-major (final hidden states after the last layer norm), `embedding` is
/// `vocab × dim` row-major (the output embedding), `targets` has one vocabulary id per token. Writes
/// `out[t] = log softmax(hidden[t] · embeddingᵀ)[targets[t]]` in nats. Accumulation is in `f32` with a
/// per-token running maximum, so large logits cannot overflow.
pub fn log_prob_targets(
    device: &Device,
    hidden: &[f32],
    embedding: &[f32],
    dim: usize,
    targets: &[u32],
    out: &mut [f32],
) -> Result<()> {
    log_prob_targets_capped(device, hidden, embedding, dim, targets, out, None)
}

/// [`log_prob_targets`] of soft-capped logits: with `softcap = Some(c)` every logit `z` becomes
/// `c · tanh(z / c)` before the softmax (Gemma 2's final soft-capping).
pub fn log_prob_targets_capped(
    device: &Device,
    hidden: &[f32],
    embedding: &[f32],
    dim: usize,
    targets: &[u32],
    out: &mut [f32],
    softcap: Option<f32>,
) -> Result<()> {
    let vocab =
        check_output_call(hidden, (dim, || embedding_vocab(embedding, dim)), targets, Some(out.len()), softcap)?;
    match device {
        Device::Cpu => cpu::log_prob_targets(hidden, embedding, (dim, vocab), targets, out, softcap),
        #[cfg(feature = "cuda")]
        Device::Cuda(g) => cuda::host::log_prob_targets(&g.0, hidden, (embedding, dim, softcap), targets, out, None),
    }
}

/// Per row of `hidden` (`rows × dim`, row-major): `log Σ_v exp(hidden Eᵀ)_v` and the logit of the row's
/// target, on the calling thread (for callers that parallelise over row blocks, such as a fused backward
/// pass). The vocabulary is streamed in tiles through an online log-sum-exp, so no `rows × vocab` buffer
/// exists; [`log_prob_targets`] is `target_logit − lse` of this, split across threads.
pub fn log_sum_exp_rows(
    device: &Device,
    hidden: &[f32],
    embedding: &[f32],
    dim: usize,
    targets: &[u32],
) -> Result<(Vec<f32>, Vec<f32>)> {
    log_sum_exp_rows_capped(device, hidden, embedding, dim, targets, None)
}

/// [`log_sum_exp_rows`] of soft-capped logits (`c · tanh(z / c)`, see [`log_prob_targets_capped`]):
/// both the log-sum-exp and the target's logit are of the capped logits.
pub fn log_sum_exp_rows_capped(
    device: &Device,
    hidden: &[f32],
    embedding: &[f32],
    dim: usize,
    targets: &[u32],
    softcap: Option<f32>,
) -> Result<(Vec<f32>, Vec<f32>)> {
    let vocab = check_output_call(hidden, (dim, || embedding_vocab(embedding, dim)), targets, None, softcap)?;
    match device {
        Device::Cpu => cpu::log_sum_exp_block(hidden, embedding, (dim, vocab), targets, softcap),
        #[cfg(feature = "cuda")]
        Device::Cuda(g) => {
            let mut lp = vec![0.0f32; targets.len()];
            let mut lse = vec![0.0f32; targets.len()];
            cuda::host::log_prob_targets(&g.0, hidden, (embedding, dim, softcap), targets, &mut lp, Some(&mut lse))?;
            let target = lp.iter().zip(&lse).map(|(p, l)| p + l).collect();
            Ok((lse, target))
        }
    }
}

/// The vocabulary of a row-major output embedding of `dim` columns (a non-empty whole number of rows).
fn embedding_vocab(embedding: &[f32], dim: usize) -> Result<usize> {
    if !embedding.len().is_multiple_of(dim) || embedding.is_empty() {
        return Err(KernelError::Shape {
            what: "embedding",
            expected: format!("a non-empty multiple of dim = {dim}"),
            found: embedding.len(),
        });
    }
    Ok(embedding.len() / dim)
}

/// What every fused output-layer call checks, in this order: a valid soft-cap, a positive `dim`,
/// `hidden` of `targets × dim` values, an output (when it has one) of one value per target, the
/// embedding (`vocab`, which gives its vocabulary), every target inside that vocabulary. Returns the
/// vocabulary.
fn check_output_call(
    hidden: &[f32],
    (dim, vocab): (usize, impl FnOnce() -> Result<usize>),
    targets: &[u32],
    out: Option<usize>,
    softcap: Option<f32>,
) -> Result<usize> {
    check_softcap(softcap)?;
    if dim == 0 {
        return Err(KernelError::Shape { what: "dim", expected: "at least 1".into(), found: 0 });
    }
    check_len("hidden", hidden.len(), product("hidden", targets.len(), dim)?)?;
    if let Some(out) = out {
        check_len("out", out, targets.len())?;
    }
    let vocab = vocab()?;
    if let Some((position, &id)) = targets.iter().enumerate().find(|(_, t)| **t as usize >= vocab) {
        return Err(KernelError::Target { position, id, vocab });
    }
    Ok(vocab)
}

/// A soft-cap must be a positive finite number.
fn check_softcap(softcap: Option<f32>) -> Result<()> {
    match softcap {
        Some(c) if !(c.is_finite() && c > 0.0) => Err(KernelError::Unsupported {
            what: "logit soft-cap",
            message: format!("must be a positive finite number, found {c}"),
        }),
        _ => Ok(()),
    }
}

/// A set of low-rank steers `W = Σ_i s_i P1_i P2_iᵀ` (`P1`, `P2`: `steers × dim × rank`, row-major).
#[derive(Debug, Clone, Copy)]
pub struct Steers<'a> {
    /// `P1`, `steers × dim × rank`.
    pub p1: &'a [f32],
    /// `P2`, `steers × dim × rank`.
    pub p2: &'a [f32],
    /// Number of steers.
    pub steers: usize,
    /// Hidden size.
    pub dim: usize,
    /// Rank of each steer.
    pub rank: usize,
}

/// LM-Steer's projection `c' = c + ε Σ_i s_i (c P1_i) P2_iᵀ` for every row `c` of `hidden`
/// (`tokens × dim`), written to `out`.
pub fn steered_projection(
    device: &Device,
    hidden: &[f32],
    steers: &Steers<'_>,
    strengths: &[f32],
    epsilon: f32,
    out: &mut [f32],
) -> Result<()> {
    let Steers { p1, p2, steers: s, dim: d, rank: r } = *steers;
    if d == 0 {
        return Err(KernelError::Shape { what: "dim", expected: "at least 1".into(), found: 0 });
    }
    let per = product("p1", s, product("p1", d, r)?)?;
    check_len("p1", p1.len(), per)?;
    check_len("p2", p2.len(), per)?;
    check_len("strengths", strengths.len(), s)?;
    if !hidden.len().is_multiple_of(d) {
        return Err(KernelError::Shape {
            what: "hidden",
            expected: format!("a multiple of dim = {d}"),
            found: hidden.len(),
        });
    }
    check_len("out", out.len(), hidden.len())?;
    match device {
        Device::Cpu => cpu::steered_projection(hidden, steers, strengths, epsilon, out),
        #[cfg(feature = "cuda")]
        Device::Cuda(g) => cuda::host::steered_projection(&g.0, hidden, steers, strengths, epsilon, out)?,
    }
    Ok(())
}

/// [`log_prob_targets`] with the output embedding packed in bf16 ([`PackedBf16`], `vocab × dim`): the
/// hidden states are rounded to bf16 for the logit products, which accumulate in f32; the
/// log-sum-exp is f32. On the CPU, on the kernels [`cpu_kernels`] selects.
pub fn log_prob_targets_bf16(
    hidden: &[f32],
    embedding: &PackedBf16,
    targets: &[u32],
    out: &mut [f32],
    softcap: Option<f32>,
) -> Result<()> {
    check_output_call(hidden, (embedding.k(), || Ok(embedding.n())), targets, Some(out.len()), softcap)?;
    cpu::log_prob_targets_bf16(hidden, embedding, targets, out, softcap)
}

/// [`log_prob_targets`] with the output embedding packed in f32 panels ([`PackedF32`], `vocab × dim`):
/// each block's hidden states are packed once for all vocabulary tiles. On the CPU, on the kernels
/// [`cpu_kernels`] selects.
pub fn log_prob_targets_f32(
    hidden: &[f32],
    embedding: &PackedF32,
    targets: &[u32],
    out: &mut [f32],
    softcap: Option<f32>,
) -> Result<()> {
    check_output_call(hidden, (embedding.k(), || Ok(embedding.n())), targets, Some(out.len()), softcap)?;
    cpu::log_prob_targets_f32(hidden, embedding, targets, out, softcap)
}

/// `out (m×n) = a (m×k) · b (k×n)`, row-major `f32`.
pub fn matmul(device: &Device, a: &[f32], b: &[f32], m: usize, k: usize, n: usize, out: &mut [f32]) -> Result<()> {
    check_len("a", a.len(), product("a", m, k)?)?;
    check_len("b", b.len(), product("b", k, n)?)?;
    check_len("out", out.len(), product("out", m, n)?)?;
    match device {
        Device::Cpu => native::par_gemm(m, k, n, a, b, false, out),
        #[cfg(feature = "cuda")]
        Device::Cuda(g) => cuda::host::matmul(&g.0, a, b, (m, k, n), false, out),
    }
}

/// `out (m×n) = a (m×k) · bᵀ` with `b` stored `n×k` row-major (PyTorch `Linear` weights), `f32`.
pub fn matmul_transposed(
    device: &Device,
    a: &[f32],
    b: &[f32],
    m: usize,
    k: usize,
    n: usize,
    out: &mut [f32],
) -> Result<()> {
    check_len("a", a.len(), product("a", m, k)?)?;
    check_len("b", b.len(), product("b", n, k)?)?;
    check_len("out", out.len(), product("out", m, n)?)?;
    match device {
        Device::Cpu => native::par_gemm(m, k, n, a, b, true, out),
        #[cfg(feature = "cuda")]
        Device::Cuda(g) => cuda::host::matmul(&g.0, a, b, (m, k, n), true, out),
    }
}

/// An `n × k` `f32` matrix (row-major) kept where `device` computes, for repeated
/// [`ResidentMatrix::matmul_transposed`] calls: on a CUDA device it is uploaded once, not per call
/// (e.g. the output embedding of a decoding loop); on the CPU it borrows the slice.
#[derive(Debug)]
pub enum ResidentMatrix<'a> {
    /// Host memory, products on the CPU.
    Host {
        /// The matrix.
        b: &'a [f32],
        /// Rows.
        n: usize,
        /// Columns.
        k: usize,
    },
    /// Uploaded to a CUDA device (feature `cuda`).
    #[cfg(feature = "cuda")]
    Cuda {
        /// The device.
        gpu: std::sync::Arc<cuda::Gpu>,
        /// The matrix on the device.
        b: cuda::DevBuf,
        /// Rows.
        n: usize,
        /// Columns.
        k: usize,
    },
}

impl<'a> ResidentMatrix<'a> {
    /// `b` (`n × k`, row-major) on `device`.
    pub fn new(device: &Device, b: &'a [f32], n: usize, k: usize) -> Result<Self> {
        check_len("b", b.len(), product("b", n, k)?)?;
        match device {
            Device::Cpu => Ok(ResidentMatrix::Host { b, n, k }),
            #[cfg(feature = "cuda")]
            Device::Cuda(g) => Ok(ResidentMatrix::Cuda { gpu: g.0.clone(), b: g.0.upload_f32(b)?, n, k }),
        }
    }

    /// `out (m×n) = a (m×k) · bᵀ`, as [`matmul_transposed`] computes it on the same device.
    pub fn matmul_transposed(&self, a: &[f32], m: usize, out: &mut [f32]) -> Result<()> {
        match self {
            ResidentMatrix::Host { b, n, k } => matmul_transposed(&Device::Cpu, a, b, m, *k, *n, out),
            #[cfg(feature = "cuda")]
            ResidentMatrix::Cuda { gpu, b, n, k } => {
                check_len("a", a.len(), product("a", m, *k)?)?;
                check_len("out", out.len(), product("out", m, *n)?)?;
                let da = gpu.upload_f32(a)?;
                let c = gpu.alloc(cuda::DType::F32, m * n)?;
                gpu.matmul((m, *k, *n), da.view(), false, b.view(), true, c.view(), 1.0, 0.0)?;
                out.copy_from_slice(&gpu.download_f32(c.view())?);
                Ok(())
            }
        }
    }
}

/// A read-only strided `f32` matrix view: element `(i, j)` is `data[i·rs + j·cs]`.
#[derive(Debug, Clone, Copy)]
pub struct MatRef<'a> {
    /// The backing slice.
    pub data: &'a [f32],
    /// Row stride.
    pub rs: usize,
    /// Column stride.
    pub cs: usize,
}

impl<'a> MatRef<'a> {
    /// A row-major view with `cols` columns.
    pub fn row_major(data: &'a [f32], cols: usize) -> Self {
        Self { data, rs: cols, cs: 1 }
    }
    /// The transpose of this view (no copy).
    pub fn t(self) -> Self {
        Self { data: self.data, rs: self.cs, cs: self.rs }
    }
}

/// A writable strided `f32` matrix view: element `(i, j)` is `data[i·rs + j·cs]`.
#[derive(Debug)]
pub struct MatMut<'a> {
    /// The backing slice.
    pub data: &'a mut [f32],
    /// Row stride.
    pub rs: usize,
    /// Column stride.
    pub cs: usize,
}

impl<'a> MatMut<'a> {
    /// A row-major view with `cols` columns.
    pub fn row_major(data: &'a mut [f32], cols: usize) -> Self {
        Self { data, rs: cols, cs: 1 }
    }
}

/// `C (m×n) = A (m×k) · B (k×n) + β·C` on strided views, on the calling thread (for callers that
/// parallelise above it, such as attention over heads). Shapes and strides are checked with
/// overflow-checked arithmetic against the slices. Strided host views are a CPU-side helper: on a
/// CUDA device this runs on the CPU too.
pub fn matmul_strided(
    device: &Device,
    (m, k, n): (usize, usize, usize),
    a: MatRef<'_>,
    b: MatRef<'_>,
    beta: f32,
    c: MatMut<'_>,
) -> Result<()> {
    match device {
        Device::Cpu => native::gemm(m, k, n, a, b, beta, c),
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => native::gemm(m, k, n, a, b, beta, c),
    }
}

/// `m · n` with overflow reported as [`KernelError::Overflow`].
fn product(what: &'static str, rows: usize, cols: usize) -> Result<usize> {
    rows.checked_mul(cols).ok_or(KernelError::Overflow { what, rows, cols })
}

fn check_len(what: &'static str, found: usize, expected: usize) -> Result<()> {
    if found == expected { Ok(()) } else { Err(KernelError::Shape { what, expected: expected.to_string(), found }) }
}
