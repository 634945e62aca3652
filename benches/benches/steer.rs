//! Criterion bench of LM-Steer's decode overhead (issue 9: at most 1.05× the base model's time): greedy
//! decoding of 32 new tokens after a 16-token prompt with the KV cache on a GPT-2-small-shaped model (random
//! f16 weights written to a temporary directory outside the timed loop, as `lm.rs`), (a) the base model,
//! (b) one steer of rank 768 (min(1000, d), the default) applied to the last hidden state every step as
//! `memsteer steer generate` does, (c) two steers composed. Each steer is shaped as `steer train` writes
//! it: the labelled steer and the dummy steer (strength 1), so `num_steers = 2`.

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, SamplingMode, Throughput, criterion_group, criterion_main};
use memsteer_benches::write_gpt2_small;
use memsteer_kernels::{Device, matmul_transposed};
use memsteer_lm::sample::{SamplingConfig, sample};
use memsteer_lm::{Decoder, KvCache, Model};
use memsteer_panel::rng::SplitMix64;
use memsteer_steer::{Steer, SteerSpec, embedding_fingerprint};

const PROMPT: usize = 16;
const NEW_TOKENS: usize = 32;
const RANK: usize = 768;

/// A random steer for `decoder` shaped as `steer train` writes it (labelled + dummy, rank [`RANK`]), with
/// the strengths `steer generate` uses for `FILE:strength`.
fn random_steer(decoder: &dyn Decoder, seed: u64, strength: f32) -> (Steer, Vec<f32>) {
    let (d, steers) = (decoder.dim(), 2);
    let mut rng = SplitMix64::new(seed);
    let mut p = |n: usize| (0..n).map(|_| (0.05 * rng.normal()) as f32).collect::<Vec<f32>>();
    let (p1, p2) = (p(steers * d * RANK), p(steers * d * RANK));
    let spec = SteerSpec {
        num_steers: steers,
        hidden_size: d,
        rank: RANK,
        vocab_size: decoder.vocab(),
        epsilon: 1e-3,
        embedding_fingerprint: embedding_fingerprint(decoder.output_embedding()),
        labels: vec!["positive".into()],
    };
    let steer = Steer::new(spec, p1, p2, serde_json::Value::Null).expect("steer");
    let strengths = steer.strengths(&[strength]).expect("strengths");
    (steer, strengths)
}

/// `h' = h + Σ_files (project_f(h) − h)`, as `steer generate`'s `SteerSet::apply`.
fn apply(steers: &[(Steer, Vec<f32>)], last: &[f32]) -> Vec<f32> {
    let mut h = last.to_vec();
    for (steer, strengths) in steers {
        let p = steer.project(last, strengths).expect("project");
        for ((o, &pi), &hi) in h.iter_mut().zip(&p).zip(last) {
            *o += pi - hi;
        }
    }
    h
}

/// Greedy decoding as `memsteer steer generate`'s `steered_continuation`: the KV cache, the last hidden
/// state through every steer (`h' = h + Σ_files (project_f(h) − h)`), logits against the output embedding.
fn decode(decoder: &dyn Decoder, steers: &[(Steer, Vec<f32>)], prompt: &[u32]) -> Vec<u32> {
    let (d, vocab) = (decoder.dim(), decoder.vocab());
    let cfg = SamplingConfig { temperature: 0.0, top_k: None, top_p: None };
    let mut cache = KvCache::new();
    let mut out = Vec::with_capacity(NEW_TOKENS);
    let mut input = prompt.to_vec();
    let mut logits = vec![0.0f32; vocab];
    while out.len() < NEW_TOKENS {
        let hidden = decoder.forward(&input, &mut cache).expect("forward");
        let last = &hidden[hidden.len() - d..];
        if steers.is_empty() {
            matmul_transposed(&Device::Cpu, last, decoder.output_embedding(), 1, d, vocab, &mut logits).expect("mm");
        } else {
            let h = apply(steers, last);
            matmul_transposed(&Device::Cpu, &h, decoder.output_embedding(), 1, d, vocab, &mut logits).expect("mm");
        }
        decoder.logits_in_place(&mut logits);
        let next = sample(&logits, &cfg, 0.5).expect("finite logits") as u32;
        out.push(next);
        input.clear();
        input.push(next);
    }
    out
}

fn steer_decode(c: &mut Criterion) {
    let dir = std::env::temp_dir().join(format!("memsteer-bench-steer-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    write_gpt2_small(&dir);
    let model = Model::load(&dir).expect("load");
    let decoder = model.decoder();
    let mut rng = SplitMix64::new(2);
    let prompt: Vec<u32> = (0..PROMPT).map(|_| rng.below(decoder.vocab() as u64) as u32).collect();
    let one = [random_steer(decoder, 3, 1.0)];
    let two = [random_steer(decoder, 3, 1.0), random_steer(decoder, 4, -0.5)];

    let mut g = c.benchmark_group("cpu/steer_decode_32tok");
    g.sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .measurement_time(Duration::from_secs(15))
        .throughput(Throughput::Elements(NEW_TOKENS as u64));
    for (name, steers) in [("base", &[][..]), ("one_steer", &one[..]), ("two_steers", &two[..])] {
        g.bench_function(name, |b| b.iter(|| decode(decoder, black_box(steers), black_box(&prompt))));
    }
    g.finish();

    // What the steers add to one decode step on their own: the last hidden state through every steer.
    let h: Vec<f32> = (0..decoder.dim()).map(|_| rng.normal() as f32).collect();
    let mut g = c.benchmark_group("cpu/steer_apply_1row");
    g.sample_size(10).measurement_time(Duration::from_secs(3));
    for (name, steers) in [("one_steer", &one[..]), ("two_steers", &two[..])] {
        g.bench_function(name, |b| b.iter(|| apply(black_box(steers), black_box(&h))));
    }
    g.finish();
    let _ = std::fs::remove_dir_all(&dir);
}

criterion_group!(benches, steer_decode);
criterion_main!(benches);
