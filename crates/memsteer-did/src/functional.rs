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

    /// The analytic variance with each group's part `v_k` rescaled to the unbiased `n_k / (n_k − 1) · v_k`,
    /// and the Welch–Satterthwaite degrees of freedom of that sum, `(Σ u_k)² / Σ u_k² / (n_k − 1)`
    /// (infinite when the variance is zero): the scale and the degrees of freedom of a Student t for the
    /// studentised functional.
    pub fn welch(&self, cohorts: &Cohorts) -> (f64, f64) {
        let c = cohorts.c;
        let (mut total, mut denominator) = (0.0, 0.0);
        for b in &self.blocks {
            let g = &cohorts.groups[b.group];
            let mut quad = 0.0;
            for &(t1, w1) in &b.terms {
                let row = &g.cov[t1 * c..(t1 + 1) * c];
                for &(t2, w2) in &b.terms {
                    quad += w1 * w2 * row[t2];
                }
            }
            let dof = g.n.saturating_sub(1).max(1) as f64;
            let part = (g.n as f64 * (quad + b.offset * b.offset)).max(0.0) * g.n as f64 / dof;
            total += part;
            denominator += part * part / dof;
        }
        (total, if denominator > 0.0 { total * total / denominator } else { f64::INFINITY })
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
}
