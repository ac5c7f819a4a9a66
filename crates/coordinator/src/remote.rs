//! The shards in remote workers, as a [`Runner`]: each step goes to every worker over its
//! long-lived gRPC step stream, and the vocabulary slices of the logits come back.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tessera_model::{
    Candidates, CommStats, ModelError, Pick, Runner, SeqStep, Want, check_steps, gather_logits,
};
use tessera_proto::{StepReply, StepRequest};
use tokio::sync::mpsc;
use tonic::Streaming;

/// How long one step may take before the worker is declared failed.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(20);

pub(crate) struct StepLink {
    pub name: String,
    pub addr: String,
    pub id: u64,
    pub tx: mpsc::Sender<StepRequest>,
    pub rx: Streaming<StepReply>,
}

/// KV cache use each worker reported with its last step: worker id -> (sequences, positions).
pub type CacheUsage = Arc<Mutex<HashMap<u64, (u32, u64)>>>;

pub struct RemoteCluster {
    pub(crate) cfg: tessera_core::ModelConfig,
    pub(crate) links: Vec<StepLink>,
    pub(crate) weight_bytes: u64,
    pub(crate) handle: tokio::runtime::Handle,
    pub(crate) comm: CommStats,
    pub(crate) usage: CacheUsage,
    /// Step requests sent so far.
    pub(crate) sent: u64,
}

/// A step's failure, worst first: a worker whose stream died is the likely culprit; the
/// others then report all-reduce errors of their own. Where every failure is such an
/// all-reduce error (`mesh_down`), no worker is to blame: the mesh broke.
#[derive(PartialEq, Eq, PartialOrd, Ord)]
enum Blame {
    Dead,
    Reported,
    Mesh,
}

/// Whether a worker's candidates are shaped as `want` asked: a count per such sequence, no
/// more than asked (one more for a Gumbel winner), as many ids and logits as the counts add
/// up to, and a log-sum-exp and floor per sequence.
fn top_reply_fits(r: &StepReply, want: &[Want]) -> bool {
    let asked: Vec<usize> = want
        .iter()
        .filter_map(|w| match w {
            Want::Top(spec) => Some(spec.n + spec.gumbel.is_some() as usize),
            Want::Logits => None,
        })
        .collect();
    let any_mass = want
        .iter()
        .any(|w| matches!(w, Want::Top(spec) if spec.mass));
    let any_raw = want
        .iter()
        .any(|w| matches!(w, Want::Top(spec) if spec.raw_lse));
    let total: usize = r.top_counts.iter().map(|&c| c as usize).sum();
    r.top_counts.len() == asked.len()
        && r.top_counts
            .iter()
            .zip(&asked)
            .all(|(&c, &n)| c as usize <= n)
        && r.top_ids.len() == total
        && r.top_logits.len() == total
        && r.top_lse.len() == r.top_floor.len()
        && (r.top_lse.len() == asked.len() || (r.top_lse.is_empty() && !any_mass))
        && (r.top_lse_raw.len() == asked.len() || (r.top_lse_raw.is_empty() && !any_raw))
}

/// One worker's answer to a step, as [`gather_replies`] found it.
enum Gathered {
    Reply(Box<StepReply>),
    /// The stream ended, or failed.
    Closed,
    Failed(tonic::Status),
    /// Nothing within [`STEP_TIMEOUT`] (or [`GRACE_AFTER_ERROR`] after another's error).
    TimedOut,
    /// Not waited for: another worker's stream ended first.
    Abandoned,
}

/// How long the other workers' replies are waited for once one worker reported a failed
/// step: a worker cut off from the network sends nothing (its peers' all-reduces fail, and
/// they say so), so it is blamed this long after them, not after the whole step timeout.
const GRACE_AFTER_ERROR: Duration = Duration::from_secs(2);

/// Every worker's next reply, waited for together: as soon as one worker's stream ends (a
/// worker died), the others are not waited for (they are then stuck in, or failing, an
/// all-reduce with it), so that the cluster is rebuilt at once, not after the step timeout;
/// once one reports an error, the silent ones get [`GRACE_AFTER_ERROR`].
async fn gather_replies(links: &mut [StepLink]) -> Vec<Gathered> {
    use std::task::Poll;
    use tokio_stream::Stream;
    let mut got: Vec<Option<Gathered>> = links.iter().map(|_| None).collect();
    let mut deadline = tokio::time::Instant::now() + STEP_TIMEOUT;
    let mut dead = false;
    while got.iter().any(Option::is_none) {
        // The next reply (or end) of any worker still awaited.
        let next = std::future::poll_fn(|cx| {
            for (l, slot) in links.iter_mut().zip(got.iter_mut()) {
                if slot.is_some() {
                    continue;
                }
                if let Poll::Ready(r) = std::pin::Pin::new(&mut l.rx).poll_next(cx) {
                    *slot = Some(match r {
                        Some(Ok(r)) => Gathered::Reply(Box::new(r)),
                        Some(Err(s)) => Gathered::Failed(s),
                        None => Gathered::Closed,
                    });
                    return Poll::Ready(());
                }
            }
            Poll::Pending
        });
        if tokio::time::timeout_at(deadline, next).await.is_err() {
            break;
        }
        if got
            .iter()
            .any(|g| matches!(g, Some(Gathered::Closed | Gathered::Failed(_))))
        {
            dead = true;
            break;
        }
        if got
            .iter()
            .any(|g| matches!(g, Some(Gathered::Reply(r)) if !r.error.is_empty()))
        {
            deadline = deadline.min(tokio::time::Instant::now() + GRACE_AFTER_ERROR);
        }
    }
    got.into_iter()
        .map(|g| {
            g.unwrap_or(if dead {
                Gathered::Abandoned
            } else {
                Gathered::TimedOut
            })
        })
        .collect()
}

/// A failure of the worker of rank `rank`, named.
fn link_err(rank: usize, l: &StepLink, why: &str) -> ModelError {
    ModelError::Shard {
        rank,
        msg: format!("worker {} ({}) {why}", l.name, l.addr),
    }
}

/// Fault injection for the tests of a coordinator that dies in the middle of a step: where
/// TESSERA_FAULT_DIE_MID_STEP=N, the N-th step request goes to the first worker only, and the
/// process exits half a second later (as if killed between two sends).
fn die_mid_step() -> Option<u64> {
    static AT: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
    *AT.get_or_init(|| {
        std::env::var("TESSERA_FAULT_DIE_MID_STEP")
            .ok()
            .and_then(|v| v.parse().ok())
    })
}

/// Sends `req` down every worker's step stream.
async fn send_all(links: &[StepLink], req: &StepRequest) -> Result<(), ModelError> {
    for (rank, l) in links.iter().enumerate() {
        l.tx.send(req.clone())
            .await
            .map_err(|_| link_err(rank, l, "is gone"))?;
    }
    Ok(())
}

fn proto_step(s: &SeqStep, w: &Want) -> tessera_proto::SeqStep {
    let mut p = tessera_proto::SeqStep {
        seq: s.seq,
        pos: s.pos as u32,
        ids: s.ids.clone(),
        ..Default::default()
    };
    if let Want::Top(spec) = w {
        p.top = spec.n as u32;
        p.temperature = spec.temperature;
        p.gumbel = spec.gumbel.is_some();
        (p.seed, p.draw) = spec.gumbel.unwrap_or_default();
        p.mass = spec.mass;
        p.raw_lse = spec.raw_lse;
    }
    p
}

impl Runner for RemoteCluster {
    fn cfg(&self) -> &tessera_core::ModelConfig {
        &self.cfg
    }

    fn step(&mut self, steps: &[SeqStep], free: &[u64]) -> Result<Vec<Vec<f32>>, ModelError> {
        let picks = self.step_picks(steps, free, &vec![Want::Logits; steps.len()])?;
        Ok(picks
            .into_iter()
            .map(|p| match p {
                Pick::Logits(l) => l,
                Pick::Top(_) => unreachable!("every sequence asked for its logits"),
            })
            .collect())
    }

    fn step_picks(
        &mut self,
        steps: &[SeqStep],
        free: &[u64],
        want: &[Want],
    ) -> Result<Vec<Pick>, ModelError> {
        check_steps(&self.cfg, steps)?;
        let started = Instant::now();
        let req = StepRequest {
            steps: steps
                .iter()
                .zip(want)
                .map(|(s, w)| proto_step(s, w))
                .collect(),
            free: free.to_vec(),
            last_logits: Vec::new(),
        };
        let n_top = want.iter().filter(|w| **w != Want::Logits).count();
        let n_full = steps.len() - n_top;
        let handle = self.handle.clone();
        let links = &mut self.links;
        let usage = self.usage.clone();
        self.sent += 1;
        let die = die_mid_step() == Some(self.sent);
        let result: Result<(Vec<Pick>, u64, u64, u64, u64), ModelError> = handle.block_on(async {
            if die {
                let _ = links[0].tx.send(req.clone()).await;
                tokio::time::sleep(Duration::from_millis(500)).await;
                eprintln!("TESSERA_FAULT_DIE_MID_STEP: exiting with a step sent to one worker");
                std::process::exit(70);
            }
            send_all(links, &req).await?;
            let mut parts = Vec::with_capacity(links.len());
            let mut tops = Vec::with_capacity(links.len());
            let mut reply_bytes = 0u64;
            let mut reduce = (0u64, 0u64);
            let mut shard_ns = 0u64;
            let mut worst: Option<(Blame, ModelError)> = None;
            let replies = gather_replies(links).await;
            for (rank, (l, reply)) in links.iter().zip(replies).enumerate() {
                let failure = match reply {
                    // Another worker's stream died first: this one's reply says nothing new.
                    Gathered::Abandoned => continue,
                    Gathered::Reply(r) if r.error.is_empty() && !top_reply_fits(&r, want) => (
                        Blame::Reported,
                        format!(
                            "sent {} candidate counts and {} candidates for {n_top} sequences",
                            r.top_counts.len(),
                            r.top_ids.len()
                        ),
                    ),
                    Gathered::Reply(mut r) if r.error.is_empty() => {
                        reply_bytes += 4
                            * (r.logits.len()
                                + r.top_counts.len()
                                + 2 * r.top_ids.len()
                                + 2 * r.top_lse.len()
                                + r.top_floor.len()
                                + 2 * r.top_lse_raw.len()) as u64;
                        reduce.0 += r.allreduce_ns;
                        reduce.1 += r.allreduce_count as u64;
                        shard_ns += r.step_ns;
                        usage
                            .lock()
                            .unwrap()
                            .insert(l.id, (r.cached_sequences, r.cached_positions));
                        parts.push(std::mem::take(&mut r.logits));
                        tops.push(*r);
                        continue;
                    }
                    Gathered::Reply(r) if r.mesh_down => {
                        (Blame::Mesh, format!("failed the step: {}", r.error))
                    }
                    Gathered::Reply(r) => {
                        (Blame::Reported, format!("failed the step: {}", r.error))
                    }
                    Gathered::Closed => (Blame::Dead, "closed its step stream".into()),
                    Gathered::Failed(s) => (Blame::Dead, format!("failed: {}", s.message())),
                    Gathered::TimedOut => (
                        Blame::Dead,
                        format!("did not answer within {STEP_TIMEOUT:?}"),
                    ),
                };
                let e = link_err(rank, l, &failure.1);
                if worst.as_ref().is_none_or(|w| failure.0 < w.0) {
                    worst = Some((failure.0, e));
                }
            }
            match worst {
                Some((Blame::Mesh, e)) => {
                    return Err(ModelError::MeshDown(match e {
                        ModelError::Shard { msg, .. } => msg,
                        e => e.to_string(),
                    }));
                }
                Some((_, e)) => return Err(e),
                None => {}
            }
            let mut full = gather_logits(&parts, n_full, self.cfg.vocab)?.into_iter();
            // Each worker's best candidates of its slice, together: they hold the whole
            // vocabulary's best (a shard's share of the global top n is within its own top n).
            let mut at: Vec<(usize, usize)> = vec![(0, 0); tops.len()]; // (sequence, candidate)
            let picks = want
                .iter()
                .map(|w| {
                    if *w == Want::Logits {
                        return Pick::Logits(full.next().expect("one row per sequence"));
                    }
                    let mut c = Candidates::empty();
                    for (r, (s, k)) in tops.iter().zip(at.iter_mut()) {
                        let n = r.top_counts[*s] as usize;
                        c.merge(&Candidates {
                            top: r.top_ids[*k..*k + n]
                                .iter()
                                .copied()
                                .zip(r.top_logits[*k..*k + n].iter().copied())
                                .collect(),
                            lse: r.top_lse.get(*s).copied().unwrap_or(f64::NEG_INFINITY),
                            floor: r.top_floor.get(*s).copied().unwrap_or(f32::NEG_INFINITY),
                            lse_raw: r.top_lse_raw.get(*s).copied().unwrap_or(f64::NEG_INFINITY),
                        });
                        *s += 1;
                        *k += n;
                    }
                    Pick::Top(c)
                })
                .collect();
            // Per worker means: every worker runs the same all-reduces.
            let n = links.len() as u64;
            Ok((
                picks,
                reduce.0 / n,
                reduce.1 / n,
                reply_bytes / n,
                shard_ns / n,
            ))
        });
        let (picks, ns, count, bytes, shard_ns) = result?;
        self.comm.allreduce_ns += ns;
        self.comm.allreduce_count += count;
        self.comm.step_ns += started.elapsed().as_nanos() as u64;
        self.comm.shard_step_ns += shard_ns;
        self.comm.steps += 1;
        self.comm.logits_bytes += bytes;
        Ok(picks)
    }

    fn last_logits(&mut self, seqs: &[u64]) -> Result<Vec<Vec<f32>>, ModelError> {
        let req = StepRequest {
            last_logits: seqs.to_vec(),
            ..Default::default()
        };
        let links = &mut self.links;
        let parts = self.handle.block_on(async {
            send_all(links, &req).await?;
            let mut parts = Vec::with_capacity(links.len());
            let replies = gather_replies(links).await;
            for (rank, (l, reply)) in links.iter().zip(replies).enumerate() {
                match reply {
                    Gathered::Reply(r) if r.error.is_empty() => parts.push(r.logits),
                    Gathered::Reply(r) => return Err(link_err(rank, l, &r.error)),
                    Gathered::Abandoned => {}
                    _ => return Err(link_err(rank, l, "did not send the logits")),
                }
            }
            Ok(parts)
        })?;
        let bytes: usize = parts.iter().map(|p| 4 * p.len()).sum();
        self.comm.logits_bytes += (bytes / self.links.len().max(1)) as u64;
        gather_logits(&parts, seqs.len(), self.cfg.vocab)
    }

    fn weight_bytes_per_token(&self) -> u64 {
        self.weight_bytes
    }

    fn comm_stats(&self) -> CommStats {
        self.comm
    }
}
