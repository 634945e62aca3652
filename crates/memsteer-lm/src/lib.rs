//! memsteer's transformer runtime (CPU): Hugging Face `config.json`, safetensors weights (f32, f16,
//! bf16; single file or sharded), and the GPT-2 forward pass with per-token and per-sequence
//! log-probabilities through the fused output layer of `memsteer-kernels`.
//!
//! GPT-NeoX (Pythia), the KV cache, sampling, the tokenizer and `memsteer logprobs` are the next steps
//! (issue 4); this crate grows toward them.
//!
//! ```no_run
//! use memsteer_lm::{config::ModelConfig, gpt2::Gpt2};
//! let dir = std::path::Path::new("fixtures/lm/tiny-gpt2-f32");
//! let ModelConfig::Gpt2(cfg) = ModelConfig::from_file(&dir.join("config.json"))? else { unreachable!() };
//! let model = Gpt2::load(dir, cfg)?;
//! let lp = model.sequence_log_probs(&[vec![1, 2, 3]])?;
//! # Ok::<(), memsteer_lm::LmError>(())
//! ```
#![deny(missing_docs)]

pub mod config;
mod error;
pub mod gpt2;
pub mod weights;

pub use error::{LmError, Result};
