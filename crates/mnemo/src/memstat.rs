//! The process's memory as Linux reports it (`/proc/self/status`): resident set now
//! (`VmRSS`) and at its peak (`VmHWM`), split into anonymous memory (`RssAnon`: heap, the
//! parameters that were written, KV caches) and file pages (`RssFile`: the mapped checkpoint
//! pages that were read). On other systems every field is `None`.

/// Bytes of each field, when the system reports it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemStatus {
    pub rss: Option<u64>,
    pub peak_rss: Option<u64>,
    pub rss_anon: Option<u64>,
    pub rss_file: Option<u64>,
}

impl MemStatus {
    /// Now.
    pub fn now() -> Self {
        std::fs::read_to_string("/proc/self/status")
            .map(|s| Self::parse(&s))
            .unwrap_or_default()
    }

    /// From the text of a `/proc/PID/status` file (`Name:   1234 kB` lines).
    pub fn parse(text: &str) -> Self {
        let field = |key: &str| {
            text.lines().find_map(|l| {
                let rest = l.strip_prefix(key)?.strip_prefix(':')?;
                let kb: u64 = rest.trim().strip_suffix("kB")?.trim().parse().ok()?;
                Some(kb * 1024)
            })
        };
        MemStatus {
            rss: field("VmRSS"),
            peak_rss: field("VmHWM"),
            rss_anon: field("RssAnon"),
            rss_file: field("RssFile"),
        }
    }

    /// One line for logs: `RSS 1.23 GB (peak 1.50 GB; anon 0.80 GB, file 0.43 GB)`.
    pub fn describe(&self) -> String {
        let gb =
            |b: Option<u64>| b.map_or("?".to_string(), |b| format!("{:.2} GB", b as f64 / 1e9));
        format!(
            "RSS {} (peak {}; anon {}, file {})",
            gb(self.rss),
            gb(self.peak_rss),
            gb(self.rss_anon),
            gb(self.rss_file)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_status() {
        let t = "Name:\tmnemo\nVmHWM:\t  2048 kB\nVmRSS:\t  1024 kB\nRssAnon:\t 1000 kB\nRssFile:\t  24 kB\n";
        let m = MemStatus::parse(t);
        assert_eq!(m.rss, Some(1024 * 1024));
        assert_eq!(m.peak_rss, Some(2048 * 1024));
        assert_eq!(m.rss_anon, Some(1000 * 1024));
        assert_eq!(m.rss_file, Some(24 * 1024));
        assert_eq!(MemStatus::parse("VmRSS: x kB").rss, None);
        if cfg!(target_os = "linux") {
            assert!(MemStatus::now().rss.is_some_and(|r| r > 0));
        }
    }
}
