//! The CPU runtime: every architecture of [`crate::arch`] through one block loop, on packed batches.

use std::path::Path;
use std::sync::atomic::{AtomicU8, Ordering};

use memsteer_kernels::bf16::{PackedBf16, Source};
use memsteer_kernels::{CpuKernels, PackedF32};
use safetensors::Dtype;

use crate::arch::{self, Affine, Arch, LayerTensors, Mlp, Norm, Positions, QkNorm, Tensors};
use crate::block::{self, Backend, NormSite};
use crate::ops::{self, Heads, KvCache, Layout};
use crate::weights::Weights;
use crate::{Decoder, LmError, Result};

/// How the CPU multiplies a model's linear layers and output embedding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Compute {
    /// bf16 products (f32 accumulation) for checkpoints stored in bf16 on CPUs with AMX (where they
    /// measure about 2× faster than f32); f32 otherwise, including f16 checkpoints (Pythia: their exact
    /// `hi + lo` bf16 path measured 1.8× faster than f32 on AMX, within 3e-5 relative, but their panels
    /// feed the memorisation estimators, so exactness is the default; `Compute::Bf16` opts in).
    #[default]
    Auto,
    /// f32 products whatever the storage (half-precision weights are widened exactly).
    F32,
    /// bf16 products on any CPU (the portable kernel where there is no bf16 hardware); f32 weights
    /// are rounded to bf16, f16 weights kept exactly as `hi + lo` pairs.
    Bf16,
}

impl Compute {
    /// Parses `auto`, `f32` or `bf16`.
    pub fn parse(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(Compute::Auto),
            "f32" => Ok(Compute::F32),
            "bf16" => Ok(Compute::Bf16),
            other => Err(LmError::Input(format!("unknown compute mode {other:?}: expected auto, f32 or bf16"))),
        }
    }

    /// The name [`Compute::parse`] takes.
    pub fn name(self) -> &'static str {
        match self {
            Compute::Auto => "auto",
            Compute::F32 => "f32",
            Compute::Bf16 => "bf16",
        }
    }
}

static DEFAULT_COMPUTE: AtomicU8 = AtomicU8::new(0);

/// Sets the [`Compute`] that [`Model::load`] and [`Model::load_arch`] use in this process (the
/// command line's `--compute`).
pub fn set_default_compute(c: Compute) {
    DEFAULT_COMPUTE.store(c as u8, Ordering::Relaxed);
}

/// The [`Compute`] of [`set_default_compute`] (initially [`Compute::Auto`]).
pub fn default_compute() -> Compute {
    match DEFAULT_COMPUTE.load(Ordering::Relaxed) {
        1 => Compute::F32,
        2 => Compute::Bf16,
        _ => Compute::Auto,
    }
}

/// A weight matrix packed for the CPU's kernels: bf16 panels (bf16 compute) or f32 panels (f32
/// compute on CPUs with AVX-512).
#[derive(Debug)]
pub(crate) enum Packed {
    Bf16(PackedBf16),
    F32(PackedF32),
}

impl Packed {
    /// `(outputs, inputs)`.
    fn shape(&self) -> (usize, usize) {
        match self {
            Packed::Bf16(p) => (p.n(), p.k()),
            Packed::F32(p) => (p.n(), p.k()),
        }
    }

    /// Output `j`'s row (`k` values) into `out`, as packed (rounded as packing rounds).
    fn row_into(&self, j: usize, out: &mut [f32]) {
        match self {
            Packed::Bf16(p) => out.iter_mut().enumerate().for_each(|(i, x)| *x = p.get(j, i)),
            Packed::F32(p) => p.row_into(j, out),
        }
    }

    /// The `n × k` matrix back in f32, outputs major. Sequential on purpose: it runs inside a
    /// `OnceLock` initialiser, where a rayon join could make this thread steal a task that waits on the
    /// same lock.
    fn unpack(&self) -> Vec<f32> {
        let (n, k) = self.shape();
        let mut out = vec![0.0f32; n * k];
        for (j, row) in out.chunks_mut(k.max(1)).enumerate() {
            self.row_into(j, row);
        }
        out
    }

    /// Whether the packed matrix holds every value of `w` (outputs major) bit for bit.
    fn holds_exactly(&self, w: &[f32]) -> bool {
        use rayon::prelude::*;
        let k = self.shape().1.max(1);
        w.par_chunks(k).enumerate().all(|(j, want)| {
            let mut row = vec![0.0f32; want.len()];
            self.row_into(j, &mut row);
            row.iter().zip(want).all(|(a, b)| a.to_bits() == b.to_bits())
        })
    }

    fn matmul_transposed(&self, a: &[f32], m: usize, out: &mut [f32]) -> Result<()> {
        match self {
            Packed::Bf16(p) => p.matmul_transposed(a, m, out)?,
            Packed::F32(p) => p.matmul_transposed(a, m, out)?,
        }
        Ok(())
    }
}

/// How [`pack`] packs.
#[derive(Debug, Clone, Copy)]
enum PackAs {
    /// bf16 panels; f16 weights kept as `hi + lo` when `exact`.
    Bf16 { exact: bool },
    /// f32 panels.
    F32,
}

/// A layer's linear weights packed for the CPU's kernels.
#[derive(Debug)]
pub(crate) struct PackedLayer {
    qkv: Packed,
    attn_out: Packed,
    up: Packed,
    gate: Option<Packed>,
    down: Packed,
}

/// Which linear weight of a layer.
#[derive(Debug, Clone, Copy)]
enum Slot {
    Qkv,
    AttnOut,
    Up,
    Gate,
    Down,
}

/// A model loaded for the CPU: its description and its tensors in `f32`, whatever their storage type;
/// the linear layers and the output embedding also packed for the kernels (bf16 panels with bf16
/// compute, f32 panels with f32 compute on CPUs with AVX-512; the layers' unpacked copies are then
/// dropped).
#[derive(Debug)]
pub struct Model {
    arch: Arch,
    w: Tensors<Vec<f32>>,
    packed: Option<(Vec<PackedLayer>, Packed)>,
    /// What the products run in, for logs.
    compute: String,
    /// An output embedding whose packed panels hold it exactly has its f32 copy dropped at load
    /// (`w.output()` is then empty; a tied one's rows are read from the panels): scoring reads only the
    /// panels, and the few users of the matrix itself (steering) get it rebuilt from them here on first
    /// use.
    head: std::sync::OnceLock<Vec<f32>>,
}

impl Model {
    /// Loads the weights of `dir` (`model.safetensors` or its shards) for `arch` (which
    /// [`Model::load`] reads from `dir/config.json`), computing as [`default_compute`] says.
    pub fn load_arch(dir: &Path, arch: Arch) -> Result<Self> {
        Self::load_arch_with(dir, arch, default_compute())
    }

    /// Loads `dir/config.json` and the weights next to it, computing as `compute` says.
    pub fn load_with(dir: &Path, compute: Compute) -> Result<Self> {
        Self::load_arch_with(dir, Arch::from_file(&dir.join("config.json"))?, compute)
    }

    /// [`Model::load_arch`] computing as `compute` says.
    pub fn load_arch_with(dir: &Path, mut arch: Arch, compute: Compute) -> Result<Self> {
        arch.validate()?;
        let weights = Weights::open(dir)?;
        if arch.embed_scale.is_some() {
            let specs = arch.tensors();
            if let Some(e) = specs.iter().find(|s| s.slot == arch::Slot::Embed) {
                arch.round_embed_scale(weights.raw(&e.name_refs(), &e.shape)?.0);
            }
        }
        let (has_f32, has_f16) = (weights.has_dtype(Dtype::F32), weights.has_dtype(Dtype::F16));
        // `Some(exact)`: bf16 products, f16 weights kept as hi + lo pairs when `exact`. The kernel
        // level is asked for only when it matters (a bad MEMSTEER_CPU_KERNELS fails bf16 loads only).
        let bf16 = match compute {
            Compute::F32 => None,
            Compute::Auto => {
                let bf16_only = !has_f32 && !has_f16;
                (bf16_only && memsteer_kernels::cpu_kernels()?.bf16_pays_off()).then_some(false)
            }
            Compute::Bf16 => Some(has_f16 && !has_f32),
        };
        // f32 products run on packed panels where the AVX-512 kernel exists (from the avx512 level
        // up), on matrixmultiply otherwise (also when MEMSTEER_CPU_KERNELS is unusable: only bf16
        // loads, which need a kernel level, fail on it).
        let pack_as = match bf16 {
            Some(exact) => Some(PackAs::Bf16 { exact }),
            None => memsteer_kernels::cpu_kernels().is_ok_and(|l| l >= CpuKernels::Avx512).then_some(PackAs::F32),
        };
        let (mut w, mapped) = load_unpacked(&arch, &weights, pack_as)?;
        if let Norm::RmsNorm { unit_offset: true, .. } = arch.norm {
            // Gemma's norms multiply by `1 + w`: held as such, so every norm is `x · rstd · g`.
            let one_plus = |v: &mut Vec<f32>| v.iter_mut().for_each(|x| *x += 1.0);
            one_plus(&mut w.final_norm.0);
            for l in &mut w.layers {
                one_plus(&mut l.norm1.0);
                one_plus(&mut l.norm2.0);
                if let Some((q, k)) = &mut l.qk_norm {
                    one_plus(q);
                    one_plus(k);
                }
                if let Some((a, b)) = &mut l.post_norms {
                    one_plus(&mut a.0);
                    one_plus(&mut b.0);
                }
            }
        }
        let packed = match pack_as {
            None => None,
            Some(how) => Some(pack(&arch, &mut w, how, &mapped)?),
        };
        // An output embedding kept exactly by its panels (f32 panels, bf16 weights in bf16 panels, f16
        // weights as hi + lo) is not held twice: checked value by value, not assumed. A tied one's rows
        // are then read from the panels.
        if let Some((_, output)) = &packed
            && output.holds_exactly(w.output())
        {
            match &mut w.head {
                Some(head) => *head = Vec::new(),
                None => w.embed = Vec::new(),
            }
        }
        let compute = match pack_as {
            None => "f32".to_string(),
            Some(PackAs::F32) => "f32 on avx512 kernels".to_string(),
            Some(PackAs::Bf16 { exact }) => format!(
                "bf16 on {} kernels{}",
                memsteer_kernels::cpu_kernels()?,
                if exact { " (f16 weights kept exactly as hi + lo)" } else { "" }
            ),
        };
        Ok(Self { arch, w, packed, compute, head: std::sync::OnceLock::new() })
    }

    /// What the products run in and on which kernels, e.g. `f32` or `bf16 on amx kernels`.
    pub fn compute(&self) -> &str {
        &self.compute
    }

    /// The precision class of its products, `f32` or `bf16`: results of one class agree with each
    /// other to rounding, results of different classes to the bounds in `docs/formats.md`, so the
    /// parts of one panel are all scored in one class ([`crate::score`] refuses to mix them).
    pub fn precision(&self) -> &'static str {
        if let Some((_, Packed::Bf16(_))) = &self.packed { "bf16" } else { "f32" }
    }

    /// The architecture.
    pub fn arch(&self) -> &Arch {
        &self.arch
    }

    /// The packed forward pass; `caches` is empty, or holds one cache per sequence, which each
    /// sequence continues and extends.
    fn run(&self, seqs: &[&[u32]], mut caches: Vec<&mut KvCache>) -> Result<Vec<f32>> {
        let pasts: Vec<usize> = caches.iter().map(|c| c.len()).collect();
        let lay = ops::layout(self, seqs, &pasts)?;
        let packed = self.packed.as_ref().map(|(l, o)| (l.as_slice(), o));
        let mut backend = Cpu::new(&self.arch, &lay, seqs, &mut caches, packed);
        let hidden = block::forward(&self.arch, &self.w, &mut backend)?;
        for (c, s) in caches.iter_mut().zip(seqs) {
            c.advance(s.len());
        }
        Ok(hidden)
    }
}

/// Packs every layer's linear weights and the output embedding and drops the layers' unpacked
/// copies (the embeddings and norms stay f32).
fn pack(
    arch: &Arch,
    w: &mut Tensors<Vec<f32>>,
    how: PackAs,
    mapped: &Mapped<'_>,
) -> Result<(Vec<PackedLayer>, Packed)> {
    let source = match arch.weights {
        arch::WeightLayout::InputsMajor => Source::InputsMajor,
        arch::WeightLayout::OutputsMajor => Source::OutputsMajor,
    };
    let (d, inner) = (arch.dim, arch.inner);
    let packed = |t: &[f32], (inputs, outputs): (usize, usize), source: Source| {
        Ok::<_, LmError>(match how {
            PackAs::Bf16 { exact } => Packed::Bf16(PackedBf16::pack(t, outputs, inputs, source, exact)?),
            PackAs::F32 => Packed::F32(PackedF32::pack(t, outputs, inputs, source)?),
        })
    };
    use arch::{LayerSlot, Part, Slot};
    let one = |t: &mut Vec<f32>, slot: Slot, shape: (usize, usize)| {
        if let Some(pieces) = mapped.specs.get(&slot) {
            return mapped.pack(pieces, shape, how, source);
        }
        let p = packed(t, shape, source)?;
        *t = Vec::new();
        Ok::<_, LmError>(p)
    };
    let mut layers = Vec::with_capacity(w.layers.len());
    for (i, l) in w.layers.iter_mut().enumerate() {
        let at = |s: fn(Part) -> LayerSlot| Slot::Layer(i, s(Part::Weight));
        layers.push(PackedLayer {
            qkv: one(&mut l.qkv.0, at(LayerSlot::Qkv), (d, arch.qkv_width()))?,
            attn_out: one(&mut l.attn_out.0, at(LayerSlot::AttnOut), (arch.attn_dim(), d))?,
            up: one(&mut l.up.0, at(LayerSlot::Up), (d, inner))?,
            gate: l.gate.as_mut().map(|g| one(&mut g.0, at(LayerSlot::Gate), (d, inner))).transpose()?,
            down: one(&mut l.down.0, at(LayerSlot::Down), (inner, d))?,
        });
    }
    let head = if arch.tied { Slot::Embed } else { Slot::Head };
    let output = match mapped.specs.get(&head) {
        Some(pieces) => mapped.pack(pieces, (d, arch.vocab), how, Source::OutputsMajor)?,
        None => packed(w.output(), (d, arch.vocab), Source::OutputsMajor)?,
    };
    Ok((layers, output))
}

/// The tensors as f32, except those left in the mapped file for [`pack`] to pack from there (empty
/// here, listed in the returned [`Mapped`]): with packing, the products' weights, packed one matrix at a
/// time and their pages released, so that no f32 copy of them ever exists and resident memory stays
/// near the panels' size; and an output embedding (or the tied embedding) that the panels hold exactly
/// by construction (f32 panels, or bf16 panels of bf16 weights).
fn load_unpacked<'w>(
    arch: &Arch,
    weights: &'w Weights,
    pack_as: Option<PackAs>,
) -> Result<(Tensors<Vec<f32>>, Mapped<'w>)> {
    let mut mapped = Mapped { weights, specs: std::collections::HashMap::new() };
    // Inputs-major products (GPT-2's Conv1D) are packed from the file into f32 panels only.
    let lazy = match pack_as {
        Some(PackAs::F32) => true,
        Some(PackAs::Bf16 { .. }) => arch.weights == arch::WeightLayout::OutputsMajor,
        None => false,
    };
    let exact_panels = |stored: Dtype| match pack_as {
        Some(PackAs::F32) => true,
        Some(PackAs::Bf16 { .. }) => stored == Dtype::BF16,
        None => false,
    };
    let w = arch.load_tensors(
        |spec| {
            let products = matches!(
                spec.slot,
                arch::Slot::Layer(
                    _,
                    arch::LayerSlot::Qkv(arch::Part::Weight)
                        | arch::LayerSlot::AttnOut(arch::Part::Weight)
                        | arch::LayerSlot::Up(arch::Part::Weight)
                        | arch::LayerSlot::Gate(arch::Part::Weight)
                        | arch::LayerSlot::Down(arch::Part::Weight)
                )
            );
            let output = matches!(spec.slot, arch::Slot::Head) || (spec.slot == arch::Slot::Embed && arch.tied);
            if lazy && (products || output) {
                // Checked now (name, shape, type), packed later.
                let (stored, _) = weights.raw(&spec.name_refs(), &spec.shape)?;
                if products || exact_panels(stored) {
                    mapped.specs.entry(spec.slot).or_default().push(spec.clone());
                    return Ok(Vec::new());
                }
            }
            weights.tensor(&spec.name_refs(), &spec.shape)
        },
        |pieces| Ok(pieces.concat()),
    )?;
    Ok((w, mapped))
}

/// Matrices left in the mapped weight files at load (by slot, their pieces in order), for [`pack`] to
/// pack straight from there.
struct Mapped<'w> {
    weights: &'w Weights,
    specs: std::collections::HashMap<arch::Slot, Vec<arch::TensorSpec>>,
}

impl Mapped<'_> {
    /// Packs the matrix of `(inputs, outputs)` that `pieces` make (stacked along their first dimension)
    /// straight from the mapped file, row by row (each value widened to f32 exactly as
    /// [`Weights::tensor`] widens it), then releases the pieces' pages. Outputs-major pieces are rows of
    /// outputs; an inputs-major matrix (one piece) is packed into f32 panels from its rows of inputs.
    fn pack(&self, pieces: &[arch::TensorSpec], (k, n): (usize, usize), how: PackAs, source: Source) -> Result<Packed> {
        let raws = pieces
            .iter()
            .map(|p| Ok((self.weights.raw(&p.name_refs(), &p.shape)?, p.shape[0])))
            .collect::<Result<Vec<_>>>()?;
        let width = |dtype: Dtype| if dtype == Dtype::F32 { 4 } else { 2 };
        if raws.is_empty() {
            return Err(LmError::Input(format!("internal: no tensor for a matrix of {k} inputs × {n} outputs")));
        }
        if source == Source::InputsMajor {
            let (((dtype, bytes), _), PackAs::F32, [spec]) = (&raws[0], how, pieces) else {
                return Err(LmError::Input("internal: inputs-major weights are packed whole, into f32 panels".into()));
            };
            if spec.shape != [k, n] {
                return Err(LmError::Input(format!("internal: {:?} is not {k} inputs × {n} outputs", spec.names[0])));
            }
            let w = width(*dtype);
            let segment = |i: usize, j0: usize, buf: &mut [f32]| {
                let at = i * n + j0;
                crate::weights::decode(*dtype, &bytes[at * w..(at + buf.len()) * w], buf);
            };
            let packed = Packed::F32(PackedF32::pack_by_input_rows(n, k, &segment)?);
            self.weights.release(&spec.name_refs());
            return Ok(packed);
        }
        if let Some(p) = pieces.iter().find(|p| p.shape.len() != 2 || p.shape[1] != k) {
            return Err(LmError::Input(format!("internal: {:?} is not a matrix of {k} inputs", p.names[0])));
        }
        if raws.iter().map(|r| r.1).sum::<usize>() != n {
            return Err(LmError::Input(format!(
                "internal: the pieces of {:?} do not make {n} outputs",
                pieces[0].names[0]
            )));
        }
        let row = |j: usize, buf: &mut [f32]| {
            let mut j = j;
            for ((dtype, bytes), rows) in &raws {
                if j < *rows {
                    let w = width(*dtype);
                    crate::weights::decode(*dtype, &bytes[j * k * w..(j + 1) * k * w], buf);
                    return;
                }
                j -= rows;
            }
        };
        let packed = match how {
            PackAs::Bf16 { exact } => Packed::Bf16(PackedBf16::pack_by_rows(n, k, exact, &row)?),
            PackAs::F32 => Packed::F32(PackedF32::pack_by_rows(n, k, &row)?),
        };
        for p in pieces {
            self.weights.release(&p.name_refs());
        }
        Ok(packed)
    }
}

/// The CPU backend of the block loop for one packed batch (and, when decoding, its KV cache).
pub(crate) struct Cpu<'a, 'b> {
    arch: &'a Arch,
    lay: &'a Layout,
    seqs: &'a [&'a [u32]],
    /// One cache per sequence, or none.
    caches: &'a mut [&'b mut KvCache],
    /// Rotary angles of only the positions this call sees (a decoding step costs one row), and the
    /// table row of every batch row.
    rotary: (Vec<f32>, Vec<f32>, Vec<usize>),
    /// The windowed layers' own rotary table, when they have one (Gemma 3's local base).
    local_rotary: Option<(Vec<f32>, Vec<f32>)>,
    /// Buffers the operations gave back, for the next ones (every operation overwrites its output).
    pool: Vec<Vec<f32>>,
    /// The layers' packed weights and the packed output embedding, when the model has them.
    packed: Option<(&'a [PackedLayer], &'a Packed)>,
    /// The layer being computed.
    layer: usize,
}

impl<'a, 'b> Cpu<'a, 'b> {
    pub(crate) fn new(
        arch: &'a Arch,
        lay: &'a Layout,
        seqs: &'a [&'a [u32]],
        caches: &'a mut [&'b mut KvCache],
        packed: Option<(&'a [PackedLayer], &'a Packed)>,
    ) -> Self {
        let first = lay.positions.iter().min().copied().unwrap_or(0);
        let last = lay.positions.iter().max().map_or(first, |p| p + 1);
        let (cos, sin) = arch.rotary_table((first, last));
        let local_rotary = arch.local_rotary_table((first, last));
        let rows = lay.positions.iter().map(|p| p - first).collect();
        Self { arch, lay, seqs, caches, rotary: (cos, sin, rows), local_rotary, pool: Vec::new(), packed, layer: 0 }
    }

    /// A buffer of `len` values (contents unspecified).
    fn take(&mut self, len: usize) -> Vec<f32> {
        match self.pool.iter().position(|b| b.len() == len) {
            Some(i) => self.pool.swap_remove(i),
            None => vec![0.0; len],
        }
    }

    fn give(&mut self, buf: Vec<f32>) {
        self.pool.push(buf);
    }

    fn linear(&mut self, x: &[f32], slot: Slot, w: &[f32], (inputs, outputs): (usize, usize)) -> Result<Vec<f32>> {
        let rows = self.lay.rows();
        let mut out = self.take(rows * outputs);
        match self.packed.map(|(p, _)| &p[self.layer]) {
            Some(p) => {
                let packed = match slot {
                    Slot::Qkv => &p.qkv,
                    Slot::AttnOut => &p.attn_out,
                    Slot::Up => &p.up,
                    Slot::Gate => p.gate.as_ref().ok_or_else(|| LmError::Input("internal: no packed gate".into()))?,
                    Slot::Down => &p.down,
                };
                packed.matmul_transposed(x, rows, &mut out)?;
            }
            None => ops::linear(x, w, self.arch.weights, (rows, inputs, outputs), &mut out)?,
        }
        Ok(out)
    }
}

impl Backend for Cpu<'_, '_> {
    type Act = Vec<f32>;
    type W = Vec<f32>;

    fn begin_layer(&mut self, index: usize) -> Result<()> {
        self.layer = index;
        Ok(())
    }

    fn embed(&mut self, embed: &Vec<f32>, positions: Option<&Vec<f32>>) -> Result<Vec<f32>> {
        let learned = if self.arch.positions == Positions::Learned { positions.map(Vec::as_slice) } else { None };
        let tokens = self.seqs.iter().flat_map(|s| s.iter());
        let mut x = match self.packed {
            // A tied embedding held only in its panels (see `Model::load_arch_with`).
            Some((_, output)) if embed.is_empty() => {
                ops::embed_rows(tokens, &self.lay.positions, |t, row| output.row_into(t, row), learned, self.arch.dim)
            }
            _ => ops::embed(tokens, &self.lay.positions, (embed, learned), self.arch.dim),
        };
        if let Some(scale) = self.arch.embed_scale {
            x.iter_mut().for_each(|v| *v *= scale);
        }
        Ok(x)
    }

    fn norm(&mut self, x: &Vec<f32>, p: &Affine<Vec<f32>>, _: NormSite) -> Result<Vec<f32>> {
        let mut out = self.take(x.len());
        match self.arch.norm {
            Norm::LayerNorm { eps } => ops::layer_norm(x, (&p.0, arch::bias(p)?), eps, &mut out),
            // Gemma's `1 + w` weights were offset at load.
            Norm::RmsNorm { eps, .. } => ops::rms_norm(x, &p.0, eps, &mut out),
        }
        Ok(out)
    }

    fn qkv(&mut self, index: usize, h: Vec<f32>, l: &LayerTensors<Vec<f32>>) -> Result<Vec<f32>> {
        let a = self.arch;
        let mut qkv = self.linear(&h, Slot::Qkv, &l.qkv.0, (a.dim, a.qkv_width()))?;
        self.give(h);
        if let Some(b) = &l.qkv.1 {
            ops::bias_act(&mut qkv, b, None);
        }
        let off = a.qkv_offsets();
        if let Some((qn, kn)) = &l.qk_norm {
            // Per head (Qwen 3: the weights are one head long), or over all heads at once (OLMo 2).
            let width = if a.qk_norm == QkNorm::Whole { a.head_dim * a.heads } else { a.head_dim };
            let kv_width = if a.qk_norm == QkNorm::Whole { a.head_dim * a.kv_heads } else { a.head_dim };
            ops::qk_rms_norm(
                &mut qkv,
                (off, (a.heads, a.kv_heads), a.head_dim),
                (qn, kn),
                (width, kv_width),
                a.norm_eps(),
            );
        }
        let (cos, sin, rows) = &self.rotary;
        let (cos, sin) = match &self.local_rotary {
            Some((c, s)) if a.sliding_layer(index) => (c, s),
            _ => (cos, sin),
        };
        ops::rotate(&mut qkv, (off, (a.heads, a.kv_heads), a.rotary_dims() / 2), (cos, sin), rows, false);
        Ok(qkv)
    }

    fn attention(&mut self, index: usize, qkv: Vec<f32>, _: &LayerTensors<Vec<f32>>) -> Result<Vec<f32>> {
        let (a, lay) = (self.arch, self.lay);
        let (t, heads, kv_heads, hd) = (lay.rows(), a.heads, a.kv_heads, a.head_dim);
        let shape = (heads, heads / kv_heads, hd);
        let scores = a.scores(index);
        let off = a.qkv_offsets();
        let mut ctx = self.take(t * a.attn_dim());
        let fused = |base| Heads { data: &qkv, row_stride: off.row, base, head_stride: off.head };
        if self.caches.is_empty() {
            let kv = |s: usize| (fused(off.k), fused(off.v), lay.starts[s]);
            ops::attention(fused(off.q), &kv, lay, shape, scores, &mut ctx)?;
        } else {
            // Each sequence's new keys and values join its own cache, which its queries then read.
            let kv = kv_heads * hd;
            for (s, c) in self.caches.iter_mut().enumerate() {
                let rows = lay.starts[s]..lay.starts[s + 1];
                let (mut k, mut v) = (vec![0.0f32; rows.len() * kv], vec![0.0f32; rows.len() * kv]);
                for (i, r) in rows.enumerate() {
                    let row = &qkv[r * off.row..(r + 1) * off.row];
                    for h in 0..kv_heads {
                        let (dst, at) = (i * kv + h * hd, h * off.head);
                        k[dst..dst + hd].copy_from_slice(&row[off.k + at..off.k + at + hd]);
                        v[dst..dst + hd].copy_from_slice(&row[off.v + at..off.v + at + hd]);
                    }
                }
                c.extend(index, &k, &v);
            }
            let caches: Vec<&KvCache> = self.caches.iter().map(|c| &**c).collect();
            let cached = |data| Heads { data, row_stride: kv, base: 0, head_stride: hd };
            let kv = |s: usize| {
                let (ks, vs) = caches[s].layer(index);
                (cached(ks), cached(vs), 0)
            };
            ops::attention(fused(off.q), &kv, lay, shape, scores, &mut ctx)?;
        }
        self.give(qkv);
        Ok(ctx)
    }

    fn attention_out(&mut self, ctx: Vec<f32>, l: &LayerTensors<Vec<f32>>) -> Result<Vec<f32>> {
        let out = self.linear(&ctx, Slot::AttnOut, &l.attn_out.0, (self.arch.attn_dim(), self.arch.dim))?;
        self.give(ctx);
        Ok(out)
    }

    fn mlp(&mut self, h: Vec<f32>, l: &LayerTensors<Vec<f32>>) -> Result<Vec<f32>> {
        let (d, inner) = (self.arch.dim, self.arch.inner);
        let mut mid = self.linear(&h, Slot::Up, &l.up.0, (d, inner))?;
        match (self.arch.mlp, &l.gate) {
            (Mlp::Plain(act), _) => ops::bias_act(&mut mid, arch::bias(&l.up)?, Some(act)),
            (mlp @ (Mlp::SwiGlu | Mlp::GeGlu), Some(gate)) => {
                if let Some(b) = &l.up.1 {
                    ops::bias_act(&mut mid, b, None);
                }
                let mut g = self.linear(&h, Slot::Gate, &gate.0, (d, inner))?;
                if let Some(b) = &gate.1 {
                    ops::bias_act(&mut g, b, None);
                }
                if mlp == Mlp::SwiGlu {
                    ops::silu_mul(&g, &mut mid);
                } else {
                    ops::gelu_tanh_mul(&mut g, &mut mid);
                }
                self.give(g);
            }
            (Mlp::SwiGlu | Mlp::GeGlu, None) => {
                return Err(LmError::Input("internal: a gated MLP without its gate".into()));
            }
        }
        self.give(h);
        let out = self.linear(&mid, Slot::Down, &l.down.0, (inner, d))?;
        self.give(mid);
        Ok(out)
    }

    fn copy(&mut self, x: &Vec<f32>) -> Result<Vec<f32>> {
        let mut out = self.take(x.len());
        out.copy_from_slice(x);
        Ok(out)
    }

    fn recycle(&mut self, x: Vec<f32>) -> Result<()> {
        self.give(x);
        Ok(())
    }

    fn residual(
        &mut self,
        x: &mut Vec<f32>,
        (mut a, bias_a): (Vec<f32>, Option<&Vec<f32>>),
        b: Option<(Vec<f32>, Option<&Vec<f32>>)>,
    ) -> Result<()> {
        if let Some(bias) = bias_a {
            ops::bias_act(&mut a, bias, None);
        }
        match b {
            Some((mut b, bias_b)) => {
                if let Some(bias) = bias_b {
                    ops::bias_act(&mut b, bias, None);
                }
                ops::residual(x, &a, Some(&b));
                self.give(b);
            }
            None => ops::residual(x, &a, None),
        }
        self.give(a);
        Ok(())
    }
}

impl Decoder for Model {
    fn forward_packed(&self, seqs: &[&[u32]], cache: Option<&mut KvCache>) -> Result<Vec<f32>> {
        if cache.is_some() && seqs.len() != 1 {
            return Err(LmError::Input(format!("a KV cache continues one sequence, not {}", seqs.len())));
        }
        self.run(seqs, cache.into_iter().collect())
    }
    fn forward_cached(&self, seqs: &[&[u32]], caches: &mut [&mut KvCache]) -> Result<Vec<f32>> {
        if caches.len() != seqs.len() {
            return Err(LmError::Input(format!("{} KV caches for {} sequences", caches.len(), seqs.len())));
        }
        self.run(seqs, caches.iter_mut().map(|c| &mut **c).collect())
    }
    fn output_embedding(&self) -> &[f32] {
        match &self.packed {
            Some((_, output)) if self.w.output().is_empty() => self.head.get_or_init(|| output.unpack()),
            _ => self.w.output(),
        }
    }
    fn logit_softcap(&self) -> Option<f32> {
        self.arch.logit_softcap
    }
    fn output_log_probs(&self, hidden: &[f32], targets: &[u32], out: &mut [f32]) -> Result<()> {
        let cap = self.arch.logit_softcap;
        match &self.packed {
            Some((_, Packed::Bf16(output))) => {
                memsteer_kernels::log_prob_targets_bf16(hidden, output, targets, out, cap)?;
            }
            Some((_, Packed::F32(output))) => {
                memsteer_kernels::log_prob_targets_f32(hidden, output, targets, out, cap)?
            }
            None => memsteer_kernels::log_prob_targets_capped(
                &memsteer_kernels::Device::Cpu,
                hidden,
                self.w.output(),
                self.arch.dim,
                targets,
                out,
                cap,
            )?,
        }
        Ok(())
    }
    fn dim(&self) -> usize {
        self.arch.dim
    }
    fn context(&self) -> usize {
        self.arch.context
    }
    fn vocab(&self) -> usize {
        self.arch.vocab
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/lm").join(name)
    }

    /// The output embedding as stored (the input embedding when tied), widened to f32.
    fn stored_output(dir: &Path) -> Vec<f32> {
        let arch = Arch::from_file(&dir.join("config.json")).expect("config");
        let weights = Weights::open(dir).expect("weights");
        let w = arch
            .load_tensors(|spec| weights.tensor(&spec.name_refs(), &spec.shape), |pieces| Ok(pieces.concat()))
            .expect("tensors");
        w.head.unwrap_or(w.embed)
    }

    /// An output embedding that its panels hold exactly is not kept twice (a tied one's rows are read
    /// from the panels), and steering still gets the matrix bit for bit; one that bf16 panels round
    /// (f32 weights) keeps its f32 copy. Scoring on the panels alone equals scoring with the copy
    /// (`MEMSTEER_CPU_KERNELS` aside, the golden tests run the same path for every fixture).
    #[test]
    fn an_exactly_packed_output_embedding_is_held_once_and_rebuilt_bit_for_bit() {
        let avx512 = memsteer_kernels::cpu_kernels().is_ok_and(|l| l >= CpuKernels::Avx512);
        let cases = [
            // f16 weights in bf16 panels as hi + lo pairs.
            ("tiny-neox-pythia-f16", Compute::Bf16, true),
            // f32 panels (where the AVX-512 kernel packs; matrixmultiply multiplies the copy otherwise).
            ("tiny-neox-pythia-f16", Compute::F32, avx512),
            ("tiny-qwen3", Compute::F32, avx512),
            // Tied: GPT-2 with learned positions, f16 as hi + lo and f32; Gemma 3's scaled embedding.
            ("tiny-gpt2-f16-prefixed", Compute::Bf16, true),
            ("tiny-gpt2-f32", Compute::F32, avx512),
            ("tiny-gemma3", Compute::F32, avx512),
            // f32 weights rounded to bf16, untied and tied.
            ("tiny-qwen3", Compute::Bf16, false),
            ("tiny-gemma3", Compute::Bf16, false),
        ];
        let seqs: Vec<Vec<u32>> =
            (0..3u32).map(|s| (0..(5 + 4 * s)).map(|t| (t * 13 + s * 5) % 40).collect()).collect();
        let refs: Vec<&[u32]> = seqs.iter().map(Vec::as_slice).collect();
        for (name, compute, dropped) in cases {
            let dir = fixture(name);
            let model = Model::load_with(&dir, compute).expect("load");
            assert_eq!(model.w.output().is_empty(), dropped, "{name}, {compute:?}");
            // The same model with its f32 copy put back scores the same, bit for bit.
            if dropped {
                let mut copy = Model::load_with(&dir, compute).expect("load");
                let output = stored_output(&dir);
                match &mut copy.w.head {
                    Some(head) => *head = output,
                    None => copy.w.embed = output,
                }
                assert_eq!(
                    model.token_log_probs_batch(&refs).expect("panels"),
                    copy.token_log_probs_batch(&refs).expect("copy"),
                    "{name}, {compute:?}"
                );
            }
            let want = stored_output(&dir);
            let got = model.output_embedding();
            assert_eq!(got.len(), want.len(), "{name}, {compute:?}");
            assert!(got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()), "{name}, {compute:?}");
        }
    }

    /// `tiny-llama-gqa` with every tensor rounded to bf16 and stored as such, in a temporary directory.
    fn bf16_copy() -> std::path::PathBuf {
        let src = fixture("tiny-llama-gqa");
        let dst = std::env::temp_dir().join(format!("memsteer-bf16-copy-{}", std::process::id()));
        std::fs::create_dir_all(&dst).expect("dir");
        std::fs::copy(src.join("config.json"), dst.join("config.json")).expect("config");
        let bytes = std::fs::read(src.join("model.safetensors")).expect("weights");
        let st = safetensors::SafeTensors::deserialize(&bytes).expect("safetensors");
        let tensors: Vec<(String, Vec<usize>, Vec<u8>)> = st
            .tensors()
            .into_iter()
            .map(|(name, v)| {
                let mut vals = vec![0.0f32; v.shape().iter().product()];
                crate::weights::decode(v.dtype(), v.data(), &mut vals);
                let data = vals.iter().flat_map(|x| half::bf16::from_f32(*x).to_le_bytes()).collect();
                (name, v.shape().to_vec(), data)
            })
            .collect();
        let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
            .iter()
            .map(|(n, s, b)| {
                (n.clone(), safetensors::tensor::TensorView::new(Dtype::BF16, s.clone(), b).expect("view"))
            })
            .collect();
        safetensors::serialize_to_file(views, None, &dst.join("model.safetensors")).expect("write");
        dst
    }

    /// Packing straight from the mapped file (row by row, the q/k/v pieces stacked) gives the panels
    /// that packing the loaded f32 tensors gives, for f32 and bf16 storage and every packing; the
    /// bf16-stored head comes back from a loaded model bit for bit.
    #[test]
    fn packing_from_the_file_equals_packing_the_loaded_tensors() {
        use arch::{LayerSlot, Part, Slot};
        let bf16 = bf16_copy();
        let f32_dir = fixture("tiny-llama-gqa");
        let cases = [
            (&f32_dir, PackAs::F32),
            (&f32_dir, PackAs::Bf16 { exact: false }),
            (&bf16, PackAs::Bf16 { exact: false }),
            (&bf16, PackAs::Bf16 { exact: true }),
            (&bf16, PackAs::F32),
        ];
        for (dir, how) in cases {
            let arch = Arch::from_file(&dir.join("config.json")).expect("config");
            let weights = Weights::open(dir).expect("weights");
            let mapped = Mapped { weights: &weights, specs: std::collections::HashMap::new() };
            for slot in [
                Slot::Layer(0, LayerSlot::Qkv(Part::Weight)),
                Slot::Layer(1, LayerSlot::Down(Part::Weight)),
                Slot::Head,
            ] {
                let pieces: Vec<arch::TensorSpec> = arch.tensors().into_iter().filter(|t| t.slot == slot).collect();
                assert!(!pieces.is_empty(), "{slot:?}");
                let k = pieces[0].shape[1];
                let n_out: usize = pieces.iter().map(|p| p.shape[0]).sum();
                let from_file =
                    mapped.pack(&pieces, (k, n_out), how, Source::OutputsMajor).expect("pack from the file");
                let loaded: Vec<f32> =
                    pieces.iter().flat_map(|p| weights.tensor(&p.name_refs(), &p.shape).expect("tensor")).collect();
                let n = loaded.len() / k;
                let eager = match how {
                    PackAs::Bf16 { exact } => {
                        Packed::Bf16(PackedBf16::pack(&loaded, n, k, Source::OutputsMajor, exact).expect("pack"))
                    }
                    PackAs::F32 => Packed::F32(PackedF32::pack(&loaded, n, k, Source::OutputsMajor).expect("pack")),
                };
                assert_eq!(from_file.shape(), (n, k), "{slot:?}");
                let (mut a, mut b) = (vec![0.0f32; k], vec![0.0f32; k]);
                for j in 0..n {
                    from_file.row_into(j, &mut a);
                    eager.row_into(j, &mut b);
                    assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()), "{slot:?} {how:?} row {j}");
                }
                // Exact packings hold the stored values; bf16 storage is exact in every packing.
                if matches!(how, PackAs::F32) || dir == &bf16 {
                    assert!(from_file.holds_exactly(&loaded), "{slot:?} {how:?}");
                }
            }
        }
        // GPT-2's inputs-major products, into f32 panels, from f32 and f16 storage.
        for name in ["tiny-gpt2-f32", "tiny-gpt2-f16-prefixed"] {
            let gpt2 = fixture(name);
            let arch = Arch::from_file(&gpt2.join("config.json")).expect("config");
            let weights = Weights::open(&gpt2).expect("weights");
            let mapped = Mapped { weights: &weights, specs: std::collections::HashMap::new() };
            for slot in [Slot::Layer(0, LayerSlot::Qkv(Part::Weight)), Slot::Layer(1, LayerSlot::Down(Part::Weight))] {
                let [spec] = &arch.tensors().into_iter().filter(|t| t.slot == slot).collect::<Vec<_>>()[..] else {
                    panic!("one tensor for {slot:?}")
                };
                let (k, n) = (spec.shape[0], spec.shape[1]);
                let from_file =
                    mapped.pack(std::slice::from_ref(spec), (k, n), PackAs::F32, Source::InputsMajor).expect("pack");
                let loaded = weights.tensor(&spec.name_refs(), &spec.shape).expect("tensor");
                // The reference packs the loaded matrix by hand: output j's inputs are column j.
                for j in 0..n {
                    let mut got = vec![0.0f32; k];
                    from_file.row_into(j, &mut got);
                    let want: Vec<f32> = (0..k).map(|i| loaded[i * n + j]).collect();
                    assert!(got.iter().zip(&want).all(|(x, y)| x.to_bits() == y.to_bits()), "{name} {slot:?} row {j}");
                }
                // bf16 panels of inputs-major weights are not packed from the file (the loader never asks).
                let e = mapped
                    .pack(std::slice::from_ref(spec), (k, n), PackAs::Bf16 { exact: false }, Source::InputsMajor)
                    .expect_err("bf16 inputs-major")
                    .to_string();
                assert!(e.contains("f32 panels"), "{e}");
            }
        }
        let model = Model::load(&bf16).expect("bf16 model");
        let want = stored_output(&bf16);
        assert!(model.output_embedding().iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()));
        let _ = std::fs::remove_dir_all(&bf16);
    }
}
