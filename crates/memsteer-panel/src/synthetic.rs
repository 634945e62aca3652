//! Seeded synthetic panels shaped like a Pythia memorisation study, with a known effect.
//!
//! Outcomes follow `Y_c(x) = α_x + β_c + τ(g_x, c) + trend_x(c) + ε_{x,c}`: an instance level `α_x`, a
//! common training curve `β_c` (log-probabilities rise as training proceeds), the true memorisation
//! effect `τ(g, c)` (an instantaneous bump that decays towards a residual level after the cohort's
//! checkpoint `g`), optional violations of the identifying assumptions (a cohort-specific pre-trend,
//! anticipation at `e = −1`, a level shift of the validation instances) and noise.

use crate::rng::SplitMix64;
use crate::{CheckpointGrid, Panel, Result};

/// Parameters of a synthetic panel.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct SyntheticConfig {
    /// Checkpoint steps (strictly increasing).
    pub checkpoints: Vec<u64>,
    /// Number of treated instances per cohort; cohorts are the checkpoints `1..`.
    pub per_cohort: usize,
    /// Number of treated cohorts (the first `n_cohorts` checkpoints after the first one).
    pub n_cohorts: usize,
    /// Number of never-trained (validation) instances.
    pub n_validation: usize,
    /// Seed of every random draw.
    pub seed: u64,
    /// Size of the memorisation bump at `e = 0`, above the residual (log-prob units).
    pub instantaneous: f64,
    /// Decay of the bump, in checkpoint indices.
    pub decay: f64,
    /// Memorisation left after the bump has decayed.
    pub residual: f64,
    /// Standard deviation of the instance levels `α_x`.
    pub unit_sd: f64,
    /// Standard deviation of the idiosyncratic noise.
    pub noise_sd: f64,
    /// Level shift of validation instances (biases the difference estimator, not DiD).
    pub validation_shift: f64,
    /// Cohort-specific trend: cohort `g` drifts by `trend_violation · (g / n_cohorts)` per checkpoint
    /// (violates parallel trends).
    pub trend_violation: f64,
    /// Effect at `e = −1` (violates no anticipation).
    pub anticipation: f64,
    /// Unequal cohort sizes: instances of treated cohort `g` (`g = 1..=n_cohorts`) at index `g − 1`;
    /// `None` gives every cohort `per_cohort`.
    pub cohort_sizes: Option<Vec<usize>>,
    /// Heteroskedastic cohorts: noise standard deviation of treated cohort `g` (at index `g − 1`) from
    /// its treatment checkpoint on (effect heterogeneity); before treatment it is `noise_sd`, as random
    /// batch assignment implies. `None` gives every cohort `noise_sd`. Validation instances always use
    /// `noise_sd`.
    pub cohort_noise_sd: Option<Vec<f64>>,
    /// Apply `cohort_noise_sd` before treatment too: cohorts then differ before treatment, which
    /// violates the exchangeability that the pooled pre-trend tests rely on.
    pub cohort_noise_before_treatment: bool,
}

impl SyntheticConfig {
    /// A Pythia-like design: checkpoints `0, 1000, …, 1000·n_checkpoints_minus_one`, one cohort per
    /// checkpoint interval, moderate effects and noise.
    pub fn pythia_like(
        n_cohorts: usize,
        per_cohort: usize,
        n_validation: usize,
        n_checkpoints: usize,
        seed: u64,
    ) -> Self {
        Self {
            checkpoints: (0..n_checkpoints as u64).map(|c| c * 1000).collect(),
            per_cohort,
            n_cohorts,
            n_validation,
            seed,
            instantaneous: 2.0,
            decay: 4.0,
            residual: 0.3,
            unit_sd: 30.0,
            noise_sd: 1.0,
            validation_shift: 0.0,
            trend_violation: 0.0,
            anticipation: 0.0,
            cohort_sizes: None,
            cohort_noise_sd: None,
            cohort_noise_before_treatment: false,
        }
    }

    /// Size of treated cohort `g` (`1..=n_cohorts`).
    pub fn cohort_size(&self, g: usize) -> usize {
        self.cohort_sizes.as_ref().and_then(|s| s.get(g.wrapping_sub(1)).copied()).unwrap_or(self.per_cohort)
    }

    /// Noise standard deviation of treated cohort `g` (`1..=n_cohorts`; validation instances for
    /// `None`) at checkpoint index `c`.
    pub fn noise_sd_of(&self, cohort: Option<usize>, c: usize) -> f64 {
        match (cohort, &self.cohort_noise_sd) {
            (Some(g), Some(sd)) if c >= g || self.cohort_noise_before_treatment => {
                sd.get(g.wrapping_sub(1)).copied().unwrap_or(self.noise_sd)
            }
            _ => self.noise_sd,
        }
    }

    /// The true effect of cohort `g` (checkpoint index) at checkpoint `c`.
    pub fn true_effect(&self, g: usize, c: usize) -> f64 {
        if c >= g {
            let e = (c - g) as f64;
            self.residual + self.instantaneous * (-e / self.decay).exp()
        } else if c + 1 == g {
            self.anticipation
        } else {
            0.0
        }
    }

    fn curve(&self, c: usize) -> f64 {
        // Log-probability rises quickly early in training, then slowly.
        let x = c as f64 / self.checkpoints.len().max(1) as f64;
        -300.0 + 120.0 * (1.0 - (-4.0 * x).exp())
    }

    /// Generates the panel. Treated instances get a treatment step drawn uniformly within their
    /// cohort's interval `(step_{g−1}, step_g]`.
    pub fn generate(&self) -> Result<Panel> {
        let grid = CheckpointGrid::new(self.checkpoints.clone())?;
        let c_len = grid.len();
        if self.n_cohorts + 1 > c_len {
            return Err(crate::PanelError::Invalid(format!(
                "{} cohorts need at least {} checkpoints, found {c_len}",
                self.n_cohorts,
                self.n_cohorts + 1
            )));
        }
        for (name, len) in [
            ("cohort_sizes", self.cohort_sizes.as_ref().map(Vec::len)),
            ("cohort_noise_sd", self.cohort_noise_sd.as_ref().map(Vec::len)),
        ] {
            if let Some(len) = len
                && len != self.n_cohorts
            {
                return Err(crate::PanelError::Invalid(format!(
                    "{name} has {len} entries, expected one per treated cohort ({})",
                    self.n_cohorts
                )));
            }
        }
        if let Some(sd) = self.cohort_noise_sd.as_ref().and_then(|v| v.iter().find(|x| !(x.is_finite() && **x >= 0.0)))
        {
            return Err(crate::PanelError::Invalid(format!(
                "cohort_noise_sd holds {sd}, expected finite non-negative standard deviations"
            )));
        }
        let n = (1..=self.n_cohorts).map(|g| self.cohort_size(g)).sum::<usize>() + self.n_validation;
        let mut rng = SplitMix64::new(self.seed);
        let mut ids = Vec::with_capacity(n);
        let mut treatment = Vec::with_capacity(n);
        let mut outcomes = Vec::with_capacity(n * c_len);
        let curve: Vec<f64> = (0..c_len).map(|c| self.curve(c)).collect();
        let mut push = |cohort: Option<usize>, rng: &mut SplitMix64, ids: &mut Vec<String>| {
            let alpha = self.unit_sd * rng.normal();
            let shift = if cohort.is_none() { self.validation_shift } else { 0.0 };
            let slope = cohort.map_or(0.0, |g| self.trend_violation * g as f64 / self.n_cohorts.max(1) as f64);
            for (c, base) in curve.iter().enumerate() {
                let tau = cohort.map_or(0.0, |g| self.true_effect(g, c));
                let noise_sd = self.noise_sd_of(cohort, c);
                outcomes.push(alpha + base + shift + tau + slope * c as f64 + noise_sd * rng.normal());
            }
            let step = cohort.map(|g| {
                let lo = grid.step(g - 1);
                let hi = grid.step(g);
                lo + 1 + rng.below(hi - lo)
            });
            treatment.push(step);
            ids.push(match cohort {
                Some(g) => format!("t{g}-{}", ids.len()),
                None => format!("v-{}", ids.len()),
            });
        };
        for g in 1..=self.n_cohorts {
            for _ in 0..self.cohort_size(g) {
                push(Some(g), &mut rng, &mut ids);
            }
        }
        for _ in 0..self.n_validation {
            push(None, &mut rng, &mut ids);
        }
        Panel::new(grid, ids, treatment, outcomes)
    }
}
