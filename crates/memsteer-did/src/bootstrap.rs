//! The multiplier bootstrap for all cells at once.
//!
//! For every cohort `k` and checkpoint `t`, `U_k[t, b] = Σ_{j∈k} v_{b,j} Z_{j,t}` over the cohort's
//! centred outcomes, and `sv_k[b] = Σ_{j∈k} v_{b,j}`: one blocked matrix product per cohort
//! (`C × n_k` by `n_k × B`). Every estimate's draw is then a handful of `B`-long vector operations
//! (see [`crate::functional::Functional::draws`]).
//!
//! Multipliers are keyed by instance id and draw index through a counter-based generator, so draws do
//! not depend on row order, on how work is split across threads, or on the thread count.

use memsteer_panel::rng;
use rayon::prelude::*;

use crate::Multiplier;
use crate::prepare::Cohorts;

/// Draws per task.
const DRAW_BLOCK: usize = 256;
/// Instances per matrix product.
const UNIT_CHUNK: usize = 512;

/// Per-cohort bootstrap sums.
#[derive(Debug)]
pub(crate) struct BootSums {
    pub draws: usize,
    c: usize,
    /// `u[group][block]` is `C × len(block)` row-major.
    u: Vec<Vec<Vec<f64>>>,
    /// `sv[group]` has one entry per draw.
    sv: Vec<Vec<f64>>,
}

fn block_range(blk: usize, draws: usize) -> (usize, usize) {
    let b0 = blk * DRAW_BLOCK;
    (b0, (b0 + DRAW_BLOCK).min(draws))
}

const MAMMEN_LOW: f64 = (1.0 - 2.236_067_977_499_79) / 2.0;
const MAMMEN_HIGH: f64 = (1.0 + 2.236_067_977_499_79) / 2.0;
/// P(v = MAMMEN_LOW) = (√5 + 1) / (2√5).
const MAMMEN_P_LOW: f64 = (2.236_067_977_499_79 + 1.0) / (2.0 * 2.236_067_977_499_79);

/// Fills `out` (rows × (b1−b0)) with the multipliers of `keys` for draws `b0..b1`.
fn fill_multipliers(keys: &[u64], seed: u64, kind: Multiplier, b0: usize, b1: usize, out: &mut [f64]) {
    let width = b1 - b0;
    let seed_mix = rng::mix64(seed ^ 0xD1B5_4A32_D192_ED03);
    for (row, &key) in out.chunks_exact_mut(width).zip(keys) {
        let key = rng::mix64(key ^ seed_mix);
        match kind {
            Multiplier::Rademacher => {
                let mut word_index = usize::MAX;
                let mut bits = 0u64;
                for (x, b) in row.iter_mut().zip(b0..b1) {
                    if b / 64 != word_index {
                        word_index = b / 64;
                        bits = rng::word(key, word_index as u64);
                    }
                    *x = if (bits >> (b % 64)) & 1 == 1 { 1.0 } else { -1.0 };
                }
            }
            Multiplier::Mammen => {
                for (x, b) in row.iter_mut().zip(b0..b1) {
                    let u = (rng::word(key, b as u64) >> 11) as f64 * (1.0 / (1u64 << 53) as f64);
                    *x = if u < MAMMEN_P_LOW { MAMMEN_LOW } else { MAMMEN_HIGH };
                }
            }
        }
    }
}

impl BootSums {
    /// Computes all cohorts' sums; `tick` is called once per finished task.
    pub fn compute(
        cohorts: &Cohorts,
        draws: usize,
        seed: u64,
        kind: Multiplier,
        tick: &(dyn Fn(u64) + Sync),
    ) -> crate::Result<Self> {
        let c = cohorts.c;
        let n_blocks = draws.div_ceil(DRAW_BLOCK);
        let tasks: Vec<(usize, usize)> =
            (0..cohorts.groups.len()).flat_map(|k| (0..n_blocks).map(move |blk| (k, blk))).collect();
        let results: Vec<(Vec<f64>, Vec<f64>)> = tasks
            .par_iter()
            .map(|&(k, blk)| {
                // A tick of nothing first: a caller that stops the run from `tick` skips the tasks left.
                tick(0);
                let (b0, b1) = block_range(blk, draws);
                let width = b1 - b0;
                let g = &cohorts.groups[k];
                let z = cohorts.rows(k);
                let keys = &cohorts.keys[g.start..g.start + g.n];
                let mut u = vec![0.0; c * width];
                let mut sv = vec![0.0; width];
                let mut v = vec![0.0; UNIT_CHUNK.min(g.n) * width];
                for start in (0..g.n).step_by(UNIT_CHUNK) {
                    let rows = UNIT_CHUNK.min(g.n - start);
                    let v = &mut v[..rows * width];
                    fill_multipliers(&keys[start..start + rows], seed, kind, b0, b1, v);
                    crate::gemm::at_b(c, rows, width, 1.0, &z[start * c..(start + rows) * c], v, 1.0, &mut u)?;
                    for row in v.chunks_exact(width) {
                        for (s, x) in sv.iter_mut().zip(row) {
                            *s += x;
                        }
                    }
                }
                tick(1);
                Ok((u, sv))
            })
            .collect::<crate::Result<_>>()?;
        let mut u: Vec<Vec<Vec<f64>>> = (0..cohorts.groups.len()).map(|_| Vec::with_capacity(n_blocks)).collect();
        let mut sv: Vec<Vec<f64>> = (0..cohorts.groups.len()).map(|_| Vec::with_capacity(draws)).collect();
        for (&(k, _), (uk, svk)) in tasks.iter().zip(results) {
            u[k].push(uk);
            sv[k].extend_from_slice(&svk);
        }
        Ok(Self { draws, c, u, sv })
    }

    /// Number of tasks [`BootSums::compute`] ticks for.
    pub fn n_tasks(cohorts: &Cohorts, draws: usize) -> u64 {
        (cohorts.groups.len() * draws.div_ceil(DRAW_BLOCK)) as u64
    }

    /// `out += w · U_k[t, ·]`.
    #[inline]
    pub fn axpy_row(&self, k: usize, t: usize, w: f64, out: &mut [f64]) {
        debug_assert!(t < self.c);
        for (blk, u) in self.u[k].iter().enumerate() {
            let (b0, b1) = block_range(blk, self.draws);
            let width = b1 - b0;
            let row = &u[t * width..(t + 1) * width];
            for (o, x) in out[b0..b1].iter_mut().zip(row) {
                *o += w * x;
            }
        }
    }

    /// `out += a · sv_k`.
    #[inline]
    pub fn axpy_count(&self, k: usize, a: f64, out: &mut [f64]) {
        for (o, s) in out.iter_mut().zip(&self.sv[k]) {
            *o += a * s;
        }
    }
}

/// The `p`-quantile of `x` by inverting the empirical distribution function (R type 1, numpy
/// `inverted_cdf`), as the peers use. Reorders `x`; NaNs are not allowed.
pub(crate) fn quantile_inverted_cdf(x: &mut [f64], p: f64) -> f64 {
    let n = x.len();
    let rank = ((p * n as f64).ceil() as usize).clamp(1, n);
    let (_, v, _) = x.select_nth_unstable_by(rank - 1, f64::total_cmp);
    *v
}

/// Robust bootstrap standard error: interquartile range of the draws over that of the standard normal.
pub(crate) fn iqr_se(draws: &[f64], scratch: &mut Vec<f64>) -> f64 {
    scratch.clear();
    scratch.extend_from_slice(draws);
    let n = scratch.len();
    let rank = |p: f64| ((p * n as f64).ceil() as usize).clamp(1, n) - 1;
    let (lo, hi) = (rank(0.25), rank(0.75));
    // One selection for the 25% point, then a second within the part above it.
    let (_, q25, upper) = scratch.select_nth_unstable_by(lo, f64::total_cmp);
    let q25 = *q25;
    let q75 = if hi == lo { q25 } else { *upper.select_nth_unstable_by(hi - lo - 1, f64::total_cmp).1 };
    (q75 - q25) / crate::stats::NORMAL_IQR
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inverted_cdf_matches_numpy() {
        // numpy.quantile([1..10], [0.25, 0.75, 0.95], method="inverted_cdf") = [3, 8, 10]
        let mut x: Vec<f64> = (1..=10).rev().map(f64::from).collect();
        assert_eq!(quantile_inverted_cdf(&mut x, 0.25), 3.0);
        assert_eq!(quantile_inverted_cdf(&mut x, 0.75), 8.0);
        assert_eq!(quantile_inverted_cdf(&mut x, 0.95), 10.0);
        assert_eq!(quantile_inverted_cdf(&mut x, 0.5), 5.0);
    }

    #[test]
    fn iqr_se_matches_two_separate_quantiles() {
        let x: Vec<f64> = (0..1001).map(|i| ((i * 7919) % 1001) as f64 * 0.37 - 50.0).collect();
        let mut a = x.clone();
        let want =
            (quantile_inverted_cdf(&mut a, 0.75) - quantile_inverted_cdf(&mut a, 0.25)) / crate::stats::NORMAL_IQR;
        assert_eq!(iqr_se(&x, &mut Vec::new()), want);
        for n in [1usize, 2, 3, 4, 1000] {
            let y: Vec<f64> = (0..n).map(|i| i as f64).collect();
            let mut b = y.clone();
            let want =
                (quantile_inverted_cdf(&mut b, 0.75) - quantile_inverted_cdf(&mut b, 0.25)) / crate::stats::NORMAL_IQR;
            assert_eq!(iqr_se(&y, &mut Vec::new()), want, "n = {n}");
        }
    }

    #[test]
    fn multipliers_have_mean_zero_and_unit_variance() {
        for kind in [Multiplier::Rademacher, Multiplier::Mammen] {
            let keys: Vec<u64> = (0..2000).collect();
            let mut v = vec![0.0; 2000 * 100];
            fill_multipliers(&keys, 3, kind, 0, 100, &mut v);
            let n = v.len() as f64;
            let mean = v.iter().sum::<f64>() / n;
            let var = v.iter().map(|x| x * x).sum::<f64>() / n - mean * mean;
            let third = v.iter().map(|x| x * x * x).sum::<f64>() / n;
            assert!(mean.abs() < 0.01, "{kind:?} mean {mean}");
            assert!((var - 1.0).abs() < 0.01, "{kind:?} var {var}");
            let want_third = if kind == Multiplier::Mammen { 1.0 } else { 0.0 };
            assert!((third - want_third).abs() < 0.03, "{kind:?} third moment {third}");
        }
    }

    #[test]
    fn multipliers_do_not_depend_on_the_draw_block_split() {
        let keys = [11u64, 12, 13];
        let mut whole = vec![0.0; 3 * 300];
        fill_multipliers(&keys, 9, Multiplier::Rademacher, 0, 300, &mut whole);
        let mut tail = vec![0.0; 3 * 100];
        fill_multipliers(&keys, 9, Multiplier::Rademacher, 200, 300, &mut tail);
        for r in 0..3 {
            assert_eq!(&whole[r * 300 + 200..r * 300 + 300], &tail[r * 100..(r + 1) * 100]);
        }
    }
}
