//! `memsteer steer generate` and `memsteer steer highlight`.

use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::{Context, Result, bail, ensure};
use clap::Args;
use memsteer_lm::sample::SamplingConfig;
use memsteer_lm::tokenizer::Tokenizer;
use memsteer_panel::write_atomic;
use memsteer_steer::Steer;
use memsteer_steer::generate::SteerSet;

use super::*;

/// Arguments of `memsteer steer generate`.
#[derive(Debug, Clone, Args)]
pub struct GenerateArgs {
    /// The base model (a Hugging Face model directory).
    #[arg(long, value_name = "DIR")]
    pub model: PathBuf,
    /// A steer file, with the strength of its labelled steer after the last ':' (default +1); repeatable.
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
    /// Where the model runs: cpu (cached decoding), or cuda / cuda:N (all samples batched, no KV cache).
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

pub use memsteer_steer::generate::Generation;

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
        let strengths = steer.strengths_of_first(strength).with_context(|| format!("--steer {}", path.display()))?;
        steers.push((steer, strengths));
    }
    let set = SteerSet::new(steers);
    let mut tok = LazyTokenizer::new(&a.model);
    let prompts = memsteer_steer::data::read_prompts(&a.prompts, &mut tok, decoder.vocab())?;
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
    let tokenizer = if tok.present() { Some(tok.get("decoding generations")?) } else { None };
    let cfg = SamplingConfig { temperature: a.temperature, top_k: a.top_k, top_p: a.top_p };
    let keyed: Vec<(String, Vec<u32>)> = prompts.iter().map(|p| (p.key.clone(), p.tokens.clone())).collect();
    let gens =
        memsteer_steer::generate::generate_samples(&model, &set, &keyed, (a.samples, a.max_new_tokens), &cfg, a.seed)
            .with_context(|| format!("generating {} samples on {}", keyed.len() * a.samples, a.device))?;
    let fingerprint = memsteer_lm::tokenizer::fingerprint(&a.model)?;
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
    /// Most spans to mark (the disjoint spans with the largest total evidence, as the authors choose them).
    #[arg(long, default_value_t = 4)]
    pub spans: usize,
    /// Most tokens per span.
    #[arg(long, default_value_t = 10)]
    pub span_length: usize,
    /// Strength S: evidence is log p at +S minus at −S; a negative S marks the opposite style.
    #[arg(long, default_value_t = 1.0, allow_hyphen_values = true)]
    pub strength: f32,
    /// Also write a self-contained HTML page here.
    #[arg(long, value_name = "FILE")]
    pub html: Option<PathBuf>,
    /// Where hidden states are computed: cpu, or cuda / cuda:N in a build with the cuda feature.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Print the tokens, their evidence and the spans as JSON instead of coloured text.
    #[arg(long)]
    pub json: bool,
    /// Colour the terminal output even when it is not a terminal.
    #[arg(long)]
    pub color: bool,
}

use memsteer_steer::highlight::Highlight;
use memsteer_steer::highlight::{render_html, render_terminal};

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
    let h = memsteer_steer::highlight::highlight(decoder, &steer, &tok, tokens, a.strength, (a.spans, a.span_length))?;

    if a.json {
        let mut json = h.json();
        json["steer"] = a.steer.display().to_string().into();
        json["label"] = steer.labels()[0].clone().into();
        json["strength"] = a.strength.into();
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
