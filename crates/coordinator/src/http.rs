//! The OpenAI-compatible HTTP API (axum): `/v1/models`, `/v1/completions` and
//! `/v1/chat/completions` with or without server-sent events, plus `/health`, `/metrics`
//! (Prometheus text) and `/v1/cluster`. Every request goes through the scheduler, so
//! concurrent clients share each forward step.
//!
//! Errors use OpenAI's JSON shape (`{"error": {"message", "type", "param", "code"}}`) with
//! 400 for a malformed or invalid request, 401 for a missing API key, 404 for an unknown
//! model or path, 429 when the queue is full and 503 while the cluster is not ready.

use crate::scheduler::{Event, Job, SubmitError};
use crate::text::StopText;
use crate::{CoordinatorState, PromptInput, finish_reason};
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::Next;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde::Deserialize;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tessera_model::chat::Message;
use tessera_model::{GenerateParams, MAX_LOGPROBS, ModelError, SamplingParams, TokenLogprobs};
use tokio::sync::mpsc;

#[derive(Debug, Clone)]
pub struct HttpConfig {
    /// When set, `/v1/*` needs `Authorization: Bearer <key>`.
    pub api_key: Option<String>,
    /// How long a client may take to send a request's headers, and then its body.
    pub read_timeout: Duration,
    /// How long an answer's bytes may wait for the client to read them before the
    /// connection is dropped (and its sequence cancelled).
    pub write_timeout: Duration,
    /// The largest request body, in bytes.
    pub max_body: usize,
    /// Connections open at once; more are closed as they come.
    pub max_connections: usize,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            api_key: None,
            read_timeout: Duration::from_secs(10),
            write_timeout: Duration::from_secs(60),
            max_body: 8 << 20,
            max_connections: 1024,
        }
    }
}

struct App {
    st: Arc<CoordinatorState>,
    cfg: HttpConfig,
    next_id: AtomicU64,
    /// Responses by status code, for /metrics.
    responses: Mutex<BTreeMap<u16, u64>>,
}

type Shared = Arc<App>;

/// Serves the HTTP API on `listener` until the process ends.
pub async fn serve(
    st: Arc<CoordinatorState>,
    listener: tokio::net::TcpListener,
    cfg: HttpConfig,
) -> anyhow::Result<()> {
    let app = router(st, cfg.clone());
    let open = Arc::new(tokio::sync::Semaphore::new(cfg.max_connections));
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // Out of file descriptors and the like: try again shortly.
                tracing::warn!("HTTP accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // Over the limit: closed at once, so that a flood of idle connections cannot hold
        // memory or descriptors the others need.
        let Ok(permit) = open.clone().try_acquire_owned() else {
            tracing::warn!(%peer, "HTTP connection refused: {} open", cfg.max_connections);
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let io = hyper_util::rt::TokioIo::new(WriteTimeout::new(tcp, cfg.write_timeout));
        let svc = hyper_util::service::TowerToHyperService::new(app.clone());
        let read_timeout = cfg.read_timeout;
        tokio::spawn(async move {
            // Headers within the read timeout (else the connection is dropped); hyper
            // answers oversized or malformed heads itself.
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(read_timeout)
                .max_buf_size(64 << 10)
                .serve_connection(io, svc);
            if let Err(e) = conn.await {
                tracing::debug!(%peer, "HTTP connection ended: {e}");
            }
            drop(permit);
        });
    }
}

/// A request's body, read within the read timeout and up to the size limit.
async fn read_body(app: &App, body: axum::body::Body) -> Result<Bytes, ApiError> {
    let limit = app.cfg.max_body;
    match tokio::time::timeout(app.cfg.read_timeout, axum::body::to_bytes(body, limit)).await {
        Ok(Ok(b)) => Ok(b),
        Ok(Err(e)) => {
            let too_big = std::error::Error::source(&e)
                .is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
            if too_big {
                Err(ApiError {
                    status: StatusCode::PAYLOAD_TOO_LARGE,
                    message: format!("the request body is over {limit} bytes"),
                    kind: "invalid_request_error",
                    param: None,
                    code: Some("body_too_large"),
                })
            } else {
                Err(ApiError::bad(format!("reading the request body: {e}")))
            }
        }
        Err(_) => Err(ApiError {
            status: StatusCode::REQUEST_TIMEOUT,
            message: format!(
                "the request body did not arrive within {:?}",
                app.cfg.read_timeout
            ),
            kind: "invalid_request_error",
            param: None,
            code: Some("request_timeout"),
        }),
    }
}

/// A connection whose writes fail once they have waited `limit` for the peer to read: a
/// client that stops reading its stream is dropped (its sequence then cancelled), not kept
/// forever.
struct WriteTimeout {
    io: tokio::net::TcpStream,
    limit: Duration,
    stalled: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
}

impl WriteTimeout {
    fn new(io: tokio::net::TcpStream, limit: Duration) -> WriteTimeout {
        WriteTimeout {
            io,
            limit,
            stalled: None,
        }
    }

    /// After a write that could not proceed: an error once it has waited too long.
    fn check(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<usize>> {
        let limit = self.limit;
        let sleep = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        match sleep.as_mut().poll(cx) {
            std::task::Poll::Ready(()) => std::task::Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the client did not read for the write timeout",
            ))),
            std::task::Poll::Pending => std::task::Poll::Pending,
        }
    }
}

use std::future::Future as _;

impl tokio::io::AsyncRead for WriteTimeout {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for WriteTimeout {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        match std::pin::Pin::new(&mut self.io).poll_write(cx, buf) {
            std::task::Poll::Pending => self.check(cx),
            done => {
                self.stalled = None;
                done
            }
        }
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

pub fn router(st: Arc<CoordinatorState>, cfg: HttpConfig) -> Router {
    let app = Arc::new(App {
        st,
        cfg,
        next_id: AtomicU64::new(1),
        responses: Mutex::new(BTreeMap::new()),
    });
    let v1 = Router::new()
        .route("/v1/models", get(models))
        .route("/v1/cluster", get(cluster))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .layer(axum::middleware::from_fn_with_state(app.clone(), auth));
    Router::new()
        .route("/health", get(health))
        .route("/livez", get(|| async { "ok" }))
        .route("/metrics", get(metrics))
        .merge(v1)
        .fallback(not_found)
        .layer(axum::middleware::from_fn_with_state(app.clone(), count))
        .with_state(app)
}

/// An error in OpenAI's shape.
struct ApiError {
    status: StatusCode,
    message: String,
    kind: &'static str,
    param: Option<&'static str>,
    code: Option<&'static str>,
}

impl ApiError {
    fn bad(message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param: None,
            code: None,
        }
    }
    fn param(mut self, p: &'static str) -> ApiError {
        self.param = Some(p);
        self
    }
    fn code(mut self, c: &'static str) -> ApiError {
        self.code = Some(c);
        self
    }
    fn json(&self) -> Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, axum::Json(self.json())).into_response()
    }
}

impl From<SubmitError> for ApiError {
    fn from(e: SubmitError) -> ApiError {
        let message = e.to_string();
        match e {
            SubmitError::QueueFull(_) => ApiError {
                status: StatusCode::TOO_MANY_REQUESTS,
                message,
                kind: "rate_limit_error",
                param: None,
                code: Some("queue_full"),
            },
            SubmitError::NotReady(_) => unavailable(message),
            SubmitError::Invalid(_) => ApiError::bad(message).param("prompt"),
        }
    }
}

fn unavailable(message: String) -> ApiError {
    ApiError {
        status: StatusCode::SERVICE_UNAVAILABLE,
        message,
        kind: "server_error",
        param: None,
        code: Some("cluster_unavailable"),
    }
}

fn model_error(e: ModelError) -> ApiError {
    match e {
        ModelError::PromptTooLong { .. } => ApiError::bad(e.to_string())
            .param("messages")
            .code("context_length_exceeded"),
        other => ApiError::bad(other.to_string()),
    }
}

async fn count(State(app): State<Shared>, req: Request, next: Next) -> Response {
    let resp = next.run(req).await;
    *app.responses
        .lock()
        .unwrap()
        .entry(resp.status().as_u16())
        .or_default() += 1;
    resp
}

async fn auth(State(app): State<Shared>, req: Request, next: Next) -> Response {
    if let Some(key) = &app.cfg.api_key {
        let want = format!("Bearer {key}");
        let got = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let same = got.len() == want.len()
            && got
                .bytes()
                .zip(want.bytes())
                .fold(0u8, |a, (x, y)| a | (x ^ y))
                == 0;
        if !same {
            return ApiError {
                status: StatusCode::UNAUTHORIZED,
                message: "missing or wrong API key (Authorization: Bearer ...)".into(),
                kind: "invalid_request_error",
                param: None,
                code: Some("invalid_api_key"),
            }
            .into_response();
        }
    }
    next.run(req).await
}

async fn not_found(req: Request) -> ApiError {
    ApiError {
        status: StatusCode::NOT_FOUND,
        message: format!("no route for {} {}", req.method(), req.uri().path()),
        kind: "invalid_request_error",
        param: None,
        code: Some("not_found"),
    }
}

async fn health(State(app): State<Shared>) -> Response {
    let ready = app.st.is_ready();
    let body =
        json!({"status": if ready { "ready" } else { "unavailable" }, "state": app.st.state()});
    let code = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, axum::Json(body)).into_response()
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

async fn models(State(app): State<Shared>) -> Response {
    axum::Json(json!({
        "object": "list",
        "data": [{
            "id": app.st.model_name,
            "object": "model",
            "created": now_secs(),
            "owned_by": "tessera",
            "context_length": app.st.files.cfg.max_context,
        }],
    }))
    .into_response()
}

async fn cluster(State(app): State<Shared>) -> Response {
    let st = &app.st;
    let (queued, active, reserved) = st.scheduler.load();
    let sc = st.scheduler.config();
    let cfg = &st.files.cfg;
    axum::Json(json!({
        "state": st.state(),
        "ready": st.is_ready(),
        "model": st.model_name,
        "model_path": st.files.path.display().to_string(),
        "workers": st.workers(),
        "scheduler": {
            "queued": queued,
            "active_sequences": active,
            "max_queue": sc.max_queue,
            "max_sequences": sc.max_seqs,
            "kv_budget_positions": sc.kv_budget,
            "kv_reserved_positions": reserved,
            "prefill_chunk": sc.prefill_chunk,
        },
        "kv_cache_type": st.cache_type().name(),
        "kv_bytes_per_position": st.cache_type().bytes_per_position(cfg),
        "uptime_seconds": st.started.elapsed().as_secs_f64(),
    }))
    .into_response()
}

/// A sum and a count without buckets (a histogram with only its +Inf bucket), for totals the
/// workers report in aggregate, such as their all-reduce time.
#[derive(Debug)]
struct SumCount {
    sum: f64,
    count: u64,
}

impl EncodeMetric for SumCount {
    fn encode(&self, mut e: MetricEncoder) -> Result<(), std::fmt::Error> {
        e.encode_histogram::<NoLabelSet>(self.sum, self.count, &[(f64::INFINITY, self.count)], None)
    }
    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

type Labels = Vec<(String, String)>;
/// A per-worker figure: its name, its help, and how to read it off a worker.
type PerWorker<'a> = (&'a str, &'a str, &'a dyn Fn(&crate::WorkerView) -> f64);
type F64Gauge = Gauge<f64, AtomicU64>;
type F64Counter = Counter<f64, AtomicU64>;

/// Prometheus / OpenMetrics text through the prometheus-client crate: the scheduler's latency
/// histograms as they are, every other figure read from a snapshot at each scrape.
async fn metrics(State(app): State<Shared>) -> Response {
    let st = &app.st;
    let m = st.scheduler.metrics();
    let (queued, active, reserved) = st.scheduler.load();
    let rate = |n: u64, s: f64| if s > 0.0 { n as f64 / s } else { 0.0 };
    let mut reg = Registry::default();
    let gauge = |reg: &mut Registry, name: &str, help: &str, v: f64| {
        let g = F64Gauge::default();
        g.set(v);
        reg.register(name, help, g);
    };
    // Counters are named without `_total`: the encoder appends it.
    let counter = |reg: &mut Registry, name: &str, help: &str, v: f64| {
        let c = F64Counter::default();
        c.inc_by(v);
        reg.register(name, help, c);
    };
    // One label `key`, one sample per value; a counter family or a gauge family.
    let family = |reg: &mut Registry,
                  name: &str,
                  help: &str,
                  key: &str,
                  samples: Vec<(String, f64)>,
                  counter: bool| {
        let labels = |value: String| vec![(key.to_string(), value)];
        if counter {
            let f = Family::<Labels, F64Counter>::default();
            for (value, v) in samples {
                f.get_or_create(&labels(value)).inc_by(v);
            }
            reg.register(name, help, f);
        } else {
            let f = Family::<Labels, F64Gauge>::default();
            for (value, v) in samples {
                f.get_or_create(&labels(value)).set(v);
            }
            reg.register(name, help, f);
        }
    };
    gauge(
        &mut reg,
        "tessera_cluster_ready",
        "1 while the cluster serves requests.",
        f64::from(u8::from(st.is_ready())),
    );
    counter(
        &mut reg,
        "tessera_requests",
        "Generation requests received (HTTP and gRPC).",
        m.requests as f64,
    );
    family(
        &mut reg,
        "tessera_requests_rejected",
        "Requests refused before generation, by reason.",
        "reason",
        vec![
            ("queue_full".into(), m.rejected_queue_full as f64),
            ("not_ready".into(), m.rejected_not_ready as f64),
            ("invalid".into(), m.rejected_invalid as f64),
        ],
        true,
    );
    family(
        &mut reg,
        "tessera_requests_finished",
        "Sequences that left the batch, by outcome.",
        "outcome",
        vec![
            ("completed".into(), m.completed as f64),
            ("cancelled".into(), m.cancelled as f64),
            ("failed".into(), m.failed as f64),
        ],
        true,
    );
    counter(
        &mut reg,
        "tessera_prompt_tokens",
        "Prompt tokens prefilled.",
        m.prefill_tokens as f64,
    );
    counter(
        &mut reg,
        "tessera_generated_tokens",
        "Tokens generated.",
        m.generated_tokens as f64,
    );
    gauge(
        &mut reg,
        "tessera_prefill_tokens_per_second",
        "Prompt tokens per second of steps that carried prefill.",
        rate(m.prefill_tokens, m.prefill_seconds),
    );
    gauge(
        &mut reg,
        "tessera_decode_tokens_per_second",
        "Decoded tokens per second over all sequences, in steps that carried decodes.",
        rate(m.decode_tokens, m.decode_seconds),
    );
    gauge(
        &mut reg,
        "tessera_queue_depth",
        "Requests waiting for a slot.",
        queued as f64,
    );
    gauge(
        &mut reg,
        "tessera_active_sequences",
        "Sequences in the running batch.",
        active as f64,
    );
    gauge(
        &mut reg,
        "tessera_kv_reserved_positions",
        "KV cache positions reserved by active sequences.",
        reserved as f64,
    );
    let l = &m.latency;
    reg.register(
        "tessera_time_to_first_token_seconds",
        "From a request's arrival (queueing included) to its first token.",
        l.time_to_first_token.clone(),
    );
    reg.register(
        "tessera_time_per_output_token_seconds",
        "Time between consecutive tokens of one sequence.",
        l.time_per_output_token.clone(),
    );
    reg.register(
        "tessera_e2e_request_latency_seconds",
        "From a request's arrival to its last token, for completed requests.",
        l.request.clone(),
    );
    reg.register(
        "tessera_step_seconds",
        "Time of one forward step of the whole batch.",
        l.step.clone(),
    );
    reg.register(
        "tessera_recovery_seconds",
        "From a worker's failure to the rebuilt cluster taking over.",
        l.recovery.clone(),
    );
    counter(
        &mut reg,
        "tessera_recoveries",
        "Clusters rebuilt after a worker failed (on a stand-by or the workers that remain).",
        m.recoveries as f64,
    );
    counter(
        &mut reg,
        "tessera_replayed_sequences",
        "Running sequences replayed on a rebuilt cluster.",
        m.replayed_sequences as f64,
    );
    gauge(
        &mut reg,
        "tessera_last_step_batch",
        "Sequences in the last step.",
        m.last_batch as f64,
    );
    gauge(
        &mut reg,
        "tessera_max_step_batch",
        "The most sequences one step has carried.",
        m.max_batch as f64,
    );
    reg.register(
        "tessera_allreduce_seconds",
        "All-reduces between workers (mean per worker).",
        SumCount {
            sum: m.comm.allreduce_ns as f64 / 1e9,
            count: m.comm.allreduce_count,
        },
    );
    let workers = st.workers();
    let per_worker: [PerWorker; 3] = [
        (
            "tessera_worker_up",
            "1 for a worker serving its shard, 0 otherwise.",
            &|w| f64::from(u8::from(w.state == "ready")),
        ),
        (
            "tessera_worker_kv_cached_sequences",
            "Sequences with a KV cache on the worker.",
            &|w| w.kv_cached_sequences as f64,
        ),
        (
            "tessera_worker_kv_cached_positions",
            "KV cache positions held by the worker.",
            &|w| w.kv_cached_positions as f64,
        ),
    ];
    for (name, help, f) in per_worker {
        let samples = workers.iter().map(|w| (w.name.clone(), f(w))).collect();
        family(&mut reg, name, help, "worker", samples, false);
    }
    let responses: Vec<(String, f64)> = app
        .responses
        .lock()
        .unwrap()
        .iter()
        .map(|(c, n)| (c.to_string(), *n as f64))
        .collect();
    family(
        &mut reg,
        "tessera_http_responses",
        "HTTP responses by status code.",
        "code",
        responses,
        true,
    );
    let mut o = String::new();
    if let Err(e) = encode(&mut o, &reg) {
        return (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response();
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        o,
    )
        .into_response()
}

// ------------------------------------------------------------------ requests

#[derive(Deserialize)]
#[serde(untagged)]
enum Prompt {
    Text(String),
    Texts(Vec<String>),
    Ids(Vec<u32>),
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize, Default)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

/// Both endpoints' requests: `prompt` for completions, `messages` for chat. Unknown fields
/// are ignored, as OpenAI clients send many; known ones of the wrong type are refused.
#[derive(Deserialize)]
struct GenRequest {
    prompt: Option<Prompt>,
    messages: Option<Vec<ChatMessage>>,
    model: Option<String>,
    max_tokens: Option<u64>,
    max_completion_tokens: Option<u64>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<u32>,
    seed: Option<u64>,
    stop: Option<Stop>,
    #[serde(default)]
    stream: bool,
    stream_options: Option<StreamOptions>,
    n: Option<u32>,
    /// Completions: how many alternatives (0-5); chat: whether to report logprobs at all.
    logprobs: Option<LogprobsField>,
    /// Chat: how many alternatives (0-20).
    top_logprobs: Option<u32>,
    /// Not OpenAI's: keep generating past end-of-sequence (for benchmarks).
    #[serde(default)]
    ignore_eos: bool,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum LogprobsField {
    Flag(bool),
    Count(u32),
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Deserialize)]
struct Part {
    #[serde(rename = "type")]
    kind: String,
    text: Option<String>,
}

#[derive(Deserialize)]
struct ChatMessage {
    role: String,
    content: Option<Content>,
}

fn parse(headers: &HeaderMap, body: &[u8]) -> Result<GenRequest, ApiError> {
    if let Some(ct) = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        && !ct.starts_with("application/json")
    {
        return Err(ApiError::bad(format!(
            "expected a JSON body (Content-Type: application/json), got {ct:?}"
        )));
    }
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad(format!("the body is not valid JSON: {e}")))?;
    if !v.is_object() {
        return Err(ApiError::bad("the body must be a JSON object"));
    }
    serde_path_to_error::deserialize(v).map_err(|e| {
        let path = e.path().to_string();
        ApiError::bad(format!("invalid field {path:?}: {}", e.inner()))
    })
}

/// What a request asks to generate, checked.
struct Plan {
    prompt: Vec<u32>,
    params: GenerateParams,
    stops: Vec<String>,
    stream: bool,
    include_usage: bool,
    chat: bool,
}

fn plan(app: &App, c: GenRequest, input: PromptInput, chat: bool) -> Result<Plan, ApiError> {
    let st = &app.st;
    if let Some(m) = &c.model
        && m != &st.model_name
    {
        return Err(ApiError {
            status: StatusCode::NOT_FOUND,
            message: format!(
                "the model {m:?} does not exist: this server serves {:?}",
                st.model_name
            ),
            kind: "invalid_request_error",
            param: Some("model"),
            code: Some("model_not_found"),
        });
    }
    if c.n.unwrap_or(1) != 1 {
        return Err(ApiError::bad("only n = 1 is supported").param("n"));
    }
    let temperature = c.temperature.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::bad(format!(
            "temperature must be between 0 and 2, got {temperature}"
        ))
        .param("temperature"));
    }
    let top_p = c.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::bad(format!("top_p must be in (0, 1], got {top_p}")).param("top_p"));
    }
    let logprobs = match (chat, c.logprobs, c.top_logprobs) {
        (true, Some(LogprobsField::Flag(true)), k) => Some(k.unwrap_or(0) as usize),
        (true, _, Some(_)) => {
            return Err(
                ApiError::bad("top_logprobs needs \"logprobs\": true").param("top_logprobs")
            );
        }
        (false, Some(LogprobsField::Count(k)), _) => Some(k as usize),
        (false, Some(LogprobsField::Flag(true)), _) => Some(0),
        _ => None,
    };
    let most = if chat { MAX_LOGPROBS } else { 5 };
    if let Some(k) = logprobs
        && k > most
    {
        return Err(ApiError::bad(format!(
            "at most {most} alternatives per token, asked for {k}"
        ))
        .param(if chat { "top_logprobs" } else { "logprobs" }));
    }
    let stops = match c.stop {
        None => vec![],
        Some(Stop::One(s)) => vec![s],
        Some(Stop::Many(v)) => v,
    };
    if stops.len() > 4 {
        return Err(ApiError::bad("at most 4 stop sequences").param("stop"));
    }
    let prompt = st.tokenize(input).map_err(model_error)?;
    let ctx = st.files.cfg.max_context;
    let max_tokens = match c.max_completion_tokens.or(c.max_tokens) {
        Some(0) => return Err(ApiError::bad("max_tokens must be at least 1").param("max_tokens")),
        Some(n) => n as usize,
        // OpenAI's defaults: 16 for completions, the rest of the context for chat (as much
        // of it as the KV cache can hold).
        None if chat => ctx
            .min(st.scheduler.config().kv_budget)
            .saturating_sub(prompt.len())
            .max(1),
        None => 16,
    };
    let seed = c.seed.unwrap_or_else(|| {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
    });
    Ok(Plan {
        prompt,
        params: GenerateParams {
            max_tokens,
            sampling: SamplingParams {
                temperature,
                top_k: c.top_k.unwrap_or(0) as usize,
                top_p,
                seed,
                logprobs,
            },
            ignore_eos: c.ignore_eos,
        },
        stops,
        stream: c.stream,
        include_usage: c.stream_options.unwrap_or_default().include_usage,
        chat,
    })
}

async fn completions(
    State(app): State<Shared>,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Result<Response, ApiError> {
    let body = read_body(&app, body).await?;
    let mut r = parse(&headers, &body)?;
    let input = match r.prompt.take() {
        None => return Err(ApiError::bad("\"prompt\" is required").param("prompt")),
        Some(Prompt::Text(t)) => PromptInput::Text(t),
        Some(Prompt::Texts(mut v)) if v.len() == 1 => PromptInput::Text(v.remove(0)),
        Some(Prompt::Texts(_)) => {
            return Err(ApiError::bad("one prompt per request is supported").param("prompt"));
        }
        Some(Prompt::Ids(ids)) => PromptInput::Ids(ids),
    };
    let p = plan(&app, r, input, false)?;
    run(app, p).await
}

async fn chat_completions(
    State(app): State<Shared>,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Result<Response, ApiError> {
    let body = read_body(&app, body).await?;
    let mut r = parse(&headers, &body)?;
    let msgs = r.messages.take().unwrap_or_default();
    if msgs.is_empty() {
        return Err(ApiError::bad("\"messages\" must be a non-empty list").param("messages"));
    }
    let mut messages = Vec::with_capacity(msgs.len());
    for m in msgs {
        let content = match m.content {
            None => String::new(),
            Some(Content::Text(t)) => t,
            Some(Content::Parts(parts)) => {
                let mut s = String::new();
                for p in parts {
                    match (p.kind.as_str(), p.text) {
                        ("text", Some(t)) => s.push_str(&t),
                        (kind, _) => {
                            return Err(ApiError::bad(format!(
                                "content parts of type {kind:?} are not supported (text only)"
                            ))
                            .param("messages"));
                        }
                    }
                }
                s
            }
        };
        messages.push(Message {
            role: m.role,
            content,
        });
    }
    let p = plan(&app, r, PromptInput::Chat(messages), true)?;
    run(app, p).await
}

/// OpenAI's `logprobs` object for `tokens` (text offsets from `offset`): chat's `content`
/// list, or completions' parallel lists. Null where the request did not ask.
fn logprobs_json(
    app: &App,
    chat: bool,
    asked: bool,
    tokens: &[(u32, TokenLogprobs)],
    offset: usize,
) -> Value {
    if !asked {
        return Value::Null;
    }
    let tok = &app.st.files.tokenizer;
    let text = |id: u32| tok.decode_tail(&[id]).unwrap_or_default();
    // JSON has no -inf; OpenAI reports -9999 for a token the model rules out.
    let num = |x: f32| {
        if x.is_finite() {
            x.max(-9999.0)
        } else {
            -9999.0
        }
    };
    if chat {
        let entry = |id: u32, lp: f32| {
            let t = text(id);
            json!({"token": t, "logprob": num(lp), "bytes": t.as_bytes()})
        };
        let content: Vec<Value> = tokens
            .iter()
            .map(|(id, lp)| {
                let mut e = entry(*id, lp.logprob);
                e["top_logprobs"] = lp.top.iter().map(|&(i, x)| entry(i, x)).collect();
                e
            })
            .collect();
        return json!({ "content": content });
    }
    let mut at = offset;
    let mut out =
        json!({"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []});
    for (id, lp) in tokens {
        let t = text(*id);
        let top: serde_json::Map<String, Value> = lp
            .top
            .iter()
            .map(|&(i, x)| (text(i), num(x).into()))
            .collect();
        out["tokens"].as_array_mut().unwrap().push(t.clone().into());
        out["token_logprobs"]
            .as_array_mut()
            .unwrap()
            .push(num(lp.logprob).into());
        out["top_logprobs"].as_array_mut().unwrap().push(top.into());
        out["text_offset"].as_array_mut().unwrap().push(at.into());
        at += t.chars().count();
    }
    out
}

/// The streaming state of one request: the text so far, the token count, and the logprobs
/// not yet sent.
struct Progress {
    text: StopText,
    completion_tokens: usize,
    logprobs: Vec<(u32, TokenLogprobs)>,
}

enum Step {
    Text(String),
    Finished(&'static str, String),
    Failed(ApiError),
}

impl Progress {
    fn on(&mut self, app: &App, ev: Option<Event>) -> Step {
        let tok = &app.st.files.tokenizer;
        match ev {
            Some(Event::Token(id, lp)) => {
                self.completion_tokens += 1;
                if let Some(lp) = lp {
                    self.logprobs.push((id, *lp));
                }
                let piece = self.text.push(tok, id);
                if self.text.stopped {
                    Step::Finished("stop", piece)
                } else {
                    Step::Text(piece)
                }
            }
            Some(Event::Done(d)) => {
                let tail = self.text.finish(tok);
                Step::Finished(finish_reason(d.stats.finish), tail)
            }
            Some(Event::Error(e)) => Step::Failed(unavailable(format!(
                "generation failed: {e}; the cluster is {}",
                app.st.state()
            ))),
            None => Step::Failed(unavailable("the scheduler stopped".into())),
        }
    }
}

async fn run(app: Shared, p: Plan) -> Result<Response, ApiError> {
    let st = app.st.clone();
    let stop_ids = st.files.stop_ids(p.chat);
    let prompt_tokens = p.prompt.len();
    let mut events = st.scheduler.submit(
        &st.files.cfg,
        Job {
            prompt: p.prompt,
            params: p.params.clone(),
            stop_ids: stop_ids.clone(),
        },
    )?;
    let n = app.next_id.fetch_add(1, Ordering::Relaxed);
    let id = if p.chat {
        format!(
            "chatcmpl-{:x}-{n}",
            st.started.elapsed().as_nanos() as u64 ^ now_secs()
        )
    } else {
        format!(
            "cmpl-{:x}-{n}",
            st.started.elapsed().as_nanos() as u64 ^ now_secs()
        )
    };
    let created = now_secs();
    let model = st.model_name.clone();
    let mut prog = Progress {
        // The end token that stopped generation is not answer text.
        text: StopText::new(
            p.stops,
            if p.params.ignore_eos {
                vec![]
            } else {
                stop_ids
            },
        ),
        completion_tokens: 0,
        logprobs: Vec::new(),
    };
    let want_logprobs = p.params.sampling.logprobs.is_some();
    let usage = move |c: usize| {
        json!({"prompt_tokens": prompt_tokens, "completion_tokens": c,
               "total_tokens": prompt_tokens + c})
    };

    if !p.stream {
        let mut text = String::new();
        let finish = loop {
            match prog.on(&app, events.recv().await) {
                Step::Text(t) => text.push_str(&t),
                Step::Finished(f, t) => {
                    text.push_str(&t);
                    break f;
                }
                Step::Failed(e) => return Err(e),
            }
        };
        // Dropping `events` here cancels the sequence if a stop string ended it early.
        drop(events);
        let lp = logprobs_json(&app, p.chat, want_logprobs, &prog.logprobs, 0);
        let choice = if p.chat {
            json!({"index": 0, "message": {"role": "assistant", "content": text},
                   "logprobs": lp, "finish_reason": finish})
        } else {
            json!({"index": 0, "text": text, "logprobs": lp, "finish_reason": finish})
        };
        return Ok(axum::Json(json!({
            "id": id,
            "object": if p.chat { "chat.completion" } else { "text_completion" },
            "created": created,
            "model": model,
            "choices": [choice],
            "usage": usage(prog.completion_tokens),
        }))
        .into_response());
    }

    let chat = p.chat;
    let include_usage = p.include_usage;
    let object = if chat {
        "chat.completion.chunk"
    } else {
        "text_completion"
    };
    let chunk = move |piece: Option<&str>, finish: Option<&str>, first: bool, lp: Value| {
        let choice = if chat {
            let mut delta = serde_json::Map::new();
            if first {
                delta.insert("role".into(), "assistant".into());
            }
            if let Some(t) = piece {
                delta.insert("content".into(), t.into());
            }
            json!({"index": 0, "delta": delta, "logprobs": lp, "finish_reason": finish})
        } else {
            json!({"index": 0, "text": piece.unwrap_or(""), "logprobs": lp,
                   "finish_reason": finish})
        };
        json!({"id": id, "object": object, "created": created, "model": model,
               "choices": [choice]})
    };
    let (tx, rx) = mpsc::channel::<Result<SseEvent, Infallible>>(64);
    let data = |v: Value| Ok(SseEvent::default().data(v.to_string()));
    tokio::spawn(async move {
        let mut first = true;
        let mut offset = 0usize;
        if chat
            && tx
                .send(data(chunk(Some(""), None, true, Value::Null)))
                .await
                .is_err()
        {
            return;
        }
        first &= !chat;
        loop {
            let ev = tokio::select! {
                ev = events.recv() => ev,
                // The client closed the connection: dropping `events` cancels the sequence
                // and frees its KV cache in the next step.
                _ = tx.closed() => return,
            };
            let (piece, finish) = match prog.on(&app, ev) {
                Step::Text(t) => (t, None),
                Step::Finished(f, t) => (t, Some(f)),
                Step::Failed(e) => {
                    let _ = tx.send(data(e.json())).await;
                    return;
                }
            };
            // Logprobs go with the text they belong to (a held-back piece's with the next).
            if !piece.is_empty() {
                let lp = logprobs_json(&app, chat, want_logprobs, &prog.logprobs, offset);
                offset += piece.chars().count();
                prog.logprobs.clear();
                if tx
                    .send(data(chunk(Some(&piece), None, first, lp)))
                    .await
                    .is_err()
                {
                    return;
                }
            }
            first = false;
            if let Some(f) = finish {
                drop(events);
                let lp = if prog.logprobs.is_empty() {
                    Value::Null
                } else {
                    logprobs_json(&app, chat, want_logprobs, &prog.logprobs, offset)
                };
                let mut last = vec![chunk(None, Some(f), false, lp)];
                if include_usage {
                    let mut u = chunk(None, None, false, Value::Null);
                    u["choices"] = json!([]);
                    u["usage"] = usage(prog.completion_tokens);
                    last.push(u);
                }
                for v in last {
                    if tx.send(data(v)).await.is_err() {
                        return;
                    }
                }
                let _ = tx.send(Ok(SseEvent::default().data("[DONE]"))).await;
                return;
            }
        }
    });
    Ok(Sse::new(tokio_stream::wrappers::ReceiverStream::new(rx))
        .keep_alive(KeepAlive::default())
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[tokio::test]
    async fn a_write_the_peer_never_reads_fails_after_the_write_timeout() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let peer = tokio::net::TcpStream::connect(l.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = l.accept().await.unwrap();
        let mut w = WriteTimeout::new(server, Duration::from_millis(300));
        let chunk = vec![7u8; 64 << 10];
        let t = std::time::Instant::now();
        let mut sent = 0usize;
        let err = loop {
            match w.write_all(&chunk).await {
                Ok(()) => sent += chunk.len(),
                Err(e) => break e,
            }
            assert!(sent < 1 << 30, "1 GiB went into a peer that reads nothing");
        };
        assert_eq!(err.kind(), std::io::ErrorKind::TimedOut);
        assert!(t.elapsed() >= Duration::from_millis(300));
        // The socket buffers took what they could before the stall.
        assert!(sent > 0);
        drop(peer);
    }
}
