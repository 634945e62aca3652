//! AdamW with PyTorch's semantics, and gradient clipping by global norm.

use rayon::prelude::*;

use crate::{LmError, Result};

/// Elements per parallel task of the elementwise updates.
const CHUNK: usize = 1 << 14;

/// Checked AdamW hyper-parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    /// `β₁` (0.9).
    pub beta1: f64,
    /// `β₂` (0.95).
    pub beta2: f64,
    /// `ε` added to `√v̂` (1e-8).
    pub eps: f64,
    /// Decoupled weight decay (applied only where the mask says so).
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self { beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.0 }
    }
}

impl AdamWConfig {
    fn check(&self) -> Result<()> {
        let unit = |name: &str, x: f64| {
            if (0.0..1.0).contains(&x) {
                Ok(())
            } else {
                Err(LmError::Input(format!("AdamW {name} must lie in [0, 1), found {x}")))
            }
        };
        unit("beta1", self.beta1)?;
        unit("beta2", self.beta2)?;
        if !(self.eps.is_finite() && self.eps > 0.0) {
            return Err(LmError::Input(format!("AdamW eps must be positive, found {}", self.eps)));
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return Err(LmError::Input(format!("weight decay must be non-negative, found {}", self.weight_decay)));
        }
        Ok(())
    }
}

/// AdamW state over one flat parameter buffer.
///
/// One step at learning rate `lr` (step count `t`, 1-based), per element, as `torch.optim.AdamW`:
/// `p ← p·(1 − lr·wd)` where decayed; `m ← m + (1 − β₁)(g − m)`; `v ← β₂v + (1 − β₂)g²`;
/// `p ← p − (lr / (1 − β₁ᵗ)) · m / (√v / √(1 − β₂ᵗ) + ε)`.
#[derive(Debug, Clone)]
pub struct AdamW {
    cfg: AdamWConfig,
    m: Vec<f32>,
    v: Vec<f32>,
    t: u64,
}

impl AdamW {
    /// Zero moments for `len` parameters.
    pub fn new(cfg: AdamWConfig, len: usize) -> Result<Self> {
        cfg.check()?;
        Ok(Self { cfg, m: vec![0.0; len], v: vec![0.0; len], t: 0 })
    }

    /// Steps taken.
    pub fn steps(&self) -> u64 {
        self.t
    }

    /// The hyper-parameters.
    pub fn config(&self) -> &AdamWConfig {
        &self.cfg
    }

    /// First and second moments (for checkpoints of the optimizer state).
    pub fn moments(&self) -> (&[f32], &[f32]) {
        (&self.m, &self.v)
    }

    /// Restores moments and the step count saved with [`AdamW::moments`] and [`AdamW::steps`].
    pub fn restore(&mut self, m: Vec<f32>, v: Vec<f32>, t: u64) -> Result<()> {
        if m.len() != self.m.len() || v.len() != self.v.len() {
            return Err(LmError::Input(format!(
                "optimizer state holds {} and {} moments, expected {} each",
                m.len(),
                v.len(),
                self.m.len()
            )));
        }
        (self.m, self.v, self.t) = (m, v, t);
        Ok(())
    }

    /// One update of `params` from `grads`; `decay` lists the parameter ranges that get weight decay.
    pub fn step(&mut self, params: &mut [f32], grads: &[f32], decay: &[std::ops::Range<usize>], lr: f64) -> Result<()> {
        if params.len() != self.m.len() || grads.len() != self.m.len() {
            return Err(LmError::Input(format!(
                "AdamW over {} parameters got {} parameters and {} gradients",
                self.m.len(),
                params.len(),
                grads.len()
            )));
        }
        if let Some(r) = decay.iter().find(|r| r.end > params.len() || r.start > r.end) {
            return Err(LmError::Input(format!("weight-decay range {r:?} lies outside {} parameters", params.len())));
        }
        self.t += 1;
        let c = self.cfg;
        // Scalars in f64 and rounded once to f32, as PyTorch does with Python floats.
        let factor = (1.0 - lr * c.weight_decay) as f32;
        let t = i32::try_from(self.t).unwrap_or(i32::MAX);
        let bc1 = 1.0 - c.beta1.powi(t);
        let bc2 = 1.0 - c.beta2.powi(t);
        let step_size = (lr / bc1) as f32;
        let bc2_sqrt = bc2.sqrt() as f32;
        let (w1, b2, w2, eps) = ((1.0 - c.beta1) as f32, c.beta2 as f32, (1.0 - c.beta2) as f32, c.eps as f32);
        if c.weight_decay != 0.0 {
            for r in decay {
                params[r.clone()].par_chunks_mut(CHUNK).for_each(|p| p.iter_mut().for_each(|p| *p *= factor));
            }
        }
        params
            .par_chunks_mut(CHUNK)
            .zip(grads.par_chunks(CHUNK))
            .zip(self.m.par_chunks_mut(CHUNK).zip(self.v.par_chunks_mut(CHUNK)))
            .for_each(|((p, g), (m, v))| {
                for i in 0..p.len() {
                    m[i] += w1 * (g[i] - m[i]);
                    v[i] = v[i] * b2 + w2 * g[i] * g[i];
                    let denom = v[i].sqrt() / bc2_sqrt + eps;
                    p[i] -= step_size * m[i] / denom;
                }
            });
        Ok(())
    }
}

/// The global L2 norm of `grads` (accumulated in `f64` over fixed chunks, added in order).
pub fn grad_norm(grads: &[f32]) -> f64 {
    let partial: Vec<f64> =
        grads.par_chunks(CHUNK).map(|c| c.iter().map(|&g| f64::from(g) * f64::from(g)).sum::<f64>()).collect();
    partial.iter().sum::<f64>().sqrt()
}

/// Gradient clipping as `torch.nn.utils.clip_grad_norm_`: scales `grads` by
/// `min(1, max_norm / (norm + 1e-6))`. Returns the norm before clipping.
pub fn clip_grad_norm(grads: &mut [f32], max_norm: f64) -> f64 {
    let norm = grad_norm(grads);
    let coef = (max_norm / (norm + 1e-6)).min(1.0);
    if coef < 1.0 {
        let c = coef as f32;
        grads.par_chunks_mut(CHUNK).for_each(|g| g.iter_mut().for_each(|g| *g *= c));
    }
    norm
}

#[cfg(test)]
#[allow(clippy::single_range_in_vec_init)] // one decayed range is the point
mod tests {
    use super::*;

    #[test]
    fn two_hand_computed_steps() {
        let cfg = AdamWConfig { weight_decay: 0.1, ..AdamWConfig::default() };
        let mut opt = AdamW::new(cfg, 2).unwrap();
        // Parameter 0 decays, parameter 1 does not.
        let mut p = [1.0f32, 1.0];
        opt.step(&mut p, &[0.5, 0.5], &[0..1], 0.1).unwrap();
        // Step 1: m = 0.05, v = 0.0125, m̂ = 0.5, v̂ = 0.25, update = 0.1·0.5/(0.5 + 1e-8).
        let u1 = 0.1 * 0.5 / (0.5 + 1e-8);
        assert!((f64::from(p[0]) - (0.99 - u1)).abs() < 1e-7, "{}", p[0]);
        assert!((f64::from(p[1]) - (1.0 - u1)).abs() < 1e-7, "{}", p[1]);
        let before = [f64::from(p[0]), f64::from(p[1])];
        opt.step(&mut p, &[-1.0, -1.0], &[0..1], 0.1).unwrap();
        // Step 2: m = 0.9·0.05 − 0.1 = −0.055, v = 0.95·0.0125 + 0.05 = 0.061875,
        // update = 0.1·(m/0.19) / (√v/√0.0975 + 1e-8).
        let u2 = 0.1 * (-0.055 / 0.19) / (0.061875f64.sqrt() / 0.0975f64.sqrt() + 1e-8);
        assert!((f64::from(p[0]) - (before[0] * 0.99 - u2)).abs() < 1e-6, "{}", p[0]);
        assert!((f64::from(p[1]) - (before[1] - u2)).abs() < 1e-6, "{}", p[1]);
        assert_eq!(opt.steps(), 2);
    }

    #[test]
    fn clipping_follows_torch() {
        let mut g = [3.0f32, 4.0];
        let n = clip_grad_norm(&mut g, 1.0);
        assert_eq!(n, 5.0);
        let c = (1.0 / (5.0 + 1e-6)) as f32;
        assert_eq!(g, [3.0 * c, 4.0 * c]);
        let mut small = [0.3f32, 0.4];
        assert!((clip_grad_norm(&mut small, 1.0) - 0.5).abs() < 1e-7);
        assert_eq!(small, [0.3, 0.4]);
    }

    #[test]
    fn bad_settings_are_errors() {
        assert!(AdamW::new(AdamWConfig { beta1: 1.0, ..AdamWConfig::default() }, 1).is_err());
        assert!(AdamW::new(AdamWConfig { weight_decay: -1.0, ..AdamWConfig::default() }, 1).is_err());
        let mut opt = AdamW::new(AdamWConfig::default(), 2).unwrap();
        assert!(opt.step(&mut [0.0; 3], &[0.0; 3], &[], 0.1).is_err());
        assert!(opt.step(&mut [0.0; 2], &[0.0; 2], &[1..3], 0.1).is_err());
    }
}
