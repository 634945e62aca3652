//! The public result types of an estimation: cells, path, summaries, diagnostics and the [`Profile`]
//! that holds them.
//!
//! They live in their own module so that the computing modules (`estimate`, `aggregate`,
//! `diagnostics`) depend on them, and not on each other, in a circle. Every type serialises with serde
//! and reads back: non-finite numbers become JSON `null`, and `null` reads back as NaN.

use serde::{Deserialize, Deserializer, Serialize};

/// Reads an `f64` written by serde_json, where NaN and infinities were written as `null`.
fn f64_or_nan<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

/// Where a reported standard error comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum StdErrorSource {
    /// Analytic (influence-function) standard error: no bootstrap draws were requested.
    #[default]
    Analytic,
    /// Robust bootstrap standard error (interquartile range of the draws).
    Bootstrap,
    /// The bootstrap standard error was unusable (zero or non-finite interquartile range, or fewer
    /// than [`crate::MIN_BOOTSTRAP_SE_DRAWS`] draws), so the analytic one is reported instead.
    AnalyticFallback,
}

impl StdErrorSource {
    /// Whether the analytic SE stands in for an unusable bootstrap SE.
    pub fn is_fallback(self) -> bool {
        self == StdErrorSource::AnalyticFallback
    }
}

/// One cell of the profile: the effect of being trained in cohort `g` on the outcome at checkpoint `c`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
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
    #[serde(deserialize_with = "f64_or_nan")]
    pub estimate: f64,
    /// Standard error (bootstrap when draws were made and usable, analytic otherwise; see `se_source`).
    #[serde(deserialize_with = "f64_or_nan")]
    pub std_error: f64,
    /// Pointwise interval.
    #[serde(deserialize_with = "f64_or_nan")]
    pub ci_lower: f64,
    /// Pointwise interval.
    #[serde(deserialize_with = "f64_or_nan")]
    pub ci_upper: f64,
    /// Uniform band (equals the pointwise interval without bootstrap).
    #[serde(deserialize_with = "f64_or_nan")]
    pub band_lower: f64,
    /// Uniform band.
    #[serde(deserialize_with = "f64_or_nan")]
    pub band_upper: f64,
    /// Treated instances.
    pub n_treated: usize,
    /// Control instances.
    pub n_control: usize,
    /// Analytic standard error (always computed).
    #[serde(deserialize_with = "f64_or_nan")]
    pub analytic_se: f64,
    /// Where `std_error` comes from.
    pub se_source: StdErrorSource,
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
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct PathEstimate {
    /// Event time `c − g` in checkpoint indices.
    pub event_time: i64,
    /// Point estimate.
    #[serde(deserialize_with = "f64_or_nan")]
    pub estimate: f64,
    /// Standard error.
    #[serde(deserialize_with = "f64_or_nan")]
    pub std_error: f64,
    /// Pointwise interval.
    #[serde(deserialize_with = "f64_or_nan")]
    pub ci_lower: f64,
    /// Pointwise interval.
    #[serde(deserialize_with = "f64_or_nan")]
    pub ci_upper: f64,
    /// Uniform band over the path.
    #[serde(deserialize_with = "f64_or_nan")]
    pub band_lower: f64,
    /// Uniform band over the path.
    #[serde(deserialize_with = "f64_or_nan")]
    pub band_upper: f64,
    /// Cohorts contributing.
    pub n_cohorts: usize,
    /// Where `std_error` comes from.
    pub se_source: StdErrorSource,
}

/// A scalar summary with its inference.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Aggregate {
    /// Point estimate.
    #[serde(deserialize_with = "f64_or_nan")]
    pub estimate: f64,
    /// Standard error.
    #[serde(deserialize_with = "f64_or_nan")]
    pub std_error: f64,
    /// Pointwise interval.
    #[serde(deserialize_with = "f64_or_nan")]
    pub ci_lower: f64,
    /// Pointwise interval.
    #[serde(deserialize_with = "f64_or_nan")]
    pub ci_upper: f64,
    /// Where `std_error` comes from.
    pub se_source: StdErrorSource,
}

/// Summaries of one cohort.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
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

/// Everything [`crate::estimate`] computes.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[non_exhaustive]
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
    #[serde(deserialize_with = "f64_or_nan")]
    pub critical_value: f64,
    /// Critical value of the path's uniform band.
    #[serde(deserialize_with = "f64_or_nan")]
    pub path_critical_value: f64,
    /// Instances used.
    pub n_instances: usize,
    /// Never-treated instances used.
    pub n_never: usize,
    /// Instances dropped because they were treated at the first checkpoint (no pre-period).
    pub n_dropped_no_pre: usize,
    /// Diagnostics of the identifying assumptions.
    pub diagnostics: Diagnostics,
}

/// Sup-t joint test that all pre-treatment cells are zero.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct SupTTest {
    /// max over pre-treatment cells of |estimate / se|.
    #[serde(deserialize_with = "f64_or_nan")]
    pub statistic: f64,
    /// Monte Carlo p-value `(1 + #{draws ≥ statistic}) / (draws + 1)`: never 0, and a valid level-α
    /// test for any number of reference draws.
    #[serde(deserialize_with = "f64_or_nan")]
    pub p_value: f64,
    /// Number of reference draws.
    pub draws: usize,
    /// Number of cells tested.
    pub n_cells: usize,
    /// Whether the test rejects at the configured α.
    pub rejects: bool,
}

/// A Wald χ² test.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct WaldTest {
    /// The statistic (absent when it could not be computed).
    pub statistic: Option<f64>,
    /// Degrees of freedom (number of estimates tested).
    pub df: usize,
    /// Upper-tail p-value.
    pub p_value: Option<f64>,
    /// Whether the χ² approximation can be trusted at this size.
    pub reliable: bool,
    /// Whether the test rejects at α (false when not computed).
    pub rejects: bool,
    /// Why it was not computed, or why not to trust it.
    pub note: Option<String>,
}

/// A single estimate tested against zero.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct PointTest {
    /// Event time of the estimate.
    pub event_time: i64,
    /// The estimate.
    #[serde(deserialize_with = "f64_or_nan")]
    pub estimate: f64,
    /// Its standard error.
    #[serde(deserialize_with = "f64_or_nan")]
    pub std_error: f64,
    /// Two-sided normal p-value.
    #[serde(deserialize_with = "f64_or_nan")]
    pub p_value: f64,
    /// What it checks.
    pub note: String,
}

/// Treated vs never-treated outcome levels at the first checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct BalanceCheck {
    /// The checkpoint step compared.
    pub checkpoint: u64,
    /// Mean outcome of treated instances.
    #[serde(deserialize_with = "f64_or_nan")]
    pub treated_mean: f64,
    /// Mean outcome of never-treated instances.
    #[serde(deserialize_with = "f64_or_nan")]
    pub never_mean: f64,
    /// Difference (treated − never).
    #[serde(deserialize_with = "f64_or_nan")]
    pub difference: f64,
    /// Welch standard error of the difference.
    #[serde(deserialize_with = "f64_or_nan")]
    pub std_error: f64,
    /// Two-sided p-value.
    #[serde(deserialize_with = "f64_or_nan")]
    pub p_value: f64,
    /// What it means.
    pub note: String,
}

/// Standard errors that fell back from the bootstrap to the analytic formula.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct SeFallback {
    /// Why (e.g. "zero interquartile range of the draws").
    pub reason: Option<String>,
    /// Cells that fell back, as (cohort step, checkpoint step).
    pub cells: Vec<(u64, u64)>,
    /// Path points that fell back, by event time.
    pub path: Vec<i64>,
    /// Summaries (instantaneous, persistent, residual, per cohort) that fell back.
    pub summaries: usize,
}

impl SeFallback {
    /// Whether nothing fell back.
    pub fn is_empty(&self) -> bool {
        self.cells.is_empty() && self.path.is_empty() && self.summaries == 0
    }
}

/// All diagnostics of one estimation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Diagnostics {
    /// Sup-t pre-trend test.
    pub pretrend_sup_t: Option<SupTTest>,
    /// Wald test on the pre-period path.
    pub pretrend_path_wald: Option<WaldTest>,
    /// Cell-level Wald pre-test, as csdid / R `did` report it.
    pub pretrend_cell_wald: Option<WaldTest>,
    /// The estimate just before treatment.
    pub anticipation: Option<PointTest>,
    /// Baseline level balance.
    pub baseline_balance: Option<BalanceCheck>,
    /// Cohorts smaller than the configured minimum: (cohort step, size).
    pub small_cohorts: Vec<(u64, usize)>,
    /// Cells that could not be estimated for lack of controls.
    pub skipped_cells: usize,
    /// Estimates whose bootstrap SE was unusable and were given the analytic SE instead.
    #[serde(default)]
    pub se_fallback: SeFallback,
    /// Human-readable warnings.
    pub warnings: Vec<String>,
}
