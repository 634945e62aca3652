//! Standard errors, bootstrap draws and sup-t critical values of sets of functionals.

use rayon::prelude::*;

use crate::bootstrap::{BootSums, iqr_se, quantile_inverted_cdf};
use crate::config::BandMethod;
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
    /// Seed of the Gaussian draws of [`BandMethod::Student`] bands (the same draws for cells and path).
    pub seed: u64,
    /// Those bands' sup-t draws of the cells and of the path, made in one pass
    /// ([`Inference::prepare_student_bands`]).
    pub student_draws: std::sync::OnceLock<[Option<Vec<f64>>; 2]>,
}

/// Which band [`Inference::band`] makes (the cells' and the path's share their Gaussian draws).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BandSet {
    Cells = 0,
    Path = 1,
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

    /// Half-widths of the uniform band of `funcs` over the functionals with `include[i]` (the others get
    /// the pointwise `z · se`), and the sup-t critical value on the normal scale. [`BandMethod::Csdid`]:
    /// one quantile of the multiplier draws studentised by the reported SEs, times those SEs.
    /// [`BandMethod::Student`]: as many Gaussian draws with the panel's own covariances (the multiplier
    /// bootstrap's limit, from `self.seed`), studentised by the analytic SEs, which their variance
    /// equals; their quantile `c` is read as the normal tail `p = 2(1 − Φ(c))`, and each functional's
    /// half-width is the Student-t quantile `t_{ν_i}(1 − p/2)` at its kurtosis-matched degrees of
    /// freedom `ν_i` (`functional::student_df`), times its SE from unbiased variances, and never less
    /// than the pointwise `z · se`.
    /// Without draws the band is the pointwise interval.
    pub fn band(
        &self,
        funcs: &[Functional],
        ses: &StdErrors,
        include: &[bool],
        (alpha, method, set): (f64, BandMethod, BandSet),
    ) -> crate::Result<(Vec<f64>, f64)> {
        let z = normal_quantile(1.0 - alpha / 2.0);
        let student: Vec<(f64, f64)> = match method {
            BandMethod::Csdid => Vec::new(),
            BandMethod::Student => funcs.par_iter().map(|f| f.student_t(self.cohorts)).collect(),
        };
        // The draws' own scale: the reported SEs (csdid) or the analytic ones, which the multiplier
        // bootstrap's variance equals (population variances), so that the studentised draws are standard
        // normal scores.
        let scale = match method {
            BandMethod::Csdid => &ses.se,
            BandMethod::Student => &ses.analytic,
        };
        let draws = match (method, self.sums) {
            (_, None) => None,
            (BandMethod::Csdid, Some(_)) => self.sup_t_draws(funcs, scale, include),
            (BandMethod::Student, Some(_)) => match self.student_draws.get() {
                Some(prepared) => prepared[set as usize].clone(),
                None => self.student_sup_t(&[(funcs, scale, include)])?.pop().flatten(),
            },
        };
        let Some(mut draws) = draws else {
            return Ok((ses.se.iter().map(|s| z * s).collect(), z));
        };
        let crit = quantile_inverted_cdf(&mut draws, 1.0 - alpha);
        let widths = (0..funcs.len())
            .map(|i| {
                if !include[i] {
                    return z * ses.se[i];
                }
                match method {
                    BandMethod::Csdid => crit * ses.se[i],
                    // Never narrower than the cell's own pointwise interval.
                    BandMethod::Student => {
                        (student_critical(crit, student[i].1) * student[i].0.sqrt()).max(z * ses.se[i])
                    }
                }
            })
            .collect();
        Ok((widths, crit))
    }

    /// Makes the Student bands' sup-t draws of the cells and of the path (`(functionals, analytic SEs,
    /// included)` each) in one pass over the Gaussian draws, for [`Inference::band`].
    pub fn prepare_student_bands(
        &self,
        cells: (&[Functional], &[f64], &[bool]),
        path: (&[Functional], &[f64], &[bool]),
    ) -> crate::Result<()> {
        if self.sums.is_some() && self.student_draws.get().is_none() {
            let mut draws = self.student_sup_t(&[cells, path])?.into_iter();
            let _ = self.student_draws.set([draws.next().flatten(), draws.next().flatten()]);
        }
        Ok(())
    }

    /// For each set, the Gaussian sup-t draws over its included functionals with a usable SE (`None`
    /// when there is none, or no draws are made).
    fn student_sup_t(&self, sets: &[(&[Functional], &[f64], &[bool])]) -> crate::Result<Vec<Option<Vec<f64>>>> {
        let Some(sums) = self.sums else { return Ok(vec![None; sets.len()]) };
        let chosen: Vec<Vec<usize>> = sets
            .iter()
            .map(|(f, se, inc)| (0..f.len()).filter(|&i| inc[i] && se[i].is_finite() && se[i] > 0.0).collect())
            .collect();
        let fs: Vec<Vec<&Functional>> =
            sets.iter().zip(&chosen).map(|((f, _, _), c)| c.iter().map(|&i| &f[i]).collect()).collect();
        let ses: Vec<Vec<f64>> =
            sets.iter().zip(&chosen).map(|((_, s, _), c)| c.iter().map(|&i| s[i]).collect()).collect();
        let active: Vec<usize> = (0..sets.len()).filter(|&k| !chosen[k].is_empty()).collect();
        let pairs: Vec<(&[&Functional], &[f64])> = active.iter().map(|&k| (&fs[k][..], &ses[k][..])).collect();
        let mut out = vec![None; sets.len()];
        if !pairs.is_empty() {
            let draws = crate::gaussian::GaussianSums::sup_t_full(self.cohorts, &pairs, sums.draws, self.seed)?;
            for (k, d) in active.into_iter().zip(draws) {
                out[k] = Some(d);
            }
        }
        Ok(out)
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

/// The Student-t quantile with `df` degrees of freedom whose two-sided tail equals that of the normal
/// quantile `c` (`c` itself for infinite or unusable `df`).
pub(crate) fn student_critical(c: f64, df: f64) -> f64 {
    use statrs::distribution::{ContinuousCDF, Normal, StudentsT};
    if !c.is_finite() || !df.is_finite() || df > 1e7 {
        return c;
    }
    let tail = Normal::standard().sf(c);
    let Ok(t) = StudentsT::new(0.0, 1.0, df.max(1.0)) else { return c };
    if tail.is_nan() || tail <= 0.0 {
        return c;
    }
    let q = -t.inverse_cdf(tail);
    if q.is_finite() { q.max(c) } else { c }
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

    /// The Student critical value has the normal one's two-sided tail: t₁₀(0.975) = 2.2281388 for
    /// c = Φ⁻¹(0.975), t₃₀(0.9995) = 3.6459586 for c = Φ⁻¹(0.9995) (scipy `t.ppf`); infinite df gives c back.
    #[test]
    fn student_critical_values_in_closed_form() {
        let c = normal_quantile(0.975);
        assert!((student_critical(c, 10.0) - 2.228_138_851_986_274).abs() < 1e-9);
        let c = normal_quantile(0.9995);
        assert!((student_critical(c, 30.0) - 3.645_958_635_042_063).abs() < 1e-8);
        assert_eq!(student_critical(c, f64::INFINITY), c);
        assert!(student_critical(c, 1e9) == c);
        // Never below the normal value.
        for df in [1.0, 2.5, 7.0, 100.0, 1e6] {
            assert!(student_critical(c, df) >= c, "df {df}");
        }
    }
}
