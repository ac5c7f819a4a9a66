//! `tessera plan`: what each worker would hold, before anything is loaded.

use clap::Args;
use tessera_core::allreduce_bytes_per_token;
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
    /// Context length to size the KV cache for (default: the model's)
    #[arg(long)]
    context: Option<usize>,
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
    let ctx = a.context.unwrap_or(cfg.max_context);
    println!(
        "model: {} ({}), {} layers, hidden {}, {} heads / {} KV heads of {}, FFN {}, vocab {}, context {ctx}",
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
    println!(
        "weights are held in the file's formats ({}); the KV cache is f32",
        files.format
    );
    println!(
        "all-reduce per token: {} bytes per worker ({} all-reduces of {} values)",
        allreduce_bytes_per_token(cfg, 4),
        2 * cfg.layers + 1,
        cfg.hidden
    );
    let mut all_fit = true;
    for s in &plan.shards {
        let c = s.cost(cfg, 4);
        let weights = files.shard_bytes(s)?;
        let kv_full = c.kv_bytes_per_token * ctx as u64;
        let need = (weights + kv_full) as f64;
        let fit = memory.get(s.rank).map(|m| need <= m * GIB);
        all_fit &= fit.unwrap_or(true);
        println!(
            "worker {}: q heads {:?}, KV heads {:?}, FFN columns {:?}, vocab rows {:?}\n  weights {:.1} MiB, KV cache {} B/token = {:.1} MiB at {ctx} tokens, total {:.1} MiB{}",
            s.rank,
            s.q_heads,
            s.kv_heads,
            s.ffn,
            s.vocab,
            weights as f64 / (1 << 20) as f64,
            c.kv_bytes_per_token,
            kv_full as f64 / (1 << 20) as f64,
            need / (1 << 20) as f64,
            match fit {
                Some(true) => format!(", fits in {:.1} GiB", memory[s.rank]),
                Some(false) => format!(", DOES NOT FIT in {:.1} GiB", memory[s.rank]),
                None => String::new(),
            }
        );
    }
    if !all_fit {
        anyhow::bail!("the plan does not fit in the memory given");
    }
    Ok(())
}
