//! Training every architecture the runtime runs (GPT-2, GPT-NeoX, Llama, Mistral, Qwen 2 and 3, OLMo 2,
//! Gemma 3) on CPU, llm.c style: one parameter
//! buffer with named views in Hugging Face order (the [`crate::arch`] table), an explicit forward and
//! backward per operation (`train/ops.rs`), AdamW ([`adamw`]) and learning-rate schedules
//! ([`schedule`]).
//!
//! The forward is the runtime's block loop ([`crate::cpu`]) with every activation the backward needs
//! recorded, so it computes exactly the function [`crate::Model`] computes; the backward walks the
//! same loop in reverse. The loss is the mean
//! cross-entropy over every predicted position of a batch (each sequence's tokens after its first),
//! and checkpoints are Hugging Face directories that [`crate::Model::load`] and transformers read.
//! Results are deterministic from the seed and identical for any number of rayon threads.
//!
//! ```
//! use memsteer_lm::train::{Params, TrainConfig, Trainer};
//! let cfg = memsteer_lm::train::tiny_config(16, 32, 2, 2);
//! let params = Params::init_random(cfg, 7)?;
//! let mut trainer = Trainer::new(params, &TrainConfig::new(1e-2, 5))?;
//! let batch: Vec<&[u32]> = vec![&[1, 2, 3, 4], &[5, 6, 7, 8]];
//! let first = trainer.train_step(&batch)?.loss;
//! for _ in 0..4 {
//!     trainer.train_step(&batch)?;
//! }
//! assert!(trainer.params().loss(&batch)? < first);
//! # Ok::<(), memsteer_lm::LmError>(())
//! ```

pub mod adamw;
mod ops;
pub mod run;
pub mod schedule;
mod tape;
mod trainer;

use std::ops::Range;
use std::path::Path;

use rayon::prelude::*;

pub use adamw::{AdamW, AdamWConfig, clip_grad_norm, grad_norm};
pub use schedule::{LrSchedule, Schedule};
pub use trainer::{StepStats, TrainConfig, Trainer};

use crate::arch::{Affine, Arch, Family, LayerSlot, Part, Residual, Slot, Tensors};
use crate::config::{Activation, Gpt2Config, ModelConfig, NeoXConfig};
use crate::ops::Layout;
use crate::weights::Weights;
use crate::{LmError, Result};
use tape::{Activations, NormRecord, Tape};

/// One named tensor of the parameter buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    /// Hugging Face name (`gpt_neox.layers.0.attention.query_key_value.weight`, …).
    pub name: String,
    /// Shape as Hugging Face stores it (`Linear` weights `[out, in]`).
    pub shape: Vec<usize>,
    /// Offset in the buffer.
    pub offset: usize,
    /// Its place in the architecture.
    pub slot: Slot,
}

impl TensorInfo {
    /// Elements.
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }
    /// Whether it has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Its range in the buffer.
    pub fn range(&self) -> Range<usize> {
        self.offset..self.offset + self.len()
    }
}

/// A small GPT-NeoX configuration for tests and examples: `vocab`, `hidden`, `layers`, `heads`,
/// intermediate size 4·hidden, 64 positions, rotary on 25% of each head, parallel residual, untied,
/// exact GELU.
pub fn tiny_config(vocab: usize, hidden: usize, layers: usize, heads: usize) -> NeoXConfig {
    NeoXConfig {
        vocab_size: vocab,
        max_position_embeddings: 64,
        hidden_size: hidden,
        num_hidden_layers: layers,
        num_attention_heads: heads,
        intermediate_size: 4 * hidden,
        rotary_pct: 0.25,
        rotary_base: 10000.0,
        use_parallel_residual: true,
        tie_word_embeddings: false,
        layer_norm_eps: 1e-5,
        activation: Activation::GeluExact,
    }
}

/// A small GPT-2 configuration for tests and examples: `vocab`, `hidden`, `layers`, `heads`, MLP
/// width 4·hidden, 64 positions, tied output embedding, tanh GELU (`gelu_new`).
pub fn tiny_gpt2_config(vocab: usize, hidden: usize, layers: usize, heads: usize) -> Gpt2Config {
    Gpt2Config {
        vocab_size: vocab,
        n_positions: 64,
        n_embd: hidden,
        n_layer: layers,
        n_head: heads,
        n_inner: 4 * hidden,
        tie_word_embeddings: true,
        layer_norm_epsilon: 1e-5,
        activation: Activation::GeluTanh,
    }
}

/// The parameters of a model in one buffer, with named views in Hugging Face order.
#[derive(Debug, Clone)]
pub struct Params {
    cfg: ModelConfig,
    arch: Arch,
    /// The range of the parameter buffer of every slot (pieces of one slot, such as the Llama family's
    /// q, k and v projections, lie next to each other).
    slots: Tensors<Range<usize>>,
    /// The names each tensor may be stored under (the first is written).
    names: Vec<Vec<String>>,
    /// The `config.json` the parameters were loaded with (written back unchanged on save).
    source_config: Option<serde_json::Value>,
    tensors: Vec<TensorInfo>,
    data: Vec<f32>,
}

use memsteer_panel::rng::{mix64, word};

/// A standard normal draw for element `i` of stream `key` (Box–Muller on two words).
fn normal(key: u64, i: u64) -> f64 {
    let unit = |w: u64| (w >> 11) as f64 * (1.0 / (1u64 << 53) as f64);
    let u1 = 1.0 - unit(word(key, 2 * i)); // (0, 1]
    let u2 = unit(word(key, 2 * i + 1));
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

fn check_config(cfg: &ModelConfig) -> Result<Arch> {
    let bad = |m: String| Err(LmError::Input(format!("model config: {m}")));
    if let ModelConfig::GptNeoX(c) = cfg
        && !(0.0..=1.0).contains(&c.rotary_pct)
    {
        return bad(format!("rotary share must lie in [0, 1], found {}", c.rotary_pct));
    }
    let (heads, dim) = match cfg {
        ModelConfig::Gpt2(c) => (c.n_head, c.n_embd),
        ModelConfig::GptNeoX(c) => (c.num_attention_heads, c.hidden_size),
        ModelConfig::Llama(c) => (c.num_attention_heads, c.num_attention_heads * c.head_dim),
    };
    if heads == 0 || !dim.is_multiple_of(heads) {
        return bad(format!("the hidden size {dim} is not divisible by the {heads} attention heads"));
    }
    let arch = Arch::from_config(cfg);
    arch.validate()?;
    Ok(arch)
}

impl Params {
    /// Zero parameters laid out for `cfg` (a [`NeoXConfig`], a [`Gpt2Config`] or a [`ModelConfig`]).
    pub fn zeros(cfg: impl Into<ModelConfig>) -> Result<Self> {
        let cfg = cfg.into();
        let arch = check_config(&cfg)?;
        let mut tensors = Vec::new();
        let mut names = Vec::new();
        let mut offset = 0usize;
        // The pieces of a slot next to each other (the Llama family's q, k and v projection weights,
        // then their biases), so that the slot is one range; otherwise Hugging Face's order.
        let mut specs = arch.tensors();
        let first_of = |slot: Slot, specs: &[crate::arch::TensorSpec]| specs.iter().position(|t| t.slot == slot);
        let order: Vec<usize> = specs.iter().map(|t| first_of(t.slot, &specs).unwrap_or(0)).collect();
        let mut idx: Vec<usize> = (0..specs.len()).collect();
        idx.sort_by_key(|&i| (order[i], i));
        let mut sorted: Vec<crate::arch::TensorSpec> = Vec::with_capacity(specs.len());
        for i in idx {
            sorted.push(specs[i].clone());
        }
        specs = sorted;
        for spec in specs {
            let name = spec.names[0].clone();
            let len = spec
                .shape
                .iter()
                .try_fold(1usize, |a, &b| a.checked_mul(b))
                .ok_or_else(|| LmError::Input(format!("tensor {name} of shape {:?} is too large", spec.shape)))?;
            tensors.push(TensorInfo { name, shape: spec.shape, offset, slot: spec.slot });
            names.push(spec.names);
            offset = offset.checked_add(len).ok_or_else(|| LmError::Input("model is too large".into()))?;
        }
        let slots = arch.load_tensors(
            |spec| {
                tensors
                    .iter()
                    .zip(&names)
                    .find(|(t, n)| t.slot == spec.slot && **n == spec.names)
                    .map(|(t, _)| t.range())
                    .ok_or_else(|| LmError::Input(format!("internal: no tensor for {:?}", spec.slot)))
            },
            |pieces: Vec<Range<usize>>| {
                let adjacent = pieces.windows(2).all(|w| w[0].end == w[1].start);
                match (pieces.first(), pieces.last()) {
                    (Some(a), Some(b)) if adjacent => Ok(a.start..b.end),
                    _ => Err(LmError::Input("internal: the pieces of a slot are not adjacent".into())),
                }
            },
        )?;
        Ok(Self { cfg, arch, slots, names, source_config: None, tensors, data: vec![0.0; offset] })
    }

    /// Random initialisation as Hugging Face's `GPTNeoXPreTrainedModel`, `GPT2PreTrainedModel` and
    /// `LlamaPreTrainedModel`
    /// (`initializer_range` 0.02): weight matrices and embeddings normal with standard deviation
    /// `std` (GPT-2's two output projections of each block `std / √(2·layers)`), norm weights 1,
    /// biases 0. Draws are counter-based (element `i` of a tensor comes from a SplitMix64 stream keyed
    /// by the seed and the tensor's name), so they do not depend on threads or on other tensors.
    pub fn init_random_std(cfg: impl Into<ModelConfig>, seed: u64, std: f32) -> Result<Self> {
        let mut p = Self::zeros(cfg)?;
        let residual_std = f64::from(std) / ((2 * p.arch.layers) as f64).sqrt();
        for t in &p.tensors {
            let slice = &mut p.data[t.range()];
            let is_norm_weight = matches!(
                t.slot,
                Slot::FinalNorm(Part::Weight)
                    | Slot::Layer(
                        _,
                        LayerSlot::Norm1(Part::Weight)
                            | LayerSlot::Norm2(Part::Weight)
                            | LayerSlot::PostNorm1(Part::Weight)
                            | LayerSlot::PostNorm2(Part::Weight)
                            | LayerSlot::QNorm
                            | LayerSlot::KNorm
                    )
            );
            if t.shape.len() == 2 {
                let std = match (p.arch.family, t.slot) {
                    (
                        Family::Gpt2,
                        Slot::Layer(_, LayerSlot::AttnOut(Part::Weight) | LayerSlot::Down(Part::Weight)),
                    ) => residual_std,
                    _ => f64::from(std),
                };
                let mut key = mix64(seed ^ 0x6A09_E667_F3BC_C909);
                for b in t.name.bytes() {
                    key = mix64(key ^ u64::from(b));
                }
                slice.par_iter_mut().enumerate().for_each(|(i, x)| *x = (normal(key, i as u64) * std) as f32);
            } else if is_norm_weight {
                // Offset norms (Gemma: `1 + w`) start at w = 0, as transformers initialises them.
                let unit_offset = matches!(p.arch.norm, crate::arch::Norm::RmsNorm { unit_offset: true, .. });
                slice.fill(if unit_offset { 0.0 } else { 1.0 });
            }
        }
        Ok(p)
    }

    /// [`Params::init_random_std`] with Hugging Face's default standard deviation 0.02.
    pub fn init_random(cfg: impl Into<ModelConfig>, seed: u64) -> Result<Self> {
        Self::init_random_std(cfg, seed, 0.02)
    }

    /// Random initialisation ([`Params::init_random`]) of the model a Hugging Face `config.json`
    /// describes; checkpoints keep that file's contents.
    pub fn from_config_file(path: &Path, seed: u64) -> Result<Self> {
        let json = read_json(path)?;
        let mut p = Self::init_random(ModelConfig::from_json(&json, path)?, seed)?;
        p.source_config = Some(json);
        Ok(p)
    }

    /// Loads a Hugging Face directory of any architecture the runtime runs (`config.json` +
    /// safetensors weights, any of f32, f16, bf16).
    pub fn from_hf(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let json = read_json(&path)?;
        let mut p = Self::zeros(ModelConfig::from_json(&json, &path)?)?;
        let w = Weights::open(dir)?;
        for (t, names) in p.tensors.iter().zip(&p.names) {
            let names: Vec<&str> = names.iter().map(String::as_str).collect();
            let values = w.tensor(&names, &t.shape)?;
            p.data[t.range()].copy_from_slice(&values);
        }
        p.source_config = Some(json);
        Ok(p)
    }

    /// Writes `dir/config.json` and `dir/model.safetensors` (f32, every tensor under its Hugging Face
    /// name), each through a temporary file renamed into place.
    pub fn save_hf(&self, dir: &Path) -> Result<()> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| LmError::Io { path, source }
        };
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let config = match &self.source_config {
            Some(c) => {
                // The weights are written in f32 whatever the source stored.
                let mut c = c.clone();
                for key in ["torch_dtype", "dtype"] {
                    if let Some(v) = c.get_mut(key) {
                        *v = "float32".into();
                    }
                }
                c
            }
            None => self.config_json(),
        };
        let text = serde_json::to_string_pretty(&config).map_err(|e| LmError::Input(e.to_string()))?;
        write_atomic(&dir.join("config.json"), text.as_bytes())?;
        let bytes: Vec<Vec<u8>> =
            self.tensors.iter().map(|t| self.data[t.range()].iter().flat_map(|x| x.to_le_bytes()).collect()).collect();
        let path = dir.join("model.safetensors");
        let mut views = Vec::with_capacity(self.tensors.len());
        for (t, b) in self.tensors.iter().zip(&bytes) {
            let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, t.shape.clone(), b)
                .map_err(|e| LmError::Weights { path: path.clone(), message: e.to_string() })?;
            views.push((t.name.clone(), view));
        }
        let meta = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
        let file = safetensors::serialize(views, Some(meta))
            .map_err(|e| LmError::Weights { path: path.clone(), message: e.to_string() })?;
        write_atomic(&path, &file)
    }

    /// The Hugging Face `config.json` of this configuration.
    pub fn config_json(&self) -> serde_json::Value {
        let act = |a: Activation| match a {
            Activation::GeluExact => "gelu",
            Activation::GeluTanh => "gelu_new",
        };
        // Through the shortest decimal of the f32, so 1e-5 is written as 1e-5.
        let shortest = |x: f32| -> f64 { x.to_string().parse().unwrap_or(f64::from(x)) };
        match &self.cfg {
            ModelConfig::GptNeoX(c) => serde_json::json!({
                "architectures": ["GPTNeoXForCausalLM"],
                "model_type": "gpt_neox",
                "vocab_size": c.vocab_size,
                "hidden_size": c.hidden_size,
                "num_hidden_layers": c.num_hidden_layers,
                "num_attention_heads": c.num_attention_heads,
                "intermediate_size": c.intermediate_size,
                "max_position_embeddings": c.max_position_embeddings,
                "rotary_pct": c.rotary_pct,
                "rotary_emb_base": c.rotary_base,
                "use_parallel_residual": c.use_parallel_residual,
                "tie_word_embeddings": c.tie_word_embeddings,
                "layer_norm_eps": shortest(c.layer_norm_eps),
                "hidden_act": act(c.activation),
                "initializer_range": 0.02,
                "attention_bias": true,
                "torch_dtype": "float32",
            }),
            // memsteer trains without dropout; the config says so.
            ModelConfig::Gpt2(c) => serde_json::json!({
                "architectures": ["GPT2LMHeadModel"],
                "model_type": "gpt2",
                "vocab_size": c.vocab_size,
                "n_positions": c.n_positions,
                "n_embd": c.n_embd,
                "n_layer": c.n_layer,
                "n_head": c.n_head,
                "n_inner": c.n_inner,
                "tie_word_embeddings": c.tie_word_embeddings,
                "layer_norm_epsilon": shortest(c.layer_norm_epsilon),
                "activation_function": act(c.activation),
                "resid_pdrop": 0.0,
                "embd_pdrop": 0.0,
                "attn_pdrop": 0.0,
                "initializer_range": 0.02,
                "torch_dtype": "float32",
            }),
            ModelConfig::Llama(c) => llama_config_json(c),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// The architecture.
    pub fn arch(&self) -> &Arch {
        &self.arch
    }

    /// The named tensors, in Hugging Face order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// The whole buffer.
    pub fn data(&self) -> &[f32] {
        &self.data
    }

    /// The whole buffer, writable.
    pub fn data_mut(&mut self) -> &mut [f32] {
        &mut self.data
    }

    /// The values of the tensor called `name`.
    pub fn tensor(&self, name: &str) -> Option<&[f32]> {
        self.tensors.iter().find(|t| t.name == name).map(|t| &self.data[t.range()])
    }

    /// Ranges that get weight decay: 2-D weights and embeddings (not biases or layer norms).
    pub fn decay_ranges(&self) -> Vec<Range<usize>> {
        self.tensors.iter().filter(|t| t.shape.len() == 2).map(TensorInfo::range).collect()
    }

    fn t(&self, r: &Range<usize>) -> &[f32] {
        &self.data[r.clone()]
    }

    /// A norm's or a linear layer's weight and bias.
    fn pair(&self, p: &Affine<Range<usize>>) -> Result<(&[f32], &[f32])> {
        Ok((self.t(&p.0), self.t(crate::arch::bias(p)?)))
    }

    /// `log p(x_t | x_<t)` for `t = 1..T` of every sequence, by the trainer's forward pass.
    pub fn token_log_probs(&self, seqs: &[&[u32]]) -> Result<Vec<Vec<f32>>> {
        let acts = self.forward(seqs)?;
        let out = self.t(self.slots.output());
        let lp = ops::output_layer(
            &acts.hf,
            out,
            &acts.layout,
            &acts.tokens,
            (self.arch.dim, self.arch.logit_softcap),
            None,
        )?;
        let mut result = Vec::with_capacity(seqs.len());
        let mut at = 0;
        for s in seqs {
            result.push(lp[at..at + s.len() - 1].to_vec());
            at += s.len() - 1;
        }
        Ok(result)
    }

    /// Mean cross-entropy (nats) over every predicted position of the batch.
    pub fn loss(&self, seqs: &[&[u32]]) -> Result<f64> {
        let lp = self.token_log_probs(seqs)?;
        let n: usize = lp.iter().map(Vec::len).sum();
        Ok(-lp.iter().flatten().map(|&x| f64::from(x)).sum::<f64>() / n as f64)
    }

    /// The loss of [`Params::loss`] and its gradient, written into `grads` (overwritten; same layout
    /// as the parameter buffer). The backward walks the forward's block loop in reverse over what the
    /// forward recorded.
    pub fn loss_and_grad(&self, seqs: &[&[u32]], grads: &mut [f32]) -> Result<f64> {
        if grads.len() != self.data.len() {
            return Err(LmError::Input(format!(
                "gradient buffer of {} values for {} parameters",
                grads.len(),
                self.data.len()
            )));
        }
        let acts = self.forward(seqs)?;
        grads.fill(0.0);
        let arch = &self.arch;
        let d = arch.dim;
        let n = acts.layout.rows();
        let mut dhf = vec![0.0f32; n * d];
        let out = self.slots.output().clone();
        let lp = ops::output_layer(
            &acts.hf,
            self.t(&out),
            &acts.layout,
            &acts.tokens,
            (d, arch.logit_softcap),
            Some((&mut dhf, &mut grads[out])),
        )?;
        let loss = -lp.iter().map(|&x| f64::from(x)).sum::<f64>() / lp.len() as f64;
        let mut dx = vec![0.0f32; n * d];
        self.norm_backward(&dhf, &acts.final_norm, &self.slots.final_norm, &mut dx, grads)?;
        let placement = arch.residual;
        for (i, (s, a)) in self.slots.layers.iter().zip(&acts.layers).enumerate().rev() {
            dx = match placement {
                Residual::Sequential | Residual::Parallel => {
                    let mut dres = dx.clone();
                    // The MLP branch, from the gradient at its output; then its norm.
                    let dh = self.mlp_backward(&dx, a, s, grads)?;
                    self.norm_backward(&dh, &a.norm2, &s.norm2, &mut dres, grads)?;
                    // The attention branch: its output gradient is dx (parallel) or the gradient at the MLP
                    // norm's input (sequential: `dres` now holds it, and it also flows on to x_in).
                    let dattn = if placement == Residual::Parallel { dx } else { dres.clone() };
                    let dh = self.attention_backward(&dattn, (i, a, s), &acts, grads)?;
                    self.norm_backward(&dh, &a.norm1, &s.norm1, &mut dres, grads)?;
                    dres
                }
                Residual::PostNorm => {
                    // x2 = x1 + n2(mlp(x1)): through the norm to the MLP's output, through the MLP to x1.
                    let mut dout = vec![0.0f32; n * d];
                    self.norm_backward(&dx, &a.norm2, &s.norm2, &mut dout, grads)?;
                    let dh = self.mlp_backward(&dout, a, s, grads)?;
                    let mut dres = dx;
                    dres.iter_mut().zip(&dh).for_each(|(a, b)| *a += b);
                    // x1 = x0 + n1(attn(x0)).
                    let mut dout = vec![0.0f32; n * d];
                    self.norm_backward(&dres, &a.norm1, &s.norm1, &mut dout, grads)?;
                    let dh = self.attention_backward(&dout, (i, a, s), &acts, grads)?;
                    dres.iter_mut().zip(&dh).for_each(|(a, b)| *a += b);
                    dres
                }
                Residual::Sandwich => {
                    let post = s.post_norms.as_ref().ok_or_else(|| LmError::Input("internal: post norms".into()))?;
                    // x2 = x1 + p2(mlp(n2 x1)).
                    let mut dout = vec![0.0f32; n * d];
                    self.norm_backward(&dx, &a.post2, &post.1, &mut dout, grads)?;
                    let dh = self.mlp_backward(&dout, a, s, grads)?;
                    let mut dres = dx;
                    self.norm_backward(&dh, &a.norm2, &s.norm2, &mut dres, grads)?;
                    // x1 = x0 + p1(attn(n1 x0)).
                    let mut dout = vec![0.0f32; n * d];
                    self.norm_backward(&dres, &a.post1, &post.0, &mut dout, grads)?;
                    let dh = self.attention_backward(&dout, (i, a, s), &acts, grads)?;
                    self.norm_backward(&dh, &a.norm1, &s.norm1, &mut dres, grads)?;
                    dres
                }
            };
        }
        // The embedding scale (Gemma) scales the gradient on the way to the table.
        if let Some(scale) = arch.embed_scale {
            dx.iter_mut().for_each(|v| *v *= scale);
        }
        // Embeddings: rows in order, so repeated tokens (and positions) add up in a fixed order.
        let emb = &mut grads[self.slots.embed.clone()];
        for (r, &tok) in acts.tokens.iter().enumerate() {
            let row = &mut emb[tok as usize * d..(tok as usize + 1) * d];
            row.iter_mut().zip(&dx[r * d..(r + 1) * d]).for_each(|(g, v)| *g += v);
        }
        if let Some(p) = &self.slots.positions {
            let wpe = &mut grads[p.clone()];
            for (r, &pos) in acts.layout.positions.iter().enumerate() {
                let row = &mut wpe[pos * d..(pos + 1) * d];
                row.iter_mut().zip(&dx[r * d..(r + 1) * d]).for_each(|(g, v)| *g += v);
            }
        }
        Ok(loss)
    }

    /// Backward of the MLP from the gradient at its output (before its down bias): accumulates its
    /// parameters' gradients and returns the gradient at its input.
    fn mlp_backward(
        &self,
        dout: &[f32],
        a: &tape::LayerActs,
        s: &crate::arch::LayerTensors<Range<usize>>,
        grads: &mut [f32],
    ) -> Result<Vec<f32>> {
        let arch = &self.arch;
        let (n, d, inter, wl) = (self.rows_of(dout), arch.dim, arch.inner, arch.weights);
        let w = |p: &Affine<Range<usize>>| (self.t(&p.0), wl);
        let mut dmid = vec![0.0f32; n * inter];
        let mut dh = vec![0.0f32; n * d];
        ops::linear_backward(dout, &a.mid, w(&s.down), n, Some(&mut dmid), affine_mut(grads, &s.down))?;
        match (&a.gate, &s.gate) {
            (Some(gate_pre), Some(gate)) => {
                let (dgate, dup) = if arch.mlp == crate::arch::Mlp::GeGlu {
                    ops::geglu_backward(&dmid, gate_pre, &a.pre)
                } else {
                    ops::swiglu_backward(&dmid, gate_pre, &a.pre)
                };
                let mut dh_gate = vec![0.0f32; n * d];
                ops::linear_backward(&dgate, &a.h2, w(gate), n, Some(&mut dh_gate), affine_mut(grads, gate))?;
                ops::linear_backward(&dup, &a.h2, w(&s.up), n, Some(&mut dh), affine_mut(grads, &s.up))?;
                dh.iter_mut().zip(&dh_gate).for_each(|(a, b)| *a += b);
            }
            (None, None) => {
                let act = arch.activation().ok_or_else(|| LmError::Input("internal: no activation".into()))?;
                ops::gelu_backward(&mut dmid, &a.pre, act);
                ops::linear_backward(&dmid, &a.h2, w(&s.up), n, Some(&mut dh), affine_mut(grads, &s.up))?;
            }
            _ => return Err(LmError::Input("internal: a gate without its recorded input".into())),
        }
        Ok(dh)
    }

    /// Backward of layer `i`'s attention branch from the gradient at its output (before the output
    /// bias): accumulates its parameters' gradients and returns the gradient at its input.
    fn attention_backward(
        &self,
        dout: &[f32],
        (i, a, s): (usize, &tape::LayerActs, &crate::arch::LayerTensors<Range<usize>>),
        acts: &Activations,
        grads: &mut [f32],
    ) -> Result<Vec<f32>> {
        let arch = &self.arch;
        let (n, d, wl) = (self.rows_of(dout), arch.dim, arch.weights);
        let w = |p: &Affine<Range<usize>>| (self.t(&p.0), wl);
        let mut dctx = vec![0.0f32; n * arch.attn_dim()];
        ops::linear_backward(dout, &a.ctx, w(&s.attn_out), n, Some(&mut dctx), affine_mut(grads, &s.attn_out))?;
        let mut dqkv = vec![0.0f32; n * arch.qkv_width()];
        ops::attention_backward(&dctx, &a.qkv, &acts.layout, (arch, arch.scores(i)), &mut dqkv)?;
        match &acts.local {
            Some(local) if arch.sliding_layer(i) => local.apply(&mut dqkv, &acts.layout.positions, true),
            _ => acts.rotary.apply(&mut dqkv, &acts.layout.positions, true),
        }
        if let (Some(stats), Some((qn, kn))) = (&a.qk_norm, &s.qk_norm) {
            let (gq, gk) = (self.gain(qn), self.gain(kn));
            let (dqn, dkn) = two_mut(grads, qn, kn)?;
            let stats = (stats.0.as_slice(), stats.1.as_slice(), stats.2.as_slice());
            ops::qk_norm_backward(&mut dqkv, stats, arch, (&gq, &gk), (dqn, dkn), n);
        }
        let mut dh = vec![0.0f32; n * d];
        ops::linear_backward(&dqkv, &a.h1, w(&s.qkv), n, Some(&mut dh), affine_mut(grads, &s.qkv))?;
        Ok(dh)
    }

    /// Rows of a `rows × dim` buffer.
    fn rows_of(&self, buf: &[f32]) -> usize {
        buf.len() / self.arch.dim
    }

    /// A norm's gain as the forward used it: the stored weight, or `1 + w` for offset norms (Gemma).
    fn gain(&self, w: &Range<usize>) -> std::borrow::Cow<'_, [f32]> {
        let w = self.t(w);
        match self.arch.norm {
            crate::arch::Norm::RmsNorm { unit_offset: true, .. } => w.iter().map(|x| 1.0 + x).collect(),
            _ => std::borrow::Cow::Borrowed(w),
        }
    }

    /// Backward of a norm: `dx += ∂/∂x` of `dout`, and its weight's (and bias's) gradients.
    fn norm_backward(
        &self,
        dout: &[f32],
        rec: &NormRecord,
        p: &Affine<Range<usize>>,
        dx: &mut [f32],
        grads: &mut [f32],
    ) -> Result<()> {
        match self.arch.norm {
            crate::arch::Norm::LayerNorm { .. } => {
                let (dg, db) = affine_mut(grads, p);
                let db = db.ok_or_else(|| LmError::Input("internal: a layer norm without its bias".into()))?;
                ops::layer_norm_backward(dout, &rec.x, (&rec.mean, &rec.rstd), self.t(&p.0), dx, dg, db);
            }
            crate::arch::Norm::RmsNorm { .. } => {
                let g = self.gain(&p.0);
                let (dg, _) = affine_mut(grads, p);
                ops::rms_norm_backward(dout, &rec.x, &rec.rstd, &g, dx, dg);
            }
        }
        Ok(())
    }

    /// Checks the batch and lays it out.
    fn layout(&self, seqs: &[&[u32]]) -> Result<Layout> {
        if seqs.is_empty() {
            return Err(LmError::Input("empty batch".into()));
        }
        if let Some((i, s)) = seqs.iter().enumerate().find(|(_, s)| s.len() < 2) {
            let message = format!("{} token(s): training needs at least two per sequence", s.len());
            return Err(if seqs.len() == 1 {
                LmError::Input(message)
            } else {
                LmError::Sequence { index: i, message }
            });
        }
        crate::ops::layout_for((self.arch.vocab, self.arch.context), seqs, &[])
    }

    /// The forward pass: the runtime's block loop ([`crate::block::forward`]) on the recording
    /// backend, keeping what the backward needs.
    fn forward(&self, seqs: &[&[u32]]) -> Result<Activations> {
        let layout = self.layout(seqs)?;
        let tokens: Vec<u32> = seqs.iter().flat_map(|s| s.iter().copied()).collect();
        let longest = seqs.iter().map(|s| s.len()).max().unwrap_or(0);
        let mut tape = Tape {
            p: self,
            layout: &layout,
            tokens: &tokens,
            rotary: ops::Rotary::new(&self.arch, longest),
            local: ops::Rotary::local(&self.arch, longest),
            layers: Vec::with_capacity(self.arch.layers),
            last: None,
        };
        let hf = crate::block::forward(&self.arch, &self.slots, &mut tape)?;
        let Tape { rotary, local, layers, last, .. } = tape;
        let final_norm =
            last.ok_or_else(|| LmError::Input("internal: the forward pass ended without its final norm".into()))?;
        Ok(Activations { layout, tokens, rotary, local, layers, final_norm, hf })
    }
}

fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(path).map_err(|source| LmError::Io { path: path.into(), source })?;
    serde_json::from_str(&text)
        .map_err(|e| LmError::Config { path: path.into(), message: format!("not valid JSON: {e}") })
}

/// The gradients of a weight (or norm gain) and of its bias when it has one, both writable.
fn affine_mut<'a>(grads: &'a mut [f32], (w, b): &Affine<Range<usize>>) -> (&'a mut [f32], Option<&'a mut [f32]>) {
    match b {
        None => (&mut grads[w.clone()], None),
        Some(b) => {
            let (x, y) = split_two(grads, w, b);
            (x, Some(y))
        }
    }
}

/// Two disjoint ranges of `grads`, both writable.
fn two_mut<'a>(grads: &'a mut [f32], a: &Range<usize>, b: &Range<usize>) -> Result<(&'a mut [f32], &'a mut [f32])> {
    if a.end <= b.start || b.end <= a.start {
        Ok(split_two(grads, a, b))
    } else {
        Err(LmError::Input("internal: overlapping parameter ranges".into()))
    }
}

/// Disjoint ranges `a` and `b` of `grads`, in that order.
fn split_two<'a>(grads: &'a mut [f32], a: &Range<usize>, b: &Range<usize>) -> (&'a mut [f32], &'a mut [f32]) {
    if a.end <= b.start {
        let (head, tail) = grads.split_at_mut(b.start);
        (&mut head[a.clone()], &mut tail[..b.len()])
    } else {
        let (head, tail) = grads.split_at_mut(a.start);
        (&mut tail[..a.len()], &mut head[b.clone()])
    }
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    memsteer_panel::durable::write_bytes(path, bytes).map_err(|source| LmError::Io { path: path.into(), source })
}

#[cfg(test)]
mod tests;

/// The Hugging Face `config.json` of a Llama-family configuration (used when a model is initialised
/// in code rather than from a file, whose contents are kept instead).
fn llama_config_json(c: &crate::config::LlamaConfig) -> serde_json::Value {
    use crate::config::{LlamaFamily, RopeScaling};
    let (model_type, arch) = match c.family {
        LlamaFamily::Llama => ("llama", "LlamaForCausalLM"),
        LlamaFamily::Mistral => ("mistral", "MistralForCausalLM"),
        LlamaFamily::Qwen2 => ("qwen2", "Qwen2ForCausalLM"),
        LlamaFamily::Qwen3 => ("qwen3", "Qwen3ForCausalLM"),
        LlamaFamily::Olmo2 => ("olmo2", "Olmo2ForCausalLM"),
        LlamaFamily::Gemma2 => ("gemma2", "Gemma2ForCausalLM"),
        LlamaFamily::Gemma3 => ("gemma3_text", "Gemma3ForCausalLM"),
    };
    let scaling = match c.rope_scaling {
        RopeScaling::None => serde_json::Value::Null,
        RopeScaling::Linear { factor } => serde_json::json!({"rope_type": "linear", "factor": factor}),
        RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_context } => serde_json::json!({
            "rope_type": "llama3", "factor": factor, "low_freq_factor": low_freq_factor,
            "high_freq_factor": high_freq_factor, "original_max_position_embeddings": original_context,
        }),
    };
    let eps: f64 = c.rms_norm_eps.to_string().parse().unwrap_or(f64::from(c.rms_norm_eps));
    let mut json = serde_json::json!({
        "architectures": [arch],
        "model_type": model_type,
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "num_hidden_layers": c.num_hidden_layers,
        "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads,
        "head_dim": c.head_dim,
        "intermediate_size": c.intermediate_size,
        "max_position_embeddings": c.max_position_embeddings,
        "rms_norm_eps": eps,
        "rope_theta": c.rope_theta,
        "rope_scaling": scaling,
        "tie_word_embeddings": c.tie_word_embeddings,
        "attention_bias": c.qkv_bias && c.family != LlamaFamily::Qwen2,
        "mlp_bias": c.mlp_bias,
        "sliding_window": if c.family == LlamaFamily::Mistral { serde_json::json!(c.sliding_window) } else { serde_json::Value::Null },
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "torch_dtype": "float32",
    });
    if matches!(c.family, LlamaFamily::Gemma2 | LlamaFamily::Gemma3) {
        let types: Option<Vec<&str>> = c
            .sliding_layers
            .as_ref()
            .map(|v| v.iter().map(|&s| if s { "sliding_attention" } else { "full_attention" }).collect());
        let extra = serde_json::json!({
            "hidden_act": null,
            "hidden_activation": "gelu_pytorch_tanh",
            "sliding_window": c.sliding_window,
            "layer_types": types,
            "rope_local_base_freq": c.local_rope_theta,
            "query_pre_attn_scalar": c.query_pre_attn_scalar,
            "final_logit_softcapping": c.final_logit_softcapping,
            "attn_logit_softcapping": c.attn_logit_softcapping,
        });
        if let (Some(j), Some(e)) = (json.as_object_mut(), extra.as_object()) {
            j.extend(e.clone());
        }
    }
    json
}
