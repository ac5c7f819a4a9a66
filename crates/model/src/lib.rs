//! Tessera's model engine: loaders (safetensors folders and GGUF files), tokenizers, one
//! shard's slice of every layer on Burn, sampling, and generation.

pub mod chat;
pub mod cpu;
pub mod engine;
pub mod error;
pub mod gguf;
#[cfg(feature = "wgpu")]
mod gpu;
pub mod linear;
pub mod loader;
pub mod ops;
pub mod requant;
pub mod sampling;
pub mod shard;
pub mod spm;
pub mod tokenizer;
pub mod weights;

pub use engine::{
    Backend, CommStats, Finish, GenStats, GenerateParams, LocalCluster, Pick, Runner, check_step,
    check_steps, gather_logits, generate,
};
pub use error::{ModelError, Result};
#[cfg(feature = "wgpu")]
pub use gpu::{count_launches, probe};
pub use loader::{ModelFiles, sha256_file};
pub use sampling::{
    Candidates, Draw, MAX_CANDIDATES, MAX_LOGPROBS, NUCLEUS_CANDIDATES, Sampler, SamplingParams,
    TokenLogprobs, TopSpec, Want, candidates,
};
pub use shard::{Picked, Precision, SeqStep, ShardModel, shard_reads};
pub use tokenizer::{TextStream, Tokenizer};
