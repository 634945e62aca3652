//! `memsteer steer eval`: dist-n, conditional perplexity and style scores of generations
//! (`memsteer_steer::eval::evaluate` per file).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Args;
use memsteer_steer::eval::{FileEval, PerplexityModel, Scorer};

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
    /// A generations file, optionally labelled after the last ':' (e.g. its strength: g3.jsonl:3); repeatable.
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
    /// External scorer (`sh -c`): JSON lines {"text"} on stdin, one number per line on stdout.
    #[arg(long, value_name = "CMD")]
    pub scorer_cmd: Option<String>,
    /// Where the perplexity model runs: cpu, or cuda / cuda:N in a build with the cuda feature.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Draw the mean score against the label (read as a number) into this SVG file.
    #[arg(long, value_name = "FILE.svg")]
    pub plot: Option<PathBuf>,
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

/// Runs `memsteer steer eval`.
pub fn eval(a: &EvalArgs) -> Result<EvalReport> {
    let specs: Vec<(PathBuf, Option<String>)> = a.generations.iter().map(|g| parse_generations_spec(g)).collect();
    let files = specs
        .iter()
        .map(|(p, _)| memsteer_steer::data::read_generations(p))
        .collect::<memsteer_steer::Result<Vec<_>>>()?;
    let ppl = match &a.ppl_model {
        Some(dir) => {
            if a.prompts.is_none() {
                eprintln!(
                    "note: no --prompts; perplexity is the continuations' own (each scored from its second token)"
                );
            }
            let device =
                memsteer_kernels::Device::parse(&a.device).with_context(|| format!("--device {}", a.device))?;
            Some(PerplexityModel::load(dir, &device, a.prompts.as_deref())?)
        }
        None => None,
    };
    let scorer = match (&a.scorer_cmd, a.scorer) {
        (Some(cmd), _) => Scorer::Command(cmd.clone()),
        (None, ScorerKind::BuiltinSentiment) => {
            Scorer::Builtin(memsteer_steer::eval::sentiment::SentimentScorer::builtin()?)
        }
        (None, ScorerKind::None) => Scorer::None,
    };
    let builtin = match scorer {
        Scorer::Builtin(b) => Some(b),
        _ => None,
    };
    let mut report = EvalReport {
        scorer: match scorer {
            Scorer::Command(_) => "command",
            Scorer::Builtin(_) => "builtin-sentiment",
            Scorer::None => "none",
        }
        .into(),
        scorer_held_out_accuracy: builtin.map(|b| b.held_out_accuracy),
        scorer_held_out: builtin.map(|b| b.held_out_size),
        files: Vec::new(),
    };
    for ((path, label), samples) in specs.iter().zip(&files) {
        if samples.iter().any(|s| s.text.is_none()) {
            eprintln!("note: {} has samples without `text`; dist-n counts token ids as words", path.display());
        }
        report.files.push(memsteer_steer::eval::evaluate(path, label.clone(), samples, ppl.as_ref(), &scorer)?);
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
