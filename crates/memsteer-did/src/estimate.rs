//! ATT(g, c) for every cell, inference, aggregations: [`estimate`].

use memsteer_panel::{Cohort, Panel};
use rayon::prelude::*;

use crate::bootstrap::{BootSums, iqr_se, quantile_inverted_cdf};
use crate::functional::{Block, Functional};
use crate::prepare::Cohorts;
use crate::stats::normal_quantile;
use crate::{BandScope, BasePeriod, ControlGroup, DidError, Estimator, Result, ValidConfig};

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

/// One cell of the profile: the effect of being trained in cohort `g` on the outcome at checkpoint `c`.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct CellEstimate {
    /// Cohort as a checkpoint step (the first checkpoint after the training batch).
    pub cohort: u64,
    /// Checkpoint step.
    pub checkpoint: u64,
    /// Cohort as a checkpoint index.
    pub cohort_index: usize,
    /// Checkpoint index.
    pub checkpoint_index: usize,
    /// Event time `c − g` in checkpoint indices.
    pub event_time: i64,
    /// Point estimate.
    pub estimate: f64,
    /// Standard error (bootstrap when draws were made, analytic otherwise).
    pub std_error: f64,
    /// Pointwise interval.
    pub ci_lower: f64,
    /// Pointwise interval.
    pub ci_upper: f64,
    /// Uniform band (equals the pointwise interval without bootstrap).
    pub band_lower: f64,
    /// Uniform band.
    pub band_upper: f64,
    /// Treated instances.
    pub n_treated: usize,
    /// Control instances.
    pub n_control: usize,
    /// Analytic standard error (always computed).
    pub analytic_se: f64,
}

impl CellEstimate {
    /// Post-treatment (`c ≥ g`).
    pub fn is_post(&self) -> bool {
        self.event_time >= 0
    }
    /// Zero lies outside the uniform band.
    pub fn is_significant(&self) -> bool {
        self.band_lower > 0.0 || self.band_upper < 0.0
    }
}

/// A point of the memorisation path (effects averaged by event time, cohort-size weighted).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct PathEstimate {
    /// Event time `c − g` in checkpoint indices.
    pub event_time: i64,
    /// Point estimate.
    pub estimate: f64,
    /// Standard error.
    pub std_error: f64,
    /// Pointwise interval.
    pub ci_lower: f64,
    /// Pointwise interval.
    pub ci_upper: f64,
    /// Uniform band over the path.
    pub band_lower: f64,
    /// Uniform band over the path.
    pub band_upper: f64,
    /// Cohorts contributing.
    pub n_cohorts: usize,
}

/// A scalar summary with its inference.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Aggregate {
    /// Point estimate.
    pub estimate: f64,
    /// Standard error.
    pub std_error: f64,
    /// Pointwise interval.
    pub ci_lower: f64,
    /// Pointwise interval.
    pub ci_upper: f64,
}

/// Summaries of one cohort.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct CohortSummary {
    /// Cohort as a checkpoint step.
    pub cohort: u64,
    /// Instances in the cohort.
    pub n: usize,
    /// τ(g, g).
    pub instantaneous: Option<Aggregate>,
    /// Mean of τ(g, c) over c > g.
    pub persistent: Option<Aggregate>,
    /// τ(g, T) at the last checkpoint.
    pub residual: Option<Aggregate>,
}

/// Everything [`estimate`] computes.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Profile {
    /// Checkpoint steps.
    pub checkpoints: Vec<u64>,
    /// All estimated cells, by cohort then checkpoint.
    pub cells: Vec<CellEstimate>,
    /// The path by event time.
    pub path: Vec<PathEstimate>,
    /// Memorisation at `e = 0` (path point).
    pub instantaneous: Option<Aggregate>,
    /// Mean of the path over `e > 0`.
    pub persistent: Option<Aggregate>,
    /// Cohort-size weighted mean of τ(g, T) at the last checkpoint.
    pub residual: Option<Aggregate>,
    /// Per-cohort summaries.
    pub per_cohort: Vec<CohortSummary>,
    /// Critical value of the cells' uniform band.
    pub critical_value: f64,
    /// Critical value of the path's uniform band.
    pub path_critical_value: f64,
    /// Instances used.
    pub n_instances: usize,
    /// Never-treated instances used.
    pub n_never: usize,
    /// Instances dropped because they were treated at the first checkpoint (no pre-period).
    pub n_dropped_no_pre: usize,
    /// Diagnostics of the identifying assumptions.
    pub diagnostics: crate::Diagnostics,
}

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

/// Standard errors and draws of a set of functionals.
pub(crate) struct Inference<'a> {
    pub cohorts: &'a Cohorts,
    pub sums: Option<&'a BootSums>,
}

impl Inference<'_> {
    /// Analytic SE of each functional, plus bootstrap SE when draws exist.
    pub fn std_errors(&self, funcs: &[Functional]) -> (Vec<f64>, Option<Vec<f64>>) {
        let analytic: Vec<f64> = funcs.par_iter().map(|f| f.variance(self.cohorts).sqrt()).collect();
        let boot = self.sums.map(|sums| {
            funcs
                .par_iter()
                .map_init(
                    || (vec![0.0; sums.draws], Vec::with_capacity(sums.draws)),
                    |(buf, scratch), f| {
                        f.draws(sums, buf);
                        iqr_se(buf, scratch)
                    },
                )
                .collect()
        });
        (analytic, boot)
    }

    /// The draws of `max_i |δ_i,b / se_i|` over the functionals with `include[i]` and a usable SE.
    pub fn sup_t_draws(&self, funcs: &[Functional], se: &[f64], include: &[bool]) -> Option<Vec<f64>> {
        let sums = self.sums?;
        let chosen: Vec<usize> = (0..funcs.len()).filter(|&i| include[i] && se[i].is_finite() && se[i] > 0.0).collect();
        if chosen.is_empty() {
            return None;
        }
        let max = chosen
            .par_iter()
            .fold(
                || (vec![0.0f64; sums.draws], vec![0.0; sums.draws]),
                |(mut acc, mut buf), &i| {
                    funcs[i].draws(sums, &mut buf);
                    let inv = 1.0 / se[i];
                    for (a, d) in acc.iter_mut().zip(&buf) {
                        *a = a.max((d * inv).abs());
                    }
                    (acc, buf)
                },
            )
            .map(|(acc, _)| acc)
            .reduce(|| vec![0.0; sums.draws], |a, b| a.iter().zip(&b).map(|(x, y)| x.max(*y)).collect());
        Some(max)
    }
}

/// Chooses the reported SE: bootstrap when available and usable, analytic otherwise.
fn pick(analytic: &[f64], boot: &Option<Vec<f64>>) -> Vec<f64> {
    match boot {
        Some(b) => b.iter().map(|&s| if s.is_finite() && s > 0.0 { s } else { f64::NAN }).collect(),
        None => analytic.to_vec(),
    }
}

/// Estimates the memorisation profile of `panel`.
pub fn estimate(panel: &Panel, cfg: &ValidConfig, progress: &dyn Progress) -> Result<Profile> {
    let needs_pre = cfg.estimator == Estimator::Did;
    let cohorts = Cohorts::new(panel, |k| !(needs_pre && k == Cohort::Treated(0)));
    let n_dropped_no_pre = panel.n_instances() - cohorts.keys.len();
    let n_never = cohorts.never().map_or(0, |k| cohorts.groups[k].n);
    if cfg.control == ControlGroup::Never && n_never == 0 {
        return Err(DidError::Panel(
            "the panel has no never-trained (validation) instances, which --control never needs; mark them with treatment_step `never` or use --control not-yet".into(),
        ));
    }
    if !cohorts.groups.iter().any(|g| g.cohort != Cohort::Never) {
        return Err(DidError::Panel(if n_dropped_no_pre > 0 {
            format!(
                "no treated cohort has a pre-treatment checkpoint: all {n_dropped_no_pre} treated instances were trained at or before the first checkpoint"
            )
        } else {
            "the panel has no trained instances: every treatment step is `never`".into()
        }));
    }
    if needs_pre && cohorts.c < 2 {
        return Err(DidError::Panel("difference-in-differences needs at least two checkpoints".into()));
    }
    let (specs, funcs, skipped) = build_cells(&cohorts, cfg);
    if specs.is_empty() {
        return Err(DidError::Panel("no cell has both treated and control instances".into()));
    }
    let sums = (cfg.bootstrap > 0).then(|| {
        progress.start("bootstrap", BootSums::n_tasks(&cohorts, cfg.bootstrap));
        let s = BootSums::compute(&cohorts, cfg.bootstrap, cfg.seed, cfg.multiplier, &|n| progress.advance(n));
        progress.finish();
        s
    });
    progress.start("cells", 1);
    let inf = Inference { cohorts: &cohorts, sums: sums.as_ref() };
    let steps = panel.grid().steps();
    let values: Vec<f64> = funcs.iter().map(|f| f.value(&cohorts)).collect();
    let (analytic, boot) = inf.std_errors(&funcs);
    let se = pick(&analytic, &boot);
    let z = normal_quantile(1.0 - cfg.alpha / 2.0);
    let in_band: Vec<bool> = specs.iter().map(|s| cfg.band_scope == BandScope::All || s.c >= s.g).collect();
    let sup_draws = inf.sup_t_draws(&funcs, &se, &in_band);
    let crit = match &sup_draws {
        Some(d) => quantile_inverted_cdf(&mut d.clone(), 1.0 - cfg.alpha),
        None => z,
    };
    let cells: Vec<CellEstimate> = specs
        .iter()
        .zip(&values)
        .zip(se.iter().zip(&analytic))
        .enumerate()
        .map(|(i, ((s, &est), (&se, &an)))| {
            let band = if in_band[i] { crit } else { z };
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
                band_lower: est - band * se,
                band_upper: est + band * se,
                n_treated: cohorts.groups[s.group].n,
                n_control: s.n_control,
                analytic_se: an,
            }
        })
        .collect();
    progress.finish();

    progress.start("aggregations", 1);
    let agg = crate::aggregate::aggregate(&cohorts, &specs, &funcs, &inf, cfg, steps);
    // The bootstrap sums are the largest buffer; the diagnostics do not need them.
    drop(sums);
    progress.finish();
    progress.start("diagnostics", 1);
    let diagnostics = crate::diagnostics::diagnose(
        &cohorts,
        &specs,
        &funcs,
        &values,
        &se,
        &agg,
        cfg,
        skipped,
        n_dropped_no_pre,
        steps,
    );
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
