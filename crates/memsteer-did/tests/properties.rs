//! Statistical properties on synthetic panels with a known effect: unbiasedness, coverage, size and
//! power of the pre-trend tests, the difference estimator's bias under a validation shift, and
//! determinism across thread counts.

use memsteer_did::{ControlGroup, DidError, Estimator, NoProgress, Profile, ProfileConfig, estimate};
use memsteer_panel::synthetic::SyntheticConfig;
use proptest::prelude::*;

fn run(cfg: &SyntheticConfig, settings: ProfileConfig) -> Profile {
    let panel = cfg.generate().expect("panel");
    estimate(&panel, &settings.validate().expect("config"), &NoProgress).expect("estimate")
}

fn analytic() -> ProfileConfig {
    ProfileConfig::default().with_bootstrap(0)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, rng_seed: proptest::test_runner::RngSeed::Fixed(20261127), ..ProptestConfig::default() })]

    /// A constant effect is recovered within sampling error, by every estimator and control group.
    #[test]
    fn constant_effect_is_recovered(seed in 0u64..10_000, effect in -3.0f64..3.0, not_yet in any::<bool>()) {
        let mut cfg = SyntheticConfig::pythia_like(6, 60, 150, 9, seed);
        cfg.instantaneous = 0.0;
        cfg.residual = effect;
        let control = if not_yet { ControlGroup::NotYet } else { ControlGroup::Never };
        for estimator in [Estimator::Did, Estimator::Difference] {
            let p = run(&cfg, analytic().with_estimator(estimator).with_control(control));
            let inst = p.instantaneous.expect("instantaneous");
            prop_assert!((inst.estimate - effect).abs() < 4.5 * inst.std_error,
                "{estimator:?}: {} vs {effect} (se {})", inst.estimate, inst.std_error);
            let pers = p.persistent.expect("persistent");
            prop_assert!((pers.estimate - effect).abs() < 4.5 * pers.std_error);
        }
    }
}

/// Pointwise 95% intervals of post-treatment cells cover the true effect at close to the nominal rate.
#[test]
fn pointwise_intervals_cover_at_the_nominal_rate() {
    let (mut covered, mut total) = (0usize, 0usize);
    let (mut band_covered, mut band_total) = (0usize, 0usize);
    for seed in 0..16 {
        let cfg = SyntheticConfig::pythia_like(8, 40, 120, 12, 100 + seed);
        let p = run(&cfg, ProfileConfig::default().with_bootstrap(400).with_seed(seed));
        for c in p.cells.iter().filter(|c| c.is_post()) {
            let truth = cfg.true_effect(c.cohort_index, c.checkpoint_index);
            total += 1;
            covered += usize::from(c.ci_lower <= truth && truth <= c.ci_upper);
        }
        // The uniform band covers the whole profile (pre cells: truth 0) jointly at ≥ 95%.
        band_total += 1;
        band_covered += usize::from(p.cells.iter().all(|c| {
            let truth = cfg.true_effect(c.cohort_index, c.checkpoint_index);
            c.band_lower <= truth && truth <= c.band_upper
        }));
    }
    let rate = covered as f64 / total as f64;
    assert!((0.92..=0.98).contains(&rate), "pointwise coverage {rate} over {total} cells");
    assert!(band_covered >= 13, "uniform band covered {band_covered} of {band_total} profiles");
}

/// Under parallel trends the sup-t and path pre-trend tests hold their size with ~1,800 pre-treatment
/// cells, where the cell-level Wald test is flagged unreliable; an injected cohort-specific trend is
/// detected.
#[test]
fn pretrend_tests_hold_size_and_have_power() {
    // MEMSTEER_SIZE_RUNS / MEMSTEER_SIZE_PER reproduce the longer checks in docs/diagnostics.md
    // (400 runs with 20 per cohort: sup-t 4.0%, path 5.25%; 300 runs with 100: 5.7%, 4.7%).
    let env = |name: &str, default: u64| std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default);
    let runs = env("MEMSTEER_SIZE_RUNS", 60);
    let per = env("MEMSTEER_SIZE_PER", 20) as usize;
    let (mut sup_rejects, mut path_rejects, mut n_pre) = (0, 0, 0);
    for seed in 0..runs {
        let cfg = SyntheticConfig::pythia_like(60, per, 400, 64, 1000 + seed);
        let p = run(&cfg, ProfileConfig::default().with_bootstrap(200).with_seed(seed));
        let d = &p.diagnostics;
        let sup = d.pretrend_sup_t.as_ref().expect("sup-t");
        n_pre = sup.n_cells;
        sup_rejects += usize::from(sup.rejects);
        let path = d.pretrend_path_wald.as_ref().expect("path");
        assert!(path.statistic.is_some(), "{path:?}");
        path_rejects += usize::from(path.rejects);
        let cell = d.pretrend_cell_wald.as_ref().expect("cell wald");
        assert!(!cell.reliable && cell.note.is_some(), "{cell:?}");
    }
    assert!(n_pre > 1500, "{n_pre} pre-treatment cells");
    eprintln!("size at α = 0.05: sup-t {sup_rejects}/{runs}, path {path_rejects}/{runs}");
    // A test that holds its size rejects 5% of runs; allow binomial noise (P(X > 2.3·E[X]) < 2% at 60 runs).
    let limit = (runs as f64 * 0.05 * 2.3).ceil() as usize;
    assert!(sup_rejects <= limit, "sup-t rejected {sup_rejects} of {runs}");
    assert!(path_rejects <= limit, "path Wald rejected {path_rejects} of {runs}");

    // Power: a cohort-specific drift (cohort g drifts by x·g/60 per checkpoint). The path test pools
    // cohorts and sees a small drift; the sup-t test looks at single cells and needs a larger one.
    let power = |trend: f64| {
        let (mut sup, mut path) = (0, 0);
        for seed in 0..10 {
            let mut cfg = SyntheticConfig::pythia_like(60, 20, 400, 64, 2000 + seed);
            cfg.trend_violation = trend;
            let p = run(&cfg, ProfileConfig::default().with_bootstrap(200).with_seed(seed));
            sup += usize::from(p.diagnostics.pretrend_sup_t.as_ref().expect("sup-t").rejects);
            path += usize::from(p.diagnostics.pretrend_path_wald.as_ref().expect("path").rejects);
        }
        (sup, path)
    };
    let (_, path_power) = power(0.3);
    assert!(path_power >= 9, "path Wald detected a 0.3 drift in {path_power} of 10");
    let (sup_power, _) = power(2.5);
    assert!(sup_power >= 9, "sup-t detected a 2.5 drift in {sup_power} of 10");
}

/// A level shift of the validation instances biases the difference estimator but not DiD, and the
/// baseline-balance check sees it.
#[test]
fn validation_shift_biases_difference_not_did() {
    let mut cfg = SyntheticConfig::pythia_like(8, 80, 300, 12, 5);
    cfg.validation_shift = 2.0;
    cfg.unit_sd = 1.0;
    let truth = cfg.true_effect(1, 1);
    let did = run(&cfg, analytic());
    let diff = run(&cfg, analytic().with_estimator(Estimator::Difference));
    let d = did.instantaneous.expect("did");
    let f = diff.instantaneous.expect("difference");
    assert!((d.estimate - truth).abs() < 4.0 * d.std_error, "DiD {} vs {truth}", d.estimate);
    assert!((f.estimate - (truth - 2.0)).abs() < 4.0 * f.std_error, "difference {} vs {}", f.estimate, truth - 2.0);
    let bal = diff.diagnostics.baseline_balance.as_ref().expect("balance");
    assert!((bal.difference + 2.0).abs() < 0.3 && bal.p_value < 1e-6, "{bal:?}");
    assert!(diff.diagnostics.warnings.iter().any(|w| w.contains("difference estimator is biased")));
}

/// Anticipation at e = −1 shows up in the anticipation check.
#[test]
fn anticipation_is_flagged() {
    let mut cfg = SyntheticConfig::pythia_like(10, 60, 300, 14, 8);
    cfg.anticipation = 1.0;
    let p = run(&cfg, analytic());
    let a = p.diagnostics.anticipation.as_ref().expect("anticipation");
    assert_eq!(a.event_time, -1);
    assert!(a.p_value < 1e-6 && (a.estimate - 1.0).abs() < 0.3, "{a:?}");
}

/// Identical results with 1 and 2 threads, and bootstrap SEs close to the analytic ones.
#[test]
fn deterministic_across_thread_counts() {
    let cfg = SyntheticConfig::pythia_like(12, 50, 200, 16, 4);
    let panel = cfg.generate().expect("panel");
    let settings = ProfileConfig::default().with_bootstrap(300).validate().expect("cfg");
    let with = |threads| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .expect("pool")
            .install(|| estimate(&panel, &settings, &NoProgress).expect("estimate"))
    };
    let (a, b) = (with(1), with(2));
    let bits = |p: &Profile| {
        p.cells
            .iter()
            .map(|c| (c.estimate.to_bits(), c.std_error.to_bits(), c.band_lower.to_bits()))
            .collect::<Vec<_>>()
    };
    assert_eq!(bits(&a), bits(&b));
    assert_eq!(a.critical_value.to_bits(), b.critical_value.to_bits());
    assert_eq!(format!("{:?}", a.diagnostics), format!("{:?}", b.diagnostics));
    let ratio: Vec<f64> = a.cells.iter().map(|c| c.std_error / c.analytic_se).collect();
    let mean = ratio.iter().sum::<f64>() / ratio.len() as f64;
    assert!((mean - 1.0).abs() < 0.05, "bootstrap/analytic se ratio {mean}");
}

#[test]
fn errors_are_clear() {
    let mut cfg = SyntheticConfig::pythia_like(3, 5, 0, 5, 1);
    cfg.n_validation = 0;
    let panel = cfg.generate().expect("panel");
    let err = estimate(&panel, &analytic().validate().expect("cfg"), &NoProgress).expect_err("no never-treated");
    assert!(matches!(err, DidError::NoNeverTreated), "{err}");
    assert!(err.to_string().contains("no never-trained") && !err.to_string().contains("--"), "{err}");
    // Not-yet-treated controls work without never-treated instances.
    let p = estimate(&panel, &analytic().with_control(ControlGroup::NotYet).validate().expect("cfg"), &NoProgress)
        .expect("not-yet");
    assert!(!p.cells.is_empty());
    let bad = ProfileConfig::default().with_alpha(0.7).validate().expect_err("alpha");
    assert!(matches!(bad, DidError::Config { field: "alpha", .. }) && !bad.to_string().contains("--"), "{bad}");
    let bad = ProfileConfig::default().with_bootstrap(10).validate().expect_err("draws");
    assert!(matches!(bad, DidError::Config { field: "bootstrap", .. }) && !bad.to_string().contains("--"), "{bad}");
}

/// The default uniform band holds its joint level where a small cohort carries most of a cell's variance
/// and its share varies from panel to panel (cohorts of 8 with noise SD 0.5 after treatment against 100
/// never-trained instances with SD 1), at the tail probability near 10⁻³ where a band over ~88 cells is
/// decided. With Welch–Satterthwaite degrees of freedom the band covered 1,779 of these 2,000 panels
/// (0.89); with the kurtosis-matched ones 1,890 (0.945; 0.9425 over 10,000 panels, still a little short
/// with cohorts this small). `MEMSTEER_BAND_SIMS` sets the number of panels.
#[test]
fn uniform_band_holds_its_level_with_small_heteroskedastic_cohorts() {
    let sims: u64 = std::env::var("MEMSTEER_BAND_SIMS").ok().and_then(|v| v.parse().ok()).unwrap_or(2000).max(100);
    let covered: u64 = (0..sims)
        .map(|seed| {
            let mut cfg = SyntheticConfig::pythia_like(8, 8, 100, 12, 7_000_000 + seed);
            cfg.cohort_noise_sd = Some(vec![0.5; 8]);
            let p = run(&cfg, ProfileConfig::default().with_bootstrap(199).with_seed(seed));
            u64::from(p.cells.iter().all(|c| {
                let truth = cfg.true_effect(c.cohort_index, c.checkpoint_index);
                c.band_lower <= truth && truth <= c.band_upper
            }))
        })
        .sum();
    let rate = covered as f64 / sims as f64;
    eprintln!("joint coverage of the uniform band: {covered}/{sims} = {rate:.4}");
    // The pointwise intervals' standard (within 0.02 of 0.95) less 2.6 binomial SEs: Welch's 0.89 fails
    // it by far, the default's 0.9425 passes with room at 2,000 panels or more. A band made wide by
    // over-conservative degrees of freedom (the smallest group's covered 0.965–0.977 in the calibration
    // designs) fails the upper check.
    let se = (0.95 * 0.05 / sims as f64).sqrt();
    assert!(rate >= 0.93 - 2.6 * se, "uniform band covered {covered} of {sims} panels ({rate:.4})");
    assert!(rate <= 0.96 + 2.6 * se, "uniform band covered {covered} of {sims} panels ({rate:.4}): too wide");
}
