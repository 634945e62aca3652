//! The HMM core against closed forms: Eq. 4 equals the scaled forward algorithm, probabilities of all
//! sequences of a length sum to one, next-token distributions are ratios of sequence probabilities,
//! sampling matches the model, bad parameters give clear errors.

use memsteer_hmm::hmm::all_sequences;
use memsteer_hmm::{Hmm, HmmError};
use memsteer_panel::rng::SplitMix64;

fn model() -> Hmm {
    Hmm::new(
        vec![0.6, 0.3, 0.1],
        vec![0.7, 0.2, 0.1, 0.1, 0.8, 0.1, 0.25, 0.25, 0.5],
        vec![0.5, 0.4, 0.1, 0.1, 0.3, 0.6, 0.3, 0.3, 0.4],
    )
    .expect("valid")
}

#[test]
fn two_step_probability_by_hand() {
    // P(o1=0, o2=2) = Σ_s Σ_s' π_s p(0|s) T(s,s') p(2|s')
    let h = model();
    let (pi, t, e) = (
        [0.6, 0.3, 0.1],
        [[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.25, 0.25, 0.5]],
        [[0.5, 0.4, 0.1], [0.1, 0.3, 0.6], [0.3, 0.3, 0.4]],
    );
    let mut want = 0.0;
    for s in 0..3 {
        for s2 in 0..3 {
            want += pi[s] * e[s][0] * t[s][s2] * e[s2][2];
        }
    }
    assert!((h.prob_matrix_form(&[0, 2]).expect("p") - want).abs() < 1e-15);
    assert!((h.log_prob(&[0, 2]).expect("lp") - want.ln()).abs() < 1e-13);
}

#[test]
fn matrix_form_equals_scaled_forward_and_sums_to_one() {
    let h = model();
    for len in 1..=6 {
        let mut total = 0.0;
        for seq in all_sequences(3, len) {
            let p = h.prob_matrix_form(&seq).expect("p");
            assert!((p.ln() - h.log_prob(&seq).expect("lp")).abs() < 1e-12, "{seq:?}");
            total += p;
        }
        assert!((total - 1.0).abs() < 1e-12, "length {len}: {total}");
    }
}

#[test]
fn next_token_is_a_ratio_of_sequence_probabilities() {
    let h = model();
    let prefix = [2, 0, 1, 1];
    let next = h.next_token(&prefix).expect("next");
    let base = h.prob_matrix_form(&prefix).expect("p");
    for (v, q) in next.iter().enumerate() {
        let mut ext = prefix.to_vec();
        ext.push(v);
        assert!((q - h.prob_matrix_form(&ext).expect("p") / base).abs() < 1e-13);
    }
}

#[test]
fn long_sequences_do_not_underflow() {
    let h = model();
    let seq = h.sample(5000, &mut SplitMix64::new(1));
    let lp = h.log_prob(&seq).expect("lp");
    assert!(lp.is_finite() && lp < -1000.0, "{lp}");
    assert_eq!(h.prob_matrix_form(&seq).expect("p"), 0.0); // the unscaled form underflows, as expected
}

#[test]
fn sampling_matches_the_first_symbol_distribution() {
    let h = model();
    let mut rng = SplitMix64::new(9);
    let n = 40_000;
    let mut counts = [0usize; 3];
    for _ in 0..n {
        counts[h.sample(1, &mut rng)[0]] += 1;
    }
    let want = h.next_token(&[]).expect("p");
    for v in 0..3 {
        let f = counts[v] as f64 / n as f64;
        assert!((f - want[v]).abs() < 4.0 * (want[v] * (1.0 - want[v]) / n as f64).sqrt(), "{v}: {f} vs {}", want[v]);
    }
    // Seeded: the same seed gives the same sequence.
    assert_eq!(h.sample(50, &mut SplitMix64::new(3)), h.sample(50, &mut SplitMix64::new(3)));
}

#[test]
fn invalid_parameters_are_rejected_with_clear_errors() {
    let t = vec![0.5, 0.5, 0.5, 0.5];
    let e = vec![1.0, 0.0, 0.0, 1.0];
    let msg = |r: Result<Hmm, HmmError>| r.expect_err("invalid").to_string();
    assert!(msg(Hmm::new(vec![0.5, 0.6], t.clone(), e.clone())).contains("initial distribution, row 0: sums to 1.1"));
    assert!(
        msg(Hmm::new(vec![0.5, 0.5], vec![0.5, 0.5, 0.9, 0.1, 0.0], e.clone()))
            .contains("transition matrix: expected 4 values, found 5")
    );
    assert!(
        msg(Hmm::new(vec![0.5, 0.5], vec![1.5, -0.5, 0.5, 0.5], e.clone())).contains("transition matrix[1] = -0.5")
    );
    assert!(
        msg(Hmm::new(vec![0.5, 0.5], t.clone(), vec![f64::NAN, 1.0, 0.0, 1.0])).contains("emission matrix[0] = NaN")
    );
    assert!(msg(Hmm::new(vec![0.5, 0.5], vec![0.5, 0.4, 0.5, 0.5], e.clone())).contains("transition matrix, row 0"));
    let h = Hmm::new(vec![0.5, 0.5], t, e).expect("valid");
    assert!(h.log_prob(&[0, 2]).expect_err("vocab").to_string().contains("observation 2 at position 1"));
}
