//! The layer's operations, each with an implementation per device behind one call: on the CPU
//! (Burn's Flex backend) they run on the tensors' storage directly (`cpu.rs`), on other devices
//! they are Burn tensor operations. The layer code in `shard.rs` calls these and nothing else,
//! so every device runs the same layer path.

use crate::cpu::{self, HostKv};
use crate::shard::SeqStep;
use burn::backend::flex::FlexTensor;
use burn::backend::{DispatchDevice, Flex};
use burn::tensor::activation::softmax;
use burn::tensor::{Device, IndexingUpdateOp, Int, Tensor, TensorData};
use tessera_core::{Activation, CacheType};

/// Whether tensors on `device` live in host memory (Burn's Flex backend).
pub fn is_host(device: &Device) -> bool {
    matches!(device.as_dispatch(), DispatchDevice::Flex(_))
}

/// The Flex tensor behind `x`, contiguous, when `x` lives on the CPU.
pub fn host<const D: usize>(x: &Tensor<D>) -> Option<FlexTensor> {
    if !is_host(&x.device()) {
        return None;
    }
    let t = x.clone().try_into_primitive::<Flex>().ok()?;
    Some(if t.is_contiguous() && t.layout().start_offset() == 0 {
        t
    } else {
        t.to_contiguous()
    })
}

fn to_vec<const D: usize>(x: Tensor<D>) -> Vec<f32> {
    x.into_data()
        .try_into_vec::<f32>()
        .expect("activations are f32")
}

fn from_vec<const D: usize>(v: Vec<f32>, shape: [usize; D], device: &Device) -> Tensor<D> {
    Tensor::<D>::from_data(TensorData::new(v, shape), device)
}

/// A norm's weights, on the device and as host values.
pub struct Norm {
    pub dev: Tensor<2>,
    pub host: Vec<f32>,
}

impl Norm {
    pub fn new(w: Vec<f32>, device: &Device) -> Norm {
        let n = w.len();
        Norm {
            dev: from_vec(w.clone(), [1, n], device),
            host: w,
        }
    }
}

pub fn rms_norm(x: Tensor<2>, w: &Norm, eps: f64) -> Tensor<2> {
    let device = x.device();
    if is_host(&device) {
        let [t, h] = x.dims();
        let mut v = to_vec(x);
        cpu::rms_norm(&mut v, &w.host, h, eps as f32);
        return from_vec(v, [t, h], &device);
    }
    #[cfg(feature = "wgpu")]
    return crate::gpu::rms_norm(x, &w.dev, eps as f32);
    #[cfg(not(feature = "wgpu"))]
    unreachable!("{NO_DEVICE}")
}

/// Without the wgpu feature the CPU is the only device.
#[cfg(not(feature = "wgpu"))]
const NO_DEVICE: &str = "a device other than the CPU in a build without wgpu";

/// `x + y` (a residual add) and the RMSNorm of the sum that follows it: one kernel on a GPU.
pub fn add_rms_norm(x: Tensor<2>, y: Tensor<2>, w: &Norm, eps: f64) -> (Tensor<2>, Tensor<2>) {
    if is_host(&x.device()) {
        let sum = add(x, y);
        let normed = rms_norm(sum.clone(), w, eps);
        return (sum, normed);
    }
    #[cfg(feature = "wgpu")]
    return crate::gpu::add_rms_norm(x, y, &w.dev, eps as f32);
    #[cfg(not(feature = "wgpu"))]
    unreachable!("{NO_DEVICE}")
}

/// RMSNorm of every `w`-wide piece of each row: the per-head Q/K norms.
pub fn rms_norm_heads(x: Tensor<2>, w: &Norm, eps: f64) -> Tensor<2> {
    let [t, width] = x.dims();
    let hd = w.host.len();
    rms_norm(x.reshape([t * width / hd, hd]), w, eps).reshape([t, width])
}

/// `act(gate) * up`.
pub fn glu(gate: Tensor<2>, up: Tensor<2>, act: Activation) -> Tensor<2> {
    let device = gate.device();
    if is_host(&device) {
        let shape = gate.dims();
        let mut g = to_vec(gate);
        let u = host(&up).expect("host tensor");
        let u = u.as_slice::<f32>().expect("f32");
        let f = match act {
            Activation::Silu => cpu::swiglu,
            Activation::GeluTanh => cpu::geglu,
        };
        // A prompt's rows are many: spread them over the kernel threads.
        const CHUNK: usize = 1 << 14;
        if g.len() > 2 * CHUNK {
            use rayon::prelude::*;
            tessera_quant::in_pool(|| {
                g.par_chunks_mut(CHUNK)
                    .zip(u.par_chunks(CHUNK))
                    .for_each(|(g, u)| f(g, u))
            });
        } else {
            f(&mut g, u);
        }
        return from_vec(g, shape, &device);
    }
    #[cfg(feature = "wgpu")]
    return crate::gpu::glu(gate, up, act == Activation::GeluTanh);
    #[cfg(not(feature = "wgpu"))]
    unreachable!("{NO_DEVICE}")
}

/// `x * s`.
pub fn scale(x: Tensor<2>, s: f32) -> Tensor<2> {
    let device = x.device();
    if is_host(&device) {
        let shape = x.dims();
        let mut v = to_vec(x);
        v.iter_mut().for_each(|a| *a *= s);
        return from_vec(v, shape, &device);
    }
    x * s
}

/// Rows `rows` of `x`, in that order.
pub fn gather_rows(x: &Tensor<2>, rows: &[usize]) -> Tensor<2> {
    let device = x.device();
    let w = x.dims()[1];
    if is_host(&device) {
        let src = host(x).expect("host tensor");
        let src = src.as_slice::<f32>().expect("f32");
        let mut v = Vec::with_capacity(rows.len() * w);
        for &r in rows {
            v.extend_from_slice(&src[r * w..(r + 1) * w]);
        }
        return from_vec(v, [rows.len(), w], &device);
    }
    let idx: Vec<i64> = rows.iter().map(|&r| r as i64).collect();
    x.clone().select(
        0,
        Tensor::<1, Int>::from_data(TensorData::new(idx, [rows.len()]), &device),
    )
}

/// `acc[rows[i]] += weights[i] * y[i]` for every row `i` of `y`.
pub fn scatter_add_rows(
    acc: Tensor<2>,
    rows: &[usize],
    y: Tensor<2>,
    weights: &[f32],
) -> Tensor<2> {
    let device = acc.device();
    let [n, w] = y.dims();
    if is_host(&device) {
        let shape = acc.dims();
        let mut a = to_vec(acc);
        let y = host(&y).expect("host tensor");
        let y = y.as_slice::<f32>().expect("f32");
        for ((&r, yr), &s) in rows.iter().zip(y.chunks_exact(w)).zip(weights) {
            for (a, b) in a[r * w..(r + 1) * w].iter_mut().zip(yr) {
                *a += b * s;
            }
        }
        return from_vec(a, shape, &device);
    }
    let idx: Vec<i64> = rows.iter().map(|&r| r as i64).collect();
    let ws = from_vec(weights.to_vec(), [n, 1], &device);
    acc.select_assign(
        0,
        Tensor::<1, Int>::from_data(TensorData::new(idx, [n]), &device),
        y * ws,
        IndexingUpdateOp::Add,
    )
}

/// `x + y`.
pub fn add(x: Tensor<2>, y: Tensor<2>) -> Tensor<2> {
    let device = x.device();
    if is_host(&device) {
        let shape = x.dims();
        let mut a = to_vec(x);
        let b = host(&y).expect("host tensor");
        for (a, b) in a.iter_mut().zip(b.as_slice::<f32>().expect("f32")) {
            *a += b;
        }
        return from_vec(a, shape, &device);
    }
    x + y
}

/// Rotary embedding tables for one step's positions.
pub struct Rope {
    positions: Vec<usize>,
    /// `[1, tokens, head_dim]` cos and sin, on devices other than the CPU.
    dev: Option<(Tensor<3>, Tensor<3>)>,
    interleaved: bool,
}

impl Rope {
    pub fn new(
        positions: Vec<usize>,
        inv_freq: &[f32],
        interleaved: bool,
        device: &Device,
    ) -> Rope {
        let dev = (!is_host(device)).then(|| {
            let hd = inv_freq.len() * 2;
            let t = positions.len();
            let (mut cos, mut sin) = (Vec::with_capacity(t * hd), Vec::with_capacity(t * hd));
            for &p in &positions {
                let row: Vec<f32> = inv_freq.iter().map(|f| *f * p as f32).collect();
                if interleaved {
                    for a in &row {
                        cos.extend([a.cos(); 2]);
                        sin.extend([a.sin(); 2]);
                    }
                } else {
                    for _ in 0..2 {
                        cos.extend(row.iter().map(|a| a.cos()));
                        sin.extend(row.iter().map(|a| a.sin()));
                    }
                }
            }
            (
                from_vec(cos, [1, t, hd], device),
                from_vec(sin, [1, t, hd], device),
            )
        });
        Rope {
            positions,
            dev,
            interleaved,
        }
    }

    /// Rotates `q` and `k` (`[tokens, heads * head_dim]`, `nq` and `nkv` heads).
    pub fn apply(
        &self,
        q: Tensor<2>,
        k: Tensor<2>,
        nq: usize,
        nkv: usize,
        inv_freq: &[f32],
    ) -> (Tensor<2>, Tensor<2>) {
        let device = q.device();
        let ([t, wq], [_, wk]) = (q.dims(), k.dims());
        let hd = wq / nq;
        if is_host(&device) {
            let turn = |x: Tensor<2>, heads: usize, w: usize| {
                let mut v = to_vec(x);
                cpu::rope(
                    &mut v,
                    &self.positions,
                    heads,
                    hd,
                    inv_freq,
                    self.interleaved,
                );
                from_vec(v, [t, w], &device)
            };
            return (turn(q, nq, wq), turn(k, nkv, wk));
        }
        let (cos, sin) = self.dev.as_ref().expect("device tables");
        #[cfg(feature = "wgpu")]
        return crate::gpu::rope(q, k, cos, sin, hd, self.interleaved);
        #[cfg(not(feature = "wgpu"))]
        unreachable!("{NO_DEVICE} ({cos:?}, {sin:?}, {nkv})")
    }
}

/// One sequence's KV cache for one layer, written in place as tokens arrive.
// One per layer and sequence: the size difference costs nothing worth an indirection.
#[allow(clippy::large_enum_variant)]
pub enum Kv {
    Host(HostKv),
    /// The fast path's cache on the CPU: f16 (see [`tessera_core::CacheType`]).
    Half(HostKv<half::f16>),
    /// `[kv_heads, capacity, head_dim]` K and V, of which `len` positions are filled.
    Dev {
        k: Tensor<3>,
        v: Tensor<3>,
        len: usize,
    },
}

impl Kv {
    /// An empty cache on `device`, holding `ty` on the CPU (a GPU's cache is f32).
    pub fn new(device: &Device, ty: CacheType) -> Kv {
        if is_host(device) {
            match ty {
                CacheType::F32 => Kv::Host(HostKv::default()),
                CacheType::F16 => Kv::Half(HostKv::default()),
            }
        } else {
            let z = Tensor::<3>::zeros([1, 0, 1], device);
            Kv::Dev {
                k: z.clone(),
                v: z,
                len: 0,
            }
        }
    }

    pub fn len(&self, kv_width: usize) -> usize {
        match self {
            Kv::Host(h) => h.len(kv_width),
            Kv::Half(h) => h.len(kv_width),
            Kv::Dev { len, .. } => *len,
        }
    }

    pub fn is_empty(&self, kv_width: usize) -> bool {
        self.len(kv_width) == 0
    }
}

/// A sequence's CPU cache for one layer, in either element type.
#[derive(Clone, Copy)]
enum HostCache<'a> {
    F32(&'a HostKv),
    F16(&'a HostKv<half::f16>),
}

/// How a shard's query heads read its KV heads.
pub struct Heads {
    pub nq: usize,
    pub nkv: usize,
    pub hd: usize,
    /// For each local query head, the local KV head it reads.
    pub kv_of: Vec<usize>,
    /// When every local KV head serves the same number of consecutive query heads: that number.
    pub group: Option<usize>,
    /// `kv_of` on the device, when it is not the identity and not grouped.
    pub kv_index: Option<Tensor<1, Int>>,
    /// `kv_of` on the device as `u32`, for the decode attention kernel.
    pub kv_map: Option<Tensor<1, Int>>,
    /// Scores are `q·k * scale`.
    pub scale: f32,
}

/// Appends each sequence's new K and V (`[tokens, nkv * hd]`, sequences in step order) to its
/// cache for this layer and computes causal attention of its queries (`[tokens, nq * hd]`).
pub fn attention(
    q: Tensor<2>,
    k: Tensor<2>,
    v: Tensor<2>,
    steps: &[SeqStep],
    caches: &mut [&mut Kv],
    heads: &Heads,
    window: Option<usize>,
) -> Tensor<2> {
    let device = q.device();
    let (nq, nkv, hd) = (heads.nq, heads.nkv, heads.hd);
    let t_all = q.dims()[0];
    if is_host(&device) {
        let (qh, kh, vh) = (
            host(&q).expect("host"),
            host(&k).expect("host"),
            host(&v).expect("host"),
        );
        let (qs, ks, vs) = (
            qh.as_slice::<f32>().expect("f32"),
            kh.as_slice::<f32>().expect("f32"),
            vh.as_slice::<f32>().expect("f32"),
        );
        let mut out = vec![0f32; t_all * nq * hd];
        let (kvw, qw) = (nkv * hd, nq * hd);
        // Each sequence's new K and V into its cache, then every sequence's attention at
        // once (each writes its own rows of `out`).
        let mut jobs = Vec::with_capacity(steps.len());
        let mut rest = &mut out[..];
        let mut o = 0;
        for (s, cache) in steps.iter().zip(caches.iter_mut()) {
            let t = s.ids.len();
            let (kn, vn) = (&ks[o * kvw..(o + t) * kvw], &vs[o * kvw..(o + t) * kvw]);
            let c = match &mut **cache {
                Kv::Host(c) => {
                    c.append(kn, vn);
                    HostCache::F32(&*c)
                }
                Kv::Half(c) => {
                    c.append(kn, vn);
                    HostCache::F16(&*c)
                }
                Kv::Dev { .. } => unreachable!("host cache"),
            };
            let (mine, tail) = rest.split_at_mut(t * qw);
            rest = tail;
            jobs.push((&qs[o * qw..(o + t) * qw], c, mine, t, s.pos));
            o += t;
        }
        let one = |(q, c, o, t, pos): (&[f32], HostCache, &mut [f32], usize, usize)| {
            let (kv_of, scale) = (&heads.kv_of[..], heads.scale);
            match c {
                HostCache::F32(c) => {
                    cpu::attention(q, c, o, t, pos, nq, nkv, hd, kv_of, scale, window)
                }
                HostCache::F16(c) => {
                    cpu::attention(q, c, o, t, pos, nq, nkv, hd, kv_of, scale, window)
                }
            }
        };
        if jobs.len() == 1 {
            jobs.into_iter().for_each(one);
        } else {
            use rayon::prelude::*;
            tessera_quant::in_pool(|| jobs.into_par_iter().for_each(one));
        }
        return from_vec(out, [t_all, nq * hd], &device);
    }
    #[cfg(feature = "wgpu")]
    if let Some(map) = &heads.kv_map
        && steps.iter().all(|s| s.ids.len() == 1)
    {
        // Decode: each sequence's new K and V into its cache, then one kernel per sequence
        // that reads the cache in place.
        let out = Tensor::<2>::empty([t_all, nq * hd], &device);
        for (i, (s, cache)) in steps.iter().zip(caches.iter_mut()).enumerate() {
            dev_reserve(cache, 1, nkv, hd, &device);
            let Kv::Dev { k: ck, v: cv, len } = &mut **cache else {
                unreachable!("device cache")
            };
            crate::gpu::kv_write(&k, &v, i, ck, cv, *len);
            *len += 1;
            let lo = window.map_or(0, |w| (s.pos + 1).saturating_sub(w));
            crate::gpu::attend_one(&q, i, ck, cv, map, lo, *len, heads.scale, &out);
        }
        return out;
    }
    let mut parts = Vec::with_capacity(steps.len());
    let mut o = 0;
    for (s, cache) in steps.iter().zip(caches.iter_mut()) {
        let t = s.ids.len();
        let r = o..o + t;
        o += t;
        let qs = q
            .clone()
            .slice([r.clone(), 0..nq * hd])
            .reshape([t, nq, hd])
            .swap_dims(0, 1);
        let ks = k
            .clone()
            .slice([r.clone(), 0..nkv * hd])
            .reshape([t, nkv, hd])
            .swap_dims(0, 1);
        let vs = v
            .clone()
            .slice([r, 0..nkv * hd])
            .reshape([t, nkv, hd])
            .swap_dims(0, 1);
        let (kc, vc) = dev_append(cache, ks, vs, nkv, hd, &device);
        parts.push(dev_attend(qs, kc, vc, s.pos, heads, window, &device));
    }
    let attn = if parts.len() == 1 {
        parts.pop().expect("one")
    } else {
        Tensor::cat(parts, 1)
    };
    attn.swap_dims(0, 1).reshape([t_all, nq * hd])
}

/// Makes room for `t` more positions in a device cache, doubling its capacity when it must
/// grow (the filled part copied over).
fn dev_reserve(cache: &mut Kv, t: usize, nkv: usize, hd: usize, device: &Device) {
    let Kv::Dev { k: ck, v: cv, len } = cache else {
        unreachable!("device cache")
    };
    let need = *len + t;
    let cap = ck.dims()[1];
    if need > cap || ck.dims()[0] != nkv {
        let new_cap = need.max(2 * cap).max(256);
        let grow = |old: &Tensor<3>| {
            let z = Tensor::<3>::zeros([nkv, new_cap, hd], device);
            if *len == 0 {
                z
            } else {
                z.slice_assign(
                    [0..nkv, 0..*len, 0..hd],
                    old.clone().slice([0..nkv, 0..*len, 0..hd]),
                )
            }
        };
        *ck = grow(ck);
        *cv = grow(cv);
    }
}

/// Writes `k`, `v` (`[nkv, t, hd]`) at the end of a device cache, growing its capacity by
/// doubling; returns views of the filled part.
fn dev_append(
    cache: &mut Kv,
    k: Tensor<3>,
    v: Tensor<3>,
    nkv: usize,
    hd: usize,
    device: &Device,
) -> (Tensor<3>, Tensor<3>) {
    let t = k.dims()[1];
    dev_reserve(cache, t, nkv, hd, device);
    let Kv::Dev { k: ck, v: cv, len } = cache else {
        unreachable!("device cache")
    };
    let need = *len + t;
    let placeholder = || Tensor::<3>::empty([1, 0, 1], device);
    let kk = std::mem::replace(ck, placeholder()).slice_assign([0..nkv, *len..need, 0..hd], k);
    let vv = std::mem::replace(cv, placeholder()).slice_assign([0..nkv, *len..need, 0..hd], v);
    *ck = kk;
    *cv = vv;
    *len = need;
    (
        ck.clone().slice([0..nkv, 0..need, 0..hd]),
        cv.clone().slice([0..nkv, 0..need, 0..hd]),
    )
}

/// Attention of `q` (`[nq, t, hd]`, first position `pos`) over `k`, `v` (`[nkv, pos + t, hd]`).
fn dev_attend(
    q: Tensor<3>,
    k: Tensor<3>,
    v: Tensor<3>,
    pos: usize,
    heads: &Heads,
    window: Option<usize>,
    device: &Device,
) -> Tensor<3> {
    let [nq, t, hd] = q.dims();
    let scale = heads.scale as f64;
    let s = pos + t;
    // Future positions, and those before the window, are masked.
    let hidden = move |i: usize, j: usize| j > pos + i || window.is_some_and(|w| j + w <= pos + i);
    // Some position is hidden when a query has a future (several new tokens) or the cache
    // outgrows the window.
    let masked = t > 1 || window.is_some_and(|w| s > w);
    let mask = |shape: Vec<usize>| {
        let m: Vec<f32> = (0..t)
            .flat_map(|i| (0..s).map(move |j| if hidden(i, j) { f32::NEG_INFINITY } else { 0.0 }))
            .collect();
        TensorData::new(m, shape)
    };
    if let Some(g) = heads.group {
        // Query heads of one KV head as rows of one product, [nkv, g*t, hd] x [nkv, hd, s].
        let nkv = nq / g;
        let q = q.reshape([nkv, g * t, hd]);
        let mut scores = q.matmul(k.swap_dims(1, 2)) * scale;
        if masked {
            let m = Tensor::<4>::from_data(mask(vec![1, 1, t, s]), device);
            scores = (scores.reshape([nkv, g, t, s]) + m).reshape([nkv, g * t, s]);
        }
        return softmax(scores, 2).matmul(v).reshape([nq, t, hd]);
    }
    let (k, v) = match &heads.kv_index {
        Some(idx) => (k.select(0, idx.clone()), v.select(0, idx.clone())),
        None => (k, v),
    };
    let mut scores = q.matmul(k.swap_dims(1, 2)) * scale;
    if masked {
        scores = scores + Tensor::<3>::from_data(mask(vec![1, t, s]), device);
    }
    softmax(scores, 2).matmul(v)
}
