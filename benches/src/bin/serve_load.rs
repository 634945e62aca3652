//! Load on `memsteer serve`: the same streamed completion requests sent by 1, 8 and 32 concurrent
//! clients (closed loop: each client sends its next request when the last one ends) to a server in
//! this process, on a Pythia-70M-shaped model (random f16 weights, a 50,304-word tokenizer) at
//! `--threads` threads. Reports throughput (generated tokens per second of wall time), time to first
//! token and the gap between tokens (p50/p99), and, at 8 clients, the cost of steering: every row
//! unsteered, half steered, every row steered (a rank-512 steer file at strength 4).
//!
//! `cargo run --release -p memsteer-benches --bin memsteer-serve-load -- [--threads 2] [--tokens 32]
//! [--requests 64] [--dir DIR] [--device cpu|cuda[:N]]` (a CUDA device needs the `cuda` feature).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use memsteer_panel::rng::SplitMix64;
use memsteer_serve::{Config, Server};
use memsteer_steer::Steer;
use serde_json::{Value, json};

/// One request's timings: when each token's text arrived, from the request's start.
struct Timed {
    tokens: usize,
    arrivals: Vec<Duration>,
}

fn agent() -> ureq::Agent {
    ureq::Agent::new_with_config(ureq::config::Config::builder().timeout_global(Some(Duration::from_secs(600))).build())
}

/// Sends one streamed completion and times its chunks.
fn request(agent: &ureq::Agent, url: &str, body: &Value) -> Timed {
    let start = Instant::now();
    let mut r = agent.post(url).header("Content-Type", "application/json").send(body.to_string()).expect("request");
    let reader = BufReader::new(r.body_mut().as_reader());
    let (mut arrivals, mut tokens) = (Vec::new(), 0);
    for line in reader.lines() {
        let line = line.expect("stream");
        let Some(data) = line.strip_prefix("data: ") else { continue };
        if data == "[DONE]" {
            break;
        }
        let v: Value = serde_json::from_str(data).expect("chunk");
        if v["choices"][0]["text"].as_str().is_some_and(|t| !t.is_empty()) {
            arrivals.push(start.elapsed());
        }
        if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
            tokens = n as usize;
        }
    }
    Timed { tokens, arrivals }
}

fn quantile(v: &mut [f64], q: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    v[((v.len() - 1) as f64 * q).round() as usize]
}

/// Runs `requests` requests from `clients` concurrent clients; request i is steered when `steered(i)`.
fn scenario(
    addr: &str,
    clients: usize,
    requests: usize,
    tokens: usize,
    steered: &(dyn Fn(usize) -> bool + Sync),
) -> String {
    let url = format!("http://{addr}/v1/completions");
    let body = |i: usize| {
        let prompt: Vec<String> = (0..16).map(|j| format!("w{}", (i * 131 + j * 17) % 50304)).collect();
        let mut b = json!({"prompt": prompt.join(" "), "max_tokens": tokens, "temperature": 1.0, "seed": i,
            "stream": true, "stream_options": {"include_usage": true}});
        if steered(i) {
            b["steer"] = json!([{"name": "style", "strength": 4.0}]);
        }
        b
    };
    let start = Instant::now();
    let results: Vec<Timed> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..clients)
            .map(|c| {
                let (url, body) = (&url, &body);
                s.spawn(move || {
                    let agent = agent();
                    (c..requests).step_by(clients).map(|i| request(&agent, url, &body(i))).collect::<Vec<_>>()
                })
            })
            .collect();
        handles.into_iter().flat_map(|h| h.join().expect("client")).collect()
    });
    let wall = start.elapsed().as_secs_f64();
    let generated: usize = results.iter().map(|t| t.tokens).sum();
    assert_eq!(generated, requests * tokens, "every request generates max_tokens tokens");
    let mut ttft: Vec<f64> = results.iter().filter_map(|t| t.arrivals.first()).map(|d| d.as_secs_f64() * 1e3).collect();
    let mut gaps: Vec<f64> =
        results.iter().flat_map(|t| t.arrivals.windows(2).map(|w| (w[1] - w[0]).as_secs_f64() * 1e3)).collect();
    format!(
        "{clients:>3} clients, {requests:>3} requests: {:>7.1} tok/s | TTFT p50 {:>7.1} ms p99 {:>7.1} ms | token gap p50 {:>6.1} ms p99 {:>6.1} ms | wall {wall:.1} s",
        generated as f64 / wall,
        quantile(&mut ttft, 0.5),
        quantile(&mut ttft, 0.99),
        quantile(&mut gaps, 0.5),
        quantile(&mut gaps, 0.99),
    )
}

/// The model, a 50,304-word tokenizer (`w0` … `w50303`, split on whitespace) and a rank-512 steer in `dir`.
fn prepare(dir: &Path) -> PathBuf {
    if !dir.join("model.safetensors").exists() {
        std::fs::create_dir_all(dir).expect("dir");
        memsteer_benches::write_pythia_70m(dir);
        memsteer_benches::write_word_tokenizer(dir, 50304).expect("tokenizer");
    }
    let steer = dir.join("style.safetensors");
    if !steer.exists() {
        memsteer_benches::write_random_steer(dir, &steer, 512, 0.01, 7).expect("steer");
    }
    steer
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let flag = |name: &str, default: &str| {
        args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned().unwrap_or(default.to_string())
    };
    let threads: usize = flag("--threads", "2").parse().expect("--threads");
    let device = memsteer_kernels::Device::parse(&flag("--device", "cpu")).expect("--device");
    let tokens: usize = flag("--tokens", "32").parse().expect("--tokens");
    let requests: usize = flag("--requests", "64").parse().expect("--requests");
    let dir = PathBuf::from(flag("--dir", &std::env::temp_dir().join("memsteer-serve-load").display().to_string()));
    let steer = prepare(&dir);
    let mut cfg = Config::new(dir.clone());
    cfg.port = 0;
    cfg.threads = Some(threads);
    cfg.max_batch = 32;
    cfg.device = device.clone();
    let cfg_steer = steer.clone();
    cfg.steers = vec![("style".into(), steer)];
    let server = Server::start(cfg).expect("server");
    let addr = server.addr().to_string();
    println!(
        "memsteer serve on {device:?}, Pythia-70M shape (6 × 512, vocabulary 50,304, f16 weights), {threads} threads, 16-token prompts, {tokens} new tokens, temperature 1"
    );
    // Warm-up: page the weights in.
    scenario(&addr, 1, 1, tokens, &|_| false);
    println!("one at a time and concurrent, unsteered:");
    for clients in [1, 8, 32] {
        let n = if clients == 1 { requests / 4 } else { requests };
        println!("  {}", scenario(&addr, clients, n, tokens, &|_| false));
    }
    println!("steering at 8 clients ({requests} requests), twice in turn:");
    for (label, f) in [
        ("unsteered   ", &(|_| false) as &(dyn Fn(usize) -> bool + Sync)),
        ("half steered", &|i| i % 2 == 0),
        ("all steered ", &|_| true),
    ]
    .repeat(2)
    {
        println!("  {label} {}", scenario(&addr, 8, requests, tokens, f));
    }
    server.shutdown().expect("shutdown");
    // The steers' share of a step, alone: 8 rows steered one by one, as the engine does.
    let steer = Steer::load(&cfg_steer).expect("steer");
    let strengths = steer.strengths(&[4.0]).expect("strengths");
    let mut rng = SplitMix64::new(3);
    let rows: Vec<Vec<f32>> = (0..8).map(|_| (0..steer.hidden_size()).map(|_| rng.normal() as f32).collect()).collect();
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().expect("pool");
    let reps = 200;
    let start = Instant::now();
    pool.install(|| {
        use rayon::prelude::*;
        for _ in 0..reps {
            let out: Vec<Vec<f32>> = rows.par_iter().map(|h| steer.project(h, &strengths).expect("project")).collect();
            std::hint::black_box(out);
        }
    });
    println!(
        "steering 8 rows alone (rank {}, labelled + dummy steer): {:.2} ms per step",
        steer.rank(),
        start.elapsed().as_secs_f64() * 1e3 / reps as f64
    );
}
