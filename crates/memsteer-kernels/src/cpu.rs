//! CPU implementations.

use rayon::prelude::*;

use crate::{MatMut, MatRef, Steers, vmath};

/// Fewest tokens per block (rows of one logits tile).
const MIN_TOKEN_BLOCK: usize = 32;
/// Most tokens per block: larger blocks stream the output embedding fewer times.
const MAX_TOKEN_BLOCK: usize = 256;
/// Vocabulary entries per tile.
const VOCAB_TILE: usize = 512;
// bf16 tiles start at whole pairs of packed panels.
const _: () = assert!(VOCAB_TILE.is_multiple_of(crate::bf16::BLOCK));
// f32 tiles start at whole panels.
const _: () = assert!(VOCAB_TILE.is_multiple_of(crate::f32panels::NR));

pub(crate) fn log_prob_targets(
    hidden: &[f32],
    embedding: &[f32],
    (dim, vocab): (usize, usize),
    targets: &[u32],
    out: &mut [f32],
    softcap: Option<f32>,
) -> crate::Result<()> {
    per_block(hidden, dim, targets, out, |h, targets| log_sum_exp_block(h, embedding, (dim, vocab), targets, softcap))
}

/// [`log_prob_targets`] with the output embedding packed in bf16: each block's hidden states are
/// rounded to bf16 once, the vocabulary tiles are bf16 products with f32 accumulation, and the
/// log-sum-exp stays f32.
pub(crate) fn log_prob_targets_bf16(
    hidden: &[f32],
    embedding: &crate::PackedBf16,
    targets: &[u32],
    out: &mut [f32],
    softcap: Option<f32>,
) -> crate::Result<()> {
    let level = crate::cpu_kernels()?;
    let dim = embedding.k();
    per_block(hidden, dim, targets, out, |h, targets| {
        let a = embedding.convert(h, targets.len(), false);
        online_log_sum_exp(targets, embedding.n(), softcap, |v0, width, tile| {
            embedding.product_cols(level, &a, v0, width, tile);
            Ok(())
        })
    })
}

/// [`log_prob_targets`] with the output embedding packed in f32 panels: each block's hidden states are
/// packed once for all vocabulary tiles.
pub(crate) fn log_prob_targets_f32(
    hidden: &[f32],
    embedding: &crate::PackedF32,
    targets: &[u32],
    out: &mut [f32],
    softcap: Option<f32>,
) -> crate::Result<()> {
    let level = crate::cpu_kernels()?;
    let dim = embedding.k();
    per_block(hidden, dim, targets, out, |h, targets| {
        embedding.with_packed_rows(h, targets.len(), |a| {
            online_log_sum_exp(targets, embedding.n(), softcap, |v0, width, tile| {
                embedding.product(level, a, (v0, width), tile, width);
                Ok(())
            })
        })
    })
}

/// Splits the rows into blocks across threads and writes `target logit − log-sum-exp` from `lse`.
fn per_block(
    hidden: &[f32],
    dim: usize,
    targets: &[u32],
    out: &mut [f32],
    lse: impl Fn(&[f32], &[u32]) -> crate::Result<(Vec<f32>, Vec<f32>)> + Sync,
) -> crate::Result<()> {
    // Each row's result depends only on that row (the tile products and the running log-sum-exp
    // are per row, in vocabulary order), so the block size may follow the thread count without
    // changing any number.
    let threads = rayon::current_num_threads();
    let block = targets.len().div_ceil(2 * threads).clamp(MIN_TOKEN_BLOCK, MAX_TOKEN_BLOCK);
    out.par_chunks_mut(block).zip(targets.par_chunks(block)).zip(hidden.par_chunks(block * dim)).try_for_each(
        |((out, targets), h)| {
            let (lse, target_logit) = lse(h, targets)?;
            for (o, (t, l)) in out.iter_mut().zip(target_logit.iter().zip(&lse)) {
                *o = t - l;
            }
            Ok(())
        },
    )
}

/// Per row of `h` (`rows × dim`): `log Σ_v exp(h Eᵀ)_v` and the target's logit, streaming the vocabulary
/// in tiles through an online log-sum-exp on the calling thread. Each row's numbers depend on that row
/// alone, whatever the block it sits in.
pub(crate) fn log_sum_exp_block(
    h: &[f32],
    embedding: &[f32],
    (dim, vocab): (usize, usize),
    targets: &[u32],
    softcap: Option<f32>,
) -> crate::Result<(Vec<f32>, Vec<f32>)> {
    let rows = targets.len();
    online_log_sum_exp(targets, vocab, softcap, |v0, width, tile| {
        crate::native::gemm(
            rows,
            dim,
            width,
            MatRef::row_major(h, dim),
            MatRef::row_major(&embedding[v0 * dim..(v0 + width) * dim], dim).t(),
            0.0,
            MatMut::row_major(tile, width),
        )
    })
}

/// The online log-sum-exp over vocabulary tiles that `product(v0, width, tile)` fills
/// (`rows × width` logits of entries `v0..v0 + width`); returns each row's log-sum-exp and target
/// logit, of the logits soft-capped by `softcap` when given.
fn online_log_sum_exp(
    targets: &[u32],
    vocab: usize,
    softcap: Option<f32>,
    mut product: impl FnMut(usize, usize, &mut [f32]) -> crate::Result<()>,
) -> crate::Result<(Vec<f32>, Vec<f32>)> {
    let rows = targets.len();
    let mut logits = vec![0.0f32; rows * VOCAB_TILE.min(vocab)];
    let mut max = vec![f32::NEG_INFINITY; rows];
    let mut sum = vec![0.0f32; rows];
    let mut target_logit = vec![0.0f32; rows];
    for v0 in (0..vocab).step_by(VOCAB_TILE) {
        let width = VOCAB_TILE.min(vocab - v0);
        let tile = &mut logits[..rows * width];
        product(v0, width, tile)?;
        if let Some(cap) = softcap {
            vmath::softcap_in_place(tile, cap);
        }
        for r in 0..rows {
            let row = &tile[r * width..(r + 1) * width];
            let t = targets[r] as usize;
            if (v0..v0 + width).contains(&t) {
                target_logit[r] = row[t - v0];
            }
            // Online log-sum-exp: rescale the running sum when the maximum grows.
            let tile_max = vmath::max(row);
            if tile_max > max[r] {
                sum[r] *= vmath::exp(max[r] - tile_max);
                max[r] = tile_max;
            }
            sum[r] += vmath::sum_exp(row, max[r]);
        }
    }
    let lse = max.iter().zip(&sum).map(|(m, s)| m + s.ln()).collect();
    Ok((lse, target_logit))
}

/// Output entries (or rank entries) per task when a single row is split across threads.
const STEER_CHUNK: usize = 64;

pub(crate) fn steered_projection(
    hidden: &[f32],
    steers: &Steers<'_>,
    strengths: &[f32],
    epsilon: f32,
    out: &mut [f32],
) {
    let Steers { p1, p2, steers: s, dim: d, rank: r } = *steers;
    if hidden.len() == d {
        // One row (a decode step): split `c P1` over the rank and `proj P2ᵀ` over the output across
        // threads. Every entry is summed in the same order as in the many-row path below, so the result
        // is the same bitwise whatever the thread count and however many rows come together.
        out.copy_from_slice(hidden);
        let mut proj = vec![0.0f32; r];
        for i in 0..s {
            let scale = epsilon * strengths[i];
            if scale == 0.0 {
                continue;
            }
            let a = &p1[i * d * r..(i + 1) * d * r];
            let b = &p2[i * d * r..(i + 1) * d * r];
            proj.par_chunks_mut(STEER_CHUNK).enumerate().for_each(|(t, pj)| {
                let (j0, n) = (t * STEER_CHUNK, pj.len());
                pj.fill(0.0);
                for (k, &ck) in hidden.iter().enumerate() {
                    for (p, &x) in pj.iter_mut().zip(&a[k * r + j0..k * r + j0 + n]) {
                        *p += ck * x;
                    }
                }
            });
            let proj = &proj;
            out.par_chunks_mut(STEER_CHUNK).enumerate().for_each(|(t, oc)| {
                for (dk, ok) in oc.iter_mut().enumerate() {
                    let k = t * STEER_CHUNK + dk;
                    *ok += scale * dot(proj, &b[k * r..(k + 1) * r]);
                }
            });
        }
        return;
    }
    out.par_chunks_mut(d).zip(hidden.par_chunks(d)).for_each_init(
        || vec![0.0f32; r],
        |proj, (o, c)| {
            o.copy_from_slice(c);
            for i in 0..s {
                let scale = epsilon * strengths[i];
                if scale == 0.0 {
                    continue;
                }
                let a = &p1[i * d * r..(i + 1) * d * r];
                let b = &p2[i * d * r..(i + 1) * d * r];
                // proj = c P1_i (1 × r)
                proj.fill(0.0);
                for (k, &ck) in c.iter().enumerate() {
                    for (pj, &x) in proj.iter_mut().zip(&a[k * r..(k + 1) * r]) {
                        *pj += ck * x;
                    }
                }
                // o += scale · proj P2_iᵀ
                for (k, ok) in o.iter_mut().enumerate() {
                    *ok += scale * dot(proj, &b[k * r..(k + 1) * r]);
                }
            }
        },
    );
}

/// `Σ xᵢ yᵢ` with eight explicit accumulators (so it vectorises), summed in a fixed order.
#[inline]
fn dot(x: &[f32], y: &[f32]) -> f32 {
    const LANES: usize = 8;
    let mut acc = [0.0f32; LANES];
    let (xc, yc) = (x.chunks_exact(LANES), y.chunks_exact(LANES));
    let tail: f32 = xc.remainder().iter().zip(yc.remainder()).map(|(a, b)| a * b).sum();
    for (a, b) in xc.zip(yc) {
        for l in 0..LANES {
            acc[l] += a[l] * b[l];
        }
    }
    acc.iter().sum::<f32>() + tail
}
