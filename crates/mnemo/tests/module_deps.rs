//! Dependencies point one way inside the engine crate: this test reads `src/` the way rustc
//! finds modules (from `lib.rs`, following `mod x;`), collects every reference from one
//! top-level module to another (`crate::x…`, `use crate::{x, y::z}`, and `super::…` that
//! climbs to the crate root), leaving out comments, string literals and `#[cfg(test)]` items
//! (test modules may use anything), and checks the resulting graph:
//!
//! 1. `kernels` refers to no other module of the crate (strict: every site is listed).
//! 2. There is no cycle between top-level modules, except those in [`ALLOWED_CYCLES`]. Every
//!    cycle present is printed (run with `--nocapture`), each edge with the first place that
//!    makes it; a listed cycle that no longer exists fails too, so the list only shrinks.
//! 3. `model`, and every module it imports directly or through others, refers to no module of
//!    [`FORMAT_LAYER`] (strict: on failure every module of that closure is listed with what it
//!    imports, and each import of the format layer with its site).
//!
//! Names re-exported at the crate root from a module (`pub use io::{gguf, hf};`, `pub use
//! io::safetensors as safetensors_io;`, the old paths of moved modules) count as that module:
//! `crate::gguf::…` is an edge to `io`.
//!
//! `cargo test --release --test module_deps -- --nocapture` prints the graph.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Cycles between top-level modules that may exist (written from the alphabetically smallest
/// module, in edge order: `["a", "b"]` is `a → b → a`). None today; never add one.
const ALLOWED_CYCLES: &[&[&str]] = &[];

/// A module that may only depend downwards: nothing of the crate outside itself.
const LEAF_MODULES: &[&str] = &["kernels"];

/// The module holding every file format (safetensors, checkpoint files, Engram files and
/// deltas, GGUF, Hugging Face).
const FORMAT_LAYER: &str = "io";

/// Modules that, with everything they import, must not depend on [`FORMAT_LAYER`].
const FORMAT_FREE: &[&str] = &["model"];

/// Where an edge comes from: file (relative to `src/`) and 1-based line.
type Site = (String, usize);

/// `from → to → first sites` over top-level modules.
type Graph = BTreeMap<String, BTreeMap<String, Vec<Site>>>;

#[derive(Clone, Debug, PartialEq)]
enum Tok {
    Ident(String),
    /// `::`
    PathSep,
    Punct(char),
}

/// Blank out comments, string, byte-string, raw-string and char literals (keeping newlines so
/// lines still count), leaving lifetimes alone.
fn strip(src: &str) -> String {
    let b = src.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let blank = |out: &mut Vec<u8>, s: &[u8]| {
        out.extend(s.iter().map(|&c| if c == b'\n' { b'\n' } else { b' ' }));
    };
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        let prev_ident = i > 0 && (b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_');
        if c == b'/' && b.get(i + 1) == Some(&b'/') {
            let end = src[i..].find('\n').map_or(b.len(), |k| i + k);
            blank(&mut out, &b[i..end]);
            i = end;
        } else if c == b'/' && b.get(i + 1) == Some(&b'*') {
            let (mut depth, mut j) = (1, i + 2);
            while j < b.len() && depth > 0 {
                if b[j] == b'/' && b.get(j + 1) == Some(&b'*') {
                    depth += 1;
                    j += 2;
                } else if b[j] == b'*' && b.get(j + 1) == Some(&b'/') {
                    depth -= 1;
                    j += 2;
                } else {
                    j += 1;
                }
            }
            blank(&mut out, &b[i..j]);
            i = j;
        } else if !prev_ident && (c == b'r' || (c == b'b' && b.get(i + 1) == Some(&b'r'))) && {
            let k = i + if c == b'b' { 2 } else { 1 };
            let hashes = b[k..].iter().take_while(|&&x| x == b'#').count();
            b.get(k + hashes) == Some(&b'"')
        } {
            // Raw string: r"…", r#"…"#, br"…".
            let k = i + if c == b'b' { 2 } else { 1 };
            let hashes = b[k..].iter().take_while(|&&x| x == b'#').count();
            let close: Vec<u8> = std::iter::once(b'"')
                .chain(std::iter::repeat_n(b'#', hashes))
                .collect();
            let body = k + hashes + 1;
            let end = b[body..]
                .windows(close.len())
                .position(|w| w == close.as_slice())
                .map_or(b.len(), |p| body + p + close.len());
            out.push(b'"');
            blank(&mut out, &b[i + 1..end]);
            i = end;
        } else if c == b'"' {
            let mut j = i + 1;
            while j < b.len() && b[j] != b'"' {
                j += if b[j] == b'\\' { 2 } else { 1 };
            }
            let end = (j + 1).min(b.len());
            out.push(b'"');
            blank(&mut out, &b[i + 1..end]);
            i = end;
        } else if c == b'\'' {
            // A char literal ('x', '\n', '\x7f', '\u{e9}', 'é') or a lifetime ('a).
            let rest = &src[i + 1..];
            let body = match rest.as_bytes() {
                [b'\\', b'x', ..] => Some(4),
                [b'\\', b'u', ..] => rest.find('}').map(|k| k + 1),
                [b'\\', ..] => Some(2),
                _ => rest.chars().next().map(char::len_utf8),
            };
            match body.filter(|&n| rest.get(n..).is_some_and(|r| r.starts_with('\''))) {
                Some(n) => {
                    let end = i + 1 + n + 1;
                    out.push(c);
                    blank(&mut out, &b[i + 1..end]);
                    i = end;
                }
                None => {
                    out.push(c);
                    i += 1;
                }
            }
        } else {
            out.push(c);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn tokenize(src: &str) -> Vec<(Tok, usize)> {
    let mut toks = Vec::new();
    let mut line = 1;
    let mut it = src.char_indices().peekable();
    while let Some((i, c)) = it.next() {
        if c == '\n' {
            line += 1;
        } else if c.is_alphabetic() || c == '_' {
            let mut end = i + c.len_utf8();
            while let Some(&(j, d)) = it.peek() {
                if d.is_alphanumeric() || d == '_' {
                    end = j + d.len_utf8();
                    it.next();
                } else {
                    break;
                }
            }
            toks.push((Tok::Ident(src[i..end].to_string()), line));
        } else if c == ':' && it.peek().map(|&(_, d)| d) == Some(':') {
            it.next();
            toks.push((Tok::PathSep, line));
        } else if !c.is_whitespace() {
            toks.push((Tok::Punct(c), line));
        }
    }
    toks
}

fn is_ident(t: Option<&(Tok, usize)>, s: &str) -> bool {
    matches!(t, Some((Tok::Ident(x), _)) if x == s)
}

fn is_punct(t: Option<&(Tok, usize)>, c: char) -> bool {
    matches!(t, Some((Tok::Punct(x), _)) if *x == c)
}

/// The index just past the bracketed group opening at `i` (`(`, `[` or `{`).
fn skip_group(toks: &[(Tok, usize)], i: usize) -> usize {
    let mut depth = 0i32;
    let mut j = i;
    while j < toks.len() {
        match &toks[j].0 {
            Tok::Punct('(' | '[' | '{') => depth += 1,
            Tok::Punct(')' | ']' | '}') => {
                depth -= 1;
                if depth == 0 {
                    return j + 1;
                }
            }
            _ => {}
        }
        j += 1;
    }
    toks.len()
}

/// Whether the attribute tokens `#[…]` (brackets included) are a `cfg` that holds only
/// under test.
fn is_test_cfg(attr: &[(Tok, usize)]) -> bool {
    let idents: Vec<&str> = attr
        .iter()
        .filter_map(|(t, _)| match t {
            Tok::Ident(s) => Some(s.as_str()),
            _ => None,
        })
        .collect();
    idents.first() == Some(&"cfg") && idents.contains(&"test") && !idents.contains(&"not")
}

/// The index just past the item starting at `i`: through the first `;` outside brackets, or
/// through the first `{…}` block outside `(…)`/`[…]`.
fn skip_item(toks: &[(Tok, usize)], mut i: usize) -> usize {
    while i < toks.len() {
        match &toks[i].0 {
            Tok::Punct(';') => return i + 1,
            Tok::Punct('{') => return skip_group(toks, i),
            Tok::Punct('(' | '[') => i = skip_group(toks, i),
            _ => i += 1,
        }
    }
    toks.len()
}

/// The first segments named by the path continuing at `i` (just past `crate::` or a climb to
/// the root): `x` of `x::…`, or each element's first segment of a `{…}` group.
fn first_segments(toks: &[(Tok, usize)], i: usize) -> Vec<(String, usize)> {
    match toks.get(i) {
        Some((Tok::Ident(s), line)) => vec![(s.clone(), *line)],
        Some((Tok::Punct('{'), _)) => {
            let end = skip_group(toks, i);
            let mut out = Vec::new();
            let mut depth = 0;
            let mut at_start = true;
            for (t, line) in &toks[i + 1..end.saturating_sub(1)] {
                match t {
                    Tok::Punct('{') => depth += 1,
                    Tok::Punct('}') => depth -= 1,
                    Tok::Punct(',') if depth == 0 => {
                        at_start = true;
                        continue;
                    }
                    Tok::Ident(s) if at_start && depth == 0 => out.push((s.clone(), *line)),
                    _ => {}
                }
                at_start = false;
            }
            out
        }
        _ => Vec::new(),
    }
}

/// The names a `use` tree starting at `i` (just past `use`) brings into scope, each with the
/// first segment of the path it names: `io::{gguf, hf as h}` gives `(gguf, io)`, `(h, io)`.
/// Globs bring no name. `crate::` and `self::` prefixes are skipped.
fn use_names(toks: &[(Tok, usize)], mut i: usize) -> Vec<(String, String)> {
    fn tree(
        toks: &[(Tok, usize)],
        i: &mut usize,
        first: Option<&str>,
        out: &mut Vec<(String, String)>,
    ) {
        let mut first = first.map(String::from);
        let mut last: Option<String> = None;
        loop {
            match toks.get(*i) {
                Some((Tok::Ident(x), _)) if x == "as" => {
                    if let Some((Tok::Ident(alias), _)) = toks.get(*i + 1) {
                        if let Some(f) = &first {
                            out.push((alias.clone(), f.clone()));
                        }
                    }
                    *i += 2;
                    return;
                }
                Some((Tok::Ident(x), _)) => {
                    first.get_or_insert_with(|| x.clone());
                    last = Some(x.clone());
                    *i += 1;
                }
                Some((Tok::PathSep, _)) => *i += 1,
                Some((Tok::Punct('{'), _)) => {
                    *i += 1;
                    while !matches!(toks.get(*i), None | Some((Tok::Punct('}'), _))) {
                        tree(toks, i, first.as_deref(), out);
                        if is_punct(toks.get(*i), ',') {
                            *i += 1;
                        }
                    }
                    *i += 1;
                    return;
                }
                Some((Tok::Punct('*'), _)) => {
                    *i += 1;
                    return;
                }
                _ => break,
            }
        }
        if let (Some(l), Some(f)) = (last, first) {
            if l != "self" {
                out.push((l, f));
            }
        }
    }
    while is_ident(toks.get(i), "crate") || is_ident(toks.get(i), "self") {
        i += 2; // the segment and its `::`
    }
    let mut out = Vec::new();
    tree(toks, &mut i, None, &mut out);
    out
}

struct Crate {
    src: PathBuf,
    /// Top-level modules, as declared in `lib.rs`.
    top: BTreeSet<String>,
    /// Names re-exported at the crate root → the top-level module they come from.
    aliases: BTreeMap<String, String>,
    graph: Graph,
}

impl Crate {
    fn read(src: &Path) -> Crate {
        let mut c = Crate {
            src: src.to_path_buf(),
            top: BTreeSet::new(),
            aliases: BTreeMap::new(),
            graph: Graph::new(),
        };
        c.visit_file(&src.join("lib.rs"), &[]);
        c
    }

    /// Parse the file of module `path` (empty: the crate root), then its child files.
    fn visit_file(&mut self, file: &Path, path: &[String]) {
        let text = std::fs::read_to_string(file)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", file.display()));
        let toks = tokenize(&strip(&text));
        let rel = file
            .strip_prefix(&self.src)
            .unwrap()
            .to_string_lossy()
            .replace('\\', "/");
        // Child modules of `a/b.rs` live in `a/b/`; of `a/mod.rs` and `lib.rs` in `a/`.
        let name = file.file_stem().unwrap().to_string_lossy();
        let dir = if name == "mod" || name == "lib" {
            file.parent().unwrap().to_path_buf()
        } else {
            file.with_extension("")
        };
        let mut children: Vec<(PathBuf, Vec<String>)> = Vec::new();
        // Inline modules open here: (name, brace depth inside them).
        let mut inline: Vec<(String, usize)> = Vec::new();
        let mut depth = 0usize;
        let mut i = 0;
        while i < toks.len() {
            match &toks[i].0 {
                Tok::Punct('#') => {
                    let inner = is_punct(toks.get(i + 1), '!');
                    let open = i + 1 + usize::from(inner);
                    if !is_punct(toks.get(open), '[') {
                        i += 1;
                        continue;
                    }
                    let end = skip_group(&toks, open);
                    if is_test_cfg(&toks[open..end]) {
                        if inner {
                            return; // `#![cfg(test)]`: the whole file is test code
                        }
                        // Skip the item, after any further attributes.
                        let mut j = end;
                        while is_punct(toks.get(j), '#') && is_punct(toks.get(j + 1), '[') {
                            j = skip_group(&toks, j + 1);
                        }
                        i = skip_item(&toks, j);
                    } else {
                        i = end;
                    }
                    continue;
                }
                Tok::Punct('{') => depth += 1,
                Tok::Punct('}') => {
                    if inline.last().is_some_and(|&(_, d)| d == depth) {
                        inline.pop();
                    }
                    depth = depth.saturating_sub(1);
                }
                Tok::Ident(kw) if kw == "mod" => {
                    if let Some((Tok::Ident(m), _)) = toks.get(i + 1) {
                        if is_punct(toks.get(i + 2), ';') {
                            let mut sub = dir.clone();
                            for (n, _) in &inline {
                                sub.push(n);
                            }
                            let flat = sub.join(format!("{m}.rs"));
                            let file = if flat.is_file() {
                                flat
                            } else {
                                sub.join(m).join("mod.rs")
                            };
                            let mut p = path.to_vec();
                            p.extend(inline.iter().map(|(n, _)| n.clone()));
                            p.push(m.clone());
                            if p.len() == 1 {
                                self.top.insert(m.clone());
                            }
                            children.push((file, p));
                            i += 3;
                            continue;
                        }
                        if is_punct(toks.get(i + 2), '{') {
                            inline.push((m.clone(), depth + 1));
                        }
                    }
                }
                Tok::Ident(kw)
                    if kw == "use" && path.is_empty() && depth == 0 && inline.is_empty() =>
                {
                    // A re-export at the crate root: remember where each name comes from.
                    for (name, from) in use_names(&toks, i + 1) {
                        if name != from {
                            self.aliases.insert(name, from);
                        }
                    }
                }
                Tok::Ident(kw)
                    if kw == "crate" && toks.get(i + 1).map(|t| &t.0) == Some(&Tok::PathSep) =>
                {
                    for (seg, l) in first_segments(&toks, i + 2) {
                        self.edge(path, &seg, &rel, l);
                    }
                }
                Tok::Ident(kw) if kw == "super" => {
                    // A chain `super::super::…`, relative to the module here.
                    let mut here: Vec<String> = path.to_vec();
                    here.extend(inline.iter().map(|(n, _)| n.clone()));
                    let mut j = i;
                    while is_ident(toks.get(j), "super")
                        && toks.get(j + 1).map(|t| &t.0) == Some(&Tok::PathSep)
                    {
                        here.pop();
                        j += 2;
                    }
                    if here.is_empty() && j > i {
                        for (seg, l) in first_segments(&toks, j) {
                            self.edge(path, &seg, &rel, l);
                        }
                    }
                    i = j.max(i + 1);
                    continue;
                }
                _ => {}
            }
            i += 1;
        }
        for (file, p) in children {
            self.visit_file(&file, &p);
        }
    }

    fn edge(&mut self, from: &[String], to: &str, file: &str, line: usize) {
        let Some(from) = from.first() else {
            return; // the crate root itself
        };
        let to = self.aliases.get(to).map_or(to, String::as_str);
        if from == to || to == "self" || to == "super" {
            return;
        }
        let sites = self
            .graph
            .entry(from.clone())
            .or_default()
            .entry(to.to_string())
            .or_default();
        if sites.len() < 3 {
            sites.push((file.to_string(), line));
        }
    }

    /// Drop edges to names that are not top-level modules (items re-exported at the root).
    fn prune(&mut self) {
        let top = self.top.clone();
        for tos in self.graph.values_mut() {
            tos.retain(|to, _| top.contains(to));
        }
    }
}

/// Every elementary cycle, each starting at its smallest module (in name order).
fn cycles(g: &Graph) -> Vec<Vec<String>> {
    fn dfs(g: &Graph, start: &str, node: &str, path: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
        for next in g.get(node).into_iter().flat_map(|m| m.keys()) {
            if next == start {
                out.push(path.clone());
            } else if next.as_str() > start && !path.contains(next) {
                path.push(next.clone());
                dfs(g, start, next, path, out);
                path.pop();
            }
        }
    }
    let mut out = Vec::new();
    for start in g.keys() {
        dfs(g, start, start, &mut vec![start.clone()], &mut out);
    }
    out
}

fn show_cycle(g: &Graph, c: &[String]) -> String {
    let mut s = c[0].clone();
    for (k, from) in c.iter().enumerate() {
        let to = &c[(k + 1) % c.len()];
        let (file, line) = &g[from][to][0];
        s += &format!(" → {to} ({file}:{line})");
    }
    s
}

/// Every module `start` depends on, directly or through others (`start` included).
fn closure(g: &Graph, start: &str) -> BTreeSet<String> {
    let mut seen = BTreeSet::from([start.to_string()]);
    let mut todo = vec![start.to_string()];
    while let Some(m) = todo.pop() {
        for next in g.get(&m).into_iter().flat_map(|t| t.keys()) {
            if seen.insert(next.clone()) {
                todo.push(next.clone());
            }
        }
    }
    seen
}

fn engine() -> Crate {
    let mut c = Crate::read(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"));
    c.prune();
    c
}

#[test]
fn kernels_depend_on_nothing_above() {
    let c = engine();
    assert!(
        c.top.contains("kernels") && c.top.contains("model"),
        "{:?}",
        c.top
    );
    let mut bad = Vec::new();
    for m in LEAF_MODULES {
        for (to, sites) in c.graph.get(*m).into_iter().flatten() {
            for (file, line) in sites {
                bad.push(format!("{file}:{line}: {m} uses crate::{to}"));
            }
        }
    }
    assert!(
        bad.is_empty(),
        "modules below everything import from above them (move the shared piece down):\n{}",
        bad.join("\n")
    );
}

#[test]
fn no_module_cycles_beyond_the_allowed() {
    let c = engine();
    println!("module graph (top-level modules; first site of each edge):");
    for (from, tos) in &c.graph {
        let list: Vec<String> = tos
            .iter()
            .map(|(to, s)| format!("{to} ({}:{})", s[0].0, s[0].1))
            .collect();
        println!("  {from} → {}", list.join(", "));
    }
    let found = cycles(&c.graph);
    println!("{} cycle(s):", found.len());
    for cy in &found {
        let allowed = ALLOWED_CYCLES.iter().any(|a| a == cy);
        println!(
            "  {}{}",
            show_cycle(&c.graph, cy),
            if allowed { "  [allowed]" } else { "" }
        );
    }
    let new: Vec<String> = found
        .iter()
        .filter(|cy| !ALLOWED_CYCLES.iter().any(|a| a == cy))
        .map(|cy| show_cycle(&c.graph, cy))
        .collect();
    let gone: Vec<String> = ALLOWED_CYCLES
        .iter()
        .filter(|a| !found.iter().any(|cy| cy == *a))
        .map(|a| a.join(" → "))
        .collect();
    assert!(
        new.is_empty(),
        "module cycles (break each by moving the shared piece to the module below both):\n{}",
        new.join("\n")
    );
    assert!(
        gone.is_empty(),
        "these allowed cycles no longer exist: remove them from ALLOWED_CYCLES:\n{}",
        gone.join("\n")
    );
}

#[test]
fn the_model_and_all_it_imports_use_no_file_format() {
    let c = engine();
    assert!(c.top.contains(FORMAT_LAYER), "{:?}", c.top);
    for m in FORMAT_FREE {
        let deps = closure(&c.graph, m);
        println!("{m} and everything it imports ({} modules):", deps.len());
        let mut bad = Vec::new();
        for d in &deps {
            let tos = c.graph.get(d);
            let list: Vec<String> = tos
                .into_iter()
                .flatten()
                .map(|(to, s)| format!("{to} ({}:{})", s[0].0, s[0].1))
                .collect();
            let list = if list.is_empty() {
                "(nothing)".to_string()
            } else {
                list.join(", ")
            };
            println!("  {d} → {list}");
            for (file, line) in tos.and_then(|t| t.get(FORMAT_LAYER)).into_iter().flatten() {
                bad.push(format!("{file}:{line}: {d} uses crate::{FORMAT_LAYER}"));
            }
        }
        assert!(
            bad.is_empty(),
            "`{m}` depends on the file formats through {:?} (move the format code into \
             `{FORMAT_LAYER}`, which imports the engine, not the other way round):\n{}",
            deps,
            bad.join("\n")
        );
    }
}

#[test]
fn the_parser_sees_paths_and_skips_tests_comments_and_strings() {
    let src = r##"
//! Docs mention crate::doc_only.
use crate::{alpha, beta::Gamma, delta::{self, Eps}};
use crate::zeta::Z;
fn f() -> char { let _s = "crate::in_string"; let _r = r#"crate::raw"#; '{' }
fn g<'a>(x: &'a str) -> &'a str { super::root_level::h(x) }
/* crate::block_comment */
#[cfg(test)]
mod tests { use crate::test_only; }
#[cfg(test)]
fn helper() { crate::test_fn(); }
#[cfg(not(test))]
fn real() { crate::not_test::f(); }
mod inner { fn k() { super::super::climbed::x(); super::same::y(); } }
fn old_paths() { crate::old::f(); crate::kept::g(); crate::y(); }
"##;
    let dir = std::env::temp_dir().join(format!("mnemo-module-deps-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("lib.rs"),
        "pub mod m;\npub mod low;\npub use low::{renamed as old, kept};\npub use crate::low::deep::x as y;\n",
    )
    .unwrap();
    std::fs::write(dir.join("m.rs"), src).unwrap();
    std::fs::write(dir.join("low.rs"), "").unwrap();
    let c = Crate::read(&dir);
    std::fs::remove_dir_all(&dir).unwrap();
    let got: Vec<&str> = c.graph["m"].keys().map(String::as_str).collect();
    assert_eq!(
        got,
        [
            "alpha",
            "beta",
            "climbed",
            "delta",
            "low",
            "not_test",
            "root_level",
            "zeta"
        ]
    );
    assert_eq!(c.graph["m"]["zeta"][0], ("m.rs".to_string(), 4));
    // Re-exports at the root count as the module they come from.
    let aliases: Vec<(&str, &str)> = c
        .aliases
        .iter()
        .map(|(a, b)| (a.as_str(), b.as_str()))
        .collect();
    assert_eq!(aliases, [("kept", "low"), ("old", "low"), ("y", "low")]);
    assert_eq!(c.graph["m"]["low"].len(), 3);
}
