//! `memsteer steer`: LM-Steer from the command line — train a steer on two corpora, generate with one or
//! several steers at any strength, highlight where a text carries the steer's style, explain, transfer,
//! and evaluate generations (dist-n, perplexity, style scores).

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail, ensure};
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use memsteer_kernels::Device;
use memsteer_lm::sample::SamplingConfig;
use memsteer_lm::tokenizer::Tokenizer;
use memsteer_lm::{DeviceModel, Model};
use memsteer_panel::write_atomic;
use memsteer_steer::generate::{SteerSet, batched_continuations, steered_continuation};
use memsteer_steer::{HiddenCache, Steer, TrainConfig, train_cached_on};
use rayon::prelude::*;

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
    /// JSON lines with a `text` string or a `tokens` array (other fields, such as `id` or `label`, are
    /// copied to the output); one JSON line out per line in.
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
    /// Where whole-sequence forward passes run: `cpu`, or `cuda` / `cuda:N` in a build with the `cuda`
    /// feature.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Print JSON (one line per text) instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// A word of a text and its mean per-token evidence.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct WordEvidence {
    /// The word as it reads in the text (surrounding whitespace trimmed).
    pub word: String,
    /// Mean evidence of its tokens (`log P_best − log P_0` per token).
    pub evidence: f64,
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
    pub words: Vec<WordEvidence>,
}

/// Groups tokens into words: a new word starts at a piece that begins with whitespace, at punctuation,
/// and after punctuation; each word gets the mean evidence of its tokens that have one.
fn word_evidence(pieces: &[String], evidence: &[Option<f64>]) -> Vec<WordEvidence> {
    let is_punct = |s: &str| !s.trim().is_empty() && s.trim().chars().all(|c| c.is_ascii_punctuation());
    let mut words: Vec<(String, Vec<f64>)> = Vec::new();
    let mut prev_punct = true;
    for (piece, e) in pieces.iter().zip(evidence) {
        let punct = is_punct(piece);
        let starts = words.is_empty() || prev_punct || punct || piece.starts_with(char::is_whitespace);
        if starts {
            words.push((String::new(), Vec::new()));
        }
        let w = words.last_mut().expect("pushed above");
        w.0.push_str(piece);
        w.1.extend(e);
        prev_punct = punct;
    }
    words
        .into_iter()
        .filter(|(w, e)| !w.trim().is_empty() && !e.is_empty())
        .map(|(w, e)| WordEvidence { word: w.trim().to_string(), evidence: e.iter().sum::<f64>() / e.len() as f64 })
        .collect()
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
    let tokenizer = if has_tokenizer(&a.model) { Some(tok.get("decoding tokens")?.clone()) } else { None };
    let d = decoder.dim();
    let bar = if inputs.len() > 1 && std::io::stderr().is_terminal() {
        ProgressBar::new(inputs.len() as u64)
    } else {
        ProgressBar::hidden()
    };
    let mut out = Vec::with_capacity(inputs.len());
    for (at, fields, ids) in inputs {
        ensure!(ids.len() >= 2, "{at}: {} token(s); detection needs at least two", ids.len());
        ensure!(
            ids.len() <= decoder.context(),
            "{at}: {} tokens, more than the model's context of {}",
            ids.len(),
            decoder.context()
        );
        let hidden = decoder.hidden_states(&ids)?;
        let rows = &hidden[..(ids.len() - 1) * d];
        let detection = memsteer_steer::evidence::detect(&steer, rows, decoder.output_embedding(), &ids[1..], &config)
            .with_context(|| at.clone())?;
        let pieces = match &tokenizer {
            Some(t) => token_pieces(t, &ids)?,
            None => ids.iter().map(|i| format!(" {i}")).collect(),
        };
        let evidence: Vec<Option<f64>> =
            std::iter::once(None).chain(detection.evidence.iter().copied().map(Some)).collect();
        let words = word_evidence(&pieces, &evidence);
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
    let mut words: Vec<&WordEvidence> = d.words.iter().collect();
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
    /// Print JSON ({"dimensions": [{"steer", "rank", "singular_value", "positive": [{"id", "token",
    /// "score"}], "negative": […]}]}) instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Runs `memsteer steer explain`.
pub fn explain(a: &ExplainArgs) -> Result<memsteer_steer::explain::Explanation> {
    let model = load_model(&a.model)?;
    let dec = model.decoder();
    let steer = Steer::load_for(&a.steer, dec)?;
    let tok = has_tokenizer(&a.model).then(|| Tokenizer::from_dir(&a.model)).transpose()?;
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
    /// Fit the map on the first N shared tokens only (default: all; with `--map authors` their 4,000, in
    /// the target vocabulary's order).
    #[arg(long, value_name = "N")]
    pub top_k: Option<usize>,
    /// Ridge added to the least-squares normal equations (0: plain least squares), in squared units of the
    /// embeddings the fit regresses on: the target's for `paper` and `authors`; for `two-sided` both fits
    /// get it (the source's for H, the target's for G).
    #[arg(long, default_value_t = 0.0)]
    pub ridge: f64,
    /// How W is carried over. `paper`: the paper's e_v = H e'_v, fitted as E_from ≈ E_to Hᵀ, and
    /// W' = HᵀWH. `authors`: the authors' steer_transfer.py: E_to B ≈ E_from on the first --top-k (4,000)
    /// shared tokens, rows of B normalised, P' = B P (the closed-form optimum of their loss stands in for
    /// their Adam loop). `two-sided`: E_to ≈ E_from H and E_from ≈ E_to G, W' = HᵀWGᵀ (exact for any
    /// invertible linear relation between the models; the others only for orthogonal ones).
    #[arg(long, value_enum, default_value_t = MapKind::Paper)]
    pub map: MapKind,
}

/// How `steer transfer` carries W to the target model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum MapKind {
    /// W' = HᵀWH with E_from ≈ E_to Hᵀ (the paper's).
    Paper,
    /// P' = B P with E_to B ≈ E_from on 4,000 tokens, rows of B normalised (the authors' script).
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
    let tok = |dir: &Path| has_tokenizer(dir).then(|| Tokenizer::from_dir(dir)).transpose();
    let (tf, tt) = (tok(&a.from)?, tok(&a.to)?);
    let from_name = tf.as_ref().map(|t| move |id: u32| t.id_to_token(id));
    let to_name = tt.as_ref().map(|t| move |id: u32| t.id_to_token(id));
    let shared = SharedTokens::matched(
        from.vocab(),
        from_name.as_ref().map(|f| f as &dyn Fn(u32) -> Option<String>),
        to.vocab(),
        to_name.as_ref().map(|f| f as &dyn Fn(u32) -> Option<String>),
    )
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
    /// Standard deviation of the projectors' normal initialisation (the authors' `init_var`); must be
    /// positive: at zero the gradient of W = P1 P2ᵀ is zero.
    #[arg(long, default_value_t = 1e-2)]
    pub init_std: f32,
    /// Memory for the cached hidden states, in GiB; beyond it they spill to a temporary file (read back
    /// one minibatch at a time; the same steer either way).
    #[arg(long, value_name = "GIB", default_value_t = 4.0)]
    pub cache_memory: f64,
    /// Directory of the spill file (default: the system's temporary directory; where that is a tmpfs
    /// held in memory, give a directory on disk).
    #[arg(long, value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Seed of the initialisation and the batch order.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Where the work runs: `cpu`, or `cuda` / `cuda:N` in a build with the `cuda` feature (hidden
    /// states, and each step's steered output layer and its backward, on the GPU; Adam on the CPU).
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

/// The model directory's tokenizer, loaded the first time a text needs it.
struct LazyTokenizer<'a> {
    dir: &'a Path,
    tok: Option<Tokenizer>,
}

impl<'a> LazyTokenizer<'a> {
    fn new(dir: &'a Path) -> Self {
        Self { dir, tok: None }
    }
    fn get(&mut self, why: &str) -> Result<&Tokenizer> {
        if self.tok.is_none() {
            let t = Tokenizer::from_dir(self.dir).with_context(|| {
                format!("{why}: loading the tokenizer of {} (give `tokens` instead of `text`)", self.dir.display())
            })?;
            self.tok = Some(t);
        }
        Ok(self.tok.as_ref().expect("loaded above"))
    }
}

/// Whether a model directory ships tokenizer files.
fn has_tokenizer(dir: &Path) -> bool {
    dir.join("tokenizer.json").exists()
        || (dir.join("vocab.json").exists() && dir.join("merges.txt").exists())
        || (dir.join("encoder.json").exists() && dir.join("vocab.bpe").exists())
}

/// A fingerprint of a model directory's tokenizer files (names and bytes), `None` when it has none:
/// `steer generate` writes it beside the ids it generates, so that `steer eval` scores ids only under a
/// model with the same tokenizer.
pub fn tokenizer_fingerprint(dir: &Path) -> Result<Option<String>> {
    let mut hash = 0u64;
    let mut any = false;
    for f in crate::train::TOKENIZER_FILES {
        let p = dir.join(f);
        if p.is_file() {
            let bytes = std::fs::read(&p).with_context(|| format!("reading {}", p.display()))?;
            hash = memsteer_panel::rng::hash_key(hash, f.as_bytes());
            hash = memsteer_panel::rng::hash_key(hash, &bytes);
            any = true;
        }
    }
    Ok(any.then(|| format!("{hash:016x}")))
}

/// One JSON line with `text` or `tokens`, as token ids checked against the vocabulary.
fn line_tokens(
    v: &serde_json::Value,
    at: &dyn Fn() -> String,
    tok: &mut LazyTokenizer<'_>,
    vocab: usize,
) -> Result<Vec<u32>> {
    let tokens = match (v.get("tokens"), v.get("text")) {
        (Some(serde_json::Value::Array(t)), _) => t
            .iter()
            .map(|x| x.as_u64().filter(|n| *n <= u64::from(u32::MAX)).map(|n| n as u32))
            .collect::<Option<Vec<u32>>>()
            .with_context(|| format!("{}: `tokens` must hold non-negative integer ids", at()))?,
        (Some(other), _) => bail!("{}: `tokens` must be an array of ids, found {other}", at()),
        (None, Some(serde_json::Value::String(text))) => {
            tok.get(&at())?.encode(text).with_context(|| format!("{}: tokenizing `text`", at()))?
        }
        (None, Some(other)) => bail!("{}: `text` must be a string, found {other}", at()),
        (None, None) => bail!("{}: expected a `text` string or a `tokens` array of ids", at()),
    };
    if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= vocab) {
        bail!("{}: token id {bad} is outside the model's vocabulary (size {vocab})", at());
    }
    Ok(tokens)
}

/// The non-blank lines of a JSON-lines file, parsed, with their 1-based line numbers; `what` names the
/// file's role in errors.
fn json_lines(path: &Path, what: &str) -> Result<Vec<(usize, serde_json::Value)>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {what} {}", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v = serde_json::from_str(line)
            .with_context(|| format!("{}, line {}: not a JSON object", path.display(), i + 1))?;
        out.push((i + 1, v));
    }
    Ok(out)
}

/// Reads a corpus (JSON lines with `text` or `tokens`); an empty corpus is an error naming the file.
fn read_corpus(path: &Path, tok: &mut LazyTokenizer<'_>, vocab: usize) -> Result<Vec<Vec<u32>>> {
    let mut out = Vec::new();
    for (line, v) in json_lines(path, "corpus")? {
        let at = || format!("{}, line {line}", path.display());
        ensure!(v.is_object(), "{}: expected a JSON object with `text` or `tokens`", at());
        out.push(line_tokens(&v, &at, tok, vocab)?);
    }
    ensure!(
        !out.is_empty(),
        "{}: empty corpus: expected JSON lines with a `text` string or a `tokens` array",
        path.display()
    );
    Ok(out)
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
    let (steer, report) = train_cached_on(&device, &cache, decoder.output_embedding(), &config, &mut |p| {
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

/// Arguments of `memsteer steer generate`.
#[derive(Debug, Clone, Args)]
pub struct GenerateArgs {
    /// The base model (a Hugging Face model directory).
    #[arg(long, value_name = "DIR")]
    pub model: PathBuf,
    /// A steer file, optionally with the strength of its labelled steer after the last ':' (default +1);
    /// repeat to compose several steers (their effects add up).
    #[arg(long = "steer", value_name = "FILE[:STRENGTH]", allow_hyphen_values = true)]
    pub steers: Vec<String>,
    /// Prompts, JSON lines with an `id` and a `text` string or a `tokens` array of ids.
    #[arg(long, value_name = "FILE")]
    pub prompts: PathBuf,
    /// Samples per prompt.
    #[arg(long, default_value_t = 1)]
    pub samples: usize,
    /// Tokens generated per sample.
    #[arg(long, value_name = "T")]
    pub max_new_tokens: usize,
    /// Softmax temperature; 0 is greedy decoding.
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f32,
    /// Keep only the k most likely tokens.
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Keep the smallest set of most likely tokens whose probability reaches p.
    #[arg(long)]
    pub top_p: Option<f32>,
    /// Seed; each (prompt id, sample) draws from its own stream, so output does not depend on threads.
    #[arg(long)]
    pub seed: u64,
    /// Output, JSON lines {"prompt_id", "sample", "tokens", "text"}.
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
    /// Where the model runs: `cpu` (cached decoding, samples in parallel), or `cuda` / `cuda:N` in a
    /// build with the `cuda` feature (all samples together, each step one whole-sequence forward pass
    /// of every sample on the GPU, no KV cache; the same seeds, so the same tokens up to rounding).
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

/// Splits `FILE[:STRENGTH]` on its last ':' when what follows is a number; the strength must be finite.
pub fn parse_steer_spec(spec: &str) -> Result<(PathBuf, f32)> {
    if let Some((path, v)) = spec.rsplit_once(':')
        && let Ok(x) = v.trim().parse::<f64>()
    {
        ensure!(!path.is_empty(), "--steer {spec:?}: expected FILE[:STRENGTH], found no file");
        let s = x as f32;
        ensure!(s.is_finite(), "--steer {spec:?}: the strength must be a finite number, found {v}");
        return Ok((PathBuf::from(path), s));
    }
    let path = PathBuf::from(spec);
    if !path.exists()
        && let Some((file, v)) = spec.rsplit_once(':')
    {
        bail!(
            "--steer {spec:?}: no such file, and {v:?} after the last ':' is not a strength (a number); expected FILE[:STRENGTH] (file {file:?})"
        );
    }
    Ok((path, 1.0))
}

/// A prompt to continue.
#[derive(Debug, Clone)]
struct Prompt {
    id: serde_json::Value,
    key: String,
    tokens: Vec<u32>,
}

fn read_prompts(path: &Path, tok: &mut LazyTokenizer<'_>, vocab: usize) -> Result<Vec<Prompt>> {
    let mut out = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for (line, v) in json_lines(path, "prompts")? {
        let at = || format!("{}, line {line}", path.display());
        let (id, key) = match v.get("id") {
            Some(serde_json::Value::String(s)) if !s.is_empty() => (v["id"].clone(), s.clone()),
            Some(serde_json::Value::Number(n)) => (v["id"].clone(), n.to_string()),
            other => bail!("{}: field `id` must be a non-empty string or a number, found {:?}", at(), other),
        };
        ensure!(seen.insert(key.clone()), "{}: prompt id {key:?} appears twice", at());
        let tokens = line_tokens(&v, &at, tok, vocab)?;
        ensure!(!tokens.is_empty(), "{}: prompt {key:?} has no tokens; generation needs at least one", at());
        out.push(Prompt { id, key, tokens });
    }
    ensure!(!out.is_empty(), "{}: no prompts", path.display());
    Ok(out)
}

/// One generated sample.
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    /// Index of the prompt in the prompts file.
    pub prompt: usize,
    /// Sample number (0-based).
    pub sample: usize,
    /// Generated token ids (the prompt excluded).
    pub tokens: Vec<u32>,
}

/// Runs `memsteer steer generate`; returns the samples in output order.
pub fn generate(a: &GenerateArgs) -> Result<Vec<Generation>> {
    ensure!(a.samples >= 1, "--samples must be at least 1");
    ensure!(a.max_new_tokens >= 1, "--max-new-tokens must be at least 1");
    ensure!(
        a.temperature.is_finite() && a.temperature >= 0.0,
        "--temperature must be a finite number ≥ 0, found {}",
        a.temperature
    );
    if let Some(k) = a.top_k {
        ensure!(k >= 1, "--top-k must be at least 1");
    }
    if let Some(p) = a.top_p {
        ensure!(p > 0.0 && p <= 1.0, "--top-p must be in (0, 1], found {p}");
    }
    let specs = a.steers.iter().map(|s| parse_steer_spec(s)).collect::<Result<Vec<_>>>()?;
    let model = load_on(&a.model, &a.device)?;
    let decoder = model.decoder()?;
    let mut steers = Vec::new();
    for (path, strength) in specs {
        let steer = Steer::load_for(&path, decoder)
            .with_context(|| format!("--steer {}: loading the steer for {}", path.display(), a.model.display()))?;
        let mut labelled = vec![0.0f32; steer.labels().len()];
        ensure!(
            !labelled.is_empty(),
            "--steer {}: the steer has no labelled steer to set a strength on",
            path.display()
        );
        labelled[0] = strength;
        let strengths = steer.strengths(&labelled)?;
        steers.push((steer, strengths));
    }
    let set = SteerSet::new(steers);
    let mut tok = LazyTokenizer::new(&a.model);
    let prompts = read_prompts(&a.prompts, &mut tok, decoder.vocab())?;
    ensure!(
        a.max_new_tokens <= decoder.context(),
        "--max-new-tokens {} is beyond the model's context of {} positions",
        a.max_new_tokens,
        decoder.context()
    );
    for p in &prompts {
        // The last sampled token is never fed back, so it needs no position.
        let need = p.tokens.len().saturating_add(a.max_new_tokens - 1);
        ensure!(
            need <= decoder.context(),
            "prompt {:?}: {} prompt tokens + {} new tokens exceed the model's context of {} positions",
            p.key,
            p.tokens.len(),
            a.max_new_tokens,
            decoder.context()
        );
    }
    let tokenizer = if has_tokenizer(&a.model) { Some(tok.get("decoding generations")?) } else { None };
    let cfg = SamplingConfig { temperature: a.temperature, top_k: a.top_k, top_p: a.top_p };
    let work: Vec<(usize, usize)> = (0..prompts.len()).flat_map(|p| (0..a.samples).map(move |s| (p, s))).collect();
    let seed_of = |p: usize, s: usize| {
        let key = format!("{}\u{0}{s}", prompts[p].key);
        memsteer_panel::rng::hash_key(a.seed, key.as_bytes())
    };
    let gens = if model.is_gpu() {
        let device = model.device();
        let starts: Vec<&[u32]> = work.iter().map(|&(p, _)| prompts[p].tokens.as_slice()).collect();
        let seeds: Vec<u64> = work.iter().map(|&(p, s)| seed_of(p, s)).collect();
        let name = |k: usize| format!("prompt {:?}, sample {}", prompts[work[k].0].key, work[k].1);
        let tokens = batched_continuations(
            decoder,
            &device,
            &set,
            &starts,
            (&seeds, &name),
            (a.max_new_tokens, &cfg),
            memsteer_steer::generate::BATCH_LIMITS,
        )
        .with_context(|| format!("generating {} samples on {}", work.len(), a.device))?;
        work.iter().zip(tokens).map(|(&(prompt, sample), tokens)| Generation { prompt, sample, tokens }).collect()
    } else {
        work.par_iter()
            .map(|&(p, s)| {
                let tokens =
                    steered_continuation(decoder, &set, &prompts[p].tokens, a.max_new_tokens, &cfg, seed_of(p, s))
                        .with_context(|| format!("prompt {:?}, sample {s}", prompts[p].key))?;
                Ok(Generation { prompt: p, sample: s, tokens })
            })
            .collect::<Result<Vec<_>>>()?
    };
    let fingerprint = tokenizer_fingerprint(&a.model)?;
    let mut lines = Vec::with_capacity(gens.len());
    for g in &gens {
        let mut v = serde_json::json!({
            "prompt_id": prompts[g.prompt].id,
            "sample": g.sample,
            "tokens": g.tokens,
        });
        if let Some(f) = &fingerprint {
            v["tokenizer"] = f.as_str().into();
        }
        if let Some(t) = tokenizer {
            v["text"] = t.decode(&g.tokens)?.into();
        }
        lines.push(v.to_string());
    }
    write_atomic(&a.out, |w| {
        for l in &lines {
            writeln!(w, "{l}")?;
        }
        Ok(())
    })
    .with_context(|| format!("writing {}", a.out.display()))?;
    Ok(gens)
}

/// Arguments of `memsteer steer highlight`.
#[derive(Debug, Clone, Args)]
pub struct HighlightArgs {
    /// The base model (a Hugging Face model directory with tokenizer files).
    #[arg(long, value_name = "DIR")]
    pub model: PathBuf,
    /// The steer file.
    #[arg(long, value_name = "FILE")]
    pub steer: PathBuf,
    /// The text to highlight.
    #[arg(long, conflicts_with = "input", required_unless_present = "input")]
    pub text: Option<String>,
    /// A file holding the text to highlight.
    #[arg(long, value_name = "FILE")]
    pub input: Option<PathBuf>,
    /// Most spans to mark (the set of at most this many disjoint spans with the largest total evidence,
    /// as the authors choose them).
    #[arg(long, default_value_t = 4)]
    pub spans: usize,
    /// Most tokens per span.
    #[arg(long, default_value_t = 10)]
    pub span_length: usize,
    /// Strength S of the comparison: evidence is log p(x_t | x_<t) with the labelled steer at +S minus at
    /// −S; a negative S marks where the text carries the opposite style (e.g. −1 for the negative corpus).
    #[arg(long, default_value_t = 1.0, allow_hyphen_values = true)]
    pub strength: f32,
    /// Also write a self-contained HTML page here.
    #[arg(long, value_name = "FILE")]
    pub html: Option<PathBuf>,
    /// Where whole-sequence forward passes run: `cpu`, or `cuda` / `cuda:N` in a build with the `cuda`
    /// feature (hidden states on the GPU; the steer and the output layer stay on the CPU).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Print the tokens, their evidence and the spans as JSON instead of coloured text.
    #[arg(long)]
    pub json: bool,
    /// Colour the terminal output even when it is not a terminal.
    #[arg(long)]
    pub color: bool,
}

pub use memsteer_steer::evidence::Span;

pub use memsteer_steer::highlight::{Highlight, html_escape};
use memsteer_steer::highlight::{render_html, render_terminal, token_pieces};

/// Runs `memsteer steer highlight`.
pub fn highlight(a: &HighlightArgs) -> Result<Highlight> {
    ensure!(a.span_length >= 1, "--span-length must be at least 1");
    ensure!(
        a.strength.is_finite() && a.strength != 0.0,
        "--strength must be a finite non-zero number, found {}",
        a.strength
    );
    let text = match (&a.text, &a.input) {
        (Some(t), _) => t.clone(),
        (None, Some(p)) => std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?,
        (None, None) => bail!("give --text TEXT or --input FILE"),
    };
    let model = load_on(&a.model, &a.device)?;
    let decoder = model.decoder()?;
    let steer = Steer::load_for(&a.steer, decoder)
        .with_context(|| format!("--steer {}: loading the steer for {}", a.steer.display(), a.model.display()))?;
    ensure!(!steer.labels().is_empty(), "{}: the steer has no labelled steer", a.steer.display());
    let tok = Tokenizer::from_dir(&a.model)
        .with_context(|| format!("highlight needs the tokenizer of {}", a.model.display()))?;
    let tokens = tok.encode(&text).context("tokenizing the text")?;
    ensure!(tokens.len() >= 2, "the text has {} token(s); evidence needs at least two", tokens.len());
    ensure!(
        tokens.len() <= decoder.context(),
        "the text has {} tokens, more than the model's context of {}",
        tokens.len(),
        decoder.context()
    );
    let d = decoder.dim();
    let hidden = decoder.hidden_states(&tokens)?;
    let rows = &hidden[..(tokens.len() - 1) * d];
    let at = |v: f32| -> Result<Vec<f32>> {
        let mut labelled = vec![0.0f32; steer.labels().len()];
        labelled[0] = v;
        Ok(steer.log_prob_targets(rows, decoder.output_embedding(), &tokens[1..], &steer.strengths(&labelled)?)?)
    };
    let (plus, minus) = (at(a.strength)?, at(-a.strength)?);
    let mut evidence = vec![None];
    evidence.extend(plus.iter().zip(&minus).map(|(p, m)| Some(f64::from(*p) - f64::from(*m))));
    let spans = memsteer_steer::evidence::max_spans(&evidence, a.spans, a.span_length);
    let pieces = token_pieces(&tok, &tokens)?;
    let h = Highlight { tokens, pieces, evidence, spans };

    if a.json {
        let json = serde_json::json!({
            "steer": a.steer.display().to_string(),
            "label": steer.labels()[0],
            "strength": a.strength,
            "tokens": h.tokens.iter().zip(&h.pieces).zip(&h.evidence)
                .map(|((id, p), e)| serde_json::json!({"id": id, "text": p, "evidence": e}))
                .collect::<Vec<_>>(),
            "spans": h.spans.iter()
                .map(|s| serde_json::json!({"start": s.start, "end": s.end, "evidence": s.evidence,
                    "text": h.pieces[s.start..s.end].concat()}))
                .collect::<Vec<_>>(),
        });
        println!("{json}");
    } else {
        let color = a.color || std::io::stdout().is_terminal();
        println!("{}", render_terminal(&h, color));
        for (i, s) in h.spans.iter().enumerate() {
            println!(
                "span {}: tokens {}..{}, evidence {:+.3}: {:?}",
                i + 1,
                s.start,
                s.end,
                s.evidence,
                h.pieces[s.start..s.end].concat()
            );
        }
    }
    if let Some(path) = &a.html {
        let page = render_html(&h, steer.labels()[0].as_str(), &a.steer.display().to_string(), a.strength);
        write_atomic(path, |w| w.write_all(page.as_bytes())).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(h)
}

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

    #[test]
    fn html_escape_escapes_markup() {
        assert_eq!(html_escape("<b>&\"'"), "&lt;b&gt;&amp;&quot;&#39;");
    }
}
