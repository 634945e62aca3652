//! Project tasks: `cargo xtask reproduce [--quick] [FIGURE…]`, `synth`, `bench-peers`, `fixtures`,
//! `calibrate [--quick]`.
//!
//! Needs nothing but cargo and rustc (bench-peers and fixtures also need Python with csdid, which they
//! explain how to install).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail, ensure};
use memsteer_panel::synthetic::SyntheticConfig;

mod calibrate;
mod hmm_figures;
mod pythia_demo;
mod steer_demo;

const USAGE: &str = "usage: cargo xtask <task>

tasks:
  reproduce [--quick] [FIGURE…]   regenerate the figures under target/reproduce/ (FIGURE: profile, compare, hmm,
                                  trained, steer)
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
    let all = ["profile", "compare", "hmm", "data", "trained", "steer"];
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
        let mark = ((cohorts as u64 * 2 / 3) * 1000).to_string();
        let bootstrap = if quick { "500" } else { "1000" };
        profile(&panel_path, &out.join("profile"), &["--mark-step", &mark, "--bootstrap", bootstrap])?;
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
            profile(&panel_path, &dir, &["--bootstrap", if quick { "200" } else { "1000" }, "--quiet"])?;
            att.push(dir.join("att.csv"));
            labels.push((*name).to_string());
        }
        compare(&att, &labels, &out.join("compare"))?;
    }
    if wanted.contains(&"hmm") {
        let files = hmm_figures::reproduce_figures(&out.join("hmm"), quick)?;
        println!("hmm: {} files (Theorem 2 illustration, estimators vs exact counterfactuals)", files.len());
        let r = memsteer_hmm::theorem2::check_theorem2(&memsteer_hmm::theorem2::Theorem2Config {
            seed: 1,
            semantic_states: 4,
            condition_states: 2,
            vocab: 5,
            length: 5,
            samples: 20,
            sample_length: 200,
        })?;
        println!(
            "  Theorem 2: max abs error {:.1e} over {} sequences; negative control {:.1e}",
            r.max_abs_error, r.sequences_checked, r.control_max_abs_error
        );
    }
    if wanted.contains(&"data") {
        println!("{}", pythia_demo::run(&out.join("data"), &root())?);
    }
    if wanted.contains(&"trained") {
        // Separate directories: a rerun reuses finished training, so the two sizes must not mix.
        trained_run(&out.join(if quick { "trained-quick" } else { "trained" }), quick)?;
    }
    if wanted.contains(&"steer") {
        steer_demo::run(&out.join(if quick { "steer-quick" } else { "steer" }), quick)?;
    }
    println!("figures under {}", out.display());
    Ok(())
}

/// Prints a line and keeps it for the run's gallery.
macro_rules! say {
    ($report:expr, $($arg:tt)*) => {{
        let line = format!($($arg)*);
        println!("{line}");
        $report.push(line);
    }};
}

/// A fingerprint of what the trained runs' numbers depend on: the sources of memsteer-lm,
/// memsteer-kernels, memsteer-panel (seeded draws) and memsteer-cli (the commands' settings) and
/// `Cargo.lock` (FNV-1a over paths and bytes in path order), and the CPU kernel level in use. Coarse on
/// purpose: any edit there retrains the cached runs under target/reproduce once (about 6 minutes for
/// `--quick`), rather than let the retraining check fail on a run made by other code.
fn code_fingerprint() -> Result<u64> {
    fn walk(dir: &std::path::Path, out: &mut Vec<PathBuf>) -> Result<()> {
        for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
            let path = entry?.path();
            if path.is_dir() {
                walk(&path, out)?;
            } else if path.extension().is_some_and(|e| e == "rs" || e == "cu") {
                out.push(path);
            }
        }
        Ok(())
    }
    let mut files = Vec::new();
    for krate in ["memsteer-lm", "memsteer-kernels", "memsteer-panel", "memsteer-cli"] {
        walk(&root().join("crates").join(krate).join("src"), &mut files)?;
    }
    files.push(root().join("Cargo.lock"));
    files.sort();
    let mut h = memsteer_panel::rng::Fnv1a::default();
    for f in &files {
        h.write(f.strip_prefix(root()).unwrap_or(f).to_string_lossy().as_bytes());
        h.write(&std::fs::read(f)?);
    }
    h.write(format!("{:?}", memsteer_kernels::cpu_kernels().ok()).as_bytes());
    Ok(h.finish())
}

/// Memorisation profiles of real training runs: small GPT-NeoX models (three sizes × cosine and
/// constant schedules) trained with `memsteer train` on the built-in English text (Moby Dick,
/// tokenized with the built-in 4,096-token BPE, cut into 64-token instances, a seeded random held-out
/// part never trained on; the same instances and batches for every run), every checkpoint scored with
/// `memsteer logprobs`, estimated with `memsteer profile`, then figures across runs mirroring the
/// memorisation paper's (path by size, instantaneous memorisation against the learning rate, residual
/// memorisation by schedule, correlation of profiles across sizes). Finished steps are reused on a rerun.
fn trained_run(dir: &std::path::Path, quick: bool) -> Result<()> {
    use std::io::Write;
    let started = std::time::Instant::now();
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let corpus = root().join("fixtures/corpus");
    let tok = memsteer_lm::tokenizer::Tokenizer::from_dir(&corpus)?;
    let text = std::fs::read_to_string(corpus.join("moby_dick.txt"))?;
    let ids = tok.encode(&text)?;
    let (len, train_n, val_n) = if quick { (64, 960, 240) } else { (64, 2400, 600) };
    let mut seqs: Vec<&[u32]> = ids.chunks_exact(len).collect();
    if seqs.len() < train_n + val_n {
        bail!("the built-in corpus gives {} instances of {len} tokens, fewer than {}", seqs.len(), train_n + val_n);
    }
    // A seeded random split of the book's chunks (training and validation from one distribution, as
    // parallel trends needs; a start/end split gave clear pre-trends), validation never trained on.
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
    let steps = train_n / 8;
    let s = |p: &std::path::Path| p.display().to_string();
    let sizes = [("small", 32, 2), ("medium", 64, 4), ("large", 128, 4)];
    let mut runs = Vec::new();
    for (size, hidden, heads) in sizes {
        for schedule in ["cosine", "constant"] {
            let rd = dir.join(format!("{size}-{schedule}"));
            std::fs::create_dir_all(&rd)?;
            let config = rd.join("config.json");
            std::fs::write(
                &config,
                serde_json::json!({"model_type": "gpt_neox", "vocab_size": tok.vocab_size(), "hidden_size": hidden,
                    "num_hidden_layers": 2, "num_attention_heads": heads, "intermediate_size": 4 * hidden,
                    "max_position_embeddings": len, "rotary_pct": 0.25, "rotary_emb_base": 10000,
                    "use_parallel_residual": true, "tie_word_embeddings": false, "hidden_act": "gelu",
                    "layer_norm_eps": 1e-5})
                .to_string(),
            )?;
            let run = rd.join("run");
            // A run left by other code (the trainer or the kernels changed since) is trained again: the
            // retraining check below compares it bit for bit with what this code computes.
            let key = format!("code {:016x} config {}\n", code_fingerprint()?, std::fs::read_to_string(&config)?);
            let key_file = rd.join("run.key");
            if run.exists() && std::fs::read_to_string(&key_file).ok().as_deref() != Some(key.as_str()) {
                println!("{}: made by other code or settings; training again", run.display());
                std::fs::remove_dir_all(&run).with_context(|| format!("removing {}", run.display()))?;
                // And what was made from it: the resumable scoring (its ledger would refuse the new
                // checkpoints) and the truth.
                for f in ["panel.csv", "truth.csv", "truth.key"] {
                    let _ = std::fs::remove_file(rd.join(f));
                }
                let _ = std::fs::remove_dir_all(rd.join("panel.csv.parts"));
            }
            std::fs::write(&key_file, &key)?;
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
                schedule.into(),
                "--checkpoint-steps".into(),
                format!("0:{steps}:10"),
                "--seed".into(),
                "0".into(),
                "--out".into(),
                s(&run),
                "--quiet".into(),
            ])
            .with_context(|| format!("training {size}-{schedule}"))?;
            let panel = rd.join("panel.csv");
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
            .with_context(|| format!("scoring the checkpoints of {size}-{schedule}"))?;
            profile(&panel, &rd.join("profile"), &["--bootstrap", if quick { "200" } else { "1000" }, "--quiet"])
                .with_context(|| format!("estimating the profile of {size}-{schedule}"))?;
            runs.push((size, schedule, rd));
        }
    }
    let mut report = Vec::new();
    trained_figures(dir, &runs, &mut report)?;
    // Counterfactual truth for the medium cosine run: retrain without chosen cohorts' batches.
    let reserve: Vec<Vec<u32>> = seqs[train_n + val_n..].iter().map(|s| s.to_vec()).collect();
    let cohorts: &[usize] = if quick { &[30, 70] } else { &[20, 50, 80, 110] };
    counterfactual_truth(
        &dir.join("medium-cosine"),
        &train,
        &reserve,
        cohorts,
        if quick { 2 } else { 4 },
        &mut report,
    )?;
    write_trained_gallery(dir, quick, &report)?;
    println!(
        "trained: {} runs of {train_n} instances × {len} tokens, {steps} steps, {} checkpoints each, under {} ({:.0} s)",
        runs.len(),
        steps / 10 + 1,
        dir.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The true counterfactual memorisation of chosen cohorts of a trained run, by retraining: from the
/// checkpoint before a cohort's batches, the same run continues with those batches replaced by fresh
/// batches of unused instances from the same book (never trained on in either run), everything else
/// identical (order, schedule, optimizer state). τ(g, c) is the cohort's mean `log p_actual(x) −
/// log p_counterfactual(x)` at checkpoint `c`, averaged over `replicates` draws of the fresh batches
/// (the HMM laboratory's definition). Writes `truth.csv` (`cohort_step,checkpoint_step,tau`, the format
/// of `memsteer hmm simulate`) and compares DiD and the difference estimator with it, cell by cell.
fn counterfactual_truth(
    rd: &std::path::Path,
    train_file: &std::path::Path,
    reserve: &[Vec<u32>],
    cohorts: &[usize],
    replicates: usize,
    report: &mut Vec<String>,
) -> Result<()> {
    let run = rd.join("run");
    let tokens = read_instance_tokens(train_file)?;
    let batches = memsteer_lm::train::run::read_batches(&run.join(memsteer_lm::train::run::BATCHES_FILE))?;
    let steps = batches.len();
    let token = |id: &str| -> Result<&[u32]> {
        tokens
            .get(id)
            .map(Vec::as_slice)
            .with_context(|| format!("batches.jsonl names {id:?}, not in {}", train_file.display()))
    };
    ensure!(reserve.len() >= 10 * 8 * 2, "only {} unused instances for fresh batches", reserve.len());
    ensure!(
        cohorts.iter().all(|&g| g >= 10 && g <= batches.len() && g % 10 == 0),
        "cohorts must be checkpoint steps of at least 10"
    );
    // The run's own settings, as `memsteer train` recorded them.
    let cfg = memsteer_lm::train::run::train_config_from_run(&run.join(memsteer_lm::train::run::RUN_FILE))?;
    ensure!(cfg.steps == steps, "run.json says {} steps, batches.jsonl holds {steps}", cfg.steps);
    let retraining = Retraining { run: &run, cfg: &cfg, batches: &batches, token: &token };
    if let Some(&g) = cohorts.first() {
        retraining.check_null(g, report)?;
    }
    retraining.truth(rd, reserve, cohorts, replicates)?;
    compare_with_truth(rd, cohorts, replicates, report)
}

/// A training run and what retraining it needs: its directory, its settings, its batches (instance
/// ids per step) and the tokens of an id.
struct Retraining<'a> {
    run: &'a std::path::Path,
    cfg: &'a memsteer_lm::train::TrainConfig,
    batches: &'a [Vec<String>],
    token: &'a dyn Fn(&str) -> Result<&'a [u32]>,
}

/// The tokens of every instance of a training file, by id.
fn read_instance_tokens(train_file: &std::path::Path) -> Result<std::collections::HashMap<String, Vec<u32>>> {
    std::fs::read_to_string(train_file)?
        .lines()
        .map(|l| -> Result<(String, Vec<u32>)> {
            let v: serde_json::Value = serde_json::from_str(l)?;
            let t = v["tokens"]
                .as_array()
                .context("tokens")?
                .iter()
                .map(|x| x.as_u64().map(|t| t as u32).context("a token id"))
                .collect::<Result<_>>()?;
            Ok((v["id"].as_str().context("id")?.to_string(), t))
        })
        .collect()
}

impl Retraining<'_> {
    /// A trainer resumed at checkpoint `step` (its optimizer state too, past step 0).
    fn resume(&self, step: usize) -> Result<memsteer_lm::train::Trainer> {
        use memsteer_lm::train::{Params, Trainer};
        let dir = self.run.join(format!("step{step}"));
        let mut trainer = Trainer::new(Params::from_hf(&dir)?, self.cfg)?;
        if step > 0 {
            trainer.load_optimizer(&dir.join("optimizer.safetensors"))?;
        }
        Ok(trainer)
    }

    /// Null check: from the checkpoint before cohort `g`, the actual batches must give back the actual
    /// next checkpoint, so that every difference the truth measures is the replaced batches' doing.
    fn check_null(&self, g: usize, report: &mut Vec<String>) -> Result<()> {
        use memsteer_lm::train::Params;
        let mut trainer = self.resume(g - 10)?;
        for step in g - 9..=g {
            let batch = self.batches[step - 1].iter().map(|id| (self.token)(id)).collect::<Result<Vec<_>>>()?;
            trainer.train_step(&batch)?;
        }
        let actual = Params::from_hf(&self.run.join(format!("step{g}")))?;
        let gap = actual.data().iter().zip(trainer.params().data()).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        say!(
            report,
            "  retraining steps {}..{g} with the actual batches reproduces checkpoint {g}: max |Δθ| = {gap:e}",
            g - 9
        );
        ensure!(gap == 0.0, "retraining from step {} does not reproduce checkpoint {g} (max |Δθ| = {gap:e})", g - 10);
        Ok(())
    }

    /// The counterfactual truth, `truth.csv` under `rd`: for each cohort, its batches replaced by fresh
    /// instances of `reserve` and the run retrained to its end, `replicates` times; τ(g, c) is the mean
    /// gap of the cohort's log-likelihood between the actual and the retrained checkpoint c. Reused
    /// only when made for these cohorts, replicates and batches (a key file beside it).
    fn truth(&self, rd: &std::path::Path, reserve: &[Vec<u32>], cohorts: &[usize], replicates: usize) -> Result<()> {
        use memsteer_lm::train::Params;
        let (run, batches, token, steps) = (self.run, self.batches, self.token, self.batches.len());
        let truth_path = rd.join("truth.csv");
        let sums = |p: &Params, seqs: &[&[u32]]| -> Result<Vec<f64>> {
            Ok(p.token_log_probs(seqs)?.iter().map(|lp| lp.iter().map(|&x| f64::from(x)).sum()).collect())
        };
        let batches_bytes = std::fs::read(run.join("batches.jsonl"))?;
        let key = format!(
            "cohorts {cohorts:?}, replicates {replicates}, seeds v1, batches.jsonl {} bytes, fnv {:016x}",
            batches_bytes.len(),
            {
                let mut h = memsteer_panel::rng::Fnv1a::default();
                h.write(&batches_bytes);
                h.finish()
            }
        );
        let key_path = rd.join("truth.key");
        let fresh = truth_path.exists() && std::fs::read_to_string(&key_path).is_ok_and(|k| k == key);
        if !fresh {
            let mut rows = Vec::new();
            for &g in cohorts {
                // The cohort: the instances of the batches after checkpoint g − 10, up to g.
                let members = batches[g - 10..g].iter().flatten().map(|id| token(id)).collect::<Result<Vec<_>>>()?;
                let mut tau: std::collections::BTreeMap<usize, f64> = Default::default();
                for r in 0..replicates {
                    let start = g - 10;
                    let mut trainer = self.resume(start)?;
                    let mut rng = memsteer_panel::rng::SplitMix64::new(0x7000_0000 ^ ((g as u64) << 16) ^ r as u64);
                    let mut pool: Vec<usize> = (0..reserve.len()).collect();
                    for step in start + 1..=steps {
                        let batch: Vec<&[u32]> = if step <= g {
                            (0..batches[step - 1].len())
                                .map(|_| reserve[pool.swap_remove(rng.below(pool.len() as u64) as usize)].as_slice())
                                .collect()
                        } else {
                            batches[step - 1].iter().map(|id| token(id)).collect::<Result<Vec<_>>>()?
                        };
                        trainer.train_step(&batch)?;
                        if step % 10 == 0 {
                            let actual = Params::from_hf(&run.join(format!("step{step}")))?;
                            let (a, c) = (sums(&actual, &members)?, sums(trainer.params(), &members)?);
                            let gap = a.iter().zip(&c).map(|(a, c)| a - c).sum::<f64>() / a.len() as f64;
                            *tau.entry(step).or_default() += gap / replicates as f64;
                        }
                    }
                }
                rows.extend(tau.into_iter().map(|(c, t)| (g, c, t)));
            }
            let mut text = String::from("cohort_step,checkpoint_step,tau\n");
            for (g, c, t) in &rows {
                text.push_str(&format!("{g},{c},{t}\n"));
            }
            memsteer_panel::durable::write_bytes(&truth_path, text.as_bytes())?;
            std::fs::write(&key_path, &key)?;
        }
        Ok(())
    }
}

/// The estimators on the same run, DiD (already estimated) and the difference estimator, against the
/// truth: a figure per cohort and the report's lines.
fn compare_with_truth(
    rd: &std::path::Path,
    cohorts: &[usize],
    replicates: usize,
    report: &mut Vec<String>,
) -> Result<()> {
    use std::collections::HashMap;
    let truth_path = rd.join("truth.csv");
    let diff_dir = rd.join("profile-difference");
    {
        profile(&rd.join("panel.csv"), &diff_dir, &["--estimator", "difference", "--bootstrap", "200", "--quiet"])?;
    }
    let cells = |p: &std::path::Path| -> Result<HashMap<(usize, usize), (f64, f64)>> {
        let text = std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
        Ok(text
            .lines()
            .skip(1)
            .filter_map(|l| {
                let f: Vec<&str> = l.split(',').collect();
                let (g, c, e, hi) = (
                    f.first()?.parse().ok()?,
                    f.get(1)?.parse().ok()?,
                    f.get(3)?.parse().ok()?,
                    f.get(6)?.parse::<f64>().ok()?,
                );
                Some(((g, c), (e, hi - e)))
            })
            .collect())
    };
    let (did, diff) = (cells(&rd.join("profile/att.csv"))?, cells(&diff_dir.join("att.csv"))?);
    let truth: Vec<(usize, usize, f64)> = std::fs::read_to_string(&truth_path)?
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            Some((f.first()?.parse().ok()?, f.get(1)?.parse().ok()?, f.get(2)?.parse().ok()?))
        })
        .collect();
    say!(report, "  counterfactual truth (medium cosine, {replicates} retraining replicates per cohort):");
    let mut covered = (0, 0);
    let mut err = (0.0, 0.0, 0usize);
    for &g in cohorts {
        let mut series: Vec<memsteer_plot::Series> = vec![
            ("truth (retraining)".into(), Vec::new()),
            ("DiD".into(), Vec::new()),
            ("difference".into(), Vec::new()),
        ];
        for &(tg, c, t) in truth.iter().filter(|r| r.0 == g) {
            series[0].1.push((c as f64, t, 0.0));
            if let (Some(&(d, dh)), Some(&(f, fh))) = (did.get(&(tg, c)), diff.get(&(tg, c))) {
                series[1].1.push((c as f64, d, dh));
                series[2].1.push((c as f64, f, fh));
                covered.0 += usize::from((d - t).abs() <= dh);
                covered.1 += usize::from((f - t).abs() <= fh);
                err.0 += (d - t).abs();
                err.1 += (f - t).abs();
                err.2 += 1;
                say!(
                    report,
                    "    g = {g:>3}, c = {c:>3}: truth {t:6.2}, DiD {d:6.2} ± {dh:.2}, difference {f:6.2} ± {fh:.2}"
                );
            }
        }
        memsteer_plot::series_figure(
            rd,
            &format!("truth-cohort-{g}"),
            &format!("Estimators against retraining, cohort {g} (medium model, cosine)"),
            ("checkpoint step", "τ(g, c), nats"),
            &series,
        )?;
    }
    let n = err.2.max(1) as f64;
    say!(
        report,
        "    over {} cells: mean |DiD − truth| {:.2} (95% CI covers the truth in {}), mean |difference − truth| {:.2} (covers in {})",
        err.2,
        err.0 / n,
        covered.0,
        err.1 / n,
        covered.1
    );
    Ok(())
}

/// The figures across the trained runs, and their numbers on stdout.
fn trained_figures(
    dir: &std::path::Path,
    runs: &[(&str, &str, std::path::PathBuf)],
    report: &mut Vec<String>,
) -> Result<()> {
    use memsteer_plot::{Series, series_figure};
    let summary = |rd: &std::path::Path| -> Result<serde_json::Value> {
        let p = rd.join("profile/summary.json");
        Ok(serde_json::from_str(&std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?)?)
    };
    let lrs = |rd: &std::path::Path| -> Result<Vec<f64>> {
        let p = rd.join("run/loss.csv");
        let text = std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
        text.lines().skip(1).map(|l| Ok(l.rsplit(',').next().unwrap_or_default().parse::<f64>()?)).collect()
    };
    let est = |v: &serde_json::Value| -> (f64, f64) {
        let e = v["estimate"].as_f64().unwrap_or(f64::NAN);
        (e, v["ci_upper"].as_f64().unwrap_or(e) - e)
    };
    let find = |size: &str, schedule: &str| runs.iter().find(|r| r.0 == size && r.1 == schedule).map(|r| r.2.clone());
    // Path by size (cosine): the paper's Figures 1-2.
    let mut by_size: Vec<Series> = Vec::new();
    for size in ["small", "medium", "large"] {
        let Some(rd) = find(size, "cosine") else { continue };
        let text = std::fs::read_to_string(rd.join("profile/path.csv"))?;
        let pts = text
            .lines()
            .skip(1)
            .filter_map(|l| {
                let f: Vec<f64> = l.split(',').filter_map(|x| x.parse().ok()).collect();
                (f.len() >= 5).then(|| (f[0], f[1], f[4] - f[1]))
            })
            .collect();
        let s = summary(&rd)?;
        let (i, _) = est(&s["instantaneous"]);
        let (r, _) = est(&s["residual"]);
        say!(report, "  {size:>6} cosine: instantaneous {i:.2}, residual {r:.2} nats per instance");
        by_size.push((size.to_string(), pts));
    }
    series_figure(
        dir,
        "path-by-size",
        "Memorisation path by model size (cosine schedule)",
        ("checkpoints after treatment (event time)", "τ: log-prob gain over never-trained, nats"),
        &by_size,
    )?;
    // Instantaneous memorisation against the learning rate, and residual memorisation, by schedule
    // (medium size): the paper's Figures 3 and 5.
    let (mut inst, mut resid): (Vec<Series>, Vec<Series>) = (Vec::new(), Vec::new());
    for schedule in ["cosine", "constant"] {
        let Some(rd) = find("medium", schedule) else { continue };
        let (s, lr) = (summary(&rd)?, lrs(&rd)?);
        let mut ip = Vec::new();
        let mut rp = Vec::new();
        for c in s["per_cohort"].as_array().cloned().unwrap_or_default() {
            let g = c["cohort"].as_u64().unwrap_or(0) as usize;
            let window: Vec<f64> = lr.iter().skip(g.saturating_sub(10)).take(10).copied().collect();
            let mean_lr = window.iter().sum::<f64>() / window.len().max(1) as f64;
            let (i, ih) = est(&c["instantaneous"]);
            let (r, rh) = est(&c["residual"]);
            ip.push((mean_lr * 1e3, i, ih));
            rp.push((g as f64, r, rh));
        }
        let n = ip.len() as f64;
        let (mx, my) = (ip.iter().map(|p| p.0).sum::<f64>() / n, ip.iter().map(|p| p.1).sum::<f64>() / n);
        let (sxy, sxx, syy) = ip.iter().fold((0.0, 0.0, 0.0), |(a, b, c), p| {
            (a + (p.0 - mx) * (p.1 - my), b + (p.0 - mx).powi(2), c + (p.1 - my).powi(2))
        });
        let r = if sxx > 0.0 && syy > 0.0 { sxy / (sxx * syy).sqrt() } else { f64::NAN };
        say!(
            report,
            "  medium {schedule}: correlation of instantaneous memorisation with the cohort's learning rate {r:.2}"
        );
        inst.push((schedule.to_string(), ip));
        resid.push((schedule.to_string(), rp));
    }
    series_figure(
        dir,
        "instantaneous-vs-lr",
        "Instantaneous memorisation against the learning rate (medium model)",
        ("mean learning rate while the cohort was trained (×1e-3)", "τ(g, g), nats"),
        &inst,
    )?;
    series_figure(
        dir,
        "residual-by-schedule",
        "Residual memorisation at the last checkpoint (medium model)",
        ("cohort (step of its first checkpoint)", "τ(g, T), nats"),
        &resid,
    )?;
    // Correlation of the profiles across sizes (cosine): the paper's Figure 6.
    let sized: Vec<_> = ["small", "medium", "large"].iter().filter_map(|z| find(z, "cosine").map(|d| (z, d))).collect();
    let profiles: Vec<PathBuf> = sized.iter().map(|(_, d)| d.join("profile/att.csv")).collect();
    let labels: Vec<String> = sized.iter().map(|(z, _)| z.to_string()).collect();
    compare(&profiles, &labels, &dir.join("compare"))?;
    Ok(())
}

/// Writes `dir/gallery.md`: the numbers of this run and its figures (the curated copy with the paper's
/// findings beside them is `docs/gallery.md`).
fn write_trained_gallery(dir: &std::path::Path, quick: bool, report: &[String]) -> Result<()> {
    let mut md = format!(
        "# Trained runs ({})\n\nWritten by `cargo xtask reproduce{} trained`; the paper's findings beside these \
         figures, and where they do not hold, are in `docs/gallery.md`.\n\n```text\n{}\n```\n\n",
        if quick { "quick" } else { "full" },
        if quick { " --quick" } else { "" },
        report.join("\n")
    );
    let mut figures = vec![
        "path-by-size.png".to_string(),
        "compare/correlations.png".into(),
        "instantaneous-vs-lr.png".into(),
        "residual-by-schedule.png".into(),
    ];
    let mut truth: Vec<String> = std::fs::read_dir(dir.join("medium-cosine"))?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with("truth-cohort-") && n.ends_with(".png"))
        .map(|n| format!("medium-cosine/{n}"))
        .collect();
    truth.sort_by_key(|n| {
        n.trim_start_matches("medium-cosine/truth-cohort-").trim_end_matches(".png").parse::<u64>().unwrap_or(0)
    });
    figures.extend(truth);
    for f in figures {
        md.push_str(&format!("![{f}]({f})\n\n"));
    }
    std::fs::write(dir.join("gallery.md"), md)?;
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

/// `memsteer profile --panel PANEL --out OUT` with more flags, through the command line.
fn profile(panel: &Path, out: &Path, flags: &[&str]) -> Result<()> {
    let mut argv =
        vec!["memsteer".to_string(), "profile".into(), "--panel".into(), show(panel), "--out".into(), show(out)];
    argv.extend(flags.iter().map(|f| f.to_string()));
    memsteer_cli::run_from(argv)
}

/// `memsteer compare` of `att.csv` files with their labels, written into `out`.
fn compare(profiles: &[PathBuf], labels: &[String], out: &Path) -> Result<()> {
    let mut argv = vec!["memsteer".to_string(), "compare".into()];
    argv.extend(profiles.iter().map(|p| show(p)));
    argv.extend(["--labels".into(), labels.join(","), "--out".into(), show(out)]);
    memsteer_cli::run_from(argv)
}

fn show(p: &Path) -> String {
    p.display().to_string()
}
