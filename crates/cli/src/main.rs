//! `tessera`: the command-line front end.

mod bench;
mod cluster;
mod plan;
mod pull;

use clap::{Args, Parser, Subcommand};
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use tessera_coordinator::text::StopText;
use tessera_model::{
    Backend, GenerateParams, LocalCluster, ModelError, ModelFiles, Precision, Runner,
    SamplingParams,
};

#[derive(Parser)]
#[command(
    name = "tessera",
    version,
    about = "Run a large language model split across several machines (tensor parallelism)",
    long_about = "Run a large language model split across several machines (tensor parallelism).\n\n\
        A model is a Hugging Face folder (config.json, *.safetensors, tokenizer.json), a .gguf file,\n\
        or the name of a model fetched with `tessera pull` (for example smollm2-135m)."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate text from a prompt, streaming it to stdout (statistics go to stderr)
    Generate(GenerateArgs),
    /// Fetch a model into the local cache and verify it (smollm2-135m, or hf:ORG/NAME)
    Pull(pull::PullArgs),
    /// Measure prefill and decode speed, and the share of memory bandwidth decode reaches
    Bench(bench::BenchArgs),
    /// Run a worker: holds one shard, joins the all-reduce mesh, runs steps
    Worker(cluster::WorkerArgs),
    /// Run the coordinator: waits for workers, ships their shards, serves generation
    Coordinator(cluster::CoordinatorArgs),
    /// A whole cluster on this machine: a coordinator and N worker processes on loopback
    Run(cluster::RunArgs),
    /// Chat with a running cluster: keeps the conversation, shows tok/s after each answer
    Chat(cluster::ChatArgs),
    /// Show what each worker would hold and whether it fits, before loading anything
    Plan(plan::PlanArgs),
    /// Rewrite a GGUF model with its weight matrices in another format (Q8_0, Q4_K_M, ...)
    Quantize(QuantizeArgs),
    /// Write a model of a known shape with random weights (to measure a machine's speed
    /// without downloading one): tiny, smollm2-135m, tinyllama-1.1b or llama3-8b
    Synth(SynthArgs),
    /// Print the token ids the model sees for TEXT (BOS included where the model adds it)
    Tokenize(TokenizeArgs),
    /// Exit 0 if an HTTP GET of URL answers 2xx (a health check for containers)
    Probe { url: String },
    /// One peer process of `bench --collective` (started by it; reads its identity on stdin)
    #[command(hide = true)]
    CollectivePeer,
    /// Print a fresh cluster token (the secret every coordinator, worker and client of one
    /// cluster shares as TESSERA_TOKEN; the control plane's TLS is trusted from it)
    Token,
    /// Show a running cluster's state and workers
    Status {
        /// The coordinator's address
        #[arg(long)]
        coordinator: String,
        #[arg(long, env = "TESSERA_TOKEN", hide_env_values = true)]
        token: String,
    },
}

#[derive(Args)]
struct TokenizeArgs {
    /// Model folder, .gguf file, or a pulled model's name
    #[arg(long, short = 'm')]
    model: String,
    /// The text to tokenize
    text: String,
    /// Print each token's piece beside its id (`id 'piece'`, one per line)
    #[arg(long)]
    pieces: bool,
}

fn run_tokenize(a: TokenizeArgs) -> anyhow::Result<()> {
    let files = ModelFiles::open(&resolve_model(&a.model)?)?;
    let ids = files.tokenizer.encode(&a.text)?;
    let mut out = std::io::stdout().lock();
    if a.pieces {
        for id in ids {
            let piece = files.tokenizer.id_to_token(id).unwrap_or_default();
            writeln!(out, "{id} {piece:?}")?;
        }
    } else {
        let ids: Vec<String> = ids.iter().map(u32::to_string).collect();
        writeln!(out, "{}", ids.join(" "))?;
    }
    Ok(())
}

#[derive(Args)]
struct QuantizeArgs {
    /// The GGUF file to read (a path or a pulled model's name)
    input: String,
    /// The file to write
    output: PathBuf,
    /// F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K_S, Q4_K_M, Q5_K_S, Q5_K_M or Q6_K
    #[arg(value_parser = |s: &str| s.parse::<tessera_model::requant::Target>())]
    r#type: tessera_model::requant::Target,
    /// Threads (default: the cores this process may use)
    #[arg(long)]
    threads: Option<usize>,
}

fn run_quantize(a: QuantizeArgs) -> anyhow::Result<()> {
    if let Some(n) = a.threads {
        tessera_quant::set_threads(n);
    }
    let input = resolve_model(&a.input)?;
    let t0 = std::time::Instant::now();
    let s = tessera_model::requant::requantize(&input, &a.output, &a.r#type)?;
    let types: Vec<String> = s.types.iter().map(|(t, n)| format!("{n} {t}")).collect();
    eprintln!(
        "wrote {} as {}: {} tensors ({} re-encoded; {}), {:.1} MB -> {:.1} MB in {:.1} s",
        a.output.display(),
        a.r#type.name,
        s.tensors,
        s.converted,
        types.join(", "),
        s.in_bytes as f64 / 1e6,
        s.out_bytes as f64 / 1e6,
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

#[derive(Args)]
struct SynthArgs {
    /// The shape: tiny, smollm2-135m, tinyllama-1.1b or llama3-8b
    #[arg(value_parser = |s: &str| {
        tessera_model::requant::SHAPES
            .iter()
            .find(|x| x.name.eq_ignore_ascii_case(s))
            .copied()
            .ok_or_else(|| format!("unknown shape {s:?} (one of {})",
                tessera_model::requant::SHAPES.map(|x| x.name).join(", ")))
    })]
    shape: tessera_model::requant::Shape,
    /// The weights' format, as for `quantize`
    #[arg(value_parser = |s: &str| s.parse::<tessera_model::requant::Target>())]
    r#type: tessera_model::requant::Target,
    /// The file to write
    output: PathBuf,
    /// Seed of the random weights (the same seed writes the same file)
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

fn run_synth(a: SynthArgs) -> anyhow::Result<()> {
    let t0 = std::time::Instant::now();
    let s = tessera_model::requant::synthesize(&a.output, &a.shape, &a.r#type, a.seed)?;
    let types: Vec<String> = s.types.iter().map(|(t, n)| format!("{n} {t}")).collect();
    eprintln!(
        "wrote {}: random {} as {}: {} tensors ({}), {:.1} MB in {:.1} s",
        a.output.display(),
        a.shape.name,
        a.r#type.name,
        s.tensors,
        types.join(", "),
        s.out_bytes as f64 / 1e6,
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

#[derive(Args, Clone)]
pub struct ModelArgs {
    /// Model folder, .gguf file, or a pulled model's name
    #[arg(long, short = 'm')]
    pub model: String,
    /// How many tensor-parallel shards to split the model into
    #[arg(long, default_value_t = 1)]
    pub shards: usize,
    /// Where the tensors live: cpu (Burn flex) or wgpu (Vulkan/Metal/DX12 GPU)
    #[arg(long, default_value = "cpu")]
    pub backend: Backend,
    #[command(flatten)]
    pub compute: ComputeArgs,
}

/// How the kernels compute.
#[derive(Args, Clone, Default)]
pub struct ComputeArgs {
    /// Compute with f32 activations against the weight blocks (dequantized inside the kernel):
    /// the exact path, which reproduces transformers' outputs. Default: for quantized weights,
    /// activations in two 8-bit planes per 16 values (about 16 bits) on integer dot products
    /// (faster; logits within about 0.002 of the exact path's)
    #[arg(long, env = "TESSERA_EXACT")]
    pub exact: bool,
    /// What the KV cache holds, f32 or f16 (default: f16 on the fast path over quantized
    /// weights, as llama.cpp keeps it; f32 with --exact and for dense weights; a GPU's is f32)
    #[arg(long, env = "TESSERA_KV")]
    pub kv_cache: Option<tessera_core::CacheType>,
    /// Threads for the CPU kernels (default: the cores this process may use)
    #[arg(long)]
    pub threads: Option<usize>,
    /// Where this command starts worker processes (run, bench --workers): pin worker i to
    /// core i (modulo the cores), as `taskset` would, so that each has a core of its own
    #[arg(long)]
    pub pin: bool,
}

impl ComputeArgs {
    pub fn precision(&self) -> Precision {
        Precision::of(self.exact)
    }

    /// Sizes the kernels' thread pool; returns its size.
    pub fn init_threads(&self) -> anyhow::Result<usize> {
        init_threads(self.threads)
    }
}

/// Sizes the kernels' thread pool (before its first use); returns its size.
pub fn init_threads(threads: Option<usize>) -> anyhow::Result<usize> {
    if let Some(n) = threads {
        if n == 0 {
            anyhow::bail!("--threads must be at least 1");
        }
        tessera_quant::set_threads(n);
    }
    Ok(tessera_quant::threads())
}

#[derive(Args)]
struct GenerateArgs {
    /// Model folder, .gguf file, or a pulled model's name (runs the shards in this process)
    #[arg(long, short = 'm', required_unless_present = "coordinator")]
    model: Option<String>,
    /// How many tensor-parallel shards to split the model into
    #[arg(long, default_value_t = 1)]
    shards: usize,
    /// Where the tensors live: cpu (Burn flex) or wgpu (Vulkan/Metal/DX12 GPU)
    #[arg(long, default_value = "cpu")]
    backend: Backend,
    #[command(flatten)]
    compute: ComputeArgs,
    /// Submit to a running cluster's coordinator (HOST:PORT) instead of loading the model here
    #[arg(long, conflicts_with = "model")]
    coordinator: Option<String>,
    /// The cluster secret, with --coordinator
    #[arg(long, env = "TESSERA_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// The prompt text (used as is: no chat template is applied)
    #[arg(long, short = 'p')]
    prompt: String,
    #[command(flatten)]
    options: GenOptions,
}

#[derive(Args, Clone)]
pub struct GenOptions {
    /// Most tokens to generate
    #[arg(long, default_value_t = 128)]
    pub max_tokens: usize,
    /// Sampling temperature; 0 is greedy
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Nucleus sampling: keep the most likely tokens up to this total probability
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// Keep only the K most likely tokens (0: no limit)
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Random seed, for reproducible sampling
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Print the generated token ids (one line, space-separated) instead of text
    #[arg(long)]
    pub ids: bool,
    /// Do not stop at end-of-sequence tokens
    #[arg(long)]
    pub ignore_eos: bool,
    /// Send the prompt as a user message through the model's chat template
    #[arg(long)]
    pub chat: bool,
    /// Stop when the text contains this string (not printed); may be given several times
    #[arg(long)]
    pub stop: Vec<String>,
}

/// The name a model is served under (the `model` of API requests): a pulled model's name, or
/// the file or folder name without extension.
pub fn model_name(arg: &str) -> String {
    let p = PathBuf::from(arg);
    if !p.exists() && pull::cached_path(arg).is_some() {
        return arg.to_string();
    }
    let p = p.canonicalize().unwrap_or(p);
    p.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| arg.to_string())
}

/// Resolves a model argument: a path, or the name of a model in the pull cache.
pub fn resolve_model(arg: &str) -> anyhow::Result<PathBuf> {
    let p = PathBuf::from(arg);
    if p.exists() {
        return Ok(p);
    }
    if let Some(path) = pull::cached_path(arg) {
        if path.exists() {
            return Ok(path);
        }
        return Err(ModelError::format(
            &path,
            format!("model {arg:?} is not downloaded yet: run `tessera pull {arg}` first"),
        )
        .into());
    }
    Err(ModelError::io(
        &p,
        std::io::Error::new(std::io::ErrorKind::NotFound, "no such model file or folder"),
    )
    .into())
}

pub fn load(args: &ModelArgs) -> anyhow::Result<(ModelFiles, LocalCluster)> {
    args.compute.init_threads()?;
    let path = resolve_model(&args.model)?;
    let files = ModelFiles::open(&path)?;
    let cluster = LocalCluster::load_with(
        &files,
        args.shards,
        args.backend,
        args.compute.precision(),
        args.compute.kv_cache,
    )?;
    tracing::info!(
        model = %path.display(), format = %files.format, shards = args.shards,
        backend = args.backend.name(), secs = cluster.load_time.as_secs_f64(), "loaded"
    );
    Ok((files, cluster))
}

fn run_generate(g: GenerateArgs) -> anyhow::Result<()> {
    if let Some(addr) = &g.coordinator {
        return cluster::generate_remote(addr, g.token.clone(), &g.prompt, &g.options);
    }
    let margs = ModelArgs {
        model: g.model.clone().unwrap_or_default(),
        shards: g.shards,
        backend: g.backend,
        compute: g.compute.clone(),
    };
    let a = &g.options;
    let (files, mut cluster) = load(&margs)?;
    let text = if a.chat {
        let user = tessera_model::chat::Message {
            role: "user".into(),
            content: g.prompt.clone(),
        };
        files.render_chat(&[user])?
    } else {
        g.prompt.clone()
    };
    let prompt = files.tokenizer.encode(&text)?;
    let params = GenerateParams {
        max_tokens: a.max_tokens,
        sampling: SamplingParams {
            temperature: a.temperature,
            top_k: a.top_k,
            top_p: a.top_p,
            seed: a.seed,
            logprobs: None,
        },
        ignore_eos: a.ignore_eos,
    };
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    // The end-of-sequence token that stops generation is not part of the answer's text.
    let end_ids = if a.ignore_eos {
        vec![]
    } else {
        files.cfg.eos_token_ids.clone()
    };
    let mut stream = StopText::new(a.stop.clone(), end_ids);
    let mut ids = Vec::new();
    let mut failure: Option<anyhow::Error> = None;
    let stats = tessera_model::generate(
        &mut cluster,
        1,
        &prompt,
        &params,
        &files.cfg.eos_token_ids,
        &mut |tok| {
            ids.push(tok);
            if a.ids {
                return true;
            }
            let piece = stream.push(&files.tokenizer, tok);
            if let Err(e) = out.write_all(piece.as_bytes()).and_then(|_| out.flush()) {
                // A closed pipe (e.g. `| head`) ends generation quietly.
                failure = (e.kind() != std::io::ErrorKind::BrokenPipe).then(|| e.into());
                return false;
            }
            // A stop string ends generation; its text is not printed.
            !stream.stopped
        },
    )?;
    if let Some(e) = failure {
        return Err(e);
    }
    if a.ids {
        let line: Vec<String> = ids.iter().map(|t| t.to_string()).collect();
        writeln!(out, "{}", line.join(" "))?;
    } else {
        write!(out, "{}", stream.finish(&files.tokenizer))?;
        writeln!(out)?;
    }
    let bytes = cluster.weight_bytes_per_token();
    let gbs = bytes as f64 * stats.decode_tok_s() / 1e9;
    eprintln!(
        "prompt tokens: {}, prefill: {:.1} tok/s, generated tokens: {}, decode: {:.1} tok/s, \
         weights read per token: {:.1} MB, effective bandwidth: {:.2} GB/s ({} shard(s), {})",
        stats.prompt_tokens,
        stats.prefill_tok_s(),
        stats.generated,
        stats.decode_tok_s(),
        bytes as f64 / 1e6,
        gbs,
        margs.shards,
        margs.backend.name(),
    );
    Ok(())
}

/// For commands that only print (no sockets): a closed stdout (`tessera plan ... | head`) ends
/// the process as it ends other Unix tools, instead of a panic in `println!`.
fn die_quietly_on_closed_stdout() {
    #[cfg(unix)]
    // SAFETY: restores the default action of one signal before any thread that could write to
    // a socket exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Generate(a) => run_generate(a),
        Command::Pull(a) => pull::run(a),
        Command::Bench(a) => bench::run(a),
        Command::Worker(a) => cluster::worker(a),
        Command::Coordinator(a) => cluster::coordinator(a),
        Command::Run(a) => cluster::run(a),
        Command::Chat(a) => cluster::chat(a),
        Command::Probe { url } => cluster::probe(&url),
        Command::CollectivePeer => bench::collective_peer(),
        Command::Plan(a) => {
            die_quietly_on_closed_stdout();
            plan::run(a)
        }
        Command::Quantize(a) => run_quantize(a),
        Command::Synth(a) => run_synth(a),
        Command::Tokenize(a) => {
            die_quietly_on_closed_stdout();
            run_tokenize(a)
        }
        Command::Token => tessera_proto::secure::fresh_secret()
            .map(|t| println!("{t}"))
            .map_err(anyhow::Error::msg),
        Command::Status { coordinator, token } => cluster::status(&coordinator, &token),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            // Bad input (a model file, a prompt, an argument) exits 2, like a usage error;
            // anything else (a failed download, a broken machine) exits 1.
            if e.chain().any(|c| c.is::<ModelError>()) {
                ExitCode::from(2)
            } else {
                ExitCode::from(1)
            }
        }
    }
}
