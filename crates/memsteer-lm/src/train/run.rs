//! The files of a training run that `memsteer train` writes and other tools read back (xtask's
//! counterfactual retraining, resumption): the optimizer settings in `run.json` and the batch log
//! `batches.jsonl`. One reader each, so the writer and its readers cannot drift apart.

use std::path::Path;

use super::{AdamWConfig, Schedule, TrainConfig};
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
