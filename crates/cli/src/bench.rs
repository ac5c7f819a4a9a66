//! `tessera bench`: prefill and decode speed over a fixed prompt, the weight bytes each decoded
//! token reads, and how much of this machine's memory bandwidth (measured in the same run by a
//! plain streaming read) decode reaches.

use crate::{ModelArgs, load};
use clap::Args;
use std::time::Instant;
use tessera_model::{Backend, GenerateParams, LocalCluster, Runner, generate};

#[derive(Args)]
pub struct BenchArgs {
    /// Model folder, .gguf file, or a pulled model's name
    #[arg(
        long = "model",
        short = 'm',
        required_unless_present_any = ["collective", "coordinator", "kernels"]
    )]
    model_name: Option<String>,
    /// How many tensor-parallel shards to split the model into
    #[arg(long, default_value_t = 1)]
    shards: usize,
    /// Where the tensors live: cpu (Burn flex) or wgpu (Vulkan/Metal/DX12 GPU)
    #[arg(long, default_value = "cpu")]
    backend: tessera_model::Backend,
    #[command(flatten)]
    compute: crate::ComputeArgs,
    /// The model options above, once parsed.
    #[arg(skip)]
    model: Option<ModelArgs>,
    /// Measure the all-reduce alone: p50/p99 latency per vector length (576, 4096, 16384 and
    /// 1M floats) between --workers processes on loopback (this one and --workers - 1 it
    /// starts), and GB/s for the large ones
    #[arg(long)]
    collective: bool,
    /// With --collective: the endpoints are threads of this process, each with its own QUIC
    /// socket on loopback, instead of separate processes
    #[arg(long, requires = "collective")]
    in_process: bool,
    /// Prompt length in tokens (prefill)
    #[arg(long, default_value_t = 128)]
    prompt_tokens: usize,
    /// Tokens to decode
    #[arg(long, default_value_t = 64)]
    gen_tokens: usize,
    /// Use this text as the prompt (as it tokenizes) instead of --prompt-tokens of the built-in
    /// text: to time the same prompt as another program
    #[arg(long)]
    prompt: Option<String>,
    /// Measured runs (the best is reported); one warm-up run comes first
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Size of the buffer for the bandwidth measurement, in MiB (larger than the caches); with
    /// --kernels, of the copies of the matrix taken in turn
    #[arg(long, default_value_t = 2048)]
    bandwidth_mib: usize,
    /// Run the model on this many worker processes (a local cluster over gRPC and QUIC)
    /// instead of shards in this process
    #[arg(long)]
    workers: Option<usize>,
    /// With --workers: concurrent streams to measure aggregate throughput at (for example
    /// 1,4,16); each stream gets its own prompt, and the scheduler batches them
    #[arg(long, value_delimiter = ',', requires = "workers")]
    concurrency: Vec<usize>,
    /// With --workers: how the workers send each other partial sums (f32, bf16 or q8)
    #[arg(long, default_value = "f32", requires = "workers")]
    wire: tessera_collective::Wire,
    /// Measure a running cluster through its coordinator (HOST:PORT) instead of starting one:
    /// for clusters across machines, or across deploy/netem's emulated links
    #[arg(long, conflicts_with_all = ["workers", "collective"])]
    coordinator: Option<String>,
    /// The cluster token, with --coordinator
    #[arg(long, env = "TESSERA_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Time the decode mat-vec kernels alone, without a model: a 14336 x 4096 matrix (Llama 3
    /// 8B's gate) in Q4_0, Q8_0, Q4_K and Q6_K times one activation row on --backend, as GB/s
    /// of weights read: on the CPU beside the memory bandwidth; on wgpu with each product's
    /// input the RMSNorm of the last one's output (as in a decode step), and the cost of a
    /// kernel launch and of a readback
    #[arg(long, conflicts_with_all = ["collective", "coordinator", "workers"])]
    kernels: bool,
    /// Also print the results as one JSON object, as the last line of stdout
    #[arg(long)]
    json: bool,
}

const TEXT: &str = "Tessera splits a large language model across several ordinary machines. \
    Each worker holds a slice of every layer and the workers sum their partial results after \
    the attention and the feed-forward blocks. Decoding reads every weight once per token, so \
    memory bandwidth bounds its speed, while prefill is bound by arithmetic. ";

/// Best-of-three streaming read of `mib` MiB with one thread per core; bytes per second.
pub fn memory_bandwidth(mib: usize) -> (f64, usize) {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let words = mib * 1024 * 1024 / 8;
    let buf: Vec<u64> = (0..words as u64).collect();
    let chunk = words.div_ceil(threads);
    let mut best = 0f64;
    for _ in 0..3 {
        let t = Instant::now();
        let total: u64 = std::thread::scope(|s| {
            let hs: Vec<_> = buf
                .chunks(chunk)
                .map(|c| s.spawn(move || c.iter().fold(0u64, |a, &x| a.wrapping_add(x))))
                .collect();
            hs.into_iter()
                .map(|h| h.join().unwrap())
                .fold(0u64, u64::wrapping_add)
        });
        std::hint::black_box(total);
        best = best.max((words * 8) as f64 / t.elapsed().as_secs_f64());
    }
    (best, threads)
}

pub fn run(mut a: BenchArgs) -> anyhow::Result<()> {
    let report = if a.kernels {
        run_kernels(&a)?
    } else if a.collective {
        run_collective(a.workers.unwrap_or(2), a.in_process)?
    } else if let Some(addr) = a.coordinator.clone() {
        run_remote(&a, &addr)?
    } else {
        a.model = Some(ModelArgs {
            model: a.model_name.clone().unwrap_or_default(),
            shards: a.shards,
            backend: a.backend,
            compute: a.compute.clone(),
        });
        match a.workers {
            Some(n) => run_cluster(&a, n)?,
            None => run_local(&a)?,
        }
    };
    if a.json {
        println!("{report}");
    }
    Ok(())
}

/// `--kernels`: the matrix shape and the formats it times.
const KERNEL_SHAPE: (usize, usize) = (14336, 4096);
const KERNEL_TYPES: [tessera_quant::GgmlType; 4] = {
    use tessera_quant::GgmlType::*;
    [Q4_0, Q8_0, Q4_K, Q6_K]
};

/// `--kernels`: the decode mat-vec alone, format by format, over copies of one random matrix
/// that together exceed the caches (`--bandwidth-mib`, 2 GiB unless told), so that every
/// product reads its weights from memory.
fn run_kernels(a: &BenchArgs) -> anyhow::Result<serde_json::Value> {
    let threads = a.compute.init_threads()?;
    let (rows, cols) = KERNEL_SHAPE;
    #[cfg(feature = "wgpu")]
    let device = match a.backend {
        Backend::Wgpu => Some(a.backend.device()?),
        Backend::Cpu => None,
    };
    let mut results = Vec::new();
    for (i, ty) in KERNEL_TYPES.into_iter().enumerate() {
        let row_bytes = ty
            .row_bytes(cols)
            .ok_or_else(|| anyhow::anyhow!("{cols} values are not whole {} blocks", ty.name()))?;
        // The weights `tessera synth` writes.
        let mut bytes = vec![0u8; rows * row_bytes];
        tessera_model::requant::random_rows(ty, cols, (1, i, 0), false, &mut bytes)
            .map_err(anyhow::Error::msg)?;
        let copies = (a.bandwidth_mib << 20).div_ceil(bytes.len()).max(2);
        let seconds = match a.backend {
            Backend::Cpu => cpu_matvec_seconds(ty, (rows, cols), &bytes, copies, a)?,
            #[cfg(feature = "wgpu")]
            Backend::Wgpu => tessera_model::probe::matvec_seconds(
                ty,
                (rows, cols),
                &bytes,
                copies,
                0.5,
                device.as_ref().expect("a wgpu device"),
            )?,
            #[cfg(not(feature = "wgpu"))]
            Backend::Wgpu => a.backend.device().map(|_| 0.0)?,
        };
        let gb_s = bytes.len() as f64 / seconds / 1e9;
        println!(
            "{} {rows} x {cols} ({:.1} MB) times one row: {:.1} us a product, {gb_s:.1} GB/s",
            ty.name(),
            bytes.len() as f64 / 1e6,
            seconds * 1e6
        );
        results.push(serde_json::json!({
            "format": ty.name(),
            "rows": rows,
            "cols": cols,
            "bytes": bytes.len(),
            "us_per_product": seconds * 1e6,
            "gb_s": gb_s,
        }));
    }
    // The host's bandwidth on the CPU; on a GPU, the cost of a launch and of a readback (its
    // memory bandwidth is the card's figure: a probe through Burn's own kernels misread it).
    let (bandwidth, fixed) = match a.backend {
        Backend::Cpu => {
            let (bw, t) = memory_bandwidth(a.bandwidth_mib);
            println!(
                "memory bandwidth: {:.1} GB/s (streaming read of {} MiB, {t} threads)",
                bw / 1e9,
                a.bandwidth_mib
            );
            (Some(bw), None)
        }
        #[cfg(feature = "wgpu")]
        Backend::Wgpu => {
            let d = device.as_ref().expect("a wgpu device");
            let (launch, trip) = tessera_model::probe::fixed_seconds(d, 2000);
            println!(
                "a small kernel queued behind the last: {:.1} us; a launch and a readback: {:.1} us",
                launch * 1e6,
                trip * 1e6
            );
            (None, Some((launch, trip)))
        }
        #[cfg(not(feature = "wgpu"))]
        Backend::Wgpu => anyhow::bail!("this build of tessera has no wgpu support"),
    };
    if let Some(bw) = bandwidth {
        for r in results.iter_mut() {
            let share = r["gb_s"].as_f64().unwrap_or(0.0) * 1e9 / bw;
            r["bandwidth_fraction"] = serde_json::json!(share);
        }
    }
    Ok(serde_json::json!({
        "kernels": results,
        "backend": a.backend.name(),
        "precision": if a.compute.exact { "exact" } else { "fast" },
        "threads": threads,
        "memory_bandwidth_gb_s": bandwidth.map(|b| b / 1e9),
        "launch_us": fixed.map(|f| f.0 * 1e6),
        "round_trip_us": fixed.map(|f| f.1 * 1e6),
    }))
}

/// Seconds per CPU mat-vec (one row) of a `rows x cols` matrix of `ty` blocks, over `copies`
/// copies taken in turn: a warm-up round, then about half a second of products.
fn cpu_matvec_seconds(
    ty: tessera_quant::GgmlType,
    (rows, cols): (usize, usize),
    bytes: &[u8],
    copies: usize,
    a: &BenchArgs,
) -> anyhow::Result<f64> {
    let copies: Vec<Vec<u8>> = (0..copies).map(|_| bytes.to_vec()).collect();
    let ms = copies
        .iter()
        .map(|c| tessera_quant::QMatrix::new(ty, rows, cols, c))
        .collect::<Result<Vec<_>, String>>()
        .map_err(anyhow::Error::msg)?;
    let x: Vec<f32> = (0..cols)
        .map(|i| ((i * 7919) % 1009) as f32 / 504.5 - 1.0)
        .collect();
    let mut y = vec![0f32; rows];
    let prec = a.compute.precision();
    let t = Instant::now();
    for m in &ms {
        tessera_quant::matmul(m, &x, 1, &mut y, prec);
    }
    let each = t.elapsed().as_secs_f64() / ms.len() as f64;
    let iters = ((0.5 / each) as usize).clamp(ms.len(), 100 * ms.len());
    let t = Instant::now();
    for i in 0..iters {
        tessera_quant::matmul(&ms[i % ms.len()], &x, 1, &mut y, prec);
    }
    std::hint::black_box(&y);
    Ok(t.elapsed().as_secs_f64() / iters as f64)
}

const COLLECTIVE_LENS: [usize; 4] = [576, 4096, 16384, 1 << 20];

fn collective_plan() -> Vec<(usize, usize)> {
    tessera_collective::timing_plan(
        &COLLECTIVE_LENS,
        |len| if len >= 1 << 20 { 20 } else { 1000 },
    )
}

/// `--collective`: the all-reduce alone between `n` QUIC endpoints, threads of this process
/// (`--in-process`) or this process and `n - 1` children.
fn run_collective(n: usize, in_process: bool) -> anyhow::Result<serde_json::Value> {
    anyhow::ensure!(n >= 2, "--collective needs --workers 2 or more");
    let plan = collective_plan();
    let (timings, (lane_peers, shm_peers)) = if in_process {
        let (_nodes, mesh) = tessera_collective::local_mesh(n)?;
        let lanes = (mesh[0].lane_peers(), mesh[0].shm_peers());
        (tessera_collective::time_all_reduce(mesh, &plan)?, lanes)
    } else {
        collective_processes(n, &plan)?
    };
    let place = if in_process {
        "QUIC endpoints in this process"
    } else {
        "processes"
    };
    println!("all-reduce between {n} {place} (loopback), rank 0's latency:");
    println!(
        "  messages up to {} KiB through shared memory to {shm_peers} of {} peers, else by datagram lane to {lane_peers}, the rest by QUIC",
        tessera_collective::fast::MAX_BYTES >> 10,
        n - 1
    );
    let (mut p50, mut p99) = (serde_json::Map::new(), serde_json::Map::new());
    for t in &timings {
        println!(
            "  {:>8} floats: p50 {:>8.1} us, p99 {:>8.1} us, {:.2} GB/s",
            t.len, t.p50_us, t.p99_us, t.gb_s
        );
        p50.insert(t.len.to_string(), t.p50_us.into());
        p99.insert(t.len.to_string(), t.p99_us.into());
    }
    Ok(serde_json::json!({
        "collective": if in_process { "in-process" } else { "processes" },
        "workers": n,
        "lane_peers": lane_peers,
        "shm_peers": shm_peers,
        "p50_us": p50,
        "p99_us": p99,
        "gb_s": timings.iter().map(|t| (t.len.to_string(), t.gb_s.into())).collect::<serde_json::Map<_, _>>(),
    }))
}

const BENCH_TOKEN: &str = "tessera-bench-collective";

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> anyhow::Result<Vec<u8>> {
    anyhow::ensure!(s.len().is_multiple_of(2), "odd hex length");
    (0..s.len())
        .step_by(2)
        .map(|i| Ok(u8::from_str_radix(&s[i..i + 2], 16)?))
        .collect()
}

/// A node on loopback with a certificate from `ca`: (its key, certificate) for a child, or
/// the bound node for this process.
fn bench_identity(ca: &tessera_collective::ClusterCa) -> anyhow::Result<(Vec<u8>, Vec<u8>)> {
    let (key, spki) = tessera_collective::quic::generate_key()?;
    Ok((key, ca.issue(&spki, "bench")?))
}

fn bench_node(id: &tessera_collective::Identity) -> anyhow::Result<tessera_collective::QuicNode> {
    let node = tessera_collective::QuicNode::bind(
        "127.0.0.1:0".parse()?,
        tessera_collective::quic::token_proof(BENCH_TOKEN),
    )?;
    node.set_identity(id)?;
    Ok(node)
}

/// Rank 0 here, ranks 1.. in children (`tessera collective-peer`), which get their identity
/// on stdin, print their address, get every rank's address, and run the same timing plan.
fn collective_processes(
    n: usize,
    plan: &[(usize, usize)],
) -> anyhow::Result<(Vec<tessera_collective::Timing>, (usize, usize))> {
    use std::io::{BufRead, BufReader, Write};
    use std::process::{Command, Stdio};
    let ca = tessera_collective::ClusterCa::new()?;
    let (key, cert) = bench_identity(&ca)?;
    let node = bench_node(&tessera_collective::Identity {
        key_pkcs8: key,
        cert_der: cert,
        ca_der: ca.ca_der(),
    })?;
    let mut addrs = vec![node.local_addr()?];
    let mut children = Vec::new();
    for _ in 1..n {
        let mut child = Command::new(std::env::current_exe()?)
            .arg("collective-peer")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()?;
        let (key, cert) = bench_identity(&ca)?;
        let mut stdin = child.stdin.take().expect("piped");
        writeln!(stdin, "{} {} {}", hex(&key), hex(&cert), hex(&ca.ca_der()))?;
        let mut out = BufReader::new(child.stdout.take().expect("piped"));
        let mut line = String::new();
        out.read_line(&mut line)?;
        let addr = line
            .trim()
            .strip_prefix("addr ")
            .ok_or_else(|| anyhow::anyhow!("a peer process said {line:?}"))?
            .parse()?;
        addrs.push(addr);
        children.push((child, stdin, out));
    }
    let list: Vec<String> = addrs.iter().map(|a| a.to_string()).collect();
    for (rank, (_, stdin, _)) in children.iter_mut().enumerate() {
        writeln!(stdin, "{} {}", rank + 1, list.join(","))?;
    }
    let t = node.connect_mesh(1, 0, &addrs, std::time::Duration::from_secs(10))?;
    let lanes = (t.lane_peers(), t.shm_peers());
    let (times, mesh) = tessera_collective::time_rank(t, plan)?;
    for (mut child, stdin, mut out) in children {
        drop(stdin);
        let mut rest = String::new();
        std::io::Read::read_to_string(&mut out, &mut rest)?;
        let status = child.wait()?;
        anyhow::ensure!(status.success(), "a peer process failed: {status}");
    }
    drop(mesh);
    Ok((tessera_collective::summarize(plan, times), lanes))
}

/// `tessera collective-peer`: one child of `bench --collective`.
pub fn collective_peer() -> anyhow::Result<()> {
    use std::io::BufRead;
    let stdin = std::io::stdin();
    let mut lines = stdin.lock().lines();
    let mut next = || -> anyhow::Result<String> {
        lines
            .next()
            .ok_or_else(|| anyhow::anyhow!("stdin closed"))?
            .map_err(Into::into)
    };
    let id = next()?;
    let parts: Vec<&str> = id.split(' ').collect();
    anyhow::ensure!(parts.len() == 3, "expected key, certificate and CA");
    let node = bench_node(&tessera_collective::Identity {
        key_pkcs8: unhex(parts[0])?,
        cert_der: unhex(parts[1])?,
        ca_der: unhex(parts[2])?,
    })?;
    println!("addr {}", node.local_addr()?);
    let peers = next()?;
    let (rank, list) = peers
        .split_once(' ')
        .ok_or_else(|| anyhow::anyhow!("expected rank and addresses"))?;
    let addrs: Vec<std::net::SocketAddr> = list
        .split(',')
        .map(|a| a.parse())
        .collect::<Result<_, _>>()?;
    let t = node.connect_mesh(1, rank.parse()?, &addrs, std::time::Duration::from_secs(10))?;
    let (_, mesh) = tessera_collective::time_rank(t, &collective_plan())?;
    // Rank 0 closes our stdin when it has every result.
    let _ = next();
    drop(mesh);
    Ok(())
}

impl BenchArgs {
    fn m(&self) -> &ModelArgs {
        self.model.as_ref().expect("model options parsed")
    }
}

fn precision_name(a: &BenchArgs) -> &'static str {
    if a.m().compute.exact { "exact" } else { "fast" }
}

fn run_local(a: &BenchArgs) -> anyhow::Result<serde_json::Value> {
    let (files, mut cluster) = load(a.m())?;
    let threads = tessera_quant::threads();
    let mut prompt = Vec::new();
    match &a.prompt {
        Some(text) => prompt = files.tokenizer.encode(text)?,
        None => {
            while prompt.len() < a.prompt_tokens {
                prompt.extend(files.tokenizer.encode(TEXT)?);
            }
            prompt.truncate(
                a.prompt_tokens
                    .min(files.cfg.max_context.saturating_sub(a.gen_tokens))
                    .max(1),
            );
        }
    }
    let params = GenerateParams {
        max_tokens: a.gen_tokens,
        ignore_eos: true,
        ..Default::default()
    };
    let mut best_prefill = 0f64;
    let mut best_decode = 0f64;
    for run in 0..=a.runs {
        let stats = generate(&mut cluster, run as u64, &prompt, &params, &[], &mut |_| {
            true
        })?;
        if run > 0 {
            best_prefill = best_prefill.max(stats.prefill_tok_s());
            best_decode = best_decode.max(stats.decode_tok_s());
        }
    }
    let bytes = cluster.weight_bytes_per_token();
    let reached = bytes as f64 * best_decode;
    let launches = count_decode_launches(&mut cluster, a.m().backend, &prompt)?;
    println!(
        "model: {} ({}), {} shard(s) on {}, {} path, {threads} thread(s)",
        a.m().model,
        files.format,
        a.m().shards,
        a.m().backend.name(),
        precision_name(a),
    );
    println!("load: {:.2} s", cluster.load_time.as_secs_f64());
    print_speeds(prompt.len(), best_prefill, a.gen_tokens, best_decode);
    let cfg = &files.cfg;
    println!(
        "parameters: {:.1} M in all, {:.1} M read per token{}",
        cfg.param_count() as f64 / 1e6,
        cfg.active_param_count() as f64 / 1e6,
        match &cfg.opts.moe {
            Some(m) => format!(" ({} of {} experts)", m.top_k, m.experts),
            None => String::new(),
        }
    );
    println!(
        "weights read per token: {:.1} MB (in the file's formats)",
        bytes as f64 / 1e6
    );
    // What the last decode step read of the KV cache besides.
    let kv = cluster.cache_type();
    let kv_last = kv.bytes_per_position(cfg) * (prompt.len() + a.gen_tokens) as u64;
    println!(
        "KV cache: {}, {:.1} MB at the last step ({} positions; sliding layers read less)",
        kv.name(),
        kv_last as f64 / 1e6,
        prompt.len() + a.gen_tokens
    );
    let rss = tessera_core::mem::peak_rss_bytes().unwrap_or(0);
    println!(
        "weights held: {:.1} MB; peak resident memory: {:.1} MB",
        cluster.weight_bytes_held() as f64 / 1e6,
        rss as f64 / 1e6
    );
    if let Some(n) = launches {
        println!(
            "GPU kernel launches per decode step: {n} ({:.1} per layer, the embedding, final norm, \
             LM head and pick included)",
            n as f64 / cfg.layers as f64
        );
    }
    let bw = report_bandwidth(a.bandwidth_mib, reached, a.m().backend);
    Ok(serde_json::json!({
        "model": a.m().model,
        "dispatches_per_token": launches,
        "dispatches_per_layer": launches.map(|n| n as f64 / cfg.layers as f64),
        "format": files.format,
        "backend": a.m().backend.name(),
        "precision": precision_name(a),
        "kv_cache": kv.name(),
        "kv_bytes_at_last_step": kv_last,
        "shards": a.m().shards,
        "threads": threads,
        "prompt_tokens": prompt.len(),
        "gen_tokens": a.gen_tokens,
        "prefill_tok_s": best_prefill,
        "decode_tok_s": best_decode,
        "weight_bytes_per_token": bytes,
        "weight_bytes_held": cluster.weight_bytes_held(),
        "params_total": cfg.param_count(),
        "params_active": cfg.active_param_count(),
        "rss_bytes": rss,
        "decode_gb_s": reached / 1e9,
        "memory_bandwidth_gb_s": bw.map(|b| b / 1e9),
        "bandwidth_fraction": bw.map(|b| reached / b),
    }))
}

/// Kernel launches of one decode step on a GPU backend (None on the CPU): the difference
/// between generating 6 and 2 tokens after a one-token prompt, over the 4 steps between.
fn count_decode_launches(
    cluster: &mut LocalCluster,
    backend: Backend,
    prompt: &[u32],
) -> anyhow::Result<Option<u64>> {
    #[cfg(feature = "wgpu")]
    if backend != Backend::Cpu {
        let mut count = |n: usize, seq: u64| -> anyhow::Result<u64> {
            let params = GenerateParams {
                max_tokens: n,
                ignore_eos: true,
                ..Default::default()
            };
            let (r, launches) = tessera_model::count_launches(|| {
                generate(cluster, seq, &prompt[..1], &params, &[], &mut |_| true)
            });
            r?;
            Ok(launches.iter().map(|k| k.1).sum())
        };
        let (short, long) = (count(2, 1 << 40)?, count(6, (1 << 40) + 1)?);
        return Ok(Some(long.saturating_sub(short) / 4));
    }
    let _ = (cluster, backend, prompt);
    Ok(None)
}

/// Measures the machine's bandwidth and says what share of it decode (`reached` bytes/s) used;
/// returns the bandwidth in bytes/s. Not on a GPU, whose weights are in its own memory: the
/// host's bandwidth says nothing there (compare with the card's figure).
fn report_bandwidth(mib: usize, reached: f64, backend: Backend) -> Option<f64> {
    if backend != Backend::Cpu {
        println!(
            "decode reached: {:.2} GB/s of weights from the GPU's memory",
            reached / 1e9
        );
        return None;
    }
    let (bw, threads) = memory_bandwidth(mib);
    println!(
        "memory bandwidth: {:.2} GB/s (streaming read of {mib} MiB, {threads} threads)",
        bw / 1e9
    );
    println!(
        "decode reached: {:.2} GB/s = {:.0}% of measured bandwidth",
        reached / 1e9,
        100.0 * reached / bw
    );
    Some(bw)
}

/// The same measurement through a local cluster of worker processes: also reports the mean
/// all-reduce latency and the share of decode time spent in communication.
fn run_cluster(a: &BenchArgs, n: usize) -> anyhow::Result<serde_json::Value> {
    let serve = crate::cluster::ServeArgs::with_wire(a.wire);
    let local = crate::cluster::start_local(a.m(), n, "127.0.0.1:0".parse()?, None, None, &serve)?;
    let workers = local.state.workers();
    let worker_rss: Vec<u64> = workers.iter().map(|w| w.rss_bytes).collect();
    let held: Vec<u64> = workers.iter().map(|w| w.weight_bytes_held).collect();
    let vocab = local.state.files.cfg.vocab as u64;
    if !a.concurrency.is_empty() {
        let levels = run_concurrency(a, n, &local)?;
        return Ok(serde_json::json!({
            "model": a.m().model,
            "backend": a.m().backend.name(),
            "precision": precision_name(a),
            "workers": n,
            "threads": crate::cluster::worker_threads(&a.m().compute, n),
        "pinned": a.m().compute.pin,
            "prompt_tokens": a.prompt_tokens,
            "gen_tokens": a.gen_tokens,
            "concurrency": levels,
            "worker_rss_bytes": worker_rss,
            "rss_bytes": worker_rss.iter().sum::<u64>(),
            "weight_bytes_held": held,
        }));
    }
    let load = local.state.load_seconds.lock().unwrap().unwrap_or(0.0);
    let d = best_of_runs(a, &local.rt, &local.addr.to_string(), &local.token)?;
    let (prefill, decode) = rates(&d);
    let reached = d.weight_bytes_per_token as f64 * decode;
    println!(
        "model: {}, {n} worker process(es) on loopback ({})",
        a.m().model,
        a.m().backend.name()
    );
    println!("load: {load:.2} s (shipping every worker its shard over gRPC)");
    print_speeds(
        d.prompt_tokens as usize,
        prefill,
        d.decode_steps as usize,
        decode,
    );
    println!(
        "all-reduce: {:.0} us mean, {:.0}% of step time in communication",
        d.allreduce_mean_us,
        100.0 * d.comm_fraction
    );
    println!(
        "decode step time: {:.0}% on the workers' kernels and their own work, {:.0}% in all-reduces, {:.0}% on the control plane (request, reply, merge)",
        100.0 * d.compute_fraction,
        100.0 * d.comm_fraction,
        100.0 * d.control_fraction
    );
    println!(
        "logits sent per step: {:.0} bytes per worker (greedy: each worker's best token; a whole vocabulary slice would be {} bytes)",
        d.logits_bytes_per_step,
        vocab * 4 / n as u64
    );
    println!(
        "weights read per token: {:.1} MB (in the file's formats, all workers)",
        d.weight_bytes_per_token as f64 / 1e6
    );
    println!(
        "workers hold {} MB of weights; their resident memory after loading: {} MB",
        held.iter()
            .map(|b| format!("{:.1}", *b as f64 / 1e6))
            .collect::<Vec<_>>()
            .join(" + "),
        worker_rss
            .iter()
            .map(|b| format!("{:.1}", *b as f64 / 1e6))
            .collect::<Vec<_>>()
            .join(" + "),
    );
    let bw = report_bandwidth(a.bandwidth_mib, reached, a.m().backend);
    Ok(serde_json::json!({
        "model": a.m().model,
        "backend": a.m().backend.name(),
        "precision": precision_name(a),
        "workers": n,
        "threads": crate::cluster::worker_threads(&a.m().compute, n),
        "pinned": a.m().compute.pin,
        "prompt_tokens": d.prompt_tokens,
        "gen_tokens": d.decode_steps + 1,
        "prefill_tok_s": prefill,
        "decode_tok_s": decode,
        "weight_bytes_per_token": d.weight_bytes_per_token,
        "weight_bytes_held": held,
        "worker_rss_bytes": worker_rss,
        "rss_bytes": worker_rss.iter().sum::<u64>(),
        "comm_share": d.comm_fraction,
        "compute_share": d.compute_fraction,
        "control_share": d.control_fraction,
        "allreduce_mean_us": d.allreduce_mean_us,
        "logits_bytes_per_step": d.logits_bytes_per_step,
        "wire": a.wire.name(),
        "decode_gb_s": reached / 1e9,
        "memory_bandwidth_gb_s": bw.map(|b| b / 1e9),
        "bandwidth_fraction": bw.map(|b| reached / b),
    }))
}

/// A finished request's prefill and decode rates, tok/s.
fn rates(d: &tessera_proto::Done) -> (f64, f64) {
    (
        d.prompt_tokens as f64 / d.prefill_seconds.max(1e-9),
        d.decode_steps as f64 / d.decode_seconds.max(1e-9),
    )
}

/// The prefill and decode lines every bench prints.
fn print_speeds(prompt_tokens: usize, prefill: f64, gen_tokens: usize, decode: f64) {
    println!("prefill: {prompt_tokens} tokens, {prefill:.1} tok/s");
    println!(
        "decode: {gen_tokens} tokens, {decode:.1} tok/s ({:.2} ms/token)",
        1e3 / decode.max(1e-9)
    );
}

/// One warm-up and `a.runs` measured requests through a coordinator; the fastest decode.
fn best_of_runs(
    a: &BenchArgs,
    rt: &tokio::runtime::Runtime,
    addr: &str,
    token: &str,
) -> anyhow::Result<tessera_proto::Done> {
    let prompt = a
        .prompt
        .clone()
        .unwrap_or_else(|| TEXT.repeat(a.prompt_tokens / 40 + 1));
    let opts = bench_options(a.gen_tokens);
    let mut best: Option<tessera_proto::Done> = None;
    for run in 0..=a.runs {
        let d = rt.block_on(crate::cluster::remote_stream(
            addr, token, &prompt, &opts, false,
        ))?;
        if run > 0 && best.as_ref().is_none_or(|b| rates(&d).1 > rates(b).1) {
            best = Some(d);
        }
    }
    Ok(best.expect("at least one run"))
}

/// `--coordinator`: a running cluster, measured from its client side.
fn run_remote(a: &BenchArgs, addr: &str) -> anyhow::Result<serde_json::Value> {
    let token = a
        .token
        .clone()
        .ok_or_else(|| anyhow::anyhow!("--coordinator needs --token (or TESSERA_TOKEN)"))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let d = best_of_runs(a, &rt, addr, &token)?;
    let (prefill, decode) = rates(&d);
    println!("cluster at {addr}");
    print_speeds(
        d.prompt_tokens as usize,
        prefill,
        d.decode_steps as usize,
        decode,
    );
    println!(
        "all-reduce: {:.0} us mean, {:.0}% of step time in communication; logits sent per \
         step: {:.0} bytes per worker",
        d.allreduce_mean_us,
        100.0 * d.comm_fraction,
        d.logits_bytes_per_step
    );
    Ok(serde_json::json!({
        "coordinator": addr,
        "prompt_tokens": d.prompt_tokens,
        "gen_tokens": d.decode_steps + 1,
        "prefill_tok_s": prefill,
        "decode_tok_s": decode,
        "weight_bytes_per_token": d.weight_bytes_per_token,
        "comm_share": d.comm_fraction,
        "compute_share": d.compute_fraction,
        "control_share": d.control_fraction,
        "allreduce_mean_us": d.allreduce_mean_us,
        "logits_bytes_per_step": d.logits_bytes_per_step,
    }))
}

/// Greedy, past end-of-sequence, token ids: the same work on every run.
fn bench_options(max_tokens: usize) -> crate::GenOptions {
    crate::GenOptions {
        max_tokens,
        temperature: 0.0,
        top_p: 1.0,
        top_k: 0,
        seed: 0,
        ids: true,
        ignore_eos: true,
        chat: false,
        stop: vec![],
    }
}

/// Aggregate throughput with several streams at once: each level starts `c` requests together
/// (distinct prompts, `gen_tokens` each) and waits for all of them.
fn run_concurrency(
    a: &BenchArgs,
    n: usize,
    local: &crate::cluster::Local,
) -> anyhow::Result<Vec<serde_json::Value>> {
    let addr = local.addr.to_string();
    let opts = bench_options(a.gen_tokens);
    println!(
        "model: {}, {n} worker process(es) on loopback ({}), {} prompt tokens and {} generated \
         tokens per stream",
        a.m().model,
        a.m().backend.name(),
        a.prompt_tokens,
        a.gen_tokens
    );
    println!(
        "streams | aggregate decode tok/s | decode tok/s per stream | all tokens / wall, tok/s \
         | wall s"
    );
    // A warm-up request first, so that the first level does not pay for it.
    local.rt.block_on(crate::cluster::remote_stream(
        &addr,
        &local.token,
        "warm up",
        &bench_options(4),
        false,
    ))?;
    let mut levels = Vec::new();
    for &c in &a.concurrency {
        let started = Instant::now();
        let results = local.rt.block_on(async {
            let mut tasks = Vec::new();
            for i in 0..c {
                let (addr, token, opts) = (addr.clone(), local.token.clone(), opts.clone());
                let mut prompt = format!("Stream {i}. ");
                while prompt.len() < a.prompt_tokens * 4 {
                    prompt.push_str(TEXT);
                }
                tasks.push(tokio::spawn(async move {
                    crate::cluster::remote_stream(&addr, &token, &prompt, &opts, false).await
                }));
            }
            let mut out = Vec::new();
            for t in tasks {
                out.push(t.await??);
            }
            anyhow::Ok(out)
        })?;
        let wall = started.elapsed().as_secs_f64();
        let generated: u32 = results.iter().map(|d| d.generated_tokens).sum();
        let per_stream: f64 = results.iter().map(|d| rates(d).1).sum::<f64>() / c as f64;
        // Streams overlap while decoding, so their decode rates add up.
        println!(
            "{c:7} | {:22.1} | {:23.1} | {:24.1} | {wall:.2}",
            per_stream * c as f64,
            per_stream,
            generated as f64 / wall,
        );
        levels.push(serde_json::json!({
            "streams": c,
            "aggregate_decode_tok_s": per_stream * c as f64,
            "decode_tok_s_per_stream": per_stream,
            "all_tokens_per_wall_s": generated as f64 / wall,
            "wall_s": wall,
        }));
    }
    Ok(levels)
}
