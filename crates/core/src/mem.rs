//! This process's memory, as the kernel counts it (Linux `/proc/self/status`).

/// Resident set size now, in bytes (None where `/proc` is not available).
pub fn rss_bytes() -> Option<u64> {
    status_kib("VmRSS:").map(|k| k * 1024)
}

/// The peak resident set size of this process so far, in bytes.
pub fn peak_rss_bytes() -> Option<u64> {
    status_kib("VmHWM:").map(|k| k * 1024)
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
