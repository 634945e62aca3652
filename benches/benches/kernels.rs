//! Criterion benches of the fused log-prob kernel against the materialised computation (full logits
//! buffer, then log-softmax) and the bare matrix product, same shapes, same run.
//!
//! Shape: GPT-2 small's output layer (hidden 768, vocabulary 50,257), 256 tokens. And Gemma 2's logit
//! soft-cap over a row of its vocabulary, vectorised against the platform's `tanhf`.

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use memsteer_kernels::PackedF32;
use memsteer_kernels::bf16::{PackedBf16, Source};
use memsteer_kernels::dispatch::ALL_LEVELS;
use memsteer_kernels::{CpuKernels, Device, log_prob_targets};
use memsteer_panel::rng::SplitMix64;

const TOKENS: usize = 256;
const DIM: usize = 768;
const VOCAB: usize = 50257;

/// `C = A Bᵀ`, the same GEMM the fused kernel uses.
fn sgemm_a_bt(m: usize, k: usize, n: usize, a: &[f32], b: &[f32], c: &mut [f32]) {
    memsteer_kernels::matmul_transposed(&Device::Cpu, a, b, m, k, n, c).expect("shapes");
}

fn materialised(hidden: &[f32], emb: &[f32], targets: &[u32], logits: &mut [f32], out: &mut [f32]) {
    sgemm_a_bt(TOKENS, DIM, VOCAB, hidden, emb, logits);
    for (t, o) in out.iter_mut().enumerate() {
        let row = &logits[t * VOCAB..(t + 1) * VOCAB];
        let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let lse = m + row.iter().map(|x| (x - m).exp()).sum::<f32>().ln();
        *o = row[targets[t] as usize] - lse;
    }
}

fn kernels(c: &mut Criterion) {
    let mut rng = SplitMix64::new(1);
    let hidden: Vec<f32> = (0..TOKENS * DIM).map(|_| rng.normal() as f32).collect();
    let emb: Vec<f32> = (0..VOCAB * DIM).map(|_| 0.05 * rng.normal() as f32).collect();
    let targets: Vec<u32> = (0..TOKENS).map(|_| rng.below(VOCAB as u64) as u32).collect();
    let mut out = vec![0.0f32; TOKENS];
    let mut logits = vec![0.0f32; TOKENS * VOCAB];
    let mut g = c.benchmark_group("cpu/output_layer_gpt2_256tok");
    g.sample_size(10).measurement_time(Duration::from_secs(10));
    g.throughput(Throughput::Elements((2 * TOKENS * DIM * VOCAB) as u64)); // flops of the product
    g.bench_function("fused_log_prob_targets", |b| {
        b.iter(|| log_prob_targets(&Device::Cpu, black_box(&hidden), &emb, DIM, &targets, &mut out).expect("ok"))
    });
    g.bench_function("materialised_logits_then_log_softmax", |b| {
        b.iter(|| materialised(black_box(&hidden), &emb, &targets, &mut logits, &mut out))
    });
    g.bench_function("sgemm_only", |b| {
        b.iter(|| sgemm_a_bt(TOKENS, DIM, VOCAB, black_box(&hidden), &emb, &mut logits))
    });
    // The fused output layer on the embedding packed in f32 panels (what the CPU runtime uses from
    // the avx512 kernel level up).
    let emb_packed = PackedF32::pack(&emb, VOCAB, DIM, Source::OutputsMajor).expect("pack");
    g.bench_function("fused_log_prob_targets_f32_packed", |b| {
        b.iter(|| {
            memsteer_kernels::log_prob_targets_f32(black_box(&hidden), &emb_packed, &targets, &mut out, None)
                .expect("ok")
        })
    });
    g.finish();

    // The GEMM peak the transformer runtime is measured against: a linear layer of GPT-2 small at a
    // packed batch of 8 × 256 tokens (MLP up-projection), split across threads as the runtime does.
    let (m, k, n) = (2048, 768, 3072);
    let a: Vec<f32> = (0..m * k).map(|_| rng.normal() as f32).collect();
    let w: Vec<f32> = (0..n * k).map(|_| 0.05 * rng.normal() as f32).collect();
    let mut c_out = vec![0.0f32; m * n];
    let mut g = c.benchmark_group("cpu/linear_2048x768x3072");
    g.sample_size(10).measurement_time(Duration::from_secs(10));
    g.throughput(Throughput::Elements((2 * m * k * n) as u64));
    g.bench_function("matmul_transposed", |b| b.iter(|| sgemm_a_bt(m, k, n, black_box(&a), &w, &mut c_out)));
    // The weights packed in f32 panels: the portable kernel, and the AVX-512 one where the CPU has it.
    let packed32 = PackedF32::pack(&w, n, k, Source::OutputsMajor).expect("pack");
    for level in [CpuKernels::Portable, CpuKernels::Avx512].into_iter().filter(|l| *l <= CpuKernels::detected()) {
        g.bench_function(format!("f32_packed_{level}"), |b| {
            b.iter(|| packed32.matmul_transposed_with(level, black_box(&a), m, &mut c_out).expect("f32"))
        });
    }
    // The same product with the weights packed in bf16, on every bf16 kernel level this CPU has.
    let packed = PackedBf16::pack(&w, n, k, Source::OutputsMajor, false).expect("pack");
    for level in ALL_LEVELS.into_iter().filter(|l| *l <= CpuKernels::detected()) {
        if level == CpuKernels::Avx2 || level == CpuKernels::Avx512 {
            continue; // the same portable bf16 kernel as `portable`
        }
        g.bench_function(format!("bf16_{level}"), |b| {
            b.iter(|| packed.matmul_transposed_with(level, black_box(&a), m, &mut c_out).expect("bf16"))
        });
    }
    g.finish();
    eprintln!("{}", memsteer_kernels::dispatch::describe());
}

/// Gemma 2's soft-cap `c·tanh(x/c)` over one 256,000-entry row of logits (its vocabulary): through
/// `vmath::tanh` (branch-free, vectorised, what the runtime uses) against the platform's `tanhf`.
fn softcap(c: &mut Criterion) {
    const V: usize = 256_000;
    let mut rng = SplitMix64::new(2);
    let row: Vec<f32> = (0..V).map(|_| 20.0 * rng.normal() as f32).collect();
    let mut x = row.clone();
    let mut g = c.benchmark_group("softcap");
    g.throughput(Throughput::Elements(V as u64));
    g.measurement_time(Duration::from_secs(3));
    g.bench_function("vmath_tanh", |b| {
        b.iter(|| {
            x.copy_from_slice(&row);
            memsteer_kernels::vmath::softcap_in_place(black_box(&mut x), 30.0);
        })
    });
    g.bench_function("libm_tanhf", |b| {
        b.iter(|| {
            x.copy_from_slice(&row);
            for v in black_box(&mut x).iter_mut() {
                *v = (*v / 30.0).tanh() * 30.0;
            }
        })
    });
    g.finish();
}

criterion_group!(benches, kernels, softcap);
criterion_main!(benches);
