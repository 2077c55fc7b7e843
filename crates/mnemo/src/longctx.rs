//! Synthetic long-context checks: needle-in-a-haystack (NIAH) and variable tracking (VT) over
//! code-like filler, their exact scoring, the `mnemo eval --task niah|vt` runner, and the same
//! documents as a training data source (`train.synthetic`).
//!
//! # Documents
//!
//! A sample is one token sequence of exactly `len` tokens, `prompt ‖ answer`:
//!
//! ```text
//! [tail of a filler line] filler lines … NEEDLE … filler lines … QUERY | ANSWER
//! ```
//!
//! * **Filler**: plausible Rust or Python lines (the language is drawn per document):
//!   assignments, pushes, loops, one-line functions, comments, built from small word lists and
//!   numbers below 1000, deterministic from the seed. It never contains the needle's key or a
//!   number of five digits, so the answer is only in the needle.
//! * **NIAH**: the needle `let secret_key_K = NNNNN;` (Python: `secret_key_K = NNNNN`), K in
//!   0..100 and NNNNN in 10000..100000, sits at the line boundary nearest to `depth · F`
//!   filler tokens (`F` = filler tokens of the document, depth 0 = the first line, 1 = just
//!   before the query). The query `// what is secret_key_K?\nlet answer = secret_key_K =`
//!   ends exactly like the needle's prefix, so the answer ` NNNNN;` (its space included: a
//!   GPT-2 style pre-tokenizer keeps ` NNNNN` as one piece, so the answer has the needle's
//!   ids) is one copy away, which an induction head can learn.
//! * **VT**: a chain `let v_abc = NNNNN;`, `let v_def = v_abc;`, … of [`VT_HOPS`] assignments;
//!   the first at `depth`, the others evenly spaced between it and the query
//!   `// what is v_xyz?\nassert_eq!(v_xyz,` (the last name), answer ` NNNNN)`.
//!
//! Every line is tokenized on its own and the ids are concatenated, so the needle, the query and
//! the answer have the same ids wherever they are; the filler is filled to the exact token
//! budget by starting the document with the tail of one line.
//!
//! # Scoring
//!
//! Greedy decoding of `answer_tokens + 1` tokens after the prompt; correct iff the decoded text
//! starts with a space and the five digits and the next character (if any) is not a digit
//! ([`score`]).
//!
//! # Evaluation
//!
//! [`run_eval`] runs every (context, depth, sample) through the cached forward path
//! ([`Model::forward_cached`], prefill in chunks) with a KV cache of exactly the context length,
//! after checking that every context fits the model ([`check_contexts`]): a clear error before
//! any work, never an out-of-memory crash.

pub use crate::config::longctx::MIN_CONTEXT;
pub use crate::config::{SyntheticLoss, SyntheticMix, Task};
use crate::generate::{KvCache, Sampling};
use crate::kernels::rope::RopeScaling;
use crate::model::Model;
use crate::rng::Rng;
use crate::tokenizer::Tokenizer;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

/// Assignments in a variable-tracking chain.
pub const VT_HOPS: usize = 4;
/// One built sample.
#[derive(Clone, Debug)]
pub struct Sample {
    /// Everything before the answer.
    pub prompt: Vec<u32>,
    /// The answer's ids (the digits and the terminator).
    pub answer_tokens: Vec<u32>,
    /// The five digits to retrieve.
    pub value: String,
    /// What a correct answer starts with: a space and the digits (see [`score`]).
    pub expect: String,
    /// Token offset in `prompt` of the needle (NIAH) or of the chain's first assignment (VT).
    pub needle_at: usize,
    /// Filler tokens in the prompt.
    pub filler_tokens: usize,
    /// Positions in [`Sample::full`] of every answer token: the answered extra queries' values
    /// (training documents) and the final answer (always last). `train.synthetic.loss =
    /// "answers"` counts only the targets at these positions.
    pub answer_spans: Vec<std::ops::Range<usize>>,
}

impl Sample {
    /// `prompt ‖ answer`: exactly the `len` tokens asked for.
    pub fn full(&self) -> Vec<u32> {
        let mut v = self.prompt.clone();
        v.extend_from_slice(&self.answer_tokens);
        v
    }
}

const WORDS: &[&str] = &[
    "count", "total", "buf", "idx", "value", "offset", "len", "acc", "result", "item", "node",
    "key", "size", "limit", "step", "flag", "score", "delta", "width", "height", "left", "right",
    "head", "tail", "cursor", "index", "state", "level", "depth", "weight",
];
const FUNCS: &[&str] = &[
    "parse", "update", "compute", "merge", "scale", "clamp", "advance", "reset", "encode",
    "lookup", "insert", "remove", "visit", "flush", "split",
];
const COMMENT: &[&str] = &[
    "the", "next", "value", "is", "kept", "for", "later", "check", "bounds", "before", "we",
    "move", "on", "this", "loop", "updates", "cache", "entry", "fast", "path", "when", "empty",
];

/// Code-like filler lines (each ends with `\n`).
struct Filler {
    rng: Rng,
    python: bool,
}

impl Filler {
    fn word(&mut self, list: &[&'static str]) -> &'static str {
        list[self.rng.below(list.len() as u64) as usize]
    }
    fn num(&mut self) -> u64 {
        match self.rng.below(3) {
            0 => self.rng.below(10),
            1 => self.rng.below(100),
            _ => self.rng.below(1000),
        }
    }
    fn line(&mut self) -> String {
        let (a, b, f) = (self.word(WORDS), self.word(WORDS), self.word(FUNCS));
        let n = self.num();
        let indent = if self.rng.below(3) == 0 { "    " } else { "" };
        let body = if self.python {
            match self.rng.below(9) {
                0 | 1 => format!("{a} = {n}"),
                2 => format!("{a} = {b} + {n}"),
                3 => {
                    let k = 2 + self.rng.below(5);
                    let w: Vec<&str> = (0..k).map(|_| self.word(COMMENT)).collect();
                    format!("# {}", w.join(" "))
                }
                4 => format!("def {f}_{a}({b}): return {b} * {n}"),
                5 => format!("for i in range({n}): {a} += i"),
                6 => format!("if {a} > {n}: {b} = {a}"),
                7 => format!("{a}.append({b})"),
                _ => format!("{a} = {f}({b}, {n})"),
            }
        } else {
            match self.rng.below(9) {
                0 | 1 => format!("let {a} = {n};"),
                2 => format!("let {a} = {b} + {n};"),
                3 => {
                    let k = 2 + self.rng.below(5);
                    let w: Vec<&str> = (0..k).map(|_| self.word(COMMENT)).collect();
                    format!("// {}", w.join(" "))
                }
                4 => format!("fn {f}_{a}({b}: u32) -> u32 {{ {b} * {n} }}"),
                5 => format!("for i in 0..{n} {{ {a} += i; }}"),
                6 => format!("if {a} > {n} {{ {b} = {a}; }}"),
                7 => format!("{a}.push({b});"),
                _ => format!("let {a} = {f}({b}, {n});"),
            }
        };
        format!("{indent}{body}\n")
    }
}

fn vt_name(rng: &mut Rng, used: &mut Vec<String>) -> String {
    loop {
        let s: String = (0..3)
            .map(|_| (b'a' + rng.below(26) as u8) as char)
            .collect();
        let name = format!("v_{s}");
        if !used.contains(&name) {
            used.push(name.clone());
            return name;
        }
    }
}

/// Extra (needle, answered query) pairs in a NIAH training document ([`make_train_sample`]).
pub const TRAIN_RECALLS: usize = 3;

/// Build one sample of exactly `len` tokens (`prompt ‖ answer`), the needle at `depth ∈ [0, 1]`,
/// deterministic in (`task`, `len`, `depth`, `seed`, tokenizer).
pub fn make_sample(
    task: Task,
    tok: &Tokenizer,
    len: usize,
    depth: f64,
    seed: u64,
) -> Result<Sample> {
    build(task, tok, len, depth, seed, 0)
}

/// A training document: like [`make_sample`], and for NIAH with up to [`TRAIN_RECALLS`] more
/// needles, as many as fit in half of the document (other keys, in the first half of the filler) each answered by a complete query line
/// `… answer = secret_key_J = VVVVV;` in the second half, so that one document holds several
/// retrievals to learn from instead of one.
pub fn make_train_sample(
    task: Task,
    tok: &Tokenizer,
    len: usize,
    depth: f64,
    seed: u64,
) -> Result<Sample> {
    build(task, tok, len, depth, seed, TRAIN_RECALLS)
}

fn build(
    task: Task,
    tok: &Tokenizer,
    len: usize,
    depth: f64,
    seed: u64,
    recalls: usize,
) -> Result<Sample> {
    if !(0.0..=1.0).contains(&depth) {
        bail!("depth {depth} must be in [0, 1]");
    }
    let mut rng = Rng::new(seed ^ 0x6e69_6168_0000_0000);
    let task = match task {
        Task::Mix if rng.below(2) == 0 => Task::Niah,
        Task::Mix => Task::Vt,
        t => t,
    };
    let python = rng.below(2) == 0;
    let value = 10000 + rng.below(90000);
    let (cm, semi, letkw) = if python {
        ("#", "", "")
    } else {
        ("//", ";", "let ")
    };
    // Extra (needle, answered query) lines of a training document: (depth, text pieces, which
    // piece is an answer). An answered query is `query ‖ answer ‖ "\n"`, each piece tokenized on
    // its own like the final query and answer.
    let mut extras: Vec<(f64, Vec<String>, Option<usize>)> = Vec::new();
    // The needle lines and the query/answer texts.
    let (needles, query, answer): (Vec<String>, String, String) = match task {
        Task::Niah | Task::Mix => {
            let mut keys = vec![rng.below(100)];
            let mut values = vec![value];
            while keys.len() < 1 + recalls {
                let k = rng.below(100);
                if !keys.contains(&k) {
                    keys.push(k);
                    values.push(10000 + rng.below(90000));
                }
            }
            for (k, v) in keys.iter().zip(&values).skip(1) {
                let key = format!("secret_key_{k}");
                extras.push((
                    0.5 * rng.next_f64(),
                    vec![format!("{letkw}{key} = {v}{semi}\n")],
                    None,
                ));
                extras.push((
                    0.5 + 0.5 * rng.next_f64(),
                    vec![
                        format!("{cm} what is {key}?\n{letkw}answer = {key} ="),
                        format!(" {v}{semi}"),
                        "\n".to_string(),
                    ],
                    Some(1),
                ));
            }
            let key = format!("secret_key_{}", keys[0]);
            (
                vec![format!("{letkw}{key} = {value}{semi}\n")],
                format!("{cm} what is {key}?\n{letkw}answer = {key} ="),
                format!(" {value}{semi}"),
            )
        }
        Task::Vt => {
            let mut used = Vec::new();
            let names: Vec<String> = (0..VT_HOPS).map(|_| vt_name(&mut rng, &mut used)).collect();
            let mut lines = vec![format!("{letkw}{} = {value}{semi}\n", names[0])];
            for w in names.windows(2) {
                lines.push(format!("{letkw}{} = {}{semi}\n", w[1], w[0]));
            }
            let last = &names[VT_HOPS - 1];
            let q = if python {
                format!("# what is {last}?\nassert {last} ==")
            } else {
                format!("// what is {last}?\nassert_eq!({last},")
            };
            let a = if python {
                format!(" {value}")
            } else {
                format!(" {value})")
            };
            (lines, q, a)
        }
    };
    let enc = |s: &str| {
        tok.encode(s)
            .with_context(|| format!("cannot tokenize {s:?}"))
    };
    let needle_ids: Vec<Vec<u32>> = needles.iter().map(|s| enc(s)).collect::<Result<_>>()?;
    let query_ids = enc(&query)?;
    let answer_ids = enc(&answer)?;
    // (depth, ids, answer range within the ids).
    type Extra = (f64, Vec<u32>, Option<std::ops::Range<usize>>);
    let mut extra_ids: Vec<Extra> = extras
        .iter()
        .map(|(d, pieces, ans)| {
            let mut ids = Vec::new();
            let mut range = None;
            for (i, p) in pieces.iter().enumerate() {
                let start = ids.len();
                ids.extend(enc(p)?);
                if Some(i) == *ans {
                    range = Some(start..ids.len());
                }
            }
            Ok((*d, ids, range))
        })
        .collect::<Result<_>>()?;
    let base = needle_ids.iter().map(Vec::len).sum::<usize>() + query_ids.len() + answer_ids.len();
    // Extras take at most half of the document: drop (needle, answer) pairs until they fit.
    while !extra_ids.is_empty()
        && base + extra_ids.iter().map(|e| e.1.len()).sum::<usize>() > len / 2
    {
        extra_ids.truncate(extra_ids.len() - 2);
    }
    let fixed = base + extra_ids.iter().map(|e| e.1.len()).sum::<usize>();
    if len < MIN_CONTEXT || len < fixed + 8 {
        bail!(
            "a context of {len} tokens is too short for a sample (at least {} tokens)",
            MIN_CONTEXT.max(fixed + 8)
        );
    }
    let budget = len - fixed;
    // Filler lines until the budget is reached; the overshoot is cut from the head of the last
    // line, which then opens the document (a window starting mid-line).
    let mut filler = Filler {
        rng: Rng::new(rng.next_u64()),
        python,
    };
    let mut lines: Vec<Vec<u32>> = Vec::new();
    let mut total = 0usize;
    while total < budget {
        let ids = enc(&filler.line())?;
        total += ids.len();
        lines.push(ids);
    }
    let mut last = lines.pop().context("no filler")?;
    let excess = total - budget;
    last.drain(..excess);
    lines.insert(0, last);
    // Line boundaries: cumulative filler offsets 0 (before the fragment), after line 0, ….
    let mut bounds = vec![0usize];
    for l in &lines {
        bounds.push(bounds.last().copied().unwrap_or(0) + l.len());
    }
    let nearest = |target: f64| -> usize {
        // Index into `bounds` of the boundary nearest `target` (ties toward the start).
        let mut best = 0;
        for (i, &b) in bounds.iter().enumerate() {
            if (b as f64 - target).abs() < (bounds[best] as f64 - target).abs() {
                best = i;
            }
        }
        best
    };
    // Inserted items (boundary slot, is the first needle, ids, answer range in the ids), in
    // slot order; the needles keep their chain order, extras go after needles of the same slot.
    type Item<'a> = (usize, bool, &'a [u32], Option<std::ops::Range<usize>>);
    let k = needle_ids.len();
    let mut items: Vec<Item> = (0..k)
        .map(|j| {
            let d = if k == 1 {
                depth
            } else {
                depth + (1.0 - depth) * j as f64 / k as f64
            };
            (nearest(d * budget as f64), j == 0, &needle_ids[j][..], None)
        })
        .collect();
    items.extend(
        extra_ids
            .iter()
            .map(|(d, ids, a)| (nearest(d * budget as f64), false, &ids[..], a.clone())),
    );
    items.sort_by_key(|it| it.0);
    let mut prompt = Vec::with_capacity(len);
    let mut needle_at = usize::MAX;
    let mut answer_spans = Vec::new();
    let mut next = 0;
    for i in 0..=lines.len() {
        while next < items.len() && items[next].0 == i {
            if items[next].1 {
                needle_at = prompt.len();
            }
            if let Some(a) = &items[next].3 {
                answer_spans.push(prompt.len() + a.start..prompt.len() + a.end);
            }
            prompt.extend_from_slice(items[next].2);
            next += 1;
        }
        if let Some(l) = lines.get(i) {
            prompt.extend_from_slice(l);
        }
    }
    prompt.extend_from_slice(&query_ids);
    debug_assert_eq!(prompt.len() + answer_ids.len(), len);
    answer_spans.push(prompt.len()..len);
    Ok(Sample {
        prompt,
        answer_tokens: answer_ids,
        value: value.to_string(),
        expect: format!(" {value}"),
        needle_at,
        filler_tokens: budget,
        answer_spans,
    })
}

/// Whether a greedy continuation is exactly the answer: it starts with `expect` (a space and
/// the digits) and the next character, if any, is not a digit.
pub fn score(generated: &str, expect: &str) -> bool {
    generated
        .strip_prefix(expect)
        .is_some_and(|rest| !rest.starts_with(|c: char| c.is_ascii_digit()))
}

/// Settings of one evaluation.
#[derive(Clone, Debug, Serialize)]
pub struct EvalConfig {
    pub task: Task,
    /// Total tokens per sample (prompt + answer).
    pub contexts: Vec<usize>,
    pub depths: Vec<f64>,
    pub samples: usize,
    pub seed: u64,
}

/// Accuracy of one (context, depth) cell.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Cell {
    pub context: usize,
    pub depth: f64,
    pub correct: usize,
    pub total: usize,
    pub accuracy: f64,
    /// Per sample: the expected answer and the greedy continuation.
    pub answers: Vec<(String, String)>,
}

/// Check the settings against the model before any work: every context within
/// `MIN_CONTEXT..=max_seq_len`, depths in [0, 1], at least one sample.
pub fn check_contexts(cfg: &EvalConfig, max_seq_len: usize) -> Result<()> {
    if cfg.task == Task::Mix {
        bail!("--task must be niah or vt");
    }
    if cfg.contexts.is_empty() || cfg.depths.is_empty() || cfg.samples == 0 {
        bail!("--context, --depths and --samples must each give at least one value");
    }
    for &c in &cfg.contexts {
        if c > max_seq_len {
            bail!(
                "--context {c} exceeds the model's maximum context of {max_seq_len} tokens \
                 (max_seq_len); extend it with --extend or a long-context training stage \
                 (mnemo train --init RUN --rope-scaling-factor F)"
            );
        }
        if c < MIN_CONTEXT {
            bail!("--context {c} is below the minimum of {MIN_CONTEXT} tokens");
        }
    }
    if let Some(d) = cfg.depths.iter().find(|d| !(0.0..=1.0).contains(*d)) {
        bail!("--depths: {d} is not in [0, 1]");
    }
    Ok(())
}

/// Seed of sample `i` of cell (`context`, `depth`): independent of the other cells, so adding a
/// context or a depth does not change the existing samples.
fn sample_seed(seed: u64, task: Task, context: usize, depth: f64, i: usize) -> u64 {
    let s = format!("{seed}/{task:?}/{context}/{depth}/{i}");
    crate::util::fnv1a64(s.as_bytes())
}

/// Greedy continuation of `sample.prompt` (answer tokens + 1), through a KV cache of exactly
/// `context` positions; returns the decoded text.
pub fn answer(model: &Model, tok: &Tokenizer, sample: &Sample, context: usize) -> Result<String> {
    let mut cache = KvCache::with_capacity(model, context);
    let greedy = Sampling {
        temperature: 0.0,
        top_k: 0,
        top_p: 1.0,
    };
    let out = crate::generate::generate_after(
        model,
        &mut cache,
        &sample.prompt,
        sample.answer_tokens.len() + 1,
        greedy,
        0,
        tok.vocab_size().min(model.cfg.vocab_size),
        None,
        |_| Ok(()),
    )?;
    tok.decode(&out)
}

/// Run the evaluation; `progress` is called after every sample. Cells are ordered by context,
/// then depth.
pub fn run_eval(
    model: &Model,
    tok: &Tokenizer,
    cfg: &EvalConfig,
    mut progress: impl FnMut(&Cell),
) -> Result<Vec<Cell>> {
    check_contexts(cfg, model.cfg.max_seq_len)?;
    let mut cells = Vec::new();
    for &context in &cfg.contexts {
        for &depth in &cfg.depths {
            let mut cell = Cell {
                context,
                depth,
                correct: 0,
                total: 0,
                accuracy: 0.0,
                answers: Vec::new(),
            };
            for i in 0..cfg.samples {
                let s = make_sample(
                    cfg.task,
                    tok,
                    context,
                    depth,
                    sample_seed(cfg.seed, cfg.task, context, depth, i),
                )?;
                let text = answer(model, tok, &s, context)?;
                cell.total += 1;
                cell.correct += score(&text, &s.expect) as usize;
                cell.accuracy = cell.correct as f64 / cell.total as f64;
                cell.answers.push((s.expect.clone(), text));
                progress(&cell);
            }
            cells.push(cell);
        }
    }
    Ok(cells)
}

/// Accuracy table: one row per depth, one column per context, and a mean row.
pub fn table(cells: &[Cell]) -> String {
    let mut ctx: Vec<usize> = cells.iter().map(|c| c.context).collect();
    ctx.dedup();
    let mut depths: Vec<f64> = Vec::new();
    for c in cells {
        if !depths.contains(&c.depth) {
            depths.push(c.depth);
        }
    }
    let mut s = format!("{:>8}", "depth");
    for c in &ctx {
        s += &format!(" {:>8}", c);
    }
    s.push('\n');
    let get = |c: usize, d: f64| cells.iter().find(|x| x.context == c && x.depth == d);
    for &d in &depths {
        s += &format!("{d:>8.2}");
        for &c in &ctx {
            match get(c, d) {
                Some(x) => s += &format!(" {:>7.0}%", 100.0 * x.accuracy),
                None => s += &format!(" {:>8}", "-"),
            }
        }
        s.push('\n');
    }
    s += &format!("{:>8}", "mean");
    for &c in &ctx {
        let (k, n) = cells
            .iter()
            .filter(|x| x.context == c)
            .fold((0, 0), |(k, n), x| (k + x.correct, n + x.total));
        s += &format!(" {:>7.0}%", 100.0 * k as f64 / n.max(1) as f64);
    }
    s.push('\n');
    s
}

/// Extend a loaded model's context `factor`× beyond its `max_seq_len` without training:
/// `yarn` = zero-shot YaRN (`original_max_position_embeddings` = the current context, or the
/// existing scaling's), otherwise plain RoPE extrapolation (a longer table, same frequencies).
pub fn extend_context(model: &mut Model, factor: f64, yarn: bool) -> Result<()> {
    if !(factor.is_finite() && factor >= 1.0) {
        bail!("--extend {factor}: must be a number >= 1");
    }
    let c = &mut model.cfg;
    if yarn {
        let (orig, f0) = match &c.rope_scaling {
            Some(r) => (r.original_max_position_embeddings, r.factor),
            None => (c.max_seq_len, 1.0),
        };
        let mut rs = c
            .rope_scaling
            .clone()
            .unwrap_or_else(|| RopeScaling::yarn(1.0, orig));
        rs.factor = f0 * factor;
        c.max_seq_len = (c.max_seq_len as f64 * factor).floor() as usize;
        c.max_seq_len = c.max_seq_len.min(rs.max_context());
        c.rope_scaling = Some(rs);
    } else {
        c.max_seq_len = (c.max_seq_len as f64 * factor).floor() as usize;
        if let Some(r) = &c.rope_scaling {
            if c.max_seq_len > r.max_context() {
                bail!(
                    "--extend-mode plain cannot go beyond the YaRN range of {} tokens",
                    r.max_context()
                );
            }
        }
    }
    c.validate()?;
    model.rope = c.rope_table();
    Ok(())
}

/// Training rows: overwrite each row of `inputs`/`targets` (`b` rows of `t`) with a synthetic
/// document of `t + 1` tokens with probability `fraction`, drawing from `rng` (so a resumed run
/// samples the same rows). Depths are uniform in [0, 1]. With [`SyntheticLoss::Answers`] every
/// target of a synthetic row but its answer tokens ([`Sample::answer_spans`]) is
/// [`crate::kernels::cross_entropy::IGNORE`]; real rows are left as they are.
#[allow(clippy::too_many_arguments)]
pub fn mix_into_batch(
    task: Task,
    fraction: f64,
    loss: SyntheticLoss,
    tok: &Tokenizer,
    rng: &mut Rng,
    b: usize,
    t: usize,
    inputs: &mut [u32],
    targets: &mut [u32],
) -> Result<usize> {
    let mut n = 0;
    for r in 0..b {
        if rng.next_f64() >= fraction {
            continue;
        }
        let depth = rng.next_f64();
        let sample = make_train_sample(task, tok, t + 1, depth, rng.next_u64())?;
        let s = sample.full();
        inputs[r * t..(r + 1) * t].copy_from_slice(&s[..t]);
        let row = &mut targets[r * t..(r + 1) * t];
        match loss {
            SyntheticLoss::All => row.copy_from_slice(&s[1..]),
            SyntheticLoss::Answers => {
                // Target j predicts full[j + 1].
                row.fill(crate::kernels::cross_entropy::IGNORE);
                for p in sample.answer_spans.iter().flat_map(|a| a.clone()) {
                    if p >= 1 {
                        row[p - 1] = s[p];
                    }
                }
            }
        }
        n += 1;
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny(max_seq_len: usize) -> Model {
        let cfg = crate::config::ModelConfig {
            vocab_size: 400,
            d_model: 16,
            n_layers: 1,
            n_heads: 2,
            n_kv_heads: 1,
            head_dim: 8,
            rope_dim: 8,
            ffn_hidden: 24,
            max_seq_len,
            ..crate::config::ModelConfig::dense_defaults()
        };
        let mut m = Model::new(cfg).unwrap();
        m.init(1);
        m
    }

    fn tok() -> Tokenizer {
        let text = "let count = 12;\nfn parse_key(buf: u32) -> u32 { buf * 7 }\n# the next value\n\
                    secret_key_3 = 48213\nassert_eq!(v_abc, 10000)\n"
            .repeat(30);
        Tokenizer::train([text].into_iter(), 400).unwrap()
    }

    #[test]
    fn samples_are_deterministic_exact_length_and_put_the_needle_at_its_depth() {
        let tk = tok();
        for task in [Task::Niah, Task::Vt] {
            for &len in &[150usize, 300, 1000] {
                for &d in &[0.0, 0.25, 0.5, 0.75, 1.0] {
                    let a = make_sample(task, &tk, len, d, 7).unwrap();
                    let b = make_sample(task, &tk, len, d, 7).unwrap();
                    assert_eq!(a.full(), b.full());
                    assert_eq!(a.full().len(), len, "{task:?} {len} {d}");
                    // The needle sits within one filler line (< 40 tokens) of depth·F.
                    let want = d * a.filler_tokens as f64;
                    assert!(
                        (a.needle_at as f64 - want).abs() <= 40.0,
                        "{task:?} len {len} depth {d}: needle at {} of {}",
                        a.needle_at,
                        a.filler_tokens
                    );
                    let text = tk.decode(&a.prompt).unwrap();
                    let needle = tk.decode(&a.prompt[a.needle_at..]).unwrap();
                    assert!(needle.contains(&a.value), "{text}");
                    // The value occurs exactly once in the prompt (only in the needle).
                    assert_eq!(text.matches(&a.value).count(), 1, "{text}");
                    // The key: once in the needle, twice in the query.
                    assert_eq!(
                        text.matches("secret_key").count(),
                        3 * (task == Task::Niah) as usize
                    );
                    let ans = tk.decode(&a.answer_tokens).unwrap();
                    assert!(score(&ans, &a.expect), "{ans}");
                    assert_eq!(a.expect, format!(" {}", a.value));
                }
            }
            let c = make_sample(task, &tk, 300, 0.5, 8).unwrap();
            assert_ne!(
                c.full(),
                make_sample(task, &tk, 300, 0.5, 7).unwrap().full()
            );
        }
        let s = make_sample(Task::Niah, &tk, 400, 0.5, 3).unwrap();
        let t = tk.decode(&s.prompt).unwrap();
        assert!(
            t.ends_with(&format!(
                "answer = secret_key_{} =",
                t.split("what is secret_key_")
                    .nth(1)
                    .unwrap()
                    .split('?')
                    .next()
                    .unwrap()
            )),
            "{t}"
        );
        assert!(make_sample(Task::Niah, &tk, 20, 0.5, 3).is_err());
    }

    #[test]
    fn training_samples_answer_every_extra_needle() {
        let tk = tok();
        let s = make_train_sample(Task::Niah, &tk, 600, 0.3, 11).unwrap();
        assert_eq!(s.full().len(), 600);
        let text = tk.decode(&s.prompt).unwrap();
        let answered: Vec<&str> = text.split("answer = ").skip(1).collect();
        assert_eq!(answered.len(), 1 + TRAIN_RECALLS, "{text}");
        for a in &answered[..TRAIN_RECALLS] {
            // `secret_key_J = VVVVV;` was defined before it is answered.
            let line = a.split('\n').next().unwrap().trim_end_matches(';');
            let at = text.find(a).unwrap();
            assert!(
                text[..at].contains(&format!("let {line};"))
                    || text[..at].contains(&format!("{line}\n")),
                "{line}"
            );
        }
        // The main needle is unchanged by the extras' presence: its value answers the query.
        assert!(text.contains(&s.value));
    }

    #[test]
    fn answer_loss_keeps_exactly_the_answer_tokens() {
        use crate::kernels::cross_entropy::IGNORE;
        let tk = tok();
        let (b, t) = (2, 600);
        let mut x = vec![1u32; b * t];
        let mut y = vec![2u32; b * t];
        let mut r = Rng::new(9);
        let mut r2 = r.clone();
        let n = mix_into_batch(
            Task::Niah,
            1.0,
            SyntheticLoss::Answers,
            &tk,
            &mut r,
            b,
            t,
            &mut x,
            &mut y,
        )
        .unwrap();
        assert_eq!(n, b);
        // Rebuild the rows' samples from the same draws and check each target.
        for row in 0..b {
            let _ = r2.next_f64();
            let depth = r2.next_f64();
            let s = make_train_sample(Task::Niah, &tk, t + 1, depth, r2.next_u64()).unwrap();
            let full = s.full();
            assert_eq!(&x[row * t..(row + 1) * t], &full[..t]);
            // One span per answered query: the extras' and the final answer (last).
            assert_eq!(s.answer_spans.len(), 1 + TRAIN_RECALLS);
            assert_eq!(
                s.answer_spans.last().unwrap().clone(),
                t + 1 - s.answer_tokens.len()..t + 1
            );
            let kept: Vec<usize> = (0..t).filter(|&j| y[row * t + j] != IGNORE).collect();
            let want: Vec<usize> = s
                .answer_spans
                .iter()
                .flat_map(|a| a.clone())
                .map(|p| p - 1)
                .collect();
            assert_eq!(kept, want);
            for &j in &kept {
                assert_eq!(y[row * t + j], full[j + 1]);
            }
            // Every kept span decodes to a space and five digits (and the terminator).
            for a in &s.answer_spans {
                let text = tk.decode(&full[a.clone()]).unwrap();
                let digits = text.trim_start_matches(' ').trim_end_matches(';');
                assert!(
                    text.starts_with(' ')
                        && digits.len() == 5
                        && digits.chars().all(|c| c.is_ascii_digit()),
                    "{text:?}"
                );
            }
        }
        // The answer values are the needles': every extra's value appears earlier in its row.
        let text = tk.decode(&x[..t]).unwrap();
        assert!(text.matches("answer = ").count() >= TRAIN_RECALLS);
        // Old run.json files (no `loss`) load as `all`, which is not written back.
        let sm: SyntheticMix = serde_json::from_str(r#"{"task":"niah","fraction":1.0}"#).unwrap();
        assert_eq!(sm.loss, SyntheticLoss::All);
        assert!(!serde_json::to_string(&sm).unwrap().contains("loss"));
        assert!("bogus".parse::<SyntheticLoss>().is_err());
    }

    #[test]
    fn scoring_is_exact() {
        assert!(score(" 48213;", " 48213"));
        assert!(score(" 48213", " 48213"));
        assert!(score(" 48213)\n", " 48213"));
        assert!(!score(" 482134", " 48213"));
        assert!(!score(" 4821;", " 48213"));
        assert!(!score("48213;", " 48213"));
        assert!(!score("  48213;", " 48213"));
        assert!(!score("", " 48213"));
    }

    #[test]
    fn contexts_beyond_the_model_are_refused_before_work() {
        let cfg = EvalConfig {
            task: Task::Niah,
            contexts: vec![128, 512],
            depths: vec![0.0, 1.0],
            samples: 1,
            seed: 0,
        };
        let e = check_contexts(&cfg, 256).unwrap_err().to_string();
        assert!(e.contains("--context 512") && e.contains("256"), "{e}");
        check_contexts(&cfg, 512).unwrap();
        let bad = EvalConfig {
            depths: vec![1.5],
            ..cfg.clone()
        };
        assert!(check_contexts(&bad, 512)
            .unwrap_err()
            .to_string()
            .contains("1.5"));
    }

    #[test]
    fn eval_runs_and_mixing_is_deterministic() {
        let tk = tok();
        let m = tiny(200);
        let cfg = EvalConfig {
            task: Task::Niah,
            contexts: vec![100, 128],
            depths: vec![0.0, 1.0],
            samples: 2,
            seed: 1,
        };
        let mut seen = 0;
        let cells = run_eval(&m, &tk, &cfg, |_| seen += 1).unwrap();
        assert_eq!(seen, 8);
        assert_eq!(cells.len(), 4);
        assert!(cells.iter().all(|c| c.total == 2));
        let t = table(&cells);
        assert!(
            t.contains("depth") && t.contains("mean") && t.contains("128"),
            "{t}"
        );
        // Mixing: same rng state, same rows; fraction 0 leaves the batch alone.
        let (b, t) = (4, 160);
        let run = |frac: f64| {
            let mut x = vec![1u32; b * t];
            let mut y = vec![2u32; b * t];
            let mut r = Rng::new(5);
            let n = mix_into_batch(
                Task::Mix,
                frac,
                SyntheticLoss::All,
                &tk,
                &mut r,
                b,
                t,
                &mut x,
                &mut y,
            )
            .unwrap();
            (n, x, y)
        };
        let (n1, x1, y1) = run(1.0);
        assert_eq!(n1, 4);
        assert_eq!((x1.clone(), y1.clone()), (run(1.0).1, run(1.0).2));
        assert_eq!(&x1[1..t], &y1[..t - 1]);
        assert_eq!(run(0.0).0, 0);
        assert!(run(0.0).1.iter().all(|&v| v == 1));
    }

    #[test]
    fn extend_context_grows_the_table_with_yarn() {
        let mut m = tiny(128);
        extend_context(&mut m, 4.0, true).unwrap();
        assert_eq!(m.cfg.max_seq_len, 512);
        assert_eq!(m.rope.max_pos(), 512);
        let r = m.cfg.rope_scaling.clone().unwrap();
        assert_eq!((r.factor, r.original_max_position_embeddings), (4.0, 128));
        let mut m = tiny(128);
        extend_context(&mut m, 2.0, false).unwrap();
        assert!(m.cfg.rope_scaling.is_none() && m.cfg.max_seq_len == 256);
    }
}
