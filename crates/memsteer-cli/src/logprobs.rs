//! `memsteer logprobs`: per-instance sequence log-probabilities at every checkpoint, as a panel for
//! `memsteer profile` (`memsteer_lm::score` does the work, resumably and by shards).

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{Context, Result, ensure};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use memsteer_kernels::Device;
use memsteer_lm::score::{ScoreEvent, ScoreOutcome, ScoreSpec};

/// Arguments of `memsteer logprobs` (checkpoints of every family the runtime reads).
#[derive(Debug, Clone, Args)]
pub struct LogprobsArgs {
    /// A checkpoint as STEP=DIR (a Hugging Face model directory); repeat for every checkpoint.
    #[arg(long = "checkpoint", value_name = "STEP=DIR")]
    pub checkpoint: Vec<String>,
    /// A JSON object mapping checkpoint steps to model directories (relative to the manifest).
    #[arg(long = "checkpoints", value_name = "MANIFEST")]
    pub manifest: Option<PathBuf>,
    /// A directory of checkpoints named step{N} or step{N}-…, as Pythia's and OLMo's revisions download.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["checkpoint", "manifest"])]
    pub checkpoint_dir: Option<PathBuf>,
    /// Instances, JSON lines with "id", "treatment_step" (or null) and "tokens" or "text".
    #[arg(long)]
    pub instances: PathBuf,
    /// Output panel: long CSV, or Parquet when the name ends in .parquet.
    #[arg(long)]
    pub out: PathBuf,
    /// Also write per-token log-probabilities here, one JSON line per instance and checkpoint.
    #[arg(long, value_name = "FILE")]
    pub per_token: Option<PathBuf>,
    /// Sequences evaluated together (in parallel).
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Where to score: cpu, or cuda / cuda:N in a build with the cuda feature.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Evaluate only shard I of N (0-based, instances i with i mod N = I), e.g. from a job array.
    #[arg(long, value_name = "I/N")]
    pub shard: Option<String>,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

fn parse_checkpoints(a: &LogprobsArgs) -> Result<BTreeMap<u64, PathBuf>> {
    let mut out = BTreeMap::new();
    let mut add = |step: u64, dir: PathBuf, what: &str| -> Result<()> {
        ensure!(dir.is_dir(), "{what}: checkpoint directory {} does not exist", dir.display());
        ensure!(out.insert(step, dir).is_none(), "{what}: checkpoint step {step} is given twice");
        Ok(())
    };
    for spec in &a.checkpoint {
        let (step, dir) = spec.split_once('=').with_context(|| format!("--checkpoint {spec:?}: expected STEP=DIR"))?;
        let step: u64 = step
            .trim()
            .parse()
            .with_context(|| format!("--checkpoint {spec:?}: STEP must be a non-negative integer"))?;
        add(step, PathBuf::from(dir), "--checkpoint")?;
    }
    let listed = match (&a.manifest, &a.checkpoint_dir) {
        (Some(m), _) => Some((memsteer_lm::score::read_manifest(m)?, m)),
        (None, Some(d)) => Some((memsteer_lm::score::checkpoints_in(d)?, d)),
        (None, None) => None,
    };
    if let Some((list, from)) = listed {
        for (step, dir) in list {
            add(step, dir, &from.display().to_string())?;
        }
    }
    ensure!(
        !out.is_empty(),
        "no checkpoints: give --checkpoint STEP=DIR, --checkpoints MANIFEST or --checkpoint-dir DIR"
    );
    Ok(out)
}

fn parse_shard(s: &Option<String>) -> Result<(usize, usize)> {
    let Some(s) = s else { return Ok((0, 1)) };
    let (i, n) = s.split_once('/').with_context(|| format!("--shard {s:?}: expected I/N"))?;
    let (i, n): (usize, usize) =
        (i.parse().context("--shard: I must be an integer")?, n.parse().context("--shard: N must be an integer")?);
    ensure!(n >= 1 && i < n, "--shard {s}: expected 0 ≤ I < N");
    Ok((i, n))
}

/// Runs `memsteer logprobs`.
pub fn run(a: &LogprobsArgs) -> Result<ScoreOutcome> {
    ensure!(a.batch_size >= 1, "--batch-size must be at least 1");
    let spec = ScoreSpec {
        device: Device::parse(&a.device).with_context(|| format!("--device {}", a.device))?,
        checkpoints: parse_checkpoints(a)?,
        shard: parse_shard(&a.shard)?,
        instances: a.instances.clone(),
        out: a.out.clone(),
        per_token: a.per_token.clone(),
        batch_size: a.batch_size,
    };
    let bar = ProgressBar::hidden();
    let mut told = None;
    let outcome = memsteer_lm::score::run(&spec, &mut |event| match event {
        ScoreEvent::Started { units, tokens } if !a.quiet => {
            bar.set_length((units * tokens) as u64);
            bar.set_style(
                ProgressStyle::with_template(
                    "{prefix:>14} [{bar:30}] {human_pos}/{human_len} tokens, {per_sec} eta {eta}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
        }
        ScoreEvent::Started { .. } => {}
        ScoreEvent::Checkpoint(step) => bar.set_prefix(format!("step {step}")),
        ScoreEvent::Tokens(n) => bar.inc(n as u64),
        // Say what the products run in, once (and again should a checkpoint differ).
        ScoreEvent::Loaded { compute, .. } if !a.quiet && told.as_ref() != Some(&compute) => {
            bar.suspend(|| eprintln!("products: {compute} ({})", memsteer_kernels::dispatch::describe()));
            told = Some(compute);
        }
        _ => {}
    })?;
    bar.finish_and_clear();
    if !a.quiet {
        let (shard, shards) = spec.shard;
        println!(
            "shard {shard}/{shards}: {} checkpoint(s) computed ({} tokens in {:.1} s), {} already done; {}",
            outcome.computed,
            outcome.computed * outcome.tokens,
            outcome.seconds,
            outcome.skipped,
            if outcome.assembled {
                format!("wrote {}", a.out.display())
            } else {
                format!("{} unit(s) of other shards still missing", outcome.missing)
            }
        );
    }
    Ok(outcome)
}
