//! Standard errors, bootstrap draws and sup-t critical values of sets of functionals.

use rayon::prelude::*;

use crate::bootstrap::{BootSums, iqr_se};
use crate::functional::Functional;
use crate::prepare::Cohorts;
use crate::stats::normal_quantile;
use crate::types::{Aggregate, StdErrorSource};

/// Fewer bootstrap draws than this give no robust (IQR) standard error: the analytic one is reported,
/// flagged as [`StdErrorSource::AnalyticFallback`]. Bands and the sup-t critical value still use the draws.
pub const MIN_BOOTSTRAP_SE_DRAWS: usize = 50;

/// Standard errors of a set of functionals and where each comes from.
#[derive(Debug, Clone)]
pub(crate) struct StdErrors {
    /// The reported SE: bootstrap when usable, analytic otherwise.
    pub se: Vec<f64>,
    /// The analytic SE.
    pub analytic: Vec<f64>,
    /// Where each `se` comes from.
    pub source: Vec<StdErrorSource>,
}

/// Chooses the reported SE: the bootstrap SE when draws exist and it is finite and positive, the
/// analytic SE otherwise (flagged as a fallback when draws were made).
pub(crate) fn pick(analytic: f64, boot: Option<f64>) -> (f64, StdErrorSource) {
    match boot {
        None => (analytic, StdErrorSource::Analytic),
        Some(b) if b.is_finite() && b > 0.0 => (b, StdErrorSource::Bootstrap),
        Some(_) => (analytic, StdErrorSource::AnalyticFallback),
    }
}

/// Standard errors and draws of a set of functionals.
pub(crate) struct Inference<'a> {
    pub cohorts: &'a Cohorts,
    pub sums: Option<&'a BootSums>,
}

impl Inference<'_> {
    /// Analytic SE of each functional and, when draws exist, the robust bootstrap SE where usable.
    pub fn std_errors(&self, funcs: &[Functional]) -> StdErrors {
        let analytic: Vec<f64> = funcs.par_iter().map(|f| f.variance(self.cohorts).sqrt()).collect();
        let boot: Option<Vec<f64>> = self.sums.map(|sums| {
            if sums.draws < MIN_BOOTSTRAP_SE_DRAWS {
                return vec![f64::NAN; funcs.len()];
            }
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
        let (se, source) = analytic.iter().enumerate().map(|(i, &a)| pick(a, boot.as_ref().map(|b| b[i]))).unzip();
        StdErrors { se, analytic, source }
    }

    /// Why bootstrap SEs fell back to analytic ones, for the diagnostics.
    pub fn fallback_reason(&self) -> Option<String> {
        let sums = self.sums?;
        Some(if sums.draws < MIN_BOOTSTRAP_SE_DRAWS {
            format!(
                "{} bootstrap draws are fewer than the {MIN_BOOTSTRAP_SE_DRAWS} a robust (interquartile-range) standard error needs",
                sums.draws
            )
        } else {
            "the interquartile range of the bootstrap draws is zero or not finite (tiny cohorts or constant outcomes)"
                .into()
        })
    }

    /// Estimate, SE and pointwise interval of each functional.
    pub fn summarise(&self, funcs: &[Functional], alpha: f64) -> Vec<Aggregate> {
        let ses = self.std_errors(funcs);
        let z = normal_quantile(1.0 - alpha / 2.0);
        funcs
            .iter()
            .enumerate()
            .map(|(i, f)| {
                let estimate = f.value(self.cohorts);
                let se = ses.se[i];
                Aggregate {
                    estimate,
                    std_error: se,
                    ci_lower: estimate - z * se,
                    ci_upper: estimate + z * se,
                    se_source: ses.source[i],
                }
            })
            .collect()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unusable_bootstrap_se_falls_back_to_the_analytic_one() {
        assert_eq!(pick(0.5, None), (0.5, StdErrorSource::Analytic));
        assert_eq!(pick(0.5, Some(0.4)), (0.4, StdErrorSource::Bootstrap));
        for bad in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            assert_eq!(pick(0.5, Some(bad)), (0.5, StdErrorSource::AnalyticFallback), "bootstrap SE {bad}");
        }
    }
}
