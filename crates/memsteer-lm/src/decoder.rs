//! The interface every architecture implements, with the input checks and the output layer written once.

use crate::Result;
use crate::ops::{self, KvCache};

/// A decoder-only language model: architectures supply the forward pass over a packed batch and their
/// shapes; the log-probabilities, logits and batching come with the trait.
pub trait Decoder: Sync {
    /// Final hidden states (after the last layer norm) of the sequences `seqs` laid end to end,
    /// `Σ len × dim`. With a cache (which it extends) there must be one sequence, continuing the
    /// cached positions. Every sequence is checked (non-empty, ids inside the vocabulary, inside the
    /// context) before any work; errors of a batch of several name the sequence
    /// ([`crate::LmError::Sequence`]).
    fn forward_packed(&self, seqs: &[&[u32]], cache: Option<&mut KvCache>) -> Result<Vec<f32>>;
    /// The output embedding, `vocab × dim`.
    fn output_embedding(&self) -> &[f32];
    /// The soft-cap of the final logits, when the model has one (Gemma 2: `z ↦ c·tanh(z/c)`). Every
    /// output layer applies it: logits are `softcap(hidden · Eᵀ)` ([`Decoder::logits_in_place`]).
    fn logit_softcap(&self) -> Option<f32>;

    /// Applies [`Decoder::logit_softcap`] to raw logits `hidden · Eᵀ` (any number of rows), in place.
    fn logits_in_place(&self, logits: &mut [f32]) {
        if let Some(cap) = self.logit_softcap() {
            memsteer_kernels::vmath::softcap_in_place(logits, cap);
        }
    }
    /// Hidden size.
    fn dim(&self) -> usize;

    /// `out[t] = log softmax(hidden[t] · Eᵀ)[targets[t]]` through the fused output layer
    /// (`hidden` is `targets.len() × dim`; logits soft-capped as [`Decoder::logit_softcap`] says). The
    /// default multiplies by [`Decoder::output_embedding`] in f32; a model that computes in bf16 uses
    /// its packed copy.
    fn output_log_probs(&self, hidden: &[f32], targets: &[u32], out: &mut [f32]) -> Result<()> {
        memsteer_kernels::log_prob_targets_capped(
            &memsteer_kernels::Device::Cpu,
            hidden,
            self.output_embedding(),
            self.dim(),
            targets,
            out,
            self.logit_softcap(),
        )?;
        Ok(())
    }
    /// Context length.
    fn context(&self) -> usize;
    /// Vocabulary size.
    fn vocab(&self) -> usize;

    /// Final hidden states of several sequences laid end to end, each continuing its own cache
    /// (`caches[i]` for `seqs[i]`, which it extends): the decoding step of a batch whose rows are at
    /// different positions. Each row's hidden state equals what [`Decoder::forward`] gives that
    /// sequence alone. The default runs the sequences one after another; the CPU model packs them into
    /// one pass.
    fn forward_cached(&self, seqs: &[&[u32]], caches: &mut [&mut KvCache]) -> Result<Vec<f32>> {
        if caches.len() != seqs.len() {
            return Err(crate::LmError::Input(format!("{} KV caches for {} sequences", caches.len(), seqs.len())));
        }
        let mut out = Vec::new();
        for (s, c) in seqs.iter().zip(caches.iter_mut()) {
            out.extend(self.forward_packed(&[s], Some(c))?);
        }
        Ok(out)
    }

    /// Hidden states of `tokens` continuing the positions in `cache`, which it extends; `tokens × dim`.
    fn forward(&self, tokens: &[u32], cache: &mut KvCache) -> Result<Vec<f32>> {
        self.forward_packed(&[tokens], Some(cache))
    }

    /// Final hidden states of a whole sequence.
    fn hidden_states(&self, tokens: &[u32]) -> Result<Vec<f32>> {
        self.forward_packed(&[tokens], None)
    }

    /// Next-token logits after feeding `tokens` on top of `cache` (which it extends).
    fn next_logits(&self, tokens: &[u32], cache: &mut KvCache) -> Result<Vec<f32>>
    where
        Self: Sized,
    {
        ops::next_logits(self, tokens, cache)
    }

    /// Logits of the next token after the whole sequence (one vocabulary-wide row).
    fn last_logits(&self, tokens: &[u32]) -> Result<Vec<f32>>
    where
        Self: Sized,
    {
        ops::next_logits(self, tokens, &mut KvCache::new())
    }

    /// `log p(x_t | x_<t)` for `t = 1..T` (the first token is not scored), in nats, through the fused
    /// output layer. A sequence of fewer than two tokens is an error: it has nothing to score.
    fn token_log_probs(&self, tokens: &[u32]) -> Result<Vec<f32>>
    where
        Self: Sized,
    {
        Ok(ops::token_log_probs_batch(self, &[tokens])?.pop().unwrap_or_default())
    }

    /// [`Decoder::token_log_probs`] of every sequence, in one packed forward pass.
    fn token_log_probs_batch(&self, seqs: &[&[u32]]) -> Result<Vec<Vec<f32>>>
    where
        Self: Sized,
    {
        ops::token_log_probs_batch(self, seqs)
    }

    /// `Σ_{t≥1} log p(x_t | x_<t)` for every sequence, in one packed forward pass.
    fn sequence_log_probs(&self, batch: &[Vec<u32>]) -> Result<Vec<f64>>
    where
        Self: Sized,
    {
        ops::sequence_log_probs(self, batch)
    }
}
