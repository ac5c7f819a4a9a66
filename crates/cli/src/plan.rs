//! `tessera plan`: what each worker would hold, before anything is loaded.

use clap::Args;
use tessera_core::{WorkerNeed, allreduce_bytes_per_token};
use tessera_model::ModelFiles;

#[derive(Args)]
pub struct PlanArgs {
    /// Model folder, .gguf file, or a pulled model's name
    #[arg(long, short = 'm')]
    model: String,
    /// Number of workers
    #[arg(long)]
    workers: usize,
    /// Memory each worker offers, in GiB, comma-separated (one value for all, or one per worker);
    /// the plan weights shard sizes by it
    #[arg(long, value_delimiter = ',')]
    memory: Vec<f64>,
    /// Size the KV cache for one sequence of this many tokens (default: the positions the
    /// coordinator's --kv-cache-gib lets all sequences reserve)
    #[arg(long)]
    context: Option<usize>,
    /// The coordinator's KV cache budget over the cluster, in GiB (as `coordinator --kv-cache-gib`)
    #[arg(long, default_value_t = 2.0)]
    kv_cache_gib: f64,
    /// The links between the workers, RATE,LATENCY (e.g. 1gbit,0.2ms): adds their cost to the
    /// decode estimate
    #[arg(long)]
    network: Option<tessera_core::Link>,
    /// Memory bandwidth of each worker in GB/s (default: measured on this machine)
    #[arg(long)]
    bandwidth: Option<f64>,
    /// Plan for the exact path (the coordinator's --exact), whose KV cache is f32 (the fast
    /// path's is f16 on quantized weights)
    #[arg(long)]
    exact: bool,
    /// What the KV cache holds, f32 or f16, as the coordinator's --kv-cache (default: the
    /// path's)
    #[arg(long, env = "TESSERA_KV")]
    kv_cache: Option<tessera_core::CacheType>,
}

const GIB: f64 = (1u64 << 30) as f64;

pub fn run(a: PlanArgs) -> anyhow::Result<()> {
    let path = crate::resolve_model(&a.model)?;
    let files = ModelFiles::open(&path)?;
    let cfg = &files.cfg;
    let memory: Vec<f64> = match a.memory.len() {
        0 => vec![],
        1 => vec![a.memory[0]; a.workers],
        n if n == a.workers => a.memory.clone(),
        n => anyhow::bail!("--memory has {n} values for {} workers", a.workers),
    };
    let plan = if memory.is_empty() {
        files.plan(&vec![1.0; a.workers])?
    } else {
        files.plan(&memory)?
    };
    // The same positions the coordinator's scheduler lets sequences reserve.
    let cache = files.cache_type(tessera_model::Precision::of(a.exact), a.kv_cache);
    let per_position = cache.bytes_per_position(cfg) as f64;
    let ctx = a
        .context
        .unwrap_or((a.kv_cache_gib * GIB / per_position) as usize);
    println!(
        "model: {} ({}), {} layers, hidden {}, {} heads / {} KV heads of {}, FFN {}, vocab {}, KV cache sized for {ctx} positions",
        path.display(),
        files.format,
        cfg.layers,
        cfg.hidden,
        cfg.heads,
        cfg.kv_heads,
        cfg.head_dim,
        cfg.intermediate,
        cfg.vocab
    );
    let (total, active) = (cfg.param_count(), cfg.active_param_count());
    // Each worker's weight bytes, held and read per token (every figure below uses these).
    let mut held = Vec::with_capacity(plan.shards.len());
    let mut read = Vec::with_capacity(plan.shards.len());
    for s in &plan.shards {
        held.push(files.shard_bytes(s)?);
        read.push(files.shard_bytes_read(s)?);
    }
    println!(
        "parameters: {:.1} M in all, {:.1} M read per token{}; weight bytes: {:.1} MiB held, {:.1} MiB read per token (all workers)",
        total as f64 / 1e6,
        active as f64 / 1e6,
        match &cfg.opts.moe {
            Some(m) => format!(" ({} of {} experts per token)", m.top_k, m.experts),
            None => String::new(),
        },
        held.iter().sum::<u64>() as f64 / (1 << 20) as f64,
        read.iter().sum::<u64>() as f64 / (1 << 20) as f64,
    );
    println!(
        "weights are held in the file's formats ({}); the KV cache is {}",
        files.format,
        cache.name()
    );
    println!(
        "all-reduce per token: {} bytes per worker ({} all-reduces of {} values)",
        allreduce_bytes_per_token(cfg, 4),
        2 * cfg.layers + 1,
        cfg.hidden
    );
    let mut all_fit = true;
    for s in &plan.shards {
        let c = s.cost(cfg, cache.bytes());
        let weights = held[s.rank];
        let kv_full = c.kv_bytes_per_token * ctx as u64;
        let need = WorkerNeed::new(weights, c.kv_bytes_per_token, ctx as u64);
        let offered = memory.get(s.rank).map(|m| (m * GIB) as u64);
        let fit = offered.map(|o| need.shortfall(o).is_none());
        all_fit &= fit.unwrap_or(true);
        println!(
            "worker {}: q heads {:?}, KV heads {:?}, FFN columns {:?}, vocab rows {:?}\n  weights {:.1} MiB, KV cache {} B/token = {:.1} MiB at {ctx} tokens, process {:.1} MiB: needs {:.1} MiB{}",
            s.rank,
            s.q_heads,
            s.kv_heads,
            s.ffn,
            s.vocab,
            weights as f64 / (1 << 20) as f64,
            c.kv_bytes_per_token,
            kv_full as f64 / (1 << 20) as f64,
            need.process as f64 / (1 << 20) as f64,
            need.total() as f64 / (1 << 20) as f64,
            match (fit, offered) {
                (Some(true), _) => format!(", fits in {:.2} GiB", memory[s.rank]),
                (Some(false), Some(o)) => format!(
                    ", DOES NOT FIT in {:.2} GiB: {:.1} MiB short",
                    memory[s.rank],
                    need.shortfall(o).unwrap_or(0) as f64 / (1 << 20) as f64
                ),
                _ => String::new(),
            }
        );
    }
    // Decode speed from the seed's formulas: the slowest worker's bytes over memory bandwidth,
    // plus 2 x layers (+1) all-reduces of latency + bytes / rate, plus the coordinator's round
    // trip.
    let bw = match a.bandwidth {
        Some(gb) => gb * 1e9,
        None => crate::bench::memory_bandwidth(256).0,
    };
    let e = tessera_core::DecodeEstimate::new(cfg, &read, bw, a.network);
    println!(
        "decode estimate: {:.1} tok/s = {:.2} ms reading weights ({:.1} MB on the busiest worker at {:.1} GB/s{}) + {:.2} ms on the network{} ({:.0}% of a step)",
        e.tokens_per_second(),
        e.compute_seconds * 1e3,
        read.iter().copied().max().unwrap_or(0) as f64 / 1e6,
        bw / 1e9,
        if a.bandwidth.is_some() {
            ""
        } else {
            ", measured here"
        },
        e.network_seconds * 1e3,
        match a.network {
            Some(l) => format!(
                " ({} all-reduces and the coordinator's round trip over {:.0} Mbit/s links, \
                 {:.3} ms latency)",
                if a.workers > 1 { 2 * cfg.layers + 1 } else { 0 },
                l.bits_per_second / 1e6,
                l.latency_seconds * 1e3
            ),
            None if a.workers > 1 => " (no --network given: links not counted)".into(),
            None => String::new(),
        },
        100.0 * e.network_share()
    );
    if !all_fit {
        anyhow::bail!("the plan does not fit in the memory given");
    }
    Ok(())
}
