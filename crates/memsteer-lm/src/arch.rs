//! One description of a decoder-only transformer, built once from `config.json`, that every backend
//! (the CPU runtime, the CUDA runtime, the trainer) reads: sizes, positions, norm, residual placement,
//! activation, the layout of the fused attention projection, the storage layout of linear weights, and
//! one tensor-name table per family mapping Hugging Face names to the description's slots.
//!
//! A new family is a new [`Family`] with its table and the values of these fields, and at most a new
//! operation in each backend; the block loop ([`crate::cpu`], `gpu`, the trainer) is shared.

use std::path::Path;

pub use crate::config::RopeScaling;
use crate::config::{Activation, LlamaFamily, ModelConfig};
use crate::{LmError, Result};

/// The checkpoint families this runtime reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Family {
    /// GPT-2 (`GPT2LMHeadModel`: `Conv1D` weights stored `[in, out]`, names with or without the
    /// `transformer.` prefix).
    Gpt2,
    /// GPT-NeoX (`GPTNeoXForCausalLM`, as Pythia).
    GptNeoX,
    /// The Llama family (`LlamaForCausalLM` and its relatives: Mistral, Qwen 2, Qwen 3): separate q, k, v
    /// projections (fused at load), RMSNorm, SwiGLU.
    Llama(LlamaFamily),
}

/// How positions enter the model.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Positions {
    /// A learned table added to the token embedding.
    Learned,
    /// Rotate-half rotary embedding of the first `dims` dimensions of every query and key head.
    Rotary {
        /// Rotated dimensions per head (even; 0 rotates nothing).
        dims: usize,
        /// Base of the inverse frequencies.
        base: f64,
        /// Scaling of the frequencies.
        scaling: RopeScaling,
        /// Angles as transformers computes them for this family: frequencies and `position ×
        /// frequency` in `f32` (Llama's family), rather than in `f64` (GPT-NeoX, whose goldens and
        /// bit-identical outputs predate this).
        f32_angles: bool,
    },
}

/// The normalisation layers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Norm {
    /// `(x − mean) / √(var + eps) · g + b`.
    LayerNorm {
        /// Epsilon.
        eps: f32,
    },
    /// `x / √(mean(x²) + eps) · g` (no mean, no bias).
    RmsNorm {
        /// Epsilon.
        eps: f32,
        /// The stored weight is `g − 1` (Gemma: `· (1 + w)`).
        unit_offset: bool,
    },
}

/// The MLP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mlp {
    /// `down(act(up(x)))`.
    Plain(Activation),
    /// `down(silu(gate(x)) · up(x))` (SwiGLU).
    SwiGlu,
    /// `down(gelu_tanh(gate(x)) · up(x))` (GeGLU, Gemma).
    GeGlu,
}

/// Where the MLP reads the residual stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Residual {
    /// `x += attn(n1 x); x += mlp(n2 x)`.
    Sequential,
    /// `x += attn(n1 x) + mlp(n2 x)` (GPT-J, Pythia).
    Parallel,
    /// `x += n1(attn(x)); x += n2(mlp(x))`: the norms after each branch (OLMo 2).
    PostNorm,
    /// `x += p1(attn(n1 x)); x += p2(mlp(n2 x))`: norms before and after each branch (Gemma).
    Sandwich,
}

/// Norms of the queries and keys before rotary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QkNorm {
    /// None.
    None,
    /// RMSNorm of each head (weights of one head's size; Qwen 3).
    PerHead,
    /// RMSNorm of the whole projection, all heads at once (weights of its width; OLMo 2).
    Whole,
}

/// Which projections carry biases (norms have one exactly when they are layer norms).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Biases {
    /// The q, k and v projections.
    pub qkv: bool,
    /// The attention output projection.
    pub attn_out: bool,
    /// The MLP's projections.
    pub mlp: bool,
}

impl Biases {
    /// Biases everywhere (GPT-2, GPT-NeoX).
    pub const ALL: Biases = Biases { qkv: true, attn_out: true, mlp: true };
}

/// The row layout of the fused query/key/value projection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QkvLayout {
    /// `[q (all heads) | k | v]` (GPT-2).
    Blocked,
    /// `[q, k, v]` of head 0, then of head 1, … (GPT-NeoX).
    PerHead,
}

/// How linear weights are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightLayout {
    /// `[inputs, outputs]` (GPT-2's `Conv1D`): `y = x W`.
    InputsMajor,
    /// `[outputs, inputs]` (`nn.Linear`): `y = x Wᵀ`.
    OutputsMajor,
}

/// Where each head's query, key and value sit in a row of the fused projection: head `h`'s query
/// starts at `q + h·head`, its key at `k + h·head`, its value at `v + h·head`; rows are `row` apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QkvOffsets {
    /// Row stride.
    pub row: usize,
    /// Query offset of head 0.
    pub q: usize,
    /// Key offset of head 0.
    pub k: usize,
    /// Value offset of head 0.
    pub v: usize,
    /// Distance between consecutive heads.
    pub head: usize,
}

/// A decoder-only transformer's architecture.
#[derive(Debug, Clone, PartialEq)]
pub struct Arch {
    /// Family (and so the tensor-name table).
    pub family: Family,
    /// Vocabulary size.
    pub vocab: usize,
    /// Context length.
    pub context: usize,
    /// Hidden size.
    pub dim: usize,
    /// Layers.
    pub layers: usize,
    /// Attention heads.
    pub heads: usize,
    /// Key/value heads (grouped-query attention: `heads / kv_heads` query heads share each).
    pub kv_heads: usize,
    /// Dimensions per head.
    pub head_dim: usize,
    /// MLP width.
    pub inner: usize,
    /// Positions.
    pub positions: Positions,
    /// Norm layers.
    pub norm: Norm,
    /// Residual placement.
    pub residual: Residual,
    /// The MLP.
    pub mlp: Mlp,
    /// Norms of queries and keys before rotary.
    pub qk_norm: QkNorm,
    /// Which projections carry biases.
    pub biases: Biases,
    /// Each query sees at most this many keys, itself included (a sliding window).
    pub window: Option<usize>,
    /// The layers the window applies to, when not all (Gemma 3's sliding layers).
    pub window_layers: Option<Vec<bool>>,
    /// The rotary base of the windowed layers, when they have their own (Gemma 3's local base).
    pub local_rope_base: Option<f64>,
    /// The attention scores' scale, when not `head_dim^-1/2` (Gemma's `query_pre_attn_scalar^-1/2`).
    pub attn_scale: Option<f32>,
    /// The token embeddings' scale (Gemma: √hidden; the runtimes round it to the stored embedding's type
    /// at load, [`Arch::round_embed_scale`], as transformers does).
    pub embed_scale: Option<f32>,
    /// Attention scores soft-capped to `c·tanh(s/c)` after scaling, before the mask (Gemma 2).
    pub attn_softcap: Option<f32>,
    /// Final logits soft-capped to `c·tanh(z/c)` (Gemma 2): every output layer applies it
    /// ([`crate::Decoder::logit_softcap`]).
    pub logit_softcap: Option<f32>,
    /// Fused QKV row layout.
    pub qkv: QkvLayout,
    /// Linear weight storage.
    pub weights: WeightLayout,
    /// Output embedding tied to the input embedding.
    pub tied: bool,
}

/// How one layer turns a query's products with the keys into attention weights: scale, soft-cap
/// (`c·tanh(s/c)`), causal mask within the window, softmax.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ScoreMap {
    /// Each query sees at most this many keys, itself included.
    pub window: Option<usize>,
    /// Scale of the products.
    pub scale: f32,
    /// Soft-cap of the scaled products.
    pub softcap: Option<f32>,
}

impl ScoreMap {
    /// The first key query `last` sees (keys `first..=last`).
    pub fn first_key(&self, last: usize) -> usize {
        self.window.map_or(0, |w| (last + 1).saturating_sub(w))
    }

    /// Turns `row` (the products of the query at position `last` with keys `0..row.len()`) into its
    /// attention weights in place: zero outside `first_key(last)..=last`. With `slope`, writes there
    /// the derivative of the soft-capped score with respect to the scaled one (`1 − tanh²`; 1 without
    /// a cap), for the backward pass.
    pub fn weights(&self, row: &mut [f32], last: usize, slope: Option<&mut [f32]>) {
        let first = self.first_key(last);
        let seen = &mut row[first..=last];
        seen.iter_mut().for_each(|x| *x *= self.scale);
        if let Some(cap) = self.softcap {
            memsteer_kernels::vmath::softcap_in_place(seen, cap);
            if let Some(slope) = slope {
                for (d, &c) in slope[first..=last].iter_mut().zip(seen.iter()) {
                    let t = c / cap;
                    // At most 1 in magnitude; rounding may not leave t² below 1.
                    *d = (1.0 - t * t).max(0.0);
                }
            }
        } else if let Some(slope) = slope {
            slope[first..=last].fill(1.0);
        }
        memsteer_kernels::vmath::softmax_in_place(seen);
        row[..first].fill(0.0);
        row[last + 1..].fill(0.0);
    }
}

/// A tensor's part: weight or bias.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Part {
    /// Weight (or a norm's gain).
    Weight,
    /// Bias.
    Bias,
}

/// A tensor of a layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LayerSlot {
    /// The norm before attention.
    Norm1(Part),
    /// The norm before the MLP.
    Norm2(Part),
    /// The fused query/key/value projection.
    Qkv(Part),
    /// The attention output projection.
    AttnOut(Part),
    /// The MLP's first projection.
    Up(Part),
    /// The MLP's second projection.
    Down(Part),
    /// The gate projection of a gated MLP.
    Gate(Part),
    /// The per-head norm of the queries.
    QNorm,
    /// The per-head norm of the keys.
    KNorm,
    /// The norm after the attention (sandwich placement).
    PostNorm1(Part),
    /// The norm after the MLP (sandwich placement).
    PostNorm2(Part),
}

/// Where a tensor goes in the description.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Slot {
    /// Token embedding, `vocab × dim`.
    Embed,
    /// Learned positions, `context × dim`.
    Positions,
    /// A tensor of layer `.0`.
    Layer(usize, LayerSlot),
    /// The final norm.
    FinalNorm(Part),
    /// The output embedding when not tied, `vocab × dim`.
    Head,
}

/// One tensor of a checkpoint: its slot, its Hugging Face names (the first is the one written; the
/// others are accepted alternatives), and its shape as stored. Several tensors may fill one slot as
/// `piece`s, concatenated along their first dimension in order (the Llama family's q, k and v
/// projections fill the fused QKV slot).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    /// Slot.
    pub slot: Slot,
    /// Names, preferred first.
    pub names: Vec<String>,
    /// Shape as stored.
    pub shape: Vec<usize>,
    /// `(k, n)`: piece `k` of the `n` this slot is made of (`(0, 1)` for a whole tensor).
    pub piece: (usize, usize),
}

impl TensorSpec {
    /// The names as string slices.
    pub fn name_refs(&self) -> Vec<&str> {
        self.names.iter().map(String::as_str).collect()
    }
}

/// A weight and, when the architecture has one, a bias.
pub type Affine<T> = (T, Option<T>);

/// The bias of `a`, which the architecture at hand always has (an internal error otherwise).
pub fn bias<T>(a: &Affine<T>) -> Result<&T> {
    a.1.as_ref().ok_or_else(|| LmError::Input("internal: a bias this backend needs is missing".into()))
}

/// The tensors of one layer, in whatever a backend stores.
#[derive(Debug, Clone)]
pub struct LayerTensors<T> {
    /// Norm before attention.
    pub norm1: Affine<T>,
    /// Norm before the MLP.
    pub norm2: Affine<T>,
    /// Fused QKV projection.
    pub qkv: Affine<T>,
    /// Attention output projection.
    pub attn_out: Affine<T>,
    /// MLP first projection.
    pub up: Affine<T>,
    /// MLP second projection.
    pub down: Affine<T>,
    /// The gate projection of a gated MLP.
    pub gate: Option<Affine<T>>,
    /// Per-head norm weights of queries and keys.
    pub qk_norm: Option<(T, T)>,
    /// The norms after the attention and after the MLP (sandwich placement).
    pub post_norms: Option<(Affine<T>, Affine<T>)>,
}

/// Every tensor of a model, in whatever a backend stores (host `Vec<f32>`, device buffers, ranges of
/// the trainer's parameter buffer).
#[derive(Debug, Clone)]
pub struct Tensors<T> {
    /// Token embedding.
    pub embed: T,
    /// Learned positions ([`Positions::Learned`] only).
    pub positions: Option<T>,
    /// Layers.
    pub layers: Vec<LayerTensors<T>>,
    /// Final norm.
    pub final_norm: Affine<T>,
    /// Output embedding (`None` when tied to [`Tensors::embed`]).
    pub head: Option<T>,
}

impl<T> Tensors<T> {
    /// The output embedding.
    pub fn output(&self) -> &T {
        self.head.as_ref().unwrap_or(&self.embed)
    }
}

impl Arch {
    /// Reads `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        Ok(Self::from_config(&ModelConfig::from_file(path)?))
    }

    /// The description of a parsed configuration.
    pub fn from_config(cfg: &ModelConfig) -> Self {
        match cfg {
            ModelConfig::Gpt2(c) => Arch {
                family: Family::Gpt2,
                vocab: c.vocab_size,
                context: c.n_positions,
                dim: c.n_embd,
                layers: c.n_layer,
                heads: c.n_head,
                kv_heads: c.n_head,
                head_dim: c.n_embd.checked_div(c.n_head).unwrap_or(0),
                inner: c.n_inner,
                positions: Positions::Learned,
                norm: Norm::LayerNorm { eps: c.layer_norm_epsilon },
                residual: Residual::Sequential,
                mlp: Mlp::Plain(c.activation),
                qk_norm: QkNorm::None,
                biases: Biases::ALL,
                window: None,
                window_layers: None,
                local_rope_base: None,
                attn_scale: None,
                embed_scale: None,
                attn_softcap: None,
                logit_softcap: None,
                qkv: QkvLayout::Blocked,
                weights: WeightLayout::InputsMajor,
                tied: c.tie_word_embeddings,
            },
            ModelConfig::GptNeoX(c) => {
                let head_dim = c.hidden_size.checked_div(c.num_attention_heads).unwrap_or(0);
                Arch {
                    family: Family::GptNeoX,
                    vocab: c.vocab_size,
                    context: c.max_position_embeddings,
                    dim: c.hidden_size,
                    layers: c.num_hidden_layers,
                    heads: c.num_attention_heads,
                    kv_heads: c.num_attention_heads,
                    head_dim,
                    inner: c.intermediate_size,
                    positions: Positions::Rotary {
                        dims: ((head_dim as f64) * c.rotary_pct) as usize / 2 * 2,
                        base: c.rotary_base,
                        scaling: RopeScaling::None,
                        f32_angles: false,
                    },
                    norm: Norm::LayerNorm { eps: c.layer_norm_eps },
                    residual: if c.use_parallel_residual { Residual::Parallel } else { Residual::Sequential },
                    mlp: Mlp::Plain(c.activation),
                    qk_norm: QkNorm::None,
                    biases: Biases::ALL,
                    window: None,
                    window_layers: None,
                    local_rope_base: None,
                    attn_scale: None,
                    embed_scale: None,
                    attn_softcap: None,
                    logit_softcap: None,
                    qkv: QkvLayout::PerHead,
                    weights: WeightLayout::OutputsMajor,
                    tied: c.tie_word_embeddings,
                }
            }
            ModelConfig::Llama(c) => {
                let gemma = matches!(c.family, LlamaFamily::Gemma2 | LlamaFamily::Gemma3);
                Arch {
                    family: Family::Llama(c.family),
                    vocab: c.vocab_size,
                    context: c.max_position_embeddings,
                    dim: c.hidden_size,
                    layers: c.num_hidden_layers,
                    heads: c.num_attention_heads,
                    kv_heads: c.num_key_value_heads,
                    head_dim: c.head_dim,
                    inner: c.intermediate_size,
                    positions: Positions::Rotary {
                        dims: c.head_dim,
                        base: c.rope_theta,
                        scaling: c.rope_scaling,
                        f32_angles: true,
                    },
                    norm: Norm::RmsNorm { eps: c.rms_norm_eps, unit_offset: gemma },
                    residual: match c.family {
                        LlamaFamily::Olmo2 => Residual::PostNorm,
                        _ if gemma => Residual::Sandwich,
                        _ => Residual::Sequential,
                    },
                    mlp: if gemma { Mlp::GeGlu } else { Mlp::SwiGlu },
                    qk_norm: match c.family {
                        LlamaFamily::Qwen3 | LlamaFamily::Gemma3 => QkNorm::PerHead,
                        LlamaFamily::Olmo2 => QkNorm::Whole,
                        _ => QkNorm::None,
                    },
                    biases: Biases { qkv: c.qkv_bias, attn_out: c.o_bias, mlp: c.mlp_bias },
                    // Only Mistral's and Gemma's windows are windows (transformers ignores the key elsewhere).
                    window: if matches!(c.family, LlamaFamily::Mistral) || gemma { c.sliding_window } else { None },
                    window_layers: c.sliding_layers.clone(),
                    local_rope_base: c.local_rope_theta,
                    attn_scale: c.query_pre_attn_scalar.map(|q| (1.0 / q.sqrt()) as f32),
                    // transformers multiplies by √hidden held in the weights' type (f32 here).
                    embed_scale: gemma.then(|| (c.hidden_size as f64).sqrt() as f32),
                    attn_softcap: c.attn_logit_softcapping.map(|x| x as f32),
                    logit_softcap: c.final_logit_softcapping.map(|x| x as f32),
                    qkv: QkvLayout::Blocked,
                    weights: WeightLayout::OutputsMajor,
                    tied: c.tie_word_embeddings,
                }
            }
        }
    }

    /// Checks what the backends rely on (positive sizes, heads in whole groups, rotary dimensions inside
    /// a head, the q/k/v pieces of a slot stored output-major); an `Arch` built from a parsed
    /// `config.json` always passes, one built by hand may not.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(LmError::Input(format!("architecture: {m}")));
        if [self.vocab, self.context, self.dim, self.layers, self.heads, self.kv_heads, self.head_dim, self.inner]
            .contains(&0)
        {
            return bad("every size must be positive".into());
        }
        if !self.heads.is_multiple_of(self.kv_heads) {
            return bad(format!(
                "{} query heads do not split into groups of the {} key/value heads",
                self.heads, self.kv_heads
            ));
        }
        if self.qkv == QkvLayout::PerHead && self.kv_heads != self.heads {
            return bad("the per-head fused layout has as many key/value heads as query heads".into());
        }
        if self.rotary_dims() > self.head_dim || !self.rotary_dims().is_multiple_of(2) {
            return bad(format!("{} rotary dimensions for heads of {}", self.rotary_dims(), self.head_dim));
        }
        if matches!(self.family, Family::Gpt2 | Family::GptNeoX) && self.attn_dim() != self.dim {
            return bad("GPT-2 and GPT-NeoX heads fill the hidden size".into());
        }
        if matches!(self.residual, Residual::PostNorm | Residual::Sandwich) && (self.biases.attn_out || self.biases.mlp)
        {
            return bad("norms after the branches take the projections without their biases".into());
        }
        if let Some(w) = &self.window_layers
            && w.len() != self.layers
        {
            return bad(format!("{} window flags for {} layers", w.len(), self.layers));
        }
        let positive = |x: f64| x.is_finite() && x > 0.0;
        if self.attn_scale.is_some_and(|s| !positive(f64::from(s)))
            || self.embed_scale.is_some_and(|s| !positive(f64::from(s)))
            || self.attn_softcap.is_some_and(|s| !positive(f64::from(s)))
            || self.logit_softcap.is_some_and(|s| !positive(f64::from(s)))
            || self.local_rope_base.is_some_and(|b| !positive(b))
            || matches!(self.positions, Positions::Rotary { base, .. } if !positive(base))
        {
            return bad("attention and embedding scales, soft-caps and rotary bases must be positive".into());
        }
        if matches!(self.family, Family::Llama(_)) && self.weights != WeightLayout::OutputsMajor {
            return bad("the Llama family's q, k and v pieces are stored output-major".into());
        }
        Ok(())
    }

    /// Width of the attention's output (all query heads).
    pub fn attn_dim(&self) -> usize {
        self.heads * self.head_dim
    }

    /// Width of the fused QKV projection (query heads, then key and value heads).
    pub fn qkv_width(&self) -> usize {
        (self.heads + 2 * self.kv_heads) * self.head_dim
    }

    /// Where heads sit in a row of the fused QKV projection.
    pub fn qkv_offsets(&self) -> QkvOffsets {
        let hd = self.head_dim;
        let row = self.qkv_width();
        match self.qkv {
            QkvLayout::Blocked => {
                QkvOffsets { row, q: 0, k: self.heads * hd, v: (self.heads + self.kv_heads) * hd, head: hd }
            }
            QkvLayout::PerHead => QkvOffsets { row, q: 0, k: hd, v: 2 * hd, head: 3 * hd },
        }
    }

    /// The stored shape of a linear layer with `inputs` and `outputs`.
    pub fn linear_shape(&self, inputs: usize, outputs: usize) -> Vec<usize> {
        match self.weights {
            WeightLayout::InputsMajor => vec![inputs, outputs],
            WeightLayout::OutputsMajor => vec![outputs, inputs],
        }
    }

    /// The plain MLP's activation (`None` for a gated MLP).
    pub fn activation(&self) -> Option<Activation> {
        match self.mlp {
            Mlp::Plain(a) => Some(a),
            Mlp::SwiGlu | Mlp::GeGlu => None,
        }
    }

    /// Every tensor of a checkpoint of this architecture, in the order Hugging Face writes them.
    pub fn tensors(&self) -> Vec<TensorSpec> {
        let (d, inner, v) = (self.dim, self.inner, self.vocab);
        let mut out = Vec::new();
        let mut push = |slot: Slot, names: Vec<String>, shape: Vec<usize>| {
            out.push(TensorSpec { slot, names, shape, piece: (0, 1) })
        };
        use LayerSlot::*;
        use Part::*;
        match self.family {
            Family::Gpt2 => {
                let names = |n: &str| vec![n.to_string(), format!("transformer.{n}")];
                push(Slot::Embed, names("wte.weight"), vec![v, d]);
                push(Slot::Positions, names("wpe.weight"), vec![self.context, d]);
                for i in 0..self.layers {
                    let mut pair = |slot: fn(Part) -> LayerSlot, name: &str, wshape: Vec<usize>, bshape: usize| {
                        push(Slot::Layer(i, slot(Weight)), names(&format!("h.{i}.{name}.weight")), wshape);
                        push(Slot::Layer(i, slot(Bias)), names(&format!("h.{i}.{name}.bias")), vec![bshape]);
                    };
                    pair(Norm1, "ln_1", vec![d], d);
                    pair(Qkv, "attn.c_attn", self.linear_shape(d, self.qkv_width()), self.qkv_width());
                    pair(AttnOut, "attn.c_proj", self.linear_shape(d, d), d);
                    pair(Norm2, "ln_2", vec![d], d);
                    pair(Up, "mlp.c_fc", self.linear_shape(d, inner), inner);
                    pair(Down, "mlp.c_proj", self.linear_shape(inner, d), d);
                }
                push(Slot::FinalNorm(Weight), names("ln_f.weight"), vec![d]);
                push(Slot::FinalNorm(Bias), names("ln_f.bias"), vec![d]);
                if !self.tied {
                    push(Slot::Head, vec!["lm_head.weight".into()], vec![v, d]);
                }
            }
            Family::GptNeoX => {
                push(Slot::Embed, vec!["gpt_neox.embed_in.weight".into()], vec![v, d]);
                for i in 0..self.layers {
                    let mut pair = |slot: fn(Part) -> LayerSlot, name: &str, wshape: Vec<usize>, bshape: usize| {
                        let p = format!("gpt_neox.layers.{i}.{name}");
                        push(Slot::Layer(i, slot(Weight)), vec![format!("{p}.weight")], wshape);
                        push(Slot::Layer(i, slot(Bias)), vec![format!("{p}.bias")], vec![bshape]);
                    };
                    pair(Norm1, "input_layernorm", vec![d], d);
                    pair(Norm2, "post_attention_layernorm", vec![d], d);
                    pair(Qkv, "attention.query_key_value", self.linear_shape(d, self.qkv_width()), self.qkv_width());
                    pair(AttnOut, "attention.dense", self.linear_shape(d, d), d);
                    pair(Up, "mlp.dense_h_to_4h", self.linear_shape(d, inner), inner);
                    pair(Down, "mlp.dense_4h_to_h", self.linear_shape(inner, d), d);
                }
                push(Slot::FinalNorm(Weight), vec!["gpt_neox.final_layer_norm.weight".into()], vec![d]);
                push(Slot::FinalNorm(Bias), vec!["gpt_neox.final_layer_norm.bias".into()], vec![d]);
                if !self.tied {
                    // transformers 5 names the output layer `lm_head` in memory; saved files say `embed_out`.
                    push(Slot::Head, vec!["embed_out.weight".into(), "lm_head.weight".into()], vec![v, d]);
                }
            }
            Family::Llama(_) => return self.llama_tensors(),
        }
        out
    }

    /// The Llama family's tensor table: the q, k and v projections (and their biases) are the three
    /// pieces of the fused QKV slot.
    fn llama_tensors(&self) -> Vec<TensorSpec> {
        use LayerSlot::*;
        use Part::*;
        let (d, inner, v, hd) = (self.dim, self.inner, self.vocab, self.head_dim);
        let (a, kv) = (self.attn_dim(), self.kv_heads * hd);
        let Biases { qkv: qkv_bias, attn_out: o_bias, mlp: mlp_bias } = self.biases;
        let spec = |slot: Slot, name: String, shape: Vec<usize>, piece: (usize, usize)| TensorSpec {
            slot,
            names: vec![name],
            shape,
            piece,
        };
        let mut out = vec![spec(Slot::Embed, "model.embed_tokens.weight".into(), vec![v, d], (0, 1))];
        for i in 0..self.layers {
            let p = |n: &str| format!("model.layers.{i}.{n}");
            let whole = |slot: LayerSlot, n: &str, shape: Vec<usize>| spec(Slot::Layer(i, slot), p(n), shape, (0, 1));
            // OLMo 2's norms follow the branches: `post_attention_layernorm` after the attention,
            // `post_feedforward_layernorm` after the MLP.
            let post = self.residual == Residual::PostNorm;
            let sandwich = self.residual == Residual::Sandwich;
            if !post {
                out.push(whole(Norm1(Weight), "input_layernorm.weight", vec![d]));
            }
            for (k, (name, rows)) in [("q_proj", a), ("k_proj", kv), ("v_proj", kv)].into_iter().enumerate() {
                let w = p(&format!("self_attn.{name}.weight"));
                out.push(spec(Slot::Layer(i, Qkv(Weight)), w, vec![rows, d], (k, 3)));
                if qkv_bias {
                    out.push(spec(Slot::Layer(i, Qkv(Bias)), p(&format!("self_attn.{name}.bias")), vec![rows], (k, 3)));
                }
            }
            out.push(whole(AttnOut(Weight), "self_attn.o_proj.weight", vec![d, a]));
            if o_bias {
                out.push(whole(AttnOut(Bias), "self_attn.o_proj.bias", vec![d]));
            }
            match self.qk_norm {
                QkNorm::None => {}
                QkNorm::PerHead => {
                    out.push(whole(QNorm, "self_attn.q_norm.weight", vec![hd]));
                    out.push(whole(KNorm, "self_attn.k_norm.weight", vec![hd]));
                }
                QkNorm::Whole => {
                    out.push(whole(QNorm, "self_attn.q_norm.weight", vec![a]));
                    out.push(whole(KNorm, "self_attn.k_norm.weight", vec![kv]));
                }
            }
            if sandwich {
                out.push(whole(PostNorm1(Weight), "post_attention_layernorm.weight", vec![d]));
                out.push(whole(Norm2(Weight), "pre_feedforward_layernorm.weight", vec![d]));
                out.push(whole(PostNorm2(Weight), "post_feedforward_layernorm.weight", vec![d]));
            } else if post {
                out.push(whole(Norm1(Weight), "post_attention_layernorm.weight", vec![d]));
                out.push(whole(Norm2(Weight), "post_feedforward_layernorm.weight", vec![d]));
            } else {
                out.push(whole(Norm2(Weight), "post_attention_layernorm.weight", vec![d]));
            }
            for (slot, name, shape) in [
                (Gate as fn(Part) -> LayerSlot, "gate_proj", vec![inner, d]),
                (Up, "up_proj", vec![inner, d]),
                (Down, "down_proj", vec![d, inner]),
            ] {
                let rows = shape[0];
                out.push(whole(slot(Weight), &format!("mlp.{name}.weight"), shape));
                if mlp_bias {
                    out.push(whole(slot(Bias), &format!("mlp.{name}.bias"), vec![rows]));
                }
            }
        }
        out.push(spec(Slot::FinalNorm(Weight), "model.norm.weight".into(), vec![d], (0, 1)));
        if !self.tied {
            out.push(spec(Slot::Head, "lm_head.weight".into(), vec![v, d], (0, 1)));
        }
        out
    }

    /// The one loader: calls `load` on every tensor of [`Arch::tensors`] (the layers first, so that a
    /// checkpoint of the wrong depth or width is reported at its first layer), joins the pieces of a
    /// slot with `concat` (in order, along the first dimension), and places the results.
    pub fn load_tensors<T>(
        &self,
        mut load: impl FnMut(&TensorSpec) -> Result<T>,
        mut concat: impl FnMut(Vec<T>) -> Result<T>,
    ) -> Result<Tensors<T>> {
        let specs = self.tensors();
        let mut found: std::collections::HashMap<Slot, Vec<(usize, usize, T)>> = std::collections::HashMap::new();
        let layer_first = specs.iter().filter(|s| matches!(s.slot, Slot::Layer(..)));
        for spec in layer_first.chain(specs.iter().filter(|s| !matches!(s.slot, Slot::Layer(..)))) {
            let t = load(spec)?;
            found.entry(spec.slot).or_default().push((spec.piece.0, spec.piece.1, t));
        }
        let mut take = |slot: Slot| -> Result<Option<T>> {
            let Some(mut pieces) = found.remove(&slot) else { return Ok(None) };
            // Pieces in their order, all of them (a table error otherwise, never a silently short slot).
            pieces.sort_by_key(|p| p.0);
            let whole = pieces.iter().enumerate().all(|(k, p)| p.0 == k && p.1 == pieces.len());
            if !whole {
                return Err(LmError::Input(format!("internal: the pieces of {slot:?} do not make the whole slot")));
            }
            let mut pieces: Vec<T> = pieces.into_iter().map(|p| p.2).collect();
            if pieces.len() == 1 { Ok(pieces.pop()) } else { concat(pieces).map(Some) }
        };
        let missing = |what: &str| LmError::Input(format!("internal: the {what} tensor has no entry in the table"));
        use LayerSlot::*;
        let mut layers = Vec::with_capacity(self.layers);
        for i in 0..self.layers {
            let mut affine = |s: fn(Part) -> LayerSlot, what: &str| -> Result<Option<Affine<T>>> {
                match take(Slot::Layer(i, s(Part::Weight)))? {
                    Some(w) => Ok(Some((w, take(Slot::Layer(i, s(Part::Bias)))?))),
                    None if take(Slot::Layer(i, s(Part::Bias)))?.is_some() => Err(missing(what)),
                    None => Ok(None),
                }
            };
            let need = |a: Option<Affine<T>>, what: &str| a.ok_or_else(|| missing(what));
            let norm1 = need(affine(Norm1, "norm")?, "norm")?;
            let norm2 = need(affine(Norm2, "norm")?, "norm")?;
            let qkv = need(affine(Qkv, "qkv")?, "qkv")?;
            let attn_out = need(affine(AttnOut, "attention output")?, "attention output")?;
            let up = need(affine(Up, "mlp")?, "mlp")?;
            let down = need(affine(Down, "mlp")?, "mlp")?;
            let gate = affine(Gate, "gate")?;
            let post_norms = match (affine(PostNorm1, "post norm")?, affine(PostNorm2, "post norm")?) {
                (Some(a), Some(b)) => Some((a, b)),
                (None, None) => None,
                _ => return Err(missing("post norm")),
            };
            let qk_norm = match (take(Slot::Layer(i, QNorm))?, take(Slot::Layer(i, KNorm))?) {
                (Some(q), Some(k)) => Some((q, k)),
                (None, None) => None,
                _ => return Err(missing("q/k norm")),
            };
            layers.push(LayerTensors { norm1, norm2, qkv, attn_out, up, down, gate, qk_norm, post_norms });
        }
        let embed = take(Slot::Embed)?.ok_or_else(|| missing("embedding"))?;
        let positions = take(Slot::Positions)?;
        let head = take(Slot::Head)?;
        let final_norm = (
            take(Slot::FinalNorm(Part::Weight))?.ok_or_else(|| missing("final norm"))?,
            take(Slot::FinalNorm(Part::Bias))?,
        );
        Ok(Tensors { embed, positions, layers, final_norm, head })
    }

    /// `(cos, sin)` of every rotary angle for positions `from..to`, `(to − from) × dims/2` each, empty
    /// without rotary positions. GPT-NeoX: angles in `f64`, rounded to `f32`. The Llama family: close to
    /// how transformers computes them: frequencies (scaled, in `f64`) rounded to `f32`, then `position ×
    /// frequency` in `f32` as transformers does, whose cosine and sine are rounded to `f32`. The `f32`
    /// product is what matters (at position 8,192 it is off the exact angle by up to 5e-4 radians, and the
    /// model was trained and is evaluated with it); the frequencies may differ from transformers' `f32`
    /// arithmetic by an ulp.
    pub fn rotary_table(&self, (from, to): (usize, usize)) -> (Vec<f32>, Vec<f32>) {
        let Positions::Rotary { dims, base, scaling, f32_angles } = self.positions else {
            return (Vec::new(), Vec::new());
        };
        rotary_angles((dims, base, scaling, f32_angles), (from, to))
    }

    /// [`Arch::rotary_table`] of the windowed layers, when they have their own base (Gemma 3: plain
    /// rotary at the local base); `None` when every layer uses the model's table.
    pub fn local_rotary_table(&self, (from, to): (usize, usize)) -> Option<(Vec<f32>, Vec<f32>)> {
        let (Positions::Rotary { dims, f32_angles, .. }, Some(base)) = (self.positions, self.local_rope_base) else {
            return None;
        };
        Some(rotary_angles((dims, base, RopeScaling::None, f32_angles), (from, to)))
    }

    /// How layer `i` turns query-key products into attention weights.
    pub fn scores(&self, i: usize) -> ScoreMap {
        ScoreMap {
            window: if self.windowed(i) { self.window } else { None },
            scale: self.attn_scale.unwrap_or(1.0 / (self.head_dim as f32).sqrt()),
            softcap: self.attn_softcap,
        }
    }

    /// Whether layer `i` attends through the sliding window.
    pub fn windowed(&self, i: usize) -> bool {
        self.window.is_some() && self.window_layers.as_ref().is_none_or(|w| w.get(i).copied().unwrap_or(false))
    }

    /// Whether layer `i` is one of the sliding layers (which take the local rotary table even when no
    /// window is set, as transformers chooses the rotary by layer type).
    pub fn sliding_layer(&self, i: usize) -> bool {
        self.window_layers.as_ref().is_some_and(|w| w.get(i).copied().unwrap_or(false))
    }
}

/// `(cos, sin)` tables of rotary positions `from..to` (see [`Arch::rotary_table`]).
fn rotary_angles(
    (dims, base, scaling, f32_angles): (usize, f64, RopeScaling, bool),
    (from, to): (usize, usize),
) -> (Vec<f32>, Vec<f32>) {
    {
        let inv_freq: Vec<f64> = (0..dims / 2).map(|i| 1.0 / base.powf((2 * i) as f64 / dims as f64)).collect();
        let n = to.saturating_sub(from) * inv_freq.len();
        let (mut cos, mut sin) = (Vec::with_capacity(n), Vec::with_capacity(n));
        if !f32_angles {
            for pos in from..to {
                for f in &inv_freq {
                    let angle = pos as f64 * f;
                    cos.push(angle.cos() as f32);
                    sin.push(angle.sin() as f32);
                }
            }
            return (cos, sin);
        }
        let inv_freq: Vec<f32> = inv_freq.iter().map(|&f| scaled_frequency(f as f32, scaling)).collect();
        for pos in from..to {
            for f in &inv_freq {
                let angle = f64::from(pos as f32 * f);
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
        (cos, sin)
    }
}

impl Arch {
    /// Rounds [`Arch::embed_scale`] to `stored`, the type the input embedding is stored in: transformers
    /// multiplies Gemma's embeddings by √hidden cast to the embedding's type (34.0 for a hidden size of
    /// 1,152 in bf16, not 33.94).
    pub fn round_embed_scale(&mut self, stored: safetensors::Dtype) {
        self.embed_scale = self.embed_scale.map(|s| match stored {
            safetensors::Dtype::BF16 => half::bf16::from_f32(s).to_f32(),
            safetensors::Dtype::F16 => half::f16::from_f32(s).to_f32(),
            _ => s,
        });
    }
}

impl Arch {
    /// Rotated dimensions per head (0 without rotary positions).
    pub fn rotary_dims(&self) -> usize {
        match self.positions {
            Positions::Rotary { dims, .. } => dims,
            Positions::Learned => 0,
        }
    }

    /// The norm's epsilon.
    pub fn norm_eps(&self) -> f32 {
        match self.norm {
            Norm::LayerNorm { eps } | Norm::RmsNorm { eps, .. } => eps,
        }
    }
}

/// A rotary frequency after `scaling`, as transformers' `_compute_llama3_parameters` and linear scaling
/// compute it (in `f64` here from the `f32` frequency, rounded back to `f32`).
fn scaled_frequency(f: f32, scaling: RopeScaling) -> f32 {
    let f64f = f64::from(f);
    match scaling {
        RopeScaling::None => f,
        RopeScaling::Linear { factor } => (f64f / factor) as f32,
        RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_context } => {
            let wavelen = 2.0 * std::f64::consts::PI / f64f;
            let (low_wavelen, high_wavelen) = (original_context / low_freq_factor, original_context / high_freq_factor);
            if wavelen > low_wavelen {
                (f64f / factor) as f32
            } else if wavelen < high_wavelen {
                f
            } else {
                let smooth = (original_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                ((1.0 - smooth) * f64f / factor + smooth * f64f) as f32
            }
        }
    }
}
