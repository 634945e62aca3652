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

/// The members of the Llama family this runtime reads (`model_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LlamaFamily {
    /// `llama` (Llama 2, 3, 3.1, 3.2).
    Llama,
    /// `mistral`: a sliding attention window.
    Mistral,
    /// `qwen2` (Qwen 2, 2.5): biases on the q, k and v projections.
    Qwen2,
    /// `qwen3`: per-head RMSNorm of q and k before rotary.
    Qwen3,
    /// `olmo2` (OLMo 2): norms after attention and the MLP, RMSNorm of the whole q and k projections.
    Olmo2,
    /// `gemma2` (Gemma 2): norms before and after each branch with `1 + w` weights, embeddings scaled by
    /// √hidden, GeGLU, `query_pre_attn_scalar`, soft-capped attention scores and final logits, every
    /// other layer a sliding-window layer.
    Gemma2,
    /// `gemma3_text` (Gemma 3): norms before and after each branch with `1 + w` weights, embeddings
    /// scaled by √hidden, GeGLU, per-head q/k norms, `query_pre_attn_scalar`, sliding-window layers
    /// with their own rotary base.
    Gemma3,
}

/// Rotary scaling (`rope_scaling`, or transformers 5's `rope_parameters`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RopeScaling {
    /// `default`: none.
    None,
    /// `linear`: every frequency divided by `factor`.
    Linear {
        /// Factor.
        factor: f64,
    },
    /// `llama3`: low frequencies divided by `factor`, high ones kept, smoothed in between.
    Llama3 {
        /// Factor.
        factor: f64,
        /// `low_freq_factor`.
        low_freq_factor: f64,
        /// `high_freq_factor`.
        high_freq_factor: f64,
        /// `original_max_position_embeddings`.
        original_context: f64,
    },
}

/// A configuration of the Llama family (RMSNorm, SwiGLU, grouped-query attention, rotary positions).
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    /// Which member.
    pub family: LlamaFamily,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Context length.
    pub max_position_embeddings: usize,
    /// Hidden size.
    pub hidden_size: usize,
    /// Layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (grouped-query attention; `num_attention_heads` when absent).
    pub num_key_value_heads: usize,
    /// Dimensions per head (`head_dim`, or hidden size / heads).
    pub head_dim: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f32,
    /// Rotary base.
    pub rope_theta: f64,
    /// Rotary scaling.
    pub rope_scaling: RopeScaling,
    /// Output embedding tied to the input embedding.
    pub tie_word_embeddings: bool,
    /// Biases on the q, k and v projections.
    pub qkv_bias: bool,
    /// A bias on the attention output projection.
    pub o_bias: bool,
    /// Biases on the MLP's projections.
    pub mlp_bias: bool,
    /// Each query sees at most this many keys, itself included (Mistral's `sliding_window`; Gemma 3's
    /// on its sliding layers).
    pub sliding_window: Option<usize>,
    /// Which layers are sliding-window layers, when not all of them (Gemma 3's `layer_types`).
    pub sliding_layers: Option<Vec<bool>>,
    /// The rotary base of the sliding layers, when it differs (Gemma 3's local base; no scaling).
    pub local_rope_theta: Option<f64>,
    /// Attention scores are scaled by `query_pre_attn_scalar^-1/2` instead of `head_dim^-1/2` (Gemma).
    pub query_pre_attn_scalar: Option<f64>,
    /// Attention scores soft-capped to `c·tanh(x/c)` after scaling (Gemma 2's `attn_logit_softcapping`).
    pub attn_logit_softcapping: Option<f64>,
    /// Final logits soft-capped to `c·tanh(x/c)` (Gemma 2's `final_logit_softcapping`).
    pub final_logit_softcapping: Option<f64>,
}

/// A configuration of a supported architecture.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum ModelConfig {
    /// GPT-2.
    Gpt2(Gpt2Config),
    /// GPT-NeoX (Pythia).
    GptNeoX(NeoXConfig),
    /// Llama, Mistral, Qwen 2 and Qwen 3.
    Llama(LlamaConfig),
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
            "llama" | "mistral" | "qwen2" | "qwen3" | "olmo2" | "gemma2" | "gemma3_text" => {
                Ok(ModelConfig::Llama(llama_config(v, path, model_type)?))
            }
            other => Err(err(format!(
                "unsupported model_type {other:?}; this build runs gpt2, gpt_neox, llama, mistral, qwen2, qwen3, olmo2, gemma2 and gemma3_text"
            ))),
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

impl From<LlamaConfig> for ModelConfig {
    fn from(c: LlamaConfig) -> Self {
        ModelConfig::Llama(c)
    }
}

/// The Llama family's `config.json`: every key that changes the function is read or, when this runtime
/// does not implement its value, an error naming it.
fn llama_config(v: &Value, path: &Path, model_type: &str) -> Result<LlamaConfig> {
    let err = |message: String| LmError::Config { path: path.into(), message };
    let family = match model_type {
        "llama" => LlamaFamily::Llama,
        "mistral" => LlamaFamily::Mistral,
        "qwen2" => LlamaFamily::Qwen2,
        "olmo2" => LlamaFamily::Olmo2,
        "gemma2" => LlamaFamily::Gemma2,
        "gemma3_text" => LlamaFamily::Gemma3,
        _ => LlamaFamily::Qwen3,
    };
    let gemma = matches!(family, LlamaFamily::Gemma2 | LlamaFamily::Gemma3);
    let present = |key: &str| v.get(key).is_some_and(|x| !x.is_null());
    let size = |key: &str| -> Result<usize> {
        match v.get(key) {
            Some(x) => x.as_u64().filter(|n| *n > 0 && *n <= MAX_DIMENSION).map(|n| n as usize).ok_or_else(|| {
                err(format!("field `{key}` must be a positive integer of at most {MAX_DIMENSION}, found {x}"))
            }),
            None => Err(err(format!("missing field `{key}`"))),
        }
    };
    let flag = |key: &str, default: bool| -> Result<bool> {
        match v.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(x) => x.as_bool().ok_or_else(|| err(format!("field `{key}` must be true or false, found {x}"))),
        }
    };
    let number = |x: &Value, key: &str| -> Result<f64> {
        x.as_f64().filter(|f| f.is_finite()).ok_or_else(|| err(format!("field `{key}` must be a number, found {x}")))
    };
    check_unsupported(
        v,
        path,
        &[
            ("pretraining_tp", &[Value::from(1), Value::Null]),
            ("partial_rotary_factor", &[Value::from(1.0), Value::from(1), Value::Null]),
        ],
    )?;
    let want_act = if gemma { "gelu_pytorch_tanh" } else { "silu" };
    if let Some(act) = v.get("hidden_activation").or_else(|| v.get("hidden_act")).filter(|a| !a.is_null())
        && act != want_act
    {
        return Err(err(format!("unsupported activation {act}; the {model_type} runtime implements {want_act}")));
    }
    if gemma {
        check_unsupported(v, path, &[("use_bidirectional_attention", &[Value::Bool(false), Value::Null])])?;
    }
    // Soft-capping `c·tanh(x/c)` of the attention scores and of the final logits: Gemma 2's defaults are
    // 50 and 30 (an explicit null turns one off), Gemma 3's are off; the other families have none.
    let softcap = |key: &str, gemma2_default: f64| -> Result<Option<f64>> {
        match v.get(key) {
            None if family == LlamaFamily::Gemma2 => Ok(Some(gemma2_default)),
            // transformers' other model types ignore the keys.
            None | Some(Value::Null) => Ok(None),
            Some(_) if !gemma => Ok(None),
            Some(x) => match x.as_f64().filter(|c| c.is_finite() && *c > 0.0) {
                Some(c) => Ok(Some(c)),
                None => Err(err(format!("field `{key}` must be a positive number or null, found {x}"))),
            },
        }
    };
    let attn_logit_softcapping = softcap("attn_logit_softcapping", 50.0)?;
    let final_logit_softcapping = softcap("final_logit_softcapping", 30.0)?;
    let hidden_size = size("hidden_size")?;
    let heads = size("num_attention_heads")?;
    // Absent keys take the defaults of transformers' config class for the model type.
    let kv_heads = if present("num_key_value_heads") {
        size("num_key_value_heads")?
    } else if v.get("num_key_value_heads").is_some() {
        // An explicit null: transformers takes the number of query heads.
        heads
    } else {
        match family {
            LlamaFamily::Mistral => 8,
            LlamaFamily::Qwen2 | LlamaFamily::Qwen3 => 32,
            LlamaFamily::Gemma2 | LlamaFamily::Gemma3 => 4,
            LlamaFamily::Llama | LlamaFamily::Olmo2 => heads,
        }
    };
    if !heads.is_multiple_of(kv_heads) {
        return Err(err(format!(
            "num_attention_heads = {heads} is not a multiple of num_key_value_heads = {kv_heads}"
        )));
    }
    let head_dim = if present("head_dim") {
        size("head_dim")?
    } else if family == LlamaFamily::Qwen3 {
        128
    } else if gemma {
        256
    } else if hidden_size.is_multiple_of(heads) {
        hidden_size / heads
    } else {
        return Err(err(format!("hidden_size = {hidden_size} is not divisible by num_attention_heads = {heads}")));
    };
    if !head_dim.is_multiple_of(2) {
        return Err(err(format!("head_dim = {head_dim} must be even for rotary positions")));
    }
    // Rotary settings: `rope_theta` + `rope_scaling` (Hub checkpoints) or `rope_parameters` (transformers 5).
    let mut params = v.get("rope_parameters").filter(|x| !x.is_null());
    // Gemma 3 in transformers 5: one rope dict per layer type; the full-attention one is the model's,
    // the sliding one must be plain rotary (its base is the local base).
    let mut local_rope_theta = None;
    if family == LlamaFamily::Gemma3 {
        if let Some(p) = params.and_then(Value::as_object).filter(|p| p.contains_key("full_attention")) {
            // As transformers fills them in: the local base from `rope_local_base_freq`, else 10,000.
            let fallback = match v.get("rope_local_base_freq") {
                Some(x) => number(x, "rope_local_base_freq")?,
                None => 10000.0,
            };
            let mut local_theta = fallback;
            if let Some(local) = p.get("sliding_attention") {
                let kind = local.get("rope_type").and_then(Value::as_str).unwrap_or("default");
                if kind != "default" {
                    return Err(err(format!(
                        "`rope_parameters.sliding_attention.rope_type` = {kind:?} is not supported (this runtime implements \"default\" for sliding layers)"
                    )));
                }
                if let Some(x) = local.get("rope_theta") {
                    local_theta = number(x, "rope_parameters.sliding_attention.rope_theta")?;
                }
            }
            local_rope_theta = Some(local_theta);
            params = p.get("full_attention");
        } else {
            // The Hub layout: `rope_local_base_freq` for the sliding layers, `rope_theta` + `rope_scaling` for
            // the others.
            local_rope_theta = Some(match v.get("rope_local_base_freq") {
                Some(x) => number(x, "rope_local_base_freq")?,
                None => 10000.0,
            });
        }
    }
    // transformers 5 may hold one rope dict per layer type ({"full_attention": {…}, …}): not implemented.
    if let Some(p) = params.and_then(Value::as_object)
        && !p.contains_key("rope_type")
        && !p.contains_key("type")
        && p.values().any(Value::is_object)
    {
        return Err(err(
            "`rope_parameters` holds one set of rotary settings per layer type; this runtime implements one for all layers".into(),
        ));
    }
    if let Some(f) = params.and_then(|p| p.get("partial_rotary_factor"))
        && f.as_f64() != Some(1.0)
    {
        return Err(err(format!(
            "`rope_parameters.partial_rotary_factor` = {f} is not supported by the {model_type} runtime (it rotates whole heads)"
        )));
    }
    if let (Some(a), Some(b)) =
        (v.get("rope_theta").and_then(Value::as_f64), params.and_then(|p| p.get("rope_theta")).and_then(Value::as_f64))
        && a != b
    {
        return Err(err(format!("`rope_theta` = {a} and `rope_parameters.rope_theta` = {b} disagree")));
    }
    let scaling = v.get("rope_scaling").filter(|x| !x.is_null()).or(params);
    let theta_key = if present("rope_theta") { "rope_theta" } else { "rope_parameters.rope_theta" };
    let rope_theta =
        match v.get("rope_theta").filter(|x| !x.is_null()).or_else(|| params.and_then(|p| p.get("rope_theta"))) {
            Some(x) => number(x, theta_key)?,
            None if family == LlamaFamily::Gemma3 => 1_000_000.0,
            None => 10000.0,
        };
    let scaling_key = if present("rope_scaling") { "rope_scaling" } else { "rope_parameters" };
    let rope_scaling = match scaling {
        None => RopeScaling::None,
        Some(s) => {
            let kind = s.get("rope_type").or_else(|| s.get("type")).and_then(Value::as_str).unwrap_or("default");
            let get = |k: &str| -> Result<f64> {
                s.get(k)
                    .ok_or_else(|| err(format!("`{scaling_key}.{k}` is missing for rope type {kind:?}")))
                    .and_then(|x| number(x, &format!("{scaling_key}.{k}")))
            };
            if let Some(f) = s.get("partial_rotary_factor")
                && f.as_f64() != Some(1.0)
            {
                return Err(err(format!(
                    "`{scaling_key}.partial_rotary_factor` = {f} is not supported by the {model_type} runtime (it rotates whole heads)"
                )));
            }
            match kind {
                "default" => RopeScaling::None,
                "linear" => RopeScaling::Linear { factor: get("factor")? },
                "llama3" => {
                    let (factor, low_freq_factor, high_freq_factor) =
                        (get("factor")?, get("low_freq_factor")?, get("high_freq_factor")?);
                    let original = get("original_max_position_embeddings")?;
                    if let Some(top) = v.get("original_max_position_embeddings").and_then(Value::as_f64)
                        && top != original
                    {
                        return Err(err(format!(
                            "`original_max_position_embeddings` = {top} and `{scaling_key}.original_max_position_embeddings` = {original} disagree"
                        )));
                    }
                    RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_context: original }
                }
                other => {
                    return Err(err(format!(
                        "`{scaling_key}.rope_type` = {other:?} is not supported by this runtime (it implements \"default\", \"linear\" and \"llama3\"); refusing to compute a different model"
                    )));
                }
            }
        }
    };
    match rope_scaling {
        RopeScaling::Linear { factor } if factor <= 0.0 => {
            return Err(err(format!("`{scaling_key}.factor` must be positive, found {factor}")));
        }
        RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_context }
            if factor <= 0.0
                || low_freq_factor <= 0.0
                || high_freq_factor <= low_freq_factor
                || original_context <= 0.0 =>
        {
            return Err(err(format!(
                "`{scaling_key}`: llama3 scaling needs factor > 0, 0 < low_freq_factor < high_freq_factor and a positive original_max_position_embeddings"
            )));
        }
        _ => {}
    }
    // Sliding windows: Mistral's applies to every layer; Qwen's are off unless `use_sliding_window`.
    let sliding_window = match family {
        // Mistral: transformers' default window is 4,096 when the key is absent; `null` means none.
        LlamaFamily::Mistral => match v.get("sliding_window") {
            None => Some(4096),
            Some(Value::Null) => None,
            Some(_) => Some(size("sliding_window")?),
        },
        LlamaFamily::Qwen2 | LlamaFamily::Qwen3 if flag("use_sliding_window", false)? => {
            return Err(err(
                "`use_sliding_window` = true is not supported by this runtime (Qwen's per-layer windows); refusing to compute a different model".into(),
            ));
        }
        _ => None,
    };
    let layers = size("num_hidden_layers")?;
    let (sliding_window, sliding_layers) = if gemma {
        let window = match v.get("sliding_window") {
            None => Some(4096),
            Some(Value::Null) => None,
            Some(_) => Some(size("sliding_window")?),
        };
        let sliding: Vec<bool> = match v.get("layer_types").and_then(Value::as_array) {
            Some(types) => {
                if types.len() != layers {
                    return Err(err(format!("`layer_types` names {} layers, the model has {layers}", types.len())));
                }
                types
                    .iter()
                    .map(|t| match t.as_str() {
                        Some("sliding_attention") => Ok(true),
                        Some("full_attention") => Ok(false),
                        _ => Err(err(format!(
                            "`layer_types` holds {t}; expected \"sliding_attention\" or \"full_attention\""
                        ))),
                    })
                    .collect::<Result<_>>()?
            }
            // transformers' Gemma 2 alternates whatever `sliding_window_pattern` says.
            None if family == LlamaFamily::Gemma2 => (0..layers).map(|i| i % 2 == 0).collect(),
            None => {
                let pattern =
                    match v.get("sliding_window_pattern") {
                        Some(x) => x.as_u64().filter(|n| *n > 0).ok_or_else(|| {
                            err(format!("`sliding_window_pattern` must be a positive integer, found {x}"))
                        })? as usize,
                        None => 6,
                    };
                (0..layers).map(|i| (i + 1) % pattern != 0).collect()
            }
        };
        (window, Some(sliding))
    } else {
        (sliding_window, None)
    };
    if let Some(types) = v.get("layer_types").and_then(Value::as_array)
        && !matches!(family, LlamaFamily::Mistral | LlamaFamily::Gemma2 | LlamaFamily::Gemma3)
        && types.iter().any(|t| t != "full_attention")
    {
        return Err(err(
            "`layer_types` names layers other than \"full_attention\"; this runtime implements full attention for this model type".into(),
        ));
    }
    let attention_bias = flag("attention_bias", false)?;
    let (qkv_bias, o_bias, mlp_bias) = match family {
        LlamaFamily::Llama => (attention_bias, attention_bias, flag("mlp_bias", false)?),
        LlamaFamily::Qwen2 => (true, false, false),
        LlamaFamily::Qwen3 => (attention_bias, attention_bias, false),
        LlamaFamily::Mistral if attention_bias => {
            return Err(err(
                "`attention_bias` = true is not supported for mistral (its projections have no biases)".into()
            ));
        }
        LlamaFamily::Mistral => (false, false, false),
        LlamaFamily::Olmo2 if attention_bias => {
            return Err(err(
                "`attention_bias` = true is not supported for olmo2 by this runtime (the output projection's bias would come before its norm)".into(),
            ));
        }
        LlamaFamily::Olmo2 => (false, false, false),
        LlamaFamily::Gemma2 | LlamaFamily::Gemma3 if attention_bias => {
            return Err(err(format!("`attention_bias` = true is not supported for {model_type} by this runtime")));
        }
        LlamaFamily::Gemma2 | LlamaFamily::Gemma3 => (false, false, false),
    };
    let eps = match v.get("rms_norm_eps") {
        Some(x) => number(x, "rms_norm_eps")? as f32,
        None if family == LlamaFamily::Olmo2 => 1e-5,
        None => 1e-6,
    };
    Ok(LlamaConfig {
        family,
        vocab_size: size("vocab_size")?,
        max_position_embeddings: size("max_position_embeddings")?,
        hidden_size,
        num_hidden_layers: layers,
        num_attention_heads: heads,
        num_key_value_heads: kv_heads,
        head_dim,
        intermediate_size: size("intermediate_size")?,
        rms_norm_eps: eps,
        rope_theta,
        rope_scaling,
        tie_word_embeddings: flag("tie_word_embeddings", gemma)?,
        qkv_bias,
        o_bias,
        mlp_bias,
        sliding_window,
        sliding_layers,
        local_rope_theta,
        query_pre_attn_scalar: if gemma {
            let q = match v.get("query_pre_attn_scalar") {
                Some(x) => number(x, "query_pre_attn_scalar")?,
                None => 256.0,
            };
            if q <= 0.0 {
                return Err(err(format!("`query_pre_attn_scalar` must be positive, found {q}")));
            }
            Some(q)
        } else {
            None
        },
        attn_logit_softcapping,
        final_logit_softcapping,
    })
}
