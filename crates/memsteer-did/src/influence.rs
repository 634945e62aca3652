//! Per-cell influence functions, so users can build aggregations of their own.
//!
//! Without covariates every cell τ(g, c) is a linear combination of cohort means, and its influence
//! function assigns each instance `j` a value `ψ_j` with `Σ_j ψ_j = 0` whose square sum is the analytic
//! variance: `se = sqrt(Σ_j ψ_j²)` (csdid's analytic SE). Any linear aggregation `θ = Σ_c w_c τ_c` then has
//! estimate `Σ_c w_c τ̂_c` and influence function `Σ_c w_c ψ_c`, and a multiplier-bootstrap draw is
//! `Σ_j v_j ψ_j` for multipliers `v_j` with mean 0 and variance 1.
//!
//! ```
//! use memsteer_panel::synthetic::SyntheticConfig;
//! use memsteer_did::{influence_functions, ProfileConfig};
//!
//! let panel = SyntheticConfig::pythia_like(4, 20, 40, 6, 1).generate().unwrap();
//! let cfg = ProfileConfig::default().with_bootstrap(0).validate().unwrap();
//! let inf = influence_functions(&panel, &cfg).unwrap();
//! // Mean effect over the post-treatment cells of the first cohort.
//! let first = inf.cells()[0].cohort;
//! let cells: Vec<usize> =
//!     (0..inf.cells().len()).filter(|&i| inf.cells()[i].cohort == first && inf.cells()[i].event_time >= 0).collect();
//! let w = 1.0 / cells.len() as f64;
//! let combo = inf.combine(&cells.iter().map(|&i| (i, w)).collect::<Vec<_>>()).unwrap();
//! assert!(combo.std_error() > 0.0 && combo.estimate.is_finite());
//! ```

use memsteer_panel::Panel;

use crate::estimate::{Prepared, prepare};
use crate::functional::Functional;
use crate::prepare::Cohorts;
use crate::{DidError, Result, ValidConfig};

/// Which cell an influence function belongs to (the same cells, in the same order, as
/// [`crate::Profile::cells`] for the same panel and settings).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[non_exhaustive]
pub struct CellKey {
    /// Cohort as a checkpoint step.
    pub cohort: u64,
    /// Checkpoint step.
    pub checkpoint: u64,
    /// Cohort as a checkpoint index.
    pub cohort_index: usize,
    /// Checkpoint index.
    pub checkpoint_index: usize,
    /// Event time `c − g` in checkpoint indices.
    pub event_time: i64,
    /// Treated instances.
    pub n_treated: usize,
    /// Control instances.
    pub n_control: usize,
}

/// An estimate with its influence function over the panel's instances.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Influence {
    /// The point estimate.
    pub estimate: f64,
    /// `ψ_j` for every instance `j` of the panel, in the panel's instance order (0 for instances the
    /// estimation did not use, e.g. those trained before the first checkpoint under DiD).
    pub psi: Vec<f64>,
}

impl Influence {
    /// The analytic standard error `sqrt(Σ_j ψ_j²)`.
    pub fn std_error(&self) -> f64 {
        self.psi.iter().map(|x| x * x).sum::<f64>().sqrt()
    }

    /// One multiplier-bootstrap perturbation `Σ_j v_j ψ_j` for multipliers `v` (one per instance).
    pub fn perturbation(&self, multipliers: &[f64]) -> Result<f64> {
        if multipliers.len() != self.psi.len() {
            return Err(DidError::Argument(format!(
                "expected {} multipliers (one per instance), found {}",
                self.psi.len(),
                multipliers.len()
            )));
        }
        Ok(self.psi.iter().zip(multipliers).map(|(p, v)| p * v).sum())
    }
}

/// The cells of an estimation and their influence functions; see the [module docs](self).
#[derive(Debug)]
pub struct InfluenceFunctions {
    cohorts: Cohorts,
    funcs: Vec<Functional>,
    cells: Vec<CellKey>,
    n_instances: usize,
}

/// Defines the cells of `panel` under `cfg` (estimator, control group, base period) and gives access
/// to each cell's estimate and influence function. Inference settings (bootstrap, α) play no part.
pub fn influence_functions(panel: &Panel, cfg: &ValidConfig) -> Result<InfluenceFunctions> {
    let Prepared { cohorts, specs, funcs, .. } = prepare(panel, cfg)?;
    let steps = panel.grid().steps();
    let cells = specs
        .iter()
        .map(|s| CellKey {
            cohort: steps[s.g],
            checkpoint: steps[s.c],
            cohort_index: s.g,
            checkpoint_index: s.c,
            event_time: s.c as i64 - s.g as i64,
            n_treated: cohorts.groups[s.group].n,
            n_control: s.n_control,
        })
        .collect();
    Ok(InfluenceFunctions { cohorts, funcs, cells, n_instances: panel.n_instances() })
}

impl InfluenceFunctions {
    /// The cells, in [`crate::Profile::cells`] order.
    pub fn cells(&self) -> &[CellKey] {
        &self.cells
    }

    /// Length of every influence vector: the panel's instance count.
    pub fn n_instances(&self) -> usize {
        self.n_instances
    }

    /// Estimate and influence function of cell `cell`.
    pub fn cell(&self, cell: usize) -> Result<Influence> {
        self.combine(&[(cell, 1.0)])
    }

    /// Estimate and influence function of `Σ w · τ(cell)` over `(cell, w)` pairs.
    pub fn combine(&self, weights: &[(usize, f64)]) -> Result<Influence> {
        let mut f = Functional::default();
        for &(cell, w) in weights {
            let g = self.funcs.get(cell).ok_or_else(|| {
                DidError::Argument(format!("cell index {cell} is out of range: there are {} cells", self.funcs.len()))
            })?;
            if !w.is_finite() {
                return Err(DidError::Argument(format!("weight of cell {cell} is {w}, expected a finite number")));
            }
            f.add_scaled(g, w);
        }
        let c = self.cohorts.c;
        let mut psi = vec![0.0; self.n_instances];
        for b in &f.blocks {
            let g = &self.cohorts.groups[b.group];
            for (r, z) in self.cohorts.rows(b.group).chunks_exact(c).enumerate() {
                let v: f64 = b.terms.iter().map(|&(t, w)| w * z[t]).sum::<f64>() - b.offset;
                psi[self.cohorts.order[g.start + r]] = v;
            }
        }
        Ok(Influence { estimate: f.value(&self.cohorts), psi })
    }
}
