//! `memsteer train`: trains a small model of any family the runtime reads on instances with every batch
//! logged, writing checkpoints and the files `memsteer logprobs` needs to measure memorisation
//! (`memsteer_lm::train::run` describes the run directory and how a rerun resumes).

use std::path::PathBuf;

use anyhow::{Result, ensure};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use memsteer_lm::train::Schedule;
use memsteer_lm::train::run::{Init, Length, MAX_BATCH_SIZE, MAX_STEPS, RunEvent, RunOutcome, RunSpec};

/// Arguments of `memsteer train`.
#[derive(Debug, Clone, Args)]
pub struct TrainArgs {
    /// A TOML file holding any of these flags as keys; the command line overrides it.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// A Hugging Face `config.json` (GPT-2, GPT-NeoX, Llama, Mistral, Qwen 2, Qwen 3, OLMo 2 or Gemma 3): the model is initialised randomly from --seed.
    #[arg(long, value_name = "FILE", conflicts_with = "init", required_unless_present = "init")]
    pub model_config: Option<PathBuf>,
    /// Start from the weights of a Hugging Face directory of one of those families instead.
    #[arg(long, value_name = "DIR")]
    pub init: Option<PathBuf>,
    /// Training instances, JSON lines with "id" and "tokens" or "text".
    #[arg(long, value_name = "FILE")]
    pub instances: PathBuf,
    /// Validation instances (same format), never trained on; listed with treatment_step null.
    #[arg(long, value_name = "FILE")]
    pub validation: Option<PathBuf>,
    /// Tokenizer files for "text" instances, copied into every checkpoint (default: --init).
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
    /// Data order: `shuffled` (a seeded permutation per epoch) or `file` (the instances file's order).
    #[arg(long, default_value = "shuffled", value_parser = ["shuffled", "file"])]
    pub order: String,
    /// Checkpoint steps: integers and START:END:STRIDE ranges, comma-separated; the last is always saved.
    #[arg(long, default_value = "0", value_name = "LIST")]
    pub checkpoint_steps: String,
    /// Output directory.
    #[arg(long)]
    pub out: PathBuf,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

impl TrainArgs {
    /// The run these flags describe.
    pub fn spec(&self) -> Result<RunSpec> {
        ensure!(
            (1..=MAX_BATCH_SIZE).contains(&self.batch_size),
            "--batch-size must be between 1 and {MAX_BATCH_SIZE}, found {}",
            self.batch_size
        );
        let length = match (self.steps, self.epochs) {
            (Some(s), _) => {
                ensure!(s <= MAX_STEPS, "--steps must be at most {MAX_STEPS}, found {s}");
                Length::Steps(s)
            }
            (None, e) => Length::Epochs(e.unwrap_or(1)),
        };
        let init = match (&self.model_config, &self.init) {
            (Some(c), None) => Init::Config(c.clone()),
            (None, Some(d)) => Init::Weights(d.clone()),
            _ => anyhow::bail!("give exactly one of --model-config FILE and --init DIR"),
        };
        let schedule: Schedule = self.schedule.parse()?;
        Ok(RunSpec {
            init,
            instances: self.instances.clone(),
            validation: self.validation.clone(),
            tokenizer: self.tokenizer.clone(),
            out: self.out.clone(),
            batch_size: self.batch_size,
            length,
            lr: self.lr,
            min_lr: self.min_lr,
            warmup: self.warmup,
            schedule,
            weight_decay: self.weight_decay,
            grad_clip: self.grad_clip,
            seed: self.seed,
            shuffle: self.order == "shuffled",
            checkpoint_steps: self.checkpoint_steps.clone(),
        })
    }
}

/// Runs `memsteer train`: the library's run with a progress bar.
pub fn run(a: &TrainArgs) -> Result<RunOutcome> {
    let spec = a.spec()?;
    let bar = ProgressBar::hidden();
    let outcome = memsteer_lm::train::run::run(&spec, &mut |event| match event {
        RunEvent::Warning(w) => bar.suspend(|| eprintln!("warning: {w}")),
        RunEvent::Started { done, steps } => {
            if !a.quiet {
                if done > 0 {
                    eprintln!("resuming {} from the checkpoint at step {done}", a.out.display());
                }
                bar.set_length(steps as u64);
                bar.set_position(done as u64);
                bar.set_style(
                    ProgressStyle::with_template("{prefix:>8} [{bar:30}] {pos}/{len} {msg} eta {eta}")
                        .unwrap_or_else(|_| ProgressStyle::default_bar())
                        .progress_chars("=> "),
                );
                bar.set_prefix("train");
                bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
            }
        }
        RunEvent::Step { stats, tokens_per_second } => {
            bar.set_message(format!("loss {:.4} lr {:.2e} {tokens_per_second:.0} tok/s", stats.loss, stats.lr));
            bar.set_position(stats.step as u64);
        }
    })?;
    bar.finish_and_clear();
    if !a.quiet {
        eprintln!(
            "trained to step {} ({} tokens in this run) in {:.1} s, {:.0} tokens/s; last loss {:.4}",
            outcome.steps,
            outcome.tokens,
            outcome.seconds,
            outcome.tokens as f64 / outcome.seconds.max(1e-9),
            outcome.last_loss
        );
    }
    Ok(outcome)
}
