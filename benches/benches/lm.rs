//! Criterion benches of sequence log-probability throughput (`memsteer-lm`, CPU): GPT-2 small's shape
//! (124M) and Pythia-70M's shape, random f16 weights written to a temporary directory outside the timed
//! loop, batch 8 × 256 tokens (as the PyTorch baseline in design.md). Throughput is in tokens.

use std::hint::black_box;
use std::path::Path;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use memsteer_benches::{write_gpt2_small, write_pythia_70m};
use memsteer_lm::Model;
use memsteer_panel::rng::SplitMix64;

const BATCH: usize = 8;
const TOKENS: usize = 256;

fn lm(c: &mut Criterion) {
    let mut rng = SplitMix64::new(2);
    let batch: Vec<Vec<u32>> = (0..BATCH).map(|_| (0..TOKENS).map(|_| rng.below(50257) as u32).collect()).collect();
    let mut g = c.benchmark_group("cpu/sequence_log_probs_8x256");
    g.sample_size(10)
        .measurement_time(Duration::from_secs(30))
        .throughput(Throughput::Elements((BATCH * TOKENS) as u64));
    for (name, build) in [("gpt2_small_124m", write_gpt2_small as fn(&Path)), ("pythia_70m", write_pythia_70m)] {
        let dir = std::env::temp_dir().join(format!("memsteer-bench-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        build(&dir);
        let model = Model::load(&dir).expect("load");
        g.bench_function(name, |b| b.iter(|| model.sequence_log_probs(black_box(&batch)).expect("ok")));
        let _ = std::fs::remove_dir_all(&dir);
    }
    g.finish();
}

criterion_group!(benches, lm);
criterion_main!(benches);
