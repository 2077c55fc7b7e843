//! Output: the plain document, the JSON form, the token table and the reports for stderr.

use crate::types::{Mode, Pack, PackedFile};
use std::collections::BTreeMap;
use std::fmt::Write as _;

fn push_section(s: &mut String, f: &PackedFile) {
    s.push_str(&f.header());
    s.push('\n');
    s.push_str(&f.content);
    if !f.content.is_empty() && !f.content.ends_with('\n') {
        s.push('\n');
    }
    s.push('\n');
}

pub(crate) fn render_files<'a>(files: impl Iterator<Item = &'a PackedFile>) -> String {
    let mut s = String::new();
    for f in files {
        push_section(&mut s, f);
    }
    s
}

/// The plain document: per file a header line, the content and a blank line.
pub fn render_plain(p: &Pack) -> String {
    render_files(p.files.iter())
}

/// The document to put in a model's context (the plain form).
pub fn context_text(p: &Pack) -> String {
    render_plain(p)
}

/// The JSON form: `{root, files: [{path, language, bytes, tokens, file_tokens, mode, rank,
/// content}], excluded: [{path, kind, detail, reason}], cut, totals}` (no timings, so it is
/// deterministic).
pub fn render_json(p: &Pack) -> serde_json::Value {
    use serde_json::json;
    let files: Vec<_> = p
        .files
        .iter()
        .map(|f| {
            json!({
                "path": f.path,
                "language": f.language,
                "bytes": f.bytes,
                "tokens": f.tokens,
                "file_tokens": f.file_tokens,
                "mode": f.mode.as_str(),
                "rank": f.rank,
                "content": f.content,
            })
        })
        .collect();
    let excluded: Vec<_> = p
        .excluded
        .iter()
        .map(|e| {
            json!({
                "path": e.path,
                "kind": e.kind.as_str(),
                "detail": e.detail,
                "reason": e.reason(),
            })
        })
        .collect();
    let by_kind: serde_json::Map<String, serde_json::Value> = p
        .excluded_by_kind()
        .into_iter()
        .map(|(k, n)| (k.as_str().to_string(), json!(n)))
        .collect();
    let cut = p.cut.as_ref().map(|c| {
        json!({
            "max_tokens": c.max_tokens,
            "query": c.query,
            "document_tokens": c.document_tokens,
            "whole": c.whole,
            "signatures": c.signatures,
            "dropped": c.dropped,
        })
    });
    json!({
        "root": p.root.to_string_lossy(),
        "files": files,
        "excluded": excluded,
        "cut": cut,
        "totals": {
            "files": p.files.len(),
            "bytes": p.total_bytes(),
            "tokens": p.total_tokens(),
            "excluded": p.excluded.len(),
            "excluded_by_kind": by_kind,
            "not_included": p.stats.not_included,
            "partial": p.is_partial(),
        },
    })
}

/// The token table: the total, every directory (all levels, aggregated over everything
/// below it), then every file; each section sorted by tokens (bytes without a tokenizer)
/// descending, then path. Columns: tokens (`-` without a tokenizer), bytes, files, path.
pub fn count_table(p: &Pack) -> String {
    #[derive(Default, Clone, Copy)]
    struct Agg {
        tokens: usize,
        bytes: u64,
        files: usize,
    }
    let mut dirs: BTreeMap<&str, Agg> = BTreeMap::new();
    let mut total = Agg::default();
    let mut file_rows: Vec<(Agg, String)> = Vec::new();
    for f in &p.files {
        let a = Agg {
            tokens: f.tokens.unwrap_or(0),
            bytes: f.content.len() as u64,
            files: 1,
        };
        for (i, _) in f.path.match_indices('/') {
            let d = dirs.entry(&f.path[..=i]).or_default();
            d.tokens += a.tokens;
            d.bytes += a.bytes;
            d.files += 1;
        }
        total.tokens += a.tokens;
        total.bytes += a.bytes;
        total.files += 1;
        let name = if f.mode == Mode::Signatures {
            format!("{} (signatures only)", f.path)
        } else {
            f.path.clone()
        };
        file_rows.push((a, name));
    }
    let key = |a: &Agg| {
        if p.tokenized {
            a.tokens as u64
        } else {
            a.bytes
        }
    };
    let mut dir_rows: Vec<(Agg, String)> =
        dirs.into_iter().map(|(d, a)| (a, d.to_string())).collect();
    dir_rows.sort_by(|x, y| key(&y.0).cmp(&key(&x.0)).then_with(|| x.1.cmp(&y.1)));
    file_rows.sort_by(|x, y| key(&y.0).cmp(&key(&x.0)).then_with(|| x.1.cmp(&y.1)));

    let tok_s = |a: &Agg| {
        if p.tokenized {
            a.tokens.to_string()
        } else {
            "-".to_string()
        }
    };
    let wt = tok_s(&total).len().max("tokens".len());
    let wb = total.bytes.to_string().len().max("bytes".len());
    let wf = total.files.to_string().len().max("files".len());
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:>wt$}  {:>wb$}  {:>wf$}  path",
        "tokens", "bytes", "files"
    );
    let row = |s: &mut String, a: &Agg, files: String, path: &str| {
        let _ = writeln!(
            s,
            "{:>wt$}  {:>wb$}  {:>wf$}  {path}",
            tok_s(a),
            a.bytes,
            files
        );
    };
    row(&mut s, &total, total.files.to_string(), "(total)");
    for (a, d) in &dir_rows {
        row(&mut s, a, a.files.to_string(), d);
    }
    for (a, f) in &file_rows {
        row(&mut s, a, String::new(), f);
    }
    s
}

/// One line per excluded path: `excluded PATH: REASON`.
pub fn excluded_report(p: &Pack) -> String {
    let mut s = String::new();
    for e in &p.excluded {
        let _ = writeln!(s, "excluded {}: {}", e.path, e.reason());
    }
    s
}

/// What the budget cut (None without a budget): a summary line and the cut paths (up to 50
/// of each, rank order).
pub fn cut_report(p: &Pack) -> Option<String> {
    let c = p.cut.as_ref()?;
    let mut s = format!(
        "budget {} tokens{}: document is {} tokens; {} files whole, {} reduced to signatures, \
         {} dropped\n",
        c.max_tokens,
        c.query
            .as_ref()
            .map(|q| format!(" (ranked for query {q:?})"))
            .unwrap_or_default(),
        c.document_tokens,
        c.whole.len(),
        c.signatures.len(),
        c.dropped.len()
    );
    for (what, list) in [("signatures only", &c.signatures), ("dropped", &c.dropped)] {
        if list.is_empty() {
            continue;
        }
        let shown: Vec<&str> = list.iter().take(50).map(String::as_str).collect();
        let more = if list.len() > 50 {
            format!(" … and {} more (see --format json)", list.len() - 50)
        } else {
            String::new()
        };
        let _ = writeln!(s, "  {what}: {}{more}", shown.join(", "));
    }
    Some(s)
}

/// `packed N files (X MB, Y tokens) in Z s: A files/s, B MB/s, C tokens/s; excluded: …`.
/// Rates are over everything read and tokenized (before any cut).
pub fn summary_line(p: &Pack) -> String {
    let st = &p.stats;
    let secs = st.elapsed_s.max(1e-9);
    let mb = p.total_bytes() as f64 / 1e6;
    let tokens = match p.total_tokens() {
        Some(t) => format!("{t} tokens"),
        None => "tokens not counted".into(),
    };
    let mut s = format!(
        "packed {} files ({mb:.2} MB, {tokens}) in {:.2} s: {} files/s, {:.1} MB/s",
        p.files.len(),
        st.elapsed_s,
        mnemo::util::human_count(st.scanned_files as f64 / secs),
        st.scanned_bytes as f64 / 1e6 / secs
    );
    if let Some(t) = st.scanned_tokens {
        let _ = write!(
            s,
            ", {} tokens/s",
            mnemo::util::human_count(t as f64 / secs)
        );
    }
    let by_kind = p.excluded_by_kind();
    if by_kind.is_empty() {
        s.push_str("; excluded: none");
    } else {
        let parts: Vec<String> = by_kind
            .iter()
            .map(|(k, n)| format!("{n} {}", k.as_str()))
            .collect();
        let _ = write!(s, "; excluded: {}", parts.join(", "));
    }
    if st.not_included > 0 {
        let _ = write!(s, "; {} not matched by --include", st.not_included);
    }
    if p.is_partial() {
        s.push_str(" (partial: some files were unreadable or had non-UTF-8 names)");
    }
    s
}

/// `1234` → `1.2 KB` (decimal units).
pub fn human_bytes(n: u64) -> String {
    let x = n as f64;
    if n < 1000 {
        format!("{n} B")
    } else if x < 1e6 {
        format!("{:.1} KB", x / 1e3)
    } else if x < 1e9 {
        format!("{:.1} MB", x / 1e6)
    } else {
        format!("{:.1} GB", x / 1e9)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_bytes_units() {
        assert_eq!(human_bytes(999), "999 B");
        assert_eq!(human_bytes(1234), "1.2 KB");
        assert_eq!(human_bytes(5_600_000), "5.6 MB");
        assert_eq!(human_bytes(2_000_000_000), "2.0 GB");
    }
}
