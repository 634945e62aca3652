//! `cargo xtask reproduce steer`: LM-Steer end to end on models the project trains itself.
//!
//! Two small GPT-NeoX models (`memsteer train`) learn English from the built-in corpus: the UCI
//! review sentences (without their labels) and Moby Dick. A sentiment steer is trained on each
//! (`memsteer steer train`, the model frozen) from the labelled sentences the built-in scorer holds
//! out, so the scorer that judges the steered text never saw the steer's data. Then, as in the
//! LM-Steer paper: continuations of held-out review openings at a range of strengths (`steer
//! generate`), their share of positive continuations, perplexity under the larger model and dist-n
//! (`steer eval`); the words the steer promotes (`steer explain`); where held-out sentences carry the
//! style (`steer highlight`); and each steer moved to the other model size (`steer transfer`) with the
//! effect it keeps there. Writes figures, tables and `gallery.md` under the run's directory.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, ensure};
use memsteer_cli::steer::{EvalArgs, ExplainArgs, GenerateArgs, HighlightArgs, ScorerKind, TransferArgs};
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
/// The two model sizes: name, hidden size, layers, heads.
const SIZES: [(&str, usize, usize, usize); 2] = [("small", 64, 2, 4), ("large", 128, 4, 4)];

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
    let mut rng = SplitMix64::new(seed);
    for i in (1..v.len()).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        v.swap(i, j);
    }
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

/// Share of scores at or above 0.5 and its 95% normal-approximation half-width.
fn positive_share(scores: &[f64]) -> (f64, f64) {
    let n = scores.len().max(1) as f64;
    let p = scores.iter().filter(|&&x| x >= 0.5).count() as f64 / n;
    (p, 1.96 * (p * (1.0 - p) / n).sqrt())
}

/// Spearman-free monotonicity check: the number of adjacent strength pairs where the share drops.
fn drops(points: &[(f64, f64, f64)]) -> usize {
    points.windows(2).filter(|w| w[1].1 < w[0].1).count()
}

/// Runs the demo into `dir`.
pub fn run(dir: &Path, quick: bool) -> Result<()> {
    let started = std::time::Instant::now();
    let plan = if quick {
        Plan {
            prompts: 40,
            samples: 4,
            new_tokens: 16,
            epochs: 2,
            steer_steps: 300,
            strengths: &[-4.0, -2.0, -1.0, 0.0, 1.0, 2.0, 4.0],
        }
    } else {
        Plan {
            prompts: 150,
            samples: 8,
            new_tokens: 20,
            epochs: 4,
            steer_steps: 1000,
            strengths: &[-4.0, -3.0, -2.0, -1.0, 0.0, 1.0, 2.0, 3.0, 4.0],
        }
    };
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let corpus = crate::root().join("fixtures/corpus");
    let tok = Tokenizer::from_dir(&corpus)?;
    let mut report: Vec<String> = Vec::new();
    let mut say = |line: String| {
        println!("{line}");
        report.push(line);
    };

    // --- Data: the scorer's held-out sentences train the steer; openings of a seeded sample of the
    // others are the prompts; the rest (labels dropped) and Moby Dick train the language models.
    let sentences = read_sentences(&corpus.join("sentiment.jsonl"))?;
    let encode = |t: &str| -> Result<Vec<u32>> {
        let mut ids = vec![EOS];
        ids.extend(tok.encode(t)?);
        Ok(ids)
    };
    let (steer_set, rest): (Vec<&Sentence>, Vec<&Sentence>) =
        sentences.iter().partition(|x| memsteer_cli::sentiment::held_out(&x.id));
    let mut candidates: Vec<&Sentence> = rest.clone();
    candidates.sort_by_key(|x| hash_key(11, x.id.as_bytes()));
    let prompt_set: Vec<&Sentence> = candidates
        .into_iter()
        .filter(|x| x.text.split_whitespace().count() > PROMPT_WORDS + 2)
        .take(plan.prompts)
        .collect();
    let prompt_ids: std::collections::HashSet<&str> = prompt_set.iter().map(|x| x.id.as_str()).collect();
    let lm_set: Vec<&Sentence> = rest.iter().copied().filter(|x| !prompt_ids.contains(x.id.as_str())).collect();

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
    say(format!(
        "data: steer on {} positive + {} negative sentences (the scorer's held-out part); {} prompts (the first {PROMPT_WORDS} words of other held-out-from-the-LM sentences); language models on {n} instances of {LEN} tokens ({reviews} of reviews, the rest Moby Dick), {} epochs",
        steer_set.iter().filter(|x| x.positive).count(),
        steer_set.iter().filter(|x| !x.positive).count(),
        prompt_set.len(),
        plan.epochs
    ));

    // --- Language models.
    let mut models = Vec::new();
    for (name, hidden, layers, heads) in SIZES {
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
        let t = std::time::Instant::now();
        memsteer_cli::run_from([
            "memsteer".to_string(),
            "train".into(),
            "--model-config".into(),
            s(&config),
            "--instances".into(),
            s(&lm_train),
            "--tokenizer".into(),
            s(&corpus),
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
            "0".into(),
            "--out".into(),
            s(&run),
            "--quiet".into(),
        ])
        .with_context(|| format!("training the {name} language model"))?;
        say(format!("lm-{name}: hidden {hidden}, {layers} layers, {steps} steps ({:.0} s)", t.elapsed().as_secs_f64()));
        models.push((name, run.join(format!("step{steps}"))));
    }
    let ppl_model = models[models.len() - 1].1.clone();

    // --- Steers, one per model, then each moved to the other model.
    let mut steers: Vec<(String, PathBuf, PathBuf)> = Vec::new(); // (label, model dir, steer file)
    for (name, model) in &models {
        let out = dir.join(format!("steer-{name}.safetensors"));
        let t = std::time::Instant::now();
        let o = memsteer_cli::steer::train(&memsteer_cli::steer::SteerTrainArgs {
            model: model.clone(),
            positive: pos.clone(),
            negative: neg.clone(),
            out: out.clone(),
            rank: None,
            steps: plan.steer_steps,
            lr: 1e-2,
            batch_size: 32,
            epsilon: 1e-3,
            max_length: 256,
            weight_decay: 0.0,
            cache_memory: 4.0,
            cache_dir: None,
            seed: 0,
            device: "cpu".into(),
            quiet: true,
        })
        .with_context(|| format!("training the steer of lm-{name}"))?;
        say(format!(
            "steer-{name}: {} sequences, {} steps, last loss {:.3} ({:.0} s)",
            o.sequences,
            plan.steer_steps,
            o.final_loss,
            t.elapsed().as_secs_f64()
        ));
        steers.push((format!("{name} (trained on it)"), model.clone(), out));
    }
    let mut transfers = Vec::new();
    for (i, (from_name, from)) in models.iter().enumerate() {
        for (to_name, to) in models.iter().filter(|(n, _)| n != from_name) {
            let out = dir.join(format!("steer-{from_name}-to-{to_name}.safetensors"));
            let (_, residual) = memsteer_cli::steer::transfer(&TransferArgs {
                steer: steers[i].2.clone(),
                from: from.clone(),
                to: to.clone(),
                out: out.clone(),
                top_k: None,
                ridge: 0.0,
                map: memsteer_cli::steer::MapKind::Orthogonal,
            })?;
            say(format!(
                "transfer {from_name} → {to_name}: W' = HᵀWH, H fitted on the shared vocabulary, relative residual {residual:.3}"
            ));
            transfers.push((format!("{to_name} (moved from {from_name})"), to.clone(), out));
        }
    }
    steers.extend(transfers);

    // --- Generation at each strength and evaluation.
    let mut series = Vec::new();
    let mut tables = Vec::new();
    for (label, model, steer) in &steers {
        let tag = steer.file_stem().and_then(|x| x.to_str()).unwrap_or("steer").to_string();
        let mut specs = Vec::new();
        for &v in plan.strengths {
            let out = dir.join(format!("gen-{tag}-{v:+}.jsonl"));
            memsteer_cli::steer::generate(&GenerateArgs {
                model: model.clone(),
                steers: if v == 0.0 { vec![] } else { vec![format!("{}:{v}", steer.display())] },
                prompts: prompts.clone(),
                samples: plan.samples,
                max_new_tokens: plan.new_tokens,
                temperature: 1.0,
                top_k: None,
                top_p: Some(0.9),
                seed: 1,
                out: out.clone(),
            })
            .with_context(|| format!("generating with {} at {v}", steer.display()))?;
            specs.push(format!("{}:{v}", out.display()));
        }
        let ev = memsteer_cli::steer::eval(&EvalArgs {
            generations: specs,
            prompts: Some(prompts.clone()),
            ppl_model: Some(ppl_model.clone()),
            scorer: ScorerKind::BuiltinSentiment,
            scorer_cmd: None,
            device: "cpu".into(),
            json: false,
            plot: None,
        })?;
        let mut points = Vec::new();
        let mut table = format!(
            "| strength | positive share | mean P(positive) | perplexity (dropped) | dist-1 | dist-2 | dist-3 |\n|---:|---:|---:|---:|---:|---:|---:|\n"
        );
        for (f, &v) in ev.files.iter().zip(plan.strengths) {
            let (share, half) = positive_share(&f.scores);
            points.push((v, share, half));
            table.push_str(&format!(
                "| {v:+} | {share:.2} ± {half:.2} | {:.3} | {} ({}) | {:.3} | {:.3} | {:.3} |\n",
                f.score_mean.unwrap_or(f64::NAN),
                f.perplexity.map_or("–".into(), |p| format!("{p:.1}")),
                f.perplexity_dropped.unwrap_or(0),
                f.dist[0],
                f.dist[1],
                f.dist[2]
            ));
        }
        let lo = points.first().map_or(0.0, |p| p.1);
        let hi = points.last().map_or(0.0, |p| p.1);
        say(format!(
            "{label}: positive share {lo:.2} at {:+} → {hi:.2} at {:+}; {} drop(s) between adjacent strengths",
            plan.strengths[0],
            plan.strengths[plan.strengths.len() - 1],
            drops(&points)
        ));
        tables.push((label.clone(), table));
        series.push((label.clone(), points));
    }
    let scorer = memsteer_cli::sentiment::SentimentScorer::builtin()?;
    say(format!(
        "scorer: the built-in sentiment classifier, {:.1}% accurate on its {} held-out sentences (the steer's training data, which it never saw)",
        100.0 * scorer.held_out_accuracy,
        scorer.held_out_size
    ));
    memsteer_cli::plot::series_figure(
        dir,
        "positive-share",
        "Share of positive continuations against steer strength",
        ("steer strength", "share scored positive (bars: 95% interval)"),
        &series,
    )?;

    // --- Explanation and highlighted sentences (the larger model's own steer).
    let (_, large_model, large_steer) = &steers[models.len() - 1];
    let ex = memsteer_cli::steer::explain(&ExplainArgs {
        model: large_model.clone(),
        steer: large_steer.clone(),
        dims: 3,
        top: 8,
        json: false,
    })?;
    let mut explain_md = String::from("| direction | σ | one end | other end |\n|---|---:|---|---|\n");
    // Tokens as the text they decode to (byte-level BPE pieces are unreadable), spaces shown as ·.
    let words = |v: &[memsteer_steer::explain::TokenScore]| -> String {
        v.iter()
            .map(|t| {
                let piece = tok.decode(&[t.id]).unwrap_or_else(|_| format!("#{}", t.id));
                format!("`{}`", piece.replace(' ', "·").replace('|', "\\|").replace('`', "'"))
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
    let mut highlights = String::new();
    let picks: Vec<&&Sentence> = [true, false]
        .iter()
        .filter_map(|want| prompt_set.iter().find(|x| x.positive == *want && x.text.split_whitespace().count() >= 8))
        .collect();
    for (k, x) in picks.into_iter().enumerate() {
        let html = dir.join(format!("highlight-{}.html", k + 1));
        let h = memsteer_cli::steer::highlight(&HighlightArgs {
            model: large_model.clone(),
            steer: large_steer.clone(),
            text: Some(x.text.clone()),
            input: None,
            spans: 2,
            span_length: 6,
            html: Some(html.clone()),
            device: "cpu".into(),
            json: false,
            color: false,
        })?;
        let spans: Vec<String> = h
            .spans
            .iter()
            .map(|sp| format!("“{}” ({:+.2})", h.pieces[sp.start..sp.end].concat().trim(), sp.evidence))
            .collect();
        let total: f64 = h.evidence.iter().flatten().sum();
        highlights.push_str(&format!(
            "- {} sentence, summed evidence {total:+.2}: “{}” — strongest spans {} ([HTML]({}))\n",
            if x.positive { "a positive" } else { "a negative" },
            x.text,
            spans.join(", "),
            html.file_name().and_then(|n| n.to_str()).unwrap_or_default()
        ));
    }

    // --- The run's gallery.
    let mut md = format!(
        "# LM-Steer on trained models ({})\n\nWritten by `cargo xtask reproduce{} steer`; what matches the paper \
         and what does not is in `docs/gallery.md`.\n\n```text\n{}\n```\n\n![positive share](positive-share.png)\n\n",
        if quick { "quick" } else { "full" },
        if quick { " --quick" } else { "" },
        report.join("\n")
    );
    for (label, table) in &tables {
        md.push_str(&format!("## {label}\n\n{table}\n"));
    }
    md.push_str(&format!(
        "## What the large model's steer promotes (`steer explain`)\n\nThe top singular directions of W, \
         each with the tokens at its two ends (the sign of a direction is arbitrary):\n\n{explain_md}\n\
         ## Where held-out sentences carry the style (`steer highlight`)\n\n{highlights}\n"
    ));
    std::fs::write(dir.join("gallery.md"), md)?;
    ensure!(!series.is_empty(), "no steer was evaluated");
    println!("steer: under {} ({:.0} s)", dir.display(), started.elapsed().as_secs_f64());
    Ok(())
}
