//! The server end to end: started on an ephemeral loopback port and driven by a real HTTP client.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::time::Duration;

use memsteer_lm::sample::SamplingConfig;
use memsteer_lm::tokenizer::Tokenizer;
use memsteer_panel::rng::{SplitMix64, hash_key};
use memsteer_serve::{Config, Server};
use memsteer_steer::generate::{SteerSet, steered_continuation};
use memsteer_steer::{Steer, SteerSpec};
use serde_json::{Value, json};

const TEMPLATE: &str = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}";

/// A tiny GPT-2 with a tokenizer and a chat template, in a fresh directory.
fn model_dir(chat: bool) -> tempfile::TempDir {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/lm/tiny-gpt2-tokenizer");
    let dir = tempfile::tempdir().unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(src.join(f), dir.path().join(f)).unwrap();
    }
    let mut cfg = json!({"eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>"});
    if chat {
        cfg["chat_template"] = TEMPLATE.into();
    }
    std::fs::write(dir.path().join("tokenizer_config.json"), cfg.to_string()).unwrap();
    dir
}

/// A random steer (one labelled steer and a dummy) for the model in `dir`, saved as `dir/name.safetensors`.
fn steer_file(dir: &Path, name: &str, seed: u64, fingerprint_of: Option<&Path>) -> PathBuf {
    let model = memsteer_lm::Model::load(fingerprint_of.unwrap_or(dir)).unwrap();
    let dec = model.decoder();
    let (d, rank) = (dec.dim(), 3);
    let mut rng = SplitMix64::new(seed);
    let p: Vec<f32> = (0..2 * 2 * d * rank).map(|_| rng.normal() as f32).collect();
    let spec = SteerSpec {
        num_steers: 2,
        hidden_size: d,
        rank,
        vocab_size: dec.vocab(),
        epsilon: 0.05,
        embedding_fingerprint: memsteer_steer::embedding_fingerprint(dec.output_embedding()),
        labels: vec![name.into()],
    };
    let steer = Steer::new(spec, p[..2 * d * rank].to_vec(), p[2 * d * rank..].to_vec(), json!({})).unwrap();
    let path = dir.join(format!("{name}.safetensors"));
    steer.save(&path).unwrap();
    path
}

fn start(dir: &Path, tweak: impl FnOnce(&mut Config)) -> Server {
    let mut cfg = Config::new(dir.to_path_buf());
    cfg.port = 0;
    cfg.threads = Some(2);
    tweak(&mut cfg);
    Server::start(cfg).unwrap()
}

fn agent() -> ureq::Agent {
    ureq::Agent::new_with_config(
        ureq::config::Config::builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(120)))
            .build(),
    )
}

/// Posts `body` (a JSON value, or raw text) and returns the status and the parsed (or raw) answer.
fn post(server: &Server, path: &str, body: &str) -> (u16, Value) {
    let url = format!("http://{}{path}", server.addr());
    let mut r = agent().post(&url).header("Content-Type", "application/json").send(body).unwrap();
    let status = r.status().as_u16();
    let text = r.body_mut().read_to_string().unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

fn get(server: &Server, path: &str) -> (u16, String) {
    let url = format!("http://{}{path}", server.addr());
    let mut r = agent().get(&url).call().unwrap();
    (r.status().as_u16(), r.body_mut().read_to_string().unwrap())
}

/// The events of a streamed request, as JSON values, and whether it ended with `[DONE]`.
fn post_stream(server: &Server, path: &str, body: &Value) -> (Vec<Value>, bool) {
    let url = format!("http://{}{path}", server.addr());
    let r = agent().post(&url).header("Content-Type", "application/json").send(body.to_string()).unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(r.headers().get("content-type").unwrap(), "text/event-stream");
    let reader = BufReader::new(r.into_body().into_reader());
    let (mut events, mut done) = (Vec::new(), false);
    for line in reader.lines() {
        let line = line.unwrap();
        let Some(data) = line.strip_prefix("data: ") else { continue };
        if data == "[DONE]" {
            done = true;
        } else {
            assert!(!done, "an event after [DONE]");
            events.push(serde_json::from_str(data).unwrap());
        }
    }
    (events, done)
}

/// The text a streamed completion's events add up to, per choice.
fn streamed_texts(events: &[Value], choices: usize, chat: bool) -> Vec<String> {
    let mut out = vec![String::new(); choices];
    for e in events {
        for c in e["choices"].as_array().unwrap() {
            let i = c["index"].as_u64().unwrap() as usize;
            let t = if chat { c["delta"]["content"].as_str() } else { c["text"].as_str() };
            out[i].push_str(t.unwrap_or(""));
        }
    }
    out
}

/// What `steer generate` (its per-sample cached decoding) gives for `prompt` with the steer at
/// `strength`, decoded.
fn reference(
    dir: &Path,
    steer: Option<&Path>,
    prompt: &str,
    strength: f32,
    (max, temperature, seed): (usize, f32, u64),
) -> String {
    let model = memsteer_lm::Model::load(dir).unwrap();
    let tok = Tokenizer::from_dir(dir).unwrap();
    let set = match steer {
        Some(steer) => {
            let s = Steer::load(steer).unwrap();
            let strengths = s.strengths(&[strength]).unwrap();
            SteerSet::new(vec![(s, strengths)])
        }
        None => SteerSet::new(Vec::new()),
    };
    let ids = tok.encode(prompt).unwrap();
    let cfg = SamplingConfig { temperature, top_k: None, top_p: None };
    // The server seeds choice j of prompt p as `steer generate` seeds sample j of prompt id p.
    let row_seed = hash_key(seed, "0\u{0}0".as_bytes());
    let out = steered_continuation(model.decoder(), &set, &ids, max, &cfg, row_seed).unwrap();
    tok.decode(&out).unwrap()
}

#[test]
fn completions_equal_steer_generate_at_every_strength() {
    let dir = model_dir(false);
    let steer = steer_file(dir.path(), "style", 1, None);
    let server = start(dir.path(), |c| c.steers = vec![("style".into(), steer.clone())]);
    let mut seen = Vec::new();
    for strength in [-40.0f32, 0.0, 40.0] {
        for (temperature, seed) in [(0.0f32, 0u64), (1.0, 7)] {
            let body = json!({"prompt": "The cat sat", "max_tokens": 12, "temperature": temperature, "seed": seed,
                              "steer": [{"name": "style", "strength": strength}], "ignore_eos": true});
            let (status, v) = post(&server, "/v1/completions", &body.to_string());
            assert_eq!(status, 200, "{v}");
            let text = v["choices"][0]["text"].as_str().unwrap().to_string();
            let want = reference(dir.path(), Some(&steer), "The cat sat", strength, (12, temperature, seed));
            assert_eq!(text, want, "strength {strength}, temperature {temperature}");
            assert_eq!(v["choices"][0]["finish_reason"], "length");
            assert_eq!(v["usage"]["completion_tokens"], 12);
            assert_eq!(v["object"], "text_completion");
            seen.push(text);
        }
    }
    // The dial changes the text (the comparison is not between constants).
    assert!(seen[0] != seen[2] || seen[2] != seen[4], "{seen:?}");
    // Without the field: the base model (strength 0 keeps the dummy steer, so it is not the base).
    let body = r#"{"prompt": "The cat sat", "max_tokens": 12, "temperature": 0, "ignore_eos": true}"#;
    let (_, base) = post(&server, "/v1/completions", body);
    let want = reference(dir.path(), None, "The cat sat", 0.0, (12, 0.0, 0));
    assert_eq!(base["choices"][0]["text"].as_str().unwrap(), want);
    // A strength beyond the bound is refused, not turned into infinities.
    let body = r#"{"prompt": "x", "steer": [{"name": "style", "strength": 1e30}]}"#;
    let (status, v) = post(&server, "/v1/completions", body);
    assert_eq!((status, v["error"]["param"].as_str()), (400, Some("steer[0].strength")), "{v}");
    server.shutdown().unwrap();
}

#[test]
fn many_concurrent_requests_each_get_what_they_get_alone() {
    let dir = model_dir(true);
    let steer = steer_file(dir.path(), "style", 2, None);
    let server = start(dir.path(), |c| {
        c.steers = vec![("style".into(), steer.clone())];
        c.max_batch = 16;
    });
    let requests: Vec<(Value, bool, bool)> = (0..64)
        .map(|i| {
            let strength = [-30.0, -5.0, 0.0, 5.0, 30.0][i % 5];
            let chat = i % 7 == 3;
            let mut body = json!({"max_tokens": 3 + (i * 5) % 17, "temperature": if i % 3 == 0 { 0.0 } else { 0.9 },
                                  "seed": i, "n": 1 + i % 2, "ignore_eos": true,
                                  "steer": [{"name": "style", "strength": strength}]});
            if chat {
                body["messages"] = json!([{"role": "user", "content": format!("Question {i}")}]);
            } else {
                body["prompt"] = json!(format!("Prompt number {i} says"));
            }
            (body, i % 2 == 0, chat)
        })
        .collect();
    let run = |(body, stream, chat): &(Value, bool, bool)| -> Vec<String> {
        let path = if *chat { "/v1/chat/completions" } else { "/v1/completions" };
        let n = body["n"].as_u64().unwrap() as usize;
        if *stream {
            let mut b = body.clone();
            b["stream"] = true.into();
            let (events, done) = post_stream(&server, path, &b);
            assert!(done);
            streamed_texts(&events, n, *chat)
        } else {
            let (status, v) = post(&server, path, &body.to_string());
            assert_eq!(status, 200, "{v}");
            (0..n)
                .map(|i| {
                    let c = &v["choices"][i];
                    if *chat { c["message"]["content"].as_str() } else { c["text"].as_str() }.unwrap().to_string()
                })
                .collect()
        }
    };
    let alone: Vec<Vec<String>> = requests.iter().map(run).collect();
    let running = std::sync::atomic::AtomicBool::new(true);
    let mut kv_seen = 0u64;
    let together: Vec<Vec<String>> = std::thread::scope(|s| {
        // While the requests run, the KV-cache gauge shows the rows' caches.
        let monitor = s.spawn(|| {
            let mut most = 0u64;
            while running.load(std::sync::atomic::Ordering::Relaxed) {
                let (_, m) = get(&server, "/metrics");
                let kv = m.lines().find_map(|l| l.strip_prefix("memsteer_kv_cache_bytes ")?.parse::<u64>().ok());
                most = most.max(kv.unwrap_or(0));
                std::thread::sleep(Duration::from_millis(2));
            }
            most
        });
        let handles: Vec<_> = requests.iter().map(|r| s.spawn(move || run(r))).collect();
        let out = handles.into_iter().map(|h| h.join().unwrap()).collect();
        running.store(false, std::sync::atomic::Ordering::Relaxed);
        kv_seen = monitor.join().unwrap();
        out
    });
    assert!(kv_seen > 0, "the KV-cache gauge never showed a running row");
    assert_eq!(together, alone);
    let distinct: std::collections::HashSet<&String> = alone.iter().flatten().collect();
    assert!(distinct.len() > 40, "only {} distinct texts", distinct.len());
    // The batch really held several rows at once.
    let (_, metrics) = get(&server, "/metrics");
    let batched = metrics
        .lines()
        .find(|l| l.starts_with("memsteer_batch_rows_bucket{le=\"1\"}"))
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap();
    let steps = metrics
        .lines()
        .find(|l| l.starts_with("memsteer_batch_rows_count"))
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap();
    assert!(steps > batched, "every step had one row: {metrics}");
    // Every row is gone, and with it every KV cache.
    assert!(metrics.lines().any(|l| l == "memsteer_kv_cache_bytes 0"), "{metrics}");
    server.shutdown().unwrap();
}

#[test]
fn streaming_chat_and_stop_strings_follow_openai() {
    let dir = model_dir(true);
    let server = start(dir.path(), |_| {});
    // Chat through the template, streamed and not, with usage.
    let body = json!({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
                      "max_tokens": 10, "temperature": 0, "ignore_eos": true});
    let (status, whole) = post(&server, "/v1/chat/completions", &body.to_string());
    assert_eq!(status, 200, "{whole}");
    assert_eq!(whole["object"], "chat.completion");
    assert_eq!(whole["choices"][0]["message"]["role"], "assistant");
    let text = whole["choices"][0]["message"]["content"].as_str().unwrap().to_string();
    let tok = Tokenizer::from_dir(dir.path()).unwrap();
    let prompt = tok.encode_plain("<|system|>Be brief.\n<|user|>Hi\n<|assistant|>").unwrap();
    assert_eq!(whole["usage"]["prompt_tokens"], prompt.len());
    let mut s = body.clone();
    s["stream"] = true.into();
    s["stream_options"] = json!({"include_usage": true});
    let (events, done) = post_stream(&server, "/v1/chat/completions", &s);
    assert!(done);
    assert_eq!(events[0]["choices"][0]["delta"], json!({"role": "assistant", "content": ""}));
    assert!(events.iter().all(|e| e["object"] == "chat.completion.chunk"));
    assert_eq!(streamed_texts(&events, 1, true), vec![text.clone()]);
    let last = events.last().unwrap();
    assert_eq!((last["choices"].as_array().unwrap().len(), &last["usage"]["completion_tokens"]), (0, &json!(10)));
    // A stop string: the text ends before it, finish_reason "stop"; streamed the same.
    let full = {
        let (_, v) = post(&server, "/v1/completions", r#"{"prompt": "Once upon", "max_tokens": 20, "temperature": 0}"#);
        v["choices"][0]["text"].as_str().unwrap().to_string()
    };
    let cut = full.char_indices().nth(full.chars().count() / 2).unwrap().0;
    let stop: String = full[cut..].chars().take(3).collect();
    let first = full.find(&stop).unwrap();
    let body = json!({"prompt": "Once upon", "max_tokens": 20, "temperature": 0, "stop": [stop, "\u{1}never"]});
    let (_, v) = post(&server, "/v1/completions", &body.to_string());
    assert_eq!(v["choices"][0]["text"].as_str().unwrap(), &full[..first], "stop {stop:?} in {full:?}");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    let mut b = body.clone();
    b["stream"] = true.into();
    let (events, _) = post_stream(&server, "/v1/completions", &b);
    assert_eq!(streamed_texts(&events, 1, false), vec![full[..first].to_string()]);
    assert_eq!(events.last().unwrap()["choices"][0]["finish_reason"], "stop");
    // Log-probabilities: one per token, the top alternatives sorted, the chosen token's at the top
    // when greedy.
    let (_, v) = post(
        &server,
        "/v1/completions",
        r#"{"prompt": "Once upon", "max_tokens": 5, "temperature": 0, "logprobs": 3, "ignore_eos": true}"#,
    );
    let lp = &v["choices"][0]["logprobs"];
    assert_eq!(lp["tokens"].as_array().unwrap().len(), 5);
    for (t, top) in lp["token_logprobs"].as_array().unwrap().iter().zip(lp["top_logprobs"].as_array().unwrap()) {
        let best = top.as_object().unwrap().values().map(|x| x.as_f64().unwrap()).fold(f64::MIN, f64::max);
        assert!((t.as_f64().unwrap() - best).abs() < 1e-6 && best < 0.0);
    }
    // Streamed, the chunks' text offsets continue one another as in the whole response.
    let body = json!({"prompt": "Once upon", "max_tokens": 5, "temperature": 0, "logprobs": 3, "ignore_eos": true,
                      "stream": true});
    let (events, _) = post_stream(&server, "/v1/completions", &body);
    let streamed: Vec<Value> = events
        .iter()
        .filter_map(|e| e["choices"][0]["logprobs"]["text_offset"].as_array().map(|a| a[0].clone()))
        .collect();
    assert_eq!(&streamed, lp["text_offset"].as_array().unwrap());
    assert!(streamed.windows(2).all(|w| w[0].as_u64() < w[1].as_u64()), "{streamed:?}");
    let (_, v) = post(
        &server,
        "/v1/chat/completions",
        r#"{"messages": [{"role": "user", "content": "x"}], "max_tokens": 2, "logprobs": true, "top_logprobs": 2}"#,
    );
    assert_eq!(v["choices"][0]["logprobs"]["content"][0]["top_logprobs"].as_array().unwrap().len(), 2);
    server.shutdown().unwrap();
}

#[test]
fn end_of_sequence_tokens_come_from_the_files() {
    let dir = model_dir(false);
    // The greedy continuation's fourth token becomes the end-of-sequence token.
    let model = memsteer_lm::Model::load(dir.path()).unwrap();
    let tok = Tokenizer::from_dir(dir.path()).unwrap();
    let ids = tok.encode("Hello there").unwrap();
    let cfg = SamplingConfig { temperature: 0.0, top_k: None, top_p: None };
    let out = steered_continuation(model.decoder(), &SteerSet::default(), &ids, 8, &cfg, 0).unwrap();
    let k = out.iter().position(|t| *t == out[3]).unwrap();
    std::fs::write(dir.path().join("generation_config.json"), json!({"eos_token_id": [out[3]]}).to_string()).unwrap();
    let server = start(dir.path(), |_| {});
    let (_, v) = post(&server, "/v1/completions", r#"{"prompt": "Hello there", "max_tokens": 8, "temperature": 0}"#);
    assert_eq!(v["choices"][0]["text"].as_str().unwrap(), tok.decode(&out[..k]).unwrap());
    assert_eq!((&v["choices"][0]["finish_reason"], &v["usage"]["completion_tokens"]), (&json!("stop"), &json!(k + 1)));
    let (_, v) = post(
        &server,
        "/v1/completions",
        r#"{"prompt": "Hello there", "max_tokens": 8, "temperature": 0, "ignore_eos": true}"#,
    );
    assert_eq!(v["choices"][0]["text"].as_str().unwrap(), tok.decode(&out).unwrap());
    server.shutdown().unwrap();
}

fn error_of(v: &Value) -> (&str, Option<&str>) {
    (v["error"]["message"].as_str().unwrap_or_else(|| panic!("no error message in {v}")), v["error"]["param"].as_str())
}

#[test]
fn bad_requests_get_openai_errors_and_never_hurt_the_server() {
    let dir = model_dir(false);
    let steer = steer_file(dir.path(), "formal", 3, None);
    let server = start(dir.path(), |c| {
        c.steers = vec![("formal".into(), steer.clone())];
        c.max_tokens = 40;
        c.max_body = 2000;
    });
    let cases: Vec<(&str, u16, &str, Option<&str>)> = vec![
        ("{", 400, "not valid JSON", None),
        ("[1, 2]", 400, "must be a JSON object", None),
        (r#"{"prompt": "x", "temperature": "hot"}"#, 400, "temperature", Some("temperature")),
        (r#"{"prompt": "x", "max_tokens": -1}"#, 400, "max_tokens", Some("max_tokens")),
        (r#"{"prompt": "x", "max_tokens": 0}"#, 400, "at least 1", Some("max_tokens")),
        (r#"{"prompt": "x", "max_tokens": 41}"#, 400, "--max-tokens", Some("max_tokens")),
        (r#"{"prompt": "x", "max_tokens": 40}"#, 200, "", None),
        (r#"{"prompt": "x", "temperature": 2.5}"#, 400, "[0, 2]", Some("temperature")),
        (r#"{"prompt": "x", "top_p": 0}"#, 400, "(0, 1]", Some("top_p")),
        (r#"{"prompt": "x", "top_k": -3}"#, 400, "top_k", Some("top_k")),
        (r#"{"prompt": "x", "n": 0}"#, 400, "`n`", Some("n")),
        (r#"{"prompt": "x", "n": 500}"#, 400, "`n`", Some("n")),
        (
            r#"{"prompt": "x", "frobnicate": 1}"#,
            400,
            "Unrecognized request argument supplied: frobnicate",
            Some("frobnicate"),
        ),
        (r#"{"prompt": "x", "presence_penalty": 0.5}"#, 400, "not supported", Some("presence_penalty")),
        (r#"{"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}"#, 400, "at most 4", Some("stop")),
        (r#"{"prompt": "x", "stop": [""]}"#, 400, "non-empty", Some("stop")),
        (r#"{"prompt": "x", "seed": 1.5}"#, 400, "integer", Some("seed")),
        (r#"{"prompt": "x", "logprobs": 9}"#, 400, "0–5", Some("logprobs")),
        (r#"{"prompt": "x", "echo": true}"#, 400, "echo", Some("echo")),
        (r#"{"prompt": ""}"#, 400, "empty", Some("prompt")),
        (r#"{"prompt": []}"#, 400, "empty", Some("prompt")),
        (r#"{"prompt": [[]]}"#, 400, "no tokens", Some("prompt")),
        (r#"{"prompt": {"a": 1}}"#, 400, "expected a string", Some("prompt")),
        (r#"{"prompt": [1, "a"]}"#, 400, "expected a string", Some("prompt")),
        (r#"{"prompt": [99999]}"#, 400, "outside the model's vocabulary", Some("prompt")),
        (r#"{"prompt": [1, 2], "max_tokens": 40}"#, 200, "", None),
        (r#"{"model": "gpt-4", "prompt": "x"}"#, 404, "does not exist", Some("model")),
        (
            r#"{"prompt": "x", "steer": [{"name": "casual", "strength": 1}]}"#,
            400,
            "loaded: formal",
            Some("steer[0].name"),
        ),
        (r#"{"prompt": "x", "steer": [{"name": "formal"}]}"#, 400, "strength", Some("steer[0]")),
        (r#"{"prompt": "x", "steer": [{"name": "formal", "strength": 1, "x": 2}]}"#, 400, "x", Some("steer[0].x")),
    ];
    for (body, status, needle, param) in &cases {
        let (got, v) = post(&server, "/v1/completions", body);
        assert_eq!(got, *status, "{body}: {v}");
        if *status != 200 {
            let (message, p) = error_of(&v);
            assert!(message.contains(needle), "{body}: {message}");
            assert_eq!(p, *param, "{body}: {v}");
            assert!(v["error"]["type"].is_string(), "{v}");
        }
    }
    // A prompt and max_tokens beyond the context (64 positions).
    let long: Vec<u32> = vec![5; 60];
    let (got, v) = post(&server, "/v1/completions", &json!({"prompt": long, "max_tokens": 6}).to_string());
    assert_eq!(got, 400);
    assert!(error_of(&v).0.contains("exceed the model's context of 64"), "{v}");
    let (got, _) = post(&server, "/v1/completions", &json!({"prompt": long, "max_tokens": 5}).to_string());
    assert_eq!(got, 200);
    // Oversized body; chat without a template; unknown endpoint.
    let (got, v) = post(&server, "/v1/completions", &format!(r#"{{"prompt": "{}"}}"#, "a".repeat(3000)));
    assert_eq!((got, error_of(&v).0.contains("larger than 2000 bytes")), (413, true), "{v}");
    let (got, v) = post(&server, "/v1/chat/completions", r#"{"messages": [{"role": "user", "content": "x"}]}"#);
    assert_eq!(got, 400);
    assert!(error_of(&v).0.contains("no chat template"), "{v}");
    let (got, _) = post(&server, "/v2/anything", "{}");
    assert_eq!(got, 404);
    // A bounded fuzz: mutated and random bodies, each a 4xx or a 200, and the server keeps answering.
    let mut rng = SplitMix64::new(11);
    let seeds: Vec<String> = cases.iter().map(|c| c.0.to_string()).collect();
    for i in 0..300 {
        let mut bytes = seeds[i % seeds.len()].clone().into_bytes();
        for _ in 0..1 + rng.below(4) {
            let at = rng.below(bytes.len().max(1) as u64) as usize;
            match rng.below(3) {
                0 if !bytes.is_empty() => {
                    bytes.remove(at.min(bytes.len() - 1));
                }
                1 => bytes.insert(at.min(bytes.len()), b"{}[]\",:0-9e.x\\\xff"[rng.below(15) as usize]),
                _ => bytes.truncate(at),
            }
        }
        let url = format!("http://{}/v1/completions", server.addr());
        let mut r = agent().post(&url).header("Content-Type", "application/json").send(&bytes[..]).unwrap();
        let status = r.status().as_u16();
        let text = r.body_mut().read_to_string().unwrap();
        assert!(
            status == 200 || (400..500).contains(&status),
            "{status} for {:?}: {text}",
            String::from_utf8_lossy(&bytes)
        );
        if status != 200 {
            let v: Value = serde_json::from_str(&text).unwrap();
            assert!(v["error"]["message"].is_string());
        }
    }
    let (status, health) = get(&server, "/health");
    assert_eq!((status, health.as_str()), (200, "ok"));
    let (status, models) = get(&server, "/v1/models");
    let models: Value = serde_json::from_str(&models).unwrap();
    assert_eq!(status, 200);
    assert_eq!(models["data"][0]["steers"][0]["name"], "formal");
    assert_eq!(models["data"][0]["id"].as_str().unwrap(), server.served().name);
    server.shutdown().unwrap();
}

#[test]
fn keys_queues_and_start_up_errors() {
    let dir = model_dir(false);
    // --api-key: /v1 needs the bearer token; health does not.
    let server = start(dir.path(), |c| c.api_key = Some("sekret".into()));
    let url = format!("http://{}/v1/completions", server.addr());
    let body = r#"{"prompt": "x", "max_tokens": 2}"#;
    let r = agent().post(&url).send(body).unwrap();
    assert_eq!(r.status().as_u16(), 401);
    let r = agent().post(&url).header("Authorization", "Bearer wrong").send(body).unwrap();
    assert_eq!(r.status().as_u16(), 401);
    let r = agent().post(&url).header("Authorization", "Bearer sekret").send(body).unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(get(&server, "/health").0, 200);
    server.shutdown().unwrap();
    // No room in the queue: 429 with Retry-After.
    let server = start(dir.path(), |c| c.max_queue = 0);
    let r = agent().post(format!("http://{}/v1/completions", server.addr())).send(body).unwrap();
    assert_eq!(r.status().as_u16(), 429);
    assert_eq!(r.headers().get("retry-after").unwrap(), "1");
    server.shutdown().unwrap();
    // A steer made for another model is refused at start-up, naming the file.
    let other = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/lm/tiny-gpt2-f32");
    let foreign = steer_file(dir.path(), "foreign", 4, Some(&other));
    let mut cfg = Config::new(dir.path().to_path_buf());
    cfg.port = 0;
    cfg.steers = vec![("foreign".into(), foreign.clone())];
    let err = Server::start(cfg).unwrap_err().to_string();
    assert!(err.contains("foreign.safetensors") && err.contains("--steer foreign="), "{err}");
    // A model without a tokenizer.
    let mut cfg = Config::new(other);
    cfg.port = 0;
    let err = Server::start(cfg).unwrap_err().to_string();
    assert!(err.contains("no tokenizer"), "{err}");
}

#[test]
fn a_client_that_goes_away_frees_its_row_and_shutdown_finishes_requests() {
    let dir = model_dir(false);
    let server = start(dir.path(), |c| c.max_batch = 2);
    let addr = server.addr();
    // A long streamed request whose client reads one event and hangs up.
    {
        let body = json!({"prompt": "x", "max_tokens": 60, "stream": true, "ignore_eos": true});
        let r = agent().post(format!("http://{addr}/v1/completions")).send(body.to_string()).unwrap();
        let mut reader = r.into_body().into_reader();
        let mut buf = [0u8; 64];
        let _ = reader.read(&mut buf).unwrap();
    }
    let counter = |name: &str| {
        let (_, m) = get(&server, "/metrics");
        m.lines().find(|l| l.starts_with(name)).and_then(|l| l.split(' ').nth(1)?.parse::<u64>().ok()).unwrap_or(0)
    };
    let cancelled = (0..200).find_map(|_| {
        std::thread::sleep(Duration::from_millis(20));
        let n = counter("memsteer_cancelled_rows_total");
        (n > 0).then_some(n)
    });
    assert_eq!(cancelled, Some(1));
    let accepted = counter("memsteer_prompt_tokens_total");
    // Shutdown while a request runs: it finishes with all its tokens.
    let pending = std::thread::spawn(move || {
        let body = json!({"prompt": "y", "max_tokens": 60, "ignore_eos": true});
        let mut r = agent().post(format!("http://{addr}/v1/completions")).send(body.to_string()).unwrap();
        let v: Value = serde_json::from_str(&r.body_mut().read_to_string().unwrap()).unwrap();
        v["usage"]["completion_tokens"].as_u64()
    });
    // Shut down once the request is in (its prompt counted).
    assert!((0..500).any(|_| {
        std::thread::sleep(Duration::from_millis(10));
        counter("memsteer_prompt_tokens_total") > accepted
    }));
    server.shutdown().unwrap();
    assert_eq!(pending.join().unwrap(), Some(60));
    assert!(std::net::TcpStream::connect(addr).is_err(), "still accepting after shutdown");
}

#[test]
fn ids_the_tokenizer_cannot_decode_are_never_sampled() {
    // A model of 1,256 ids whose tokenizer knows ten words (as Pythia pads its embedding past its
    // tokenizer): sampling at temperature 1 would almost always draw an unknown id.
    let dir = model_dir(false);
    let vocab: serde_json::Map<String, Value> = (0..10).map(|i| (format!("w{i}"), json!(i))).collect();
    let tok = json!({"version": "1.0", "truncation": null, "padding": null, "added_tokens": [], "normalizer": null,
        "pre_tokenizer": {"type": "WhitespaceSplit"}, "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "w0"}});
    std::fs::write(dir.path().join("tokenizer.json"), tok.to_string()).unwrap();
    std::fs::write(dir.path().join("tokenizer_config.json"), "{}").unwrap();
    let server = start(dir.path(), |_| {});
    let body = r#"{"prompt": "w1 w2", "max_tokens": 30, "temperature": 1.5, "seed": 3, "n": 4}"#;
    let (status, v) = post(&server, "/v1/completions", body);
    assert_eq!(status, 200, "{v}");
    for c in v["choices"].as_array().unwrap() {
        let words: Vec<&str> = c["text"].as_str().unwrap().split_whitespace().collect();
        assert_eq!(words.len(), 30, "{c}");
        assert!(words.iter().all(|w| w.len() == 2 && w.starts_with('w')), "{c}");
    }
    server.shutdown().unwrap();
}
