//! Checks of the identifying assumptions (parallel trends, no anticipation) and of the data.
//!
//! The cell-level Wald pre-test of csdid / R `did` over-rejects badly when there are thousands of
//! pre-treatment cells: its covariance is estimated from the same instances and the χ² approximation
//! needs far fewer cells than instances. Two tests that keep their size at that scale come first:
//! a sup-t test calibrated by the multiplier-bootstrap draws, and a Wald test on the event-time
//! aggregated pre-period path (one degree of freedom per pre-period event time).

use crate::BasePeriod;
use crate::ValidConfig;
use crate::aggregate::Aggregates;
use crate::cells::CellSpec;
use crate::functional::Functional;
use crate::prepare::Cohorts;
use crate::stats::{chi2_sf, cholesky_solve, normal_two_sided_p};
use crate::types::{BalanceCheck, Diagnostics, PointTest, SeFallback, SupTTest, WaldTest};
use memsteer_panel::Cohort;

fn wald<'c>(
    funcs: &[&Functional],
    values: &[f64],
    cohorts: &'c Cohorts,
    cov_of: &(dyn Fn(usize) -> &'c [f64] + Sync),
    alpha: f64,
) -> (Option<f64>, Option<f64>, bool, Option<String>) {
    let p = funcs.len();
    let mut cov = vec![0.0; p * p];
    let rows: Vec<Vec<f64>> = {
        use rayon::prelude::*;
        (0..p)
            .into_par_iter()
            .map(|i| (0..=i).map(|j| funcs[i].covariance_with(funcs[j], cohorts, cov_of)).collect())
            .collect()
    };
    for (i, row) in rows.iter().enumerate() {
        for (j, &v) in row.iter().enumerate() {
            cov[i * p + j] = v;
            cov[j * p + i] = v;
        }
    }
    match cholesky_solve(&cov, values) {
        Some(x) => {
            let stat: f64 = x.iter().zip(values).map(|(a, b)| a * b).sum();
            let pv = chi2_sf(stat, p);
            (Some(stat), Some(pv), pv < alpha, None)
        }
        None => (
            None,
            None,
            false,
            Some("the covariance of the pre-treatment estimates is singular; the Wald statistic is undefined".into()),
        ),
    }
}

/// Variance of a pre-treatment functional with each treated cohort's covariance pooled over all treated
/// cohorts untreated at the block's latest checkpoint (unbiased within-cohort estimates), and its
/// Welch–Satterthwaite degrees of freedom.
fn horizon_pooled_variance(f: &Functional, cohorts: &Cohorts) -> (f64, f64) {
    let c = cohorts.c;
    let (mut total, mut df_denominator) = (0.0, 0.0);
    for b in &f.blocks {
        let g = &cohorts.groups[b.group];
        let horizon = b.terms.iter().map(|t| t.0).max().unwrap_or(0);
        let pool: Vec<&crate::prepare::Group> = match g.cohort {
            Cohort::Never => vec![g],
            Cohort::Treated(_) => {
                cohorts.groups.iter().filter(|h| h.cohort.index().is_some_and(|gh| gh > horizon)).collect()
            }
        };
        let n_pool: usize = pool.iter().map(|h| h.n).sum();
        let df = n_pool.saturating_sub(pool.len()).max(1) as f64;
        let mut quad = 0.0;
        for &(t1, w1) in &b.terms {
            for &(t2, w2) in &b.terms {
                let entry: f64 = pool.iter().map(|h| h.n as f64 * h.cov[t1 * c + t2]).sum::<f64>() / df;
                quad += w1 * w2 * entry;
            }
        }
        let part = g.n as f64 * (quad + b.offset * b.offset);
        total += part;
        df_denominator += part * part / df;
    }
    let total = total.max(0.0);
    let df = if df_denominator > 0.0 { total * total / df_denominator } else { f64::INFINITY };
    (total, df)
}

/// The Monte Carlo p-value `(1 + #{draws ≥ statistic}) / (B + 1)` of a statistic against `B` reference
/// draws: the observed statistic counts as one draw, so the p-value is never 0 and the test has level
/// at most α for any `B` when the draws are exchangeable with it.
pub(crate) fn monte_carlo_p_value(draws: &[f64], statistic: f64) -> f64 {
    let at_least = draws.iter().filter(|&&d| d >= statistic).count();
    (1 + at_least) as f64 / (draws.len() + 1) as f64
}

/// The standard-normal score with the same tail probability as `t` under Student's t with `df`.
fn normal_score(t: f64, df: f64) -> f64 {
    use statrs::distribution::{ContinuousCDF, Normal, StudentsT};
    if !df.is_finite() || df > 1e7 {
        return t;
    }
    let Ok(dist) = StudentsT::new(0.0, 1.0, df) else { return t };
    let tail = dist.sf(t.abs());
    if tail.is_nan() || tail <= 0.0 {
        return t;
    }
    let z = -Normal::standard().inverse_cdf(tail);
    z.copysign(t)
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn diagnose(
    cohorts: &Cohorts,
    specs: &[CellSpec],
    funcs: &[Functional],
    values: &[f64],
    analytic_se: &[f64],
    agg: &Aggregates,
    cfg: &ValidConfig,
    skipped: usize,
    dropped_no_pre: usize,
    steps: &[u64],
    se_fallback: SeFallback,
) -> crate::Result<Diagnostics> {
    let mut warnings = Vec::new();
    let alpha = cfg.alpha;
    let is_pre: Vec<bool> = specs.iter().map(|s| s.c < s.g).collect();
    let n_pre = is_pre.iter().filter(|&&p| p).count();

    // Pre-trend tests standardise by SEs whose treated-cohort parts use covariances pooled over cohorts
    // that are still untreated (see `Cohorts::pooled_pre_treatment_covs`). A small cohort's own SE is
    // noisy, and a maximum (or quadratic form) over thousands of cells picks the cells whose SE came out
    // too small: with 20 instances per cohort and ~1,800 pre-treatment cells the sup-t test rejected a
    // true null in 28 of 30 runs with each cell's own SE. For the sup-t test each cell pools over every
    // cohort untreated at its latest checkpoint, and its t statistic is mapped to the normal score with
    // the same tail probability (Welch–Satterthwaite degrees of freedom): late cells pool few cohorts,
    // and even 100 degrees of freedom double the tail probability at the 4.2 a maximum over 1,800 cells
    // reaches. The reference draws are Gaussian (see `gaussian`). The path Wald test needs one positive
    // semi-definite covariance, so there each cohort pools over itself and later cohorts.
    let pre_var: Vec<(f64, f64)> = (0..specs.len())
        .map(|i| {
            if is_pre[i] {
                horizon_pooled_variance(&funcs[i], cohorts)
            } else {
                (analytic_se[i].powi(2), f64::INFINITY)
            }
        })
        .collect();
    let pre_se: Vec<f64> = pre_var.iter().map(|v| v.0.sqrt()).collect();
    let pooled = cohorts.pooled_pre_treatment_covs();
    let cov_of = |k: usize| -> &[f64] { pooled[k].as_deref().unwrap_or(&cohorts.groups[k].cov) };
    let pretrend_sup_t = if n_pre == 0 {
        None
    } else {
        let draws = if cfg.bootstrap > 0 { cfg.bootstrap } else { 1000 };
        let gauss = crate::gaussian::GaussianSums::draw(cohorts, &pooled, draws, cfg.seed)?;
        let pre: Vec<usize> = (0..specs.len()).filter(|&i| is_pre[i]).collect();
        let pre_funcs: Vec<&Functional> = pre.iter().map(|&i| &funcs[i]).collect();
        let pre_ses: Vec<f64> = pre.iter().map(|&i| pre_se[i]).collect();
        Some(gauss.sup_t(&pre_funcs, &pre_ses)).map(|draws| {
            let statistic = (0..specs.len())
                .filter(|&i| is_pre[i] && pre_se[i].is_finite() && pre_se[i] > 0.0)
                .map(|i| normal_score(values[i] / pre_se[i], pre_var[i].1).abs())
                .fold(0.0, f64::max);
            let p_value = monte_carlo_p_value(&draws, statistic);
            SupTTest { statistic, p_value, draws: draws.len(), n_cells: n_pre, rejects: p_value <= alpha }
        })
    };
    if n_pre == 0 {
        warnings.push("no pre-treatment cells: parallel trends cannot be checked".into());
    }

    // Wald on the pre-period path.
    let window = cfg.pretrend_window as i64;
    let path_pre: Vec<usize> =
        (0..agg.path.len()).filter(|&i| agg.path[i].event_time < 0 && agg.path[i].event_time >= -window).collect();
    let pretrend_path_wald = (!path_pre.is_empty()).then(|| {
        let f: Vec<&Functional> = path_pre.iter().map(|&i| &agg.path_funcs[i]).collect();
        let v: Vec<f64> = path_pre.iter().map(|&i| agg.path[i].estimate).collect();
        let (statistic, p_value, rejects, note) = wald(&f, &v, cohorts, &cov_of, alpha);
        WaldTest { statistic, df: f.len(), p_value, reliable: true, rejects, note }
    });

    // Cell-level Wald, for parity with csdid.
    let n_units = cohorts.keys.len();
    let pretrend_cell_wald = (n_pre > 0).then(|| {
        let df = n_pre;
        let reliable = (df * df) as f64 <= n_units as f64;
        if df > cfg.max_wald_cells {
            return WaldTest {
                statistic: None,
                df,
                p_value: None,
                reliable: false,
                rejects: false,
                note: Some(format!(
                    "not computed: {df} pre-treatment cells exceed the limit of {}; at this size the cell-level χ² test over-rejects, use the sup-t or path tests",
                    cfg.max_wald_cells
                )),
            };
        }
        let f: Vec<&Functional> = (0..specs.len()).filter(|&i| is_pre[i]).map(|i| &funcs[i]).collect();
        let v: Vec<f64> = (0..specs.len()).filter(|&i| is_pre[i]).map(|i| values[i]).collect();
        let (statistic, p_value, rejects, mut note) = wald(&f, &v, cohorts, &|k| &cohorts.groups[k].cov, alpha);
        if !reliable && note.is_none() {
            note = Some(format!(
                "{df} pre-treatment cells from {n_units} instances: the χ² approximation needs df² ≤ instances and over-rejects here; rely on the sup-t or path tests"
            ));
        }
        WaldTest { statistic, df, p_value, reliable, rejects, note }
    });

    // Anticipation: the path just before treatment.
    let anticipation_e = match (cfg.estimator, cfg.base_period) {
        (crate::Estimator::Did, BasePeriod::Universal) => -2,
        _ => -1,
    };
    let anticipation = agg.path.iter().find(|p| p.event_time == anticipation_e).map(|p| PointTest {
        event_time: p.event_time,
        estimate: p.estimate,
        std_error: p.std_error,
        p_value: normal_two_sided_p(p.estimate / p.std_error),
        note: if anticipation_e == -1 {
            "change between the two checkpoints before treatment; non-zero suggests anticipation (or a trend)".into()
        } else {
            "with a universal base the e = −1 cell is the reference; e = −2 tests the last pre-treatment change (sign flipped)".into()
        },
    });

    // Baseline balance at the first checkpoint.
    let baseline_balance = cohorts.never().map(|nv| {
        let (mut t_sum, mut t_sq, mut t_n) = (0.0, 0.0, 0usize);
        let (mut v_sum, mut v_sq) = (0.0, 0.0);
        let shift = cohorts.groups[nv].mean[0];
        for (k, g) in cohorts.groups.iter().enumerate() {
            for &y in &cohorts.first[g.start..g.start + g.n] {
                let d = y - shift;
                if k == nv {
                    v_sum += d;
                    v_sq += d * d;
                } else {
                    t_sum += d;
                    t_sq += d * d;
                    t_n += 1;
                }
            }
        }
        let v_n = cohorts.groups[nv].n;
        let var = |s: f64, q: f64, n: usize| if n > 1 { (q - s * s / n as f64) / (n as f64 - 1.0) } else { 0.0 };
        let tm = t_sum / t_n.max(1) as f64;
        let vm = v_sum / v_n as f64;
        let se = (var(t_sum, t_sq, t_n) / t_n.max(1) as f64 + var(v_sum, v_sq, v_n) / v_n as f64).sqrt();
        let difference = tm - vm;
        BalanceCheck {
            checkpoint: steps[0],
            treated_mean: tm + shift,
            never_mean: vm + shift,
            difference,
            std_error: se,
            p_value: if se > 0.0 { normal_two_sided_p(difference / se) } else { f64::NAN },
            note: "a level difference biases the difference estimator; difference-in-differences removes it".into(),
        }
    });

    let small_cohorts: Vec<(u64, usize)> = cohorts
        .groups
        .iter()
        .filter_map(|g| match g.cohort {
            Cohort::Treated(i) if g.n < cfg.min_cohort_size => Some((steps[i], g.n)),
            _ => None,
        })
        .collect();
    if !small_cohorts.is_empty() {
        warnings.push(format!(
            "{} cohorts have fewer than {} instances (smallest: {} at step {}); their cells are noisy",
            small_cohorts.len(),
            cfg.min_cohort_size,
            small_cohorts.iter().map(|c| c.1).min().unwrap_or(0),
            small_cohorts.iter().min_by_key(|c| c.1).map_or(0, |c| c.0)
        ));
    }
    if let Some(nv) = cohorts.never()
        && cohorts.groups[nv].n < cfg.min_cohort_size
    {
        warnings.push(format!("only {} never-trained instances serve as controls", cohorts.groups[nv].n));
    }
    if dropped_no_pre > 0 {
        warnings.push(format!(
            "dropped {dropped_no_pre} instances trained at or before the first checkpoint ({}): they have no pre-treatment period",
            steps[0]
        ));
    }
    if skipped > 0 {
        warnings.push(format!("{skipped} cells have no control instances and were not estimated"));
    }
    if let Some(t) = &pretrend_sup_t
        && t.rejects
    {
        warnings.push(format!(
            "the sup-t pre-trend test rejects (p = {:.4}): parallel trends or no anticipation look violated",
            t.p_value
        ));
    }
    if let Some(t) = &pretrend_path_wald
        && t.rejects
    {
        warnings.push(format!(
            "the pre-period path Wald test rejects (p = {:.4}): parallel trends look violated",
            t.p_value.unwrap_or(f64::NAN)
        ));
    }
    if let Some(b) = &baseline_balance
        && cfg.estimator == crate::Estimator::Difference
        && b.p_value < alpha
    {
        warnings.push(format!(
            "treated and never-trained instances differ by {:.4} at the first checkpoint (p = {:.2e}): the difference estimator is biased by about that much; use difference-in-differences",
            b.difference, b.p_value
        ));
    }
    if !se_fallback.is_empty() {
        warnings.push(format!(
            "{} cells, {} path points and {} summaries report the analytic standard error because {}",
            se_fallback.cells.len(),
            se_fallback.path.len(),
            se_fallback.summaries,
            se_fallback.reason.as_deref().unwrap_or("their bootstrap standard error was unusable")
        ));
    }
    Ok(Diagnostics {
        pretrend_sup_t,
        pretrend_path_wald,
        pretrend_cell_wald,
        anticipation,
        baseline_balance,
        small_cohorts,
        skipped_cells: skipped,
        se_fallback,
        warnings,
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn monte_carlo_p_value_counts_the_observed_statistic() {
        let draws = [0.5, 1.0, 2.0, 3.0];
        // Two of four draws reach 2.0: (1 + 2) / 5.
        assert_eq!(super::monte_carlo_p_value(&draws, 2.0), 0.6);
        // A statistic beyond every draw gets 1 / (B + 1), never 0.
        assert_eq!(super::monte_carlo_p_value(&draws, 10.0), 0.2);
        assert_eq!(super::monte_carlo_p_value(&draws, 0.0), 1.0);
    }
}
