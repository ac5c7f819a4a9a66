//! The Tessera coordinator: waits for workers, plans the shards, ships each worker its slice,
//! drives every step over long-lived gRPC streams, samples, and serves generation requests.
//! A worker that fails marks the cluster degraded; when enough workers are registered again,
//! the coordinator reloads the shards on a fresh mesh and serves again.

use anyhow::Context;
use sha2::Digest;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tessera_collective::ClusterCa;
use tessera_core::ShardPlan;
use tessera_model::{
    GenerateParams, ModelError, ModelFiles, Runner, SamplingParams, TextStream, generate,
    shard_reads,
};
use tessera_proto::coordinator_server::{Coordinator, CoordinatorServer};
use tessera_proto::worker_client::WorkerClient;
use tessera_proto::*;
use tessera_worker::{check_token, with_token};
use tokio::sync::{Notify, mpsc};
use tokio_stream::Stream;
use tonic::transport::Channel;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

/// How long one step may take before the worker is declared failed.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(20);
const CHUNK: usize = 2 << 20;

pub struct CoordinatorConfig {
    pub model: std::path::PathBuf,
    pub workers: usize,
    pub token: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WState {
    Registered,
    Ready,
    Down,
}

struct WorkerEntry {
    id: u64,
    name: String,
    grpc_addr: String,
    quic_addr: String,
    backend: String,
    memory: u64,
    model_sha256: String,
    state: WState,
    rank: Option<usize>,
}

struct StepLink {
    name: String,
    addr: String,
    id: u64,
    tx: mpsc::Sender<StepRequest>,
    rx: Streaming<StepReply>,
}

/// The shards in remote workers, as a [`Runner`] for the engine's generation loop.
pub struct RemoteCluster {
    cfg: tessera_core::ModelConfig,
    links: Vec<StepLink>,
    weight_bytes: u64,
    handle: tokio::runtime::Handle,
    /// Set to the failed worker's id when a step fails.
    failed: Option<u64>,
    pub allreduce_ns: u64,
    pub allreduce_count: u64,
    pub step_ns: u64,
}

impl Runner for RemoteCluster {
    fn cfg(&self) -> &tessera_core::ModelConfig {
        &self.cfg
    }

    fn forward(&mut self, seq: u64, ids: &[u32], pos: usize) -> Result<Vec<f32>, ModelError> {
        tessera_model::check_step(&self.cfg, ids, pos)?;
        let started = Instant::now();
        let req = StepRequest {
            seq,
            pos: pos as u32,
            ids: ids.to_vec(),
            free: false,
        };
        let handle = self.handle.clone();
        let links = &mut self.links;
        let result: Result<Vec<f32>, (u64, ModelError)> = handle.block_on(async {
            for (rank, l) in links.iter().enumerate() {
                let fail = |why: &str| {
                    (
                        l.id,
                        ModelError::Shard {
                            rank,
                            msg: format!("worker {} ({}) {why}", l.name, l.addr),
                        },
                    )
                };
                l.tx.send(req.clone()).await.map_err(|_| fail("is gone"))?;
            }
            let mut logits = Vec::with_capacity(self.cfg.vocab);
            let mut reduce = (0u64, 0u64);
            let mut first_err = None;
            for (rank, l) in links.iter_mut().enumerate() {
                let fail = |why: String| {
                    (
                        l.id,
                        ModelError::Shard {
                            rank,
                            msg: format!("worker {} ({}) {why}", l.name, l.addr),
                        },
                    )
                };
                match tokio::time::timeout(STEP_TIMEOUT, l.rx.message()).await {
                    Ok(Ok(Some(r))) if r.error.is_empty() => {
                        logits.extend(r.logits);
                        reduce.0 += r.allreduce_ns;
                        reduce.1 += r.allreduce_count as u64;
                    }
                    Ok(Ok(Some(r))) => {
                        first_err.get_or_insert(fail(format!("failed the step: {}", r.error)));
                    }
                    Ok(Ok(None)) => {
                        first_err.get_or_insert(fail("closed its step stream".into()));
                    }
                    Ok(Err(s)) => {
                        first_err.get_or_insert(fail(format!("failed: {}", s.message())));
                    }
                    Err(_) => {
                        first_err
                            .get_or_insert(fail(format!("did not answer within {STEP_TIMEOUT:?}")));
                    }
                }
            }
            if let Some(e) = first_err {
                return Err(e);
            }
            // Per worker averages: every worker runs the same all-reduces.
            let n = links.len() as u64;
            self.allreduce_ns += reduce.0 / n;
            self.allreduce_count += reduce.1 / n;
            Ok(logits)
        });
        self.step_ns += started.elapsed().as_nanos() as u64;
        result.map_err(|(id, e)| {
            self.failed = Some(id);
            e
        })
    }

    fn free(&mut self, seq: u64) {
        let req = StepRequest {
            seq,
            free: true,
            ..Default::default()
        };
        let handle = self.handle.clone();
        let links = &mut self.links;
        let failed = handle.block_on(async {
            for l in links.iter() {
                if l.tx.send(req.clone()).await.is_err() {
                    return Some(l.id);
                }
            }
            for l in links.iter_mut() {
                if !matches!(
                    tokio::time::timeout(STEP_TIMEOUT, l.rx.message()).await,
                    Ok(Ok(Some(_)))
                ) {
                    return Some(l.id);
                }
            }
            None
        });
        if failed.is_some() {
            self.failed = failed;
        }
    }

    fn weight_bytes_per_token(&self) -> u64 {
        self.weight_bytes
    }
}

struct Inner {
    workers: BTreeMap<u64, WorkerEntry>,
    next_id: u64,
    mesh_id: u64,
    runner: Option<Arc<tokio::sync::Mutex<RemoteCluster>>>,
    state: &'static str,
}

pub struct CoordinatorState {
    files: Arc<ModelFiles>,
    model_sha256: String,
    n: usize,
    token: String,
    ca: ClusterCa,
    inner: Mutex<Inner>,
    changed: Notify,
    pub load_seconds: Mutex<Option<f64>>,
}

impl CoordinatorState {
    pub fn new(cfg: &CoordinatorConfig) -> anyhow::Result<Arc<CoordinatorState>> {
        let files = ModelFiles::open(&cfg.model)?;
        ShardPlan::new(&files.cfg, cfg.workers)?;
        let model_sha256 = if cfg.model.is_file() {
            tessera_worker::sha256_file(&cfg.model)?
        } else {
            String::new()
        };
        Ok(Arc::new(CoordinatorState {
            files: Arc::new(files),
            model_sha256,
            n: cfg.workers,
            token: cfg.token.clone(),
            ca: ClusterCa::new()?,
            inner: Mutex::new(Inner {
                workers: BTreeMap::new(),
                next_id: 1,
                mesh_id: 0,
                runner: None,
                state: "waiting for workers",
            }),
            changed: Notify::new(),
            load_seconds: Mutex::new(None),
        }))
    }

    pub fn is_ready(&self) -> bool {
        self.inner.lock().unwrap().runner.is_some()
    }

    pub fn state(&self) -> String {
        self.inner.lock().unwrap().state.to_string()
    }

    /// Marks a worker down and the cluster degraded.
    fn fail_worker(&self, id: u64) {
        let mut g = self.inner.lock().unwrap();
        if let Some(w) = g.workers.get_mut(&id) {
            tracing::warn!(worker = %w.name, "worker failed; cluster degraded");
            w.state = WState::Down;
        }
        g.runner = None;
        g.state = "degraded";
        drop(g);
        self.changed.notify_one();
    }

    /// Waits for enough workers, then plans and loads them; again after any failure.
    pub async fn supervise(self: Arc<Self>) {
        loop {
            let todo = {
                let mut g = self.inner.lock().unwrap();
                let live: Vec<u64> = g
                    .workers
                    .values()
                    .filter(|w| w.state != WState::Down)
                    .map(|w| w.id)
                    .collect();
                if g.runner.is_none() && live.len() >= self.n {
                    g.mesh_id += 1;
                    g.state = "loading";
                    // Until the new mesh is up none of them is ready (the health check would
                    // otherwise take a worker between two shards for a failed one).
                    for w in g.workers.values_mut() {
                        if w.state == WState::Ready {
                            w.state = WState::Registered;
                            w.rank = None;
                        }
                    }
                    Some((live[live.len() - self.n..].to_vec(), g.mesh_id))
                } else {
                    None
                }
            };
            if let Some((ids, mesh)) = todo {
                match self.clone().load_all(&ids, mesh).await {
                    Ok(()) => {}
                    Err((id, e)) => {
                        tracing::error!("loading the shards failed: {e:#}");
                        eprintln!("loading the shards failed: {e:#}");
                        if let Some(id) = id {
                            self.fail_worker(id);
                        } else {
                            self.inner.lock().unwrap().state = "degraded";
                        }
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                }
                continue;
            }
            self.changed.notified().await;
        }
    }

    async fn load_all(
        self: Arc<Self>,
        ids: &[u64],
        mesh_id: u64,
    ) -> Result<(), (Option<u64>, anyhow::Error)> {
        let started = Instant::now();
        let (plan, members) = {
            let g = self.inner.lock().unwrap();
            let members: Vec<(u64, String, String, String, bool)> = ids
                .iter()
                .map(|id| {
                    let w = &g.workers[id];
                    let local =
                        !self.model_sha256.is_empty() && w.model_sha256 == self.model_sha256;
                    (
                        w.id,
                        w.name.clone(),
                        w.grpc_addr.clone(),
                        w.quic_addr.clone(),
                        local,
                    )
                })
                .collect();
            // Weighted by declared memory: a bigger worker takes a bigger slice.
            let weights: Vec<f64> = ids
                .iter()
                .map(|id| (g.workers[id].memory.max(1)) as f64)
                .collect();
            let plan = ShardPlan::weighted(&self.files.cfg, &weights)
                .or_else(|_| ShardPlan::new(&self.files.cfg, ids.len()))
                .map_err(|e| (None, e.into()))?;
            (plan, members)
        };
        let peers: Vec<Peer> = members
            .iter()
            .enumerate()
            .map(|(r, m)| Peer {
                rank: r as u32,
                name: m.1.clone(),
                quic_addr: m.3.clone(),
            })
            .collect();
        let mut tasks = Vec::new();
        for (rank, m) in members.iter().cloned().enumerate() {
            let spec = plan.shards[rank].clone();
            let st = self.clone();
            let peers = peers.clone();
            tasks.push(tokio::spawn(async move {
                let span =
                    tracing::debug_span!("load", rank = spec.rank, worker = %m.1, mesh = mesh_id);
                let r = st
                    .load_one(&m.2, &spec, peers, mesh_id, m.4)
                    .instrument(span)
                    .await;
                (m.0, r)
            }));
        }
        let mut bytes = 0;
        let mut clients = Vec::new();
        let mut first_err = None;
        for t in tasks {
            let (id, r) = t.await.map_err(|e| (None, e.into()))?;
            match r {
                Ok((b, c)) => {
                    bytes += b;
                    clients.push((id, c));
                }
                Err(e) => {
                    first_err.get_or_insert((Some(id), e));
                }
            }
        }
        if let Some(e) = first_err {
            return Err(e);
        }
        let mut links = Vec::new();
        for (rank, (id, mut client)) in clients.into_iter().enumerate() {
            let (tx, rx) = mpsc::channel::<StepRequest>(4);
            let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
            let resp = client
                .step(with_token(&self.token, stream))
                .await
                .map_err(|s| (Some(id), anyhow::anyhow!("{}", s.message())))?;
            links.push(StepLink {
                name: members[rank].1.clone(),
                addr: members[rank].2.clone(),
                id,
                tx,
                rx: resp.into_inner(),
            });
        }
        let runner = RemoteCluster {
            cfg: self.files.cfg.clone(),
            links,
            weight_bytes: bytes,
            handle: tokio::runtime::Handle::current(),
            failed: None,
            allreduce_ns: 0,
            allreduce_count: 0,
            step_ns: 0,
        };
        let secs = started.elapsed().as_secs_f64();
        *self.load_seconds.lock().unwrap() = Some(secs);
        let mut g = self.inner.lock().unwrap();
        for (rank, id) in ids.iter().enumerate() {
            if let Some(w) = g.workers.get_mut(id) {
                w.state = WState::Ready;
                w.rank = Some(rank);
            }
        }
        g.runner = Some(Arc::new(tokio::sync::Mutex::new(runner)));
        g.state = "ready";
        tracing::info!(mesh = mesh_id, secs, "cluster ready");
        eprintln!(
            "cluster ready: {} worker(s), shards loaded in {secs:.2} s",
            ids.len()
        );
        Ok(())
    }

    async fn load_one(
        &self,
        addr: &str,
        spec: &tessera_core::ShardSpec,
        peers: Vec<Peer>,
        mesh_id: u64,
        local: bool,
    ) -> anyhow::Result<(u64, WorkerClient<Channel>)> {
        let mut client = WorkerClient::connect(format!("http://{addr}"))
            .await
            .with_context(|| format!("connecting to worker {addr}"))?
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20);
        let files = self.files.clone();
        let spec2 = spec.clone();
        // Read and cut the blocks off the async runtime; hash them as they go.
        let blocks = if local {
            Vec::new()
        } else {
            tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<TensorBlock>> {
                let mut out = Vec::new();
                for (t, rows, cols) in shard_reads(&files.cfg, &spec2, &files.weights) {
                    let data = files.weights.read(t, rows.clone(), cols.clone())?;
                    let shape: Vec<u64> = files
                        .weights
                        .shape(t)
                        .unwrap_or_default()
                        .iter()
                        .map(|&d| d as u64)
                        .collect();
                    let bytes: Vec<u8> = data.iter().flat_map(|x| x.to_le_bytes()).collect();
                    for (i, c) in bytes.chunks(CHUNK).enumerate() {
                        out.push(TensorBlock {
                            name: t.key(),
                            shape: shape.clone(),
                            row_start: rows.start as u64,
                            row_end: rows.end as u64,
                            col_start: cols.start as u64,
                            col_end: cols.end as u64,
                            offset: (i * CHUNK) as u64,
                            data: c.to_vec(),
                        });
                    }
                }
                Ok(out)
            })
            .await??
        };
        let mut h = sha2::Sha256::new();
        let mut total = 0u64;
        for b in &blocks {
            h.update(&b.data);
            total += b.data.len() as u64;
        }
        let assignment = Assignment {
            config_json: serde_json::to_string(&self.files.cfg)?,
            spec_json: serde_json::to_string(spec)?,
            peers,
            mesh_id,
            use_local_model: local,
            total_bytes: total,
            sha256: format!("{:x}", h.finalize()),
        };
        let bar = indicatif::ProgressBar::new(total);
        bar.set_style(
            indicatif::ProgressStyle::with_template("shard {msg} [{bar:30}] {bytes}/{total_bytes}")
                .expect("template")
                .progress_chars("=> "),
        );
        bar.set_message(format!("{} -> {addr}", spec.rank));
        let first = LoadChunk {
            chunk: Some(load_chunk::Chunk::Assignment(assignment)),
        };
        let bar2 = bar.clone();
        let stream = tokio_stream::iter(std::iter::once(first).chain(blocks.into_iter().map(
            move |b| {
                bar2.inc(b.data.len() as u64);
                LoadChunk {
                    chunk: Some(load_chunk::Chunk::Block(b)),
                }
            },
        )));
        let reply = client
            .load(with_token(&self.token, stream))
            .await
            .map_err(|s| {
                anyhow::anyhow!("worker {addr} could not load its shard: {}", s.message())
            })?;
        bar.finish_and_clear();
        let reply = reply.into_inner();
        if local {
            eprintln!(
                "shard {} -> {addr}: read from the worker's own copy of the model in {:.2} s",
                spec.rank, reply.seconds
            );
        } else {
            eprintln!(
                "shard {} -> {addr}: shipped {:.1} MB (sha256 checked) in {:.2} s",
                spec.rank,
                total as f64 / 1e6,
                reply.seconds
            );
        }
        Ok((reply.weight_bytes_per_token, client))
    }

    /// Checks the ready workers every second; a silent one degrades the cluster.
    pub async fn health_loop(self: Arc<Self>) {
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let ready: Vec<(u64, String)> = {
                let g = self.inner.lock().unwrap();
                g.workers
                    .values()
                    .filter(|w| w.state == WState::Ready)
                    .map(|w| (w.id, w.grpc_addr.clone()))
                    .collect()
            };
            for (id, addr) in ready {
                let ok = tokio::time::timeout(Duration::from_secs(3), async {
                    let mut c = WorkerClient::connect(format!("http://{addr}")).await.ok()?;
                    c.health(with_token(&self.token, Empty {})).await.ok()
                })
                .await
                .ok()
                .flatten()
                .is_some_and(|r| r.into_inner().state == "ready");
                if !ok
                    && self
                        .inner
                        .lock()
                        .unwrap()
                        .workers
                        .get(&id)
                        .is_some_and(|w| w.state == WState::Ready)
                {
                    self.fail_worker(id);
                }
            }
        }
    }
}

pub struct CoordinatorService {
    pub state: Arc<CoordinatorState>,
}

impl CoordinatorService {
    async fn register_inner(
        &self,
        req: Request<RegisterRequest>,
    ) -> Result<Response<RegisterReply>, Status> {
        let st = &self.state;
        let remote = req.remote_addr();
        if let Err(e) = check_token(&st.token, req.metadata()) {
            tracing::warn!(?remote, "refused a registration without the cluster token");
            eprintln!(
                "refused a worker registration from {remote:?}: wrong or missing cluster token"
            );
            return Err(e);
        }
        let r = req.into_inner();
        if r.protocol_version != PROTOCOL_VERSION {
            return Err(Status::failed_precondition(format!(
                "worker speaks protocol version {}, this coordinator speaks {PROTOCOL_VERSION}",
                r.protocol_version
            )));
        }
        for a in [&r.grpc_addr, &r.quic_addr] {
            a.parse::<SocketAddr>()
                .map_err(|_| Status::invalid_argument(format!("bad address {a:?}")))?;
        }
        let cert = st
            .ca
            .issue(&r.public_key_der, &r.name)
            .map_err(|e| Status::invalid_argument(format!("public key: {e}")))?;
        let mut g = st.inner.lock().unwrap();
        let id = g.next_id;
        g.next_id += 1;
        // A worker that comes back under the same name replaces its old entry.
        let stale: Vec<u64> = g
            .workers
            .values()
            .filter(|w| w.name == r.name)
            .map(|w| w.id)
            .collect();
        let mut replaced_ready = false;
        for s in stale {
            if let Some(w) = g.workers.remove(&s) {
                replaced_ready |= w.state == WState::Ready;
            }
        }
        if replaced_ready {
            g.runner = None;
            g.state = "degraded";
        }
        g.workers.insert(
            id,
            WorkerEntry {
                id,
                name: r.name.clone(),
                grpc_addr: r.grpc_addr,
                quic_addr: r.quic_addr,
                backend: r.backend,
                memory: r.memory_bytes,
                model_sha256: r.model_sha256,
                state: WState::Registered,
                rank: None,
            },
        );
        drop(g);
        tracing::info!(id, name = %r.name, "worker registered");
        st.changed.notify_one();
        Ok(Response::new(RegisterReply {
            worker_id: id,
            certificate_der: cert,
            ca_der: st.ca.ca_der(),
        }))
    }
}

type GenStream = Pin<Box<dyn Stream<Item = Result<GenerateEvent, Status>> + Send>>;

#[tonic::async_trait]
impl Coordinator for CoordinatorService {
    async fn register(
        &self,
        req: Request<RegisterRequest>,
    ) -> Result<Response<RegisterReply>, Status> {
        let span = tracing::debug_span!("register", name = %req.get_ref().name, remote = ?req.remote_addr());
        self.register_inner(req).instrument(span).await
    }

    type GenerateStream = GenStream;

    async fn generate(&self, req: Request<GenerateRequest>) -> Result<Response<GenStream>, Status> {
        let st = self.state.clone();
        check_token(&st.token, req.metadata())?;
        let r = req.into_inner();
        // Not in one expression: the guard would still be held when `state()` locks again.
        let runner = st.inner.lock().unwrap().runner.clone();
        let runner =
            runner.ok_or_else(|| Status::unavailable(format!("cluster is {}", st.state())))?;
        let files = st.files.clone();
        let prompt = if r.prompt_ids.is_empty() {
            let text = if r.chat {
                let user = tessera_model::chat::Message {
                    role: "user".into(),
                    content: r.prompt.clone(),
                };
                files
                    .render_chat(&[user])
                    .map_err(|e| Status::invalid_argument(e.to_string()))?
            } else {
                r.prompt.clone()
            };
            files
                .tokenizer
                .encode(&text)
                .map_err(|e| Status::invalid_argument(e.to_string()))?
        } else {
            r.prompt_ids.clone()
        };
        if prompt.len() > files.cfg.max_context {
            return Err(Status::invalid_argument(
                ModelError::PromptTooLong {
                    prompt: prompt.len(),
                    context: files.cfg.max_context,
                }
                .to_string(),
            ));
        }
        let params = GenerateParams {
            max_tokens: if r.max_tokens == 0 {
                128
            } else {
                r.max_tokens as usize
            },
            sampling: SamplingParams {
                temperature: r.temperature,
                top_k: r.top_k as usize,
                top_p: if r.top_p <= 0.0 { 1.0 } else { r.top_p },
                seed: r.seed,
            },
            ignore_eos: r.ignore_eos,
        };
        let (tx, rx) = mpsc::channel::<Result<GenerateEvent, Status>>(64);
        tokio::spawn(async move {
            let mut guard = runner.lock_owned().await;
            let tx2 = tx.clone();
            let result = tokio::task::spawn_blocking(move || {
                let cluster: &mut RemoteCluster = &mut guard;
                let (ar0, ac0, s0) = (
                    cluster.allreduce_ns,
                    cluster.allreduce_count,
                    cluster.step_ns,
                );
                let mut stream = TextStream::default();
                let res = generate(
                    cluster,
                    1,
                    &prompt,
                    &params,
                    &files.cfg.eos_token_ids,
                    &mut |tok| {
                        // The end-of-sequence token that stops generation is not answer text.
                        let stops = !params.ignore_eos && files.cfg.eos_token_ids.contains(&tok);
                        let text = if stops {
                            String::new()
                        } else {
                            stream.push(&files.tokenizer, tok).unwrap_or_default()
                        };
                        tx2.blocking_send(Ok(GenerateEvent {
                            event: Some(generate_event::Event::Token(Token { id: tok, text })),
                        }))
                        .is_ok()
                    },
                );
                let tail = stream.finish(&files.tokenizer).unwrap_or_default();
                let (ar, ac, s) = (
                    cluster.allreduce_ns - ar0,
                    cluster.allreduce_count - ac0,
                    cluster.step_ns - s0,
                );
                (
                    res,
                    tail,
                    cluster.failed.take(),
                    cluster.weight_bytes,
                    ar,
                    ac,
                    s,
                )
            })
            .await;
            let (res, tail, failed, bytes, ar, ac, s) = match result {
                Ok(x) => x,
                Err(e) => {
                    let _ = tx.send(Err(Status::internal(e.to_string()))).await;
                    return;
                }
            };
            if let Some(id) = failed {
                st.fail_worker(id);
            }
            match res {
                Ok(stats) => {
                    if !tail.is_empty() {
                        let _ = tx
                            .send(Ok(GenerateEvent {
                                event: Some(generate_event::Event::Token(Token {
                                    id: u32::MAX,
                                    text: tail,
                                })),
                            }))
                            .await;
                    }
                    let done = Done {
                        prompt_tokens: stats.prompt_tokens as u32,
                        generated_tokens: stats.generated as u32,
                        prefill_seconds: stats.prefill.as_secs_f64(),
                        decode_seconds: stats.decode.as_secs_f64(),
                        decode_steps: stats.decode_steps as u32,
                        finish_reason: match stats.finish {
                            tessera_model::Finish::Stop => "stop",
                            tessera_model::Finish::Length => "length",
                            tessera_model::Finish::Cancelled => "cancelled",
                        }
                        .into(),
                        weight_bytes_per_token: bytes,
                        allreduce_mean_us: if ac > 0 {
                            ar as f64 / ac as f64 / 1e3
                        } else {
                            0.0
                        },
                        comm_fraction: if s > 0 { ar as f64 / s as f64 } else { 0.0 },
                    };
                    let _ = tx
                        .send(Ok(GenerateEvent {
                            event: Some(generate_event::Event::Done(done)),
                        }))
                        .await;
                }
                Err(e) => {
                    let _ = tx.send(Err(Status::unavailable(e.to_string()))).await;
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn status(&self, req: Request<Empty>) -> Result<Response<ClusterStatus>, Status> {
        check_token(&self.state.token, req.metadata())?;
        let g = self.state.inner.lock().unwrap();
        let workers = g
            .workers
            .values()
            .map(|w| WorkerStatus {
                id: w.id,
                name: w.name.clone(),
                grpc_addr: w.grpc_addr.clone(),
                state: format!("{:?}", w.state).to_lowercase(),
                rank: w.rank.unwrap_or(0) as u32,
                shard: w.rank.map(|r| format!("rank {r}")).unwrap_or_default(),
                memory_bytes: w.memory,
                backend: w.backend.clone(),
            })
            .collect();
        Ok(Response::new(ClusterStatus {
            state: g.state.into(),
            model: self.state.files.path.display().to_string(),
            workers,
        }))
    }
}

/// Serves the coordinator on `listener` until the process ends.
pub async fn serve(
    state: Arc<CoordinatorState>,
    listener: tokio::net::TcpListener,
) -> anyhow::Result<()> {
    tokio::spawn(state.clone().supervise());
    tokio::spawn(state.clone().health_loop());
    let svc = CoordinatorServer::new(CoordinatorService { state });
    tonic::transport::Server::builder()
        .add_service(svc)
        .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
        .await?;
    Ok(())
}
