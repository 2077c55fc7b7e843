//! Byte-level BPE tokenizer: training, loading, saving, encoding and decoding.
//!
//! # Design
//!
//! [`Tokenizer`] is a thin wrapper around a Hugging Face [`tokenizers::Tokenizer`] plus the id of
//! the end-of-text token, which the data pipeline appends after every document and the sampler
//! stops on. Wrapping (instead of exposing the library type) keeps the rest of the crate
//! independent of the `tokenizers` API and turns its boxed errors into `anyhow` errors that
//! say which file or text was at fault.
//!
//! Training ([`Tokenizer::train`]) builds a GPT-2 style byte-level BPE:
//!
//! - no normalizer: text is tokenized exactly as written, so `decode(encode(x)) == x` for every
//!   string `x` (unicode, emoji, tabs, `\r\n`, trailing spaces, …);
//! - a `ByteLevel` pre-tokenizer (GPT-2 regex, `add_prefix_space = false`) and the matching
//!   `ByteLevel` decoder;
//! - [`EOT`] is the special token with id 0, then all 256 byte symbols (so there is never an
//!   unknown token), then merges with `min_frequency = 2` until `vocab_size` entries exist in
//!   total (fewer when the corpus runs out of pairs seen at least twice).
//!
//! Any Hugging Face `tokenizer.json` can be loaded instead ([`Tokenizer::load`]); its end-of-text
//! token is looked up among the usual names.
//!
//! [`Tokenizer::encode`] treats its input as plain text: special-token strings that happen to
//! occur in it (say a source file that mentions `"<|endoftext|>"`) are tokenized like any other
//! text, and no post-processor adds BOS/EOS ids. Document boundaries therefore come only from
//! the EOT ids the caller appends, never from the content of a file.

use anyhow::{anyhow, bail, Context, Result};
use std::path::Path;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{
    AddedToken, DecoderWrapper, NormalizerWrapper, PostProcessorWrapper, PreTokenizerWrapper,
    TokenizerImpl,
};

/// The end-of-text token of tokenizers trained by mnemo (id 0).
pub const EOT: &str = "<|endoftext|>";

/// Names tried, in order, for the end-of-text token of a loaded tokenizer.
const EOT_CANDIDATES: &[&str] = &[
    EOT,
    "<|end_of_text|>",
    "<｜end▁of▁sentence｜>", // DeepSeek (full-width bars, U+2581)
    "</s>",
    "<eos>",
    "<|eot_id|>",
    "<|im_end|>",
];

/// `eos_token` of a `tokenizer_config.json` in `dir`, if any (a string or `{"content": ..}`).
fn configured_eos(dir: &Path) -> Option<String> {
    let text = std::fs::read_to_string(dir.join("tokenizer_config.json")).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    match &v["eos_token"] {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content")?.as_str().map(String::from),
        _ => None,
    }
}

/// `chat_template` of a `tokenizer_config.json` in `dir`, if it is a string.
fn configured_chat_template(dir: &Path) -> Option<String> {
    let text = std::fs::read_to_string(dir.join("tokenizer_config.json")).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v["chat_template"].as_str().map(String::from)
}

/// A tokenizer and its end-of-text id.
#[derive(Clone, Debug)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    eot: u32,
    /// The model's Jinja chat template, when it has one (see `chat.rs`).
    chat_template: Option<String>,
    /// Cached [`Tokenizer::vocab_size`] (computing it walks the whole vocabulary).
    vocab: usize,
}

impl Tokenizer {
    /// Train a byte-level BPE on `docs` (one item per document) with `vocab_size` entries in
    /// total, counting [`EOT`] (id 0) and the 256 byte symbols.
    pub fn train<I: Iterator<Item = String> + Send>(
        docs: I,
        vocab_size: usize,
    ) -> Result<Tokenizer> {
        let min_vocab = 1 + ByteLevel::alphabet().len();
        if vocab_size < min_vocab {
            bail!(
                "tokenizer vocab size {vocab_size} is too small: a byte-level BPE needs at least \
                 {min_vocab} entries (the end-of-text token and 256 bytes)"
            );
        }
        if vocab_size > u32::MAX as usize {
            bail!("tokenizer vocab size {vocab_size} does not fit in a u32 token id");
        }
        let mut trainer = BpeTrainerBuilder::new()
            .vocab_size(vocab_size)
            .min_frequency(2)
            .show_progress(false)
            .special_tokens(vec![AddedToken::from(EOT, true)])
            .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
            .build();
        let mut imp: TokenizerImpl<
            BPE,
            NormalizerWrapper,
            PreTokenizerWrapper,
            PostProcessorWrapper,
            DecoderWrapper,
        > = TokenizerImpl::new(BPE::default());
        imp.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
        imp.with_decoder(Some(ByteLevelDecoder::default()));
        imp.train(&mut trainer, docs)
            .map_err(|e| anyhow!("training the BPE tokenizer failed: {e}"))?;
        let inner: tokenizers::Tokenizer = imp.into();
        Self::from_inner(inner, "the trained tokenizer")
    }

    /// Load a Hugging Face `tokenizer.json`.
    pub fn load(path: &Path) -> Result<Tokenizer> {
        let json = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read tokenizer file {}", path.display()))?;
        let mut tok = Self::from_json_str(&json, &format!("tokenizer file {}", path.display()))?;
        // A Hugging Face `tokenizer_config.json` beside the file names the real EOS token.
        if let Some(eos) = path.parent().and_then(configured_eos) {
            if let Some(id) = tok.inner.token_to_id(&eos) {
                tok.eot = id;
            }
        }
        tok.chat_template = path.parent().and_then(configured_chat_template);
        Ok(tok)
    }

    /// Parse a `tokenizer.json` held in memory; `what` names its source in error messages.
    pub fn from_json_str(json: &str, what: &str) -> Result<Tokenizer> {
        let inner: tokenizers::Tokenizer = json
            .parse()
            .map_err(|e| anyhow!("{what} is not a valid Hugging Face tokenizer.json: {e}"))?;
        Self::from_inner(inner, what)
    }

    fn from_inner(mut inner: tokenizers::Tokenizer, what: &str) -> Result<Tokenizer> {
        let eot = EOT_CANDIDATES
            .iter()
            .find_map(|name| inner.token_to_id(name))
            .ok_or_else(|| {
                anyhow!(
                    "{what} has no end-of-text token: none of {} is in its vocabulary",
                    EOT_CANDIDATES.join(", ")
                )
            })?;
        // Special-token strings inside the text are ordinary text (see the module docs). This
        // flag is not serialized, so it does not change `to_json`.
        inner.set_encode_special_tokens(true);
        let ids = inner.get_vocab(true);
        let max_id = ids.values().copied().max().map_or(0, |m| m as usize + 1);
        let vocab = ids.len().max(max_id);
        Ok(Tokenizer {
            inner,
            eot,
            vocab,
            chat_template: None,
        })
    }

    /// The model's chat template, if any.
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// Attach a chat template (from a GGUF or a `tokenizer_config.json`).
    pub fn set_chat_template(&mut self, template: Option<String>) {
        self.chat_template = template;
    }

    /// Use `id` as the end-of-text token (e.g. a GGUF's `eos_token_id`).
    pub fn set_eot(&mut self, id: u32) {
        self.eot = id;
    }

    /// Save as `tokenizer.json` (compact), atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        let json = self.to_json()?;
        crate::util::write_atomic(path, json.as_bytes())
            .with_context(|| format!("cannot save the tokenizer to {}", path.display()))
    }

    /// The `tokenizer.json` text (compact; deterministic for a given tokenizer).
    pub fn to_json(&self) -> Result<String> {
        self.inner
            .to_string(false)
            .map_err(|e| anyhow!("cannot serialize the tokenizer: {e}"))
    }

    /// The end-of-text id.
    pub fn eot(&self) -> u32 {
        self.eot
    }

    /// Number of token ids the model must embed: the vocabulary including added tokens, or
    /// the largest id + 1 if ids have gaps (as in some published tokenizers).
    pub fn vocab_size(&self) -> usize {
        self.vocab
    }

    /// Token ids of `text`, taken literally (no special tokens added or recognised).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode_fast(text, false)
            .map_err(|e| anyhow!("cannot encode a text of {} bytes: {e}", text.len()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Like [`Tokenizer::encode`], but special-token strings in `text` (e.g. `<|im_start|>` in a
    /// rendered chat template) become their special ids.
    pub fn encode_with_special(&self, text: &str) -> Result<Vec<u32>> {
        let mut inner = self.inner.clone();
        inner.set_encode_special_tokens(false);
        let enc = inner
            .encode_fast(text, false)
            .map_err(|e| anyhow!("cannot encode a text of {} bytes: {e}", text.len()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// The token string of `id`, if any.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Text of `ids`; special tokens are written out (e.g. `<|endoftext|>`).
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        if let Some(&bad) = ids.iter().find(|&&id| id as usize >= self.vocab) {
            bail!(
                "cannot decode token id {bad}: the tokenizer has {} ids",
                self.vocab
            );
        }
        self.inner
            .decode(ids, false)
            .map_err(|e| anyhow!("cannot decode {} token ids: {e}", ids.len()))
    }
}

/// Turns a stream of token ids into text as it is generated: each [`push`](StreamDecoder::push)
/// returns the new text, holding back an incomplete UTF-8 sequence (a byte-level token can end
/// mid-character) until its last byte arrives. Incremental: see [`DecodeState`].
pub struct StreamDecoder<'a> {
    tok: &'a Tokenizer,
    state: DecodeState,
}

impl<'a> StreamDecoder<'a> {
    pub fn new(tok: &'a Tokenizer) -> Self {
        StreamDecoder {
            tok,
            state: DecodeState::default(),
        }
    }

    /// Add one token; returns the text that became complete (possibly empty).
    pub fn push(&mut self, id: u32) -> Result<String> {
        self.state.push(self.tok, id)
    }
}

/// The state of an incremental detokeniser that owns no tokenizer (so a server can keep one
/// per sequence): the concatenation of what [`DecodeState::push`] returns is the text of all
/// pushed ids (`Tokenizer::decode`), up to the last complete character.
///
/// Each push decodes only a window `ids[prefix..]`: the tokens of the last emitted piece
/// (`ids[prefix..read]`, decoded again so that a decoder that treats the first token specially,
/// e.g. SentencePiece's leading-space strip, sees the same context) plus the tokens since.
/// The new text is the window's text minus the text of `ids[prefix..read]`; when it ends in
/// an incomplete character (U+FFFD) nothing is emitted and the window grows until it
/// completes. Cost per token: O(window) instead of O(all ids) (the old quadratic re-decode).
#[derive(Default, Debug, Clone)]
pub struct DecodeState {
    ids: Vec<u32>,
    prefix: usize,
    read: usize,
}

impl DecodeState {
    /// Add one token; returns the text that became complete (possibly empty).
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> Result<String> {
        self.ids.push(id);
        let before = tok.decode(&self.ids[self.prefix..self.read])?;
        let now = tok.decode(&self.ids[self.prefix..])?;
        if now.len() <= before.len() || now.ends_with('\u{FFFD}') {
            return Ok(String::new());
        }
        // The window's text extends the earlier one; should a decoder rewrite it, emit from
        // the end of the longest common prefix (at a character boundary).
        let mut k = now
            .bytes()
            .zip(before.bytes())
            .take_while(|(a, b)| a == b)
            .count();
        while !now.is_char_boundary(k) {
            k -= 1;
        }
        let new = now[k..].to_string();
        self.prefix = self.read;
        self.read = self.ids.len();
        // Keep only the window (the ids before it are never decoded again).
        if self.prefix > 0 {
            self.ids.drain(..self.prefix);
            self.read -= self.prefix;
            self.prefix = 0;
        }
        Ok(new)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn temp_dir(name: &str) -> PathBuf {
        static N: AtomicUsize = AtomicUsize::new(0);
        let d = std::env::temp_dir().join(format!(
            "mnemo-tok-test-{name}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn corpus() -> Vec<String> {
        let mut docs = Vec::new();
        for i in 0..20 {
            docs.push(format!(
                "fn main() {{\n    let x{i} = {i};\n    println!(\"hello {{}}\", x{i});\n}}\n"
            ));
            docs.push(format!(
                "def foo_{i}(a, b):\n    return a + b  # sum\n\nclass Bar:\n    pass\n"
            ));
        }
        docs
    }

    fn trained() -> Tokenizer {
        Tokenizer::train(corpus().into_iter(), 300).unwrap()
    }

    #[test]
    fn trains_with_eot_zero_and_bytes() {
        let tok = trained();
        assert_eq!(tok.eot(), 0);
        let v = tok.vocab_size();
        assert!(v > 257 && v <= 300, "vocab size {v}");
        // Merges were learnt: a common word takes fewer tokens than bytes.
        let ids = tok.encode("    println!(\"hello").unwrap();
        assert!(ids.len() < 10, "{ids:?}");
        assert!(Tokenizer::train(corpus().into_iter(), 100).is_err());
    }

    #[test]
    fn roundtrips_arbitrary_text() {
        let tok = trained();
        let texts = [
            "",
            "fn main() {\n\tlet s = \"héllo wörld\";\r\n    return;  \n}\n\n",
            "日本語のテキスト 🦀🚀 emoji + ZWJ 👨‍👩‍👧 and combining e\u{301}",
            "   leading and trailing spaces   ",
            "\u{0}\u{1}\u{7f} control chars \u{feff}",
            "a literal <|endoftext|> inside text",
        ];
        for t in texts {
            let ids = tok.encode(t).unwrap();
            assert!(ids.iter().all(|&i| (i as usize) < tok.vocab_size()));
            assert_eq!(tok.decode(&ids).unwrap(), t);
        }
        // The literal special string is plain text, not the EOT id.
        let ids = tok.encode("x <|endoftext|> y").unwrap();
        assert!(!ids.contains(&tok.eot()));
        assert_eq!(tok.decode(&[tok.eot()]).unwrap(), EOT);
        assert!(tok.decode(&[1_000_000]).is_err());
    }

    #[test]
    fn save_load_roundtrip() {
        let dir = temp_dir("save");
        let tok = trained();
        let path = dir.join("tokenizer.json");
        tok.save(&path).unwrap();
        let loaded = Tokenizer::load(&path).unwrap();
        let text = "def foo_3(a, b):\n    return a + b 🦀\n";
        assert_eq!(tok.encode(text).unwrap(), loaded.encode(text).unwrap());
        assert_eq!(loaded.eot(), tok.eot());
        assert_eq!(loaded.vocab_size(), tok.vocab_size());
        assert_eq!(loaded.to_json().unwrap(), tok.to_json().unwrap());
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn load_errors_name_the_file() {
        let dir = temp_dir("garbage");
        let path = dir.join("garbage.json");
        std::fs::write(&path, b"this is not json {").unwrap();
        let err = format!("{:#}", Tokenizer::load(&path).unwrap_err());
        assert!(err.contains(&path.display().to_string()), "{err}");
        let missing = dir.join("missing.json");
        let err = format!("{:#}", Tokenizer::load(&missing).unwrap_err());
        assert!(err.contains(&missing.display().to_string()), "{err}");
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn finds_other_eot_names() {
        let json = trained().to_json().unwrap();
        let rename = |to: &str| {
            let mut v: serde_json::Value = serde_json::from_str(&json).unwrap();
            v["added_tokens"][0]["content"] = to.into();
            let vocab = v["model"]["vocab"].as_object_mut().unwrap();
            let id = vocab.remove(EOT).unwrap();
            vocab.insert(to.to_string(), id);
            v.to_string()
        };
        let tok = Tokenizer::from_json_str(&rename("</s>"), "test json").unwrap();
        assert_eq!(tok.eot(), 0);
        let err = Tokenizer::from_json_str(&rename("<nope>"), "my-tokenizer.json").unwrap_err();
        assert!(err.to_string().contains("my-tokenizer.json"), "{err}");
    }

    #[test]
    fn stream_decoder_yields_whole_characters() {
        let tok = Tokenizer::train(["héllo wörld 😀 ".repeat(20)].into_iter(), 260).unwrap();
        let text = "wörld 😀!";
        let ids = tok.encode(text).unwrap();
        let mut d = StreamDecoder::new(&tok);
        let mut out = String::new();
        for id in ids {
            let piece = d.push(id).unwrap();
            assert!(!piece.contains('\u{FFFD}'));
            out.push_str(&piece);
        }
        assert_eq!(out, text);
    }

    /// The incremental pieces add up to the full decode, for random id streams (invalid
    /// UTF-8 pieces, special tokens and multi-byte characters included).
    #[test]
    fn incremental_decoding_matches_the_full_decode() {
        let tok = Tokenizer::train(
            ["héllo wörld 😀 fn main() {}\n".repeat(20)].into_iter(),
            300,
        )
        .unwrap();
        let mut x: u64 = 7;
        for len in [1, 2, 5, 40, 300] {
            let ids: Vec<u32> = (0..len)
                .map(|_| {
                    x = x
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    ((x >> 33) % tok.vocab_size() as u64) as u32
                })
                .collect();
            let mut st = DecodeState::default();
            let mut out = String::new();
            for &id in &ids {
                out.push_str(&st.push(&tok, id).unwrap());
            }
            let full = tok.decode(&ids).unwrap();
            if full.ends_with('\u{FFFD}') {
                assert!(full.starts_with(&out), "{len}");
            } else {
                assert_eq!(out, full, "{len}");
            }
        }
        // Valid text: the window holds the last piece and the new token, never the history.
        let ids = tok.encode(&"wörld 😀 fn main() {}\n".repeat(10)).unwrap();
        let mut st = DecodeState::default();
        for &id in &ids {
            st.push(&tok, id).unwrap();
            assert!(st.ids.len() <= 4, "window of {} ids", st.ids.len());
        }
    }
}
