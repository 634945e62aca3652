//! The interface every architecture implements, with the input checks and the output layer written once.

use crate::Result;
use crate::ops::{self, KvCache};

/// A decoder-only language model: architectures supply the forward pass and their shapes; the
/// log-probabilities, logits and batching come with the trait.
pub trait Decoder: Sync {
    /// Hidden states (after the final layer norm) of `tokens` continuing the positions in `cache`,
    /// which it extends; `tokens × dim`.
    fn forward(&self, tokens: &[u32], cache: &mut KvCache) -> Result<Vec<f32>>;
    /// The output embedding, `vocab × dim`.
    fn output_embedding(&self) -> &[f32];
    /// Hidden size.
    fn dim(&self) -> usize;
    /// Context length.
    fn context(&self) -> usize;
    /// Vocabulary size.
    fn vocab(&self) -> usize;

    /// Final hidden states of a whole sequence.
    fn hidden_states(&self, tokens: &[u32]) -> Result<Vec<f32>> {
        self.forward(tokens, &mut KvCache::new())
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
    /// output layer.
    fn token_log_probs(&self, tokens: &[u32]) -> Result<Vec<f32>>
    where
        Self: Sized,
    {
        ops::token_log_probs(self, tokens)
    }

    /// `Σ_{t≥1} log p(x_t | x_<t)` for every sequence, in parallel across sequences.
    fn sequence_log_probs(&self, batch: &[Vec<u32>]) -> Result<Vec<f64>>
    where
        Self: Sized,
    {
        ops::sequence_log_probs(self, batch)
    }
}
