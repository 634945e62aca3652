//! Model configurations from Hugging Face `config.json`.

use std::path::Path;

use serde_json::Value;

use crate::{LmError, Result};

/// The largest size any `config.json` dimension may take (2²⁶).
pub const MAX_DIMENSION: u64 = 1 << 26;

/// GELU variant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `0.5 x (1 + erf(x / √2))`.
    GeluExact,
    /// The tanh approximation (GPT-2's `gelu_new`).
    GeluTanh,
}

/// A GPT-2 configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Gpt2Config {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Context length.
    pub n_positions: usize,
    /// Hidden size.
    pub n_embd: usize,
    /// Layers.
    pub n_layer: usize,
    /// Attention heads.
    pub n_head: usize,
    /// MLP width (`n_inner`; 4 · `n_embd` when null or absent).
    pub n_inner: usize,
    /// Output embedding tied to the token embedding (`lm_head.weight` is read when not).
    pub tie_word_embeddings: bool,
    /// Layer-norm epsilon.
    pub layer_norm_epsilon: f32,
    /// Activation of the MLP.
    pub activation: Activation,
}

/// A GPT-NeoX (Pythia) configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct NeoXConfig {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Context length.
    pub max_position_embeddings: usize,
    /// Hidden size.
    pub hidden_size: usize,
    /// Layers.
    pub num_hidden_layers: usize,
    /// Attention heads.
    pub num_attention_heads: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// Share of each head's dimensions that get rotary embeddings (`rotary_pct` or
    /// `rope_parameters.partial_rotary_factor`).
    pub rotary_pct: f64,
    /// Rotary base (`rotary_emb_base` or `rope_theta`).
    pub rotary_base: f64,
    /// `x + attn(ln1 x) + mlp(ln2 x)` (true, Pythia) or sequential blocks.
    pub use_parallel_residual: bool,
    /// Output embedding tied to the input embedding.
    pub tie_word_embeddings: bool,
    /// Layer-norm epsilon.
    pub layer_norm_eps: f32,
    /// MLP activation.
    pub activation: Activation,
}

/// A configuration of a supported architecture.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum ModelConfig {
    /// GPT-2.
    Gpt2(Gpt2Config),
    /// GPT-NeoX (Pythia).
    GptNeoX(NeoXConfig),
}

fn activation(name: &str, path: &Path) -> Result<Activation> {
    match name {
        "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Ok(Activation::GeluTanh),
        "gelu" => Ok(Activation::GeluExact),
        other => Err(LmError::Config {
            path: path.into(),
            message: format!("unsupported activation {other:?}; expected gelu or gelu_new"),
        }),
    }
}

/// Keys this runtime does not implement, with the values under which it still computes exactly what
/// Hugging Face computes (absent keys take these values). Any other value is an error naming the key,
/// never a silently different model.
fn check_unsupported(v: &Value, path: &Path, keys: &[(&str, &[Value])]) -> Result<()> {
    for (key, fine) in keys {
        if let Some(x) = v.get(*key)
            && !fine.contains(x)
        {
            let allowed: Vec<String> = fine.iter().map(Value::to_string).collect();
            return Err(LmError::Config {
                path: path.into(),
                message: format!(
                    "`{key}` = {x} is not supported by this runtime (it implements {}); refusing to compute a different model",
                    allowed.join(" or ")
                ),
            });
        }
    }
    Ok(())
}

impl ModelConfig {
    /// Reads `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| LmError::Io { path: path.into(), source })?;
        let v: Value = serde_json::from_str(&text)
            .map_err(|e| LmError::Config { path: path.into(), message: format!("not valid JSON: {e}") })?;
        Self::from_json(&v, path)
    }

    /// Interprets a parsed `config.json`; `path` names it in errors.
    pub fn from_json(v: &Value, path: &Path) -> Result<Self> {
        let err = |message: String| LmError::Config { path: path.into(), message };
        let usize_field = |key: &str| -> Result<usize> {
            match v.get(key) {
                // Bounded, so that products of dimensions (4·n_embd, vocab × d, …) cannot overflow.
                Some(x) => x.as_u64().filter(|n| *n > 0 && *n <= MAX_DIMENSION).map(|n| n as usize).ok_or_else(|| {
                    err(format!("field `{key}` must be a positive integer of at most {MAX_DIMENSION}, found {x}"))
                }),
                None => Err(err(format!("missing field `{key}`"))),
            }
        };
        let model_type =
            v.get("model_type").and_then(Value::as_str).ok_or_else(|| err("missing field `model_type`".into()))?;
        match model_type {
            "gpt2" => {
                check_unsupported(
                    v,
                    path,
                    &[
                        ("scale_attn_by_inverse_layer_idx", &[Value::Bool(false), Value::Null]),
                        ("reorder_and_upcast_attn", &[Value::Bool(false), Value::Null]),
                        ("scale_attn_weights", &[Value::Bool(true), Value::Null]),
                        ("add_cross_attention", &[Value::Bool(false), Value::Null]),
                    ],
                )?;
                let eps = v.get("layer_norm_epsilon").and_then(Value::as_f64).unwrap_or(1e-5) as f32;
                let act = v.get("activation_function").and_then(Value::as_str).unwrap_or("gelu_new");
                let n_embd = usize_field("n_embd")?;
                let cfg = Gpt2Config {
                    vocab_size: usize_field("vocab_size")?,
                    n_positions: usize_field("n_positions")?,
                    n_embd,
                    n_layer: usize_field("n_layer")?,
                    n_head: usize_field("n_head")?,
                    n_inner: match v.get("n_inner") {
                        None | Some(Value::Null) => 4 * n_embd,
                        Some(_) => usize_field("n_inner")?,
                    },
                    tie_word_embeddings: match v.get("tie_word_embeddings") {
                        None => true,
                        Some(x) => x.as_bool().ok_or_else(|| {
                            err(format!("field `tie_word_embeddings` must be true or false, found {x}"))
                        })?,
                    },
                    layer_norm_epsilon: eps,
                    activation: activation(act, path)?,
                };
                if !cfg.n_embd.is_multiple_of(cfg.n_head) {
                    return Err(err(format!("n_embd = {} is not divisible by n_head = {}", cfg.n_embd, cfg.n_head)));
                }
                Ok(ModelConfig::Gpt2(cfg))
            }
            "gpt_neox" => {
                check_unsupported(
                    v,
                    path,
                    &[
                        ("rope_scaling", &[Value::Null]),
                        ("attention_bias", &[Value::Bool(true), Value::Null]),
                        ("use_qk_norm", &[Value::Bool(false), Value::Null]),
                    ],
                )?;
                if let Some(t) = v.pointer("/rope_parameters/rope_type")
                    && t != "default"
                {
                    return Err(err(format!(
                        "`rope_parameters.rope_type` = {t} is not supported by this runtime (it implements \"default\"); refusing to compute a different model"
                    )));
                }
                let number = |keys: &[&str], default: Option<f64>| -> Result<f64> {
                    for k in keys {
                        let mut cur = Some(v);
                        for part in k.split('.') {
                            cur = cur.and_then(|c| c.get(part));
                        }
                        if let Some(x) = cur {
                            return x.as_f64().ok_or_else(|| err(format!("field `{k}` must be a number, found {x}")));
                        }
                    }
                    default.ok_or_else(|| err(format!("missing field `{}`", keys.join("` or `"))))
                };
                let flag = |key: &str, default: bool| -> Result<bool> {
                    match v.get(key) {
                        None => Ok(default),
                        Some(x) => {
                            x.as_bool().ok_or_else(|| err(format!("field `{key}` must be true or false, found {x}")))
                        }
                    }
                };
                let rotary_pct = number(
                    &["rotary_pct", "partial_rotary_factor", "rope_parameters.partial_rotary_factor"],
                    Some(1.0),
                )?;
                if !(0.0..=1.0).contains(&rotary_pct) {
                    return Err(err(format!("rotary share must lie in [0, 1], found {rotary_pct}")));
                }
                let cfg = NeoXConfig {
                    vocab_size: usize_field("vocab_size")?,
                    max_position_embeddings: usize_field("max_position_embeddings")?,
                    hidden_size: usize_field("hidden_size")?,
                    num_hidden_layers: usize_field("num_hidden_layers")?,
                    num_attention_heads: usize_field("num_attention_heads")?,
                    intermediate_size: usize_field("intermediate_size")?,
                    rotary_pct,
                    rotary_base: number(
                        &["rotary_emb_base", "rope_theta", "rope_parameters.rope_theta"],
                        Some(10000.0),
                    )?,
                    use_parallel_residual: flag("use_parallel_residual", true)?,
                    tie_word_embeddings: flag("tie_word_embeddings", false)?,
                    layer_norm_eps: number(&["layer_norm_eps"], Some(1e-5))? as f32,
                    activation: activation(v.get("hidden_act").and_then(Value::as_str).unwrap_or("gelu"), path)?,
                };
                if !cfg.hidden_size.is_multiple_of(cfg.num_attention_heads) {
                    return Err(err(format!(
                        "hidden_size = {} is not divisible by num_attention_heads = {}",
                        cfg.hidden_size, cfg.num_attention_heads
                    )));
                }
                Ok(ModelConfig::GptNeoX(cfg))
            }
            other => Err(err(format!("unsupported model_type {other:?}; this build runs gpt2 and gpt_neox"))),
        }
    }
}

impl From<Gpt2Config> for ModelConfig {
    fn from(c: Gpt2Config) -> Self {
        ModelConfig::Gpt2(c)
    }
}

impl From<NeoXConfig> for ModelConfig {
    fn from(c: NeoXConfig) -> Self {
        ModelConfig::GptNeoX(c)
    }
}
