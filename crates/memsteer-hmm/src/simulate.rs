//! Synthetic training runs with exact counterfactual memorisation.
//!
//! Instances are sequences sampled from a data HMM. A small log-linear bigram model
//! (`log p(x) = log softmax(b)[x_1] + Σ_t log softmax(W[x_{t−1}])[x_t]`) is trained by minibatch SGD, one
//! epoch in a seeded batch order, with linear warm-up and cosine decay. Per-instance log-probabilities at
//! a checkpoint grid form a [`Panel`]; validation instances are never trained on (optionally drawn from a
//! shifted HMM). The ground truth for cohort `g` reruns training with that cohort's batches replaced by
//! fresh draws from the same distribution (or skipped, [`Counterfactual::Remove`]) — same order, same
//! learning-rate schedule by step, everything else identical — and averages the difference in
//! log-probability over the cohort's instances: the true τ(g, c).

use memsteer_panel::rng::SplitMix64;
use memsteer_panel::{CheckpointGrid, Panel};

use crate::linalg::random_distribution;
use crate::{Hmm, HmmError, Result};

/// Settings of a simulated training run.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct SimulationConfig {
    /// Seed of every random draw.
    pub seed: u64,
    /// Hidden states of the data HMM.
    pub states: usize,
    /// Vocabulary size.
    pub vocab: usize,
    /// Tokens per instance.
    pub length: usize,
    /// Instances per optimizer step.
    pub batch_size: usize,
    /// Optimizer steps (one epoch: `steps × batch_size` training instances).
    pub steps: usize,
    /// Never-trained validation instances.
    pub validation: usize,
    /// Peak learning rate.
    pub learning_rate: f64,
    /// Linear warm-up steps.
    pub warmup: usize,
    /// Checkpoint steps (must start at 0 and end at `steps`); empty = a Pythia-like grid.
    pub checkpoints: Vec<u64>,
    /// How the counterfactual run treats the cohort's batches.
    pub counterfactual: Counterfactual,
    /// Counterfactual runs per cohort with independent substitute batches; the truth is their mean
    /// (a single substitution moves the whole model in a random direction, which reaches every instance
    /// of the cohort alike and does not average out over them).
    pub replicates: usize,
    /// Validation instances come from a data HMM whose emissions are mixed with this much of another
    /// random emission matrix (0 = same distribution as training).
    pub validation_shift: f64,
}

impl Default for SimulationConfig {
    fn default() -> Self {
        Self {
            seed: 1,
            states: 4,
            vocab: 8,
            length: 24,
            batch_size: 16,
            steps: 240,
            validation: 400,
            learning_rate: 1.0,
            warmup: 10,
            checkpoints: Vec::new(),
            counterfactual: Counterfactual::Substitute,
            replicates: 8,
            validation_shift: 0.0,
        }
    }
}

/// The counterfactual "cohort g never trained on".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Counterfactual {
    /// The cohort's batches are replaced by fresh batches from the same distribution: the model learns as
    /// much in general, only not these instances. This is the potential outcome `Y_c(x; ∞)` the
    /// estimators target (validation instances are exactly such never-seen draws).
    #[default]
    Substitute,
    /// The cohort's optimizer steps are skipped. The difference then also contains what the cohort's
    /// batches taught the model about the language in general, which reaches every instance: early in
    /// training it is several times the memorisation itself.
    Remove,
}

impl SimulationConfig {
    /// The checkpoint grid: the configured one, or log-spaced early (0, 1, 2, 4, …) then every
    /// `steps / 16` steps.
    pub fn grid(&self) -> Result<Vec<u64>> {
        if !self.checkpoints.is_empty() {
            return Ok(self.checkpoints.clone());
        }
        let every = (self.steps / 16).max(1) as u64;
        let mut g = vec![0u64];
        let mut s = 1u64;
        while s < every {
            g.push(s);
            s *= 2;
        }
        let mut s = every;
        while s < self.steps as u64 {
            g.push(s);
            s += every;
        }
        g.push(self.steps as u64);
        g.dedup();
        Ok(g)
    }

    fn validate(&self) -> Result<Vec<u64>> {
        let bad = |m: String| Err(HmmError::Construction(m));
        if self.states == 0 || self.vocab < 2 || self.length < 1 || self.batch_size == 0 || self.steps == 0 {
            return bad("states ≥ 1, vocab ≥ 2, length ≥ 1, batch size ≥ 1 and steps ≥ 1 are needed".into());
        }
        if !(self.learning_rate > 0.0 && self.learning_rate.is_finite()) {
            return bad(format!("learning rate must be positive, found {}", self.learning_rate));
        }
        if self.counterfactual == Counterfactual::Substitute && self.replicates == 0 {
            return bad("the substitute counterfactual needs at least 1 replicate".into());
        }
        if !(0.0..=1.0).contains(&self.validation_shift) {
            return bad(format!("validation shift must lie in [0, 1], found {}", self.validation_shift));
        }
        let grid = self.grid()?;
        if grid.first() != Some(&0)
            || grid.last() != Some(&(self.steps as u64))
            || grid.windows(2).any(|w| w[0] >= w[1])
        {
            return bad(format!("checkpoints must increase strictly from 0 to {} (the last step)", self.steps));
        }
        Ok(grid)
    }

    /// Learning rate at (1-based) step `t`: linear warm-up, then cosine decay to 10% of the peak.
    pub fn lr(&self, t: usize) -> f64 {
        if t <= self.warmup {
            return self.learning_rate * t as f64 / self.warmup.max(1) as f64;
        }
        let progress = (t - self.warmup) as f64 / (self.steps - self.warmup).max(1) as f64;
        self.learning_rate * (0.1 + 0.9 * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()))
    }
}

/// The bigram model's parameters: initial logits `b` (V) and transition logits `W` (V×V).
#[derive(Debug, Clone)]
struct Bigram {
    v: usize,
    theta: Vec<f64>,
}

fn log_softmax(row: &[f64], out: &mut [f64]) {
    let m = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let z = row.iter().map(|x| (x - m).exp()).sum::<f64>().ln() + m;
    for (o, x) in out.iter_mut().zip(row) {
        *o = x - z;
    }
}

impl Bigram {
    fn new(v: usize) -> Self {
        Self { v, theta: vec![0.0; v + v * v] }
    }

    /// Log-softmax tables: row 0 = initial, row 1 + a = transitions from `a`.
    fn tables(&self) -> Vec<f64> {
        let v = self.v;
        let mut t = vec![0.0; (v + 1) * v];
        for r in 0..=v {
            log_softmax(&self.theta[r * v..(r + 1) * v], &mut t[r * v..(r + 1) * v]);
        }
        t
    }

    fn log_prob(tables: &[f64], v: usize, x: &[usize]) -> f64 {
        let mut lp = tables[x[0]];
        for w in x.windows(2) {
            lp += tables[(1 + w[0]) * v + w[1]];
        }
        lp
    }

    /// One SGD step on the mean negative log-likelihood of `batch`.
    fn step(&mut self, batch: &[&[usize]], lr: f64) {
        let v = self.v;
        let tables = self.tables();
        let mut grad = vec![0.0; self.theta.len()];
        for x in batch {
            let mut row = |r: usize, target: usize| {
                for j in 0..v {
                    grad[r * v + j] += tables[r * v + j].exp();
                }
                grad[r * v + target] -= 1.0;
            };
            row(0, x[0]);
            for w in x.windows(2) {
                row(1 + w[0], w[1]);
            }
        }
        let scale = lr / batch.len() as f64;
        for (t, g) in self.theta.iter_mut().zip(&grad) {
            *t -= scale * g;
        }
    }
}

/// One cell of the ground truth.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct TruthCell {
    /// Cohort as a checkpoint step.
    pub cohort_step: u64,
    /// Checkpoint step.
    pub checkpoint_step: u64,
    /// Mean over the cohort's instances of `log p_c(x) − log p_c(x; cohort g never trained)`.
    pub tau: f64,
}

/// A simulated training run: its panel and the exact counterfactual memorisation.
#[derive(Debug, Clone)]
pub struct Simulation {
    /// Per-instance log-probabilities at every checkpoint.
    pub panel: Panel,
    /// τ(g, c) for every cohort and checkpoint.
    pub truth: Vec<TruthCell>,
}

impl Simulation {
    /// Writes the simulation into `dir` (created if missing), each file atomically: `panel.csv` (the
    /// panel `memsteer profile` reads), `truth.csv` (`cohort_step,checkpoint_step,tau`) and
    /// `simulation.json` (`config`, the settings that made it). Returns the files.
    pub fn write(&self, dir: &std::path::Path, config: &SimulationConfig) -> Result<Vec<std::path::PathBuf>> {
        let err = |path: &std::path::Path, e: &dyn std::fmt::Display| HmmError::Write {
            path: path.into(),
            message: e.to_string(),
        };
        std::fs::create_dir_all(dir).map_err(|e| err(dir, &e))?;
        let (panel, truth, meta) = (dir.join("panel.csv"), dir.join("truth.csv"), dir.join("simulation.json"));
        self.panel.write_csv(&panel).map_err(|e| err(&panel, &e))?;
        memsteer_panel::durable::write(&truth, |w| {
            writeln!(w, "cohort_step,checkpoint_step,tau")?;
            for t in &self.truth {
                writeln!(w, "{},{},{}", t.cohort_step, t.checkpoint_step, t.tau)?;
            }
            Ok(())
        })
        .map_err(|e| err(&truth, &e))?;
        memsteer_panel::durable::write(&meta, |w| {
            serde_json::to_writer_pretty(&mut *w, config).map_err(std::io::Error::other)?;
            writeln!(w)
        })
        .map_err(|e| err(&meta, &e))?;
        Ok(vec![panel, truth, meta])
    }
}

fn random_hmm(states: usize, vocab: usize, rng: &mut SplitMix64) -> Result<Hmm> {
    let init = random_distribution(states, rng);
    // Sticky transitions give sequences structure a bigram model can learn.
    let trans: Vec<f64> = (0..states)
        .flat_map(|s| {
            let mut row: Vec<f64> = random_distribution(states, rng).into_iter().map(|x| 0.4 * x).collect();
            row[s] += 0.6;
            row
        })
        .collect();
    let emit: Vec<f64> = (0..states)
        .flat_map(|_| {
            let raw: Vec<f64> = (0..vocab).map(|_| rng.uniform().powi(3) + 0.01).collect();
            let z: f64 = raw.iter().sum();
            raw.into_iter().map(move |x| x / z)
        })
        .collect();
    Hmm::new(init, trans, emit)
}

/// Runs the simulation: the full training run plus one leave-cohort-out run per cohort.
pub fn simulate(cfg: &SimulationConfig) -> Result<Simulation> {
    let steps = cfg.validate()?;
    let grid = CheckpointGrid::new(steps.clone()).map_err(|e| HmmError::Construction(e.to_string()))?;
    let mut rng = SplitMix64::new(cfg.seed);
    let data = random_hmm(cfg.states, cfg.vocab, &mut rng)?;
    let n_train = cfg.steps * cfg.batch_size;
    let train: Vec<Vec<usize>> = (0..n_train).map(|_| data.sample(cfg.length, &mut rng)).collect();
    let val_hmm = if cfg.validation_shift > 0.0 {
        let other = random_hmm(cfg.states, cfg.vocab, &mut rng)?;
        let mix = |a: &[f64], b: &[f64]| {
            a.iter()
                .zip(b)
                .map(|(x, y)| (1.0 - cfg.validation_shift) * x + cfg.validation_shift * y)
                .collect::<Vec<f64>>()
        };
        let (s, v) = (cfg.states, cfg.vocab);
        let emit: Vec<f64> = (0..s).flat_map(|st| mix(&data.emission_row(st), &other.emission_row(st))).collect();
        debug_assert_eq!(emit.len(), s * v);
        Hmm::new(data.init().to_vec(), data.transition_matrix().to_vec(), emit)?
    } else {
        data.clone()
    };
    let validation: Vec<Vec<usize>> = (0..cfg.validation).map(|_| val_hmm.sample(cfg.length, &mut rng)).collect();
    // Seeded batch order: a permutation of the training instances; batch t (1-based) holds
    // order[(t−1)·B .. t·B].
    let mut order: Vec<usize> = (0..n_train).collect();
    for i in (1..n_train).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        order.swap(i, j);
    }
    let c_len = grid.len();
    let cohort_of_step = |t: usize| grid.cohort_of(t as u64).unwrap_or(c_len - 1);

    // Fresh instances that stand in for a cohort's batches in its counterfactual run (one per training
    // slot, drawn once, so every counterfactual run uses the same substitutes for a given step).
    let replicates = match cfg.counterfactual {
        Counterfactual::Substitute => cfg.replicates,
        Counterfactual::Remove => 1,
    };
    let substitutes: Vec<Vec<Vec<usize>>> = match cfg.counterfactual {
        Counterfactual::Substitute => {
            (0..replicates).map(|_| (0..n_train).map(|_| data.sample(cfg.length, &mut rng)).collect()).collect()
        }
        Counterfactual::Remove => Vec::new(),
    };
    // Trains; at steps where `counterfactual(step)` holds the batch is replaced (or skipped), and records
    // the log-prob tables at every checkpoint.
    let run = |skip: &dyn Fn(usize) -> bool, replicate: usize| -> Vec<Vec<f64>> {
        let mut model = Bigram::new(cfg.vocab);
        let mut tables = Vec::with_capacity(c_len);
        let mut next_ckpt = 0;
        if steps[0] == 0 {
            tables.push(model.tables());
            next_ckpt = 1;
        }
        for t in 1..=cfg.steps {
            let slots = (t - 1) * cfg.batch_size..t * cfg.batch_size;
            if !skip(t) {
                let batch: Vec<&[usize]> = order[slots].iter().map(|&i| train[i].as_slice()).collect();
                model.step(&batch, cfg.lr(t));
            } else if cfg.counterfactual == Counterfactual::Substitute {
                let batch: Vec<&[usize]> = substitutes[replicate][slots].iter().map(Vec::as_slice).collect();
                model.step(&batch, cfg.lr(t));
            }
            while next_ckpt < c_len && steps[next_ckpt] == t as u64 {
                tables.push(model.tables());
                next_ckpt += 1;
            }
        }
        tables
    };

    let full = run(&|_| false, 0);
    let v = cfg.vocab;
    let n = n_train + cfg.validation;
    let mut ids = Vec::with_capacity(n);
    let mut treatment = Vec::with_capacity(n);
    let mut outcomes = Vec::with_capacity(n * c_len);
    let mut step_of = vec![0usize; n_train];
    for (pos, &i) in order.iter().enumerate() {
        step_of[i] = pos / cfg.batch_size + 1;
    }
    for (i, x) in train.iter().enumerate() {
        ids.push(format!("t{i}"));
        treatment.push(Some(step_of[i] as u64));
        outcomes.extend(full.iter().map(|t| Bigram::log_prob(t, v, x)));
    }
    for (i, x) in validation.iter().enumerate() {
        ids.push(format!("v{i}"));
        treatment.push(None);
        outcomes.extend(full.iter().map(|t| Bigram::log_prob(t, v, x)));
    }
    let panel =
        Panel::new(grid.clone(), ids, treatment, outcomes).map_err(|e| HmmError::Construction(e.to_string()))?;

    // Ground truth: one leave-cohort-out run per cohort.
    let mut truth = Vec::new();
    for g in 1..c_len {
        let members: Vec<usize> = (0..n_train).filter(|&i| cohort_of_step(step_of[i]) == g).collect();
        if members.is_empty() {
            continue;
        }
        let mut tau = vec![0.0; c_len];
        for r in 0..replicates {
            let without = run(&|t| cohort_of_step(t) == g, r);
            for (c, slot) in tau.iter_mut().enumerate() {
                let diff: f64 = members
                    .iter()
                    .map(|&i| Bigram::log_prob(&full[c], v, &train[i]) - Bigram::log_prob(&without[c], v, &train[i]))
                    .sum();
                *slot += diff / (members.len() * replicates) as f64;
            }
        }
        for (c, &t) in tau.iter().enumerate() {
            truth.push(TruthCell { cohort_step: steps[g], checkpoint_step: steps[c], tau: t });
        }
    }
    Ok(Simulation { panel, truth })
}
