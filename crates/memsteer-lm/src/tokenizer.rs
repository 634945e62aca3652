//! Tokenization through Hugging Face's `tokenizers` crate (pure Rust build), so normalizers,
//! pre-tokenizer sequences, post-processors and added tokens behave exactly as in `tokenizers` and
//! `transformers`.
//!
//! A model directory's `tokenizer.json` is preferred; without one, GPT-2's byte-level BPE is built in
//! code from `vocab.json` + `merges.txt` or `encoder.json` + `vocab.bpe` (byte-level pre-tokenizer
//! without a prefix space, byte-level decoder, `<|endoftext|>` as a special token when the vocabulary
//! has it), as `transformers` converts a slow GPT-2 tokenizer. Ids equal `tokenizers`' (golden tests
//! in `fixtures/tokenizer/` and `fixtures/lm/`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde_json::Value;
use tokenizers::models::bpe::{BPE, Vocab};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer as HfTokenizer};

use crate::{LmError, Result};

/// The model types `tokenizers` can load from a `tokenizer.json`.
const MODEL_TYPES: [&str; 4] = ["BPE", "WordPiece", "WordLevel", "Unigram"];

/// A tokenizer loaded from a model directory.
#[derive(Debug, Clone)]
pub struct Tokenizer {
    inner: HfTokenizer,
    /// The file it was loaded from (the vocabulary file for the GPT-2 layouts), named in errors.
    source: PathBuf,
    /// Largest id + 1, added tokens included.
    vocab_size: usize,
    /// How the vocabulary spells its tokens' text and which ids are added tokens, found the first time
    /// [`Tokenizer::token_text`] asks.
    spelling: std::sync::OnceLock<(Spelling, std::collections::HashSet<u32>)>,
}

/// How a vocabulary spells the text of its tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Spelling {
    /// Byte-level BPE (GPT-2, Llama 3, Qwen): every byte as a printable character, `Ġ` for a space.
    ByteLevel,
    /// SentencePiece (Llama 2, Mistral, Gemma): `▁` for a space, `<0xNN>` for a fallback byte.
    Metaspace,
    /// The text itself.
    Plain,
}

/// The byte a character of GPT-2's byte-to-character map stands for: printable Latin-1 characters
/// stand for themselves, the other 68 bytes (controls, space, DEL, no-break space, soft hyphen…) are
/// the characters from U+0100 on, in byte order.
fn byte_of(c: char) -> Option<u8> {
    let printable = |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    let cp = c as u32;
    if printable(cp) {
        return u8::try_from(cp).ok();
    }
    let k = cp.checked_sub(256)? as usize;
    (0u32..=255).filter(|&b| !printable(b)).nth(k).and_then(|b| u8::try_from(b).ok())
}

fn tok_err(path: &Path, message: impl Into<String>) -> LmError {
    LmError::Tokenizer { path: path.to_path_buf(), message: message.into() }
}

fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|source| LmError::Io { path: path.to_path_buf(), source })
}

/// The tokenizer files a model directory may hold (copied into training checkpoints, hashed by
/// [`fingerprint`]).
pub const FILES: [&str; 7] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "encoder.json",
    "vocab.bpe",
];

/// Whether a model directory holds a tokenizer [`Tokenizer::from_dir`] can load.
pub fn present_in(dir: &Path) -> bool {
    dir.join("tokenizer.json").exists()
        || (dir.join("vocab.json").exists() && dir.join("merges.txt").exists())
        || (dir.join("encoder.json").exists() && dir.join("vocab.bpe").exists())
}

/// A fingerprint of a directory's tokenizer files (their names and bytes), `None` when it has none:
/// token ids generated under one tokenizer are scored only under a model with the same fingerprint.
pub fn fingerprint(dir: &Path) -> Result<Option<String>> {
    let mut hash = 0u64;
    let mut any = false;
    for f in FILES {
        let p = dir.join(f);
        if p.is_file() {
            let bytes = std::fs::read(&p).map_err(|source| LmError::Io { path: p.clone(), source })?;
            hash = memsteer_panel::rng::hash_key(hash, f.as_bytes());
            hash = memsteer_panel::rng::hash_key(hash, &bytes);
            any = true;
        }
    }
    Ok(any.then(|| format!("{hash:016x}")))
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

    /// Builds GPT-2's byte-level BPE from `vocab.json`/`encoder.json` and `merges.txt`/`vocab.bpe`;
    /// `<|endoftext|>` becomes a special token when the vocabulary has it.
    pub fn from_files(vocab: &Path, merges: &Path) -> Result<Self> {
        let v: Value =
            serde_json::from_str(&read(vocab)?).map_err(|e| tok_err(vocab, format!("not valid JSON: {e}")))?;
        let encoder = vocab_map(&v, vocab)?;
        let text = read(merges)?;
        let mut pairs = Vec::new();
        for (i, line) in text.lines().enumerate() {
            if (i == 0 && line.starts_with("#version")) || line.is_empty() {
                continue;
            }
            let (a, b) = line
                .split_once(' ')
                .filter(|(a, b)| !a.is_empty() && !b.is_empty() && !b.contains(' '))
                .ok_or_else(|| tok_err(merges, format!("line {}: expected two symbols separated by a space", i + 1)))?;
            pairs.push((a.to_string(), b.to_string()));
        }
        let eos = encoder.contains_key("<|endoftext|>");
        let bpe = BPE::builder()
            .vocab_and_merges(encoder.into_iter().collect::<Vocab>(), pairs)
            .build()
            .map_err(|e| tok_err(merges, format!("merges do not fit {}: {e}", vocab.display())))?;
        let mut inner = HfTokenizer::new(bpe);
        inner
            .with_pre_tokenizer(Some(ByteLevel::new(false, true, true)))
            .with_decoder(Some(ByteLevel::new(true, true, true)))
            .with_post_processor(Some(ByteLevel::new(true, false, true)));
        if eos {
            inner.add_special_tokens(&[AddedToken::from("<|endoftext|>", true)]);
        }
        Ok(Self::wrap(inner, vocab))
    }

    /// Loads a Hugging Face `tokenizer.json` (any model, normalizer, pre-tokenizer, post-processor
    /// and decoder that `tokenizers` reads). Truncation and padding stored in the file are switched
    /// off, as `transformers` does when a text is tokenized without `truncation=` or `padding=`.
    pub fn from_tokenizer_json(path: &Path) -> Result<Self> {
        let text = read(path)?;
        let v: Value = serde_json::from_str(&text).map_err(|e| tok_err(path, format!("not valid JSON: {e}")))?;
        check_tokenizer_json(&v, path)?;
        let mut inner = HfTokenizer::from_str(&text)
            .map_err(|e| tok_err(path, format!("not a tokenizer that `tokenizers` 0.22 can load: {e}")))?;
        inner.with_padding(None);
        inner.with_truncation(None).map_err(|e| tok_err(path, format!("switching truncation off: {e}")))?;
        Ok(Self::wrap(inner, path))
    }

    fn wrap(inner: HfTokenizer, source: &Path) -> Self {
        let vocab_size = inner.get_vocab(true).values().map(|&id| id as usize + 1).max().unwrap_or(0);
        Self { inner, source: source.to_path_buf(), vocab_size, spelling: std::sync::OnceLock::new() }
    }

    /// Vocabulary size: the largest token id + 1, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// The token string of `id` (byte-level tokens in their printable form, e.g. `Ġthe`), if any.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The text token `id` stands for, spelled the same whatever the tokenizer's conventions, so that
    /// vocabularies of different families can be matched (`steer transfer`): byte-level BPE's
    /// byte-to-character map is undone (`Ġthe` → ` the`), SentencePiece's `▁` becomes a space and its
    /// fallback tokens `<0xNN>` their byte. A token whose bytes are not whole UTF-8 is written as the
    /// bytes in hex (`<0xe2 0x80>`), so partial characters match only the same bytes.
    pub fn token_text(&self, id: u32) -> Option<String> {
        let token = self.inner.id_to_token(id)?;
        let (spelling, added) = self.spelling.get_or_init(|| {
            let vocab = self.inner.get_vocab(false);
            let starting = |c: char| vocab.keys().filter(|t| t.starts_with(c)).count();
            let spelling = match (starting('Ġ'), starting('▁')) {
                (g, m) if g > m && g > 0 => Spelling::ByteLevel,
                (_, m) if m > 0 => Spelling::Metaspace,
                _ => Spelling::Plain,
            };
            (spelling, self.inner.get_added_tokens_decoder().into_keys().collect())
        });
        let (spelling, is_added) = (*spelling, added.contains(&id));
        let fallback = token
            .strip_prefix("<0x")
            .and_then(|h| h.strip_suffix('>'))
            .filter(|h| h.len() == 2)
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        let bytes: Vec<u8> = match (spelling, fallback) {
            _ if is_added => token.clone().into_bytes(),
            (Spelling::Metaspace, Some(b)) => vec![b],
            (Spelling::ByteLevel, _) => {
                let mapped: Option<Vec<u8>> = token.chars().map(byte_of).collect();
                mapped.unwrap_or_else(|| token.clone().into_bytes())
            }
            (Spelling::Metaspace, None) => token.replace('▁', " ").into_bytes(),
            (Spelling::Plain, _) => token.clone().into_bytes(),
        };
        Some(match String::from_utf8(bytes) {
            Ok(text) => text,
            Err(e) => {
                let hex: Vec<String> = e.as_bytes().iter().map(|b| format!("0x{b:02x}")).collect();
                format!("<{}>", hex.join(" "))
            }
        })
    }

    /// The id of the token string `token`, if it is in the vocabulary or an added token.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Token ids of `text`, as `tokenizer(text)["input_ids"]` in `transformers`: added tokens such as
    /// `<|endoftext|>` are matched first, and the post-processor's special tokens (if any) are added.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .guard("tokenizing text", || self.inner.encode(text, true))?
            .map_err(|e| tok_err(&self.source, format!("tokenizing text: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Token ids of `text` without the post-processor's special tokens (`add_special_tokens=False`):
    /// for text that already holds them, such as a rendered chat template.
    pub fn encode_plain(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .guard("tokenizing text", || self.inner.encode(text, false))?
            .map_err(|e| tok_err(&self.source, format!("tokenizing text: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Runs `f`, turning a panic inside `tokenizers` (which it can raise on inconsistent files that
    /// the checks at load time do not catch) into an error naming the file.
    fn guard<T>(&self, what: &str, f: impl FnOnce() -> T) -> Result<T> {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|payload| {
            let msg = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            tok_err(&self.source, format!("{what}: `tokenizers` failed on this file ({msg})"))
        })
    }

    /// The text of token ids (special tokens kept; invalid UTF-8 replaced); errors on ids that are
    /// not in the vocabulary.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        if let Some(&bad) = ids.iter().find(|&&id| self.inner.id_to_token(id).is_none()) {
            return Err(tok_err(
                &self.source,
                format!("token id {bad} is not in the vocabulary (size {})", self.vocab_size),
            ));
        }
        self.guard("decoding", || self.inner.decode(ids, false))?
            .map_err(|e| tok_err(&self.source, format!("decoding: {e}")))
    }
}

/// Checks what `tokenizers` would accept silently, report vaguely or panic on later: empty added tokens,
/// unknown model types, a BPE model without merges, template special tokens that are not defined.
fn check_tokenizer_json(v: &Value, path: &Path) -> Result<()> {
    let obj = v.as_object().ok_or_else(|| tok_err(path, "expected a JSON object"))?;
    for (i, t) in obj.get("added_tokens").and_then(Value::as_array).into_iter().flatten().enumerate() {
        match t.get("content").and_then(Value::as_str) {
            Some("") => return Err(tok_err(path, format!("added_tokens[{i}] has empty `content`"))),
            Some(_) => {}
            None => return Err(tok_err(path, format!("added_tokens[{i}] has no string `content`"))),
        }
    }
    let model = obj.get("model").ok_or_else(|| tok_err(path, "missing `model`"))?;
    match model.get("type").and_then(Value::as_str) {
        Some(ty) if !MODEL_TYPES.contains(&ty) => {
            return Err(tok_err(path, format!("model type {ty:?} is not one of {}", MODEL_TYPES.join(", "))));
        }
        Some("BPE") => {
            for key in ["vocab", "merges"] {
                if model.get(key).is_none() {
                    return Err(tok_err(path, format!("the BPE model has no `model.{key}`")));
                }
            }
        }
        _ => {}
    }
    if let Some(pp) = obj.get("post_processor") {
        check_post_processor(pp, path)?;
    }
    Ok(())
}

/// A `TemplateProcessing` (alone or in a `Sequence`) must define every special token its templates use.
fn check_post_processor(pp: &Value, path: &Path) -> Result<()> {
    match pp.get("type").and_then(Value::as_str) {
        Some("Sequence") => {
            for p in pp.get("processors").and_then(Value::as_array).into_iter().flatten() {
                check_post_processor(p, path)?;
            }
        }
        Some("TemplateProcessing") => {
            let defined = pp.get("special_tokens").and_then(Value::as_object);
            for key in ["single", "pair"] {
                for piece in pp.get(key).and_then(Value::as_array).into_iter().flatten() {
                    let Some(id) = piece.get("SpecialToken").and_then(|t| t.get("id")).and_then(Value::as_str) else {
                        continue;
                    };
                    if !defined.is_some_and(|d| d.contains_key(id)) {
                        return Err(tok_err(
                            path,
                            format!(
                                "post_processor.{key} uses the special token {id:?}, which \
                                 post_processor.special_tokens does not define"
                            ),
                        ));
                    }
                }
            }
        }
        _ => {}
    }
    Ok(())
}

fn vocab_map(v: &Value, path: &Path) -> Result<HashMap<String, u32>> {
    let obj = v.as_object().ok_or_else(|| tok_err(path, "vocabulary must be a JSON object mapping tokens to ids"))?;
    obj.iter()
        .map(|(k, id)| {
            id.as_u64()
                .filter(|&i| i <= u64::from(u32::MAX))
                .map(|i| (k.clone(), i as u32))
                .ok_or_else(|| tok_err(path, format!("id of token {k:?} must be a non-negative integer, found {id}")))
        })
        .collect()
}
