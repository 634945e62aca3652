//! `memsteer steer eval`: dist-n, conditional perplexity and style scores of generations.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail, ensure};
use clap::Args;
use memsteer_lm::DeviceModel;

use super::*;

/// The style scorer of `steer eval`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ScorerKind {
    /// Logistic regression on bag-of-words trained on the built-in UCI sentences; score = P(positive).
    BuiltinSentiment,
    /// No style score.
    None,
}

/// Arguments of `memsteer steer eval`.
#[derive(Debug, Clone, Args)]
pub struct EvalArgs {
    /// A generations file (`steer generate --out`), optionally with a label after the last ':' (e.g. the
    /// strength it was generated at: `g3.jsonl:3`); repeat for several files.
    #[arg(long = "generations", value_name = "FILE[:LABEL]", required = true, allow_hyphen_values = true)]
    pub generations: Vec<String>,
    /// The prompts the generations continue (JSON lines with `id` and `text` or `tokens`), for perplexity.
    #[arg(long, value_name = "FILE")]
    pub prompts: Option<PathBuf>,
    /// Model directory under which to compute the conditional perplexity of the continuations.
    #[arg(long, value_name = "DIR")]
    pub ppl_model: Option<PathBuf>,
    /// The built-in style scorer (ignored with --scorer-cmd).
    #[arg(long, value_enum, default_value_t = ScorerKind::BuiltinSentiment)]
    pub scorer: ScorerKind,
    /// External scorer run with `sh -c`: one JSON line {"text": …} per sample on its stdin, one number per
    /// line on its stdout.
    #[arg(long, value_name = "CMD")]
    pub scorer_cmd: Option<String>,
    /// Where whole-sequence forward passes run: `cpu`, or `cuda` / `cuda:N` in a build with the `cuda`
    /// feature (the perplexity model's log-probabilities on the GPU).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Draw the mean score against the label (read as a number) into this SVG file.
    #[arg(long, value_name = "FILE.svg")]
    pub plot: Option<PathBuf>,
}

/// The evaluation of one generations file.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct FileEval {
    /// The file.
    pub file: String,
    /// Its label (`FILE:LABEL`), if any.
    pub label: Option<String>,
    /// Samples in the file.
    pub samples: usize,
    /// Distinct prompts.
    pub prompts: usize,
    /// dist-1, dist-2, dist-3.
    pub dist: [f64; 3],
    /// Whether dist-n counted token ids as words (the file has no `text`).
    pub dist_on_tokens: bool,
    /// Mean perplexity of the samples kept (those below 1e4), with `--ppl-model`.
    pub perplexity: Option<f64>,
    /// Samples dropped for a perplexity ≥ 1e4.
    pub perplexity_dropped: Option<usize>,
    /// Mean style score.
    pub score_mean: Option<f64>,
    /// Standard deviation of the style scores.
    pub score_std: Option<f64>,
    /// Per-sample style scores, in file order.
    #[serde(skip)]
    pub scores: Vec<f64>,
}

/// What `steer eval` reports.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct EvalReport {
    /// The scorer used: `builtin-sentiment`, `command` or `none`.
    pub scorer: String,
    /// Held-out accuracy of the built-in scorer.
    pub scorer_held_out_accuracy: Option<f64>,
    /// Held-out sentences of the built-in scorer.
    pub scorer_held_out: Option<usize>,
    /// One entry per generations file, in argument order.
    pub files: Vec<FileEval>,
}

/// Perplexities at or above this are dropped from the mean, as the LM-Steer authors do.
pub const PPL_CUTOFF: f64 = 1e4;

/// One line of a generations file.
#[derive(Debug, Clone)]
struct Sample {
    prompt_key: String,
    tokens: Option<Vec<u32>>,
    text: Option<String>,
    /// The generator's tokenizer fingerprint ([`tokenizer_fingerprint`]), when the file says.
    tokenizer: Option<String>,
}

/// A prompt as the prompts file gives it, for the perplexity model: its ids, its text, or both.
#[derive(Debug, Clone)]
struct PromptForms {
    line: usize,
    tokens: Option<Vec<u32>>,
    text: Option<String>,
}

/// A line's optional `tokens` (ids) and `text`, each checked for its type; `at` names the line.
fn tokens_and_text(v: &serde_json::Value, at: &dyn Fn() -> String) -> Result<(Option<Vec<u32>>, Option<String>)> {
    let tokens = match v.get("tokens") {
        None => None,
        Some(serde_json::Value::Array(t)) => Some(
            t.iter()
                .map(|x| x.as_u64().filter(|n| *n <= u64::from(u32::MAX)).map(|n| n as u32))
                .collect::<Option<Vec<u32>>>()
                .with_context(|| format!("{}: `tokens` must hold non-negative integer ids", at()))?,
        ),
        Some(other) => bail!("{}: `tokens` must be an array of ids, found {other}", at()),
    };
    let text = match v.get("text") {
        None => None,
        Some(serde_json::Value::String(s)) => Some(s.clone()),
        Some(other) => bail!("{}: `text` must be a string, found {other}", at()),
    };
    Ok((tokens, text))
}

/// The prompts file for `steer eval`: each prompt's ids and text as given (which one is used depends on
/// the tokenizers, see [`perplexities`]).
fn read_prompt_forms(path: &Path) -> Result<std::collections::HashMap<String, PromptForms>> {
    let mut out = std::collections::HashMap::new();
    for (line, v) in json_lines(path, "prompts")? {
        let at = || format!("{}, line {line}", path.display());
        let key = v.get("id").and_then(prompt_key).with_context(|| format!("{}: expected an `id`", at()))?;
        let (tokens, text) = tokens_and_text(&v, &at)?;
        ensure!(tokens.is_some() || text.is_some(), "{}: expected a `text` string or a `tokens` array", at());
        ensure!(
            out.insert(key.clone(), PromptForms { line, tokens, text }).is_none(),
            "{}: prompt id {key:?} appears twice",
            at()
        );
    }
    ensure!(!out.is_empty(), "{}: no prompts", path.display());
    Ok(out)
}

/// Splits `FILE[:LABEL]`: an existing path is a file; otherwise the part after the last ':' is the label.
fn parse_generations_spec(spec: &str) -> (PathBuf, Option<String>) {
    if !Path::new(spec).exists()
        && let Some((file, label)) = spec.rsplit_once(':')
        && !file.is_empty()
        && !label.is_empty()
    {
        return (PathBuf::from(file), Some(label.to_string()));
    }
    (PathBuf::from(spec), None)
}

fn prompt_key(v: &serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

fn read_generations(path: &Path) -> Result<Vec<Sample>> {
    let mut out = Vec::new();
    for (line, v) in json_lines(path, "generations")? {
        let at = || format!("{}, line {line}", path.display());
        let prompt_key = v
            .get("prompt_id")
            .and_then(prompt_key)
            .with_context(|| format!("{}: expected a `prompt_id` string or number", at()))?;
        let (tokens, text) = tokens_and_text(&v, &at)?;
        ensure!(tokens.is_some() || text.is_some(), "{}: a sample needs `text` or `tokens`", at());
        let tokenizer = match v.get("tokenizer") {
            None | Some(serde_json::Value::Null) => None,
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            Some(other) => bail!("{}: `tokenizer` must be a fingerprint string, found {other}", at()),
        };
        out.push(Sample { prompt_key, tokens, text, tokenizer });
    }
    ensure!(!out.is_empty(), "{}: no generations", path.display());
    Ok(out)
}

pub use memsteer_steer::eval::distinct_n;

/// Conditional perplexities `exp(−mean log p(continuation | prompt))` of every sample, in file order.
/// The perplexity of every sample under `model`, conditioned on its prompt when `prompts` are given.
/// Token ids are used only when they are the perplexity model's own: the sample's `tokenizer` fingerprint
/// equals `ppl_tokenizer` (or the perplexity model has no tokenizer files, so ids are all it reads).
/// Otherwise the `text` of the sample (and of its prompt) is tokenized again with the perplexity model's
/// tokenizer, and a sample or prompt with ids only is an error.
fn perplexities(
    model: &DeviceModel,
    tok: &mut LazyTokenizer<'_>,
    ppl_tokenizer: Option<&str>,
    prompts: Option<(&Path, &std::collections::HashMap<String, PromptForms>)>,
    samples: &[Sample],
    file: &Path,
) -> Result<Vec<f64>> {
    let dec = model.decoder()?;
    let mut seqs: Vec<(Vec<u32>, usize)> = Vec::with_capacity(samples.len());
    for (i, s) in samples.iter().enumerate() {
        let at = || format!("{}, sample {} (prompt {:?})", file.display(), i + 1, s.prompt_key);
        // Whether the generator's ids are the perplexity model's.
        let same = match ppl_tokenizer {
            None => true,
            Some(p) => s.tokenizer.as_deref() == Some(p),
        };
        let foreign = |what: String| match (&s.tokenizer, ppl_tokenizer) {
            (Some(g), Some(p)) => anyhow::anyhow!(
                "{what} has token ids only, made with another tokenizer (fingerprint {g}) than the perplexity model's ({p}); give its `text` or a perplexity model with the generator's tokenizer"
            ),
            _ => anyhow::anyhow!(
                "{what} has token ids only and the generations do not say which tokenizer made them (no `tokenizer` field): they cannot be checked against the perplexity model's tokenizer; give `text`"
            ),
        };
        let cont = match (&s.tokens, &s.text) {
            (Some(t), _) if same => t.clone(),
            (_, Some(text)) => tok.get(&at())?.encode(text).with_context(|| format!("{}: tokenizing", at()))?,
            (Some(_), None) => return Err(foreign(at())),
            (None, None) => unreachable!("checked when reading"),
        };
        if let Some(&bad) = cont.iter().find(|&&t| t as usize >= dec.vocab()) {
            bail!("{}: token id {bad} is outside the perplexity model's vocabulary (size {})", at(), dec.vocab());
        }
        let prompt_ids;
        let prompt: &[u32] = match prompts {
            Some((path, map)) => {
                let p =
                    map.get(&s.prompt_key).with_context(|| format!("{}: no prompt with this id in --prompts", at()))?;
                let where_ = || format!("{}, line {} (prompt {:?})", path.display(), p.line, s.prompt_key);
                prompt_ids = match (&p.tokens, &p.text) {
                    (Some(t), _) if same => t.clone(),
                    (_, Some(text)) => {
                        tok.get(&where_())?.encode(text).with_context(|| format!("{}: tokenizing", where_()))?
                    }
                    (Some(_), None) => return Err(foreign(where_())),
                    (None, None) => unreachable!("checked when reading"),
                };
                if let Some(&bad) = prompt_ids.iter().find(|&&t| t as usize >= dec.vocab()) {
                    bail!(
                        "{}: token id {bad} is outside the perplexity model's vocabulary (size {})",
                        where_(),
                        dec.vocab()
                    );
                }
                &prompt_ids
            }
            None => &[],
        };
        let seq: Vec<u32> = prompt.iter().chain(&cont).copied().collect();
        ensure!(
            !cont.is_empty() && seq.len() >= 2,
            "{}: too few tokens to score (a continuation needs at least {} without --prompts)",
            at(),
            if prompts.is_some() { 1 } else { 2 }
        );
        ensure!(
            seq.len() <= dec.context(),
            "{}: {} tokens exceed the perplexity model's context of {}",
            at(),
            seq.len(),
            dec.context()
        );
        // Index into the log-probs of the first scored continuation token.
        let first = prompt.len().max(1) - 1;
        seqs.push((seq, first));
    }
    Ok(memsteer_steer::eval::perplexities(model, &seqs)?)
}

/// Runs `memsteer steer eval`.
pub fn eval(a: &EvalArgs) -> Result<EvalReport> {
    let specs: Vec<(PathBuf, Option<String>)> = a.generations.iter().map(|g| parse_generations_spec(g)).collect();
    let files = specs.iter().map(|(p, _)| read_generations(p)).collect::<Result<Vec<_>>>()?;
    // The perplexity model and the prompts it conditions on.
    let ppl = match &a.ppl_model {
        Some(dir) => {
            let model = load_on(dir, &a.device)?;
            let prompts = match &a.prompts {
                Some(p) => Some((p.clone(), read_prompt_forms(p)?)),
                None => {
                    eprintln!(
                        "note: no --prompts; perplexity is the continuations' own (each scored from its second token)"
                    );
                    None
                }
            };
            let fingerprint = tokenizer_fingerprint(dir)?;
            Some((model, dir.clone(), prompts, fingerprint))
        }
        None => None,
    };
    let builtin = match (&a.scorer_cmd, a.scorer) {
        (None, ScorerKind::BuiltinSentiment) => Some(memsteer_steer::eval::sentiment::SentimentScorer::builtin()?),
        _ => None,
    };
    let scoring = a.scorer_cmd.is_some() || builtin.is_some();
    let mut report = EvalReport {
        scorer: match (&a.scorer_cmd, builtin) {
            (Some(_), _) => "command".into(),
            (None, Some(_)) => "builtin-sentiment".into(),
            (None, None) => "none".into(),
        },
        scorer_held_out_accuracy: builtin.map(|b| b.held_out_accuracy),
        scorer_held_out: builtin.map(|b| b.held_out_size),
        files: Vec::new(),
    };
    for ((path, label), samples) in specs.iter().zip(&files) {
        // Samples grouped by prompt, prompts in order of first appearance.
        let mut order: Vec<&str> = Vec::new();
        let mut groups: std::collections::HashMap<&str, Vec<Vec<String>>> = std::collections::HashMap::new();
        let dist_on_tokens = samples.iter().any(|s| s.text.is_none());
        if dist_on_tokens {
            eprintln!("note: {} has samples without `text`; dist-n counts token ids as words", path.display());
        }
        for s in samples {
            let words: Vec<String> = match (&s.text, &s.tokens) {
                (Some(t), _) if !dist_on_tokens => t.split_whitespace().map(str::to_string).collect(),
                (_, Some(t)) => t.iter().map(u32::to_string).collect(),
                (Some(t), None) => t.split_whitespace().map(str::to_string).collect(),
                (None, None) => Vec::new(),
            };
            if !groups.contains_key(s.prompt_key.as_str()) {
                order.push(&s.prompt_key);
            }
            groups.entry(&s.prompt_key).or_default().push(words);
        }
        let grouped: Vec<Vec<Vec<String>>> = order.iter().map(|k| groups.remove(k).unwrap_or_default()).collect();
        let dist = distinct_n(&grouped);

        let (perplexity, perplexity_dropped) = match &ppl {
            Some((model, dir, prompts, fingerprint)) => {
                let mut tok = LazyTokenizer::new(dir);
                let prompts = prompts.as_ref().map(|(p, m)| (p.as_path(), m));
                let all = perplexities(model, &mut tok, fingerprint.as_deref(), prompts, samples, path)?;
                let kept: Vec<f64> = all.iter().copied().filter(|p| p.is_finite() && *p < PPL_CUTOFF).collect();
                let mean = (!kept.is_empty()).then(|| kept.iter().sum::<f64>() / kept.len() as f64);
                (mean, Some(all.len() - kept.len()))
            }
            None => (None, None),
        };

        let scores = if scoring {
            let texts = samples
                .iter()
                .enumerate()
                .map(|(i, s)| {
                    s.text.as_deref().with_context(|| {
                        format!(
                            "{}, sample {}: style scoring needs `text` (generate with a tokenizer)",
                            path.display(),
                            i + 1
                        )
                    })
                })
                .collect::<Result<Vec<&str>>>()?;
            match (&a.scorer_cmd, builtin) {
                (Some(cmd), _) => memsteer_steer::eval::external_scores(cmd, &texts)
                    .with_context(|| format!("scoring {}", path.display()))?,
                (None, Some(b)) => texts.iter().map(|t| b.score(t)).collect(),
                (None, None) => Vec::new(),
            }
        } else {
            Vec::new()
        };
        let (score_mean, score_std) = if scores.is_empty() {
            (None, None)
        } else {
            let n = scores.len() as f64;
            let m = scores.iter().sum::<f64>() / n;
            let var = scores.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / n;
            (Some(m), Some(var.sqrt()))
        };
        report.files.push(FileEval {
            file: path.display().to_string(),
            label: label.clone(),
            samples: samples.len(),
            prompts: grouped.len(),
            dist,
            dist_on_tokens,
            perplexity,
            perplexity_dropped,
            score_mean,
            score_std,
            scores,
        });
    }

    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", eval_table(&report));
    }
    if let Some(plot) = &a.plot {
        let mut points = Vec::new();
        for f in &report.files {
            let Some(m) = f.score_mean else {
                bail!("--plot needs style scores (use --scorer builtin-sentiment or --scorer-cmd)");
            };
            let label = f
                .label
                .as_deref()
                .with_context(|| format!("--plot: {} has no label; give it as FILE:STRENGTH", f.file))?;
            let x: f64 = label
                .trim()
                .parse()
                .ok()
                .filter(|x: &f64| x.is_finite())
                .with_context(|| format!("--plot: the label {label:?} of {} is not a number", f.file))?;
            points.push((x, m, f.score_std.unwrap_or(0.0)));
        }
        let y_desc = match report.scorer.as_str() {
            "builtin-sentiment" => "mean P(positive), built-in scorer",
            _ => "mean style score",
        };
        memsteer_plot::steer_eval_figure(plot, &points, y_desc)?;
        eprintln!("wrote {}", plot.display());
    }
    Ok(report)
}

/// A readable table of an evaluation.
fn eval_table(r: &EvalReport) -> String {
    let mut out = String::new();
    if let (Some(acc), Some(n)) = (r.scorer_held_out_accuracy, r.scorer_held_out) {
        out.push_str(&format!("scorer: built-in sentiment (held-out accuracy {acc:.3} on {n} sentences)\n"));
    } else {
        out.push_str(&format!("scorer: {}\n", r.scorer));
    }
    out.push_str(&format!(
        "{:<28} {:>8} {:>7} {:>7} {:>7} {:>7} {:>10} {:>7} {:>8} {:>8}\n",
        "file", "label", "samples", "dist-1", "dist-2", "dist-3", "perplexity", "dropped", "score", "std"
    ));
    let opt = |x: Option<f64>, p: usize| x.map_or("-".to_string(), |v| format!("{v:.p$}"));
    for f in &r.files {
        let name = Path::new(&f.file).file_name().map_or(f.file.clone(), |n| n.to_string_lossy().into_owned());
        out.push_str(&format!(
            "{:<28} {:>8} {:>7} {:>7.4} {:>7.4} {:>7.4} {:>10} {:>7} {:>8} {:>8}\n",
            name,
            f.label.as_deref().unwrap_or("-"),
            f.samples,
            f.dist[0],
            f.dist[1],
            f.dist[2],
            opt(f.perplexity, 2),
            f.perplexity_dropped.map_or("-".to_string(), |d| d.to_string()),
            opt(f.score_mean, 4),
            opt(f.score_std, 4),
        ));
    }
    out
}
