//! GGML weight formats kept in their blocks, and the CPU kernels that multiply by them.
//!
//! - [`format`]: block layouts of F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K..Q6_K,
//!   IQ4_NL and IQ4_XS, and dequantization bit-identical to ggml's.
//! - [`act`]: activation rows quantized once (two 8-bit planes per 16 values) for the integer
//!   kernels.
//! - [`kernel`]: `y = x · Wᵀ` for a batch of rows, on threads, in two precisions (quantized
//!   activations, or f32 activations against weights dequantized in registers), with the
//!   instruction set chosen at run time (scalar, AVX2, AVX-VNNI, AVX-512 with or without VNNI);
//!   a prompt's rows through a GEMM: 16-bit integers on the fast path where VNNI runs
//!   (`igemm`), else f32 over dequantized tiles (`gemm`).
//! - [`quantize`]: f32 rows into GGML blocks, for requantizing model files.
//!
//! No dependency on Burn: the model crate calls these kernels behind its `Linear` seam.

pub mod act;
pub mod format;
mod gemm;
mod igemm;
pub mod kernel;
pub mod pool;
pub mod quantize;
mod scalar;
pub mod vecops;
#[cfg(target_arch = "x86_64")]
mod x86;

pub use act::QActs;
pub use format::{ALL_TYPES, Chunk, GgmlType, decode_chunk, dequantize};
pub use kernel::{Isa, Precision, QMatrix, matmul, matmul_group, matmul_rows};
pub use pool::{in_pool, install, set_threads, threads};
