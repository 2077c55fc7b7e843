//! The pre-tokenizer of a GGUF byte-level BPE (`tokenizer.ggml.pre`), as a Hugging Face
//! `pre_tokenizer` JSON: the text is split by llama.cpp's regular expressions for that type
//! (`llama-vocab.cpp`, `llm_tokenizer_bpe`), each piece mapped to byte-level symbols, then
//! merged by the BPE.
//!
//! | `tokenizer.ggml.pre`                         | split                                         |
//! |----------------------------------------------|-----------------------------------------------|
//! | absent, `smollm`, `starcoder`, `refact`      | each digit alone, then GPT-2's expression     |
//! | `gpt-2`, `phi-2`, `mpt`, `olmo`              | GPT-2's expression                            |
//! | `qwen2`, `deepseek-r1-qwen`, `stablelm2`     | Qwen2's: letters, single digits, punctuation  |
//! | `llama3`, `llama-bpe`, `llama-v3`, `dbrx`, `smaug-bpe`, `falcon3` | Llama 3's: digits in groups of up to 3 |
//! | `deepseek-v3`                                | digit groups of ≤ 3, CJK runs, then words     |
//! | `deepseek-llm` (DeepSeek-V2, V2-Lite)        | newlines, Latin-script words, ASCII/CJK punctuation, trailing spaces, CJK runs, digit runs |
//! | `deepseek-coder` (DeepSeek-Coder(-V2))       | newlines, words, punctuation, CJK runs, single digits |

use anyhow::{bail, Result};
use serde_json::{json, Value};

const QWEN2: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const DEEPSEEK_V3: [&str; 3] = [
    r"\p{N}{1,3}",
    r"[一-龥぀-ゟ゠-ヿ]+",
    r##"[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"##,
];

/// llama.cpp's `LLAMA_VOCAB_PRE_TYPE_DEEPSEEK_LLM` expressions, applied in turn, copied byte
/// for byte: some characters (U+1F7D, U+1FD3, U+1FDB) are not in NFC, and normalising them
/// makes empty ranges.
const DEEPSEEK_LLM: [&str; 6] = [
    "[\r\n]",
    "\\s?[A-Za-zµÀ-ÖØ-öø-ƺƼ-ƿǄ-ʓʕ-ʯͰ-ͳͶͷͻ-ͽͿΆΈ-ΊΌΎ-ΡΣ-ϵϷ-ҁҊ-ԯԱ-ՖႠ-ჅᎠ-Ᏽᏸ-ᏽᲐ-ᲺᲽ-Ჿᴀ-ᴫᵫ-ᵷᵹ-ᶚḀ-ἕἘ-Ἕἠ-ὅὈ-Ὅὐ-ὗὙὛὝὟ-ώᾀ-ᾴᾶ-ᾼιῂ-ῄῆ-ῌῐ-ΐῖ-Ίῠ-Ῥῲ-ῴῶ-ῼℂℇℊ-ℓℕℙ-ℝℤΩℨK-ℭℯ-ℴℹℼ-ℿⅅ-ⅉⅎↃↄⰀ-ⱻⱾ-ⳤⳫ-ⳮⳲⳳꙀ-ꙭꚀ-ꚛꜢ-ꝯꝱ-ꞇꞋ-ꞎꭰ-ꮿﬀ-ﬆﬓ-ﬗＡ-Ｚａ-ｚ𐐀-𐑏𐒰-𐓓𐓘-𐓻𐲀-𐲲𐳀-𐳲𑢠-𑣟𞤀-𞥃]+",
    "\\s?[!-/:-~！-／：-～‘-‟　-。]+",
    "\\s+$",
    "[一-龥ࠀ-一가-퟿]+",
    "\\p{N}+",
];
/// llama.cpp's `LLAMA_VOCAB_PRE_TYPE_DEEPSEEK_CODER` expressions.
const DEEPSEEK_CODER: [&str; 5] = [
    "[\r\n]",
    "\\s?\\p{L}+",
    "\\s?\\p{P}+",
    "[一-龥ࠀ-一가-퟿]+",
    "\\p{N}",
];

/// The names accepted, for error messages.
const SUPPORTED: &str = "smollm, starcoder, refact, gpt-2, phi-2, mpt, olmo, qwen2, \
                         deepseek-r1-qwen, stablelm2, llama3, llama-bpe, llama-v3, dbrx, smaug-bpe, \
                         falcon3, deepseek-v3, deepseek-llm, deepseek-coder";

fn split(pattern: &str) -> Value {
    json!({"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": false})
}

fn byte_level(use_regex: bool) -> Value {
    json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": use_regex})
}

/// The `pre_tokenizer` of a tokenizer whose `tokenizer.ggml.pre` is `pre` (`what` names the
/// file in errors).
pub(super) fn pre_tokenizer(pre: Option<&str>, what: &str) -> Result<Value> {
    let seq = |v: Vec<Value>| json!({"type": "Sequence", "pretokenizers": v});
    Ok(match pre.unwrap_or("smollm") {
        "smollm" | "starcoder" | "refact" | "default" => seq(vec![
            json!({"type": "Digits", "individual_digits": true}),
            byte_level(true),
        ]),
        "gpt-2" | "phi-2" | "mpt" | "olmo" => byte_level(true),
        "qwen2" | "deepseek-r1-qwen" | "stablelm2" => seq(vec![split(QWEN2), byte_level(false)]),
        "llama3" | "llama-bpe" | "llama-v3" | "dbrx" | "smaug-bpe" | "falcon3" => {
            seq(vec![split(LLAMA3), byte_level(false)])
        }
        "deepseek-v3" => {
            let mut v: Vec<Value> = DEEPSEEK_V3.iter().map(|p| split(p)).collect();
            v.push(byte_level(false));
            seq(v)
        }
        "deepseek-llm" | "deepseek-coder" => {
            let pats: &[&str] = if pre == Some("deepseek-llm") {
                &DEEPSEEK_LLM
            } else {
                &DEEPSEEK_CODER
            };
            let mut v: Vec<Value> = pats.iter().map(|p| split(p)).collect();
            v.push(byte_level(false));
            seq(v)
        }
        other => bail!(
            "{what}: pre-tokenizer `{other}` (tokenizer.ggml.pre) is not supported (supported: \
             {SUPPORTED})"
        ),
    })
}
