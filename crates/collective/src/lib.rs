//! All-reduce between the shards of one model.
//!
//! Every layer of every shard calls [`Collective::all_reduce_sum`] twice. The algorithms here are
//! written against the small [`Transport`] trait (send a vector to a peer, receive one from a
//! peer), so their logic is tested with in-process channels and the same code runs over QUIC.
//!
//! Both algorithms give every rank bit-identical results, which the shards rely on: each rank
//! keeps its own copy of the hidden state and they must never drift apart.
//! - [`all_gather_sum`]: each rank sends its whole vector to every peer (one round trip), then
//!   sums all N vectors in rank order. Best where latency dominates (decode, small N).
//! - [`ring_all_reduce`]: reduce-scatter then all-gather around a ring, 2(N-1) steps of 1/N of
//!   the vector each. Bandwidth-optimal, so it wins on large vectors (prefill).

pub mod fast;
mod inproc;
pub mod quic;
pub mod shm;
mod wire;

pub use inproc::InProcessTransport;
pub use quic::{ClusterCa, Identity, QuicNode, QuicTransport, local_mesh};
pub use wire::Wire;

/// Latency of one vector length's all-reduces, as rank 0 saw them.
#[derive(Debug, Clone, PartialEq)]
pub struct Timing {
    pub len: usize,
    pub p50_us: f64,
    pub p99_us: f64,
    /// The vector's bytes over the median time.
    pub gb_s: f64,
}

/// Runs `plan` (see [`timing_plan`]) on every rank of `transports` (one thread per rank) and
/// returns rank 0's latencies.
pub fn time_all_reduce<T: Transport + 'static>(
    transports: Vec<T>,
    plan: &[(usize, usize)],
) -> Result<Vec<Timing>, CollectiveError> {
    let hs: Vec<_> = transports
        .into_iter()
        .map(|t| {
            let plan = plan.to_vec();
            std::thread::spawn(move || time_rank(t, &plan))
        })
        .collect();
    let mut results = Vec::new();
    let mut meshes = Vec::new();
    for h in hs {
        let (times, mesh) = h.join().expect("all-reduce thread")?;
        results.push(times);
        meshes.push(mesh);
    }
    Ok(summarize(plan, results.swap_remove(0)))
}

/// (length, iterations) for [`time_rank`]; every rank must run the same plan.
pub fn timing_plan(lens: &[usize], iters: impl Fn(usize) -> usize) -> Vec<(usize, usize)> {
    lens.iter().map(|&l| (l, iters(l).max(1))).collect()
}

/// One rank's side of [`time_all_reduce`] (also what each process of a multi-process
/// measurement runs): microseconds of each all-reduce per plan entry, after 3 warm-up rounds.
/// The mesh is handed back, not dropped: closing at once could cut a peer's last message.
#[allow(clippy::type_complexity)]
pub fn time_rank<T: Transport>(
    t: T,
    plan: &[(usize, usize)],
) -> Result<(Vec<Vec<f64>>, Mesh<T>), CollectiveError> {
    let mut mesh = Mesh::new(t);
    let mut all = Vec::new();
    for &(len, n) in plan {
        let mut buf = vec![1.0f32; len];
        let mut times = Vec::with_capacity(n);
        for i in 0..n + 3 {
            let t0 = std::time::Instant::now();
            mesh.all_reduce_sum(&mut buf)?;
            if i >= 3 {
                times.push(t0.elapsed().as_secs_f64() * 1e6);
            }
            buf.iter_mut().for_each(|x| *x = 1.0);
        }
        all.push(times);
    }
    Ok((all, mesh))
}

/// p50, p99 and GB/s of one rank's [`time_rank`] results.
pub fn summarize(plan: &[(usize, usize)], times: Vec<Vec<f64>>) -> Vec<Timing> {
    plan.iter()
        .zip(times)
        .map(|(&(len, _), mut t)| {
            t.sort_by(f64::total_cmp);
            let at = |q: f64| t[((t.len() - 1) as f64 * q).round() as usize];
            let p50 = at(0.5);
            Timing {
                len,
                p50_us: p50,
                p99_us: at(0.99),
                gb_s: (len * 4) as f64 / (p50 * 1e-6) / 1e9,
            }
        })
        .collect()
}

#[derive(Debug, thiserror::Error)]
pub enum CollectiveError {
    #[error("peer {peer} disconnected during an all-reduce")]
    PeerGone { peer: usize },
    #[error("peer {peer} sent {got} values where {want} were expected")]
    SizeMismatch {
        peer: usize,
        got: usize,
        want: usize,
    },
    #[error("all-reduce transport error with peer {peer}: {msg}")]
    Transport { peer: usize, msg: String },
    /// The step it belonged to was called off (see [`Cancel`]): its peers may never send.
    #[error("all-reduce called off: its step was abandoned")]
    Cancelled,
}

/// Calls off the all-reduces of abandoned steps. A worker numbers each step it runs with a
/// ticket; a receive that waits for a peer gives up with [`CollectiveError::Cancelled`] once
/// the running ticket is cancelled (within about 10 ms, 200 ms at worst on a datagram lane).
/// Meant for a step whose coordinator went away after sending it to only some workers: those
/// would otherwise wait for peers that never got it.
#[derive(Debug, Default)]
pub struct Cancel {
    issued: std::sync::atomic::AtomicU64,
    running: std::sync::atomic::AtomicU64,
    /// Every ticket up to this one is cancelled.
    floor: std::sync::atomic::AtomicU64,
}

impl Cancel {
    /// A new ticket, greater than every one before it.
    pub fn ticket(&self) -> u64 {
        self.issued
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst)
            + 1
    }
    /// The step of ticket `t` is the one running now.
    pub fn start(&self, t: u64) {
        self.running.store(t, std::sync::atomic::Ordering::SeqCst);
    }
    /// Cancels the step of ticket `t` and every earlier one.
    pub fn cancel_through(&self, t: u64) {
        self.floor.fetch_max(t, std::sync::atomic::Ordering::SeqCst);
    }
    /// Cancels every step issued so far.
    pub fn cancel_all(&self) {
        self.cancel_through(self.issued.load(std::sync::atomic::Ordering::SeqCst));
    }
    /// Whether the running step is cancelled.
    pub fn cancelled(&self) -> bool {
        let running = self.running.load(std::sync::atomic::Ordering::SeqCst);
        running > 0 && running <= self.floor.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// Moves f32 vectors between ranks of one group. Messages between a pair of ranks arrive in
/// the order they were sent.
pub trait Transport: Send {
    fn rank(&self) -> usize;
    fn world(&self) -> usize;
    fn send(&mut self, peer: usize, data: &[f32]) -> Result<(), CollectiveError>;
    /// Receives the next message from `peer` into `out`, which must match its length exactly.
    fn recv(&mut self, peer: usize, out: &mut [f32]) -> Result<(), CollectiveError>;
    /// Where Some(p): all-reduces longer than p values run in pieces of p (the ring: p per
    /// step), one after the other. Every rank of a mesh must answer the same.
    fn piece_len(&self) -> Option<usize> {
        None
    }
}

/// What the layers call. `buf` holds this rank's partial sum on entry and the total on return.
pub trait Collective: Send {
    fn rank(&self) -> usize;
    fn world(&self) -> usize;
    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<(), CollectiveError>;
    /// Counters of the all-reduces run so far.
    fn stats(&self) -> ReduceStats {
        ReduceStats::default()
    }
}

/// World size one: the sum of one partial is itself.
#[derive(Debug, Default, Clone, Copy)]
pub struct Single;

impl Collective for Single {
    fn rank(&self) -> usize {
        0
    }
    fn world(&self) -> usize {
        1
    }
    fn all_reduce_sum(&mut self, _buf: &mut [f32]) -> Result<(), CollectiveError> {
        Ok(())
    }
}

/// Which algorithm [`Mesh`] runs for a message of a given length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    AllGather,
    Ring,
}

/// A [`Collective`] over any [`Transport`]: picks the algorithm by message size and keeps its
/// scratch buffers between calls, so the hot path does not allocate once warmed up.
pub struct Mesh<T: Transport> {
    transport: T,
    /// Vectors of at most this many f32 use the one-step all-gather; longer ones the ring.
    pub ring_threshold: usize,
    gathered: Vec<f32>,
    chunk: Vec<f32>,
    encoded: Vec<f32>,
    /// How partial sums travel (f32 unless the cluster chose bf16 or Q8_0).
    pub wire: Wire,
    /// All-reduces run and the time spent in them (for latency and communication share).
    pub stats: ReduceStats,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ReduceStats {
    pub count: u64,
    pub nanos: u64,
}

/// 64 KiB of f32: below it a message is latency-bound on any network Tessera targets.
pub const DEFAULT_RING_THRESHOLD: usize = 16 * 1024;

impl<T: Transport> Mesh<T> {
    pub fn new(transport: T) -> Self {
        Mesh {
            transport,
            ring_threshold: DEFAULT_RING_THRESHOLD,
            gathered: Vec::new(),
            chunk: Vec::new(),
            encoded: Vec::new(),
            wire: Wire::F32,
            stats: ReduceStats::default(),
        }
    }

    pub fn algorithm_for(&self, len: usize) -> Algorithm {
        if self.transport.world() <= 2 || len <= self.ring_threshold {
            // With two ranks the ring moves the same bytes in more steps.
            Algorithm::AllGather
        } else {
            Algorithm::Ring
        }
    }

    pub fn transport_mut(&mut self) -> &mut T {
        &mut self.transport
    }
}

impl<T: Transport> Collective for Mesh<T> {
    fn stats(&self) -> ReduceStats {
        self.stats
    }
    fn rank(&self) -> usize {
        self.transport.rank()
    }
    fn world(&self) -> usize {
        self.transport.world()
    }
    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<(), CollectiveError> {
        let _span = tracing::debug_span!("all_reduce", len = buf.len()).entered();
        let t = std::time::Instant::now();
        // Encoded partials always take the one-step all-gather. Pieces (where the transport
        // asks for them) are reduced one after the other, each element in the same order as
        // without them, so the result's bits do not depend on the split.
        let world = self.transport.world();
        let ring = self.algorithm_for(buf.len()) == Algorithm::Ring && self.wire == Wire::F32;
        let piece = match self.transport.piece_len() {
            Some(p) if ring => p * world,
            Some(p) => p,
            None => buf.len(),
        };
        let mut r = Ok(());
        for part in buf.chunks_mut(piece.max(1)) {
            r = if ring {
                ring_all_reduce(&mut self.transport, part, &mut self.chunk)
            } else {
                all_gather_sum(
                    &mut self.transport,
                    part,
                    self.wire,
                    &mut self.encoded,
                    &mut self.gathered,
                )
            };
            if r.is_err() {
                break;
            }
        }
        self.stats.count += 1;
        self.stats.nanos += t.elapsed().as_nanos() as u64;
        r
    }
}

/// One-step all-gather and a local sum in rank order (so every rank gets the same bits): each
/// rank sends its partial, as `wire` encodes it, to every peer, then decodes all of them, its
/// own included, and sums them in rank order. `encoded` and `scratch` are reused across calls.
pub fn all_gather_sum<T: Transport>(
    t: &mut T,
    buf: &mut [f32],
    wire: Wire,
    encoded: &mut Vec<f32>,
    scratch: &mut Vec<f32>,
) -> Result<(), CollectiveError> {
    let (rank, world) = (t.rank(), t.world());
    if world == 1 {
        return Ok(());
    }
    let enc: &[f32] = if wire == Wire::F32 {
        buf
    } else {
        wire.encode(buf, encoded);
        encoded
    };
    let m = enc.len();
    scratch.resize(world * m, 0.0);
    for peer in (0..world).filter(|&p| p != rank) {
        t.send(peer, enc)?;
    }
    scratch[rank * m..(rank + 1) * m].copy_from_slice(enc);
    for peer in (0..world).filter(|&p| p != rank) {
        t.recv(peer, &mut scratch[peer * m..(peer + 1) * m])?;
    }
    wire.decode(&scratch[..m], buf, false);
    for r in 1..world {
        wire.decode(&scratch[r * m..(r + 1) * m], buf, true);
    }
    Ok(())
}

/// Bounds of chunk `c` when `n` values are cut into `world` nearly equal chunks.
fn chunk_bounds(n: usize, world: usize, c: usize) -> std::ops::Range<usize> {
    let base = n / world;
    let rem = n % world;
    let start = c * base + c.min(rem);
    start..start + base + usize::from(c < rem)
}

/// Ring all-reduce: N-1 reduce-scatter steps, then N-1 all-gather steps. Chunk `c` is summed in
/// the fixed order c+1, c+2, ..., c (mod N) and then copied, so all ranks hold identical bits.
pub fn ring_all_reduce<T: Transport>(
    t: &mut T,
    buf: &mut [f32],
    scratch: &mut Vec<f32>,
) -> Result<(), CollectiveError> {
    let (rank, world, n) = (t.rank(), t.world(), buf.len());
    if world == 1 {
        return Ok(());
    }
    let next = (rank + 1) % world;
    let prev = (rank + world - 1) % world;
    scratch.resize(n / world + 1, 0.0);
    // Reduce-scatter: at step s, send chunk (rank - s) and add the incoming chunk (rank - s - 1).
    // Chunk c is accumulated along the ring in the fixed order c+1, c+2, ..., c, whichever rank
    // runs this, and IEEE addition is commutative, so the final bits do not depend on the rank.
    for s in 0..world - 1 {
        let send_c = (rank + world - s) % world;
        let recv_c = (rank + world - s - 1) % world;
        t.send(next, &buf[chunk_bounds(n, world, send_c)])?;
        let rb = chunk_bounds(n, world, recv_c);
        let incoming = &mut scratch[..rb.len()];
        t.recv(prev, incoming)?;
        for (b, x) in buf[rb].iter_mut().zip(incoming.iter()) {
            *b += *x;
        }
    }
    // Now rank r holds the total of chunk (r + 1) % world. All-gather those around the ring.
    for s in 0..world - 1 {
        let send_c = (rank + 1 + world - s) % world;
        let recv_c = (rank + world - s) % world;
        t.send(next, &buf[chunk_bounds(n, world, send_c)])?;
        let rb = chunk_bounds(n, world, recv_c);
        t.recv(prev, &mut buf[rb])?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::thread;

    fn run_group(world: usize, len: usize, algo: Algorithm) -> Vec<Vec<f32>> {
        let handles: Vec<_> = InProcessTransport::group(world)
            .into_iter()
            .map(|t| {
                thread::spawn(move || {
                    let rank = t.rank();
                    let mut mesh = Mesh::new(t);
                    mesh.ring_threshold = if algo == Algorithm::Ring {
                        0
                    } else {
                        usize::MAX
                    };
                    // Integers (exactly representable) so any summation order is exact.
                    let mut buf: Vec<f32> =
                        (0..len).map(|i| (i * 7 + rank * 1000) as f32).collect();
                    mesh.all_reduce_sum(&mut buf).unwrap();
                    buf
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    }

    #[test]
    fn both_algorithms_sum_exactly_on_2_3_4_ranks() {
        for world in [2, 3, 4] {
            for algo in [Algorithm::AllGather, Algorithm::Ring] {
                for len in [1, 5, 64, 1001] {
                    let out = run_group(world, len, algo);
                    let rank_sum: usize = (0..world).map(|r| r * 1000).sum();
                    for buf in &out {
                        for (i, x) in buf.iter().enumerate() {
                            assert_eq!(
                                *x,
                                (i * 7 * world + rank_sum) as f32,
                                "{algo:?} w{world} len{len}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn float_results_are_identical_on_every_rank() {
        for algo in [Algorithm::AllGather, Algorithm::Ring] {
            let handles: Vec<_> = InProcessTransport::group(3)
                .into_iter()
                .map(|t| {
                    thread::spawn(move || {
                        let r = t.rank() as f32;
                        let mut mesh = Mesh::new(t);
                        mesh.ring_threshold = if algo == Algorithm::Ring {
                            0
                        } else {
                            usize::MAX
                        };
                        let mut buf: Vec<f32> =
                            (0..333).map(|i| (i as f32 * 0.1 + r).sin() * 1e3).collect();
                        let want: Vec<f64> = (0..333)
                            .map(|i| {
                                (0..3)
                                    .map(|r| ((i as f32 * 0.1 + r as f32).sin() * 1e3) as f64)
                                    .sum()
                            })
                            .collect();
                        mesh.all_reduce_sum(&mut buf).unwrap();
                        for (x, w) in buf.iter().zip(&want) {
                            assert!(
                                (*x as f64 - w).abs() <= 1e-6 * w.abs().max(1.0),
                                "{x} vs {w}"
                            );
                        }
                        buf
                    })
                })
                .collect();
            let out: Vec<Vec<f32>> = handles.into_iter().map(|h| h.join().unwrap()).collect();
            assert!(out.iter().all(|b| b == &out[0]), "{algo:?}: ranks disagree");
        }
    }

    #[test]
    fn encoded_partials_sum_to_the_same_bits_on_every_rank() {
        for wire in [Wire::Bf16, Wire::Q8] {
            for world in [2, 3, 4] {
                let handles: Vec<_> = InProcessTransport::group(world)
                    .into_iter()
                    .map(|t| {
                        thread::spawn(move || {
                            let r = t.rank() as f32;
                            let mut mesh = Mesh::new(t);
                            mesh.wire = wire;
                            let mut buf: Vec<f32> =
                                (0..1000).map(|i| (i as f32 * 0.01 + r).sin()).collect();
                            let exact: Vec<f32> = (0..1000)
                                .map(|i| {
                                    (0..world).map(|q| (i as f32 * 0.01 + q as f32).sin()).sum()
                                })
                                .collect();
                            mesh.all_reduce_sum(&mut buf).unwrap();
                            let worst = buf
                                .iter()
                                .zip(&exact)
                                .map(|(a, b)| (a - b).abs())
                                .fold(0f32, f32::max);
                            // Each partial is within half a step of its format (|x| <= 1).
                            assert!(worst <= world as f32 * 0.01, "{wire:?}: off by {worst}");
                            buf
                        })
                    })
                    .collect();
                let out: Vec<Vec<f32>> = handles.into_iter().map(|h| h.join().unwrap()).collect();
                assert!(
                    out.iter().all(|b| b == &out[0]),
                    "{wire:?}, {world}: ranks disagree"
                );
            }
        }
    }

    #[test]
    fn a_peer_that_leaves_is_an_error_not_a_hang() {
        let mut group = InProcessTransport::group(3);
        let gone = group.pop().unwrap();
        drop(gone);
        let handles: Vec<_> = group
            .into_iter()
            .map(|t| {
                thread::spawn(move || {
                    let mut mesh = Mesh::new(t);
                    let mut buf = vec![1.0f32; 8];
                    mesh.all_reduce_sum(&mut buf)
                })
            })
            .collect();
        for h in handles {
            let err = h.join().unwrap().unwrap_err();
            // Which peer a rank notices first depends on timing; that it errors does not.
            assert!(matches!(err, CollectiveError::PeerGone { .. }), "{err}");
        }
    }

    #[test]
    fn cancel_calls_off_the_tickets_it_names_and_no_later_one() {
        let c = Cancel::default();
        // No step yet (a mesh being built): nothing to call off.
        c.cancel_all();
        assert!(!c.cancelled());
        let (a, b) = (c.ticket(), c.ticket());
        assert!(b > a);
        c.start(a);
        c.cancel_through(a);
        assert!(c.cancelled());
        c.start(b);
        assert!(!c.cancelled(), "a later ticket is not called off");
        c.cancel_all();
        assert!(c.cancelled());
        // A late, smaller cancel does not lift the floor.
        c.cancel_through(a);
        assert!(c.cancelled());
        let d = c.ticket();
        c.start(d);
        assert!(!c.cancelled());
    }

    #[test]
    fn algorithm_is_picked_by_size() {
        let mut g = InProcessTransport::group(4);
        let mesh = Mesh::new(g.remove(0));
        assert_eq!(mesh.algorithm_for(576), Algorithm::AllGather);
        assert_eq!(mesh.algorithm_for(576 * 128), Algorithm::Ring);
    }
}
