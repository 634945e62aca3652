//! memsteer's transformer runtime: Hugging Face `config.json`, safetensors weights (f32, f16, bf16;
//! single file or sharded), and per-token and per-sequence log-probabilities through the fused output
//! layer of `memsteer-kernels`.
//!
//! [`arch`] describes an architecture once (GPT-2; GPT-NeoX in the Pythia layout: fused per-head
//! QKV, partial rotary, parallel residual) with one tensor-name table per family and one loader; the
//! CPU runtime ([`cpu`]), the CUDA runtime (`gpu`, feature `cuda`) and the trainer ([`train`]) read
//! it. [`tokenizer`] wraps the `tokenizers` crate (`tokenizer.json`, or GPT-2's vocabulary and merges files), with
//! ids equal to Hugging Face `tokenizers`'. [`KvCache`] and [`sample`] drive seeded generation
//! ([`Model::generate`]). [`train`] trains every family (explicit backward per operation, AdamW,
//! schedules) and writes checkpoints this runtime loads.
//!
//! ```
//! use memsteer_lm::Model;
//! // Any Hugging Face GPT-2 or GPT-NeoX directory; here a tiny random model from the repository.
//! let model = Model::load(std::path::Path::new("../../fixtures/lm/tiny-gpt2-f32"))?;
//! let lp = model.sequence_log_probs(&[vec![1, 2, 3]])?;
//! assert!(lp[0] < 0.0);
//! # Ok::<(), memsteer_lm::LmError>(())
//! ```
#![deny(missing_docs)]

pub mod arch;
mod block;
pub mod config;
pub mod cpu;
pub mod data;
mod decoder;
pub mod device;
mod error;
#[cfg(feature = "cuda")]
pub mod gpu;
mod head;
pub mod instances;
mod ops;
pub mod sample;
pub mod score;
pub mod tokenizer;
pub mod train;
pub mod weights;

pub use cpu::{Compute, Model};
pub use decoder::Decoder;
pub use device::DeviceModel;
pub use error::{LmError, Result};
pub use head::HostHead;
pub use ops::KvCache;

use std::path::Path;

impl Model {
    /// Loads `dir/config.json` and the weights next to it.
    pub fn load(dir: &Path) -> Result<Self> {
        Self::load_arch(dir, arch::Arch::from_file(&dir.join("config.json"))?)
    }

    /// `log p(x_t | x_<t)` for `t = 1..T`, in nats.
    pub fn token_log_probs(&self, tokens: &[u32]) -> Result<Vec<f32>> {
        Decoder::token_log_probs(self, tokens)
    }

    /// [`Model::token_log_probs`] of every sequence, in one packed forward pass.
    pub fn token_log_probs_batch(&self, seqs: &[&[u32]]) -> Result<Vec<Vec<f32>>> {
        Decoder::token_log_probs_batch(self, seqs)
    }

    /// The architecture behind the [`Decoder`] interface.
    pub fn decoder(&self) -> &dyn Decoder {
        self
    }

    /// Sequence log-probabilities (first token not scored) in one packed forward pass; every
    /// sequence needs at least two tokens.
    pub fn sequence_log_probs(&self, batch: &[Vec<u32>]) -> Result<Vec<f64>> {
        Decoder::sequence_log_probs(self, batch)
    }

    /// Logits of the next token after the whole sequence.
    pub fn last_logits(&self, tokens: &[u32]) -> Result<Vec<f32>> {
        Decoder::last_logits(self, tokens)
    }

    /// Next-token logits after feeding `tokens` on top of `cache` (which it extends).
    pub fn next_logits(&self, tokens: &[u32], cache: &mut KvCache) -> Result<Vec<f32>> {
        Decoder::next_logits(self, tokens, cache)
    }

    /// Continues `prompt` by `max_new` sampled tokens with a KV cache; `uniform` supplies the random
    /// draws (pass a seeded generator for reproducible output).
    pub fn generate(
        &self,
        prompt: &[u32],
        max_new: usize,
        cfg: &sample::SamplingConfig,
        uniform: &mut dyn FnMut() -> f64,
    ) -> Result<Vec<u32>> {
        if prompt.is_empty() {
            return Err(LmError::Input("generation needs a prompt of at least one token".into()));
        }
        let mut cache = KvCache::new();
        let mut logits = self.next_logits(prompt, &mut cache)?;
        let mut out = Vec::with_capacity(max_new);
        for step in 0..max_new {
            let next = sample::sample(&logits, cfg, uniform())
                .map_err(|e| LmError::Input(format!("generation step {step}: {e}")))? as u32;
            out.push(next);
            if out.len() == max_new {
                break;
            }
            logits = self.next_logits(&[next], &mut cache)?;
        }
        Ok(out)
    }
}
