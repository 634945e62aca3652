//! Causal estimators of memorisation profiles (Lesci et al., "Causal Estimation of Memorisation
//! Profiles") over a [`memsteer_panel::Panel`].
//!
//! For every cohort `g` (the first checkpoint after an instance's training batch) and checkpoint `c`,
//! [`estimate`] computes τ(g, c) with the difference estimator `Ȳ_c(g) − Ȳ_c(∞)` or
//! difference-in-differences `(Ȳ_c(g) − Ȳ_b(g)) − (Ȳ_c(C) − Ȳ_b(C))`, controls `C` never-treated or
//! not-yet-treated, base period `b` varying or universal — the Callaway–Sant'Anna ATT(g, t) without
//! covariates, matching csdid's point estimates and analytic standard errors. Inference: analytic
//! (influence-function) standard errors and a multiplier bootstrap for all cells at once with robust
//! (IQR) standard errors and sup-t uniform bands. Aggregations: the path by event time, instantaneous,
//! persistent and residual memorisation. Diagnostics: pre-trend tests that hold their size with
//! thousands of cells, anticipation, baseline balance. Per-cell influence functions
//! ([`influence_functions`]) let users build aggregations of their own.
//!
//! ```
//! use memsteer_panel::synthetic::SyntheticConfig;
//! use memsteer_did::{estimate, NoProgress, ProfileConfig};
//!
//! let panel = SyntheticConfig::pythia_like(6, 40, 80, 8, 1).generate().unwrap();
//! let cfg = ProfileConfig::default().with_bootstrap(200).validate().unwrap();
//! let profile = estimate(&panel, &cfg, &NoProgress).unwrap();
//! let inst = profile.instantaneous.unwrap();
//! // The generator's instantaneous effect is 2.0 + 0.3 residual.
//! assert!((inst.estimate - 2.3).abs() < 4.0 * inst.std_error);
//! ```
#![deny(missing_docs)]

mod aggregate;
mod bootstrap;
mod cells;
pub mod compare;
mod config;
mod diagnostics;
mod error;
mod estimate;
mod functional;
mod gaussian;
mod gemm;
mod inference;
pub mod influence;
pub mod io;
mod prepare;
pub mod stats;
mod types;

pub use config::{BandMethod, BandScope, BasePeriod, ControlGroup, Estimator, Multiplier, ProfileConfig, ValidConfig};
pub use error::{DidError, Result};
pub use estimate::{NoProgress, Progress, estimate};
pub use inference::MIN_BOOTSTRAP_SE_DRAWS;
pub use influence::{CellKey, Influence, InfluenceFunctions, influence_functions};
pub use types::{
    Aggregate, BalanceCheck, CellEstimate, CohortSummary, Diagnostics, PathEstimate, PointTest, Profile, SeFallback,
    StdErrorSource, SupTTest, WaldTest,
};

/// Numerical tolerances used across the crate's tests, in one place.
pub mod tolerances {
    /// Agreement with csdid's point estimates and analytic standard errors.
    pub const PEER_EXACT: f64 = 1e-9;
    /// Relative agreement of bootstrap standard errors with csdid's (different random draws).
    pub const BOOTSTRAP_SE_RELATIVE: f64 = 0.15;
}
