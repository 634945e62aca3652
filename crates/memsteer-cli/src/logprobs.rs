//! `memsteer logprobs`: per-instance sequence log-probabilities at every checkpoint, as a panel for
//! `memsteer profile`. Work is split into (checkpoint, shard) units, each written atomically to a part
//! file; a rerun skips finished units, and the panel is assembled once every unit of every shard exists.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail, ensure};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use memsteer_kernels::Device;

use memsteer_panel::write_atomic;

/// Arguments of `memsteer logprobs` (GPT-2 and GPT-NeoX checkpoints).
#[derive(Debug, Clone, Args)]
pub struct LogprobsArgs {
    /// A checkpoint as STEP=DIR (a Hugging Face model directory); repeat for every checkpoint.
    #[arg(long = "checkpoint", value_name = "STEP=DIR")]
    pub checkpoint: Vec<String>,
    /// A JSON object mapping checkpoint steps to model directories (relative to the manifest).
    #[arg(long = "checkpoints", value_name = "MANIFEST")]
    pub manifest: Option<PathBuf>,
    /// Instances, JSON lines: {"id": …, "treatment_step": int | null, "tokens": [int, …]} or with a
    /// "text" string instead of "tokens" (tokenized with the first checkpoint's tokenizer).
    #[arg(long)]
    pub instances: PathBuf,
    /// Output panel: long CSV (instance_id,treatment_step,checkpoint_step,outcome), or Parquet with the
    /// same columns when the name ends in .parquet.
    #[arg(long)]
    pub out: PathBuf,
    /// Also write per-token log-probabilities, one JSON line per (instance, checkpoint):
    /// {"id": …, "checkpoint_step": …, "token_log_probs": [log p(x_1 | x_0), …]}.
    #[arg(long, value_name = "FILE")]
    pub per_token: Option<PathBuf>,
    /// Sequences evaluated together (in parallel).
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Where to score: `cpu`, or `cuda` / `cuda:N` in a build with the `cuda` feature (weights stay in
    /// their stored type on the GPU; f16/bf16 checkpoints run on tensor cores).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Evaluate only shard I of N (0-based, instances i with i mod N = I), e.g. from a job array.
    #[arg(long, value_name = "I/N")]
    pub shard: Option<String>,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

/// One instance to score (or to train on, in `memsteer train`).
#[derive(Debug, Clone)]
pub(crate) struct Instance {
    pub(crate) id: String,
    treatment: Option<u64>,
    pub(crate) tokens: Vec<u32>,
    /// Text to tokenize with the model's tokenizer (then `tokens` is filled in).
    pub(crate) text: Option<String>,
    pub(crate) line: usize,
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
    if let Some(m) = &a.manifest {
        let text = std::fs::read_to_string(m).with_context(|| format!("reading {}", m.display()))?;
        let v: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("{}: not valid JSON", m.display()))?;
        let obj = v
            .as_object()
            .with_context(|| format!("{}: expected a JSON object mapping steps to directories", m.display()))?;
        let base = m.parent().unwrap_or(Path::new("."));
        for (k, d) in obj {
            let step: u64 = k
                .parse()
                .with_context(|| format!("{}: key {k:?} is not a step (non-negative integer)", m.display()))?;
            let d =
                d.as_str().with_context(|| format!("{}: the directory of step {k} must be a string", m.display()))?;
            add(step, base.join(d), &m.display().to_string())?;
        }
    }
    ensure!(!out.is_empty(), "no checkpoints: give --checkpoint STEP=DIR or --checkpoints MANIFEST");
    Ok(out)
}

pub(crate) fn read_instances(path: &Path) -> Result<Vec<Instance>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading instances {}", path.display()))?;
    let mut out = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for (i, line) in text.lines().enumerate() {
        let at = || format!("{}, line {}", path.display(), i + 1);
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value =
            serde_json::from_str(line).with_context(|| format!("{}: not a JSON object", at()))?;
        let id = match v.get("id") {
            Some(serde_json::Value::String(s)) if !s.is_empty() => s.clone(),
            Some(serde_json::Value::Number(n)) => n.to_string(),
            other => bail!("{}: field `id` must be a non-empty string or a number, found {:?}", at(), other),
        };
        ensure!(seen.insert(id.clone()), "{}: instance id {id:?} appears twice", at());
        let treatment =
            match v.get("treatment_step") {
                None | Some(serde_json::Value::Null) => None,
                Some(x) => Some(x.as_u64().filter(|s| *s >= 1).with_context(|| {
                    format!("{}: `treatment_step` must be a 1-based step or null, found {x}", at())
                })?),
            };
        let (tokens, text) = match (v.get("tokens"), v.get("text")) {
            (Some(serde_json::Value::Array(t)), _) => {
                let t = t
                    .iter()
                    .map(|x| x.as_u64().filter(|n| *n <= u64::from(u32::MAX)).map(|n| n as u32))
                    .collect::<Option<Vec<u32>>>()
                    .with_context(|| format!("{}: `tokens` must hold non-negative integer ids", at()))?;
                ensure!(
                    t.len() >= 2,
                    "{}: instance {id:?} has {} token(s); a sequence log-probability needs at least two (the first token is not scored)",
                    at(),
                    t.len()
                );
                (t, None)
            }
            (None, Some(serde_json::Value::String(text))) => (Vec::new(), Some(text.clone())),
            _ => bail!("{}: expected a `tokens` array of ids or a `text` string", at()),
        };
        out.push(Instance { id, treatment, tokens, text, line: i + 1 });
    }
    ensure!(!out.is_empty(), "{}: no instances", path.display());
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

fn part_path(parts: &Path, step: u64, shard: usize, shards: usize) -> PathBuf {
    parts.join(format!("step-{step}.shard-{shard}-of-{shards}.csv"))
}

fn token_part_path(parts: &Path, step: u64, shard: usize, shards: usize) -> PathBuf {
    parts.join(format!("step-{step}.shard-{shard}-of-{shards}.tokens.jsonl"))
}

/// Whether `(step, shard)`'s parts are all written.
fn unit_is_finished(parts: &Path, step: u64, shard: usize, shards: usize, per_token: bool) -> bool {
    part_path(parts, step, shard, shards).exists()
        && (!per_token || token_part_path(parts, step, shard, shards).exists())
}

fn csv_id(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) { format!("\"{}\"", s.replace('"', "\"\"")) } else { s.to_string() }
}

/// What a run did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogprobsOutcome {
    /// Units computed in this run.
    pub computed: usize,
    /// Units found finished and skipped.
    pub skipped: usize,
    /// Whether the panel was assembled.
    pub assembled: bool,
}

/// Runs `memsteer logprobs`.
pub fn run(a: &LogprobsArgs) -> Result<LogprobsOutcome> {
    ensure!(a.batch_size >= 1, "--batch-size must be at least 1");
    let device = Device::parse(&a.device).with_context(|| format!("--device {}", a.device))?;
    let checkpoints = parse_checkpoints(a)?;
    let mut instances = read_instances(&a.instances)?;
    if instances.iter().any(|x| x.text.is_some()) {
        // Text is tokenized once, with the tokenizer shipped next to the first checkpoint.
        let dir = checkpoints.values().next().context("no checkpoints")?;
        let tok = memsteer_lm::tokenizer::Tokenizer::from_dir(dir).with_context(|| {
            format!("{} has `text` instances: loading the tokenizer of {}", a.instances.display(), dir.display())
        })?;
        for x in &mut instances {
            if let Some(text) = &x.text {
                x.tokens = tok
                    .encode(text)
                    .with_context(|| format!("{}, line {}: tokenizing", a.instances.display(), x.line))?;
                ensure!(
                    x.tokens.len() >= 2,
                    "{}, line {}: instance {:?} tokenizes to {} token(s); a sequence log-probability needs at least two (the first token is not scored)",
                    a.instances.display(),
                    x.line,
                    x.id,
                    x.tokens.len()
                );
            }
        }
    }
    let (shard, shards) = parse_shard(&a.shard)?;
    let mine: Vec<&Instance> =
        instances.iter().enumerate().filter(|(i, _)| i % shards == shard).map(|(_, x)| x).collect();

    let mut parts_name = a.out.file_name().unwrap_or_default().to_os_string();
    parts_name.push(".parts");
    let parts = a.out.with_file_name(parts_name);
    std::fs::create_dir_all(&parts).with_context(|| format!("creating {}", parts.display()))?;
    // The parts belong to one set of inputs: refuse to mix runs over different instances, grids or
    // weights. Each checkpoint is fingerprinted (headers and samples of every tensor: microseconds).
    let mut weights = serde_json::Map::new();
    for (step, dir) in &checkpoints {
        // The model is its config and its weights; a finished step whose weights were since deleted (to
        // free disk) is recorded as unavailable and not compared.
        let fp = match memsteer_lm::weights::Weights::open(dir) {
            Ok(w) => w.fingerprint(),
            Err(_) if unit_is_finished(&parts, *step, shard, shards, a.per_token.is_some()) => "unavailable".into(),
            Err(e) => {
                return Err(anyhow::Error::new(e)
                    .context(format!("checkpoint {step}: opening the weights in {}", dir.display())));
            }
        };
        let config = std::fs::read(dir.join("config.json"))
            .map(|b| format!("{:016x}", memsteer_panel::rng::hash_key(0, &b)))
            .unwrap_or_else(|_| "unavailable".into());
        weights.insert(
            step.to_string(),
            serde_json::json!({"dir": dir.display().to_string(), "weights": fp, "config": config}),
        );
    }
    let fingerprint = serde_json::json!({
        "instances": instances.len(),
        "instances_hash": format!("{:016x}", memsteer_panel::rng::hash_key(0, &std::fs::read(&a.instances)?)),
        "checkpoints": checkpoints.keys().collect::<Vec<_>>(),
        "shards": shards,
        "checkpoint_weights": weights,
    });
    let ledger = parts.join("ledger.json");
    if ledger.exists() {
        let old: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&ledger)?)
            .with_context(|| format!("{}: not valid JSON", ledger.display()))?;
        // A different model under the same step is the mistake worth naming precisely.
        let same = |a: &serde_json::Value, b: &serde_json::Value| a == b || a == "unavailable" || b == "unavailable";
        if let Some(old_weights) = old.get("checkpoint_weights").and_then(|w| w.as_object()) {
            for (step, now) in fingerprint["checkpoint_weights"].as_object().into_iter().flatten() {
                if let Some(before) = old_weights.get(step) {
                    let what = if !same(&before["weights"], &now["weights"]) {
                        Some("other weights")
                    } else if before.get("config").is_some() && !same(&before["config"], &now["config"]) {
                        Some("another config.json")
                    } else {
                        None
                    };
                    if let Some(what) = what {
                        bail!(
                            "checkpoint {step}: {} holds {what} than the ones the finished parts in {} were computed from ({}); remove {} to start over, or point step {step} at the original checkpoint",
                            now["dir"].as_str().unwrap_or_default(),
                            parts.display(),
                            before["dir"].as_str().unwrap_or_default(),
                            parts.display()
                        );
                    }
                }
            }
        }
        // Directories may move between machines (shards); the models may not. A ledger written before
        // fingerprints existed is compared on the rest and upgraded.
        let rest = |v: &serde_json::Value| {
            let mut v = v.clone();
            if let Some(o) = v.as_object_mut() {
                o.remove("checkpoint_weights");
            }
            v
        };
        ensure!(
            rest(&old) == rest(&fingerprint),
            "{} was made for other inputs (instances, checkpoints or shard count differ); remove {} to start over",
            ledger.display(),
            parts.display()
        );
        if old.get("checkpoint_weights").is_none() {
            write_atomic(&ledger, |w| writeln!(w, "{fingerprint}"))?;
        }
    } else {
        write_atomic(&ledger, |w| writeln!(w, "{fingerprint}"))?;
    }

    let total_tokens: usize = mine.iter().map(|x| x.tokens.len()).sum();
    let per_token = a.per_token.is_some();
    let unit_done = |step: u64, i: usize| {
        part_path(&parts, step, i, shards).exists() && (!per_token || token_part_path(&parts, step, i, shards).exists())
    };
    let todo: Vec<(&u64, &PathBuf)> = checkpoints.iter().filter(|(s, _)| !unit_done(**s, shard)).collect();
    let skipped = checkpoints.len() - todo.len();
    let bar = if a.quiet { ProgressBar::hidden() } else { ProgressBar::new((todo.len() * total_tokens) as u64) };
    bar.set_style(
        ProgressStyle::with_template("{prefix:>14} [{bar:30}] {human_pos}/{human_len} tokens, {per_sec} eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    let start = Instant::now();
    for (step, dir) in &todo {
        bar.set_prefix(format!("step {step}"));
        let model = memsteer_lm::DeviceModel::load(dir, &device)
            .with_context(|| format!("loading checkpoint {step} from {}", dir.display()))?;
        let mut outcomes = Vec::with_capacity(mine.len());
        let mut token_lps: Vec<Vec<f32>> = Vec::new();
        for batch in mine.chunks(a.batch_size) {
            let seqs: Vec<&[u32]> = batch.iter().map(|x| x.tokens.as_slice()).collect();
            let lps = model.token_log_probs_batch(&seqs).map_err(|e| match e {
                // Name the instance when one sequence is at fault.
                memsteer_lm::LmError::Sequence { index, message } => anyhow::anyhow!(
                    "{}: instance {:?} ({}, line {}): {message}",
                    dir.display(),
                    batch[index].id,
                    a.instances.display(),
                    batch[index].line
                ),
                e if batch.len() == 1 => anyhow::anyhow!(
                    "{}: instance {:?} ({}, line {}): {e}",
                    dir.display(),
                    batch[0].id,
                    a.instances.display(),
                    batch[0].line
                ),
                e => anyhow::anyhow!("{}: {e}", dir.display()),
            })?;
            outcomes.extend(lps.iter().map(|lp| lp.iter().map(|&v| f64::from(v)).sum::<f64>()));
            if per_token {
                token_lps.extend(lps);
            }
            bar.inc(batch.iter().map(|x| x.tokens.len() as u64).sum());
        }
        if per_token {
            let path = token_part_path(&parts, **step, shard, shards);
            write_atomic(&path, |w| {
                for (x, lp) in mine.iter().zip(&token_lps) {
                    let line = serde_json::json!({"id": x.id, "checkpoint_step": step, "token_log_probs": lp});
                    writeln!(w, "{line}")?;
                }
                Ok(())
            })
            .with_context(|| format!("writing {}", path.display()))?;
        }
        let path = part_path(&parts, **step, shard, shards);
        write_atomic(&path, |w| {
            for (x, y) in mine.iter().zip(&outcomes) {
                let t = x.treatment.map_or("never".to_string(), |t| t.to_string());
                writeln!(w, "{},{t},{step},{y:?}", csv_id(&x.id))?;
            }
            Ok(())
        })
        .with_context(|| format!("writing {}", path.display()))?;
    }
    bar.finish_and_clear();
    let computed = todo.len();

    // Assemble when every unit of every shard is there.
    let all: Vec<PathBuf> = checkpoints
        .keys()
        .flat_map(|s| (0..shards).map(move |i| (*s, i)))
        .map(|(s, i)| part_path(&parts, s, i, shards))
        .collect();
    let token_parts: Vec<PathBuf> = if per_token {
        checkpoints
            .keys()
            .flat_map(|s| (0..shards).map(move |i| (*s, i)))
            .map(|(s, i)| token_part_path(&parts, s, i, shards))
            .collect()
    } else {
        Vec::new()
    };
    let missing = all.iter().chain(&token_parts).filter(|p| !p.exists()).count();
    let assembled = missing == 0;
    if assembled {
        let mut csv = b"instance_id,treatment_step,checkpoint_step,outcome\n".to_vec();
        for p in &all {
            csv.extend_from_slice(&std::fs::read(p).with_context(|| format!("reading {}", p.display()))?);
        }
        if a.out.extension().is_some_and(|e| e.eq_ignore_ascii_case("parquet")) {
            // Through the panel type, so that the file is validated and typed like any other panel.
            let (panel, _) = memsteer_panel::read::parse_csv(&csv, &parts.display().to_string(), &Default::default())
                .with_context(|| format!("assembling {}", a.out.display()))?;
            panel.write(&a.out).with_context(|| format!("writing {}", a.out.display()))?;
        } else {
            write_atomic(&a.out, |w| w.write_all(&csv)).with_context(|| format!("writing {}", a.out.display()))?;
        }
        if let Some(pt) = &a.per_token {
            write_atomic(pt, |w| {
                for p in &token_parts {
                    w.write_all(&std::fs::read(p)?)?;
                }
                Ok(())
            })
            .with_context(|| format!("writing {}", pt.display()))?;
        }
    }
    if !a.quiet {
        let secs = start.elapsed().as_secs_f64();
        println!(
            "shard {shard}/{shards}: {computed} checkpoint(s) computed ({} tokens in {secs:.1} s), {skipped} already done; {}",
            computed * total_tokens,
            if assembled {
                format!("wrote {}", a.out.display())
            } else {
                format!("{missing} unit(s) of other shards still missing")
            }
        );
    }
    Ok(LogprobsOutcome { computed, skipped, assembled })
}
