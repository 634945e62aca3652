//! Learning-rate schedules: linear warm-up, then cosine decay or constant.

use crate::{LmError, Result};

/// What follows the warm-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Schedule {
    /// Cosine from `lr` down to `min_lr` over the steps after the warm-up.
    Cosine,
    /// `lr` after the warm-up.
    Constant,
}

impl Schedule {
    /// The name [`str::parse`] reads back: `cosine` or `constant`.
    pub fn name(self) -> &'static str {
        match self {
            Schedule::Cosine => "cosine",
            Schedule::Constant => "constant",
        }
    }
}

impl std::str::FromStr for Schedule {
    type Err = LmError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "cosine" => Ok(Schedule::Cosine),
            "constant" => Ok(Schedule::Constant),
            other => Err(LmError::Input(format!("unknown schedule {other:?}; expected cosine or constant"))),
        }
    }
}

/// A checked learning-rate schedule over optimizer steps `k = 1, 2, …` (1-based).
///
/// `lr·k/W` for `k ≤ W` warm-up steps; then, for [`Schedule::Cosine`],
/// `min_lr + ½(lr − min_lr)(1 + cos(π (k − W)/(S − W)))` up to the last step `S` (and `min_lr`
/// after it), or `lr` for [`Schedule::Constant`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LrSchedule {
    lr: f64,
    min_lr: f64,
    warmup: usize,
    steps: usize,
    kind: Schedule,
}

impl LrSchedule {
    /// Checks the settings: finite `0 ≤ min_lr ≤ lr`, `warmup ≤ steps`, `steps ≥ 1`.
    pub fn new(kind: Schedule, lr: f64, min_lr: f64, warmup: usize, steps: usize) -> Result<Self> {
        if !(lr.is_finite() && lr >= 0.0) {
            return Err(LmError::Input(format!("learning rate must be finite and non-negative, found {lr}")));
        }
        if !(min_lr.is_finite() && (0.0..=lr).contains(&min_lr)) {
            return Err(LmError::Input(format!("minimum learning rate must lie in [0, lr = {lr}], found {min_lr}")));
        }
        if steps == 0 {
            return Err(LmError::Input("a schedule needs at least one step".into()));
        }
        if warmup > steps {
            return Err(LmError::Input(format!("{warmup} warm-up steps exceed the {steps} steps of the run")));
        }
        Ok(Self { lr, min_lr, warmup, steps, kind })
    }

    /// The learning rate of optimizer step `k` (1-based); `k = 0` (before the first step) is the start
    /// of the warm-up (0), or without warm-up the peak rate.
    pub fn lr_at(&self, k: usize) -> f64 {
        if self.warmup > 0 && k <= self.warmup {
            return self.lr * k as f64 / self.warmup as f64;
        }
        match self.kind {
            Schedule::Constant => self.lr,
            Schedule::Cosine => {
                let span = self.steps - self.warmup;
                if span == 0 {
                    return self.min_lr;
                }
                let progress = ((k - self.warmup) as f64 / span as f64).min(1.0);
                self.min_lr + 0.5 * (self.lr - self.min_lr) * (1.0 + (std::f64::consts::PI * progress).cos())
            }
        }
    }

    /// Total steps of the run.
    pub fn steps(&self) -> usize {
        self.steps
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_cosine_in_closed_form() {
        let s = LrSchedule::new(Schedule::Cosine, 1e-3, 1e-4, 4, 12).unwrap();
        // Warm-up: lr·k/W.
        assert_eq!(s.lr_at(1), 2.5e-4);
        assert_eq!(s.lr_at(2), 5e-4);
        assert_eq!(s.lr_at(4), 1e-3);
        // k = W + span/2: halfway down the cosine, (lr + min_lr)/2.
        assert!((s.lr_at(8) - 5.5e-4).abs() < 1e-15);
        // k = W + span/4: min + (lr − min)(1 + cos(π/4))/2.
        let want = 1e-4 + 0.9e-3 * (1.0 + std::f64::consts::FRAC_1_SQRT_2) / 2.0;
        assert!((s.lr_at(6) - want).abs() < 1e-15);
        assert!((s.lr_at(12) - 1e-4).abs() < 1e-15);
        assert!((s.lr_at(20) - 1e-4).abs() < 1e-15);
    }

    #[test]
    fn constant_and_no_warmup() {
        let s = LrSchedule::new(Schedule::Constant, 0.5, 0.0, 2, 10).unwrap();
        assert_eq!([s.lr_at(1), s.lr_at(2), s.lr_at(3), s.lr_at(10)], [0.25, 0.5, 0.5, 0.5]);
        let c = LrSchedule::new(Schedule::Cosine, 1.0, 0.0, 0, 2).unwrap();
        assert!((c.lr_at(1) - 0.5).abs() < 1e-15);
        assert_eq!(c.lr_at(2), 0.0);
        // Step 0 is defined with and without warm-up (it was 0/0 without).
        assert_eq!([c.lr_at(0), s.lr_at(0)], [1.0, 0.0]);
        let k = LrSchedule::new(Schedule::Constant, 0.5, 0.0, 0, 10).unwrap();
        assert_eq!(k.lr_at(0), 0.5);
    }

    #[test]
    fn bad_settings_are_errors() {
        assert!(LrSchedule::new(Schedule::Cosine, 1.0, 2.0, 0, 5).is_err());
        assert!(LrSchedule::new(Schedule::Cosine, f64::NAN, 0.0, 0, 5).is_err());
        assert!(LrSchedule::new(Schedule::Cosine, 1.0, 0.1, 6, 5).is_err());
        assert!(LrSchedule::new(Schedule::Cosine, 1.0, 0.1, 0, 0).is_err());
        assert!("linear".parse::<Schedule>().is_err());
        assert_eq!("cosine".parse::<Schedule>().unwrap(), Schedule::Cosine);
    }
}
