//! `memsteer train`: trains a small model of any family the runtime reads on instances with every batch logged, writing
//! checkpoints and the files `memsteer logprobs` needs to measure memorisation.
//!
//! Output directory:
//! - `step{K}/`: Hugging Face checkpoints (`config.json`, `model.safetensors` in f32, tokenizer files
//!   when a tokenizer was given) after `K` optimizer steps (`step0` is the initialisation);
//! - `checkpoints.json`: `{"K": "step{K}", …}`, the manifest `memsteer logprobs --checkpoints` reads;
//! - `batches.jsonl`: one line per optimizer step, `{"step": K, "ids": [instance ids]}` (K 1-based);
//! - `loss.csv`: `step,loss,lr` (the batch's loss before the update, the rate used);
//! - `instances.jsonl`: every training and validation instance with its tokens and `treatment_step`
//!   (the first step whose batch held it; `null` for validation instances and instances never drawn).
//!
//! - `run.json`: the settings, seed and input hashes of the run.
//!
//! The data order comes from the seed: each epoch is a seeded permutation of the instances, and
//! batches run through the epochs one after another. The logs are rewritten (atomically) at every
//! checkpoint, and every checkpoint after step 0 holds AdamW's state (`optimizer.safetensors`), so a
//! rerun with the same settings resumes from the last complete checkpoint and ends with the same
//! bytes as an uninterrupted run; a finished run is left as it is.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail, ensure};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use memsteer_lm::train::{AdamWConfig, Params, Schedule, TrainConfig, Trainer};
use memsteer_panel::rng::SplitMix64;
use memsteer_panel::write_atomic;

use crate::logprobs::{Instance, read_instances};

/// AdamW's state inside a checkpoint directory.
const OPTIMIZER_FILE: &str = "optimizer.safetensors";

/// Tokenizer files copied into every checkpoint when present.
pub(crate) const TOKENIZER_FILES: [&str; 7] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "encoder.json",
    "vocab.bpe",
];

/// Arguments of `memsteer train`.
#[derive(Debug, Clone, Args)]
pub struct TrainArgs {
    /// A TOML file holding any of these flags as keys (`batch_size = 8`, `schedule = "cosine"`,
    /// `checkpoint_steps = [0, 1, 2, 4]`, `quiet = true`); flags on the command line override it.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// A Hugging Face `config.json` (GPT-2, GPT-NeoX, Llama, Mistral, Qwen 2, Qwen 3, OLMo 2 or Gemma 3): the model is initialised randomly from --seed.
    #[arg(long, value_name = "FILE", conflicts_with = "init", required_unless_present = "init")]
    pub model_config: Option<PathBuf>,
    /// Start from the weights of a Hugging Face directory of one of those families instead.
    #[arg(long, value_name = "DIR")]
    pub init: Option<PathBuf>,
    /// Training instances, JSON lines: {"id": …, "tokens": [int, …]} or with a "text" string
    /// (tokenized with the --tokenizer or --init directory's tokenizer).
    #[arg(long, value_name = "FILE")]
    pub instances: PathBuf,
    /// Validation instances (same format), never trained on; listed with treatment_step null.
    #[arg(long, value_name = "FILE")]
    pub validation: Option<PathBuf>,
    /// A directory with tokenizer files, used for "text" instances and copied into every checkpoint
    /// (default: the --init directory).
    #[arg(long, value_name = "DIR")]
    pub tokenizer: Option<PathBuf>,
    /// Instances per optimizer step.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Optimizer steps (default: --epochs passes over the instances, rounded up to whole batches).
    #[arg(long, conflicts_with = "epochs")]
    pub steps: Option<usize>,
    /// Passes over the instances when --steps is not given.
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Peak learning rate.
    #[arg(long, default_value_t = 1e-3)]
    pub lr: f64,
    /// Final learning rate of the cosine schedule (default 0.1 · lr).
    #[arg(long)]
    pub min_lr: Option<f64>,
    /// Warm-up steps (learning rate lr·k/W at step k ≤ W).
    #[arg(long, default_value_t = 0)]
    pub warmup: usize,
    /// After the warm-up: cosine (to --min-lr at the last step) or constant.
    #[arg(long, default_value = "cosine", value_parser = ["cosine", "constant"])]
    pub schedule: String,
    /// AdamW's decoupled weight decay (2-D weights and embeddings only).
    #[arg(long, default_value_t = 0.01)]
    pub weight_decay: f64,
    /// Clip gradients to this global L2 norm (0: no clipping).
    #[arg(long, default_value_t = 1.0)]
    pub grad_clip: f64,
    /// Seed of the initialisation and the data order.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Steps to save checkpoints at: integers and ranges START:END:STRIDE, comma-separated, e.g.
    /// 0,1,2,4,8,16,32,64,128,256,512,1000:10000:1000. The last step is always saved.
    #[arg(long, default_value = "0", value_name = "LIST")]
    pub checkpoint_steps: String,
    /// Output directory.
    #[arg(long)]
    pub out: PathBuf,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

/// What a run did.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainOutcome {
    /// Optimizer steps taken.
    pub steps: usize,
    /// Checkpoint steps written.
    pub checkpoints: Vec<usize>,
    /// Loss of the last batch (before its update).
    pub last_loss: f64,
}

/// Parses `--checkpoint-steps` (e.g. `0,1,2,4,100:1000:100`) for a run of `steps` steps: every step and range is checked against the
/// run (and the number of checkpoints against [`MAX_CHECKPOINTS`]) before the set is built.
pub fn parse_checkpoint_steps(list: &str, steps: usize) -> Result<BTreeSet<usize>> {
    let mut out = BTreeSet::new();
    let beyond = |k: usize| format!("--checkpoint-steps: step {k} lies beyond the run's {steps} steps");
    for item in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let bad = || format!("--checkpoint-steps: {item:?} is neither a step nor START:END:STRIDE");
        if item.contains(':') {
            let parts: Vec<&str> = item.split(':').collect();
            ensure!(parts.len() == 3, "{}", bad());
            let n: Vec<usize> = parts.iter().map(|p| p.trim().parse()).collect::<Result<_, _>>().with_context(bad)?;
            ensure!(n[2] >= 1 && n[0] <= n[1], "--checkpoint-steps: {item:?} needs START ≤ END and STRIDE ≥ 1");
            ensure!(n[1] <= steps, "{}", beyond(n[1]));
            let count = (n[1] - n[0]) / n[2] + 1;
            ensure!(
                out.len() + count < MAX_CHECKPOINTS,
                "--checkpoint-steps: {item:?} makes more than {MAX_CHECKPOINTS} checkpoints with the last step (each is a model on disk)"
            );
            out.extend((n[0]..=n[1]).step_by(n[2]));
        } else {
            let k = item.parse().with_context(bad)?;
            ensure!(k <= steps, "{}", beyond(k));
            out.insert(k);
        }
    }
    ensure!(
        out.len() < MAX_CHECKPOINTS,
        "--checkpoint-steps: more than {MAX_CHECKPOINTS} checkpoints with the last step (each is a model on disk)"
    );
    Ok(out)
}

/// Most checkpoints one run may write (the last step included).
pub const MAX_CHECKPOINTS: usize = 100_000;
/// Most optimizer steps one run may take (the batch log holds every step).
pub const MAX_STEPS: usize = 100_000_000;
/// Most instances per optimizer step.
pub const MAX_BATCH_SIZE: usize = 1 << 20;

/// The instance order of `epoch`: a Fisher–Yates permutation from a stream keyed by seed and epoch.
fn permutation(n: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut p: Vec<usize> = (0..n).collect();
    SplitMix64::new(memsteer_panel::rng::hash_key(seed, &epoch.to_le_bytes())).shuffle(&mut p);
    p
}

fn tokenize(instances: &mut [Instance], tokenizer: Option<&Path>, file: &Path) -> Result<()> {
    if !instances.iter().any(|x| x.text.is_some()) {
        return Ok(());
    }
    let dir = tokenizer.with_context(|| {
        format!("{} has `text` instances: give --tokenizer DIR (or --init DIR with tokenizer files)", file.display())
    })?;
    let tok = memsteer_lm::tokenizer::Tokenizer::from_dir(dir)
        .with_context(|| format!("loading the tokenizer of {}", dir.display()))?;
    for x in instances.iter_mut() {
        if let Some(text) = &x.text {
            x.tokens = tok.encode(text).with_context(|| format!("{}, line {}: tokenizing", file.display(), x.line))?;
        }
    }
    Ok(())
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

/// The run's logs, rewritten whole at every checkpoint.
struct Logs<'a> {
    out: &'a Path,
    batches: Vec<Vec<usize>>,
    losses: Vec<(f64, f64)>,
    checkpoints: Vec<usize>,
}

impl Logs<'_> {
    fn write(&self, train: &[Instance], validation: &[Instance]) -> Result<()> {
        let out = self.out;
        write_atomic(&out.join("batches.jsonl"), |w| {
            for (k, ids) in self.batches.iter().enumerate() {
                let ids: Vec<&str> = ids.iter().map(|&i| train[i].id.as_str()).collect();
                writeln!(w, "{}", serde_json::json!({"step": k + 1, "ids": ids}))?;
            }
            Ok(())
        })?;
        write_atomic(&out.join("loss.csv"), |w| {
            writeln!(w, "step,loss,lr")?;
            for (k, (loss, lr)) in self.losses.iter().enumerate() {
                writeln!(w, "{},{loss},{lr}", k + 1)?;
            }
            Ok(())
        })?;
        let mut first = vec![None; train.len()];
        for (k, ids) in self.batches.iter().enumerate() {
            for &i in ids {
                first[i].get_or_insert(k + 1);
            }
        }
        write_atomic(&out.join("instances.jsonl"), |w| {
            for (x, t) in train.iter().zip(&first) {
                writeln!(w, "{}", serde_json::json!({"id": x.id, "treatment_step": t, "tokens": x.tokens}))?;
            }
            for x in validation {
                writeln!(w, "{}", serde_json::json!({"id": x.id, "treatment_step": null, "tokens": x.tokens}))?;
            }
            Ok(())
        })?;
        let manifest: serde_json::Map<String, serde_json::Value> =
            self.checkpoints.iter().map(|k| (k.to_string(), format!("step{k}").into())).collect();
        write_atomic(&out.join("checkpoints.json"), |w| writeln!(w, "{}", serde_json::Value::Object(manifest)))?;
        Ok(())
    }
}

/// Saves the weights (and, after step 0, AdamW's state as `optimizer.safetensors`) to `dir`.
fn save_checkpoint(trainer: &Trainer, dir: &Path, tokenizer: Option<&Path>) -> Result<()> {
    trainer.params().save_hf(dir).with_context(|| format!("writing checkpoint {}", dir.display()))?;
    if trainer.steps_done() > 0 {
        trainer.save_optimizer(&dir.join(OPTIMIZER_FILE))?;
    }
    if let Some(src) = tokenizer {
        for f in TOKENIZER_FILES {
            let p = src.join(f);
            if p.is_file() {
                std::fs::copy(&p, dir.join(f)).with_context(|| format!("copying {}", p.display()))?;
            }
        }
    }
    Ok(())
}

/// Everything that determines a run's results: a rerun resumes only when these are equal.
fn run_settings(
    a: &TrainArgs,
    steps: usize,
    checkpoints: &BTreeSet<usize>,
    tokenizer: Option<&Path>,
) -> Result<serde_json::Value> {
    let hash = |p: &Path| -> Result<String> {
        let bytes = std::fs::read(p).with_context(|| format!("reading {}", p.display()))?;
        Ok(format!("{:016x}", memsteer_panel::rng::hash_key(0, &bytes)))
    };
    let model = match (&a.model_config, &a.init) {
        (Some(c), _) => serde_json::json!({"config": hash(c)?}),
        (_, Some(d)) => serde_json::json!({"init_weights": memsteer_lm::weights::Weights::open(d)?.fingerprint()}),
        _ => serde_json::Value::Null,
    };
    // The tokenizer's files (text instances are tokenized with them, and checkpoints carry them).
    let tokenizer = match tokenizer {
        Some(dir) => {
            let mut files = serde_json::Map::new();
            for f in TOKENIZER_FILES {
                let p = dir.join(f);
                if p.is_file() {
                    files.insert(f.to_string(), hash(&p)?.into());
                }
            }
            serde_json::Value::Object(files)
        }
        None => serde_json::Value::Null,
    };
    Ok(serde_json::json!({
        "tokenizer": tokenizer,
        "model": model,
        "seed": a.seed,
        "instances": hash(&a.instances)?,
        "validation": a.validation.as_deref().map(hash).transpose()?,
        "batch_size": a.batch_size,
        "steps": steps,
        "lr": a.lr,
        "min_lr": a.min_lr.unwrap_or(0.1 * a.lr),
        "warmup": a.warmup,
        "schedule": a.schedule,
        "weight_decay": a.weight_decay,
        "grad_clip": a.grad_clip,
        "checkpoint_steps": checkpoints,
    }))
}

/// Restores the trainer and the logs from the last complete checkpoint of an interrupted run in
/// `out`; returns its step (0 when none is usable: the run starts over, from the same seed).
fn resume(
    out: &Path,
    trainer: &mut Trainer,
    logs: &mut Logs<'_>,
    train: &[Instance],
    grid: &BTreeSet<usize>,
) -> Result<usize> {
    let manifest: serde_json::Map<String, serde_json::Value> =
        match std::fs::read_to_string(out.join("checkpoints.json")) {
            Ok(t) => serde_json::from_str(&t)
                .with_context(|| format!("{}/checkpoints.json: not valid JSON", out.display()))?,
            Err(_) => serde_json::Map::new(),
        };
    let mut saved: Vec<usize> = manifest.keys().filter_map(|k| k.parse().ok()).filter(|k| grid.contains(k)).collect();
    saved.sort_unstable();
    // The latest checkpoint whose weights and optimizer state load; an unreadable one (cut short by a
    // crash or a power loss) is reported and the one before it tried. Nothing is changed until one loads.
    let mut found = None;
    for &k in saved.iter().rev() {
        let dir = out.join(format!("step{k}"));
        if k == 0 {
            // The initialisation: kept when it loads, written again otherwise.
            match Params::from_hf(&dir) {
                Ok(p) if p.data().len() == trainer.params().data().len() => found = Some(0),
                Ok(_) => eprintln!("warning: checkpoint {} holds another model; writing it again", dir.display()),
                Err(e) => eprintln!("warning: checkpoint {} is unreadable ({e:#}); writing it again", dir.display()),
            }
            break;
        }
        let loaded = Params::from_hf(&dir).map_err(anyhow::Error::from).and_then(|params| {
            ensure!(
                params.data().len() == trainer.params().data().len(),
                "{} parameters, expected {}",
                params.data().len(),
                trainer.params().data().len()
            );
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
            Err(e) => eprintln!(
                "warning: checkpoint {} is incomplete or unreadable ({e:#}); trying the one before it",
                dir.display()
            ),
        }
    }
    let Some(k) = found else { return Ok(0) };
    logs.checkpoints = saved.into_iter().filter(|&s| s <= k).collect();
    if k == 0 {
        return Ok(0);
    }
    let index: HashMap<&str, usize> = train.iter().enumerate().map(|(i, x)| (x.id.as_str(), i)).collect();
    let batches =
        memsteer_lm::train::run::read_batches(&out.join(memsteer_lm::train::run::BATCHES_FILE)).context("resuming")?;
    for (step, ids) in batches.iter().take(k).enumerate() {
        let ids = ids
            .iter()
            .map(|id| index.get(id.as_str()).copied())
            .collect::<Option<Vec<usize>>>()
            .with_context(|| format!("resuming: batches.jsonl step {} names an unknown instance", step + 1))?;
        logs.batches.push(ids);
    }
    let text = std::fs::read_to_string(out.join("loss.csv")).context("resuming: reading loss.csv")?;
    for line in text.lines().skip(1).take(k) {
        let f: Vec<f64> =
            line.split(',').skip(1).map(str::parse).collect::<Result<_, _>>().context("resuming: loss.csv")?;
        ensure!(f.len() == 2, "resuming: loss.csv rows must be step,loss,lr");
        logs.losses.push((f[0], f[1]));
    }
    ensure!(
        logs.batches.len() == k && logs.losses.len() == k,
        "resuming: batches.jsonl or loss.csv holds fewer than the {k} steps of the last checkpoint"
    );
    Ok(k)
}

/// Runs `memsteer train`.
pub fn run(a: &TrainArgs) -> Result<TrainOutcome> {
    ensure!(
        (1..=MAX_BATCH_SIZE).contains(&a.batch_size),
        "--batch-size must be between 1 and {MAX_BATCH_SIZE}, found {}",
        a.batch_size
    );
    if let Some(s) = a.steps {
        ensure!(s <= MAX_STEPS, "--steps must be at most {MAX_STEPS}, found {s}");
    }
    let schedule: Schedule = a.schedule.parse()?;
    let params = match (&a.model_config, &a.init) {
        (Some(c), None) => {
            Params::from_config_file(c, a.seed).with_context(|| format!("initialising a model from {}", c.display()))?
        }
        (None, Some(d)) => Params::from_hf(d).with_context(|| format!("loading the initial model {}", d.display()))?,
        _ => bail!("give exactly one of --model-config FILE and --init DIR"),
    };
    let tokenizer = a.tokenizer.as_deref().or(a.init.as_deref());
    let mut train = read_instances(&a.instances)?;
    tokenize(&mut train, tokenizer, &a.instances)?;
    check_fits(&train, &params, &a.instances)?;
    let mut validation = match &a.validation {
        Some(v) => read_instances(v)?,
        None => Vec::new(),
    };
    if let Some(v) = &a.validation {
        tokenize(&mut validation, tokenizer, v)?;
        check_fits(&validation, &params, v)?;
        let ids: std::collections::HashSet<&str> = train.iter().map(|x| x.id.as_str()).collect();
        if let Some(x) = validation.iter().find(|x| ids.contains(x.id.as_str())) {
            bail!("{}, line {}: instance id {:?} is also a training instance", v.display(), x.line, x.id);
        }
    }
    let n = train.len();
    let steps = match a.steps {
        Some(s) => s,
        None => {
            let epochs = a.epochs.unwrap_or(1);
            let s = epochs.checked_mul(n).map(|t| t.div_ceil(a.batch_size)).filter(|&s| s <= MAX_STEPS);
            s.with_context(|| {
                format!("--epochs {epochs} over {n} instances makes more than {MAX_STEPS} steps of {}", a.batch_size)
            })?
        }
    };
    ensure!(steps >= 1, "the run has no steps: give --steps or --epochs of at least 1");
    if a.epochs.is_some_and(|e| e > 1) && !a.quiet {
        eprintln!(
            "warning: --epochs {} re-treats every instance: an instance's treatment step stays its first exposure, every exposure is in batches.jsonl",
            a.epochs.unwrap_or(1)
        );
    }
    let mut checkpoints = parse_checkpoint_steps(&a.checkpoint_steps, steps)?;
    checkpoints.insert(steps);
    let cfg = TrainConfig {
        lr: a.lr,
        min_lr: a.min_lr.unwrap_or(0.1 * a.lr),
        warmup: a.warmup,
        steps,
        schedule,
        adamw: AdamWConfig { weight_decay: a.weight_decay, ..AdamWConfig::default() },
        grad_clip: if a.grad_clip > 0.0 { Some(a.grad_clip) } else { None },
    };
    ensure!(a.grad_clip >= 0.0 && a.grad_clip.is_finite(), "--grad-clip must be a non-negative number");
    let mut trainer = Trainer::new(params, &cfg)?;
    let settings = run_settings(a, steps, &checkpoints, tokenizer)?;
    let run_file = a.out.join(memsteer_lm::train::run::RUN_FILE);
    let mut logs = Logs { out: &a.out, batches: Vec::new(), losses: Vec::new(), checkpoints: Vec::new() };
    let mut done = 0;
    if run_file.exists() || a.out.join("batches.jsonl").exists() {
        let before: serde_json::Value = std::fs::read_to_string(&run_file)
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .with_context(|| format!("{} holds files of a training run but no readable run.json", a.out.display()))?;
        ensure!(
            before == settings,
            "{} already holds a different training run (other settings, model or instances; see its run.json); choose another --out or remove it",
            a.out.display()
        );
        done = resume(&a.out, &mut trainer, &mut logs, &train, &checkpoints)?;
        if !a.quiet && done > 0 {
            eprintln!("resuming {} from the checkpoint at step {done}", a.out.display());
        }
    } else {
        std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
        write_atomic(&run_file, |w| writeln!(w, "{settings:#}"))?;
    }
    if done == 0 && checkpoints.contains(&0) && logs.checkpoints.is_empty() {
        save_checkpoint(&trainer, &a.out.join("step0"), tokenizer)?;
        logs.checkpoints.push(0);
        logs.write(&train, &validation)?;
    }
    let bar = if a.quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(steps as u64).with_style(
            ProgressStyle::with_template("{prefix:>8} [{bar:30}] {pos}/{len} {msg} eta {eta}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        )
    };
    bar.set_prefix("train");
    let start = Instant::now();
    let mut tokens_seen = 0usize;
    let mut order: HashMap<u64, Vec<usize>> = HashMap::new();
    let mut last_loss = logs.losses.last().map_or(f64::NAN, |l| l.0);
    bar.set_position(done as u64);
    for k in done + 1..=steps {
        let ids: Vec<usize> = ((k - 1) * a.batch_size..k * a.batch_size)
            .map(|pos| {
                let epoch = (pos / n) as u64;
                // Only the current epoch's (and at a boundary, the next one's) order is kept.
                order.retain(|&e, _| e + 1 >= epoch);
                order.entry(epoch).or_insert_with(|| permutation(n, a.seed, epoch))[pos % n]
            })
            .collect();
        let seqs: Vec<&[u32]> = ids.iter().map(|&i| train[i].tokens.as_slice()).collect();
        let st = trainer.train_step(&seqs).with_context(|| format!("optimizer step {k}"))?;
        tokens_seen += seqs.iter().map(|s| s.len()).sum::<usize>();
        last_loss = st.loss;
        logs.batches.push(ids);
        logs.losses.push((st.loss, st.lr));
        let rate = tokens_seen as f64 / start.elapsed().as_secs_f64().max(1e-9);
        bar.set_message(format!("loss {:.4} lr {:.2e} {rate:.0} tok/s", st.loss, st.lr));
        bar.inc(1);
        if checkpoints.contains(&k) {
            save_checkpoint(&trainer, &a.out.join(format!("step{k}")), tokenizer)?;
            logs.checkpoints.push(k);
            logs.write(&train, &validation)?;
        }
    }
    bar.finish_and_clear();
    if !a.quiet {
        let secs = start.elapsed().as_secs_f64();
        eprintln!(
            "trained to step {steps} ({tokens_seen} tokens in this run) in {secs:.1} s, {:.0} tokens/s; last loss {last_loss:.4}",
            tokens_seen as f64 / secs.max(1e-9)
        );
    }
    Ok(TrainOutcome { steps, checkpoints: logs.checkpoints, last_loss })
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
