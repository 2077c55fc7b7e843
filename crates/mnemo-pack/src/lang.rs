//! Languages (from a file's name) and signature-only summaries (a file's declaration lines,
//! per language), which a budget packs when a whole file does not fit.

use regex::Regex;
use std::sync::OnceLock;

/// Signature lines are cut to this many characters.
const MAX_SIGNATURE_CHARS: usize = 240;

/// The language of a file, from its name or extension (`text` when unknown).
pub fn language_of(path: &str) -> &'static str {
    let name = path.rsplit('/').next().unwrap_or(path);
    match name {
        "Makefile" | "makefile" | "GNUmakefile" => return "makefile",
        "CMakeLists.txt" => return "cmake",
        "Dockerfile" => return "dockerfile",
        _ => {}
    }
    if name.starts_with("Dockerfile.") {
        return "dockerfile";
    }
    let ext = match name.rsplit_once('.') {
        Some((stem, ext)) if !stem.is_empty() => ext.to_ascii_lowercase(),
        _ => return "text",
    };
    match ext.as_str() {
        "rs" => "rust",
        "py" | "pyi" | "pyw" => "python",
        "c" | "h" => "c",
        "cc" | "cpp" | "cxx" | "c++" | "hpp" | "hh" | "hxx" | "h++" | "ipp" | "tpp" => "cpp",
        "js" | "mjs" | "cjs" | "jsx" => "javascript",
        "ts" | "tsx" | "mts" | "cts" => "typescript",
        "go" => "go",
        "java" => "java",
        "kt" | "kts" => "kotlin",
        "scala" | "sc" => "scala",
        "swift" => "swift",
        "m" | "mm" => "objective-c",
        "cs" => "csharp",
        "fs" | "fsx" => "fsharp",
        "rb" => "ruby",
        "php" => "php",
        "pl" | "pm" => "perl",
        "lua" => "lua",
        "r" => "r",
        "jl" => "julia",
        "hs" => "haskell",
        "ml" | "mli" => "ocaml",
        "ex" | "exs" => "elixir",
        "erl" | "hrl" => "erlang",
        "clj" | "cljs" | "edn" => "clojure",
        "zig" => "zig",
        "nim" => "nim",
        "dart" => "dart",
        "vue" => "vue",
        "svelte" => "svelte",
        "md" | "markdown" | "mdx" => "markdown",
        "rst" => "restructuredtext",
        "adoc" | "asciidoc" => "asciidoc",
        "tex" => "latex",
        "toml" => "toml",
        "json" | "jsonl" | "json5" => "json",
        "yaml" | "yml" => "yaml",
        "xml" | "xsd" | "xsl" | "svg" => "xml",
        "ini" | "cfg" | "conf" => "ini",
        "sh" | "bash" | "zsh" | "ksh" | "fish" => "shell",
        "ps1" | "psm1" => "powershell",
        "bat" | "cmd" => "batch",
        "html" | "htm" | "xhtml" => "html",
        "css" => "css",
        "scss" | "sass" => "scss",
        "less" => "less",
        "sql" => "sql",
        "proto" => "protobuf",
        "graphql" | "gql" => "graphql",
        "cmake" => "cmake",
        "mk" => "makefile",
        "nix" => "nix",
        "tf" | "hcl" => "hcl",
        "s" | "asm" => "assembly",
        "txt" => "text",
        _ => "text",
    }
}

struct SigRules {
    code: Vec<Regex>,
    c_like: Regex,
    shell: Regex,
    sql: Regex,
    makefile: Regex,
    markdown: Regex,
    toml: Regex,
    yaml: Regex,
}

fn sig_rules() -> &'static SigRules {
    static R: OnceLock<SigRules> = OnceLock::new();
    R.get_or_init(|| {
        let re = |p: &str| Regex::new(p).expect("signature pattern compiles");
        SigRules {
            code: vec![
                // Declarations, after any modifiers, at any indentation.
                re(concat!(
                    r#"^\s*(?:(?:pub(?:\s*\([^)]*\))?|export|default|async|unsafe"#,
                    r#"|extern(?:\s+"[^"]*")?|public|private|protected|internal|static"#,
                    r#"|abstract|final|sealed|override|virtual|inline|const|open|data|declare)\s+)*"#,
                    r#"(?:fn|struct|enum|trait|impl|mod|type|union|macro_rules|class|def"#,
                    r#"|interface|func|function\*?|module|namespace|typedef|record|object"#,
                    r#"|protocol|extension|template|package)\b"#,
                )),
                // Anything public or exported (fields, constants, re-exports).
                re(r"^\s*(?:pub|public|protected|export)\b"),
                // Top-level bindings.
                re(r"^(?:const|static|let|var)\s"),
                // Preprocessor definitions.
                re(r"^\s*#\s*define\b"),
            ],
            // A C/C++/Java/C# function head at column 0: `int main(int argc, ...)`, no `;`.
            c_like: re(r"^[A-Za-z_][\w\s\*&:<>,\[\]]*[\s\*&]\*?[A-Za-z_~][\w:~]*\s*\([^;]*$"),
            shell: re(r"^\s*(?:function\s+[\w-]+|[A-Za-z_][\w-]*\s*\(\s*\))"),
            sql: re(r"(?i)^\s*(?:create|alter)\s"),
            makefile: re(r"^[A-Za-z0-9_.\-/%$() ]+:(?:[^=]|$)"),
            markdown: re(r"^#{1,6}\s"),
            toml: re(r"^\s*\[\[?[^\]]+\]\]?\s*$"),
            yaml: re(r#"^[A-Za-z_"'][^:#]*:"#),
        }
    })
}

/// The declaration lines of `content` (a signatures-only summary), each cut to 240
/// characters, joined with newlines; empty when the language has none (JSON, plain text…).
pub fn signatures(content: &str, language: &str) -> String {
    let r = sig_rules();
    let keep: Box<dyn Fn(&str) -> bool> = match language {
        "markdown" => Box::new(|l| r.markdown.is_match(l)),
        "toml" | "ini" => Box::new(|l| r.toml.is_match(l)),
        "yaml" => Box::new(|l| r.yaml.is_match(l)),
        "shell" => Box::new(|l| r.shell.is_match(l)),
        "sql" => Box::new(|l| r.sql.is_match(l)),
        "makefile" => Box::new(|l| r.makefile.is_match(l) && !l.starts_with('\t')),
        "text" | "json" | "html" | "xml" | "css" | "scss" | "less" | "restructuredtext"
        | "asciidoc" | "latex" | "batch" => Box::new(|_| false),
        "c" | "cpp" | "java" | "csharp" | "objective-c" => Box::new(|l| {
            r.code.iter().any(|re| re.is_match(l))
                || (r.c_like.is_match(l) && !l.trim_start().starts_with("return"))
        }),
        _ => Box::new(|l| r.code.iter().any(|re| re.is_match(l))),
    };
    let mut out = String::new();
    for line in content.lines() {
        let line = line.trim_end();
        if line.is_empty() || !keep(line) {
            continue;
        }
        if line.chars().count() > MAX_SIGNATURE_CHARS {
            out.extend(line.chars().take(MAX_SIGNATURE_CHARS));
            out.push('…');
        } else {
            out.push_str(line);
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_and_languages() {
        let rust = "//! Docs.\nuse std::io;\n\n/// A thing.\npub struct Thing {\n    pub a: u32,\n    b: u32,\n}\n\nimpl Thing {\n    pub(crate) fn new() -> Self {\n        let x = 1;\n        Thing { a: x, b: 2 }\n    }\n    fn private(&self) {}\n}\nconst N: usize = 3;\nmacro_rules! m { () => {} }\n";
        assert_eq!(
            signatures(rust, "rust"),
            "pub struct Thing {\n    pub a: u32,\nimpl Thing {\n    pub(crate) fn new() -> Self {\n    fn private(&self) {}\nconst N: usize = 3;\nmacro_rules! m { () => {} }\n"
        );
        let py = "import os\n\nclass A(Base):\n    \"\"\"Doc.\"\"\"\n    def f(self, x):\n        return x\n\nasync def g():\n    pass\n";
        assert_eq!(
            signatures(py, "python"),
            "class A(Base):\n    def f(self, x):\nasync def g():\n"
        );
        let c = "#include <stdio.h>\n#define MAX 10\nstatic int count;\nint main(int argc, char **argv)\n{\n    return helper(argc);\n}\ntypedef struct p p_t;\nint decl(void);\n";
        assert_eq!(
            signatures(c, "c"),
            "#define MAX 10\nstatic int count;\nint main(int argc, char **argv)\ntypedef struct p p_t;\n"
        );
        let go = "package main\n\nimport \"fmt\"\n\ntype T struct{}\n\nfunc (t T) Run() error {\n\treturn nil\n}\n";
        assert_eq!(
            signatures(go, "go"),
            "package main\ntype T struct{}\nfunc (t T) Run() error {\n"
        );
        let ts = "export interface I { a: string }\nexport default function f() {}\nconst x = 1;\n  let y = 2;\n";
        assert_eq!(
            signatures(ts, "typescript"),
            "export interface I { a: string }\nexport default function f() {}\nconst x = 1;\n"
        );
        assert_eq!(signatures("# T\ntext\n## U\n", "markdown"), "# T\n## U\n");
        assert_eq!(signatures("[a]\nx = 1\n[[b]]\n", "toml"), "[a]\n[[b]]\n");
        assert_eq!(signatures("{\"a\": 1}\n", "json"), "");
        let long = format!("pub fn f() {{ {} }}\n", "x;".repeat(300));
        assert_eq!(
            signatures(&long, "rust").chars().count(),
            MAX_SIGNATURE_CHARS + 2
        );

        let langs = [
            ("src/a.rs", "rust"),
            ("a.py", "python"),
            ("x/y.h", "c"),
            ("y.cpp", "cpp"),
            ("m.mjs", "javascript"),
            ("t.tsx", "typescript"),
            ("g.go", "go"),
            ("J.java", "java"),
            ("README.md", "markdown"),
            ("Cargo.toml", "toml"),
            ("p.json", "json"),
            ("c.yml", "yaml"),
            ("s.sh", "shell"),
            ("i.html", "html"),
            ("s.css", "css"),
            ("q.sql", "sql"),
            ("Makefile", "makefile"),
            ("LICENSE", "text"),
            (".bashrc", "text"),
            ("notes.txt", "text"),
            ("x.unknown", "text"),
        ];
        for (p, l) in langs {
            assert_eq!(language_of(p), l, "{p}");
        }
    }
}
