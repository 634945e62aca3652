//! Project tasks: `cargo xtask reproduce [--quick] [FIGURE…]`, `synth`, `bench-peers`, `fixtures`,
//! `calibrate [--quick]`.
//!
//! Needs nothing but cargo and rustc (bench-peers and fixtures also need Python with csdid, which they
//! explain how to install).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use memsteer_panel::synthetic::SyntheticConfig;

mod calibrate;

const USAGE: &str = "usage: cargo xtask <task>

tasks:
  reproduce [--quick] [FIGURE…]   regenerate the figures under target/reproduce/ (FIGURE: profile, compare, hmm,
                                  trained)
  synth --out FILE [--cohorts K] [--per-cohort N] [--validation V] [--checkpoints C] [--seed S]
        [--trend X] [--shift X] [--anticipation X]
                                  write a synthetic Pythia-like panel (long CSV)
  bench-peers [--size small|paper|both] [--python PY]
                                  time memsteer and csdid side by side on the same panel
  fixtures [--python PY]          regenerate fixtures/csdid golden files
  calibrate [--quick] [--sims N]  size of the pre-trend tests and coverage of intervals and bands on
                                  thousands of synthetic panels; the full run writes the table into
                                  docs/diagnostics.md, --quick (CI) only checks the gates";

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((task, rest)) = args.split_first() else {
        println!("{USAGE}");
        return Ok(());
    };
    match task.as_str() {
        "reproduce" => reproduce(rest),
        "synth" => synth(rest),
        "bench-peers" => bench_peers(rest),
        "fixtures" => fixtures(rest),
        "calibrate" => calibrate::run(rest),
        "-h" | "--help" | "help" => {
            println!("{USAGE}");
            Ok(())
        }
        other => bail!("unknown task `{other}`\n\n{USAGE}"),
    }
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

/// Parses `--name value` pairs and flags.
struct Flags {
    pairs: Vec<(String, String)>,
    flags: Vec<String>,
    free: Vec<String>,
}

impl Flags {
    fn parse(args: &[String], with_values: &[&str]) -> Result<Self> {
        let mut out = Flags { pairs: vec![], flags: vec![], free: vec![] };
        let mut it = args.iter();
        while let Some(a) = it.next() {
            if let Some(name) = a.strip_prefix("--") {
                if with_values.contains(&name) {
                    let v = it.next().with_context(|| format!("--{name} needs a value"))?;
                    out.pairs.push((name.to_string(), v.clone()));
                } else {
                    out.flags.push(name.to_string());
                }
            } else {
                out.free.push(a.clone());
            }
        }
        Ok(out)
    }
    fn get<T: std::str::FromStr>(&self, name: &str, default: T) -> Result<T> {
        match self.pairs.iter().rev().find(|(n, _)| n == name) {
            Some((_, v)) => v.parse().map_err(|_| anyhow::anyhow!("--{name}: cannot parse {v:?}")),
            None => Ok(default),
        }
    }
    fn has(&self, name: &str) -> bool {
        self.flags.iter().any(|f| f == name)
    }
}

fn synth(args: &[String]) -> Result<()> {
    let f = Flags::parse(
        args,
        &["out", "cohorts", "per-cohort", "validation", "checkpoints", "seed", "trend", "shift", "anticipation"],
    )?;
    let out: PathBuf = f.get("out", PathBuf::new())?;
    if out.as_os_str().is_empty() {
        bail!("synth needs --out FILE\n\n{USAGE}");
    }
    let cohorts: usize = f.get("cohorts", 95)?;
    let mut cfg = SyntheticConfig::pythia_like(
        cohorts,
        f.get("per-cohort", 80)?,
        f.get("validation", 2000)?,
        f.get("checkpoints", cohorts + 5)?,
        f.get("seed", 1)?,
    );
    cfg.trend_violation = f.get("trend", 0.0)?;
    cfg.validation_shift = f.get("shift", 0.0)?;
    cfg.anticipation = f.get("anticipation", 0.0)?;
    let panel = cfg.generate()?;
    panel.write_csv(&out)?;
    println!("wrote {} ({} instances × {} checkpoints)", out.display(), panel.n_instances(), panel.n_checkpoints());
    Ok(())
}

fn reproduce(args: &[String]) -> Result<()> {
    let f = Flags::parse(args, &[])?;
    let quick = f.has("quick");
    let all = ["profile", "compare", "hmm", "trained"];
    let wanted: Vec<&str> = if f.free.is_empty() { all.to_vec() } else { f.free.iter().map(String::as_str).collect() };
    if let Some(bad) = wanted.iter().find(|w| !all.contains(w)) {
        bail!("unknown figure `{bad}`; available: {}", all.join(", "));
    }
    let out = root().join("target/reproduce");
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    // Quick: a small Pythia-like study; full: the paper's shape (143 cohorts × 100 + 2,000 validation,
    // 144 checkpoints).
    let (cohorts, per, val, ckpts) = if quick { (30, 40, 400, 36) } else { (143, 100, 2000, 144) };
    if wanted.contains(&"profile") {
        let panel_path = out.join("panel.csv");
        let mut cfg = SyntheticConfig::pythia_like(cohorts, per, val, ckpts, 1);
        cfg.validation_shift = 1.0;
        cfg.generate()?.write_csv(&panel_path)?;
        let mut a = memsteer_cli::profile::ProfileArgs::new(panel_path, out.join("profile"));
        a.mark_step = Some((cohorts as u64 * 2 / 3) * 1000);
        a.bootstrap = if quick { 500 } else { 1000 };
        memsteer_cli::profile::run(&a)?;
    }
    if wanted.contains(&"compare") {
        // Three "model sizes": larger models memorise more and forget more slowly (as in the paper).
        let mut att = Vec::new();
        let mut labels = Vec::new();
        for (i, (name, inst, decay)) in
            [("small", 1.0, 2.0), ("medium", 2.0, 4.0), ("large", 3.0, 8.0)].iter().enumerate()
        {
            let mut cfg = SyntheticConfig::pythia_like(cohorts, per, val, ckpts, 10 + i as u64);
            cfg.instantaneous = *inst;
            cfg.decay = *decay;
            let dir = out.join(format!("size-{name}"));
            std::fs::create_dir_all(&dir)?;
            let panel_path = dir.join("panel.csv");
            cfg.generate()?.write_csv(&panel_path)?;
            let mut a = memsteer_cli::profile::ProfileArgs::new(panel_path, dir.clone());
            a.bootstrap = if quick { 200 } else { 1000 };
            a.quiet = true;
            memsteer_cli::profile::run(&a)?;
            att.push(dir.join("att.csv"));
            labels.push((*name).to_string());
        }
        memsteer_cli::compare::run(&memsteer_cli::compare::CompareArgs {
            profiles: att,
            labels: Some(labels),
            significant_only: false,
            out: Some(out.join("compare")),
        })?;
    }
    if wanted.contains(&"hmm") {
        let files = memsteer_cli::hmm::reproduce_figures(&out.join("hmm"), quick)?;
        println!("hmm: {} files (Theorem 2 illustration, estimators vs exact counterfactuals)", files.len());
        let r = memsteer_cli::hmm::theorem2(&memsteer_cli::hmm::Theorem2Args {
            seed: 1,
            states: 4,
            conditions: 2,
            vocab: 5,
            length: 5,
            samples: 20,
            json: false,
        })?;
        println!(
            "  Theorem 2: max abs error {:.1e} over {} sequences; negative control {:.1e}",
            r.max_abs_error, r.sequences_checked, r.control_max_abs_error
        );
    }
    if wanted.contains(&"trained") {
        trained_run(&out.join("trained"), quick)?;
    }
    println!("figures under {}", out.display());
    Ok(())
}

/// The memorisation profile of a real training run: a small GPT-NeoX trained with `memsteer train` on
/// the built-in English text (Moby Dick, tokenized with the built-in 4,096-token BPE, cut into
/// 64-token instances, a held-out part never trained on), every checkpoint scored with `memsteer
/// logprobs`, estimated with `memsteer profile`. Each step reuses finished work on a rerun.
fn trained_run(dir: &std::path::Path, quick: bool) -> Result<()> {
    use std::io::Write;
    let started = std::time::Instant::now();
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let corpus = root().join("fixtures/corpus");
    let tok = memsteer_lm::tokenizer::Tokenizer::from_dir(&corpus)?;
    let text = std::fs::read_to_string(corpus.join("moby_dick.txt"))?;
    let ids = tok.encode(&text)?;
    let (len, train_n, val_n) = if quick { (64, 960, 240) } else { (64, 2400, 600) };
    let seqs: Vec<&[u32]> = ids.chunks_exact(len).collect();
    if seqs.len() < train_n + val_n {
        bail!("the built-in corpus gives {} instances of {len} tokens, fewer than {}", seqs.len(), train_n + val_n);
    }
    // A seeded random split of the book's chunks (training and validation from one distribution, as
    // parallel trends needs; a start/end split gave clear pre-trends), validation never trained on.
    let mut seqs = seqs;
    let mut rng = memsteer_panel::rng::SplitMix64::new(3);
    for i in (1..seqs.len()).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        seqs.swap(i, j);
    }
    let write = |path: &std::path::Path, prefix: &str, part: &[&[u32]]| -> Result<()> {
        let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
        for (i, s) in part.iter().enumerate() {
            writeln!(f, "{}", serde_json::json!({"id": format!("{prefix}{i}"), "tokens": s}))?;
        }
        Ok(f.flush()?)
    };
    let (train, val) = (dir.join("train.jsonl"), dir.join("validation.jsonl"));
    write(&train, "t", &seqs[..train_n])?;
    write(&val, "v", &seqs[train_n..train_n + val_n])?;
    let config = dir.join("config.json");
    std::fs::write(
        &config,
        serde_json::json!({"model_type": "gpt_neox", "vocab_size": tok.vocab_size(), "hidden_size": 64,
            "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 256,
            "max_position_embeddings": len, "rotary_pct": 0.25, "rotary_emb_base": 10000,
            "use_parallel_residual": true, "tie_word_embeddings": false, "hidden_act": "gelu",
            "layer_norm_eps": 1e-5})
        .to_string(),
    )?;
    let steps = train_n / 8;
    let run = dir.join("run");
    let s = |p: &std::path::Path| p.display().to_string();
    memsteer_cli::run_from([
        "memsteer".to_string(),
        "train".into(),
        "--model-config".into(),
        s(&config),
        "--instances".into(),
        s(&train),
        "--validation".into(),
        s(&val),
        "--batch-size".into(),
        "8".into(),
        "--epochs".into(),
        "1".into(),
        "--lr".into(),
        "3e-3".into(),
        "--warmup".into(),
        "10".into(),
        "--schedule".into(),
        "cosine".into(),
        "--checkpoint-steps".into(),
        format!("0:{steps}:10"),
        "--seed".into(),
        "0".into(),
        "--out".into(),
        s(&run),
        "--quiet".into(),
    ])
    .context("training")?;
    let panel = dir.join("panel.csv");
    memsteer_cli::run_from([
        "memsteer".to_string(),
        "logprobs".into(),
        "--checkpoints".into(),
        s(&run.join("checkpoints.json")),
        "--instances".into(),
        s(&run.join("instances.jsonl")),
        "--out".into(),
        s(&panel),
        "--batch-size".into(),
        "32".into(),
        "--quiet".into(),
    ])
    .context("scoring the checkpoints")?;
    let mut a = memsteer_cli::profile::ProfileArgs::new(panel, dir.join("profile"));
    a.bootstrap = if quick { 200 } else { 1000 };
    a.quiet = true;
    memsteer_cli::profile::run(&a).context("estimating the profile")?;
    println!(
        "trained: {train_n} instances × {len} tokens, {steps} steps, {} checkpoints, profile under {} ({:.0} s)",
        steps / 10 + 1,
        dir.join("profile").display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn python(f: &Flags) -> Result<String> {
    let py: String = f.get("python", String::new())?;
    if !py.is_empty() {
        return Ok(py);
    }
    if let Ok(p) = std::env::var("MEMSTEER_PYTHON") {
        return Ok(p);
    }
    let venv = root().join(".venv-peers/bin/python");
    if venv.exists() {
        return Ok(venv.display().to_string());
    }
    bail!(
        "no Python with csdid found; install one with\n  python3 -m venv .venv-peers && .venv-peers/bin/pip install csdid==0.4.3\nor pass --python PATH / set MEMSTEER_PYTHON"
    )
}

fn bench_peers(args: &[String]) -> Result<()> {
    let f = Flags::parse(args, &["size", "python"])?;
    let py = python(&f)?;
    let size: String = f.get("size", "small".to_string())?;
    let status = Command::new(env!("CARGO"))
        .args(["build", "--release", "-p", "memsteer-cli", "--bin", "memsteer"])
        .current_dir(root())
        .status()
        .context("running cargo build --release")?;
    if !status.success() {
        bail!("cargo build --release failed");
    }
    let bin = root().join("target/release/memsteer");
    let dir = root().join("target/bench-peers");
    std::fs::create_dir_all(&dir)?;
    let sizes: Vec<(&str, usize, usize, usize, usize)> = match size.as_str() {
        "small" => vec![("9600x100", 95, 80, 2000, 100)],
        "paper" => vec![("16300x144", 143, 100, 2000, 144)],
        "both" => vec![("9600x100", 95, 80, 2000, 100), ("16300x144", 143, 100, 2000, 144)],
        other => bail!("--size must be small, paper or both, not {other:?}"),
    };
    for (name, k, per, val, c) in sizes {
        let panel = dir.join(format!("panel-{name}.csv"));
        if !panel.exists() {
            SyntheticConfig::pythia_like(k, per, val, c, 7).generate()?.write_csv(&panel)?;
        }
        let status = Command::new(&py)
            .arg(root().join("benches/peers/bench_peers.py"))
            .arg("--panel")
            .arg(&panel)
            .arg("--memsteer")
            .arg(&bin)
            .arg("--out")
            .arg(dir.join(format!("result-{name}.json")))
            .status()
            .with_context(|| format!("running {py}"))?;
        if !status.success() {
            bail!("benches/peers/bench_peers.py failed");
        }
    }
    Ok(())
}

fn fixtures(args: &[String]) -> Result<()> {
    let f = Flags::parse(args, &["python"])?;
    let py = python(&f)?;
    let status = Command::new(&py).arg(root().join("fixtures/csdid/make_golden.py")).status()?;
    if !status.success() {
        bail!("fixtures/csdid/make_golden.py failed");
    }
    Ok(())
}
