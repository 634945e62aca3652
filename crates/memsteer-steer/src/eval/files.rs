//! Evaluating generations files as `steer eval` does: dist-n per prompt, conditional perplexity under
//! a perplexity model (with the token ids only when they are that model's own), and style scores.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use memsteer_lm::DeviceModel;

use super::sentiment::SentimentScorer;
use super::{distinct_n, external_scores, perplexities};
use crate::data::{LazyTokenizer, PromptForms, Sample};
use crate::error::{At, bail, ensure};
use crate::{Result, SteerError};

/// Perplexities at or above this are dropped from the mean, as the LM-Steer authors do.
pub const PPL_CUTOFF: f64 = 1e4;

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
    /// Whether dist-n counted token ids as words (some sample has no `text`).
    pub dist_on_tokens: bool,
    /// Mean perplexity of the samples kept (those below [`PPL_CUTOFF`]), with a perplexity model.
    pub perplexity: Option<f64>,
    /// Samples dropped for a perplexity ≥ [`PPL_CUTOFF`].
    pub perplexity_dropped: Option<usize>,
    /// Mean style score.
    pub score_mean: Option<f64>,
    /// Standard deviation of the style scores.
    pub score_std: Option<f64>,
    /// Per-sample style scores, in file order.
    #[serde(skip)]
    pub scores: Vec<f64>,
}

/// The style scorer.
#[derive(Debug, Clone)]
pub enum Scorer {
    /// No style scores.
    None,
    /// The built-in sentiment scorer (P(positive)).
    Builtin(&'static SentimentScorer),
    /// An external command ([`external_scores`]).
    Command(String),
}

/// A perplexity model and the prompts its perplexities are conditioned on.
#[derive(Debug)]
pub struct PerplexityModel {
    /// The model.
    pub model: DeviceModel,
    /// Its directory (its tokenizer retokenizes `text` from other tokenizers).
    pub dir: PathBuf,
    /// The prompts file and its prompts; without it, perplexity is the continuations' own.
    pub prompts: Option<(PathBuf, HashMap<String, PromptForms>)>,
    /// Its tokenizer fingerprint ([`memsteer_lm::tokenizer::fingerprint`]).
    pub fingerprint: Option<String>,
}

impl PerplexityModel {
    /// Loads the model in `dir` on `device`, with the prompts file when given.
    pub fn load(dir: &Path, device: &memsteer_kernels::Device, prompts: Option<&Path>) -> Result<Self> {
        let model = DeviceModel::load(dir, device).at(|| format!("loading the model in {}", dir.display()))?;
        let prompts = prompts.map(|p| Ok::<_, SteerError>((p.to_path_buf(), crate::data::read_prompt_forms(p)?)));
        Ok(PerplexityModel {
            model,
            dir: dir.to_path_buf(),
            prompts: prompts.transpose()?,
            fingerprint: memsteer_lm::tokenizer::fingerprint(dir)?,
        })
    }

    /// The perplexity of every sample of `file`, conditioned on its prompt when prompts are given.
    /// Token ids are used only when they are this model's own: the sample's `tokenizer` fingerprint
    /// equals the model's (or the model has no tokenizer files, so ids are all it reads). Otherwise the
    /// `text` of the sample (and of its prompt) is tokenized again with the model's tokenizer, and a
    /// sample or prompt with ids only is an error.
    pub fn perplexities(&self, samples: &[Sample], file: &Path) -> Result<Vec<f64>> {
        let dec = self.model.decoder()?;
        let mut tok = LazyTokenizer::new(&self.dir);
        let ppl_tokenizer = self.fingerprint.as_deref();
        let mut seqs: Vec<(Vec<u32>, usize)> = Vec::with_capacity(samples.len());
        for (i, s) in samples.iter().enumerate() {
            let at = || format!("{}, sample {} (prompt {:?})", file.display(), i + 1, s.prompt_key);
            // Whether the generator's ids are the perplexity model's.
            let same = ppl_tokenizer.is_none_or(|p| s.tokenizer.as_deref() == Some(p));
            let foreign = |what: String| {
                SteerError::Input(match (&s.tokenizer, ppl_tokenizer) {
                    (Some(g), Some(p)) => format!(
                        "{what} has token ids only, made with another tokenizer (fingerprint {g}) than the perplexity model's ({p}); give its `text` or a perplexity model with the generator's tokenizer"
                    ),
                    _ => format!(
                        "{what} has token ids only and the generations do not say which tokenizer made them (no `tokenizer` field): they cannot be checked against the perplexity model's tokenizer; give `text`"
                    ),
                })
            };
            let mut ids = |tokens: &Option<Vec<u32>>, text: &Option<String>, place: &dyn Fn() -> String| {
                let ids = match (tokens, text) {
                    (Some(t), _) if same => t.clone(),
                    (_, Some(text)) => tok.get(&place())?.encode(text).at(|| format!("{}: tokenizing", place()))?,
                    (Some(_), None) => return Err(foreign(place())),
                    (None, None) => bail!("{}: neither `text` nor `tokens`", place()),
                };
                if let Some(&bad) = ids.iter().find(|&&t| t as usize >= dec.vocab()) {
                    bail!(
                        "{}: token id {bad} is outside the perplexity model's vocabulary (size {})",
                        place(),
                        dec.vocab()
                    );
                }
                Ok(ids)
            };
            let cont = ids(&s.tokens, &s.text, &at)?;
            let prompt = match &self.prompts {
                Some((path, map)) => {
                    let Some(p) = map.get(&s.prompt_key) else {
                        bail!("{}: no prompt with this id in the prompts file {}", at(), path.display())
                    };
                    let place = || format!("{}, line {} (prompt {:?})", path.display(), p.line, s.prompt_key);
                    ids(&p.tokens, &p.text, &place)?
                }
                None => Vec::new(),
            };
            let seq: Vec<u32> = prompt.iter().chain(&cont).copied().collect();
            ensure!(
                !cont.is_empty() && seq.len() >= 2,
                "{}: too few tokens to score (a continuation needs at least {} without prompts)",
                at(),
                if self.prompts.is_some() { 1 } else { 2 }
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
        perplexities(&self.model, &seqs)
    }
}

/// Evaluates one generations file (`path`, read into `samples`): dist-n over each prompt's samples
/// (on words of `text`, or on token ids when some sample lacks text), the mean perplexity under `ppl`
/// with samples at or above [`PPL_CUTOFF`] dropped, and the style scores of `scorer`.
pub fn evaluate(
    path: &Path,
    label: Option<String>,
    samples: &[Sample],
    ppl: Option<&PerplexityModel>,
    scorer: &Scorer,
) -> Result<FileEval> {
    // Samples grouped by prompt, prompts in order of first appearance.
    let mut order: Vec<&str> = Vec::new();
    let mut groups: HashMap<&str, Vec<Vec<String>>> = HashMap::new();
    let dist_on_tokens = samples.iter().any(|s| s.text.is_none());
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

    let (perplexity, perplexity_dropped) = match ppl {
        Some(m) => {
            let all = m.perplexities(samples, path)?;
            let kept: Vec<f64> = all.iter().copied().filter(|p| p.is_finite() && *p < PPL_CUTOFF).collect();
            let mean = (!kept.is_empty()).then(|| kept.iter().sum::<f64>() / kept.len() as f64);
            (mean, Some(all.len() - kept.len()))
        }
        None => (None, None),
    };

    let texts = || -> Result<Vec<&str>> {
        let mut out = Vec::with_capacity(samples.len());
        for (i, s) in samples.iter().enumerate() {
            let Some(t) = s.text.as_deref() else {
                bail!("{}, sample {}: style scoring needs `text` (generate with a tokenizer)", path.display(), i + 1)
            };
            out.push(t);
        }
        Ok(out)
    };
    let scores = match scorer {
        Scorer::None => Vec::new(),
        Scorer::Builtin(b) => texts()?.iter().map(|t| b.score(t)).collect(),
        Scorer::Command(cmd) => external_scores(cmd, &texts()?).at(|| format!("scoring {}", path.display()))?,
    };
    let (score_mean, score_std) = if scores.is_empty() {
        (None, None)
    } else {
        let n = scores.len() as f64;
        let m = scores.iter().sum::<f64>() / n;
        let var = scores.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / n;
        (Some(m), Some(var.sqrt()))
    };
    Ok(FileEval {
        file: path.display().to_string(),
        label,
        samples: samples.len(),
        prompts: grouped.len(),
        dist,
        dist_on_tokens,
        perplexity,
        perplexity_dropped,
        score_mean,
        score_std,
        scores,
    })
}
