//! Scoring instances under every checkpoint of a run into a panel (what `memsteer logprobs` does):
//! per-instance sequence log-probabilities `Y_c(x) = Σ_t log p_c(x_t | x_<t)` as the long panel
//! `instance_id,treatment_step,checkpoint_step,outcome` that `memsteer profile` reads.
//!
//! Work is split into (checkpoint, shard) units, each written atomically to a part file in
//! `OUT.parts/`; a rerun skips finished units, and the panel is assembled once every unit of every
//! shard exists. A ledger in the parts directory fingerprints the inputs (instances, the checkpoint
//! grid, each checkpoint's weights and config), so parts of different inputs never mix; each unit also
//! records the precision class it was scored in (`f32`, `bf16`, `cuda-f16`, …), and a run that would
//! add another class to a panel is refused.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use memsteer_kernels::Device;
use memsteer_panel::durable::write as write_atomic;
use memsteer_panel::rng::hash_key;

use crate::error::{At, bail, ensure};
use crate::instances::{self, Instance};
use crate::{DeviceModel, LmError, Result};

/// What to score and where the panel goes.
#[derive(Debug, Clone)]
pub struct ScoreSpec {
    /// Checkpoint step → Hugging Face model directory.
    pub checkpoints: BTreeMap<u64, PathBuf>,
    /// The instances file ([`crate::instances`]); `text` instances are tokenized with the first
    /// checkpoint's tokenizer.
    pub instances: PathBuf,
    /// The panel: long CSV, or Parquet when the name ends in `.parquet` (and the panel crate's
    /// `parquet` feature is on).
    pub out: PathBuf,
    /// Also write per-token log-probabilities here, one JSON line per (instance, checkpoint):
    /// `{"id", "checkpoint_step", "token_log_probs": [log p(x_1 | x_0), …]}`.
    pub per_token: Option<PathBuf>,
    /// Sequences scored together.
    pub batch_size: usize,
    /// Where to score.
    pub device: Device,
    /// `(i, n)`: score only shard `i` of `n` (instances `j` with `j mod n = i`).
    pub shard: (usize, usize),
}

/// What [`run`] reports while it works.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum ScoreEvent {
    /// Scoring starts: `units` checkpoints to compute for this shard, `tokens` tokens each.
    Started {
        /// Checkpoints to compute.
        units: usize,
        /// Tokens of this shard's instances.
        tokens: usize,
    },
    /// A checkpoint is being scored.
    Checkpoint(u64),
    /// This many more tokens were scored.
    Tokens(usize),
    /// A checkpoint was loaded; `compute` says what its products run in (e.g. `bf16 on amx kernels`).
    Loaded {
        /// The checkpoint's step.
        step: u64,
        /// [`crate::DeviceModel::compute`].
        compute: String,
    },
}

/// What a run did.
#[derive(Debug, Clone, PartialEq)]
pub struct ScoreOutcome {
    /// Checkpoints computed in this run.
    pub computed: usize,
    /// Checkpoints found finished and skipped.
    pub skipped: usize,
    /// Whether the panel was assembled.
    pub assembled: bool,
    /// Units of other shards still missing (0 when assembled).
    pub missing: usize,
    /// Tokens of this shard's instances (scored once per computed checkpoint).
    pub tokens: usize,
    /// Seconds spent scoring.
    pub seconds: f64,
}

/// Reads a checkpoint manifest: a JSON object mapping steps to model directories relative to the
/// manifest (`memsteer train` writes one as `checkpoints.json`).
pub fn read_manifest(path: &Path) -> Result<BTreeMap<u64, PathBuf>> {
    let text = std::fs::read_to_string(path).map_err(|source| LmError::Io { path: path.into(), source })?;
    let v: serde_json::Value = serde_json::from_str(&text).at(|| format!("{}: not valid JSON", path.display()))?;
    let Some(obj) = v.as_object() else {
        bail!("{}: expected a JSON object mapping steps to directories", path.display())
    };
    let base = path.parent().unwrap_or(Path::new("."));
    let mut out = BTreeMap::new();
    for (k, d) in obj {
        let Ok(step) = k.parse::<u64>() else {
            bail!("{}: key {k:?} is not a step (non-negative integer)", path.display())
        };
        let Some(d) = d.as_str() else { bail!("{}: the directory of step {k} must be a string", path.display()) };
        ensure!(out.insert(step, base.join(d)).is_none(), "{}: step {step} is given twice", path.display());
    }
    Ok(out)
}

/// The checkpoints of a directory laid out as Pythia's and OLMo's revisions download: every
/// subdirectory `step{N}` or `step{N}-…` (`step1000-tokens4B`) is the checkpoint at step `N`.
pub fn checkpoints_in(dir: &Path) -> Result<BTreeMap<u64, PathBuf>> {
    let entries = std::fs::read_dir(dir).map_err(|source| LmError::Io { path: dir.into(), source })?;
    let mut out = BTreeMap::new();
    for entry in entries {
        let path = entry.map_err(|source| LmError::Io { path: dir.into(), source })?.path();
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let Some(tail) = name.strip_prefix("step") else { continue };
        let digits: String = tail.chars().take_while(char::is_ascii_digit).collect();
        let rest = &tail[digits.len()..];
        if !path.is_dir() || digits.is_empty() || !(rest.is_empty() || rest.starts_with('-')) {
            continue;
        }
        let step: u64 = digits.parse().at(|| format!("{}: step number", path.display()))?;
        if let Some(other) = out.insert(step, path.clone()) {
            bail!("{} and {} are both the checkpoint of step {step}", other.display(), path.display());
        }
    }
    ensure!(
        !out.is_empty(),
        "{}: no checkpoint subdirectories (expected step{{N}} or step{{N}}-…, as Pythia's and OLMo's revisions download)",
        dir.display()
    );
    Ok(out)
}

fn part_path(parts: &Path, step: u64, shard: usize, shards: usize) -> PathBuf {
    parts.join(format!("step-{step}.shard-{shard}-of-{shards}.csv"))
}

/// The precision class ([`DeviceModel::precision`]) a unit's parts were scored in, written before them.
fn precision_path(parts: &Path, step: u64, shard: usize, shards: usize) -> PathBuf {
    parts.join(format!("step-{step}.shard-{shard}-of-{shards}.precision"))
}

/// How to score in precision class `p` again.
fn precision_hint(p: &str) -> String {
    match p {
        "f32" | "bf16" => format!("pass --compute {p} to continue them"),
        p if p.starts_with("cuda-") => "score on the GPU (--device cuda) to continue them".into(),
        _ => "score as they were to continue them".into(),
    }
}

fn token_part_path(parts: &Path, step: u64, shard: usize, shards: usize) -> PathBuf {
    parts.join(format!("step-{step}.shard-{shard}-of-{shards}.tokens.jsonl"))
}

/// The parts directory beside the output: `OUT.parts`.
pub fn parts_dir(out: &Path) -> PathBuf {
    let mut name = out.file_name().unwrap_or_default().to_os_string();
    name.push(".parts");
    out.with_file_name(name)
}

fn csv_id(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) { format!("\"{}\"", s.replace('"', "\"\"")) } else { s.to_string() }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> LmError + '_ {
    move |source| LmError::Io { path: path.into(), source }
}

/// The scoring units' files, for one run's inputs.
struct Parts<'a> {
    dir: PathBuf,
    spec: &'a ScoreSpec,
}

impl Parts<'_> {
    fn finished(&self, step: u64, shard: usize) -> bool {
        let shards = self.spec.shard.1;
        part_path(&self.dir, step, shard, shards).exists()
            && (self.spec.per_token.is_none() || token_part_path(&self.dir, step, shard, shards).exists())
    }

    /// The precision class each finished unit (any shard) was scored in; units scored before classes
    /// were recorded have none.
    fn recorded_precisions(&self) -> Result<BTreeMap<(u64, usize), String>> {
        let shards = self.spec.shard.1;
        let mut out = BTreeMap::new();
        for &step in self.spec.checkpoints.keys() {
            for shard in 0..shards {
                let path = precision_path(&self.dir, step, shard, shards);
                if self.finished(step, shard) && path.exists() {
                    let text = std::fs::read_to_string(&path).map_err(io(&path))?;
                    out.insert((step, shard), text.trim().to_string());
                }
            }
        }
        Ok(out)
    }

    /// The finished units (any shard) with no precision record: scored by a memsteer that did not record
    /// classes yet, or copied in without their record, so nothing says which products made them. A unit
    /// this run is about to score again (a part without its per-token part) is not one.
    fn unrecorded(&self) -> Vec<(u64, usize)> {
        let shards = self.spec.shard.1;
        self.spec
            .checkpoints
            .keys()
            .flat_map(|&s| (0..shards).map(move |i| (s, i)))
            .filter(|&(s, i)| self.finished(s, i) && !precision_path(&self.dir, s, i, shards).exists())
            .collect()
    }

    /// Refuses to mix finished units that have no precision record with units that have one (or are
    /// about to): the user knows how they were scored, memsteer does not.
    fn check_unrecorded(&self) -> Result<()> {
        let shards = self.spec.shard.1;
        let units = self.unrecorded();
        if let Some(&(s, i)) = units.first() {
            let listed: Vec<String> = units.iter().take(5).map(|(s, i)| format!("step {s} shard {i}")).collect();
            let more = if units.len() > 5 { format!(" and {} more", units.len() - 5) } else { String::new() };
            let record = precision_path(&self.dir, s, i, shards);
            bail!(
                "{}: {} finished unit(s) of {shards} shard(s) have no record of the precision they were scored in ({}{more}; scored by a version before the records, or copied in without their .precision file), and one panel never mixes precisions: if you know they were scored with f32 products (the run said `products: f32 …`), write that into each unit's record beside its part, e.g. `echo f32 > '{}'` (bf16, cuda-f16, … likewise), or remove their step-…-of-{shards}.csv parts to rescore them",
                self.dir.display(),
                units.len(),
                listed.join(", "),
                record.display()
            );
        }
        Ok(())
    }

    /// Refuses to score `step` in precision class `now` when a finished unit was scored in another:
    /// a panel whose checkpoints (or instances) differ in precision carries that difference into every
    /// estimate that compares them.
    fn check_precision(&self, step: u64, now: &str, recorded: &BTreeMap<(u64, usize), String>) -> Result<()> {
        let shards = self.spec.shard.1;
        if let Some(((s, i), before)) = recorded.iter().find(|(_, p)| p.as_str() != now) {
            bail!(
                "checkpoint {step} would be scored with {now} products, but the finished parts in {} were scored with {before} (step {s}, shard {i} of {shards}); one panel never mixes precisions: {}, or remove {} to start over",
                self.dir.display(),
                precision_hint(before),
                self.dir.display()
            );
        }
        Ok(())
    }

    /// Writes the ledger, or checks that the one there was made for these inputs: a different model
    /// under the same step is the mistake worth naming precisely. Each checkpoint is fingerprinted
    /// (headers and samples of every tensor: microseconds).
    fn check_ledger(&self, instances: usize) -> Result<()> {
        let (shard, shards) = self.spec.shard;
        let mut weights = serde_json::Map::new();
        for (step, dir) in &self.spec.checkpoints {
            // The model is its config and its weights; a finished step whose weights were since deleted
            // (to free disk) is recorded as unavailable and not compared.
            let fp = match crate::weights::Weights::open(dir) {
                Ok(w) => w.fingerprint(),
                Err(_) if self.finished(*step, shard) => "unavailable".into(),
                Err(e) => bail!("checkpoint {step}: opening the weights in {}: {e}", dir.display()),
            };
            let config = std::fs::read(dir.join("config.json"))
                .map(|b| format!("{:016x}", hash_key(0, &b)))
                .unwrap_or_else(|_| "unavailable".into());
            weights.insert(
                step.to_string(),
                serde_json::json!({"dir": dir.display().to_string(), "weights": fp, "config": config}),
            );
        }
        let instances_bytes = std::fs::read(&self.spec.instances).map_err(io(&self.spec.instances))?;
        let fingerprint = serde_json::json!({
            "instances": instances,
            "instances_hash": format!("{:016x}", hash_key(0, &instances_bytes)),
            "checkpoints": self.spec.checkpoints.keys().collect::<Vec<_>>(),
            "shards": shards,
            "checkpoint_weights": weights,
        });
        let ledger = self.dir.join("ledger.json");
        let write = || write_atomic(&ledger, |w| writeln!(w, "{fingerprint}")).map_err(io(&ledger));
        if !ledger.exists() {
            return write();
        }
        let text = std::fs::read_to_string(&ledger).map_err(io(&ledger))?;
        let old: serde_json::Value =
            serde_json::from_str(&text).at(|| format!("{}: not valid JSON", ledger.display()))?;
        let same = |a: &serde_json::Value, b: &serde_json::Value| a == b || a == "unavailable" || b == "unavailable";
        if let Some(old_weights) = old.get("checkpoint_weights").and_then(|w| w.as_object()) {
            for (step, now) in fingerprint["checkpoint_weights"].as_object().into_iter().flatten() {
                let Some(before) = old_weights.get(step) else { continue };
                let what = if !same(&before["weights"], &now["weights"]) {
                    "other weights"
                } else if before.get("config").is_some() && !same(&before["config"], &now["config"]) {
                    "another config.json"
                } else {
                    continue;
                };
                bail!(
                    "checkpoint {step}: {} holds {what} than the ones the finished parts in {} were computed from ({}); remove {} to start over, or point step {step} at the original checkpoint",
                    now["dir"].as_str().unwrap_or_default(),
                    self.dir.display(),
                    before["dir"].as_str().unwrap_or_default(),
                    self.dir.display()
                );
            }
        }
        // Directories may move between machines (shards); the models may not. Checkpoints may be added
        // (revisions downloaded one after another): parts do not depend on the others. The instances and
        // the shard count may not change. A ledger written before fingerprints existed is upgraded.
        let rest = |v: &serde_json::Value| {
            let mut v = v.clone();
            if let Some(o) = v.as_object_mut() {
                o.remove("checkpoint_weights");
                o.remove("checkpoints");
            }
            v
        };
        ensure!(
            rest(&old) == rest(&fingerprint),
            "{} was made for other inputs (the instances or the shard count differ); remove {} to start over",
            ledger.display(),
            self.dir.display()
        );
        // Every checkpoint the parts were ever computed for stays in the ledger, so that a model changed
        // under any of them is refused later.
        let mut merged = old.clone();
        let mut steps: std::collections::BTreeSet<u64> =
            old["checkpoints"].as_array().into_iter().flatten().filter_map(serde_json::Value::as_u64).collect();
        steps.extend(self.spec.checkpoints.keys());
        merged["checkpoints"] = steps.into_iter().collect::<Vec<_>>().into();
        let mut all = old.get("checkpoint_weights").and_then(|w| w.as_object()).cloned().unwrap_or_default();
        for (step, now) in fingerprint["checkpoint_weights"].as_object().into_iter().flatten() {
            if now["weights"] != "unavailable" || !all.contains_key(step) {
                all.insert(step.clone(), now.clone());
            }
        }
        merged["checkpoint_weights"] = serde_json::Value::Object(all);
        if merged == old {
            return Ok(());
        }
        write_atomic(&ledger, |w| writeln!(w, "{merged}")).map_err(io(&ledger))
    }

    /// Scores this shard's instances under one checkpoint and writes its parts.
    /// `recorded` holds the precision class of every finished unit, and gains this one's.
    fn score(
        &self,
        (step, dir): (u64, &Path),
        mine: &[&Instance],
        recorded: &mut BTreeMap<(u64, usize), String>,
        events: &mut dyn FnMut(ScoreEvent),
    ) -> Result<()> {
        let (spec, (shard, shards)) = (self.spec, self.spec.shard);
        let model =
            DeviceModel::load(dir, &spec.device).at(|| format!("loading checkpoint {step} from {}", dir.display()))?;
        let precision = model.precision();
        self.check_precision(step, &precision, recorded)?;
        let path = precision_path(&self.dir, step, shard, shards);
        write_atomic(&path, |w| writeln!(w, "{precision}")).map_err(io(&path))?;
        events(ScoreEvent::Loaded { step, compute: model.compute() });
        let mut outcomes = Vec::with_capacity(mine.len());
        let mut token_lps: Vec<Vec<f32>> = Vec::new();
        for batch in mine.chunks(spec.batch_size) {
            let seqs: Vec<&[u32]> = batch.iter().map(|x| x.tokens.as_slice()).collect();
            let name = |x: &Instance| format!("instance {:?} ({}, line {})", x.id, spec.instances.display(), x.line);
            let lps = model.token_log_probs_batch(&seqs).map_err(|e| match e {
                // Name the instance when one sequence is at fault.
                LmError::Sequence { index, message } => {
                    LmError::Input(format!("{}: {}: {message}", dir.display(), name(batch[index])))
                }
                e if batch.len() == 1 => LmError::Input(format!("{}: {}: {e}", dir.display(), name(batch[0]))),
                e => LmError::Input(format!("{}: {e}", dir.display())),
            })?;
            outcomes.extend(lps.iter().map(|lp| lp.iter().map(|&v| f64::from(v)).sum::<f64>()));
            if spec.per_token.is_some() {
                token_lps.extend(lps);
            }
            events(ScoreEvent::Tokens(batch.iter().map(|x| x.tokens.len()).sum()));
        }
        if spec.per_token.is_some() {
            let path = token_part_path(&self.dir, step, shard, shards);
            write_atomic(&path, |w| {
                for (x, lp) in mine.iter().zip(&token_lps) {
                    let line = serde_json::json!({"id": x.id, "checkpoint_step": step, "token_log_probs": lp});
                    writeln!(w, "{line}")?;
                }
                Ok(())
            })
            .map_err(io(&path))?;
        }
        let path = part_path(&self.dir, step, shard, shards);
        write_atomic(&path, |w| {
            for (x, y) in mine.iter().zip(&outcomes) {
                let t = x.treatment.map_or("never".to_string(), |t| t.to_string());
                writeln!(w, "{},{t},{step},{y:?}", csv_id(&x.id))?;
            }
            Ok(())
        })
        .map_err(io(&path))?;
        recorded.insert((step, shard), precision);
        Ok(())
    }

    /// Assembles the panel (and the per-token file) when every unit of every shard is there; returns
    /// the number of units still missing.
    fn assemble(&self) -> Result<usize> {
        let (spec, shards) = (self.spec, self.spec.shard.1);
        let units = || spec.checkpoints.keys().flat_map(move |s| (0..shards).map(move |i| (*s, i)));
        let all: Vec<PathBuf> = units().map(|(s, i)| part_path(&self.dir, s, i, shards)).collect();
        let token_parts: Vec<PathBuf> = match spec.per_token {
            Some(_) => units().map(|(s, i)| token_part_path(&self.dir, s, i, shards)).collect(),
            None => Vec::new(),
        };
        let missing = all.iter().chain(&token_parts).filter(|p| !p.exists()).count();
        if missing > 0 {
            return Ok(missing);
        }
        // Shards scored elsewhere and copied in are checked here. A panel of unrecorded units only
        // (every one scored before classes were recorded) assembles as it always did.
        let recorded = self.recorded_precisions()?;
        if !recorded.is_empty() {
            self.check_unrecorded()?;
        }
        let mut classes = recorded.iter();
        if let Some(((s0, i0), p0)) = classes.next()
            && let Some(((s, i), p)) = classes.find(|(_, p)| *p != p0)
        {
            bail!(
                "{}: the parts were scored in different precisions (step {s0}, shard {i0} of {shards} with {p0} products; step {s}, shard {i} of {shards} with {p}): rescore the ones that differ (remove their step-…-of-{shards}.csv files and rerun with matching --compute / --device)",
                self.dir.display()
            );
        }
        let mut csv = b"instance_id,treatment_step,checkpoint_step,outcome\n".to_vec();
        for p in &all {
            csv.extend_from_slice(&std::fs::read(p).map_err(io(p))?);
        }
        let out = &spec.out;
        if out.extension().is_some_and(|e| e.eq_ignore_ascii_case("parquet")) {
            // Through the panel type, so that the file is validated and typed like any other panel.
            let (panel, _) =
                memsteer_panel::read::parse_csv(&csv, &self.dir.display().to_string(), &Default::default())
                    .at(|| format!("assembling {}", out.display()))?;
            panel.write(out).at(|| format!("writing {}", out.display()))?;
        } else {
            write_atomic(out, |w| w.write_all(&csv)).map_err(io(out))?;
        }
        if let Some(pt) = &spec.per_token {
            write_atomic(pt, |w| {
                for p in &token_parts {
                    w.write_all(&std::fs::read(p)?)?;
                }
                Ok(())
            })
            .map_err(io(pt))?;
        }
        Ok(0)
    }
}

/// Scores `spec`'s shard under every checkpoint not yet finished, then assembles the panel when every
/// shard's parts exist. `events` hears of the work as it goes (for a progress bar).
pub fn run(spec: &ScoreSpec, events: &mut dyn FnMut(ScoreEvent)) -> Result<ScoreOutcome> {
    ensure!(spec.batch_size >= 1, "the batch size must be at least 1");
    ensure!(!spec.checkpoints.is_empty(), "no checkpoints to score");
    let (shard, shards) = spec.shard;
    ensure!(shards >= 1 && shard < shards, "shard {shard} of {shards}: expected 0 ≤ I < N");
    for (step, dir) in &spec.checkpoints {
        ensure!(dir.is_dir(), "checkpoint {step}: directory {} does not exist", dir.display());
    }
    let mut all = instances::read(&spec.instances)?;
    // Text is tokenized once, with the tokenizer shipped next to the first checkpoint.
    let first = spec.checkpoints.values().next().map(PathBuf::as_path);
    instances::tokenize_from(&mut all, first, &spec.instances)?;
    let mine: Vec<&Instance> = all.iter().skip(shard).step_by(shards).collect();
    let parts = Parts { dir: parts_dir(&spec.out), spec };
    std::fs::create_dir_all(&parts.dir).map_err(io(&parts.dir))?;
    parts.check_ledger(all.len())?;

    let tokens: usize = mine.iter().map(|x| x.tokens.len()).sum();
    let todo: Vec<(&u64, &PathBuf)> = spec.checkpoints.iter().filter(|(s, _)| !parts.finished(**s, shard)).collect();
    events(ScoreEvent::Started { units: todo.len(), tokens });
    let start = Instant::now();
    let mut recorded = parts.recorded_precisions()?;
    if !todo.is_empty() {
        parts.check_unrecorded()?;
    }
    for (step, dir) in &todo {
        events(ScoreEvent::Checkpoint(**step));
        parts.score((**step, dir), &mine, &mut recorded, events)?;
    }
    let seconds = start.elapsed().as_secs_f64();
    let missing = parts.assemble()?;
    Ok(ScoreOutcome {
        computed: todo.len(),
        skipped: spec.checkpoints.len() - todo.len(),
        assembled: missing == 0,
        missing,
        tokens,
        seconds,
    })
}
