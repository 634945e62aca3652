//! `memsteer profile` end to end: outputs, formats, parity with csdid through the CLI, determinism.

use super::*;

#[test]
fn writes_every_output_in_the_documented_formats() {
    let dir = tempfile::tempdir().expect("tempdir");
    let panel = synthetic_panel(dir.path(), "panel.csv", 1);
    let out = dir.path().join("out");
    let stdout = ok(&["profile", "--panel", s(&panel), "--out", s(&out), "--bootstrap", "200", "--mark-step", "5000"]);
    assert!(
        stdout.contains("instantaneous") && stdout.contains("persistent") && stdout.contains("residual"),
        "{stdout}"
    );
    let att = std::fs::read_to_string(out.join("att.csv")).expect("att.csv");
    assert_eq!(
        att.lines().next(),
        Some(
            "cohort,checkpoint,event_time,estimate,std_error,ci_lower,ci_upper,band_lower,band_upper,n_treated,n_control"
        )
    );
    // Cohorts 1000..10000 × checkpoints 1000..13000: 10 × 13 cells.
    assert_eq!(att.lines().count(), 1 + 10 * 13);
    let path = std::fs::read_to_string(out.join("path.csv")).expect("path.csv");
    assert_eq!(path.lines().next(), Some("event_time,estimate,std_error,ci_lower,ci_upper,band_lower,band_upper"));
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).expect("summary")).expect("json");
    for key in ["instantaneous", "persistent", "residual"] {
        for field in ["estimate", "std_error", "ci_lower", "ci_upper"] {
            assert!(summary[key][field].is_f64(), "summary.{key}.{field}: {}", summary[key]);
        }
    }
    assert_eq!(summary["seed"], 20240101);
    assert_eq!(summary["settings"]["bootstrap"], 200);
    assert_eq!(summary["n_cohorts"], 10);
    assert!(summary["memsteer_version"].is_string());
    let diag: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("diagnostics.json")).expect("diag")).expect("json");
    assert!(diag["pretrend_sup_t"]["p_value"].is_f64());
    assert!(diag["pretrend_path_wald"]["df"].is_u64());
    assert!(diag["pretrend_cell_wald"]["statistic"].is_f64());
    assert!(diag["baseline_balance"]["difference"].is_f64());
    assert!(diag["anticipation"]["estimate"].is_f64());
    assert_eq!(diag["pretrend_sup_t"]["draws"], 200);
    assert!(diag["se_fallback"]["cells"].as_array().is_some_and(Vec::is_empty), "{}", diag["se_fallback"]);
    assert_eq!(summary["instantaneous"]["se_source"], "bootstrap");
    for fig in ["profile", "path"] {
        let svg = std::fs::read_to_string(out.join(format!("{fig}.svg"))).expect("svg");
        assert!(svg.starts_with("<svg") && svg.contains("</svg>"), "{fig}.svg");
        let png = std::fs::read(out.join(format!("{fig}.png"))).expect("png");
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "{fig}.png signature");
    }
    // No temporary files are left behind.
    for entry in std::fs::read_dir(&out).expect("ls") {
        let name = entry.expect("entry").file_name().to_string_lossy().into_owned();
        assert!(!name.contains("tmp"), "left over {name}");
    }
}

#[test]
fn matches_csdid_through_the_cli() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("out");
    ok(&[
        "profile",
        "--panel",
        s(&fixture("csdid/panel_a.csv")),
        "--out",
        s(&out),
        "--bootstrap",
        "0",
        "--no-figures",
        "--quiet",
    ]);
    let golden = std::fs::read_to_string(fixture("csdid/golden_a.csv")).expect("golden");
    let expected: std::collections::HashMap<(String, String), (f64, f64)> = golden
        .lines()
        .filter(|l| l.starts_with("nevertreated/varying/analytic,"))
        .map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            ((f[1].to_string(), f[2].to_string()), (f[3].parse().expect("att"), f[4].parse().expect("se")))
        })
        .collect();
    let att = std::fs::read_to_string(out.join("att.csv")).expect("att");
    let mut n = 0;
    for line in att.lines().skip(1) {
        let f: Vec<&str> = line.split(',').collect();
        let (g_att, g_se) = expected[&(f[0].to_string(), f[1].to_string())];
        let (att, se): (f64, f64) = (f[3].parse().expect("estimate"), f[4].parse().expect("se"));
        assert!((att - g_att).abs() < 1e-9 && (se - g_se).abs() < 1e-9, "{line} vs {g_att} {g_se}");
        // Analytic inference: the band columns hold the pointwise interval.
        assert_eq!(f[5], f[7]);
        n += 1;
    }
    assert_eq!(n, expected.len());
}

#[test]
fn same_seed_gives_byte_identical_outputs_with_one_or_two_threads() {
    let dir = tempfile::tempdir().expect("tempdir");
    let panel = synthetic_panel(dir.path(), "panel.csv", 2);
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    ok(&["--threads", "1", "profile", "--panel", s(&panel), "--out", s(&a), "--bootstrap", "300", "--quiet"]);
    ok(&["--threads", "2", "profile", "--panel", s(&panel), "--out", s(&b), "--bootstrap", "300", "--quiet"]);
    let summary = |d: &Path| std::fs::read_to_string(d.join("summary.json")).expect("summary");
    for name in ["att.csv", "path.csv", "diagnostics.json", "profile.svg", "path.svg", "profile.png", "path.png"] {
        assert!(std::fs::read(a.join(name)).expect("a") == std::fs::read(b.join(name)).expect("b"), "{name} differs");
    }
    // summary.json names the panel path, identical here.
    assert_eq!(summary(&a), summary(&b));
    // A different seed changes the bootstrap.
    let c = dir.path().join("c");
    ok(&[
        "profile",
        "--panel",
        s(&panel),
        "--out",
        s(&c),
        "--bootstrap",
        "300",
        "--seed",
        "7",
        "--quiet",
        "--no-figures",
    ]);
    assert_ne!(std::fs::read(a.join("att.csv")).expect("a"), std::fs::read(c.join("att.csv")).expect("c"));
}

#[test]
fn adapter_flags_read_the_papers_statistics_layout() {
    let dir = tempfile::tempdir().expect("tempdir");
    // seq_idx > 0: trained at step ceil(seq_idx / 4); ≤ 0: validation. Surprisal outcomes.
    let mut csv = String::from("seq_idx,step,sup_seq,other\n");
    for (idx, base) in [
        (1i64, 10.0),
        (3, 11.0),
        (5, 9.0),
        (7, 10.5),
        (9, 10.0),
        (11, 9.5),
        (0, 10.0),
        (-1, 10.2),
        (-2, 9.8),
        (-3, 10.1),
    ] {
        for (c, step) in [0u64, 1, 2, 3].iter().enumerate() {
            let treated_by = if idx > 0 { (idx as u64).div_ceil(4) } else { u64::MAX };
            let memorised = if *step >= treated_by { 0.8 } else { 0.0 };
            let noise = ((idx * 7 + c as i64 * 3) % 5) as f64 * 0.01;
            csv.push_str(&format!("{idx},{step},{},x\n", base - 0.5 * c as f64 - memorised + noise));
        }
    }
    let panel = dir.path().join("stats.csv");
    std::fs::write(&panel, csv).expect("write");
    let out = dir.path().join("out");
    ok(&[
        "profile",
        "--panel",
        s(&panel),
        "--out",
        s(&out),
        "--instance-col",
        "seq_idx",
        "--treatment-col",
        "seq_idx",
        "--treatment-from-seq-idx",
        "4",
        "--checkpoint-col",
        "step",
        "--outcome-col",
        "sup_seq",
        "--negate",
        "--bootstrap",
        "0",
        "--no-figures",
        "--quiet",
        "--min-cohort-size",
        "1",
    ]);
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).expect("summary")).expect("json");
    assert_eq!(summary["n_never_trained"], 4);
    assert_eq!(summary["read"]["negated"], true);
    // Negated surprisal: memorisation is positive (0.8 nats, up to the small noise).
    let inst = summary["instantaneous"]["estimate"].as_f64().expect("inst");
    assert!((inst - 0.8).abs() < 0.1, "instantaneous {inst}");
}

#[test]
fn drop_incomplete_and_max_step_are_reported() {
    let dir = tempfile::tempdir().expect("tempdir");
    let panel = synthetic_panel(dir.path(), "panel.csv", 3);
    let text = std::fs::read_to_string(&panel).expect("read");
    // Remove one row of one treated instance.
    let victim = text.lines().nth(1).expect("row").to_string();
    let cut: String = text.lines().filter(|l| *l != victim).map(|l| format!("{l}\n")).collect();
    let broken = dir.path().join("broken.csv");
    std::fs::write(&broken, cut).expect("write");
    let err = fails(&["profile", "--panel", s(&broken), "--out", s(&dir.path().join("x")), "--quiet"]);
    assert!(err.contains("broken.csv") && err.contains("--drop-incomplete"), "{err}");
    let out = dir.path().join("out");
    ok(&[
        "profile",
        "--panel",
        s(&broken),
        "--out",
        s(&out),
        "--drop-incomplete",
        "--max-step",
        "8000",
        "--bootstrap",
        "0",
        "--quiet",
        "--no-figures",
    ]);
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).expect("summary")).expect("json");
    assert_eq!(summary["read"]["dropped_incomplete"], 1);
    assert_eq!(summary["read"]["dropped_after_max_step"], 60); // cohorts 9000 and 10000, 30 each
    assert_eq!(summary["n_checkpoints"], 9);
    let diag = std::fs::read_to_string(out.join("diagnostics.json")).expect("diag");
    assert!(diag.contains("dropped 1 of"), "{diag}");
}

#[test]
fn parquet_and_csv_panels_give_identical_profiles() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (a, b) = (dir.path().join("csv"), dir.path().join("parquet"));
    ok(&[
        "profile",
        "--panel",
        s(&fixture("csdid/panel_a.csv")),
        "--out",
        s(&a),
        "--bootstrap",
        "200",
        "--quiet",
        "--no-figures",
    ]);
    ok(&[
        "profile",
        "--panel",
        s(&fixture("csdid/panel_a.parquet")),
        "--out",
        s(&b),
        "--bootstrap",
        "200",
        "--quiet",
        "--no-figures",
    ]);
    for name in ["att.csv", "path.csv", "diagnostics.json"] {
        assert!(std::fs::read(a.join(name)).expect("a") == std::fs::read(b.join(name)).expect("b"), "{name} differs");
    }
}

/// The paper's released statistics layout (`seq_idx,step,sup_seq`, surprisals, batch size 1024): one
/// flag decodes `seq_idx` into the treatment step with no treatment column, and the output directory
/// defaults to `STEM-profile` next to the panel.
#[test]
fn released_statistics_layout_works_with_one_flag() {
    let dir = tempfile::tempdir().expect("tempdir");
    let steps = [0u64, 1000, 2000, 3000, 4000, 5000];
    let mut csv = String::from("seq_idx,step,sup_seq\n");
    let mut rows = Vec::new();
    // 12 trained sequences per cohort: seq_idx in (1024·(g−1)·1000, 1024·g·1000] lands at checkpoint g.
    for g in 1..steps.len() as i64 - 1 {
        for j in 0..12i64 {
            let step_in = (g - 1) * 1000 + 1 + j * 80; // optimizer step within (step_{g-1}, step_g]
            rows.push(((step_in - 1) * 1024 + 1 + j, Some(step_in as u64)));
        }
    }
    for v in 0..20i64 {
        rows.push((-v, None));
    }
    for (k, (idx, trained)) in rows.iter().enumerate() {
        for (c, &step) in steps.iter().enumerate() {
            let memorised = if trained.is_some_and(|t| step >= t) { 1.5 } else { 0.0 };
            let noise = ((k * 13 + c * 7) % 11) as f64 * 0.02;
            // Surprisal falls with training and falls more once memorised.
            csv.push_str(&format!("{idx},{step},{}\n", 40.0 - 2.0 * c as f64 - memorised + noise));
        }
    }
    let panel = dir.path().join("stats.csv");
    std::fs::write(&panel, &csv).expect("write");
    ok(&[
        "profile",
        "--panel",
        s(&panel),
        "--instance-col",
        "seq_idx",
        "--checkpoint-col",
        "step",
        "--outcome-col",
        "sup_seq",
        "--treatment-from-seq-idx",
        "1024",
        "--negate",
        "--bootstrap",
        "200",
        "--no-figures",
        "--quiet",
    ]);
    let out = dir.path().join("stats-profile");
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).expect("summary")).expect("json");
    assert_eq!(summary["n_never_trained"], 20);
    assert_eq!(summary["n_cohorts"], 4);
    assert_eq!(summary["n_instances"], 4 * 12 + 20);
    let inst = summary["instantaneous"]["estimate"].as_f64().expect("inst");
    assert!((inst - 1.5).abs() < 0.1, "instantaneous {inst}");
    // Cohorts are checkpoint steps 1000..4000, as decoded from seq_idx.
    let att = std::fs::read_to_string(out.join("att.csv")).expect("att");
    let cohorts: std::collections::BTreeSet<&str> =
        att.lines().skip(1).map(|l| l.split(',').next().unwrap_or("")).collect();
    assert_eq!(cohorts.into_iter().collect::<Vec<_>>(), ["1000", "2000", "3000", "4000"]);

    // A seq_idx that is not an integer is an error naming the file, line and column.
    let bad = csv.replacen("\n1,0,", "\n1.5,0,", 1);
    assert_ne!(bad, csv);
    let bad_path = dir.path().join("bad.csv");
    std::fs::write(&bad_path, bad).expect("write");
    let err = fails(&[
        "profile",
        "--panel",
        s(&bad_path),
        "--instance-col",
        "seq_idx",
        "--checkpoint-col",
        "step",
        "--outcome-col",
        "sup_seq",
        "--treatment-from-seq-idx",
        "1024",
        "--quiet",
    ]);
    assert!(
        err.contains("bad.csv")
            && err.contains("line 2")
            && err.contains("`seq_idx`")
            && err.contains("integer sequence index"),
        "{err}"
    );
}

/// Printed intervals and figure legends name the level from --alpha.
#[test]
fn interval_labels_follow_alpha() {
    let dir = tempfile::tempdir().expect("tempdir");
    let panel = synthetic_panel(dir.path(), "panel.csv", 6);
    let out = dir.path().join("out");
    let stdout = ok(&["profile", "--panel", s(&panel), "--out", s(&out), "--bootstrap", "200", "--alpha", "0.1"]);
    assert!(stdout.contains("90% CI") && stdout.contains("90% uniform band") && !stdout.contains("95%"), "{stdout}");
    let svg = std::fs::read_to_string(out.join("path.svg")).expect("svg");
    assert!(svg.contains("90% pointwise interval") && svg.contains("90% uniform band") && !svg.contains("95%"));
    let stdout = ok(&["profile", "--panel", s(&panel), "--out", s(&out), "--bootstrap", "200", "--alpha", "0.025"]);
    assert!(stdout.contains("97.5% CI"), "{stdout}");
    // 20 draws resolve the band's quantile at α = 0.05 but give no robust SE: analytic SEs, flagged.
    let out = ok(&["profile", "--panel", s(&panel), "--out", s(&out), "--bootstrap", "20", "--no-figures"]);
    assert!(out.contains("se 0.") && out.contains(" analytic,"), "{out}");
    let diag: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("out/diagnostics.json")).expect("diag"))
            .expect("json");
    assert!(diag["se_fallback"]["cells"].as_array().is_some_and(|c| !c.is_empty()), "{}", diag["se_fallback"]);
    assert!(
        diag["warnings"]
            .as_array()
            .is_some_and(|w| w.iter().any(|w| w.as_str().is_some_and(|w| w.contains("20 bootstrap draws"))))
    );
}

/// `--band-method`: the default Student band and csdid's construction share estimates and pointwise
/// intervals and differ only in the bands; `summary.json` records the method.
#[test]
fn band_method_changes_only_the_bands() {
    let dir = tempfile::tempdir().expect("tempdir");
    let panel = fixture("csdid/panel_a.csv");
    let run = |method: Option<&str>, name: &str| {
        let out = dir.path().join(name);
        let mut args =
            vec!["profile", "--panel", s(&panel), "--out", s(&out), "--bootstrap", "200", "--no-figures", "--quiet"];
        if let Some(m) = method {
            args.extend(["--band-method", m]);
        }
        ok(&args);
        let att = std::fs::read_to_string(out.join("att.csv")).expect("att");
        let summary: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).expect("summary")).expect("json");
        (att, summary)
    };
    let (student, s1) = run(None, "student");
    let (csdid, s2) = run(Some("csdid"), "csdid");
    assert_eq!(s1["settings"]["band_method"], "student", "{s1}");
    assert_eq!(s2["settings"]["band_method"], "csdid", "{s2}");
    let rows =
        |t: &str| t.lines().skip(1).map(|l| l.split(',').map(String::from).collect::<Vec<_>>()).collect::<Vec<_>>();
    let (a, b) = (rows(&student), rows(&csdid));
    assert_eq!(a.len(), b.len());
    let mut differ = 0;
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x[..7], y[..7], "estimates, SEs and pointwise intervals agree");
        differ += usize::from(x[7] != y[7]);
        // A uniform band is never narrower than the cell's pointwise interval.
        let f = |i: usize| x[i].parse::<f64>().expect("number");
        assert!(f(8) - f(3) >= f(6) - f(3) - 1e-12 && f(3) - f(7) >= f(3) - f(5) - 1e-12, "{x:?}");
    }
    assert!(differ > a.len() / 2, "bands differ in {differ} of {} cells", a.len());
    let e = fails(&["profile", "--panel", s(&panel), "--band-method", "bonferroni"]);
    assert!(e.contains("--band-method") && e.contains("student"), "{e}");
}
