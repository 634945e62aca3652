//! The packed f32 products of every kernel level this CPU has (portable below AVX-512, the 14 × 32
//! AVX-512 micro-kernel from it up) against an `f64` reference; levels the CPU lacks are skipped and
//! said so.

use memsteer_kernels::bf16::Source;
use memsteer_kernels::dispatch::ALL_LEVELS;
use memsteer_kernels::{CpuKernels, KernelError, PackedF32};
use memsteer_panel::rng::SplitMix64;

use super::{on_threads, randn};

/// The levels this CPU runs (those with different f32 kernels: portable and AVX-512).
fn levels() -> Vec<CpuKernels> {
    let detected = CpuKernels::detected();
    let run: Vec<_> = [CpuKernels::Portable, CpuKernels::Avx512].into_iter().filter(|l| *l <= detected).collect();
    let skip: Vec<_> = ALL_LEVELS.into_iter().filter(|l| *l > detected).collect();
    if !skip.is_empty() {
        eprintln!("f32 kernels skipped (this CPU supports up to {detected}): {skip:?}");
    }
    eprintln!("f32 kernels tested: {run:?}");
    run
}

fn check(m: usize, n: usize, k: usize, source: Source, seed: u64) {
    let mut rng = SplitMix64::new(seed);
    let a = randn(m * k, 1.0, &mut rng);
    let w = randn(n * k, 0.1, &mut rng);
    let p = PackedF32::pack(&w, n, k, source).unwrap();
    let at = |j: usize, l: usize| match source {
        Source::OutputsMajor => w[j * k + l],
        Source::InputsMajor => w[l * n + j],
    };
    let mut row = vec![f32::NAN; k];
    for j in 0..n {
        p.row_into(j, &mut row);
        for (l, r) in row.iter().enumerate() {
            assert_eq!(p.get(j, l), at(j, l), "packed ({j}, {l})");
            assert_eq!(r.to_bits(), at(j, l).to_bits(), "row {j}, input {l}");
        }
    }
    let (mut want, mut mag) = (vec![0.0f64; m * n], vec![0.0f64; m * n]);
    for i in 0..m {
        for j in 0..n {
            for l in 0..k {
                let x = f64::from(a[i * k + l]) * f64::from(at(j, l));
                want[i * n + j] += x;
                mag[i * n + j] += x.abs();
            }
        }
    }
    for level in levels() {
        let mut out = vec![f32::NAN; m * n];
        p.matmul_transposed_with(level, &a, m, &mut out).unwrap();
        for (idx, ((&g, &r), &b)) in out.iter().zip(&want).zip(&mag).enumerate() {
            // f32 accumulation: k roundings of at most 2⁻²⁴ of the running sum.
            let tol = 1e-6 * b * (k as f64).sqrt().max(4.0) + 1e-30;
            assert!((f64::from(g) - r).abs() <= tol, "{level} m={m} n={n} k={k}: entry {idx} = {g}, reference {r}");
        }
    }
}

#[test]
fn every_level_matches_the_reference_on_ragged_shapes() {
    // Rows around the 14-row panel and the 112-row task, outputs around the 32-wide panel, inputs
    // around the 768-input block (one block, and two or three added in turn).
    let shapes = [(1, 1, 1), (1, 17, 3), (13, 31, 33), (15, 33, 767), (14, 64, 768), (29, 40, 769), (113, 65, 1600)];
    for (s, &(m, n, k)) in shapes.iter().enumerate() {
        check(m, n, k, Source::OutputsMajor, s as u64);
        check(m, n, k, Source::InputsMajor, 100 + s as u64);
    }
    // Many panels with few rows (split by columns; three row panels, two input blocks) and many rows
    // (split by rows).
    check(5, 700, 64, Source::OutputsMajor, 7);
    check(40, 700, 900, Source::InputsMajor, 9);
    check(300, 70, 1000, Source::OutputsMajor, 8);
}

#[test]
fn results_are_bitwise_identical_across_threads_and_batch_splits() {
    // 1,400 rows: tasks of 672, 364 and 238 rows on 1, 2 and 3 threads.
    let (m, n, k) = (1400, 300, 1000);
    let mut rng = SplitMix64::new(3);
    let a = randn(m * k, 1.0, &mut rng);
    let w = randn(n * k, 0.1, &mut rng);
    let p = PackedF32::pack(&w, n, k, Source::OutputsMajor).unwrap();
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
        // A row alone (a decoding step, split by columns) equals the same row inside the batch.
        for i in [0, 77, 1399] {
            let mut row = vec![0.0f32; n];
            p.matmul_transposed_with(level, &a[i * k..(i + 1) * k], 1, &mut row).unwrap();
            assert_eq!(row, one[i * n..(i + 1) * n], "{level}: row {i} alone");
        }
    }
}

#[test]
fn bad_shapes_are_errors() {
    let p = PackedF32::pack(&[1.0; 6], 2, 3, Source::OutputsMajor).unwrap();
    let mut out = [0.0f32; 2];
    let e = p.matmul_transposed_with(CpuKernels::Portable, &[1.0; 4], 1, &mut out).unwrap_err();
    assert!(matches!(e, KernelError::Shape { what: "a", .. }), "{e}");
    let e = p.matmul_transposed_with(CpuKernels::Portable, &[1.0; 3], 1, &mut out[..1]).unwrap_err();
    assert!(matches!(e, KernelError::Shape { what: "out", .. }), "{e}");
    let e = PackedF32::pack(&[1.0; 5], 2, 3, Source::OutputsMajor).unwrap_err();
    assert!(e.to_string().contains("packed weight: expected 6 values, found 5"), "{e}");
    let e = PackedF32::pack(&[], 0, 3, Source::OutputsMajor).unwrap_err();
    assert!(e.to_string().contains("a 0 × 3 matrix is empty"), "{e}");
    if CpuKernels::detected() < CpuKernels::Amx {
        let e = p.matmul_transposed_with(CpuKernels::Amx, &[1.0; 3], 1, &mut out).unwrap_err();
        assert!(e.to_string().contains("not available on this CPU"), "{e}");
    }
}

#[test]
fn fused_f32_log_probs_match_the_reference_and_the_unpacked_path() {
    let (tokens, dim, vocab) = (70, 900, 1100); // two vocabulary tiles and a ragged third, two input blocks
    let mut rng = SplitMix64::new(11);
    let hidden = randn(tokens * dim, 1.0, &mut rng);
    let emb = randn(vocab * dim, 0.1, &mut rng);
    let targets: Vec<u32> = (0..tokens).map(|_| rng.below(vocab as u64) as u32).collect();
    let want = super::reference(&hidden, &emb, dim, &targets);
    let packed = PackedF32::pack(&emb, vocab, dim, Source::OutputsMajor).unwrap();
    let mut out = vec![0.0f32; tokens];
    memsteer_kernels::log_prob_targets_f32(&hidden, &packed, &targets, &mut out, None).unwrap();
    for (t, (&g, &w)) in out.iter().zip(&want).enumerate() {
        assert!((f64::from(g) - w).abs() < 1e-4, "token {t}: {g} vs {w}");
    }
    let mut plain = vec![0.0f32; tokens];
    memsteer_kernels::log_prob_targets(&memsteer_kernels::Device::Cpu, &hidden, &emb, dim, &targets, &mut plain)
        .unwrap();
    let worst = out.iter().zip(&plain).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
    assert!(worst < 1e-4, "packed vs unpacked: {worst}");
    let e = memsteer_kernels::log_prob_targets_f32(&hidden[..2 * dim], &packed, &[0, 5000], &mut out[..2], None)
        .unwrap_err();
    assert!(matches!(e, KernelError::Target { id: 5000, position: 1, vocab: 1100 }), "{e}");
}
