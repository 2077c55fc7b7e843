//! `pack` (a GGUF tokenizer, secrets, bad paths) and `ask` with its prefix cache (and
//! `cache list|clear`).

mod common;

use common::{mnemo, mnemo_env, tmpdir};

/// A GGUF holding only a tokenizer: GPT-2's 256 byte symbols and a few merges.
fn write_tokenizer_gguf(path: &std::path::Path) {
    // GPT-2's byte-to-symbol map: printable Latin-1 bytes map to themselves, the rest to 256+.
    let mut symbols = Vec::new();
    let mut extra = 0u32;
    for b in 0u32..256 {
        let printable =
            (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
        let c = if printable {
            b
        } else {
            extra += 1;
            255 + extra
        };
        symbols.push(char::from_u32(c).unwrap().to_string());
    }
    let merges = ["f n", "Ġ m", "a i", "Ġm ai"];
    let mut tokens = symbols.clone();
    tokens.extend(
        ["fn", "Ġm", "ai", "Ġmai", "<|endoftext|>"]
            .iter()
            .map(|s| s.to_string()),
    );
    let s = |b: &mut Vec<u8>, x: &str| {
        b.extend_from_slice(&(x.len() as u64).to_le_bytes());
        b.extend_from_slice(x.as_bytes());
    };
    let mut b = b"GGUF".to_vec();
    b.extend_from_slice(&3u32.to_le_bytes());
    b.extend_from_slice(&0u64.to_le_bytes()); // tensors
    b.extend_from_slice(&3u64.to_le_bytes()); // key/value pairs
    s(&mut b, "tokenizer.ggml.model");
    b.extend_from_slice(&8u32.to_le_bytes());
    s(&mut b, "gpt2");
    for (key, list) in [
        ("tokenizer.ggml.tokens", tokens),
        (
            "tokenizer.ggml.merges",
            merges.iter().map(|m| m.to_string()).collect(),
        ),
    ] {
        s(&mut b, key);
        b.extend_from_slice(&9u32.to_le_bytes());
        b.extend_from_slice(&8u32.to_le_bytes());
        b.extend_from_slice(&(list.len() as u64).to_le_bytes());
        for t in &list {
            s(&mut b, t);
        }
    }
    std::fs::write(path, b).unwrap();
}

/// `pack --tokenizer` takes a GGUF model, as `generate` does.
#[test]
fn pack_counts_with_a_gguf_tokenizer() {
    let d = tmpdir("pack-gguf");
    let repo = d.join("repo");
    std::fs::create_dir_all(&repo).unwrap();
    std::fs::write(repo.join("main.rs"), "fn main() {}\n").unwrap();
    let gguf = d.join("tok.gguf");
    write_tokenizer_gguf(&gguf);
    let (code, out, err) = mnemo(&[
        "pack",
        repo.to_str().unwrap(),
        "--count",
        "--tokenizer",
        gguf.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    // `fn`, ` mai`, `n`, `(`, `)`, ` `, `{`, `}`, `\n`: 9 tokens.
    assert!(
        out.lines()
            .any(|l| l.trim_start().starts_with("9 ") && l.ends_with("main.rs")),
        "{out}"
    );
}

#[test]
fn pack_reports_secrets_and_fails_cleanly_on_bad_paths() {
    let (code, _, err) = mnemo(&["pack", "/nonexistent/mnemo-repo"]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("/nonexistent/mnemo-repo") && !err.contains("panicked"),
        "{err}"
    );
    let d = tmpdir("packrepo");
    let f = d.join("file.txt");
    std::fs::write(&f, "x").unwrap();
    let (code, _, err) = mnemo(&["pack", f.to_str().unwrap()]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("not a directory"), "{err}");
    std::fs::write(d.join("main.rs"), "fn main() {}\n").unwrap();
    let key = ["AKIA", "IOSFODNN7", "EXAMPLE"].concat();
    std::fs::write(d.join("settings.toml"), format!("[aws]\nid = \"{key}\"\n")).unwrap();
    std::fs::write(d.join(".env"), "PASSWORD=hunter2hunter2\n").unwrap();
    let (code, out, err) = mnemo(&["pack", d.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("fn main() {}"));
    assert!(!out.contains(&key) && !out.contains("hunter2"), "{out}");
    assert!(
        err.contains("settings.toml") && err.contains("secret"),
        "{err}"
    );
}

/// `train` of a tiny model (1 layer, d = 32, context 256) on `data`, `steps` steps.
fn train_tiny(data: &std::path::Path, run: &std::path::Path, steps: &str) -> (i32, String, String) {
    mnemo(&[
        "--threads",
        "1",
        "train",
        "--data",
        data.to_str().unwrap(),
        "--out",
        run.to_str().unwrap(),
        "--steps",
        steps,
        "--set",
        "vocab_size=300",
        "--set",
        "d_model=32",
        "--set",
        "n_layers=1",
        "--set",
        "head_dim=8",
        "--set",
        "rope_dim=8",
        "--set",
        "ffn_hidden=32",
        "--set",
        "data.val_fraction=0.5",
        "--batch-size",
        "2",
        "--seq-len",
        "16",
        "--quiet",
    ])
}

/// A repository much bigger than the tiny model's context: a second, different question reuses
/// the question-independent prefix; a change misses it; the size limit evicts the least recently
/// used entry; `mnemo cache list|clear` see and delete them. Also: `generate` says when
/// `--max-tokens` is beyond the context, `--steps 0` gives no `generate` hint, and training and
/// `eval` say how many validation windows their losses use.
#[test]
fn ask_packs_prefills_and_reuses_the_prefix_cache() {
    let d = tmpdir("ask");
    let data = d.join("repo");
    std::fs::create_dir_all(&data).unwrap();
    for i in 0..24 {
        let body: String = (0..4)
            .map(|j| format!("fn g_{i}_{j}() -> u8 {{ {j} }}\n"))
            .collect();
        std::fs::write(data.join(format!("m{i}.rs")), body).unwrap();
    }
    let run = d.join("run");
    let (code, _, err) = train_tiny(&data, &run, "2");
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("windows of 16 tokens = train.eval_batches 8")
            && err.contains("`mnemo eval` uses 32 batches"),
        "{err}"
    );
    assert!(err.contains("sample with: mnemo generate"), "{err}");
    let cache = d.join("cache");
    let ask = |q: &str, extra: &[&str]| {
        let mut args = vec![
            "ask",
            data.to_str().unwrap(),
            q,
            "--model",
            run.to_str().unwrap(),
            "--max-tokens",
            "8",
            "--cache-dir",
            cache.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let (code, _, err) = mnemo(&args);
        assert_eq!(code, 0, "{err}");
        err
    };
    let list = || {
        let (code, out, err) = mnemo(&["cache", "list", "--cache-dir", cache.to_str().unwrap()]);
        assert_eq!(code, 0, "{err}");
        out
    };
    let err = ask("what does g_1_2 return?", &[]);
    assert!(
        err.contains("prefilled") && err.contains("prefix cache saved"),
        "{err}"
    );
    assert!(
        err.contains("ranked without the question") && err.contains("files for this question"),
        "{err}"
    );
    // A different question: the cached part is reused, only its own files and itself prefilled.
    let err = ask("where is g_17_3 defined", &[]);
    assert!(
        err.contains("tokens: m17.rs"),
        "the question's file first: {err}"
    );
    assert!(
        err.contains("prefix cache hit") && err.contains("tokens reused"),
        "{err}"
    );
    assert!(!err.contains("prefilled"), "{err}");
    assert!(err.contains("of files for this question"), "{err}");
    assert!(
        list().contains("prefix caches (mnemo ask) in") && list().contains(": 1 entries"),
        "{}",
        list()
    );
    let entry = std::fs::read_dir(cache.join("prefix"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap();
    let size = entry.metadata().unwrap().len();
    // A changed repository misses the cache; with room for one entry the older one goes.
    let change = |i: usize| {
        // Same length, other values: the cached part changes, its size does not.
        let body: String = (0..4)
            .map(|j| format!("fn g_{i}_{j}() -> u8 {{ {} }}\n", 9 - j))
            .collect();
        std::fs::write(data.join(format!("m{i}.rs")), body).unwrap();
    };
    change(0);
    let limit = (size + size / 2).to_string();
    let err = ask("what does g_21_2 return?", &["--cache-limit", &limit]);
    assert!(err.contains("prefilled"), "{err}");
    assert!(
        err.contains("evicted 1 least recently used entries"),
        "{err}"
    );
    assert!(list().contains(": 1 entries"), "{}", list());
    // A limit of 0 saves nothing; so does one below the entry's size.
    change(1);
    let err = ask("q", &["--cache-limit", "0"]);
    assert!(
        err.contains("prefix cache not saved: its size limit is 0"),
        "{err}"
    );
    let (code, _, err) = mnemo_env(
        &[
            "ask",
            data.to_str().unwrap(),
            "q",
            "--model",
            run.to_str().unwrap(),
            "--max-tokens",
            "8",
            "--cache-dir",
            cache.to_str().unwrap(),
        ],
        &[("MNEMO_PREFIX_CACHE_LIMIT", "1K")],
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("prefix cache not kept") && err.contains("over the limit of 1.0 KiB"),
        "{err}"
    );
    assert!(
        list().contains(": 0 entries"),
        "nothing is under 1K: {}",
        list()
    );
    let (code, _, err) = mnemo_env(
        &[
            "ask",
            data.to_str().unwrap(),
            "q",
            "--model",
            run.to_str().unwrap(),
            "--cache-dir",
            cache.to_str().unwrap(),
        ],
        &[("MNEMO_PREFIX_CACHE_LIMIT", "lots")],
    );
    assert_ne!(code, 0);
    assert!(
        err.contains("$MNEMO_PREFIX_CACHE_LIMIT") && err.contains("`lots`"),
        "{err}"
    );
    // `cache clear --prefix` deletes them all.
    let err = ask("q", &[]);
    assert!(err.contains("prefix cache saved"), "{err}");
    let (code, out, err) = mnemo(&[
        "cache",
        "clear",
        "--prefix",
        "--cache-dir",
        cache.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("deleted 1 cache entries"), "{out}");
    assert!(list().contains(": 0 entries"), "{}", list());

    // `generate` says when --max-tokens is beyond the context (256 tokens).
    let (code, _, err) = mnemo(&[
        "generate",
        run.to_str().unwrap(),
        "--prompt",
        "fn g",
        "--max-tokens",
        "1000",
        "--temperature",
        "0",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("--max-tokens 1000 is more than the context leaves")
            && err.contains("of the model's 256 tokens"),
        "{err}"
    );
    // `eval` states its batches.
    let (code, out, err) = mnemo(&["eval", run.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("= 32 batches of 2") && out.contains("train.eval_batches"),
        "{out}"
    );
    // `--steps 0`: no checkpoint, so no `generate` hint.
    let (code, _, err) = train_tiny(&data, &d.join("zero"), "0");
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("0 steps: nothing was trained"), "{err}");
    assert!(!err.contains("sample with"), "{err}");
}
