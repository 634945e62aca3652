//! The JSON-lines inputs of the steer commands, read with errors that name the file, the line and the
//! field: corpora and texts (`text` or `tokens`), prompts, and generations files.

use std::collections::HashMap;
use std::path::Path;

use memsteer_lm::tokenizer::Tokenizer;

use crate::error::{At, bail, ensure};
use crate::{Result, SteerError};

/// A model directory's tokenizer, loaded the first time a text needs it (inputs that give `tokens`
/// need no tokenizer files).
#[derive(Debug)]
pub struct LazyTokenizer<'a> {
    dir: &'a Path,
    tok: Option<Tokenizer>,
}

impl<'a> LazyTokenizer<'a> {
    /// The tokenizer of the model directory `dir`, not loaded yet.
    pub fn new(dir: &'a Path) -> Self {
        Self { dir, tok: None }
    }

    /// Whether the directory holds tokenizer files.
    pub fn present(&self) -> bool {
        self.tok.is_some() || memsteer_lm::tokenizer::present_in(self.dir)
    }

    /// The tokenizer, loaded now if needed; `why` names what needs it in the error.
    pub fn get(&mut self, why: &str) -> Result<&Tokenizer> {
        if self.tok.is_none() {
            let t = Tokenizer::from_dir(self.dir).at(|| {
                format!("{why}: loading the tokenizer of {} (give `tokens` instead of `text`)", self.dir.display())
            })?;
            self.tok = Some(t);
        }
        self.tok.as_ref().ok_or_else(|| SteerError::Input("internal: tokenizer not loaded".into()))
    }
}

/// The non-blank lines of a JSON-lines file, parsed, with their 1-based line numbers; `what` names the
/// file's role in errors.
pub fn json_lines(path: &Path, what: &str) -> Result<Vec<(usize, serde_json::Value)>> {
    let text = std::fs::read_to_string(path).at(|| format!("reading {what} {}", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v = serde_json::from_str(line).at(|| format!("{}, line {}: not a JSON object", path.display(), i + 1))?;
        out.push((i + 1, v));
    }
    Ok(out)
}

/// A line's token ids, checked (`tokens` must hold non-negative 32-bit integers).
fn ids(v: &serde_json::Value, at: &dyn Fn() -> String) -> Result<Option<Vec<u32>>> {
    match v.get("tokens") {
        None => Ok(None),
        Some(serde_json::Value::Array(t)) => {
            match t.iter().map(|x| x.as_u64().filter(|n| *n <= u64::from(u32::MAX)).map(|n| n as u32)).collect() {
                Some(ids) => Ok(Some(ids)),
                None => bail!("{}: `tokens` must hold non-negative integer ids", at()),
            }
        }
        Some(other) => bail!("{}: `tokens` must be an array of ids, found {other}", at()),
    }
}

/// A line's optional `tokens` (ids) and `text`, each checked for its type; `at` names the line.
pub fn tokens_and_text(v: &serde_json::Value, at: &dyn Fn() -> String) -> Result<(Option<Vec<u32>>, Option<String>)> {
    let tokens = ids(v, at)?;
    let text = match v.get("text") {
        None => None,
        Some(serde_json::Value::String(s)) => Some(s.clone()),
        Some(other) => bail!("{}: `text` must be a string, found {other}", at()),
    };
    Ok((tokens, text))
}

/// One JSON line with `text` or `tokens` (the ids win when both are given), as token ids checked
/// against the vocabulary.
pub fn line_tokens(
    v: &serde_json::Value,
    at: &dyn Fn() -> String,
    tok: &mut LazyTokenizer<'_>,
    vocab: usize,
) -> Result<Vec<u32>> {
    let tokens = match (ids(v, at)?, v.get("text")) {
        (Some(t), _) => t,
        (None, Some(serde_json::Value::String(text))) => {
            tok.get(&at())?.encode(text).at(|| format!("{}: tokenizing `text`", at()))?
        }
        (None, Some(other)) => bail!("{}: `text` must be a string, found {other}", at()),
        (None, None) => bail!("{}: expected a `text` string or a `tokens` array of ids", at()),
    };
    if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= vocab) {
        bail!("{}: token id {bad} is outside the model's vocabulary (size {vocab})", at());
    }
    Ok(tokens)
}

/// Reads a corpus (JSON lines with `text` or `tokens`); an empty corpus is an error naming the file.
pub fn read_corpus(path: &Path, tok: &mut LazyTokenizer<'_>, vocab: usize) -> Result<Vec<Vec<u32>>> {
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

/// An id (a string or a number) as a key.
pub fn id_key(v: &serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// A prompt to continue.
#[derive(Debug, Clone, PartialEq)]
pub struct Prompt {
    /// Its `id` as the file gives it (a string or a number).
    pub id: serde_json::Value,
    /// The id as a key.
    pub key: String,
    /// Its token ids (at least one).
    pub tokens: Vec<u32>,
}

/// Reads a prompts file: `{"id": …, "text" | "tokens": …}` per line, unique non-empty ids.
pub fn read_prompts(path: &Path, tok: &mut LazyTokenizer<'_>, vocab: usize) -> Result<Vec<Prompt>> {
    let mut out = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for (line, v) in json_lines(path, "prompts")? {
        let at = || format!("{}, line {line}", path.display());
        let key = match v.get("id") {
            Some(serde_json::Value::String(s)) if s.is_empty() => None,
            Some(id) => id_key(id),
            None => None,
        };
        let Some(key) = key else {
            bail!("{}: field `id` must be a non-empty string or a number, found {:?}", at(), v.get("id"))
        };
        ensure!(seen.insert(key.clone()), "{}: prompt id {key:?} appears twice", at());
        let tokens = line_tokens(&v, &at, tok, vocab)?;
        ensure!(!tokens.is_empty(), "{}: prompt {key:?} has no tokens; generation needs at least one", at());
        out.push(Prompt { id: v["id"].clone(), key, tokens });
    }
    ensure!(!out.is_empty(), "{}: no prompts", path.display());
    Ok(out)
}

/// A prompt as the prompts file gives it, for a perplexity model: its ids, its text, or both.
#[derive(Debug, Clone, PartialEq)]
pub struct PromptForms {
    /// Its 1-based line.
    pub line: usize,
    /// Its ids, when given.
    pub tokens: Option<Vec<u32>>,
    /// Its text, when given.
    pub text: Option<String>,
}

/// The prompts file for evaluation: each prompt's ids and text as given, by id.
pub fn read_prompt_forms(path: &Path) -> Result<HashMap<String, PromptForms>> {
    let mut out = HashMap::new();
    for (line, v) in json_lines(path, "prompts")? {
        let at = || format!("{}, line {line}", path.display());
        let Some(key) = v.get("id").and_then(id_key) else { bail!("{}: expected an `id`", at()) };
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

/// One line of a generations file (what `steer generate` writes).
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// The prompt's id, as a key.
    pub prompt_key: String,
    /// The generated ids, when given.
    pub tokens: Option<Vec<u32>>,
    /// The generated text, when given.
    pub text: Option<String>,
    /// The generator's tokenizer fingerprint ([`memsteer_lm::tokenizer::fingerprint`]), when the file
    /// says.
    pub tokenizer: Option<String>,
}

/// Reads a generations file: `{"prompt_id", "text" | "tokens", "tokenizer"?}` per line.
pub fn read_generations(path: &Path) -> Result<Vec<Sample>> {
    let mut out = Vec::new();
    for (line, v) in json_lines(path, "generations")? {
        let at = || format!("{}, line {line}", path.display());
        let Some(prompt_key) = v.get("prompt_id").and_then(id_key) else {
            bail!("{}: expected a `prompt_id` string or number", at())
        };
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
