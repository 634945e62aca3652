//! ATT(g, c) for every cell, inference, aggregations: [`estimate`].

use memsteer_panel::{Cohort, Panel};

use crate::bootstrap::BootSums;
use crate::cells::{CellSpec, build_cells};
use crate::functional::Functional;
use crate::inference::{BandSet, Inference};
use crate::prepare::Cohorts;
use crate::stats::normal_quantile;
use crate::types::{CellEstimate, Profile, SeFallback};
use crate::{BandMethod, BandScope, ControlGroup, DidError, Estimator, Result, ValidConfig};

/// Receives progress of long steps (the CLI draws a bar; libraries pass [`NoProgress`]).
pub trait Progress: Sync {
    /// A step named `name` with `total` units of work begins.
    fn start(&self, name: &str, total: u64);
    /// `n` more units are done.
    fn advance(&self, n: u64);
    /// The current step is finished.
    fn finish(&self);
}

/// Progress that goes nowhere.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoProgress;

impl Progress for NoProgress {
    fn start(&self, _: &str, _: u64) {}
    fn advance(&self, _: u64) {}
    fn finish(&self) {}
}

/// Cohorts, cells and their functionals: what every estimation starts from.
pub(crate) struct Prepared {
    pub cohorts: Cohorts,
    pub specs: Vec<CellSpec>,
    pub funcs: Vec<Functional>,
    pub skipped: usize,
    pub n_dropped_no_pre: usize,
    pub n_never: usize,
}

/// Groups the panel by cohort, checks it supports the estimation, and defines the cells.
pub(crate) fn prepare(panel: &Panel, cfg: &ValidConfig) -> Result<Prepared> {
    let needs_pre = cfg.estimator == Estimator::Did;
    let cohorts = Cohorts::new(panel, |k| !(needs_pre && k == Cohort::Treated(0)))?;
    let n_dropped_no_pre = panel.n_instances() - cohorts.keys.len();
    let n_never = cohorts.never().map_or(0, |k| cohorts.groups[k].n);
    if cfg.control == ControlGroup::Never && n_never == 0 {
        return Err(DidError::NoNeverTreated);
    }
    if !cohorts.groups.iter().any(|g| g.cohort != Cohort::Never) {
        return Err(if n_dropped_no_pre > 0 {
            DidError::NoPrePeriod { dropped: n_dropped_no_pre }
        } else {
            DidError::NoTreated
        });
    }
    if needs_pre && cohorts.c < 2 {
        return Err(DidError::TooFewCheckpoints { found: cohorts.c });
    }
    let (specs, funcs, skipped) = build_cells(&cohorts, cfg);
    if specs.is_empty() {
        return Err(DidError::NoEstimableCell);
    }
    Ok(Prepared { cohorts, specs, funcs, skipped, n_dropped_no_pre, n_never })
}

/// Estimates the memorisation profile of `panel`.
pub fn estimate(panel: &Panel, cfg: &ValidConfig, progress: &dyn Progress) -> Result<Profile> {
    let Prepared { cohorts, specs, funcs, skipped, n_dropped_no_pre, n_never } = prepare(panel, cfg)?;
    let sums = match cfg.bootstrap {
        0 => None,
        draws => {
            progress.start("bootstrap", BootSums::n_tasks(&cohorts, draws));
            let s = BootSums::compute(&cohorts, draws, cfg.seed, cfg.multiplier, &|n| progress.advance(n))?;
            progress.finish();
            Some(s)
        }
    };
    progress.start("cells", 1);
    let inf = Inference { cohorts: &cohorts, sums: sums.as_ref(), seed: cfg.seed, student_draws: Default::default() };
    let steps = panel.grid().steps();
    let values: Vec<f64> = funcs.iter().map(|f| f.value(&cohorts)).collect();
    let ses = inf.std_errors(&funcs);
    let se = &ses.se;
    let z = normal_quantile(1.0 - cfg.alpha / 2.0);
    let in_band: Vec<bool> = specs.iter().map(|s| cfg.band_scope == BandScope::All || s.c >= s.g).collect();
    if cfg.band_method == BandMethod::Student {
        // The cells' and the path's bands from one pass over the Gaussian draws.
        let (events, _, path_funcs) = crate::aggregate::path_functionals(&cohorts, &specs, &funcs);
        let path_in: Vec<bool> = events.iter().map(|&e| crate::aggregate::path_in_band(cfg, e)).collect();
        let path_se = inf.std_errors(&path_funcs).analytic;
        inf.prepare_student_bands((&funcs, &ses.analytic, &in_band), (&path_funcs, &path_se, &path_in))?;
    }
    let (widths, crit) = inf.band(&funcs, &ses, &in_band, (cfg.alpha, cfg.band_method, BandSet::Cells))?;
    let cells: Vec<CellEstimate> = specs
        .iter()
        .zip(&values)
        .zip(se.iter().zip(&ses.analytic))
        .enumerate()
        .map(|(i, ((s, &est), (&se, &an)))| {
            let band = widths[i];
            CellEstimate {
                cohort: steps[s.g],
                checkpoint: steps[s.c],
                cohort_index: s.g,
                checkpoint_index: s.c,
                event_time: s.c as i64 - s.g as i64,
                estimate: est,
                std_error: se,
                ci_lower: est - z * se,
                ci_upper: est + z * se,
                band_lower: est - band,
                band_upper: est + band,
                n_treated: cohorts.groups[s.group].n,
                n_control: s.n_control,
                analytic_se: an,
                se_source: ses.source[i],
            }
        })
        .collect();
    progress.finish();

    progress.start("aggregations", 1);
    let agg = crate::aggregate::aggregate(&cohorts, &specs, &funcs, &inf, cfg, steps)?;
    let mut se_fallback = SeFallback {
        reason: None,
        cells: cells.iter().filter(|c| c.se_source.is_fallback()).map(|c| (c.cohort, c.checkpoint)).collect(),
        path: agg.path.iter().filter(|p| p.se_source.is_fallback()).map(|p| p.event_time).collect(),
        summaries: agg.n_summary_fallbacks,
    };
    if !se_fallback.is_empty() {
        se_fallback.reason = inf.fallback_reason();
    }
    // The bootstrap sums are the largest buffer; the diagnostics do not need them.
    drop(sums);
    progress.finish();
    progress.start("diagnostics", 1);
    let diagnostics = crate::diagnostics::diagnose(
        &cohorts,
        &specs,
        &funcs,
        &values,
        se,
        &agg,
        cfg,
        skipped,
        n_dropped_no_pre,
        steps,
        se_fallback,
    )?;
    progress.finish();
    Ok(Profile {
        checkpoints: steps.to_vec(),
        cells,
        path: agg.path,
        instantaneous: agg.instantaneous,
        persistent: agg.persistent,
        residual: agg.residual,
        per_cohort: agg.per_cohort,
        critical_value: crit,
        path_critical_value: agg.path_crit,
        n_instances: cohorts.keys.len(),
        n_never,
        n_dropped_no_pre,
        diagnostics,
    })
}
