//! Cohort-grouped, centred outcomes and per-cohort moments: everything the estimators need, computed
//! once in O(N·C²).

use memsteer_panel::{Cohort, Panel, rng};
use rayon::prelude::*;

/// One cohort's instances and moments.
#[derive(Debug, Clone)]
pub(crate) struct Group {
    pub cohort: Cohort,
    /// First row of the cohort in [`Cohorts::z`].
    pub start: usize,
    /// Number of instances.
    pub n: usize,
    /// Mean outcome at each checkpoint.
    pub mean: Vec<f64>,
    /// Population covariance of outcomes across checkpoints, `C×C` row-major.
    pub cov: Vec<f64>,
}

/// Instances grouped by cohort (ascending checkpoint, never-treated last).
#[derive(Debug)]
pub(crate) struct Cohorts {
    pub c: usize,
    pub groups: Vec<Group>,
    /// Outcomes centred at their cohort mean, row-major, rows grouped by cohort.
    pub z: Vec<f64>,
    /// Per row: a key derived from the instance id, for order-independent bootstrap draws.
    pub keys: Vec<u64>,
    /// Raw outcomes at the first checkpoint, grouped like `z`.
    pub first: Vec<f64>,
    /// Per row: the instance's index in the panel.
    pub order: Vec<usize>,
}

impl Cohorts {
    /// Groups the panel's instances by cohort, keeping those for which `keep` holds.
    pub fn new(panel: &Panel, keep: impl Fn(Cohort) -> bool) -> crate::Result<Self> {
        let c = panel.n_checkpoints();
        let mut order: Vec<usize> = (0..panel.n_instances()).filter(|&i| keep(panel.cohort(i))).collect();
        // Stable sort: within a cohort, rows keep file order.
        order.sort_by_key(|&i| panel.cohort(i));
        let n = order.len();
        let mut z = vec![0.0; n * c];
        let mut keys = Vec::with_capacity(n);
        let mut first = Vec::with_capacity(n);
        for (row, &i) in order.iter().enumerate() {
            z[row * c..(row + 1) * c].copy_from_slice(panel.outcomes(i));
            keys.push(rng::hash_key(0, panel.id(i).as_bytes()));
            first.push(panel.outcomes(i)[0]);
        }
        let mut bounds: Vec<(Cohort, usize, usize)> = Vec::new();
        for (row, &i) in order.iter().enumerate() {
            let cohort = panel.cohort(i);
            match bounds.last_mut() {
                Some((last, _, len)) if *last == cohort => *len += 1,
                _ => bounds.push((cohort, row, 1)),
            }
        }
        // Centre each cohort's block and compute its moments, cohorts in parallel.
        let mut blocks: Vec<&mut [f64]> = Vec::with_capacity(bounds.len());
        let mut rest = z.as_mut_slice();
        for &(_, _, len) in &bounds {
            let (head, tail) = rest.split_at_mut(len * c);
            blocks.push(head);
            rest = tail;
        }
        let groups: Vec<Group> = blocks
            .into_par_iter()
            .zip(bounds.par_iter())
            .map(|(block, &(cohort, start, len))| {
                let mut mean = vec![0.0; c];
                for row in block.chunks_exact(c) {
                    for (m, y) in mean.iter_mut().zip(row) {
                        *m += y;
                    }
                }
                for m in &mut mean {
                    *m /= len as f64;
                }
                for row in block.chunks_exact_mut(c) {
                    for (y, m) in row.iter_mut().zip(&mean) {
                        *y -= m;
                    }
                }
                let mut cov = vec![0.0; c * c];
                crate::gemm::at_b(c, len, c, 1.0 / len as f64, block, block, 0.0, &mut cov)?;
                Ok(Group { cohort, start, n: len, mean, cov })
            })
            .collect::<crate::Result<_>>()?;
        Ok(Self { c, groups, z, keys, first, order })
    }

    /// Index of the never-treated group, if any.
    pub fn never(&self) -> Option<usize> {
        self.groups.iter().position(|g| g.cohort == Cohort::Never)
    }

    /// For each treated group `g`, the within-cohort covariance pooled over all treated cohorts with
    /// `g_k ≥ g` (divided by instances minus cohorts, so unbiased); `None` for the never-treated group.
    ///
    /// Training batches are drawn at random, so before `g` all these cohorts share one distribution and
    /// the pooled matrix estimates cohort `g`'s pre-treatment covariance with far less noise than its
    /// own. Every entry of one matrix comes from the same instances, so it is positive semi-definite and
    /// any covariance assembled from these matrices is too.
    pub fn pooled_pre_treatment_covs(&self) -> Vec<Option<Vec<f64>>> {
        let c = self.c;
        let mut out: Vec<Option<Vec<f64>>> = vec![None; self.groups.len()];
        let mut sum = vec![0.0; c * c];
        let mut n = 0usize;
        let mut m = 0usize;
        // Groups are sorted by cohort with never-treated last: sweep treated groups from the latest.
        for (k, g) in self.groups.iter().enumerate().rev() {
            if g.cohort == Cohort::Never {
                continue;
            }
            for (s, v) in sum.iter_mut().zip(&g.cov) {
                *s += g.n as f64 * v;
            }
            n += g.n;
            m += 1;
            // Unbiased: each cohort's own mean was estimated.
            let df = n.saturating_sub(m).max(1) as f64;
            out[k] = Some(sum.iter().map(|s| s / df).collect());
        }
        out
    }

    /// Rows of group `k` in `z`.
    pub fn rows(&self, k: usize) -> &[f64] {
        let g = &self.groups[k];
        &self.z[g.start * self.c..(g.start + g.n) * self.c]
    }
}
