//! One description of a decoder-only transformer, built once from `config.json`, that every backend
//! (the CPU runtime, the CUDA runtime, the trainer) reads: sizes, positions, norm, residual placement,
//! activation, the layout of the fused attention projection, the storage layout of linear weights, and
//! one tensor-name table per family mapping Hugging Face names to the description's slots.
//!
//! A new family is a new [`Family`] with its table and the values of these fields, and at most a new
//! operation in each backend; the block loop ([`crate::cpu`], `gpu`, the trainer) is shared.

use std::path::Path;

use crate::config::{Activation, ModelConfig};
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
}

/// Where the MLP reads the residual stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Residual {
    /// `x += attn(n1 x); x += mlp(n2 x)`.
    Sequential,
    /// `x += attn(n1 x) + mlp(n2 x)` (GPT-J, Pythia).
    Parallel,
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
    /// MLP activation.
    pub activation: Activation,
    /// Fused QKV row layout.
    pub qkv: QkvLayout,
    /// Linear weight storage.
    pub weights: WeightLayout,
    /// Output embedding tied to the input embedding.
    pub tied: bool,
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
/// others are accepted alternatives), and its shape as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    /// Slot.
    pub slot: Slot,
    /// Names, preferred first.
    pub names: Vec<String>,
    /// Shape as stored.
    pub shape: Vec<usize>,
}

impl TensorSpec {
    /// The names as string slices.
    pub fn name_refs(&self) -> Vec<&str> {
        self.names.iter().map(String::as_str).collect()
    }
}

/// A weight and a bias.
pub type Affine<T> = (T, T);

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
                head_dim: c.n_embd / c.n_head,
                inner: c.n_inner,
                positions: Positions::Learned,
                norm: Norm::LayerNorm { eps: c.layer_norm_epsilon },
                residual: Residual::Sequential,
                activation: c.activation,
                qkv: QkvLayout::Blocked,
                weights: WeightLayout::InputsMajor,
                tied: c.tie_word_embeddings,
            },
            ModelConfig::GptNeoX(c) => {
                let head_dim = c.hidden_size / c.num_attention_heads;
                Arch {
                    family: Family::GptNeoX,
                    vocab: c.vocab_size,
                    context: c.max_position_embeddings,
                    dim: c.hidden_size,
                    layers: c.num_hidden_layers,
                    heads: c.num_attention_heads,
                    head_dim,
                    inner: c.intermediate_size,
                    positions: Positions::Rotary {
                        dims: ((head_dim as f64) * c.rotary_pct) as usize / 2 * 2,
                        base: c.rotary_base,
                    },
                    norm: Norm::LayerNorm { eps: c.layer_norm_eps },
                    residual: if c.use_parallel_residual { Residual::Parallel } else { Residual::Sequential },
                    activation: c.activation,
                    qkv: QkvLayout::PerHead,
                    weights: WeightLayout::OutputsMajor,
                    tied: c.tie_word_embeddings,
                }
            }
        }
    }

    /// Width of the fused QKV projection.
    pub fn qkv_width(&self) -> usize {
        3 * self.heads * self.head_dim
    }

    /// Where heads sit in a row of the fused QKV projection.
    pub fn qkv_offsets(&self) -> QkvOffsets {
        let (d, hd) = (self.heads * self.head_dim, self.head_dim);
        match self.qkv {
            QkvLayout::Blocked => QkvOffsets { row: 3 * d, q: 0, k: d, v: 2 * d, head: hd },
            QkvLayout::PerHead => QkvOffsets { row: 3 * d, q: 0, k: hd, v: 2 * hd, head: 3 * hd },
        }
    }

    /// The stored shape of a linear layer with `inputs` and `outputs`.
    pub fn linear_shape(&self, inputs: usize, outputs: usize) -> Vec<usize> {
        match self.weights {
            WeightLayout::InputsMajor => vec![inputs, outputs],
            WeightLayout::OutputsMajor => vec![outputs, inputs],
        }
    }

    /// Every tensor of a checkpoint of this architecture, in the order Hugging Face writes them.
    pub fn tensors(&self) -> Vec<TensorSpec> {
        let (d, inner, v) = (self.dim, self.inner, self.vocab);
        let mut out = Vec::new();
        let mut push = |slot: Slot, names: Vec<String>, shape: Vec<usize>| out.push(TensorSpec { slot, names, shape });
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
        }
        out
    }

    /// The one loader: calls `load` on every tensor of [`Arch::tensors`] (the layers first, so that a
    /// checkpoint of the wrong depth or width is reported at its first layer) and places the results.
    pub fn load_tensors<T>(&self, mut load: impl FnMut(&TensorSpec) -> Result<T>) -> Result<Tensors<T>> {
        let specs = self.tensors();
        let mut layers: Vec<[Option<T>; 12]> = (0..self.layers).map(|_| Default::default()).collect();
        let (mut embed, mut positions, mut head, mut fw, mut fb) = (None, None, None, None, None);
        let layer_first = specs.iter().filter(|s| matches!(s.slot, Slot::Layer(..)));
        for spec in layer_first.chain(specs.iter().filter(|s| !matches!(s.slot, Slot::Layer(..)))) {
            let t = load(spec)?;
            match spec.slot {
                Slot::Embed => embed = Some(t),
                Slot::Positions => positions = Some(t),
                Slot::Head => head = Some(t),
                Slot::FinalNorm(Part::Weight) => fw = Some(t),
                Slot::FinalNorm(Part::Bias) => fb = Some(t),
                Slot::Layer(i, s) => layers[i][layer_index(s)] = Some(t),
            }
        }
        let missing = |what: &str| LmError::Input(format!("internal: the {what} tensor has no entry in the table"));
        let layers = layers
            .into_iter()
            .map(|slots| {
                let mut it = slots.into_iter();
                let mut next = || it.next().flatten().ok_or_else(|| missing("layer"));
                Ok(LayerTensors {
                    norm1: (next()?, next()?),
                    norm2: (next()?, next()?),
                    qkv: (next()?, next()?),
                    attn_out: (next()?, next()?),
                    up: (next()?, next()?),
                    down: (next()?, next()?),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Tensors {
            embed: embed.ok_or_else(|| missing("embedding"))?,
            positions,
            layers,
            final_norm: (fw.ok_or_else(|| missing("final norm"))?, fb.ok_or_else(|| missing("final norm"))?),
            head,
        })
    }

    /// `(cos, sin)` of every rotary angle for positions `from..to`, `(to − from) × dims/2` each:
    /// angles in `f64`, rounded to `f32` (empty without rotary positions).
    pub fn rotary_table(&self, (from, to): (usize, usize)) -> (Vec<f32>, Vec<f32>) {
        let Positions::Rotary { dims, base } = self.positions else { return (Vec::new(), Vec::new()) };
        let inv_freq: Vec<f64> = (0..dims / 2).map(|i| 1.0 / base.powf((2 * i) as f64 / dims as f64)).collect();
        let n = to.saturating_sub(from) * inv_freq.len();
        let (mut cos, mut sin) = (Vec::with_capacity(n), Vec::with_capacity(n));
        for pos in from..to {
            for f in &inv_freq {
                let angle = pos as f64 * f;
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
        (cos, sin)
    }

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
            Norm::LayerNorm { eps } => eps,
        }
    }
}

/// Position of a layer slot in [`LayerTensors`]' field order.
fn layer_index(s: LayerSlot) -> usize {
    let (base, part) = match s {
        LayerSlot::Norm1(p) => (0, p),
        LayerSlot::Norm2(p) => (2, p),
        LayerSlot::Qkv(p) => (4, p),
        LayerSlot::AttnOut(p) => (6, p),
        LayerSlot::Up(p) => (8, p),
        LayerSlot::Down(p) => (10, p),
    };
    base + usize::from(part == Part::Bias)
}
