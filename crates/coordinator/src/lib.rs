//! The Tessera coordinator: waits for workers, plans the shards, ships each worker its slice,
//! drives every step over long-lived gRPC streams, samples, and serves generation requests.
//! A worker that fails is marked down and the cluster rebuilt at once: on a stand-by worker
//! (any registered worker beyond `--workers`) if there is one, else resharded over the
//! workers that remain if the model fits their memory; the sequences that were running
//! replay there (prompt and tokens already sent, as a prefill) and carry on, so clients see
//! a delay, not an error. When the missing workers are back, the cluster reshards to its full
//! size.

use anyhow::Context;
use sha2::Digest;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tessera_collective::ClusterCa;
use tessera_core::WorkerNeed;
use tessera_model::chat::Message;
use tessera_model::{
    GenerateParams, MAX_LOGPROBS, ModelError, ModelFiles, SamplingParams, TokenLogprobs,
    shard_reads,
};
use tessera_proto::coordinator_server::{Coordinator, CoordinatorServer};
use tessera_proto::secure::ClusterKeys;
use tessera_proto::worker_client::WorkerClient;
use tessera_proto::*;
use tokio::sync::{Notify, mpsc};
use tokio_stream::Stream;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};
use tracing::Instrument;

pub mod http;
pub mod remote;
pub mod scheduler;
pub mod text;

use remote::StepLink;
pub use remote::{CacheUsage, RemoteCluster, STEP_TIMEOUT};
pub use scheduler::{Event, Job, Scheduler, SchedulerConfig, SubmitError};
use text::StopText;

const CHUNK: usize = 2 << 20;

/// How long connecting to a worker may take (a worker whose machine vanished answers nothing;
/// without a bound the connection would wait for the kernel's minutes-long TCP timeout).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A worker picked for a mesh that left (or was replaced) before it was loaded.
fn gone(id: u64) -> anyhow::Error {
    anyhow::anyhow!("worker #{id} left (or registered again as a new process) before loading")
}

/// Recent failures of a mesh whose members all answered. Rebuilding the mesh (milliseconds)
/// mends a broken link; a step that breaks every mesh it runs on would make that a loop, so
/// past [`MeshFailures::MAX`] failures within [`MeshFailures::WINDOW`] the shards are loaded
/// anew instead (and the scheduler gives up the requests that keep failing).
#[derive(Default)]
struct MeshFailures {
    at: Vec<Instant>,
}

impl MeshFailures {
    const WINDOW: Duration = Duration::from_secs(60);
    const MAX: usize = 3;

    /// Notes a failure at `now`; whether rebuilding the mesh may mend it.
    fn note(&mut self, now: Instant) -> bool {
        self.at
            .retain(|t| now.saturating_duration_since(*t) < Self::WINDOW);
        self.at.push(now);
        self.at.len() <= Self::MAX
    }
}

/// How long an adoption keeps asking the members to rebuild their mesh while they cannot
/// reach each other (each try waits out the workers' own patience, 15 s), before it gives up
/// and the shards are loaded anew.
const REMESH_FOR: Duration = Duration::from_secs(60);

/// A plan refused before loading: some worker would be short of memory.
#[derive(Debug)]
struct DoesNotFit(String);

impl std::fmt::Display for DoesNotFit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for DoesNotFit {}

pub struct CoordinatorConfig {
    pub model: std::path::PathBuf,
    /// The model's name in the HTTP API (`"model"` in requests).
    pub model_name: String,
    pub workers: usize,
    /// Reshard over every registered worker when more than `workers` are there (at an idle
    /// moment), instead of keeping the extra ones as stand-bys.
    pub grow: bool,
    pub token: String,
    pub scheduler: SchedulerConfig,
    /// Workers compute with f32 activations against the weight blocks (see `Precision`).
    pub exact: bool,
    /// What the workers' KV caches hold (None: the default for the path and weights).
    pub kv_cache: Option<tessera_core::CacheType>,
    /// How the workers' partial sums travel between them.
    pub wire: tessera_collective::Wire,
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
    shard: Option<tessera_core::ShardSpec>,
    /// From its last load: bytes of weights held, and the process's resident memory.
    weight_bytes_held: u64,
    rss_bytes: u64,
    /// What its KV cache holds, as its last load reported ("" before one).
    kv_cache: String,
    /// The shard it said it holds when it registered (a restarted coordinator may adopt it).
    held: Option<HeldShard>,
    /// Its QUIC public key: the same process registering again presents the same one.
    public_key: Vec<u8>,
    /// A spare (`tessera worker --standby`): picked last, never grown into.
    standby: bool,
}

struct Inner {
    workers: BTreeMap<u64, WorkerEntry>,
    next_id: u64,
    mesh_id: u64,
    /// A loaded mesh is serving (or loading one is under way).
    loaded: bool,
    /// Workers in that mesh.
    mesh_size: usize,
    /// A mesh has served: after a failure, fewer workers than asked may carry on.
    served: bool,
    state: &'static str,
    /// Why the last plan was refused (a worker short of memory), until one is accepted.
    refusal: Option<String>,
    /// When the serving mesh failed with every member alive, lately: each such failure is
    /// mended by rebuilding the mesh where the shards are, unless it keeps failing.
    mesh_failures: MeshFailures,
}

pub struct CoordinatorState {
    pub files: Arc<ModelFiles>,
    pub model_name: String,
    pub scheduler: Arc<Scheduler>,
    /// KV cache use per worker, as reported with each step.
    pub cache_usage: CacheUsage,
    pub started: Instant,
    model_sha256: String,
    n: usize,
    grow: bool,
    exact: bool,
    /// What the workers' KV caches hold on the CPU (GPU workers keep f32).
    cache_type: tessera_core::CacheType,
    wire: tessera_collective::Wire,
    /// What the cluster secret gives: TLS both ways, the bearer value, the CA.
    keys: Arc<ClusterKeys>,
    ca: ClusterCa,
    inner: Mutex<Inner>,
    changed: Notify,
    pub load_seconds: Mutex<Option<f64>>,
}

impl CoordinatorState {
    pub fn new(cfg: &CoordinatorConfig) -> anyhow::Result<Arc<CoordinatorState>> {
        let files = ModelFiles::open(&cfg.model)?;
        files.plan(&vec![1.0; cfg.workers])?;
        let cache_type = files.cache_type(tessera_model::Precision::of(cfg.exact), cfg.kv_cache);
        let model_sha256 = if cfg.model.is_file() {
            tessera_model::sha256_file(&cfg.model)?
        } else {
            String::new()
        };
        let keys = Arc::new(ClusterKeys::from_secret(&cfg.token).map_err(anyhow::Error::msg)?);
        let ca = ClusterCa::from_ed25519_key(keys.ca_key())?;
        let files = Arc::new(files);
        Ok(Arc::new_cyclic(|me: &std::sync::Weak<CoordinatorState>| {
            let me = me.clone();
            let scheduler = Scheduler::start(
                cfg.scheduler.clone(),
                Box::new(move |e: &ModelError| {
                    if let Some(st) = me.upgrade() {
                        st.step_failed(e);
                    }
                }),
            );
            CoordinatorState {
                files,
                model_name: cfg.model_name.clone(),
                scheduler,
                cache_usage: CacheUsage::default(),
                started: Instant::now(),
                model_sha256,
                n: cfg.workers,
                grow: cfg.grow,
                exact: cfg.exact,
                cache_type,
                wire: cfg.wire,
                keys,
                ca,
                inner: Mutex::new(Inner {
                    workers: BTreeMap::new(),
                    next_id: 1,
                    // From the clock: a restarted coordinator's meshes are never numbered like
                    // its previous life's (registrations raise it past any a worker holds).
                    mesh_id: std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.as_millis() as u64),
                    loaded: false,
                    mesh_size: 0,
                    served: false,
                    state: "waiting for workers",
                    refusal: None,
                    mesh_failures: MeshFailures::default(),
                }),
                changed: Notify::new(),
                load_seconds: Mutex::new(None),
            }
        }))
    }

    pub fn is_ready(&self) -> bool {
        self.scheduler.is_ready()
    }

    pub fn state(&self) -> String {
        let g = self.inner.lock().unwrap();
        match &g.refusal {
            Some(why) => format!("{}: {why}", g.state),
            None => g.state.to_string(),
        }
    }

    /// Marks a worker down; the running sequences wait while the supervisor rebuilds the
    /// cluster without it.
    fn fail_worker(&self, id: u64) {
        let mut g = self.inner.lock().unwrap();
        let name = match g.workers.get_mut(&id) {
            Some(w) => {
                tracing::warn!(worker = %w.name, "worker failed; rebuilding the cluster");
                w.state = WState::Down;
                w.rank = None;
                w.name.clone()
            }
            None => format!("#{id}"),
        };
        g.loaded = false;
        g.state = "recovering";
        drop(g);
        self.scheduler
            .recover(&format!("recovering: worker {name} failed"));
        self.changed.notify_one();
    }

    /// A step failed: the worker it names is marked down; any other failure reloads the mesh.
    /// Failures of a mesh already being replaced say nothing new (the others' all-reduces
    /// fail after the first worker's) and are ignored.
    fn step_failed(&self, e: &ModelError) {
        let rank = match e {
            ModelError::Shard { rank, .. } => Some(*rank),
            _ => None,
        };
        let id = {
            let g = self.inner.lock().unwrap();
            if g.state != "ready" {
                return;
            }
            rank.and_then(|r| {
                g.workers
                    .values()
                    .find(|w| w.state == WState::Ready && w.rank == Some(r))
                    .map(|w| w.id)
            })
        };
        match id {
            Some(id) => self.fail_worker(id),
            None => {
                // Every member answered: they keep their shards, and the supervisor adopts
                // them again (each rebuilds its mesh) instead of loading anew, unless the mesh
                // keeps failing (a step that fails on every mesh, a link that keeps dropping):
                // then the shards are loaded anew.
                let mut g = self.inner.lock().unwrap();
                if g.mesh_failures.note(Instant::now()) {
                    eprintln!("{e}: rebuilding the mesh, the shards stay where they are");
                } else {
                    eprintln!(
                        "{e}: the mesh failed {} times within {:?}, loading the shards anew",
                        g.mesh_failures.at.len(),
                        MeshFailures::WINDOW
                    );
                    for w in g.workers.values_mut() {
                        w.held = None;
                    }
                }
                g.loaded = false;
                g.state = "recovering";
                drop(g);
                self.scheduler.recover(&format!("recovering: {e}"));
                self.changed.notify_one();
            }
        }
    }

    /// Waits for enough workers, then plans and loads them; again after any failure.
    pub async fn supervise(self: Arc<Self>) {
        loop {
            let todo = {
                let mut g = self.inner.lock().unwrap();
                // Stand-bys first: a mesh of k takes the last k, so spares only where the
                // others do not reach k.
                let mut live: Vec<(bool, u64)> = g
                    .workers
                    .values()
                    .filter(|w| w.state != WState::Down)
                    .map(|w| (!w.standby, w.id))
                    .collect();
                live.sort_unstable();
                let regular = live.iter().filter(|w| w.0).count();
                let live: Vec<u64> = live.into_iter().map(|w| w.1).collect();
                // With --grow, every live worker the plan can use (stand-bys aside); else
                // exactly n.
                let want = if self.grow {
                    self.usable_shards(regular.max(1))
                } else {
                    self.n
                };
                let (queued, active, _) = self.scheduler.load();
                let serving = g.loaded && g.state == "ready";
                let grow_now =
                    self.grow && serving && want > g.mesh_size && queued == 0 && active == 0;
                // Resharded over fewer workers after a failure, and one is back (or another
                // joined): back to the full size at once (running sequences carry on).
                let restore_now = serving
                    && g.mesh_size < self.n
                    && self.usable_shards(live.len().min(self.n)) > g.mesh_size;
                // After a failure, whatever live workers there are carry on (if the model fits
                // them); at the start, the cluster waits for all it was asked for.
                let start = !g.loaded && !live.is_empty() && (live.len() >= self.n || g.served);
                let pick = |k: usize| live[live.len() - k..].to_vec();
                let k = if !(start || grow_now || restore_now) {
                    None
                } else if live.len() >= self.n {
                    // After a failure, as many as the mesh had (a stand-by fills the gap).
                    let had = if g.served { g.mesh_size } else { 0 };
                    Some(self.usable_shards(want.max(self.n).max(had).min(live.len())))
                } else {
                    // Fewer than asked: the most of them the model splits over and fits.
                    let most = self.usable_shards(live.len());
                    (1..=most)
                        .rev()
                        .find(|&k| self.fit(&g, &pick(k)).is_ok())
                        .or(Some(most))
                };
                // Growing must not cost the serving mesh: only onto a plan that fits.
                let k = k.filter(|&k| start || (k > g.mesh_size && self.fit(&g, &pick(k)).is_ok()));
                if !start && !g.loaded && g.served && g.state == "recovering" {
                    g.state = "degraded";
                }
                // Workers that still hold a whole mesh of this model (this coordinator
                // restarted): adopted as they are.
                let adopt = if start {
                    self.adoptable(&g, &live)
                } else {
                    None
                };
                if let Some((ids, mesh)) = adopt {
                    g.loaded = true;
                    g.mesh_size = ids.len();
                    g.state = "loading";
                    Some((ids, mesh, false, true))
                } else if let Some(k) = k {
                    let before = g.mesh_size;
                    g.loaded = true;
                    g.mesh_size = k;
                    g.mesh_id += 1;
                    g.state = "loading";
                    // Until the new mesh is up none of them is ready (the health check would
                    // otherwise take a worker between two shards for a failed one).
                    for w in g.workers.values_mut() {
                        if w.state == WState::Ready {
                            w.state = WState::Registered;
                            w.rank = None;
                            w.shard = None;
                        }
                    }
                    if grow_now || restore_now {
                        tracing::info!(from = before, to = k, "more workers: resharding");
                        eprintln!("{} workers registered: resharding over {k}", live.len());
                    } else if k < self.n {
                        tracing::warn!(workers = k, "resharding over the workers that remain");
                        eprintln!("{k} of {} workers live: resharding over them", self.n);
                    }
                    Some((pick(k), g.mesh_id, grow_now || restore_now, false))
                } else {
                    None
                }
            };
            if let Some((ids, mesh, growing, adopting)) = todo {
                if adopting {
                    if let Err((_, e)) = self.adopt(&ids, mesh).await {
                        // Load them anew instead.
                        tracing::warn!("adopting the workers' shards failed: {e:#}");
                        eprintln!("adopting the workers' shards failed, loading anew: {e:#}");
                        let mut g = self.inner.lock().unwrap();
                        for id in &ids {
                            if let Some(w) = g.workers.get_mut(id) {
                                w.held = None;
                            }
                        }
                        g.loaded = false;
                        g.state = "waiting for workers";
                    }
                    continue;
                }
                if growing {
                    // The old mesh stops serving (the scheduler is idle) while the new loads.
                    self.scheduler.pause("loading");
                }
                match self.clone().load_all(&ids, mesh).await {
                    Ok(()) => {}
                    Err((_, e)) if e.is::<DoesNotFit>() => {
                        // Nothing was loaded: wait for another worker (or a returning one).
                        let why = e.to_string();
                        tracing::info!("{why}");
                        eprintln!("{why}");
                        let served = {
                            let mut g = self.inner.lock().unwrap();
                            g.state = "plan does not fit";
                            g.refusal = Some(why.clone());
                            g.loaded = false;
                            g.served
                        };
                        if served {
                            // No configuration of the workers left holds the model: the
                            // requests that wait for one fail, saying so.
                            self.scheduler
                                .withdraw(&format!("no configuration can hold the model: {why}"));
                        }
                        self.changed.notified().await;
                    }
                    Err((id, e)) => {
                        tracing::error!("loading the shards failed: {e:#}");
                        eprintln!("loading the shards failed: {e:#}");
                        if let Some(id) = id {
                            self.fail_worker(id);
                        } else {
                            let mut g = self.inner.lock().unwrap();
                            g.state = "degraded";
                            g.loaded = false;
                        }
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                }
                continue;
            }
            if self.grow {
                // Growth waits for an idle moment: look again now and then.
                let _ = tokio::time::timeout(Duration::from_secs(2), self.changed.notified()).await;
            } else {
                self.changed.notified().await;
            }
        }
    }

    /// The most shards, at most `k`, that the model can be split into.
    fn usable_shards(&self, k: usize) -> usize {
        (1..=k)
            .rev()
            .find(|&m| self.files.plan(&vec![1.0; m]).is_ok())
            .unwrap_or(1)
    }

    /// The plan over these workers (weighted by their declared memory), if every worker's
    /// share fits what it offers; else a [`DoesNotFit`] naming who is short and by how much.
    fn fit(&self, g: &Inner, ids: &[u64]) -> anyhow::Result<tessera_core::ShardPlan> {
        // Weighted by declared memory: a bigger worker takes a bigger slice.
        let workers: Vec<&WorkerEntry> = ids
            .iter()
            .map(|id| g.workers.get(id).ok_or_else(|| gone(*id)))
            .collect::<anyhow::Result<_>>()?;
        let weights: Vec<f64> = workers.iter().map(|w| w.memory.max(1) as f64).collect();
        let plan = self
            .files
            .plan(&weights)
            .or_else(|_| self.files.plan(&vec![1.0; ids.len()]))?;
        let cfg = &self.files.cfg;
        let positions = self.scheduler.config().kv_budget as u64;
        let cache = self.cache_type().bytes();
        let mut short = Vec::new();
        for (rank, w) in workers.iter().enumerate() {
            let spec = &plan.shards[rank];
            let bytes = self.files.shard_bytes(spec)?;
            let need = WorkerNeed::new(bytes, spec.cost(cfg, cache).kv_bytes_per_token, positions);
            if let Some(s) = need.shortfall(w.memory) {
                short.push(format!(
                    "worker {} (rank {rank}) offers {:.1} MiB but its shard needs {}: {:.1} MiB short",
                    w.name,
                    w.memory as f64 / (1u64 << 20) as f64,
                    need.describe(),
                    s as f64 / (1u64 << 20) as f64
                ));
            }
        }
        if !short.is_empty() {
            return Err(DoesNotFit(format!(
                "the plan does not fit over {} worker(s): {}; add workers or memory \
                 (or lower --kv-cache-gib)",
                ids.len(),
                short.join("; ")
            ))
            .into());
        }
        Ok(plan)
    }

    async fn load_all(
        self: Arc<Self>,
        ids: &[u64],
        mesh_id: u64,
    ) -> Result<(), (Option<u64>, anyhow::Error)> {
        let started = Instant::now();
        let (plan, members) = {
            let g = self.inner.lock().unwrap();
            // A worker may have been replaced (restarted under its name) since it was picked:
            // then this plan is void, and the supervisor plans again.
            let members: Vec<(u64, String, String, String, bool)> = ids
                .iter()
                .map(|id| {
                    let w = g.workers.get(id).ok_or_else(|| (None, gone(*id)))?;
                    let local =
                        !self.model_sha256.is_empty() && w.model_sha256 == self.model_sha256;
                    Ok((
                        w.id,
                        w.name.clone(),
                        w.grpc_addr.clone(),
                        w.quic_addr.clone(),
                        local,
                    ))
                })
                .collect::<Result<_, _>>()?;
            (self.fit(&g, ids).map_err(|e| (None, e))?, members)
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
                Ok((reply, c, held)) => {
                    bytes += reply.weight_bytes_per_token;
                    if let Some(w) = self.inner.lock().unwrap().workers.get_mut(&id) {
                        w.weight_bytes_held = reply.weight_bytes_held;
                        w.rss_bytes = reply.rss_bytes;
                        w.kv_cache = reply.kv_cache.clone();
                        // What it holds now, as it would tell a coordinator it registers with:
                        // after a failure of the mesh alone, it is adopted again.
                        w.held = Some(held);
                    }
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
        let names: Vec<(String, String)> =
            members.iter().map(|m| (m.1.clone(), m.2.clone())).collect();
        let secs = started.elapsed().as_secs_f64();
        self.serve_mesh(ids, clients, &names, bytes, plan.shards, mesh_id)
            .await?;
        *self.load_seconds.lock().unwrap() = Some(secs);
        tracing::info!(mesh = mesh_id, secs, "cluster ready");
        eprintln!(
            "cluster ready: {} worker(s), shards loaded in {secs:.2} s",
            ids.len()
        );
        Ok(())
    }

    /// Opens every worker's step stream and hands the scheduler the mesh: `ids[r]` holds
    /// `shards[r]`, and is `names[r]` (its name and address).
    async fn serve_mesh(
        &self,
        ids: &[u64],
        clients: Vec<(u64, WorkerClient<Channel>)>,
        names: &[(String, String)],
        bytes: u64,
        shards: Vec<tessera_core::ShardSpec>,
        mesh_id: u64,
    ) -> Result<(), (Option<u64>, anyhow::Error)> {
        let mut links = Vec::new();
        for (rank, (id, mut client)) in clients.into_iter().enumerate() {
            let (tx, rx) = mpsc::channel::<StepRequest>(4);
            let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
            let resp = client
                .step(self.keys.request(stream))
                .await
                .map_err(|s| (Some(id), anyhow::anyhow!("{}", s.message())))?;
            links.push(StepLink {
                name: names[rank].0.clone(),
                addr: names[rank].1.clone(),
                id,
                tx,
                rx: resp.into_inner(),
            });
        }
        self.cache_usage.lock().unwrap().clear();
        let runner = RemoteCluster {
            cfg: self.files.cfg.clone(),
            links,
            weight_bytes: bytes,
            handle: tokio::runtime::Handle::current(),
            comm: Default::default(),
            usage: self.cache_usage.clone(),
            sent: 0,
        };
        let mut g = self.inner.lock().unwrap();
        // A worker replaced (restarted under its name) while the mesh was loading: the plan
        // is void, the supervisor plans again.
        if let Some(id) = ids.iter().find(|id| !g.workers.contains_key(id)) {
            return Err((None, gone(*id)));
        }
        g.mesh_id = g.mesh_id.max(mesh_id);
        for (rank, id) in ids.iter().enumerate() {
            if let Some(w) = g.workers.get_mut(id) {
                w.state = WState::Ready;
                w.rank = Some(rank);
                w.shard = Some(shards[rank].clone());
            }
        }
        g.state = "ready";
        g.refusal = None;
        g.served = true;
        drop(g);
        self.scheduler.set_runner(Box::new(runner));
        Ok(())
    }

    /// Live workers that together still hold a whole mesh of this model, cut as this
    /// coordinator would cut it now (same file by sha256, configuration, precision, wire,
    /// plan, and peers at the addresses they registered): their ids in rank order, and the
    /// mesh. A restarted coordinator adopts them instead of shipping the shards again.
    /// After a failure of the mesh alone, the same check finds the shards this coordinator
    /// loaded (its own record of each member's, kept at each load and adoption), and a model
    /// directory (no file to hash) qualifies too: workers never report a shard without a hash.
    fn adoptable(&self, g: &Inner, live: &[u64]) -> Option<(Vec<u64>, u64)> {
        let cfg_json = serde_json::to_string(&self.files.cfg).ok()?;
        let mut meshes: BTreeMap<u64, Vec<(usize, u64)>> = BTreeMap::new();
        for id in live {
            let Some(h) = &g.workers[id].held else {
                continue;
            };
            let Ok(spec) = serde_json::from_str::<tessera_core::ShardSpec>(&h.spec_json) else {
                continue;
            };
            if h.model_sha256 == self.model_sha256
                && h.config_json == cfg_json
                && h.exact == self.exact
                && h.kv_cache == self.cache_type().name()
                && h.wire == self.wire.name()
            {
                meshes.entry(h.mesh_id).or_default().push((spec.rank, *id));
            }
        }
        // The newest mesh first.
        meshes.into_iter().rev().find_map(|(mesh, mut members)| {
            members.sort_unstable();
            let ids: Vec<u64> = members.iter().map(|m| m.1).collect();
            let ranks_ok = members.iter().enumerate().all(|(r, m)| m.0 == r);
            if !ranks_ok || ids.len() != self.n {
                return None;
            }
            let plan = self.fit(g, &ids).ok()?;
            let whole = ids.iter().enumerate().all(|(r, id)| {
                let h = g.workers[id].held.as_ref().expect("held");
                serde_json::to_string(&plan.shards[r]).is_ok_and(|j| j == h.spec_json)
                    && h.peers.len() == ids.len()
                    && h.peers
                        .iter()
                        .zip(&ids)
                        .all(|(p, pid)| p.quic_addr == g.workers[pid].quic_addr)
            });
            whole.then_some((ids, mesh))
        })
    }

    /// Serves with the shards the workers `ids` already hold (see [`Self::adoptable`]):
    /// nothing is shipped or read, the step streams open and the cluster is ready.
    async fn adopt(&self, ids: &[u64], mesh_id: u64) -> Result<(), (Option<u64>, anyhow::Error)> {
        let started = Instant::now();
        let members: Vec<(u64, String, String, HeldShard)> = {
            let g = self.inner.lock().unwrap();
            ids.iter()
                .map(|id| {
                    let w = g.workers.get(id).ok_or_else(|| (None, gone(*id)))?;
                    let h = w.held.clone().unwrap_or_default();
                    Ok((w.id, w.name.clone(), w.grpc_addr.clone(), h))
                })
                .collect::<Result<_, _>>()?
        };
        let mut clients = Vec::new();
        let mut shards = Vec::new();
        let mut bytes = 0;
        for (id, _, addr, h) in &members {
            let client = self.worker_client(addr).await.map_err(|e| (Some(*id), e))?;
            clients.push((*id, client));
            shards.push(
                serde_json::from_str(&h.spec_json)
                    .map_err(|e| (Some(*id), anyhow::anyhow!("its shard: {e}")))?,
            );
            bytes += h.weight_bytes_per_token;
        }
        // The shards stay, their mesh does not: the old coordinator may have died after
        // sending a step to only some of them, and left messages of it in the connections (or
        // a worker waiting for them). Each member drops its mesh and joins a new one.
        // Where the link between them is still down, each member's join gives up after its
        // patience (ABORTED): they all try again on a fresh mesh, for up to REMESH_FOR in all,
        // since shipping the shards again would not mend a link. Any other error (a worker
        // gone, or holding another mesh) ends the adoption at once.
        let old_mesh = mesh_id;
        let mut from = vec![old_mesh; clients.len()];
        let mut tries = 0;
        let mesh_id = loop {
            tries += 1;
            let mesh_id = {
                let mut g = self.inner.lock().unwrap();
                g.mesh_id = g.mesh_id.max(old_mesh) + 1;
                g.mesh_id
            };
            let remeshes: Vec<_> = clients
                .iter()
                .zip(&from)
                .map(|((id, client), &from)| {
                    let (id, mut client) = (*id, client.clone());
                    let req = self.keys.request(RemeshRequest {
                        from_mesh_id: from,
                        to_mesh_id: mesh_id,
                    });
                    tokio::spawn(async move { (id, client.remesh(req).await) })
                })
                .collect();
            let mut missed = None;
            for (t, from) in remeshes.into_iter().zip(from.iter_mut()) {
                let (id, r) = t.await.map_err(|e| (None, e.into()))?;
                match r {
                    Ok(_) => *from = mesh_id,
                    Err(s) if s.code() == tonic::Code::Aborted => {
                        missed.get_or_insert((id, s.message().to_string()));
                    }
                    Err(s) => {
                        return Err((
                            Some(id),
                            anyhow::anyhow!("rebuilding its mesh: {}", s.message()),
                        ));
                    }
                }
            }
            match missed {
                None => break mesh_id,
                Some((_, why)) if started.elapsed() < REMESH_FOR => {
                    tracing::warn!(mesh = mesh_id, "rebuilding the mesh failed: {why}");
                    eprintln!("rebuilding the mesh failed ({why}); trying again");
                }
                Some((id, why)) => {
                    return Err((
                        Some(id),
                        anyhow::anyhow!(
                            "rebuilding its mesh (tried {tries} times in {:.0} s): {why}",
                            started.elapsed().as_secs_f64()
                        ),
                    ));
                }
            }
        };
        let names: Vec<(String, String)> =
            members.iter().map(|m| (m.1.clone(), m.2.clone())).collect();
        self.serve_mesh(ids, clients, &names, bytes, shards, mesh_id)
            .await?;
        {
            let mut g = self.inner.lock().unwrap();
            for m in &members {
                if let Some(w) = g.workers.get_mut(&m.0) {
                    w.weight_bytes_held = m.3.weight_bytes_held;
                    w.kv_cache = m.3.kv_cache.clone();
                    // The worker now holds its shard in the new mesh (Remesh said so); the
                    // next adoption starts from it.
                    if let Some(h) = w.held.as_mut() {
                        h.mesh_id = mesh_id;
                    }
                }
            }
        }
        let secs = started.elapsed().as_secs_f64();
        *self.load_seconds.lock().unwrap() = Some(secs);
        tracing::info!(mesh = mesh_id, secs, "cluster ready (adopted)");
        eprintln!(
            "cluster ready: adopted the shards {} worker(s) already hold (mesh {old_mesh}, \
             rebuilt as mesh {mesh_id}; sha256 and shard specs checked; nothing shipped) in \
             {secs:.2} s",
            ids.len()
        );
        Ok(())
    }

    /// A client of the worker at `addr`, for loading and the step stream.
    async fn worker_client(&self, addr: &str) -> anyhow::Result<WorkerClient<Channel>> {
        let channel = self
            .keys
            .channel(addr, |e| {
                e.connect_timeout(CONNECT_TIMEOUT)
                    .initial_stream_window_size(tessera_proto::STREAM_WINDOW)
                    .initial_connection_window_size(tessera_proto::STREAM_WINDOW)
            })
            .await
            .with_context(|| format!("connecting to worker {addr}"))?;
        Ok(WorkerClient::new(channel)
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20))
    }

    async fn load_one(
        &self,
        addr: &str,
        spec: &tessera_core::ShardSpec,
        peers: Vec<Peer>,
        mesh_id: u64,
        local: bool,
    ) -> anyhow::Result<(LoadReply, WorkerClient<Channel>, HeldShard)> {
        let mut client = self.worker_client(addr).await?;
        // Two passes over the shard's slices, off the async runtime: one to hash them (for the
        // assignment), one to stream them; whole rows are views of the memory map, so neither
        // holds the shard in memory.
        let (total, sha) = if local {
            (0, String::new())
        } else {
            let files = self.files.clone();
            let spec2 = spec.clone();
            tokio::task::spawn_blocking(move || -> anyhow::Result<(u64, String)> {
                let mut h = sha2::Sha256::new();
                let mut total = 0u64;
                for (t, rows, cols) in shard_reads(&files.cfg, &spec2, &files.weights) {
                    let raw = files.weights.raw(t, rows, cols)?;
                    h.update(raw.data.as_slice());
                    total += raw.data.len() as u64;
                }
                Ok((total, format!("{:x}", h.finalize())))
            })
            .await??
        };
        let (block_tx, block_rx) = mpsc::channel::<TensorBlock>(4);
        if !local {
            let files = self.files.clone();
            let spec2 = spec.clone();
            tokio::task::spawn_blocking(move || {
                for (t, rows, cols) in shard_reads(&files.cfg, &spec2, &files.weights) {
                    let Ok(raw) = files.weights.raw(t, rows, cols.clone()) else {
                        return;
                    };
                    let shape: Vec<u64> = raw.shape.iter().map(|&d| d as u64).collect();
                    for (i, c) in raw.data.as_slice().chunks(CHUNK).enumerate() {
                        let b = TensorBlock {
                            name: t.key(),
                            shape: shape.clone(),
                            row_start: raw.rows.start as u64,
                            row_end: raw.rows.end as u64,
                            col_start: cols.start as u64,
                            col_end: cols.end as u64,
                            offset: (i * CHUNK) as u64,
                            data: c.to_vec(),
                            ggml_type: raw.ty.id(),
                            stored_col_start: raw.cols.start as u64,
                            stored_col_end: raw.cols.end as u64,
                        };
                        if block_tx.blocking_send(b).is_err() {
                            return;
                        }
                    }
                }
            });
        }
        let assignment = Assignment {
            config_json: serde_json::to_string(&self.files.cfg)?,
            spec_json: serde_json::to_string(spec)?,
            peers,
            mesh_id,
            use_local_model: local,
            total_bytes: total,
            sha256: sha,
            exact: self.exact,
            wire: self.wire.name().into(),
            model_sha256: self.model_sha256.clone(),
            kv_cache: self.cache_type().name().into(),
        };
        // The worker's record of what it holds, less the byte counts its reply brings.
        let record = assignment.clone();
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
        use tokio_stream::StreamExt;
        let stream = tokio_stream::iter(std::iter::once(first)).chain(
            tokio_stream::wrappers::ReceiverStream::new(block_rx).map(move |b| {
                bar2.inc(b.data.len() as u64);
                LoadChunk {
                    chunk: Some(load_chunk::Chunk::Block(b)),
                }
            }),
        );
        let reply = client.load(self.keys.request(stream)).await.map_err(|s| {
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
        let held = HeldShard::of(
            &record,
            reply.weight_bytes_per_token,
            reply.weight_bytes_held,
        );
        Ok((reply, client, held))
    }

    /// Checks every worker each second, all at once: a silent ready one degrades the
    /// cluster, a silent registered one is set aside; a worker marked down that answers again
    /// (it was blamed for a peer's failure, or the network came back) can be used again. The
    /// checks also tell each worker that the coordinator still knows it.
    pub async fn health_loop(self: Arc<Self>) {
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            // The mesh the checks are about: a reply that arrives after a reload started (a
            // worker then answers "idle" while it takes its new shard) says nothing of the
            // new mesh, even if the worker is "ready" in it again by then.
            let (watch, mesh): (Vec<(u64, String, WState)>, u64) = {
                let g = self.inner.lock().unwrap();
                let watch = g
                    .workers
                    .values()
                    .map(|w| (w.id, w.grpc_addr.clone(), w.state))
                    .collect();
                (watch, g.mesh_id)
            };
            let mut checks = Vec::new();
            for (id, addr, was) in watch {
                let keys = self.keys.clone();
                checks.push(tokio::spawn(async move {
                    let reply = tokio::time::timeout(Duration::from_secs(3), async {
                        let ch = keys
                            .channel(&addr, |e| e.connect_timeout(CONNECT_TIMEOUT))
                            .await
                            .ok()?;
                        WorkerClient::new(ch)
                            .health(keys.request(Empty {}))
                            .await
                            .ok()
                    })
                    .await
                    .ok()
                    .flatten()
                    .map(|r| r.into_inner());
                    (id, was, reply)
                }));
            }
            for c in checks {
                let Ok((id, was, reply)) = c.await else {
                    continue;
                };
                let mut g = self.inner.lock().unwrap();
                if g.mesh_id != mesh {
                    continue;
                }
                let Some(w) = g.workers.get_mut(&id) else {
                    continue;
                };
                if w.state != was {
                    continue;
                }
                // A process restarted at the same address answers too, but it is not the
                // worker of this entry (it has another id, or none yet): it registers anew.
                let itself = reply.as_ref().is_some_and(|r| r.worker_id == id);
                match (was, reply) {
                    (WState::Ready, Some(r)) if r.state == "ready" && itself => {}
                    (WState::Ready, _) => {
                        drop(g);
                        self.fail_worker(id);
                    }
                    (WState::Registered, None) => {
                        tracing::warn!(worker = %w.name, "registered worker does not answer");
                        w.state = WState::Down;
                    }
                    (WState::Down, Some(_)) if itself => {
                        tracing::info!(worker = %w.name, "worker answers again");
                        w.state = WState::Registered;
                        drop(g);
                        self.changed.notify_one();
                    }
                    _ => {}
                }
            }
        }
    }
}

/// A request's prompt before tokenization.
pub enum PromptInput {
    Text(String),
    Chat(Vec<Message>),
    Ids(Vec<u32>),
}

pub fn finish_reason(f: tessera_model::Finish) -> &'static str {
    match f {
        tessera_model::Finish::Stop => "stop",
        tessera_model::Finish::Length => "length",
        tessera_model::Finish::Cancelled => "cancelled",
    }
}

/// One worker as /v1/cluster and `tessera status` show it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct WorkerView {
    pub id: u64,
    pub name: String,
    pub grpc_addr: String,
    pub quic_addr: String,
    pub state: &'static str,
    pub rank: Option<usize>,
    pub shard: Option<tessera_core::ShardSpec>,
    pub memory_bytes: u64,
    pub backend: String,
    /// KV caches it held after the last step: sequences, and positions over all of them.
    pub kv_cached_sequences: u32,
    pub kv_cached_positions: u64,
    /// Bytes of weights it holds (its shard, in the file's formats) and its resident memory
    /// when it finished loading.
    pub weight_bytes_held: u64,
    pub rss_bytes: u64,
    /// What its KV cache holds ("f16" or "f32"; empty before it loaded a shard).
    pub kv_cache: String,
}

impl CoordinatorState {
    /// What the workers' KV caches hold on the CPU (GPU workers keep f32).
    pub fn cache_type(&self) -> tessera_core::CacheType {
        self.cache_type
    }

    pub fn workers(&self) -> Vec<WorkerView> {
        let usage = self.cache_usage.lock().unwrap().clone();
        let g = self.inner.lock().unwrap();
        g.workers
            .values()
            .map(|w| {
                let (seqs, pos) = usage.get(&w.id).copied().unwrap_or_default();
                WorkerView {
                    id: w.id,
                    name: w.name.clone(),
                    grpc_addr: w.grpc_addr.clone(),
                    quic_addr: w.quic_addr.clone(),
                    state: match w.state {
                        WState::Registered => "registered",
                        WState::Ready => "ready",
                        WState::Down => "down",
                    },
                    rank: w.rank,
                    shard: w.shard.clone(),
                    memory_bytes: w.memory,
                    backend: w.backend.clone(),
                    kv_cached_sequences: if w.state == WState::Ready { seqs } else { 0 },
                    kv_cached_positions: if w.state == WState::Ready { pos } else { 0 },
                    weight_bytes_held: w.weight_bytes_held,
                    rss_bytes: w.rss_bytes,
                    kv_cache: w.kv_cache.clone(),
                }
            })
            .collect()
    }

    /// The prompt's token ids (a conversation through the model's chat template), checked
    /// against the vocabulary and the context.
    pub fn tokenize(&self, input: PromptInput) -> Result<Vec<u32>, ModelError> {
        let files = &self.files;
        let ids = match input {
            PromptInput::Ids(ids) => ids,
            PromptInput::Text(t) => files.tokenizer.encode(&t)?,
            PromptInput::Chat(m) => files.tokenizer.encode(&files.render_chat(&m)?)?,
        };
        tessera_model::check_step(&files.cfg, &ids, 0)?;
        Ok(ids)
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
        if let Err(e) = st.keys.check(req.metadata()) {
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
        // Mesh ids only grow, past any a worker still holds (from this coordinator's previous
        // life), so that a new mesh is never confused with an old one.
        if let Some(h) = &r.held {
            g.mesh_id = g.mesh_id.max(h.mesh_id);
        }
        // The same process registering again (same name, QUIC key and addresses: it missed
        // the health checks for a while, under load or a short network cut): nothing about
        // it changed, whatever it is doing (serving, or taking a shard being loaded). A
        // restarted process has a new key, and replaces the entry below.
        let same = g
            .workers
            .values_mut()
            .find(|w| {
                w.name == r.name
                    && w.public_key == r.public_key_der
                    && w.grpc_addr == r.grpc_addr
                    && w.quic_addr == r.quic_addr
            })
            .map(|w| {
                if w.state == WState::Down {
                    w.state = WState::Registered;
                }
                w.id
            });
        if let Some(id) = same {
            drop(g);
            tracing::info!(id, name = %r.name, "worker registered again");
            st.changed.notify_one();
            return Ok(Response::new(RegisterReply {
                worker_id: id,
                certificate_der: cert,
                ca_der: st.ca.ca_der(),
            }));
        }
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
            g.loaded = false;
            g.state = "recovering";
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
                shard: None,
                weight_bytes_held: 0,
                rss_bytes: 0,
                kv_cache: String::new(),
                held: r.held,
                public_key: r.public_key_der,
                standby: r.standby,
            },
        );
        drop(g);
        if replaced_ready {
            // A worker back under its name died: running sequences carry on on the new mesh.
            st.scheduler
                .recover(&format!("recovering: worker {} restarted", r.name));
        }
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
        st.keys.check(req.metadata())?;
        let r = req.into_inner();
        let chat = r.chat || !r.messages.is_empty();
        let input = if !r.prompt_ids.is_empty() {
            PromptInput::Ids(r.prompt_ids.clone())
        } else if !r.messages.is_empty() {
            PromptInput::Chat(
                r.messages
                    .iter()
                    .map(|m| Message {
                        role: m.role.clone(),
                        content: m.content.clone(),
                    })
                    .collect(),
            )
        } else if r.chat {
            PromptInput::Chat(vec![Message {
                role: "user".into(),
                content: r.prompt.clone(),
            }])
        } else {
            PromptInput::Text(r.prompt.clone())
        };
        let prompt = st
            .tokenize(input)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let logprobs = r.logprobs.map(|k| k as usize);
        if let Some(k) = logprobs
            && k > MAX_LOGPROBS
        {
            return Err(Status::invalid_argument(format!(
                "logprobs asks for {k} alternatives; at most {MAX_LOGPROBS}"
            )));
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
                logprobs,
            },
            ignore_eos: r.ignore_eos,
        };
        let stop_ids = st.files.stop_ids(chat);
        let n_prompt = prompt.len();
        let mut events = st
            .scheduler
            .submit(
                &st.files.cfg,
                Job {
                    prompt,
                    params: params.clone(),
                    stop_ids: stop_ids.clone(),
                },
            )
            .map_err(|e| match e {
                SubmitError::QueueFull(_) => Status::resource_exhausted(e.to_string()),
                SubmitError::NotReady(_) => Status::unavailable(e.to_string()),
                SubmitError::Invalid(_) => Status::invalid_argument(e.to_string()),
            })?;
        let (tx, rx) = mpsc::channel::<Result<GenerateEvent, Status>>(64);
        tokio::spawn(async move {
            let files = st.files.clone();
            // The end token that stopped generation is not answer text.
            let end_ids = if params.ignore_eos {
                vec![]
            } else {
                stop_ids.clone()
            };
            let mut text = StopText::new(r.stop.clone(), end_ids);
            let started = Instant::now();
            let mut first: Option<Instant> = None;
            let mut generated = 0u32;
            let token = |id: u32, text: String, lp: Option<Box<TokenLogprobs>>| {
                let (logprob, top) = match lp {
                    Some(lp) => (
                        Some(lp.logprob),
                        lp.top
                            .iter()
                            .map(|&(id, logprob)| TopLogprob {
                                id,
                                logprob,
                                text: files.tokenizer.decode_tail(&[id]).unwrap_or_default(),
                            })
                            .collect(),
                    ),
                    None => (None, vec![]),
                };
                GenerateEvent {
                    event: Some(generate_event::Event::Token(Token {
                        id,
                        text,
                        logprob,
                        top,
                    })),
                }
            };
            loop {
                let ev = tokio::select! {
                    ev = events.recv() => ev,
                    // The client went away: dropping `events` cancels the sequence.
                    _ = tx.closed() => return,
                };
                match ev {
                    Some(Event::Token(id, lp)) => {
                        first.get_or_insert_with(Instant::now);
                        generated += 1;
                        let piece = text.push(&files.tokenizer, id);
                        if tx.send(Ok(token(id, piece, lp))).await.is_err() {
                            return;
                        }
                        if text.stopped {
                            // A stop string: end here; dropping `events` frees the sequence.
                            let now = Instant::now();
                            let first = first.unwrap_or(now);
                            let done = Done {
                                prompt_tokens: n_prompt as u32,
                                generated_tokens: generated,
                                prefill_seconds: (first - started).as_secs_f64(),
                                decode_seconds: (now - first).as_secs_f64(),
                                decode_steps: generated.saturating_sub(1),
                                finish_reason: "stop".into(),
                                ..Default::default()
                            };
                            let _ = tx
                                .send(Ok(GenerateEvent {
                                    event: Some(generate_event::Event::Done(done)),
                                }))
                                .await;
                            return;
                        }
                    }
                    Some(Event::Done(d)) => {
                        let tail = text.finish(&files.tokenizer);
                        if !tail.is_empty()
                            && tx.send(Ok(token(u32::MAX, tail, None))).await.is_err()
                        {
                            return;
                        }
                        let s = &d.stats;
                        // A share of the steps' time at the coordinator.
                        let c = &d.comm;
                        let share = |ns: u64| {
                            if c.step_ns > 0 {
                                ns as f64 / c.step_ns as f64
                            } else {
                                0.0
                            }
                        };
                        let done = Done {
                            prompt_tokens: s.prompt_tokens as u32,
                            generated_tokens: s.generated as u32,
                            prefill_seconds: s.prefill.as_secs_f64(),
                            decode_seconds: s.decode.as_secs_f64(),
                            decode_steps: s.decode_steps as u32,
                            finish_reason: finish_reason(s.finish).into(),
                            weight_bytes_per_token: d.weight_bytes_per_token,
                            allreduce_mean_us: if d.comm.allreduce_count > 0 {
                                d.comm.allreduce_ns as f64 / d.comm.allreduce_count as f64 / 1e3
                            } else {
                                0.0
                            },
                            comm_fraction: share(c.allreduce_ns),
                            logits_bytes_per_step: d.comm.logits_bytes as f64
                                / d.comm.steps.max(1) as f64,
                            compute_fraction: share(c.shard_step_ns.saturating_sub(c.allreduce_ns)),
                            control_fraction: share(c.step_ns.saturating_sub(c.shard_step_ns)),
                        };
                        let _ = tx
                            .send(Ok(GenerateEvent {
                                event: Some(generate_event::Event::Done(done)),
                            }))
                            .await;
                        return;
                    }
                    Some(Event::Error(e)) => {
                        let _ = tx.send(Err(Status::unavailable(e.to_string()))).await;
                        return;
                    }
                    None => {
                        let _ = tx
                            .send(Err(Status::internal("the scheduler stopped")))
                            .await;
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn status(&self, req: Request<Empty>) -> Result<Response<ClusterStatus>, Status> {
        self.state.keys.check(req.metadata())?;
        let workers = self
            .state
            .workers()
            .into_iter()
            .map(|w| WorkerStatus {
                id: w.id,
                name: w.name,
                grpc_addr: w.grpc_addr,
                state: w.state.into(),
                rank: w.rank.unwrap_or(0) as u32,
                shard: w.rank.map(|r| format!("rank {r}")).unwrap_or_default(),
                memory_bytes: w.memory_bytes,
                backend: w.backend,
            })
            .collect();
        Ok(Response::new(ClusterStatus {
            state: self.state.state(),
            model: self.state.files.path.display().to_string(),
            workers,
        }))
    }
}

/// Serves the coordinator's gRPC API on `listener`, and the HTTP API on `http` when given,
/// until the process ends.
pub async fn serve(
    state: Arc<CoordinatorState>,
    listener: tokio::net::TcpListener,
    http: Option<(tokio::net::TcpListener, http::HttpConfig)>,
) -> anyhow::Result<()> {
    tokio::spawn(state.clone().supervise());
    tokio::spawn(state.clone().health_loop());
    if let Some((l, cfg)) = http {
        let st = state.clone();
        tokio::spawn(async move {
            if let Err(e) = http::serve(st, l, cfg).await {
                tracing::error!("HTTP API stopped: {e:#}");
                eprintln!("HTTP API stopped: {e:#}");
            }
        });
    }
    let keys = state.keys.clone();
    let svc = CoordinatorServer::new(CoordinatorService { state });
    tonic::transport::Server::builder()
        .add_service(svc)
        .serve_with_incoming(keys.incoming(listener))
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mesh_that_keeps_failing_is_reloaded_not_rebuilt_again_and_again() {
        let t0 = Instant::now();
        let s = |secs: u64| t0 + Duration::from_secs(secs);
        let mut f = MeshFailures::default();
        // Three failures within the window are each mended by a rebuild; the fourth is not.
        assert!(f.note(s(0)));
        assert!(f.note(s(10)));
        assert!(f.note(s(20)));
        assert!(!f.note(s(30)));
        // Once the early ones are older than the window, rebuilding is tried again.
        assert!(!f.note(s(59)));
        assert!(f.note(s(85)));
        assert_eq!(f.at.len(), 3, "{:?}", f.at);
        // Far apart, failures never add up.
        let mut f = MeshFailures::default();
        for i in 0..10 {
            assert!(f.note(s(i * 61)), "failure {i}");
        }
    }
}
