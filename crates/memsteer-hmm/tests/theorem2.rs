//! Theorem 2: the identity holds to rounding error on random Assumption-1 HMMs of several sizes, the
//! two distributions it connects really differ, and a semantic change leaves a clear residual for the
//! best linear W.

use memsteer_hmm::theorem2::{Assumption1Hmm, Theorem2Config, check_theorem2};
use proptest::prelude::*;

#[test]
fn identity_holds_to_rounding_and_the_control_does_not() {
    for (semantic, conditions, vocab, length) in [(2, 2, 3, 6), (3, 2, 4, 5), (4, 2, 5, 5), (6, 3, 6, 4), (8, 4, 3, 6)]
    {
        for seed in [1, 2, 3] {
            let cfg = Theorem2Config {
                seed,
                semantic_states: semantic,
                condition_states: conditions,
                vocab,
                length,
                samples: 5,
                sample_length: 300,
            };
            let r = check_theorem2(&cfg).expect("check");
            let at = format!("{semantic}+{conditions} states, {vocab} symbols, seed {seed}: {r:?}");
            assert!(r.assumption1_violation < 1e-12, "{at}");
            assert!(r.max_abs_error <= 1e-10, "{at}");
            assert!(r.max_rel_error <= 1e-9, "{at}");
            assert!(r.sampled_max_abs_log_error <= 1e-9, "{at}");
            // Steering is needed: the unsteered model is far from π'.
            assert!(r.unsteered_max_abs_error > 1e-4, "{at}");
            // The negative control leaves a gap many orders of magnitude above rounding.
            assert!(
                r.control_max_abs_error > 1e3 * r.max_abs_error.max(1e-15) && r.control_max_abs_error > 1e-5,
                "{at}"
            );
            assert!(r.control_max_rel_error > 1e-2, "{at}");
        }
    }
}

#[test]
fn theorem2_w_refuses_a_semantic_change() {
    let m = Assumption1Hmm::random(3, 2, 4, 5).expect("model");
    let mut a = m.representation_of(&[0.2, 0.1, 0.2, 0.3, 0.2]);
    let b = m.representation_of(&[0.1, 0.2, 0.2, 0.3, 0.2]);
    assert!(m.theorem2_w(&a, &b).expect_err("semantic change").to_string().contains("semantic dimension"));
    a[4] = 0.0;
    let c = a.clone();
    assert!(m.theorem2_w(&a, &c).expect_err("zero entry").to_string().contains("is zero"));
}

#[test]
fn one_condition_state_cannot_switch() {
    let cfg = Theorem2Config { condition_states: 1, ..Theorem2Config::default() };
    assert!(check_theorem2(&cfg).expect_err("one condition").to_string().contains("≥ 2 condition states"));
}

#[test]
fn enumeration_limit_is_an_error_not_a_hang() {
    let cfg = Theorem2Config { vocab: 50, length: 8, ..Theorem2Config::default() };
    assert!(check_theorem2(&cfg).expect_err("too many").to_string().contains("too many"));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 16, rng_seed: proptest::test_runner::RngSeed::Fixed(20261127), ..ProptestConfig::default() })]
    #[test]
    fn identity_holds_for_random_instances(seed in any::<u64>(), semantic in 1usize..6, conditions in 2usize..5, vocab in 2usize..5) {
        let cfg = Theorem2Config { seed, semantic_states: semantic, condition_states: conditions, vocab, length: 4, samples: 2, sample_length: 100 };
        let r = check_theorem2(&cfg).expect("check");
        prop_assert!(r.max_abs_error <= 1e-10 && r.sampled_max_abs_log_error <= 1e-9, "{:?}", r);
    }
}

#[test]
fn illustration_steered_equals_the_target_distribution() {
    let ill = memsteer_hmm::theorem2::illustrate(&Theorem2Config::default(), 6).expect("illustration");
    assert_eq!(ill.prefix.len(), 6);
    let gap = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max);
    assert!(gap(&ill.steered, &ill.under_pi2) < 1e-12);
    assert!(gap(&ill.under_pi, &ill.under_pi2) > 1e-3);
}

#[test]
fn learned_steers_approach_the_target_process_as_samples_grow() {
    let cfg = memsteer_hmm::theorem2::LearnConfig { sample_sizes: vec![10, 100, 1000], ..Default::default() };
    let curve = memsteer_hmm::theorem2::learn_steers(&cfg).expect("learn");
    // Measured (seed 1): TV 0.19 / 0.054 / 0.017, KL 1.5 / 0.17 / 1.3e-3 (unsteered TV 0.11).
    assert!(curve[0].kl_analytic < 1e-12);
    assert!(curve.windows(2).all(|w| w[1].tv < w[0].tv && w[1].kl < w[0].kl), "{curve:?}");
    let last = curve.last().expect("points");
    assert!(last.tv < 0.2 * last.tv_unsteered, "{last:?}");
}

#[test]
fn an_empty_exhaustive_check_is_refused() {
    let cfg = Theorem2Config { length: 0, ..Theorem2Config::default() };
    assert!(check_theorem2(&cfg).expect_err("length 0").to_string().contains("at least 1"));
}

#[test]
fn learned_steer_settings_are_validated() {
    let bad = memsteer_hmm::theorem2::LearnConfig { sample_sizes: vec![0, 5], ..Default::default() };
    let e = memsteer_hmm::theorem2::learn_steers(&bad).expect_err("zero samples").to_string();
    assert!(e.contains("at least 1 sequence") && e.contains("[0, 5]"), "{e}");
    let bad = memsteer_hmm::theorem2::LearnConfig { sample_sizes: vec![], ..Default::default() };
    assert!(memsteer_hmm::theorem2::learn_steers(&bad).is_err());
}
