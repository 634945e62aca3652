//! Parity with csdid 0.4.3 on panels written by `fixtures/csdid/make_golden.py` (an independent numpy
//! generator): point estimates and analytic standard errors to 1e-9, bootstrap standard errors and
//! critical values within sampling tolerance, and the cell-level Wald pre-test.

use std::collections::HashMap;
use std::path::PathBuf;

use memsteer_did::tolerances::{BOOTSTRAP_SE_RELATIVE, PEER_EXACT};
use memsteer_did::{BandMethod, BasePeriod, ControlGroup, NoProgress, ProfileConfig, estimate};
use memsteer_panel::read::{ReadOptions, read_csv};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/csdid").join(name)
}

struct GoldenCell {
    att: f64,
    se: f64,
}

fn load_golden(name: &str) -> HashMap<String, HashMap<(u64, u64), GoldenCell>> {
    let text = std::fs::read_to_string(fixture(&format!("golden_{name}.csv"))).expect("golden csv");
    let mut runs: HashMap<String, HashMap<(u64, u64), GoldenCell>> = HashMap::new();
    for line in text.lines().skip(1) {
        let f: Vec<&str> = line.split(',').collect();
        let att: f64 = f[3].parse().expect("att");
        let se: f64 = f[4].parse().unwrap_or(f64::NAN);
        runs.entry(f[0].to_string())
            .or_default()
            .insert((f[1].parse().expect("cohort"), f[2].parse().expect("checkpoint")), GoldenCell { att, se });
    }
    runs
}

fn meta(name: &str) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixture(&format!("golden_{name}.json"))).expect("json"))
        .expect("parse json")
}

fn settings(run: &str) -> (ControlGroup, BasePeriod, bool) {
    let parts: Vec<&str> = run.split('/').collect();
    let control = if parts[0] == "nevertreated" { ControlGroup::Never } else { ControlGroup::NotYet };
    let base = if parts[1] == "varying" { BasePeriod::Varying } else { BasePeriod::Universal };
    (control, base, parts[2] == "bootstrap")
}

fn check_panel(name: &str) {
    let (panel, _) = read_csv(&fixture(&format!("panel_{name}.csv")), &ReadOptions::default()).expect("panel");
    let golden = load_golden(name);
    let meta = meta(name);
    assert_eq!(golden.len(), 8, "eight csdid runs per panel");
    for (run, cells) in &golden {
        let (control, base_period, bootstrap) = settings(run);
        let cfg = ProfileConfig::default()
            .with_control(control)
            .with_base_period(base_period)
            .with_bootstrap(if bootstrap { 1000 } else { 0 })
            // csdid's band construction, for parity of the critical value.
            .with_band_method(BandMethod::Csdid)
            .validate()
            .expect("config");
        let profile = estimate(&panel, &cfg, &NoProgress).expect("estimate");
        // The same set of cells, except csdid's universal-base reference cells (0 by construction) and
        // cells without controls (NaN in csdid, not estimated here).
        let expected: Vec<(&(u64, u64), &GoldenCell)> = cells
            .iter()
            .filter(|(_, g)| {
                g.att.is_finite() && !(base_period == BasePeriod::Universal && g.se.is_nan() && g.att == 0.0)
            })
            .collect();
        assert_eq!(profile.cells.len(), expected.len(), "{name} {run}: number of cells");
        let mut rel_errors = Vec::new();
        for cell in &profile.cells {
            let g = cells
                .get(&(cell.cohort, cell.checkpoint))
                .unwrap_or_else(|| panic!("{name} {run}: csdid lacks cell {:?}", (cell.cohort, cell.checkpoint)));
            assert!(
                (cell.estimate - g.att).abs() <= PEER_EXACT * (1.0 + g.att.abs()),
                "{name} {run} cell ({}, {}): estimate {} vs csdid {}",
                cell.cohort,
                cell.checkpoint,
                cell.estimate,
                g.att
            );
            if bootstrap {
                rel_errors.push((cell.std_error / g.se - 1.0).abs());
            } else {
                assert!(
                    (cell.std_error - g.se).abs() <= PEER_EXACT * g.se.max(1.0),
                    "{name} {run} cell ({}, {}): analytic se {} vs csdid {}",
                    cell.cohort,
                    cell.checkpoint,
                    cell.std_error,
                    g.se
                );
            }
        }
        if bootstrap {
            rel_errors.sort_by(f64::total_cmp);
            let median = rel_errors[rel_errors.len() / 2];
            let worst = rel_errors[rel_errors.len() - 1];
            assert!(median < BOOTSTRAP_SE_RELATIVE / 2.0, "{name} {run}: median relative se difference {median}");
            assert!(worst < 2.0 * BOOTSTRAP_SE_RELATIVE, "{name} {run}: worst relative se difference {worst}");
            let crit = meta["runs"][run]["crit"].as_f64().expect("crit");
            assert!(
                (profile.critical_value / crit - 1.0).abs() < BOOTSTRAP_SE_RELATIVE,
                "{name} {run}: critical value {} vs csdid {crit}",
                profile.critical_value
            );
        }
        // The cell-level Wald pre-test uses the analytic covariance in both packages.
        let w = meta["runs"][run]["W"].as_f64().expect("W");
        let ours = profile.diagnostics.pretrend_cell_wald.as_ref().and_then(|t| t.statistic).expect("cell wald");
        assert!((ours - w).abs() <= 1e-8 * w, "{name} {run}: Wald {ours} vs csdid {w}");
        let pval = meta["runs"][run]["Wpval"].as_f64().expect("Wpval");
        let ours_p = profile.diagnostics.pretrend_cell_wald.as_ref().and_then(|t| t.p_value).expect("p");
        assert!((ours_p - pval).abs() <= 5e-6, "{name} {run}: Wald p {ours_p} vs csdid {pval}");
    }
}

#[test]
fn matches_csdid_on_panel_a() {
    check_panel("a");
}

#[test]
fn matches_csdid_on_panel_b_with_instances_trained_before_the_first_checkpoint() {
    check_panel("b");
    let (panel, _) = read_csv(&fixture("panel_b.csv"), &ReadOptions::default()).expect("panel");
    let cfg = ProfileConfig::default().with_bootstrap(0).validate().expect("cfg");
    let profile = estimate(&panel, &cfg, &NoProgress).expect("estimate");
    assert_eq!(profile.n_dropped_no_pre, 6);
    assert!(profile.diagnostics.warnings.iter().any(|w| w.contains("dropped 6 instances")));
}
