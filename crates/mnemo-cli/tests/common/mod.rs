//! Shared by the CLI's integration tests: one scratch directory per test binary
//! (`$TMPDIR/mnemo-test-<binary>-<pid>/`), deleted when the binary exits, whether its tests
//! passed or failed. `MNEMO_TEST_KEEP=1` keeps it for inspection. Also: [`server`], the
//! `mnemo serve` harness, and [`gguf`], a tiny quantised GGUF model.
#![allow(dead_code)]

pub mod gguf;
pub mod server;

use std::path::{Path, PathBuf};
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
