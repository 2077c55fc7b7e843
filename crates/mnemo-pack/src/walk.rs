//! The walk: every entry under the root, decided by its name, type and the globs without
//! reading it (ignored paths skipped as git does; hidden, secret-named, generated, filtered
//! and linked entries recorded as excluded; the rest become candidates to read).

use crate::types::{ExcludeKind, Excluded, PackOptions};
use anyhow::{Context, Result};
use globset::{Glob, GlobSet, GlobSetBuilder};
use std::collections::HashSet;
use std::path::{Path, PathBuf};

/// File names (globs, case-insensitive) that hold secrets.
pub const SECRET_NAMES: &[&str] = &[
    ".env",
    ".env.*",
    "*.pem",
    "*.key",
    "*.p12",
    "*.pfx",
    "id_rsa*",
    "id_dsa*",
    "id_ecdsa*",
    "id_ed25519*",
    ".npmrc",
    ".pypirc",
    ".netrc",
    "credentials",
    "credentials.json",
    "*.keystore",
    ".htpasswd",
    "secrets.*",
];

/// Lock files (exact names): generated.
pub const LOCK_FILES: &[&str] = &[
    "Cargo.lock",
    "package-lock.json",
    "yarn.lock",
    "poetry.lock",
    "pnpm-lock.yaml",
    "Gemfile.lock",
    "composer.lock",
    "go.sum",
];

/// Minified bundles and source maps (globs on the file name): generated.
pub const MINIFIED: &[&str] = &["*.min.js", "*.min.css", "*.map"];

/// Vendored directories (exact names, at any depth): generated.
pub const VENDORED_DIRS: &[&str] = &["vendor", "node_modules", "third_party"];

/// Build-output directories, generated only at the top of the repository: deeper down these
/// names are often real source (e.g. `compiler/rustc_mir_build/src/build/` in rustc).
pub const BUILD_OUTPUT_DIRS: &[&str] = &["dist", "build", "target"];

pub(crate) enum Found {
    File(Candidate),
    Excluded(Excluded),
    NotIncluded,
}

pub(crate) struct Candidate {
    pub(crate) rel: String,
    pub(crate) abs: PathBuf,
    pub(crate) len: u64,
}

pub(crate) struct WalkCtx<'a> {
    root: &'a Path,
    opts: &'a PackOptions,
    include: Option<(GlobSet, &'a [String])>,
    exclude: (GlobSet, &'a [String]),
    secret_names: GlobSet,
    minified: GlobSet,
    skip: HashSet<PathBuf>,
}

impl<'a> WalkCtx<'a> {
    pub(crate) fn new(root: &'a Path, opts: &'a PackOptions) -> Result<WalkCtx<'a>> {
        let include = if opts.include.is_empty() {
            None
        } else {
            Some((
                globset(&opts.include, "--include", false)?,
                &opts.include[..],
            ))
        };
        let skip = opts
            .skip
            .iter()
            .filter_map(|p| {
                if let Ok(c) = std::fs::canonicalize(p) {
                    return Some(c);
                }
                let name = p.file_name()?;
                let parent = match p.parent() {
                    Some(d) if !d.as_os_str().is_empty() => d,
                    _ => Path::new("."),
                };
                std::fs::canonicalize(parent).ok().map(|d| d.join(name))
            })
            .collect();
        Ok(WalkCtx {
            root,
            opts,
            include,
            exclude: (
                globset(&opts.exclude, "--exclude", false)?,
                &opts.exclude[..],
            ),
            secret_names: globset(
                &SECRET_NAMES
                    .iter()
                    .map(|s| s.to_string())
                    .collect::<Vec<_>>(),
                "secret name",
                true,
            )?,
            minified: globset(
                &MINIFIED.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
                "minified",
                false,
            )?,
            skip,
        })
    }

    /// The first glob of `set` matching `rel` or `name`.
    fn first_match<'g>(set: &(GlobSet, &'g [String]), rel: &str, name: &str) -> Option<&'g str> {
        let mut m = set.0.matches(rel);
        if m.is_empty() {
            m = set.0.matches(name);
        }
        m.first().map(|&i| set.1[i].as_str())
    }

    fn rel_lossy(&self, path: &Path) -> String {
        let rel = path.strip_prefix(self.root).unwrap_or(path);
        slashes(&rel.to_string_lossy())
    }
}

fn globset(globs: &[String], what: &str, case_insensitive: bool) -> Result<GlobSet> {
    let mut b = GlobSetBuilder::new();
    for g in globs {
        let glob = globset::GlobBuilder::new(g)
            .case_insensitive(case_insensitive)
            .literal_separator(false)
            .build()
            .or_else(|_| Glob::new(g))
            .with_context(|| format!("invalid {what} glob {g:?}"))?;
        b.add(glob);
    }
    b.build()
        .with_context(|| format!("cannot build the {what} globs"))
}

fn slashes(s: &str) -> String {
    if std::path::MAIN_SEPARATOR == '/' {
        s.to_string()
    } else {
        s.replace(std::path::MAIN_SEPARATOR, "/")
    }
}

pub(crate) fn io_detail(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::PermissionDenied => "permission denied".into(),
        std::io::ErrorKind::NotFound => "vanished while packing".into(),
        _ => e.to_string(),
    }
}

fn error_path(e: &ignore::Error) -> Option<&Path> {
    match e {
        ignore::Error::WithPath { path, .. } => Some(path),
        ignore::Error::WithDepth { err, .. } | ignore::Error::WithLineNumber { err, .. } => {
            error_path(err)
        }
        ignore::Error::Partial(errs) => errs.iter().find_map(error_path),
        ignore::Error::Loop { child, .. } => Some(child),
        _ => None,
    }
}

fn symlink_detail(root: &Path, link: &Path) -> String {
    match std::fs::canonicalize(link) {
        Err(_) => "broken link, not followed".into(),
        Ok(target) => match target.strip_prefix(root) {
            Ok(r) if r.as_os_str().is_empty() => {
                "points to the repository root, not followed".into()
            }
            Ok(r) => format!(
                "points inside the repository (to {}), not followed",
                slashes(&r.to_string_lossy())
            ),
            Err(_) => "points outside the repository, not followed".into(),
        },
    }
}

/// Decide one walk entry: what to record, and whether to enter it.
pub(crate) fn visit(
    ctx: &WalkCtx,
    res: std::result::Result<ignore::DirEntry, ignore::Error>,
) -> (Option<Found>, ignore::WalkState) {
    use ignore::WalkState::{Continue, Skip};
    use ExcludeKind as K;
    let excl = |path: String, kind, detail: String| {
        Some(Found::Excluded(Excluded::new(path, kind, detail)))
    };
    let ent = match res {
        Ok(e) => e,
        Err(e) => {
            let path = error_path(&e)
                .map(|p| ctx.rel_lossy(p))
                .unwrap_or_else(|| "(unknown path)".into());
            let detail = e.io_error().map(io_detail).unwrap_or_else(|| e.to_string());
            return (excl(path, K::Unreadable, detail), Continue);
        }
    };
    if ent.depth() == 0 {
        return (None, Continue);
    }
    if let Some(e) = ent.error() {
        tracing::warn!("{}: {e}", ent.path().display());
    }
    if ent.file_name() == ".git" {
        return (None, Skip);
    }
    let path = ent.path();
    let is_dir = !ent.path_is_symlink() && ent.file_type().is_some_and(|t| t.is_dir());
    let Some(rel) = path.strip_prefix(ctx.root).ok().and_then(|r| r.to_str()) else {
        let shown = ctx.rel_lossy(path) + if is_dir { "/" } else { "" };
        return (excl(shown, K::NonUtf8Name, String::new()), Skip);
    };
    let rel = slashes(rel);
    let name = ent.file_name().to_str().unwrap_or("");
    let opts = ctx.opts;

    if ent.path_is_symlink() {
        let detail = symlink_detail(ctx.root, path);
        return (excl(rel, K::Symlink, detail), Continue);
    }
    if is_dir {
        let shown = format!("{rel}/");
        if !opts.hidden && name.starts_with('.') {
            return (excl(shown, K::Hidden, "hidden directory".into()), Skip);
        }
        if let Some(g) = WalkCtx::first_match(&ctx.exclude, &rel, name) {
            return (
                excl(shown, K::Filtered, format!("matches --exclude {g}")),
                Skip,
            );
        }
        let top_level = !rel.contains('/');
        if !opts.include_generated
            && (VENDORED_DIRS.contains(&name) || (top_level && BUILD_OUTPUT_DIRS.contains(&name)))
        {
            let detail = "vendored or build-output directory".to_string();
            return (excl(shown, K::Generated, detail), Skip);
        }
        return (None, Continue);
    }
    if !ent.file_type().is_some_and(|t| t.is_file()) {
        return (
            excl(rel, K::Filtered, "not a regular file".into()),
            Continue,
        );
    }
    if ctx.skip.contains(&ctx.root.join(&rel)) {
        return (None, Continue);
    }
    if !opts.include_secrets {
        if let Some(&i) = ctx.secret_names.matches(name).first() {
            let detail = format!("file name matches {}", SECRET_NAMES[i]);
            return (excl(rel, K::Secret, detail), Continue);
        }
    }
    if !opts.hidden && name.starts_with('.') {
        return (excl(rel, K::Hidden, "hidden file".into()), Continue);
    }
    if let Some(g) = WalkCtx::first_match(&ctx.exclude, &rel, name) {
        return (
            excl(rel, K::Filtered, format!("matches --exclude {g}")),
            Continue,
        );
    }
    if !opts.include_generated {
        if LOCK_FILES.contains(&name) {
            return (excl(rel, K::Generated, "lock file".into()), Continue);
        }
        if let Some(&i) = ctx.minified.matches(name).first() {
            let what = if MINIFIED[i] == "*.map" {
                "source map"
            } else {
                "minified bundle"
            };
            return (excl(rel, K::Generated, what.into()), Continue);
        }
    }
    if let Some(inc) = &ctx.include {
        if WalkCtx::first_match(inc, &rel, name).is_none() {
            return (Some(Found::NotIncluded), Continue);
        }
    }
    match ent.metadata() {
        Ok(m) => (
            Some(Found::File(Candidate {
                rel,
                abs: path.to_path_buf(),
                len: m.len(),
            })),
            Continue,
        ),
        Err(e) => {
            let detail = e.io_error().map(io_detail).unwrap_or_else(|| e.to_string());
            (excl(rel, K::Unreadable, detail), Continue)
        }
    }
}
