//! GPT-2 byte-level BPE (also GPT-NeoX's): `vocab.json` + `merges.txt`, `encoder.json` + `vocab.bpe`, or
//! a byte-level BPE `tokenizer.json`. Ids equal Hugging Face `tokenizers`' (golden tests).

use std::collections::HashMap;
use std::path::Path;

use fancy_regex::Regex;
use serde_json::Value;

use crate::{LmError, Result};

/// GPT-2's pre-tokenization pattern (contractions, letter runs, number runs, other runs, whitespace).
const PATTERN: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";

/// A byte-level BPE tokenizer.
#[derive(Debug)]
pub struct Tokenizer {
    encoder: HashMap<String, u32>,
    decoder: Vec<Option<String>>,
    ranks: HashMap<(String, String), usize>,
    /// Added (special) tokens, longest first.
    added: Vec<(String, u32)>,
    byte_to_char: [char; 256],
    char_to_byte: HashMap<char, u8>,
    pattern: Regex,
}

/// GPT-2's reversible map from bytes to printable characters.
fn bytes_to_unicode() -> [char; 256] {
    let mut map = ['\0'; 256];
    let mut n = 0u32;
    for b in 0..256u32 {
        let printable = (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
        map[b as usize] = if printable {
            char::from_u32(b).unwrap_or('\0')
        } else {
            let c = char::from_u32(256 + n).unwrap_or('\0');
            n += 1;
            c
        };
    }
    map
}

fn config_err(path: &Path, message: impl Into<String>) -> LmError {
    LmError::Config { path: path.to_path_buf(), message: message.into() }
}

fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|source| LmError::Io { path: path.to_path_buf(), source })
}

impl Tokenizer {
    /// Loads from a model directory: `tokenizer.json`, else `vocab.json` + `merges.txt`, else
    /// `encoder.json` + `vocab.bpe`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let tj = dir.join("tokenizer.json");
        if tj.exists() {
            return Self::from_tokenizer_json(&tj);
        }
        for (v, m) in [("vocab.json", "merges.txt"), ("encoder.json", "vocab.bpe")] {
            if dir.join(v).exists() && dir.join(m).exists() {
                return Self::from_files(&dir.join(v), &dir.join(m));
            }
        }
        Err(LmError::Io {
            path: dir.to_path_buf(),
            source: std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "no tokenizer.json, vocab.json + merges.txt, or encoder.json + vocab.bpe",
            ),
        })
    }

    /// Loads `vocab.json`/`encoder.json` and `merges.txt`/`vocab.bpe`; `<|endoftext|>` becomes a
    /// special token when the vocabulary has it.
    pub fn from_files(vocab: &Path, merges: &Path) -> Result<Self> {
        let v: Value =
            serde_json::from_str(&read(vocab)?).map_err(|e| config_err(vocab, format!("not valid JSON: {e}")))?;
        let encoder = vocab_map(&v, vocab)?;
        let text = read(merges)?;
        let mut pairs = Vec::new();
        for (i, line) in text.lines().enumerate() {
            if (i == 0 && line.starts_with("#version")) || line.is_empty() {
                continue;
            }
            let (a, b) = line.split_once(' ').ok_or_else(|| {
                config_err(merges, format!("line {}: expected two symbols separated by a space", i + 1))
            })?;
            pairs.push((a.to_string(), b.to_string()));
        }
        let added = encoder.get("<|endoftext|>").map(|&id| vec![("<|endoftext|>".to_string(), id)]).unwrap_or_default();
        Self::build(encoder, pairs, added)
    }

    /// Loads a Hugging Face `tokenizer.json` with a byte-level BPE model.
    pub fn from_tokenizer_json(path: &Path) -> Result<Self> {
        let v: Value =
            serde_json::from_str(&read(path)?).map_err(|e| config_err(path, format!("not valid JSON: {e}")))?;
        let model = v.get("model").ok_or_else(|| config_err(path, "missing `model`"))?;
        if model.get("type").and_then(Value::as_str) != Some("BPE") {
            return Err(config_err(path, format!("model type {:?} is not supported; expected BPE", model.get("type"))));
        }
        let pre = v.get("pre_tokenizer").map(|p| p.to_string()).unwrap_or_default();
        if !pre.contains("ByteLevel") {
            return Err(config_err(
                path,
                "only byte-level BPE (GPT-2, GPT-NeoX) is supported: no ByteLevel pre-tokenizer found",
            ));
        }
        let encoder = vocab_map(model.get("vocab").ok_or_else(|| config_err(path, "missing `model.vocab`"))?, path)?;
        let merges =
            model.get("merges").and_then(Value::as_array).ok_or_else(|| config_err(path, "missing `model.merges`"))?;
        let mut pairs = Vec::with_capacity(merges.len());
        for (i, m) in merges.iter().enumerate() {
            let pair = match m {
                Value::String(s) => s.split_once(' ').map(|(a, b)| (a.to_string(), b.to_string())),
                Value::Array(a) if a.len() == 2 => match (a[0].as_str(), a[1].as_str()) {
                    (Some(x), Some(y)) => Some((x.to_string(), y.to_string())),
                    _ => None,
                },
                _ => None,
            };
            pairs.push(
                pair.ok_or_else(|| config_err(path, format!("model.merges[{i}]: expected \"a b\" or [\"a\", \"b\"]")))?,
            );
        }
        let mut added = Vec::new();
        for t in v.get("added_tokens").and_then(Value::as_array).into_iter().flatten() {
            if let (Some(content), Some(id)) =
                (t.get("content").and_then(Value::as_str), t.get("id").and_then(Value::as_u64))
            {
                added.push((content.to_string(), id as u32));
            }
        }
        Self::build(encoder, pairs, added)
    }

    fn build(
        mut encoder: HashMap<String, u32>,
        pairs: Vec<(String, String)>,
        mut added: Vec<(String, u32)>,
    ) -> Result<Self> {
        for (content, id) in &added {
            encoder.insert(content.clone(), *id);
        }
        added.sort_by_key(|(c, _)| std::cmp::Reverse(c.len()));
        let size = encoder.values().map(|&i| i as usize + 1).max().unwrap_or(0);
        let mut decoder = vec![None; size];
        for (tok, &id) in &encoder {
            decoder[id as usize] = Some(tok.clone());
        }
        let ranks = pairs.into_iter().enumerate().map(|(i, p)| (p, i)).collect();
        let byte_to_char = bytes_to_unicode();
        let char_to_byte = byte_to_char.iter().enumerate().map(|(b, &c)| (c, b as u8)).collect();
        let pattern = Regex::new(PATTERN).map_err(|e| LmError::Input(format!("pre-tokenizer pattern: {e}")))?;
        Ok(Self { encoder, decoder, ranks, added, byte_to_char, char_to_byte, pattern })
    }

    /// Vocabulary size (largest id + 1).
    pub fn vocab_size(&self) -> usize {
        self.decoder.len()
    }

    /// Token ids of `text`; added tokens such as `<|endoftext|>` are matched first.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let mut ids = Vec::new();
        let mut rest = text;
        while !rest.is_empty() {
            // The earliest added token in the rest (longest first at a tie).
            let next = self
                .added
                .iter()
                .filter_map(|(c, id)| rest.find(c.as_str()).map(|p| (p, c.len(), *id)))
                .min_by_key(|&(p, len, _)| (p, std::cmp::Reverse(len)));
            let (plain, special) = match next {
                Some((p, len, id)) => (&rest[..p], Some((len, id, p))),
                None => (rest, None),
            };
            self.encode_plain(plain, &mut ids)?;
            match special {
                Some((len, id, p)) => {
                    ids.push(id);
                    rest = &rest[p + len..];
                }
                None => break,
            }
        }
        Ok(ids)
    }

    fn encode_plain(&self, text: &str, ids: &mut Vec<u32>) -> Result<()> {
        for m in self.pattern.find_iter(text) {
            let piece = m.map_err(|e| LmError::Input(format!("pre-tokenizing: {e}")))?.as_str();
            let mapped: String = piece.bytes().map(|b| self.byte_to_char[b as usize]).collect();
            for sym in self.bpe(&mapped) {
                let id = self
                    .encoder
                    .get(&sym)
                    .ok_or_else(|| LmError::Input(format!("symbol {sym:?} is not in the vocabulary")))?;
                ids.push(*id);
            }
        }
        Ok(())
    }

    fn bpe(&self, word: &str) -> Vec<String> {
        let mut parts: Vec<String> = word.chars().map(String::from).collect();
        while parts.len() > 1 {
            let best = parts
                .windows(2)
                .enumerate()
                .filter_map(|(i, w)| self.ranks.get(&(w[0].clone(), w[1].clone())).map(|&r| (r, i)))
                .min();
            let Some((_, i)) = best else { break };
            let (a, b) = (parts[i].clone(), parts[i + 1].clone());
            // Merge every occurrence of the pair, left to right.
            let mut merged = Vec::with_capacity(parts.len());
            let mut j = 0;
            while j < parts.len() {
                if j + 1 < parts.len() && parts[j] == a && parts[j + 1] == b {
                    merged.push(format!("{a}{b}"));
                    j += 2;
                } else {
                    merged.push(parts[j].clone());
                    j += 1;
                }
            }
            parts = merged;
        }
        parts
    }

    /// The text of token ids (invalid UTF-8 is replaced); errors on unknown ids.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        let mut bytes = Vec::new();
        for &id in ids {
            let tok = self
                .decoder
                .get(id as usize)
                .and_then(|t| t.as_ref())
                .ok_or_else(|| LmError::Input(format!("token id {id} is not in the vocabulary")))?;
            if self.added.iter().any(|(c, _)| c == tok) {
                bytes.extend_from_slice(tok.as_bytes());
                continue;
            }
            for ch in tok.chars() {
                bytes.push(
                    *self
                        .char_to_byte
                        .get(&ch)
                        .ok_or_else(|| LmError::Input(format!("token {tok:?} has a non-byte symbol {ch:?}")))?,
                );
            }
        }
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }
}

fn vocab_map(v: &Value, path: &Path) -> Result<HashMap<String, u32>> {
    let obj =
        v.as_object().ok_or_else(|| config_err(path, "vocabulary must be a JSON object mapping tokens to ids"))?;
    obj.iter()
        .map(|(k, id)| {
            id.as_u64().filter(|&i| i <= u64::from(u32::MAX)).map(|i| (k.clone(), i as u32)).ok_or_else(|| {
                config_err(path, format!("id of token {k:?} must be a non-negative integer, found {id}"))
            })
        })
        .collect()
}
