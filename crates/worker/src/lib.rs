//! A Tessera worker: registers with the coordinator, receives its shard (or reads it from its
//! own copy of the model), joins the QUIC all-reduce mesh with its peers, and runs steps.

use anyhow::{Context, bail};
use sha2::Digest;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tessera_collective::quic::{Identity, QuicNode, generate_key, token_proof};
use tessera_collective::{Cancel, Collective, Mesh, Single, Wire};
use tessera_core::{CacheType, ModelConfig, ShardSpec};
use tessera_model::gguf::GgmlType;
use tessera_model::weights::{Bytes, RawTensor, WeightArena, Weights};
use tessera_model::{Backend, ModelFiles, Picked, Precision, SeqStep, ShardModel, TopSpec};
use tessera_proto::coordinator_client::CoordinatorClient;
use tessera_proto::secure::ClusterKeys;
use tessera_proto::worker_server::{Worker, WorkerServer};
use tessera_proto::*;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};

pub struct WorkerConfig {
    pub listen: SocketAddr,
    /// Address peers use to reach this worker's QUIC endpoint (port 0: any).
    pub quic_listen: SocketAddr,
    pub coordinator: String,
    pub token: String,
    pub name: String,
    pub backend: Backend,
    /// A local copy of the model: the worker reads its slice from it when the coordinator's
    /// file has the same sha256, instead of receiving it over the network.
    pub model: Option<PathBuf>,
    pub memory_bytes: u64,
    /// Serve `GET /health` over plain HTTP here (for container and Kubernetes probes).
    pub health_listen: Option<SocketAddr>,
    /// A spare: the coordinator uses it only to replace a failed worker.
    pub standby: bool,
}

enum ShardCmd {
    /// A step, with its ticket (see [`Cancel`]).
    Step(StepRequest, oneshot::Sender<StepReply>, u64),
    /// A new coordinator session: drop every KV cache (its sequence ids start over).
    Reset,
    /// Drop every KV cache and the mesh, and join the peers in a new one of this id.
    Remesh(u64, oneshot::Sender<Result<(), String>>),
}

struct Loaded {
    tx: std::sync::mpsc::Sender<ShardCmd>,
    /// Calls off the all-reduces of abandoned steps.
    cancel: Arc<Cancel>,
    mesh_id: u64,
    /// What registration tells a restarted coordinator, so that it can adopt this shard
    /// (none when the coordinator's model had no file hash to check it by).
    held: Option<HeldShard>,
}

struct State {
    /// When the coordinator last called (ms since `born`): a coordinator that stops calling
    /// has lost this worker (restarted, or the network changed), and the worker registers again.
    last_contact: std::sync::atomic::AtomicU64,
    born: Instant,
    keys: Arc<ClusterKeys>,
    /// The id the coordinator gave this process at its last registration (0: none yet).
    worker_id: std::sync::atomic::AtomicU64,
    backend: Backend,
    node: Arc<QuicNode>,
    local_model: Option<PathBuf>,
    shard: Mutex<Option<Loaded>>,
}

impl State {
    fn touch(&self) {
        self.last_contact.store(
            self.born.elapsed().as_millis() as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
    }
    fn silent_for(&self) -> Duration {
        let last = self.last_contact.load(std::sync::atomic::Ordering::Relaxed);
        self.born
            .elapsed()
            .saturating_sub(Duration::from_millis(last))
    }
}

pub struct WorkerService {
    state: Arc<State>,
}

type StepStream = Pin<Box<dyn Stream<Item = Result<StepReply, Status>> + Send>>;

#[tonic::async_trait]
impl Worker for WorkerService {
    async fn load(
        &self,
        req: Request<Streaming<LoadChunk>>,
    ) -> Result<Response<LoadReply>, Status> {
        self.state.keys.check(req.metadata())?;
        self.state.touch();
        let started = Instant::now();
        let mut stream = req.into_inner();
        let first = stream
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("empty load"))?;
        let Some(load_chunk::Chunk::Assignment(a)) = first.chunk else {
            return Err(Status::invalid_argument(
                "a load must start with its assignment",
            ));
        };
        let cfg: ModelConfig = serde_json::from_str(&a.config_json)
            .map_err(|e| Status::invalid_argument(format!("config: {e}")))?;
        let spec: ShardSpec = serde_json::from_str(&a.spec_json)
            .map_err(|e| Status::invalid_argument(format!("spec: {e}")))?;
        tracing::debug!(
            rank = spec.rank,
            world = spec.world,
            mesh = a.mesh_id,
            "load"
        );
        // The coordinator may start loading before our registration reply has been processed.
        let t = Instant::now();
        while !self.state.node.has_identity() {
            if t.elapsed() > Duration::from_secs(10) {
                return Err(Status::failed_precondition(
                    "this worker has no QUIC identity: is it registered?",
                ));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // A new load replaces whatever shard and mesh this worker had; a step the old shard
        // still runs is called off (its thread ends with it).
        if let Some(old) = self.state.shard.lock().unwrap().take() {
            old.cancel.cancel_all();
        }
        let weights = if a.use_local_model {
            let path = self
                .state
                .local_model
                .clone()
                .ok_or_else(|| Status::failed_precondition("no local model"))?;
            ModelFiles::open(&path)
                .map_err(|e| Status::failed_precondition(e.to_string()))?
                .weights
        } else {
            // The whole shard in one arena on 2 MiB pages, sized by what was announced.
            let total = usize::try_from(a.total_bytes).map_err(|_| {
                Status::invalid_argument("the announced shard size is out of range")
            })?;
            let mut arena = WeightArena::new(total).map_err(|e| {
                Status::resource_exhausted(format!("no memory for a shard of {total} bytes: {e}"))
            })?;
            // Per tensor: its header, its range in the arena and the bytes filled so far.
            let mut blocks: HashMap<String, (RawTensor, std::ops::Range<usize>, usize)> =
                HashMap::new();
            let mut hasher = sha2::Sha256::new();
            let mut received = 0u64;
            while let Some(chunk) = stream.message().await? {
                let Some(load_chunk::Chunk::Block(b)) = chunk.chunk else {
                    return Err(Status::invalid_argument(
                        "a second assignment inside one load",
                    ));
                };
                hasher.update(&b.data);
                received += b.data.len() as u64;
                if received > a.total_bytes {
                    return Err(Status::invalid_argument(format!(
                        "more shard data than the {} bytes announced",
                        a.total_bytes
                    )));
                }
                if !blocks.contains_key(&b.name) {
                    let (expected, raw) = block_header(&b)
                        .map_err(|e| Status::invalid_argument(format!("block {}: {e}", b.name)))?;
                    let range = arena.reserve(expected).ok_or_else(|| {
                        Status::invalid_argument(format!(
                            "block {}: its {expected} bytes overrun the {} bytes announced",
                            b.name, a.total_bytes
                        ))
                    })?;
                    blocks.insert(b.name.clone(), (raw, range, 0));
                }
                let (_, range, filled) = blocks.get_mut(&b.name).expect("inserted");
                if b.offset as usize != *filled || *filled + b.data.len() > range.len() {
                    return Err(Status::invalid_argument(format!(
                        "block {} arrived out of order or oversized",
                        b.name
                    )));
                }
                let at = range.start + *filled;
                arena
                    .slice_mut(at..at + b.data.len())
                    .copy_from_slice(&b.data);
                *filled += b.data.len();
            }
            let sum = format!("{:x}", hasher.finalize());
            if received != a.total_bytes || sum != a.sha256 {
                return Err(Status::data_loss(format!(
                    "shard data corrupt: {received} bytes with sha256 {sum}, expected {} bytes with {}",
                    a.total_bytes, a.sha256
                )));
            }
            let arena = arena
                .freeze()
                .map_err(|e| Status::internal(format!("shard memory: {e}")))?;
            let mut done = HashMap::new();
            for (name, (mut raw, range, filled)) in blocks {
                if filled != range.len() {
                    return Err(Status::data_loss(format!(
                        "block {name}: {filled} of {} bytes arrived",
                        range.len()
                    )));
                }
                raw.data = arena.bytes(range);
                done.insert(name, raw);
            }
            Weights::Blocks(Arc::new(done))
        };
        let peers: Vec<SocketAddr> = a
            .peers
            .iter()
            .map(|p| p.quic_addr.parse())
            .collect::<Result<_, _>>()
            .map_err(|e| Status::invalid_argument(format!("peer address: {e}")))?;
        let (ready_tx, ready_rx) = oneshot::channel();
        let (tx, rx) = std::sync::mpsc::channel::<ShardCmd>();
        let cancel = Arc::new(Cancel::default());
        let node = self.state.node.clone();
        let backend = self.state.backend;
        let mesh_id = a.mesh_id;
        let precision = Precision::of(a.exact);
        let wire: Wire = a.wire.parse().map_err(Status::invalid_argument)?;
        // An assignment without the field comes from a coordinator that planned f32.
        let cache: CacheType = match a.kv_cache.as_str() {
            "" => CacheType::F32,
            s => s.parse().map_err(Status::invalid_argument)?,
        };
        let thread_cancel = cancel.clone();
        std::thread::Builder::new()
            .name(format!("shard-{}", spec.rank))
            .spawn(move || {
                shard_thread(
                    cfg,
                    spec,
                    weights,
                    backend,
                    precision,
                    cache,
                    MeshPlan {
                        wire,
                        node,
                        mesh_id,
                        peers,
                        cancel: thread_cancel,
                    },
                    rx,
                    ready_tx,
                )
            })
            .map_err(|e| Status::internal(e.to_string()))?;
        let (bytes, held, cache) = ready_rx
            .await
            .map_err(|_| Status::internal("shard thread died"))?
            .map_err(Status::failed_precondition)?;
        let adoptable = (!a.model_sha256.is_empty()).then(|| HeldShard::of(&a, bytes, held));
        *self.state.shard.lock().unwrap() = Some(Loaded {
            tx,
            cancel,
            mesh_id,
            held: adoptable,
        });
        tracing::info!(
            mesh = mesh_id,
            secs = started.elapsed().as_secs_f64(),
            "shard loaded"
        );
        Ok(Response::new(LoadReply {
            weight_bytes_per_token: bytes,
            seconds: started.elapsed().as_secs_f64(),
            weight_bytes_held: held,
            rss_bytes: tessera_core::mem::rss_bytes().unwrap_or(0),
            kv_cache: cache.name().into(),
        }))
    }

    type StepStream = StepStream;

    async fn step(
        &self,
        req: Request<Streaming<StepRequest>>,
    ) -> Result<Response<StepStream>, Status> {
        self.state.keys.check(req.metadata())?;
        self.state.touch();
        let (tx, cancel) = {
            let g = self.state.shard.lock().unwrap();
            let l = g
                .as_ref()
                .ok_or_else(|| Status::failed_precondition("no shard loaded"))?;
            (l.tx.clone(), l.cancel.clone())
        };
        let _ = tx.send(ShardCmd::Reset);
        let mut input = req.into_inner();
        let (out_tx, out_rx) = mpsc::channel(4);
        tokio::spawn(async move {
            use tokio_stream::StreamExt;
            // A request that came while the one before it ran; the end of the stream.
            let mut next: Option<StepRequest> = None;
            let mut ended = false;
            loop {
                let req = match next.take() {
                    Some(r) => r,
                    None if ended => break,
                    None => match input.next().await {
                        Some(Ok(r)) => r,
                        _ => break,
                    },
                };
                let ticket = cancel.ticket();
                let (rtx, mut rrx) = oneshot::channel();
                if tx.send(ShardCmd::Step(req, rtx, ticket)).is_err() {
                    let _ = out_tx
                        .send(Err(Status::unavailable("shard was replaced")))
                        .await;
                    break;
                }
                // While the step runs, the stream is watched: a coordinator that goes away
                // may have sent this step to only some workers, and the all-reduces of those
                // that got it would wait for the others until the transport's timeout. The
                // step is called off instead (the shard then needs a new mesh: the next
                // coordinator's Remesh).
                let reply = loop {
                    tokio::select! {
                        r = &mut rrx => break r,
                        m = input.next(), if !ended && next.is_none() => match m {
                            Some(Ok(r)) => next = Some(r),
                            _ => {
                                ended = true;
                                cancel.cancel_through(ticket);
                            }
                        },
                    }
                };
                let reply = match reply {
                    Ok(r) => Ok(r),
                    Err(_) => Err(Status::internal("shard thread died")),
                };
                let stop = reply.is_err();
                if out_tx.send(reply).await.is_err() || stop {
                    break;
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(out_rx),
        )))
    }

    async fn remesh(&self, req: Request<RemeshRequest>) -> Result<Response<RemeshReply>, Status> {
        self.state.keys.check(req.metadata())?;
        self.state.touch();
        let started = Instant::now();
        let r = req.into_inner();
        let (tx, cancel) = {
            let g = self.state.shard.lock().unwrap();
            let l = g
                .as_ref()
                .ok_or_else(|| Status::failed_precondition("no shard loaded"))?;
            if l.mesh_id != r.from_mesh_id {
                return Err(Status::failed_precondition(format!(
                    "this worker holds a shard of mesh {}, not of mesh {}",
                    l.mesh_id, r.from_mesh_id
                )));
            }
            (l.tx.clone(), l.cancel.clone())
        };
        // Whatever the shard runs now belongs to a coordinator that is gone.
        cancel.cancel_all();
        let (rtx, rrx) = oneshot::channel();
        tx.send(ShardCmd::Remesh(r.to_mesh_id, rtx))
            .map_err(|_| Status::internal("shard thread died"))?;
        // ABORTED: the mesh could not be joined (a peer did not connect within the patience);
        // the shard stays, under the mesh it held, and Remesh may be asked again.
        rrx.await
            .map_err(|_| Status::internal("shard thread died"))?
            .map_err(Status::aborted)?;
        let mut g = self.state.shard.lock().unwrap();
        if let Some(l) = g.as_mut().filter(|l| l.mesh_id == r.from_mesh_id) {
            l.mesh_id = r.to_mesh_id;
            if let Some(h) = l.held.as_mut() {
                h.mesh_id = r.to_mesh_id;
            }
        }
        tracing::info!(
            from = r.from_mesh_id,
            to = r.to_mesh_id,
            secs = started.elapsed().as_secs_f64(),
            "mesh rebuilt"
        );
        Ok(Response::new(RemeshReply {
            seconds: started.elapsed().as_secs_f64(),
        }))
    }

    async fn health(&self, req: Request<Empty>) -> Result<Response<HealthReply>, Status> {
        self.state.keys.check(req.metadata())?;
        self.state.touch();
        let worker_id = self
            .state
            .worker_id
            .load(std::sync::atomic::Ordering::Relaxed);
        let g = self.state.shard.lock().unwrap();
        Ok(Response::new(match g.as_ref() {
            Some(l) => HealthReply {
                state: "ready".into(),
                mesh_id: l.mesh_id,
                worker_id,
            },
            None => HealthReply {
                state: "idle".into(),
                mesh_id: 0,
                worker_id,
            },
        }))
    }
}

/// Fills `out` from a step's picked rows: the logits of sequences that want logits, and for
/// the others the row's candidates (the coordinator merges every shard's). Rows asked with
/// `mass` are kept in `kept` for a `last_logits` request.
fn pick(
    picked: Vec<Picked>,
    want: &[(u64, Option<TopSpec>)],
    out: &mut StepReply,
    kept: &mut KeptRows,
) {
    kept.clear();
    let any_mass = want.iter().any(|w| w.1.is_some_and(|s| s.mass));
    let any_raw = want.iter().any(|w| w.1.is_some_and(|s| s.raw_lse));
    for (p, &(seq, _)) in picked.into_iter().zip(want) {
        let Some(c) = p.top else {
            out.logits
                .extend_from_slice(p.row.as_deref().unwrap_or_default());
            continue;
        };
        out.top_counts.push(c.top.len() as u32);
        for (id, x) in c.top {
            out.top_ids.push(id);
            out.top_logits.push(x);
        }
        // Only where some sequence asked: greedy steps stay at 8 bytes a candidate.
        if any_mass {
            out.top_lse.push(c.lse);
            out.top_floor.push(c.floor);
        }
        if any_raw {
            out.top_lse_raw.push(c.lse_raw);
        }
        // A row comes with candidates only where its spec asked for mass.
        if let Some(row) = p.row {
            kept.push((seq, row));
        }
    }
}

/// What a sequence asked of its step: None for its logits. At most MAX_CANDIDATES
/// candidates: the request cannot make the reply large.
fn top_spec(s: &tessera_proto::SeqStep) -> Option<TopSpec> {
    (s.top > 0 || s.gumbel).then(|| TopSpec {
        n: (s.top as usize).min(tessera_model::MAX_CANDIDATES),
        temperature: s.temperature,
        gumbel: s.gumbel.then_some((s.seed, s.draw)),
        mass: s.mass,
        raw_lse: s.raw_lse,
    })
}

/// How a shard joins its all-reduce mesh, again after [`ShardCmd::Remesh`].
struct MeshPlan {
    wire: Wire,
    node: Arc<QuicNode>,
    mesh_id: u64,
    peers: Vec<SocketAddr>,
    cancel: Arc<Cancel>,
}

impl MeshPlan {
    /// Joins mesh `mesh_id`, waiting up to `patience` for every peer.
    fn connect(
        &self,
        rank: usize,
        mesh_id: u64,
        patience: Duration,
    ) -> Result<Box<dyn Collective>, String> {
        if self.peers.len() == 1 {
            return Ok(Box::new(Single));
        }
        let mut t = self
            .node
            .connect_mesh(mesh_id, rank, &self.peers, patience)
            .map_err(|e| format!("joining the mesh: {e}"))?;
        t.set_cancel(self.cancel.clone());
        let mut mesh = Mesh::new(t);
        mesh.wire = self.wire;
        // For measuring the two algorithms against each other (see README): vectors of at
        // most this many values use the one-step all-gather, longer ones the ring.
        if let Some(v) = std::env::var("TESSERA_RING_THRESHOLD")
            .ok()
            .and_then(|v| v.parse().ok())
        {
            mesh.ring_threshold = v;
        }
        Ok(Box::new(mesh))
    }
}

#[allow(clippy::too_many_arguments)]
fn shard_thread(
    cfg: ModelConfig,
    spec: ShardSpec,
    weights: Weights,
    backend: Backend,
    precision: Precision,
    cache: CacheType,
    plan: MeshPlan,
    rx: std::sync::mpsc::Receiver<ShardCmd>,
    ready: oneshot::Sender<Result<(u64, u64, CacheType), String>>,
) {
    let setup = || -> Result<(ShardModel, Box<dyn Collective>), String> {
        let device = backend.device().map_err(|e| e.to_string())?;
        let model = ShardModel::load(&weights, &cfg, &spec, &device, precision, cache)
            .map_err(|e| e.to_string())?;
        // Peers may still be loading their shards.
        let patience = Duration::from_secs(60);
        Ok((model, plan.connect(spec.rank, plan.mesh_id, patience)?))
    };
    let (mut model, coll) = match setup() {
        Ok(x) => {
            let m = &x.0;
            let _ = ready.send(Ok((
                m.weight_bytes_per_token(),
                m.weight_bytes_held(),
                m.cache_type(),
            )));
            x
        }
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    drop(weights);
    // None once an all-reduce failed: the mesh may hold a half-done step's messages, so it
    // serves no step until the coordinator has it rebuilt (the weights stay).
    let mut coll = Ok(coll);
    let mut mesh_now = plan.mesh_id;
    let mut kept = KeptRows::new();
    while let Ok(cmd) = rx.recv() {
        let (req, reply) = match cmd {
            ShardCmd::Step(req, reply, ticket) => {
                plan.cancel.start(ticket);
                (req, reply)
            }
            ShardCmd::Reset => {
                model.free_all();
                kept.clear();
                continue;
            }
            ShardCmd::Remesh(mesh_id, reply) => {
                model.free_all();
                kept.clear();
                // The old connections close first: peers still waiting on them stop at once.
                drop(std::mem::replace(&mut coll, Err(String::new())));
                // Every peer holds its shard already and was asked at the same time.
                coll = plan.connect(spec.rank, mesh_id, Duration::from_secs(15));
                mesh_now = mesh_id;
                let _ = reply.send(coll.as_ref().map(|_| ()).map_err(Clone::clone));
                continue;
            }
        };
        let out = match coll.as_mut() {
            Ok(c) => {
                let out = run_step(&mut model, c.as_mut(), req, &mut kept);
                if out.mesh_down {
                    tracing::warn!(
                        mesh = mesh_now,
                        "the all-reduce mesh broke ({}); waiting for a new one",
                        out.error
                    );
                    coll = Err(out.error.clone());
                }
                out
            }
            Err(why) => StepReply {
                error: format!(
                    "this shard's all-reduce mesh is down ({why}); it serves again once the coordinator rebuilds it"
                ),
                mesh_down: true,
                ..Default::default()
            },
        };
        let _ = reply.send(out);
    }
}

/// The rows of the last step that asked for a nucleus's candidates, by sequence (kept for a
/// `last_logits` request).
pub type KeptRows = Vec<(u64, Vec<f32>)>;

/// One step request from the coordinator, as a shard runs it: frees the listed caches, then
/// either returns kept rows (`last_logits`) or runs the batch and picks each sequence's
/// candidates or logits. Every field is checked (a malformed request gets an error reply,
/// never a panic, and cannot make the reply large). The reply's `mesh_down` says whether the
/// mesh broke (a collective error: the shard serves no step until its mesh is rebuilt).
pub fn run_step(
    model: &mut ShardModel,
    coll: &mut dyn Collective,
    req: StepRequest,
    kept: &mut KeptRows,
) -> StepReply {
    let started = Instant::now();
    let before = coll.stats();
    let mut out = StepReply::default();
    for seq in &req.free {
        model.free(*seq);
    }
    if !req.last_logits.is_empty() {
        // Each kept row at most once: the request cannot make the reply large.
        if req.last_logits.len() > kept.len() {
            out.error = format!(
                "asked for {} rows of logits, {} are kept",
                req.last_logits.len(),
                kept.len()
            );
            return out;
        }
        for seq in &req.last_logits {
            match kept.iter().find(|k| k.0 == *seq) {
                Some((_, row)) => out.logits.extend_from_slice(row),
                None => {
                    out.logits.clear();
                    out.error = format!("no logits kept for sequence {seq}");
                    break;
                }
            }
        }
        return out;
    }
    let want: Vec<(u64, Option<TopSpec>)> =
        req.steps.iter().map(|s| (s.seq, top_spec(s))).collect();
    kept.clear();
    let steps: Vec<SeqStep> = req
        .steps
        .into_iter()
        .map(|s| SeqStep {
            seq: s.seq,
            ids: s.ids,
            pos: s.pos as usize,
        })
        .collect();
    let specs: Vec<Option<TopSpec>> = want.iter().map(|w| w.1).collect();
    match tessera_quant::install(|| model.forward_pick(&steps, coll, &specs)) {
        Ok(p) => pick(p, &want, &mut out, kept),
        Err(e) => {
            out.mesh_down = matches!(e, tessera_model::ModelError::Collective(_));
            out.error = e.to_string();
        }
    }
    let after = coll.stats();
    out.allreduce_ns = after.nanos - before.nanos;
    out.allreduce_count = (after.count - before.count) as u32;
    let (seqs, positions) = model.cache_usage();
    out.cached_sequences = seqs as u32;
    out.cached_positions = positions as u64;
    out.step_ns = started.elapsed().as_nanos() as u64;
    out
}

/// The tensor slice a block's first chunk describes, and the bytes it must carry in all.
fn block_header(b: &TensorBlock) -> Result<(usize, RawTensor), String> {
    let ty = GgmlType::from_id(b.ggml_type)
        .ok_or_else(|| format!("unknown GGML type {}", b.ggml_type))?;
    let u = |v: u64| usize::try_from(v).map_err(|_| "a field is out of range".to_string());
    let rows = u(b.row_start)?..u(b.row_end)?;
    let stored = u(b.stored_col_start)?..u(b.stored_col_end)?;
    let valid = u(b.col_start)?..u(b.col_end)?;
    if rows.start > rows.end
        || stored.start > stored.end
        || valid.start < stored.start
        || valid.end > stored.end
        || valid.start > valid.end
    {
        return Err("inconsistent ranges".into());
    }
    let row_bytes = ty.row_bytes(stored.len()).ok_or_else(|| {
        format!(
            "{} columns are not whole {} blocks",
            stored.len(),
            ty.name()
        )
    })?;
    let expected = row_bytes
        .checked_mul(rows.len())
        .ok_or("the slice size overflows")?;
    let shape = b
        .shape
        .iter()
        .map(|&d| u(d))
        .collect::<Result<Vec<_>, _>>()?;
    Ok((
        expected,
        RawTensor {
            ty,
            shape,
            rows,
            valid: valid.start - stored.start..valid.end - stored.start,
            cols: stored,
            data: Bytes::from_vec(Vec::new()),
        },
    ))
}

/// The local address this machine uses to reach `coordinator` (HOST:PORT or a URL).
async fn route_to(coordinator: &str) -> Option<std::net::IpAddr> {
    let hostport = coordinator
        .split("://")
        .last()
        .unwrap_or(coordinator)
        .trim_end_matches('/');
    for _ in 0..120 {
        // The coordinator's name may not resolve yet (a container starting up): retry.
        if let Ok(mut addrs) = tokio::net::lookup_host(hostport).await
            && let Some(a) = addrs.next()
        {
            let bind: SocketAddr = if a.is_ipv4() {
                "0.0.0.0:0".parse().ok()?
            } else {
                "[::]:0".parse().ok()?
            };
            let sock = std::net::UdpSocket::bind(bind).ok()?;
            sock.connect(a).ok()?;
            return sock.local_addr().ok().map(|l| l.ip());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    None
}

/// Runs a worker until the process is stopped: serves the Worker API and registers with the
/// coordinator (retrying while it is unreachable). A refused registration is an error.
pub async fn run(cfg: WorkerConfig) -> anyhow::Result<()> {
    let keys = Arc::new(ClusterKeys::from_secret(&cfg.token).map_err(anyhow::Error::msg)?);
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .with_context(|| format!("binding {}", cfg.listen))?;
    let grpc_addr = listener.local_addr()?;
    let node = Arc::new(
        QuicNode::bind(cfg.quic_listen, token_proof(&cfg.token))
            .context("binding the QUIC endpoint")?,
    );
    let quic_addr = node.local_addr()?;
    let model_sha256 = match &cfg.model {
        Some(p) => {
            tessera_model::sha256_file(p).with_context(|| format!("reading {}", p.display()))?
        }
        None => String::new(),
    };
    let state = Arc::new(State {
        last_contact: Default::default(),
        born: Instant::now(),
        keys: keys.clone(),
        worker_id: Default::default(),
        backend: cfg.backend,
        node: node.clone(),
        local_model: cfg.model.clone(),
        shard: Mutex::new(None),
    });
    let svc = WorkerServer::new(WorkerService {
        state: state.clone(),
    })
    .max_decoding_message_size(64 << 20)
    .max_encoding_message_size(64 << 20);
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            // A step's logits (4 bytes x vocabulary slice x sequences) in one window, and no
            // Nagle delay on the small frames that end each reply.
            .initial_stream_window_size(tessera_proto::STREAM_WINDOW)
            .initial_connection_window_size(tessera_proto::STREAM_WINDOW)
            .add_service(svc)
            .serve_with_incoming(keys.incoming(listener)),
    );
    if let Some(addr) = cfg.health_listen {
        let l = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding the health endpoint {addr}"))?;
        let st = state.clone();
        let app = axum::Router::new().route(
            "/health",
            axum::routing::get(move || {
                let st = st.clone();
                async move {
                    let loaded = st.shard.lock().unwrap().is_some();
                    axum::Json(serde_json::json!({
                        "state": if loaded { "ready" } else { "idle" },
                        "registered": st.node.has_identity(),
                    }))
                }
            }),
        );
        tokio::spawn(async move { axum::serve(l, app).await });
    }
    let (key, spki) = generate_key()?;
    let reg = Registration {
        cfg: &cfg,
        keys: &keys,
        state: &state,
        grpc_port: grpc_addr.port(),
        quic_port: quic_addr.port(),
        bound: grpc_addr.ip(),
        spki,
        model_sha256,
    };
    // Registers and installs the QUIC certificate the coordinator issued for our key.
    let join = || async {
        let reply = reg.register().await?;
        state
            .worker_id
            .store(reply.worker_id, std::sync::atomic::Ordering::Relaxed);
        node.set_identity(&Identity {
            key_pkcs8: key.clone(),
            cert_der: reply.certificate_der,
            ca_der: reply.ca_der,
        })?;
        state.touch();
        anyhow::Ok(())
    };
    join().await?;
    // A coordinator that has not called for a while has lost this worker (it restarted, or the
    // network was cut and this worker's address changed): register again.
    tokio::select! {
        r = server => r??,
        r = async {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                if state.silent_for() < REREGISTER_AFTER {
                    continue;
                }
                tracing::warn!("no word from the coordinator for {REREGISTER_AFTER:?}: registering again");
                eprintln!("no word from the coordinator for {REREGISTER_AFTER:?}: registering again");
                join().await?;
            }
            #[allow(unreachable_code)]
            anyhow::Ok(())
        } => r?,
    }
    Ok(())
}

/// The coordinator checks every worker each second; this much silence means it lost us.
const REREGISTER_AFTER: Duration = Duration::from_secs(3);

struct Registration<'a> {
    cfg: &'a WorkerConfig,
    keys: &'a ClusterKeys,
    state: &'a State,
    grpc_port: u16,
    quic_port: u16,
    bound: std::net::IpAddr,
    spki: Vec<u8>,
    model_sha256: String,
}

impl Registration<'_> {
    /// Registers with the coordinator, retrying while it is unreachable; a refusal is an
    /// error. The address is worked out anew each time (it may have changed).
    async fn register(&self) -> anyhow::Result<RegisterReply> {
        let cfg = self.cfg;
        let coordinator = &cfg.coordinator;
        loop {
            // Where the coordinator and peers reach this worker: TESSERA_ADVERTISE, else the
            // bound address, else (bound to 0.0.0.0, as in a container) the interface that
            // routes to the coordinator.
            let host = match std::env::var("TESSERA_ADVERTISE").ok() {
                Some(a) => a,
                None if self.bound.is_unspecified() => match route_to(&cfg.coordinator).await {
                    Some(ip) => ip.to_string(),
                    None => {
                        tokio::time::sleep(Duration::from_millis(500)).await;
                        continue;
                    }
                },
                None => self.bound.to_string(),
            };
            let host = if host.contains(':') && !host.starts_with('[') {
                format!("[{host}]")
            } else {
                host
            };
            let reg = RegisterRequest {
                protocol_version: PROTOCOL_VERSION,
                name: cfg.name.clone(),
                grpc_addr: format!("{host}:{}", self.grpc_port),
                quic_addr: format!("{host}:{}", self.quic_port),
                backend: cfg.backend.name().into(),
                memory_bytes: cfg.memory_bytes,
                public_key_der: self.spki.clone(),
                model_sha256: self.model_sha256.clone(),
                standby: cfg.standby,
                held: self
                    .state
                    .shard
                    .lock()
                    .unwrap()
                    .as_ref()
                    .and_then(|l| l.held.clone()),
            };
            match self.keys.channel(coordinator, |e| e).await {
                Ok(ch) => match CoordinatorClient::new(ch)
                    .register(self.keys.request(reg.clone()))
                    .await
                {
                    Ok(r) => {
                        let r = r.into_inner();
                        tracing::info!(id = r.worker_id, grpc = %reg.grpc_addr, quic = %reg.quic_addr, "registered");
                        eprintln!(
                            "worker {} registered as #{} (gRPC {}, QUIC {})",
                            cfg.name, r.worker_id, reg.grpc_addr, reg.quic_addr
                        );
                        return Ok(r);
                    }
                    Err(s)
                        if s.code() == tonic::Code::Unauthenticated
                            || s.code() == tonic::Code::FailedPrecondition =>
                    {
                        bail!("the coordinator refused this worker: {}", s.message())
                    }
                    Err(s) => tracing::warn!("registration failed, retrying: {}", s.message()),
                },
                // A server that is not this cluster's (a wrong secret here or there, or a
                // man in the middle): no use retrying.
                Err(e) if tessera_proto::secure::is_untrusted(&e) => bail!(
                    "refused the coordinator at {coordinator}: {} (is TESSERA_TOKEN this \
                     cluster's token?)",
                    tessera_proto::secure::describe(&e)
                ),
                Err(e) => tracing::warn!(
                    "coordinator {coordinator} unreachable, retrying: {}",
                    tessera_proto::secure::describe(&e)
                ),
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}
