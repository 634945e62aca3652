//! End-to-end tests of the `memsteer` binary.

mod compare;
mod errors;
mod profile;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn memsteer(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_memsteer")).args(args).output().expect("run memsteer")
}

pub fn ok(args: &[&str]) -> String {
    let out = memsteer(args);
    assert!(
        out.status.success(),
        "memsteer {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs and expects failure; returns stderr.
pub fn fails(args: &[&str]) -> String {
    let out = memsteer(args);
    assert!(!out.status.success(), "memsteer {args:?} should fail");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!err.contains("panicked"), "memsteer {args:?} panicked:\n{err}");
    err
}

pub fn fixture(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures").join(rel)
}

pub fn synthetic_panel(dir: &Path, name: &str, seed: u64) -> PathBuf {
    let path = dir.join(name);
    memsteer_panel::synthetic::SyntheticConfig::pythia_like(10, 30, 120, 14, seed)
        .generate()
        .expect("panel")
        .write_csv(&path)
        .expect("write");
    path
}

pub fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}
