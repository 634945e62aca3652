//! OpenAI's request bodies, checked into rows for the engine, and its error object.
//!
//! Unknown fields are refused, as OpenAI refuses them; fields OpenAI defines that change the output
//! and are not implemented (penalties, `logit_bias`, `echo`, `best_of`, `suffix`) are accepted only
//! at their neutral values. Extensions: `steer`, `top_k`, `ignore_eos`.

use std::collections::{BTreeMap, VecDeque};

use memsteer_lm::sample::SamplingConfig;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::engine::RowSpec;
use crate::model::Served;

/// An error as OpenAI sends it: a status and `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    /// HTTP status.
    pub status: u16,
    /// What went wrong and what was expected.
    pub message: String,
    /// OpenAI's error type (`invalid_request_error`, …).
    pub kind: &'static str,
    /// The request field at fault.
    pub param: Option<String>,
    /// A short machine-readable code.
    pub code: Option<&'static str>,
}

impl ApiError {
    /// A 400 about `param`.
    pub fn invalid(param: impl Into<Option<String>>, message: impl Into<String>) -> Self {
        Self { status: 400, message: message.into(), kind: "invalid_request_error", param: param.into(), code: None }
    }

    /// Any other status.
    pub fn status(status: u16, kind: &'static str, code: &'static str, message: impl Into<String>) -> Self {
        Self { status, message: message.into(), kind, param: None, code: Some(code) }
    }

    /// The JSON body.
    pub fn body(&self) -> Value {
        json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}})
    }
}

fn invalid(param: &str, message: impl Into<String>) -> ApiError {
    ApiError::invalid(Some(param.to_string()), message)
}

/// The largest strength a request may give a steer (larger ones overflow the hidden state into
/// infinities).
pub const MAX_STRENGTH: f64 = 1e6;

/// The fields both endpoints take.
const COMMON_FIELDS: [&str; 16] = [
    "model",
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "n",
    "stream",
    "stream_options",
    "stop",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "user",
    "steer",
    "ignore_eos",
];
/// The fields only completions take.
pub const COMPLETION_FIELDS: [&str; 5] = ["prompt", "logprobs", "echo", "best_of", "suffix"];
/// The fields only chat takes.
pub const CHAT_FIELDS: [&str; 4] = ["messages", "logprobs", "top_logprobs", "max_completion_tokens"];

/// Parses a JSON object body into the endpoint's own fields `T` (named by `own`) and the shared
/// ones, refusing fields neither names (as OpenAI refuses them) and naming the field at fault.
pub fn parse<T: for<'de> Deserialize<'de>>(bytes: &[u8], own: &[&str]) -> Result<(T, Common), ApiError> {
    let body: Value = serde_json::from_slice(bytes)
        .map_err(|e| ApiError::invalid(None, format!("the body is not valid JSON: {e}")))?;
    let Value::Object(map) = body else {
        return Err(ApiError::invalid(None, "the body must be a JSON object"));
    };
    let (mut mine, mut shared) = (serde_json::Map::new(), serde_json::Map::new());
    for (k, v) in map {
        if own.contains(&k.as_str()) {
            mine.insert(k, v);
        } else if COMMON_FIELDS.contains(&k.as_str()) {
            shared.insert(k, v);
        } else {
            return Err(ApiError::invalid(Some(k.clone()), format!("Unrecognized request argument supplied: {k}")));
        }
    }
    Ok((fields(mine)?, fields(shared)?))
}

fn fields<T: for<'de> Deserialize<'de>>(map: serde_json::Map<String, Value>) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(Value::Object(map)).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let message = match path.as_str() {
            "prompt" => {
                "`prompt`: expected a string, a list of strings, a list of token ids or a list of lists of token ids"
                    .to_string()
            }
            "." => inner.to_string(),
            p => format!("`{p}`: {inner}"),
        };
        ApiError::invalid((path != ".").then_some(path), message)
    })
}

/// `stop`: one string or several.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    /// One.
    One(String),
    /// Several.
    Many(Vec<String>),
}

/// `stream_options`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamOptions {
    /// Send a last chunk with the usage counts.
    #[serde(default)]
    pub include_usage: Option<bool>,
}

/// One entry of the `steer` extension.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SteerRequest {
    /// A steer name the server loaded.
    pub name: String,
    /// Its strength: the labelled steer's ε multiplier (the file's dummy steer stays at 1, as in
    /// `steer generate`, so 0 is not the base model: leave the steer out for that).
    pub strength: f64,
}

/// The fields completions and chat share.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Common {
    /// The model (must be the served one when given).
    pub model: Option<String>,
    /// Tokens to generate.
    pub max_tokens: Option<u64>,
    /// Softmax temperature in [0, 2]; 0 is greedy.
    pub temperature: Option<f64>,
    /// Nucleus sampling in (0, 1].
    pub top_p: Option<f64>,
    /// Extension: keep the k most likely tokens (≥ 1; −1 or 0 for all).
    pub top_k: Option<i64>,
    /// Choices per prompt.
    pub n: Option<u64>,
    /// Server-sent events.
    pub stream: Option<bool>,
    /// Streaming options.
    pub stream_options: Option<StreamOptions>,
    /// Stop strings.
    pub stop: Option<Stop>,
    /// Seed: the same request gives the same text.
    pub seed: Option<serde_json::Number>,
    /// Must be 0.
    pub presence_penalty: Option<f64>,
    /// Must be 0.
    pub frequency_penalty: Option<f64>,
    /// Must be empty.
    pub logit_bias: Option<serde_json::Map<String, Value>>,
    /// Ignored.
    pub user: Option<String>,
    /// Extension: steers and strengths.
    pub steer: Option<Vec<SteerRequest>>,
    /// Extension: do not stop at end-of-sequence tokens.
    pub ignore_eos: Option<bool>,
}

/// `POST /v1/completions`.
#[derive(Debug, Clone, Deserialize)]
pub struct CompletionRequest {
    /// The prompt(s).
    pub prompt: Value,
    /// Alternatives per token to report (0–5).
    pub logprobs: Option<u64>,
    /// Must be false.
    pub echo: Option<bool>,
    /// Must equal `n` when given.
    pub best_of: Option<u64>,
    /// Must be absent.
    pub suffix: Option<String>,
}

/// A chat message.
#[derive(Debug, Clone, Deserialize)]
pub struct Message {
    /// `system`, `user`, `assistant`, …
    pub role: String,
    /// Text, or a list of `{"type": "text", "text": …}` parts.
    #[serde(default)]
    pub content: Value,
    /// Other fields are passed to the template.
    #[serde(flatten)]
    pub rest: serde_json::Map<String, Value>,
}

/// `POST /v1/chat/completions`.
#[derive(Debug, Clone, Deserialize)]
pub struct ChatRequest {
    /// The conversation.
    pub messages: Vec<Message>,
    /// Return log-probabilities.
    pub logprobs: Option<bool>,
    /// Alternatives per token (0–20, with `logprobs`).
    pub top_logprobs: Option<u64>,
    /// OpenAI's newer name for `max_tokens`.
    pub max_completion_tokens: Option<u64>,
}

/// A checked request, ready for the engine.
#[derive(Debug, Clone)]
pub struct Plan {
    /// One row per (prompt, choice), in choice order.
    pub rows: VecDeque<RowSpec>,
    /// Prompt tokens (each prompt once).
    pub prompt_tokens: usize,
    /// Server-sent events.
    pub stream: bool,
    /// A last streamed chunk with usage.
    pub include_usage: bool,
    /// Log-probabilities asked for.
    pub logprobs: bool,
}

/// Most choices one request may ask for (prompts × n).
pub const MAX_CHOICES: usize = 128;
/// Most stop strings (OpenAI's limit).
pub const MAX_STOP: usize = 4;

/// Limits the server was started with.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Most tokens one choice may generate (`--max-tokens`).
    pub max_tokens: usize,
    /// The server's seed for requests without one.
    pub seed: u64,
}

/// The token ids of a completions prompt.
pub fn completion_prompts(served: &Served, prompt: &Value) -> Result<Vec<Vec<u32>>, ApiError> {
    let shape = "expected a string, a list of strings, a list of token ids or a list of lists of token ids";
    let encode = |text: &str, param: String| -> Result<Vec<u32>, ApiError> {
        if text.is_empty() {
            return Err(ApiError::invalid(Some(param), "the prompt is empty"));
        }
        served.tokenizer.encode(text).map_err(|e| ApiError::invalid(Some(param), e.to_string()))
    };
    let ids = |v: &[Value], param: String| -> Result<Vec<u32>, ApiError> {
        v.iter()
            .map(|t| t.as_u64().and_then(|x| u32::try_from(x).ok()))
            .collect::<Option<Vec<u32>>>()
            .ok_or_else(|| ApiError::invalid(Some(param), format!("`prompt`: {shape}")))
    };
    let prompts = match prompt {
        Value::String(s) => vec![encode(s, "prompt".into())?],
        Value::Array(items) if items.is_empty() => return Err(invalid("prompt", "the prompt is empty")),
        Value::Array(items) if items.iter().all(Value::is_string) => items
            .iter()
            .enumerate()
            .map(|(i, s)| encode(s.as_str().unwrap_or_default(), format!("prompt[{i}]")))
            .collect::<Result<_, _>>()?,
        Value::Array(items) if items.iter().all(Value::is_number) => vec![ids(items, "prompt".into())?],
        Value::Array(items) if items.iter().all(Value::is_array) => items
            .iter()
            .enumerate()
            .map(|(i, v)| ids(v.as_array().map_or(&[][..], Vec::as_slice), format!("prompt[{i}]")))
            .collect::<Result<_, _>>()?,
        _ => return Err(invalid("prompt", format!("`prompt`: {shape}"))),
    };
    Ok(prompts)
}

/// The prompt ids of a chat request: its messages through the model's chat template.
pub fn chat_prompt(served: &Served, messages: &[Message]) -> Result<Vec<u32>, ApiError> {
    let Some(template) = &served.chat else {
        return Err(invalid(
            "messages",
            format!(
                "the model {:?} has no chat template (chat_template.jinja, or chat_template in tokenizer_config.json); use /v1/completions",
                served.name
            ),
        ));
    };
    if messages.is_empty() {
        return Err(invalid("messages", "`messages` is empty"));
    }
    let mut list = Vec::with_capacity(messages.len());
    for (i, m) in messages.iter().enumerate() {
        let content = match &m.content {
            Value::String(s) => s.clone(),
            Value::Null => String::new(),
            Value::Array(parts) => {
                let mut text = String::new();
                for (j, p) in parts.iter().enumerate() {
                    match (p.get("type").and_then(Value::as_str), p.get("text").and_then(Value::as_str)) {
                        (Some("text"), Some(t)) => text.push_str(t),
                        _ => {
                            return Err(invalid(
                                &format!("messages[{i}].content[{j}]"),
                                "only text parts ({\"type\": \"text\", \"text\": …}) are supported",
                            ));
                        }
                    }
                }
                text
            }
            _ => return Err(invalid(&format!("messages[{i}].content"), "expected a string or a list of text parts")),
        };
        let mut obj = m.rest.clone();
        obj.insert("role".into(), m.role.clone().into());
        obj.insert("content".into(), content.into());
        list.push(Value::Object(obj));
    }
    let text = template.render(&Value::Array(list)).map_err(|e| invalid("messages", e))?;
    // The template writes the special tokens itself, as transformers' apply_chat_template(tokenize=True).
    let ids = served.tokenizer.encode_plain(&text).map_err(|e| invalid("messages", e.to_string()))?;
    if ids.is_empty() {
        return Err(invalid("messages", "the chat template gave an empty prompt"));
    }
    Ok(ids)
}

/// Checks the shared fields and lays out the rows of `prompts`; `default_max` is the request's
/// `max_tokens` when it gives none (`None`: the rest of the context).
pub fn plan(
    served: &Served,
    c: &Common,
    prompts: Vec<Vec<u32>>,
    (default_max, logprobs): (Option<u64>, Option<usize>),
    (limits, request_number): (Limits, u64),
) -> Result<Plan, ApiError> {
    if let Some(m) = &c.model
        && m != &served.name
    {
        return Err(ApiError {
            status: 404,
            message: format!("The model `{m}` does not exist; this server serves `{}`", served.name),
            kind: "invalid_request_error",
            param: Some("model".into()),
            code: Some("model_not_found"),
        });
    }
    let temperature = c.temperature.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(invalid("temperature", format!("`temperature` must be in [0, 2], found {temperature}")));
    }
    let top_p = match c.top_p {
        Some(p) if !(p > 0.0 && p <= 1.0) => {
            return Err(invalid("top_p", format!("`top_p` must be in (0, 1], found {p}")));
        }
        Some(p) if p < 1.0 => Some(p as f32),
        _ => None,
    };
    let top_k = match c.top_k {
        None | Some(-1) | Some(0) => None,
        Some(k) if k >= 1 => Some(k as usize),
        Some(k) => return Err(invalid("top_k", format!("`top_k` must be ≥ 1 (or −1 for all tokens), found {k}"))),
    };
    let n = c.n.unwrap_or(1);
    if n == 0 || prompts.len().saturating_mul(n as usize) > MAX_CHOICES {
        return Err(invalid(
            "n",
            format!("`n` × prompts must be between 1 and {MAX_CHOICES}, found {n} × {}", prompts.len()),
        ));
    }
    for (name, v) in [("presence_penalty", c.presence_penalty), ("frequency_penalty", c.frequency_penalty)] {
        if v.is_some_and(|v| v != 0.0) {
            return Err(invalid(name, format!("`{name}` is not supported; leave it out or set it to 0")));
        }
    }
    if c.logit_bias.as_ref().is_some_and(|b| !b.is_empty()) {
        return Err(invalid("logit_bias", "`logit_bias` is not supported; leave it out"));
    }
    let stop: Vec<String> = match &c.stop {
        None => Vec::new(),
        Some(Stop::One(s)) => vec![s.clone()],
        Some(Stop::Many(v)) => v.clone(),
    };
    if stop.len() > MAX_STOP || stop.iter().any(String::is_empty) {
        return Err(invalid("stop", format!("`stop`: at most {MAX_STOP} non-empty strings")));
    }
    let seed = match &c.seed {
        Some(s) => match (s.as_u64(), s.as_i64()) {
            (Some(u), _) => u,
            (None, Some(i)) => i as u64,
            _ => return Err(invalid("seed", format!("`seed` must be an integer, found {s}"))),
        },
        None => memsteer_panel::rng::hash_key(limits.seed, &request_number.to_le_bytes()),
    };
    // Steers: names summed per file, the file's labelled steer at the summed strength.
    let mut by_steer: BTreeMap<usize, f64> = BTreeMap::new();
    for (i, s) in c.steer.iter().flatten().enumerate() {
        let Some(k) = served.steers.iter().position(|x| x.name == s.name) else {
            let names: Vec<&str> = served.steers.iter().map(|x| x.name.as_str()).collect();
            let loaded = if names.is_empty() { "none".to_string() } else { names.join(", ") };
            return Err(invalid(&format!("steer[{i}].name"), format!("unknown steer {:?}; loaded: {loaded}", s.name)));
        };
        if !s.strength.is_finite() || s.strength.abs() > MAX_STRENGTH {
            return Err(invalid(
                &format!("steer[{i}].strength"),
                format!(
                    "the strength must be a number between -{MAX_STRENGTH} and {MAX_STRENGTH}, found {}",
                    s.strength
                ),
            ));
        }
        *by_steer.entry(k).or_default() += s.strength;
    }
    if let Some((k, sum)) = by_steer.iter().find(|(_, v)| v.abs() > MAX_STRENGTH) {
        return Err(invalid(
            "steer",
            format!("the strengths of steer {:?} add up to {sum}, beyond ±{MAX_STRENGTH}", served.steers[*k].name),
        ));
    }
    let mut steers = Vec::new();
    for (k, strength) in by_steer {
        let steer = &served.steers[k].steer;
        let strengths = steer.strengths_of_first(strength as f32).map_err(|e| invalid("steer", e.to_string()))?;
        steers.push((k, strengths));
    }
    let (context, vocab) = (served.context(), served.vocab());
    let mut rows = VecDeque::new();
    let mut prompt_tokens = 0;
    for (p, prompt) in prompts.iter().enumerate() {
        let param = if prompts.len() == 1 { "prompt".to_string() } else { format!("prompt[{p}]") };
        if prompt.is_empty() {
            return Err(invalid(&param, "the prompt has no tokens"));
        }
        if let Some(t) = prompt.iter().find(|&&t| t as usize >= vocab) {
            return Err(invalid(&param, format!("token id {t} is outside the model's vocabulary of {vocab}")));
        }
        if prompt.len() > context {
            return Err(invalid(
                &param,
                format!("{} prompt tokens exceed the model's context of {context} positions", prompt.len()),
            ));
        }
        let room = (context + 1).saturating_sub(prompt.len());
        let max = match c.max_tokens.or(default_max) {
            Some(m) => m,
            None => room.min(limits.max_tokens) as u64,
        };
        if max == 0 {
            return Err(invalid("max_tokens", "`max_tokens` must be at least 1"));
        }
        if max > limits.max_tokens as u64 {
            return Err(invalid(
                "max_tokens",
                format!("`max_tokens` {max} is beyond this server's limit of {} (--max-tokens)", limits.max_tokens),
            ));
        }
        let max = max as usize;
        // The last token is never fed back, so it needs no position.
        if prompt.len() + max - 1 > context {
            return Err(invalid(
                "max_tokens",
                format!(
                    "{} prompt tokens + {max} new tokens exceed the model's context of {context} positions",
                    prompt.len()
                ),
            ));
        }
        prompt_tokens += prompt.len();
        for j in 0..n as usize {
            let key = format!("{p}\u{0}{j}");
            rows.push_back(RowSpec {
                choice: p * n as usize + j,
                prompt: prompt.clone(),
                max_tokens: max,
                sampling: SamplingConfig { temperature: temperature as f32, top_k, top_p },
                seed: memsteer_panel::rng::hash_key(seed, key.as_bytes()),
                steers: steers.clone(),
                stop: stop.clone(),
                stop_at_eos: !c.ignore_eos.unwrap_or(false),
                logprobs,
            });
        }
    }
    Ok(Plan {
        rows,
        prompt_tokens,
        stream: c.stream.unwrap_or(false),
        include_usage: c.stream_options.as_ref().and_then(|o| o.include_usage).unwrap_or(false),
        logprobs: logprobs.is_some(),
    })
}
