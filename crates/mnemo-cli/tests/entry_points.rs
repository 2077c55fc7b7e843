//! `generate`, `serve` and `ask` give the same tokens at temperature 0 for the same model, prompt
//! and settings (docs/model-block.md, "Quantised weights: one rule for every decoding entry
//! point"): on the tiny f32 run and on a tiny quantised GGUF (`common/gguf.rs`), whose prompt
//! chunks run on the f32 weights and one-token steps on the quantised blocks.
//!
//! - `generate --prompt P` and the server's `/v1/completions` for `P`: a fresh prefill, the
//!   same prompt again (a hit of the server's prompt cache, `--prefix-min-tokens 16`), and a
//!   longer prompt that reuses it.
//! - `ask`, which cannot print the prompt it builds: the test builds it as `ask_cmd.rs` does
//!   (the packed repository, then `\n\nQuestion: …\nAnswer:`, tokenized separately), checks
//!   both lengths against those `ask` reports, and compares `ask`'s answer (prefilled with its
//!   prefix cache saved, then from that cache) with the server's completion of those token
//!   ids and with `generate` on their text (which tokenizes to the same ids).
//!
//! Every comparison is of the generated text (40 tokens at most); the assertion messages show
//! both texts.

mod common;

use common::server::{completion_text, Server};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Tokens generated per request: enough for a difference to show.
const N: usize = 40;

/// Run `mnemo --threads 1 ARGS` (the model's prompt-cache files go to the test's scratch
/// directory); its stdout, or a panic with its stderr.
fn mnemo_ok(args: &[&str]) -> (String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_mnemo"))
        .args(["--threads", "1"])
        .args(args)
        .env("MNEMO_CACHE", common::cache())
        .output()
        .expect("run mnemo");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert!(
        out.status.success(),
        "mnemo {args:?} failed ({}):\n{stderr}",
        out.status
    );
    (stdout, stderr)
}

/// `mnemo generate MODEL --prompt P --temperature 0 --max-tokens N`: the continuation alone
/// (stdout is the prompt, the continuation and a newline).
fn generate(model: &Path, prompt: &str) -> String {
    let (out, _) = mnemo_ok(&[
        "generate",
        &model.to_string_lossy(),
        "--prompt",
        prompt,
        "--temperature",
        "0",
        "--max-tokens",
        &N.to_string(),
    ]);
    out.strip_prefix(prompt)
        .and_then(|s| s.strip_suffix('\n'))
        .unwrap_or_else(|| panic!("generate's stdout is not the prompt {prompt:?}, a continuation and a newline: {out:?}"))
        .to_string()
}

/// The server's greedy completion of `prompt` (text or token ids) and its `usage`.
fn complete(s: &Server, prompt: Value) -> (String, Value) {
    let (st, v) = s.post(
        "/v1/completions",
        &json!({"prompt": prompt, "max_tokens": N, "temperature": 0}),
    );
    assert_eq!(st, 200, "{v}");
    (completion_text(&v), v["usage"].clone())
}

/// `mnemo ask REPO QUESTION --model MODEL --max-tokens N` (temperature 0 by default): the
/// answer and the stderr report.
fn ask(model: &Path, repo: &Path, question: &str, cache: &Path) -> (String, String) {
    let (out, err) = mnemo_ok(&[
        "ask",
        &repo.to_string_lossy(),
        question,
        "--model",
        &model.to_string_lossy(),
        "--max-tokens",
        &N.to_string(),
        "--cache-dir",
        &cache.to_string_lossy(),
    ]);
    let answer = out
        .strip_suffix('\n')
        .unwrap_or_else(|| panic!("ask's stdout does not end with a newline: {out:?}"));
    (answer.to_string(), err)
}

/// The prompt `ask` builds for `question` about `repo` when the whole repository fits (no
/// chat template): the packed repository, then the question, tokenized separately; also
/// their text and the repository's token count.
fn ask_prompt(
    l: &mnemo::checkpoint::Loaded,
    repo: &Path,
    question: &str,
) -> (Vec<u32>, String, usize) {
    let tok = &l.tokenizer;
    assert!(tok.chat_template().is_none(), "the test models have none");
    let ctx = l.model.cfg.max_seq_len;
    let opts = mnemo_pack::PackOptions::new(repo);
    let qp = mnemo_pack::pack_for_question(&opts, tok, ctx, ctx, question)
        .unwrap_or_else(|e| panic!("packing {}: {e:#}", repo.display()));
    assert!(qp.question.is_none(), "the repository fits whole");
    let context = mnemo_pack::context_text(&qp.stable);
    let tail = format!("\n\nQuestion: {question}\nAnswer:");
    let mut ids = tok.encode(&context).expect("encode the context");
    let n_context = ids.len();
    ids.extend(tok.encode(&tail).expect("encode the question"));
    (ids, format!("{context}{tail}"), n_context)
}

/// Load a model (and its tokenizer) as the commands do.
fn load(model: &Path) -> mnemo::checkpoint::Loaded {
    mnemo::checkpoint::load(model, false)
        .unwrap_or_else(|e| panic!("loading {}: {e:#}", model.display()))
}

/// A small repository (ASCII only: the GGUF's vocabulary has nothing else).
fn repo(name: &str) -> PathBuf {
    let d = common::tmpdir(name);
    std::fs::write(
        d.join("add.rs"),
        "fn add(x: i32, y: i32) -> i32 {\n    x + y\n}\n",
    )
    .expect("write add.rs");
    std::fs::write(
        d.join("twice.rs"),
        "fn twice(x: i32) -> i32 {\n    add(x, x)\n}\n",
    )
    .expect("write twice.rs");
    d
}

/// Every comparison for one model; `prompts` are at least 17 tokens long, so that their
/// second request hits the server's prompt cache.
fn check_agreement(model: &Path, prompts: &[&str], name: &str) {
    let s = Server::start_model(model, &["--prefix-min-tokens", "16"]);
    let mut distinct = std::collections::HashSet::new();
    for (i, &p) in prompts.iter().enumerate() {
        let g = generate(model, p);
        let (fresh, u) = complete(&s, json!(p));
        assert_eq!(
            u["prompt_tokens_details"]["cached_tokens"], 0,
            "{name}: {p:?} should be a fresh prompt: {u}"
        );
        assert_eq!(
            g, fresh,
            "{name}: generate and serve differ on prompt {p:?}\n  generate: {g:?}\n  serve:    {fresh:?}"
        );
        let (again, u) = complete(&s, json!(p));
        let cached = u["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap_or(0);
        assert!(
            cached >= 16,
            "{name}: the repeated prompt {p:?} did not hit the prompt cache: {u}"
        );
        assert_eq!(
            g, again,
            "{name}: generate and serve (prompt-cache hit, {cached} tokens reused) differ on \
             prompt {p:?}\n  generate: {g:?}\n  serve:    {again:?}"
        );
        assert!(!g.is_empty(), "{name}: prompt {i} generated nothing");
        distinct.extend(g.chars());
        // A longer prompt: the cached one, then more than one token, prefilled after it.
        let longer = format!("{p} x + x");
        let g = generate(model, &longer);
        let (ext, u) = complete(&s, json!(longer));
        let cached = u["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap_or(0);
        assert!(
            cached >= 16 && cached + 2 <= u["prompt_tokens"].as_u64().unwrap_or(0),
            "{name}: {longer:?} should reuse the cached {p:?} and prefill more than one token: {u}"
        );
        assert_eq!(
            g, ext,
            "{name}: generate and serve (prompt-cache hit, {cached} tokens reused) differ on \
             prompt {longer:?}\n  generate: {g:?}\n  serve:    {ext:?}"
        );
    }
    assert!(
        distinct.len() > 2,
        "{name}: the model's output is too uniform to tell entry points apart: {distinct:?}"
    );

    // `ask`: the prompt it builds, answered by the server (token ids) and by `ask` itself,
    // first prefilled (and its prefix saved), then from the saved prefix cache.
    let dir = repo(&format!("repo-{name}"));
    check_ask(model, &s, &dir, "What does twice return?", name);
}

/// `ask`'s answer about `dir` (prefilled, then from its saved prefix cache) = the server's
/// completion of the token ids `ask` builds = `generate` on their text.
fn check_ask(model: &Path, s: &Server, dir: &Path, question: &str, name: &str) {
    let l = load(model);
    let cache = common::tmpdir(&format!("ask-cache-{name}"));
    let (ids, text, n_context) = ask_prompt(&l, dir, question);
    let (served, u) = complete(s, json!(ids));
    assert_eq!(u["prompt_tokens"], ids.len(), "{u}");
    for round in ["prefilled", "prefix cache hit"] {
        let (answer, err) = ask(model, dir, question, &cache);
        assert!(err.contains(round), "{name}: expected `{round}` in:\n{err}");
        let files = std::fs::read_dir(dir).map_or(0, |d| d.count());
        assert!(
            err.contains(&format!(
                "the whole repository, {files} files, {n_context} tokens"
            )),
            "{name}: ask's context is not the {n_context} tokens this test rebuilt:\n{err}"
        );
        assert!(
            err.contains(&format!("{} of the question", ids.len() - n_context)),
            "{name}: ask's question is not the {} tokens this test rebuilt:\n{err}",
            ids.len() - n_context
        );
        assert_eq!(
            answer, served,
            "{name}: ask ({round}) and serve (the same token ids) differ\n  ask:   {answer:?}\n  \
             serve: {served:?}"
        );
    }
    assert_eq!(
        l.tokenizer.encode(&text).expect("encode"),
        ids,
        "{name}: ask's prompt, tokenized whole, is not the ids ask runs: generate cannot be \
         given the same prompt"
    );
    let g = generate(model, &text);
    assert_eq!(
        g, served,
        "{name}: generate on ask's prompt and ask differ\n  generate: {g:?}\n  ask:      {served:?}"
    );
}

/// The greedy continuation of `ids`, run naively in two parts: `ids[..split]` prefilled first
/// (when `split > 0`), then `ids[split..]` prefilled and decoded from, each part in chunks of
/// 256 tokens from its own start, whatever the length of its last chunk.
fn greedy_split(l: &mnemo::checkpoint::Loaded, ids: &[u32], split: usize) -> Vec<u32> {
    use mnemo::generate::{generate_after, KvCache, Sampling};
    let greedy = Sampling {
        temperature: 0.0,
        top_k: 0,
        top_p: 1.0,
    };
    let mut c = KvCache::new(&l.model);
    if split > 0 {
        l.model
            .forward_cached(&ids[..split], &mut c)
            .expect("prefill");
    }
    let n = l.tokenizer.vocab_size();
    generate_after(
        &l.model,
        &mut c,
        &ids[split..],
        N,
        greedy,
        0,
        n,
        None,
        |_| Ok(()),
    )
    .expect("generate")
}

const GGUF_PROMPTS: [&str; 2] = [
    "fn add(x: i32, y: i32) -> i32 {\n    x + y\n}\nfn twice(x: i32)",
    "fn inc(x: i32) -> i32 {\n    x + 1\n}\n",
];

/// The tiny quantised GGUF in a scratch directory.
fn gguf(name: &str) -> PathBuf {
    let model = common::tmpdir(name).join("tiny-q.gguf");
    common::gguf::write_tiny_llama(&model, 5);
    model
}

/// A small f32 run trained until its output follows its prompt (400 steps, about a second):
/// the serve tests' 3-step run mostly repeats the prompt's last token, so a wrong or missing
/// prompt token would hardly show.
fn trained_run() -> PathBuf {
    let d = common::tmpdir("trained");
    let data = d.join("data");
    std::fs::create_dir_all(&data).expect("create the data directory");
    for i in 0..10 {
        let body: String = (0..40)
            .map(|j| format!("fn f_{i}_{j}(x: i32) -> i32 {{ x * {j} }}\n"))
            .collect();
        std::fs::write(data.join(format!("m{i}.rs")), body).expect("write the data");
    }
    let run = d.join("run");
    mnemo_ok(&[
        "train",
        "--data",
        &data.to_string_lossy(),
        "--out",
        &run.to_string_lossy(),
        "--steps",
        "400",
        "--quiet",
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
        "max_seq_len=512",
        "--batch-size",
        "4",
        "--seq-len",
        "32",
    ]);
    run
}

#[test]
fn f32_run_generate_serve_and_ask_agree() {
    check_agreement(
        &trained_run(),
        &[
            "fn f_3_1(x: i32) -> i32 { x * 1 }\nfn f_3_2(x: i32) -> i32",
            "fn f_7_9(x: i32) -> i32 { x * 9 }\nfn f_7_10(",
        ],
        "f32",
    );
}

/// The tiny quantised GGUF. Every prompt row runs on the quantised blocks exactly as one-token
/// decoding does (`decode::Plan`), so where a prefill is split does not change the greedy
/// answer (it did when prompt chunks ran on the f32 weights and one-row pieces on the blocks).
#[test]
fn quantised_gguf_generate_serve_and_ask_agree() {
    let model = gguf("gguf");
    let l = load(&model);
    assert!(!l.model.quant.is_empty(), "the GGUF has quantised weights");
    for p in GGUF_PROMPTS {
        let ids = l.tokenizer.encode(p).expect("encode");
        let (chunk, lone) = (
            greedy_split(&l, &ids, 0),
            greedy_split(&l, &ids, ids.len() - 1),
        );
        assert_eq!(
            chunk, lone,
            "a prompt whose last row is prefilled alone answers differently (prompt {p:?})"
        );
    }
    check_agreement(&model, &GGUF_PROMPTS, "gguf");
    std::fs::remove_file(&model).expect("remove the GGUF");
}

/// `ask` prefills its cached part (the repository) and the rest (the question) separately;
/// `generate` and the server prefill the whole prompt in chunks of 256 tokens from its start.
/// Every prompt row runs on the quantised blocks (as one-token decoding does), so the split
/// changes nothing: with a repository of 257 tokens and with a question of 257 tokens (where a
/// part ends with a one-token chunk), the naive split (the cached part, then the rest, each as
/// one prefill) gives the fresh prefill's answer, and `ask` (`ask_cmd::prefill`) = `generate`
/// = the server.
#[test]
fn quantised_gguf_ask_agrees_when_a_prompt_part_ends_with_a_one_token_chunk() {
    let model = gguf("gguf-parts");
    let l = load(&model);
    let s = Server::start_model(&model, &[]);
    let naive_same = |ids: &[u32], n_context: usize, what: &str| {
        assert_eq!(
            greedy_split(&l, ids, 0),
            greedy_split(&l, ids, n_context),
            "{what}: prefilling the repository and the question separately changes the answer"
        );
    };
    // The repository takes 257 tokens.
    let dir = repo("repo-257");
    let question = "What does twice return?";
    let found = (0..400).find_map(|k| {
        let pad = format!("x{}\n", " x".repeat(k));
        std::fs::write(dir.join("pad.txt"), pad).expect("write pad.txt");
        let (ids, _, n_context) = ask_prompt(&l, &dir, question);
        (n_context == 257).then_some((ids, n_context))
    });
    let (ids, n_context) = found.expect("a padding that makes the repository 257 tokens");
    naive_same(&ids, n_context, "a repository of 257 tokens");
    check_ask(&model, &s, &dir, question, "gguf-257-context");
    // The question takes 257 tokens.
    let dir = repo("repo-long-question");
    let words = ["a", "b", "c"];
    let (question, ids, n_context) = (0..400)
        .find_map(|k| {
            let q: Vec<&str> = (0..=k).map(|i| words[i % words.len()]).collect();
            let q = q.join(" ");
            let (ids, _, n_context) = ask_prompt(&l, &dir, &q);
            (ids.len() - n_context == 257).then_some((q, ids, n_context))
        })
        .expect("a question of 257 tokens");
    naive_same(&ids, n_context, "a question of 257 tokens");
    check_ask(&model, &s, &dir, &question, "gguf-257-question");
    drop(s);
    std::fs::remove_file(&model).expect("remove the GGUF");
}
