//! Ranking for a budget: BM25 over identifier terms when there is a query, then a prior
//! (READMEs, docs and top-level files first, then smaller files).

use crate::check::TextFile;
use rayon::prelude::*;
use std::collections::HashMap;

const STOP_WORDS: &[&str] = &[
    "a", "an", "and", "are", "as", "at", "be", "by", "do", "doe", "does", "for", "from", "how",
    "in", "is", "it", "of", "on", "or", "the", "this", "that", "to", "what", "when", "where",
    "which", "why", "with",
];

fn normalize_term(t: &str) -> Option<String> {
    let mut t = t.to_ascii_lowercase();
    if t.len() > 3 && t.ends_with('s') && !t.ends_with("ss") {
        t.pop();
    }
    (t.len() >= 2 && !STOP_WORDS.contains(&t.as_str())).then_some(t)
}

/// Call `f` with every search term of `text`: identifiers, lower-cased, and their `_` /
/// camelCase parts.
fn for_each_term(text: &str, f: &mut dyn FnMut(String)) {
    let b = text.as_bytes();
    let word = |c: u8| c.is_ascii_alphanumeric() || c == b'_';
    let mut i = 0;
    while i < b.len() {
        if !word(b[i]) {
            i += 1;
            continue;
        }
        let s = i;
        while i < b.len() && word(b[i]) {
            i += 1;
        }
        let ident = text[s..i].trim_matches('_');
        if !ident
            .as_bytes()
            .first()
            .is_some_and(|c| c.is_ascii_alphabetic())
        {
            continue; // numbers
        }
        let parts = split_ident(ident);
        if let Some(t) = normalize_term(ident) {
            f(t);
        }
        if parts.len() > 1 {
            for p in parts {
                if let Some(t) = normalize_term(p) {
                    f(t);
                }
            }
        }
    }
}

/// `parseHTTPRequest_v2` → `parse`, `HTTP`, `Request`, `v2`.
fn split_ident(ident: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    for chunk in ident.split('_').filter(|c| !c.is_empty()) {
        let b = chunk.as_bytes();
        let mut start = 0;
        for i in 1..b.len() {
            let (p, c) = (b[i - 1], b[i]);
            let next_lower = b.get(i + 1).is_some_and(|n| n.is_ascii_lowercase());
            if (p.is_ascii_lowercase() && c.is_ascii_uppercase())
                || (p.is_ascii_uppercase() && c.is_ascii_uppercase() && next_lower)
            {
                parts.push(&chunk[start..i]);
                start = i;
            }
        }
        parts.push(&chunk[start..]);
    }
    parts
}

/// BM25 scores of `texts` for `query` (all zero when the query has no terms).
fn bm25(texts: &[TextFile], query: &str) -> Vec<f64> {
    let mut qterms: Vec<String> = Vec::new();
    for_each_term(query, &mut |t| {
        if !qterms.contains(&t) {
            qterms.push(t);
        }
    });
    if qterms.is_empty() || texts.is_empty() {
        return vec![0.0; texts.len()];
    }
    let index: HashMap<&str, usize> = qterms
        .iter()
        .enumerate()
        .map(|(i, t)| (t.as_str(), i))
        .collect();
    const PATH_WEIGHT: f64 = 3.0;
    let docs: Vec<(Vec<f64>, f64)> = texts
        .par_iter()
        .map(|t| {
            let mut tf = vec![0.0; qterms.len()];
            let mut len = 0.0;
            let mut add = |term: String, w: f64| {
                len += w;
                if let Some(&k) = index.get(term.as_str()) {
                    tf[k] += w;
                }
            };
            for_each_term(&t.rel, &mut |term| add(term, PATH_WEIGHT));
            for_each_term(&t.content, &mut |term| add(term, 1.0));
            (tf, len)
        })
        .collect();
    let n = docs.len() as f64;
    let avgdl = (docs.iter().map(|d| d.1).sum::<f64>() / n).max(1.0);
    let idf: Vec<f64> = (0..qterms.len())
        .map(|k| {
            let df = docs.iter().filter(|d| d.0[k] > 0.0).count() as f64;
            (1.0 + (n - df + 0.5) / (df + 0.5)).ln()
        })
        .collect();
    let (k1, b) = (1.2, 0.75);
    docs.iter()
        .map(|(tf, len)| {
            tf.iter()
                .zip(&idf)
                .map(|(&f, &idf)| idf * f * (k1 + 1.0) / (f + k1 * (1.0 - b + b * len / avgdl)))
                .sum()
        })
        .collect()
}

/// The prior order key: (tier, depth within tiers 0–1, size, path).
fn prior_key(t: &TextFile) -> (u8, usize, usize, &str) {
    let comps: Vec<&str> = t.rel.split('/').collect();
    let depth = comps.len() - 1;
    let name = comps[depth].to_ascii_lowercase();
    let readme = name.starts_with("readme");
    let docs = comps[..depth]
        .iter()
        .any(|c| c.eq_ignore_ascii_case("doc") || c.eq_ignore_ascii_case("docs"));
    let tier = if readme && depth == 0 {
        0
    } else if readme || docs || depth == 0 {
        1
    } else {
        2
    };
    let size = t.tokens.unwrap_or(t.bytes as usize);
    (tier, if tier < 2 { depth } else { 0 }, size, &t.rel)
}

/// Indices of `texts`, best first.
pub(crate) fn rank(texts: &[TextFile], query: Option<&str>) -> Vec<usize> {
    let scores = match query {
        Some(q) => bm25(texts, q),
        None => vec![0.0; texts.len()],
    };
    let mut order: Vec<usize> = (0..texts.len()).collect();
    order.sort_by(|&a, &b| {
        scores[b]
            .total_cmp(&scores[a])
            .then_with(|| prior_key(&texts[a]).cmp(&prior_key(&texts[b])))
    });
    order
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lang::language_of;

    #[test]
    fn terms_and_ranking() {
        assert_eq!(
            split_ident("parseHTTPRequest_v2"),
            ["parse", "HTTP", "Request", "v2"]
        );
        let mut terms = Vec::new();
        for_each_term("fn apply_merges(ids) // the 42 BPEMerges", &mut |t| {
            terms.push(t)
        });
        assert_eq!(
            terms,
            [
                "fn",
                "apply_merge",
                "apply",
                "merge",
                "ids",
                "bpemerge",
                "bpe",
                "merge"
            ]
        );
        let t = |rel: &str, bytes: u64| TextFile {
            rel: rel.into(),
            bytes,
            language: language_of(rel),
            content: String::new(),
            tokens: None,
        };
        let texts = vec![
            t("src/big.rs", 900),
            t("src/small.rs", 10),
            t("Cargo.toml", 300),
            t("docs/guide.md", 50),
            t("README.md", 2000),
            t("src/README.md", 5),
        ];
        let order: Vec<&str> = rank(&texts, None)
            .iter()
            .map(|&i| texts[i].rel.as_str())
            .collect();
        assert_eq!(
            order,
            [
                "README.md",
                "Cargo.toml",
                "src/README.md",
                "docs/guide.md",
                "src/small.rs",
                "src/big.rs"
            ]
        );
        let order: Vec<&str> = rank(&texts, Some("the big one"))
            .iter()
            .map(|&i| texts[i].rel.as_str())
            .collect();
        assert_eq!(order[0], "src/big.rs");
    }
}
