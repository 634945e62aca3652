//! Training a steer on cached hidden states.
//!
//! The language model is frozen and the steer acts on the final hidden state only, so each corpus
//! sequence goes through the model once ([`HiddenCache::build`]); training then runs on the rows
//! `(h_t, x_{t+1}, strength)` with the fused output layer of [`crate::fused`], never on the model again.

use memsteer_kernels::{Device, Steers};
use memsteer_lm::Decoder;

use crate::fused::{SteerBatch, steer_loss_and_grads};
use crate::steer::{Steer, SteerSpec, embedding_fingerprint};
use crate::{Result, SteerError};

/// Largest default rank (the authors' 1000; the rank is `min(1000, hidden size)` by default).
pub const DEFAULT_MAX_RANK: usize = 1000;
/// Sequences per forward pass while caching hidden states.
const CACHE_BATCH: usize = 16;

/// Most optimizer steps of one steer training run (the loss of every step is kept).
pub const MAX_STEPS: usize = 10_000_000;
/// Most sequences per minibatch.
pub const MAX_BATCH_SIZE: usize = 1 << 20;

/// Training settings; [`TrainConfig::default`] gives the authors' defaults.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct TrainConfig {
    /// Rank of the steer; `None` means `min(1000, hidden size)`.
    pub rank: Option<usize>,
    /// The fixed scale ε (1e-3).
    pub epsilon: f32,
    /// Adam learning rate (1e-2).
    pub lr: f32,
    /// Adam β₁ (0.9).
    pub beta1: f32,
    /// Adam β₂ (0.999).
    pub beta2: f32,
    /// Adam's ε in the denominator (1e-8).
    pub adam_epsilon: f32,
    /// Coefficient λ of the authors' regularisation term `λ (‖P1‖² + ‖P2‖²)` added to the loss (0).
    pub weight_decay: f32,
    /// Optimizer steps (1000; at most [`MAX_STEPS`]).
    pub steps: usize,
    /// Sequences per minibatch (32).
    pub batch_size: usize,
    /// Tokens kept from the start of each sequence (256; also at most the model's context).
    pub max_length: usize,
    /// Seed of the initialisation and of the batch order (0).
    pub seed: u64,
    /// Standard deviation of the normal initialisation of both projectors (1e-2, the authors' `init_var`).
    pub init_std: f32,
    /// Name of the labelled steer (strength +1 on the positive corpus, −1 on the negative).
    pub label: String,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            rank: None,
            epsilon: 1e-3,
            lr: 1e-2,
            beta1: 0.9,
            beta2: 0.999,
            adam_epsilon: 1e-8,
            weight_decay: 0.0,
            steps: 1000,
            batch_size: 32,
            max_length: 256,
            seed: 0,
            init_std: 1e-2,
            label: "positive".into(),
        }
    }
}

impl TrainConfig {
    /// Checks every setting; errors name the setting and the range expected.
    pub fn validate(&self) -> Result<()> {
        let bad = |field: &'static str, message: String| Err(SteerError::Config { field, message });
        let positive_finite = |x: f32| x.is_finite() && x > 0.0;
        if self.rank == Some(0) {
            return bad("rank", "expected at least 1, found 0".into());
        }
        if !positive_finite(self.epsilon) {
            return bad("epsilon", format!("expected a finite number > 0, found {}", self.epsilon));
        }
        if !positive_finite(self.lr) {
            return bad("lr", format!("expected a finite number > 0, found {}", self.lr));
        }
        for (field, b) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(0.0..1.0).contains(&b) {
                return bad(field, format!("expected a number in [0, 1), found {b}"));
            }
        }
        if !positive_finite(self.adam_epsilon) {
            return bad("adam_epsilon", format!("expected a finite number > 0, found {}", self.adam_epsilon));
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return bad("weight_decay", format!("expected a finite number ≥ 0, found {}", self.weight_decay));
        }
        if !(1..=MAX_STEPS).contains(&self.steps) {
            return bad("steps", format!("expected between 1 and {MAX_STEPS}, found {}", self.steps));
        }
        if !(1..=MAX_BATCH_SIZE).contains(&self.batch_size) {
            return bad("batch_size", format!("expected between 1 and {MAX_BATCH_SIZE}, found {}", self.batch_size));
        }
        if self.max_length < 2 {
            return bad("max_length", format!("expected at least 2 tokens, found {}", self.max_length));
        }
        if !(self.init_std.is_finite() && self.init_std > 0.0) {
            return bad(
                "init_std",
                format!(
                    "expected a finite number > 0, found {} (with both projectors at zero the gradient of W = P1 P2ᵀ is zero and the steer never moves)",
                    self.init_std
                ),
            );
        }
        Ok(())
    }

    /// The settings as JSON (stored in the steer file's `training` metadata).
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "rank": self.rank,
            "epsilon": json_f32(self.epsilon),
            "lr": json_f32(self.lr),
            "beta1": json_f32(self.beta1),
            "beta2": json_f32(self.beta2),
            "adam_epsilon": json_f32(self.adam_epsilon),
            "weight_decay": json_f32(self.weight_decay),
            "steps": self.steps,
            "batch_size": self.batch_size,
            "max_length": self.max_length,
            "seed": self.seed,
            "init_std": json_f32(self.init_std),
            "label": self.label,
        })
    }
}

/// One cached sequence: its rows in the cache and its strength.
#[derive(Debug, Clone, Copy, PartialEq)]
struct CachedSeq {
    start: usize,
    rows: usize,
    strength: f32,
}

/// Where the cached hidden states live: in memory, or in an anonymous temporary file (deleted when
/// the cache is dropped) once they outgrow the memory budget of [`HiddenCache::build_with`].
#[derive(Debug)]
enum Rows {
    Memory(Vec<f32>),
    Disk { file: std::sync::Mutex<std::fs::File>, values: usize },
}

/// Final hidden states of a labelled corpus, one row per predicted token: `h_t` with its target `x_{t+1}`
/// and the strength of its sequence (+1 positive, −1 negative).
#[derive(Debug)]
pub struct HiddenCache {
    dim: usize,
    hidden: Rows,
    targets: Vec<u32>,
    seqs: Vec<CachedSeq>,
    skipped: usize,
}

fn io_error(what: &str, e: std::io::Error) -> SteerError {
    SteerError::Input(format!("hidden-state cache file: {what}: {e}"))
}

impl HiddenCache {
    /// Runs every sequence (truncated to `max_length` tokens and to the model's context) through the
    /// model once. Sequences of fewer than two tokens predict nothing and are skipped (counted in
    /// [`HiddenCache::skipped`]); an empty corpus, or one with nothing left, is an error.
    pub fn build(
        decoder: &dyn Decoder,
        positive: &[Vec<u32>],
        negative: &[Vec<u32>],
        max_length: usize,
    ) -> Result<Self> {
        Self::build_with(decoder, positive, negative, max_length, usize::MAX, None)
    }

    /// [`HiddenCache::build`] holding at most `memory_bytes` of hidden states in memory: beyond that
    /// they spill to an anonymous temporary file in `spill_dir` (the system's temporary directory when
    /// `None`), read back one minibatch at a time during training. Training on a spilled cache gives
    /// bitwise the same steer as on one in memory.
    pub fn build_with(
        decoder: &dyn Decoder,
        positive: &[Vec<u32>],
        negative: &[Vec<u32>],
        max_length: usize,
        memory_bytes: usize,
        spill_dir: Option<&std::path::Path>,
    ) -> Result<Self> {
        if max_length < 2 {
            return Err(SteerError::Config {
                field: "max_length",
                message: format!("expected at least 2 tokens, found {max_length}"),
            });
        }
        let keep = max_length.min(decoder.context()).max(2);
        let mut cache = HiddenCache {
            dim: decoder.dim(),
            hidden: Rows::Memory(Vec::new()),
            targets: Vec::new(),
            seqs: Vec::new(),
            skipped: 0,
        };
        for (name, corpus, strength) in [("positive", positive, 1.0f32), ("negative", negative, -1.0)] {
            if corpus.is_empty() {
                return Err(SteerError::Input(format!("{name} corpus: expected at least one sequence, found none")));
            }
            let usable: Vec<&[u32]> = corpus.iter().filter(|s| s.len() >= 2).map(|s| &s[..s.len().min(keep)]).collect();
            cache.skipped += corpus.len() - usable.len();
            if usable.is_empty() {
                return Err(SteerError::Input(format!(
                    "{name} corpus: expected at least one sequence of two or more tokens, found none"
                )));
            }
            for chunk in usable.chunks(CACHE_BATCH) {
                let h = decoder.forward_packed(chunk, None)?;
                let d = cache.dim;
                let mut offset = 0;
                for seq in chunk {
                    let rows = seq.len() - 1;
                    cache.seqs.push(CachedSeq { start: cache.targets.len(), rows, strength });
                    cache.push_rows(&h[offset * d..(offset + rows) * d], memory_bytes, spill_dir)?;
                    cache.targets.extend_from_slice(&seq[1..]);
                    offset += seq.len();
                }
            }
        }
        Ok(cache)
    }

    /// Appends rows, moving everything to a temporary file once memory would exceed `budget` bytes.
    fn push_rows(&mut self, rows: &[f32], budget: usize, dir: Option<&std::path::Path>) -> Result<()> {
        use std::io::Write;
        if let Rows::Memory(v) = &mut self.hidden {
            if (v.len() + rows.len()).saturating_mul(4) <= budget {
                v.extend_from_slice(rows);
                return Ok(());
            }
            let dir = dir.map_or_else(std::env::temp_dir, std::path::Path::to_path_buf);
            let mut file =
                tempfile::tempfile_in(&dir).map_err(|e| io_error(&format!("creating one in {}", dir.display()), e))?;
            // In blocks of 1 MiB, so that spilling never holds a second copy of the cache.
            for block in v.chunks(1 << 18) {
                let bytes: Vec<u8> = block.iter().flat_map(|x| x.to_le_bytes()).collect();
                file.write_all(&bytes).map_err(|e| io_error("writing", e))?;
            }
            self.hidden = Rows::Disk { file: std::sync::Mutex::new(file), values: v.len() };
        }
        if let Rows::Disk { file, values } = &mut self.hidden {
            let bytes: Vec<u8> = rows.iter().flat_map(|x| x.to_le_bytes()).collect();
            let f = file.get_mut().unwrap_or_else(|e| e.into_inner());
            f.write_all(&bytes).map_err(|e| io_error("writing", e))?;
            *values += rows.len();
        }
        Ok(())
    }

    /// Appends the hidden states of cached sequence `s` to `out`.
    fn rows_into(&self, s: CachedSeq, out: &mut Vec<f32>) -> Result<()> {
        use std::io::{Read, Seek, SeekFrom};
        let d = self.dim;
        match &self.hidden {
            Rows::Memory(v) => out.extend_from_slice(&v[s.start * d..(s.start + s.rows) * d]),
            Rows::Disk { file, .. } => {
                let mut f = file.lock().unwrap_or_else(|e| e.into_inner());
                let mut bytes = vec![0u8; s.rows * d * 4];
                f.seek(SeekFrom::Start((s.start * d * 4) as u64)).map_err(|e| io_error("seeking", e))?;
                f.read_exact(&mut bytes).map_err(|e| io_error("reading back", e))?;
                out.extend(bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])));
            }
        }
        Ok(())
    }

    /// Whether the hidden states were spilled to a temporary file.
    pub fn spilled(&self) -> bool {
        matches!(self.hidden, Rows::Disk { .. })
    }

    /// Hidden size.
    pub fn dim(&self) -> usize {
        self.dim
    }
    /// Number of cached sequences.
    pub fn sequences(&self) -> usize {
        self.seqs.len()
    }
    /// Number of rows (predicted tokens).
    pub fn rows(&self) -> usize {
        self.targets.len()
    }
    /// Sequences skipped for having fewer than two tokens.
    pub fn skipped(&self) -> usize {
        self.skipped
    }
}

/// Progress of training, reported after every step.
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub struct Progress {
    /// Steps done (1-based).
    pub step: usize,
    /// Total steps.
    pub steps: usize,
    /// Mean NLL of the step's minibatch (before the update, without the regularisation term).
    pub loss: f64,
}

/// What training did.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct TrainReport {
    /// Minibatch loss of every step.
    pub losses: Vec<f64>,
    /// Sequences trained on.
    pub sequences: usize,
    /// Rows (predicted tokens) trained on.
    pub rows: usize,
    /// Sequences skipped for having fewer than two tokens.
    pub skipped: usize,
}

/// Trains a steer for `decoder` from a positive and a negative corpus of token ids: caches the hidden
/// states ([`HiddenCache::build`]), then [`train_cached`].
pub fn train(
    decoder: &dyn Decoder,
    positive: &[Vec<u32>],
    negative: &[Vec<u32>],
    config: &TrainConfig,
    progress: &mut dyn FnMut(Progress),
) -> Result<(Steer, TrainReport)> {
    config.validate()?;
    let cache = HiddenCache::build(decoder, positive, negative, config.max_length)?;
    train_cached(&cache, crate::OutputLayer::of(decoder), config, progress)
}

/// Trains a steer (labelled steer 0 at the sequence's strength ±1, dummy steer 1 at strength 1) on cached
/// hidden states with Adam, minimising the mean NLL of each minibatch's targets under the steered logits.
/// `output` is the base model's output layer ([`crate::OutputLayer::of`]: its embedding, `vocab × dim`,
/// and the soft-cap of its logits). Seeded and bitwise identical across rayon thread counts.
pub fn train_cached(
    cache: &HiddenCache,
    output: crate::OutputLayer<'_>,
    config: &TrainConfig,
    progress: &mut dyn FnMut(Progress),
) -> Result<(Steer, TrainReport)> {
    train_cached_on(&Device::Cpu, cache, output, config, progress)
}

/// [`train_cached`] with each step's loss and gradients computed on `device`: on a CUDA device
/// (feature `cuda`) the output embedding is uploaded once and each minibatch's steered projection,
/// fused output layer and backward run there (`crate::cuda::SteerTrainer`; Adam stays on
/// the host). The same minibatches and updates as on the CPU; the numbers differ from the CPU's only
/// in the order of the sums. Deterministic on a given device.
pub fn train_cached_on(
    device: &Device,
    cache: &HiddenCache,
    output: crate::OutputLayer<'_>,
    config: &TrainConfig,
    progress: &mut dyn FnMut(Progress),
) -> Result<(Steer, TrainReport)> {
    let embedding = output.embedding();
    config.validate()?;
    let d = cache.dim;
    if d == 0 || embedding.is_empty() || !embedding.len().is_multiple_of(d) {
        return Err(SteerError::Input(format!(
            "output embedding: expected a non-empty multiple of the hidden size {d} values, found {}",
            embedding.len()
        )));
    }
    if cache.seqs.is_empty() {
        return Err(SteerError::Input("hidden-state cache: expected at least one sequence, found none".into()));
    }
    let vocab = embedding.len() / d;
    let rank = config.rank.unwrap_or(DEFAULT_MAX_RANK.min(d));
    let steers = 2;
    let per = d * rank;
    let mut rng = SteerRng::new(config.seed);
    let mut params: Vec<f32> = (0..2 * steers * per).map(|_| config.init_std * rng.normal()).collect();
    let mut grads = vec![0.0f32; params.len()];
    let mut m = vec![0.0f32; params.len()];
    let mut v = vec![0.0f32; params.len()];

    #[cfg(feature = "cuda")]
    let gpu_step = match device {
        Device::Cuda(g) => Some(crate::cuda::SteerTrainer::new(&g.0, output, d)?),
        _ => None,
    };
    #[cfg(not(feature = "cuda"))]
    if device.is_cuda() {
        return Err(SteerError::Config {
            field: "device",
            message: "a CUDA device, but memsteer-steer was built without its `cuda` feature".into(),
        });
    }
    let mut order: Vec<usize> = (0..cache.seqs.len()).collect();
    let mut cursor = order.len();
    let mut losses = Vec::with_capacity(config.steps);
    let (mut hidden, mut targets, mut strengths) = (Vec::new(), Vec::new(), Vec::new());
    for step in 1..=config.steps {
        // Next minibatch of sequences: consecutive slices of a seeded permutation, reshuffled per epoch.
        if cursor >= order.len() {
            rng.shuffle(&mut order);
            cursor = 0;
        }
        let take = config.batch_size.min(order.len() - cursor);
        hidden.clear();
        targets.clear();
        strengths.clear();
        for &s in &order[cursor..cursor + take] {
            let seq = cache.seqs[s];
            cache.rows_into(seq, &mut hidden)?;
            targets.extend_from_slice(&cache.targets[seq.start..seq.start + seq.rows]);
            for _ in 0..seq.rows {
                strengths.extend_from_slice(&[seq.strength, 1.0]);
            }
        }
        cursor += take;

        let (p1, p2) = params.split_at(steers * per);
        let (g1, g2) = grads.split_at_mut(steers * per);
        let batch = SteerBatch { hidden: &hidden, strengths: &strengths, targets: &targets };
        #[cfg(feature = "cuda")]
        let loss = match &gpu_step {
            Some(t) => {
                let inputs = crate::cuda::SteerStepInputs {
                    p1,
                    p2,
                    steers,
                    rank,
                    epsilon: config.epsilon,
                    hidden: &hidden,
                    strengths: &strengths,
                    targets: &targets,
                };
                t.loss_and_grads(&inputs, g1, g2)?
            }
            None => {
                steer_loss_and_grads(&Steers { p1, p2, steers, dim: d, rank }, config.epsilon, output, &batch, g1, g2)?
            }
        };
        #[cfg(not(feature = "cuda"))]
        let loss =
            steer_loss_and_grads(&Steers { p1, p2, steers, dim: d, rank }, config.epsilon, output, &batch, g1, g2)?;
        if !loss.is_finite() {
            return Err(SteerError::Input(format!("training diverged: loss {loss} at step {step}; lower lr")));
        }
        losses.push(loss);
        adam_step(&mut params, &grads, &mut m, &mut v, config, step);
        progress(Progress { step, steps: config.steps, loss });
    }

    let p2 = params.split_off(steers * per);
    let mut training = config.to_json();
    training["rank"] = rank.into();
    training["final_loss"] = json_f32(losses.last().copied().unwrap_or(f64::NAN) as f32);
    training["sequences"] = cache.seqs.len().into();
    training["rows"] = cache.targets.len().into();
    let spec = SteerSpec {
        num_steers: steers,
        hidden_size: d,
        rank,
        vocab_size: vocab,
        epsilon: config.epsilon,
        embedding_fingerprint: embedding_fingerprint(embedding),
        labels: vec![config.label.clone()],
    };
    let steer = Steer::new(spec, params, p2, training)?;
    let report = TrainReport { losses, sequences: cache.seqs.len(), rows: cache.targets.len(), skipped: cache.skipped };
    Ok((steer, report))
}

/// An `f32` as the JSON number of its shortest decimal form (`0.999`, not `0.9990000128746033`), which
/// reads back to the same value; non-finite values become `null`.
fn json_f32(x: f32) -> serde_json::Value {
    x.to_string().parse::<f64>().ok().and_then(serde_json::Number::from_f64).map_or(serde_json::Value::Null, Into::into)
}

/// One Adam update (PyTorch's form, with the authors' L2 term `λ‖P‖²` folded into the gradient).
fn adam_step(params: &mut [f32], grads: &[f32], m: &mut [f32], v: &mut [f32], c: &TrainConfig, step: usize) {
    let t = step as i32;
    let bc1 = 1.0 - c.beta1.powi(t);
    let bc2_sqrt = (1.0 - c.beta2.powi(t)).sqrt();
    let step_size = c.lr / bc1;
    for (((p, &g), m), v) in params.iter_mut().zip(grads).zip(m.iter_mut()).zip(v.iter_mut()) {
        let g = g + 2.0 * c.weight_decay * *p;
        *m = c.beta1 * *m + (1.0 - c.beta1) * g;
        *v = c.beta2 * *v + (1.0 - c.beta2) * g * g;
        *p -= step_size * *m / (v.sqrt() / bc2_sqrt + c.adam_epsilon);
    }
}

/// The steer's initialisation and batch order: SplitMix64 from the raw seed ([`memsteer_panel::rng`]),
/// with its own uniform, Box–Muller normal and modulo shuffle, kept so that steer files stay the same.
#[derive(Debug, Clone)]
pub(crate) struct SteerRng(memsteer_panel::rng::SplitMix64);

impl SteerRng {
    pub(crate) fn new(seed: u64) -> Self {
        Self(memsteer_panel::rng::SplitMix64::from_state(seed))
    }
    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0.next_u64()
    }
    /// Uniform in (0, 1).
    fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }
    /// Standard normal (Box–Muller, one value per call).
    fn normal(&mut self) -> f32 {
        let (u1, u2) = (self.uniform(), self.uniform());
        ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
    }
    /// Fisher–Yates.
    fn shuffle<T>(&mut self, xs: &mut [T]) {
        for i in (1..xs.len()).rev() {
            let j = (self.next_u64() % (i as u64 + 1)) as usize;
            xs.swap(i, j);
        }
    }
}
