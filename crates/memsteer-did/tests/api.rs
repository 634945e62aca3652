//! The public API beyond `estimate`: influence functions, serialisation, the SE fallback and the
//! Monte Carlo p-value.

use memsteer_did::{ControlGroup, NoProgress, Profile, ProfileConfig, StdErrorSource, estimate, influence_functions};
use memsteer_panel::synthetic::SyntheticConfig;
use memsteer_panel::{CheckpointGrid, Panel};

/// An aggregation rebuilt from the public per-cell influence functions equals the crate's own: the
/// instantaneous (path at e = 0) and persistent estimates and their analytic SEs, for both control
/// groups.
#[test]
fn aggregations_rebuilt_from_influence_functions_match() {
    let panel = SyntheticConfig::pythia_like(7, 25, 60, 11, 3).generate().expect("panel");
    for control in [ControlGroup::Never, ControlGroup::NotYet] {
        let cfg = ProfileConfig::default().with_bootstrap(0).with_control(control).validate().expect("cfg");
        let profile = estimate(&panel, &cfg, &NoProgress).expect("estimate");
        let inf = influence_functions(&panel, &cfg).expect("influence");
        assert_eq!(inf.cells().len(), profile.cells.len());
        assert_eq!(inf.n_instances(), panel.n_instances());
        for (i, (key, cell)) in inf.cells().iter().zip(&profile.cells).enumerate() {
            assert_eq!((key.cohort, key.checkpoint), (cell.cohort, cell.checkpoint));
            let one = inf.cell(i).expect("cell");
            assert!((one.estimate - cell.estimate).abs() < 1e-12, "{control:?} cell {i}");
            assert!((one.std_error() - cell.analytic_se).abs() < 1e-10 * cell.analytic_se.max(1.0));
            assert!(one.psi.iter().sum::<f64>().abs() < 1e-9, "influence functions are centred");
        }
        // Instantaneous: cohort-size weighted mean of the e = 0 cells.
        let weighted = |pick: &dyn Fn(i64) -> bool| {
            let chosen: Vec<usize> = (0..inf.cells().len()).filter(|&i| pick(inf.cells()[i].event_time)).collect();
            let total: f64 = chosen.iter().map(|&i| inf.cells()[i].n_treated as f64).sum();
            chosen.iter().map(|&i| (i, inf.cells()[i].n_treated as f64 / total)).collect::<Vec<_>>()
        };
        let inst = inf.combine(&weighted(&|e| e == 0)).expect("combine");
        let want = profile.instantaneous.expect("instantaneous");
        assert!((inst.estimate - want.estimate).abs() < 1e-12, "{} vs {}", inst.estimate, want.estimate);
        assert!((inst.std_error() - want.std_error).abs() < 1e-10, "{} vs {}", inst.std_error(), want.std_error);
        // Persistent: the unweighted mean over e > 0 of the path points.
        let post: Vec<i64> = profile.path.iter().map(|p| p.event_time).filter(|&e| e > 0).collect();
        let mut weights = Vec::new();
        for &e in &post {
            for (i, w) in weighted(&|x| x == e) {
                weights.push((i, w / post.len() as f64));
            }
        }
        let pers = inf.combine(&weights).expect("combine");
        let want = profile.persistent.expect("persistent");
        assert!((pers.estimate - want.estimate).abs() < 1e-12);
        assert!((pers.std_error() - want.std_error).abs() < 1e-10);
    }
    let cfg = ProfileConfig::default().validate().expect("cfg");
    let inf = influence_functions(&panel, &cfg).expect("influence");
    assert!(inf.cell(inf.cells().len()).is_err());
    assert!(inf.combine(&[(0, f64::NAN)]).is_err());
    assert!(inf.cell(0).expect("cell").perturbation(&[1.0]).is_err());
}

/// Equal JSON values, numbers to the last bit or two (serde_json's default float parser is not
/// correctly rounded).
fn same(a: &serde_json::Value, b: &serde_json::Value, at: &str) {
    use serde_json::Value;
    match (a, b) {
        (Value::Number(x), Value::Number(y)) if x.is_f64() || y.is_f64() => {
            let (x, y) = (x.as_f64().unwrap_or(f64::NAN), y.as_f64().unwrap_or(f64::NAN));
            assert!((x - y).abs() <= 4.0 * f64::EPSILON * x.abs().max(y.abs()), "{at}: {x} vs {y}");
        }
        (Value::Array(x), Value::Array(y)) => {
            assert_eq!(x.len(), y.len(), "{at}");
            for (i, (u, v)) in x.iter().zip(y).enumerate() {
                same(u, v, &format!("{at}[{i}]"));
            }
        }
        (Value::Object(x), Value::Object(y)) => {
            assert_eq!(x.keys().collect::<Vec<_>>(), y.keys().collect::<Vec<_>>(), "{at}");
            for (k, u) in x {
                same(u, &y[k], &format!("{at}.{k}"));
            }
        }
        _ => assert_eq!(a, b, "{at}"),
    }
}

fn roundtrip(p: &Profile) {
    let json = serde_json::to_string(p).expect("serialise");
    let back: Profile = serde_json::from_str(&json).expect("deserialise");
    same(&serde_json::to_value(&back).expect("serialise"), &serde_json::from_str(&json).expect("parse"), "profile");
    assert_eq!(back.cells.len(), p.cells.len());
    assert_eq!(back.diagnostics.warnings, p.diagnostics.warnings);
}

/// A tiny panel: cohorts of one instance and one never-trained control, so every centred outcome is 0.
fn tiny_panel() -> Panel {
    let grid = CheckpointGrid::new(vec![0, 10, 20]).expect("grid");
    let ids = vec!["a".to_string(), "b".into(), "v".into()];
    let outcomes = vec![1.0, 2.0, 4.0, 0.5, 0.7, 3.0, 2.0, 2.5, 2.6];
    Panel::new(grid, ids, vec![Some(5), Some(15), None], outcomes).expect("panel")
}

#[test]
fn profile_roundtrips_through_serde() {
    let panel = SyntheticConfig::pythia_like(5, 15, 30, 8, 9).generate().expect("panel");
    let cfg = ProfileConfig::default().with_bootstrap(100).validate().expect("cfg");
    roundtrip(&estimate(&panel, &cfg, &NoProgress).expect("estimate"));
    // Non-finite numbers (written as null) read back too.
    let p = estimate(&tiny_panel(), &cfg, &NoProgress).expect("estimate");
    let json = serde_json::to_string(&p).expect("serialise");
    assert!(json.contains("null"), "the tiny panel has an undefined p-value: {json}");
    roundtrip(&p);
}

/// Unusable bootstrap SEs fall back to the analytic SE, flagged per estimate and in the diagnostics,
/// never NaN.
#[test]
fn unusable_bootstrap_se_falls_back_to_analytic() {
    // A zero interquartile range: every centred outcome is 0, so every draw is 0.
    let p =
        estimate(&tiny_panel(), &ProfileConfig::default().with_bootstrap(200).validate().expect("cfg"), &NoProgress)
            .expect("estimate");
    assert!(!p.cells.is_empty());
    for c in &p.cells {
        assert_eq!(c.se_source, StdErrorSource::AnalyticFallback, "{c:?}");
        assert_eq!(c.std_error, c.analytic_se);
        for x in [c.std_error, c.ci_lower, c.ci_upper, c.band_lower, c.band_upper] {
            assert!(x.is_finite(), "{c:?}");
        }
    }
    for a in p.path.iter().map(|x| (x.std_error, x.se_source)) {
        assert!(a.0.is_finite() && a.1 == StdErrorSource::AnalyticFallback);
    }
    let inst = p.instantaneous.expect("instantaneous");
    assert!(inst.std_error.is_finite() && inst.se_source.is_fallback());
    let fb = &p.diagnostics.se_fallback;
    assert_eq!(fb.cells.len(), p.cells.len());
    assert!(fb.reason.as_deref().is_some_and(|r| r.contains("interquartile range")), "{fb:?}");
    assert!(p.diagnostics.warnings.iter().any(|w| w.contains("analytic standard error")));

    // Too few draws for an IQR: 20 draws resolve the band's quantile at α = 0.05 but give no SE.
    let panel = SyntheticConfig::pythia_like(5, 15, 30, 8, 2).generate().expect("panel");
    let p = estimate(&panel, &ProfileConfig::default().with_bootstrap(20).validate().expect("cfg"), &NoProgress)
        .expect("estimate");
    assert!(p.cells.iter().all(|c| c.se_source.is_fallback() && c.std_error == c.analytic_se && c.std_error > 0.0));
    let reason = p.diagnostics.se_fallback.reason.clone().unwrap_or_default();
    assert!(reason.contains("20 bootstrap draws"), "{reason}");
    // With enough draws nothing falls back.
    let p = estimate(&panel, &ProfileConfig::default().with_bootstrap(200).validate().expect("cfg"), &NoProgress)
        .expect("estimate");
    assert!(p.cells.iter().all(|c| c.se_source == StdErrorSource::Bootstrap));
    assert!(p.diagnostics.se_fallback.is_empty() && p.diagnostics.se_fallback.reason.is_none());
    // Analytic inference is not a fallback.
    let p = estimate(&panel, &ProfileConfig::default().with_bootstrap(0).validate().expect("cfg"), &NoProgress)
        .expect("estimate");
    assert!(p.cells.iter().all(|c| c.se_source == StdErrorSource::Analytic));
}

/// The sup-t pre-trend p-value is `(1 + #{draws ≥ observed}) / (B + 1)`: a violation far beyond every
/// draw gets `1 / (B + 1)`, not 0.
#[test]
fn bootstrap_p_value_is_never_zero() {
    let mut cfg = SyntheticConfig::pythia_like(8, 30, 100, 12, 4);
    cfg.trend_violation = 20.0;
    let panel = cfg.generate().expect("panel");
    let p = estimate(&panel, &ProfileConfig::default().with_bootstrap(199).validate().expect("cfg"), &NoProgress)
        .expect("estimate");
    let t = p.diagnostics.pretrend_sup_t.expect("sup-t");
    assert_eq!(t.draws, 199);
    assert_eq!(t.p_value, 1.0 / 200.0);
    assert!(t.rejects);
}
