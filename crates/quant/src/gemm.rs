//! Prefill: f32 activations against weights dequantized a tile at a time, as a register-blocked
//! f32 GEMM. A prompt's rows are many, so each weight row is dequantized once for all of them
//! and the FMAs run at the core's f32 peak, faster than the decode kernels (whose weight
//! unpacking is paid per tile of 4 rows) and exact. Every prompt on the exact path takes it,
//! and on the fast path wherever the integer GEMM ([`crate::igemm`]) does not run.
//!
//! `C[r][b] = Σ_k W[r][k] X[b][k]`, accumulated over k in order in one FMA chain per output,
//! whatever the tile or thread split, so a row's result does not depend on the other rows.

use crate::format::{Chunk, GgmlType, decode_chunk};
use crate::kernel::{Isa, Out, QMatrix, dense_chunk};

/// Weight rows per tile (the micro-kernels' register block).
pub(crate) const TILE_ROWS: usize = 6;

/// Tiles dequantized together and run against each block of activation columns in turn, so
/// that the block (`k x 32` f32: 80-256 KiB for these models) is read from memory once for
/// all of them and then from the core's L2, instead of once per tile.
const GROUP: usize = 4;

/// Dequantizes rows `r0..r0 + rows` of `w` into `out` (`rows * w.cols` f32).
pub(crate) fn dequant_rows(isa: Isa, w: &QMatrix, r0: usize, rows: usize, out: &mut [f32]) {
    let rb = w.row_bytes();
    for (i, o) in out.chunks_exact_mut(w.cols).take(rows).enumerate() {
        let row = &w.data[(r0 + i) * rb..(r0 + i + 1) * rb];
        #[cfg(target_arch = "x86_64")]
        if isa.is_x86() {
            crate::x86::dequant_row(w.ty, row, o);
            continue;
        }
        dequant_row_scalar(w.ty, row, o);
    }
}

/// `tiles` tiles of the GEMM (weights `w`: `tiles` x `TILE_ROWS` rows of `k`; outputs `c`: as
/// many rows of `width`) with `isa`'s kernel.
fn gemm_group(
    isa: Isa,
    w: &[f32],
    tiles: usize,
    k: usize,
    xt: &[f32],
    width: usize,
    c: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if isa.is_x86() {
        return crate::x86::gemm_group(isa, w, tiles, k, xt, width, c);
    }
    let wt = w.chunks_exact(TILE_ROWS * k);
    for (w, c) in wt.zip(c.chunks_exact_mut(TILE_ROWS * width)).take(tiles) {
        gemm_tile_scalar(w, k, xt, width, c)
    }
}

fn dequant_row_scalar(ty: GgmlType, row: &[u8], out: &mut [f32]) {
    if ty.is_dense() {
        let n = out.len();
        dense_chunk(ty, row, 0, n, out);
        return;
    }
    let (per, bytes) = ty.block();
    let mut ch = Chunk::default();
    for (k, o) in out.chunks_exact_mut(32).enumerate() {
        decode_chunk(ty, &row[(k * 32 / per) * bytes..], k % (per / 32), &mut ch);
        for (i, v) in o.iter_mut().enumerate() {
            *v = ch.value(i);
        }
    }
}

/// Activation rows `rows` of `x` (`cols` each) transposed: `xt[k * width + j] = x[rows[j]][k]`,
/// zero beyond `rows.len()`. In 16 x 16 blocks, so reads and writes both stay in cache lines.
pub(crate) fn transpose(x: &[f32], cols: usize, rows: &[usize], width: usize) -> Vec<f32> {
    const T: usize = 16;
    let mut xt = vec![0f32; cols * width];
    for j0 in (0..rows.len()).step_by(T) {
        let js = j0..(j0 + T).min(rows.len());
        for k0 in (0..cols).step_by(T) {
            let ks = k0..(k0 + T).min(cols);
            for j in js.clone() {
                let src = &x[rows[j] * cols..(rows[j] + 1) * cols];
                for k in ks.clone() {
                    xt[k * width + j] = src[k];
                }
            }
        }
    }
    xt
}

/// Rows `tiles` (in units of [`TILE_ROWS`]) of `w` against the transposed activations `xt`
/// (`w.cols x width`, of which the first `m` columns are rows): column `j` is `out`'s row `j`.
pub(crate) fn gemm_tiles(
    isa: Isa,
    w: &QMatrix,
    tiles: std::ops::Range<usize>,
    xt: &[f32],
    width: usize,
    m: usize,
    out: &Out,
) {
    let k = w.cols;
    let mut wbuf = vec![0f32; GROUP * TILE_ROWS * k];
    let mut cbuf = vec![0f32; GROUP * TILE_ROWS * width];
    for g0 in tiles.clone().step_by(GROUP) {
        let group = g0..(g0 + GROUP).min(tiles.end);
        let n = group.len();
        let r0 = g0 * TILE_ROWS;
        let nr = (n * TILE_ROWS).min(w.rows - r0);
        dequant_rows(isa, w, r0, nr, &mut wbuf);
        // Rows past the matrix compute zeros and are not written.
        wbuf[nr * k..].iter_mut().for_each(|v| *v = 0.0);
        gemm_group(isa, &wbuf, n, k, xt, width, &mut cbuf);
        for (i, c) in cbuf.chunks_exact(TILE_ROWS * width).take(n).enumerate() {
            let r0 = r0 + i * TILE_ROWS;
            let nr = TILE_ROWS.min(w.rows - r0);
            // The tile is [row][activation]; outputs are [activation][row]: 6 values a run.
            for j in 0..m {
                if nr == TILE_ROWS {
                    let mut run = [0f32; TILE_ROWS];
                    for (r, v) in run.iter_mut().enumerate() {
                        *v = c[r * width + j];
                    }
                    out.set_run(j, r0, &run);
                } else {
                    for r in 0..nr {
                        out.set(j, r0 + r, c[r * width + j]);
                    }
                }
            }
        }
    }
}

fn gemm_tile_scalar(w: &[f32], k: usize, xt: &[f32], width: usize, c: &mut [f32]) {
    for r in 0..TILE_ROWS {
        for j in 0..width {
            let mut acc = 0f32;
            for kk in 0..k {
                acc = w[r * k + kk].mul_add(xt[kk * width + j], acc);
            }
            c[r * width + j] = acc;
        }
    }
}
