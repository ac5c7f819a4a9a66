//! Continuous batching. One thread owns the cluster ([`Runner`]) and runs steps back to back:
//! every active sequence advances by one token per step, new requests' prompts join as
//! prefill chunks, finished and cancelled sequences leave and their KV caches are freed in
//! the next step. One step for B sequences reads the weights once, so throughput grows with
//! concurrency until the step turns compute-bound.
//!
//! Requests wait in a bounded queue; admission is bounded by `max_seqs` and by a KV budget in
//! cache positions (a sequence reserves its prompt plus `max_tokens`, capped at the context).
//! A request whose receiver is dropped (a client that went away) is cancelled.

use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};
use tessera_model::{
    CommStats, Draw, Finish, GenStats, GenerateParams, ModelError, Pick, Runner, Sampler, SeqStep,
    TokenLogprobs, Want, check_step,
};
use tokio::sync::mpsc;

#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// Requests waiting for a slot; more are refused (HTTP 429).
    pub max_queue: usize,
    /// Sequences decoding together in one step.
    pub max_seqs: usize,
    /// KV cache positions all active sequences together may reserve.
    pub kv_budget: usize,
    /// Prompt tokens prefilled per step (over all joining sequences), so that a long prompt
    /// does not stall the others' decoding for its whole prefill.
    pub prefill_chunk: usize,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            max_queue: 64,
            max_seqs: 16,
            kv_budget: 65536,
            prefill_chunk: 512,
        }
    }
}

/// What a request receives, in order: tokens, then one `Done` or one `Error`.
#[derive(Debug)]
pub enum Event {
    /// A token, with its logprobs where the request asked for them.
    Token(u32, Option<Box<TokenLogprobs>>),
    Done(Box<SeqDone>),
    Error(ModelError),
}

#[derive(Debug, Clone)]
pub struct SeqDone {
    pub stats: GenStats,
    /// All-reduce and step time of the cluster while this sequence was active.
    pub comm: CommStats,
    pub weight_bytes_per_token: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SubmitError {
    /// The queue holds `max_queue` requests.
    QueueFull(usize),
    /// The cluster cannot take requests now (its state).
    NotReady(String),
    /// The request itself is wrong (a prompt longer than the context, a bad token id...).
    Invalid(String),
}

impl std::fmt::Display for SubmitError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SubmitError::QueueFull(n) => write!(f, "the request queue is full ({n} waiting)"),
            SubmitError::NotReady(s) => write!(f, "the cluster is not ready: {s}"),
            SubmitError::Invalid(s) => write!(f, "{s}"),
        }
    }
}

pub struct Job {
    pub prompt: Vec<u32>,
    pub params: GenerateParams,
    /// Tokens that end generation (end of sequence, end of turn).
    pub stop_ids: Vec<u32>,
}

struct Queued {
    job: Job,
    tx: mpsc::UnboundedSender<Event>,
    queued_at: Instant,
}

/// How long running and queued requests wait for a cluster that was taken away (a planned
/// reload, or a recovery from a failed worker) before they fail.
pub const RELOAD_WAIT: Duration = Duration::from_secs(120);

/// How often one sequence may be replayed after failed steps before it fails itself: a step
/// that fails whatever the mesh (an error a worker reports for this batch every time) must
/// not reload the cluster forever.
pub const MAX_REPLAYS: u32 = 3;

struct Active {
    seq: u64,
    job: Job,
    /// Tokens sent since the prompt was last (re)started.
    out: Vec<u32>,
    tx: mpsc::UnboundedSender<Event>,
    sampler: Sampler,
    /// Prompt tokens already in the cache.
    prefilled: usize,
    /// The next token to feed (after the prefill).
    next: u32,
    pos: usize,
    reserved: usize,
    stats: GenStats,
    comm0: CommStats,
    /// When the request was queued, and when it last sent a token (for the latency histograms).
    queued_at: Instant,
    last_token: Option<Instant>,
    /// Times this sequence was replayed after a failed step.
    replays: u32,
}

impl Active {
    /// Starts the sequence over on a cluster without its cache: its prompt becomes the prompt
    /// and the tokens already sent, so the next token sampled is the one that comes after
    /// them, as it would have been.
    fn restart(&mut self) {
        if self.prefilled >= self.job.prompt.len() {
            self.job.prompt.append(&mut self.out);
        }
        self.out.clear();
        self.prefilled = 0;
    }
}

/// Latency distributions for /metrics, as vLLM exposes them. Handles: the scheduler observes,
/// a snapshot of [`Metrics`] shares them.
#[derive(Debug, Clone)]
pub struct Latency {
    /// From the request's arrival (queueing included) to its first token.
    pub time_to_first_token: Histogram,
    /// Between consecutive tokens of one sequence.
    pub time_per_output_token: Histogram,
    /// From arrival to the last token, for requests that completed.
    pub request: Histogram,
    /// One forward step of the whole batch.
    pub step: Histogram,
    /// From a failed step (or a worker found dead) to the next cluster taking over.
    pub recovery: Histogram,
}

impl Default for Latency {
    fn default() -> Self {
        // vLLM's buckets, with finer ones below 10 ms, where a small model's decode lives.
        let ttft = [
            0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
            10.0, 20.0, 40.0, 80.0, 160.0, 640.0,
        ];
        let tpot = [
            0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2,
            0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0,
        ];
        let e2e = [
            0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
            120.0, 240.0, 480.0, 960.0, 1920.0,
        ];
        Latency {
            time_to_first_token: Histogram::new(ttft),
            time_per_output_token: Histogram::new(tpot),
            request: Histogram::new(e2e),
            step: Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
            recovery: Histogram::new(exponential_buckets(0.25, 2.0, 12)),
        }
    }
}

/// Counters for /metrics.
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    pub latency: Latency,
    pub requests: u64,
    pub rejected_queue_full: u64,
    pub rejected_not_ready: u64,
    pub rejected_invalid: u64,
    pub completed: u64,
    pub cancelled: u64,
    pub failed: u64,
    pub generated_tokens: u64,
    pub steps: u64,
    pub step_seconds: f64,
    /// Prompt tokens prefilled, and the time of the steps that carried them.
    pub prefill_tokens: u64,
    pub prefill_seconds: f64,
    /// Tokens decoded, and the time of the steps that carried decodes.
    pub decode_tokens: u64,
    pub decode_seconds: f64,
    /// The last step's rates.
    pub last_step_seconds: f64,
    pub last_batch: usize,
    /// The most sequences one step has carried.
    pub max_batch: usize,
    pub comm: CommStats,
    /// Clusters rebuilt after a failure, and the running sequences replayed on them.
    pub recoveries: u64,
    pub replayed_sequences: u64,
}

/// Why the cluster is taken away from the scheduler.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Away {
    /// It cannot come back: running and queued requests fail.
    Fail,
    /// A planned reload (more workers): requests wait for the next cluster.
    Pause,
    /// A worker failed and the coordinator rebuilds the cluster: requests wait, and the time
    /// to the next cluster is a recovery.
    Recover,
}

struct Shared {
    queue: VecDeque<Queued>,
    /// A runner handed over by the coordinator, picked up by the thread at its next turn.
    incoming: Option<Box<dyn Runner>>,
    /// Bumped when the runner is replaced or withdrawn; the thread then drops its own.
    epoch: u64,
    /// Whether the sequences running at the last epoch change carry on with the next runner
    /// (a planned reload) rather than fail (a failure).
    resume: bool,
    ready: bool,
    state: String,
    /// Since when requests wait for a cluster taken away (a pause or a recovery): new ones
    /// queue meanwhile, and all of them fail if none comes within [`RELOAD_WAIT`].
    waiting_since: Option<Instant>,
    /// Since when a failure's recovery is under way (for the recovery histogram).
    recovering_since: Option<Instant>,
    /// Why the last cluster was withdrawn for good (the error its requests get).
    fail_reason: String,
    active: usize,
    kv_reserved: usize,
    metrics: Metrics,
    stop: bool,
}

impl Shared {
    /// A failure's recovery starts (unless one is under way): requests wait from now.
    fn recovering(&mut self) {
        let now = Instant::now();
        self.waiting_since.get_or_insert(now);
        self.recovering_since.get_or_insert(now);
    }
}

pub struct Scheduler {
    cfg: SchedulerConfig,
    shared: Mutex<Shared>,
    wake: Condvar,
    /// Told of a failed step (the coordinator marks the worker down and reloads).
    on_failure: Box<dyn Fn(&ModelError) + Send + Sync>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Scheduler {
    pub fn start(
        cfg: SchedulerConfig,
        on_failure: Box<dyn Fn(&ModelError) + Send + Sync>,
    ) -> Arc<Scheduler> {
        let s = Arc::new(Scheduler {
            cfg,
            shared: Mutex::new(Shared {
                queue: VecDeque::new(),
                incoming: None,
                epoch: 0,
                resume: false,
                ready: false,
                state: "waiting for workers".into(),
                waiting_since: None,
                recovering_since: None,
                fail_reason: String::new(),
                active: 0,
                kv_reserved: 0,
                metrics: Metrics::default(),
                stop: false,
            }),
            wake: Condvar::new(),
            on_failure,
            thread: Mutex::new(None),
        });
        let s2 = s.clone();
        let t = std::thread::Builder::new()
            .name("scheduler".into())
            .spawn(move || s2.run())
            .expect("starting the scheduler thread");
        *s.thread.lock().unwrap() = Some(t);
        s
    }

    pub fn config(&self) -> &SchedulerConfig {
        &self.cfg
    }

    /// Hands the scheduler a freshly loaded cluster.
    /// Sequences running on the previous cluster carry on with this one (see
    /// [`Scheduler::pause`]).
    pub fn set_runner(&self, runner: Box<dyn Runner>) {
        let mut g = self.shared.lock().unwrap();
        g.incoming = Some(runner);
        g.epoch += 1;
        g.resume = true;
        g.ready = true;
        g.state = "ready".into();
        g.waiting_since = None;
        if let Some(t) = g.recovering_since.take() {
            g.metrics.recoveries += 1;
            g.metrics
                .latency
                .recovery
                .observe(t.elapsed().as_secs_f64());
        }
        drop(g);
        self.wake.notify_all();
    }

    /// Withdraws the cluster for good (nothing can serve the model): active, waiting and
    /// queued requests fail with `reason`, new ones are refused until
    /// [`Scheduler::set_runner`].
    pub fn withdraw(&self, reason: &str) {
        self.take_away(reason, Away::Fail);
    }

    /// Takes the cluster away for a planned reload (more workers): running sequences wait for
    /// the next cluster (up to [`RELOAD_WAIT`]) and carry on there: it prefills their prompt
    /// and the tokens already sent, so their clients see nothing but a pause. Queued and new
    /// requests wait too.
    pub fn pause(&self, state: &str) {
        self.take_away(state, Away::Pause);
    }

    /// As [`Scheduler::pause`], after a failure (a worker died): the coordinator rebuilds the
    /// cluster, and the wait counts as a recovery in the metrics.
    pub fn recover(&self, state: &str) {
        self.take_away(state, Away::Recover);
    }

    fn take_away(&self, state: &str, how: Away) {
        let mut g = self.shared.lock().unwrap();
        g.incoming = None;
        g.epoch += 1;
        g.resume = how != Away::Fail;
        g.ready = false;
        g.state = state.to_string();
        let mut queued = Vec::new();
        match how {
            Away::Fail => {
                g.waiting_since = None;
                g.recovering_since = None;
                g.fail_reason = state.to_string();
                queued = g.queue.drain(..).collect();
                g.metrics.failed += queued.len() as u64;
            }
            Away::Pause => {
                g.waiting_since.get_or_insert_with(Instant::now);
            }
            Away::Recover => g.recovering(),
        }
        drop(g);
        for q in queued {
            let _ = q.tx.send(Event::Error(ModelError::Backend(format!(
                "the cluster cannot serve: {state}"
            ))));
        }
        self.wake.notify_all();
    }

    pub fn is_ready(&self) -> bool {
        self.shared.lock().unwrap().ready
    }

    /// Stops the thread after its current step (active requests fail) and waits for it, so
    /// that the workers can be stopped without a step in flight.
    pub fn shutdown(&self) {
        self.shared.lock().unwrap().stop = true;
        self.withdraw("shutting down");
        let t = self.thread.lock().unwrap().take();
        if let Some(t) = t
            && t.thread().id() != std::thread::current().id()
        {
            let _ = t.join();
        }
    }

    /// (queued, active, KV positions reserved)
    pub fn load(&self) -> (usize, usize, usize) {
        let g = self.shared.lock().unwrap();
        (g.queue.len(), g.active, g.kv_reserved)
    }

    pub fn metrics(&self) -> Metrics {
        self.shared.lock().unwrap().metrics.clone()
    }

    /// Queues a request. Events arrive on the returned receiver; dropping it cancels.
    pub fn submit(
        &self,
        cfg: &tessera_core::ModelConfig,
        job: Job,
    ) -> Result<mpsc::UnboundedReceiver<Event>, SubmitError> {
        let mut g = self.shared.lock().unwrap();
        g.metrics.requests += 1;
        if let Err(e) = check_step(cfg, &job.prompt, 0) {
            g.metrics.rejected_invalid += 1;
            return Err(SubmitError::Invalid(e.to_string()));
        }
        // A sequence reserves its whole length up front; one the KV cache can never hold would
        // otherwise run alone past the budget (admission lets a lone sequence in).
        let need = self.reservation(cfg.max_context, &job);
        if need > self.cfg.kv_budget {
            g.metrics.rejected_invalid += 1;
            return Err(SubmitError::Invalid(format!(
                "the prompt's {} tokens plus max_tokens {} need {need} KV cache positions; \
                 this cluster's KV cache holds {} (--kv-cache-gib)",
                job.prompt.len(),
                job.params.max_tokens,
                self.cfg.kv_budget
            )));
        }
        if !g.ready && g.waiting_since.is_none() {
            g.metrics.rejected_not_ready += 1;
            return Err(SubmitError::NotReady(g.state.clone()));
        }
        if g.queue.len() >= self.cfg.max_queue {
            g.metrics.rejected_queue_full += 1;
            return Err(SubmitError::QueueFull(g.queue.len()));
        }
        let (tx, rx) = mpsc::unbounded_channel();
        g.queue.push_back(Queued {
            job,
            tx,
            queued_at: Instant::now(),
        });
        drop(g);
        self.wake.notify_all();
        Ok(rx)
    }

    fn reservation(&self, ctx: usize, job: &Job) -> usize {
        (job.prompt.len() + job.params.max_tokens).min(ctx)
    }

    fn run(self: Arc<Self>) {
        let mut runner: Option<Box<dyn Runner>> = None;
        let mut epoch = 0u64;
        let mut active: Vec<Active> = Vec::new();
        let mut to_free: Vec<u64> = Vec::new();
        let mut next_seq = 1u64;
        let latency = self.shared.lock().unwrap().metrics.latency.clone();
        loop {
            // Take in a new runner, new requests, and notice cancellations.
            let mut admitted = Vec::new();
            {
                let mut g = self.shared.lock().unwrap();
                loop {
                    if g.stop {
                        return;
                    }
                    if g.epoch != epoch {
                        epoch = g.epoch;
                        runner = g.incoming.take();
                        to_free.clear();
                        if g.resume {
                            // The new cluster has none of their caches: each starts over.
                            active.iter_mut().for_each(Active::restart);
                        } else if !active.is_empty() {
                            g.metrics.failed += active.len() as u64;
                            let why = format!("the cluster cannot serve: {}", g.fail_reason);
                            for a in active.drain(..) {
                                let _ = a.tx.send(Event::Error(ModelError::Backend(why.clone())));
                            }
                        }
                        g.kv_reserved = active.iter().map(|a| a.reserved).sum();
                        g.active = active.len();
                    }
                    let cancelled = active.iter().any(|a| a.tx.is_closed());
                    let work = runner.is_some()
                        && (!active.is_empty() || !g.queue.is_empty() || !to_free.is_empty());
                    if work || cancelled {
                        break;
                    }
                    let waiting = runner.is_none() && (!active.is_empty() || !g.queue.is_empty());
                    match g.waiting_since.filter(|_| waiting) {
                        Some(since) if since.elapsed() >= RELOAD_WAIT => {
                            g.waiting_since = None;
                            let why = format!(
                                "no cluster could take over within {} s ({})",
                                RELOAD_WAIT.as_secs(),
                                g.state
                            );
                            let queued: Vec<Queued> = g.queue.drain(..).collect();
                            g.metrics.failed += (active.len() + queued.len()) as u64;
                            let txs = active.drain(..).map(|a| a.tx);
                            for tx in txs.chain(queued.into_iter().map(|q| q.tx)) {
                                let _ = tx.send(Event::Error(ModelError::Backend(why.clone())));
                            }
                            g.kv_reserved = 0;
                            g.active = 0;
                        }
                        Some(since) => {
                            g = self
                                .wake
                                .wait_timeout(g, RELOAD_WAIT.saturating_sub(since.elapsed()))
                                .unwrap()
                                .0;
                        }
                        None => g = self.wake.wait(g).unwrap(),
                    }
                }
                // Cancelled by the client: leave now, free the cache in this step.
                let before = active.len();
                let mut released = 0;
                active.retain(|a| {
                    if a.tx.is_closed() {
                        to_free.push(a.seq);
                        released += a.reserved;
                        false
                    } else {
                        true
                    }
                });
                g.metrics.cancelled += (before - active.len()) as u64;
                g.kv_reserved -= released;
                if let Some(r) = runner.as_ref() {
                    let ctx = r.cfg().max_context;
                    while active.len() + admitted.len() < self.cfg.max_seqs {
                        let Some(front) = g.queue.front() else { break };
                        if front.tx.is_closed() {
                            g.queue.pop_front();
                            g.metrics.cancelled += 1;
                            continue;
                        }
                        let need = self.reservation(ctx, &front.job);
                        let empty = active.is_empty() && admitted.is_empty();
                        if !empty && g.kv_reserved + need > self.cfg.kv_budget {
                            break;
                        }
                        g.kv_reserved += need;
                        admitted.push((g.queue.pop_front().expect("front"), need));
                    }
                }
                g.active = active.len() + admitted.len();
            }
            let Some(r) = runner.as_mut() else {
                continue;
            };
            let comm_now = r.comm_stats();
            for (q, need) in admitted {
                let seq = next_seq;
                next_seq += 1;
                let waited = q.queued_at.elapsed();
                tracing::debug!(seq, waited_ms = waited.as_millis() as u64, "admitted");
                active.push(Active {
                    seq,
                    out: Vec::new(),
                    sampler: Sampler::new(q.job.params.sampling.clone()),
                    prefilled: 0,
                    next: 0,
                    pos: 0,
                    reserved: need,
                    stats: GenStats {
                        prompt_tokens: q.job.prompt.len(),
                        prefill: Duration::ZERO,
                        generated: 0,
                        decode: Duration::ZERO,
                        decode_steps: 0,
                        finish: Finish::Length,
                    },
                    comm0: comm_now,
                    queued_at: q.queued_at,
                    last_token: None,
                    replays: 0,
                    job: q.job,
                    tx: q.tx,
                });
            }
            // max_tokens = 0: nothing to generate.
            let mut done_now: Vec<usize> = Vec::new();
            for (i, a) in active.iter().enumerate() {
                if a.job.params.max_tokens == 0 {
                    done_now.push(i);
                }
            }

            // Build the step: one token per decoding sequence, prompt chunks for the others.
            let mut steps = Vec::new();
            let mut owners = Vec::new();
            let mut prefill_budget = self.cfg.prefill_chunk.max(1);
            let mut prefill_tokens = 0;
            let mut decode_tokens = 0;
            for (i, a) in active.iter().enumerate() {
                if done_now.contains(&i) {
                    continue;
                }
                if a.prefilled < a.job.prompt.len() {
                    if prefill_budget == 0 {
                        continue;
                    }
                    let n = (a.job.prompt.len() - a.prefilled).min(prefill_budget);
                    prefill_budget -= n;
                    prefill_tokens += n;
                    steps.push(SeqStep {
                        seq: a.seq,
                        ids: a.job.prompt[a.prefilled..a.prefilled + n].to_vec(),
                        pos: a.prefilled,
                    });
                } else {
                    decode_tokens += 1;
                    steps.push(SeqStep {
                        seq: a.seq,
                        ids: vec![a.next],
                        pos: a.pos,
                    });
                }
                owners.push(i);
            }
            let freeing = std::mem::take(&mut to_free);
            let t0 = Instant::now();
            // Greedy and top-k sequences need only their best candidates: the workers send
            // those, not their logits.
            let want: Vec<Want> = owners.iter().map(|&i| active[i].sampler.want()).collect();
            let result = if steps.is_empty() && freeing.is_empty() {
                Ok(Vec::new())
            } else {
                r.step_picks(&steps, &freeing, &want)
            };
            let took = t0.elapsed();
            let logits = match result {
                Ok(l) => l,
                Err(e) => {
                    runner = None;
                    to_free.clear();
                    self.interrupted(&mut active, &e);
                    continue;
                }
            };
            let weight_bytes = r.weight_bytes_per_token();
            let comm = r.comm_stats();

            // Sample, send, and retire.
            let mut generated = 0u64;
            let mut failed: Option<ModelError> = None;
            for (k, &i) in owners.iter().enumerate() {
                let a = &mut active[i];
                let step = &steps[k];
                if a.prefilled < a.job.prompt.len() {
                    a.prefilled += step.ids.len();
                    a.stats.prefill += took;
                    if a.prefilled < a.job.prompt.len() {
                        continue;
                    }
                    a.pos = a.prefilled;
                    // The communication counters a sequence reports are its decode's.
                    a.comm0 = comm;
                } else {
                    a.stats.decode += took;
                    a.stats.decode_steps += 1;
                    a.pos += 1;
                }
                let (tok, logprobs) = match &logits[k] {
                    Pick::Top(c) => match a.sampler.sample_candidates(c) {
                        Draw::Token(t) => (t, a.sampler.logprobs(c, t)),
                        // A top-p nucleus wider than the candidates: this step's logits.
                        // If that fails, the cluster is rebuilt as for a failed step, and this
                        // sequence (its draw not made) replays with the others.
                        Draw::NeedLogits => match r.last_logits(&[a.seq]) {
                            Ok(l) => a.sampler.sample_with_logprobs(&l[0]),
                            Err(e) => {
                                tracing::warn!("fetching logits for a nucleus failed: {e}");
                                failed.get_or_insert(e);
                                continue;
                            }
                        },
                    },
                    Pick::Logits(l) => a.sampler.sample_with_logprobs(l),
                };
                a.stats.generated += 1;
                generated += 1;
                let now = Instant::now();
                match a.last_token.replace(now) {
                    None => latency
                        .time_to_first_token
                        .observe((now - a.queued_at).as_secs_f64()),
                    Some(t) => latency
                        .time_per_output_token
                        .observe((now - t).as_secs_f64()),
                }
                if a.tx
                    .send(Event::Token(tok, logprobs.map(Box::new)))
                    .is_err()
                {
                    a.stats.finish = Finish::Cancelled;
                    done_now.push(i);
                    continue;
                }
                a.next = tok;
                a.out.push(tok);
                let ctx = r.cfg().max_context;
                if !a.job.params.ignore_eos && a.job.stop_ids.contains(&tok) {
                    a.stats.finish = Finish::Stop;
                    done_now.push(i);
                } else if a.stats.generated >= a.job.params.max_tokens || a.pos >= ctx {
                    a.stats.finish = Finish::Length;
                    done_now.push(i);
                }
            }
            done_now.sort_unstable();
            done_now.dedup();
            let mut g = self.shared.lock().unwrap();
            for &i in done_now.iter().rev() {
                let a = active.swap_remove(i);
                to_free.push(a.seq);
                g.kv_reserved -= a.reserved;
                if a.stats.finish == Finish::Cancelled {
                    g.metrics.cancelled += 1;
                } else {
                    g.metrics.completed += 1;
                    latency.request.observe(a.queued_at.elapsed().as_secs_f64());
                }
                let c = CommStats {
                    allreduce_ns: comm.allreduce_ns - a.comm0.allreduce_ns,
                    allreduce_count: comm.allreduce_count - a.comm0.allreduce_count,
                    step_ns: comm.step_ns - a.comm0.step_ns,
                    shard_step_ns: comm.shard_step_ns - a.comm0.shard_step_ns,
                    steps: comm.steps - a.comm0.steps,
                    logits_bytes: comm.logits_bytes - a.comm0.logits_bytes,
                };
                let _ = a.tx.send(Event::Done(Box::new(SeqDone {
                    stats: a.stats,
                    comm: c,
                    weight_bytes_per_token: weight_bytes,
                })));
            }
            g.active = active.len();
            let m = &mut g.metrics;
            if !steps.is_empty() {
                latency.step.observe(took.as_secs_f64());
                m.steps += 1;
                m.step_seconds += took.as_secs_f64();
                m.last_step_seconds = took.as_secs_f64();
                m.last_batch = steps.len();
                m.max_batch = m.max_batch.max(steps.len());
            }
            m.generated_tokens += generated;
            if prefill_tokens > 0 {
                m.prefill_tokens += prefill_tokens as u64;
                m.prefill_seconds += took.as_secs_f64();
            }
            if decode_tokens > 0 {
                m.decode_tokens += decode_tokens as u64;
                m.decode_seconds += took.as_secs_f64();
            }
            m.comm = comm;
            drop(g);
            if let Some(e) = failed {
                runner = None;
                to_free.clear();
                self.interrupted(&mut active, &e);
            }
        }
    }

    /// A step failed: the cluster is gone. Running sequences wait for the next one and replay
    /// there (their prompt and the tokens already sent, as a prefill), unless they have been
    /// replayed [`MAX_REPLAYS`] times already; queued and new requests wait; the coordinator
    /// is told, so that it rebuilds the cluster (or withdraws it for good).
    fn interrupted(&self, active: &mut Vec<Active>, e: &ModelError) {
        tracing::warn!("step failed: {e}");
        let mut g = self.shared.lock().unwrap();
        let mut gave_up = 0;
        active.retain_mut(|a| {
            a.replays += 1;
            if a.replays > MAX_REPLAYS {
                let _ = a.tx.send(Event::Error(clone_err(e)));
                gave_up += 1;
                return false;
            }
            a.restart();
            true
        });
        g.metrics.failed += gave_up;
        g.metrics.replayed_sequences += active.len() as u64;
        g.kv_reserved = active.iter().map(|a| a.reserved).sum();
        g.active = active.len();
        g.ready = false;
        g.state = "recovering".into();
        g.recovering();
        drop(g);
        (self.on_failure)(e);
    }
}

fn clone_err(e: &ModelError) -> ModelError {
    match e {
        ModelError::Shard { rank, msg } => ModelError::Shard {
            rank: *rank,
            msg: msg.clone(),
        },
        ModelError::MeshDown(msg) => ModelError::MeshDown(msg.clone()),
        other => ModelError::Backend(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use tessera_core::{Arch, ModelConfig};

    const VOCAB: usize = 16;
    /// Each step's (sequence, position, tokens).
    type Batches = Arc<Mutex<Vec<Vec<(u64, usize, usize)>>>>;

    fn cfg() -> ModelConfig {
        ModelConfig {
            arch: Arch::Llama,
            hidden: 8,
            intermediate: 8,
            layers: 1,
            heads: 1,
            kv_heads: 1,
            head_dim: 8,
            vocab: VOCAB,
            max_context: 64,
            rms_eps: 1e-5,
            rope_theta: 1e4,
            rope_scaling: None,
            rope_precision: Default::default(),
            rope_interleaved: false,
            tie_word_embeddings: true,
            qkv_bias: false,
            o_bias: false,
            mlp_bias: false,
            bos_token_id: None,
            eos_token_ids: vec![],
            opts: Default::default(),
        }
    }

    /// A model whose next token is (last token + 1) mod VOCAB; it keeps "caches" (positions
    /// per sequence) and records each step's batch, as a real cluster would see them.
    struct Fake {
        cfg: ModelConfig,
        caches: Arc<Mutex<std::collections::HashMap<u64, usize>>>,
        batches: Batches,
        fail: Arc<AtomicBool>,
        delay: Duration,
    }

    impl Runner for Fake {
        fn cfg(&self) -> &ModelConfig {
            &self.cfg
        }
        fn step(
            &mut self,
            steps: &[SeqStep],
            free: &[u64],
        ) -> tessera_model::Result<Vec<Vec<f32>>> {
            std::thread::sleep(self.delay);
            if self.fail.load(Ordering::SeqCst) {
                return Err(ModelError::Shard {
                    rank: 1,
                    msg: "worker w1 closed its step stream".into(),
                });
            }
            tessera_model::check_steps(&self.cfg, steps)?;
            let mut c = self.caches.lock().unwrap();
            for f in free {
                c.remove(f);
            }
            let mut out = Vec::new();
            for s in steps {
                let have = c.entry(s.seq).or_default();
                assert_eq!(*have, s.pos, "sequence {} fed at the wrong position", s.seq);
                *have += s.ids.len();
                let mut l = vec![0f32; VOCAB];
                l[(*s.ids.last().unwrap() as usize + 1) % VOCAB] = 1.0;
                out.push(l);
            }
            self.batches
                .lock()
                .unwrap()
                .push(steps.iter().map(|s| (s.seq, s.pos, s.ids.len())).collect());
            Ok(out)
        }
        fn weight_bytes_per_token(&self) -> u64 {
            0
        }
    }

    struct Rig {
        sched: Arc<Scheduler>,
        caches: Arc<Mutex<std::collections::HashMap<u64, usize>>>,
        batches: Batches,
        fail: Arc<AtomicBool>,
        failures: Arc<Mutex<Vec<String>>>,
    }

    fn rig(c: SchedulerConfig, delay_ms: u64) -> Rig {
        let failures = Arc::new(Mutex::new(Vec::new()));
        let f2 = failures.clone();
        let sched = Scheduler::start(
            c,
            Box::new(move |e: &ModelError| f2.lock().unwrap().push(e.to_string())),
        );
        let fake = Fake {
            cfg: cfg(),
            caches: Default::default(),
            batches: Default::default(),
            fail: Default::default(),
            delay: Duration::from_millis(delay_ms),
        };
        let r = Rig {
            sched: sched.clone(),
            caches: fake.caches.clone(),
            batches: fake.batches.clone(),
            fail: fake.fail.clone(),
            failures,
        };
        sched.set_runner(Box::new(fake));
        r
    }

    fn job(prompt: Vec<u32>, max_tokens: usize) -> Job {
        Job {
            prompt,
            params: GenerateParams {
                max_tokens,
                ..Default::default()
            },
            stop_ids: vec![15],
        }
    }

    /// Tokens until Done (or the error's text).
    fn collect(rx: &mut mpsc::UnboundedReceiver<Event>) -> Result<(Vec<u32>, SeqDone), String> {
        let mut toks = Vec::new();
        loop {
            match rx.blocking_recv() {
                Some(Event::Token(t, _)) => toks.push(t),
                Some(Event::Done(d)) => return Ok((toks, *d)),
                Some(Event::Error(e)) => return Err(e.to_string()),
                None => return Err("closed".into()),
            }
        }
    }

    #[test]
    fn concurrent_sequences_share_steps_and_keep_their_own_tokens() {
        // Steps slow enough (20 ms) that all six are submitted while the first still runs.
        let r = rig(SchedulerConfig::default(), 20);
        let mut rxs: Vec<_> = (0..6u32)
            .map(|i| r.sched.submit(&cfg(), job(vec![i, i, i], 5)).unwrap())
            .collect();
        for (i, rx) in rxs.iter_mut().enumerate() {
            let (toks, done) = collect(rx).unwrap();
            let i = i as u32;
            assert_eq!(toks, vec![i + 1, i + 2, i + 3, i + 4, i + 5]);
            assert_eq!(done.stats.finish, Finish::Length);
            assert_eq!(done.stats.prompt_tokens, 3);
            assert_eq!(done.stats.decode_steps, 4);
        }
        let most = r
            .batches
            .lock()
            .unwrap()
            .iter()
            .map(Vec::len)
            .max()
            .unwrap();
        assert!(most >= 2, "no step carried two sequences");
        // Every finished sequence's cache is freed (in the step after it finishes).
        let t = Instant::now();
        while !r.caches.lock().unwrap().is_empty() {
            assert!(t.elapsed() < Duration::from_secs(5));
            std::thread::sleep(Duration::from_millis(5));
        }
        let m = r.sched.metrics();
        assert_eq!(m.completed, 6);
        assert_eq!(m.generated_tokens, 30);
    }

    #[test]
    fn stop_tokens_end_a_sequence_and_long_prompts_prefill_in_chunks() {
        let c = SchedulerConfig {
            prefill_chunk: 4,
            ..Default::default()
        };
        let r = rig(c, 0);
        let mut rx = r.sched.submit(&cfg(), job((0..10).collect(), 20)).unwrap();
        let (toks, done) = collect(&mut rx).unwrap();
        // 9 -> 10 ... 15 is the stop token.
        assert_eq!(toks, vec![10, 11, 12, 13, 14, 15]);
        assert_eq!(done.stats.finish, Finish::Stop);
        let b = r.batches.lock().unwrap();
        assert_eq!(b[0], vec![(1, 0, 4)]);
        assert_eq!(b[1], vec![(1, 4, 4)]);
        assert_eq!(b[2], vec![(1, 8, 2)]);
    }

    #[test]
    fn admission_is_bounded_and_a_full_queue_refuses() {
        let c = SchedulerConfig {
            max_queue: 2,
            max_seqs: 2,
            ..Default::default()
        };
        let r = rig(c, 5);
        let mut rxs: Vec<_> = (0..2)
            .map(|i| r.sched.submit(&cfg(), job(vec![i], 40)).unwrap())
            .collect();
        // Wait until both run, then fill the queue.
        let t = Instant::now();
        while r.sched.load().1 < 2 {
            assert!(t.elapsed() < Duration::from_secs(5));
            std::thread::sleep(Duration::from_millis(1));
        }
        rxs.push(r.sched.submit(&cfg(), job(vec![2], 3)).unwrap());
        rxs.push(r.sched.submit(&cfg(), job(vec![3], 3)).unwrap());
        assert_eq!(
            r.sched.submit(&cfg(), job(vec![4], 3)).unwrap_err(),
            SubmitError::QueueFull(2)
        );
        for rx in &mut rxs {
            collect(rx).unwrap();
        }
        assert!(r.batches.lock().unwrap().iter().all(|b| b.len() <= 2));
        // A prompt longer than the context is refused before it queues.
        let e = r.sched.submit(&cfg(), job(vec![1; 65], 1)).unwrap_err();
        assert!(
            matches!(e, SubmitError::Invalid(ref m) if m.contains("65")),
            "{e}"
        );
    }

    #[test]
    fn a_request_the_kv_budget_can_never_hold_is_refused_naming_both_numbers() {
        let c = SchedulerConfig {
            kv_budget: 40,
            ..Default::default()
        };
        let r = rig(c, 0);
        // 10 prompt tokens + 50 = 60 positions (the context is 64) > 40.
        let e = r.sched.submit(&cfg(), job(vec![1; 10], 50)).unwrap_err();
        assert!(
            matches!(e, SubmitError::Invalid(ref m) if m.contains("need 60") && m.contains("holds 40")),
            "{e}"
        );
        assert_eq!(r.sched.metrics().rejected_invalid, 1);
        // 10 + 30 fits, and runs.
        let mut rx = r.sched.submit(&cfg(), job(vec![1; 10], 30)).unwrap();
        assert!(collect(&mut rx).is_ok());
    }

    #[test]
    fn a_dropped_receiver_cancels_and_frees_the_sequence() {
        let r = rig(SchedulerConfig::default(), 2);
        let mut rx = r.sched.submit(&cfg(), job(vec![1], 60)).unwrap();
        assert!(matches!(rx.blocking_recv(), Some(Event::Token(2, None))));
        drop(rx);
        let t = Instant::now();
        while r.sched.load().1 > 0 || !r.caches.lock().unwrap().is_empty() {
            assert!(t.elapsed() < Duration::from_secs(5), "not freed");
            std::thread::sleep(Duration::from_millis(2));
        }
        assert_eq!(r.sched.metrics().cancelled, 1);
        assert_eq!(r.sched.load(), (0, 0, 0));
    }

    #[test]
    fn running_sequences_carry_on_across_a_planned_reload() {
        let r = rig(SchedulerConfig::default(), 5);
        let mut a = r.sched.submit(&cfg(), job(vec![1], 10)).unwrap();
        let mut first = Vec::new();
        while first.len() < 3 {
            match a.blocking_recv() {
                Some(Event::Token(t, _)) => first.push(t),
                other => panic!("expected a token, got {:?}", other.is_some()),
            }
        }
        // More workers: the cluster is taken away, then a fresh one (no caches) comes.
        r.sched.pause("loading");
        std::thread::sleep(Duration::from_millis(30));
        let fresh = Fake {
            cfg: cfg(),
            caches: Default::default(),
            batches: Default::default(),
            fail: Default::default(),
            delay: Duration::from_millis(1),
        };
        let batches = fresh.batches.clone();
        r.sched.set_runner(Box::new(fresh));
        let (rest, done) = collect(&mut a).unwrap();
        first.extend(rest);
        assert_eq!(first, (2..12).collect::<Vec<u32>>());
        assert_eq!(done.stats.generated, 10);
        // The fresh cluster prefilled the prompt and the tokens already sent, from position 0.
        let b = batches.lock().unwrap();
        let (seq, pos, len) = b[0][0];
        assert_eq!(pos, 0);
        assert!(len > 3, "prefilled {len} tokens of sequence {seq}");
    }

    fn fake(delay_ms: u64) -> (Fake, Batches, Arc<AtomicBool>) {
        let f = Fake {
            cfg: cfg(),
            caches: Default::default(),
            batches: Default::default(),
            fail: Default::default(),
            delay: Duration::from_millis(delay_ms),
        };
        let (b, fail) = (f.batches.clone(), f.fail.clone());
        (f, b, fail)
    }

    fn wait_failures(r: &Rig, n: usize) {
        let t = Instant::now();
        while r.failures.lock().unwrap().len() < n {
            assert!(
                t.elapsed() < Duration::from_secs(5),
                "the failure was not reported"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    #[test]
    fn a_failed_step_replays_running_and_queued_requests_on_the_next_cluster() {
        let c = SchedulerConfig {
            max_seqs: 2,
            ..Default::default()
        };
        let r = rig(c, 2);
        let mut a = r.sched.submit(&cfg(), job(vec![1], 30)).unwrap();
        let mut b = r.sched.submit(&cfg(), job(vec![3, 4], 30)).unwrap();
        // Waits in the queue (two sequences at most run).
        let mut q = r.sched.submit(&cfg(), job(vec![5], 4)).unwrap();
        let mut first = Vec::new();
        while first.len() < 4 {
            match a.blocking_recv() {
                Some(Event::Token(t, _)) => first.push(t),
                other => panic!("expected a token, got {:?}", other.is_some()),
            }
        }
        r.fail.store(true, Ordering::SeqCst);
        wait_failures(&r, 1);
        assert!(r.failures.lock().unwrap()[0].contains("w1"));
        assert!(!r.sched.is_ready());
        // While the cluster is rebuilt, a new request waits too.
        let mut late = r.sched.submit(&cfg(), job(vec![7], 3)).unwrap();
        r.sched.recover("recovering: worker w1 failed");
        std::thread::sleep(Duration::from_millis(20));
        let (fresh, batches, _) = fake(1);
        r.sched.set_runner(Box::new(fresh));
        let (rest, done) = collect(&mut a).unwrap();
        first.extend(rest);
        // Exactly the undisturbed tokens: 1 -> 2, 3, ... (mod 16; 15 is the stop token, and
        // this sequence stops there), none repeated, none lost.
        assert_eq!(first, (2..=15).collect::<Vec<u32>>());
        assert_eq!(done.stats.finish, Finish::Stop);
        assert_eq!(done.stats.generated, 14);
        assert_eq!(done.stats.prompt_tokens, 1);
        let (tb, _) = collect(&mut b).unwrap();
        assert_eq!(tb, (5..=15).collect::<Vec<u32>>());
        assert_eq!(collect(&mut q).unwrap().0, vec![6, 7, 8, 9]);
        assert_eq!(collect(&mut late).unwrap().0, vec![8, 9, 10]);
        // The fresh cluster prefilled each running sequence's prompt and tokens from 0.
        let first_step = batches.lock().unwrap()[0].clone();
        assert!(first_step.iter().all(|&(_, pos, len)| pos == 0 && len > 1));
        let m = r.sched.metrics();
        assert_eq!((m.recoveries, m.replayed_sequences, m.failed), (1, 2, 0));
        assert_eq!(m.completed, 4);
    }

    #[test]
    fn a_withdrawn_cluster_fails_waiting_requests_with_the_reason() {
        let r = rig(SchedulerConfig::default(), 2);
        let mut a = r.sched.submit(&cfg(), job(vec![1], 60)).unwrap();
        assert!(matches!(a.blocking_recv(), Some(Event::Token(..))));
        r.fail.store(true, Ordering::SeqCst);
        wait_failures(&r, 1);
        r.sched
            .withdraw("no configuration of the 1 live worker(s) can hold the model");
        let e = collect(&mut a).unwrap_err();
        assert!(e.contains("no configuration"), "{e}");
        assert!(matches!(
            r.sched.submit(&cfg(), job(vec![1], 1)),
            Err(SubmitError::NotReady(_))
        ));
        assert_eq!(r.sched.metrics().failed, 1);
    }

    #[test]
    fn a_step_that_fails_on_every_cluster_fails_its_request_after_a_few_replays() {
        let r = rig(SchedulerConfig::default(), 1);
        let mut a = r.sched.submit(&cfg(), job(vec![1], 60)).unwrap();
        assert!(matches!(a.blocking_recv(), Some(Event::Token(..))));
        r.fail.store(true, Ordering::SeqCst);
        for n in 1..=MAX_REPLAYS as usize {
            wait_failures(&r, n);
            let (f, _, fail) = fake(1);
            fail.store(true, Ordering::SeqCst);
            r.sched.set_runner(Box::new(f));
        }
        let e = collect(&mut a).unwrap_err();
        assert!(e.contains("w1"), "{e}");
        wait_failures(&r, MAX_REPLAYS as usize + 1);
    }
}
