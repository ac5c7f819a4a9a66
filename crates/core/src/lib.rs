//! Tessera core: model configuration, the tensor-parallel shard plan and the memory planner.
//!
//! Nothing here touches tensors or the network, so every number a plan prints can be checked
//! by unit tests and by `tessera plan` before a single weight is loaded.

pub mod config;
pub mod mem;
pub mod plan;

pub use config::{
    Activation, Arch, ConfigError, LayerOptions, ModelConfig, MoeConfig, RopePrecision, RopeScaling,
};
pub use plan::{
    CacheType, DecodeEstimate, Link, PlanError, ShardCost, ShardPlan, ShardSpec,
    WORKER_OVERHEAD_BYTES, WorkerNeed, allreduce_bytes_per_token, split_even, split_weighted,
};
