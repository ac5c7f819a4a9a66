//! The cluster commands: `tessera worker`, `tessera coordinator`, `tessera run`, and the
//! client side of `tessera generate --coordinator`.

use crate::ModelArgs;
use anyhow::{Context, bail};
use clap::Args;
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};
use tessera_coordinator::http::HttpConfig;
use tessera_coordinator::{CoordinatorConfig, CoordinatorState, SchedulerConfig};
use tessera_model::Backend;
use tessera_proto::coordinator_client::CoordinatorClient;
use tessera_proto::secure::ClusterKeys;
use tessera_proto::{Empty, GenerateRequest, generate_event};
use tessera_worker::WorkerConfig;

#[derive(Args)]
pub struct TokenArg {
    /// The cluster secret; every worker and client must present the same one
    #[arg(long, env = "TESSERA_TOKEN", hide_env_values = true)]
    pub token: String,
}

#[derive(Args)]
pub struct WorkerArgs {
    /// Address for this worker's gRPC service (port 0: any free port)
    #[arg(long, default_value = "0.0.0.0:7070")]
    listen: SocketAddr,
    /// Address for this worker's QUIC all-reduce endpoint
    #[arg(long, default_value = "0.0.0.0:7071")]
    quic_listen: SocketAddr,
    /// The coordinator's address (HOST:PORT)
    #[arg(long)]
    coordinator: String,
    #[command(flatten)]
    token: TokenArg,
    /// Name shown in the cluster status (default: host name and port)
    #[arg(long)]
    name: Option<String>,
    /// cpu or wgpu
    #[arg(long, default_value = "cpu")]
    backend: Backend,
    /// A local copy of the model: used instead of receiving the shard when its sha256 matches
    #[arg(long)]
    model: Option<PathBuf>,
    /// Memory this worker offers, in GiB (weights the shard plan; default: the machine's)
    #[arg(long)]
    memory_gib: Option<f64>,
    /// Serve GET /health over plain HTTP on this address (for container and Kubernetes probes)
    #[arg(long)]
    health_listen: Option<SocketAddr>,
    /// Threads for the CPU kernels (default: the cores this process may use)
    #[arg(long)]
    threads: Option<usize>,
    /// Stand by: registered and checked, but used only to replace a failed worker (or to
    /// reach the coordinator's --workers), never grown into with --grow
    #[arg(long)]
    standby: bool,
}

/// How the coordinator serves requests: the HTTP API and the batching scheduler.
#[derive(Args, Clone)]
pub struct ServeArgs {
    /// API key clients must send to the HTTP API (Authorization: Bearer KEY); none: open
    #[arg(long, env = "TESSERA_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Requests that may wait for a slot; more are refused (HTTP 429)
    #[arg(long, default_value_t = 64)]
    max_queue: usize,
    /// Sequences decoded together in one step (continuous batching)
    #[arg(long, default_value_t = 16)]
    max_seqs: usize,
    /// KV cache memory all active sequences may reserve over the cluster, in GiB
    #[arg(long, default_value_t = 2.0)]
    kv_cache_gib: f64,
    /// Prompt tokens prefilled per step, so long prompts do not stall others' decoding
    #[arg(long, default_value_t = 512)]
    prefill_chunk: usize,
    /// How workers send each other their partial sums: f32 (exact), bf16, or q8 (Q8_0 blocks,
    /// a quarter of the bytes); every worker still sums the same bits
    #[arg(long, default_value = "f32")]
    wire: tessera_collective::Wire,
    /// Seconds an HTTP client may take to send a request's headers, and then its body (a
    /// slow or stalled client is answered 408 and dropped)
    #[arg(long, default_value_t = 10.0)]
    http_read_timeout: f64,
    /// Seconds an HTTP client may leave the answer unread before the connection is dropped
    #[arg(long, default_value_t = 60.0)]
    http_write_timeout: f64,
    /// Largest HTTP request body, in MiB (larger: 413)
    #[arg(long, default_value_t = 8)]
    http_max_body_mib: usize,
    /// Open HTTP connections at most; more are closed at once
    #[arg(long, default_value_t = 1024)]
    http_max_connections: usize,
}

impl Default for ServeArgs {
    fn default() -> Self {
        ServeArgs {
            api_key: None,
            max_queue: 64,
            max_seqs: 16,
            kv_cache_gib: 2.0,
            prefill_chunk: 512,
            wire: tessera_collective::Wire::F32,
            http_read_timeout: 10.0,
            http_write_timeout: 60.0,
            http_max_body_mib: 8,
            http_max_connections: 1024,
        }
    }
}

impl ServeArgs {
    /// The defaults, with partial sums sent as `wire`.
    pub fn with_wire(wire: tessera_collective::Wire) -> ServeArgs {
        ServeArgs {
            wire,
            ..Default::default()
        }
    }

    fn scheduler(
        &self,
        model: &std::path::Path,
        exact: bool,
        kv_cache: Option<tessera_core::CacheType>,
    ) -> anyhow::Result<SchedulerConfig> {
        let files = tessera_model::ModelFiles::open(model)?;
        let c = &files.cfg;
        // K and V for every layer and KV head, in the workers' cache type.
        let ty = files.cache_type(tessera_model::Precision::of(exact), kv_cache);
        let per_position = ty.bytes_per_position(c) as f64;
        let kv_budget = (self.kv_cache_gib * (1u64 << 30) as f64 / per_position) as usize;
        if kv_budget < c.max_context.min(1024) {
            bail!(
                "--kv-cache-gib {} holds only {kv_budget} positions of this model's KV cache;                  give it at least {:.3}",
                self.kv_cache_gib,
                c.max_context.min(1024) as f64 * per_position / (1u64 << 30) as f64
            );
        }
        if self.max_seqs == 0 || self.prefill_chunk == 0 {
            bail!("--max-seqs and --prefill-chunk must be at least 1");
        }
        Ok(SchedulerConfig {
            max_queue: self.max_queue,
            max_seqs: self.max_seqs,
            kv_budget,
            prefill_chunk: self.prefill_chunk,
        })
    }

    fn http(&self) -> HttpConfig {
        let secs = |s: f64| Duration::from_secs_f64(s.clamp(0.05, 86400.0));
        HttpConfig {
            api_key: self.api_key.clone(),
            read_timeout: secs(self.http_read_timeout),
            write_timeout: secs(self.http_write_timeout),
            max_body: self.http_max_body_mib.max(1) << 20,
            max_connections: self.http_max_connections.max(1),
        }
    }
}

#[derive(Args)]
pub struct CoordinatorArgs {
    /// Model folder, .gguf file, or a pulled model's name
    #[arg(long, short = 'm')]
    model: String,
    /// Address for the coordinator's gRPC service
    #[arg(long, default_value = "0.0.0.0:7060")]
    listen: SocketAddr,
    /// How many workers to wait for
    #[arg(long)]
    workers: usize,
    /// When more workers register, reshard over all of them (at an idle moment); without it
    /// extra workers stand by to replace a failed one
    #[arg(long)]
    grow: bool,
    #[command(flatten)]
    token: TokenArg,
    /// Serve the OpenAI-compatible HTTP API on this address (for example 0.0.0.0:8080)
    #[arg(long)]
    http: Option<SocketAddr>,
    #[command(flatten)]
    serve: ServeArgs,
    /// Workers compute with f32 activations against the weight blocks (the exact path, which
    /// reproduces transformers' outputs); default: quantized activations, as llama.cpp does
    #[arg(long, env = "TESSERA_EXACT")]
    exact: bool,
    /// What the workers' KV caches hold, f32 or f16 (default: f16 on the fast path over
    /// quantized weights, f32 with --exact and for dense weights; a GPU's is f32)
    #[arg(long, env = "TESSERA_KV")]
    kv_cache: Option<tessera_core::CacheType>,
}

#[derive(Args)]
pub struct RunArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Worker processes to start on this machine
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// Address for the coordinator's gRPC service
    #[arg(long, default_value = "127.0.0.1:7060")]
    listen: SocketAddr,
    /// Answer this prompt and exit, instead of serving
    #[arg(long, short = 'p')]
    prompt: Option<String>,
    #[command(flatten)]
    options: crate::GenOptions,
    /// The cluster secret (default: a random one for this run)
    #[arg(long, env = "TESSERA_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Address of the OpenAI-compatible HTTP API (port 0: any free port)
    #[arg(long, default_value = "127.0.0.1:8080")]
    http: SocketAddr,
    /// Do not serve the HTTP API
    #[arg(long)]
    no_http: bool,
    #[command(flatten)]
    serve: ServeArgs,
}

/// Memory a worker offers by default: what this machine has available, or its cgroup's limit
/// where lower (a container's memory limit, say).
fn machine_memory() -> u64 {
    tessera_core::mem::available_bytes().unwrap_or(8 << 30)
}

pub fn worker(a: WorkerArgs) -> anyhow::Result<()> {
    crate::init_threads(a.threads)?;
    let name = a.name.unwrap_or_else(|| {
        let host = std::fs::read_to_string("/etc/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "worker".into());
        format!("{host}:{}", a.listen.port())
    });
    let cfg = WorkerConfig {
        listen: a.listen,
        quic_listen: a.quic_listen,
        coordinator: a.coordinator,
        token: a.token.token,
        name,
        backend: a.backend,
        model: a
            .model
            .map(|m| crate::resolve_model(m.to_str().unwrap_or_default()))
            .transpose()?,
        memory_bytes: a
            .memory_gib
            .map_or_else(machine_memory, |g| (g * (1u64 << 30) as f64) as u64),
        health_listen: a.health_listen,
        standby: a.standby,
    };
    runtime()?.block_on(tessera_worker::run(cfg))
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

async fn bind_http(
    addr: Option<SocketAddr>,
    serve: &ServeArgs,
) -> anyhow::Result<Option<(tokio::net::TcpListener, HttpConfig)>> {
    let Some(addr) = addr else { return Ok(None) };
    let l = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the HTTP API to {addr}"))?;
    eprintln!("HTTP API on http://{}/v1", l.local_addr()?);
    Ok(Some((l, serve.http())))
}

pub fn coordinator(a: CoordinatorArgs) -> anyhow::Result<()> {
    let model = crate::resolve_model(&a.model)?;
    let state = CoordinatorState::new(&CoordinatorConfig {
        scheduler: a.serve.scheduler(&model, a.exact, a.kv_cache)?,
        model,
        model_name: crate::model_name(&a.model),
        workers: a.workers,
        grow: a.grow,
        token: a.token.token,
        exact: a.exact,
        kv_cache: a.kv_cache,
        wire: a.serve.wire,
    })?;
    runtime()?.block_on(async move {
        let listener = tokio::net::TcpListener::bind(a.listen)
            .await
            .with_context(|| format!("binding {}", a.listen))?;
        let http = bind_http(a.http, &a.serve).await?;
        eprintln!(
            "coordinator listening on {}, waiting for {} worker(s)",
            listener.local_addr()?,
            a.workers
        );
        tessera_coordinator::serve(state, listener, http).await
    })
}

/// Kills the worker processes when `tessera run` ends, however it ends.
struct Children(Vec<Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Local {
    fn drop(&mut self) {
        // No step may be in flight when the workers go.
        self.state.scheduler.shutdown();
    }
}

/// A coordinator in this process and worker processes on loopback, stopped when dropped.
pub struct Local {
    pub rt: tokio::runtime::Runtime,
    pub addr: SocketAddr,
    pub token: String,
    pub state: std::sync::Arc<CoordinatorState>,
    _children: Children,
}

fn random_token() -> String {
    tessera_proto::secure::fresh_secret().expect("the system's random source")
}

pub fn start_local(
    model: &ModelArgs,
    workers: usize,
    listen: SocketAddr,
    token: Option<String>,
    http: Option<SocketAddr>,
    serve: &ServeArgs,
) -> anyhow::Result<Local> {
    let path = crate::resolve_model(&model.model)?;
    let token = token.unwrap_or_else(random_token);
    let state = CoordinatorState::new(&CoordinatorConfig {
        scheduler: serve.scheduler(&path, model.compute.exact, model.compute.kv_cache)?,
        model: path,
        model_name: crate::model_name(&model.model),
        workers,
        grow: false,
        token: token.clone(),
        exact: model.compute.exact,
        kv_cache: model.compute.kv_cache,
        wire: serve.wire,
    })?;
    let rt = runtime()?;
    let listener = rt
        .block_on(tokio::net::TcpListener::bind(listen))
        .with_context(|| format!("binding {listen}"))?;
    let addr = listener.local_addr()?;
    let http = rt.block_on(bind_http(http, serve))?;
    rt.spawn(tessera_coordinator::serve(state.clone(), listener, http));
    let exe = std::env::current_exe()?;
    // The workers share this machine: each offers an equal part of its memory.
    let share_gib = format!(
        "{:.3}",
        machine_memory() as f64 / workers.max(1) as f64 / (1u64 << 30) as f64
    );
    let mut children = Children(Vec::new());
    let cpus = allowed_cpus();
    let threads = worker_threads(&model.compute, workers);
    for i in 0..workers {
        let mut cmd = std::process::Command::new(&exe);
        cmd.args([
            "worker",
            "--listen",
            "127.0.0.1:0",
            "--quic-listen",
            "127.0.0.1:0",
            "--coordinator",
            &addr.to_string(),
        ])
        .args([
            "--name",
            &format!("worker-{i}"),
            "--backend",
            model.backend.name(),
            "--memory-gib",
            &share_gib,
        ])
        .env("TESSERA_TOKEN", &token)
        // The cores are shared out: workers that each took every core would take turns on
        // them, and the one waiting at an all-reduce could not spin on the socket.
        .args(["--threads", &threads.to_string()])
        .env(
            "TESSERA_SPIN_US",
            std::env::var("TESSERA_SPIN_US").unwrap_or_else(|_| {
                if workers * threads > cpus.len() {
                    "0"
                } else {
                    "1000"
                }
                .into()
            }),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::null());
        // The workers die with this process, even when it is killed outright.
        #[cfg(target_os = "linux")]
        {
            use std::os::unix::process::CommandExt;
            let pin = (model.compute.pin && !cpus.is_empty()).then(|| cpus[i % cpus.len()]);
            // SAFETY: prctl and sched_setaffinity are async-signal-safe system calls; nothing
            // else runs between fork and exec.
            unsafe {
                cmd.pre_exec(move || {
                    if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    if let Some(core) = pin {
                        let mut set: libc::cpu_set_t = std::mem::zeroed();
                        libc::CPU_SET(core, &mut set);
                        if libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set) != 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                    }
                    Ok(())
                });
            }
        }
        let child = cmd.spawn().context("starting a worker process")?;
        children.0.push(child);
    }
    eprintln!("coordinator on {addr}: started {workers} worker process(es)");
    let started = Instant::now();
    while !state.is_ready() {
        for (i, c) in children.0.iter_mut().enumerate() {
            if let Some(status) = c.try_wait()? {
                bail!("worker-{i} exited during start-up ({status})");
            }
        }
        if started.elapsed() > Duration::from_secs(600) {
            bail!("the cluster did not become ready: {}", state.state());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(Local {
        rt,
        addr,
        token,
        state,
        _children: children,
    })
}

pub fn run(a: RunArgs) -> anyhow::Result<()> {
    // Answering one prompt needs no HTTP API (and must not take its port).
    let http = (!a.no_http && a.prompt.is_none()).then_some(a.http);
    let local = start_local(
        &a.model,
        a.workers,
        a.listen,
        a.token.clone(),
        http,
        &a.serve,
    )?;
    let (addr, token) = (local.addr, local.token.clone());
    match a.prompt {
        Some(prompt) => local.rt.block_on(remote_generate(
            &addr.to_string(),
            &token,
            &prompt,
            &a.options,
        )),
        None => {
            eprintln!("serving on {addr}; Ctrl-C stops");
            if a.token.is_none() {
                eprintln!("token for clients: {token}");
            }
            // Ctrl-C, or SIGTERM from a service manager: either way the workers go too.
            local.rt.block_on(async {
                let mut term =
                    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
                tokio::select! {
                    r = tokio::signal::ctrl_c() => r,
                    _ = term.recv() => Ok(()),
                }
            })?;
            Ok(())
        }
    }
}

/// Compute threads of each of `workers` worker processes on this machine: --threads, else
/// one core each when pinned, else the cores shared out.
pub fn worker_threads(c: &crate::ComputeArgs, workers: usize) -> usize {
    c.threads.unwrap_or_else(|| {
        if c.pin {
            1
        } else {
            (allowed_cpus().len() / workers.max(1)).max(1)
        }
    })
}

/// The CPUs this process may run on, in order.
#[cfg(target_os = "linux")]
fn allowed_cpus() -> Vec<usize> {
    // SAFETY: sched_getaffinity fills a cpu_set_t we own.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of_val(&set), &mut set) != 0 {
            return Vec::new();
        }
        (0..libc::CPU_SETSIZE as usize)
            .filter(|&c| libc::CPU_ISSET(c, &set))
            .collect()
    }
}

#[cfg(not(target_os = "linux"))]
fn allowed_cpus() -> Vec<usize> {
    (0..std::thread::available_parallelism().map_or(1, |n| n.get())).collect()
}

/// `tessera generate --coordinator`: submits a prompt and streams the answer.
pub async fn remote_generate(
    addr: &str,
    token: &str,
    prompt: &str,
    g: &crate::GenOptions,
) -> anyhow::Result<()> {
    let d = remote_stream(addr, token, prompt, g, true).await?;
    let decode = if d.decode_seconds > 0.0 {
        d.decode_steps as f64 / d.decode_seconds
    } else {
        0.0
    };
    eprintln!(
        "prompt tokens: {}, prefill: {:.1} tok/s, generated tokens: {}, decode: {:.1} tok/s, \
         weights read per token: {:.1} MB, effective bandwidth: {:.2} GB/s, \
         all-reduce: {:.0} us mean, {:.0}% of step time, logits sent: {:.0} bytes/step per worker",
        d.prompt_tokens,
        d.prompt_tokens as f64 / d.prefill_seconds.max(1e-9),
        d.generated_tokens,
        decode,
        d.weight_bytes_per_token as f64 / 1e6,
        d.weight_bytes_per_token as f64 * decode / 1e9,
        d.allreduce_mean_us,
        100.0 * d.comm_fraction,
        d.logits_bytes_per_step,
    );
    Ok(())
}

fn request(prompt: &str, g: &crate::GenOptions) -> GenerateRequest {
    GenerateRequest {
        prompt: prompt.to_string(),
        prompt_ids: vec![],
        max_tokens: g.max_tokens as u32,
        temperature: g.temperature,
        top_p: g.top_p,
        top_k: g.top_k as u32,
        seed: g.seed,
        ignore_eos: g.ignore_eos,
        chat: g.chat,
        messages: vec![],
        stop: g.stop.clone(),
        logprobs: None,
    }
}

/// Submits a prompt; prints the answer (text or ids) when `print`; returns the closing stats.
pub async fn remote_stream(
    addr: &str,
    token: &str,
    prompt: &str,
    g: &crate::GenOptions,
    print: bool,
) -> anyhow::Result<tessera_proto::Done> {
    let (done, _) = stream_request(addr, token, request(prompt, g), print, g.ids).await?;
    Ok(done)
}

/// A client of the coordinator at `addr`, over TLS trusted from the cluster token, and the
/// keys that authorize its calls.
async fn connect(
    addr: &str,
    token: &str,
) -> anyhow::Result<(CoordinatorClient<tonic::transport::Channel>, ClusterKeys)> {
    let keys = ClusterKeys::from_secret(token).map_err(anyhow::Error::msg)?;
    let ch = keys
        .channel(addr, |e| e)
        .await
        .map_err(|e| anyhow::anyhow!("{}", tessera_proto::secure::describe(&e)))
        .with_context(|| format!("connecting to the coordinator at {addr}"))?;
    Ok((CoordinatorClient::new(ch), keys))
}

/// Streams one request's answer (printed when `print`, as ids when `ids`); returns the
/// closing stats and the answer's text.
async fn stream_request(
    addr: &str,
    token: &str,
    req: GenerateRequest,
    print: bool,
    ids_mode: bool,
) -> anyhow::Result<(tessera_proto::Done, String)> {
    let (mut client, keys) = connect(addr, token).await?;
    let mut stream = client
        .generate(keys.request(req))
        .await
        .map_err(|s| anyhow::anyhow!("{}", s.message()))?
        .into_inner();
    // Not locked across awaits: the lock is not Send, and concurrent streams share stdout.
    let mut out = std::io::stdout();
    let mut ids = Vec::new();
    let mut text = String::new();
    loop {
        let ev = match stream.message().await {
            Ok(Some(ev)) => ev,
            Ok(None) => bail!("the coordinator ended the stream early"),
            Err(s) => bail!("generation failed: {}", s.message()),
        };
        match ev.event {
            Some(generate_event::Event::Token(t)) => {
                if t.id != u32::MAX {
                    ids.push(t.id);
                }
                text.push_str(&t.text);
                if print && !ids_mode {
                    out.write_all(t.text.as_bytes())?;
                    out.flush()?;
                }
            }
            Some(generate_event::Event::Done(d)) => {
                if print && ids_mode {
                    let line: Vec<String> = ids.iter().map(|t| t.to_string()).collect();
                    writeln!(out, "{}", line.join(" "))?;
                } else if print {
                    writeln!(out)?;
                }
                return Ok((d, text));
            }
            None => {}
        }
    }
}

#[derive(Args)]
pub struct ChatArgs {
    /// The coordinator's gRPC address (HOST:PORT)
    #[arg(long)]
    coordinator: String,
    #[command(flatten)]
    token: TokenArg,
    /// A system message that opens the conversation
    #[arg(long)]
    system: Option<String>,
    #[command(flatten)]
    options: crate::GenOptions,
}

/// `tessera chat`: an interactive conversation. Each line is a user message; the whole
/// history goes through the model's chat template every turn. /reset forgets, /exit leaves.
pub fn chat(a: ChatArgs) -> anyhow::Result<()> {
    use std::io::BufRead;
    let rt = runtime()?;
    let mut history: Vec<tessera_proto::ChatMessage> = Vec::new();
    let system = |h: &mut Vec<tessera_proto::ChatMessage>| {
        if let Some(s) = &a.system {
            h.push(tessera_proto::ChatMessage {
                role: "system".into(),
                content: s.clone(),
            });
        }
    };
    system(&mut history);
    eprintln!(
        "chatting with {} (/reset forgets the conversation, /exit or Ctrl-D leaves)",
        a.coordinator
    );
    let stdin = std::io::stdin();
    let mut lines = stdin.lock().lines();
    loop {
        eprint!("> ");
        let Some(line) = lines.next() else { break };
        let line = line?;
        let line = line.trim();
        match line {
            "" => continue,
            "/exit" | "/quit" => break,
            "/reset" => {
                history.clear();
                system(&mut history);
                eprintln!("(conversation forgotten)");
                continue;
            }
            _ => {}
        }
        history.push(tessera_proto::ChatMessage {
            role: "user".into(),
            content: line.to_string(),
        });
        let mut req = request("", &a.options);
        req.messages = history.clone();
        let started = Instant::now();
        match rt.block_on(stream_request(
            &a.coordinator,
            &a.token.token,
            req,
            true,
            false,
        )) {
            Ok((d, text)) => {
                history.push(tessera_proto::ChatMessage {
                    role: "assistant".into(),
                    content: text,
                });
                eprintln!(
                    "[{} tokens in {:.1} s: prefill {} tokens at {:.1} tok/s, decode {:.1} tok/s, {}]",
                    d.generated_tokens,
                    started.elapsed().as_secs_f64(),
                    d.prompt_tokens,
                    d.prompt_tokens as f64 / d.prefill_seconds.max(1e-9),
                    d.decode_steps as f64 / d.decode_seconds.max(1e-9),
                    d.finish_reason
                );
            }
            Err(e) => {
                // The question stays unanswered: drop it so the next turn can retry.
                history.pop();
                eprintln!("error: {e:#}");
            }
        }
    }
    Ok(())
}

pub fn status(addr: &str, token: &str) -> anyhow::Result<()> {
    runtime()?.block_on(async {
        let (mut c, keys) = connect(addr, token).await?;
        let s = c
            .status(keys.request(Empty {}))
            .await
            .map_err(|s| anyhow::anyhow!("{}", s.message()))?
            .into_inner();
        // A closed pipe (`| head`) is not an error worth a panic.
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "cluster: {} ({})", s.state, s.model);
        for w in s.workers {
            let _ = writeln!(
                out,
                "  #{} {} {} {} {} {:.1} GiB {}",
                w.id,
                w.name,
                w.grpc_addr,
                w.state,
                w.shard,
                w.memory_bytes as f64 / (1u64 << 30) as f64,
                w.backend
            );
        }
        Ok(())
    })
}

pub fn generate_remote(
    addr: &str,
    token: Option<String>,
    prompt: &str,
    g: &crate::GenOptions,
) -> anyhow::Result<()> {
    let token =
        token.context("--coordinator needs the cluster token (--token or TESSERA_TOKEN)")?;
    runtime()?.block_on(remote_generate(addr, &token, prompt, g))
}

/// `tessera probe URL`: exits 0 when an HTTP GET of URL answers 2xx (a health check for
/// container images that carry no curl).
pub fn probe(url: &str) -> anyhow::Result<()> {
    use std::io::Read;
    let rest = url
        .strip_prefix("http://")
        .context("probe takes an http:// URL")?;
    let (hostport, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let addr = std::net::ToSocketAddrs::to_socket_addrs(hostport)?
        .next()
        .with_context(|| format!("{hostport} does not resolve"))?;
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(3))
        .with_context(|| format!("connecting to {hostport}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {hostport}\r\nConnection: close\r\n\r\n"
    )?;
    let mut head = String::new();
    s.take(1 << 16).read_to_string(&mut head)?;
    let status = head.split_whitespace().nth(1).unwrap_or("");
    if status.starts_with('2') {
        Ok(())
    } else {
        bail!("{url} answered {:?}", head.lines().next().unwrap_or(""))
    }
}
