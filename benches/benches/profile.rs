//! Criterion benches of the memorisation-profile estimator (read + estimate), CPU.
//!
//! Sizes from issue 2: the 9,600 × 100 panel csdid was timed on (95 cohorts × 80 + 2,000 validation),
//! the paper's 16,300 × 144 panel (143 × 100 + 2,000), and 10× that (143 × 1,000 + 20,000). B = 1,000
//! draws unless the name says otherwise. Data are generated outside the timed closures with fixed seeds.

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use memsteer_did::{BandMethod, NoProgress, ProfileConfig, estimate};
use memsteer_panel::read::{ReadOptions, parse_csv};
use memsteer_panel::synthetic::SyntheticConfig;

fn panel(k: usize, per: usize, val: usize, c: usize) -> memsteer_panel::Panel {
    SyntheticConfig::pythia_like(k, per, val, c, 7).generate().expect("panel")
}

fn config(draws: usize) -> memsteer_did::ValidConfig {
    ProfileConfig::default().with_bootstrap(draws).validate().expect("config")
}

fn estimator(c: &mut Criterion) {
    let mut g = c.benchmark_group("cpu/estimate");
    g.sample_size(10).measurement_time(Duration::from_secs(20));
    let small = panel(95, 80, 2000, 100);
    for draws in [0, 250, 500, 1000] {
        let cfg = config(draws);
        g.bench_function(format!("9600x100/B{draws}"), |b| {
            b.iter(|| estimate(black_box(&small), &cfg, &NoProgress).expect("ok"))
        });
    }
    let paper = panel(143, 100, 2000, 144);
    let cfg = config(1000);
    g.bench_function("16300x144/B1000", |b| b.iter(|| estimate(black_box(&paper), &cfg, &NoProgress).expect("ok")));
    if std::env::var_os("MEMSTEER_BENCH_LARGE").is_some() {
        let large = panel(143, 1000, 20000, 144);
        g.bench_function("163000x144/B1000", |b| {
            b.iter(|| estimate(black_box(&large), &cfg, &NoProgress).expect("ok"))
        });
    }
    g.finish();
}

/// The two uniform-band constructions side by side on the paper's panel (B = 1,000): csdid's (one
/// sup-t quantile of the multiplier draws) and the default Student bands (Gaussian draws over every
/// checkpoint, Student-t per cell).
fn bands(c: &mut Criterion) {
    let mut g = c.benchmark_group("cpu/bands");
    g.sample_size(10).measurement_time(Duration::from_secs(20));
    let paper = panel(143, 100, 2000, 144);
    for (name, method) in [("csdid", BandMethod::Csdid), ("student", BandMethod::Student)] {
        let cfg = ProfileConfig::default().with_bootstrap(1000).with_band_method(method).validate().expect("config");
        g.bench_function(format!("16300x144/B1000/{name}"), |b| {
            b.iter(|| estimate(black_box(&paper), &cfg, &NoProgress).expect("ok"))
        });
    }
    g.finish();
}

fn reader(c: &mut Criterion) {
    let mut g = c.benchmark_group("cpu/read_csv");
    g.sample_size(10);
    let mut bytes = Vec::new();
    panel(95, 80, 2000, 100).write_csv_to(&mut bytes).expect("write");
    g.bench_function("9600x100", |b| {
        b.iter(|| parse_csv(black_box(&bytes), "bench", &ReadOptions::default()).expect("ok"))
    });
    g.finish();
}

criterion_group!(benches, estimator, bands, reader);
criterion_main!(benches);
