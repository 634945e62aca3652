//! Estimation settings, validated once.

use crate::{DidError, Result};

/// Which estimator of τ(g, c).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum Estimator {
    /// Difference-in-differences `(Ȳ_c(g) − Ȳ_b(g)) − (Ȳ_c(C) − Ȳ_b(C))` (the paper's Estimator 2).
    #[default]
    Did,
    /// Difference `Ȳ_c(g) − Ȳ_c(C)` (the paper's Estimator 1); biased when levels differ at baseline.
    Difference,
}

/// Which instances serve as controls.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum ControlGroup {
    /// Never-trained (validation) instances only.
    #[default]
    Never,
    /// Never-trained instances plus cohorts not yet trained at both periods of the comparison.
    NotYet,
}

/// Base period of DiD comparisons.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum BasePeriod {
    /// Post-treatment cells compare with `g − 1`; pre-treatment cells with the previous checkpoint
    /// (csdid's and R `did`'s default).
    #[default]
    Varying,
    /// Every cell compares with `g − 1`.
    Universal,
}

/// Distribution of the bootstrap multipliers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum Multiplier {
    /// ±1 with equal probability.
    #[default]
    Rademacher,
    /// Mammen's two-point distribution (mean 0, variance 1, third moment 1).
    Mammen,
}

/// How the uniform band's critical values are made from the bootstrap's sup-t draws.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum BandMethod {
    /// The sup-t quantile `c` of the draws (each studentised by its cell's analytic SE) read as a normal
    /// tail probability `p = 2(1 − Φ(c))`, and each cell's critical value the Student-t quantile with the
    /// same tail at degrees of freedom matched to the fourth moment of its Behrens–Fisher form (Patil's;
    /// Welch–Satterthwaite's are anti-conservative that far in the tail), applied to the analytic SE: the band
    /// accounts for the SEs being estimated from small cohorts and holds its joint level (see
    /// `docs/diagnostics.md`).
    #[default]
    Student,
    /// csdid's construction: one sup-t quantile of the draws studentised by the bootstrap (IQR) SEs,
    /// applied to those SEs (under-covers with cohorts of tens of instances).
    Csdid,
}

/// Which cells the uniform (sup-t) band covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum BandScope {
    /// All cells, pre- and post-treatment (as csdid and the paper's analysis).
    #[default]
    All,
    /// Post-treatment cells only.
    Post,
}

/// Estimation settings as the user gives them; [`ProfileConfig::validate`] checks them.
///
/// Start from [`ProfileConfig::default`] and change fields, or chain the `with_*` methods:
///
/// ```
/// use memsteer_did::{ControlGroup, ProfileConfig};
/// let cfg = ProfileConfig::default().with_bootstrap(0).with_control(ControlGroup::NotYet);
/// assert_eq!(cfg.bootstrap, 0);
/// assert!(cfg.validate().is_ok());
/// ```
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[non_exhaustive]
pub struct ProfileConfig {
    /// Estimator.
    pub estimator: Estimator,
    /// Control group.
    pub control: ControlGroup,
    /// Base period (DiD only).
    pub base_period: BasePeriod,
    /// Bootstrap draws; 0 = analytic inference only.
    pub bootstrap: usize,
    /// Multiplier distribution.
    pub multiplier: Multiplier,
    /// Significance level of intervals, bands and tests.
    pub alpha: f64,
    /// Seed of the bootstrap.
    pub seed: u64,
    /// Cells covered by the uniform band.
    pub band_scope: BandScope,
    /// How the uniform band's critical values are made.
    pub band_method: BandMethod,
    /// Cohorts smaller than this get a warning.
    pub min_cohort_size: usize,
    /// The cell-level Wald pre-test is skipped above this many pre-treatment cells.
    pub max_wald_cells: usize,
    /// The path Wald pre-test uses event times `−pretrend_window ..= −1`.
    pub pretrend_window: usize,
}

impl Default for ProfileConfig {
    fn default() -> Self {
        Self {
            estimator: Estimator::Did,
            control: ControlGroup::Never,
            base_period: BasePeriod::Varying,
            bootstrap: 1000,
            multiplier: Multiplier::Rademacher,
            alpha: 0.05,
            seed: 20240101,
            band_scope: BandScope::All,
            band_method: BandMethod::Student,
            min_cohort_size: 10,
            max_wald_cells: 1500,
            pretrend_window: 10,
        }
    }
}

/// A [`ProfileConfig`] whose values have been checked.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct ValidConfig(ProfileConfig);

impl std::ops::Deref for ValidConfig {
    type Target = ProfileConfig;
    fn deref(&self) -> &ProfileConfig {
        &self.0
    }
}

macro_rules! with {
    ($($(#[$doc:meta])* $name:ident: $field:ident: $ty:ty;)*) => {
        $($(#[$doc])* #[must_use] pub fn $name(mut self, $field: $ty) -> Self { self.$field = $field; self })*
    };
}

impl ProfileConfig {
    with! {
        /// Sets [`ProfileConfig::estimator`].
        with_estimator: estimator: Estimator;
        /// Sets [`ProfileConfig::control`].
        with_control: control: ControlGroup;
        /// Sets [`ProfileConfig::base_period`].
        with_base_period: base_period: BasePeriod;
        /// Sets [`ProfileConfig::bootstrap`].
        with_bootstrap: bootstrap: usize;
        /// Sets [`ProfileConfig::multiplier`].
        with_multiplier: multiplier: Multiplier;
        /// Sets [`ProfileConfig::alpha`].
        with_alpha: alpha: f64;
        /// Sets [`ProfileConfig::seed`].
        with_seed: seed: u64;
        /// Sets [`ProfileConfig::band_scope`].
        with_band_scope: band_scope: BandScope;
        /// Sets [`ProfileConfig::band_method`].
        with_band_method: band_method: BandMethod;
        /// Sets [`ProfileConfig::min_cohort_size`].
        with_min_cohort_size: min_cohort_size: usize;
        /// Sets [`ProfileConfig::max_wald_cells`].
        with_max_wald_cells: max_wald_cells: usize;
        /// Sets [`ProfileConfig::pretrend_window`].
        with_pretrend_window: pretrend_window: usize;
    }

    /// Checks the settings.
    pub fn validate(self) -> Result<ValidConfig> {
        if !(self.alpha > 0.0 && self.alpha < 0.5) {
            return Err(DidError::Config {
                field: "alpha",
                message: format!("expected a level in (0, 0.5), found {}", self.alpha),
            });
        }
        if self.bootstrap != 0 && (self.bootstrap as f64) * self.alpha < 1.0 {
            return Err(DidError::Config {
                field: "bootstrap",
                message: format!(
                    "{} draws cannot resolve the {} quantile of a band; use at least {} (or 0 for analytic inference)",
                    self.bootstrap,
                    1.0 - self.alpha,
                    (1.0 / self.alpha).ceil()
                ),
            });
        }
        if self.pretrend_window == 0 {
            return Err(DidError::Config {
                field: "pretrend_window",
                message: "expected at least 1 pre-treatment event time".into(),
            });
        }
        if self.bootstrap > 1_000_000 {
            return Err(DidError::Config {
                field: "bootstrap",
                message: format!("{} draws is more than the supported 1,000,000", self.bootstrap),
            });
        }
        Ok(ValidConfig(self))
    }
}
