//! Shared by the CLI's integration tests: one scratch directory per test binary
//! (`$TMPDIR/mnemo-test-<binary>-<pid>/`), deleted when the binary exits, whether its tests
//! passed or failed. `MNEMO_TEST_KEEP=1` keeps it for inspection. Also: [`mnemo`] and friends,
//! which run the binary; [`server`], the `mnemo serve` harness; [`gguf`], a tiny quantised
//! GGUF model.
#![allow(dead_code)]

pub mod gguf;
pub mod server;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

static ROOT: OnceLock<PathBuf> = OnceLock::new();

extern "C" {
    fn atexit(f: extern "C" fn()) -> std::os::raw::c_int;
}

extern "C" fn remove_root() {
    if let Some(r) = ROOT.get() {
        let _ = std::fs::remove_dir_all(r);
    }
}

/// This test binary's scratch directory.
pub fn root() -> &'static Path {
    ROOT.get_or_init(|| {
        let exe = std::env::current_exe().unwrap();
        let stem = exe.file_stem().unwrap().to_string_lossy().into_owned();
        let name = stem.split('-').next().unwrap_or("cli").to_string();
        let d = std::env::temp_dir().join(format!("mnemo-test-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        if std::env::var_os("MNEMO_TEST_KEEP").is_none() {
            // Runs when the test harness exits (after every test has finished).
            unsafe { atexit(remove_root) };
        }
        d
    })
}

/// A fresh, empty directory `name` inside [`root`].
pub fn tmpdir(name: &str) -> PathBuf {
    let d = root().join(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The `MNEMO_CACHE` the tests' `mnemo` processes use.
pub fn cache() -> PathBuf {
    root().join("cache")
}

/// Run `mnemo ARGS` (with the tests' `MNEMO_CACHE`): exit code, stdout, stderr.
pub fn mnemo(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_mnemo"))
        .args(args)
        .env("MNEMO_CACHE", cache())
        .output()
        .expect("run mnemo");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// [`mnemo`] with extra environment variables.
pub fn mnemo_env(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_mnemo"));
    cmd.args(args).env("MNEMO_CACHE", cache());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run mnemo");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `mnemo ARGS` fails, without a panic, with `needle` in its stderr.
pub fn assert_fails(args: &[&str], needle: &str) {
    let (code, _, err) = mnemo(args);
    assert_ne!(code, 0, "{args:?} should fail");
    assert!(!err.contains("panicked"), "{args:?} panicked:\n{err}");
    assert!(
        err.contains(needle),
        "{args:?}: expected `{needle}` in:\n{err}"
    );
}
