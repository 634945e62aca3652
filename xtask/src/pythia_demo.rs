//! `cargo xtask reproduce data`: the pipeline from a published data order, end to end. The built-in
//! corpus is cut into 64-token rows and written as a pre-shuffled dataset in Pythia's layout (a
//! Megatron memory-mapped indexed dataset, here written by this file); a small model is trained on its
//! rows in that order (`memsteer train --order file`); then `memsteer instances pythia` draws every row
//! of the trained steps and the validation steps after them, and the panel `memsteer logprobs` makes
//! from those instances must equal, byte for byte, the one made from the trainer's own
//! `instances.jsonl`. The profile is estimated from it.

use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result, ensure};

/// Rows per optimizer step, trained steps, validation steps after them, tokens per row.
const BATCH: usize = 8;
const STEPS: usize = 40;
const VALIDATION_STEPS: usize = 10;
const LEN: usize = 64;

/// Writes `prefix.bin` (uint16 tokens) and `prefix.idx` (the `MMIDIDX` index, version 1, dtype code 8):
/// the layout `memsteer_lm::data::IndexedDataset` reads.
fn write_indexed(prefix: &Path, rows: &[&[u32]]) -> Result<()> {
    let mut bin = Vec::new();
    for r in rows {
        for &t in *r {
            bin.extend(u16::try_from(t).context("a token id beyond uint16")?.to_le_bytes());
        }
    }
    let mut idx = b"MMIDIDX\x00\x00".to_vec();
    idx.extend(1u64.to_le_bytes());
    idx.push(8);
    idx.extend((rows.len() as u64).to_le_bytes());
    idx.extend((rows.len() as u64 + 1).to_le_bytes());
    rows.iter().for_each(|r| idx.extend((r.len() as i32).to_le_bytes()));
    let mut at = 0i64;
    for r in rows {
        idx.extend(at.to_le_bytes());
        at += 2 * r.len() as i64;
    }
    (0..=rows.len() as i64).for_each(|d| idx.extend(d.to_le_bytes()));
    std::fs::write(prefix.with_extension("bin"), bin)?;
    std::fs::write(prefix.with_extension("idx"), idx)?;
    Ok(())
}

fn jsonl(path: &Path, rows: &[&[u32]], first_id: usize) -> Result<()> {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    for (i, r) in rows.iter().enumerate() {
        writeln!(f, "{}", serde_json::json!({"id": first_id + i, "tokens": r}))?;
    }
    Ok(f.flush()?)
}

/// Runs the part; returns a line for the report.
pub fn run(dir: &Path, root: &Path) -> Result<String> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let corpus = root.join("fixtures/corpus");
    let tok = memsteer_lm::tokenizer::Tokenizer::from_dir(&corpus)?;
    let ids = tok.encode(&std::fs::read_to_string(corpus.join("moby_dick.txt"))?)?;
    let mut rows: Vec<&[u32]> = ids.chunks_exact(LEN).collect();
    memsteer_panel::rng::SplitMix64::new(4).shuffle(&mut rows);
    let (trained, held) = (STEPS * BATCH, VALIDATION_STEPS * BATCH);
    ensure!(rows.len() >= trained + held, "the built-in corpus is too short for the data demo");
    let rows = &rows[..trained + held];
    let prefix = dir.join("document");
    write_indexed(&prefix, rows)?;
    let (train, val) = (dir.join("train.jsonl"), dir.join("validation.jsonl"));
    jsonl(&train, &rows[..trained], 0)?;
    jsonl(&val, &rows[trained..], trained)?;
    let config = dir.join("config.json");
    std::fs::write(
        &config,
        serde_json::json!({"model_type": "gpt_neox", "vocab_size": tok.vocab_size(), "hidden_size": 32,
            "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 128,
            "max_position_embeddings": LEN, "rotary_pct": 0.25, "rotary_emb_base": 10000,
            "use_parallel_residual": true, "tie_word_embeddings": false, "hidden_act": "gelu",
            "layer_norm_eps": 1e-5})
        .to_string(),
    )?;
    let s = |p: &Path| p.display().to_string();
    let run = dir.join("run");
    let (batch, steps) = (BATCH.to_string(), STEPS.to_string());
    memsteer_cli::run_from([
        "memsteer",
        "train",
        "--model-config",
        &s(&config),
        "--instances",
        &s(&train),
        "--validation",
        &s(&val),
        "--order",
        "file",
        "--batch-size",
        &batch,
        "--steps",
        &steps,
        "--lr",
        "0.003",
        "--checkpoint-steps",
        "0:40:5",
        "--seed",
        "0",
        "--out",
        &s(&run),
        "--quiet",
    ])
    .context("training on the dataset's rows in order")?;
    let drawn = dir.join("instances-from-data.jsonl");
    let (held_n, last) = (held.to_string(), format!("1:{STEPS}"));
    memsteer_cli::run_from([
        "memsteer",
        "instances",
        "pythia",
        "--data",
        &s(&prefix),
        "--seq-len",
        "64",
        "--batch-size",
        &batch,
        "--steps",
        &last,
        "--per-step",
        &batch,
        "--validation",
        &held_n,
        "--out",
        &s(&drawn),
    ])?;
    let manifest = run.join("checkpoints.json");
    let panel = |instances: &Path, out: &Path| {
        memsteer_cli::run_from([
            "memsteer",
            "logprobs",
            "--checkpoints",
            &s(&manifest),
            "--instances",
            &s(instances),
            "--out",
            &s(out),
            "--batch-size",
            "32",
            "--quiet",
        ])
    };
    let (from_data, from_trainer) = (dir.join("panel-from-data.csv"), dir.join("panel-from-trainer.csv"));
    panel(&drawn, &from_data)?;
    panel(&run.join("instances.jsonl"), &from_trainer)?;
    let (a, b) = (std::fs::read(&from_data)?, std::fs::read(&from_trainer)?);
    ensure!(
        a == b,
        "the panel from `instances pythia` ({}) differs from the one from the trainer's instances ({})",
        from_data.display(),
        from_trainer.display()
    );
    memsteer_cli::run_from([
        "memsteer",
        "profile",
        "--panel",
        &s(&from_data),
        "--out",
        &s(&dir.join("profile")),
        "--bootstrap",
        "200",
        "--quiet",
    ])?;
    let lines = a.iter().filter(|&&c| c == b'\n').count() - 1;
    Ok(format!(
        "data: a {}-row dataset in Pythia's layout, trained in its order; the panel from `instances pythia` equals the trainer's ({lines} rows), profile under {}",
        rows.len(),
        dir.join("profile").display()
    ))
}
