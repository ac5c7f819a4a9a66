//! This process's memory, as the kernel counts it (Linux `/proc/self/status`), and the memory
//! it may use: what the machine has available, or less where its cgroup (a container's
//! `--memory`, a systemd `MemoryMax`, Kubernetes limits) caps it.

/// Resident set size now, in bytes (None where `/proc` is not available).
pub fn rss_bytes() -> Option<u64> {
    status_kib("VmRSS:").map(|k| k * 1024)
}

/// The peak resident set size of this process so far, in bytes.
pub fn peak_rss_bytes() -> Option<u64> {
    status_kib("VmHWM:").map(|k| k * 1024)
}

/// Memory this process may use: the machine's available memory, or its cgroup's limit where
/// that is lower (cgroup v2 `memory.max` or v1 `memory.limit_in_bytes`, of its own cgroup and
/// every ancestor).
pub fn available_bytes() -> Option<u64> {
    let avail = std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| {
        m.lines()
            .find(|l| l.starts_with("MemAvailable:"))?
            .split_whitespace()
            .nth(1)?
            .parse::<u64>()
            .ok()
            .map(|k| k * 1024)
    });
    match (avail, cgroup_limit_bytes()) {
        (Some(a), Some(c)) => Some(a.min(c)),
        (a, c) => a.or(c),
    }
}

/// The tightest memory limit of this process's cgroup and its ancestors, if any is set.
pub fn cgroup_limit_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let mut best: Option<u64> = None;
    for line in text.lines() {
        // hierarchy-id:controllers:path
        let mut f = line.splitn(3, ':');
        let (_, ctrls, path) = (f.next()?, f.next()?, f.next()?);
        let (root, file) = if ctrls.is_empty() {
            ("/sys/fs/cgroup", "memory.max")
        } else if ctrls.split(',').any(|c| c == "memory") {
            ("/sys/fs/cgroup/memory", "memory.limit_in_bytes")
        } else {
            continue;
        };
        let mut dir = std::path::PathBuf::from(root).join(path.trim_start_matches('/'));
        loop {
            if let Ok(v) = std::fs::read_to_string(dir.join(file))
                && let Ok(n) = v.trim().parse::<u64>()
                // v1 writes "unlimited" as a huge number.
                && n < 1 << 60
            {
                best = Some(best.map_or(n, |b| b.min(n)));
            }
            if !dir.pop() || !dir.starts_with(root) || dir.as_os_str().len() < root.len() {
                break;
            }
        }
    }
    best
}

fn status_kib(key: &str) -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    s.lines()
        .find(|l| l.starts_with(key))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_this_process() {
        if std::path::Path::new("/proc/self/status").exists() {
            let rss = super::rss_bytes().unwrap();
            assert!(rss > 0 && super::peak_rss_bytes().unwrap() >= rss);
        }
    }
}
