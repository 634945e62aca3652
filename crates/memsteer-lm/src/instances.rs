//! Instances: the sequences whose log-probabilities `memsteer logprobs` scores and `memsteer train`
//! trains on, one JSON object per line:
//! `{"id": …, "treatment_step": int | null, "tokens": [int, …]}`, or with a `"text"` string instead of
//! `"tokens"` (tokenized with a model's tokenizer by [`tokenize`]).

use std::path::Path;

use crate::error::{At, bail, ensure};
use crate::tokenizer::Tokenizer;
use crate::{LmError, Result};

/// One instance of an instances file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instance {
    /// Its id (a number in the file becomes its decimal string).
    pub id: String,
    /// The 1-based optimizer step whose batch held it; `None` for never-trained instances.
    pub treatment: Option<u64>,
    /// Its token ids (empty until [`tokenize`] when the line gave `text`).
    pub tokens: Vec<u32>,
    /// The text to tokenize, when the line gave `text` instead of `tokens`.
    pub text: Option<String>,
    /// Its 1-based line in the file.
    pub line: usize,
}

/// Reads an instances file. Every error names the file, the line and the field; ids must be unique,
/// `tokens` hold at least two ids (the first token is not scored), and the file holds at least one
/// instance.
pub fn read(path: &Path) -> Result<Vec<Instance>> {
    let text = std::fs::read_to_string(path).map_err(|source| LmError::Io { path: path.into(), source })?;
    let mut out = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for (i, line) in text.lines().enumerate() {
        let at = || format!("{}, line {}", path.display(), i + 1);
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(line).at(|| format!("{}: not a JSON object", at()))?;
        let id = match v.get("id") {
            Some(serde_json::Value::String(s)) if !s.is_empty() => s.clone(),
            Some(serde_json::Value::Number(n)) => n.to_string(),
            other => bail!("{}: field `id` must be a non-empty string or a number, found {:?}", at(), other),
        };
        ensure!(seen.insert(id.clone()), "{}: instance id {id:?} appears twice", at());
        let treatment = match v.get("treatment_step") {
            None | Some(serde_json::Value::Null) => None,
            Some(x) => match x.as_u64().filter(|s| *s >= 1) {
                Some(s) => Some(s),
                None => bail!("{}: `treatment_step` must be a 1-based step or null, found {x}", at()),
            },
        };
        let (tokens, text) = match (v.get("tokens"), v.get("text")) {
            (Some(serde_json::Value::Array(t)), _) => {
                let Some(t) = t
                    .iter()
                    .map(|x| x.as_u64().filter(|n| *n <= u64::from(u32::MAX)).map(|n| n as u32))
                    .collect::<Option<Vec<u32>>>()
                else {
                    bail!("{}: `tokens` must hold non-negative integer ids", at())
                };
                ensure!(
                    t.len() >= 2,
                    "{}: instance {id:?} has {} token(s); a sequence log-probability needs at least two (the first token is not scored)",
                    at(),
                    t.len()
                );
                (t, None)
            }
            (None, Some(serde_json::Value::String(text))) => (Vec::new(), Some(text.clone())),
            _ => bail!("{}: expected a `tokens` array of ids or a `text` string", at()),
        };
        out.push(Instance { id, treatment, tokens, text, line: i + 1 });
    }
    ensure!(!out.is_empty(), "{}: no instances", path.display());
    Ok(out)
}

/// Tokenizes the instances that gave `text` (read from `file`, named in errors); each must come to at
/// least two tokens.
pub fn tokenize(instances: &mut [Instance], tokenizer: &Tokenizer, file: &Path) -> Result<()> {
    for x in instances.iter_mut() {
        if let Some(text) = &x.text {
            x.tokens = tokenizer.encode(text).at(|| format!("{}, line {}: tokenizing", file.display(), x.line))?;
            ensure!(
                x.tokens.len() >= 2,
                "{}, line {}: instance {:?} tokenizes to {} token(s); a sequence log-probability needs at least two (the first token is not scored)",
                file.display(),
                x.line,
                x.id,
                x.tokens.len()
            );
        }
    }
    Ok(())
}

/// Tokenizes the `text` instances with the tokenizer in `dir` (loaded only when some instance has
/// text); `None` with text instances is an error that says to give a tokenizer.
pub fn tokenize_from(instances: &mut [Instance], dir: Option<&Path>, file: &Path) -> Result<()> {
    if !instances.iter().any(|x| x.text.is_some()) {
        return Ok(());
    }
    let Some(dir) = dir else {
        bail!(
            "{} has `text` instances: give a tokenizer directory (a model directory with tokenizer files)",
            file.display()
        )
    };
    let tok = Tokenizer::from_dir(dir)
        .at(|| format!("{} has `text` instances: loading the tokenizer of {}", file.display(), dir.display()))?;
    tokenize(instances, &tok, file)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(text: &str) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("inst.jsonl");
        std::fs::write(&p, text).expect("write");
        (dir, p)
    }

    #[test]
    fn reads_ids_steps_tokens_and_text() {
        let (_d, p) = file(
            "{\"id\": \"a\", \"treatment_step\": 3, \"tokens\": [1, 2]}\n\n{\"id\": 7, \"treatment_step\": null, \"text\": \"hi\"}\n",
        );
        let x = read(&p).unwrap();
        assert_eq!(x.len(), 2);
        assert_eq!(
            (x[0].id.as_str(), x[0].treatment, x[0].tokens.as_slice(), x[0].line),
            ("a", Some(3), &[1, 2][..], 1)
        );
        assert_eq!((x[1].id.as_str(), x[1].treatment, x[1].text.as_deref(), x[1].line), ("7", None, Some("hi"), 3));
    }

    #[test]
    fn bad_lines_name_the_file_line_and_field() {
        for (text, want) in [
            ("{\"id\": \"a\", \"tokens\": [1]}", "line 1: instance \"a\" has 1 token(s)"),
            ("{\"id\": \"a\", \"tokens\": [1, -2]}", "line 1: `tokens` must hold non-negative integer ids"),
            ("{\"id\": \"a\", \"treatment_step\": 0, \"tokens\": [1, 2]}", "`treatment_step` must be a 1-based step"),
            ("{\"id\": \"\", \"tokens\": [1, 2]}", "field `id`"),
            (
                "{\"id\": \"a\", \"tokens\": [1, 2]}\n{\"id\": \"a\", \"tokens\": [1, 2]}",
                "line 2: instance id \"a\" appears twice",
            ),
            ("{\"id\": \"a\"}", "expected a `tokens` array"),
            ("not json", "line 1: not a JSON object"),
            ("\n", "no instances"),
        ] {
            let (_d, p) = file(text);
            let e = read(&p).unwrap_err().to_string();
            assert!(e.contains(want) && e.contains("inst.jsonl"), "{text}: {e}");
        }
    }

    #[test]
    fn text_without_a_tokenizer_says_what_to_give() {
        let (_d, p) = file("{\"id\": \"a\", \"text\": \"hello\"}");
        let mut x = read(&p).unwrap();
        let e = tokenize_from(&mut x, None, &p).unwrap_err().to_string();
        assert!(e.contains("`text` instances") && e.contains("tokenizer"), "{e}");
    }
}
