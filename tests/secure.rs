//! The control plane's encryption, end to end: a packet capture of a running cluster's gRPC
//! traffic holds neither the cluster secret, nor a prompt, nor its token ids, nor any run of
//! the weights shipped to the workers; a man in the middle presenting its own certificate is
//! refused by clients and by workers before they send it anything.

mod common;

use common::{free_port, smollm2, tessera};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

/// Protobuf's packed encoding of `ids` (varints, as in `SeqStep.ids` or `prompt_ids`).
fn varints(ids: &[u32]) -> Vec<u8> {
    let mut out = Vec::new();
    for &id in ids {
        let mut v = id;
        loop {
            if v < 0x80 {
                out.push(v as u8);
                break;
            }
            out.push((v as u8 & 0x7f) | 0x80);
            v >>= 7;
        }
    }
    out
}

struct Procs(Vec<Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn status(addr: &str, token: &str) -> String {
    let o = tessera()
        .args(["status", "--coordinator", addr])
        .env("TESSERA_TOKEN", token)
        .output()
        .unwrap();
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn wait_ready(addr: &str, token: &str) {
    let t = Instant::now();
    while !status(addr, token).starts_with("cluster: ready") {
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "not ready: {}",
            status(addr, token)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn worker(coordinator: &str, token: &str, name: &str, grpc_port: u16) -> Child {
    common::worker_cmd(
        coordinator,
        token,
        name,
        "4",
        &format!("127.0.0.1:{grpc_port}"),
    )
    .stdout(Stdio::null())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap()
}

#[test]
fn a_capture_of_the_control_plane_holds_no_secret_prompt_ids_or_weights() {
    if Command::new("tcpdump").arg("--version").output().is_err() {
        assert!(
            std::env::var_os("TESSERA_REQUIRE_CAPTURE").is_none(),
            "tcpdump is missing and TESSERA_REQUIRE_CAPTURE is set"
        );
        eprintln!("SKIPPED: no tcpdump to capture with");
        return;
    }
    let secret = format!("capture-test-secret-{}", std::process::id());
    let (c_port, h_port, w0, w1) = (free_port(), free_port(), free_port(), free_port());
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let pcap = dir.join(format!("control-plane-{}.pcap", std::process::id()));
    let filter = format!("tcp and (port {c_port} or port {h_port} or port {w0} or port {w1})");
    // A 256 MiB capture buffer: the shards cross loopback in well under a second.
    let mut dump = Command::new("tcpdump")
        .args(["-i", "lo", "-U", "-s", "0", "-B", "262144"])
        .args(["-w", pcap.to_str().unwrap(), &filter])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut dump_err = BufReader::new(dump.stderr.take().unwrap());
    let mut line = String::new();
    dump_err.read_line(&mut line).unwrap();
    assert!(line.contains("listening"), "tcpdump: {line}");

    let addr = format!("127.0.0.1:{c_port}");
    let mut procs = Procs(vec![
        tessera()
            .args([
                "coordinator",
                "--model",
                smollm2().to_str().unwrap(),
                "--exact",
            ])
            .args(["--workers", "2", "--listen", &addr])
            .args(["--http", &format!("127.0.0.1:{h_port}")])
            .env("TESSERA_TOKEN", &secret)
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    ]);
    procs.0.push(worker(&addr, &secret, "cap-0", w0));
    procs.0.push(worker(&addr, &secret, "cap-1", w1));
    wait_ready(&addr, &secret);

    // Through gRPC: the prompt, and the ids the workers receive for it.
    let prompt = "The secret family recipe for zanzibar lemonade starts with";
    let o = tessera()
        .args(["generate", "--coordinator", &addr, "--prompt", prompt])
        .args(["--max-tokens", "8", "--ids", "--ignore-eos"])
        .env("TESSERA_TOKEN", &secret)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let generated: Vec<u32> = String::from_utf8_lossy(&o.stdout)
        .split_whitespace()
        .map(|t| t.parse().unwrap())
        .collect();
    assert_eq!(generated.len(), 8);
    // The control: the HTTP API is plain text, and the capture sees its body.
    let control = "Plain text control: this sentence crosses the HTTP API unencrypted.";
    let r = common::http::post(
        &format!("127.0.0.1:{h_port}"),
        "/v1/completions",
        &serde_json::json!({"prompt": control, "max_tokens": 1}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    // tcpdump works through its buffer after the traffic: a last marker packet, and once the
    // marker is in the file, so is everything before it.
    let marker = format!("END-OF-CAPTURE-{}", std::process::id());
    let mut m = TcpStream::connect(("127.0.0.1", h_port)).unwrap();
    m.write_all(marker.as_bytes()).unwrap();
    let t = Instant::now();
    while !std::fs::read(&pcap).is_ok_and(|b| contains(&b, marker.as_bytes())) {
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "tcpdump never wrote the marker"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    drop(m);
    drop(procs);
    let _ = Command::new("kill")
        .args(["-INT", &dump.id().to_string()])
        .status();
    let _ = dump.wait();
    let mut stats = String::new();
    dump_err.read_to_string(&mut stats).unwrap();
    // Every packet must be in the file for its absence to mean anything.
    let count = |what: &str| -> u64 {
        stats
            .lines()
            .find(|l| l.ends_with(what))
            .and_then(|l| l.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no {what:?} in tcpdump's stats: {stats}"))
    };
    assert_eq!(count("packets dropped by kernel"), 0, "{stats}");
    let captured = std::fs::read(&pcap).unwrap();
    let _ = std::fs::remove_file(&pcap);

    let files = tessera_model::ModelFiles::open(&smollm2()).unwrap();
    let ids = files.tokenizer.encode(prompt).unwrap();
    let gguf = tessera_model::gguf::GgufFile::open(&smollm2()).unwrap();
    let tensor_bytes: usize = gguf.tensors.values().map(|t| t.bytes()).sum();
    assert!(
        contains(&captured, control.as_bytes()),
        "the capture missed the plain-text control ({} bytes captured)",
        captured.len()
    );
    // Both workers' shards crossed the captured ports (about the file's tensor bytes).
    assert!(
        captured.len() > tensor_bytes * 9 / 10,
        "captured {} bytes, the shards are {tensor_bytes}",
        captured.len()
    );
    assert!(
        !contains(&captured, secret.as_bytes()),
        "the secret crossed"
    );
    assert!(
        !contains(&captured, prompt.as_bytes()),
        "the prompt crossed"
    );
    let mut words = prompt.split(' ');
    assert!(
        !contains(&captured, words.nth(3).unwrap().as_bytes()),
        "a word of the prompt crossed"
    );
    assert!(ids.len() >= 8, "{ids:?}");
    assert!(
        !contains(&captured, &varints(&ids)),
        "the prompt's ids crossed"
    );
    assert!(
        !contains(&captured, &varints(&generated[..6])),
        "the generated ids crossed"
    );
    // 64-byte runs of every tensor (its start, middle and end), looked for in one pass.
    let mut runs: std::collections::HashMap<[u8; 8], Vec<(&[u8], String)>> = Default::default();
    for t in gguf.tensors.values().filter(|t| t.bytes() >= 256) {
        for at in [0, t.bytes() / 2, t.bytes() - 64] {
            let run = gguf.bytes(t.offset + at..t.offset + at + 64);
            if run.iter().all(|&b| b == run[0]) {
                continue; // a constant run (zero padding, a constant norm) says nothing
            }
            let head: [u8; 8] = run[..8].try_into().unwrap();
            runs.entry(head)
                .or_default()
                .push((run, format!("{} at {at}", t.name)));
        }
    }
    let runs_n: usize = runs.values().map(Vec::len).sum();
    for w in captured.windows(64) {
        if let Some(v) = runs.get(&<[u8; 8]>::try_from(&w[..8]).unwrap()) {
            for (run, what) in v {
                assert!(w != *run, "64 bytes of {what} crossed");
            }
        }
    }
    let runs = runs_n;
    assert!(runs > 100, "{runs} runs checked");
    eprintln!(
        "captured {} bytes of control-plane traffic: no secret, prompt, ids or any of {runs} \
         weight runs in it; the HTTP control was there",
        captured.len()
    );
}

/// A TLS server with a certificate of its own (for the right name, but not from the cluster
/// secret) that would relay to `target`: records what each connection did.
fn man_in_the_middle(target: String) -> (u16, Arc<Mutex<Vec<String>>>) {
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec![
        tessera_proto::secure::SERVER_NAME.to_string(),
        "localhost".into(),
    ])
    .unwrap()
    .self_signed(&key)
    .unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .unwrap();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let cfg = Arc::new(cfg);
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let log = Arc::new(Mutex::new(Vec::new()));
    let log2 = log.clone();
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(mut tcp) = c else { continue };
            let (cfg, log, target) = (cfg.clone(), log2.clone(), target.clone());
            std::thread::spawn(move || {
                tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                let mut conn = rustls::ServerConnection::new(cfg).unwrap();
                let mut tls = rustls::Stream::new(&mut conn, &mut tcp);
                let mut buf = [0u8; 4096];
                // A completed handshake would show the client's first bytes; relay them on.
                match tls.read(&mut buf) {
                    Ok(n) if n > 0 => {
                        log.lock().unwrap().push(format!("relayed {n} bytes"));
                        if let Ok(mut up) = TcpStream::connect(&target) {
                            let _ = up.write_all(&buf[..n]);
                        }
                    }
                    Ok(_) => log.lock().unwrap().push("closed".into()),
                    Err(e) => log.lock().unwrap().push(format!("refused: {e}")),
                }
            });
        }
    });
    (port, log)
}

#[test]
fn a_man_in_the_middle_with_its_own_certificate_is_refused_by_clients_and_workers() {
    let secret = format!("mitm-test-secret-{}", std::process::id());
    let addr = format!("127.0.0.1:{}", free_port());
    let mut procs = Procs(vec![
        tessera()
            .args(["coordinator", "--model", smollm2().to_str().unwrap()])
            .args(["--workers", "1", "--listen", &addr])
            .env("TESSERA_TOKEN", &secret)
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    ]);
    procs.0.push(worker(&addr, &secret, "honest", free_port()));
    wait_ready(&addr, &secret);
    let (port, log) = man_in_the_middle(addr.clone());
    let mitm = format!("127.0.0.1:{port}");

    // `tessera generate` against `at` with `token`.
    let generate = |at: &str, token: &str| {
        tessera()
            .args(["generate", "--coordinator", at, "--prompt", "hello there"])
            .args(["--max-tokens", "2"])
            .env("TESSERA_TOKEN", token)
            .output()
            .unwrap()
    };
    // A client sent to the impostor: refused before it sends its request.
    let o = generate(&mitm, &secret);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "the client talked to the impostor");
    assert!(err.contains("certificate") || err.contains("TLS"), "{err}");
    // A worker sent to the impostor: refuses it and stops.
    let mut w = worker(&mitm, &secret, "misled", free_port());
    let t = Instant::now();
    let code = loop {
        if let Some(s) = w.try_wait().unwrap() {
            break s;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the worker kept talking to the impostor"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut werr = String::new();
    w.stderr.take().unwrap().read_to_string(&mut werr).unwrap();
    assert!(!code.success());
    assert!(werr.contains("refused"), "{werr}");
    std::thread::sleep(Duration::from_millis(200));
    let log = log.lock().unwrap().clone();
    assert!(log.len() >= 2, "the impostor saw {log:?}");
    assert!(
        log.iter().all(|l| l.starts_with("refused")),
        "the impostor got data: {log:?}"
    );
    // The real coordinator, meanwhile, serves.
    let o = generate(&addr, &secret);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // And a client with the wrong secret is refused by the real one.
    assert!(!generate(&addr, "not-the-secret").status.success());
}
