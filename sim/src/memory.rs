//! Memory figures of this process, read from `/proc/self/status` (Linux).

/// A `kB` field of `/proc/self/status` in bytes, e.g. `VmHWM` (peak resident set).
pub fn status_bytes(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status.lines().find_map(|line| {
        let rest = line.strip_prefix(field)?.strip_prefix(':')?;
        let kb: u64 = rest.trim().strip_suffix("kB")?.trim().parse().ok()?;
        Some(kb * 1024)
    })
}

/// Peak resident set size of this process so far, in bytes.
pub fn peak_rss() -> Option<u64> {
    status_bytes("VmHWM")
}

/// Current resident set size, in bytes.
pub fn rss() -> Option<u64> {
    status_bytes("VmRSS")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peak_is_at_least_current_on_linux() {
        if cfg!(target_os = "linux") {
            // The peak is read after the current size, so it cannot be smaller.
            let now = rss().unwrap();
            let peak = peak_rss().unwrap();
            assert!(peak >= now && now > 0, "{peak} {now}");
        }
        assert_eq!(status_bytes("NoSuchField"), None);
    }
}
