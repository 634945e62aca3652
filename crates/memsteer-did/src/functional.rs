//! Estimates as linear functionals of cohort outcomes.
//!
//! Without covariates every estimate here (a cell τ(g, c), a point of the path, a summary) is a linear
//! combination of cohort means. Its influence function for instance `j` of cohort `k` is
//! `ψ_j = Σ_t w_t Z_{j,t} − off_k`, where `Z` is the outcome centred at its cohort mean, `w` are the
//! functional's weights on that cohort (coefficient / cohort size, or / pooled-control size) and
//! `off_k` is non-zero only when a pooled control group is centred at its pooled mean. From that one
//! representation follow the point estimate, the analytic variance `Σ_j ψ_j²`, covariances, and the
//! multiplier-bootstrap draw `Σ_j v_j ψ_j` (through per-cohort sums `U_k = Z_kᵀ V_k`).

use crate::prepare::Cohorts;

/// A functional's part on one cohort.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Block {
    pub group: usize,
    /// (checkpoint index, weight), sorted by checkpoint, no duplicates.
    pub terms: Vec<(usize, f64)>,
    pub offset: f64,
}

/// A linear functional of cohort outcomes; blocks sorted by group.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Functional {
    pub blocks: Vec<Block>,
}

fn merge_terms(a: &[(usize, f64)], sa: f64, b: &[(usize, f64)], sb: f64) -> Vec<(usize, f64)> {
    let mut out = Vec::with_capacity(a.len() + b.len());
    let (mut i, mut j) = (0, 0);
    while i < a.len() || j < b.len() {
        if j == b.len() || (i < a.len() && a[i].0 < b[j].0) {
            out.push((a[i].0, sa * a[i].1));
            i += 1;
        } else if i == a.len() || b[j].0 < a[i].0 {
            out.push((b[j].0, sb * b[j].1));
            j += 1;
        } else {
            out.push((a[i].0, sa * a[i].1 + sb * b[j].1));
            i += 1;
            j += 1;
        }
    }
    out
}

impl Functional {
    /// Adds `scale · other` to `self`.
    pub fn add_scaled(&mut self, other: &Functional, scale: f64) {
        let mut out = Vec::with_capacity(self.blocks.len() + other.blocks.len());
        let (a, b) = (&self.blocks, &other.blocks);
        let (mut i, mut j) = (0, 0);
        while i < a.len() || j < b.len() {
            if j == b.len() || (i < a.len() && a[i].group < b[j].group) {
                out.push(a[i].clone());
                i += 1;
            } else if i == a.len() || b[j].group < a[i].group {
                out.push(Block {
                    group: b[j].group,
                    terms: b[j].terms.iter().map(|&(t, w)| (t, scale * w)).collect(),
                    offset: scale * b[j].offset,
                });
                j += 1;
            } else {
                out.push(Block {
                    group: a[i].group,
                    terms: merge_terms(&a[i].terms, 1.0, &b[j].terms, scale),
                    offset: a[i].offset + scale * b[j].offset,
                });
                i += 1;
                j += 1;
            }
        }
        self.blocks = out;
    }

    /// The point estimate `Σ_k n_k Σ_t w_t Ȳ_{k,t}`.
    pub fn value(&self, cohorts: &Cohorts) -> f64 {
        self.blocks
            .iter()
            .map(|b| {
                let g = &cohorts.groups[b.group];
                g.n as f64 * b.terms.iter().map(|&(t, w)| w * g.mean[t]).sum::<f64>()
            })
            .sum()
    }

    /// `Σ_j ψ1_j ψ2_j`: the analytic covariance of two functionals.
    pub fn covariance(&self, other: &Functional, cohorts: &Cohorts) -> f64 {
        self.covariance_with(other, cohorts, &|k| &cohorts.groups[k].cov)
    }

    /// The analytic covariance with cohort `k`'s covariance matrix taken from `cov_of(k)`.
    pub fn covariance_with<'c>(
        &self,
        other: &Functional,
        cohorts: &'c Cohorts,
        cov_of: &(dyn Fn(usize) -> &'c [f64] + Sync),
    ) -> f64 {
        let c = cohorts.c;
        let (a, b) = (&self.blocks, &other.blocks);
        let (mut i, mut j) = (0, 0);
        let mut total = 0.0;
        while i < a.len() && j < b.len() {
            match a[i].group.cmp(&b[j].group) {
                std::cmp::Ordering::Less => i += 1,
                std::cmp::Ordering::Greater => j += 1,
                std::cmp::Ordering::Equal => {
                    let g = &cohorts.groups[a[i].group];
                    let cov = cov_of(a[i].group);
                    let mut quad = 0.0;
                    for &(t1, w1) in &a[i].terms {
                        let row = &cov[t1 * c..(t1 + 1) * c];
                        for &(t2, w2) in &b[j].terms {
                            quad += w1 * w2 * row[t2];
                        }
                    }
                    total += g.n as f64 * (quad + a[i].offset * b[j].offset);
                    i += 1;
                    j += 1;
                }
            }
        }
        total
    }

    /// Each group's part of the analytic variance rescaled to the unbiased `n_k / (n_k − 1) · v_k`, with
    /// its degrees of freedom `n_k − 1` (at least 1).
    fn unbiased_parts(&self, cohorts: &Cohorts) -> Vec<(f64, f64)> {
        let c = cohorts.c;
        self.blocks
            .iter()
            .map(|b| {
                let g = &cohorts.groups[b.group];
                let mut quad = 0.0;
                for &(t1, w1) in &b.terms {
                    let row = &g.cov[t1 * c..(t1 + 1) * c];
                    for &(t2, w2) in &b.terms {
                        quad += w1 * w2 * row[t2];
                    }
                }
                let dof = g.n.saturating_sub(1).max(1) as f64;
                ((g.n as f64 * (quad + b.offset * b.offset)).max(0.0) * g.n as f64 / dof, dof)
            })
            .collect()
    }

    /// The scale and degrees of freedom of a Student t for the studentised functional: the analytic
    /// variance from unbiased group parts, and [`student_df`] of those parts.
    pub fn student_t(&self, cohorts: &Cohorts) -> (f64, f64) {
        let parts = self.unbiased_parts(cohorts);
        (parts.iter().map(|p| p.0).sum(), student_df(&parts))
    }

    /// The analytic variance.
    pub fn variance(&self, cohorts: &Cohorts) -> f64 {
        self.covariance(self, cohorts).max(0.0)
    }

    /// Writes the bootstrap perturbations `Σ_j v_{b,j} ψ_j` for every draw `b` into `out`.
    pub fn draws(&self, sums: &crate::bootstrap::BootSums, out: &mut [f64]) {
        out.fill(0.0);
        for b in &self.blocks {
            for &(t, w) in &b.terms {
                sums.axpy_row(b.group, t, w, out);
            }
            if b.offset != 0.0 {
                sums.axpy_count(b.group, -b.offset, out);
            }
        }
    }
}

/// Degrees of freedom of a Student t for `(Σ_k x_k) / √(Σ_k u_k)`, where group `k` contributes a
/// variance part `u_k` estimated with `ν_k` degrees of freedom (`parts` = `(u_k, ν_k)`).
///
/// Welch–Satterthwaite (`(Σ u)² / Σ u²/ν`) matches the variance estimate's first two moments and is
/// accurate near the centre, but a uniform band is decided at tail probabilities near 10⁻³, where it is
/// anti-conservative when one small group carries most of the variance: the draws in which that group's
/// variance came out small are those that look extreme, and exactly then the plug-in shares give it less
/// weight and the degrees of freedom come out larger. Here the degrees of freedom match the fourth moment
/// instead (Patil 1965, *Biometrika* 52: 267–271): the Behrens–Fisher form `Σ √(u_k/U) t_{ν_k}` has
/// excess kurtosis `κ = 6 Σ b_k² / (ν_k − 4) / (Σ b_k)²` with `b_k = u_k ν_k / (ν_k − 2)`, and the t
/// with the same excess kurtosis `6 / (ν − 4)` has `ν = 4 + 6 / κ`. One group gives its own `ν_k` back
/// (like Welch); `K` equal groups give `4 + K(ν − 4)` against Welch's `Kν` (close when `ν` is large).
/// A positive part with `ν_k ≤ 4` (a group of fewer than six instances) has no finite kurtosis: then
/// the functional keeps Welch–Satterthwaite's value, which moves smoothly with that group's share and
/// is never below the smallest `ν_k`. No positive part: infinite.
pub(crate) fn student_df(parts: &[(f64, f64)]) -> f64 {
    let positive: Vec<(f64, f64)> = parts.iter().copied().filter(|p| p.0 > 0.0 && p.0.is_finite()).collect();
    // Shares, not raw parts: the squares below neither overflow nor underflow.
    let Some(top) = positive.iter().map(|p| p.0).reduce(f64::max) else { return f64::INFINITY };
    let (mut sum, mut denominator) = (0.0, 0.0);
    if positive.iter().any(|p| p.1 <= 4.0) {
        for &(u, nu) in &positive {
            let u = u / top;
            sum += u;
            denominator += u * u / nu;
        }
        return sum * sum / denominator;
    }
    for &(u, nu) in &positive {
        let b = u / top * nu / (nu - 2.0);
        sum += b;
        denominator += b * b / (nu - 4.0);
    }
    4.0 + sum * sum / denominator
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn add_scaled_merges_blocks_and_terms() {
        let mut f = Functional { blocks: vec![Block { group: 1, terms: vec![(0, 1.0), (2, 1.0)], offset: 0.5 }] };
        let g = Functional {
            blocks: vec![
                Block { group: 0, terms: vec![(1, 1.0)], offset: 0.0 },
                Block { group: 1, terms: vec![(1, 2.0), (2, 1.0)], offset: 1.0 },
            ],
        };
        f.add_scaled(&g, 0.5);
        assert_eq!(
            f.blocks,
            vec![
                Block { group: 0, terms: vec![(1, 0.5)], offset: 0.0 },
                Block { group: 1, terms: vec![(0, 1.0), (1, 1.0), (2, 1.5)], offset: 1.0 },
            ]
        );
    }

    /// Closed forms: one group gives its own ν; two groups `(u, ν) = (0.125, 9), (0.02, 99)` (a cohort of
    /// 10 against 100 never-trained instances) give 4 + 0.181127² / (0.160714²/5 + 0.020412²/95) =
    /// 10.3454 (by hand), below Welch's 12.08; with a group of ≤ 5 instances Welch's value, which a
    /// negligible such group leaves where it was; scale does not matter; none is infinite.
    #[test]
    fn student_df_closed_forms() {
        for nu in [5.0, 9.0, 29.0, 1e4] {
            assert!((student_df(&[(0.3, nu)]) - nu).abs() < 1e-9 * nu, "ν = {nu}");
            // Zero parts do not count.
            assert!((student_df(&[(0.3, nu), (0.0, 2.0)]) - nu).abs() < 1e-9 * nu);
        }
        let b1 = 0.125 * 9.0 / 7.0;
        let b2 = 0.02 * 99.0 / 97.0;
        let expected = 4.0 + (b1 + b2) * (b1 + b2) / (b1 * b1 / 5.0 + b2 * b2 / 95.0);
        let got = student_df(&[(0.125, 9.0), (0.02, 99.0)]);
        assert!((got - expected).abs() < 1e-12 && (got - 10.3454).abs() < 1e-3, "{got} vs {expected}");
        let welch = 0.145f64.powi(2) / (0.125f64.powi(2) / 9.0 + 0.02f64.powi(2) / 99.0);
        assert!(got < welch - 1.5, "{got} vs Welch {welch}");
        // Many equal groups: 4 + K(ν − 4), close to Welch's Kν when ν is large.
        let eight = student_df(&[(0.1, 99.0); 8]);
        assert!((eight - (4.0 + 8.0 * 95.0)).abs() < 1e-9, "{eight}");
        let welch = |p: &[(f64, f64)]| {
            p.iter().map(|x| x.0).sum::<f64>().powi(2) / p.iter().map(|x| x.0 * x.0 / x.1).sum::<f64>()
        };
        let tiny = [(0.1, 29.0), (0.2, 3.0), (0.1, 2.0)];
        assert!((student_df(&tiny) - welch(&tiny)).abs() < 1e-9 && student_df(&tiny) >= 2.0);
        // A negligible part of a group of two barely moves a cohort of 30 against 100.
        let negligible = student_df(&[(0.0667, 29.0), (0.02, 99.0), (1e-9, 1.0)]);
        assert!((negligible - welch(&[(0.0667, 29.0), (0.02, 99.0)])).abs() < 1e-3, "{negligible}");
        // Scale-free, also where squares of the raw parts would overflow or underflow.
        for scale in [1e-200, 1e200] {
            let scaled = student_df(&[(0.125 * scale, 9.0), (0.02 * scale, 99.0)]);
            assert!((scaled - got).abs() < 1e-9 * got, "scale {scale}: {scaled}");
        }
        assert_eq!(student_df(&[(0.0, 29.0)]), f64::INFINITY);
        assert_eq!(student_df(&[]), f64::INFINITY);
    }
}
