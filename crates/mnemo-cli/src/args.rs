//! Value parsers shared by several commands' flags, so a bad value gets one clear message
//! naming what is allowed (clap prints it as `invalid value '…' for '--flag': MESSAGE`).

/// `--temperature`: a finite number >= 0 (0 = greedy). Flags using it set
/// `allow_negative_numbers`, so `--temperature -1` reaches this check instead of clap's
/// "unexpected argument" tip.
pub fn temperature(s: &str) -> Result<f32, String> {
    let t: f32 = s
        .trim()
        .parse()
        .map_err(|_| format!("expected a number >= 0 (0 = greedy), got `{s}`"))?;
    if !(t.is_finite() && t >= 0.0) {
        return Err(format!("must be a number >= 0 (0 = greedy), got {s}"));
    }
    Ok(t)
}

/// A size in bytes: `0`, `1048576`, `64K`, `512M`, `1.5G`, `2GiB`, `300MB` (K/M/G/T are powers
/// of 1024, with or without a trailing `B` / `iB`).
pub fn size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let lower = t.to_ascii_lowercase();
    let body = lower
        .strip_suffix("ib")
        .or_else(|| lower.strip_suffix('b'))
        .unwrap_or(&lower);
    let (num, mult) = match body.chars().last() {
        Some('k') => (&body[..body.len() - 1], 1u64 << 10),
        Some('m') => (&body[..body.len() - 1], 1 << 20),
        Some('g') => (&body[..body.len() - 1], 1 << 30),
        Some('t') => (&body[..body.len() - 1], 1 << 40),
        _ => (body, 1),
    };
    let bad = || format!("expected a size such as 0, 512M, 2G or 1048576, got `{s}`");
    let x: f64 = num.trim().parse().map_err(|_| bad())?;
    if !(x.is_finite() && x >= 0.0) {
        return Err(bad());
    }
    Ok((x * mult as f64).round() as u64)
}

/// `1.5 GiB`, `163.2 MiB`, `12.0 KiB`, `512 B`.
pub fn human_size(b: u64) -> String {
    let units = ["KiB", "MiB", "GiB", "TiB"];
    let mut x = b as f64;
    if x < 1024.0 {
        return format!("{b} B");
    }
    let mut u = 0;
    x /= 1024.0;
    while x >= 1024.0 && u + 1 < units.len() {
        x /= 1024.0;
        u += 1;
    }
    format!("{x:.1} {}", units[u])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temperatures_and_sizes() {
        assert_eq!(temperature("0"), Ok(0.0));
        assert_eq!(temperature("0.7"), Ok(0.7));
        assert!(temperature("-1").unwrap_err().contains(">= 0"));
        assert!(temperature("nan").unwrap_err().contains(">= 0"));
        assert!(temperature("hot").unwrap_err().contains("`hot`"));
        assert_eq!(size("0"), Ok(0));
        assert_eq!(size("4096"), Ok(4096));
        assert_eq!(size("64K"), Ok(64 << 10));
        assert_eq!(size("512M"), Ok(512 << 20));
        assert_eq!(size("512MB"), Ok(512 << 20));
        assert_eq!(size("2GiB"), Ok(2 << 30));
        assert_eq!(size("1.5g"), Ok(3 << 29));
        assert!(size("lots").is_err() && size("-1G").is_err() && size("").is_err());
        assert_eq!(human_size(512), "512 B");
        assert_eq!(human_size(3 << 29), "1.5 GiB");
    }
}
