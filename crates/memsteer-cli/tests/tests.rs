//! End-to-end tests of the `memsteer` binary.

mod compare;
mod errors;
mod guide;
mod logprobs;
mod profile;
mod serve;
mod steer;
mod steer_eval;
mod train;

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

mod hmm {
    use super::*;

    #[test]
    fn theorem2_json_reports_rounding_level_error_and_a_clear_control_gap() {
        let out = ok(&["hmm", "theorem2", "--seed", "3", "--states", "3", "--vocab", "4", "--length", "4", "--json"]);
        let v: serde_json::Value = serde_json::from_str(out.trim()).expect("one JSON object");
        let err = v["max_abs_error"].as_f64().expect("max_abs_error");
        let control = v["control_max_abs_error"].as_f64().expect("control");
        assert!(err <= 1e-10, "{v}");
        assert!(control > 1e-6 && control > 1e4 * err.max(1e-16), "{v}");
        assert_eq!(v["semantic_states"], 3);
        assert_eq!(v["vocab"], 4);
        assert_eq!(v["length"], 4);
        let text = ok(&["hmm", "theorem2"]);
        assert!(text.contains("negative control"), "{text}");
        let e = fails(&["hmm", "theorem2", "--conditions", "1"]);
        assert!(e.contains("≥ 2 condition states"), "{e}");
    }

    #[test]
    fn simulate_writes_a_panel_the_profile_reads_and_the_truth() {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = dir.path().join("sim");
        ok(&["hmm", "simulate", "--seed", "2", "--out", s(&out), "--steps", "64", "--replicates", "2"]);
        let truth = std::fs::read_to_string(out.join("truth.csv")).expect("truth");
        assert!(truth.starts_with("cohort_step,checkpoint_step,tau\n"), "{truth}");
        let prof = dir.path().join("profile");
        ok(&[
            "profile",
            "--panel",
            s(&out.join("panel.csv")),
            "--out",
            s(&prof),
            "--bootstrap",
            "100",
            "--quiet",
            "--no-figures",
            "--min-cohort-size",
            "1",
        ]);
        let att = std::fs::read_to_string(prof.join("att.csv")).expect("att");
        // Every estimated cell has a truth row.
        let keys: std::collections::HashSet<(String, String)> = truth
            .lines()
            .skip(1)
            .map(|l| {
                let f: Vec<&str> = l.split(',').collect();
                (f[0].to_string(), f[1].to_string())
            })
            .collect();
        for line in att.lines().skip(1) {
            let f: Vec<&str> = line.split(',').collect();
            assert!(keys.contains(&(f[0].to_string(), f[1].to_string())), "{line}");
        }
        let e = fails(&["hmm", "simulate", "--out", s(&out), "--validation-shift", "3"]);
        assert!(e.contains("validation shift"), "{e}");
    }
}
