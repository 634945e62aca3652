//! The output layer and the steer chain, forward and backward, with no `[tokens, vocab]` buffer.
//!
//! [`nll_and_grad`] streams the vocabulary in tiles as the kernels' fused log-probabilities do: a first
//! pass keeps an online log-sum-exp per row, a second pass recomputes each tile's logits and adds
//! `Σ_v (p_v − 1[v = target]) E_v` into the row's gradient. Memory is `O(rows per block × tile)`.
//! [`steer_loss_and_grads`] chains that gradient through `h' = h + ε Σ_i s_i (h P1_i) P2_iᵀ` to the
//! gradients of `P1` and `P2`.
//!
//! Determinism: rows are processed in blocks of a fixed size (not one that follows the thread count),
//! every matrix product splits only its output across threads, and sums over rows run in row order,
//! so results are bitwise identical whatever the number of rayon threads.

use memsteer_kernels::{Device, MatMut, MatRef, Steers, matmul, matmul_strided, matmul_transposed, vmath};
use memsteer_lm::Decoder;
use rayon::prelude::*;

use crate::{Result, SteerError};

/// A model's output layer as the steer computations see it: the output embedding `E` (`vocab × dim`,
/// row-major) and the soft-cap of its logits (Gemma 2's final soft-capping: logits are
/// `c·tanh(z/c)` of the products `z = h Eᵀ`). Take it from the model with [`OutputLayer::of`], so that
/// a model's cap is never dropped; [`OutputLayer::uncapped`] names the plain product explicitly.
#[derive(Debug, Clone, Copy)]
pub struct OutputLayer<'a> {
    embedding: &'a [f32],
    softcap: Option<f32>,
}

impl<'a> OutputLayer<'a> {
    /// The output layer of `decoder`, its soft-cap included.
    pub fn of(decoder: &'a dyn Decoder) -> Self {
        Self { embedding: decoder.output_embedding(), softcap: decoder.logit_softcap() }
    }

    /// Logits `h Eᵀ` without a cap.
    pub fn uncapped(embedding: &'a [f32]) -> Self {
        Self { embedding, softcap: None }
    }

    /// Logits soft-capped at `softcap` when given; the cap must be a positive finite number.
    pub fn new(embedding: &'a [f32], softcap: Option<f32>) -> Result<Self> {
        match softcap {
            Some(c) if !(c.is_finite() && c > 0.0) => {
                Err(SteerError::Input(format!("logit soft-cap: expected a positive finite number, found {c}")))
            }
            _ => Ok(Self { embedding, softcap }),
        }
    }

    /// The output embedding, `vocab × dim`.
    pub fn embedding(&self) -> &'a [f32] {
        self.embedding
    }

    /// The logits' soft-cap.
    pub fn softcap(&self) -> Option<f32> {
        self.softcap
    }

    /// Soft-caps raw products `h Eᵀ` into logits, in place (nothing without a cap).
    pub fn cap(&self, logits: &mut [f32]) {
        if let Some(c) = self.softcap {
            vmath::softcap_in_place(logits, c);
        }
    }
}

/// Rows of one block of the fused output layer (fixed so that results do not depend on threads).
const ROW_BLOCK: usize = 64;
/// Vocabulary entries per tile.
const VOCAB_TILE: usize = 512;
/// Output rows per task of the `Aᵀ B` products.
const AT_B_BLOCK: usize = 16;

/// Fused negative log-likelihood and its gradient with respect to the hidden states.
///
/// `hidden` is `rows × dim`, `output`'s embedding `vocab × dim` (both row-major), `targets` one id per
/// row. Writes `grad[t] = scale · Σ_v (softmax(hidden[t] Eᵀ)_v − 1[v = targets[t]]) E_v` and returns
/// `Σ_t −log softmax(hidden[t] Eᵀ)[targets[t]]` (summed in `f64`, in row order). Pass `scale = 1/rows`
/// for the gradient of the mean. With a soft-cap the logits are the capped ones and each term of the
/// gradient carries the cap's slope `1 − (logit/c)²`.
pub fn nll_and_grad(
    hidden: &[f32],
    output: OutputLayer<'_>,
    dim: usize,
    targets: &[u32],
    scale: f32,
    grad: &mut [f32],
) -> Result<f64> {
    let embedding = output.embedding;
    let rows = targets.len();
    let vocab = check_output_layer(hidden, embedding, dim, targets)?;
    if grad.len() != rows * dim {
        return Err(SteerError::Input(format!(
            "gradient buffer: expected {} values (rows × dim), found {}",
            rows * dim,
            grad.len()
        )));
    }
    let losses: Vec<Vec<f32>> = grad
        .par_chunks_mut(ROW_BLOCK * dim)
        .zip(hidden.par_chunks(ROW_BLOCK * dim))
        .zip(targets.par_chunks(ROW_BLOCK))
        .map(|((g, h), t)| block_nll_and_grad(h, (output, dim, vocab), t, scale, g))
        .collect::<Result<_>>()?;
    Ok(losses.iter().flatten().map(|&l| f64::from(l)).sum())
}

/// One block of rows: returns each row's NLL and writes its gradient.
fn block_nll_and_grad(
    h: &[f32],
    (output, dim, vocab): (OutputLayer<'_>, usize, usize),
    targets: &[u32],
    scale: f32,
    grad: &mut [f32],
) -> Result<Vec<f32>> {
    let (rows, embedding) = (targets.len(), output.embedding);
    // Pass 1: the kernels' online log-sum-exp (the same tiles and order as their fused log-probs).
    let (lse, target_logit) =
        memsteer_kernels::log_sum_exp_rows_capped(&Device::Cpu, h, embedding, dim, targets, output.softcap)?;
    let mut logits = vec![0.0f32; rows * VOCAB_TILE];
    // Pass 2: recompute each tile, turn it into scale · (p − onehot) and accumulate (P_tile · E_tile).
    grad.fill(0.0);
    for v0 in (0..vocab).step_by(VOCAB_TILE) {
        let width = VOCAB_TILE.min(vocab - v0);
        let tile = &mut logits[..rows * width];
        tile_logits(h, embedding, dim, v0, width, tile)?;
        output.cap(tile);
        for r in 0..rows {
            let row = &mut tile[r * width..(r + 1) * width];
            let t = targets[r] as usize;
            match output.softcap {
                None => {
                    for x in row.iter_mut() {
                        *x = scale * vmath::exp(*x - lse[r]);
                    }
                    if (v0..v0 + width).contains(&t) {
                        row[t - v0] -= scale;
                    }
                }
                // Through the cap: ∂(c·tanh(z/c))/∂z = 1 − (logit/c)².
                Some(c) => {
                    for (j, x) in row.iter_mut().enumerate() {
                        let (logit, hit) = (*x, if v0 + j == t { scale } else { 0.0 });
                        let slope = (1.0 - (logit / c) * (logit / c)).max(0.0);
                        *x = (scale * vmath::exp(logit - lse[r]) - hit) * slope;
                    }
                }
            }
        }
        matmul_strided(
            &Device::Cpu,
            (rows, width, dim),
            MatRef::row_major(tile, width),
            MatRef::row_major(&embedding[v0 * dim..(v0 + width) * dim], dim),
            1.0,
            MatMut::row_major(grad, dim),
        )?;
    }
    Ok(lse.iter().zip(&target_logit).map(|(l, t)| l - t).collect())
}

/// `tile (rows × width) = h · E[v0..v0+width]ᵀ`.
fn tile_logits(h: &[f32], embedding: &[f32], dim: usize, v0: usize, width: usize, tile: &mut [f32]) -> Result<()> {
    let rows = tile.len() / width;
    matmul_strided(
        &Device::Cpu,
        (rows, dim, width),
        MatRef::row_major(h, dim),
        MatRef::row_major(&embedding[v0 * dim..(v0 + width) * dim], dim).t(),
        0.0,
        MatMut::row_major(tile, width),
    )?;
    Ok(())
}

/// Checks the shapes of an output-layer call and returns the vocabulary size.
pub(crate) fn check_output_layer(hidden: &[f32], embedding: &[f32], dim: usize, targets: &[u32]) -> Result<usize> {
    if dim == 0 || embedding.is_empty() || !embedding.len().is_multiple_of(dim) {
        return Err(SteerError::Input(format!(
            "output embedding: expected a non-empty multiple of the hidden size {dim} values, found {}",
            embedding.len()
        )));
    }
    if hidden.len() != targets.len() * dim {
        return Err(SteerError::Input(format!(
            "hidden states: expected {} values ({} targets × hidden size {dim}), found {}",
            targets.len() * dim,
            targets.len(),
            hidden.len()
        )));
    }
    let vocab = embedding.len() / dim;
    if let Some((i, t)) = targets.iter().enumerate().find(|(_, t)| **t as usize >= vocab) {
        return Err(SteerError::Input(format!("target {i}: id {t} outside the vocabulary of {vocab}")));
    }
    Ok(vocab)
}

/// A batch of training rows: final hidden states, each row's steer strengths and its next token.
#[derive(Debug, Clone, Copy)]
pub struct SteerBatch<'a> {
    /// Hidden states `h_t`, `rows × dim`.
    pub hidden: &'a [f32],
    /// Strengths `s_{t,i}`, `rows × steers` (row-major).
    pub strengths: &'a [f32],
    /// Target ids `x_{t+1}`, one per row.
    pub targets: &'a [u32],
}

/// Mean NLL of the targets under the steered logits `(h + ε Σ_i s_i (h P1_i) P2_iᵀ) Eᵀ`, and its
/// gradients with respect to `P1` and `P2` (written to `grad_p1`, `grad_p2`, each `steers × dim × rank`).
///
/// The output layer runs through [`nll_and_grad`]; every other step is a matrix product of at most
/// `rows × max(dim, rank)` values.
pub fn steer_loss_and_grads(
    steers: &Steers<'_>,
    epsilon: f32,
    output: OutputLayer<'_>,
    batch: &SteerBatch<'_>,
    grad_p1: &mut [f32],
    grad_p2: &mut [f32],
) -> Result<f64> {
    let embedding = output.embedding;
    let Steers { p1, p2, steers: s, dim: d, rank: r } = *steers;
    let n = batch.targets.len();
    let per = d * r;
    if p1.len() != s * per || p2.len() != s * per || grad_p1.len() != s * per || grad_p2.len() != s * per {
        return Err(SteerError::Input(format!(
            "projectors and their gradients: expected {} values each (steers {s} × dim {d} × rank {r})",
            s * per
        )));
    }
    if batch.strengths.len() != n * s {
        return Err(SteerError::Input(format!(
            "strengths: expected {} values (rows {n} × steers {s}), found {}",
            n * s,
            batch.strengths.len()
        )));
    }
    check_output_layer(batch.hidden, embedding, d, batch.targets)?;
    if n == 0 {
        return Err(SteerError::Input("a training batch needs at least one row".into()));
    }
    let h = batch.hidden;
    let dev = Device::Cpu;
    // Forward: V_i = diag(s_i) (H P1_i); H' = H + ε Σ_i V_i P2_iᵀ.
    let mut v = vec![0.0f32; s * n * r];
    let mut hp = h.to_vec();
    let mut tmp = vec![0.0f32; n * d];
    for i in 0..s {
        let vi = &mut v[i * n * r..(i + 1) * n * r];
        matmul(&dev, h, &p1[i * per..(i + 1) * per], n, d, r, vi)?;
        scale_rows(vi, r, batch.strengths, s, i, 1.0);
        matmul_transposed(&dev, vi, &p2[i * per..(i + 1) * per], n, r, d, &mut tmp)?;
        hp.par_iter_mut().zip(&tmp).for_each(|(x, t)| *x += epsilon * t);
    }
    // Output layer: loss and G = dL/dH'.
    let mut g = vec![0.0f32; n * d];
    let total = nll_and_grad(&hp, output, d, batch.targets, 1.0 / n as f32, &mut g)?;
    // Backward: dP2_i = ε Gᵀ V_i; dP1_i = ε Hᵀ diag(s_i) (G P2_i).
    let mut q = vec![0.0f32; n * r];
    for i in 0..s {
        let vi = &v[i * n * r..(i + 1) * n * r];
        let gp2 = &mut grad_p2[i * per..(i + 1) * per];
        at_b(&g, d, vi, r, gp2)?;
        gp2.iter_mut().for_each(|x| *x *= epsilon);
        matmul(&dev, &g, &p2[i * per..(i + 1) * per], n, d, r, &mut q)?;
        scale_rows(&mut q, r, batch.strengths, s, i, epsilon);
        at_b(h, d, &q, r, &mut grad_p1[i * per..(i + 1) * per])?;
    }
    Ok(total / n as f64)
}

/// Multiplies row `t` of `m` (`rows × cols`) by `factor · strengths[t · steers + i]`.
fn scale_rows(m: &mut [f32], cols: usize, strengths: &[f32], steers: usize, i: usize, factor: f32) {
    m.par_chunks_mut(cols).enumerate().for_each(|(t, row)| {
        let f = factor * strengths[t * steers + i];
        row.iter_mut().for_each(|x| *x *= f);
    });
}

/// `out (m × n) = aᵀ b` for `a` (`rows × m`) and `b` (`rows × n`), both row-major; the output rows are
/// split across threads, each element summed over rows in order.
fn at_b(a: &[f32], m: usize, b: &[f32], n: usize, out: &mut [f32]) -> Result<()> {
    let rows = a.len() / m;
    out.par_chunks_mut(AT_B_BLOCK * n).enumerate().try_for_each(|(blk, o)| {
        let i0 = blk * AT_B_BLOCK;
        let mb = o.len() / n;
        matmul_strided(
            &Device::Cpu,
            (mb, rows, n),
            MatRef { data: &a[i0..], rs: 1, cs: m },
            MatRef::row_major(b, n),
            0.0,
            MatMut::row_major(o, n),
        )
    })?;
    Ok(())
}
