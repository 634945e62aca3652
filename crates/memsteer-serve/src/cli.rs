//! The command line of `memsteer serve` (the `memsteer` binary embeds [`ServeArgs`] as a subcommand).

use std::path::PathBuf;

use anyhow::{Context, Result, bail, ensure};
use clap::Args;

/// Arguments of `memsteer serve`.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// The model (a Hugging Face model directory with its tokenizer).
    #[arg(long, value_name = "DIR")]
    pub model: PathBuf,
    /// A steer file under the name requests use (`"steer": [{"name": NAME, "strength": S}]`); repeatable.
    #[arg(long = "steer", value_name = "NAME=FILE")]
    pub steers: Vec<String>,
    /// Address to bind (loopback by default; another address exposes the server to the network).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port (0: any free port, printed at start).
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// Where decoding runs: cpu, or cuda / cuda:N (builds with the `cuda` feature; the KV caches live on the device).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Most rows (choices) in one decoding step.
    #[arg(long, default_value_t = 32)]
    pub max_batch: usize,
    /// Most requests waiting for a row; beyond it requests get 429 with Retry-After.
    #[arg(long, default_value_t = 256)]
    pub max_queue: usize,
    /// Most tokens one choice may generate.
    #[arg(long, default_value_t = 4096)]
    pub max_tokens: usize,
    /// Require `Authorization: Bearer KEY` on /v1 endpoints (default: the MEMSTEER_API_KEY variable, if set).
    #[arg(long, value_name = "KEY", env = "MEMSTEER_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// The model name /v1/models lists and requests give (default: the directory's name).
    #[arg(long, value_name = "NAME")]
    pub served_model_name: Option<String>,
    /// Largest request body in bytes.
    #[arg(long, default_value_t = 4 << 20)]
    pub max_body_bytes: usize,
    /// Seed of requests that give none (requests with a `seed` always give the same text).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

/// Splits `NAME=FILE`.
fn parse_steer(spec: &str) -> Result<(String, PathBuf)> {
    match spec.split_once('=') {
        Some((name, file)) if !name.is_empty() && !file.is_empty() => Ok((name.to_string(), PathBuf::from(file))),
        _ => bail!("--steer {spec:?}: expected NAME=FILE, e.g. --steer sentiment=steers/sentiment.safetensors"),
    }
}

/// The server's configuration from the arguments (`threads`: the global `--threads`).
pub fn config(a: &ServeArgs, threads: Option<usize>) -> Result<crate::Config> {
    let device = memsteer_kernels::Device::parse(&a.device).with_context(|| format!("--device {}", a.device))?;
    ensure!(a.max_batch >= 1, "--max-batch must be at least 1");
    ensure!(a.max_tokens >= 1, "--max-tokens must be at least 1");
    let mut cfg = crate::Config::new(a.model.clone());
    cfg.steers = a.steers.iter().map(|s| parse_steer(s)).collect::<Result<_>>()?;
    cfg.served_name = a.served_model_name.clone();
    cfg.host = a.host.clone();
    cfg.port = a.port;
    cfg.max_batch = a.max_batch;
    cfg.max_queue = a.max_queue;
    cfg.max_tokens = a.max_tokens;
    cfg.api_key = a.api_key.clone().filter(|k| !k.is_empty());
    cfg.max_body = a.max_body_bytes;
    cfg.seed = a.seed;
    cfg.threads = threads;
    cfg.device = device;
    cfg.signals = true;
    Ok(cfg)
}

/// Runs `memsteer serve` until SIGINT or SIGTERM, then lets in-flight requests finish.
pub fn run(a: &ServeArgs, threads: Option<usize>) -> Result<()> {
    let server = crate::Server::start(config(a, threads)?)?;
    let served = server.served();
    let steers: Vec<&str> = served.steers.iter().map(|s| s.name.as_str()).collect();
    eprintln!(
        "memsteer serve: {} on http://{} (steers: {}; chat template: {}); Ctrl-C stops after in-flight requests",
        served.name,
        server.addr(),
        if steers.is_empty() { "none".to_string() } else { steers.join(", ") },
        if served.chat.is_some() { "yes" } else { "no" },
    );
    server.wait()?;
    eprintln!("memsteer serve: stopped");
    Ok(())
}
