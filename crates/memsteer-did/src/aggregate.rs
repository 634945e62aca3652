//! Aggregations of cells: the path by event time and the instantaneous, persistent and residual
//! summaries, overall and per cohort. Each is a linear functional of the cells, so its inference comes
//! from the same influence functions and bootstrap draws.
//!
//! Weights are cohort sizes, treated as fixed by design (each training batch contributes a fixed number
//! of instances); unlike R `did`'s `aggte` no weight-estimation term is added.

use std::collections::BTreeMap;

use memsteer_panel::Cohort;

use crate::cells::CellSpec;
use crate::functional::Functional;
use crate::inference::{BandSet, Inference};
use crate::prepare::Cohorts;
use crate::types::{Aggregate, CohortSummary, PathEstimate};
use crate::{BandScope, ValidConfig};

pub(crate) struct Aggregates {
    pub path: Vec<PathEstimate>,
    pub path_funcs: Vec<Functional>,
    pub instantaneous: Option<Aggregate>,
    pub persistent: Option<Aggregate>,
    pub residual: Option<Aggregate>,
    pub per_cohort: Vec<CohortSummary>,
    pub path_crit: f64,
    /// Summaries whose bootstrap SE fell back to the analytic one.
    pub n_summary_fallbacks: usize,
}

/// Weighted average of cell functionals; `None` when `items` is empty.
fn average(items: &[(f64, &Functional)]) -> Option<Functional> {
    let total: f64 = items.iter().map(|(w, _)| w).sum();
    if items.is_empty() || total <= 0.0 {
        return None;
    }
    let mut f = Functional::default();
    for (w, g) in items {
        f.add_scaled(g, w / total);
    }
    Some(f)
}

/// The path's functionals: event times, cells per event time and the cohort-size weighted averages.
pub(crate) fn path_functionals(
    cohorts: &Cohorts,
    specs: &[CellSpec],
    funcs: &[Functional],
) -> (Vec<i64>, Vec<usize>, Vec<Functional>) {
    let weight = |s: &CellSpec| cohorts.groups[s.group].n as f64;
    let mut by_event: BTreeMap<i64, Vec<(f64, &Functional)>> = BTreeMap::new();
    for (s, f) in specs.iter().zip(funcs) {
        by_event.entry(s.c as i64 - s.g as i64).or_default().push((weight(s), f));
    }
    let events: Vec<i64> = by_event.keys().copied().collect();
    let counts: Vec<usize> = by_event.values().map(Vec::len).collect();
    let path_funcs: Vec<Functional> = by_event.values().filter_map(|v| average(v)).collect();
    (events, counts, path_funcs)
}

/// Whether the band covers event time `e`.
pub(crate) fn path_in_band(cfg: &ValidConfig, e: i64) -> bool {
    cfg.band_scope == BandScope::All || e >= 0
}

pub(crate) fn aggregate(
    cohorts: &Cohorts,
    specs: &[CellSpec],
    funcs: &[Functional],
    inf: &Inference<'_>,
    cfg: &ValidConfig,
    steps: &[u64],
) -> crate::Result<Aggregates> {
    let last = cohorts.c - 1;
    let weight = |s: &CellSpec| cohorts.groups[s.group].n as f64;

    // Path by event time.
    let (events, counts, path_funcs) = path_functionals(cohorts, specs, funcs);
    let path_stats = inf.summarise(&path_funcs, cfg.alpha);
    let include: Vec<bool> = events.iter().map(|&e| path_in_band(cfg, e)).collect();
    let path_ses = inf.std_errors(&path_funcs);
    let (path_widths, path_crit) =
        inf.band(&path_funcs, &path_ses, &include, (cfg.alpha, cfg.band_method, BandSet::Path))?;
    let path: Vec<PathEstimate> = events
        .iter()
        .zip(&path_stats)
        .zip(&counts)
        .zip(&path_widths)
        .map(|(((&e, a), &n), &width)| PathEstimate {
            event_time: e,
            estimate: a.estimate,
            std_error: a.std_error,
            ci_lower: a.ci_lower,
            ci_upper: a.ci_upper,
            band_lower: a.estimate - width,
            band_upper: a.estimate + width,
            n_cohorts: n,
            se_source: a.se_source,
        })
        .collect();

    // Overall summaries.
    let mut overall: Vec<Functional> = Vec::new();
    let mut slot = |f: Option<Functional>| {
        f.map(|f| {
            overall.push(f);
            overall.len() - 1
        })
    };
    let inst_slot = slot(events.iter().position(|&e| e == 0).map(|i| path_funcs[i].clone()));
    let post: Vec<(f64, &Functional)> =
        events.iter().zip(&path_funcs).filter(|(e, _)| **e > 0).map(|(_, f)| (1.0, f)).collect();
    let pers_slot = slot(average(&post));
    let resid: Vec<(f64, &Functional)> =
        specs.iter().zip(funcs).filter(|(s, _)| s.c == last && s.c >= s.g).map(|(s, f)| (weight(s), f)).collect();
    let resid_slot = slot(average(&resid));

    // Per cohort.
    let mut cohort_slots = Vec::new();
    for (k, grp) in cohorts.groups.iter().enumerate() {
        let Cohort::Treated(g) = grp.cohort else { continue };
        let cells: Vec<(&CellSpec, &Functional)> = specs.iter().zip(funcs).filter(|(s, _)| s.group == k).collect();
        let inst = cells.iter().find(|(s, _)| s.c == g).map(|(_, f)| (*f).clone());
        let later: Vec<(f64, &Functional)> = cells.iter().filter(|(s, _)| s.c > g).map(|(_, f)| (1.0, *f)).collect();
        let res = cells.iter().find(|(s, _)| s.c == last && last >= g).map(|(_, f)| (*f).clone());
        cohort_slots.push((steps[g], grp.n, slot(inst), slot(average(&later)), slot(res)));
    }
    let stats = inf.summarise(&overall, cfg.alpha);
    let n_summary_fallbacks = stats.iter().filter(|a| a.se_source.is_fallback()).count();
    let get = |s: Option<usize>| s.map(|i| stats[i]);
    Ok(Aggregates {
        path,
        path_funcs,
        instantaneous: get(inst_slot),
        persistent: get(pers_slot),
        residual: get(resid_slot),
        per_cohort: cohort_slots
            .into_iter()
            .map(|(cohort, n, a, b, c)| CohortSummary {
                cohort,
                n,
                instantaneous: get(a),
                persistent: get(b),
                residual: get(c),
            })
            .collect(),
        path_crit,
        n_summary_fallbacks,
    })
}
