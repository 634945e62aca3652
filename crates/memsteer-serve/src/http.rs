//! The HTTP side: routes, authentication, body limits, JSON answers and server-sent events.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::Response;
use axum::routing::{get, post};
use serde_json::{Value, json};
use tokio::sync::mpsc::UnboundedReceiver;

use crate::api::{self, ApiError, ChatRequest, CompletionRequest, Limits, Plan};
use crate::engine::{Engine, Event, Finish, Job, TokenLogprob};
use crate::metrics::Metrics;
use crate::model::Served;

/// What every handler shares.
#[derive(Debug, Clone)]
pub(crate) struct App {
    pub served: Arc<Served>,
    pub engine: Engine,
    pub metrics: Arc<Metrics>,
    pub limits: Limits,
    pub api_key: Option<String>,
    pub max_body: usize,
    /// Requests accepted so far (names them and seeds those without a seed).
    pub requests: Arc<AtomicU64>,
}

pub(crate) fn router(app: App) -> Router {
    Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .with_state(app)
}

/// SIGINT or SIGTERM.
pub(crate) async fn signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}

fn json_response(status: u16, body: &Value) -> Response {
    let mut r = Response::new(Body::from(body.to_string()));
    *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

fn error_response(e: &ApiError) -> Response {
    let mut r = json_response(e.status, &e.body());
    if e.status == 429 {
        r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    if e.status == 401 {
        r.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    r
}

fn respond(metrics: &Metrics, endpoint: &str, r: Result<Response, ApiError>) -> Response {
    let response = match r {
        Ok(r) => r,
        Err(e) => error_response(&e),
    };
    metrics.request(endpoint, response.status().as_u16());
    response
}

fn authorize(app: &App, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(key) = &app.api_key else { return Ok(()) };
    let given =
        headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    if given.map(str::trim) == Some(key.as_str()) {
        return Ok(());
    }
    Err(ApiError::status(
        401,
        "invalid_request_error",
        "invalid_api_key",
        "Incorrect or missing API key: send `Authorization: Bearer KEY` with the server's --api-key",
    ))
}

async fn read_body(app: &App, body: Body) -> Result<axum::body::Bytes, ApiError> {
    axum::body::to_bytes(body, app.max_body).await.map_err(|_| {
        ApiError::status(
            413,
            "invalid_request_error",
            "body_too_large",
            format!("the request body is larger than {} bytes", app.max_body),
        )
    })
}

async fn health() -> &'static str {
    "ok"
}

async fn not_found() -> Response {
    error_response(&ApiError::status(404, "invalid_request_error", "not_found", "no such endpoint"))
}

async fn metrics(State(app): State<App>) -> Response {
    let mut r = Response::new(Body::from(app.metrics.render()));
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4"));
    r
}

async fn models(State(app): State<App>, headers: HeaderMap) -> Response {
    let r = authorize(&app, &headers).map(|()| {
        let s = &app.served;
        let steers: Vec<Value> = s
            .steers
            .iter()
            .map(|n| {
                json!({"name": n.name, "file": n.path.display().to_string(), "labels": n.steer.labels(),
                       "rank": n.steer.rank(), "epsilon": n.steer.epsilon()})
            })
            .collect();
        json_response(
            200,
            &json!({"object": "list", "data": [{"id": s.name, "object": "model", "created": s.created,
                "owned_by": "memsteer", "max_model_len": s.context(), "steers": steers}]}),
        )
    });
    respond(&app.metrics, "models", r)
}

/// Which endpoint a generation answers.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Completion,
    Chat,
}

async fn completions(State(app): State<App>, headers: HeaderMap, body: Body) -> Response {
    let r = async {
        authorize(&app, &headers)?;
        let bytes = read_body(&app, body).await?;
        let (req, common): (CompletionRequest, _) = api::parse(&bytes, &api::COMPLETION_FIELDS)?;
        if req.echo == Some(true) {
            return Err(ApiError::invalid(Some("echo".into()), "`echo` is not supported; leave it out"));
        }
        if req.suffix.is_some() {
            return Err(ApiError::invalid(Some("suffix".into()), "`suffix` is not supported; leave it out"));
        }
        if let Some(b) = req.best_of
            && b != common.n.unwrap_or(1)
        {
            return Err(ApiError::invalid(Some("best_of".into()), "`best_of` must equal `n` (or be left out)"));
        }
        let logprobs = match req.logprobs {
            Some(k) if k > 5 => {
                return Err(ApiError::invalid(Some("logprobs".into()), format!("`logprobs` must be 0–5, found {k}")));
            }
            k => k.map(|k| k as usize),
        };
        // Tokenizing (bodies up to --max-body-bytes) runs off the HTTP workers.
        let served = app.served.clone();
        let prompts = off_runtime(move || api::completion_prompts(&served, &req.prompt)).await?;
        let plan = make_plan(&app, &common, prompts, (Some(16), logprobs))?;
        generate(&app, plan, Kind::Completion).await
    }
    .await;
    respond(&app.metrics, "completions", r)
}

async fn chat(State(app): State<App>, headers: HeaderMap, body: Body) -> Response {
    let r = async {
        authorize(&app, &headers)?;
        let bytes = read_body(&app, body).await?;
        let (req, mut common): (ChatRequest, _) = api::parse(&bytes, &api::CHAT_FIELDS)?;
        if common.max_tokens.is_none() {
            common.max_tokens = req.max_completion_tokens;
        }
        let logprobs = match (req.logprobs.unwrap_or(false), req.top_logprobs) {
            (_, Some(k)) if k > 20 => {
                return Err(ApiError::invalid(
                    Some("top_logprobs".into()),
                    format!("`top_logprobs` must be 0–20, found {k}"),
                ));
            }
            (false, Some(_)) => {
                return Err(ApiError::invalid(Some("top_logprobs".into()), "`top_logprobs` needs `logprobs: true`"));
            }
            (true, k) => Some(k.unwrap_or(0) as usize),
            (false, None) => None,
        };
        let served = app.served.clone();
        let prompt = off_runtime(move || api::chat_prompt(&served, &req.messages)).await?;
        let plan = make_plan(&app, &common, vec![prompt], (None, logprobs))?;
        generate(&app, plan, Kind::Chat).await
    }
    .await;
    respond(&app.metrics, "chat", r)
}

/// Runs CPU work (tokenizing, rendering a template) on tokio's blocking threads, so that a large
/// prompt never stalls the workers that serve every connection.
async fn off_runtime<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f).await.unwrap_or_else(|e| {
        Err(ApiError::status(500, "server_error", "internal_error", format!("preparing the prompt: {e}")))
    })
}

fn make_plan(
    app: &App,
    c: &api::Common,
    prompts: Vec<Vec<u32>>,
    defaults: (Option<u64>, Option<usize>),
) -> Result<Plan, ApiError> {
    let number = app.requests.fetch_add(1, Ordering::SeqCst);
    api::plan(&app.served, c, prompts, defaults, (app.limits, number))
}

/// One choice as it is collected.
#[derive(Debug, Default)]
struct Choice {
    text: String,
    finish: Option<Finish>,
    tokens: usize,
    logprobs: Vec<TokenLogprob>,
}

fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

async fn generate(app: &App, plan: Plan, kind: Kind) -> Result<Response, ApiError> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let choices = plan.rows.len();
    let prompt_tokens = plan.prompt_tokens;
    let id = format!(
        "{}-{:016x}",
        if kind == Kind::Chat { "chatcmpl" } else { "cmpl" },
        memsteer_panel::rng::hash_key(app.limits.seed ^ 0x5e4e, &now_secs().to_le_bytes())
            ^ app.requests.load(Ordering::SeqCst)
    );
    let job = Job { rows: plan.rows, events: tx, received: Instant::now() };
    app.engine.submit(job).map_err(|_| {
        ApiError::status(
            429,
            "rate_limit_exceeded",
            "queue_full",
            format!("the server's queue is full ({} requests wait); retry shortly", app.engine.queued()),
        )
    })?;
    app.metrics.prompt(prompt_tokens);
    let head = Head { id, created: now_secs(), model: app.served.name.clone(), kind };
    if plan.stream {
        return Ok(stream(head, rx, choices, (prompt_tokens, plan.include_usage, plan.logprobs)));
    }
    let mut rx = rx;
    let mut out: Vec<Choice> = (0..choices).map(|_| Choice::default()).collect();
    let mut open = choices;
    while open > 0 {
        match rx.recv().await {
            Some(Event::Token { choice, text, logprob }) => {
                out[choice].text.push_str(&text);
                out[choice].logprobs.extend(logprob);
            }
            Some(Event::Done { choice, finish, tokens }) => {
                out[choice].finish = Some(finish);
                out[choice].tokens = tokens;
                open -= 1;
            }
            Some(Event::Failed(message)) => {
                return Err(ApiError::status(500, "server_error", "generation_failed", message));
            }
            Some(Event::NoRoom(message)) => {
                return Err(ApiError::status(503, "server_error", "insufficient_device_memory", message));
            }
            None => return Err(ApiError::status(500, "server_error", "engine_stopped", "the engine stopped")),
        }
    }
    let completion_tokens: usize = out.iter().map(|c| c.tokens).sum();
    let body_choices: Vec<Value> = out
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let finish = c.finish.map(Finish::as_str);
            let lp = plan.logprobs.then(|| logprobs_json(kind, &c.logprobs, 0));
            match kind {
                Kind::Completion => json!({"index": i, "text": c.text, "logprobs": lp, "finish_reason": finish}),
                Kind::Chat => json!({"index": i, "message": {"role": "assistant", "content": c.text},
                                     "logprobs": lp, "finish_reason": finish}),
            }
        })
        .collect();
    let mut body = head.json(body_choices);
    body["object"] = if kind == Kind::Chat { "chat.completion" } else { "text_completion" }.into();
    body["usage"] = usage(prompt_tokens, completion_tokens);
    Ok(json_response(200, &body))
}

fn usage(prompt: usize, completion: usize) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})
}

/// Log-probabilities as each endpoint shows them; completions' `text_offset` counts from `start`.
fn logprobs_json(kind: Kind, lps: &[TokenLogprob], start: usize) -> Value {
    match kind {
        Kind::Completion => {
            let mut offset = start;
            let mut offsets = Vec::with_capacity(lps.len());
            for t in lps {
                offsets.push(offset);
                offset += t.token.len();
            }
            json!({
                "tokens": lps.iter().map(|t| t.token.clone()).collect::<Vec<_>>(),
                "token_logprobs": lps.iter().map(|t| t.logprob).collect::<Vec<_>>(),
                "top_logprobs": lps.iter().map(|t| {
                    t.top.iter().map(|(k, v)| (k.clone(), json!(v))).collect::<serde_json::Map<_, _>>()
                }).collect::<Vec<_>>(),
                "text_offset": offsets,
            })
        }
        Kind::Chat => {
            let entry = |token: &str, lp: f32| json!({"token": token, "logprob": lp, "bytes": token.as_bytes()});
            let content: Vec<Value> = lps
                .iter()
                .map(|t| {
                    let mut e = entry(&t.token, t.logprob);
                    e["top_logprobs"] = t.top.iter().map(|(k, v)| entry(k, *v)).collect::<Vec<_>>().into();
                    e
                })
                .collect();
            json!({"content": content})
        }
    }
}

/// What every response and chunk of a request starts with.
#[derive(Debug, Clone)]
struct Head {
    id: String,
    created: u64,
    model: String,
    kind: Kind,
}

impl Head {
    fn json(&self, choices: Vec<Value>) -> Value {
        let object = if self.kind == Kind::Chat { "chat.completion.chunk" } else { "text_completion" };
        json!({"id": self.id, "object": object, "created": self.created, "model": self.model, "choices": choices})
    }

    fn chunk(
        &self,
        index: usize,
        delta: Option<&str>,
        (logprob, offset): (Option<&TokenLogprob>, usize),
        finish: Option<Finish>,
    ) -> Value {
        let lp = logprob.map(|l| logprobs_json(self.kind, std::slice::from_ref(l), offset));
        let finish = finish.map(Finish::as_str);
        let choice = match self.kind {
            Kind::Completion => {
                json!({"index": index, "text": delta.unwrap_or(""), "logprobs": lp, "finish_reason": finish})
            }
            Kind::Chat => {
                let delta = match delta {
                    Some(t) => json!({"content": t}),
                    None => json!({}),
                };
                json!({"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish})
            }
        };
        self.json(vec![choice])
    }
}

fn event(v: &Value) -> String {
    format!("data: {v}\n\n")
}

/// Server-sent events in OpenAI's chunk format, ending with `data: [DONE]`.
fn stream(
    head: Head,
    rx: UnboundedReceiver<Event>,
    choices: usize,
    (prompt_tokens, include_usage, _logprobs): (usize, bool, bool),
) -> Response {
    struct St {
        head: Head,
        rx: UnboundedReceiver<Event>,
        open: usize,
        tokens: usize,
        first: Vec<String>,
        ended: bool,
        include_usage: bool,
        prompt_tokens: usize,
        /// Each choice's `text_offset` so far (completions' log-probabilities).
        offsets: Vec<usize>,
    }
    // Chat streams open every choice with the assistant's role.
    let first: Vec<String> = match head.kind {
        Kind::Chat => (0..choices)
            .map(|i| {
                let mut c = head.chunk(i, None, (None, 0), None);
                c["choices"][0]["delta"] = json!({"role": "assistant", "content": ""});
                event(&c)
            })
            .collect(),
        Kind::Completion => Vec::new(),
    };
    let offsets = vec![0; choices];
    let st = St { head, rx, open: choices, tokens: 0, first, ended: false, include_usage, prompt_tokens, offsets };
    let s = futures_util::stream::unfold(st, |mut st| async move {
        if !st.first.is_empty() {
            let out = st.first.concat();
            st.first.clear();
            return Some((Ok::<_, Infallible>(out), st));
        }
        if st.ended {
            return None;
        }
        loop {
            if st.open == 0 {
                let mut out = String::new();
                if st.include_usage {
                    let mut u = st.head.json(Vec::new());
                    u["usage"] = usage(st.prompt_tokens, st.tokens);
                    out.push_str(&event(&u));
                }
                out.push_str("data: [DONE]\n\n");
                st.ended = true;
                return Some((Ok(out), st));
            }
            match st.rx.recv().await {
                Some(Event::Token { choice, text, logprob }) => {
                    if text.is_empty() && logprob.is_none() {
                        continue;
                    }
                    let offset = st.offsets.get(choice).copied().unwrap_or(0);
                    if let (Some(o), Some(l)) = (st.offsets.get_mut(choice), logprob.as_ref()) {
                        *o += l.token.len();
                    }
                    let c = st.head.chunk(choice, Some(&text), (logprob.as_ref(), offset), None);
                    return Some((Ok(event(&c)), st));
                }
                Some(Event::Done { choice, finish, tokens }) => {
                    st.open -= 1;
                    st.tokens += tokens;
                    let c = st.head.chunk(choice, None, (None, 0), Some(finish));
                    return Some((Ok(event(&c)), st));
                }
                Some(Event::Failed(message)) => {
                    let e = ApiError::status(500, "server_error", "generation_failed", message);
                    st.ended = true;
                    return Some((Ok(format!("{}data: [DONE]\n\n", event(&e.body()))), st));
                }
                Some(Event::NoRoom(message)) => {
                    let e = ApiError::status(503, "server_error", "insufficient_device_memory", message);
                    st.ended = true;
                    return Some((Ok(format!("{}data: [DONE]\n\n", event(&e.body()))), st));
                }
                None => {
                    let e = ApiError::status(500, "server_error", "engine_stopped", "the engine stopped");
                    st.ended = true;
                    return Some((Ok(format!("{}data: [DONE]\n\n", event(&e.body()))), st));
                }
            }
        }
    });
    let mut r = Response::new(Body::from_stream(s));
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r
}
