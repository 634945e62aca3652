//! `cargo xtask reproduce steer`: LM-Steer end to end on models the project trains itself.
//!
//! Small GPT-NeoX models (`memsteer train`) learn English from the built-in corpus: the UCI review
//! sentences (without their labels) and Moby Dick. Two sizes, `small` and `large`, a second `large`
//! from another seed (`large-b`, a same-size transfer target), and a `judge` of the large shape from a
//! third seed that generates nothing and only scores perplexity. A sentiment steer is trained on
//! `small` and on `large` (`memsteer steer train`, the model frozen) from the labelled sentences the
//! built-in scorer holds out (and whose text it never trained on), so the scorer that judges the
//! steered text never saw the steer's data. Then, as in the LM-Steer paper: continuations of review
//! openings that no model or steer trained on, at a range of strengths (`steer generate`), their
//! share of positive continuations (intervals over prompts), perplexity under the judge and dist-n
//! (`steer eval`); the words the steer promotes (`steer explain`); where such sentences carry the style
//! (`steer highlight`); and each steer moved to other models with both maps (`steer transfer`) and the
//! effect it keeps there. Writes figures, tables and `gallery.md` under the run's directory.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use memsteer_lm::tokenizer::Tokenizer;
use memsteer_panel::rng::{SplitMix64, hash_key};

/// Sizes of one run.
struct Plan {
    /// Review openings continued at each strength.
    prompts: usize,
    /// Samples per prompt and strength.
    samples: usize,
    /// Tokens generated per sample.
    new_tokens: usize,
    /// Epochs over the language-model corpus.
    epochs: usize,
    /// Steer optimizer steps.
    steer_steps: usize,
    /// Strengths of the dial.
    strengths: &'static [f64],
}

/// Tokens per language-model training instance.
const LEN: usize = 64;
/// Sequences per language-model batch.
const BATCH: usize = 16;
/// Words of a held-out review sentence that make its prompt.
const PROMPT_WORDS: usize = 2;
/// `<|endoftext|>` in the built-in tokenizer: it separates sentences and starts every prompt.
const EOS: u32 = 0;
/// The language models: name, hidden size, layers, heads, seed. `large-b` is `large` trained again from
/// another seed (initialisation and batch order): a target of the same size for the transfer.
const MODELS: [(&str, usize, usize, usize, u64); 4] =
    [("small", 64, 2, 4, 0), ("large", 128, 4, 4, 0), ("large-b", 128, 4, 4, 1), ("judge", 128, 4, 4, 2)];
/// The model that scores perplexity (index into `MODELS`).
const JUDGE: usize = 3;
/// The models a steer is trained on (indices into `MODELS`).
const STEERED: [usize; 2] = [0, 1];
/// Transfers: (source, target) indices into `MODELS`.
const TRANSFERS: [(usize, usize); 3] = [(1, 2), (1, 0), (0, 1)];

/// One labelled sentence of the built-in corpus.
struct Sentence {
    id: String,
    text: String,
    positive: bool,
}

fn read_sentences(path: &Path) -> Result<Vec<Sentence>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let v: serde_json::Value =
            serde_json::from_str(line).with_context(|| format!("{}, line {}", path.display(), i + 1))?;
        let field = |k: &str| {
            v[k].as_str().map(str::to_string).with_context(|| format!("{}, line {}: no `{k}`", path.display(), i + 1))
        };
        out.push(Sentence { id: field("id")?, text: field("text")?, positive: field("label")? == "positive" });
    }
    Ok(out)
}

fn write_jsonl(path: &Path, lines: impl IntoIterator<Item = serde_json::Value>) -> Result<()> {
    memsteer_panel::write_atomic(path, |w| {
        for l in lines {
            writeln!(w, "{l}")?;
        }
        Ok(())
    })
    .with_context(|| format!("writing {}", path.display()))
}

fn shuffle<T>(v: &mut [T], seed: u64) {
    SplitMix64::new(seed).shuffle(v);
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

/// `steer eval` of generations files given as `FILE:LABEL`: dist-n, perplexity under the judge
/// (conditioned on the prompts) and the built-in sentiment scorer's scores.
fn evaluate(
    specs: &[String],
    judge: &memsteer_steer::eval::PerplexityModel,
) -> Result<Vec<memsteer_steer::eval::FileEval>> {
    let scorer = memsteer_steer::eval::Scorer::Builtin(memsteer_steer::eval::sentiment::SentimentScorer::builtin()?);
    let mut files = Vec::new();
    for spec in specs {
        let (file, label) = spec.rsplit_once(':').context("FILE:LABEL")?;
        let path = Path::new(file);
        let samples = memsteer_steer::data::read_generations(path)?;
        files.push(memsteer_steer::eval::evaluate(path, Some(label.to_string()), &samples, Some(judge), &scorer)?);
    }
    Ok(files)
}

/// Mean and 95% normal-approximation half-width (1.96 standard errors) of per-prompt values: samples of
/// one prompt are correlated, so prompts, not samples, are the independent units.
fn mean_ci(xs: &[f64]) -> (f64, f64) {
    let n = xs.len();
    if n == 0 {
        return (f64::NAN, f64::NAN);
    }
    let mean = xs.iter().sum::<f64>() / n as f64;
    if n < 2 {
        return (mean, f64::NAN);
    }
    let var = xs.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / (n - 1) as f64;
    (mean, 1.96 * (var / n as f64).sqrt())
}

/// Each prompt's share of samples scored positive (P(positive) ≥ 0.5), keyed by prompt id; `scores`
/// are in the order of the generations file's lines.
fn prompt_shares(generations: &Path, scores: &[f64]) -> Result<std::collections::BTreeMap<String, f64>> {
    let text = std::fs::read_to_string(generations).with_context(|| format!("reading {}", generations.display()))?;
    let ids: Vec<String> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l)?;
            Ok(v["prompt_id"].as_str().map_or_else(|| v["prompt_id"].to_string(), str::to_string))
        })
        .collect::<Result<_>>()?;
    anyhow::ensure!(
        ids.len() == scores.len(),
        "{}: {} lines, {} scores",
        generations.display(),
        ids.len(),
        scores.len()
    );
    let mut counts: std::collections::BTreeMap<String, (usize, usize)> = std::collections::BTreeMap::new();
    for (id, &sc) in ids.into_iter().zip(scores) {
        let c = counts.entry(id).or_default();
        c.0 += usize::from(sc >= 0.5);
        c.1 += 1;
    }
    Ok(counts.into_iter().map(|(k, (p, n))| (k, p as f64 / n as f64)).collect())
}

/// Runs `make` unless `out` exists beside `out.key` holding `key` (a rerun reuses a finished step whose
/// inputs are unchanged); then records the key. Returns whether it ran.
fn unless_done(out: &Path, key: &str, make: impl FnOnce() -> Result<()>) -> Result<bool> {
    let key_file =
        out.with_file_name(format!("{}.key", out.file_name().and_then(|n| n.to_str()).context("an output file name")?));
    if out.is_file() && std::fs::read_to_string(&key_file).ok().as_deref() == Some(key) {
        return Ok(false);
    }
    let _ = std::fs::remove_file(&key_file);
    make()?;
    std::fs::write(&key_file, key).with_context(|| format!("writing {}", key_file.display()))?;
    Ok(true)
}

/// A hash of a file's bytes, for the keys of [`unless_done`].
fn file_hash(path: &Path) -> Result<String> {
    Ok(format!("{:016x}", hash_key(1, &std::fs::read(path).with_context(|| format!("reading {}", path.display()))?)))
}

/// One row of a steer's table: its label, positive share ± half-width, then `steer eval`'s numbers.
fn table_row(label: &str, (share, half): (f64, f64), f: &memsteer_steer::eval::FileEval) -> String {
    format!(
        "| {label} | {share:.2} ± {half:.2} | {:.3} | {} ({}) | {:.3} | {:.3} | {:.3} |\n",
        f.score_mean.unwrap_or(f64::NAN),
        f.perplexity.map_or("–".into(), |p| format!("{p:.1}")),
        f.perplexity_dropped.unwrap_or(0),
        f.dist[0],
        f.dist[1],
        f.dist[2]
    )
}

/// What one steer (or transferred steer) did across the strengths.
struct Curve {
    /// `(strength, mean share over prompts, 95% half-width)`.
    points: Vec<(f64, f64, f64)>,
    /// Effect (strongest positive minus strongest negative strength) and its 95% half-width.
    effect: (f64, f64),
    /// Perplexity and dist-1 at the strongest negative strength, at 0 and at the strongest positive one.
    low: (f64, f64),
    base: (f64, f64),
    high: (f64, f64),
}

/// Lowercased words of a sentence joined by single spaces: duplicates under different ids compare equal.
fn normalized(text: &str) -> String {
    text.to_lowercase().split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The number of adjacent strength pairs where the share drops (0: monotone).
fn drops(points: &[(f64, f64, f64)]) -> usize {
    points.windows(2).filter(|w| w[1].1 < w[0].1).count()
}

/// The steer's effect: per prompt, the share at the strongest positive strength minus the share at the
/// strongest negative one; mean and 95% half-width over prompts.
fn effect(lo: &std::collections::BTreeMap<String, f64>, hi: &std::collections::BTreeMap<String, f64>) -> (f64, f64) {
    let diffs: Vec<f64> = hi.iter().filter_map(|(k, h)| lo.get(k).map(|l| h - l)).collect();
    mean_ci(&diffs)
}

/// The run's log: each line printed as it is known and kept for the gallery.
#[derive(Default)]
struct Log(Vec<String>);

impl Log {
    fn say(&mut self, line: String) {
        println!("{line}");
        self.0.push(line);
    }
}

/// The inputs every stage reads: the run's directory and sizes, the corpus and its tokenizer.
struct Run<'a> {
    dir: &'a Path,
    plan: Plan,
    corpus: PathBuf,
    tok: Tokenizer,
}

impl Run<'_> {
    /// `<|endoftext|>` then the tokens of `t`.
    fn encode(&self, t: &str) -> Result<Vec<u32>> {
        let mut ids = vec![EOS];
        ids.extend(self.tok.encode(t)?);
        Ok(ids)
    }
}

/// The data stage's files and sentence sets.
struct Data<'s> {
    /// The steer's corpora.
    pos: PathBuf,
    neg: PathBuf,
    /// The prompts file.
    prompts: PathBuf,
    /// The sentences whose openings are the prompts (kept out of every training).
    prompt_set: Vec<&'s Sentence>,
    /// The language models' instances.
    lm_train: PathBuf,
    /// Their optimizer steps.
    steps: usize,
}

/// A trained language model: name, final checkpoint, the key its training was reused under.
type TrainedModel = (&'static str, PathBuf, String);
/// A steer to evaluate: label, model index, steer file.
type SteerRow = (String, usize, PathBuf);
/// A steer's evaluation table: its label and the Markdown table.
type Table = (String, String);
/// A transfer: source, target, map, fit residual, index of its steer row.
type TransferRow = (&'static str, &'static str, &'static str, f64, usize);

/// Runs the demo into `dir`, in stages: the data, the language models, the steers and their transfers,
/// generation and evaluation, figures, explanation and highlights, detection, the gallery.
pub fn run(dir: &Path, quick: bool) -> Result<()> {
    let started = std::time::Instant::now();
    let plan = if quick {
        Plan {
            prompts: 40,
            samples: 4,
            new_tokens: 16,
            epochs: 2,
            steer_steps: 300,
            strengths: &[-4.0, -2.0, 0.0, 2.0, 4.0],
        }
    } else {
        Plan {
            prompts: 100,
            samples: 5,
            new_tokens: 20,
            epochs: 4,
            steer_steps: 1000,
            strengths: &[-4.0, -3.0, -2.0, -1.0, 0.0, 1.0, 2.0, 3.0, 4.0],
        }
    };
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let corpus = crate::root().join("fixtures/corpus");
    let tok = Tokenizer::from_dir(&corpus)?;
    let run = Run { dir, plan, corpus, tok };
    let mut log = Log::default();
    let sentences = read_sentences(&run.corpus.join("sentiment.jsonl"))?;
    let data = prepare_data(&run, &sentences, &mut log)?;
    let models = train_models(&run, &data, &mut log)?;
    let judge = memsteer_steer::eval::PerplexityModel::load(
        &models[JUDGE].1,
        &memsteer_kernels::Device::Cpu,
        Some(&data.prompts),
    )?;
    log.say(format!(
        "perplexity: under lm-{} (the large shape from seed {}), which generates nothing",
        MODELS[JUDGE].0, MODELS[JUDGE].4
    ));
    let (steers, transfer_rows) = train_steers(&run, &data, &models, &mut log)?;
    let (curves, tables) = generate_and_evaluate(&run, &data, &models, &steers, &judge, &mut log)?;
    let scorer = memsteer_steer::eval::sentiment::SentimentScorer::builtin()?;
    log.say(format!(
        "scorer: the built-in sentiment classifier, {:.1}% accurate on its {} held-out sentences (the steer's training data, which it never saw)",
        100.0 * scorer.held_out_accuracy,
        scorer.held_out_size
    ));
    let (transfer_md, transfer_figures) = figures(&run, &models, &steers, &transfer_rows, &curves, &mut log)?;
    let (explain_md, highlights) = explain_and_highlight(&run, &data, &models, &steers, scorer)?;
    let detect_md = detect(&run, &data, &models, &steers, scorer, &mut log)?;

    // --- The run's gallery.
    let mut md = format!(
        "# LM-Steer on trained models ({})\n\nWritten by `cargo xtask reproduce{} steer`; what matches the paper \
         and what does not is in `docs/gallery.md`.\n\n```text\n{}\n```\n\n![positive share](positive-share.png)\n\n\
         ## Transfer (`steer transfer`)\n\nEffect: per prompt, the share of positive continuations at the \
         strongest positive strength minus at the strongest negative one, averaged over prompts (± 95% interval \
         over prompts).\n\n{transfer_md}\n{transfer_figures}",
        if quick { "quick" } else { "full" },
        if quick { " --quick" } else { "" },
        log.0.join("\n")
    );
    md.push_str(&format!(
        "## What the large model's steer promotes (`steer explain`)\n\nThe top singular directions of W, \
         each with the tokens at its two ends (the sign of a direction is arbitrary; · is a space):\n\n{explain_md}\n\
         ## Where unseen sentences carry the style (`steer highlight`)\n\nSentences no model or steer trained on \
         (the prompts' sources), the two the scorer rates most positive and the two it rates most negative. \
         In bold, the two strongest spans of \
         up to 4 tokens.\n\n{highlights}\n\
         ## The steer as a sentiment classifier (`steer detect`)\n\n{detect_md}\n"
    ));
    for (label, table) in &tables {
        md.push_str(&format!("## {label}\n\n{table}\n"));
    }
    memsteer_panel::write_atomic(&dir.join("gallery.md"), |w| w.write_all(md.as_bytes()))?;
    println!("steer: under {} ({:.0} s)", dir.display(), started.elapsed().as_secs_f64());
    Ok(())
}

/// The data: the scorer's held-out sentences train the steer; openings of a seeded sample of the others
/// are the prompts; the rest (labels dropped) and Moby Dick train the language models.
fn prepare_data<'s>(run: &Run<'_>, sentences: &'s [Sentence], log: &mut Log) -> Result<Data<'s>> {
    let encode = |t: &str| run.encode(t);
    let (dir, plan, tok, corpus) = (run.dir, &run.plan, &run.tok, &run.corpus);
    // The corpus repeats some sentences under different ids: a held-out sentence whose text the scorer
    // also trained on (under another id) is left out of the steer's data, and repeats are kept once.
    let (held, rest): (Vec<&Sentence>, Vec<&Sentence>) =
        sentences.iter().partition(|x| memsteer_steer::eval::sentiment::held_out(&x.id));
    let scorer_texts: std::collections::HashSet<String> = rest.iter().map(|x| normalized(&x.text)).collect();
    let mut seen = std::collections::HashSet::new();
    let steer_set: Vec<&Sentence> = held
        .into_iter()
        .filter(|x| !scorer_texts.contains(&normalized(&x.text)) && seen.insert(normalized(&x.text)))
        .collect();
    let mut candidates: Vec<&Sentence> = rest.clone();
    candidates.sort_by_key(|x| hash_key(11, x.id.as_bytes()));
    let prompt_set: Vec<&Sentence> = candidates
        .into_iter()
        .filter(|x| x.text.split_whitespace().count() > PROMPT_WORDS + 2)
        .take(plan.prompts)
        .collect();
    // Prompt sentences (by text, so their repeats too) stay out of the language models' data.
    let prompt_texts: std::collections::HashSet<String> = prompt_set.iter().map(|x| normalized(&x.text)).collect();
    let lm_set: Vec<&Sentence> =
        rest.iter().copied().filter(|x| !prompt_texts.contains(&normalized(&x.text))).collect();

    let (pos, neg) = (dir.join("positive.jsonl"), dir.join("negative.jsonl"));
    for (path, want) in [(&pos, true), (&neg, false)] {
        let lines = steer_set
            .iter()
            .filter(|x| x.positive == want)
            .map(|x| Ok(serde_json::json!({"id": x.id, "text": x.text, "tokens": encode(&x.text)?})))
            .collect::<Result<Vec<_>>>()?;
        write_jsonl(path, lines)?;
    }
    let prompts = dir.join("prompts.jsonl");
    let prompt_text: Vec<String> =
        prompt_set.iter().map(|x| x.text.split_whitespace().take(PROMPT_WORDS).collect::<Vec<_>>().join(" ")).collect();
    write_jsonl(
        &prompts,
        prompt_set
            .iter()
            .zip(&prompt_text)
            .map(|(x, t)| Ok(serde_json::json!({"id": x.id, "text": t, "tokens": encode(t)?})))
            .collect::<Result<Vec<_>>>()?,
    )?;

    // Language-model instances: the review sentences in a seeded order, each after <|endoftext|>, cut
    // into 64-token pieces; as many pieces of Moby Dick; shuffled together.
    let mut order = lm_set.clone();
    shuffle(&mut order, 5);
    let mut stream = Vec::new();
    for x in &order {
        stream.extend(encode(&x.text)?);
    }
    let mut pieces: Vec<Vec<u32>> = stream.chunks_exact(LEN).map(<[u32]>::to_vec).collect();
    let reviews = pieces.len();
    let book = tok.encode(&std::fs::read_to_string(corpus.join("moby_dick.txt"))?)?;
    let mut chunks: Vec<&[u32]> = book.chunks_exact(LEN).collect();
    shuffle(&mut chunks, 6);
    pieces.extend(chunks.iter().take(reviews).map(|c| c.to_vec()));
    shuffle(&mut pieces, 7);
    let n = pieces.len() / BATCH * BATCH;
    let lm_train = dir.join("lm-train.jsonl");
    write_jsonl(
        &lm_train,
        pieces[..n].iter().enumerate().map(|(i, p)| serde_json::json!({"id": format!("x{i}"), "tokens": p})),
    )?;
    let steps = plan.epochs * n / BATCH;
    log.say(format!(
        "data: steer on {} positive + {} negative sentences (the scorer's held-out part, less texts it trained on under another id and repeats); {} prompts (the first {PROMPT_WORDS} words of review sentences kept out of the models' and the steer's training); language models on {n} instances of {LEN} tokens ({reviews} of reviews, the rest Moby Dick), {} epochs",
        steer_set.iter().filter(|x| x.positive).count(),
        steer_set.iter().filter(|x| !x.positive).count(),
        prompt_set.len(),
        plan.epochs
    ));

    Ok(Data { pos, neg, prompts, prompt_set, lm_train, steps })
}

/// The language models (`memsteer train`), each reused when a finished run has the same settings.
fn train_models(run: &Run<'_>, data: &Data<'_>, log: &mut Log) -> Result<Vec<TrainedModel>> {
    let (dir, tok, corpus, lm_train, steps) = (run.dir, &run.tok, &run.corpus, &data.lm_train, data.steps);
    let mut models = Vec::new();
    for (name, hidden, layers, heads, seed) in MODELS {
        let md = dir.join(format!("lm-{name}"));
        std::fs::create_dir_all(&md)?;
        let config = md.join("config.json");
        std::fs::write(
            &config,
            serde_json::json!({"model_type": "gpt_neox", "vocab_size": tok.vocab_size(), "hidden_size": hidden,
                "num_hidden_layers": layers, "num_attention_heads": heads, "intermediate_size": 4 * hidden,
                "max_position_embeddings": LEN, "rotary_pct": 0.25, "rotary_emb_base": 10000,
                "use_parallel_residual": true, "tie_word_embeddings": false, "hidden_act": "gelu",
                "layer_norm_eps": 1e-5})
            .to_string(),
        )?;
        let run = md.join("run");
        let argv = [
            "memsteer".to_string(),
            "train".into(),
            "--model-config".into(),
            s(&config),
            "--instances".into(),
            s(lm_train),
            "--tokenizer".into(),
            s(corpus),
            "--batch-size".into(),
            BATCH.to_string(),
            "--steps".into(),
            steps.to_string(),
            "--lr".into(),
            "3e-3".into(),
            "--warmup".into(),
            "20".into(),
            "--schedule".into(),
            "cosine".into(),
            "--checkpoint-steps".into(),
            steps.to_string(),
            "--seed".into(),
            seed.to_string(),
            "--out".into(),
            s(&run),
            "--quiet".into(),
        ];
        // A finished run with the same settings and instances is reused; one from other settings or data
        // (an older version of this demo) is removed and trained again.
        let key_file = md.join("run.key");
        let key = format!(
            "instances {:016x} config {:016x} argv {:016x}\n",
            hash_key(1, &std::fs::read(lm_train)?),
            hash_key(1, &std::fs::read(&config)?),
            hash_key(1, argv.join(" ").as_bytes())
        );
        if run.exists() && std::fs::read_to_string(&key_file).ok().as_deref() != Some(key.as_str()) {
            println!("{}: from another version of this run; training again", run.display());
            std::fs::remove_dir_all(&run).with_context(|| format!("removing {}", run.display()))?;
        }
        std::fs::write(&key_file, &key)?;
        let reused = run.join(format!("step{steps}/model.safetensors")).is_file();
        let t = std::time::Instant::now();
        memsteer_cli::run_from(argv.clone()).with_context(|| format!("training the {name} language model"))?;
        log.say(format!(
            "lm-{name}: hidden {hidden}, {layers} layers, seed {seed}, {steps} steps ({})",
            if reused {
                "reused from an earlier run".to_string()
            } else {
                format!("{:.0} s", t.elapsed().as_secs_f64())
            }
        ));
        models.push((name, run.join(format!("step{steps}")), key.trim().to_string()));
    }
    Ok(models)
}

/// Steers on two of the models, each moved to other models with every map.
fn train_steers(
    run: &Run<'_>,
    data: &Data<'_>,
    models: &[TrainedModel],
    log: &mut Log,
) -> Result<(Vec<SteerRow>, Vec<TransferRow>)> {
    let (dir, plan, pos, neg) = (run.dir, &run.plan, &data.pos, &data.neg);
    let mut steers: Vec<(String, usize, PathBuf)> = Vec::new(); // (label, model index, steer file)
    for &m in &STEERED {
        let (name, model, model_key) = &models[m];
        let out = dir.join(format!("steer-{name}.safetensors"));
        let t = std::time::Instant::now();
        let key =
            format!("{model_key} positive {} negative {} steps {}", file_hash(pos)?, file_hash(neg)?, plan.steer_steps);
        let trained = unless_done(&out, &key, || {
            // The command's defaults: rank min(1000, d), lr 1e-2, batches of 32, ε 1e-3, 256 tokens, seed 0.
            let steps = plan.steer_steps.to_string();
            memsteer_cli::run_from([
                "memsteer",
                "steer",
                "train",
                "--model",
                &s(model),
                "--positive",
                &s(pos),
                "--negative",
                &s(neg),
                "--out",
                &s(&out),
                "--steps",
                &steps,
                "--quiet",
            ])
            .with_context(|| format!("training the steer of lm-{name}"))
        })?;
        let training = memsteer_steer::Steer::load(&out)?.training().clone();
        log.say(format!(
            "steer-{name}: {} sequences, {} steps, last loss {:.3} ({})",
            training["sequences"],
            plan.steer_steps,
            training["final_loss"].as_f64().unwrap_or(f64::NAN),
            if trained { format!("{:.0} s", t.elapsed().as_secs_f64()) } else { "reused".into() }
        ));
        steers.push((format!("{name}, its own steer"), m, out));
    }
    let mut transfer_rows = Vec::new(); // (source, target, map, residual, steer index)
    for &(from, to) in &TRANSFERS {
        let (from_name, from_dir, _) = &models[from];
        let (to_name, to_dir, to_key) = &models[to];
        let source = steers.iter().find(|x| x.1 == from).map(|x| x.2.clone()).context("no steer on the source")?;
        for (tag, formula) in
            [("paper", "the paper's HᵀWH"), ("authors", "the authors' BWBᵀ"), ("two-sided", "two-sided HᵀWGᵀ")]
        {
            let out = dir.join(format!("steer-{from_name}-to-{to_name}-{tag}.safetensors"));
            let key = format!("{} to {to_key} map {tag}", file_hash(&source)?);
            unless_done(&out, &key, || {
                memsteer_cli::run_from([
                    "memsteer",
                    "steer",
                    "transfer",
                    "--steer",
                    &s(&source),
                    "--from",
                    &s(from_dir),
                    "--to",
                    &s(to_dir),
                    "--out",
                    &s(&out),
                    "--map",
                    tag,
                ])
            })?;
            let residual = memsteer_steer::Steer::load(&out)?.training()["transfer"]["relative_residual"]
                .as_f64()
                .unwrap_or(f64::NAN);
            transfer_rows.push((*from_name, *to_name, formula, residual, steers.len()));
            steers.push((format!("{to_name}, moved from {from_name} by {formula}"), to, out));
        }
    }

    Ok((steers, transfer_rows))
}

/// Generation at each strength and its evaluation. Strength 0 is the steer file at 0, its dummy steer at
/// 1 as at every strength; the base model without any steer is generated once per model and reported
/// beside the curve. Returns each steer's curve and table.
fn generate_and_evaluate(
    run: &Run<'_>,
    data: &Data<'_>,
    models: &[TrainedModel],
    steers: &[SteerRow],
    judge: &memsteer_steer::eval::PerplexityModel,
    log: &mut Log,
) -> Result<(Vec<Curve>, Vec<Table>)> {
    let (dir, plan, prompts) = (run.dir, &run.plan, &data.prompts);
    let mut base_gen: Vec<Option<PathBuf>> = vec![None; models.len()];
    let mut curves: Vec<Curve> = Vec::new();
    let mut tables = Vec::new();
    let prompts_hash = file_hash(prompts)?;
    for (label, m, steer) in steers {
        let (model, model_key) = (&models[*m].1, &models[*m].2);
        let tag = steer.file_stem().and_then(|x| x.to_str()).unwrap_or("steer").to_string();
        let mut specs = Vec::new();
        let steer_hash = file_hash(steer)?;
        let generate = |steers: Vec<String>, what: String, out: &Path| -> Result<()> {
            let key = format!(
                "{what} model {model_key} prompts {prompts_hash} samples {} tokens {} top-p 0.9 seed 1",
                plan.samples, plan.new_tokens
            );
            unless_done(out, &key, || {
                let (samples, tokens) = (plan.samples.to_string(), plan.new_tokens.to_string());
                let (model, prompts, out) = (s(model), s(prompts), s(out));
                let mut argv = vec![
                    "memsteer",
                    "steer",
                    "generate",
                    "--model",
                    &model,
                    "--prompts",
                    &prompts,
                    "--samples",
                    &samples,
                    "--max-new-tokens",
                    &tokens,
                    "--temperature",
                    "1",
                    "--top-p",
                    "0.9",
                    "--seed",
                    "1",
                    "--out",
                    &out,
                ];
                for st in &steers {
                    argv.extend(["--steer", st.as_str()]);
                }
                memsteer_cli::run_from(argv).with_context(|| format!("generating {out}"))
            })
            .map(|_| ())
        };
        for &v in plan.strengths {
            let out = dir.join(format!("gen-{tag}-{v:+}.jsonl"));
            generate(vec![format!("{}:{v}", steer.display())], format!("steer {steer_hash} at {v}"), &out)?;
            specs.push(format!("{}:{v}", out.display()));
        }
        let base = match &base_gen[*m] {
            Some(b) => b.clone(),
            None => {
                let b = dir.join(format!("gen-{}-no-steer.jsonl", models[*m].0));
                generate(vec![], "no steer".into(), &b)?;
                base_gen[*m] = Some(b.clone());
                b
            }
        };
        specs.push(format!("{}:none", base.display()));
        let ev = evaluate(&specs, judge)?;
        let mut points = Vec::new();
        let mut shares = Vec::new();
        let mut table = String::from(
            "| strength | positive share | mean P(positive) | perplexity (dropped) | dist-1 | dist-2 | dist-3 |\n|---:|---:|---:|---:|---:|---:|---:|\n",
        );
        for (f, &v) in ev.iter().zip(plan.strengths) {
            let per_prompt = prompt_shares(Path::new(&f.file), &f.scores)?;
            let (share, half) = mean_ci(&per_prompt.values().copied().collect::<Vec<_>>());
            points.push((v, share, half));
            shares.push(per_prompt);
            let label = if v == 0.0 { "0".to_string() } else { format!("{v:+}") };
            table.push_str(&table_row(&label, (share, half), f));
        }
        let no_steer = &ev[plan.strengths.len()];
        let share =
            mean_ci(&prompt_shares(Path::new(&no_steer.file), &no_steer.scores)?.values().copied().collect::<Vec<_>>());
        table.push_str(&table_row("no steer", share, no_steer));
        let last = points.len() - 1;
        let (e, e_half) = effect(&shares[0], &shares[last]);
        log.say(format!(
            "{label}: positive share {:.2} at {:+} → {:.2} at {:+} (effect {e:+.2} ± {e_half:.2}); {} drop(s) between adjacent strengths",
            points[0].1,
            points[0].0,
            points[last].1,
            points[last].0,
            drops(&points)
        ));
        tables.push((label.clone(), table));
        let ends = |i: usize| (ev[i].perplexity.unwrap_or(f64::NAN), ev[i].dist[0]);
        curves.push(Curve {
            points,
            effect: (e, e_half),
            low: ends(0),
            base: ends(plan.strengths.iter().position(|&v| v == 0.0).unwrap_or(0)),
            high: ends(last),
        });
    }
    Ok((curves, tables))
}

/// The positive-share figure, one figure per transfer, and the transfer table.
fn figures(
    run: &Run<'_>,
    models: &[TrainedModel],
    steers: &[SteerRow],
    transfer_rows: &[TransferRow],
    curves: &[Curve],
    log: &mut Log,
) -> Result<(String, String)> {
    let (dir, plan) = (run.dir, &run.plan);
    let series_of = |idx: &[usize]| -> Vec<memsteer_plot::Series> {
        // The figures' font has no superscript T.
        idx.iter().map(|&i| (steers[i].0.replace('ᵀ', "^T"), curves[i].points.clone())).collect()
    };
    memsteer_plot::series_figure(
        dir,
        "positive-share",
        "Share of positive continuations against steer strength",
        ("steer strength", "share scored positive (bars: 95% interval over prompts)"),
        &series_of(&[0, 1]),
    )?;
    // Each transfer beside the source's own curve.
    let mut transfer_figures = String::new();
    for &(from, to) in &TRANSFERS {
        let (from_name, to_name) = (models[from].0, models[to].0);
        let own = steers.iter().position(|x| x.1 == from).context("no steer on the source")?;
        let idx: Vec<usize> = std::iter::once(own)
            .chain(transfer_rows.iter().filter(|r| r.0 == from_name && r.1 == to_name).map(|r| r.4))
            .collect();
        let name = format!("transfer-{from_name}-to-{to_name}");
        memsteer_plot::series_figure(
            dir,
            &name,
            &format!("A steer moved to another model: {from_name} → {to_name}"),
            ("steer strength", "share scored positive (bars: 95% interval over prompts)"),
            &series_of(&idx),
        )?;
        transfer_figures.push_str(&format!("![{name}]({name}.png)\n\n"));
    }
    let (lo, hi) = (plan.strengths[0], plan.strengths[plan.strengths.len() - 1]);
    let mut transfer_md = format!(
        "| source → target | map | fit residual | effect on the target | source's own effect | perplexity at {lo:+} / 0 / {hi:+} | dist-1 at {lo:+} / 0 / {hi:+} |\n|---|---|---:|---:|---:|---:|---:|\n",
    );
    for (from, to, formula, residual, i) in transfer_rows {
        let own = steers.iter().position(|x| models[x.1].0 == *from && x.0.ends_with("its own steer")).unwrap_or(0);
        let (c, c0) = (&curves[*i], &curves[own]);
        let ((e, eh), (e0, e0h)) = (c.effect, c0.effect);
        transfer_md.push_str(&format!(
            "| {from} → {to} | {formula} | {residual:.3} | {e:+.2} ± {eh:.2} | {e0:+.2} ± {e0h:.2} | {:.0} / {:.0} / {:.0} | {:.2} / {:.2} / {:.2} |\n",
            c.low.0,
            c.base.0,
            c.high.0,
            c.low.1,
            c.base.1,
            c.high.1
        ));
        log.say(format!(
            "transfer {from} → {to} by {formula}: fit residual {residual:.3}, effect {e:+.2} ± {eh:.2} (the source's own {e0:+.2}); perplexity {:.0} / {:.0} / {:.0} at {lo:+} / 0 / {hi:+}",
            c.low.0, c.base.0, c.high.0
        ));
    }

    Ok((transfer_md, transfer_figures))
}

/// What the larger model's own steer promotes (`steer explain`) and where unseen sentences carry the
/// style (`steer highlight`): the two Markdown sections.
fn explain_and_highlight(
    run: &Run<'_>,
    data: &Data<'_>,
    models: &[TrainedModel],
    steers: &[SteerRow],
    scorer: &memsteer_steer::eval::sentiment::SentimentScorer,
) -> Result<(String, String)> {
    let (dir, tok, prompt_set) = (run.dir, &run.tok, &data.prompt_set);
    let (large_model, large_steer) = (&models[1].1, &steers[1].2);
    let large = memsteer_lm::Model::load(large_model)?;
    let steer = memsteer_steer::Steer::load_for(large_steer, large.decoder())?;
    let config = memsteer_steer::explain::ExplainConfig { dims: 3, top: 8 };
    let ex = memsteer_steer::explain::explain(&steer, large.decoder().output_embedding(), &config, &|id| {
        tok.id_to_token(id)
    })?;
    let mut explain_md = String::from("| direction | σ | one end | other end |\n|---|---:|---|---|\n");
    // Tokens as the text they decode to (byte-level BPE pieces are unreadable), spaces shown as ·.
    let words = |v: &[memsteer_steer::explain::TokenScore]| -> String {
        v.iter()
            .map(|t| {
                let piece = tok.decode(&[t.id]).unwrap_or_else(|_| format!("#{}", t.id));
                let mut shown = String::new();
                for c in piece.chars() {
                    match c {
                        ' ' => shown.push('·'),
                        '\n' => shown.push('⏎'),
                        '\t' => shown.push('⇥'),
                        '|' => shown.push_str("\\|"),
                        '`' => shown.push('\''),
                        c if c.is_control() => shown.push_str(&format!("U+{:04X}", u32::from(c))),
                        c => shown.push(c),
                    }
                }
                format!("`{shown}`")
            })
            .collect::<Vec<_>>()
            .join(" ")
    };
    for d in &ex.dimensions {
        explain_md.push_str(&format!(
            "| {} | {:.3} | {} | {} |\n",
            d.rank + 1,
            d.singular_value,
            words(&d.positive),
            words(&d.negative)
        ));
    }
    // Highlighted: sentences kept out of the models' and the steer's training (the prompts' sources)
    // the scorer rates most clearly positive and negative, each against its own label's direction.
    let mut highlights = String::new();
    let mut rated: Vec<(f64, &&Sentence)> = prompt_set
        .iter()
        .filter(|x| (8..=24).contains(&x.text.split_whitespace().count()))
        .map(|x| (scorer.score(&x.text), x))
        .collect();
    rated.sort_by(|a, b| b.0.total_cmp(&a.0));
    let picks: Vec<&&Sentence> = rated
        .iter()
        .filter(|(_, x)| x.positive)
        .take(2)
        .chain(rated.iter().rev().filter(|(_, x)| !x.positive).take(2))
        .map(|(_, x)| *x)
        .collect();
    for (k, x) in picks.into_iter().enumerate() {
        let html = dir.join(format!("highlight-{}.html", k + 1));
        let strength = if x.positive { 1.0 } else { -1.0 };
        let h =
            memsteer_steer::highlight::highlight(large.decoder(), &steer, tok, tok.encode(&x.text)?, strength, (2, 4))?;
        let page = memsteer_steer::highlight::render_html(
            &h,
            steer.labels()[0].as_str(),
            &large_steer.display().to_string(),
            strength,
        );
        memsteer_panel::write_atomic(&html, |w| w.write_all(page.as_bytes()))?;
        let mut marked = String::new();
        for (i, piece) in h.pieces.iter().enumerate() {
            // Adjacent spans are marked as one bold run (`****` would not render).
            let opens = h.spans.iter().any(|sp| sp.start == i) && !h.spans.iter().any(|sp| sp.end == i);
            let closes = h.spans.iter().any(|sp| sp.end == i + 1) && !h.spans.iter().any(|sp| sp.start == i + 1);
            let (lead, body) = match piece.strip_prefix(' ') {
                Some(rest) if opens => (" ", rest),
                _ => ("", piece.as_str()),
            };
            marked.push_str(lead);
            if opens {
                marked.push_str("**");
            }
            for c in body.chars() {
                if matches!(c, '\\' | '*' | '_' | '`' | '[' | ']') {
                    marked.push('\\');
                }
                marked.push(c);
            }
            if closes {
                marked.push_str("**");
            }
        }
        let total: f64 = h.evidence.iter().flatten().sum();
        highlights.push_str(&format!(
            "- {} (evidence {} “positive” summed over the sentence: {total:+.2}; [HTML]({})): {}\n",
            if x.positive {
                "positive, the steer at +1 against −1"
            } else {
                "negative, the steer at −1 against +1"
            },
            if x.positive { "for" } else { "against" },
            html.file_name().and_then(|n| n.to_str()).unwrap_or_default(),
            marked.trim()
        ));
    }

    Ok((explain_md, highlights))
}

/// The steers as zero-shot classifiers (`steer detect`): the Markdown section.
fn detect(
    run: &Run<'_>,
    data: &Data<'_>,
    models: &[TrainedModel],
    steers: &[SteerRow],
    scorer: &memsteer_steer::eval::sentiment::SentimentScorer,
    log: &mut Log,
) -> Result<String> {
    // --- The steer as a zero-shot classifier (`steer detect`, the authors' `steer_analysis`): the
    // sentences no model or steer trained on (the prompts' sources), each labelled by the sign of the
    // strength that explains it best, and by the sign of the mean strength under the authors'
    // distribution; the built-in scorer rated on the same sentences (which it trained on) and on its own
    // held-out ones (the steer's training data) beside it.
    let mut detect_md = String::from(
        "| model's own steer | sentences | accuracy, sign of the best strength (0 counts as wrong) | accuracy, sign of the mean strength | built-in scorer on the same sentences (trained on them) |\n|---|---:|---:|---:|---:|\n",
    );
    for &m in &[0usize, 1] {
        let (name, model, _) = &models[m];
        let steer = &steers.iter().find(|x| x.1 == m && x.0.ends_with("its own steer")).context("own steer")?.2;
        let lm = memsteer_lm::Model::load(model)?;
        let steer = memsteer_steer::Steer::load_for(steer, lm.decoder())?;
        let config = memsteer_steer::evidence::DetectConfig { min: -3.0, max: 3.0, bins: 7 };
        let found = data
            .prompt_set
            .iter()
            .map(|x| {
                Ok(memsteer_steer::evidence::detect_text(
                    lm.decoder(),
                    &steer,
                    &run.encode(&x.text)?,
                    Some(&run.tok),
                    &config,
                )?)
            })
            .collect::<Result<Vec<_>>>()?;
        let (mut best_right, mut mean_right, mut scorer_right) = (0usize, 0usize, 0usize);
        for ((d, _), x) in found.iter().zip(&data.prompt_set) {
            let want = if x.positive { 1.0 } else { -1.0 };
            best_right += usize::from(f64::from(d.best_strength()).signum() * want > 0.0 && d.best_strength() != 0.0);
            let mean: f64 = d.strengths.iter().zip(&d.distribution).map(|(s, p)| f64::from(*s) * p).sum();
            mean_right += usize::from(mean * want > 0.0);
            scorer_right += usize::from((scorer.score(&x.text) - 0.5) * want > 0.0);
        }
        let n = found.len();
        let pct = |k: usize| 100.0 * k as f64 / n.max(1) as f64;
        detect_md.push_str(&format!(
            "| {name} | {n} | {:.1}% | {:.1}% | {:.1}% |\n",
            pct(best_right),
            pct(mean_right),
            pct(scorer_right)
        ));
        log.say(format!(
            "detect: {name}'s steer labels {:.1}% of {n} unseen sentences right by its best strength, {:.1}% by the mean strength (the built-in scorer, which trained on them: {:.1}%)",
            pct(best_right),
            pct(mean_right),
            pct(scorer_right)
        ));
    }
    detect_md.push_str(&format!(
        "\nThe built-in scorer's accuracy on its own held-out sentences (the steer's training data): {:.1}% of {}.\n",
        100.0 * scorer.held_out_accuracy,
        scorer.held_out_size
    ));

    Ok(detect_md)
}
