//! The CUDA backend (feature `cuda`): hand-written kernels compiled once per process by NVRTC
//! (`kernels.cu`), cuBLAS for the matrix products (tensor cores for `f16`/`bf16` inputs, `f32`
//! accumulation; plain `f32` products without TF32, so `f32` weights give the CPU path's numbers).
//!
//! This is the crate's second module with `unsafe` code (beside `native.rs`): launching kernels and
//! calling cuBLAS on raw device pointers. Every public operation checks its buffers' lengths against
//! the shapes it is given before it launches anything, so a wrong shape is a [`KernelError::Shape`],
//! never an out-of-bounds access on the device.
//!
//! cudarc panics when the CUDA libraries are missing, so [`Gpu::open`] looks for the driver, NVRTC
//! and cuBLAS first and reports what is missing as [`KernelError::CudaUnavailable`].
#![allow(unsafe_code)]

use std::collections::HashMap;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::cublas::{CudaBlas, result as blas, sys as blas_sys};
use cudarc::driver::{CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr, LaunchConfig, PushKernelArg};

use crate::operands::Span;
use crate::{KernelError, Result};

mod steer;
pub use steer::{SteerStepInputs, SteerTrainer};

/// The CUDA C source of every kernel.
pub const SOURCE: &str = include_str!("kernels.cu");

/// The kernels in [`SOURCE`], by entry name.
pub const KERNELS: [&str; 25] = [
    "convert",
    "embed",
    "layer_norm",
    "bias_act",
    "layer_norm_warp",
    "bias_act_vec",
    "residual",
    "qkv_split",
    "causal_softmax",
    "lse_target",
    "lse_target_vec",
    "scale_rows",
    "softmax_grad",
    "flash_hd64_f16",
    "flash_hd64_bf16",
    "flash_hd128_f16",
    "flash_hd128_bf16",
    "flash_tv_hd64_f16",
    "flash_tv_hd64_bf16",
    "flash_tv_hd128_f16",
    "flash_tv_hd128_bf16",
    "flash2_hd64_f16",
    "flash2_hd64_bf16",
    "flash2_hd128_f16",
    "flash2_hd128_bf16",
];

/// Threads per block of the row kernels.
const BLOCK: u32 = 256;
/// Query rows per attention tile: scores exist for one tile at a time (`heads × tile × keys`).
pub const QUERY_TILE: usize = 256;
/// Default rows per chunk of the fused output layer: logits exist for one chunk at a time.
pub const OUTPUT_CHUNK: usize = 512;

/// Element type of a device buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    /// 32-bit float.
    F32,
    /// IEEE half.
    F16,
    /// bfloat16.
    Bf16,
    /// 32-bit unsigned integer (token ids, positions).
    U32,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F16 | DType::Bf16 => 2,
            DType::F32 | DType::U32 => 4,
        }
    }
    fn code(self) -> i32 {
        match self {
            DType::F32 | DType::U32 => 0,
            DType::F16 => 1,
            DType::Bf16 => 2,
        }
    }
    fn blas(self) -> blas_sys::cudaDataType {
        match self {
            DType::F16 => blas_sys::cudaDataType::CUDA_R_16F,
            DType::Bf16 => blas_sys::cudaDataType::CUDA_R_16BF,
            DType::F32 | DType::U32 => blas_sys::cudaDataType::CUDA_R_32F,
        }
    }
    fn is_float(self) -> bool {
        self != DType::U32
    }
}

/// A typed window into device memory: a pointer, an element type and a length. Views are checked
/// against the shapes of every operation they are passed to.
#[derive(Debug, Clone, Copy)]
pub struct View<'a> {
    ptr: u64,
    dtype: DType,
    len: usize,
    /// Ordinal of the device the memory lives on.
    device: usize,
    /// Borrows the [`DevBuf`] it points into, so a view cannot outlive its buffer.
    _buf: PhantomData<&'a DevBuf>,
}

impl<'a> View<'a> {
    /// Element type.
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    /// Elements.
    pub fn len(&self) -> usize {
        self.len
    }
    /// Whether it holds no element.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Elements `start..start + len`.
    pub fn slice(&self, start: usize, len: usize) -> Result<View<'a>> {
        match start.checked_add(len) {
            Some(end) if end <= self.len => Ok(View {
                ptr: self.ptr + (start * self.dtype.size()) as u64,
                dtype: self.dtype,
                len,
                device: self.device,
                _buf: PhantomData,
            }),
            _ => Err(KernelError::Shape {
                what: "device view",
                expected: format!("elements {start}..{start}+{len} inside {}", self.len),
                found: self.len,
            }),
        }
    }
    /// Ordinal of the device the memory lives on.
    pub fn device(&self) -> usize {
        self.device
    }
    /// The byte range `[start, end)` it covers.
    fn bytes(&self) -> (u64, u64) {
        (self.ptr, self.ptr + (self.len * self.dtype.size()) as u64)
    }
    fn need(&self, what: &'static str, n: usize) -> Result<()> {
        if self.len < n {
            return Err(KernelError::Shape { what, expected: format!("at least {n}"), found: self.len });
        }
        Ok(())
    }
    fn need_type(&self, what: &'static str, ok: &[DType]) -> Result<()> {
        if !ok.contains(&self.dtype) {
            return Err(KernelError::Unsupported {
                what,
                message: format!("element type {:?}, expected one of {ok:?}", self.dtype),
            });
        }
        Ok(())
    }
}

/// Checks the operands of one operation on device `device` ([`crate::operands::check`]).
fn check_operands(
    device: usize,
    op: &'static str,
    inputs: &[(&'static str, View<'_>)],
    outputs: &[(&'static str, View<'_>)],
    in_place: bool,
) -> Result<()> {
    let spans = |v: &[(&'static str, View<'_>)]| -> Vec<(&'static str, Span)> {
        v.iter()
            .map(|&(what, x)| {
                let (start, end) = x.bytes();
                (what, Span { device: x.device, start, end })
            })
            .collect()
    };
    crate::operands::check(device, op, &spans(inputs), &spans(outputs), in_place)
}

/// Bytes of device memory in use and at most, over this process's [`DevBuf`]s on one device.
#[derive(Debug, Default)]
struct MemCounter {
    current: AtomicUsize,
    peak: AtomicUsize,
}

/// An owned device buffer (freed, stream-ordered, on drop).
#[derive(Debug)]
pub struct DevBuf {
    _slice: CudaSlice<u8>,
    ptr: u64,
    dtype: DType,
    len: usize,
    device: usize,
    mem: Arc<MemCounter>,
}

impl DevBuf {
    /// The whole buffer.
    pub fn view(&self) -> View<'_> {
        View { ptr: self.ptr, dtype: self.dtype, len: self.len, device: self.device, _buf: PhantomData }
    }
    /// Elements.
    pub fn len(&self) -> usize {
        self.len
    }
    /// Whether it holds no element.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for DevBuf {
    fn drop(&mut self) {
        self.mem.current.fetch_sub(self.len * self.dtype.size(), Ordering::Relaxed);
    }
}

/// A weight matrix for `y = x Wᵀ` with `x` of `inputs` columns and `y` of `outputs` columns.
#[derive(Debug, Clone, Copy)]
pub struct Linear<'a> {
    /// The stored values.
    pub w: View<'a>,
    /// Output features.
    pub outputs: usize,
    /// Input features.
    pub inputs: usize,
    /// `false`: stored `outputs × inputs` row-major (PyTorch `Linear`); `true`: `inputs × outputs`
    /// (GPT-2's `Conv1D`).
    pub inputs_major: bool,
}

/// How [`Gpu::attention_with`] computes causal attention.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Attention {
    /// The fused kernel for f16/bf16 heads of 64 dimensions (where it is the faster one), else the
    /// tiled products.
    #[default]
    Auto,
    /// The fused flash-attention kernel.
    Fused,
    /// The fused kernel with V transposed on its way into shared memory instead of read by
    /// `ldmatrix.trans` (the first version, kept for comparison).
    FusedTransposedV,
    /// The fused kernel organised as FlashAttention-2 is: double-buffered `cp.async` K/V tiles,
    /// 128-query blocks at heads of 64, `ldmatrix` for K, masking only on diagonal tiles, the longest
    /// query blocks launched first. Same sizes and types as [`Attention::Fused`]; written without a
    /// GPU at hand, so [`Attention::Auto`] does not take it until `scripts/gpu-check.sh` has measured
    /// its parity and speed.
    Pipelined,
    /// cuBLAS products over query tiles with a softmax kernel between them.
    Tiled,
}

/// A matrix operand of [`Gpu::gemm`], column-major as cuBLAS sees it.
#[derive(Debug, Clone, Copy)]
struct Operand<'a> {
    v: View<'a>,
    trans: bool,
    ld: usize,
    stride: usize,
}

/// One CUDA device: a context, one stream, a cuBLAS handle and the compiled kernels.
pub struct Gpu {
    ordinal: usize,
    name: String,
    capability: (i32, i32),
    _ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    /// Runs the output layer's row kernels beside the products on `stream` (ordered by events).
    side: Arc<CudaStream>,
    blas: Mutex<CudaBlas>,
    funcs: HashMap<&'static str, CudaFunction>,
    mem: Arc<MemCounter>,
    /// Whether [`Gpu::layer_norm`] and [`Gpu::bias_act`] take their vectorised kernels where the
    /// shapes allow ([`Gpu::set_vectorised`]).
    vectorised: AtomicBool,
}

impl std::fmt::Debug for Gpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Gpu({}: {}, sm_{}{})", self.ordinal, self.name, self.capability.0, self.capability.1)
    }
}

/// Side-stream work still to be waited for by the main stream (see [`Gpu::log_prob_targets`]).
struct SideWork<'a> {
    stream: &'a CudaStream,
    done: [Option<cudarc::driver::CudaEvent>; 2],
}

impl Drop for SideWork<'_> {
    fn drop(&mut self) {
        for d in self.done.iter_mut().filter_map(Option::take) {
            // Best effort on an error path: the error being returned is the one to report.
            let _ = self.stream.wait(&d);
        }
    }
}

/// An argument of a kernel launch.
enum Arg {
    P(u64),
    I(i32),
    L(i64),
    F(f32),
}

fn cuda_err(op: &'static str, e: impl std::fmt::Display) -> KernelError {
    KernelError::Cuda { op, message: e.to_string() }
}

fn unavailable(ordinal: usize, reason: impl Into<String>) -> KernelError {
    KernelError::CudaUnavailable { ordinal, reason: reason.into() }
}

/// Whether the NVRTC library can be loaded (no GPU needed).
pub fn nvrtc_present() -> bool {
    // SAFETY: only tries to open the shared library by its candidate names.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// Compiles [`SOURCE`] with NVRTC for `arch` (e.g. `compute_90`) and returns the PTX, checking that
/// every kernel of [`KERNELS`] is in it. Needs the NVRTC library, not a GPU.
pub fn compile(arch: &str) -> Result<String> {
    if !nvrtc_present() {
        return Err(unavailable(0, "the NVRTC library (libnvrtc.so.13) is not on the library path"));
    }
    let opts = cudarc::nvrtc::CompileOptions {
        options: vec![format!("--gpu-architecture={arch}"), "--std=c++17".into()],
        name: Some("memsteer_kernels.cu".into()),
        ..Default::default()
    };
    let ptx = cudarc::nvrtc::compile_ptx_with_opts(SOURCE, opts).map_err(|e| {
        let message = match &e {
            cudarc::nvrtc::CompileError::CompileError { log, .. } => log.to_string_lossy().into_owned(),
            other => format!("{other:?}"),
        };
        KernelError::Cuda { op: "NVRTC compile", message }
    })?;
    let text = ptx.to_src();
    for k in KERNELS {
        if !text.contains(&format!(".entry {k}(")) {
            return Err(KernelError::Cuda {
                op: "NVRTC compile",
                message: format!("kernel `{k}` missing from the PTX"),
            });
        }
    }
    Ok(text)
}

static GPUS: OnceLock<Mutex<HashMap<usize, Arc<Gpu>>>> = OnceLock::new();

impl Gpu {
    /// The device `ordinal`, opened once per process (context, stream, cuBLAS, kernels compiled by
    /// NVRTC) and shared afterwards. Missing libraries, no driver or no such device are
    /// [`KernelError::CudaUnavailable`] naming what is missing.
    pub fn open(ordinal: usize) -> Result<Arc<Gpu>> {
        let cache = GPUS.get_or_init(Default::default);
        let mut map = cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(g) = map.get(&ordinal) {
            return Ok(g.clone());
        }
        let g = Arc::new(Self::create(ordinal)?);
        map.insert(ordinal, g.clone());
        Ok(g)
    }

    fn create(ordinal: usize) -> Result<Gpu> {
        // SAFETY: each only tries to open a shared library by its candidate names.
        let (driver, cublas) =
            unsafe { (cudarc::driver::sys::is_culib_present(), cudarc::cublas::sys::is_culib_present()) };
        if !driver {
            return Err(unavailable(ordinal, "no CUDA driver (libcuda.so) found: is an NVIDIA driver installed?"));
        }
        if !nvrtc_present() {
            return Err(unavailable(ordinal, "the NVRTC library (libnvrtc.so.13, CUDA 13) is not on the library path"));
        }
        if !cublas {
            return Err(unavailable(
                ordinal,
                "the cuBLAS library (libcublas.so.13, CUDA 13) is not on the library path",
            ));
        }
        cudarc::driver::result::init()
            .map_err(|e| unavailable(ordinal, format!("the CUDA driver did not start: {e}")))?;
        let mut version = 0i32;
        // SAFETY: the driver library is loaded and initialised; the call writes one integer.
        unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut version) }
            .result()
            .map_err(|e| unavailable(ordinal, format!("driver version: {e}")))?;
        if version < 13_000 {
            return Err(unavailable(
                ordinal,
                format!(
                    "the driver supports CUDA {}.{}; memsteer's kernels need CUDA 13 (driver 580 or newer)",
                    version / 1000,
                    version % 1000 / 10
                ),
            ));
        }
        let count = CudaContext::device_count().map_err(|e| unavailable(ordinal, e.to_string()))?;
        if ordinal >= count.max(0) as usize {
            return Err(unavailable(ordinal, format!("this machine has {count} CUDA device(s)")));
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| unavailable(ordinal, e.to_string()))?;
        // Buffers are allocated, used and freed on `stream`; the one exception, the output layer's
        // side stream, is ordered by explicit events (`log_prob_targets`, `SideWork`).
        // SAFETY: so cudarc's per-buffer event tracking is not needed.
        unsafe { ctx.disable_event_tracking() };
        let name = ctx.name().map_err(|e| cuda_err("device name", e))?;
        let capability = ctx.compute_capability().map_err(|e| cuda_err("compute capability", e))?;
        let stream = ctx.new_stream().map_err(|e| cuda_err("stream", e))?;
        let side = ctx.new_stream().map_err(|e| cuda_err("stream", e))?;
        let blas = CudaBlas::new(stream.clone()).map_err(|e| cuda_err("cuBLAS handle", e))?;
        let ptx = compile(&format!("compute_{}{}", capability.0, capability.1))?;
        let module = ctx.load_module(cudarc::nvrtc::Ptx::from_src(ptx)).map_err(|e| cuda_err("module load", e))?;
        let mut funcs = HashMap::new();
        for k in KERNELS {
            funcs.insert(k, module.load_function(k).map_err(|e| cuda_err("kernel lookup", e))?);
        }
        Ok(Gpu {
            ordinal,
            name,
            capability,
            _ctx: ctx,
            stream,
            side,
            blas: Mutex::new(blas),
            funcs,
            mem: Default::default(),
            vectorised: AtomicBool::new(false),
        })
    }

    /// Device ordinal.
    pub fn ordinal(&self) -> usize {
        self.ordinal
    }
    /// Device name (e.g. "NVIDIA H200").
    pub fn name(&self) -> &str {
        &self.name
    }
    /// Bytes held by this backend's buffers now, and at most since the last [`Gpu::reset_peak`].
    pub fn memory(&self) -> (usize, usize) {
        (self.mem.current.load(Ordering::Relaxed), self.mem.peak.load(Ordering::Relaxed))
    }
    /// Restarts the peak of [`Gpu::memory`] from the current use.
    pub fn reset_peak(&self) {
        self.mem.peak.store(self.mem.current.load(Ordering::Relaxed), Ordering::Relaxed);
    }
    /// Whether [`Gpu::layer_norm`] and [`Gpu::bias_act`] use their vectorised kernels (one warp per
    /// row with 16-byte loads; 8 half-precision values per thread) where the shapes and alignments
    /// allow, for every user of this device in the process. Off by default: written without a GPU at
    /// hand, they stay opt-in until `scripts/gpu-check.sh` has measured their parity and speed.
    pub fn set_vectorised(&self, on: bool) {
        self.vectorised.store(on, Ordering::Relaxed);
    }

    /// Waits for every queued operation.
    pub fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().map_err(|e| cuda_err("synchronize", e))
    }

    /// An uninitialised buffer of `len` elements (every operation of this module writes its outputs
    /// in full before anything reads them).
    pub fn alloc(&self, dtype: DType, len: usize) -> Result<DevBuf> {
        let bytes = len.checked_mul(dtype.size()).ok_or(KernelError::Overflow {
            what: "device buffer",
            rows: len,
            cols: dtype.size(),
        })?;
        // SAFETY: the memory is uninitialised; see the doc comment.
        let slice = unsafe { self.stream.alloc::<u8>(bytes.max(1)) }
            .map_err(|e| cuda_err("allocate", format!("{bytes} bytes: {e}")))?;
        let ptr = slice.device_ptr(&self.stream).0;
        let now = self.mem.current.fetch_add(bytes, Ordering::Relaxed) + bytes;
        self.mem.peak.fetch_max(now, Ordering::Relaxed);
        Ok(DevBuf { _slice: slice, ptr, dtype, len, device: self.ordinal, mem: self.mem.clone() })
    }

    /// Copies raw little-endian `bytes` of `dtype` elements to the device.
    pub fn upload_bytes(&self, dtype: DType, bytes: &[u8]) -> Result<DevBuf> {
        if !bytes.len().is_multiple_of(dtype.size()) {
            return Err(KernelError::Shape {
                what: "upload",
                expected: format!("a multiple of {} bytes", dtype.size()),
                found: bytes.len(),
            });
        }
        let mut buf = self.alloc(dtype, bytes.len() / dtype.size())?;
        self.stream.memcpy_htod(bytes, &mut buf._slice).map_err(|e| cuda_err("copy to device", e))?;
        Ok(buf)
    }
    /// Copies `f32` values to the device.
    pub fn upload_f32(&self, data: &[f32]) -> Result<DevBuf> {
        let bytes: Vec<u8> = data.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.upload_bytes(DType::F32, &bytes)
    }
    /// Copies `u32` values to the device.
    pub fn upload_u32(&self, data: &[u32]) -> Result<DevBuf> {
        let bytes: Vec<u8> = data.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.upload_bytes(DType::U32, &bytes)
    }
    /// Copies an `f32` view to the host.
    pub fn download_f32(&self, v: View<'_>) -> Result<Vec<f32>> {
        check_operands(self.ordinal, "download", &[("source", v)], &[], false)?;
        v.need_type("download", &[DType::F32])?;
        let mut bytes = vec![0u8; v.len * 4];
        // SAFETY: `v` lies inside a live allocation of this device (views are only made by this
        // module, bounds-checked), and the copy is synchronous.
        unsafe {
            cudarc::driver::result::memcpy_dtoh_async(&mut bytes, v.ptr, self.stream.cu_stream())
                .map_err(|e| cuda_err("copy to host", e))?;
        }
        self.synchronize()?;
        Ok(bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect())
    }

    fn launch(&self, name: &'static str, grid: (u32, u32, u32), block: u32, args: &[Arg]) -> Result<()> {
        self.launch_on(&self.stream, name, grid, block, args)
    }

    fn launch_on(
        &self,
        stream: &CudaStream,
        name: &'static str,
        grid: (u32, u32, u32),
        block: u32,
        args: &[Arg],
    ) -> Result<()> {
        if grid.0 == 0 || grid.1 == 0 || grid.2 == 0 {
            return Ok(());
        }
        let f = &self.funcs[name];
        let mut b = stream.launch_builder(f);
        for a in args {
            match a {
                Arg::P(p) => b.arg(p),
                Arg::I(i) => b.arg(i),
                Arg::L(l) => b.arg(l),
                Arg::F(x) => b.arg(x),
            };
        }
        let cfg = LaunchConfig { grid_dim: grid, block_dim: (block, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: the argument list matches the kernel's signature in kernels.cu, and the caller
        // checked every pointer's extent against the sizes it passes.
        unsafe { b.launch(cfg) }.map(|_| ()).map_err(|e| cuda_err(name, e))
    }

    fn grid_for(n: usize) -> (u32, u32, u32) {
        (n.div_ceil(BLOCK as usize).clamp(1, 65_535 * 8) as u32, 1, 1)
    }

    /// Column-major `C = α op(A) op(B) + β C` for `batch` matrices (cuBLAS `GemmStridedBatchedEx`,
    /// `f32` accumulation). Shapes are checked here against the views.
    #[allow(clippy::too_many_arguments)]
    fn gemm(
        &self,
        (m, n, k): (usize, usize, usize),
        a: Operand<'_>,
        b: Operand<'_>,
        c: Operand<'_>,
        batch: usize,
        alpha: f32,
        beta: f32,
    ) -> Result<()> {
        if m == 0 || n == 0 || batch == 0 {
            return Ok(());
        }
        // Extent of a column-major operand: the last element of the last batch.
        let extent = |o: &Operand<'_>, rows: usize, cols: usize| -> Option<usize> {
            let (r, c) = if o.trans { (cols, rows) } else { (rows, cols) };
            if o.ld < r.max(1) {
                return None;
            }
            (batch - 1).checked_mul(o.stride)?.checked_add((c.max(1) - 1).checked_mul(o.ld)?)?.checked_add(r)
        };
        for (what, o, rows, cols) in [("gemm A", &a, m, k), ("gemm B", &b, k, n), ("gemm C", &c, m, n)] {
            let need = extent(o, rows, cols).ok_or(KernelError::Overflow { what, rows, cols })?;
            o.v.need(what, need)?;
            if !o.v.dtype.is_float() {
                return Err(KernelError::Shape { what, expected: "a float type".into(), found: o.v.len });
            }
        }
        let int = |x: usize, what: &'static str| -> Result<i32> {
            i32::try_from(x).map_err(|_| KernelError::Overflow { what, rows: x, cols: 1 })
        };
        let op = |t: bool| {
            if t { blas_sys::cublasOperation_t::CUBLAS_OP_T } else { blas_sys::cublasOperation_t::CUBLAS_OP_N }
        };
        let blas_h = self.blas.lock().unwrap_or_else(|e| e.into_inner());
        // SAFETY: extents checked above; α and β are host scalars (the handle's default pointer mode).
        unsafe {
            blas::gemm_strided_batched_ex(
                *blas_h.handle(),
                op(a.trans),
                op(b.trans),
                int(m, "gemm m")?,
                int(n, "gemm n")?,
                int(k, "gemm k")?,
                (&alpha) as *const f32 as *const _,
                a.v.ptr as *const _,
                a.v.dtype.blas(),
                int(a.ld, "gemm lda")?,
                a.stride as i64,
                b.v.ptr as *const _,
                b.v.dtype.blas(),
                int(b.ld, "gemm ldb")?,
                b.stride as i64,
                (&beta) as *const f32 as *const _,
                c.v.ptr as *mut _,
                c.v.dtype.blas(),
                int(c.ld, "gemm ldc")?,
                c.stride as i64,
                int(batch, "gemm batch")?,
                blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| cuda_err("cuBLAS gemm", e))
    }

    /// Row-major `C (m × n) = α A (m × k) · B (k × n) + β C`, where `a_t` / `b_t` say that `A` is
    /// stored `k × m` / `B` stored `n × k` (each row-major) instead.
    #[allow(clippy::too_many_arguments)]
    pub fn matmul(
        &self,
        (m, k, n): (usize, usize, usize),
        a: View<'_>,
        a_t: bool,
        b: View<'_>,
        b_t: bool,
        c: View<'_>,
        alpha: f32,
        beta: f32,
    ) -> Result<()> {
        check_operands(self.ordinal, "matmul", &[("A", a), ("B", b)], &[("C", c)], false)?;
        // Row-major C = A B is column-major Cᵀ = Bᵀ Aᵀ.
        let bo = Operand { v: b, trans: b_t, ld: if b_t { k } else { n }, stride: 0 };
        let ao = Operand { v: a, trans: a_t, ld: if a_t { m } else { k }, stride: 0 };
        self.gemm((n, m, k), bo, ao, Operand { v: c, trans: false, ld: n, stride: 0 }, 1, alpha, beta)
    }

    /// `y (rows × outputs) = x (rows × inputs) · Wᵀ`; `x` must have the weight's element type, `y` is
    /// `f32` or the weight's type (accumulation is `f32` either way).
    pub fn linear(&self, x: View<'_>, w: &Linear<'_>, y: View<'_>, rows: usize) -> Result<()> {
        if x.dtype != w.w.dtype {
            return Err(KernelError::Shape {
                what: "linear input",
                expected: format!("element type {:?} (the weight's)", w.w.dtype),
                found: x.len,
            });
        }
        y.need_type("linear output", &[DType::F32, w.w.dtype])?;
        self.matmul((rows, w.inputs, w.outputs), x, false, w.w, !w.inputs_major, y, 1.0, 0.0)
    }

    /// `y = x` for `n` values, converted from `x`'s float type to `y`'s (round to nearest even).
    pub fn convert(&self, x: View<'_>, y: View<'_>, n: usize) -> Result<()> {
        check_operands(self.ordinal, "convert", &[("input", x)], &[("output", y)], false)?;
        x.need("convert input", n)?;
        y.need("convert output", n)?;
        if !x.dtype.is_float() || !y.dtype.is_float() {
            return Err(KernelError::Shape { what: "convert", expected: "float types".into(), found: n });
        }
        let args = [Arg::P(x.ptr), Arg::I(x.dtype.code()), Arg::P(y.ptr), Arg::I(y.dtype.code()), Arg::L(n as i64)];
        self.launch("convert", Self::grid_for(n), BLOCK, &args)
    }

    /// `x[r] = wte[tok[r]] (+ wpe[pos[r]])`, `d` columns, `f32` output. Token ids and positions must
    /// have been checked against the tables' rows by the caller (they are also checked here against
    /// the tables' sizes on the host copies the caller passes).
    #[allow(clippy::too_many_arguments)]
    pub fn embed(
        &self,
        tok: (&[u32], View<'_>),
        pos: (&[u32], View<'_>),
        wte: View<'_>,
        wpe: Option<View<'_>>,
        x: View<'_>,
        d: usize,
    ) -> Result<()> {
        let mut inputs = vec![("token ids", tok.1), ("positions", pos.1), ("token embedding", wte)];
        inputs.extend(wpe.map(|p| ("position embedding", p)));
        check_operands(self.ordinal, "embed", &inputs, &[("output", x)], false)?;
        let rows = tok.0.len();
        if d == 0 {
            return Err(KernelError::Shape { what: "embed width", expected: "at least 1".into(), found: 0 });
        }
        if pos.0.len() != rows {
            return Err(KernelError::Shape {
                what: "embed positions",
                expected: format!("{rows}"),
                found: pos.0.len(),
            });
        }
        if let Some((position, &id)) = tok.0.iter().enumerate().find(|(_, t)| (**t as usize + 1) * d > wte.len) {
            return Err(KernelError::Target { position, id, vocab: wte.len / d });
        }
        if let Some(p) = wpe {
            if let Some(&bad) = pos.0.iter().find(|q| (**q as usize + 1) * d > p.len) {
                return Err(KernelError::Shape {
                    what: "position",
                    expected: format!("below {}", p.len / d),
                    found: bad as usize,
                });
            }
            if p.dtype != wte.dtype {
                return Err(KernelError::Shape {
                    what: "position table",
                    expected: format!("{:?}", wte.dtype),
                    found: p.len,
                });
            }
        }
        tok.1.need("embed tokens", rows)?;
        pos.1.need("embed positions", rows)?;
        x.need("embed output", rows * d)?;
        x.need_type("embed output", &[DType::F32])?;
        // The kernel bounds ids and positions by the tables too (NaN outside), in case the device
        // copies differ from the host slices checked above.
        let args = [
            Arg::P(tok.1.ptr),
            Arg::P(pos.1.ptr),
            Arg::P(wte.ptr),
            Arg::P(wpe.map_or(0, |p| p.ptr)),
            Arg::I(wte.dtype.code()),
            Arg::P(x.ptr),
            Arg::I(d as i32),
            Arg::L((wte.len / d) as i64),
            Arg::L(wpe.map_or(0, |p| p.len / d) as i64),
        ];
        self.launch("embed", (rows as u32, 1, 1), BLOCK, &args)
    }

    /// Layer norm of `rows` rows of `d` (`x` in `f32`), written in `out`'s type.
    pub fn layer_norm(
        &self,
        x: View<'_>,
        (g, b): (View<'_>, View<'_>),
        eps: f32,
        out: View<'_>,
        rows: usize,
        d: usize,
    ) -> Result<()> {
        check_operands(
            self.ordinal,
            "layer norm",
            &[("input", x), ("weight", g), ("bias", b)],
            &[("output", out)],
            false,
        )?;
        x.need_type("layer norm input", &[DType::F32])?;
        x.need("layer norm input", rows * d)?;
        out.need("layer norm output", rows * d)?;
        g.need("layer norm weight", d)?;
        b.need("layer norm bias", d)?;
        if g.dtype != b.dtype {
            return Err(KernelError::Shape {
                what: "layer norm bias",
                expected: format!("{:?}", g.dtype),
                found: b.len,
            });
        }
        let aligned = x.ptr.is_multiple_of(16) && out.ptr.is_multiple_of(16) && d.is_multiple_of(4);
        if self.vectorised.load(Ordering::Relaxed) && aligned && rows.div_ceil(8) <= i32::MAX as usize {
            let args = [
                Arg::P(x.ptr),
                Arg::P(g.ptr),
                Arg::P(b.ptr),
                Arg::I(g.dtype.code()),
                Arg::P(out.ptr),
                Arg::I(out.dtype.code()),
                Arg::L(rows as i64),
                Arg::I(d as i32),
                Arg::F(eps),
            ];
            // 8 warps per block, one row each.
            return self.launch("layer_norm_warp", (rows.div_ceil(8) as u32, 1, 1), 256, &args);
        }
        let args = [
            Arg::P(x.ptr),
            Arg::P(g.ptr),
            Arg::P(b.ptr),
            Arg::I(g.dtype.code()),
            Arg::P(out.ptr),
            Arg::I(out.dtype.code()),
            Arg::I(d as i32),
            Arg::F(eps),
        ];
        self.launch("layer_norm", (rows as u32, 1, 1), BLOCK, &args)
    }

    fn rows_grid(cols: usize, rows: usize) -> (u32, u32, u32) {
        (cols.div_ceil(BLOCK as usize).max(1) as u32, rows.clamp(1, 32_768) as u32, 1)
    }

    /// `out = act(y + b)` (`act`: 0 none, 1 exact GELU, 2 tanh GELU) over `rows × cols`, `y` of any
    /// float type, in `out`'s type (`out` may be `y`).
    pub fn bias_act(
        &self,
        y: View<'_>,
        b: View<'_>,
        out: View<'_>,
        (rows, cols): (usize, usize),
        act: i32,
    ) -> Result<()> {
        check_operands(self.ordinal, "bias + activation", &[("input", y), ("bias", b)], &[("output", out)], true)?;
        y.need("bias input", rows * cols)?;
        out.need("bias output", rows * cols)?;
        b.need("bias", cols)?;
        let half = matches!(y.dtype, DType::F16 | DType::Bf16) && out.dtype == y.dtype;
        let aligned = y.ptr.is_multiple_of(16) && out.ptr.is_multiple_of(16) && cols.is_multiple_of(8);
        if self.vectorised.load(Ordering::Relaxed) && half && aligned {
            let args = [
                Arg::P(y.ptr),
                Arg::P(b.ptr),
                Arg::I(b.dtype.code()),
                Arg::P(out.ptr),
                Arg::I(y.dtype.code()),
                Arg::L(rows as i64),
                Arg::I(cols as i32),
                Arg::I(act),
            ];
            // 128 threads of 8 columns per block; each thread walks about 8 rows.
            let grid = ((cols / 8).div_ceil(128).max(1) as u32, rows.div_ceil(8).clamp(1, 32_768) as u32, 1);
            return self.launch("bias_act_vec", grid, 128, &args);
        }
        let args = [
            Arg::P(y.ptr),
            Arg::I(y.dtype.code()),
            Arg::P(b.ptr),
            Arg::I(b.dtype.code()),
            Arg::P(out.ptr),
            Arg::I(out.dtype.code()),
            Arg::L(rows as i64),
            Arg::I(cols as i32),
            Arg::I(act),
        ];
        self.launch("bias_act", Self::rows_grid(cols, rows), BLOCK, &args)
    }

    /// `x += a + ba (+ b2 + bb)` over `rows × d` (`x` in `f32`; the branches of one float type; biases
    /// of length `d`, one type).
    pub fn residual(
        &self,
        x: View<'_>,
        (a, ba): (View<'_>, View<'_>),
        second: Option<(View<'_>, View<'_>)>,
        rows: usize,
        d: usize,
    ) -> Result<()> {
        let mut inputs = vec![("branch", a), ("branch bias", ba)];
        if let Some((b2, bb)) = second {
            inputs.extend([("second branch", b2), ("second branch bias", bb)]);
        }
        check_operands(self.ordinal, "residual", &inputs, &[("residual stream", x)], false)?;
        let n = rows * d;
        x.need_type("residual", &[DType::F32])?;
        x.need("residual", n)?;
        a.need("residual branch", n)?;
        ba.need("residual bias", d)?;
        if let Some((b2, bb)) = second {
            b2.need("residual branch", n)?;
            bb.need("residual bias", d)?;
            if bb.dtype != ba.dtype || b2.dtype != a.dtype {
                return Err(KernelError::Shape {
                    what: "residual branch",
                    expected: format!("{:?}", a.dtype),
                    found: b2.len,
                });
            }
        }
        let (p2, pb) = second.map_or((0, 0), |(b2, bb)| (b2.ptr, bb.ptr));
        let args = [
            Arg::P(x.ptr),
            Arg::P(a.ptr),
            Arg::P(ba.ptr),
            Arg::P(p2),
            Arg::P(pb),
            Arg::I(a.dtype.code()),
            Arg::I(ba.dtype.code()),
            Arg::L(rows as i64),
            Arg::I(d as i32),
        ];
        self.launch("residual", Self::rows_grid(d, rows), BLOCK, &args)
    }

    /// Splits the fused QKV projection (`rows × 3d`, any float type) plus `bias` into head-major `q`, `k`, `v`
    /// (`heads × rows × hd` each, their type), rotating the first `rot` dimensions of each q and k
    /// head with the tables `cos`/`sin` (`positions × rot/2`). `neox`: per-head `[q k v]` rows;
    /// otherwise GPT-2's `[q | k | v]`.
    #[allow(clippy::too_many_arguments)]
    pub fn qkv_split(
        &self,
        qkv: View<'_>,
        bias: View<'_>,
        pos: (&[u32], View<'_>),
        rotary: Option<(View<'_>, View<'_>, usize)>,
        neox: bool,
        (q, k, v): (View<'_>, View<'_>, View<'_>),
        (rows, heads, hd): (usize, usize, usize),
    ) -> Result<()> {
        let mut inputs = vec![("qkv", qkv), ("qkv bias", bias), ("positions", pos.1)];
        if let Some((cos, sin, _)) = rotary {
            inputs.extend([("rotary cos", cos), ("rotary sin", sin)]);
        }
        check_operands(self.ordinal, "qkv split", &inputs, &[("q", q), ("k", k), ("v", v)], false)?;
        let d = heads * hd;
        qkv.need("qkv", rows * 3 * d)?;
        bias.need("qkv bias", 3 * d)?;
        pos.1.need("qkv positions", rows)?;
        for (what, o) in [("q", q), ("k", k), ("v", v)] {
            o.need(what, rows * d)?;
            if o.dtype != q.dtype {
                return Err(KernelError::Shape { what, expected: format!("{:?}", q.dtype), found: o.len });
            }
        }
        let (cos, sin, rot) = rotary.map_or((0, 0, 0), |(c, s, r)| (c.ptr, s.ptr, r));
        if let Some((c, s, r)) = rotary {
            if r > hd || r % 2 == 1 {
                return Err(KernelError::Shape {
                    what: "rotary dimensions",
                    expected: format!("even, at most {hd}"),
                    found: r,
                });
            }
            let max = pos.0.iter().copied().max().unwrap_or(0) as usize;
            c.need("rotary cos", (max + 1) * r / 2)?;
            s.need("rotary sin", (max + 1) * r / 2)?;
        }
        let args = [
            Arg::P(qkv.ptr),
            Arg::I(qkv.dtype.code()),
            Arg::P(bias.ptr),
            Arg::I(bias.dtype.code()),
            Arg::P(pos.1.ptr),
            Arg::P(cos),
            Arg::P(sin),
            Arg::I(rot as i32),
            Arg::I(neox as i32),
            Arg::P(q.ptr),
            Arg::P(k.ptr),
            Arg::P(v.ptr),
            Arg::I(q.dtype.code()),
            Arg::L(rows as i64),
            Arg::I(heads as i32),
            Arg::I(hd as i32),
            Arg::L(rotary.map_or(0, |(c, _, r)| if r == 0 { 0 } else { c.len / (r / 2) }) as i64),
        ];
        self.launch("qkv_split", (rows as u32, 1, 1), BLOCK, &args)
    }

    /// Causal attention of packed sequences (`spans`: `(first row, length)` each) over head-major
    /// `q`, `k`, `v` (`heads × rows × hd`), written row-major to `ctx` (`rows × heads·hd`, `ctx`'s type
    /// equal to q's). Tiled by [`QUERY_TILE`] queries: a tile's scores (`heads × tile × keys`, f32)
    /// and probabilities exist one tile at a time, and each tile reaches only the keys it can see.
    #[allow(clippy::too_many_arguments)]
    pub fn attention(
        &self,
        (q, k, v): (View<'_>, View<'_>, View<'_>),
        ctx: View<'_>,
        spans: &[(usize, usize)],
        (rows, heads, hd): (usize, usize, usize),
    ) -> Result<()> {
        self.attention_with(Attention::Auto, (q, k, v), ctx, spans, (rows, heads, hd))
    }

    /// Whether [`Attention::Fused`] runs for these operands on this device: f16 or bf16 heads of 64 or
    /// 128, compute capability 8.0 or above (`mma.sync` m16n8k16).
    pub fn fused_attention_applies(&self, dtype: DType, hd: usize) -> bool {
        matches!(dtype, DType::F16 | DType::Bf16) && matches!(hd, 64 | 128) && self.capability >= (8, 0)
    }

    /// [`Gpu::attention`] with the implementation chosen: [`Attention::Fused`] is the flash-attention
    /// kernel (tensor cores, scores in registers; f16/bf16 heads of 64 or 128 dimensions, an error
    /// otherwise), [`Attention::Tiled`] the cuBLAS products over query tiles with a softmax kernel
    /// between them (any type and head size), [`Attention::Auto`] the fused kernel where it applies.
    pub fn attention_with(
        &self,
        how: Attention,
        (q, k, v): (View<'_>, View<'_>, View<'_>),
        ctx: View<'_>,
        spans: &[(usize, usize)],
        (rows, heads, hd): (usize, usize, usize),
    ) -> Result<()> {
        check_operands(self.ordinal, "attention", &[("q", q), ("k", k), ("v", v)], &[("context", ctx)], false)?;
        let fused = match how {
            Attention::Tiled => false,
            // Measured on an H200 (docs/performance.md): the fused kernel is 1.4-1.45× the tiled path at
            // 64-dimensional heads, the tiled path 1.07× the fused kernel at 128.
            Attention::Auto => self.fused_attention_applies(q.dtype, hd) && hd == 64,
            Attention::Fused | Attention::FusedTransposedV | Attention::Pipelined => {
                if !self.fused_attention_applies(q.dtype, hd) {
                    return Err(KernelError::Unsupported {
                        what: "fused attention",
                        message: format!(
                            "needs f16 or bf16 heads of 64 or 128 dimensions on compute capability 8.0 or above; \
                             here {:?} heads of {hd} on {}.{}",
                            q.dtype, self.capability.0, self.capability.1
                        ),
                    });
                }
                true
            }
        };
        // One set of checks for both implementations (flash_attention is only reached from here).
        let d = heads * hd;
        for (what, o) in [("q", q), ("k", k), ("v", v), ("attention output", ctx)] {
            o.need(what, rows * d)?;
            if o.dtype != q.dtype {
                return Err(KernelError::Shape { what, expected: format!("{:?}", q.dtype), found: o.len });
            }
        }
        if let Some(&(s, l)) = spans.iter().find(|(s, l)| s + l > rows) {
            return Err(KernelError::Shape {
                what: "attention span",
                expected: format!("inside {rows} rows"),
                found: s + l,
            });
        }
        if fused {
            if how == Attention::Pipelined {
                return self.flash_attention_pipelined((q, k, v), ctx, spans, (rows, heads, hd));
            }
            let transposed_v = how == Attention::FusedTransposedV;
            return self.flash_attention((q, k, v), ctx, spans, (rows, heads, hd), transposed_v);
        }
        let longest = spans.iter().map(|s| s.1).max().unwrap_or(0);
        let tile = QUERY_TILE.min(longest.max(1));
        let scores = self.alloc(DType::F32, heads * tile * longest)?;
        let probs = self.alloc(q.dtype, heads * tile * longest)?;
        let scale = 1.0 / (hd as f32).sqrt();
        for &(start, len) in spans {
            for q0 in (0..len).step_by(tile) {
                let qb = tile.min(len - q0);
                let kn = q0 + qb;
                let (s, p) = (scores.view().slice(0, heads * qb * kn)?, probs.view().slice(0, heads * qb * kn)?);
                // S (qb × kn) = Q_tile Kᵀ per head: column-major Sᵀ = K Q_tileᵀ.
                let kop =
                    Operand { v: k.slice(start * hd, k.len - start * hd)?, trans: true, ld: hd, stride: rows * hd };
                let qop = Operand {
                    v: q.slice((start + q0) * hd, q.len - (start + q0) * hd)?,
                    trans: false,
                    ld: hd,
                    stride: rows * hd,
                };
                self.gemm(
                    (kn, qb, hd),
                    kop,
                    qop,
                    Operand { v: s, trans: false, ld: kn, stride: qb * kn },
                    heads,
                    1.0,
                    0.0,
                )?;
                let args = [
                    Arg::P(s.ptr),
                    Arg::P(p.ptr),
                    Arg::I(p.dtype.code()),
                    Arg::I(qb as i32),
                    Arg::I(kn as i32),
                    Arg::I(q0 as i32),
                    Arg::F(scale),
                ];
                self.launch("causal_softmax", (qb as u32, heads as u32, 1), BLOCK, &args)?;
                // O (qb × hd) = P V per head: column-major Oᵀ = Vᵀ Pᵀ, written into ctx's head columns.
                let vop =
                    Operand { v: v.slice(start * hd, v.len - start * hd)?, trans: false, ld: hd, stride: rows * hd };
                let pop = Operand { v: p, trans: false, ld: kn, stride: qb * kn };
                let o = ctx.slice((start + q0) * d, ctx.len - (start + q0) * d)?;
                self.gemm((hd, qb, kn), vop, pop, Operand { v: o, trans: false, ld: d, stride: hd }, heads, 1.0, 0.0)?;
            }
        }
        Ok(())
    }

    fn flash_attention(
        &self,
        (q, k, v): (View<'_>, View<'_>, View<'_>),
        ctx: View<'_>,
        spans: &[(usize, usize)],
        (rows, heads, hd): (usize, usize, usize),
        transposed_v: bool,
    ) -> Result<()> {
        if spans.is_empty() {
            return Ok(());
        }
        if rows > i32::MAX as usize || heads > 65_535 {
            return Err(KernelError::Unsupported {
                what: "fused attention",
                message: format!("{rows} rows and {heads} heads; at most 2³¹ − 1 rows and 65,535 heads"),
            });
        }
        let name = match (transposed_v, hd, q.dtype) {
            (false, 64, DType::F16) => "flash_hd64_f16",
            (false, 64, _) => "flash_hd64_bf16",
            (false, 128, DType::F16) => "flash_hd128_f16",
            (false, _, _) => "flash_hd128_bf16",
            (true, 64, DType::F16) => "flash_tv_hd64_f16",
            (true, 64, _) => "flash_tv_hd64_bf16",
            (true, 128, DType::F16) => "flash_tv_hd128_f16",
            (true, _, _) => "flash_tv_hd128_bf16",
        };
        // Grid (query blocks of 64, heads, sequences).
        self.launch_flash(name, 128, (q, k, v), ctx, spans, (rows, heads, hd), |longest, seqs| {
            (longest.div_ceil(64) as u32, heads as u32, seqs as u32)
        })
    }

    /// Launches a flash-attention kernel (`name`, `threads` per block) on `spans` in groups of at most
    /// 65,535 sequences (a grid dimension's limit), each group's starts and lengths uploaded;
    /// `grid(longest, sequences)` gives a group's grid.
    #[allow(clippy::too_many_arguments)]
    fn launch_flash(
        &self,
        name: &'static str,
        threads: u32,
        (q, k, v): (View<'_>, View<'_>, View<'_>),
        ctx: View<'_>,
        spans: &[(usize, usize)],
        (rows, heads, hd): (usize, usize, usize),
        grid: impl Fn(usize, usize) -> (u32, u32, u32),
    ) -> Result<()> {
        for group in spans.chunks(65_535) {
            let starts: Vec<u32> = group.iter().map(|s| s.0 as u32).collect();
            let lens: Vec<u32> = group.iter().map(|s| s.1 as u32).collect();
            let (sb, lb) = (self.upload_u32(&starts)?, self.upload_u32(&lens)?);
            let longest = group.iter().map(|s| s.1).max().unwrap_or(0);
            let args = [
                Arg::P(q.ptr),
                Arg::P(k.ptr),
                Arg::P(v.ptr),
                Arg::P(ctx.ptr),
                Arg::P(sb.view().ptr),
                Arg::P(lb.view().ptr),
                Arg::I(rows as i32),
                Arg::I(heads as i32),
                // Scores in log2 units: the kernel's exponentials are ex2.
                Arg::F(std::f32::consts::LOG2_E / (hd as f32).sqrt()),
            ];
            self.launch(name, grid(longest, group.len()), threads, &args)?;
        }
        Ok(())
    }

    /// [`Attention::Pipelined`], after [`Gpu::attention_with`]'s checks; its own: q, k and v start on
    /// 16-byte boundaries (`cp.async`), and the grid's limits.
    fn flash_attention_pipelined(
        &self,
        (q, k, v): (View<'_>, View<'_>, View<'_>),
        ctx: View<'_>,
        spans: &[(usize, usize)],
        (rows, heads, hd): (usize, usize, usize),
    ) -> Result<()> {
        if spans.is_empty() {
            return Ok(());
        }
        // Queries per block: 8 warps of 16 at heads of 64, 4 at 128 (kernels.cu).
        let block_queries = if hd == 64 { 128 } else { 64 };
        let longest = spans.iter().map(|s| s.1).max().unwrap_or(0);
        let blocks = longest.div_ceil(block_queries);
        if rows > i32::MAX as usize || heads > i32::MAX as usize || blocks > 65_535 {
            return Err(KernelError::Unsupported {
                what: "pipelined attention",
                message: format!(
                    "{rows} rows, {heads} heads, sequences of {longest}; at most 2³¹ − 1 rows and heads and \
                     sequences of {} tokens",
                    65_535 * block_queries
                ),
            });
        }
        if let Some((what, _)) = [("q", q), ("k", k), ("v", v)].into_iter().find(|(_, o)| !o.ptr.is_multiple_of(16)) {
            return Err(KernelError::Unsupported {
                what: "pipelined attention",
                message: format!("{what} must start on a 16-byte boundary (cp.async)"),
            });
        }
        let name = match (hd, q.dtype) {
            (64, DType::F16) => "flash2_hd64_f16",
            (64, _) => "flash2_hd64_bf16",
            (_, DType::F16) => "flash2_hd128_f16",
            (_, _) => "flash2_hd128_bf16",
        };
        let threads = if hd == 64 { 256 } else { 128 };
        // Grid (heads, sequences, query blocks): the kernel walks grid.z last-first.
        self.launch_flash(name, threads, (q, k, v), ctx, spans, (rows, heads, hd), |longest, seqs| {
            (heads as u32, seqs as u32, longest.div_ceil(block_queries) as u32)
        })
    }

    /// Fused target log-probabilities on the device: `out[r] = log softmax(hidden[r] · Eᵀ)[targets[r]]`
    /// for `rows` rows of `hidden` (the output weight's element type), in chunks of `chunk` rows so
    /// that logits (`chunk × vocab`, `logits_type`) exist for one chunk at a time. `lse`, when given,
    /// receives each row's log-sum-exp.
    #[allow(clippy::too_many_arguments)]
    pub fn log_prob_targets(
        &self,
        hidden: View<'_>,
        e: &Linear<'_>,
        targets: View<'_>,
        out: View<'_>,
        lse: Option<View<'_>>,
        rows: usize,
        chunk: usize,
        logits_type: DType,
    ) -> Result<()> {
        let mut outputs = vec![("log-probabilities", out)];
        outputs.extend(lse.map(|l| ("log-sum-exp", l)));
        check_operands(
            self.ordinal,
            "log-probabilities",
            &[("hidden", hidden), ("output embedding", e.w), ("targets", targets)],
            &outputs,
            false,
        )?;
        let vocab = e.outputs;
        if !(logits_type == DType::F32 || (logits_type == DType::F16 && e.w.dtype == DType::F16)) {
            return Err(KernelError::Unsupported {
                what: "logits type",
                message: format!("{logits_type:?} with {:?} weights; F32, or F16 with f16 weights", e.w.dtype),
            });
        }
        targets.need("targets", rows)?;
        out.need("log-probs", rows)?;
        out.need_type("log-probs", &[DType::F32])?;
        if let Some(l) = lse {
            l.need("log-sum-exp", rows)?;
        }
        hidden.need("hidden", rows * e.inputs)?;
        let chunk = chunk.clamp(1, rows.max(1));
        // Two logits buffers: while the row kernel reduces chunk i on the side stream, cuBLAS
        // computes chunk i + 1 on the main stream (compute-bound products overlap the
        // memory-bound reductions). Events order each buffer's reuse.
        let bufs = [self.alloc(logits_type, chunk * vocab)?, self.alloc(logits_type, chunk * vocab)?];
        let ev = |e: cudarc::driver::DriverError| cuda_err("event", e);
        // Declared after `bufs`, so dropped first: on every exit, error paths included, the main
        // stream waits for the side stream's reductions before the buffers are freed on it.
        let mut guard = SideWork { stream: &self.stream, done: [None, None] };
        let done = &mut guard.done;
        for (i, r0) in (0..rows).step_by(chunk).enumerate() {
            let n = chunk.min(rows - r0);
            let h = hidden.slice(r0 * e.inputs, n * e.inputs)?;
            let lg = bufs[i % 2].view().slice(0, n * vocab)?;
            if let Some(d) = &done[i % 2] {
                self.stream.wait(d).map_err(ev)?;
            }
            self.matmul((n, e.inputs, vocab), h, false, e.w, !e.inputs_major, lg, 1.0, 0.0)?;
            let ready = self.stream.record_event(None).map_err(ev)?;
            self.side.wait(&ready).map_err(ev)?;
            let args = [
                Arg::P(lg.ptr),
                Arg::I(lg.dtype.code()),
                Arg::L(vocab as i64),
                Arg::P(targets.slice(r0, n)?.ptr),
                Arg::P(out.slice(r0, n)?.ptr),
                Arg::P(lse.map_or(Ok(0), |l| l.slice(r0, n).map(|v| v.ptr))?),
            ];
            // Rows of a multiple of 8 values start on 16-byte boundaries: the vectorised kernel.
            let kernel = if vocab.is_multiple_of(8) { "lse_target_vec" } else { "lse_target" };
            self.launch_on(&self.side, kernel, (n as u32, 1, 1), 512, &args)?;
            done[i % 2] = Some(self.side.record_event(None).map_err(ev)?);
        }
        for d in guard.done.iter_mut().filter_map(Option::take) {
            self.stream.wait(&d).map_err(ev)?;
        }
        Ok(())
    }

    /// LM-Steer's projection on the device: `out = h + ε Σ_s v_s (h P1_s) P2_sᵀ` for `rows` rows of
    /// `h` (`f32`, `rows × dim`), `P1`, `P2` of `steers × dim × rank` (`f32`). `tmp` holds at least
    /// `rows × rank` values.
    #[allow(clippy::too_many_arguments)]
    pub fn steered_projection(
        &self,
        h: View<'_>,
        (p1, p2): (View<'_>, View<'_>),
        strengths: &[f32],
        epsilon: f32,
        out: View<'_>,
        tmp: View<'_>,
        (rows, dim, rank): (usize, usize, usize),
    ) -> Result<()> {
        check_operands(
            self.ordinal,
            "steered projection",
            &[("hidden", h), ("p1", p1), ("p2", p2)],
            &[("steered hidden", out), ("steer scratch", tmp)],
            false,
        )?;
        let steers = strengths.len();
        for (what, v) in [("hidden", h), ("p1", p1), ("p2", p2), ("steered hidden", out), ("steer scratch", tmp)] {
            v.need_type(what, &[DType::F32])?;
        }
        h.need("hidden", rows * dim)?;
        out.need("steered hidden", rows * dim)?;
        p1.need("p1", steers * dim * rank)?;
        p2.need("p2", steers * dim * rank)?;
        tmp.need("steer scratch", rows * rank)?;
        // out = h: a copy through cuBLAS-free device memcpy.
        // SAFETY: both extents were checked above.
        unsafe {
            cudarc::driver::result::memcpy_dtod_async(out.ptr, h.ptr, rows * dim * 4, self.stream.cu_stream())
                .map_err(|e| cuda_err("copy on device", e))?;
        }
        for (s, &v) in strengths.iter().enumerate() {
            if v == 0.0 {
                continue;
            }
            let (a, b) = (p1.slice(s * dim * rank, dim * rank)?, p2.slice(s * dim * rank, dim * rank)?);
            self.matmul((rows, dim, rank), h, false, a, false, tmp, 1.0, 0.0)?;
            self.matmul((rows, rank, dim), tmp, false, b, true, out, epsilon * v, 1.0)?;
        }
        Ok(())
    }
}

/// The host-slice entry points of the crate's functions on a CUDA device: copy in, compute, copy out.
pub(crate) mod host {
    use super::{DType, Gpu, Linear, OUTPUT_CHUNK};
    use crate::{Result, Steers};

    pub(crate) fn log_prob_targets(
        gpu: &Gpu,
        hidden: &[f32],
        embedding: &[f32],
        dim: usize,
        targets: &[u32],
        out: &mut [f32],
        lse: Option<&mut [f32]>,
    ) -> Result<()> {
        let rows = targets.len();
        let (h, e, t) = (gpu.upload_f32(hidden)?, gpu.upload_f32(embedding)?, gpu.upload_u32(targets)?);
        let lin = Linear { w: e.view(), outputs: embedding.len() / dim, inputs: dim, inputs_major: false };
        let o = gpu.alloc(DType::F32, rows)?;
        let l = gpu.alloc(DType::F32, rows)?;
        gpu.log_prob_targets(h.view(), &lin, t.view(), o.view(), Some(l.view()), rows, OUTPUT_CHUNK, DType::F32)?;
        out.copy_from_slice(&gpu.download_f32(o.view())?);
        if let Some(lse) = lse {
            lse.copy_from_slice(&gpu.download_f32(l.view())?);
        }
        Ok(())
    }

    pub(crate) fn steered_projection(
        gpu: &Gpu,
        hidden: &[f32],
        steers: &Steers<'_>,
        strengths: &[f32],
        epsilon: f32,
        out: &mut [f32],
    ) -> Result<()> {
        let rows = hidden.len() / steers.dim;
        let (h, p1, p2) = (gpu.upload_f32(hidden)?, gpu.upload_f32(steers.p1)?, gpu.upload_f32(steers.p2)?);
        let o = gpu.alloc(DType::F32, hidden.len())?;
        let tmp = gpu.alloc(DType::F32, rows * steers.rank)?;
        gpu.steered_projection(
            h.view(),
            (p1.view(), p2.view()),
            strengths,
            epsilon,
            o.view(),
            tmp.view(),
            (rows, steers.dim, steers.rank),
        )?;
        out.copy_from_slice(&gpu.download_f32(o.view())?);
        Ok(())
    }

    pub(crate) fn matmul(
        gpu: &Gpu,
        a: &[f32],
        b: &[f32],
        (m, k, n): (usize, usize, usize),
        b_t: bool,
        out: &mut [f32],
    ) -> Result<()> {
        let (da, db) = (gpu.upload_f32(a)?, gpu.upload_f32(b)?);
        let c = gpu.alloc(DType::F32, m * n)?;
        gpu.matmul((m, k, n), da.view(), false, db.view(), b_t, c.view(), 1.0, 0.0)?;
        out.copy_from_slice(&gpu.download_f32(c.view())?);
        Ok(())
    }
}
