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

pub use decode::{CacheTable, cache_len};

use crate::operands::Span;
use crate::{KernelError, Result};

mod attention;
mod decode;
mod elementwise;
mod output;
mod products;
mod training;

/// The CUDA C source of every kernel.
pub const SOURCE: &str = include_str!("kernels.cu");

/// The kernels in [`SOURCE`], by entry name.
pub const KERNELS: [&str; 31] = [
    "convert",
    "embed",
    "layer_norm",
    "bias_act",
    "layer_norm_warp",
    "bias_act_vec",
    "residual",
    "rms_norm",
    "qk_rms_norm",
    "gated_act",
    "qkv_split",
    "causal_softmax",
    "lse_target",
    "lse_target_vec",
    "scale_rows",
    "softmax_grad",
    "softcap",
    "cache_store",
    "cached_attention",
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

/// The shape and options of one causal attention call ([`Gpu::attention_shaped`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttentionShape {
    /// Rows of the packed batch.
    pub rows: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads (a divisor of `heads`; `heads` without grouping).
    pub kv_heads: usize,
    /// Dimensions per head.
    pub hd: usize,
    /// Each query sees at most this many keys, itself included.
    pub window: Option<usize>,
    /// The scores' scale (`hd^-1/2` when `None`).
    pub scale: Option<f32>,
    /// Scaled scores soft-capped to `c·tanh(s/c)` (Gemma 2; the tiled path only).
    pub softcap: Option<f32>,
}

impl AttentionShape {
    /// The checks every attention implementation makes of its options: key/value heads dividing the
    /// query heads, a window of at least one key, a positive finite soft-cap.
    pub(super) fn check_options(&self) -> Result<()> {
        let AttentionShape { heads, kv_heads, window, softcap, .. } = *self;
        if kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
            return Err(KernelError::Shape {
                what: "key/value heads",
                expected: format!("a divisor of the {heads} query heads"),
                found: kv_heads,
            });
        }
        if window == Some(0) {
            return Err(KernelError::Shape { what: "attention window", expected: "at least 1".into(), found: 0 });
        }
        if softcap.is_some_and(|c| !(c.is_finite() && c > 0.0)) {
            return Err(KernelError::Unsupported {
                what: "attention soft-cap",
                message: "must be a positive finite number".into(),
            });
        }
        Ok(())
    }
}

/// Where the heads sit in a row of a fused QKV projection ([`Gpu::qkv_split`]): head `h` of q starts
/// at `q + h·head`, of k at `k + h·head`, of v at `v + h·head`, within rows of `row` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QkvRow {
    /// Values per row.
    pub row: usize,
    /// Offset of the first query head.
    pub q: usize,
    /// Offset of the first key head.
    pub k: usize,
    /// Offset of the first value head.
    pub v: usize,
    /// From one head to the next.
    pub head: usize,
}

/// Groups of one [`Gpu::qk_rms_norm`] side (queries or keys): `count` groups of `width` values, the
/// first at `offset` in a row, the next `step` further.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NormGroups {
    /// Offset of the first group in a row.
    pub offset: usize,
    /// From one group to the next.
    pub step: usize,
    /// Groups per row.
    pub count: usize,
    /// Values per group (the weight's length).
    pub width: usize,
}

/// How [`Gpu::attention_with`] computes causal attention.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Attention {
    /// The pipelined fused kernel ([`Attention::Pipelined`]) for f16/bf16 heads of 64 or 128
    /// dimensions on compute capability 8.0 or above (where it measured fastest, 1.3-1.45× the first
    /// fused kernel and 1.3-2.1× the tiled products on an H200), else the tiled products.
    #[default]
    Auto,
    /// The fused flash-attention kernel.
    Fused,
    /// The fused kernel with V transposed on its way into shared memory instead of read by
    /// `ldmatrix.trans` (the first version, kept for comparison).
    FusedTransposedV,
    /// The fused kernel organised as FlashAttention-2 is: double-buffered `cp.async` K/V tiles,
    /// 128-query blocks at heads of 64, `ldmatrix` for K, masking only on diagonal tiles, the longest
    /// query blocks launched first. Same sizes and types as [`Attention::Fused`] (docs/performance.md
    /// has its parity and speed).
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
            vectorised: AtomicBool::new(true),
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
    /// Bytes of device memory free and in total, as the driver reports them (all processes' use
    /// counted), after a synchronisation: buffers freed on the stream go back to the device at a
    /// synchronisation (the stream-ordered pool keeps nothing above its default threshold of 0).
    pub fn free_memory(&self) -> Result<(usize, usize)> {
        self.synchronize()?;
        self._ctx.bind_to_thread().map_err(|e| cuda_err("bind the context", e))?;
        cudarc::driver::result::mem_get_info().map_err(|e| cuda_err("device memory", e))
    }
    /// Restarts the peak of [`Gpu::memory`] from the current use.
    pub fn reset_peak(&self) {
        self.mem.peak.store(self.mem.current.load(Ordering::Relaxed), Ordering::Relaxed);
    }
    /// Whether [`Gpu::layer_norm`] and [`Gpu::bias_act`] use their vectorised kernels (one warp per
    /// row with 16-byte loads; 8 half-precision values per thread) where the shapes and alignments
    /// allow, for every user of this device in the process. On by default (measured on an H200: 10-12%
    /// more tokens/s at the Pythia-70M to 410M shapes, parity as the scalar kernels); off runs the
    /// one-block-per-row kernels.
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
        let f = self.funcs.get(name).ok_or_else(|| KernelError::Unsupported {
            what: "kernel",
            message: format!("`{name}` is not among the compiled kernels (cuda::KERNELS)"),
        })?;
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
}

/// The host-slice entry points of the crate's functions on a CUDA device: copy in, compute, copy out.
pub(crate) mod host {
    use super::{DType, Gpu, Linear, OUTPUT_CHUNK};
    use crate::{Result, Steers};

    pub(crate) fn log_prob_targets(
        gpu: &Gpu,
        hidden: &[f32],
        (embedding, dim, softcap): (&[f32], usize, Option<f32>),
        targets: &[u32],
        out: &mut [f32],
        lse: Option<&mut [f32]>,
    ) -> Result<()> {
        let rows = targets.len();
        let (h, e, t) = (gpu.upload_f32(hidden)?, gpu.upload_f32(embedding)?, gpu.upload_u32(targets)?);
        let lin = Linear { w: e.view(), outputs: embedding.len() / dim, inputs: dim, inputs_major: false };
        let o = gpu.alloc(DType::F32, rows)?;
        let l = gpu.alloc(DType::F32, rows)?;
        let chunks = (OUTPUT_CHUNK, DType::F32);
        gpu.log_prob_targets(h.view(), &lin, t.view(), o.view(), Some(l.view()), rows, chunks, softcap)?;
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
