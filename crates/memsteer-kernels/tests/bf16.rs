//! The bf16 products of every kernel level this CPU has, against an `f64` reference on the same
//! bf16-rounded operands; levels the CPU lacks are skipped and said so.

use memsteer_kernels::bf16::{PackedBf16, Source, from_bf16, to_bf16};
use memsteer_kernels::dispatch::ALL_LEVELS;
use memsteer_kernels::{CpuKernels, KernelError};
use memsteer_panel::rng::SplitMix64;

use super::{on_threads, randn};

/// `a · Wᵀ` in f64 from the bf16-rounded activations and the weights as packing should keep them
/// (`w[j][l]`, computed from the source without the packed layout), with the bound `Σ |a||w|`.
fn reference(a: &[f32], w: &dyn Fn(usize, usize) -> f32, (m, n, k): (usize, usize, usize)) -> (Vec<f64>, Vec<f64>) {
    let (mut out, mut mag) = (vec![0.0; m * n], vec![0.0; m * n]);
    for i in 0..m {
        for j in 0..n {
            for l in 0..k {
                let x = f64::from(from_bf16(to_bf16(a[i * k + l]))) * f64::from(w(j, l));
                out[i * n + j] += x;
                mag[i * n + j] += x.abs();
            }
        }
    }
    (out, mag)
}

/// The levels this CPU runs; prints the ones it skips (so a CI log says which kernels it exercised).
fn levels() -> Vec<CpuKernels> {
    let detected = CpuKernels::detected();
    let (run, skip): (Vec<_>, Vec<_>) = ALL_LEVELS.into_iter().partition(|l| *l <= detected);
    if !skip.is_empty() {
        eprintln!("bf16 kernels skipped (this CPU supports up to {detected}): {skip:?}");
    }
    eprintln!("bf16 kernels tested: {run:?}");
    run
}

fn check(m: usize, n: usize, k: usize, source: Source, exact: bool, seed: u64) {
    let mut rng = SplitMix64::new(seed);
    let a = randn(m * k, 1.0, &mut rng);
    let w = randn(n * k, 0.1, &mut rng);
    let p = PackedBf16::pack(&w, n, k, source, exact).unwrap();
    for j in [0, n / 2, n - 1] {
        for l in [0, k - 1] {
            let stored = match source {
                Source::OutputsMajor => w[j * k + l],
                Source::InputsMajor => w[l * n + j],
            };
            let want = if exact { stored } else { from_bf16(to_bf16(stored)) };
            // Exact packing keeps 16 significant bits, which f32 random values have more of.
            assert!((p.get(j, l) - want).abs() <= want.abs() * 2f32.powi(-15), "packed ({j}, {l})");
        }
    }
    // What packing keeps: the rounded value, or hi + lo with each half rounded.
    let kept = |j: usize, l: usize| {
        let x = match source {
            Source::OutputsMajor => w[j * k + l],
            Source::InputsMajor => w[l * n + j],
        };
        let hi = from_bf16(to_bf16(x));
        if exact { hi + from_bf16(to_bf16(x - hi)) } else { hi }
    };
    for j in 0..n {
        for l in 0..k {
            assert_eq!(p.get(j, l), kept(j, l), "packed ({j}, {l})");
        }
    }
    let (want, mag) = reference(&a, &kept, (m, n, k));
    for level in levels() {
        let mut out = vec![f32::NAN; m * n];
        p.matmul_transposed_with(level, &a, m, &mut out).unwrap();
        for (idx, ((&g, &r), &b)) in out.iter().zip(&want).zip(&mag).enumerate() {
            // f32 accumulation of exact bf16 products: k roundings of at most 2⁻²⁴ of the running sum.
            let tol = 1e-6 * b * (k as f64).sqrt().max(4.0) + 1e-30;
            assert!(
                (f64::from(g) - r).abs() <= tol,
                "{level} m={m} n={n} k={k} exact={exact}: entry {idx} = {g}, reference {r} (bound {tol})"
            );
        }
    }
}

#[test]
fn every_level_matches_the_reference_on_ragged_shapes() {
    let shapes = [(1, 1, 1), (1, 17, 3), (3, 31, 33), (33, 40, 64), (7, 100, 95), (40, 65, 130), (129, 48, 40)];
    for (s, &(m, n, k)) in shapes.iter().enumerate() {
        check(m, n, k, Source::OutputsMajor, false, s as u64);
        check(m, n, k, Source::InputsMajor, s % 2 == 0, 100 + s as u64);
    }
    // Many panel pairs with few rows (split by columns) and many rows (split by rows).
    check(5, 700, 64, Source::OutputsMajor, false, 7);
    check(300, 70, 96, Source::OutputsMajor, true, 8);
}

#[test]
fn results_are_bitwise_identical_across_threads_and_batch_splits() {
    let (m, n, k) = (150, 300, 200);
    let mut rng = SplitMix64::new(3);
    let a = randn(m * k, 1.0, &mut rng);
    let w = randn(n * k, 0.1, &mut rng);
    let p = PackedBf16::pack(&w, n, k, Source::OutputsMajor, false).unwrap();
    for level in levels() {
        let run = |threads: usize| {
            on_threads(threads, || {
                let mut out = vec![0.0f32; m * n];
                p.matmul_transposed_with(level, &a, m, &mut out).unwrap();
                out
            })
        };
        let one = run(1);
        assert_eq!(one, run(2), "{level}: 1 vs 2 threads");
        assert_eq!(one, run(3), "{level}: 1 vs 3 threads");
        // A row alone (a decoding step) equals the same row inside the batch.
        for i in [0, 77, 149] {
            let mut row = vec![0.0f32; n];
            p.matmul_transposed_with(level, &a[i * k..(i + 1) * k], 1, &mut row).unwrap();
            assert_eq!(row, one[i * n..(i + 1) * n], "{level}: row {i} alone");
        }
    }
}

#[test]
fn bad_shapes_are_errors() {
    let p = PackedBf16::pack(&[1.0; 6], 2, 3, Source::OutputsMajor, false).unwrap();
    let mut out = [0.0f32; 2];
    let e = p.matmul_transposed_with(CpuKernels::Portable, &[1.0; 4], 1, &mut out).unwrap_err();
    assert!(matches!(e, KernelError::Shape { what: "a", .. }), "{e}");
    let e = PackedBf16::pack(&[1.0; 5], 2, 3, Source::OutputsMajor, false).unwrap_err();
    assert!(e.to_string().contains("packed weight: expected 6 values, found 5"), "{e}");
    let e = PackedBf16::pack(&[], 0, 3, Source::OutputsMajor, false).unwrap_err();
    assert!(e.to_string().contains("a 0 × 3 matrix is empty"), "{e}");
}

#[test]
fn fused_bf16_log_probs_match_the_reference_on_rounded_operands() {
    let (tokens, dim, vocab) = (70, 48, 1100); // two vocabulary tiles and a ragged third
    let mut rng = SplitMix64::new(11);
    let hidden = randn(tokens * dim, 1.0, &mut rng);
    let emb = randn(vocab * dim, 0.3, &mut rng);
    let targets: Vec<u32> = (0..tokens).map(|_| rng.below(vocab as u64) as u32).collect();
    let round = |v: &[f32]| v.iter().map(|&x| from_bf16(to_bf16(x))).collect::<Vec<f32>>();
    let want = super::reference(&round(&hidden), &round(&emb), dim, &targets);
    let packed = PackedBf16::pack(&emb, vocab, dim, Source::OutputsMajor, false).unwrap();
    let mut out = vec![0.0f32; tokens];
    memsteer_kernels::log_prob_targets_bf16(&hidden, &packed, &targets, &mut out, None).unwrap();
    for (t, (&g, &w)) in out.iter().zip(&want).enumerate() {
        assert!((f64::from(g) - w).abs() < 1e-4, "token {t}: {g} vs {w}");
    }
    // Against the f32 path on unrounded operands the difference is the rounding's, and small.
    let mut f32_out = vec![0.0f32; tokens];
    memsteer_kernels::log_prob_targets(&memsteer_kernels::Device::Cpu, &hidden, &emb, dim, &targets, &mut f32_out)
        .unwrap();
    let worst = out.iter().zip(&f32_out).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
    assert!(worst > 0.0 && worst < 0.1, "bf16 vs f32: {worst}");
    let e = memsteer_kernels::log_prob_targets_bf16(&hidden, &packed, &[0, 5000], &mut out[..2], None).unwrap_err();
    assert!(matches!(e, KernelError::Shape { what: "hidden", .. }), "{e}");
    let e = memsteer_kernels::log_prob_targets_bf16(&hidden[..2 * dim], &packed, &[0, 5000], &mut out[..2], None)
        .unwrap_err();
    assert!(matches!(e, KernelError::Target { id: 5000, position: 1, vocab: 1100 }), "{e}");
}

/// `get` returns what was packed bit for bit, signed zeros included (an exact `hi + lo` pair of a −0 is
/// −0, not +0), and refuses positions outside the matrix.
#[test]
fn get_returns_packed_values_exactly() {
    let (n, k) = (37, 11);
    let w: Vec<f32> = (0..n * k)
        .map(|i| match i % 5 {
            0 => -0.0,
            1 => 0.0,
            // 11 significant bits: exactly an f16 value, which hi + lo keeps.
            2 => ((i * 37) % 2048) as f32 / 1024.0 - 1.0,
            3 => -(i as f32).sqrt(),
            _ => 1.0 / (i as f32 + 3.0),
        })
        .collect();
    for exact in [false, true] {
        let p = PackedBf16::pack(&w, n, k, Source::OutputsMajor, exact).expect("pack");
        for j in 0..n {
            for i in 0..k {
                let x = w[j * k + i];
                let got = p.get(j, i);
                if x == 0.0 || exact && (j * k + i) % 5 == 2 {
                    assert_eq!(got.to_bits(), x.to_bits(), "({j}, {i}) exact={exact}: {got} vs {x}");
                }
            }
        }
        let outside = std::panic::catch_unwind(|| p.get(n, 0));
        assert!(outside.is_err(), "row {n} of {n} must panic");
    }
}
