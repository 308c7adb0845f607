//! The daemon's own memory use (`/proc/self/status`), for status reports and metrics: memory
//! bounded by the NVRAM plus a constant is a promise operators check.

/// Resident memory of this process, from `/proc/self/status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct Resident {
    /// VmRSS: resident now, bytes.
    pub rss_bytes: u64,
    /// VmHWM: the high-water mark of the resident set, bytes.
    pub peak_bytes: u64,
    /// RssAnon: the resident heap and stacks, bytes, without mapped files (the NVRAM): what
    /// the daemon's own data structures hold.
    pub anon_bytes: u64,
}

impl std::fmt::Display for Resident {
    /// "12.3 MiB resident, 4.5 MiB of it heap (peak 67.8 MiB)", as both status commands print.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mib = |b: u64| b as f64 / (1 << 20) as f64;
        write!(
            f,
            "{:.1} MiB resident, {:.1} MiB of it heap (peak {:.1} MiB)",
            mib(self.rss_bytes),
            mib(self.anon_bytes),
            mib(self.peak_bytes)
        )
    }
}

/// This process's resident memory; `None` where /proc does not tell (not Linux, no procfs).
pub fn resident() -> Option<Resident> {
    parse_status(&std::fs::read_to_string("/proc/self/status").ok()?)
}

/// Parse the VmRSS, VmHWM and RssAnon lines ("VmRSS:\t  1234 kB") of a `/proc/PID/status`
/// text.
pub fn parse_status(text: &str) -> Option<Resident> {
    let field = |name: &str| -> Option<u64> {
        let line = text.lines().find(|l| l.starts_with(name))?;
        let kib: u64 = line[name.len()..]
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()?;
        kib.checked_mul(1024)
    };
    Some(Resident {
        rss_bytes: field("VmRSS:")?,
        peak_bytes: field("VmHWM:")?,
        anon_bytes: field("RssAnon:")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_rss_and_peak_and_refuses_garbage() {
        let t = "Name:\tfs-source\nVmHWM:\t  204800 kB\nVmRSS:\t   10240 kB\nRssAnon:\t 2048 kB\nThreads:\t4\n";
        assert_eq!(
            parse_status(t),
            Some(Resident {
                rss_bytes: 10240 * 1024,
                peak_bytes: 204800 * 1024,
                anon_bytes: 2048 * 1024,
            })
        );
        assert_eq!(
            parse_status("VmRSS:\tlots kB\nVmHWM:\t1 kB\nRssAnon:\t1 kB\n"),
            None
        );
        assert_eq!(parse_status(""), None);
        assert_eq!(
            parse_status(t).map(|r| r.to_string()).as_deref(),
            Some("10.0 MiB resident, 2.0 MiB of it heap (peak 200.0 MiB)")
        );
        assert!(resident().is_some_and(|r| r.rss_bytes > 0 && r.peak_bytes >= r.rss_bytes));
    }
}
