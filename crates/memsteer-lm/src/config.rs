//! Model configurations from Hugging Face `config.json`.

use std::path::Path;

use serde_json::Value;

use crate::{LmError, Result};

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
    /// Layer-norm epsilon.
    pub layer_norm_epsilon: f32,
    /// Activation of the MLP.
    pub activation: Activation,
}

/// A configuration of a supported architecture.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum ModelConfig {
    /// GPT-2.
    Gpt2(Gpt2Config),
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
                Some(x) => x
                    .as_u64()
                    .filter(|n| *n > 0)
                    .map(|n| n as usize)
                    .ok_or_else(|| err(format!("field `{key}` must be a positive integer, found {x}"))),
                None => Err(err(format!("missing field `{key}`"))),
            }
        };
        let model_type =
            v.get("model_type").and_then(Value::as_str).ok_or_else(|| err("missing field `model_type`".into()))?;
        match model_type {
            "gpt2" => {
                let eps = v.get("layer_norm_epsilon").and_then(Value::as_f64).unwrap_or(1e-5) as f32;
                let act = v.get("activation_function").and_then(Value::as_str).unwrap_or("gelu_new");
                let cfg = Gpt2Config {
                    vocab_size: usize_field("vocab_size")?,
                    n_positions: usize_field("n_positions")?,
                    n_embd: usize_field("n_embd")?,
                    n_layer: usize_field("n_layer")?,
                    n_head: usize_field("n_head")?,
                    layer_norm_epsilon: eps,
                    activation: activation(act, path)?,
                };
                if cfg.n_embd % cfg.n_head != 0 {
                    return Err(err(format!("n_embd = {} is not divisible by n_head = {}", cfg.n_embd, cfg.n_head)));
                }
                Ok(ModelConfig::Gpt2(cfg))
            }
            other => Err(err(format!("unsupported model_type {other:?}; this build runs gpt2 (GPT-NeoX is planned)"))),
        }
    }
}
