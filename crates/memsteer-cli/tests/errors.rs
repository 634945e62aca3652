//! Bad input: clear errors naming the file, line and expectation; never a panic.

use super::*;

fn panel_with(dir: &Path, body: &str) -> PathBuf {
    let p = dir.join("bad.csv");
    std::fs::write(&p, format!("instance_id,treatment_step,checkpoint_step,outcome\n{body}")).expect("write");
    p
}

fn profile_error(body: &str) -> String {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = panel_with(dir.path(), body);
    fails(&["profile", "--panel", s(&p), "--out", s(&dir.path().join("out")), "--quiet"])
}

#[test]
fn malformed_panels() {
    let cases: &[(&str, &[&str])] = &[
        ("a,never,0,1\na,never,1,x\n", &["bad.csv, line 3", "outcome", "a number"]),
        ("a,never,0,1\na,never,1,inf\n", &["line 3", "finite"]),
        ("a,never,0,1\na,never,0,2\n", &["line 3", "duplicate", "line 2"]),
        ("a,3,0,1\na,4,1,1\n", &["line 3", "treatment step 4"]),
        ("a,never,-1,1\n", &["line 2", "non-negative"]),
        ("a,9,0,1\na,9,1,1\n", &["after the last checkpoint"]),
        ("", &["no data rows"]),
        ("a,1,0,1\na,1,1,2\nb,1,0,1\nb,1,1,3\n", &["no never-trained", "--control not-yet"]),
    ];
    for (body, expect) in cases {
        let err = profile_error(body);
        for e in *expect {
            assert!(err.contains(e), "for {body:?}: {err:?} should contain {e:?}");
        }
        assert!(err.starts_with("error: "), "{err}");
    }
}

#[test]
fn missing_files_and_columns() {
    let dir = tempfile::tempdir().expect("tempdir");
    let err = fails(&["profile", "--panel", "/no/such/panel.csv", "--out", s(dir.path())]);
    assert!(err.contains("/no/such/panel.csv"), "{err}");
    let p = dir.path().join("cols.csv");
    std::fs::write(&p, "id,step,y\n1,0,1\n").expect("write");
    let err = fails(&["profile", "--panel", s(&p), "--out", s(dir.path())]);
    assert!(err.contains("missing column `instance_id`") && err.contains("id,step,y"), "{err}");
    let err = fails(&[
        "profile",
        "--panel",
        s(&p),
        "--out",
        s(dir.path()),
        "--instance-col",
        "id",
        "--checkpoint-col",
        "step",
        "--outcome-col",
        "y",
    ]);
    assert!(err.contains("missing column `treatment_step`"), "{err}");
}

#[test]
fn invalid_settings() {
    let dir = tempfile::tempdir().expect("tempdir");
    let panel = synthetic_panel(dir.path(), "panel.csv", 4);
    let out = dir.path().join("out");
    let err = fails(&["profile", "--panel", s(&panel), "--out", s(&out), "--alpha", "0.9"]);
    assert!(err.contains("--alpha"), "{err}");
    let err = fails(&["profile", "--panel", s(&panel), "--out", s(&out), "--bootstrap", "5"]);
    assert!(err.contains("--bootstrap"), "{err}");
    let err = fails(&["profile", "--panel", s(&panel), "--out", s(&out), "--estimator", "magic"]);
    assert!(err.contains("magic"), "{err}");
    let err = fails(&["profile", "--panel", s(&panel), "--out", s(&out), "--treatment-from-seq-idx", "0"]);
    assert!(err.contains("batch size") && err.contains("--treatment-from-seq-idx"), "{err}");
}
