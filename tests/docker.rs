//! deploy/ on real containers: the image from deploy/Dockerfile, and deploy/compose.yaml
//! bringing up a coordinator and three workers as separate containers on a private network.
//! A crashed worker, an intruder with the wrong secret, and a network cut between workers.
//!
//! There is no registry here, so the image's base is built from what the machine has: a
//! debootstrap root file system imported with `docker import`, passed to the Dockerfile as its
//! BASE build argument; the BUILDER argument is that base plus the tessera binary of this
//! build (the Dockerfile skips compiling when the builder already holds one).
//!
//! Without Docker these tests say so and skip; with TESSERA_REQUIRE_DOCKER set (.ci/run sets
//! it) a missing Docker is a failure.

mod common;

use common::http::{get, post, send};
use common::{reference, smollm2};
use serde_json::json;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const BASE: &str = "tessera-test-base:bookworm-glvnd";
const IMAGE: &str = "tessera:test";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn run(cmd: &mut Command) -> Output {
    let o = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        o.status.success(),
        "{cmd:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

fn docker(args: &[&str]) -> Command {
    let mut c = Command::new("docker");
    c.args(args).env("DOCKER_BUILDKIT", "0");
    c
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

/// True when the test must skip (said on stderr); panics if Docker is required but missing.
fn no_docker(test: &str) -> bool {
    let ok = Command::new("docker")
        .arg("info")
        .output()
        .is_ok_and(|o| o.status.success());
    if ok {
        return false;
    }
    assert!(
        std::env::var_os("TESSERA_REQUIRE_DOCKER").is_none(),
        "TESSERA_REQUIRE_DOCKER is set but `docker info` fails: the Docker tests cannot run"
    );
    eprintln!("SKIPPED {test}: Docker is not available on this machine (`docker info` fails)");
    true
}

/// Builds the test images once per test process: the base (debootstrap), and tessera:test
/// from deploy/Dockerfile.
fn images() {
    static ONCE: std::sync::Mutex<bool> = std::sync::Mutex::new(false);
    let mut done = ONCE.lock().unwrap_or_else(|e| e.into_inner());
    if *done {
        return;
    }
    let tmp = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("docker");
    std::fs::create_dir_all(&tmp).unwrap();
    if !docker(&["image", "inspect", BASE])
        .output()
        .unwrap()
        .status
        .success()
    {
        let rootfs = tmp.join("rootfs");
        let _ = std::fs::remove_dir_all(&rootfs);
        run(Command::new("debootstrap").args([
            "--variant=minbase",
            "--include=libvulkan1,libglvnd0,ca-certificates",
            "bookworm",
            rootfs.to_str().unwrap(),
            "http://deb.debian.org/debian",
        ]));
        let mut tar = Command::new("tar")
            .args(["-C", rootfs.to_str().unwrap(), "-c", "."])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        run(docker(&["import", "-", BASE]).stdin(tar.stdout.take().unwrap()));
        assert!(
            tar.wait().unwrap().success(),
            "tar of the root file system failed"
        );
        let _ = std::fs::remove_dir_all(&rootfs);
    }
    // The builder: the base plus this build's binary at /out/tessera.
    let ctx = tmp.join("builder");
    std::fs::create_dir_all(&ctx).unwrap();
    std::fs::copy(env!("CARGO_BIN_EXE_tessera"), ctx.join("tessera")).unwrap();
    // Without its line tables (600 MB of them), as the Dockerfile's own build strips it.
    let _ = Command::new("strip").arg(ctx.join("tessera")).status();
    std::fs::write(
        ctx.join("Dockerfile"),
        format!("FROM {BASE}\nCOPY tessera /out/tessera\n"),
    )
    .unwrap();
    run(&mut docker(&[
        "build",
        "-q",
        "-t",
        "tessera-test-builder:latest",
        ctx.to_str().unwrap(),
    ]));
    run(docker(&[
        "build",
        "-q",
        "-f",
        "deploy/Dockerfile",
        "--build-arg",
        "BUILDER=tessera-test-builder:latest",
        "--build-arg",
        &format!("BASE={BASE}"),
        "-t",
        IMAGE,
        ".",
    ])
    .current_dir(repo()));
    // The image runs as a non-root user and answers as tessera.
    let o = run(&mut docker(&[
        "run",
        "--rm",
        "--entrypoint",
        "id",
        IMAGE,
        "-u",
    ]));
    assert_eq!(stdout(&o), "10001");
    *done = true;
}

fn compose_cmd() -> Vec<String> {
    let plugin = Command::new("docker")
        .args(["compose", "version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if plugin {
        vec!["docker".into(), "compose".into()]
    } else {
        vec!["docker-compose".into()]
    }
}

/// A compose project, brought down (with its network) when dropped.
struct Project {
    name: String,
    env: Vec<(String, String)>,
    http: String,
}

impl Project {
    fn up(workers: usize) -> Project {
        let model = smollm2();
        let tmp = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("docker");
        let env_file = tmp.join(format!("tessera-{}.env", std::process::id()));
        let token = format!("compose-test-{}", std::process::id());
        // The exact path: the answers are compared with transformers' reference text.
        std::fs::write(
            &env_file,
            format!("TESSERA_TOKEN={token}\nTESSERA_EXACT=true\n"),
        )
        .unwrap();
        let port = common::free_port();
        let p = Project {
            name: format!("tesseratest{}", std::process::id()),
            env: vec![
                ("TESSERA_IMAGE".into(), IMAGE.into()),
                ("TESSERA_ENV_FILE".into(), env_file.display().to_string()),
                (
                    "TESSERA_MODELS".into(),
                    model.parent().unwrap().display().to_string(),
                ),
                (
                    "TESSERA_MODEL_FILE".into(),
                    model.file_name().unwrap().to_string_lossy().into(),
                ),
                ("TESSERA_WORKERS".into(), workers.to_string()),
                ("TESSERA_HTTP_PORT".into(), port.to_string()),
            ],
            http: format!("127.0.0.1:{port}"),
        };
        run(&mut p.compose(&["up", "-d", "--scale", &format!("worker={workers}")]));
        p
    }

    fn compose(&self, args: &[&str]) -> Command {
        let cmd = compose_cmd();
        let mut c = Command::new(&cmd[0]);
        c.args(&cmd[1..])
            .args(["-f", "deploy/compose.yaml", "-p", &self.name])
            .args(args)
            .current_dir(repo())
            .envs(self.env.iter().cloned());
        c
    }

    fn network(&self) -> String {
        format!("{}_tessera", self.name)
    }

    fn containers(&self, service: &str) -> Vec<String> {
        let o = run(&mut self.compose(&["ps", "-q", service]));
        let mut ids: Vec<String> = stdout(&o).lines().map(str::to_string).collect();
        ids.sort();
        ids
    }

    fn wait_healthy(&self, what: &str) {
        let t = Instant::now();
        loop {
            let ok = std::panic::catch_unwind(|| get(&self.http, "/health").status == 200)
                .unwrap_or(false);
            if ok {
                return;
            }
            if t.elapsed() > Duration::from_secs(240) {
                let logs = self.compose(&["logs", "--tail", "30"]).output().unwrap();
                panic!(
                    "{what}: the cluster did not become ready\n{}",
                    String::from_utf8_lossy(&logs.stdout)
                );
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

impl Drop for Project {
    fn drop(&mut self) {
        let _ = self
            .compose(&["down", "-v", "--timeout", "1"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

fn ip_of(container: &str, network: &str) -> String {
    let o = run(&mut docker(&[
        "inspect",
        "-f",
        &format!("{{{{(index .NetworkSettings.Networks \"{network}\").IPAddress}}}}"),
        container,
    ]));
    stdout(&o)
}

fn completion(p: &Project, prompt: &str, n: usize) -> (u16, serde_json::Value) {
    let r = post(
        &p.http,
        "/v1/completions",
        &json!({"prompt": prompt, "max_tokens": n, "temperature": 0, "ignore_eos": true}),
    );
    let status = r.status;
    (status, r.json())
}

const STORY: &str = "Write a very long story about a lighthouse keeper.";
const STORY_TOKENS: usize = 64;

/// What an interrupted stream said.
struct Interrupted {
    text: String,
    done: bool,
    errors: Vec<String>,
    /// Tokens that arrived after the cut.
    after_cut: usize,
}

/// Streams the greedy story, runs `cut` once 6 tokens have arrived, and reads the rest.
fn interrupted_stream(p: &Project, cut: impl FnOnce()) -> Interrupted {
    let body = json!({"prompt": STORY, "max_tokens": STORY_TOKENS, "temperature": 0,
                      "ignore_eos": true, "stream": true});
    let s = send(&p.http, "POST", "/v1/completions", Some(&body.to_string()));
    let mut cut = Some(cut);
    let mut out = Interrupted {
        text: String::new(),
        done: false,
        errors: Vec::new(),
        after_cut: 0,
    };
    let mut tokens = 0;
    let status = common::http::stream_events(s, |e| {
        if e == "[DONE]" {
            out.done = true;
            return;
        }
        let v: serde_json::Value = serde_json::from_str(&e).unwrap();
        if v.get("error").is_some() {
            out.errors.push(e);
            return;
        }
        out.text
            .push_str(v["choices"][0]["text"].as_str().unwrap_or(""));
        tokens += 1;
        if cut.is_none() {
            out.after_cut += 1;
        }
        if tokens == 6
            && let Some(c) = cut.take()
        {
            c();
        }
    });
    assert_eq!(status, 200);
    out
}

/// Waits until `n` workers serve.
fn wait_serving(p: &Project, n: usize, what: &str) {
    let t = Instant::now();
    loop {
        let c = get(&p.http, "/v1/cluster").json();
        let ready = c["workers"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|w| w["state"] == "ready")
            .count();
        if ready == n && c["ready"] == true {
            return;
        }
        if t.elapsed() > Duration::from_secs(180) {
            let logs = p.compose(&["logs", "--tail", "60"]).output().unwrap();
            panic!(
                "{what}: {c:#}\n{}{}",
                String::from_utf8_lossy(&logs.stdout),
                String::from_utf8_lossy(&logs.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[test]
fn compose_cluster_serves_survives_a_crash_an_intruder_and_a_network_cut_and_grows() {
    if no_docker("compose_cluster_serves_survives_a_crash_an_intruder_and_a_network_cut_and_grows")
    {
        return;
    }
    let r = reference("smollm2-135m-q4_1");
    let case = &r.cases[0];
    let want = case.greedy_text.as_deref().unwrap();
    images();
    let p = Project::up(3);
    p.wait_healthy("start");

    // Four containers, each with its own address; the three workers hold the three shards.
    let workers = p.containers("worker");
    let coordinator = p.containers("coordinator");
    assert_eq!((workers.len(), coordinator.len()), (3, 1));
    let mut ips: Vec<String> = workers
        .iter()
        .chain(&coordinator)
        .map(|c| ip_of(c, &p.network()))
        .collect();
    ips.sort();
    ips.dedup();
    assert_eq!(ips.len(), 4, "{ips:?}");
    let cluster = get(&p.http, "/v1/cluster").json();
    let ready: Vec<&serde_json::Value> = cluster["workers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|w| w["state"] == "ready")
        .collect();
    assert_eq!(ready.len(), 3, "{cluster:#}");
    for w in &ready {
        let host = w["grpc_addr"].as_str().unwrap().rsplit_once(':').unwrap().0;
        assert!(
            ips.iter().any(|ip| ip == host),
            "{host} is no container's address"
        );
    }
    let (status, v) = completion(&p, &case.prompt, case.greedy_ids.len());
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["choices"][0]["text"], want);

    // The undisturbed story, for the streams that lose a worker below.
    let (status, v) = completion(&p, STORY, STORY_TOKENS);
    assert_eq!(status, 200, "{v}");
    let story = v["choices"][0]["text"].as_str().unwrap().to_string();

    // A worker crashes mid-generation (SIGKILL to its process, as an OOM kill or a crash
    // would; Docker treats `docker kill` as a deliberate stop and would not restart it). The
    // cluster reshards over the two that remain and the stream carries on: the client sees a
    // delay, not an error, and the undisturbed text.
    let victim = workers[1].clone();
    let got = interrupted_stream(&p, || {
        let pid = stdout(&run(&mut docker(&[
            "inspect",
            "-f",
            "{{.State.Pid}}",
            &victim,
        ])));
        run(Command::new("kill").args(["-9", &pid]));
    });
    assert!(got.errors.is_empty(), "error events: {:?}", got.errors);
    assert!(got.done, "the stream did not finish");
    assert!(got.after_cut > 0, "the stream ended before the crash");
    assert_eq!(got.text, story);
    // The restart policy brings it back; it registers again and the cluster goes back to
    // three workers.
    wait_serving(&p, 3, "after the crash");
    let restarts = stdout(&run(&mut docker(&[
        "inspect",
        "-f",
        "{{.RestartCount}}",
        &victim,
    ])));
    assert!(
        restarts.parse::<u32>().unwrap() >= 1,
        "restarted {restarts} times"
    );
    let (status, v) = completion(&p, &case.prompt, case.greedy_ids.len());
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["choices"][0]["text"], want);

    // A worker with the wrong secret is refused, and the cluster keeps serving.
    let o = docker(&[
        "run",
        "--rm",
        "--network",
        &p.network(),
        "-e",
        "TESSERA_TOKEN=wrong",
        IMAGE,
    ])
    .args([
        "worker",
        "--coordinator",
        "coordinator:7060",
        "--name",
        "intruder",
    ])
    .output()
    .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "the intruder was accepted: {err}");
    assert!(err.contains("refused"), "{err}");
    let cluster = get(&p.http, "/v1/cluster").json();
    assert!(!cluster.to_string().contains("intruder"), "{cluster:#}");
    let (status, v) = completion(&p, &case.prompt, case.greedy_ids.len());
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["choices"][0]["text"], want);

    // A network cut: one worker loses the network mid-request. The others carry the stream
    // on (resharded over two) and serve meanwhile; once the network is back the worker
    // rejoins and the cluster is three again.
    let cut = workers[2].clone();
    let net = p.network();
    let got = interrupted_stream(&p, || {
        run(&mut docker(&["network", "disconnect", &net, &cut]));
    });
    assert!(got.errors.is_empty(), "error events: {:?}", got.errors);
    assert!(got.done && got.after_cut > 0);
    assert_eq!(got.text, story);
    wait_serving(&p, 2, "without the cut-off worker");
    let (status, v) = completion(&p, &case.prompt, case.greedy_ids.len());
    assert_eq!(status, 200, "two workers of three did not serve: {v}");
    assert_eq!(v["choices"][0]["text"], want);
    run(&mut docker(&["network", "connect", &net, &cut]));
    wait_serving(&p, 3, "after reconnecting");
    let (status, v) = completion(&p, &case.prompt, case.greedy_ids.len());
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["choices"][0]["text"], want);

    // Growing: a fourth worker container joins and the coordinator reshards over all four.
    run(&mut p.compose(&["up", "-d", "--scale", "worker=4"]));
    wait_serving(&p, 4, "did not grow");
    let (status, v) = completion(&p, &case.prompt, case.greedy_ids.len());
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["choices"][0]["text"], want);
    drop(p);
}

#[test]
fn kubernetes_manifests_pass_schema_validation_and_agree_with_each_other() {
    let dir = repo().join("deploy/k8s");
    let files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    assert!(files.len() >= 4, "{files:?}");
    // The schemas of Kubernetes itself (kubernetes-validate from PyPI, offline).
    let validator = std::env::var("TESSERA_K8S_VALIDATE").unwrap_or("kubernetes-validate".into());
    match Command::new(&validator)
        .arg("--strict")
        .args(&files)
        .output()
    {
        Ok(o) => assert!(
            o.status.success(),
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
        Err(e) => {
            assert!(
                std::env::var_os("TESSERA_REQUIRE_DOCKER").is_none(),
                "{validator} is missing ({e}); .ci/run installs it"
            );
            eprintln!("SKIPPED the schema check: {validator} is not installed ({e})");
        }
    }
    // What the schemas cannot see: the pieces must fit together.
    let text = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap();
    let coord = text("coordinator.yaml");
    let workers = text("workers.yaml");
    let arg = |doc: &str, flag: &str| -> String {
        doc.lines()
            .find_map(|l| l.trim().strip_prefix(&format!("- --{flag}=")))
            .unwrap_or_else(|| panic!("no --{flag}"))
            .to_string()
    };
    let replicas = workers
        .lines()
        .find_map(|l| l.trim().strip_prefix("replicas: "))
        .unwrap();
    assert_eq!(
        arg(&coord, "workers"),
        replicas,
        "coordinator --workers != replicas"
    );
    assert_eq!(arg(&workers, "coordinator"), "tessera-coordinator:7060");
    assert!(coord.contains("name: tessera-coordinator\n") && coord.contains("port: 7060"));
    assert!(arg(&coord, "listen").ends_with(":7060") && arg(&coord, "http").ends_with(":8080"));
    assert!(arg(&workers, "health-listen").ends_with(":7072"));
    assert!(
        workers.contains("serviceName: tessera-workers") && workers.contains("clusterIP: None")
    );
    assert_eq!(arg(&coord, "model"), arg(&workers, "model"));
    for doc in [&coord, &workers] {
        assert!(
            doc.contains("name: tessera-secret"),
            "the secret is not used"
        );
        assert!(doc.contains("path: /health"), "no health probe");
    }
    assert!(text("secret.yaml").contains("TESSERA_TOKEN:"));
    let gpu = text("workers-gpu.yaml");
    assert!(gpu.contains("nvidia.com/gpu: 1") && gpu.contains("--backend=wgpu"));
    // And the binary accepts every flag the manifests give it.
    for (doc, role) in [
        (&coord, "coordinator"),
        (&workers, "worker"),
        (&gpu, "worker"),
    ] {
        for line in doc.lines().map(str::trim) {
            if let Some(flag) = line.strip_prefix("- --") {
                let name = flag.split('=').next().unwrap();
                let help = Command::new(env!("CARGO_BIN_EXE_tessera"))
                    .args([role, "--help"])
                    .output()
                    .unwrap();
                assert!(
                    String::from_utf8_lossy(&help.stdout).contains(&format!("--{name}")),
                    "tessera {role} has no --{name}"
                );
            }
        }
    }
}

#[test]
fn systemd_units_verify() {
    let Ok(o) = Command::new("systemd-analyze").arg("--version").output() else {
        eprintln!("SKIPPED systemd_units_verify: systemd-analyze is not installed");
        return;
    };
    assert!(o.status.success());
    // Verified as installed: the ExecStart path must exist, so point it at this build.
    let tmp = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("systemd");
    std::fs::create_dir_all(&tmp).unwrap();
    for unit in ["tessera-worker.service", "tessera-coordinator.service"] {
        let text = std::fs::read_to_string(repo().join("deploy/systemd").join(unit)).unwrap();
        assert!(text.contains("EnvironmentFile=/etc/tessera/tessera.env"));
        assert!(text.contains("Restart=always"));
        let local = text.replace("/usr/local/bin/tessera", env!("CARGO_BIN_EXE_tessera"));
        let path = tmp.join(unit);
        std::fs::write(&path, local).unwrap();
        let o = Command::new("systemd-analyze")
            .args(["verify", path.to_str().unwrap()])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        // Any complaint fails (an unknown key is only a warning, exit status 0); one about the
        // machine (no /etc/tessera here) is not the unit's.
        let real: Vec<&str> = err
            .lines()
            .filter(|l| !l.contains("/etc/tessera/tessera.env") && !l.trim().is_empty())
            .collect();
        assert!(real.is_empty(), "{unit}:\n{err}");
    }
}
