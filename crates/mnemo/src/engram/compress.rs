//! Tokenizer compression (Engram paper §2.2, demo `CompressedTokenizer`): a surjective map
//! `P: V → V'` from tokenizer ids to normalised ids, built once per tokenizer.
//!
//! For every id `tid in 0..len(tokenizer)`:
//!
//! - `text = decode([tid])` (special tokens written out);
//! - if `text` contains U+FFFD (a partial UTF-8 byte token) the key is the raw token string
//!   (`id_to_token`), otherwise `norm = normalize(text)` and the key is `norm`, or `text` when
//!   `norm` is empty;
//! - new ids are assigned in order of first appearance of the key, from 0.
//!
//! `normalize` is the Hugging Face normalizer sequence of the demo, taken from the `tokenizers`
//! crate itself so that the semantics are the library's: `NFKC → NFD → StripAccents → Lowercase
//! → Replace(/[ \t\r\n]+/, " ") → Replace(/^ $/, U+E000) → Strip → Replace(U+E000, " ")`. The
//! sentinel keeps whitespace-only tokens as `" "` instead of stripping them to nothing.
//!
//! Checked on a DeepSeek tokenizer of 129280 ids (the `engram_compression_report` ignored
//! test): 99092 compressed ids in 0.6 s — DeepSeek-V4.1's `engram_compressed_vocab_size` —
//! and largest groups `" "` 163, `"a"` 54, `"o"` 40, `"e"` 35, `"i"` 30, as the paper's
//! Table 6.

use crate::tokenizer::Tokenizer;
use anyhow::{anyhow, bail, Result};
use std::collections::HashMap;
use tokenizers::normalizers::replace::ReplacePattern;
use tokenizers::normalizers::{Lowercase, Replace, Sequence, Strip, StripAccents, NFD, NFKC};
use tokenizers::{NormalizedString, Normalizer};

/// Private-use sentinel that protects whitespace-only tokens from `Strip`.
const SENTINEL: &str = "\u{E000}";
/// Magic bytes of [`CompressedTokenizer::to_bytes`].
const MAGIC: &[u8; 8] = b"MNEMOCT1";

/// The demo's normaliser (see the module docs).
pub struct EngramNormalizer(Sequence);

impl EngramNormalizer {
    pub fn new() -> Result<Self> {
        let re = |p: &str, c: &str| {
            Replace::new(ReplacePattern::Regex(p.into()), c)
                .map_err(|e| anyhow!("engram normalizer regex {p:?}: {e}"))
        };
        let lit = Replace::new(SENTINEL, " ").map_err(|e| anyhow!("engram normalizer: {e}"))?;
        Ok(EngramNormalizer(Sequence::new(vec![
            NFKC.into(),
            NFD.into(),
            StripAccents.into(),
            Lowercase.into(),
            re("[ \t\r\n]+", " ")?.into(),
            re("^ $", SENTINEL)?.into(),
            Strip::new(true, true).into(),
            lit.into(),
        ])))
    }

    /// The normalised form of `text`.
    pub fn normalize(&self, text: &str) -> Result<String> {
        let mut n = NormalizedString::from(text);
        self.0
            .normalize(&mut n)
            .map_err(|e| anyhow!("cannot normalise {text:?}: {e}"))?;
        Ok(n.get().to_string())
    }
}

/// One merge group: the tokenizer ids that share a compressed id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MergeGroup {
    pub compressed_id: u32,
    /// The normalised key (available when the table was built, not after [`CompressedTokenizer::from_bytes`]).
    pub key: Option<String>,
    /// Tokenizer ids, ascending.
    pub members: Vec<u32>,
}

/// The compression table `lookup[tid] = compressed id`, plus `V'`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CompressedTokenizer {
    lookup: Vec<u32>,
    vocab: u32,
    /// Key of each compressed id (only when built here, not when deserialised).
    keys: Option<Vec<String>>,
}

impl CompressedTokenizer {
    /// Build the table for `tok`, over `0..tok.vocab_size()`.
    pub fn build(tok: &Tokenizer) -> Result<Self> {
        let n = tok.vocab_size();
        let mut decoded = Vec::with_capacity(n);
        let mut raw = Vec::with_capacity(n);
        for tid in 0..n as u32 {
            decoded.push(tok.decode(&[tid])?);
            raw.push(tok.id_to_token(tid).unwrap_or_default());
        }
        Self::from_strings(&decoded, &raw)
    }

    /// Build the table from each id's decoded text and raw token string (same length).
    pub fn from_strings<S: AsRef<str>, R: AsRef<str>>(decoded: &[S], raw: &[R]) -> Result<Self> {
        if decoded.len() != raw.len() {
            bail!(
                "engram compression: {} decoded strings but {} raw token strings",
                decoded.len(),
                raw.len()
            );
        }
        if decoded.is_empty() || decoded.len() > u32::MAX as usize {
            bail!(
                "engram compression: a tokenizer of {} ids cannot be compressed",
                decoded.len()
            );
        }
        let norm = EngramNormalizer::new()?;
        let mut key2new: HashMap<String, u32> = HashMap::new();
        let mut keys = Vec::new();
        let mut lookup = Vec::with_capacity(decoded.len());
        for (text, raw) in decoded.iter().zip(raw) {
            let text = text.as_ref();
            let key = if text.contains('\u{FFFD}') {
                raw.as_ref().to_string()
            } else {
                let n = norm.normalize(text)?;
                if n.is_empty() {
                    text.to_string()
                } else {
                    n
                }
            };
            let next = keys.len() as u32;
            let id = *key2new.entry(key.clone()).or_insert_with(|| {
                keys.push(key);
                next
            });
            lookup.push(id);
        }
        Ok(CompressedTokenizer {
            lookup,
            vocab: keys.len() as u32,
            keys: Some(keys),
        })
    }

    /// A table given directly (e.g. read from a checkpoint tensor); checks that it is
    /// surjective onto `0..V'` with ids in order of first appearance.
    pub fn from_lookup(lookup: Vec<u32>) -> Result<Self> {
        let mut next = 0u32;
        for (tid, &c) in lookup.iter().enumerate() {
            if c > next {
                bail!(
                    "engram compression table: id {tid} maps to {c} before {next} appeared \
                     (ids must be numbered in order of first appearance)"
                );
            }
            if c == next {
                next += 1;
            }
        }
        if lookup.is_empty() {
            bail!("engram compression table is empty");
        }
        Ok(CompressedTokenizer {
            lookup,
            vocab: next,
            keys: None,
        })
    }

    /// The identity compression over `n` ids (each its own compressed id): the placeholder of a
    /// model whose tokenizer is not known yet.
    pub fn identity(n: usize) -> Result<Self> {
        let n = u32::try_from(n)
            .map_err(|_| anyhow::anyhow!("engram compression table: {n} ids is too many"))?;
        Self::from_lookup((0..n).collect())
    }

    /// Number of tokenizer ids covered.
    pub fn tokenizer_vocab_size(&self) -> usize {
        self.lookup.len()
    }

    /// `V'`, the number of compressed ids.
    pub fn compressed_vocab_size(&self) -> usize {
        self.vocab as usize
    }

    /// The table, `lookup[tid]`.
    pub fn lookup(&self) -> &[u32] {
        &self.lookup
    }

    /// Compressed id of one tokenizer id. Ids beyond the tokenizer (a model vocabulary padded
    /// past `len(tokenizer)`) are clipped to the last id, as in the demo's PR #15.
    #[inline]
    pub fn compress_one(&self, tid: u32) -> u32 {
        self.lookup[(tid as usize).min(self.lookup.len() - 1)]
    }

    /// Compressed ids of `ids` (see [`CompressedTokenizer::compress_one`]).
    pub fn compress(&self, ids: &[u32]) -> Vec<u32> {
        ids.iter().map(|&t| self.compress_one(t)).collect()
    }

    /// The `k` largest merge groups (most tokenizer ids per compressed id), largest first; ties
    /// by compressed id.
    pub fn largest_groups(&self, k: usize) -> Vec<MergeGroup> {
        let mut members: Vec<Vec<u32>> = vec![Vec::new(); self.vocab as usize];
        for (tid, &c) in self.lookup.iter().enumerate() {
            members[c as usize].push(tid as u32);
        }
        let mut order: Vec<u32> = (0..self.vocab).collect();
        order.sort_by_key(|&c| (std::cmp::Reverse(members[c as usize].len()), c));
        order
            .into_iter()
            .take(k)
            .map(|c| MergeGroup {
                compressed_id: c,
                key: self.keys.as_ref().map(|k| k[c as usize].clone()),
                members: std::mem::take(&mut members[c as usize]),
            })
            .collect()
    }

    /// Vocabulary sizes before/after and the `k` largest merge groups with up to 8 example
    /// tokens each (decoded with `tok`), as text (for `mnemo engram compress`).
    pub fn report(&self, tok: &Tokenizer, k: usize) -> String {
        use std::fmt::Write;
        let (v, vp) = (self.tokenizer_vocab_size(), self.compressed_vocab_size());
        let mut s = format!(
            "{v} tokenizer ids -> {vp} compressed ids ({:.2}% fewer)\n",
            100.0 * (v - vp) as f64 / v as f64
        );
        for g in self.largest_groups(k) {
            let ex: Vec<String> = g
                .members
                .iter()
                .take(8)
                .map(|&t| format!("{:?}", tok.decode(&[t]).unwrap_or_default()))
                .collect();
            let key = g
                .key
                .map_or_else(|| format!("#{}", g.compressed_id), |k| format!("{k:?}"));
            let _ = writeln!(s, "  {key}: {} ids, e.g. {}", g.members.len(), ex.join(" "));
        }
        s
    }

    /// Serialise the table: `MNEMOCT1`, u32 count, then `count` u32 ids (little endian).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(12 + 4 * self.lookup.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&(self.lookup.len() as u32).to_le_bytes());
        for &c in &self.lookup {
            out.extend_from_slice(&c.to_le_bytes());
        }
        out
    }

    /// Inverse of [`CompressedTokenizer::to_bytes`].
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        if bytes.len() < 12 || &bytes[..8] != MAGIC {
            bail!("not an engram compression table (bad magic)");
        }
        let n = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes")) as usize;
        if bytes.len() != 12 + 4 * n {
            bail!(
                "engram compression table: {} bytes for {n} ids, expected {}",
                bytes.len(),
                12 + 4 * n
            );
        }
        let lookup = bytes[12..]
            .chunks_exact(4)
            .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")))
            .collect();
        Self::from_lookup(lookup)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engram_normalizer_matches_the_demo_sequence() {
        let n = EngramNormalizer::new().unwrap();
        for (input, want) in [
            ("A", "a"),
            (" a", "a"),
            ("  Hello\t", "hello"),
            ("á", "a"),
            ("Ä", "a"),
            ("ﬁ", "fi"), // NFKC ligature
            ("①", "1"),  // NFKC compatibility digit
            ("\t", " "), // whitespace-only → " " via the sentinel
            ("\n\n", " "),
            ("  ", " "),
            (" \r\n ", " "),
            ("a  b", "a b"),
            ("Ω", "ω"),
            ("", ""),
        ] {
            assert_eq!(n.normalize(input).unwrap(), want, "input {input:?}");
        }
    }

    #[test]
    fn engram_compression_first_appearance_partial_bytes_and_roundtrip() {
        let decoded = [
            "<eot>", "A", "a", " a", "\t", "\n", "b", "\u{FFFD}", "\u{FFFD}", "", "á",
        ];
        let raw = ["<eot>", "A", "a", "Ġa", "ĉ", "Ċ", "b", "Ã", "Ä", "", "Ã¡"];
        let c = CompressedTokenizer::from_strings(&decoded, &raw).unwrap();
        // <eot>→0, a-group→1, whitespace→2, b→3, two byte tokens keep their raw strings→4,5,
        // the empty token keeps its empty text→6.
        assert_eq!(c.lookup(), &[0, 1, 1, 1, 2, 2, 3, 4, 5, 6, 1]);
        assert_eq!(c.compressed_vocab_size(), 7);
        assert_eq!(c.compress(&[3, 10, 999]), vec![1, 1, 1]); // 999 clipped to the last id
        let g = c.largest_groups(2);
        assert_eq!(g[0].members, vec![1, 2, 3, 10]);
        assert_eq!(g[0].key.as_deref(), Some("a"));
        assert_eq!(g[1].members, vec![4, 5]);
        assert_eq!(g[1].key.as_deref(), Some(" "));
        let back = CompressedTokenizer::from_bytes(&c.to_bytes()).unwrap();
        assert_eq!(back.lookup(), c.lookup());
        assert_eq!(back.compressed_vocab_size(), 7);
        assert!(back.largest_groups(1)[0].key.is_none());
        assert!(CompressedTokenizer::from_bytes(&c.to_bytes()[..20]).is_err());
        assert!(CompressedTokenizer::from_lookup(vec![0, 2, 1]).is_err());
    }

    #[test]
    fn engram_compression_of_a_trained_byte_level_tokenizer() {
        let docs: Vec<String> = (0..200)
            .map(|i| format!("The cat {i} sat on the MAT. the Cat, THE cat; café Café naïve\n\n"))
            .collect();
        let tok = Tokenizer::train(docs.into_iter(), 400).unwrap();
        let c = CompressedTokenizer::build(&tok).unwrap();
        assert_eq!(c.tokenizer_vocab_size(), tok.vocab_size());
        assert!(c.compressed_vocab_size() < tok.vocab_size());
        assert!(c
            .lookup()
            .iter()
            .all(|&x| (x as usize) < c.compressed_vocab_size()));
        // Case and leading-space variants of a word merge.
        let id = |s: &str| {
            let ids = tok.encode(s).unwrap();
            assert_eq!(ids.len(), 1, "{s:?} is not one token: {ids:?}");
            ids[0]
        };
        assert_eq!(c.compress_one(id(" the")), c.compress_one(id("The")));
        assert_eq!(c.compress_one(id(" cat")), c.compress_one(id(" Cat")));
        // Bytes ≥ 0x80 alone are partial UTF-8: each keeps its own raw-string key.
        let hi: Vec<u32> = (0..tok.vocab_size() as u32)
            .filter(|&t| tok.decode(&[t]).unwrap().contains('\u{FFFD}'))
            .collect();
        assert!(hi.len() >= 64);
        let mut seen: Vec<u32> = hi.iter().map(|&t| c.compress_one(t)).collect();
        seen.sort_unstable();
        seen.dedup();
        assert_eq!(seen.len(), hi.len());
    }
}
