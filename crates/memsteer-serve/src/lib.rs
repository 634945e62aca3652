//! `memsteer serve`: an OpenAI-compatible HTTP server for steered generation.
//!
//! Requests choose their steers and strengths (`"steer": [{"name": …, "strength": …}]`), and rows with
//! different steers share every decoding step: the [`engine`] runs a continuous batch in which each
//! row keeps its own KV cache, steers, sampling settings and seeded generator. The HTTP side
//! ([`axum`] on [`tokio`]) checks requests ([`api`]), renders chat templates ([`chat`]), streams
//! server-sent events and exposes Prometheus [`metrics`].
#![deny(missing_docs)]

pub mod api;
pub mod chat;
pub mod cli;
pub mod engine;
mod http;
pub mod metrics;
pub mod model;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

/// What can go wrong starting or running the server.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The model, tokenizer, template or a steer could not be loaded.
    #[error("{0}")]
    Load(String),
    /// The address, the runtime or a thread.
    #[error("{0}")]
    Io(String),
}

/// How to start a server.
#[derive(Debug, Clone)]
pub struct Config {
    /// The model directory.
    pub model: PathBuf,
    /// Steers as `(name, file)`.
    pub steers: Vec<(String, PathBuf)>,
    /// The name `/v1/models` lists (default: the directory's name).
    pub served_name: Option<String>,
    /// Address to bind.
    pub host: String,
    /// Port (0: any free port).
    pub port: u16,
    /// Most rows in a decoding step.
    pub max_batch: usize,
    /// Most requests waiting for a row; more are answered 429.
    pub max_queue: usize,
    /// Most tokens one choice may generate.
    pub max_tokens: usize,
    /// When set, requests to `/v1/…` need `Authorization: Bearer KEY`.
    pub api_key: Option<String>,
    /// Largest request body, in bytes.
    pub max_body: usize,
    /// Seed of requests that give none.
    pub seed: u64,
    /// Threads of the decoding steps (default: all cores).
    pub threads: Option<usize>,
    /// Where decoding runs: the CPU, or (feature `cuda`) a CUDA device with the KV caches on it.
    pub device: memsteer_kernels::Device,
    /// Stop on SIGINT / SIGTERM (the command line); tests stop through [`Server::shutdown`].
    pub signals: bool,
}

impl Config {
    /// Defaults for the model in `model`: 127.0.0.1:8000, 32 rows, 256 waiting requests, 4,096
    /// tokens, 4 MiB bodies.
    pub fn new(model: PathBuf) -> Self {
        Self {
            model,
            steers: Vec::new(),
            served_name: None,
            host: "127.0.0.1".into(),
            port: 8000,
            max_batch: 32,
            max_queue: 256,
            max_tokens: 4096,
            api_key: None,
            max_body: 4 << 20,
            seed: 0,
            threads: None,
            device: memsteer_kernels::Device::Cpu,
            signals: false,
        }
    }
}

/// A running server.
#[derive(Debug)]
pub struct Server {
    addr: SocketAddr,
    served: Arc<model::Served>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<Result<(), ServeError>>>,
}

impl Server {
    /// Loads the model and steers, binds the address and starts serving on background threads;
    /// returns once it accepts connections.
    pub fn start(cfg: Config) -> Result<Self, ServeError> {
        if cfg.max_batch == 0 || cfg.max_tokens == 0 {
            return Err(ServeError::Load("--max-batch and --max-tokens must be at least 1".into()));
        }
        let served = Arc::new(model::Served::load_on(&cfg.model, &cfg.steers, cfg.served_name.clone(), &cfg.device)?);
        let mut pool = rayon::ThreadPoolBuilder::new().thread_name(|i| format!("memsteer-step-{i}"));
        if let Some(n) = cfg.threads {
            pool = pool.num_threads(n);
        }
        let pool = pool.build().map_err(|e| ServeError::Io(format!("starting the worker threads: {e}")))?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("memsteer-http")
            .enable_all()
            .build()
            .map_err(|e| ServeError::Io(format!("starting the HTTP runtime: {e}")))?;
        let addr_text = format!("{}:{}", cfg.host, cfg.port);
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind(&addr_text))
            .map_err(|e| ServeError::Io(format!("binding {addr_text}: {e}")))?;
        let addr = listener.local_addr().map_err(|e| ServeError::Io(format!("binding {addr_text}: {e}")))?;
        let metrics = Arc::new(metrics::Metrics::default());
        let (engine, engine_thread) =
            engine::Engine::start(served.clone(), (cfg.max_batch, cfg.max_queue), metrics.clone(), pool);
        let app = http::App {
            served: served.clone(),
            engine,
            metrics,
            limits: api::Limits { max_tokens: cfg.max_tokens, seed: cfg.seed },
            api_key: cfg.api_key.clone(),
            max_body: cfg.max_body,
            requests: Arc::default(),
        };
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let signals = cfg.signals;
        let thread = std::thread::Builder::new()
            .name("memsteer-serve".into())
            .spawn(move || {
                let result = runtime.block_on(async move {
                    let shutdown = async move {
                        if signals {
                            tokio::select! {
                                _ = stop_rx => {}
                                _ = http::signal() => {
                                    eprintln!(
                                        "memsteer serve: stopping after the requests in flight; a second Ctrl-C (or SIGTERM) exits now"
                                    );
                                    tokio::spawn(async {
                                        http::signal().await;
                                        eprintln!("memsteer serve: exiting without finishing the requests in flight");
                                        std::process::exit(130);
                                    });
                                }
                            }
                        } else {
                            let _ = stop_rx.await;
                        }
                    };
                    axum::serve(listener, http::router(app))
                        .with_graceful_shutdown(shutdown)
                        .await
                        .map_err(|e| ServeError::Io(format!("serving: {e}")))
                });
                // The router (and with it every engine handle) is gone: the engine finishes its rows
                // and stops.
                let joined = engine_thread.join().map_err(|_| ServeError::Io("the engine thread panicked".into()));
                result.and(joined)
            })
            .map_err(|e| ServeError::Io(format!("starting the server thread: {e}")))?;
        Ok(Self { addr, served, stop: Some(stop_tx), thread: Some(thread) })
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// What is served.
    pub fn served(&self) -> &model::Served {
        &self.served
    }

    /// Stops accepting connections, lets in-flight requests finish, and returns when it has stopped.
    pub fn shutdown(mut self) -> Result<(), ServeError> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.join()
    }

    /// Blocks until the server stops (on SIGINT or SIGTERM with [`Config::signals`]).
    pub fn wait(mut self) -> Result<(), ServeError> {
        self.join()
    }

    fn join(&mut self) -> Result<(), ServeError> {
        match self.thread.take() {
            Some(t) => t.join().map_err(|_| ServeError::Io("the server thread panicked".into()))?,
            None => Ok(()),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = self.join();
    }
}
