//! Every format x every instruction set this machine has (scalar included) x both precisions,
//! against dequantize-then-f64 products, on random blocks, odd row counts and batches of 1..17.

use half::{bf16, f16};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tessera_quant::*;

/// A random `rows x cols` matrix of `ty` with finite, modest scales.
fn random_matrix(ty: GgmlType, rows: usize, cols: usize, rng: &mut ChaCha8Rng) -> Vec<u8> {
    let n = ty.row_bytes(cols).unwrap() * rows;
    let mut data: Vec<u8> = (0..n).map(|_| rng.random()).collect();
    match ty {
        GgmlType::F32 => {
            for c in data.chunks_exact_mut(4) {
                c.copy_from_slice(&rng.random_range(-1.0f32..1.0).to_le_bytes());
            }
        }
        GgmlType::F16 => {
            for c in data.chunks_exact_mut(2) {
                c.copy_from_slice(&f16::from_f32(rng.random_range(-1.0..1.0)).to_le_bytes());
            }
        }
        GgmlType::BF16 => {
            for c in data.chunks_exact_mut(2) {
                c.copy_from_slice(&bf16::from_f32(rng.random_range(-1.0..1.0)).to_le_bytes());
            }
        }
        _ => {
            for blk in data.chunks_exact_mut(ty.block_bytes()) {
                for &at in ty.f16_fields() {
                    let v = f16::from_f32(rng.random_range(-0.05..0.05));
                    blk[at..at + 2].copy_from_slice(&v.to_le_bytes());
                }
            }
        }
    }
    data
}

fn dequant_matrix(ty: GgmlType, data: &[u8], rows: usize, cols: usize) -> Vec<f32> {
    let mut w = vec![0f32; rows * cols];
    dequantize(ty, data, &mut w);
    w
}

/// `x · Wᵀ` in f64.
fn reference(w: &[f32], x: &[f32], rows: usize, cols: usize, n: usize) -> Vec<f64> {
    let mut y = vec![0f64; n * rows];
    for b in 0..n {
        for r in 0..rows {
            y[b * rows + r] = (0..cols)
                .map(|k| w[r * cols + k] as f64 * x[b * cols + k] as f64)
                .sum();
        }
    }
    y
}

/// The activations the fast path really multiplies: each row quantized and dequantized.
fn quantized_inputs(x: &[f32], n: usize, cols: usize) -> Vec<f32> {
    let a = QActs::quantize(x, n, cols);
    (0..n * cols).map(|i| a.value(i)).collect()
}

fn check(ty: GgmlType, rows: usize, cols: usize, n: usize, seed: u64) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let data = random_matrix(ty, rows, cols, &mut rng);
    let w = dequant_matrix(ty, &data, rows, cols);
    let x: Vec<f32> = (0..n * cols).map(|_| rng.random_range(-2.0..2.0)).collect();
    let exact = reference(&w, &x, rows, cols, n);
    let fast_ref = if ty.is_dense() {
        exact.clone()
    } else {
        reference(&w, &quantized_inputs(&x, n, cols), rows, cols, n)
    };
    let m = QMatrix::new(ty, rows, cols, &data).unwrap();
    let scale: f64 = exact.iter().map(|v| v.abs()).fold(1e-3, f64::max);
    for isa in Isa::available() {
        for prec in [Precision::Exact, Precision::Fast] {
            let mut y = vec![f32::NAN; n * rows];
            matmul_group(&[m], &x, n, &mut [&mut y], prec, isa);
            let want = if prec == Precision::Fast && !ty.is_dense() {
                &fast_ref
            } else {
                &exact
            };
            for (i, (got, want)) in y.iter().zip(want).enumerate() {
                let err = (*got as f64 - want).abs();
                assert!(
                    err <= 1e-5 * scale + 1e-5 * want.abs(),
                    "{} {} {prec:?}: {rows}x{cols}, batch {n}: y[{}][{}] = {got}, want {want} (err {err})",
                    ty.name(),
                    isa.name(),
                    i / rows,
                    i % rows
                );
            }
            // The fast path stays close to the true product too (activation rounding only).
            if prec == Precision::Fast {
                for (got, want) in y.iter().zip(&exact) {
                    assert!(
                        (*got as f64 - want).abs() <= 0.02 * scale,
                        "{} {}: fast path far from the exact product",
                        ty.name(),
                        isa.name()
                    );
                }
            }
        }
    }
}

#[test]
fn every_format_every_isa_every_batch() {
    for (i, ty) in ALL_TYPES.iter().enumerate() {
        let cols = if ty.block_values() == 256 { 512 } else { 96 };
        for n in 1..=17 {
            check(*ty, 7, cols, n, 1000 * i as u64 + n as u64);
        }
        // Rows that fill whole tiles, and a wide row.
        check(*ty, 16, cols * 2, 5, 77 + i as u64);
    }
}

/// Prompt rows take a GEMM: on the exact path the f32 GEMM, within f32 rounding of the exact
/// product; on the fast path the integer GEMM where VNNI runs (activations rounded to
/// 15 bits a 32-value group, so within 1e-4 of the product's scale) and the f32 GEMM elsewhere.
/// Every format and instruction set, batches of 1..40 rows (tiles of 6 and 32 weight rows and
/// 6, 16 and 32 activation rows, with their edges), mixed with rows that take the precision's
/// kernel.
#[test]
fn prompt_rows_take_a_gemm() {
    for (i, ty) in ALL_TYPES.iter().enumerate() {
        let (rows, cols) = (13, if ty.block_values() == 256 { 256 } else { 96 });
        let mut rng = ChaCha8Rng::seed_from_u64(300 + i as u64);
        let data = random_matrix(*ty, rows, cols, &mut rng);
        let w = dequant_matrix(*ty, &data, rows, cols);
        let m = QMatrix::new(*ty, rows, cols, &data).unwrap();
        for n in [1, 5, 17, 33, 40] {
            let x: Vec<f32> = (0..n * cols).map(|_| rng.random_range(-2.0..2.0)).collect();
            let exact = reference(&w, &x, rows, cols, n);
            let scale: f64 = exact.iter().map(|v| v.abs()).fold(1e-3, f64::max);
            // Every third row is not a prompt's.
            let prompt: Vec<bool> = (0..n).map(|b| b % 3 != 2).collect();
            for (isa, prec) in Isa::available()
                .into_iter()
                .flat_map(|i| [(i, Precision::Exact), (i, Precision::Fast)])
            {
                let mut y = vec![f32::NAN; n * rows];
                matmul_rows(&[m], &x, n, &mut [&mut y], prec, isa, &prompt);
                let bound = if prec == Precision::Fast { 1e-4 } else { 1e-5 };
                for (j, (got, want)) in y.iter().zip(&exact).enumerate() {
                    if !prompt[j / rows] && prec == Precision::Fast {
                        continue; // the fast kernel's rows: see every_format_every_isa_every_batch
                    }
                    assert!(
                        (*got as f64 - want).abs() <= bound * scale,
                        "{} {} {prec:?} batch {n}: y[{}][{}] = {got}, want {want}",
                        ty.name(),
                        isa.name(),
                        j / rows,
                        j % rows
                    );
                }
            }
        }
    }
}

/// A prompt row's result does not depend on the other rows (how many, which kind), on either
/// path; the f32 GEMM gives the same bits on every instruction set (one FMA chain per output, in
/// the same order), and so does the fast path wherever it takes the f32 GEMM.
#[test]
fn prompt_rows_are_independent_of_their_batch() {
    let mut rng = ChaCha8Rng::seed_from_u64(41);
    for ty in [
        GgmlType::Q4_1,
        GgmlType::Q4_K,
        GgmlType::Q6_K,
        GgmlType::F16,
    ] {
        let (rows, cols) = (40, 256);
        let data = random_matrix(ty, rows, cols, &mut rng);
        let m = QMatrix::new(ty, rows, cols, &data).unwrap();
        let x: Vec<f32> = (0..37 * cols)
            .map(|_| rng.random_range(-1.0..1.0))
            .collect();
        let mut first: Option<Vec<f32>> = None;
        for isa in Isa::available() {
            let mut by_prec = Vec::new();
            for prec in [Precision::Exact, Precision::Fast] {
                let all_prompt = vec![true; 37];
                let mut all = vec![0f32; 37 * rows];
                matmul_rows(&[m], &x, 37, &mut [&mut all], prec, isa, &all_prompt);
                for b in [0, 17, 36] {
                    let mut one = vec![0f32; rows];
                    matmul_rows(
                        &[m],
                        &x[b * cols..(b + 1) * cols],
                        1,
                        &mut [&mut one],
                        prec,
                        isa,
                        &[true],
                    );
                    assert_eq!(
                        one,
                        all[b * rows..(b + 1) * rows],
                        "{} {} {prec:?}: row {b}",
                        ty.name(),
                        isa.name()
                    );
                }
                by_prec.push(all);
            }
            let int_gemm = matches!(isa, Isa::Avx512 | Isa::AvxVnni) && !ty.is_dense();
            assert_eq!(
                by_prec[0] != by_prec[1],
                int_gemm,
                "{} {}: the fast path's prompt rows take the integer GEMM iff VNNI runs",
                ty.name(),
                isa.name()
            );
            match &first {
                Some(f) => assert_eq!(
                    f,
                    &by_prec[0],
                    "{} {}: the f32 GEMM differs across ISAs",
                    ty.name(),
                    isa.name()
                ),
                None => first = Some(by_prec[0].clone()),
            }
        }
    }
}

#[test]
fn dense_rows_of_any_length() {
    for ty in [GgmlType::F32, GgmlType::F16, GgmlType::BF16] {
        for cols in [1, 31, 33, 64, 100] {
            check(ty, 5, cols, 3, cols as u64);
        }
    }
}

/// A sequence's outputs do not depend on what else is in its batch: row b of a batch equals
/// the same row computed alone, bit for bit, on every instruction set and both precisions.
#[test]
fn batch_invariance() {
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    for ty in ALL_TYPES {
        let (rows, cols) = (13, if ty.block_values() == 256 { 256 } else { 64 });
        let data = random_matrix(ty, rows, cols, &mut rng);
        let m = QMatrix::new(ty, rows, cols, &data).unwrap();
        let n = 11;
        let x: Vec<f32> = (0..n * cols).map(|_| rng.random_range(-1.0..1.0)).collect();
        for isa in Isa::available() {
            for prec in [Precision::Exact, Precision::Fast] {
                let mut all = vec![0f32; n * rows];
                matmul_group(&[m], &x, n, &mut [&mut all], prec, isa);
                for b in 0..n {
                    let mut one = vec![0f32; rows];
                    let xb = &x[b * cols..(b + 1) * cols];
                    matmul_group(&[m], xb, 1, &mut [&mut one], prec, isa);
                    assert_eq!(
                        one,
                        all[b * rows..(b + 1) * rows],
                        "{} {} {prec:?}: row {b} differs alone and in a batch",
                        ty.name(),
                        isa.name()
                    );
                }
            }
        }
    }
}

/// A group of matrices with one input equals each matrix alone.
#[test]
fn groups_equal_single_matrices() {
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    let cols = 256;
    let types = [GgmlType::Q4_K, GgmlType::Q6_K, GgmlType::Q8_0];
    let datas: Vec<Vec<u8>> = types
        .iter()
        .map(|t| random_matrix(*t, 9, cols, &mut rng))
        .collect();
    let ms: Vec<QMatrix> = types
        .iter()
        .zip(&datas)
        .map(|(t, d)| QMatrix::new(*t, 9, cols, d).unwrap())
        .collect();
    let x: Vec<f32> = (0..3 * cols).map(|_| rng.random_range(-1.0..1.0)).collect();
    let isa = Isa::best();
    let mut ys = vec![vec![0f32; 27]; 3];
    {
        let mut refs: Vec<&mut [f32]> = ys.iter_mut().map(|y| y.as_mut_slice()).collect();
        matmul_group(&ms, &x, 3, &mut refs, Precision::Fast, isa);
    }
    for (m, y) in ms.iter().zip(&ys) {
        let mut one = vec![0f32; 27];
        matmul_group(&[*m], &x, 3, &mut [&mut one], Precision::Fast, isa);
        assert_eq!(&one, y);
    }
}

#[test]
fn shapes_are_checked() {
    assert!(QMatrix::new(GgmlType::Q4_0, 2, 31, &[0; 36]).is_err());
    assert!(QMatrix::new(GgmlType::Q4_0, 2, 32, &[0; 35]).is_err());
    assert!(QMatrix::new(GgmlType::Q4_0, 2, 32, &[0; 36]).is_ok());
    assert!(QMatrix::new(GgmlType::Q6_K, usize::MAX / 2, 256, &[]).is_err());
}

/// The kernels without VNNI (`vpmaddubsw` + `vpmaddwd`) sum the same integers as those with it
/// (`vpdpbusd`), at either width, so a Skylake-SP worker and an Ice Lake one, or a Zen 3 and an
/// Alder Lake one, give the same bits: every format, decode rows and small batches, whole and
/// half pairs of 32-blocks. Each pair needs a machine with its VNNI instruction set; where one
/// is missing the test says so.
#[test]
fn kernels_without_vnni_give_the_vnni_kernels_bits() {
    let avail = Isa::available();
    for (with_vnni, without) in [(Isa::Avx512, Isa::Avx512Bw), (Isa::AvxVnni, Isa::Avx2)] {
        if !(avail.contains(&with_vnni) && avail.contains(&without)) {
            eprintln!(
                "skipped {} against {}: this machine lacks one of them",
                without.name(),
                with_vnni.name()
            );
            continue;
        }
        for (i, ty) in ALL_TYPES.iter().enumerate() {
            if ty.is_dense() {
                continue;
            }
            // 7 chunks a row: three whole pairs and a half one (256-value formats: two blocks).
            let cols = if ty.block_values() == 256 { 512 } else { 224 };
            let mut rng = ChaCha8Rng::seed_from_u64(500 + i as u64);
            let data = random_matrix(*ty, 11, cols, &mut rng);
            let m = QMatrix::new(*ty, 11, cols, &data).unwrap();
            for n in [1, 2, 5] {
                let x: Vec<f32> = (0..n * cols).map(|_| rng.random_range(-3.0..3.0)).collect();
                let run = |isa| {
                    let mut y = vec![f32::NAN; n * 11];
                    matmul_group(&[m], &x, n, &mut [&mut y], Precision::Fast, isa);
                    y
                };
                let (a, b) = (run(with_vnni), run(without));
                let same = a.iter().zip(&b).all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(
                    same,
                    "{} against {}, {} batch {n}: {a:?} != {b:?}",
                    without.name(),
                    with_vnni.name(),
                    ty.name()
                );
            }
        }
    }
}
