//! A training run with every batch logged ([`run`], what `memsteer train` does), and the files it
//! writes that other tools read back (xtask's counterfactual retraining, resumption): the optimizer
//! settings in `run.json` and the batch log `batches.jsonl`. One writer and one reader each, so they
//! cannot drift apart.
//!
//! The run directory holds:
//! - `step{K}/`: Hugging Face checkpoints (`config.json`, `model.safetensors` in f32, tokenizer files
//!   when a tokenizer was given) after `K` optimizer steps (`step0` is the initialisation), each after
//!   step 0 with AdamW's state ([`OPTIMIZER_FILE`]);
//! - `checkpoints.json`: `{"K": "step{K}", …}`, the manifest `memsteer logprobs --checkpoints` reads;
//! - `batches.jsonl`: one line per optimizer step, `{"step": K, "ids": [instance ids]}` (K 1-based);
//! - `loss.csv`: `step,loss,lr` (the batch's loss before the update, the rate used);
//! - `instances.jsonl`: every training and validation instance with its tokens and `treatment_step`
//!   (the first step whose batch held it; `null` for validation instances and instances never drawn);
//! - `run.json`: the settings, seed and input hashes of the run.
//!
//! The data order comes from the seed: each epoch is a seeded permutation of the instances (or, with
//! [`RunSpec::shuffle`] off, the instances in file order), and batches run through the epochs one after
//! another. The logs are rewritten (atomically) at every
//! checkpoint, so a rerun with the same settings resumes from the last complete checkpoint and ends
//! with the same bytes as an uninterrupted run; a finished run is left as it is.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::time::Instant;

use memsteer_panel::durable::write as write_atomic;
use memsteer_panel::rng::{SplitMix64, hash_key};

use super::{AdamWConfig, Params, Schedule, StepStats, TrainConfig, Trainer};
use crate::error::{At, bail, ensure};
use crate::instances::{self, Instance};
use crate::{LmError, Result};

/// The run's settings file, in the run directory.
pub const RUN_FILE: &str = "run.json";
/// The batch log, in the run directory: one line per optimizer step, `{"step": K, "ids": [...]}`.
pub const BATCHES_FILE: &str = "batches.jsonl";

fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|source| LmError::Io { path: path.into(), source })
}

/// The optimizer settings a run's `run.json` records (`lr`, `min_lr`, `warmup`, `steps`, `schedule`,
/// `weight_decay`, `grad_clip`; AdamW's betas and epsilon are the defaults `memsteer train` uses), so
/// that retraining from one of its checkpoints repeats exactly its steps.
pub fn train_config_from_run(path: &Path) -> Result<TrainConfig> {
    let err = |message: String| LmError::Config { path: path.into(), message };
    let v: serde_json::Value = serde_json::from_str(&read(path)?).map_err(|e| err(format!("not valid JSON: {e}")))?;
    let number = |key: &str| {
        v.get(key).and_then(serde_json::Value::as_f64).ok_or_else(|| err(format!("missing number `{key}`")))
    };
    let count = |key: &str| {
        v.get(key)
            .and_then(serde_json::Value::as_u64)
            .map(|n| n as usize)
            .ok_or_else(|| err(format!("missing count `{key}`")))
    };
    let schedule: Schedule = v
        .get("schedule")
        .and_then(serde_json::Value::as_str)
        .ok_or_else(|| err("missing `schedule`".into()))?
        .parse()?;
    let grad_clip = number("grad_clip")?;
    Ok(TrainConfig {
        lr: number("lr")?,
        min_lr: number("min_lr")?,
        warmup: count("warmup")?,
        steps: count("steps")?,
        schedule,
        adamw: AdamWConfig { weight_decay: number("weight_decay")?, ..AdamWConfig::default() },
        grad_clip: (grad_clip > 0.0).then_some(grad_clip),
    })
}

/// Every logged step's batch (instance ids), in step order; errors name the file, the line and what
/// was expected (steps must run 1, 2, 3, …).
pub fn read_batches(path: &Path) -> Result<Vec<Vec<String>>> {
    let mut out = Vec::new();
    for (i, line) in read(path)?.lines().enumerate() {
        let err =
            |message: String| LmError::Config { path: path.into(), message: format!("line {}: {message}", i + 1) };
        let v: serde_json::Value = serde_json::from_str(line).map_err(|e| err(format!("not a JSON object: {e}")))?;
        if v.get("step").and_then(serde_json::Value::as_u64) != Some(i as u64 + 1) {
            return Err(err(format!("`step` must be {}", i + 1)));
        }
        let ids = v
            .get("ids")
            .and_then(serde_json::Value::as_array)
            .ok_or_else(|| err("missing array `ids`".into()))?
            .iter()
            .map(|x| x.as_str().map(String::from).ok_or_else(|| err(format!("`ids` holds {x}, not an id"))))
            .collect::<Result<Vec<_>>>()?;
        out.push(ids);
    }
    Ok(out)
}

/// AdamW's state inside a checkpoint directory.
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
/// Most checkpoints one run may write (the last step included).
pub const MAX_CHECKPOINTS: usize = 100_000;
/// Most optimizer steps one run may take (the batch log holds every step).
pub const MAX_STEPS: usize = 100_000_000;
/// Most instances per optimizer step.
pub const MAX_BATCH_SIZE: usize = 1 << 20;

/// Where a run's initial weights come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Init {
    /// A Hugging Face `config.json`: random weights from the run's seed.
    Config(PathBuf),
    /// The weights of a Hugging Face model directory.
    Weights(PathBuf),
}

/// How long a run is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Length {
    /// This many optimizer steps.
    Steps(usize),
    /// This many passes over the instances, rounded up to whole batches.
    Epochs(usize),
}

/// Everything a training run is made of: [`run`] trains it into `out`, or resumes it there.
#[derive(Debug, Clone, PartialEq)]
pub struct RunSpec {
    /// The initial weights.
    pub init: Init,
    /// Training instances ([`crate::instances`]).
    pub instances: PathBuf,
    /// Validation instances, never trained on (listed with a null treatment step).
    pub validation: Option<PathBuf>,
    /// Tokenizer files for `text` instances, copied into every checkpoint (default: the
    /// [`Init::Weights`] directory).
    pub tokenizer: Option<PathBuf>,
    /// The run's directory.
    pub out: PathBuf,
    /// Instances per optimizer step.
    pub batch_size: usize,
    /// Steps or epochs.
    pub length: Length,
    /// Peak learning rate.
    pub lr: f64,
    /// Final learning rate of the cosine schedule (default `0.1 · lr`).
    pub min_lr: Option<f64>,
    /// Warm-up steps.
    pub warmup: usize,
    /// The schedule after the warm-up.
    pub schedule: Schedule,
    /// AdamW's decoupled weight decay.
    pub weight_decay: f64,
    /// Global gradient-norm clip (0: none).
    pub grad_clip: f64,
    /// Seed of the initialisation and the data order.
    pub seed: u64,
    /// Whether each epoch is a seeded permutation of the instances (`true`) or the instances in file
    /// order (`false`: a published data order, such as Pythia's pre-shuffled rows).
    pub shuffle: bool,
    /// Checkpoint steps ([`parse_checkpoint_steps`]); the last step is always saved.
    pub checkpoint_steps: String,
}

/// What [`run`] reports while it works.
#[derive(Debug, Clone, Copy)]
pub enum RunEvent<'a> {
    /// Something the user should know (a damaged checkpoint skipped, instances re-treated).
    Warning(&'a str),
    /// The run starts at step `done` of `steps` (`done > 0`: resumed from that checkpoint).
    Started {
        /// Steps already done.
        done: usize,
        /// Steps of the whole run.
        steps: usize,
    },
    /// One optimizer step was taken.
    Step {
        /// Its statistics.
        stats: &'a StepStats,
        /// Tokens trained on per second in this run so far.
        tokens_per_second: f64,
    },
}

/// What a run did.
#[derive(Debug, Clone, PartialEq)]
pub struct RunOutcome {
    /// Optimizer steps of the run.
    pub steps: usize,
    /// Checkpoint steps written (by this and earlier attempts).
    pub checkpoints: Vec<usize>,
    /// Loss of the last batch (before its update).
    pub last_loss: f64,
    /// Tokens trained on in this attempt.
    pub tokens: usize,
    /// Seconds this attempt trained.
    pub seconds: f64,
}

/// Parses a checkpoint list (e.g. `0,1,2,4,100:1000:100`) for a run of `steps` steps: every step and
/// range is checked against the run (and the number of checkpoints against [`MAX_CHECKPOINTS`])
/// before the set is built.
pub fn parse_checkpoint_steps(list: &str, steps: usize) -> Result<BTreeSet<usize>> {
    let mut out = BTreeSet::new();
    let beyond = |k: usize| format!("checkpoint steps: step {k} lies beyond the run's {steps} steps");
    for item in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let bad = || format!("checkpoint steps: {item:?} is neither a step nor START:END:STRIDE");
        if item.contains(':') {
            let parts: Vec<&str> = item.split(':').collect();
            ensure!(parts.len() == 3, "{}", bad());
            let n: Vec<usize> = parts.iter().map(|p| p.trim().parse()).collect::<Result<_, _>>().at(bad)?;
            ensure!(n[2] >= 1 && n[0] <= n[1], "checkpoint steps: {item:?} needs START ≤ END and STRIDE ≥ 1");
            ensure!(n[1] <= steps, "{}", beyond(n[1]));
            let count = (n[1] - n[0]) / n[2] + 1;
            ensure!(
                out.len() + count < MAX_CHECKPOINTS,
                "checkpoint steps: {item:?} makes more than {MAX_CHECKPOINTS} checkpoints with the last step (each is a model on disk)"
            );
            out.extend((n[0]..=n[1]).step_by(n[2]));
        } else {
            let k = item.parse().at(bad)?;
            ensure!(k <= steps, "{}", beyond(k));
            out.insert(k);
        }
    }
    ensure!(
        out.len() < MAX_CHECKPOINTS,
        "checkpoint steps: more than {MAX_CHECKPOINTS} checkpoints with the last step (each is a model on disk)"
    );
    Ok(out)
}

/// The instance order of `epoch`: a Fisher–Yates permutation from a stream keyed by seed and epoch, or
/// the file's order.
fn order_of(n: usize, seed: u64, epoch: u64, shuffle: bool) -> Vec<usize> {
    if shuffle { permutation(n, seed, epoch) } else { (0..n).collect() }
}

/// A Fisher–Yates permutation of `0..n` from a stream keyed by seed and epoch.
fn permutation(n: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut p: Vec<usize> = (0..n).collect();
    SplitMix64::new(hash_key(seed, &epoch.to_le_bytes())).shuffle(&mut p);
    p
}

fn check_fits(instances: &[Instance], params: &Params, file: &Path) -> Result<()> {
    let cfg = params.arch();
    for x in instances {
        let at = || format!("{}, line {} (instance {:?})", file.display(), x.line, x.id);
        ensure!(x.tokens.len() >= 2, "{}: {} token(s); training needs at least two", at(), x.tokens.len());
        ensure!(
            x.tokens.len() <= cfg.context,
            "{}: {} tokens exceed the model's context of {}",
            at(),
            x.tokens.len(),
            cfg.context
        );
        if let Some(t) = x.tokens.iter().find(|t| **t as usize >= cfg.vocab) {
            bail!("{}: token id {t} is outside the model's vocabulary of {}", at(), cfg.vocab);
        }
    }
    Ok(())
}

/// The run's logs, rewritten whole (atomically) at every checkpoint.
struct Logs<'a> {
    out: &'a Path,
    batches: Vec<Vec<usize>>,
    losses: Vec<(f64, f64)>,
    checkpoints: Vec<usize>,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> LmError + '_ {
    move |source| LmError::Io { path: path.into(), source }
}

impl Logs<'_> {
    fn write(&self, train: &[Instance], validation: &[Instance]) -> Result<()> {
        let out = self.out;
        let path = out.join(BATCHES_FILE);
        write_atomic(&path, |w| {
            for (k, ids) in self.batches.iter().enumerate() {
                let ids: Vec<&str> = ids.iter().map(|&i| train[i].id.as_str()).collect();
                writeln!(w, "{}", serde_json::json!({"step": k + 1, "ids": ids}))?;
            }
            Ok(())
        })
        .map_err(io(&path))?;
        let path = out.join("loss.csv");
        write_atomic(&path, |w| {
            writeln!(w, "step,loss,lr")?;
            for (k, (loss, lr)) in self.losses.iter().enumerate() {
                writeln!(w, "{},{loss},{lr}", k + 1)?;
            }
            Ok(())
        })
        .map_err(io(&path))?;
        let mut first = vec![None; train.len()];
        for (k, ids) in self.batches.iter().enumerate() {
            for &i in ids {
                first[i].get_or_insert(k + 1);
            }
        }
        let path = out.join("instances.jsonl");
        write_atomic(&path, |w| {
            for (x, t) in train.iter().zip(&first) {
                writeln!(w, "{}", serde_json::json!({"id": x.id, "treatment_step": t, "tokens": x.tokens}))?;
            }
            for x in validation {
                writeln!(w, "{}", serde_json::json!({"id": x.id, "treatment_step": null, "tokens": x.tokens}))?;
            }
            Ok(())
        })
        .map_err(io(&path))?;
        let manifest: serde_json::Map<String, serde_json::Value> =
            self.checkpoints.iter().map(|k| (k.to_string(), format!("step{k}").into())).collect();
        let path = out.join("checkpoints.json");
        write_atomic(&path, |w| writeln!(w, "{}", serde_json::Value::Object(manifest))).map_err(io(&path))
    }
}

/// Saves the weights (and, after step 0, AdamW's state as [`OPTIMIZER_FILE`]) to `dir`, with the
/// tokenizer's files.
fn save_checkpoint(trainer: &Trainer, dir: &Path, tokenizer: Option<&Path>) -> Result<()> {
    trainer.params().save_hf(dir)?;
    if trainer.steps_done() > 0 {
        trainer.save_optimizer(&dir.join(OPTIMIZER_FILE))?;
    }
    if let Some(src) = tokenizer {
        for f in crate::tokenizer::FILES {
            let p = src.join(f);
            if p.is_file() {
                std::fs::copy(&p, dir.join(f)).map_err(io(&p))?;
            }
        }
    }
    Ok(())
}

fn hash_file(p: &Path) -> Result<String> {
    let bytes = std::fs::read(p).map_err(io(p))?;
    Ok(format!("{:016x}", hash_key(0, &bytes)))
}

/// Everything that determines a run's results (`run.json`): a rerun resumes only when these are equal.
fn settings(
    spec: &RunSpec,
    steps: usize,
    checkpoints: &BTreeSet<usize>,
    tokenizer: Option<&Path>,
) -> Result<serde_json::Value> {
    let model = match &spec.init {
        Init::Config(c) => serde_json::json!({"config": hash_file(c)?}),
        Init::Weights(d) => serde_json::json!({"init_weights": crate::weights::Weights::open(d)?.fingerprint()}),
    };
    // The tokenizer's files (text instances are tokenized with them, and checkpoints carry them).
    let tokenizer = match tokenizer {
        Some(dir) => {
            let mut files = serde_json::Map::new();
            for f in crate::tokenizer::FILES {
                let p = dir.join(f);
                if p.is_file() {
                    files.insert(f.to_string(), hash_file(&p)?.into());
                }
            }
            serde_json::Value::Object(files)
        }
        None => serde_json::Value::Null,
    };
    let mut settings = serde_json::json!({
        "tokenizer": tokenizer,
        "model": model,
        "seed": spec.seed,
        "instances": hash_file(&spec.instances)?,
        "validation": spec.validation.as_deref().map(hash_file).transpose()?,
        "batch_size": spec.batch_size,
        "steps": steps,
        "lr": spec.lr,
        "min_lr": spec.min_lr.unwrap_or(0.1 * spec.lr),
        "warmup": spec.warmup,
        "schedule": spec.schedule.name(),
        "weight_decay": spec.weight_decay,
        "grad_clip": spec.grad_clip,
        "checkpoint_steps": checkpoints,
    });
    // Recorded only when not the default, so that runs made before the option resume.
    if !spec.shuffle {
        settings["order"] = "file".into();
    }
    Ok(settings)
}

/// Restores the trainer and the logs from the last complete checkpoint of an interrupted run in
/// `out`; returns its step (0 when none is usable: the run starts over, from the same seed).
fn resume(
    out: &Path,
    trainer: &mut Trainer,
    logs: &mut Logs<'_>,
    train: &[Instance],
    grid: &BTreeSet<usize>,
    warn: &mut dyn FnMut(&str),
) -> Result<usize> {
    let manifest: serde_json::Map<String, serde_json::Value> =
        match std::fs::read_to_string(out.join("checkpoints.json")) {
            Ok(t) => serde_json::from_str(&t).at(|| format!("{}/checkpoints.json: not valid JSON", out.display()))?,
            Err(_) => serde_json::Map::new(),
        };
    let mut saved: Vec<usize> = manifest.keys().filter_map(|k| k.parse().ok()).filter(|k| grid.contains(k)).collect();
    saved.sort_unstable();
    // The latest checkpoint whose weights and optimizer state load; an unreadable one (cut short by a
    // crash or a power loss) is reported and the one before it tried. Nothing is changed until one loads.
    let mut found = None;
    let size = trainer.params().data().len();
    for &k in saved.iter().rev() {
        let dir = out.join(format!("step{k}"));
        if k == 0 {
            // The initialisation: kept when it loads, written again otherwise.
            match Params::from_hf(&dir) {
                Ok(p) if p.data().len() == size => found = Some(0),
                Ok(_) => warn(&format!("checkpoint {} holds another model; writing it again", dir.display())),
                Err(e) => warn(&format!("checkpoint {} is unreadable ({e}); writing it again", dir.display())),
            }
            break;
        }
        let loaded = Params::from_hf(&dir).and_then(|params| {
            ensure!(params.data().len() == size, "{} parameters, expected {size}", params.data().len());
            // Reads the whole file before changing the trainer.
            trainer.load_optimizer(&dir.join(OPTIMIZER_FILE))?;
            Ok(params)
        });
        match loaded {
            Ok(params) => {
                ensure!(
                    trainer.steps_done() == k,
                    "{}: optimizer state of step {}, expected {k}",
                    dir.display(),
                    trainer.steps_done()
                );
                trainer.params_mut().data_mut().copy_from_slice(params.data());
                found = Some(k);
                break;
            }
            Err(e) => warn(&format!(
                "checkpoint {} is incomplete or unreadable ({e}); trying the one before it",
                dir.display()
            )),
        }
    }
    let Some(k) = found else { return Ok(0) };
    logs.checkpoints = saved.into_iter().filter(|&s| s <= k).collect();
    if k == 0 {
        return Ok(0);
    }
    let index: HashMap<&str, usize> = train.iter().enumerate().map(|(i, x)| (x.id.as_str(), i)).collect();
    let batches = read_batches(&out.join(BATCHES_FILE)).at(|| "resuming".to_string())?;
    for (step, ids) in batches.iter().take(k).enumerate() {
        let Some(ids) = ids.iter().map(|id| index.get(id.as_str()).copied()).collect::<Option<Vec<usize>>>() else {
            bail!("resuming: {BATCHES_FILE} step {} names an unknown instance", step + 1)
        };
        logs.batches.push(ids);
    }
    let text = std::fs::read_to_string(out.join("loss.csv")).at(|| "resuming: reading loss.csv".to_string())?;
    for line in text.lines().skip(1).take(k) {
        let f: Vec<f64> = line
            .split(',')
            .skip(1)
            .map(str::parse)
            .collect::<Result<_, _>>()
            .at(|| "resuming: loss.csv".to_string())?;
        ensure!(f.len() == 2, "resuming: loss.csv rows must be step,loss,lr");
        logs.losses.push((f[0], f[1]));
    }
    ensure!(
        logs.batches.len() == k && logs.losses.len() == k,
        "resuming: {BATCHES_FILE} or loss.csv holds fewer than the {k} steps of the last checkpoint"
    );
    Ok(k)
}

/// The run's instances, tokenized and checked against the model; validation ids must differ from
/// training ids.
fn read_inputs(spec: &RunSpec, params: &Params, tokenizer: Option<&Path>) -> Result<(Vec<Instance>, Vec<Instance>)> {
    let mut train = instances::read(&spec.instances)?;
    instances::tokenize_from(&mut train, tokenizer, &spec.instances)?;
    check_fits(&train, params, &spec.instances)?;
    let Some(v) = &spec.validation else { return Ok((train, Vec::new())) };
    let mut validation = instances::read(v)?;
    instances::tokenize_from(&mut validation, tokenizer, v)?;
    check_fits(&validation, params, v)?;
    let ids: std::collections::HashSet<&str> = train.iter().map(|x| x.id.as_str()).collect();
    if let Some(x) = validation.iter().find(|x| ids.contains(x.id.as_str())) {
        bail!("{}, line {}: instance id {:?} is also a training instance", v.display(), x.line, x.id);
    }
    Ok((train, validation))
}

/// Trains `spec` into `spec.out` with every batch logged (the module's files, checkpoints with
/// AdamW's state), or resumes an interrupted run with the same settings there from its last complete
/// checkpoint; the result is the same bytes as an uninterrupted run. A directory holding another run
/// is an error. `events` hears of warnings, the start and every step.
pub fn run(spec: &RunSpec, events: &mut dyn FnMut(RunEvent<'_>)) -> Result<RunOutcome> {
    ensure!(
        (1..=MAX_BATCH_SIZE).contains(&spec.batch_size),
        "the batch size must be between 1 and {MAX_BATCH_SIZE}, found {}",
        spec.batch_size
    );
    if let Length::Steps(s) = spec.length {
        ensure!(s <= MAX_STEPS, "the number of steps must be at most {MAX_STEPS}, found {s}");
    }
    ensure!(spec.grad_clip >= 0.0 && spec.grad_clip.is_finite(), "the gradient clip must be a non-negative number");
    let params = match &spec.init {
        Init::Config(c) => {
            Params::from_config_file(c, spec.seed).at(|| format!("initialising a model from {}", c.display()))?
        }
        Init::Weights(d) => Params::from_hf(d).at(|| format!("loading the initial model {}", d.display()))?,
    };
    let tokenizer = spec.tokenizer.as_deref().or(match &spec.init {
        Init::Weights(d) => Some(d.as_path()),
        Init::Config(_) => None,
    });
    let (train, validation) = read_inputs(spec, &params, tokenizer)?;
    let n = train.len();
    let steps = match spec.length {
        Length::Steps(s) => s,
        Length::Epochs(epochs) => {
            let s = epochs.checked_mul(n).map(|t| t.div_ceil(spec.batch_size)).filter(|&s| s <= MAX_STEPS);
            let Some(s) = s else {
                bail!(
                    "epochs: {epochs} passes over {n} instances make more than {MAX_STEPS} steps of {}",
                    spec.batch_size
                )
            };
            if epochs > 1 {
                events(RunEvent::Warning(&format!(
                    "{epochs} epochs re-treat every instance: an instance's treatment step stays its first exposure, every exposure is in {BATCHES_FILE}"
                )));
            }
            s
        }
    };
    ensure!(steps >= 1, "the run has no steps: give at least one step or epoch");
    let mut checkpoints = parse_checkpoint_steps(&spec.checkpoint_steps, steps)?;
    checkpoints.insert(steps);
    let cfg = TrainConfig {
        lr: spec.lr,
        min_lr: spec.min_lr.unwrap_or(0.1 * spec.lr),
        warmup: spec.warmup,
        steps,
        schedule: spec.schedule,
        adamw: AdamWConfig { weight_decay: spec.weight_decay, ..AdamWConfig::default() },
        grad_clip: (spec.grad_clip > 0.0).then_some(spec.grad_clip),
    };
    let mut trainer = Trainer::new(params, &cfg)?;
    let settings = settings(spec, steps, &checkpoints, tokenizer)?;
    let out = spec.out.as_path();
    let run_file = out.join(RUN_FILE);
    let mut logs = Logs { out, batches: Vec::new(), losses: Vec::new(), checkpoints: Vec::new() };
    let mut done = 0;
    if run_file.exists() || out.join(BATCHES_FILE).exists() {
        let before: Option<serde_json::Value> =
            std::fs::read_to_string(&run_file).ok().and_then(|t| serde_json::from_str(&t).ok());
        let Some(before) = before else {
            bail!("{} holds files of a training run but no readable {RUN_FILE}", out.display())
        };
        ensure!(
            before == settings,
            "{} already holds a different training run (other settings, model or instances; see its {RUN_FILE}); choose another output directory or remove it",
            out.display()
        );
        done = resume(out, &mut trainer, &mut logs, &train, &checkpoints, &mut |w| events(RunEvent::Warning(w)))?;
    } else {
        std::fs::create_dir_all(out).map_err(io(out))?;
        write_atomic(&run_file, |w| writeln!(w, "{settings:#}")).map_err(io(&run_file))?;
    }
    if done == 0 && checkpoints.contains(&0) && logs.checkpoints.is_empty() {
        save_checkpoint(&trainer, &out.join("step0"), tokenizer)?;
        logs.checkpoints.push(0);
        logs.write(&train, &validation)?;
    }
    events(RunEvent::Started { done, steps });
    let start = Instant::now();
    let mut tokens = 0usize;
    let mut order: HashMap<u64, Vec<usize>> = HashMap::new();
    let mut last_loss = logs.losses.last().map_or(f64::NAN, |l| l.0);
    let b = spec.batch_size;
    for k in done + 1..=steps {
        let ids: Vec<usize> = ((k - 1) * b..k * b)
            .map(|pos| {
                let epoch = (pos / n) as u64;
                // Only the current epoch's (and at a boundary, the next one's) order is kept.
                order.retain(|&e, _| e + 1 >= epoch);
                order.entry(epoch).or_insert_with(|| order_of(n, spec.seed, epoch, spec.shuffle))[pos % n]
            })
            .collect();
        let seqs: Vec<&[u32]> = ids.iter().map(|&i| train[i].tokens.as_slice()).collect();
        let stats = trainer.train_step(&seqs).at(|| format!("optimizer step {k}"))?;
        tokens += seqs.iter().map(|s| s.len()).sum::<usize>();
        last_loss = stats.loss;
        logs.batches.push(ids);
        logs.losses.push((stats.loss, stats.lr));
        let tokens_per_second = tokens as f64 / start.elapsed().as_secs_f64().max(1e-9);
        events(RunEvent::Step { stats: &stats, tokens_per_second });
        if checkpoints.contains(&k) {
            save_checkpoint(&trainer, &out.join(format!("step{k}")), tokenizer)?;
            logs.checkpoints.push(k);
            logs.write(&train, &validation)?;
        }
    }
    Ok(RunOutcome { steps, checkpoints: logs.checkpoints, last_loss, tokens, seconds: start.elapsed().as_secs_f64() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpoint_lists() {
        let s = parse_checkpoint_steps("0,1,2,4, 10:30:10", 30).unwrap();
        assert_eq!(s.into_iter().collect::<Vec<_>>(), vec![0, 1, 2, 4, 10, 20, 30]);
        assert!(parse_checkpoint_steps("1,x", 30).is_err());
        assert!(parse_checkpoint_steps("5:1:1", 30).is_err());
        assert!(parse_checkpoint_steps("1:5:0", 30).is_err());
        assert!(parse_checkpoint_steps("40", 30).unwrap_err().to_string().contains("beyond the run's 30 steps"));
        let e = parse_checkpoint_steps("0:200000:1", MAX_STEPS).unwrap_err().to_string();
        assert!(e.contains("more than 100000 checkpoints"), "{e}");
    }

    #[test]
    fn permutations_are_seeded() {
        let p = permutation(10, 3, 0);
        let mut sorted = p.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..10).collect::<Vec<_>>());
        assert_eq!(p, permutation(10, 3, 0));
        assert_ne!(p, permutation(10, 3, 1));
        assert_ne!(p, permutation(10, 4, 0));
    }
}
