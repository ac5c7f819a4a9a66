//! The emulated network (deploy/netem/netem.sh): the coordinator and two workers each in its
//! own network namespace, every link shaped to 1 Gbit/s with 1 ms of one-way latency (htb and
//! the netdelay relay). The demo model answers with the reference tokens, and the all-reduce
//! really pays the link's latency.
//!
//! Needs root, `ip` and /dev/net/tun; skips with a message where they are missing unless
//! TESSERA_REQUIRE_NETNS is set (.ci/run sets it).

mod common;

use common::{reference, smollm2};
use std::path::PathBuf;
use std::process::Command;

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("deploy/netem/netem.sh")
}

fn netdelay() -> PathBuf {
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_tessera"));
    bin.parent().unwrap().join("examples/netdelay")
}

fn netns_possible() -> Result<(), String> {
    if unsafe { libc_geteuid() } != 0 {
        return Err("not root".into());
    }
    if !std::path::Path::new("/dev/net/tun").exists() {
        return Err("no /dev/net/tun".into());
    }
    let probe = "tessera-netns-probe";
    let ok = Command::new("ip")
        .args(["netns", "add", probe])
        .status()
        .map_err(|e| format!("ip: {e}"))?
        .success();
    let _ = Command::new("ip").args(["netns", "del", probe]).status();
    if !ok {
        return Err("`ip netns add` failed".into());
    }
    if !netdelay().exists() {
        return Err(format!("{} is not built", netdelay().display()));
    }
    Ok(())
}

unsafe extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}

/// Runs netem.sh with this test's namespace prefix; tears everything down when dropped.
struct Net {
    prefix: String,
    /// Held until the namespaces are gone (fields drop after `drop`).
    _one: std::sync::MutexGuard<'static, ()>,
}

impl Net {
    fn sh(&self, args: &[&str]) -> std::process::Output {
        Command::new("bash")
            .arg(script())
            .args(args)
            .env("NETEM_PREFIX", &self.prefix)
            .env("TESSERA", env!("CARGO_BIN_EXE_tessera"))
            .env("NETDELAY", netdelay())
            .env("TESSERA_TOKEN", "netem-test-token")
            .output()
            .expect("bash")
    }
}

/// The emulated network for one test, or None (having said why) where namespaces are
/// impossible here and not required. One at a time: each test's cluster has the machine's
/// cores to itself, so timings that a test checks are not another test's.
fn net(tag: &str) -> Option<Net> {
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    if let Err(why) = netns_possible() {
        assert!(
            std::env::var_os("TESSERA_REQUIRE_NETNS").is_none(),
            "network namespaces are required here: {why}"
        );
        eprintln!("SKIPPED: network namespaces impossible here: {why}");
        return None;
    }
    Some(Net {
        prefix: format!("{tag}{}", std::process::id() % 100_000),
        _one: ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner()),
    })
}

impl Net {
    fn ok(&self, args: &[&str]) -> String {
        let o = self.sh(args);
        assert!(
            o.status.success(),
            "netem.sh {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    }

    /// `tessera generate` of `n` tokens, from the coordinator's namespace.
    fn generate(&self, addr: &str, prompt: &str, n: usize) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &format!("{}-c", self.prefix)])
            .arg(env!("CARGO_BIN_EXE_tessera"))
            .args(["generate", "--coordinator", addr, "--prompt", prompt])
            .args(["--max-tokens", &n.to_string()])
            .args(["--ids", "--ignore-eos"])
            .env("TESSERA_TOKEN", "netem-test-token");
        c
    }

    fn coordinator_log(&self) -> String {
        std::fs::read_to_string(format!("/tmp/{}/coordinator.log", self.prefix)).unwrap()
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        let _ = self.sh(&["down"]);
    }
}

#[test]
fn two_workers_behind_shaped_delayed_links_answer_like_loopback() {
    let Some(net) = net("tt") else {
        return;
    };
    net.ok(&["up", "2", "1gbit", "1000"]);
    let model = smollm2();
    let addr = net.ok(&["cluster", model.to_str().unwrap(), "--exact"]);
    assert_eq!(addr, "10.77.0.2:7060");

    let r = reference("smollm2-135m-q4_1");
    let case = &r.cases[0];
    let o = net
        .generate(&addr, &case.prompt, case.greedy_ids.len())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    let want: Vec<String> = case.greedy_ids.iter().map(|t| t.to_string()).collect();
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), want.join(" "));
    // Each all-reduce waits for the peer's partial, which crosses one 1 ms link.
    let mean: f64 = err
        .split("all-reduce: ")
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no all-reduce figure in {err}"));
    eprintln!("all-reduce across the emulated 1 ms link: {mean} us mean");
    assert!(
        mean >= 1000.0,
        "all-reduce {mean} us: the delay was not applied"
    );
    assert!(
        mean < 5000.0,
        "all-reduce {mean} us: far more than the link's latency"
    );
}

/// Every packet between the two workers dropped for 9 s (their link alone: both still reach
/// the coordinator) outlasts the transport's 5 s timeout, so their all-reduce mesh breaks
/// under a waiting request, while both processes and their shards stay well. The coordinator
/// has them rebuild the mesh where the shards are (nothing loaded or shipped again), and the
/// request answers with the reference tokens. Twice, so that the second rebuild starts from
/// the mesh the first one made; then a cut of 25 s, longer than a worker waits for its peers
/// to join a new mesh, so that the first rebuild fails and a second one mends it.
#[test]
fn a_stall_between_two_workers_is_mended_by_a_new_mesh_not_a_reload() {
    let Some(net) = net("ts") else {
        return;
    };
    net.ok(&["up", "2", "none", "100"]);
    let model = smollm2();
    let addr = net.ok(&["cluster", model.to_str().unwrap(), "--exact"]);
    let r = reference("smollm2-135m-q4_1");
    let case = &r.cases[0];
    let want: Vec<String> = case.greedy_ids.iter().map(|t| t.to_string()).collect();
    let want = want.join(" ");
    let n = case.greedy_ids.len();
    // The third cut outlasts the workers' 15 s patience for a new mesh: the first rebuild
    // fails, and the coordinator asks again rather than ship the shards.
    // The cuts leave seconds to spare on either side of the 5 s timeout and the 15 s
    // patience, so that a loaded machine's delays do not change what happens.
    for (round, cut_secs) in [(1, 8), (2, 8), (3, 24)] {
        net.ok(&["cut", "1", "2", "on"]);
        // The request's first step waits in an all-reduce that the cut holds up.
        std::thread::sleep(std::time::Duration::from_secs(1));
        let started = std::time::Instant::now();
        let g = net
            .generate(&addr, &case.prompt, n)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_secs(cut_secs));
        net.ok(&["cut", "1", "2", "off"]);
        let o = g.wait_with_output().unwrap();
        let took = started.elapsed();
        let log = net.coordinator_log();
        assert!(
            o.status.success(),
            "round {round}: {}\n{log}",
            String::from_utf8_lossy(&o.stderr)
        );
        assert_eq!(
            String::from_utf8_lossy(&o.stdout).trim(),
            want,
            "round {round}: {log}"
        );
        assert!(
            took.as_secs_f64() > 5.0,
            "round {round}: answered in {took:?}, so the cut held nothing up"
        );
        let broke = log.matches("mesh broke").count();
        let rebuilt = log.matches("rebuilding the mesh, the shards stay").count();
        let adopted = log.matches("rebuilt as mesh").count();
        assert_eq!((rebuilt, adopted), (round, round), "round {round}: {log}");
        assert!(broke >= round, "round {round}: {log}");
        let retried = log.matches("rebuilding the mesh failed").count();
        assert_eq!(retried > 0, round == 3, "round {round}: {log}");
    }
    let log = net.coordinator_log();
    assert_eq!(log.matches(": shipped ").count(), 2, "{log}");
    for never in ["resharding", "loading anew", "loading the shards failed"] {
        assert!(!log.contains(never), "{never:?} in\n{log}");
    }
}

/// Workers of one machine share memory for their all-reduces, but a `/dev/shm` too small for
/// the rings (here a 1 MiB tmpfs in a mount namespace of its own) leaves the pair on the
/// datagram lane, with an all-reduce that still works, instead of a process killed by SIGBUS
/// when a page of the full tmpfs is first touched.
#[test]
fn a_full_dev_shm_leaves_the_pair_on_the_datagram_lane() {
    let unshare = |script: &str| {
        std::process::Command::new("unshare")
            .args(["-m", "sh", "-c", script, env!("CARGO_BIN_EXE_tessera")])
            .output()
    };
    let small = "mount -t tmpfs -o size=1m tmpfs /dev/shm";
    match unshare(small) {
        Ok(o) if o.status.success() => {}
        other => {
            let why = format!("{other:?}");
            assert!(
                std::env::var_os("TESSERA_REQUIRE_NETNS").is_none(),
                "mount namespaces are required here: {why}"
            );
            eprintln!("SKIPPED: no mount namespace with a small /dev/shm here: {why}");
            return;
        }
    }
    let o = unshare(&format!(
        "{small} && exec \"$0\" bench --collective --workers 2 --json"
    ))
    .expect("unshare");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = String::from_utf8_lossy(&o.stdout);
    let v: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert_eq!(v["shm_peers"], 0, "{out}");
    assert_eq!(v["lane_peers"], 1, "{out}");
    assert!(
        v["p50_us"]["576"].as_f64().is_some_and(|x| x > 0.0),
        "{out}"
    );
}
