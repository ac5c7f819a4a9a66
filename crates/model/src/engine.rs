//! Running shards and generating text.
//!
//! [`Runner`] is what generation needs from a cluster: a forward step for a sequence that
//! returns the full vocabulary's logits. [`LocalCluster`] runs N shards as threads of this
//! process, joined by an in-process all-reduce; the same [`ShardModel`] runs in remote workers.

use crate::error::{ModelError, Result};
use crate::loader::ModelFiles;
use crate::sampling::{Sampler, SamplingParams, TopSpec};
use crate::shard::{Picked, Precision, SeqStep, ShardModel};
use burn::tensor::Device;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, Sender, channel};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tessera_collective::{Collective, InProcessTransport, Mesh, Single};
use tessera_core::{ModelConfig, ShardPlan};

/// Where a shard's tensors live. One code path; the device is picked at run time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// Burn's `flex` backend: pure Rust, SIMD and threads. The default.
    Cpu,
    /// Burn's wgpu backend: Vulkan, Metal or DX12, whichever GPU the machine has.
    Wgpu,
}

impl std::str::FromStr for Backend {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "cpu" | "flex" => Ok(Backend::Cpu),
            "wgpu" | "gpu" => Ok(Backend::Wgpu),
            other => Err(format!("unknown backend {other:?} (cpu or wgpu)")),
        }
    }
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Cpu => "cpu",
            Backend::Wgpu => "wgpu",
        }
    }

    /// The Burn device for this backend, checked to work by running one small operation.
    pub fn device(self) -> Result<Device> {
        match self {
            Backend::Cpu => Ok(Device::flex()),
            #[cfg(feature = "wgpu")]
            Backend::Wgpu => {
                let probe = std::panic::catch_unwind(|| {
                    let d = Device::wgpu(burn::tensor::DeviceKind::DefaultDevice);
                    let t = burn::tensor::Tensor::<1>::from_data([1.0f32, 2.0], &d);
                    let _ = t.sum().into_data();
                    d
                });
                probe.map_err(|p| {
                    let why = p
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_else(|| "unknown error".into());
                    ModelError::Backend(format!("no usable wgpu adapter (is a Vulkan, Metal or DX12 driver installed?): {why}"))
                })
            }
            #[cfg(not(feature = "wgpu"))]
            Backend::Wgpu => Err(ModelError::Backend(
                "this build of tessera has no wgpu support (feature \"wgpu\")".into(),
            )),
        }
    }
}

/// Validates a step before any shard sees it, so that every shard gets the same valid input
/// and none is left waiting in an all-reduce for a peer that refused the step.
pub fn check_step(cfg: &ModelConfig, ids: &[u32], pos: usize) -> Result<()> {
    if ids.is_empty() {
        return Err(ModelError::EmptyPrompt);
    }
    if let Some(&id) = ids.iter().find(|&&id| id as usize >= cfg.vocab) {
        return Err(ModelError::BadToken {
            id,
            vocab: cfg.vocab,
        });
    }
    if pos + ids.len() > cfg.max_context {
        return Err(ModelError::PromptTooLong {
            prompt: pos + ids.len(),
            context: cfg.max_context,
        });
    }
    Ok(())
}

/// Validates a whole batch step: each sequence as [`check_step`], and no sequence twice.
pub fn check_steps(cfg: &ModelConfig, steps: &[SeqStep]) -> Result<()> {
    let mut seen = std::collections::HashSet::new();
    for s in steps {
        check_step(cfg, &s.ids, s.pos)?;
        if !seen.insert(s.seq) {
            return Err(ModelError::Shard {
                rank: 0,
                msg: format!("sequence {} appears twice in one step", s.seq),
            });
        }
    }
    Ok(())
}

/// Time spent in all-reduces (mean per shard) and in whole steps, since the runner started.
#[derive(Debug, Clone, Copy, Default)]
pub struct CommStats {
    pub allreduce_ns: u64,
    pub allreduce_count: u64,
    pub step_ns: u64,
    /// Wall time of the steps on the shards themselves (mean per shard).
    pub shard_step_ns: u64,
    pub steps: u64,
    /// Bytes of logits (or greedy picks) a shard sent back (mean per shard).
    pub logits_bytes: u64,
}

/// What a step returns for one sequence.
#[derive(Debug, Clone, PartialEq)]
pub enum Pick {
    /// Its last position's logits over the whole vocabulary.
    Logits(Vec<f32>),
    /// The candidates the [`crate::Want::Top`] asked for (from each shard its own, merged),
    /// for [`crate::Sampler::sample_candidates`].
    Top(crate::Candidates),
}

/// What generation needs from a set of shards, local or remote.
pub trait Runner: Send {
    fn cfg(&self) -> &ModelConfig;
    /// Drops the KV caches of `free`, then runs one step for every sequence in `steps`
    /// together. Returns each sequence's last-position logits over the whole vocabulary.
    fn step(&mut self, steps: &[SeqStep], free: &[u64]) -> Result<Vec<Vec<f32>>>;
    /// Like [`Runner::step`], but each sequence returns what `want[i]` asks: its logits, or
    /// only its best candidates (remote shards then send their slice's best, not the slice).
    fn step_picks(
        &mut self,
        steps: &[SeqStep],
        free: &[u64],
        want: &[crate::Want],
    ) -> Result<Vec<Pick>> {
        Ok(picks_from_logits(self.step(steps, free)?, want))
    }
    /// The last step's logits of `seqs` (each asked for a top-p nucleus's candidates in it),
    /// for a draw whose nucleus reached past them. Runners that answer such steps with
    /// [`Pick::Logits`] never get this call.
    fn last_logits(&mut self, seqs: &[u64]) -> Result<Vec<Vec<f32>>> {
        let _ = seqs;
        Err(ModelError::Backend(
            "this runner keeps no logits of its last step".into(),
        ))
    }
    /// Weight bytes all shards together read for one step.
    fn weight_bytes_per_token(&self) -> u64;
    fn comm_stats(&self) -> CommStats {
        CommStats::default()
    }

    /// One sequence's step: feeds `ids` at positions `pos..` of sequence `seq`.
    fn forward(&mut self, seq: u64, ids: &[u32], pos: usize) -> Result<Vec<f32>> {
        let step = SeqStep {
            seq,
            ids: ids.to_vec(),
            pos,
        };
        let mut out = self.step(std::slice::from_ref(&step), &[])?;
        out.pop()
            .ok_or_else(|| ModelError::Backend("a step returned no logits".into()))
    }
    /// Drops the sequence's KV cache everywhere.
    fn free(&mut self, seq: u64) {
        let _ = self.step(&[], &[seq]);
    }
}

/// What each sequence asked for, from its logits over the whole vocabulary.
fn picks_from_logits(logits: Vec<Vec<f32>>, want: &[crate::Want]) -> Vec<Pick> {
    logits
        .into_iter()
        .zip(want)
        .map(|(l, w)| match w {
            // Where a draw may need every logit (a top-p nucleus), they are at hand here.
            crate::Want::Logits => Pick::Logits(l),
            crate::Want::Top(spec) if spec.mass => Pick::Logits(l),
            crate::Want::Top(spec) => Pick::Top(crate::candidates(&l, spec, 0)),
        })
        .collect()
}

/// Splits each shard's `batch x slice` logits into per-sequence rows over the whole
/// vocabulary (shards hold consecutive vocabulary slices, in rank order).
pub fn gather_logits(parts: &[Vec<f32>], batch: usize, vocab: usize) -> Result<Vec<Vec<f32>>> {
    let mut out: Vec<Vec<f32>> = (0..batch).map(|_| Vec::with_capacity(vocab)).collect();
    for (rank, p) in parts.iter().enumerate() {
        if batch == 0 {
            break;
        }
        if p.len() % batch != 0 {
            return Err(ModelError::Shard {
                rank,
                msg: format!("returned {} logits for {batch} sequences", p.len()),
            });
        }
        let w = p.len() / batch;
        for (b, row) in out.iter_mut().enumerate() {
            row.extend_from_slice(&p[b * w..(b + 1) * w]);
        }
    }
    if let Some(r) = out.iter().find(|r| r.len() != vocab) {
        return Err(ModelError::Backend(format!(
            "shards returned {} logits, the vocabulary has {vocab}",
            r.len()
        )));
    }
    Ok(out)
}

enum Cmd {
    Step {
        steps: Arc<[SeqStep]>,
        free: Arc<[u64]>,
        /// Each sequence's candidates instead of the logits (a GPU then picks on the device).
        want: Option<Arc<[TopSpec]>>,
    },
}

/// A shard's answer to a step.
enum ShardOut {
    Logits(Vec<f32>),
    Picked(Vec<Picked>),
}

struct ShardThread {
    tx: Option<Sender<Cmd>>,
    rx: Receiver<Result<ShardOut>>,
    join: Option<JoinHandle<()>>,
}

/// N shards as threads of one process: shard 0 of 1 on a single machine, or a rehearsal of a
/// cluster whose all-reduce runs over channels instead of QUIC.
pub struct LocalCluster {
    cfg: ModelConfig,
    pub plan: ShardPlan,
    shards: Vec<ShardThread>,
    weight_bytes: u64,
    held_bytes: u64,
    cache_type: tessera_core::CacheType,
    pub load_time: Duration,
}

impl LocalCluster {
    /// Bytes of weights all shards hold, in their stored formats.
    pub fn weight_bytes_held(&self) -> u64 {
        self.held_bytes
    }

    /// What the shards' KV caches hold.
    pub fn cache_type(&self) -> tessera_core::CacheType {
        self.cache_type
    }
}

impl LocalCluster {
    /// Loads `n` shards of the model onto `backend`; `precision` says how activations meet
    /// quantized weights (see [`Precision`]).
    pub fn load(
        files: &ModelFiles,
        n: usize,
        backend: Backend,
        precision: Precision,
    ) -> Result<LocalCluster> {
        Self::load_with(files, n, backend, precision, None)
    }

    /// [`LocalCluster::load`], with the KV cache's type chosen (`None`: the default for the
    /// path and weights, see [`ModelFiles::cache_type`]; a GPU's cache stays f32).
    pub fn load_with(
        files: &ModelFiles,
        n: usize,
        backend: Backend,
        precision: Precision,
        cache: Option<tessera_core::CacheType>,
    ) -> Result<LocalCluster> {
        let started = Instant::now();
        let cfg = files.cfg.clone();
        let cache = files.cache_type(precision, cache);
        let plan = files.plan(&vec![1.0; n])?;
        let device = backend.device()?;
        let mut transports: Vec<Option<InProcessTransport>> = if n > 1 {
            InProcessTransport::group(n).into_iter().map(Some).collect()
        } else {
            vec![None]
        };
        let mut shards = Vec::with_capacity(n);
        let mut ready = Vec::with_capacity(n);
        for spec in plan.shards.iter().cloned() {
            let (cmd_tx, cmd_rx) = channel::<Cmd>();
            let (out_tx, out_rx) = channel::<Result<ShardOut>>();
            let (ready_tx, ready_rx) = channel::<Result<(u64, u64, tessera_core::CacheType)>>();
            let weights = files.weights.clone();
            let cfg = cfg.clone();
            let device = device.clone();
            let transport = transports[spec.rank].take();
            let join = std::thread::Builder::new()
                .name(format!("shard-{}", spec.rank))
                .spawn(move || {
                    let mut coll: Box<dyn Collective> = match transport {
                        Some(t) => Box::new(Mesh::new(t)),
                        None => Box::new(Single),
                    };
                    let mut model =
                        match ShardModel::load(&weights, &cfg, &spec, &device, precision, cache) {
                            Ok(m) => {
                                let _ = ready_tx.send(Ok((
                                    m.weight_bytes_per_token(),
                                    m.weight_bytes_held(),
                                    m.cache_type(),
                                )));
                                m
                            }
                            Err(e) => {
                                let _ = ready_tx.send(Err(e));
                                return;
                            }
                        };
                    drop(weights);
                    while let Ok(Cmd::Step { steps, free, want }) = cmd_rx.recv() {
                        for &seq in free.iter() {
                            model.free(seq);
                        }
                        let mut run = || match &want {
                            Some(w) => {
                                let specs: Vec<Option<TopSpec>> =
                                    w.iter().copied().map(Some).collect();
                                model
                                    .forward_pick(&steps, coll.as_mut(), &specs)
                                    .map(ShardOut::Picked)
                            }
                            None => model
                                .forward_batch(&steps, coll.as_mut())
                                .map(ShardOut::Logits),
                        };
                        // One shard steps inside the kernels' pool (its parallel loops then
                        // start without a hand-off); several must not, since each blocks in
                        // the all-reduce until the others arrive.
                        let r = if n == 1 {
                            tessera_quant::install(run)
                        } else {
                            run()
                        };
                        if out_tx.send(r).is_err() {
                            return;
                        }
                    }
                })
                .map_err(|e| ModelError::Backend(format!("cannot start a shard thread: {e}")))?;
            shards.push(ShardThread {
                tx: Some(cmd_tx),
                rx: out_rx,
                join: Some(join),
            });
            ready.push(ready_rx);
        }
        let (mut weight_bytes, mut held_bytes, mut cache_type) = (0, 0, cache);
        for (rank, r) in ready.into_iter().enumerate() {
            let (per_token, held, ty) = r.recv().map_err(|_| ModelError::Shard {
                rank,
                msg: "died while loading".into(),
            })??;
            weight_bytes += per_token;
            held_bytes += held;
            cache_type = ty;
        }
        Ok(LocalCluster {
            cfg,
            plan,
            shards,
            weight_bytes,
            held_bytes,
            cache_type,
            load_time: started.elapsed(),
        })
    }
}

impl Runner for LocalCluster {
    fn cfg(&self) -> &ModelConfig {
        &self.cfg
    }

    fn step(&mut self, steps: &[SeqStep], free: &[u64]) -> Result<Vec<Vec<f32>>> {
        let parts = self.run_shards(steps, free, None)?;
        let parts: Vec<Vec<f32>> = parts
            .into_iter()
            .map(|p| match p {
                ShardOut::Logits(l) => l,
                ShardOut::Picked(_) => unreachable!("a step without picks"),
            })
            .collect();
        gather_logits(&parts, steps.len(), self.cfg.vocab)
    }

    /// Steps where every sequence wants candidates without a nucleus's mass take each
    /// shard's own candidates (on a GPU, picked there), merged; the others the logits.
    fn step_picks(
        &mut self,
        steps: &[SeqStep],
        free: &[u64],
        want: &[crate::Want],
    ) -> Result<Vec<Pick>> {
        let specs: Option<Vec<TopSpec>> = want
            .iter()
            .map(|w| match w {
                crate::Want::Top(spec) if !spec.mass => Some(*spec),
                _ => None,
            })
            .collect();
        let Some(specs) = specs.filter(|_| !steps.is_empty()) else {
            return Ok(picks_from_logits(self.step(steps, free)?, want));
        };
        let parts = self.run_shards(steps, free, Some(specs.into()))?;
        let mut merged = vec![crate::Candidates::empty(); steps.len()];
        for p in parts {
            let ShardOut::Picked(rows) = p else {
                unreachable!("a step with picks")
            };
            for (m, r) in merged.iter_mut().zip(rows) {
                if let Some(c) = r.top {
                    m.merge(&c);
                }
            }
        }
        Ok(merged.into_iter().map(Pick::Top).collect())
    }

    fn weight_bytes_per_token(&self) -> u64 {
        self.weight_bytes
    }
}

impl LocalCluster {
    /// Sends one step to every shard and collects their answers, in rank order.
    fn run_shards(
        &mut self,
        steps: &[SeqStep],
        free: &[u64],
        want: Option<Arc<[TopSpec]>>,
    ) -> Result<Vec<ShardOut>> {
        check_steps(&self.cfg, steps)?;
        let steps: Arc<[SeqStep]> = steps.into();
        let free: Arc<[u64]> = free.into();
        for (rank, s) in self.shards.iter().enumerate() {
            let tx = s.tx.as_ref().ok_or(ModelError::Shard {
                rank,
                msg: "stopped".into(),
            })?;
            tx.send(Cmd::Step {
                steps: steps.clone(),
                free: free.clone(),
                want: want.clone(),
            })
            .map_err(|_| ModelError::Shard {
                rank,
                msg: "shard thread is gone".into(),
            })?;
        }
        let mut parts = Vec::with_capacity(self.shards.len());
        let mut first_err = None;
        for (rank, s) in self.shards.iter().enumerate() {
            match s.rx.recv() {
                Ok(Ok(part)) => parts.push(part),
                Ok(Err(e)) => {
                    first_err.get_or_insert(e);
                }
                Err(_) => {
                    first_err.get_or_insert(ModelError::Shard {
                        rank,
                        msg: "shard thread is gone".into(),
                    });
                }
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(parts),
        }
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        for s in &mut self.shards {
            s.tx.take();
        }
        for s in &mut self.shards {
            if let Some(j) = s.join.take() {
                let _ = j.join();
            }
        }
    }
}

#[derive(Debug, Clone)]
pub struct GenerateParams {
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// Keep generating past end-of-sequence tokens (for comparing with references).
    pub ignore_eos: bool,
}

impl Default for GenerateParams {
    fn default() -> Self {
        GenerateParams {
            max_tokens: 128,
            sampling: SamplingParams::default(),
            ignore_eos: false,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// An end-of-sequence token was produced.
    Stop,
    /// `max_tokens` or the context length was reached.
    Length,
    /// The caller asked to stop.
    Cancelled,
}

#[derive(Debug, Clone)]
pub struct GenStats {
    pub prompt_tokens: usize,
    pub prefill: Duration,
    pub generated: usize,
    /// Time of the decode steps (every forward after the prefill).
    pub decode: Duration,
    pub decode_steps: usize,
    pub finish: Finish,
}

impl GenStats {
    pub fn prefill_tok_s(&self) -> f64 {
        self.prompt_tokens as f64 / self.prefill.as_secs_f64().max(1e-9)
    }
    pub fn decode_tok_s(&self) -> f64 {
        if self.decode_steps == 0 {
            return 0.0;
        }
        self.decode_steps as f64 / self.decode.as_secs_f64().max(1e-9)
    }
}

/// Prefills `prompt` in one batched forward, then decodes one token at a time. `on_token` gets
/// each new token and returns false to stop. The sequence's cache is freed at the end.
pub fn generate(
    runner: &mut dyn Runner,
    seq: u64,
    prompt: &[u32],
    params: &GenerateParams,
    eos_ids: &[u32],
    on_token: &mut dyn FnMut(u32) -> bool,
) -> Result<GenStats> {
    let ctx = runner.cfg().max_context;
    if prompt.is_empty() {
        return Err(ModelError::EmptyPrompt);
    }
    if prompt.len() > ctx {
        return Err(ModelError::PromptTooLong {
            prompt: prompt.len(),
            context: ctx,
        });
    }
    let result = generate_inner(runner, seq, prompt, params, eos_ids, on_token);
    runner.free(seq);
    result
}

fn generate_inner(
    runner: &mut dyn Runner,
    seq: u64,
    prompt: &[u32],
    params: &GenerateParams,
    eos_ids: &[u32],
    on_token: &mut dyn FnMut(u32) -> bool,
) -> Result<GenStats> {
    let ctx = runner.cfg().max_context;
    let mut sampler = Sampler::new(params.sampling.clone());
    let mut stats = GenStats {
        prompt_tokens: prompt.len(),
        prefill: Duration::ZERO,
        generated: 0,
        decode: Duration::ZERO,
        decode_steps: 0,
        finish: Finish::Length,
    };
    if params.max_tokens == 0 {
        return Ok(stats);
    }
    // Greedy decoding asks each shard for its best candidate (a GPU picks it on the device),
    // as the workers of a cluster send theirs; other draws take the whole vocabulary's logits.
    let greedy = sampler.is_greedy();
    let mut next = |sampler: &mut Sampler, ids: &[u32], pos: usize| -> Result<u32> {
        if !greedy {
            return Ok(sampler.sample(&runner.forward(seq, ids, pos)?));
        }
        let step = SeqStep {
            seq,
            ids: ids.to_vec(),
            pos,
        };
        let want = sampler.want();
        let pick = runner
            .step_picks(
                std::slice::from_ref(&step),
                &[],
                std::slice::from_ref(&want),
            )?
            .pop();
        match pick {
            Some(Pick::Top(c)) => match sampler.sample_candidates(&c) {
                crate::Draw::Token(t) => Ok(t),
                crate::Draw::NeedLogits => unreachable!("a greedy draw needs its best only"),
            },
            Some(Pick::Logits(l)) => Ok(sampler.sample(&l)),
            None => Err(ModelError::Backend("a step returned no pick".into())),
        }
    };
    let t0 = Instant::now();
    let mut tok = next(&mut sampler, prompt, 0)?;
    stats.prefill = t0.elapsed();
    let mut pos = prompt.len();
    loop {
        stats.generated += 1;
        if !on_token(tok) {
            stats.finish = Finish::Cancelled;
            break;
        }
        if !params.ignore_eos && eos_ids.contains(&tok) {
            stats.finish = Finish::Stop;
            break;
        }
        // The next forward would put the new token at position `pos`: it must fit.
        if stats.generated >= params.max_tokens || pos >= ctx {
            break;
        }
        let t = Instant::now();
        tok = next(&mut sampler, &[tok], pos)?;
        stats.decode += t.elapsed();
        stats.decode_steps += 1;
        pos += 1;
    }
    Ok(stats)
}
