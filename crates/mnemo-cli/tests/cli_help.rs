//! `--help`, refused negative temperatures, shell completions.

mod common;

use common::{assert_fails, mnemo};
use std::process::Command;

#[test]
fn help_explains_the_default() {
    let (code, out, _) = mnemo(&["train", "--help"]);
    assert_eq!(code, 0);
    assert!(
        out.contains("--resume") && out.contains("current directory"),
        "{out}"
    );
    // The true size of the default preset (the unit test in config_cmd.rs counts it).
    assert!(out.contains("tiny (4.26M parameters"), "{out}");
}

/// `--temperature -1` is refused with what is allowed, not clap's `-- -1` tip; before any
/// model is loaded.
#[test]
fn negative_temperatures_are_refused_clearly() {
    for cmd in [
        &[
            "generate",
            "no-such-run",
            "--prompt",
            "x",
            "--temperature",
            "-1",
        ][..],
        &[
            "ask",
            ".",
            "q",
            "--model",
            "no-such-run",
            "--temperature",
            "-0.5",
        ][..],
        &["eval", "humaneval", "no-such-model", "--temperature", "-1"][..],
    ] {
        let (code, _, err) = mnemo(cmd);
        assert_eq!(code, 2, "{cmd:?}: {err}");
        assert!(
            err.contains("--temperature") && err.contains("must be a number >= 0"),
            "{cmd:?}: {err}"
        );
        assert!(!err.contains("-- -1") && !err.contains("tip:"), "{err}");
    }
}

#[test]
fn shell_completions() {
    for (shell, needle) in [
        ("bash", "_mnemo()"),
        ("zsh", "#compdef mnemo"),
        ("fish", "complete -c mnemo"),
    ] {
        let (code, out, err) = mnemo(&["completions", shell]);
        assert_eq!(code, 0, "{err}");
        assert!(out.contains(needle), "{shell}: {out}");
        assert!(
            out.contains("train") && out.contains("--max-tokens"),
            "{shell}"
        );
    }
    assert_fails(&["completions", "tcsh"], "invalid value 'tcsh'");
    // A reader that stops early (`mnemo completions bash | head`) is no error and no panic.
    for args in [&["completions", "bash"][..], &["cache", "list"][..]] {
        let mut child = Command::new(env!("CARGO_BIN_EXE_mnemo"))
            .args(args)
            .env("MNEMO_CACHE", common::cache())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        drop(child.stdout.take());
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && !err.contains("panicked"),
            "{args:?}: {err}"
        );
    }
}
