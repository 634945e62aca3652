use memsteer_lm::sample::{SamplingConfig, distribution, sample, sample_excluding};
use memsteer_lm::{KvCache, Model};

fn lm(name: &str) -> Model {
    Model::load(&super::fixture(name)).expect("load")
}

/// Feeding a sequence token by token through the KV cache gives the full forward pass's logits.
#[test]
fn incremental_decoding_equals_the_full_forward_pass() {
    for name in ["tiny-gpt2-f32", "tiny-gpt2-f16-prefixed", "tiny-neox-pythia-f16", "tiny-neox-sequential-f32"] {
        let m = lm(name);
        let seq: Vec<u32> = (0..15).map(|i| (i * 7 + 3) % 40).collect();
        let full = m.last_logits(&seq).expect("full");
        let mut cache = KvCache::new();
        let mut logits = m.next_logits(&seq[..6], &mut cache).expect("prefill");
        for &t in &seq[6..] {
            logits = m.next_logits(&[t], &mut cache).expect("step");
        }
        assert_eq!(cache.len(), seq.len());
        let worst = full.iter().zip(&logits).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        assert!(worst < 1e-4, "{name}: max |Δ logit| {worst}");
        // The cache respects the context length.
        let e = m.next_logits(&[1; 20], &mut cache).expect_err("context").to_string();
        assert!(e.contains("exceed the context"), "{e}");
    }
}

/// Excluded tokens are never drawn, whatever their logits and whatever `u`; the others keep their
/// relative odds; nothing excluded is plain `sample`; a non-finite logit elsewhere is still refused.
#[test]
fn excluded_tokens_are_never_drawn() {
    let logits = [1.0f32, 9.0, 2.0, 0.5, f32::NAN];
    let hot = SamplingConfig { temperature: 1.5, ..SamplingConfig::default() };
    let greedy = SamplingConfig { temperature: 0.0, ..SamplingConfig::default() };
    let excluded = [1u32, 4];
    let mut counts = [0usize; 5];
    for i in 0..1000 {
        let u = (f64::from(i) + 0.5) / 1000.0;
        counts[sample_excluding(&logits, &hot, u, &excluded).expect("draw")] += 1;
    }
    assert_eq!((counts[1], counts[4]), (0, 0), "{counts:?}");
    assert!(counts[2] > counts[0] && counts[0] > counts[3] && counts[3] > 0, "{counts:?}");
    assert_eq!(sample_excluding(&logits, &greedy, 0.5, &excluded), Ok(2));
    assert_eq!(sample_excluding(&logits, &hot, 1.0, &excluded).map(|t| t != 1 && t != 4), Ok(true));
    let finite = [1.0f32, 3.0, 2.0];
    for u in [0.0, 0.3, 0.7, 0.999] {
        assert_eq!(sample_excluding(&finite, &hot, u, &[]), sample(&finite, &hot, u));
    }
    assert!(sample_excluding(&logits, &hot, 0.5, &[1]).is_err(), "the NaN at 4 is not excluded");
    assert!(sample_excluding(&finite, &hot, 0.5, &[0, 1, 2]).is_err(), "nothing left to draw");
}

#[test]
fn sampling_rules() {
    let logits = [1.0f32, 3.0, 2.0, 0.5];
    let greedy = SamplingConfig { temperature: 0.0, ..SamplingConfig::default() };
    assert_eq!(sample(&logits, &greedy, 0.99), Ok(1));
    let top1 = SamplingConfig { top_k: Some(1), ..SamplingConfig::default() };
    assert_eq!(sample(&logits, &top1, 0.99), Ok(1));
    let d = distribution(&logits, &SamplingConfig::default());
    let z: f64 = logits.iter().map(|&x| f64::from(x).exp()).sum();
    for (tok, p) in &d {
        assert!((p - f64::from(logits[*tok]).exp() / z).abs() < 1e-12);
    }
    // Nucleus: the two most likely tokens hold ≈ 0.89 of the mass, so top-p 0.8 keeps two.
    let nucleus = distribution(&logits, &SamplingConfig { top_p: Some(0.8), ..SamplingConfig::default() });
    assert_eq!(nucleus.iter().map(|p| p.0).collect::<Vec<_>>(), vec![1, 2]);
    // Temperature sharpens.
    let cold = distribution(&logits, &SamplingConfig { temperature: 0.25, ..SamplingConfig::default() });
    assert!(cold[0].1 > d[0].1);
    // Draws follow the distribution (inverse CDF over a uniform grid).
    let n = 10_000;
    let mut counts = [0usize; 4];
    for i in 0..n {
        counts[sample(&logits, &SamplingConfig::default(), (i as f64 + 0.5) / n as f64).expect("finite")] += 1;
    }
    for (tok, p) in &d {
        assert!((counts[*tok] as f64 / n as f64 - p).abs() < 1e-3);
    }
}

/// A NaN or an infinite logit is refused whatever the settings, naming the token (it used to fix the
/// draw to the last sorted token without a word).
#[test]
fn sampling_refuses_non_finite_logits() {
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let logits = [1.0f32, 3.0, bad, 0.5];
        for cfg in [
            SamplingConfig::default(),
            SamplingConfig { temperature: 0.0, ..SamplingConfig::default() },
            SamplingConfig { top_k: Some(2), top_p: Some(0.9), ..SamplingConfig::default() },
        ] {
            for u in [0.0, 0.5, 0.999] {
                let e = sample(&logits, &cfg, u).expect_err("non-finite logit");
                assert_eq!(e.token, 2);
                assert!(e.to_string().contains("token 2"), "{e}");
            }
        }
    }
}

#[test]
fn seeded_generation_is_reproducible() {
    let m = lm("tiny-neox-pythia-f16");
    let run = |seed: u64| {
        let mut state = seed;
        let mut uniform = || {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (state >> 11) as f64 / (1u64 << 53) as f64
        };
        m.generate(&[1, 2, 3], 10, &SamplingConfig { top_p: Some(0.9), ..SamplingConfig::default() }, &mut uniform)
            .expect("generate")
    };
    assert_eq!(run(7), run(7));
    assert_eq!(run(7).len(), 10);
    assert_ne!(run(7), run(8));
    assert!(m.generate(&[], 3, &SamplingConfig::default(), &mut || 0.5).is_err());
}
