//! Matrix products against weights kept in their GGML blocks: `y = x · Wᵀ` for `n` activation
//! rows. Output rows are spread over threads (rayon, sharing Burn's CPU pool); within a thread,
//! a tile of weight rows is decoded once for several activation rows, so a batch reads each
//! weight block once. Every output value is accumulated in the same order whatever the batch
//! size, tile or thread split, so a sequence's result does not depend on its batch.

use crate::act::QActs;
use crate::format::GgmlType;
use half::{bf16, f16};
use rayon::prelude::*;
use std::cell::RefCell;
use std::sync::OnceLock;

/// A matrix of `rows` x `cols` values stored as GGML rows (each row whole blocks, row-major).
#[derive(Debug, Clone, Copy)]
pub struct QMatrix<'a> {
    pub ty: GgmlType,
    pub rows: usize,
    pub cols: usize,
    pub data: &'a [u8],
}

impl<'a> QMatrix<'a> {
    /// Checks the byte length against the shape and type.
    pub fn new(ty: GgmlType, rows: usize, cols: usize, data: &'a [u8]) -> Result<Self, String> {
        let rb = ty.row_bytes(cols).ok_or_else(|| {
            format!(
                "a row of {cols} values is not a whole number of {}-value {} blocks",
                ty.block_values(),
                ty.name()
            )
        })?;
        let want = rb.checked_mul(rows).ok_or("matrix size overflows")?;
        if data.len() != want {
            return Err(format!(
                "{rows}x{cols} {} needs {want} bytes, found {}",
                ty.name(),
                data.len()
            ));
        }
        Ok(QMatrix {
            ty,
            rows,
            cols,
            data,
        })
    }

    pub fn row_bytes(&self) -> usize {
        self.data.len() / self.rows.max(1)
    }
}

/// How activations meet quantized weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    /// Activations in two 8-bit planes per 16 values (see [`crate::act`]), integer dot
    /// products. Only for quantized weights: dense (F32/F16/BF16) weights always use f32.
    Fast,
    /// f32 activations against weights dequantized inside the kernel.
    Exact,
}

impl Precision {
    /// [`Precision::Exact`] where `exact` (the `--exact` flag), else [`Precision::Fast`].
    pub fn of(exact: bool) -> Precision {
        if exact {
            Precision::Exact
        } else {
            Precision::Fast
        }
    }
}

/// The instruction set a kernel uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    Scalar,
    /// AVX2 + FMA + F16C (x86-64 since 2013).
    Avx2,
    /// AVX2 with AVX-VNNI dot products (`vpdpbusd` on 256-bit vectors; Alder Lake, Zen 5).
    AvxVnni,
    /// AVX-512 (F, BW, DQ, VL) without VNNI: the 512-bit kernels with `vpmaddubsw` and
    /// `vpmaddwd` for the dot products (Skylake-SP), the same sums as [`Isa::Avx512`]'s.
    Avx512Bw,
    /// AVX-512 with VNNI: two 32-value chunks per 512-bit vector (Ice Lake and later, Zen 4).
    Avx512,
}

impl Isa {
    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
            Isa::AvxVnni => "avx-vnni",
            Isa::Avx512Bw => "avx512bw",
            Isa::Avx512 => "avx512",
        }
    }

    /// Every instruction set this machine can run, scalar first.
    pub fn available() -> Vec<Isa> {
        let mut v = vec![Isa::Scalar];
        #[cfg(target_arch = "x86_64")]
        {
            if crate::x86::has_avx2() {
                v.push(Isa::Avx2);
            }
            if crate::x86::has_avx_vnni() {
                v.push(Isa::AvxVnni);
            }
            if crate::x86::has_avx512bw() {
                v.push(Isa::Avx512Bw);
            }
            if crate::x86::has_avx512() {
                v.push(Isa::Avx512);
            }
        }
        v
    }

    /// Whether the x86 module's kernels serve it: the one list to extend with a new x86 set.
    pub(crate) fn is_x86(self) -> bool {
        matches!(self, Isa::Avx2 | Isa::AvxVnni | Isa::Avx512Bw | Isa::Avx512)
    }

    /// Activation rows a prompt GEMM tile spans: the f32 lanes of two of its vectors (the
    /// GEMM's panels are padded to a multiple of it).
    pub(crate) fn gemm_width(self) -> usize {
        match self {
            Isa::Avx512 | Isa::Avx512Bw => 32,
            Isa::Avx2 | Isa::AvxVnni => 16,
            Isa::Scalar => 1,
        }
    }

    /// The fastest available, unless `TESSERA_ISA` names another (scalar, avx2, avx-vnni,
    /// avx512bw, avx512).
    pub fn best() -> Isa {
        static BEST: OnceLock<Isa> = OnceLock::new();
        *BEST.get_or_init(|| {
            let avail = Isa::available();
            if let Ok(want) = std::env::var("TESSERA_ISA")
                && let Some(i) = avail.iter().find(|i| i.name() == want)
            {
                return *i;
            }
            *avail.last().expect("scalar is always available")
        })
    }
}

/// A raw view of one output matrix `[n, cols]` written by several threads at disjoint columns;
/// with a row map, row `b` of a kernel's input is row `map[b]` of the output.
pub(crate) struct Out {
    ptr: *mut f32,
    stride: usize,
    len: usize,
    map: Option<Vec<usize>>,
}
// SAFETY: threads write disjoint elements (distinct output rows of the weight matrix).
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

impl Out {
    pub(crate) fn new(y: &mut [f32], stride: usize, map: Option<Vec<usize>>) -> Out {
        Out {
            ptr: y.as_mut_ptr(),
            stride,
            len: y.len(),
            map,
        }
    }
    /// Writes `vals` at activation row `b`, rows `r..r + N`: `N` is fixed so that the copy is a
    /// few moves, not a call to `memcpy` for every 24 bytes.
    #[inline(always)]
    pub(crate) fn set_run<const N: usize>(&self, b: usize, r: usize, vals: &[f32; N]) {
        let b = match &self.map {
            Some(m) => m[b],
            None => b,
        };
        let i = b * self.stride + r;
        assert!(i + N <= self.len && r + N <= self.stride);
        // SAFETY: in bounds (checked), and no two threads write the same (b, r).
        unsafe { (self.ptr.add(i) as *mut [f32; N]).write_unaligned(*vals) }
    }

    #[inline(always)]
    pub(crate) fn set(&self, b: usize, r: usize, v: f32) {
        let b = match &self.map {
            Some(m) => m[b],
            None => b,
        };
        let i = b * self.stride + r;
        assert!(i < self.len && r < self.stride);
        // SAFETY: in bounds (checked), and no two threads write the same (b, r).
        unsafe { *self.ptr.add(i) = v }
    }
}

/// Values `k0..k0+len` of a dense row (F32, F16 or BF16) as f32.
pub(crate) fn dense_chunk(ty: GgmlType, row: &[u8], k0: usize, len: usize, out: &mut [f32]) {
    match ty {
        GgmlType::F32 => {
            for (i, o) in out[..len].iter_mut().enumerate() {
                let at = 4 * (k0 + i);
                *o = f32::from_le_bytes(row[at..at + 4].try_into().unwrap());
            }
        }
        GgmlType::F16 => {
            for (i, o) in out[..len].iter_mut().enumerate() {
                let at = 2 * (k0 + i);
                *o = f16::from_le_bytes([row[at], row[at + 1]]).to_f32();
            }
        }
        GgmlType::BF16 => {
            for (i, o) in out[..len].iter_mut().enumerate() {
                let at = 2 * (k0 + i);
                *o = bf16::from_le_bytes([row[at], row[at + 1]]).to_f32();
            }
        }
        _ => unreachable!("not a dense type"),
    }
}

thread_local! {
    static ACTS: RefCell<QActs> = RefCell::new(QActs::default());
}

/// `y = x · Wᵀ`: `x` is `n` rows of `w.cols`, `y` is `n` rows of `w.rows`.
pub fn matmul(w: &QMatrix, x: &[f32], n: usize, y: &mut [f32], prec: Precision) {
    matmul_group(&[*w], x, n, &mut [y], prec, Isa::best());
}

/// Several matrices that read the same input (Q, K and V; gate and up) in one pass over the
/// threads: the input is quantized once, and every matrix's rows are shared out together.
/// `ys[i]` receives `n` rows of `ws[i].rows`.
pub fn matmul_group(
    ws: &[QMatrix],
    x: &[f32],
    n: usize,
    ys: &mut [&mut [f32]],
    prec: Precision,
    isa: Isa,
) {
    matmul_rows(ws, x, n, ys, prec, isa, &[])
}

/// A work item: a range of one matrix's rows (or row tiles).
type Item = (usize, std::ops::Range<usize>);

/// [`matmul_group`], with the rows of prompts marked (`prompt[b]`, or none): those go through a
/// GEMM (the fastest for many rows: on the fast path over quantized weights the integer GEMM
/// where VNNI runs, AVX-512 VNNI or AVX-VNNI; else the f32 GEMM, exact), the others through
/// `prec`'s kernel.
/// Which kernel a row takes depends on that row alone, so its result does not depend on the
/// rest of the batch.
pub fn matmul_rows(
    ws: &[QMatrix],
    x: &[f32],
    n: usize,
    ys: &mut [&mut [f32]],
    prec: Precision,
    isa: Isa,
    prompt: &[bool],
) {
    assert_eq!(ws.len(), ys.len());
    if n == 0 || ws.is_empty() {
        return;
    }
    let cols = ws[0].cols;
    assert!(
        ws.iter().all(|w| w.cols == cols),
        "a group shares its input"
    );
    assert_eq!(x.len(), n * cols, "input is n x cols");
    assert!(prompt.is_empty() || prompt.len() == n, "one mark per row");
    for (w, y) in ws.iter().zip(ys.iter()) {
        assert_eq!(y.len(), n * w.rows, "output is n x rows");
    }
    let gemm: Vec<usize> = (0..n).filter(|&b| prompt.get(b) == Some(&true)).collect();
    let rest: Vec<usize> = (0..n).filter(|&b| prompt.get(b) != Some(&true)).collect();
    let threads = crate::pool::threads();
    let run = |items: &[Item], work: &(dyn Fn(&Item) + Sync)| {
        if items.len() == 1 || threads == 1 {
            items.iter().for_each(work);
        } else {
            crate::pool::in_pool(|| items.par_iter().for_each(work));
        }
    };
    // Work items: ranges of each matrix's rows (or tiles), about 4 per thread for balance.
    let items = |unit: &dyn Fn(&QMatrix) -> usize, macs: usize| {
        let total: usize = ws.iter().map(|w| w.rows.div_ceil(unit(w))).sum();
        let parts = if macs < 1 << 16 { 1 } else { threads * 4 };
        let step = total.div_ceil(parts).max(1);
        let mut v = Vec::new();
        for (i, w) in ws.iter().enumerate() {
            let units = w.rows.div_ceil(unit(w));
            let mut u = 0;
            while u < units {
                let e = (u + step).min(units);
                v.push((i, u..e));
                u = e;
            }
        }
        v
    };
    let total_rows: usize = ws.iter().map(|w| w.rows).sum();
    if !gemm.is_empty() {
        // Quantized weights on the fast path take the integer GEMM where it runs; the rest
        // the f32 GEMM.
        let int =
            |w: &QMatrix| prec == Precision::Fast && !w.ty.is_dense() && crate::igemm::serves(isa);
        let width = gemm.len().next_multiple_of(isa.gemm_width());
        let xt = if ws.iter().all(int) {
            Vec::new()
        } else {
            crate::gemm::transpose(x, cols, &gemm, width)
        };
        let acts = if ws.iter().any(int) {
            crate::igemm::GemmActs::quantize(x, cols, &gemm)
        } else {
            Default::default()
        };
        let outs: Vec<Out> = ys
            .iter_mut()
            .zip(ws)
            .map(|(y, w)| Out::new(y, w.rows, Some(gemm.clone())))
            .collect();
        let unit = |w: &QMatrix| {
            if int(w) {
                crate::igemm::IG_ROWS
            } else {
                crate::gemm::TILE_ROWS
            }
        };
        let its = items(&unit, total_rows * cols * gemm.len());
        let m = gemm.len();
        run(&its, &|(i, tiles)| {
            let w = &ws[*i];
            if int(w) {
                crate::igemm::igemm_tiles(isa, w, tiles.clone(), &acts, m, &outs[*i])
            } else {
                crate::gemm::gemm_tiles(isa, w, tiles.clone(), &xt, width, m, &outs[*i])
            }
        });
    }
    if rest.is_empty() {
        return;
    }
    // The other rows, compacted when the batch mixes them with prompt rows.
    let compact;
    let (xr, nr, map) = if gemm.is_empty() {
        (x, n, None)
    } else {
        compact = rest
            .iter()
            .flat_map(|&b| x[b * cols..(b + 1) * cols].iter().copied())
            .collect::<Vec<f32>>();
        (&compact[..], rest.len(), Some(rest.clone()))
    };
    let fast = prec == Precision::Fast && ws.iter().any(|w| !w.ty.is_dense());
    let outs: Vec<Out> = ys
        .iter_mut()
        .zip(ws)
        .map(|(y, w)| Out::new(y, w.rows, map.clone()))
        .collect();
    let its: Vec<Item> = items(&|_| 4, total_rows * cols * nr)
        .into_iter()
        .map(|(i, u)| (i, 4 * u.start..(4 * u.end).min(ws[i].rows)))
        .collect();
    let go = |acts: Option<&QActs>| {
        run(&its, &|(i, rows)| {
            let w = &ws[*i];
            match (acts, w.ty.is_dense()) {
                (Some(a), false) => rows_fast(isa, w.ty, w.data, rows.clone(), a, &outs[*i]),
                _ => rows_exact(isa, w.ty, w.data, rows.clone(), xr, nr, cols, &outs[*i]),
            }
        })
    };
    if fast {
        ACTS.with(|a| {
            let mut a = a.borrow_mut();
            // The joined plane only for the kernel that reads it.
            a.requantize_for(xr, nr, cols, isa == Isa::Avx2);
            go(Some(&a));
        });
    } else {
        go(None);
    }
}

fn rows_fast(isa: Isa, ty: GgmlType, w: &[u8], rows: std::ops::Range<usize>, a: &QActs, out: &Out) {
    #[cfg(target_arch = "x86_64")]
    if isa.is_x86() {
        return crate::x86::rows_fast(isa, ty, w, rows, a, out);
    }
    crate::scalar::rows_fast(ty, w, rows, a, out)
}

#[allow(clippy::too_many_arguments)]
fn rows_exact(
    isa: Isa,
    ty: GgmlType,
    w: &[u8],
    rows: std::ops::Range<usize>,
    x: &[f32],
    n: usize,
    cols: usize,
    out: &Out,
) {
    #[cfg(target_arch = "x86_64")]
    if isa.is_x86() {
        return crate::x86::rows_exact(ty, w, rows, x, n, cols, out);
    }
    crate::scalar::rows_exact(ty, w, rows, x, n, cols, out)
}
