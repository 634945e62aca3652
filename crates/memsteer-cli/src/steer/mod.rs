//! `memsteer steer`: LM-Steer from the command line — train a steer on two corpora, generate with one or
//! several steers at any strength, highlight where a text carries the steer's style, explain, transfer,
//! and evaluate generations (dist-n, perplexity, style scores).

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail, ensure};
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use memsteer_kernels::Device;
use memsteer_lm::tokenizer::Tokenizer;
use memsteer_lm::{DeviceModel, Model};
use memsteer_steer::data::{LazyTokenizer, json_lines, line_tokens, read_corpus};
use memsteer_steer::{HiddenCache, Steer, TrainConfig, train_cached_on};

/// Arguments of `memsteer steer`.
#[derive(Debug, Args)]
pub struct SteerArgs {
    /// The steer subcommand.
    #[command(subcommand)]
    pub command: SteerCommand,
}

/// `memsteer steer` subcommands.
#[derive(Debug, Subcommand)]
pub enum SteerCommand {
    /// Train a steer from a positive and a negative corpus (the model stays frozen).
    Train(SteerTrainArgs),
    /// Generate continuations of prompts with steers at chosen strengths.
    Generate(GenerateArgs),
    /// Per-token evidence of a steer's style in a text, its strongest spans, in colour and as HTML.
    Highlight(HighlightArgs),
    /// The words a steer promotes and suppresses: the tokens at both ends of its top singular directions.
    Explain(ExplainArgs),
    /// Move a steer to another model through a least-squares map between their output embeddings.
    Transfer(TransferArgs),
    /// Evaluate generations: dist-1/2/3, conditional perplexity and style scores, per file (strength).
    Eval(EvalArgs),
    /// Which strength of a steer best explains a text (the authors' zero-shot style classifier), with
    /// per-word evidence.
    Detect(DetectArgs),
}

/// Runs `memsteer steer …`.
pub fn run(a: &SteerArgs) -> Result<()> {
    match &a.command {
        SteerCommand::Train(t) => train(t).map(|_| ()),
        SteerCommand::Generate(g) => generate(g).map(|_| ()),
        SteerCommand::Highlight(h) => highlight(h).map(|_| ()),
        SteerCommand::Explain(e) => explain(e).map(|_| ()),
        SteerCommand::Transfer(t) => transfer(t).map(|_| ()),
        SteerCommand::Eval(e) => eval(e).map(|_| ()),
        SteerCommand::Detect(d) => {
            let found = detect(d)?;
            for (at, f) in &found {
                if d.json {
                    println!("{}", detected_json(f));
                } else {
                    print!("{}", detected_table(at, f));
                }
            }
            Ok(())
        }
    }
}

/// Arguments of `memsteer steer detect`.
#[derive(Debug, Clone, Args)]
pub struct DetectArgs {
    /// The model the steer was trained on (a Hugging Face directory; tokenizer files for `text`).
    #[arg(long, value_name = "DIR")]
    pub model: PathBuf,
    /// The steer file.
    #[arg(long, value_name = "FILE")]
    pub steer: PathBuf,
    /// One text to analyse.
    #[arg(long, conflicts_with = "input", required_unless_present = "input")]
    pub text: Option<String>,
    /// JSON lines with `text` or `tokens` (other fields are copied to the output).
    #[arg(long, value_name = "FILE.jsonl")]
    pub input: Option<PathBuf>,
    /// Smallest strength of the grid.
    #[arg(long, default_value_t = -3.0, allow_hyphen_values = true)]
    pub min: f32,
    /// Largest strength of the grid.
    #[arg(long, default_value_t = 3.0, allow_hyphen_values = true)]
    pub max: f32,
    /// Strengths in the grid, evenly spaced from --min to --max.
    #[arg(long, default_value_t = 7)]
    pub bins: usize,
    /// Where hidden states are computed: cpu, or cuda / cuda:N in a build with the cuda feature.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Print JSON (one line per text) instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// What `steer detect` found for one text.
#[derive(Debug, Clone, PartialEq)]
pub struct Detected {
    /// The fields of the input line (empty for `--text`).
    pub fields: serde_json::Map<String, serde_json::Value>,
    /// The analysis.
    pub detection: memsteer_steer::evidence::Detection,
    /// Per-word evidence (words split at whitespace and punctuation; token ids when the model has no
    /// tokenizer).
    pub words: Vec<memsteer_steer::evidence::WordEvidence>,
}

/// Runs the analysis of `memsteer steer detect` (the subcommand prints it): each text's place (`--text`
/// or `FILE, line N`) and what was found.
pub fn detect(a: &DetectArgs) -> Result<Vec<(String, Detected)>> {
    let config = memsteer_steer::evidence::DetectConfig { min: a.min, max: a.max, bins: a.bins };
    config.strengths().context("--min, --max, --bins")?;
    let model = load_on(&a.model, &a.device)?;
    let decoder = model.decoder()?;
    let steer = Steer::load_for(&a.steer, decoder)
        .with_context(|| format!("--steer {}: loading the steer for {}", a.steer.display(), a.model.display()))?;
    ensure!(!steer.labels().is_empty(), "{}: the steer has no labelled steer", a.steer.display());
    let mut tok = LazyTokenizer::new(&a.model);
    let inputs: Vec<(String, serde_json::Map<String, serde_json::Value>, Vec<u32>)> = match (&a.text, &a.input) {
        (Some(t), _) => {
            let ids = tok.get("--text")?.encode(t).context("tokenizing --text")?;
            vec![("--text".to_string(), serde_json::Map::new(), ids)]
        }
        (None, Some(p)) => json_lines(p, "texts")?
            .into_iter()
            .map(|(line, v)| {
                let at = || format!("{}, line {line}", p.display());
                ensure!(v.is_object(), "{}: expected a JSON object with `text` or `tokens`", at());
                let ids = line_tokens(&v, &at, &mut tok, decoder.vocab())?;
                let fields = match v {
                    serde_json::Value::Object(mut o) => {
                        o.remove("tokens");
                        o
                    }
                    _ => bail!("{}: expected a JSON object", at()),
                };
                Ok((at(), fields, ids))
            })
            .collect::<Result<Vec<_>>>()?,
        (None, None) => bail!("give --text TEXT or --input FILE.jsonl"),
    };
    let tokenizer =
        if memsteer_lm::tokenizer::present_in(&a.model) { Some(tok.get("decoding tokens")?.clone()) } else { None };
    let bar = if inputs.len() > 1 && std::io::stderr().is_terminal() {
        ProgressBar::new(inputs.len() as u64)
    } else {
        ProgressBar::hidden()
    };
    let mut out = Vec::with_capacity(inputs.len());
    for (at, fields, ids) in inputs {
        let (detection, words) =
            memsteer_steer::evidence::detect_text(decoder, &steer, &ids, tokenizer.as_ref(), &config)
                .with_context(|| at.clone())?;
        bar.inc(1);
        out.push((at, Detected { fields, detection, words }));
    }
    bar.finish_and_clear();
    Ok(out)
}

/// One output line of `steer detect --json`: the input's fields, then `best_strength`, `strengths`,
/// `losses`, `distribution` and `words` (`[{"word", "evidence"}]`).
pub fn detected_json(d: &Detected) -> serde_json::Value {
    let mut o = d.fields.clone();
    let det = &d.detection;
    o.insert("best_strength".into(), det.best_strength().into());
    o.insert("strengths".into(), det.strengths.clone().into());
    o.insert("losses".into(), det.losses.clone().into());
    o.insert("distribution".into(), det.distribution.clone().into());
    o.insert("words".into(), serde_json::to_value(&d.words).unwrap_or_default());
    serde_json::Value::Object(o)
}

fn detected_table(at: &str, d: &Detected) -> String {
    let det = &d.detection;
    let mut s = format!("{at}: best strength {:+}\n  strength    loss  P(strength)\n", det.best_strength());
    for ((v, l), p) in det.strengths.iter().zip(&det.losses).zip(&det.distribution) {
        let mark = if *v == det.best_strength() { " <" } else { "" };
        s.push_str(&format!("  {v:>+8.3} {l:>7.4} {p:>12.4}{mark}\n"));
    }
    let mut words: Vec<&memsteer_steer::evidence::WordEvidence> = d.words.iter().collect();
    words.sort_by(|a, b| b.evidence.total_cmp(&a.evidence));
    let top: Vec<String> = words.iter().take(8).map(|w| format!("{} ({:+.3})", w.word, w.evidence)).collect();
    s.push_str(&format!("  words that favour it most: {}\n", top.join(", ")));
    s
}

/// Arguments of `memsteer steer explain`.
#[derive(Debug, Clone, Args)]
pub struct ExplainArgs {
    /// The model the steer was trained on (a Hugging Face directory).
    #[arg(long)]
    pub model: PathBuf,
    /// The steer file.
    #[arg(long)]
    pub steer: PathBuf,
    /// Singular directions per labelled steer, the largest first.
    #[arg(long, default_value_t = 5)]
    pub dims: usize,
    /// Tokens shown at each end of a direction.
    #[arg(long, default_value_t = 10)]
    pub top: usize,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Runs `memsteer steer explain`.
pub fn explain(a: &ExplainArgs) -> Result<memsteer_steer::explain::Explanation> {
    let model = load_model(&a.model)?;
    let dec = model.decoder();
    let steer = Steer::load_for(&a.steer, dec)?;
    let tok = memsteer_lm::tokenizer::present_in(&a.model).then(|| Tokenizer::from_dir(&a.model)).transpose()?;
    let name = |id: u32| tok.as_ref().and_then(|t| t.id_to_token(id));
    let config = memsteer_steer::explain::ExplainConfig { dims: a.dims, top: a.top };
    let ex = memsteer_steer::explain::explain(&steer, dec.output_embedding(), &config, &name)
        .with_context(|| format!("explaining {}", a.steer.display()))?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&ex)?);
    } else {
        print!("{ex}");
    }
    Ok(ex)
}

/// Arguments of `memsteer steer transfer`.
#[derive(Debug, Clone, Args)]
pub struct TransferArgs {
    /// The steer file (trained on the --from model).
    #[arg(long)]
    pub steer: PathBuf,
    /// The model the steer was trained on.
    #[arg(long)]
    pub from: PathBuf,
    /// The model to move it to.
    #[arg(long)]
    pub to: PathBuf,
    /// Where to write the transferred steer.
    #[arg(long)]
    pub out: PathBuf,
    /// Fit the map on the first N shared tokens only (default: all; 4,000 with --map authors).
    #[arg(long, value_name = "N")]
    pub top_k: Option<usize>,
    /// Ridge added to the least-squares fits, in squared units of the regressors (0: none).
    #[arg(long, default_value_t = 0.0)]
    pub ridge: f64,
    /// How W is carried over: paper (HᵀWH), authors (their script) or two-sided (HᵀWGᵀ).
    #[arg(long, value_enum, default_value_t = MapKind::Paper)]
    pub map: MapKind,
}

/// How `steer transfer` carries W to the target model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum MapKind {
    /// W' = HᵀWH with E_from ≈ E_to Hᵀ (the paper's).
    Paper,
    /// P' = B P with E_to B ≈ E_from on the first --top-k shared tokens, rows of B normalised (the authors'
    /// script; B is the closed-form least-squares optimum of their loss, where they run Adam).
    Authors,
    /// W' = HᵀWGᵀ with E_to ≈ E_from H and E_from ≈ E_to G.
    TwoSided,
}

impl MapKind {
    /// The library's map.
    pub fn map(self) -> memsteer_steer::transfer::TransferMap {
        use memsteer_steer::transfer::TransferMap;
        match self {
            MapKind::Paper => TransferMap::Paper,
            MapKind::Authors => TransferMap::Authors,
            MapKind::TwoSided => TransferMap::TwoSided,
        }
    }
}

/// Runs `memsteer steer transfer`; returns the transferred steer and the fit's relative residual.
pub fn transfer(a: &TransferArgs) -> Result<(Steer, f64)> {
    use memsteer_steer::transfer::{EmbeddingView, Matching, SharedTokens, TransferConfig};
    ensure!(a.ridge.is_finite() && a.ridge >= 0.0, "--ridge must be a finite number ≥ 0, found {}", a.ridge);
    let (from_model, to_model) = (load_model(&a.from)?, load_model(&a.to)?);
    let (from, to) = (from_model.decoder(), to_model.decoder());
    let steer = Steer::load_for(&a.steer, from)?;
    let shared = SharedTokens::of_dirs((&a.from, from.vocab()), (&a.to, to.vocab()))
        .with_context(|| format!("matching the vocabularies of {} and {}", a.from.display(), a.to.display()))?;
    if shared.matching == Matching::ById {
        eprintln!(
            "warning: neither model has tokenizer files; tokens are matched by id, which assumes both use the same tokenizer"
        );
    }
    let config = TransferConfig { top_k: a.top_k, ridge: a.ridge, map: a.map.map() };
    let (moved, map) = memsteer_steer::transfer::transfer(
        &steer,
        &EmbeddingView::of(from)?,
        &EmbeddingView::of(to)?,
        &shared,
        &config,
    )
    .with_context(|| format!("transferring {} to {}", a.steer.display(), a.to.display()))?;
    if map.ridge_automatic {
        eprintln!("warning: the least-squares fit was singular; a ridge of {:e} was added", map.ridge);
    }
    let inverse = &moved.training()["transfer"]["inverse"];
    if inverse["ridge_automatic"] == true {
        eprintln!(
            "warning: the inverse fit (E_from ≈ E_to G) was singular; a ridge of {:e} was added",
            inverse["ridge"].as_f64().unwrap_or(f64::NAN)
        );
    }
    let inverse_note = inverse["relative_residual"]
        .as_f64()
        .map_or(String::new(), |r| format!(", inverse fit G relative residual {r:.3e}"));
    moved.save(&a.out).with_context(|| format!("writing {}", a.out.display()))?;
    eprintln!(
        "map {}: W' = {}; H {} × {}, fitted on {} of {} shared tokens (matched by {}), relative residual {:.3e}{inverse_note}; wrote {}",
        config.map.name(),
        config.map.formula(),
        map.d_from,
        map.d_to,
        map.pairs_used,
        map.shared,
        match shared.matching {
            Matching::ByString => "string",
            Matching::ById => "id",
            _ => "the caller",
        },
        map.relative_residual,
        a.out.display()
    );
    Ok((moved, map.relative_residual))
}

/// Arguments of `memsteer steer train`.
#[derive(Debug, Clone, Args)]
pub struct SteerTrainArgs {
    /// The base model (a Hugging Face model directory).
    #[arg(long, value_name = "DIR")]
    pub model: PathBuf,
    /// Positive corpus, JSON lines with a `text` string or a `tokens` array of ids (strength +1).
    #[arg(long, value_name = "FILE")]
    pub positive: PathBuf,
    /// Negative corpus, same format (strength −1).
    #[arg(long, value_name = "FILE")]
    pub negative: PathBuf,
    /// Output steer file (safetensors).
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
    /// Rank of the steer (default min(1000, hidden size)).
    #[arg(long)]
    pub rank: Option<usize>,
    /// Optimizer steps.
    #[arg(long, default_value_t = 1000)]
    pub steps: usize,
    /// Adam learning rate.
    #[arg(long, default_value_t = 1e-2)]
    pub lr: f32,
    /// Sequences per minibatch.
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
    /// The fixed scale ε of the steer.
    #[arg(long, default_value_t = 1e-3)]
    pub epsilon: f32,
    /// Tokens kept from the start of each sequence.
    #[arg(long, default_value_t = 256)]
    pub max_length: usize,
    /// Coefficient λ of the regularisation λ(‖P1‖² + ‖P2‖²).
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f32,
    /// Standard deviation of the projectors' initialisation (the authors' init_var; must be positive).
    #[arg(long, default_value_t = 1e-2)]
    pub init_std: f32,
    /// Memory for the cached hidden states, in GiB; beyond it they spill to a temporary file.
    #[arg(long, value_name = "GIB", default_value_t = 4.0)]
    pub cache_memory: f64,
    /// Directory of the spill file (default: the system's temporary directory).
    #[arg(long, value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Seed of the initialisation and the batch order.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Where the work runs: cpu, or cuda / cuda:N in a build with the cuda feature (Adam stays on the CPU).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

/// What `steer train` did.
#[derive(Debug, Clone, PartialEq)]
pub struct SteerTrainOutcome {
    /// Loss of the last step.
    pub final_loss: f64,
    /// Sequences trained on.
    pub sequences: usize,
    /// Sequences skipped for having fewer than two tokens.
    pub skipped: usize,
}

fn load_model(dir: &Path) -> Result<Model> {
    Model::load(dir).with_context(|| format!("loading the model in {}", dir.display()))
}

fn load_on(dir: &Path, device: &str) -> Result<DeviceModel> {
    let device = Device::parse(device).with_context(|| format!("--device {device}"))?;
    DeviceModel::load(dir, &device).with_context(|| format!("loading the model in {} onto {device:?}", dir.display()))
}

/// Runs `memsteer steer train`.
pub fn train(a: &SteerTrainArgs) -> Result<SteerTrainOutcome> {
    let model = load_on(&a.model, &a.device)?;
    let decoder = model.decoder()?;
    let mut tok = LazyTokenizer::new(&a.model);
    let positive = read_corpus(&a.positive, &mut tok, decoder.vocab())?;
    let negative = read_corpus(&a.negative, &mut tok, decoder.vocab())?;
    let mut config = TrainConfig::default();
    config.rank = a.rank;
    config.steps = a.steps;
    config.lr = a.lr;
    config.batch_size = a.batch_size;
    config.epsilon = a.epsilon;
    config.max_length = a.max_length;
    config.weight_decay = a.weight_decay;
    config.seed = a.seed;
    config.init_std = a.init_std;
    config.validate().context("steer train settings")?;

    let spinner = if a.quiet { ProgressBar::hidden() } else { ProgressBar::new_spinner() };
    spinner.set_message(format!("caching hidden states of {} sequences", positive.len() + negative.len()));
    spinner.enable_steady_tick(std::time::Duration::from_millis(120));
    ensure!(
        a.cache_memory.is_finite() && a.cache_memory >= 0.0,
        "--cache-memory: expected GiB ≥ 0, found {}",
        a.cache_memory
    );
    let budget = (a.cache_memory * (1u64 << 30) as f64).min(usize::MAX as f64) as usize;
    let cache =
        HiddenCache::build_with(decoder, &positive, &negative, config.max_length, budget, a.cache_dir.as_deref())
            .with_context(|| {
                format!("caching hidden states of {} and {}", a.positive.display(), a.negative.display())
            })?;
    spinner.finish_and_clear();
    if cache.spilled() && !a.quiet {
        eprintln!(
            "hidden states ({} rows × {}) exceed --cache-memory {} GiB: spilled to a temporary file",
            cache.rows(),
            cache.dim(),
            a.cache_memory
        );
    }

    let bar = if a.quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(config.steps as u64).with_style(
            ProgressStyle::with_template("{prefix:>8} [{bar:30}] {pos}/{len} {msg} eta {eta}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        )
    };
    bar.set_prefix("steer");
    let device = memsteer_kernels::Device::parse(&a.device).with_context(|| format!("--device {}", a.device))?;
    let output = memsteer_steer::OutputLayer::of(decoder);
    let (steer, report) = train_cached_on(&device, &cache, output, &config, &mut |p| {
        bar.set_position(p.step as u64);
        bar.set_message(format!("loss {:.4}", p.loss));
    })?;
    bar.finish_and_clear();
    steer.save(&a.out).with_context(|| format!("writing the steer {}", a.out.display()))?;
    let final_loss = report.losses.last().copied().unwrap_or(f64::NAN);
    if !a.quiet {
        eprintln!(
            "steer: rank {}, {} sequences ({} tokens predicted, {} skipped with < 2 tokens), loss {:.4} → {:.4}; wrote {}",
            steer.rank(),
            report.sequences,
            report.rows,
            report.skipped,
            report.losses.first().copied().unwrap_or(f64::NAN),
            final_loss,
            a.out.display()
        );
    }
    Ok(SteerTrainOutcome { final_loss, sequences: report.sequences, skipped: report.skipped })
}

mod eval;
mod generate;

pub use eval::*;
pub use generate::*;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steer_specs_split_on_the_last_colon_only_before_a_number() {
        assert_eq!(parse_steer_spec("a.safetensors").unwrap(), (PathBuf::from("a.safetensors"), 1.0));
        assert_eq!(parse_steer_spec("a.safetensors:-2.5").unwrap(), (PathBuf::from("a.safetensors"), -2.5));
        assert_eq!(parse_steer_spec("c:/x:y.st:3").unwrap(), (PathBuf::from("c:/x:y.st"), 3.0));
        assert!(parse_steer_spec("a.safetensors:nan").unwrap_err().to_string().contains("finite"));
        assert!(parse_steer_spec("a.safetensors:inf").unwrap_err().to_string().contains("finite"));
        assert!(parse_steer_spec("a.safetensors:1e40").unwrap_err().to_string().contains("finite"));
        let e = parse_steer_spec("/nonexistent/a.safetensors:strong").unwrap_err().to_string();
        assert!(e.contains("not a strength"), "{e}");
    }
}
