//! The continuous batch: one thread owns the model and runs decoding steps over every running row.
//! Requests join and leave between steps; each row carries its own KV cache, steers and strengths,
//! sampling settings and generator, and every row's new tokens go through one packed forward pass
//! ([`memsteer_lm::Decoder::forward_cached`]) and one logits product.
//!
//! A row's tokens do not depend on what else is in the batch: each row's hidden state equals the one
//! its sequence gets alone (tested in `memsteer-lm`), its steers are applied to its own hidden state
//! as `steer generate` applies them, and its draws come from its own seeded generator.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::Instant;

use memsteer_lm::sample::{SamplingConfig, sample_excluding};
use memsteer_panel::rng::SplitMix64;
use rayon::prelude::*;
use tokio::sync::mpsc::UnboundedSender;

use crate::metrics::Metrics;
use crate::model::{Admit, RowCache, Served};

/// What one row (one choice of one prompt) generates.
#[derive(Debug, Clone)]
pub struct RowSpec {
    /// The choice's index in the response.
    pub choice: usize,
    /// Prompt token ids (at least one).
    pub prompt: Vec<u32>,
    /// Most tokens to generate (at least one).
    pub max_tokens: usize,
    /// Temperature, top-k, top-p.
    pub sampling: SamplingConfig,
    /// Seed of the row's generator.
    pub seed: u64,
    /// Steers (index into the served steers) and the strengths of all their steers (dummy included).
    pub steers: Vec<(usize, Vec<f32>)>,
    /// Stop strings (not included in the text).
    pub stop: Vec<String>,
    /// Whether an end-of-sequence token ends the row.
    pub stop_at_eos: bool,
    /// Alternatives per token to report with log-probabilities (`None`: no log-probabilities).
    pub logprobs: Option<usize>,
}

/// Why a row ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// An end-of-sequence token or a stop string.
    Stop,
    /// `max_tokens` reached.
    Length,
}

impl Finish {
    /// OpenAI's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Finish::Stop => "stop",
            Finish::Length => "length",
        }
    }
}

/// A generated token's log-probability and the most likely alternatives.
#[derive(Debug, Clone)]
pub struct TokenLogprob {
    /// The token's text.
    pub token: String,
    /// `log p(token)` under the (steered) model at temperature 1.
    pub logprob: f32,
    /// The most likely tokens and their log-probabilities.
    pub top: Vec<(String, f32)>,
}

/// What the engine tells a request.
#[derive(Debug, Clone)]
pub enum Event {
    /// A new token of choice `choice`, with the text it adds (empty while a stop string or a
    /// character is incomplete).
    Token {
        /// The choice.
        choice: usize,
        /// Text added to the choice's output.
        text: String,
        /// Log-probabilities, when asked for.
        logprob: Option<TokenLogprob>,
    },
    /// Choice `choice` ended.
    Done {
        /// The choice.
        choice: usize,
        /// Why.
        finish: Finish,
        /// Tokens it generated.
        tokens: usize,
    },
    /// The request failed.
    Failed(String),
    /// The request cannot run on this server's device (its KV cache does not fit even alone).
    NoRoom(String),
}

/// A request: its rows and where its events go.
#[derive(Debug)]
pub struct Job {
    /// Rows not yet started.
    pub rows: VecDeque<RowSpec>,
    /// The request's event stream (closed when the client went away).
    pub events: UnboundedSender<Event>,
    /// When the request arrived.
    pub received: Instant,
}

/// The queue is full.
#[derive(Debug, Clone, Copy)]
pub struct QueueFull;

/// The handle the HTTP side holds: submits jobs, reads the queue length.
#[derive(Debug, Clone)]
pub struct Engine {
    tx: mpsc::Sender<Job>,
    queued: Arc<AtomicUsize>,
    max_queue: usize,
}

impl Engine {
    /// Starts the engine thread; it runs until every handle is dropped and its rows are done. `pool`
    /// runs its parallel work.
    pub fn start(
        served: Arc<Served>,
        (max_batch, max_queue): (usize, usize),
        metrics: Arc<Metrics>,
        pool: rayon::ThreadPool,
    ) -> (Self, std::thread::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel();
        let queued = Arc::new(AtomicUsize::new(0));
        let q = queued.clone();
        let handle = std::thread::Builder::new()
            .name("memsteer-engine".into())
            .spawn(move || pool.install(|| run(&served, rx, &q, max_batch.max(1), &metrics)))
            .expect("spawning the engine thread");
        (Self { tx, queued, max_queue }, handle)
    }

    /// Queues a job, unless `max_queue` requests already wait.
    pub fn submit(&self, job: Job) -> Result<(), QueueFull> {
        let now = self.queued.fetch_add(1, Ordering::SeqCst);
        if now >= self.max_queue {
            self.queued.fetch_sub(1, Ordering::SeqCst);
            return Err(QueueFull);
        }
        if self.tx.send(job).is_err() {
            self.queued.fetch_sub(1, Ordering::SeqCst);
            return Err(QueueFull);
        }
        Ok(())
    }

    /// Requests waiting for a row.
    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::SeqCst)
    }
}

/// A running row.
struct Row {
    spec: RowSpec,
    events: UnboundedSender<Event>,
    received: Instant,
    cache: RowCache,
    /// What the next step feeds: the prompt, then the last token.
    input: Vec<u32>,
    generated: Vec<u32>,
    rng: SplitMix64,
    /// Text already sent.
    sent: String,
    /// The generated text, decoded a few tokens at a time.
    detok: Detok,
    last_token: Option<Instant>,
    done: bool,
}

fn run(served: &Served, rx: mpsc::Receiver<Job>, queued: &AtomicUsize, max_batch: usize, metrics: &Metrics) {
    let mut waiting: VecDeque<Job> = VecDeque::new();
    let mut active: Vec<Row> = Vec::new();
    loop {
        if active.is_empty() && waiting.is_empty() {
            match rx.recv() {
                Ok(job) => waiting.push_back(job),
                Err(_) => break,
            }
        }
        while let Ok(job) = rx.try_recv() {
            waiting.push_back(job);
        }
        // Rows and requests whose client went away.
        let before = active.len();
        active.retain(|r| !r.events.is_closed());
        metrics.cancelled(before - active.len());
        waiting.retain(|j| {
            let keep = !j.events.is_closed();
            if !keep {
                queued.fetch_sub(1, Ordering::SeqCst);
                metrics.cancelled(j.rows.len());
            }
            keep
        });
        // Admit rows in arrival order; a request leaves the queue when its last row starts.
        while active.len() < max_batch {
            let Some(job) = waiting.front_mut() else { break };
            if let Some(spec) = job.rows.pop_front() {
                // Room for the prompt and every generated token; the next step runs every active row's
                // input and this prompt.
                let rows: usize = active.iter().map(|r| r.input.len()).sum::<usize>() + spec.prompt.len();
                let next_step = (rows, active.len() + 1);
                let admitted = match served.admit(spec.prompt.len() + spec.max_tokens, next_step, !active.is_empty()) {
                    Admit::Row(c) => Ok(c),
                    Admit::Wait => {
                        job.rows.push_front(spec);
                        break;
                    }
                    Admit::NoRoom(e) => Err(Event::NoRoom(format!("choice {}: {e}", spec.choice))),
                    Admit::Failed(e) => Err(Event::Failed(format!("choice {}: {e}", spec.choice))),
                };
                let cache = match admitted {
                    Ok(c) => c,
                    // It cannot run (nothing else runs and it does not fit, or another error): the
                    // request fails, and no row of it runs.
                    Err(event) => {
                        let _ = job.events.send(event);
                        job.rows.clear();
                        waiting.pop_front();
                        queued.fetch_sub(1, Ordering::SeqCst);
                        continue;
                    }
                };
                active.push(Row {
                    rng: SplitMix64::new(spec.seed),
                    input: spec.prompt.clone(),
                    spec,
                    events: job.events.clone(),
                    received: job.received,
                    cache,
                    generated: Vec::new(),
                    sent: String::new(),
                    detok: Detok::default(),
                    last_token: None,
                    done: false,
                });
            }
            if job.rows.is_empty() {
                waiting.pop_front();
                queued.fetch_sub(1, Ordering::SeqCst);
            }
        }
        metrics.set_queue(queued.load(Ordering::SeqCst));
        if active.is_empty() {
            continue;
        }
        metrics.batch(active.len());
        // A panic in a step fails that step's requests, not the server.
        let stepped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| step(served, &mut active, metrics)))
            .unwrap_or_else(|_| Err("internal error in a decoding step (see the server's log)".to_string()));
        if let Err(message) = stepped {
            for r in &mut active {
                let _ = r.events.send(Event::Failed(message.clone()));
                r.done = true;
            }
        }
        active.retain(|r| !r.done);
        metrics.set_kv_bytes(active.iter().map(|r| r.cache.bytes()).sum());
    }
}

/// One decoding step of every active row.
fn step(served: &Served, rows: &mut [Row], metrics: &Metrics) -> Result<(), String> {
    let dec = served.model.decoder();
    let (d, vocab) = (dec.dim(), dec.vocab());
    let (seqs, mut caches): (Vec<&[u32]>, Vec<&mut RowCache>) =
        rows.iter_mut().map(|r| (r.input.as_slice(), &mut r.cache)).unzip();
    let lens: Vec<usize> = seqs.iter().map(|s| s.len()).collect();
    let hidden = served.forward_step(&seqs, &mut caches)?;
    let mut ends = Vec::with_capacity(lens.len());
    let mut at = 0;
    for l in lens {
        at += l;
        ends.push(at);
    }
    // Each row's last hidden state with its own steers, as `steer generate` applies them.
    let steered: Vec<Vec<f32>> = rows
        .par_iter()
        .zip(&ends)
        .map(|(r, &end)| {
            let h = &hidden[(end - 1) * d..end * d];
            if r.spec.steers.is_empty() {
                return Ok(h.to_vec());
            }
            let mut out = h.to_vec();
            for (i, strengths) in &r.spec.steers {
                let p = served.steers[*i].steer.project(h, strengths).map_err(|e| format!("steering: {e}"))?;
                out.iter_mut().zip(&p).zip(h).for_each(|((o, pi), hi)| *o += pi - hi);
            }
            Ok(out)
        })
        .collect::<Result<_, String>>()?;
    let n = rows.len();
    let flat: Vec<f32> = steered.concat();
    let logits = served.logits(&flat, n)?;
    let now = Instant::now();
    rows.par_iter_mut().zip(logits.par_chunks(vocab)).for_each(|(r, l)| advance(served, r, l, now, metrics));
    Ok(())
}

/// Samples a row's next token from its logits, sends its text and ends it when it is done.
fn advance(served: &Served, r: &mut Row, logits: &[f32], now: Instant, metrics: &Metrics) {
    let choice = r.spec.choice;
    // Ids the tokenizer cannot decode (padded embedding rows) are never sampled.
    let token = match sample_excluding(logits, &r.spec.sampling, r.rng.uniform(), &served.undecodable) {
        Ok(t) => t as u32,
        Err(e) => {
            let _ = r.events.send(Event::Failed(format!("choice {choice}, token {}: {e}", r.generated.len())));
            r.done = true;
            return;
        }
    };
    match r.last_token {
        None => metrics.first_token(now.duration_since(r.received)),
        Some(t) => metrics.token_gap(now.duration_since(t)),
    }
    r.last_token = Some(now);
    let logprob = r.spec.logprobs.map(|top| served.logprob(logits, token, top));
    r.generated.push(token);
    let eos = r.spec.stop_at_eos && served.eos.contains(&token);
    let visible = if eos { &r.generated[..r.generated.len() - 1] } else { &r.generated[..] };
    let text = match r.detok.text(&served.tokenizer, visible) {
        Ok(t) => t,
        Err(e) => {
            let _ = r.events.send(Event::Failed(format!("choice {choice}: decoding: {e}")));
            r.done = true;
            return;
        }
    };
    let mut finish = eos.then_some(Finish::Stop);
    // The first stop string in the text ends it there (searched from a little before what was sent,
    // so that a stop string spanning tokens is found).
    let from = floor_boundary(&text, r.sent.len().saturating_sub(max_len(&r.spec.stop)));
    let stop_at = r.spec.stop.iter().filter_map(|s| text[from..].find(s.as_str()).map(|p| from + p)).min();
    let upto = match stop_at {
        Some(p) => {
            finish = Some(Finish::Stop);
            p
        }
        None if finish.is_some() || r.generated.len() >= r.spec.max_tokens => {
            finish.get_or_insert(Finish::Length);
            text.len()
        }
        // Hold back an incomplete character and a tail that may begin a stop string.
        None => safe_end(&text, &r.spec.stop),
    };
    let delta = if upto > r.sent.len() { text[r.sent.len()..upto].to_string() } else { String::new() };
    r.sent.push_str(&delta);
    let _ = r.events.send(Event::Token { choice, text: delta, logprob });
    if let Some(finish) = finish {
        let _ = r.events.send(Event::Done { choice, finish, tokens: r.generated.len() });
        metrics.generated(r.generated.len());
        r.done = true;
    }
    r.input.clear();
    r.input.push(token);
}

/// Incremental decoding: each step decodes only the tokens since the last complete piece of text
/// (`prefix..`), against the same window without the newest tokens (`prefix..read`), and keeps the
/// difference, so a long generation costs a few tokens' decoding per step, not the whole text's. Both
/// decodes start at the same token, so tokenizers that treat a leading space specially agree with the
/// whole-text decode; a window that ends inside a character (U+FFFD) waits for more tokens.
#[derive(Debug, Default)]
struct Detok {
    prefix: usize,
    read: usize,
    /// The text of `tokens[..read]`.
    stable: String,
}

impl Detok {
    /// The text of `tokens` (which extend the tokens of the last call).
    fn text(&mut self, tok: &memsteer_lm::tokenizer::Tokenizer, tokens: &[u32]) -> Result<String, String> {
        let before = tok.decode(&tokens[self.prefix..self.read]).map_err(|e| e.to_string())?;
        let now = tok.decode(&tokens[self.prefix..]).map_err(|e| e.to_string())?;
        let Some(tail) = now.strip_prefix(before.as_str()) else {
            return Err(format!(
                "decoding {} more tokens rewrote text already decoded; the tokenizer does not decode incrementally",
                tokens.len() - self.read
            ));
        };
        let text = format!("{}{tail}", self.stable);
        if !tail.is_empty() && !tail.ends_with('\u{FFFD}') {
            self.stable.push_str(tail);
            self.prefix = self.read;
            self.read = tokens.len();
        }
        Ok(text)
    }
}

fn max_len(stop: &[String]) -> usize {
    stop.iter().map(String::len).max().unwrap_or(0)
}

/// The largest char boundary of `s` at or before `i`.
fn floor_boundary(s: &str, mut i: usize) -> usize {
    i = i.min(s.len());
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

/// How much of `text` can be sent before the row ends: not a trailing replacement character (a
/// character whose bytes are not all generated yet), nor a tail that is the beginning of a stop string.
fn safe_end(text: &str, stop: &[String]) -> usize {
    let mut end = text.trim_end_matches('\u{FFFD}').len();
    for s in stop {
        // The longest proper prefix of `s` that `text[..end]` ends with.
        for (k, _) in s.char_indices().skip(1).collect::<Vec<_>>().into_iter().rev() {
            if text[..end].ends_with(&s[..k]) {
                end -= k;
                break;
            }
        }
    }
    end
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Incremental decoding gives, after every token, the text of all tokens so far: byte-level BPE with
    /// characters split across tokens, and a Metaspace decoder that drops a leading space.
    #[test]
    fn incremental_decoding_equals_decoding_everything() {
        use memsteer_lm::tokenizer::Tokenizer;
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures");
        let bytes = Tokenizer::from_tokenizer_json(&root.join("corpus/tokenizer.json")).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let meta = dir.path().join("tokenizer.json");
        let vocab = serde_json::json!({"▁Hello": 0, "▁world": 1, "!": 2, "▁héllo": 3, "▁日本": 4});
        let t = serde_json::json!({"version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
            "normalizer": null, "pre_tokenizer": null, "post_processor": null,
            "decoder": {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": true},
            "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "!"}});
        std::fs::write(&meta, t.to_string()).unwrap();
        let meta = Tokenizer::from_tokenizer_json(&meta).unwrap();
        let cases: [(&Tokenizer, Vec<u32>); 2] = [
            (&bytes, bytes.encode("Naïve café — 日本語のテキスト, ünïcödé 🎉 end.").unwrap()),
            (&meta, vec![0, 1, 2, 3, 4, 2, 1]),
        ];
        for (tok, ids) in cases {
            let mut d = Detok::default();
            let mut multibyte_split = false;
            for k in 1..=ids.len() {
                let whole = tok.decode(&ids[..k]).unwrap();
                multibyte_split |= whole.ends_with('\u{FFFD}');
                assert_eq!(d.text(tok, &ids[..k]).unwrap(), whole, "after {k} tokens");
            }
            assert!(d.prefix > 0, "the window moved on");
            if std::ptr::eq(tok, &bytes) {
                assert!(multibyte_split, "the case should split a character across tokens");
            }
        }
    }

    #[test]
    fn text_that_may_start_a_stop_string_is_held_back() {
        let stop = vec!["\n\n".to_string(), "END".to_string()];
        assert_eq!(safe_end("hello", &stop), 5);
        assert_eq!(safe_end("hello\n", &stop), 5);
        assert_eq!(safe_end("hello EN", &stop), 6);
        assert_eq!(safe_end("hello E", &stop), 6);
        assert_eq!(safe_end("héllo\u{FFFD}", &stop), "héllo".len());
        assert_eq!(safe_end("a\u{FFFD}\u{FFFD}", &[]), 1);
        assert_eq!(floor_boundary("é", 1), 0);
    }
}
