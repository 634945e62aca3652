//! CPU implementations.

use rayon::prelude::*;

use crate::Steers;

/// Tokens per block (rows of one logits tile).
const TOKEN_BLOCK: usize = 64;
/// Vocabulary entries per tile.
const VOCAB_TILE: usize = 512;

pub(crate) fn log_prob_targets(
    hidden: &[f32],
    embedding: &[f32],
    dim: usize,
    vocab: usize,
    targets: &[u32],
    out: &mut [f32],
) {
    out.par_chunks_mut(TOKEN_BLOCK).zip(targets.par_chunks(TOKEN_BLOCK)).enumerate().for_each(
        |(blk, (out, targets))| {
            let rows = targets.len();
            let h = &hidden[blk * TOKEN_BLOCK * dim..(blk * TOKEN_BLOCK + rows) * dim];
            let mut logits = vec![0.0f32; rows * VOCAB_TILE];
            let mut max = vec![f32::NEG_INFINITY; rows];
            let mut sum = vec![0.0f32; rows];
            let mut target_logit = vec![0.0f32; rows];
            for v0 in (0..vocab).step_by(VOCAB_TILE) {
                let width = VOCAB_TILE.min(vocab - v0);
                let tile = &mut logits[..rows * width];
                crate::sgemm::a_bt(rows, dim, width, h, &embedding[v0 * dim..(v0 + width) * dim], tile);
                for r in 0..rows {
                    let row = &tile[r * width..(r + 1) * width];
                    let t = targets[r] as usize;
                    if (v0..v0 + width).contains(&t) {
                        target_logit[r] = row[t - v0];
                    }
                    // Online log-sum-exp: rescale the running sum when the maximum grows.
                    let tile_max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    if tile_max > max[r] {
                        sum[r] *= (max[r] - tile_max).exp();
                        max[r] = tile_max;
                    }
                    let m = max[r];
                    sum[r] += row.iter().map(|x| (x - m).exp()).sum::<f32>();
                }
            }
            for r in 0..rows {
                out[r] = target_logit[r] - (max[r] + sum[r].ln());
            }
        },
    );
}

pub(crate) fn steered_projection(
    hidden: &[f32],
    steers: &Steers<'_>,
    strengths: &[f32],
    epsilon: f32,
    out: &mut [f32],
) {
    let Steers { p1, p2, steers: s, dim: d, rank: r } = *steers;
    out.par_chunks_mut(d).zip(hidden.par_chunks(d)).for_each(|(o, c)| {
        o.copy_from_slice(c);
        let mut proj = vec![0.0f32; r];
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
                let dot: f32 = proj.iter().zip(&b[k * r..(k + 1) * r]).map(|(x, y)| x * y).sum();
                *ok += scale * dot;
            }
        }
    });
}
