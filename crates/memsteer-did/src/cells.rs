//! Cell definitions: which cohorts and checkpoints each ATT(g, c) compares, as linear functionals.

use memsteer_panel::Cohort;

use crate::functional::{Block, Functional};
use crate::prepare::Cohorts;
use crate::{BasePeriod, ControlGroup, Estimator, ValidConfig};

/// The definition of one cell.
#[derive(Debug, Clone)]
pub(crate) struct CellSpec {
    /// Group index of the treated cohort.
    pub group: usize,
    /// Checkpoint index of the cohort.
    pub g: usize,
    pub c: usize,
    pub n_control: usize,
}

/// Builds the cell definitions and functionals.
pub(crate) fn build_cells(cohorts: &Cohorts, cfg: &ValidConfig) -> (Vec<CellSpec>, Vec<Functional>, usize) {
    let c_len = cohorts.c;
    let never = cohorts.never();
    let mut specs = Vec::new();
    let mut funcs = Vec::new();
    let mut skipped = 0;
    for (k, grp) in cohorts.groups.iter().enumerate() {
        let Cohort::Treated(g) = grp.cohort else { continue };
        for c in 0..c_len {
            let base = match cfg.estimator {
                Estimator::Difference => None,
                Estimator::Did => match cfg.base_period {
                    BasePeriod::Varying => {
                        if c == 0 {
                            continue;
                        }
                        Some(if c >= g { g - 1 } else { c - 1 })
                    }
                    BasePeriod::Universal => {
                        if c + 1 == g {
                            continue;
                        }
                        Some(g - 1)
                    }
                },
            };
            let horizon = base.map_or(c, |b| b.max(c));
            let controls: Vec<usize> = match cfg.control {
                ControlGroup::Never => never.into_iter().collect(),
                ControlGroup::NotYet => cohorts
                    .groups
                    .iter()
                    .enumerate()
                    .filter(|(j, h)| {
                        *j != k
                            && match h.cohort {
                                Cohort::Never => true,
                                Cohort::Treated(gh) => gh > horizon,
                            }
                    })
                    .map(|(j, _)| j)
                    .collect(),
            };
            let n_control: usize = controls.iter().map(|&j| cohorts.groups[j].n).sum();
            if n_control == 0 {
                skipped += 1;
                continue;
            }
            funcs.push(cell_functional(cohorts, k, c, base, &controls, n_control));
            specs.push(CellSpec { group: k, g, c, n_control });
        }
    }
    (specs, funcs, skipped)
}

fn cell_functional(
    cohorts: &Cohorts,
    k: usize,
    c: usize,
    base: Option<usize>,
    controls: &[usize],
    n_control: usize,
) -> Functional {
    let terms = |scale: f64| -> Vec<(usize, f64)> {
        match base {
            Some(b) if b < c => vec![(b, -scale), (c, scale)],
            Some(b) => vec![(c, scale), (b, -scale)],
            None => vec![(c, scale)],
        }
    };
    let level = |mean: &[f64]| mean[c] - base.map_or(0.0, |b| mean[b]);
    let n_g = cohorts.groups[k].n as f64;
    let nc = n_control as f64;
    let pooled: f64 =
        controls.iter().map(|&j| cohorts.groups[j].n as f64 * level(&cohorts.groups[j].mean)).sum::<f64>() / nc;
    let mut blocks = Vec::with_capacity(controls.len() + 1);
    blocks.push(Block { group: k, terms: terms(1.0 / n_g), offset: 0.0 });
    for &j in controls {
        // ψ_j = −(ΔY_j − ΔȲ_C)/n_C = −ΔZ_j/n_C − (ΔȲ_k − ΔȲ_C)/n_C
        let offset = (level(&cohorts.groups[j].mean) - pooled) / nc;
        let offset = if controls.len() == 1 { 0.0 } else { offset };
        blocks.push(Block { group: j, terms: terms(-1.0 / nc), offset });
    }
    blocks.sort_by_key(|b| b.group);
    Functional { blocks }
}
