//! Small per-element and per-row operations shared by the architectures.

use memsteer_kernels::{Device, log_prob_targets};

use crate::config::Activation;
use crate::{LmError, Result};

pub(crate) fn layer_norm(x: &mut [f32], (g, b): &(Vec<f32>, Vec<f32>), eps: f32, out: &mut [f32]) {
    let d = g.len();
    for (row, o) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
        let mean = row.iter().sum::<f32>() / d as f32;
        let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / d as f32;
        let inv = 1.0 / (var + eps).sqrt();
        for i in 0..d {
            o[i] = (row[i] - mean) * inv * g[i] + b[i];
        }
    }
}

pub(crate) fn gelu(x: f32, act: Activation) -> f32 {
    match act {
        Activation::GeluTanh => 0.5 * x * (1.0 + (0.797_884_6 * (x + 0.044_715 * x * x * x)).tanh()),
        Activation::GeluExact => 0.5 * x * (1.0 + erf(x / std::f32::consts::SQRT_2)),
    }
}

/// erf with |error| < 1.5e-7 (Abramowitz–Stegun 7.1.26), computed in f64.
fn erf(x: f32) -> f32 {
    let x = f64::from(x);
    let t = 1.0 / (1.0 + 0.327_591_1 * x.abs());
    let y = 1.0
        - (((((1.061_405_429 * t - 1.453_152_027) * t) + 1.421_413_741) * t - 0.284_496_736) * t + 0.254_829_592)
            * t
            * (-x * x).exp();
    (y.copysign(x)) as f32
}

pub(crate) fn add_bias(x: &mut [f32], b: &[f32]) {
    for row in x.chunks_exact_mut(b.len()) {
        for (v, bi) in row.iter_mut().zip(b) {
            *v += bi;
        }
    }
}

/// Causal multi-head attention with cached keys (`(t_q, t_kv)` = query and key counts): `q` is `t_q × d` (the newest `t_q` positions), `k` and
/// `v` are `t_kv × d` (all positions so far, the newest last); head `h` occupies columns
/// `h·hd .. (h+1)·hd`. Query `i` sits at position `t_kv − t_q + i` and sees keys up to it. Writes
/// `softmax(q kᵀ / √hd + causal mask) v` per head into `out` (`t_q × d`).
pub(crate) fn causal_attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    (t_q, t_kv): (usize, usize),
    d: usize,
    heads: usize,
    out: &mut [f32],
) {
    let hd = d / heads;
    let scale = 1.0 / (hd as f32).sqrt();
    let offset = t_kv - t_q;
    let mut scores = vec![0.0f32; t_kv];
    for head in 0..heads {
        let off = head * hd;
        for i in 0..t_q {
            let last = offset + i;
            let qi = &q[i * d + off..i * d + off + hd];
            let mut max = f32::NEG_INFINITY;
            for j in 0..=last {
                let kj = &k[j * d + off..j * d + off + hd];
                let s = qi.iter().zip(kj).map(|(x, y)| x * y).sum::<f32>() * scale;
                scores[j] = s;
                max = max.max(s);
            }
            let mut z = 0.0;
            for s in &mut scores[..=last] {
                *s = (*s - max).exp();
                z += *s;
            }
            let o = &mut out[i * d + off..i * d + off + hd];
            o.fill(0.0);
            for j in 0..=last {
                let w = scores[j] / z;
                for (oo, vv) in o.iter_mut().zip(&v[j * d + off..j * d + off + hd]) {
                    *oo += w * vv;
                }
            }
        }
    }
}

/// Keys and values of every layer for the positions seen so far (incremental decoding).
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    /// Per layer: keys and values, `len × d` each.
    layers: Vec<(Vec<f32>, Vec<f32>)>,
    len: usize,
}

impl KvCache {
    /// An empty cache.
    pub fn new() -> Self {
        Self::default()
    }

    /// Positions cached.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends layer `l`'s keys and values for new positions and returns all of them.
    pub(crate) fn extend(&mut self, l: usize, k: &[f32], v: &[f32]) -> (&[f32], &[f32]) {
        if self.layers.len() <= l {
            self.layers.resize_with(l + 1, Default::default);
        }
        let (ks, vs) = &mut self.layers[l];
        ks.extend_from_slice(k);
        vs.extend_from_slice(v);
        (ks, vs)
    }

    /// Records that `t` new positions went through every layer.
    pub(crate) fn advance(&mut self, t: usize) {
        self.len += t;
    }
}

/// Token ids inside the vocabulary, and the sequence (after `cached` positions) inside the context.
pub(crate) fn check_input(m: &impl crate::Decoder, tokens: &[u32], cached: usize) -> Result<()> {
    if cached == 0 && tokens.len() > m.context() {
        return Err(LmError::Input(format!(
            "sequence of {} tokens is longer than the context of {}",
            tokens.len(),
            m.context()
        )));
    }
    if cached + tokens.len() > m.context() {
        return Err(LmError::Input(format!(
            "{cached} cached + {} new tokens exceed the context of {}",
            tokens.len(),
            m.context()
        )));
    }
    if let Some((i, t)) = tokens.iter().enumerate().find(|(_, t)| **t as usize >= m.vocab()) {
        return Err(LmError::Input(format!("token id {t} at position {i} is outside the vocabulary of {}", m.vocab())));
    }
    Ok(())
}

/// Next-token logits after feeding `tokens` on top of `cache`.
pub(crate) fn next_logits(m: &impl crate::Decoder, tokens: &[u32], cache: &mut KvCache) -> Result<Vec<f32>> {
    let hidden = m.forward(tokens, cache)?;
    let d = m.dim();
    let last = &hidden[hidden.len().saturating_sub(d)..];
    Ok(m.output_embedding().chunks_exact(d).map(|e| e.iter().zip(last).map(|(a, b)| a * b).sum()).collect())
}

/// `log p(x_t | x_<t)` for `t = 1..T` through the fused output layer.
pub(crate) fn token_log_probs(m: &impl crate::Decoder, tokens: &[u32]) -> Result<Vec<f32>> {
    if tokens.len() < 2 {
        check_input(m, tokens, 0)?;
        return Ok(Vec::new());
    }
    let hidden = m.forward(tokens, &mut KvCache::new())?;
    let d = m.dim();
    let mut out = vec![0.0f32; tokens.len() - 1];
    log_prob_targets(&Device::Cpu, &hidden[..(tokens.len() - 1) * d], m.output_embedding(), d, &tokens[1..], &mut out)?;
    Ok(out)
}

/// Sequence log-probabilities, in parallel across sequences.
pub(crate) fn sequence_log_probs(m: &impl crate::Decoder, batch: &[Vec<u32>]) -> Result<Vec<f64>> {
    use rayon::prelude::*;
    batch.par_iter().map(|s| token_log_probs(m, s).map(|lp| lp.iter().map(|&x| f64::from(x)).sum())).collect()
}
