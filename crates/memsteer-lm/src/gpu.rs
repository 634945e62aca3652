//! Scoring on a CUDA device (feature `cuda`): GPT-2, GPT-NeoX and the Llama family (Llama, Mistral,
//! Qwen 2 and 3, OLMo 2, Gemma 3), every architecture the CPU runtime runs, through the same block loop.
//!
//! [`GpuModel::load`] uploads a checkpoint once, in its stored element type (a tensor stored in
//! another type than the input embedding is converted to it). The forward pass keeps the residual
//! stream, layer norms, softmax statistics and every product's accumulation in `f32`; the inputs of
//! the matrix products are in the weights' type (so `f16`/`bf16` checkpoints run on tensor cores
//! through cuBLAS, and `f32` checkpoints give the CPU path's numbers). Attention is tiled by query
//! blocks ([`memsteer_kernels::cuda::QUERY_TILE`]), and the output layer is fused with the
//! log-softmax over chunks of rows, so neither `[T, T]` scores per head nor `[tokens, vocabulary]`
//! logits ever exist.

use std::path::Path;
use std::sync::Arc;

use memsteer_kernels::Device;
use memsteer_kernels::cuda::{
    Attention, AttentionShape, CacheTable, DType, DevBuf, Gpu, Linear, NormGroups, OUTPUT_CHUNK, QkvRow, View,
};
use safetensors::Dtype;

use crate::arch::{self, Affine, Arch, LayerSlot, LayerTensors, Mlp, Norm, Part, QkNorm, Slot, Tensors, WeightLayout};
use crate::block::NormSite;
use crate::config::Activation;
use crate::ops;
use crate::weights::Weights;
use crate::{Decoder, LmError, Result};

/// A checkpoint resident on a CUDA device.
pub struct GpuModel {
    gpu: Arc<Gpu>,
    arch: Arch,
    dtype: DType,
    /// The MLP's activation code for the kernels: 1 exact GELU, 2 tanh GELU (GeGLU's too), 3 SiLU.
    act: i32,
    rotary: Option<(DevBuf, DevBuf, usize)>,
    /// The sliding layers' own rotary table (Gemma 3's local base).
    local_rotary: Option<(DevBuf, DevBuf)>,
    w: Tensors<DevBuf>,
    chunk: usize,
    logits: DType,
    attention: Attention,
    /// For bf16 checkpoints whose output embedding fits f16: that embedding in f16 (exact in f16's
    /// normal range, values below 2⁻¹⁴ lose bits), so that the output layer can write f16 logits
    /// (cuBLAS writes f16 only from f16 inputs).
    head16: Option<DevBuf>,
    /// This load's number in the process: a [`DeviceKvCache`] works only with the model that made it.
    id: usize,
}

/// Numbers [`GpuModel`] loads.
static LOADS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

impl GpuModel {
    /// The precision class of its products ([`crate::Model::precision`]): `cuda-f32`, `cuda-f16` or
    /// `cuda-bf16`, the weights' type, in which cuBLAS multiplies.
    pub fn precision(&self) -> String {
        format!("cuda-{}", format!("{:?}", self.dtype).to_ascii_lowercase())
    }
}

impl std::fmt::Debug for GpuModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let a = &self.arch;
        write!(
            f,
            "GpuModel({} layers, d {}, {} heads, inner {}, {:?} on {:?})",
            a.layers, a.dim, a.heads, a.inner, self.dtype, self.gpu
        )
    }
}

fn dtype_of(d: Dtype) -> DType {
    match d {
        Dtype::F16 => DType::F16,
        Dtype::BF16 => DType::Bf16,
        _ => DType::F32,
    }
}

/// Converts little-endian `bytes` of `from` to `to`.
fn convert(bytes: &[u8], from: DType, to: DType) -> Vec<u8> {
    let vals: Vec<f32> = match from {
        DType::F16 => bytes.chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
        DType::Bf16 => bytes.chunks_exact(2).map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
        _ => bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
    };
    match to {
        DType::F16 => vals.iter().flat_map(|v| half::f16::from_f32(*v).to_le_bytes()).collect(),
        DType::Bf16 => vals.iter().flat_map(|v| half::bf16::from_f32(*v).to_le_bytes()).collect(),
        _ => vals.iter().flat_map(|v| v.to_le_bytes()).collect(),
    }
}

/// Whether every value of little-endian `bytes` of type `dt` is finite.
fn finite(bytes: &[u8], dt: DType) -> bool {
    match dt {
        DType::F16 => bytes.chunks_exact(2).all(|b| half::f16::from_le_bytes([b[0], b[1]]).is_finite()),
        DType::Bf16 => bytes.chunks_exact(2).all(|b| half::bf16::from_le_bytes([b[0], b[1]]).is_finite()),
        _ => bytes.chunks_exact(4).all(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]).is_finite()),
    }
}

fn kerr(e: memsteer_kernels::KernelError) -> LmError {
    LmError::from(e)
}

/// Uploads every tensor of `arch` from `w` to `gpu` through the one loader: in `dtype` (a tensor stored
/// in another type is converted, and one whose values do not fit is an error naming it), RMSNorm weights
/// in f32 (Gemma's `1 + w` applied), the Llama family's q/k/v pieces joined on the device.
fn upload_tensors(gpu: &Gpu, arch: &Arch, w: &Weights, dtype: DType, dir: &Path) -> Result<Tensors<DevBuf>> {
    let rms = match arch.norm {
        Norm::RmsNorm { unit_offset, .. } => Some(unit_offset),
        Norm::LayerNorm { .. } => None,
    };
    arch.load_tensors(
        |spec| {
            let (dt, bytes) = w.raw(&spec.name_refs(), &spec.shape)?;
            let dt = dtype_of(dt);
            if let (Some(unit_offset), true) = (rms, norm_weight(spec.slot)) {
                // RMSNorm weights live in f32 (a few thousand values), Gemma's `1 + w` offset in f32
                // as the CPU path holds them.
                let mut g = to_f32(bytes, dt);
                if unit_offset {
                    g.iter_mut().for_each(|v| *v += 1.0);
                }
                return gpu.upload_f32(&g).map_err(kerr);
            }
            if dt == dtype {
                return gpu.upload_bytes(dtype, bytes).map_err(kerr);
            }
            // A tensor stored in another type than the embedding is converted to it; a value that
            // does not fit (f32 → f16 above 65,504) is an error naming the tensor, not an infinity.
            let converted = convert(bytes, dt, dtype);
            if !finite(&converted, dtype) && finite(bytes, dt) {
                return Err(LmError::Input(format!(
                    "{}: tensor `{}` is stored as {dt:?} with values outside {dtype:?}'s range (the model's type, \
                     from its input embedding); convert the checkpoint to one type first",
                    dir.display(),
                    spec.names[0]
                )));
            }
            gpu.upload_bytes(dtype, &converted).map_err(kerr)
        },
        |pieces| {
            // The q, k and v projections (and their biases) of the Llama family, one after the other.
            let dtype = pieces[0].view().dtype();
            let total = pieces.iter().map(DevBuf::len).sum();
            let whole = gpu.alloc(dtype, total).map_err(kerr)?;
            let mut at = 0;
            for p in &pieces {
                gpu.convert(p.view(), whole.view().slice(at, p.len()).map_err(kerr)?, p.len()).map_err(kerr)?;
                at += p.len();
            }
            Ok(whole)
        },
    )
}

/// Little-endian `bytes` of type `dt` as `f32` values.
fn to_f32(bytes: &[u8], dt: DType) -> Vec<f32> {
    convert(bytes, dt, DType::F32).chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
}

/// Whether `slot` holds a norm's weight (kept in f32 on the device for RMSNorm).
fn norm_weight(slot: Slot) -> bool {
    use LayerSlot::*;
    match slot {
        Slot::FinalNorm(Part::Weight) => true,
        Slot::Layer(_, s) => {
            matches!(s, Norm1(Part::Weight) | Norm2(Part::Weight) | PostNorm1(Part::Weight) | PostNorm2(Part::Weight))
                || matches!(s, QNorm | KNorm)
        }
        _ => false,
    }
}

impl GpuModel {
    /// Loads `dir` (as [`crate::Model::load`]) onto `device`, which must be a CUDA device.
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let Device::Cuda(cuda) = device else {
            return Err(LmError::Input(format!("GpuModel needs a CUDA device, not {device:?}")));
        };
        let gpu = cuda.0.clone();
        let mut arch = Arch::from_file(&dir.join("config.json"))?;
        arch.validate()?;
        let act = match arch.mlp {
            Mlp::Plain(Activation::GeluExact) => 1,
            Mlp::Plain(Activation::GeluTanh) | Mlp::GeGlu => 2,
            Mlp::SwiGlu => 3,
        };
        let w = Weights::open(dir)?;
        let specs = arch.tensors();
        let spec = |slot: Slot| specs.iter().find(|s| s.slot == slot).expect("every model has an embedding");
        let embed = spec(Slot::Embed);
        let stored = w.raw(&embed.name_refs(), &embed.shape)?.0;
        let dtype = dtype_of(stored);
        arch.round_embed_scale(stored);
        let tensors = upload_tensors(&gpu, &arch, &w, dtype, dir)?;
        // The CPU path's angles (f64, then rounded to f32), for every position of the context.
        let rot = arch.rotary_dims();
        let rotary = if rot > 0 {
            let (cos, sin) = arch.rotary_table((0, arch.context));
            Some((gpu.upload_f32(&cos).map_err(kerr)?, gpu.upload_f32(&sin).map_err(kerr)?, rot))
        } else {
            None
        };
        let local_rotary = match arch.local_rotary_table((0, arch.context)) {
            Some((cos, sin)) => Some((gpu.upload_f32(&cos).map_err(kerr)?, gpu.upload_f32(&sin).map_err(kerr)?)),
            None => None,
        };
        let mut model = Self {
            gpu,
            dtype,
            act,
            rotary,
            local_rotary,
            w: tensors,
            chunk: OUTPUT_CHUNK,
            logits: DType::F32,
            attention: Attention::Auto,
            head16: None,
            id: LOADS.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            arch,
        };
        if dtype == DType::Bf16 {
            let head = spec(if model.arch.tied { Slot::Embed } else { Slot::Head });
            let (stored, bytes) = w.raw(&head.name_refs(), &head.shape)?;
            let f16 = convert(bytes, dtype_of(stored), DType::F16);
            if finite(&f16, DType::F16) {
                model.head16 = Some(model.gpu.upload_bytes(DType::F16, &f16).map_err(kerr)?);
                // An untied bf16 output layer is not needed beside its f16 copy.
                model.w.head = None;
            }
        }
        Ok(model)
    }

    /// The element type the weights live in on the device.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The device.
    pub fn gpu(&self) -> &Arc<Gpu> {
        &self.gpu
    }

    /// Rows per chunk of the fused output layer and the type of its logits: `F32` (the default), or
    /// `F16`, which halves the chunk's memory traffic (about 1 ms less per 16k rows at a 50k
    /// vocabulary on an H200) but rounds every logit to 2⁻¹¹ of its magnitude: about 0.01 nats at
    /// |logit| ≈ 20, in the target logit and the log-sum-exp alike.
    /// `F16` logits need f16 weights (cuBLAS writes f16 only from f16 inputs); otherwise `F32` is used.
    pub fn set_output_chunk(&mut self, rows: usize, logits: DType) {
        self.chunk = rows.max(1);
        let f16_head = self.dtype == DType::F16 || self.head16.is_some();
        self.logits = if logits == DType::F16 && f16_head { DType::F16 } else { DType::F32 };
    }

    /// How attention is computed (default [`Attention::Auto`]: the pipelined fused kernel for f16/bf16
    /// heads of 64 or 128 dimensions, the tiled cuBLAS path otherwise).
    pub fn set_attention(&mut self, how: Attention) {
        self.attention = how;
    }

    /// `log p(x_t | x_<t)` for `t = 1..T` of every sequence (first token not scored), in one packed
    /// forward pass on the device. The same checks and errors as the CPU path
    /// ([`crate::Decoder::token_log_probs_batch`]).
    pub fn token_log_probs_batch(&self, seqs: &[&[u32]]) -> Result<Vec<Vec<f32>>> {
        if let Some((i, s)) = seqs.iter().enumerate().find(|(_, s)| s.len() < 2) {
            let message =
                format!("{} token(s): a log-probability needs at least two (the first token is not scored)", s.len());
            return Err(if seqs.len() == 1 {
                LmError::Input(message)
            } else {
                LmError::Sequence { index: i, message }
            });
        }
        if seqs.is_empty() {
            return Ok(Vec::new());
        }
        let lay = ops::layout_for((self.arch.vocab, self.arch.context), seqs, &[])?;
        let rows = lay.rows();
        let tokens: Vec<u32> = seqs.iter().flat_map(|s| s.iter().copied()).collect();
        let positions: Vec<u32> = lay.positions.iter().map(|&p| p as u32).collect();
        // Row r predicts token r + 1; each sequence's last row predicts nothing (target 0, dropped).
        let mut targets = vec![0u32; rows];
        for w in lay.starts.windows(2) {
            targets[w[0]..w[1] - 1].copy_from_slice(&tokens[w[0] + 1..w[1]]);
        }
        let spans: Vec<(usize, usize)> = lay.starts.windows(2).map(|w| (w[0], w[1] - w[0])).collect();
        let lp = self.forward(&tokens, &positions, Some(&targets), &spans, None)?;
        Ok(spans.iter().map(|&(start, len)| lp[start..start + len - 1].to_vec()).collect())
    }

    /// Final hidden states (after the last layer norm, `f32`) of the sequences laid end to end,
    /// `Σ len × dim`, computed on the device: for callers that apply their own output layer (LM-Steer).
    pub fn hidden_states(&self, seqs: &[&[u32]]) -> Result<Vec<f32>> {
        let lay = ops::layout_for((self.arch.vocab, self.arch.context), seqs, &[])?;
        if lay.rows() == 0 {
            return Ok(Vec::new());
        }
        let tokens: Vec<u32> = seqs.iter().flat_map(|s| s.iter().copied()).collect();
        let positions: Vec<u32> = lay.positions.iter().map(|&p| p as u32).collect();
        let spans: Vec<(usize, usize)> = lay.starts.windows(2).map(|w| (w[0], w[1] - w[0])).collect();
        self.forward(&tokens, &positions, None, &spans, None)
    }

    /// An empty key/value cache on the device for one sequence of at most `capacity` positions (at
    /// most the context), for [`GpuModel::forward_cached`]. It takes `layers × 2 × kv_heads × capacity
    /// × head_dim` values of the weights' type, allocated now.
    pub fn new_cache(&self, capacity: usize) -> Result<DeviceKvCache> {
        let a = &self.arch;
        if a.head_dim > 256 || a.heads > 65_535 {
            return Err(LmError::Input(format!(
                "{} heads of {} dimensions: decoding on the device takes heads of at most 256 dimensions and at most \
                 65,535 heads",
                a.heads, a.head_dim
            )));
        }
        if capacity == 0 || capacity > a.context {
            return Err(LmError::Input(format!(
                "a KV cache of {capacity} positions: it must hold 1 to {} (the context)",
                a.context
            )));
        }
        let len = memsteer_kernels::cuda::cache_len((a.layers, a.kv_heads, a.head_dim), capacity)
            .ok_or_else(|| LmError::Input(format!("a KV cache of {capacity} positions does not fit in memory")))?;
        Ok(DeviceKvCache { buf: self.gpu.alloc(self.dtype, len)?, capacity, len: 0, owner: self.id })
    }

    /// Bytes of a [`DeviceKvCache`] of `capacity` positions ([`GpuModel::new_cache`]).
    pub fn cache_bytes(&self, capacity: usize) -> usize {
        let a = &self.arch;
        memsteer_kernels::cuda::cache_len((a.layers, a.kv_heads, a.head_dim), capacity)
            .map_or(usize::MAX, |n| n.saturating_mul(self.dtype.size()))
    }

    /// Whether `e` says that the device ran out of memory (an allocation failed), as opposed to
    /// another error.
    pub fn out_of_memory(e: &LmError) -> bool {
        matches!(e, LmError::Kernel(memsteer_kernels::KernelError::Cuda { op: "allocate", .. }))
    }

    /// An upper bound of the device memory one [`GpuModel::forward_cached`] step of `rows` rows and
    /// [`GpuModel::logits`] of `outputs` rows allocate besides the caches: the residual stream and the
    /// layer's activations for every row, the MLP over blocks of at most 4,096 rows, and the logits; the
    /// server keeps this much free before it admits another row.
    pub fn step_bytes(&self, rows: usize, outputs: usize) -> usize {
        let a = &self.arch;
        let dt = self.dtype.size();
        let heads = a.heads * a.head_dim;
        // Per row: f32 residual and final norm; norm output, projection, q/k/v, context, branch output
        // and a post-norm copy in the weights' type; ids and positions.
        let per_row = 8 * a.dim + dt * (3 * a.dim + 2 * a.qkv_width() + 2 * heads) + 8;
        let mlp = 2 * rows.min(MLP_ROWS) * a.inner * dt;
        let out = outputs * (4 * a.dim + dt * a.dim + 4 * a.vocab);
        rows * per_row + mlp + out
    }

    /// Final hidden states (`f32`, `Σ len × dim`) of the sequences laid end to end, each continuing its
    /// own device cache (`caches[i]` for `seqs[i]`, which it extends): one packed pass for a decoding
    /// batch whose rows are at different positions, prompts and single tokens alike. Each row's keys
    /// and values are stored in its cache, and its queries attend to that cache only. Every sequence is
    /// checked (non-empty, ids inside the vocabulary, inside the context and its cache's capacity)
    /// before any work.
    pub fn forward_cached(&self, seqs: &[&[u32]], caches: &mut [&mut DeviceKvCache]) -> Result<Vec<f32>> {
        let a = &self.arch;
        let pasts: Vec<usize> = caches.iter().map(|c| c.len).collect();
        if caches.len() != seqs.len() {
            return Err(LmError::Input(format!("{} KV caches for {} sequences", caches.len(), seqs.len())));
        }
        let lay = ops::layout_for((a.vocab, a.context), seqs, &pasts)?;
        for (i, (s, c)) in seqs.iter().zip(caches.iter()).enumerate() {
            let message = if c.owner != self.id {
                "its KV cache was made by another model".to_string()
            } else if c.len + s.len() > c.capacity {
                format!("{} cached + {} new tokens exceed the KV cache's capacity of {}", c.len, s.len(), c.capacity)
            } else {
                continue;
            };
            return Err(if seqs.len() == 1 {
                LmError::Input(message)
            } else {
                LmError::Sequence { index: i, message }
            });
        }
        if lay.rows() == 0 {
            return Ok(Vec::new());
        }
        let tokens: Vec<u32> = seqs.iter().flat_map(|s| s.iter().copied()).collect();
        let positions: Vec<u32> = lay.positions.iter().map(|&p| p as u32).collect();
        let spans: Vec<(usize, usize)> = lay.starts.windows(2).map(|w| (w[0], w[1] - w[0])).collect();
        let rows: Vec<(usize, usize)> = spans
            .iter()
            .enumerate()
            .flat_map(|(s, &(_, len))| {
                let past = pasts[s];
                (0..len).map(move |i| (s, past + i))
            })
            .collect();
        let hidden = {
            let views: Vec<(View<'_>, usize)> = caches.iter().map(|c| (c.buf.view(), c.capacity)).collect();
            let table = self.gpu.cache_table(&views, &rows, (a.layers, a.kv_heads, a.head_dim))?;
            self.forward(&tokens, &positions, None, &spans, Some(&table))?
        };
        for (c, s) in caches.iter_mut().zip(seqs) {
            c.len += s.len();
        }
        Ok(hidden)
    }

    /// Logits (`rows × vocab`, soft-capped as the model says) of `rows` final hidden states (`f32`, `rows
    /// × dim`), through the output layer on the device: the hidden states are rounded to the output
    /// embedding's type (f16 for a bf16 model whose embedding fits f16), the product accumulates in f32.
    pub fn logits(&self, hidden: &[f32], rows: usize) -> Result<Vec<f32>> {
        let (d, vocab) = (self.arch.dim, self.arch.vocab);
        if hidden.len() != rows * d {
            return Err(LmError::Input(format!("{} hidden values for {rows} rows of {d}", hidden.len())));
        }
        if rows == 0 {
            return Ok(Vec::new());
        }
        let g = &*self.gpu;
        let (head, dtype) = match &self.head16 {
            Some(h) => (h, DType::F16),
            None => (self.w.output(), self.dtype),
        };
        let h32 = g.upload_f32(hidden)?;
        let h = g.alloc(dtype, rows * d)?;
        g.convert(h32.view(), h.view(), rows * d)?;
        let logits = g.alloc(DType::F32, rows * vocab)?;
        let e = Linear { w: head.view(), outputs: vocab, inputs: d, inputs_major: false };
        g.linear(h.view(), &e, logits.view(), rows)?;
        if let Some(cap) = self.arch.logit_softcap {
            g.softcap(logits.view(), cap)?;
        }
        Ok(g.download_f32(logits.view())?)
    }

    /// The forward pass ([`crate::block::forward`] on the device): per-row target log-probs when
    /// `targets` is given, else the final hidden states.
    fn forward(
        &self,
        tokens: &[u32],
        positions: &[u32],
        targets: Option<&[u32]>,
        spans: &[(usize, usize)],
        cached: Option<&CacheTable<'_>>,
    ) -> Result<Vec<f32>> {
        let g = &*self.gpu;
        let (rows, d) = (tokens.len(), self.arch.dim);
        // The final norm writes what the output layer reads: f32 hidden states, or the head's type.
        let final_dtype = match targets {
            None => DType::F32,
            Some(_) if self.head16.is_some() => DType::F16,
            Some(_) => self.dtype,
        };
        let mut run = DeviceRun {
            m: self,
            tokens: (tokens, g.upload_u32(tokens)?),
            positions: (positions, g.upload_u32(positions)?),
            spans,
            cached,
            final_dtype,
            pool: Vec::new(),
            prof: Profile::new(g),
        };
        let h = crate::block::forward(&self.arch, &self.w, &mut run)?;
        // Free the layer buffers before the output layer's chunk is allocated.
        let DeviceRun { mut prof, pool, .. } = run;
        drop(pool);
        let Some(targets) = targets else {
            return Ok(g.download_f32(h.view())?);
        };
        let tgt = g.upload_u32(targets)?;
        let lp = g.alloc(DType::F32, rows)?;
        if let Some(head) = &self.head16 {
            let e = Linear { w: head.view(), outputs: self.arch.vocab, inputs: d, inputs_major: false };
            let cap = self.arch.logit_softcap;
            g.log_prob_targets(h.view(), &e, tgt.view(), lp.view(), None, rows, (self.chunk, self.logits), cap)?;
        } else {
            let e = Linear { w: self.w.output().view(), outputs: self.arch.vocab, inputs: d, inputs_major: false };
            let logits = if self.dtype == DType::F16 { self.logits } else { DType::F32 };
            let cap = self.arch.logit_softcap;
            g.log_prob_targets(h.view(), &e, tgt.view(), lp.view(), None, rows, (self.chunk, logits), cap)?;
        }
        prof.mark("output layer");
        let out = g.download_f32(lp.view())?;
        prof.report(rows);
        Ok(out)
    }
}

/// Keys and values of every layer of one sequence on the device, for [`GpuModel::forward_cached`]
/// (made by [`GpuModel::new_cache`], with a fixed capacity).
#[derive(Debug)]
pub struct DeviceKvCache {
    buf: DevBuf,
    capacity: usize,
    len: usize,
    /// The model that made it ([`GpuModel`]'s `id`): another model's cache is refused.
    owner: usize,
}

impl DeviceKvCache {
    /// Positions cached.
    pub fn len(&self) -> usize {
        self.len
    }
    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Most positions it holds.
    pub fn capacity(&self) -> usize {
        self.capacity
    }
    /// Bytes of device memory it takes.
    pub fn bytes(&self) -> usize {
        self.buf.len() * self.buf.view().dtype().size()
    }
}

/// The device backend of the block loop for one packed batch. The residual stream is f32; product
/// outputs and the other activations are in the weights' type (f32 models stay f32 throughout).
struct DeviceRun<'a> {
    m: &'a GpuModel,
    tokens: (&'a [u32], DevBuf),
    positions: (&'a [u32], DevBuf),
    spans: &'a [(usize, usize)],
    /// Decoding with caches: attention stores each row's keys and values in its sequence's cache and
    /// attends to that cache ([`GpuModel::forward_cached`]).
    cached: Option<&'a CacheTable<'a>>,
    final_dtype: DType,
    /// Buffers the operations gave back (every kernel writes its outputs in full).
    pool: Vec<DevBuf>,
    prof: Profile<'a>,
}

impl DeviceRun<'_> {
    fn rows(&self) -> usize {
        self.tokens.0.len()
    }

    fn take(&mut self, dtype: DType, len: usize) -> Result<DevBuf> {
        match self.pool.iter().position(|b| b.len() == len && b.view().dtype() == dtype) {
            Some(i) => Ok(self.pool.swap_remove(i)),
            None => Ok(self.m.gpu.alloc(dtype, len)?),
        }
    }

    fn give(&mut self, buf: DevBuf) {
        self.pool.push(buf);
    }

    /// A linear layer's weight as the kernels take it.
    fn lin<'w>(&self, w: &'w DevBuf, (inputs, outputs): (usize, usize)) -> Linear<'w> {
        Linear { w: w.view(), outputs, inputs, inputs_major: self.m.arch.weights == WeightLayout::InputsMajor }
    }
}

fn pair(p: &Affine<DevBuf>) -> Result<(View<'_>, View<'_>)> {
    Ok((p.0.view(), arch::bias(p)?.view()))
}

impl crate::block::Backend for DeviceRun<'_> {
    type Act = DevBuf;
    type W = DevBuf;

    fn embed(&mut self, embed: &DevBuf, positions: Option<&DevBuf>) -> Result<DevBuf> {
        let x = self.take(DType::F32, self.rows() * self.m.arch.dim)?;
        let g = &*self.m.gpu;
        let (tokens, positions_ids) =
            ((self.tokens.0, self.tokens.1.view()), (self.positions.0, self.positions.1.view()));
        let (learned, scale) = (positions.map(DevBuf::view), self.m.arch.embed_scale.unwrap_or(1.0));
        g.embed(tokens, positions_ids, embed.view(), learned, x.view(), self.m.arch.dim, scale)?;
        self.prof.mark("embed");
        Ok(x)
    }

    /// Layer norm reads the f32 residual stream; RMSNorm also the branch outputs that post-norm and
    /// sandwich placements norm (in the weights' type).
    fn norm(&mut self, x: &DevBuf, p: &Affine<DevBuf>, site: NormSite) -> Result<DevBuf> {
        let (rows, d) = (self.rows(), self.m.arch.dim);
        let dtype = if site == NormSite::Final { self.final_dtype } else { self.m.dtype };
        let h = self.take(dtype, rows * d)?;
        let g = &*self.m.gpu;
        match self.m.arch.norm {
            Norm::LayerNorm { eps } => g.layer_norm(x.view(), pair(p)?, eps, h.view(), rows, d)?,
            Norm::RmsNorm { eps, .. } => g.rms_norm(x.view(), p.0.view(), eps, h.view(), rows, d)?,
        }
        if site != NormSite::Final {
            self.prof.mark("norm");
        }
        Ok(h)
    }

    /// The projection; with per-head or whole q/k norms, also its bias and those norms (before the
    /// rotary positions, which [`Self::attention`] applies with the split).
    fn qkv(&mut self, _: usize, h: DevBuf, l: &LayerTensors<DevBuf>) -> Result<DevBuf> {
        let (a, rows) = (&self.m.arch, self.rows());
        let width = a.qkv_width();
        let qkv = self.take(self.m.dtype, rows * width)?;
        let g = &*self.m.gpu;
        g.linear(h.view(), &self.lin(&l.qkv.0, (a.dim, width)), qkv.view(), rows)?;
        self.prof.mark("qkv product");
        if let Some((qn, kn)) = &l.qk_norm {
            if let Some(b) = &l.qkv.1 {
                g.bias_act(qkv.view(), b.view(), qkv.view(), (rows, width), 0)?;
            }
            let (off, hd) = (a.qkv_offsets(), a.head_dim);
            let whole = a.qk_norm == QkNorm::Whole;
            let groups = |offset: usize, heads: usize| {
                let width = if whole { heads * hd } else { hd };
                NormGroups { offset, step: width / hd * off.head, count: heads * hd / width, width }
            };
            let sides = (groups(off.q, a.heads), groups(off.k, a.kv_heads));
            g.qk_rms_norm(qkv.view(), (rows, off.row), sides, (qn.view(), kn.view()), a.norm_eps())?;
            self.prof.mark("q/k norm");
        }
        self.give(h);
        Ok(qkv)
    }

    /// The bias (unless [`Self::qkv`] added it) and the rotary positions of the projection are applied
    /// here, fused with the split of the projection into head-major q, k and v.
    fn attention(&mut self, index: usize, qkv: DevBuf, l: &LayerTensors<DevBuf>) -> Result<DevBuf> {
        let (a, rows, dt) = (&self.m.arch, self.rows(), self.m.dtype);
        let (heads, kv_heads, hd) = (a.heads, a.kv_heads, a.head_dim);
        let (q, k, v) = (
            self.take(dt, rows * heads * hd)?,
            self.take(dt, rows * kv_heads * hd)?,
            self.take(dt, rows * kv_heads * hd)?,
        );
        let rotary = match (&self.m.rotary, &self.m.local_rotary) {
            (Some((_, _, r)), Some((c, s))) if a.sliding_layer(index) => Some((c.view(), s.view(), *r)),
            (Some((c, s, r)), _) => Some((c.view(), s.view(), *r)),
            (None, _) => None,
        };
        let off = a.qkv_offsets();
        let layout = QkvRow { row: off.row, q: off.q, k: off.k, v: off.v, head: off.head };
        let positions = (self.positions.0, self.positions.1.view());
        let bias = if l.qk_norm.is_some() { None } else { l.qkv.1.as_ref().map(DevBuf::view) };
        let (qv, kv, vv) = (q.view(), k.view(), v.view());
        let shape = (rows, heads, kv_heads, hd);
        self.m.gpu.qkv_split(qkv.view(), bias, positions, rotary, layout, (qv, kv, vv), shape)?;
        self.prof.mark("qkv split + rotary");
        self.give(qkv);
        let ctx = self.take(dt, rows * heads * hd)?;
        let window = if a.windowed(index) { a.window } else { None };
        let shape = AttentionShape { rows, heads, kv_heads, hd, window, scale: a.attn_scale, softcap: a.attn_softcap };
        match self.cached {
            Some(table) => {
                self.m.gpu.cache_store(table, index, (k.view(), v.view()))?;
                self.m.gpu.cached_attention(table, index, q.view(), ctx.view(), shape)?;
            }
            None => {
                let qkv = (q.view(), k.view(), v.view());
                self.m.gpu.attention_shaped(self.m.attention, qkv, ctx.view(), self.spans, shape)?;
            }
        }
        self.prof.mark("attention");
        for b in [q, k, v] {
            self.give(b);
        }
        Ok(ctx)
    }

    fn attention_out(&mut self, ctx: DevBuf, l: &LayerTensors<DevBuf>) -> Result<DevBuf> {
        let (a, rows) = (&self.m.arch, self.rows());
        let attn = self.take(self.m.dtype, rows * a.dim)?;
        self.m.gpu.linear(ctx.view(), &self.lin(&l.attn_out.0, (a.attn_dim(), a.dim)), attn.view(), rows)?;
        self.prof.mark("attention output product");
        self.give(ctx);
        Ok(attn)
    }

    /// Over blocks of rows, so the wide activations are bounded by `MLP_ROWS × inner` (two of them for
    /// a gated MLP).
    fn mlp(&mut self, h: DevBuf, l: &LayerTensors<DevBuf>) -> Result<DevBuf> {
        let (d, inter, rows, dt) = (self.m.arch.dim, self.m.arch.inner, self.rows(), self.m.dtype);
        let gated = !matches!(self.m.arch.mlp, Mlp::Plain(_));
        let gate = match (gated, &l.gate) {
            (false, _) => None,
            (true, Some(gate)) => Some(gate),
            (true, None) => return Err(LmError::Input("internal: a gated MLP without its gate".into())),
        };
        let block = MLP_ROWS.min(rows).max(1);
        let mid = self.take(dt, block * inter)?;
        let gate_out = if gated { Some(self.take(dt, block * inter)?) } else { None };
        let out = self.take(dt, rows * d)?;
        let g = &*self.m.gpu;
        for r0 in (0..rows).step_by(block) {
            let n = block.min(rows - r0);
            let m = mid.view().slice(0, n * inter)?;
            let x = h.view().slice(r0 * d, n * d)?;
            g.linear(x, &self.lin(&l.up.0, (d, inter)), m, n)?;
            match (gate, &gate_out) {
                (Some(gate), Some(gbuf)) => {
                    let gv = gbuf.view().slice(0, n * inter)?;
                    g.linear(x, &self.lin(&gate.0, (d, inter)), gv, n)?;
                    self.prof.mark("mlp products");
                    if let Some(b) = &l.up.1 {
                        g.bias_act(m, b.view(), m, (n, inter), 0)?;
                    }
                    if let Some(b) = &gate.1 {
                        g.bias_act(gv, b.view(), gv, (n, inter), 0)?;
                    }
                    g.gated_act(gv, m, n * inter, self.m.act)?;
                    self.prof.mark("gated activation");
                }
                _ => {
                    self.prof.mark("mlp products");
                    g.bias_act(m, arch::bias(&l.up)?.view(), m, (n, inter), self.m.act)?;
                    self.prof.mark("bias + gelu");
                }
            }
            g.linear(m, &self.lin(&l.down.0, (inter, d)), out.view().slice(r0 * d, n * d)?, n)?;
            self.prof.mark("mlp products");
        }
        self.give(mid);
        if let Some(b) = gate_out {
            self.give(b);
        }
        self.give(h);
        Ok(out)
    }

    /// The input of a post-norm branch, in the weights' type (what the products take).
    fn copy(&mut self, x: &DevBuf) -> Result<DevBuf> {
        let out = self.take(self.m.dtype, x.len())?;
        self.m.gpu.convert(x.view(), out.view(), x.len())?;
        Ok(out)
    }

    fn recycle(&mut self, x: DevBuf) -> Result<()> {
        self.give(x);
        Ok(())
    }

    fn residual(
        &mut self,
        x: &mut DevBuf,
        a: (DevBuf, Option<&DevBuf>),
        b: Option<(DevBuf, Option<&DevBuf>)>,
    ) -> Result<()> {
        let (rows, d) = (self.rows(), self.m.arch.dim);
        let second = b.as_ref().map(|(b, bias)| (b.view(), bias.map(DevBuf::view)));
        self.m.gpu.residual(x.view(), (a.0.view(), a.1.map(DevBuf::view)), second, rows, d)?;
        self.prof.mark("residual");
        self.give(a.0);
        if let Some((b, _)) = b {
            self.give(b);
        }
        Ok(())
    }
}

/// Rows per block of the MLP (bounds its `rows × inner` activation).
const MLP_ROWS: usize = 4096;

/// Per-stage wall time of the forward pass when `MEMSTEER_GPU_PROFILE` is set (each stage is
/// synchronised, so the total is a little above the unprofiled time), printed to stderr.
struct Profile<'a> {
    gpu: Option<&'a Gpu>,
    last: std::time::Instant,
    stages: Vec<(&'static str, f64)>,
}

impl<'a> Profile<'a> {
    fn new(gpu: &'a Gpu) -> Self {
        let on = std::env::var_os("MEMSTEER_GPU_PROFILE").is_some();
        if on {
            let _ = gpu.synchronize();
        }
        Self { gpu: on.then_some(gpu), last: std::time::Instant::now(), stages: Vec::new() }
    }
    fn mark(&mut self, stage: &'static str) {
        let Some(g) = self.gpu else { return };
        let _ = g.synchronize();
        let now = std::time::Instant::now();
        let dt = (now - self.last).as_secs_f64();
        self.last = now;
        match self.stages.iter_mut().find(|(s, _)| *s == stage) {
            Some((_, t)) => *t += dt,
            None => self.stages.push((stage, dt)),
        }
    }
    fn report(&self, rows: usize) {
        if self.gpu.is_none() {
            return;
        }
        let total: f64 = self.stages.iter().map(|s| s.1).sum();
        let parts: Vec<String> =
            self.stages.iter().map(|(s, t)| format!("{s} {:.2} ms ({:.0}%)", t * 1e3, 100.0 * t / total)).collect();
        eprintln!("forward of {rows} rows: {:.2} ms: {}", total * 1e3, parts.join(", "));
    }
}

/// A [`Decoder`] whose whole-sequence forward passes run on the GPU ([`GpuModel::hidden_states`]) and
/// whose cached decoding steps run on the CPU copy of the same checkpoint: for the LM-Steer commands,
/// whose heavy work is hidden states of whole sequences (the steer and the output layer stay on the
/// CPU). With f16/bf16 weights the hidden states differ from the CPU path's by the rounding the parity
/// check bounds.
#[derive(Debug)]
pub struct GpuDecoder {
    cpu: crate::Model,
    gpu: Arc<GpuModel>,
}

impl GpuDecoder {
    /// Loads `dir` on the CPU and onto `device`.
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        Ok(Self { cpu: crate::Model::load(dir)?, gpu: Arc::new(GpuModel::load(dir, device)?) })
    }
    /// The two halves of one checkpoint, loaded by the caller.
    pub fn new(cpu: crate::Model, gpu: Arc<GpuModel>) -> Self {
        Self { cpu, gpu }
    }
    /// The device half.
    pub fn gpu(&self) -> &GpuModel {
        &self.gpu
    }
}

impl Decoder for GpuDecoder {
    fn forward_packed(&self, seqs: &[&[u32]], cache: Option<&mut crate::KvCache>) -> Result<Vec<f32>> {
        match cache {
            Some(c) => self.cpu.decoder().forward_packed(seqs, Some(c)),
            None => self.gpu.hidden_states(seqs),
        }
    }
    fn output_embedding(&self) -> &[f32] {
        self.cpu.decoder().output_embedding()
    }
    fn logit_softcap(&self) -> Option<f32> {
        self.cpu.decoder().logit_softcap()
    }
    fn dim(&self) -> usize {
        self.cpu.decoder().dim()
    }
    fn context(&self) -> usize {
        self.cpu.decoder().context()
    }
    fn vocab(&self) -> usize {
        self.cpu.decoder().vocab()
    }
}
