//! `memsteer compare`.

use super::*;

#[test]
fn correlates_profiles_and_draws_the_matrix() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut atts = Vec::new();
    for seed in [1, 2] {
        let panel = synthetic_panel(dir.path(), &format!("p{seed}.csv"), seed);
        let out = dir.path().join(format!("m{seed}"));
        ok(&["profile", "--panel", s(&panel), "--out", s(&out), "--bootstrap", "100", "--quiet", "--no-figures"]);
        atts.push(out.join("att.csv"));
    }
    let cmp = dir.path().join("cmp");
    let stdout = ok(&["compare", s(&atts[0]), s(&atts[1]), "--out", s(&cmp)]);
    // Same effect structure, different noise: strongly correlated profiles.
    let line = stdout.lines().find(|l| l.starts_with("m1")).expect("row m1");
    let r: f64 = line.split_whitespace().nth(2).expect("r").parse().expect("number");
    assert!(r > 0.8 && r < 1.0, "{stdout}");
    let csv = std::fs::read_to_string(cmp.join("correlations.csv")).expect("csv");
    assert!(csv.starts_with("profile,m1,m2\nm1,1,"), "{csv}");
    assert!(cmp.join("correlations.png").exists() && cmp.join("correlations.svg").exists());
    let stdout = ok(&["compare", s(&atts[0]), s(&atts[1]), "--significant-only", "--labels", "a,b"]);
    assert!(stdout.contains("significant in both"), "{stdout}");
}

#[test]
fn compare_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bad = dir.path().join("att.csv");
    std::fs::write(&bad, "cohort,checkpoint\n1,2\n").expect("write");
    let err = fails(&["compare", s(&bad), s(&bad)]);
    assert!(err.contains("att.csv") && err.contains("missing column `event_time`"), "{err}");
    let err = fails(&["compare", s(&bad)]);
    assert!(err.contains("2"), "{err}");
    let err = fails(&["compare", s(&bad), s(&bad), "--labels", "x"]);
    assert!(err.contains("--labels"), "{err}");
}
