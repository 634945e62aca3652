//! Kernels against straightforward `f64` references.

use memsteer_kernels::{Device, KernelError, Steers, log_prob_targets, steered_projection};
use memsteer_panel::rng::SplitMix64;
use proptest::prelude::*;

fn randn(n: usize, scale: f64, rng: &mut SplitMix64) -> Vec<f32> {
    (0..n).map(|_| (scale * rng.normal()) as f32).collect()
}

/// `log softmax(h Eᵀ)[t]` in f64, materialising every logit.
fn reference(hidden: &[f32], emb: &[f32], dim: usize, targets: &[u32]) -> Vec<f64> {
    let vocab = emb.len() / dim;
    targets
        .iter()
        .enumerate()
        .map(|(i, &t)| {
            let h = &hidden[i * dim..(i + 1) * dim];
            let logits: Vec<f64> =
                (0..vocab).map(|v| (0..dim).map(|k| f64::from(h[k]) * f64::from(emb[v * dim + k])).sum()).collect();
            let m = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let lse = m + logits.iter().map(|x| (x - m).exp()).sum::<f64>().ln();
            logits[t as usize] - lse
        })
        .collect()
}

fn check(tokens: usize, dim: usize, vocab: usize, scale: f64, seed: u64) {
    let mut rng = SplitMix64::new(seed);
    let hidden = randn(tokens * dim, scale, &mut rng);
    let emb = randn(vocab * dim, 1.0, &mut rng);
    let targets: Vec<u32> = (0..tokens).map(|_| rng.below(vocab as u64) as u32).collect();
    let mut out = vec![0.0f32; tokens];
    log_prob_targets(&Device::Cpu, &hidden, &emb, dim, &targets, &mut out).expect("kernel");
    let want = reference(&hidden, &emb, dim, &targets);
    for (i, (got, want)) in out.iter().zip(&want).enumerate() {
        // f32 accumulation over `dim` products: relative 1e-5 of the logit scale.
        let tol = 1e-5 * (1.0 + want.abs()) * (dim as f64).sqrt() * scale.max(1.0);
        assert!(
            (f64::from(*got) - want).abs() <= tol,
            "token {i}: {got} vs {want} ({tokens}×{dim}, V={vocab}, scale {scale})"
        );
    }
}

#[test]
fn matches_the_materialised_reference_across_tile_and_block_edges() {
    for (tokens, dim, vocab) in
        [(1, 1, 2), (3, 8, 5), (64, 16, 512), (65, 16, 513), (130, 32, 1500), (7, 64, 50257 / 10)]
    {
        check(tokens, dim, vocab, 1.0, tokens as u64 * 31 + vocab as u64);
    }
}

#[test]
fn large_logits_do_not_overflow() {
    // Logits in the hundreds: exp would overflow f32 without the running maximum.
    check(20, 16, 700, 40.0, 5);
}

#[test]
fn errors_name_the_buffer_and_the_expectation() {
    let mut out = [0.0f32; 2];
    let e = log_prob_targets(&Device::Cpu, &[0.0; 4], &[0.0; 6], 2, &[0, 3], &mut out).expect_err("target");
    assert!(matches!(e, KernelError::Target { position: 1, id: 3, vocab: 3 }), "{e}");
    let e = log_prob_targets(&Device::Cpu, &[0.0; 3], &[0.0; 6], 2, &[0, 1], &mut out).expect_err("shape");
    assert_eq!(e.to_string(), "hidden: expected 4 values, found 3");
    let e = log_prob_targets(&Device::Cpu, &[0.0; 4], &[0.0; 5], 2, &[0, 1], &mut out).expect_err("embedding");
    assert!(e.to_string().contains("multiple of dim = 2"), "{e}");
    #[cfg(not(feature = "cuda"))]
    assert!(Device::cuda(0).expect_err("no cuda").to_string().contains("--features cuda"));
}

#[test]
fn steered_projection_equals_the_dense_steer() {
    let (tokens, d, r, s) = (9, 12, 3, 2);
    let mut rng = SplitMix64::new(4);
    let hidden = randn(tokens * d, 1.0, &mut rng);
    let p1 = randn(s * d * r, 0.5, &mut rng);
    let p2 = randn(s * d * r, 0.5, &mut rng);
    let strengths = [1.0f32, -2.0];
    let eps = 0.3f32;
    let steers = Steers { p1: &p1, p2: &p2, steers: s, dim: d, rank: r };
    let mut out = vec![0.0f32; tokens * d];
    steered_projection(&Device::Cpu, &hidden, &steers, &strengths, eps, &mut out).expect("kernel");
    // Dense W = Σ_i s_i P1_i P2_iᵀ (d × d); c' = c + ε c W.
    let mut w = vec![0.0f64; d * d];
    for i in 0..s {
        for a in 0..d {
            for b in 0..d {
                let dot: f64 =
                    (0..r).map(|k| f64::from(p1[i * d * r + a * r + k]) * f64::from(p2[i * d * r + b * r + k])).sum();
                w[a * d + b] += f64::from(strengths[i]) * dot;
            }
        }
    }
    for t in 0..tokens {
        for b in 0..d {
            let cw: f64 = (0..d).map(|a| f64::from(hidden[t * d + a]) * w[a * d + b]).sum();
            let want = f64::from(hidden[t * d + b]) + f64::from(eps) * cw;
            assert!((f64::from(out[t * d + b]) - want).abs() < 1e-5, "({t}, {b})");
        }
    }
    // ε = 0 is the identity.
    steered_projection(&Device::Cpu, &hidden, &steers, &strengths, 0.0, &mut out).expect("kernel");
    assert_eq!(out, hidden);
    let e = steered_projection(&Device::Cpu, &hidden, &steers, &[1.0], eps, &mut out).expect_err("strengths");
    assert_eq!(e.to_string(), "strengths: expected 2 values, found 1");
}

#[test]
fn matmul_matches_the_triple_loop() {
    let mut rng = SplitMix64::new(8);
    let (m, k, n) = (5, 7, 3);
    let a = randn(m * k, 1.0, &mut rng);
    let b = randn(k * n, 1.0, &mut rng);
    let mut c = vec![0.0f32; m * n];
    memsteer_kernels::matmul(&Device::Cpu, &a, &b, m, k, n, &mut c).expect("matmul");
    for i in 0..m {
        for j in 0..n {
            let want: f32 = (0..k).map(|l| a[i * k + l] * b[l * n + j]).sum();
            assert!((c[i * n + j] - want).abs() < 1e-5);
        }
    }
    assert!(memsteer_kernels::matmul(&Device::Cpu, &a, &b, m, k + 1, n, &mut c).is_err());
    // The transposed form on bᵀ stored n×k gives the same product.
    let mut bt = vec![0.0f32; n * k];
    for l in 0..k {
        for j in 0..n {
            bt[j * k + l] = b[l * n + j];
        }
    }
    let mut c2 = vec![0.0f32; m * n];
    memsteer_kernels::matmul_transposed(&Device::Cpu, &a, &bt, m, k, n, &mut c2).expect("matmul_transposed");
    assert!(c.iter().zip(&c2).all(|(x, y)| (x - y).abs() < 1e-5));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, rng_seed: proptest::test_runner::RngSeed::Fixed(20261127), ..ProptestConfig::default() })]

    /// For one hidden state, the probabilities of all targets sum to one and each log-probability ≤ 0.
    #[test]
    fn probabilities_over_the_vocabulary_sum_to_one(seed in any::<u64>(), dim in 1usize..24, vocab in 2usize..1200, scale in 0.1f64..8.0) {
        let mut rng = SplitMix64::new(seed);
        let h = randn(dim, scale, &mut rng);
        let emb = randn(vocab * dim, 1.0, &mut rng);
        let hidden: Vec<f32> = (0..vocab).flat_map(|_| h.iter().copied()).collect();
        let targets: Vec<u32> = (0..vocab as u32).collect();
        let mut out = vec![0.0f32; vocab];
        log_prob_targets(&Device::Cpu, &hidden, &emb, dim, &targets, &mut out).expect("kernel");
        prop_assert!(out.iter().all(|&x| x <= 1e-6));
        let total: f64 = out.iter().map(|&x| f64::from(x).exp()).sum();
        prop_assert!((total - 1.0).abs() < 1e-4, "sum {}", total);
    }
}

/// Runs `f` on a private rayon pool of `threads` threads.
fn on_threads<T: Send>(threads: usize, f: impl FnOnce() -> T + Send) -> T {
    rayon::ThreadPoolBuilder::new().num_threads(threads).build().expect("pool").install(f)
}

#[test]
fn results_are_bitwise_identical_across_thread_counts() {
    let mut rng = SplitMix64::new(21);
    let (m, k, n) = (300, 70, 650);
    let a = randn(m * k, 1.0, &mut rng);
    let b = randn(n * k, 1.0, &mut rng);
    let targets: Vec<u32> = (0..m).map(|_| rng.below(n as u64) as u32).collect();
    let run = |threads| {
        on_threads(threads, || {
            let mut c = vec![0.0f32; m * n];
            memsteer_kernels::matmul_transposed(&Device::Cpu, &a, &b, m, k, n, &mut c).expect("matmul");
            // A short, wide product takes the column split.
            let mut row = vec![0.0f32; 3 * n];
            memsteer_kernels::matmul_transposed(&Device::Cpu, &a[..3 * k], &b, 3, k, n, &mut row).expect("row");
            let mut lp = vec![0.0f32; m];
            log_prob_targets(&Device::Cpu, &a, &b, k, &targets, &mut lp).expect("log-probs");
            (c, row, lp)
        })
    };
    let one = run(1);
    for threads in [2, 3, 8] {
        let many = run(threads);
        assert!(one.0.iter().zip(&many.0).all(|(x, y)| x.to_bits() == y.to_bits()), "matmul, {threads} threads");
        assert!(one.1.iter().zip(&many.1).all(|(x, y)| x.to_bits() == y.to_bits()), "columns, {threads} threads");
        assert!(one.2.iter().zip(&many.2).all(|(x, y)| x.to_bits() == y.to_bits()), "log-probs, {threads} threads");
    }
    // The split products equal the first rows of the full one.
    assert_eq!(&one.0[..3 * n], &one.1[..]);
}

#[test]
fn overflowing_dimensions_are_errors_not_panics() {
    use memsteer_kernels::{MatMut, MatRef, matmul, matmul_strided};
    let mut out = [0.0f32; 4];
    let e = matmul(&Device::Cpu, &[0.0; 4], &[0.0; 4], usize::MAX / 2, 3, 2, &mut out).expect_err("overflow");
    assert!(matches!(e, KernelError::Overflow { what: "a", .. }), "{e}");
    assert!(e.to_string().contains("overflows"), "{e}");
    let e = memsteer_kernels::matmul_transposed(&Device::Cpu, &[0.0; 4], &[0.0; 4], 2, 2, usize::MAX, &mut out)
        .expect_err("overflow");
    assert!(matches!(e, KernelError::Overflow { .. }), "{e}");
    let e =
        log_prob_targets(&Device::Cpu, &[0.0; 4], &[0.0; 4], usize::MAX, &[0, 0], &mut out[..2]).expect_err("overflow");
    assert!(matches!(e, KernelError::Overflow { .. }), "{e}");
    // Strided views: a stride that walks past the address space, and one past the slice.
    let a = [1.0f32; 4];
    let e = matmul_strided(
        &Device::Cpu,
        (2, 2, 2),
        MatRef { data: &a, rs: usize::MAX, cs: 1 },
        MatRef::row_major(&a, 2),
        0.0,
        MatMut::row_major(&mut out, 2),
    )
    .expect_err("overflow");
    assert!(matches!(e, KernelError::Overflow { .. }), "{e}");
    let e = matmul_strided(
        &Device::Cpu,
        (2, 2, 2),
        MatRef { data: &a, rs: 3, cs: 1 },
        MatRef::row_major(&a, 2),
        0.0,
        MatMut::row_major(&mut out, 2),
    )
    .expect_err("out of bounds");
    assert_eq!(e.to_string(), "a: expected at least 5 values, found 4");
}

#[test]
fn output_views_whose_elements_alias_are_refused() {
    use memsteer_kernels::{MatMut, MatRef, matmul_strided};
    let a = [1.0f32; 4];
    let mut out = [0.0f32; 4];
    for (rs, cs) in [(0, 1), (1, 1), (1, 0)] {
        let e = matmul_strided(
            &Device::Cpu,
            (2, 2, 2),
            MatRef::row_major(&a, 2),
            MatRef::row_major(&a, 2),
            0.0,
            MatMut { data: &mut out, rs, cs },
        )
        .expect_err("aliasing");
        assert!(e.to_string().contains("its own place"), "({rs}, {cs}): {e}");
    }
    // Column-major output is fine.
    matmul_strided(
        &Device::Cpu,
        (2, 2, 2),
        MatRef::row_major(&a, 2),
        MatRef::row_major(&a, 2),
        0.0,
        MatMut { data: &mut out, rs: 1, cs: 2 },
    )
    .expect("column-major");
    assert_eq!(out, [2.0; 4]);
}

#[test]
fn strided_matmul_reads_transposed_and_offset_views() {
    use memsteer_kernels::{MatMut, MatRef, matmul_strided};
    let mut rng = SplitMix64::new(3);
    // Q and K of one head inside a fused [t, 3·d] buffer: scores = Q Kᵀ, accumulated with β = 1.
    let (t, d, hd, off) = (5, 12, 4, 4);
    let qkv = randn(t * 3 * d, 1.0, &mut rng);
    let mut s = vec![1.0f32; t * t];
    let q = MatRef { data: &qkv[off..], rs: 3 * d, cs: 1 };
    let k = MatRef { data: &qkv[d + off..], rs: 3 * d, cs: 1 };
    matmul_strided(&Device::Cpu, (t, hd, t), q, k.t(), 1.0, MatMut::row_major(&mut s, t)).expect("gemm");
    for i in 0..t {
        for j in 0..t {
            let want: f32 = 1.0 + (0..hd).map(|l| qkv[i * 3 * d + off + l] * qkv[j * 3 * d + d + off + l]).sum::<f32>();
            assert!((s[i * t + j] - want).abs() < 1e-5);
        }
    }
}

/// A single row (the decode path, split across threads) gives bitwise what the same row gives in a batch,
/// on any number of threads; rank and dimension not multiples of the chunk or lane sizes.
#[test]
fn steered_projection_single_row_matches_the_batch_bitwise() {
    let (tokens, d, r, s) = (5, 131, 77, 2);
    let mut rng = SplitMix64::new(31);
    let hidden = randn(tokens * d, 1.0, &mut rng);
    let p1 = randn(s * d * r, 0.5, &mut rng);
    let p2 = randn(s * d * r, 0.5, &mut rng);
    let strengths = [0.7f32, 1.0];
    let steers = Steers { p1: &p1, p2: &p2, steers: s, dim: d, rank: r };
    let mut batch = vec![0.0f32; tokens * d];
    steered_projection(&Device::Cpu, &hidden, &steers, &strengths, 1e-3, &mut batch).expect("kernel");
    for threads in [1, 2, 3, 8] {
        for t in 0..tokens {
            let row = &hidden[t * d..(t + 1) * d];
            let mut out = vec![0.0f32; d];
            on_threads(threads, || steered_projection(&Device::Cpu, row, &steers, &strengths, 1e-3, &mut out))
                .expect("kernel");
            assert_eq!(out, &batch[t * d..(t + 1) * d], "row {t}, {threads} threads");
        }
    }
}

#[test]
fn log_sum_exp_rows_match_f64_and_compose_to_log_probs() {
    let mut rng = SplitMix64::new(12);
    let (rows, dim, vocab) = (5, 7, 1030);
    let h = randn(rows * dim, 1.0, &mut rng);
    let e = randn(vocab * dim, 1.0, &mut rng);
    let targets: Vec<u32> = (0..rows).map(|_| rng.below(vocab as u64) as u32).collect();
    let (lse, tl) = memsteer_kernels::log_sum_exp_rows(&Device::Cpu, &h, &e, dim, &targets).expect("lse");
    let mut lp = vec![0.0f32; rows];
    log_prob_targets(&Device::Cpu, &h, &e, dim, &targets, &mut lp).expect("lp");
    for r in 0..rows {
        let logits: Vec<f64> =
            (0..vocab).map(|v| (0..dim).map(|k| f64::from(h[r * dim + k]) * f64::from(e[v * dim + k])).sum()).collect();
        let m = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let want = m + logits.iter().map(|x| (x - m).exp()).sum::<f64>().ln();
        assert!((f64::from(lse[r]) - want).abs() < 1e-4 * (1.0 + want.abs()), "row {r}");
        assert!((f64::from(tl[r]) - logits[targets[r] as usize]).abs() < 1e-4);
        assert_eq!(lp[r].to_bits(), (tl[r] - lse[r]).to_bits(), "log_prob_targets is target − lse");
    }
    let e2 = memsteer_kernels::log_sum_exp_rows(&Device::Cpu, &h, &e, dim, &[0, 1, 2, 3, 5000]).expect_err("id");
    assert!(matches!(e2, KernelError::Target { position: 4, id: 5000, .. }), "{e2}");
}

#[test]
fn resident_matrix_on_the_cpu_is_matmul_transposed_and_checks_shapes() {
    let mut rng = SplitMix64::new(33);
    let (m, k, n) = (5, 7, 11);
    let (a, b) = (randn(m * k, 1.0, &mut rng), randn(n * k, 1.0, &mut rng));
    let (mut want, mut got) = (vec![0.0f32; m * n], vec![0.0f32; m * n]);
    memsteer_kernels::matmul_transposed(&Device::Cpu, &a, &b, m, k, n, &mut want).unwrap();
    let r = memsteer_kernels::ResidentMatrix::new(&Device::Cpu, &b, n, k).unwrap();
    r.matmul_transposed(&a, m, &mut got).unwrap();
    assert_eq!(got, want);
    assert!(want.iter().any(|x| *x != 0.0));
    assert!(memsteer_kernels::ResidentMatrix::new(&Device::Cpu, &b, n + 1, k).is_err());
    assert!(r.matmul_transposed(&a[1..], m, &mut got).is_err());
}

/// The CUDA backend: every kernel compiles with NVRTC wherever NVRTC loads (CI installs it from the
/// `nvidia-cuda-nvrtc` wheel and sets `MEMSTEER_REQUIRE_NVRTC=1` so the check cannot skip there), and
/// the device results equal the CPU's wherever a GPU is present.
#[cfg(feature = "cuda")]
mod cuda {
    use super::*;
    use memsteer_kernels::cuda;

    fn gpu() -> Option<Device> {
        match Device::cuda(0) {
            Ok(d) => Some(d),
            Err(e) => {
                assert!(std::env::var_os("MEMSTEER_REQUIRE_GPU").is_none(), "MEMSTEER_REQUIRE_GPU is set: {e}");
                eprintln!("skipped: no usable GPU ({e})");
                None
            }
        }
    }

    #[test]
    fn every_kernel_compiles_with_nvrtc() {
        if !cuda::nvrtc_present() {
            assert!(
                std::env::var_os("MEMSTEER_REQUIRE_NVRTC").is_none(),
                "MEMSTEER_REQUIRE_NVRTC is set but libnvrtc.so.13 does not load (LD_LIBRARY_PATH?)"
            );
            eprintln!("skipped: NVRTC (libnvrtc.so.13) is not on the library path");
            return;
        }
        // compute_75 too: the tensor-core kernels are compiled out below sm_80, the rest must build.
        for arch in ["compute_75", "compute_80", "compute_90"] {
            let ptx = cuda::compile(arch).unwrap_or_else(|e| panic!("{arch}: {e}"));
            for k in cuda::KERNELS {
                assert!(ptx.contains(&format!(".entry {k}(")), "{arch}: {k}");
            }
        }
    }

    /// Every entry point of the source is in `cuda::KERNELS` (the launcher looks kernels up there; a
    /// missing one is an error at its first launch, which only a GPU run would reach).
    #[test]
    fn every_kernel_of_the_source_is_listed() {
        let entries: Vec<&str> = cuda::SOURCE
            .split("extern \"C\" __global__ void ")
            .skip(1)
            .map(|rest| {
                let rest = rest.trim_start_matches("__launch_bounds__");
                let rest = rest.find(')').filter(|_| rest.starts_with('(')).map_or(rest, |i| &rest[i + 1..]);
                rest.trim_start().split('(').next().unwrap_or("").trim()
            })
            .collect();
        assert!(entries.len() >= 20, "{entries:?}");
        for e in &entries {
            assert!(cuda::KERNELS.contains(e), "`{e}` is in kernels.cu but not in cuda::KERNELS");
        }
        assert_eq!(entries.len(), cuda::KERNELS.len(), "{entries:?}");
    }

    /// NVRTC stops at PTX; `ptxas` (from the `nvidia-cuda-nvcc` wheel, `MEMSTEER_PTXAS`) assembles it
    /// for sm_80 and sm_90 as the driver will at load time, which catches what PTX does not: static
    /// shared memory above 48 KiB, too many registers for a launch bound, instructions the
    /// architecture lacks. CI sets `MEMSTEER_REQUIRE_PTXAS=1` so the check cannot skip there.
    #[test]
    fn every_kernel_assembles_with_ptxas() {
        let required = std::env::var_os("MEMSTEER_REQUIRE_PTXAS").is_some();
        let ptxas = std::env::var_os("MEMSTEER_PTXAS").map(std::path::PathBuf::from).filter(|p| p.is_file());
        let (Some(ptxas), true) = (ptxas, cuda::nvrtc_present()) else {
            assert!(!required, "MEMSTEER_REQUIRE_PTXAS is set but MEMSTEER_PTXAS or NVRTC is missing");
            eprintln!("skipped: set MEMSTEER_PTXAS to a ptxas binary (and put NVRTC on the library path)");
            return;
        };
        let dir = std::env::temp_dir().join(format!("memsteer-ptxas-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        for sm in ["80", "90"] {
            let ptx = cuda::compile(&format!("compute_{sm}")).unwrap_or_else(|e| panic!("compute_{sm}: {e}"));
            let (src, bin) = (dir.join(format!("k{sm}.ptx")), dir.join(format!("k{sm}.cubin")));
            std::fs::write(&src, ptx).expect("write PTX");
            let out = std::process::Command::new(&ptxas)
                .args(["-v", "--gpu-name", &format!("sm_{sm}"), "-o"])
                .arg(&bin)
                .arg(&src)
                .output()
                .expect("run ptxas");
            let log = String::from_utf8_lossy(&out.stderr);
            assert!(out.status.success(), "ptxas sm_{sm} failed:\n{log}");
            for k in cuda::KERNELS {
                assert!(log.contains(&format!("'{k}'")), "sm_{sm}: no ptxas report for {k}");
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// The source of the `__device__` function or kernel whose definition starts with `head`: its line
    /// when it ends there, else up to its closing brace at the start of a line.
    fn cuda_function(head: &str) -> String {
        let start = cuda::SOURCE.find(head).unwrap_or_else(|| panic!("`{head}` not in kernels.cu"));
        let rest = &cuda::SOURCE[start..];
        let line = rest.lines().next().unwrap_or_default();
        if line.trim_end().ends_with('}') {
            return line.to_string(); // a one-line function
        }
        rest[..rest.find("\n}\n").expect("closing brace") + 3].to_string()
    }

    /// The text of `pieces` of kernels.cu: each a function's first line (the function), or a section's
    /// header comment (the section, up to the next).
    fn emulated_source(pieces: &[&str]) -> String {
        let mut text = String::new();
        for piece in pieces {
            text.push('\n');
            if piece.starts_with("// ---- ") {
                let start = cuda::SOURCE.find(piece).unwrap_or_else(|| panic!("`{piece}` not in kernels.cu"));
                let end = cuda::SOURCE[start + 8..].find("// ---- ").map_or(cuda::SOURCE.len(), |e| start + 8 + e);
                text.push_str(&cuda::SOURCE[start..end]);
            } else {
                text.push_str(&cuda_function(piece));
            }
        }
        text
    }

    /// What each emulator driver runs, by the pieces of kernels.cu it is compiled with.
    const DECODE_PIECES: [&str; 3] = [
        "__device__ __forceinline__ float warp_sum",
        "__device__ __forceinline__ float capped",
        "// ---- Decoding with key/value caches",
    ];
    const SOFTCAP_PIECES: [&str; 8] = [
        "__device__ __forceinline__ float warp_sum",
        "__device__ __forceinline__ float warp_max",
        "__device__ float block_sum",
        "__device__ float block_max",
        "__device__ __forceinline__ float capped",
        "extern \"C\" __global__ void causal_softmax",
        "extern \"C\" __global__ void softcap",
        "extern \"C\" __global__ void softmax_grad",
    ];
    const ROWS_PIECES: [&str; 8] = [
        "__device__ __forceinline__ float warp_sum",
        "__device__ float block_sum",
        "__device__ __forceinline__ float gelu",
        "extern \"C\" __global__ void embed",
        "extern \"C\" __global__ void rms_norm",
        "extern \"C\" __global__ void qk_rms_norm",
        "extern \"C\" __global__ void gated_act",
        "extern \"C\" __global__ void qkv_split",
    ];
    const NORMS_PIECES: [&str; 14] = [
        "__device__ __forceinline__ float warp_sum",
        "__device__ __forceinline__ float warp_max",
        "__device__ float block_sum",
        "__device__ float block_max",
        "extern \"C\" __global__ void convert",
        "extern \"C\" __global__ void layer_norm(",
        "__device__ __forceinline__ float gelu",
        "extern \"C\" __global__ void bias_act(",
        "extern \"C\" __global__ void layer_norm_warp",
        "extern \"C\" __global__ void bias_act_vec",
        "extern \"C\" __global__ void residual",
        "extern \"C\" __global__ void lse_target(",
        "extern \"C\" __global__ void lse_target_vec",
        "extern \"C\" __global__ void scale_rows",
    ];

    /// Every kernel of kernels.cu runs in some emulator driver, but the tensor-core attention kernels
    /// (`mma.sync` and `ldmatrix`, which the emulator does not have): a new kernel needs a driver.
    #[test]
    fn every_kernel_but_the_tensor_core_ones_is_emulated() {
        let all = [&DECODE_PIECES[..], &SOFTCAP_PIECES[..], &ROWS_PIECES[..], &NORMS_PIECES[..]].concat();
        let text = emulated_source(&all);
        for k in cuda::KERNELS.iter().filter(|k| !k.starts_with("flash")) {
            assert!(text.contains(&format!(" {k}(")), "kernel `{k}` runs in no emulator driver (tests/emulator)");
        }
    }

    /// Compiles `tests/emulator/{driver}.cpp` with `pieces` of kernels.cu (each a function's first
    /// line, or a whole section's header comment) after the CPU emulator (`tests/emulator/shim.h`: a
    /// thread per CUDA thread, barriers for `__syncthreads` and warp shuffles), runs it and returns its
    /// report; `None` (the test skips) without a C++ compiler (`c++`, or `CXX`), unless
    /// `MEMSTEER_REQUIRE_CXX` is set, as CI sets it. Runs under AddressSanitizer and
    /// UndefinedBehaviorSanitizer, and again under ThreadSanitizer, where the compiler has them. No GPU
    /// needed.
    fn emulate(driver: &str, pieces: &[&str]) -> Option<String> {
        let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
        if std::process::Command::new(&cxx).arg("--version").output().is_err() {
            assert!(
                std::env::var_os("MEMSTEER_REQUIRE_CXX").is_none(),
                "MEMSTEER_REQUIRE_CXX is set but `{cxx}` does not run"
            );
            eprintln!("skipped: no C++ compiler (`{cxx}`)");
            return None;
        }
        let here = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/emulator");
        let dir = std::env::temp_dir().join(format!("memsteer-emulator-{driver}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let header = std::fs::read_to_string(here.join("shim.h")).expect("shim.h") + &emulated_source(pieces);
        std::fs::write(dir.join("kernels.h"), header).expect("kernels.h");
        std::fs::write(dir.join("probe.cpp"), "int main() { return 0; }\n").expect("probe.cpp");
        let compile = |source: &std::path::Path, exe: &std::path::Path, flags: &[&str]| {
            std::process::Command::new(&cxx)
                .args(["-std=c++17", "-O1", "-g", "-pthread"])
                .args(flags)
                .arg("-I")
                .arg(&dir)
                .arg(source)
                .arg("-o")
                .arg(exe)
                .output()
                .expect("run the C++ compiler")
        };
        // Runs `exe` with its output in files (a long sanitizer report cannot block on a pipe); fails
        // after five minutes (a deadlocked barrier: a kernel that leaves a thread behind).
        let run = |exe: &std::path::Path| -> (bool, String, String) {
            let (out, err) = (exe.with_extension("out"), exe.with_extension("err"));
            let mut child = std::process::Command::new(exe)
                .env("TSAN_OPTIONS", "halt_on_error=1:exitcode=66")
                .stdout(std::fs::File::create(&out).expect("output file"))
                .stderr(std::fs::File::create(&err).expect("error file"))
                .spawn()
                .expect("run the emulated kernels");
            let start = std::time::Instant::now();
            let status = loop {
                if let Some(status) = child.try_wait().expect("wait") {
                    break status;
                }
                if start.elapsed() > std::time::Duration::from_secs(300) {
                    let _ = child.kill();
                    panic!("{}: still running after 300 s (a deadlocked barrier?)", exe.display());
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            };
            let read =
                |p: &std::path::Path| String::from_utf8_lossy(&std::fs::read(p).unwrap_or_default()).into_owned();
            (status.success(), read(&out), read(&err))
        };
        // Whether a sanitizer compiles and its runtime starts here (an empty program): then any failure
        // of the driver under it is the driver's.
        let usable = |name: &str, flags: &[&str]| {
            let exe = dir.join(format!("probe-{name}"));
            let ok = compile(&dir.join("probe.cpp"), &exe, flags).status.success() && run(&exe).0;
            if !ok {
                eprintln!("{driver}.cpp: no {name} here (its probe did not compile or run)");
            }
            ok
        };
        let source = here.join(format!("{driver}.cpp"));
        // Under AddressSanitizer and UndefinedBehaviorSanitizer where they work (an access outside a
        // buffer is an error, not a number that happens to pass), else plainly.
        let checked = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all"];
        let flags: &[&str] = if usable("AddressSanitizer", &checked) { &checked } else { &[] };
        let exe = dir.join(driver);
        let out = compile(&source, &exe, flags);
        assert!(out.status.success(), "compiling {driver}.cpp:\n{}", String::from_utf8_lossy(&out.stderr));
        let (ok, report, errors) = run(&exe);
        assert!(ok, "{driver}.cpp:\n{report}\n{errors}");
        // Under ThreadSanitizer: a missing `__syncthreads` between a shared write and a read is a race
        // it reports, whatever numbers the run gave.
        if usable("ThreadSanitizer", &["-fsanitize=thread"]) {
            let exe = dir.join(format!("{driver}-threads"));
            let out = compile(&source, &exe, &["-fsanitize=thread"]);
            assert!(out.status.success(), "compiling {driver}.cpp:\n{}", String::from_utf8_lossy(&out.stderr));
            let (ok, _, errors) = run(&exe);
            assert!(ok && !errors.contains("ThreadSanitizer"), "{driver}.cpp under ThreadSanitizer:\n{errors}");
        }
        let _ = std::fs::remove_dir_all(&dir);
        eprintln!("{driver}.cpp:\n{report}");
        Some(report)
    }

    /// The decoding kernels (`cache_store`, `cached_attention`) as kernels.cu has them, run in the CPU
    /// emulator against attention computed in double (`tests/emulator/decode.cpp`): windows, scales,
    /// soft-caps, grouped heads, heads of 32 to 256, rows of new prompts and of cached sequences in one
    /// step, f32, f16 and bf16; every cache buffer compared, after each store, with the image of the
    /// layout computed independently.
    #[test]
    fn cached_decoding_kernels_run_in_the_cpu_emulator() {
        let pieces = DECODE_PIECES;
        let Some(report) = emulate("decode", &pieces) else { return };
        assert_eq!(report.matches("worst relative").count(), 9, "{report}");
    }

    /// Gemma 2's soft-caps on the device (`causal_softmax` with capped, windowed scores; `softcap`;
    /// `softmax_grad` through the cap) run in the CPU emulator against double
    /// (`tests/emulator/softcap.cpp`).
    #[test]
    fn soft_cap_kernels_run_in_the_cpu_emulator() {
        let pieces = SOFTCAP_PIECES;
        let Some(report) = emulate("softcap", &pieces) else { return };
        assert_eq!(report.matches("worst relative").count(), 10, "{report}");
    }

    /// The row kernels a new architecture touches (`qkv_split` with rotary positions, bias, grouped
    /// heads and both layouts; `rms_norm`; `qk_rms_norm` per head and whole; `gated_act`; `embed`) run
    /// in the CPU emulator against double (`tests/emulator/rows.cpp`).
    #[test]
    fn row_kernels_run_in_the_cpu_emulator() {
        let pieces = ROWS_PIECES;
        let Some(report) = emulate("rows", &pieces) else { return };
        assert_eq!(report.matches("worst relative").count(), 12, "{report}");
    }

    /// The scoring path's memory-bound kernels (`layer_norm` and its one-warp-per-row variant, whose
    /// warps past the last row return early; `bias_act` and its vectorised variant; `residual`;
    /// `lse_target` and its vectorised variant; `convert`; the steer step's `scale_rows`) run in the CPU
    /// emulator against double
    /// (`tests/emulator/norms.cpp`).
    #[test]
    fn scoring_kernels_run_in_the_cpu_emulator() {
        let pieces = NORMS_PIECES;
        let Some(report) = emulate("norms", &pieces) else { return };
        assert_eq!(report.matches("worst relative").count(), 20, "{report}");
    }

    #[test]
    fn unknown_device_names_are_errors() {
        let e = Device::parse("tpu").expect_err("tpu");
        assert!(matches!(e, KernelError::UnknownDevice(_)), "{e}");
        assert_eq!(Device::parse("cpu").expect("cpu"), Device::Cpu);
    }

    #[test]
    fn resident_matrix_products_equal_the_cpu() {
        let Some(dev) = gpu() else { return };
        let mut rng = SplitMix64::new(32);
        let (m, k, n) = (37, 48, 1003);
        let (a, b) = (randn(m * k, 1.0, &mut rng), randn(n * k, 1.0, &mut rng));
        let (mut cpu, mut gpu) = (vec![0.0f32; m * n], vec![0.0f32; m * n]);
        memsteer_kernels::matmul_transposed(&Device::Cpu, &a, &b, m, k, n, &mut cpu).unwrap();
        let resident = memsteer_kernels::ResidentMatrix::new(&dev, &b, n, k).unwrap();
        for _ in 0..2 {
            resident.matmul_transposed(&a, m, &mut gpu).unwrap();
            for (x, y) in cpu.iter().zip(&gpu) {
                assert!((x - y).abs() <= 1e-4 * x.abs().max(1.0), "{x} vs {y}");
            }
        }
    }

    #[test]
    fn device_log_probs_and_steers_equal_the_cpu() {
        let Some(dev) = gpu() else { return };
        let mut rng = SplitMix64::new(31);
        let (rows, dim) = (300, 48);
        let h = randn(rows * dim, 1.0, &mut rng);
        // 5003: the scalar row kernel; 5008 (a multiple of 8): the vectorised one.
        for vocab in [5003, 5008] {
            let e = randn(vocab * dim, 1.0, &mut rng);
            let targets: Vec<u32> = (0..rows).map(|_| rng.below(vocab as u64) as u32).collect();
            let (mut cpu, mut gpu) = (vec![0.0f32; rows], vec![0.0f32; rows]);
            log_prob_targets(&Device::Cpu, &h, &e, dim, &targets, &mut cpu).expect("cpu");
            log_prob_targets(&dev, &h, &e, dim, &targets, &mut gpu).expect("gpu");
            for (r, (a, b)) in cpu.iter().zip(&gpu).enumerate() {
                assert!((a - b).abs() <= 1e-4 * (1.0 + a.abs()), "vocab {vocab}, row {r}: cpu {a} gpu {b}");
            }
        }
        let vocab = 5003;
        let e = randn(vocab * dim, 1.0, &mut rng);
        let mut gpu = vec![0.0f32; rows];
        let (s, r) = (2, 5);
        let p1 = randn(s * dim * r, 1.0, &mut rng);
        let p2 = randn(s * dim * r, 1.0, &mut rng);
        let steers = Steers { p1: &p1, p2: &p2, steers: s, dim, rank: r };
        let (mut a, mut b) = (vec![0.0f32; rows * dim], vec![0.0f32; rows * dim]);
        steered_projection(&Device::Cpu, &h, &steers, &[1.5, -0.5], 1e-2, &mut a).expect("cpu");
        steered_projection(&dev, &h, &steers, &[1.5, -0.5], 1e-2, &mut b).expect("gpu");
        for (i, (x, y)) in a.iter().zip(&b).enumerate() {
            assert!((x - y).abs() <= 1e-5 * (1.0 + x.abs()), "element {i}: cpu {x} gpu {y}");
        }
        let (m, k, n) = (33, 70, 29);
        let x = randn(m * k, 1.0, &mut rng);
        let w = randn(k * n, 1.0, &mut rng);
        let (mut c1, mut c2) = (vec![0.0f32; m * n], vec![0.0f32; m * n]);
        memsteer_kernels::matmul(&Device::Cpu, &x, &w, m, k, n, &mut c1).expect("cpu");
        memsteer_kernels::matmul(&dev, &x, &w, m, k, n, &mut c2).expect("gpu");
        for (a, b) in c1.iter().zip(&c2) {
            assert!((a - b).abs() <= 1e-4 * (1.0 + a.abs()));
        }
        memsteer_kernels::matmul_transposed(&Device::Cpu, &x, &w, m, k, n, &mut c1).expect("cpu");
        memsteer_kernels::matmul_transposed(&dev, &x, &w, m, k, n, &mut c2).expect("gpu");
        for (a, b) in c1.iter().zip(&c2) {
            assert!((a - b).abs() <= 1e-4 * (1.0 + a.abs()));
        }
        let bad = log_prob_targets(&dev, &h, &e, dim, &[vocab as u32; 300], &mut gpu).expect_err("target");
        assert!(matches!(bad, KernelError::Target { .. }), "{bad}");
    }
}

mod bf16;
mod f32panels;
