//! The training loop's state: parameters, gradients, AdamW and the learning-rate schedule, one
//! optimizer step at a time, with AdamW's state saved and restored for resumable runs.

use std::ops::Range;
use std::path::Path;

use super::{AdamW, AdamWConfig, LrSchedule, Params, Schedule, clip_grad_norm, grad_norm, write_atomic};
use crate::{LmError, Result};

/// Settings of a training run.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainConfig {
    /// Peak learning rate.
    pub lr: f64,
    /// Final learning rate of the cosine schedule.
    pub min_lr: f64,
    /// Warm-up steps.
    pub warmup: usize,
    /// Optimizer steps of the run (the cosine's length).
    pub steps: usize,
    /// Cosine or constant after the warm-up.
    pub schedule: Schedule,
    /// AdamW's β₁, β₂, ε and weight decay.
    pub adamw: AdamWConfig,
    /// Clip gradients to this global norm (`None`: no clipping).
    pub grad_clip: Option<f64>,
}

impl TrainConfig {
    /// `lr` over `steps` steps: no warm-up, cosine to `0.1·lr`, weight decay 0.01, clipping at 1.
    pub fn new(lr: f64, steps: usize) -> Self {
        Self {
            lr,
            min_lr: 0.1 * lr,
            warmup: 0,
            steps,
            schedule: Schedule::Cosine,
            adamw: AdamWConfig { weight_decay: 0.01, ..AdamWConfig::default() },
            grad_clip: Some(1.0),
        }
    }
}

/// What one optimizer step did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepStats {
    /// The optimizer step (1-based).
    pub step: usize,
    /// The batch's loss before the update.
    pub loss: f64,
    /// The learning rate used.
    pub lr: f64,
    /// The global gradient norm before clipping.
    pub grad_norm: f64,
}

/// Parameters, their gradient buffer, AdamW and the schedule.
#[derive(Debug, Clone)]
pub struct Trainer {
    params: Params,
    grads: Vec<f32>,
    opt: AdamW,
    schedule: LrSchedule,
    grad_clip: Option<f64>,
    decay: Vec<Range<usize>>,
    step: usize,
}

impl Trainer {
    /// A trainer at step 0; checks the settings.
    pub fn new(params: Params, cfg: &TrainConfig) -> Result<Self> {
        let schedule = LrSchedule::new(cfg.schedule, cfg.lr, cfg.min_lr, cfg.warmup, cfg.steps)?;
        if let Some(c) = cfg.grad_clip
            && !(c.is_finite() && c > 0.0)
        {
            return Err(LmError::Input(format!("gradient clipping norm must be positive, found {c}")));
        }
        let opt = AdamW::new(cfg.adamw, params.data.len())?;
        let decay = params.decay_ranges();
        Ok(Self {
            grads: vec![0.0; params.data.len()],
            params,
            opt,
            schedule,
            grad_clip: cfg.grad_clip,
            decay,
            step: 0,
        })
    }

    /// The parameters.
    pub fn params(&self) -> &Params {
        &self.params
    }

    /// The parameters, writable (e.g. to restore a checkpoint before [`Trainer::load_optimizer`]).
    pub fn params_mut(&mut self) -> &mut Params {
        &mut self.params
    }

    /// The gradient of the last step (after clipping).
    pub fn grads(&self) -> &[f32] {
        &self.grads
    }

    /// The optimizer.
    pub fn optimizer(&self) -> &AdamW {
        &self.opt
    }

    /// Optimizer steps taken.
    pub fn steps_done(&self) -> usize {
        self.step
    }

    /// The schedule.
    pub fn schedule(&self) -> &LrSchedule {
        &self.schedule
    }

    /// Writes AdamW's state (tensors `exp_avg` and `exp_avg_sq` over the flat buffer, the step count
    /// in the metadata) to a safetensors file, through a temporary file renamed into place.
    pub fn save_optimizer(&self, path: &Path) -> Result<()> {
        let (m, v) = self.opt.moments();
        let bytes = |x: &[f32]| -> Vec<u8> { x.iter().flat_map(|f| f.to_le_bytes()).collect() };
        let (mb, vb) = (bytes(m), bytes(v));
        // The step is a tensor, not metadata: safetensors writes its metadata map in hash order, so two
        // metadata keys would make identical states differ byte for byte between processes.
        let step_bytes = (self.step as u64).to_le_bytes();
        let err = |e: safetensors::SafeTensorError| LmError::Weights { path: path.into(), message: e.to_string() };
        let views = vec![
            (
                "exp_avg",
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![m.len()], &mb).map_err(err)?,
            ),
            (
                "exp_avg_sq",
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![v.len()], &vb).map_err(err)?,
            ),
            ("step", safetensors::tensor::TensorView::new(safetensors::Dtype::U64, vec![1], &step_bytes).map_err(err)?),
        ];
        let meta = std::collections::HashMap::from([("format".to_string(), "memsteer-adamw".to_string())]);
        write_atomic(path, &safetensors::serialize(views, Some(meta)).map_err(err)?)
    }

    /// Restores the state [`Trainer::save_optimizer`] wrote, and its step count.
    pub fn load_optimizer(&mut self, path: &Path) -> Result<()> {
        let bytes = std::fs::read(path).map_err(|source| LmError::Io { path: path.into(), source })?;
        let bad = |message: String| LmError::Weights { path: path.into(), message };
        let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| bad(e.to_string()))?;
        let step = st
            .tensor("step")
            .ok()
            .filter(|t| t.dtype() == safetensors::Dtype::U64 && t.shape() == [1])
            .and_then(|t| <[u8; 8]>::try_from(t.data()).ok())
            .and_then(|b| usize::try_from(u64::from_le_bytes(b)).ok())
            .ok_or_else(|| bad("no `step` tensor (U64, shape [1])".into()))?;
        let read = |name: &str| -> Result<Vec<f32>> {
            let t = st.tensor(name).map_err(|e| bad(format!("{name}: {e}")))?;
            if t.dtype() != safetensors::Dtype::F32 || t.shape() != [self.params.data.len()] {
                return Err(bad(format!(
                    "{name}: expected F32 of shape [{}], found {:?} {:?}",
                    self.params.data.len(),
                    t.dtype(),
                    t.shape()
                )));
            }
            Ok(t.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect())
        };
        let (m, v) = (read("exp_avg")?, read("exp_avg_sq")?);
        self.opt.restore(m, v, step as u64)?;
        self.step = step;
        Ok(())
    }

    /// One optimizer step on `batch`: loss and gradient, clipping, AdamW at the schedule's rate.
    pub fn train_step(&mut self, batch: &[&[u32]]) -> Result<StepStats> {
        let loss = self.params.loss_and_grad(batch, &mut self.grads)?;
        let norm = match self.grad_clip {
            Some(c) => clip_grad_norm(&mut self.grads, c),
            None => grad_norm(&self.grads),
        };
        if !loss.is_finite() || !norm.is_finite() {
            return Err(LmError::Input(format!(
                "step {}: loss {loss} or gradient norm {norm} is not finite",
                self.step + 1
            )));
        }
        let k = self.step + 1;
        let lr = self.schedule.lr_at(k);
        self.opt.step(&mut self.params.data, &self.grads, &self.decay, lr)?;
        self.step = k;
        Ok(StepStats { step: k, loss, lr, grad_norm: norm })
    }
}
