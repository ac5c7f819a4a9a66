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
use tessera_coordinator::{CoordinatorConfig, CoordinatorState};
use tessera_model::Backend;
use tessera_proto::coordinator_client::CoordinatorClient;
use tessera_proto::{Empty, GenerateRequest, generate_event};
use tessera_worker::{WorkerConfig, with_token};

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
    #[command(flatten)]
    token: TokenArg,
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
}

fn machine_memory() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemAvailable:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(8 << 30, |kb| kb * 1024)
}

pub fn worker(a: WorkerArgs) -> anyhow::Result<()> {
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
    };
    runtime()?.block_on(tessera_worker::run(cfg))
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

pub fn coordinator(a: CoordinatorArgs) -> anyhow::Result<()> {
    let model = crate::resolve_model(&a.model)?;
    let state = CoordinatorState::new(&CoordinatorConfig {
        model,
        workers: a.workers,
        token: a.token.token,
    })?;
    runtime()?.block_on(async move {
        let listener = tokio::net::TcpListener::bind(a.listen)
            .await
            .with_context(|| format!("binding {}", a.listen))?;
        eprintln!(
            "coordinator listening on {}, waiting for {} worker(s)",
            listener.local_addr()?,
            a.workers
        );
        tessera_coordinator::serve(state, listener).await
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

/// A coordinator in this process and worker processes on loopback, stopped when dropped.
pub struct Local {
    pub rt: tokio::runtime::Runtime,
    pub addr: SocketAddr,
    pub token: String,
    pub state: std::sync::Arc<CoordinatorState>,
    _children: Children,
}

fn random_token() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(Instant::now().elapsed().as_nanos() ^ std::process::id() as u128);
    let a = h.finish();
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(a);
    format!("{a:016x}{:016x}", h.finish())
}

pub fn start_local(
    model: &ModelArgs,
    workers: usize,
    listen: SocketAddr,
    token: Option<String>,
) -> anyhow::Result<Local> {
    let path = crate::resolve_model(&model.model)?;
    let token = token.unwrap_or_else(random_token);
    let state = CoordinatorState::new(&CoordinatorConfig {
        model: path,
        workers,
        token: token.clone(),
    })?;
    let rt = runtime()?;
    let listener = rt
        .block_on(tokio::net::TcpListener::bind(listen))
        .with_context(|| format!("binding {listen}"))?;
    let addr = listener.local_addr()?;
    rt.spawn(tessera_coordinator::serve(state.clone(), listener));
    let exe = std::env::current_exe()?;
    let mut children = Children(Vec::new());
    for i in 0..workers {
        let child = std::process::Command::new(&exe)
            .args([
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
                "1",
            ])
            .env("TESSERA_TOKEN", &token)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .context("starting a worker process")?;
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
    let local = start_local(&a.model, a.workers, a.listen, a.token.clone())?;
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
            local.rt.block_on(tokio::signal::ctrl_c())?;
            Ok(())
        }
    }
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
         all-reduce: {:.0} us mean, {:.0}% of step time",
        d.prompt_tokens,
        d.prompt_tokens as f64 / d.prefill_seconds.max(1e-9),
        d.generated_tokens,
        decode,
        d.weight_bytes_per_token as f64 / 1e6,
        d.weight_bytes_per_token as f64 * decode / 1e9,
        d.allreduce_mean_us,
        100.0 * d.comm_fraction,
    );
    Ok(())
}

/// Submits a prompt; prints the answer (text or ids) when `print`; returns the closing stats.
pub async fn remote_stream(
    addr: &str,
    token: &str,
    prompt: &str,
    g: &crate::GenOptions,
    print: bool,
) -> anyhow::Result<tessera_proto::Done> {
    let url = if addr.contains("://") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    };
    let mut client = CoordinatorClient::connect(url.clone())
        .await
        .with_context(|| format!("connecting to {url}"))?;
    let req = GenerateRequest {
        prompt: prompt.to_string(),
        prompt_ids: vec![],
        max_tokens: g.max_tokens as u32,
        temperature: g.temperature,
        top_p: g.top_p,
        top_k: g.top_k as u32,
        seed: g.seed,
        ignore_eos: g.ignore_eos,
        chat: g.chat,
    };
    let mut stream = client
        .generate(with_token(token, req))
        .await
        .map_err(|s| anyhow::anyhow!("{}", s.message()))?
        .into_inner();
    let mut out = std::io::stdout().lock();
    let mut ids = Vec::new();
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
                if print && !g.ids {
                    out.write_all(t.text.as_bytes())?;
                    out.flush()?;
                }
            }
            Some(generate_event::Event::Done(d)) => {
                if print && g.ids {
                    let line: Vec<String> = ids.iter().map(|t| t.to_string()).collect();
                    writeln!(out, "{}", line.join(" "))?;
                } else if print {
                    writeln!(out)?;
                }
                return Ok(d);
            }
            None => {}
        }
    }
}

pub fn status(addr: &str, token: &str) -> anyhow::Result<()> {
    runtime()?.block_on(async {
        let url = if addr.contains("://") {
            addr.to_string()
        } else {
            format!("http://{addr}")
        };
        let mut c = CoordinatorClient::connect(url).await?;
        let s = c
            .status(with_token(token, Empty {}))
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
