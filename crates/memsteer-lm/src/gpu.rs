//! GPT-2 and GPT-NeoX scoring on a CUDA device (feature `cuda`).
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
use memsteer_kernels::cuda::{Attention, DType, DevBuf, Gpu, Linear, OUTPUT_CHUNK, View};
use safetensors::Dtype;

use crate::config::{Activation, ModelConfig};
use crate::ops;
use crate::weights::Weights;
use crate::{Decoder, LmError, Result};

struct Layer {
    ln1: (DevBuf, DevBuf),
    ln2: (DevBuf, DevBuf),
    qkv: DevBuf,
    qkv_b: DevBuf,
    proj: DevBuf,
    proj_b: DevBuf,
    up: DevBuf,
    up_b: DevBuf,
    down: DevBuf,
    down_b: DevBuf,
}

/// A GPT-2 or GPT-NeoX checkpoint resident on a CUDA device.
pub struct GpuModel {
    gpu: Arc<Gpu>,
    neox: bool,
    parallel: bool,
    dtype: DType,
    dims: (usize, usize, usize, usize),
    vocab: usize,
    context: usize,
    eps: f32,
    act: i32,
    rotary: Option<(DevBuf, DevBuf, usize)>,
    wte: DevBuf,
    wpe: Option<DevBuf>,
    out: Option<DevBuf>,
    layers: Vec<Layer>,
    ln_f: (DevBuf, DevBuf),
    chunk: usize,
    logits: DType,
    attention: Attention,
    /// For bf16 checkpoints whose output embedding fits f16: that embedding in f16 (exact in f16's
    /// normal range, values below 2⁻¹⁴ lose bits), so that the output layer can write f16 logits
    /// (cuBLAS writes f16 only from f16 inputs).
    head16: Option<DevBuf>,
}

impl std::fmt::Debug for GpuModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (d, heads, _, inter) = self.dims;
        write!(
            f,
            "GpuModel({} layers, d {d}, {heads} heads, inner {inter}, {:?} on {:?})",
            self.layers.len(),
            self.dtype,
            self.gpu
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

impl GpuModel {
    /// Loads `dir` (as [`crate::Model::load`]) onto `device`, which must be a CUDA device.
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let Device::Cuda(cuda) = device else {
            return Err(LmError::Input(format!("GpuModel needs a CUDA device, not {device:?}")));
        };
        let gpu = cuda.0.clone();
        let cfg = ModelConfig::from_file(&dir.join("config.json"))?;
        let w = Weights::open(dir)?;
        let (embed_name, v, d) = match &cfg {
            ModelConfig::Gpt2(c) => ("wte.weight", c.vocab_size, c.n_embd),
            ModelConfig::GptNeoX(c) => ("gpt_neox.embed_in.weight", c.vocab_size, c.hidden_size),
        };
        let prefixed = format!("transformer.{embed_name}");
        let dtype = dtype_of(w.raw(&[embed_name, &prefixed], &[v, d])?.0);
        let up = |names: &[&str], shape: &[usize]| -> Result<DevBuf> {
            let (dt, bytes) = w.raw(names, shape)?;
            let dt = dtype_of(dt);
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
                    names[0]
                )));
            }
            gpu.upload_bytes(dtype, &converted).map_err(kerr)
        };
        let act = |a: Activation| match a {
            Activation::GeluExact => 1,
            Activation::GeluTanh => 2,
        };
        let (head_name, head_alt): (&str, &str) = match &cfg {
            ModelConfig::Gpt2(c) if c.tie_word_embeddings => ("wte.weight", "transformer.wte.weight"),
            ModelConfig::Gpt2(_) => ("lm_head.weight", "lm_head.weight"),
            ModelConfig::GptNeoX(c) if c.tie_word_embeddings => {
                ("gpt_neox.embed_in.weight", "gpt_neox.embed_in.weight")
            }
            ModelConfig::GptNeoX(_) => ("embed_out.weight", "lm_head.weight"),
        };
        let mut model: Self = (match cfg {
            ModelConfig::Gpt2(c) => {
                let (d, inner) = (c.n_embd, c.n_inner);
                let t = |name: &str, shape: &[usize]| up(&[name, &format!("transformer.{name}")], shape);
                let ln = |name: &str| -> Result<(DevBuf, DevBuf)> {
                    Ok((t(&format!("{name}.weight"), &[d])?, t(&format!("{name}.bias"), &[d])?))
                };
                let mut layers = Vec::with_capacity(c.n_layer);
                for i in 0..c.n_layer {
                    let p = |s: &str| format!("h.{i}.{s}");
                    layers.push(Layer {
                        ln1: ln(&p("ln_1"))?,
                        qkv: t(&p("attn.c_attn.weight"), &[d, 3 * d])?,
                        qkv_b: t(&p("attn.c_attn.bias"), &[3 * d])?,
                        proj: t(&p("attn.c_proj.weight"), &[d, d])?,
                        proj_b: t(&p("attn.c_proj.bias"), &[d])?,
                        ln2: ln(&p("ln_2"))?,
                        up: t(&p("mlp.c_fc.weight"), &[d, inner])?,
                        up_b: t(&p("mlp.c_fc.bias"), &[inner])?,
                        down: t(&p("mlp.c_proj.weight"), &[inner, d])?,
                        down_b: t(&p("mlp.c_proj.bias"), &[d])?,
                    });
                }
                Ok(Self {
                    neox: false,
                    parallel: false,
                    dtype,
                    dims: (d, c.n_head, d / c.n_head, inner),
                    vocab: c.vocab_size,
                    context: c.n_positions,
                    eps: c.layer_norm_epsilon,
                    act: act(c.activation),
                    rotary: None,
                    wte: t("wte.weight", &[c.vocab_size, d])?,
                    wpe: Some(t("wpe.weight", &[c.n_positions, d])?),
                    out: if c.tie_word_embeddings { None } else { Some(up(&["lm_head.weight"], &[c.vocab_size, d])?) },
                    layers,
                    ln_f: ln("ln_f")?,
                    chunk: OUTPUT_CHUNK,
                    logits: DType::F32,
                    attention: Attention::Auto,
                    head16: None,
                    gpu,
                })
            }
            ModelConfig::GptNeoX(c) => {
                let (d, inter) = (c.hidden_size, c.intermediate_size);
                let t = |name: &str, shape: &[usize]| up(&[name], shape);
                let ln = |name: &str| -> Result<(DevBuf, DevBuf)> {
                    Ok((t(&format!("{name}.weight"), &[d])?, t(&format!("{name}.bias"), &[d])?))
                };
                let mut layers = Vec::with_capacity(c.num_hidden_layers);
                for i in 0..c.num_hidden_layers {
                    let p = |s: &str| format!("gpt_neox.layers.{i}.{s}");
                    layers.push(Layer {
                        ln1: ln(&p("input_layernorm"))?,
                        ln2: ln(&p("post_attention_layernorm"))?,
                        qkv: t(&p("attention.query_key_value.weight"), &[3 * d, d])?,
                        qkv_b: t(&p("attention.query_key_value.bias"), &[3 * d])?,
                        proj: t(&p("attention.dense.weight"), &[d, d])?,
                        proj_b: t(&p("attention.dense.bias"), &[d])?,
                        up: t(&p("mlp.dense_h_to_4h.weight"), &[inter, d])?,
                        up_b: t(&p("mlp.dense_h_to_4h.bias"), &[inter])?,
                        down: t(&p("mlp.dense_4h_to_h.weight"), &[d, inter])?,
                        down_b: t(&p("mlp.dense_4h_to_h.bias"), &[d])?,
                    });
                }
                let heads = c.num_attention_heads;
                let hd = d / heads;
                let rot = ((hd as f64) * c.rotary_pct) as usize / 2 * 2;
                // The CPU path's angles: f64, then rounded to f32.
                let rotary = if rot > 0 {
                    let inv: Vec<f64> =
                        (0..rot / 2).map(|i| 1.0 / c.rotary_base.powf((2 * i) as f64 / rot as f64)).collect();
                    let n = c.max_position_embeddings;
                    let (mut cos, mut sin) = (Vec::with_capacity(n * rot / 2), Vec::with_capacity(n * rot / 2));
                    for pos in 0..n {
                        for f in &inv {
                            cos.push((pos as f64 * f).cos() as f32);
                            sin.push((pos as f64 * f).sin() as f32);
                        }
                    }
                    Some((gpu.upload_f32(&cos).map_err(kerr)?, gpu.upload_f32(&sin).map_err(kerr)?, rot))
                } else {
                    None
                };
                Ok(Self {
                    neox: true,
                    parallel: c.use_parallel_residual,
                    dtype,
                    dims: (d, heads, hd, inter),
                    vocab: c.vocab_size,
                    context: c.max_position_embeddings,
                    eps: c.layer_norm_eps,
                    act: act(c.activation),
                    rotary,
                    wte: t("gpt_neox.embed_in.weight", &[c.vocab_size, d])?,
                    wpe: None,
                    out: if c.tie_word_embeddings {
                        None
                    } else {
                        Some(up(&["embed_out.weight", "lm_head.weight"], &[c.vocab_size, d])?)
                    },
                    layers,
                    ln_f: ln("gpt_neox.final_layer_norm")?,
                    chunk: OUTPUT_CHUNK,
                    logits: DType::F32,
                    attention: Attention::Auto,
                    head16: None,
                    gpu,
                })
            }
        } as Result<Self>)?;
        if dtype == DType::Bf16 {
            let (stored, bytes) = w.raw(&[head_name, head_alt], &[v, d])?;
            let f16 = convert(bytes, dtype_of(stored), DType::F16);
            if finite(&f16, DType::F16) {
                model.head16 = Some(model.gpu.upload_bytes(DType::F16, &f16).map_err(kerr)?);
                // An untied bf16 output layer is not needed beside its f16 copy.
                model.out = None;
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

    /// How attention is computed (default [`Attention::Auto`]: the fused kernel for f16/bf16 heads of
    /// 64 dimensions, the tiled cuBLAS path otherwise).
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
        let lay = ops::layout_for((self.vocab, self.context), seqs, None)?;
        let rows = lay.rows();
        let tokens: Vec<u32> = seqs.iter().flat_map(|s| s.iter().copied()).collect();
        let positions: Vec<u32> = lay.positions.iter().map(|&p| p as u32).collect();
        // Row r predicts token r + 1; each sequence's last row predicts nothing (target 0, dropped).
        let mut targets = vec![0u32; rows];
        for w in lay.starts.windows(2) {
            targets[w[0]..w[1] - 1].copy_from_slice(&tokens[w[0] + 1..w[1]]);
        }
        let spans: Vec<(usize, usize)> = lay.starts.windows(2).map(|w| (w[0], w[1] - w[0])).collect();
        let lp = self.forward(&tokens, &positions, Some(&targets), &spans).map_err(kerr)?;
        Ok(spans.iter().map(|&(start, len)| lp[start..start + len - 1].to_vec()).collect())
    }

    /// Final hidden states (after the last layer norm, `f32`) of the sequences laid end to end,
    /// `Σ len × dim`, computed on the device: for callers that apply their own output layer (LM-Steer).
    pub fn hidden_states(&self, seqs: &[&[u32]]) -> Result<Vec<f32>> {
        let lay = ops::layout_for((self.vocab, self.context), seqs, None)?;
        if lay.rows() == 0 {
            return Ok(Vec::new());
        }
        let tokens: Vec<u32> = seqs.iter().flat_map(|s| s.iter().copied()).collect();
        let positions: Vec<u32> = lay.positions.iter().map(|&p| p as u32).collect();
        let spans: Vec<(usize, usize)> = lay.starts.windows(2).map(|w| (w[0], w[1] - w[0])).collect();
        self.forward(&tokens, &positions, None, &spans).map_err(kerr)
    }

    /// The forward pass: per-row target log-probs when `targets` is given, else the final hidden states.
    fn forward(
        &self,
        tokens: &[u32],
        positions: &[u32],
        targets: Option<&[u32]>,
        spans: &[(usize, usize)],
    ) -> memsteer_kernels::Result<Vec<f32>> {
        let g = &*self.gpu;
        let (d, heads, hd, inter) = self.dims;
        let (rows, dt) = (tokens.len(), self.dtype);
        let mut prof = Profile::new(g);
        let (tok, pos) = (g.upload_u32(tokens)?, g.upload_u32(positions)?);
        // The residual stream is f32; product outputs and the other activations are in the weights'
        // type (f32 models stay f32 throughout).
        let x = g.alloc(DType::F32, rows * d)?;
        let h = g.alloc(dt, rows * d)?;
        let qkv = g.alloc(dt, rows * 3 * d)?;
        let (q, k, v) = (g.alloc(dt, rows * d)?, g.alloc(dt, rows * d)?, g.alloc(dt, rows * d)?);
        let ctx = g.alloc(dt, rows * d)?;
        let attn = g.alloc(dt, rows * d)?;
        // The MLP runs over blocks of rows, so its wide activation is bounded by MLP_ROWS × inner.
        let block = MLP_ROWS.min(rows).max(1);
        let mid = g.alloc(dt, block * inter)?;
        let mlp = g.alloc(dt, rows * d)?;
        g.embed(
            (tokens, tok.view()),
            (positions, pos.view()),
            self.wte.view(),
            self.wpe.as_ref().map(DevBuf::view),
            x.view(),
            d,
        )?;
        prof.mark("embed");
        fn lin(w: &DevBuf, outputs: usize, inputs: usize, inputs_major: bool) -> Linear<'_> {
            Linear { w: w.view(), outputs, inputs, inputs_major }
        }
        fn pair(p: &(DevBuf, DevBuf)) -> (View<'_>, View<'_>) {
            (p.0.view(), p.1.view())
        }
        let major = !self.neox;
        let rotary = self.rotary.as_ref().map(|(c, s, r)| (c.view(), s.view(), *r));
        for l in &self.layers {
            g.layer_norm(x.view(), pair(&l.ln1), self.eps, h.view(), rows, d)?;
            prof.mark("layer norm");
            g.linear(h.view(), &lin(&l.qkv, 3 * d, d, major), qkv.view(), rows)?;
            prof.mark("qkv product");
            g.qkv_split(
                qkv.view(),
                l.qkv_b.view(),
                (positions, pos.view()),
                rotary,
                self.neox,
                (q.view(), k.view(), v.view()),
                (rows, heads, hd),
            )?;
            prof.mark("qkv split + rotary");
            g.attention_with(self.attention, (q.view(), k.view(), v.view()), ctx.view(), spans, (rows, heads, hd))?;
            prof.mark("attention");
            g.linear(ctx.view(), &lin(&l.proj, d, d, major), attn.view(), rows)?;
            prof.mark("attention output product");
            let run_mlp = |input: View<'_>, prof: &mut Profile<'_>| -> memsteer_kernels::Result<()> {
                for r0 in (0..rows).step_by(block) {
                    let n = block.min(rows - r0);
                    let m = mid.view().slice(0, n * inter)?;
                    g.linear(input.slice(r0 * d, n * d)?, &lin(&l.up, inter, d, major), m, n)?;
                    prof.mark("mlp products");
                    g.bias_act(m, l.up_b.view(), m, (n, inter), self.act)?;
                    prof.mark("bias + gelu");
                    g.linear(m, &lin(&l.down, d, inter, major), mlp.view().slice(r0 * d, n * d)?, n)?;
                    prof.mark("mlp products");
                }
                Ok(())
            };
            if self.parallel {
                g.layer_norm(x.view(), pair(&l.ln2), self.eps, h.view(), rows, d)?;
                prof.mark("layer norm");
                run_mlp(h.view(), &mut prof)?;
                g.residual(x.view(), (attn.view(), l.proj_b.view()), Some((mlp.view(), l.down_b.view())), rows, d)?;
                prof.mark("residual");
            } else {
                g.residual(x.view(), (attn.view(), l.proj_b.view()), None, rows, d)?;
                g.layer_norm(x.view(), pair(&l.ln2), self.eps, h.view(), rows, d)?;
                prof.mark("layer norm");
                run_mlp(h.view(), &mut prof)?;
                g.residual(x.view(), (mlp.view(), l.down_b.view()), None, rows, d)?;
                prof.mark("residual");
            }
        }
        // Free the layer buffers before the output layer's chunk is allocated.
        drop((qkv, q, k, v, ctx, attn, mid, mlp));
        let Some(targets) = targets else {
            let hs = g.alloc(DType::F32, rows * d)?;
            g.layer_norm(x.view(), pair(&self.ln_f), self.eps, hs.view(), rows, d)?;
            return g.download_f32(hs.view());
        };
        let tgt = g.upload_u32(targets)?;
        let lp = g.alloc(DType::F32, rows)?;
        if let Some(head) = &self.head16 {
            let hf = g.alloc(DType::F16, rows * d)?;
            g.layer_norm(x.view(), pair(&self.ln_f), self.eps, hf.view(), rows, d)?;
            let e = Linear { w: head.view(), outputs: self.vocab, inputs: d, inputs_major: false };
            g.log_prob_targets(hf.view(), &e, tgt.view(), lp.view(), None, rows, self.chunk, self.logits)?;
        } else {
            g.layer_norm(x.view(), pair(&self.ln_f), self.eps, h.view(), rows, d)?;
            let w = self.out.as_ref().unwrap_or(&self.wte).view();
            let e = Linear { w, outputs: self.vocab, inputs: d, inputs_major: false };
            let logits = if self.dtype == DType::F16 { self.logits } else { DType::F32 };
            g.log_prob_targets(h.view(), &e, tgt.view(), lp.view(), None, rows, self.chunk, logits)?;
        }
        prof.mark("output layer");
        let out = g.download_f32(lp.view());
        prof.report(rows);
        out
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
    gpu: GpuModel,
}

impl GpuDecoder {
    /// Loads `dir` on the CPU and onto `device`.
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        Ok(Self { cpu: crate::Model::load(dir)?, gpu: GpuModel::load(dir, device)? })
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
