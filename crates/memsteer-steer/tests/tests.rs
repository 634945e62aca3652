//! memsteer-steer: gradients against finite differences, the fused output layer against a materialised
//! reference, a planted steering task on a tiny random GPT-2, determinism across thread counts, and the
//! steer file's round trip and errors.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use memsteer_kernels::Steers;
use memsteer_lm::{Decoder, Model};
use memsteer_steer::fused::{SteerBatch, nll_and_grad, steer_loss_and_grads};
use memsteer_steer::{
    HiddenCache, OutputLayer, Steer, SteerError, SteerSpec, TrainConfig, embedding_fingerprint, train, train_cached,
};
use safetensors::Dtype;
use safetensors::tensor::TensorView;

/// Gradient check: |analytic − finite difference| ≤ GRAD_RTOL · max|finite difference| + GRAD_ATOL.
const GRAD_RTOL: f64 = 1e-5;
/// Absolute floor of the gradient check.
const GRAD_ATOL: f64 = 1e-7;
/// Fused against materialised: relative tolerance of losses and gradients (f32 against f64).
const FUSED_RTOL: f64 = 1e-5;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/lm").join(name)
}

fn tiny_gpt2() -> Model {
    Model::load(&fixture("tiny-gpt2-f32")).expect("tiny-gpt2-f32")
}

/// A small seeded generator for test data.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        self.0 >> 11
    }
    fn uniform(&mut self) -> f64 {
        self.next() as f64 / (1u64 << 53) as f64
    }
    fn sym(&mut self, scale: f64) -> f32 {
        ((2.0 * self.uniform() - 1.0) * scale) as f32
    }
    fn below(&mut self, n: usize) -> usize {
        (self.uniform() * n as f64) as usize % n
    }
}

/// f64 reference: mean NLL of `targets` under `(h + ε Σ_i s_{t,i} (h P1_i) P2_iᵀ) Eᵀ`, materialising the logits.
#[allow(clippy::too_many_arguments)]
fn reference_loss(
    p1: &[f64],
    p2: &[f64],
    s: usize,
    d: usize,
    r: usize,
    eps: f64,
    h: &[f32],
    strengths: &[f32],
    targets: &[u32],
    (e, softcap): (&[f32], Option<f64>),
) -> f64 {
    let n = targets.len();
    let vocab = e.len() / d;
    let mut total = 0.0;
    for t in 0..n {
        let ht: Vec<f64> = h[t * d..(t + 1) * d].iter().map(|&x| f64::from(x)).collect();
        let mut hp = ht.clone();
        for i in 0..s {
            let si = f64::from(strengths[t * s + i]);
            let base = i * d * r;
            let u: Vec<f64> = (0..r).map(|j| (0..d).map(|k| ht[k] * p1[base + k * r + j]).sum()).collect();
            for k in 0..d {
                hp[k] += eps * si * (0..r).map(|j| u[j] * p2[base + k * r + j]).sum::<f64>();
            }
        }
        let logits: Vec<f64> = (0..vocab)
            .map(|v| (0..d).map(|k| hp[k] * f64::from(e[v * d + k])).sum())
            .map(|z: f64| softcap.map_or(z, |c| c * (z / c).tanh()))
            .collect();
        let m = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let lse = m + logits.iter().map(|l| (l - m).exp()).sum::<f64>().ln();
        total += lse - logits[targets[t] as usize];
    }
    total / n as f64
}

struct Case {
    s: usize,
    d: usize,
    r: usize,
    eps: f32,
    p1: Vec<f32>,
    p2: Vec<f32>,
    h: Vec<f32>,
    strengths: Vec<f32>,
    targets: Vec<u32>,
    e: Vec<f32>,
}

fn case(seed: u64, n: usize, d: usize, r: usize, vocab: usize, eps: f32) -> Case {
    let s = 2;
    let mut rng = Rng(seed);
    let p1 = (0..s * d * r).map(|_| rng.sym(1.0)).collect();
    let p2 = (0..s * d * r).map(|_| rng.sym(1.0)).collect();
    let h = (0..n * d).map(|_| rng.sym(1.5)).collect();
    let strengths = (0..n).flat_map(|t| [if t % 2 == 0 { 1.0 } else { -1.0 }, 1.0]).collect();
    let targets = (0..n).map(|_| rng.below(vocab) as u32).collect();
    let e = (0..vocab * d).map(|_| rng.sym(1.0)).collect();
    Case { s, d, r, eps, p1, p2, h, strengths, targets, e }
}

/// (a) Gradients of the fused output layer + steer chain against central finite differences of the f64
/// reference; at ε of order one (every term matters) and at the authors' ε = 1e-3; with logits
/// soft-capped at 1.5 (Gemma 2's final soft-capping; these logits reach ±6, so the cap bends them).
#[test]
fn steer_gradients_match_finite_differences() {
    let cases = [(1u64, 0.7f32, 7usize, None), (2, 1e-3, 9, None), (3, 0.3, 530, None), (4, 0.7, 530, Some(1.5f32))];
    for (seed, eps, vocab, softcap) in cases {
        let c = case(seed, 5, 4, 3, vocab, eps);
        let output = OutputLayer::new(&c.e, softcap).expect("cap");
        let per = c.s * c.d * c.r;
        let (mut g1, mut g2) = (vec![0.0f32; per], vec![0.0f32; per]);
        let batch = SteerBatch { hidden: &c.h, strengths: &c.strengths, targets: &c.targets };
        let steers = Steers { p1: &c.p1, p2: &c.p2, steers: c.s, dim: c.d, rank: c.r };
        let loss = steer_loss_and_grads(&steers, c.eps, output, &batch, &mut g1, &mut g2).expect("grads");
        let mut p1: Vec<f64> = c.p1.iter().map(|&x| f64::from(x)).collect();
        let mut p2: Vec<f64> = c.p2.iter().map(|&x| f64::from(x)).collect();
        let f = |p1: &[f64], p2: &[f64]| {
            let out = (c.e.as_slice(), softcap.map(f64::from));
            reference_loss(p1, p2, c.s, c.d, c.r, f64::from(c.eps), &c.h, &c.strengths, &c.targets, out)
        };
        let want_loss = f(&p1, &p2);
        assert!((loss - want_loss).abs() <= FUSED_RTOL * want_loss.abs(), "loss {loss} vs {want_loss}");
        let step = 1e-4 / f64::from(c.eps).max(1e-2);
        let mut worst = 0.0f64;
        for which in 0..2 {
            let mut fd = vec![0.0f64; per];
            for k in 0..per {
                let p = if which == 0 { &mut p1 } else { &mut p2 };
                let x = p[k];
                p[k] = x + step;
                let up = f(&p1, &p2);
                let p = if which == 0 { &mut p1 } else { &mut p2 };
                p[k] = x - step;
                let down = f(&p1, &p2);
                let p = if which == 0 { &mut p1 } else { &mut p2 };
                p[k] = x;
                fd[k] = (up - down) / (2.0 * step);
            }
            let analytic = if which == 0 { &g1 } else { &g2 };
            let scale = fd.iter().map(|x| x.abs()).fold(0.0, f64::max);
            assert!(scale > 0.0, "seed {seed}: zero gradient");
            for k in 0..per {
                let err = (f64::from(analytic[k]) - fd[k]).abs();
                worst = worst.max(err / scale);
                assert!(
                    err <= GRAD_RTOL * scale + GRAD_ATOL,
                    "seed {seed}, ε {eps}, P{} [{k}]: analytic {} vs finite difference {}",
                    which + 1,
                    analytic[k],
                    fd[k]
                );
            }
        }
        eprintln!(
            "gradient check seed {seed} ε {eps} vocab {vocab} cap {softcap:?}: worst error / max|grad| = {worst:.2e}"
        );
    }
    // The cap is not one that does nothing here.
    let c = case(4, 5, 4, 3, 530, 0.7);
    let (p1, p2): (Vec<f64>, Vec<f64>) =
        (c.p1.iter().map(|&x| f64::from(x)).collect(), c.p2.iter().map(|&x| f64::from(x)).collect());
    let at = |cap| reference_loss(&p1, &p2, c.s, c.d, c.r, 0.7, &c.h, &c.strengths, &c.targets, (&c.e, cap));
    assert!((at(None) - at(Some(1.5))).abs() > 0.1, "{} vs {}", at(None), at(Some(1.5)));
}

/// (b) The fused NLL and its hidden-state gradient equal a materialised-logits f64 reference (several
/// row blocks, several vocabulary tiles with a partial last one), and the loss equals the kernels' fused
/// log-probabilities.
#[test]
fn fused_output_layer_matches_materialised_reference() {
    let (n, d, vocab) = (130, 8, 1100);
    let c = case(7, n, d, 1, vocab, 1.0);
    let mut grad = vec![0.0f32; n * d];
    let scale = 1.0 / n as f32;
    let total = nll_and_grad(&c.h, OutputLayer::uncapped(&c.e), d, &c.targets, scale, &mut grad).expect("fused");
    let mut want_total = 0.0f64;
    let mut worst = 0.0f64;
    for t in 0..n {
        let h = &c.h[t * d..(t + 1) * d];
        let logits: Vec<f64> =
            (0..vocab).map(|v| (0..d).map(|k| f64::from(h[k]) * f64::from(c.e[v * d + k])).sum()).collect();
        let m = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let lse = m + logits.iter().map(|l| (l - m).exp()).sum::<f64>().ln();
        want_total += lse - logits[c.targets[t] as usize];
        for k in 0..d {
            let mut g: f64 = (0..vocab).map(|v| (logits[v] - lse).exp() * f64::from(c.e[v * d + k])).sum();
            g -= f64::from(c.e[c.targets[t] as usize * d + k]);
            g *= f64::from(scale);
            let err = (f64::from(grad[t * d + k]) - g).abs();
            worst = worst.max(err);
            assert!(err <= FUSED_RTOL * g.abs().max(f64::from(scale)), "row {t} dim {k}: {} vs {g}", grad[t * d + k]);
        }
    }
    assert!((total - want_total).abs() <= FUSED_RTOL * want_total, "{total} vs {want_total}");
    let mut lp = vec![0.0f32; n];
    memsteer_kernels::log_prob_targets(&memsteer_kernels::Device::Cpu, &c.h, &c.e, d, &c.targets, &mut lp).unwrap();
    let kernel_total: f64 = lp.iter().map(|&x| -f64::from(x)).sum();
    assert!((total - kernel_total).abs() <= FUSED_RTOL * total, "{total} vs kernels {kernel_total}");
    eprintln!("fused vs materialised: loss {total} vs {want_total}; worst gradient error {worst:.2e}");
}

/// The training forward (per-row strengths) equals the inference path (`Steer::log_prob_targets`, which
/// uses the kernels' `steered_projection`) when every row has the same strengths; on GPT-2 and on
/// Gemma 2, whose logits are soft-capped (the model's output layer carries its cap to every path).
#[test]
fn training_forward_equals_inference_path() {
    let gemma2 = memsteer_lm::Model::load(
        &std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/lm/tiny-gemma2"),
    )
    .expect("tiny-gemma2");
    assert_eq!(gemma2.decoder().logit_softcap(), Some(3.0));
    for model in [tiny_gpt2(), gemma2] {
        training_forward_equals_inference_path_on(&model);
    }
}

fn training_forward_equals_inference_path_on(model: &memsteer_lm::Model) {
    let dec = model.decoder();
    let output = OutputLayer::of(dec);
    let (d, r) = (dec.dim(), 5);
    let mut rng = Rng(11);
    let p1: Vec<f32> = (0..2 * d * r).map(|_| rng.sym(3.0)).collect();
    let p2: Vec<f32> = (0..2 * d * r).map(|_| rng.sym(3.0)).collect();
    let spec = SteerSpec {
        num_steers: 2,
        hidden_size: d,
        rank: r,
        vocab_size: dec.vocab(),
        epsilon: 0.5,
        embedding_fingerprint: embedding_fingerprint(dec.output_embedding()),
        labels: vec!["a".into()],
    };
    let steer = Steer::new(spec, p1.clone(), p2.clone(), serde_json::json!({})).unwrap();
    let tokens: Vec<u32> = (0..20).map(|_| rng.below(50) as u32).collect();
    let h = dec.hidden_states(&tokens[..19]).unwrap();
    let targets = &tokens[1..];
    let strengths = steer.strengths(&[-1.5]).unwrap();
    assert_eq!(strengths, vec![-1.5, 1.0]);
    let lp = steer.log_prob_targets(&h, output, targets, &strengths).unwrap();
    let want = -lp.iter().map(|&x| f64::from(x)).sum::<f64>() / lp.len() as f64;
    let per_row: Vec<f32> = (0..19).flat_map(|_| strengths.clone()).collect();
    let (mut g1, mut g2) = (vec![0.0; p1.len()], vec![0.0; p2.len()]);
    let batch = SteerBatch { hidden: &h, strengths: &per_row, targets };
    let got = steer_loss_and_grads(&steer.as_steers(), 0.5, output, &batch, &mut g1, &mut g2).unwrap();
    assert!((got - want).abs() < 1e-5 * want, "{got} vs {want}");
    // And the steered logits agree with the log-probabilities, and stay within the model's cap.
    let logits = steer.logits(&h, output, &strengths).unwrap();
    if let Some(cap) = dec.logit_softcap() {
        assert!(logits.iter().all(|l| l.abs() <= cap));
    }
    let row = &logits[..dec.vocab()];
    let m = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let lse = m + row.iter().map(|l| (l - m).exp()).sum::<f32>().ln();
    assert!((row[targets[0] as usize] - lse - lp[0]).abs() < 1e-5);
    // The base model's log-probabilities are the steer's at strength 0 (the same capped output layer).
    let zero = steer.log_prob_targets(&h, output, targets, &[0.0, 0.0]).unwrap();
    let mut base = vec![0.0f32; targets.len()];
    dec.output_log_probs(&h, targets, &mut base).unwrap();
    assert!(zero.iter().zip(&base).all(|(a, b)| (a - b).abs() < 1e-5), "{zero:?} vs {base:?}");
}

/// Token sets of the planted task: A is favoured by the positive corpus, B by the negative.
const SET_A: std::ops::Range<u32> = 0..8;
const SET_B: std::ops::Range<u32> = 8..16;

fn planted_corpus(rng: &mut Rng, set: std::ops::Range<u32>, n: usize) -> Vec<Vec<u32>> {
    (0..n)
        .map(|_| {
            (0..20)
                .map(|_| {
                    if rng.uniform() < 0.6 {
                        set.start + rng.below(set.len()) as u32
                    } else {
                        16 + rng.below(34) as u32
                    }
                })
                .collect()
        })
        .collect()
}

fn planted_config() -> TrainConfig {
    let mut config = TrainConfig::default();
    config.steps = 300;
    config.batch_size = 16;
    config.seed = 5;
    config
}

/// (c) Planted task: after training, the steered next-token mass on A rises monotonically with the
/// strength from −2 to +2 on held-out contexts, and the mass on B falls.
#[test]
fn planted_task_moves_mass_monotonically_with_strength() {
    let model = tiny_gpt2();
    let dec = model.decoder();
    let mut rng = Rng(2026);
    let positive = planted_corpus(&mut rng, SET_A, 120);
    let negative = planted_corpus(&mut rng, SET_B, 120);
    let config = planted_config();
    let start = std::time::Instant::now();
    let (steer, report) = train(dec, &positive, &negative, &config, &mut |_| {}).expect("train");
    eprintln!("planted task: trained {} steps on {} rows in {:.2?}", config.steps, report.rows, start.elapsed());
    let first: f64 = report.losses[..20].iter().sum::<f64>() / 20.0;
    let last: f64 = report.losses[report.losses.len() - 20..].iter().sum::<f64>() / 20.0;
    eprintln!(
        "planted task: loss {first:.4} (first 20 steps) → {last:.4} (last 20); uniform ln 50 = {:.4}",
        50f64.ln()
    );
    assert!(last < first - 0.05, "training did not lower the loss: {first} → {last}");

    // Held-out contexts: uniform random tokens (neither corpus's distribution).
    let contexts: Vec<Vec<u32>> = (0..30).map(|_| (0..12).map(|_| rng.below(50) as u32).collect()).collect();
    let mut hidden = Vec::new();
    for c in &contexts {
        hidden.extend(dec.hidden_states(c).unwrap());
    }
    let rows = hidden.len() / dec.dim();
    let mut mass_a = Vec::new();
    let mut mass_b = Vec::new();
    for strength in [-2.0f32, -1.0, 0.0, 1.0, 2.0] {
        let logits = steer.logits(&hidden, OutputLayer::of(dec), &steer.strengths(&[strength]).unwrap()).unwrap();
        let (mut a, mut b) = (0.0f64, 0.0f64);
        for row in logits.chunks(dec.vocab()) {
            let m = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let z: f64 = row.iter().map(|&l| f64::from((l - m).exp())).sum();
            a += SET_A.map(|v| f64::from((row[v as usize] - m).exp())).sum::<f64>() / z;
            b += SET_B.map(|v| f64::from((row[v as usize] - m).exp())).sum::<f64>() / z;
        }
        mass_a.push(a / rows as f64);
        mass_b.push(b / rows as f64);
    }
    // The base model, for reference.
    let mut base_a = 0.0;
    for c in &contexts {
        let h = dec.hidden_states(c).unwrap();
        let mut logits = vec![0.0f32; h.len() / dec.dim() * dec.vocab()];
        memsteer_kernels::matmul_transposed(
            &memsteer_kernels::Device::Cpu,
            &h,
            dec.output_embedding(),
            h.len() / dec.dim(),
            dec.dim(),
            dec.vocab(),
            &mut logits,
        )
        .unwrap();
        for row in logits.chunks(dec.vocab()) {
            let m = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let z: f64 = row.iter().map(|&l| f64::from((l - m).exp())).sum();
            base_a += SET_A.map(|v| f64::from((row[v as usize] - m).exp())).sum::<f64>() / z;
        }
    }
    eprintln!(
        "planted task: base model mass on A {:.4} (8 of 50 tokens: {:.4} if uniform)",
        base_a / rows as f64,
        8.0 / 50.0
    );
    eprintln!("planted task: strengths −2, −1, 0, 1, 2: mass on A {mass_a:.4?}, mass on B {mass_b:.4?}");
    for w in mass_a.windows(2) {
        assert!(w[1] > w[0], "mass on A not increasing: {mass_a:?}");
    }
    for w in mass_b.windows(2) {
        assert!(w[1] < w[0], "mass on B not decreasing: {mass_b:?}");
    }
    assert!(mass_a[4] > mass_a[0] + 0.1, "too small an effect on A: {mass_a:?}");
    assert!(mass_b[0] > mass_b[4] + 0.1, "too small an effect on B: {mass_b:?}");
}

/// Training gives bitwise the same parameters on 1 and on 3 rayon threads.
#[test]
fn training_is_identical_across_thread_counts() {
    let model = tiny_gpt2();
    let dec = model.decoder();
    let mut rng = Rng(9);
    let positive = planted_corpus(&mut rng, SET_A, 24);
    let negative = planted_corpus(&mut rng, SET_B, 24);
    let mut config = planted_config();
    config.steps = 25;
    let cache = HiddenCache::build(dec, &positive, &negative, config.max_length).unwrap();
    // More rows per batch than one row block of the fused layer, so blocks split across threads.
    assert!(config.batch_size * 19 > 128);
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        pool.install(|| train_cached(&cache, OutputLayer::of(dec), &config, &mut |_| {}).unwrap())
    };
    let (one, r1) = run(1);
    let (three, r3) = run(3);
    let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(one.projector1()), bits(three.projector1()));
    assert_eq!(bits(one.projector2()), bits(three.projector2()));
    assert_eq!(r1.losses, r3.losses);
    // And a different seed gives a different steer.
    let mut other = config.clone();
    other.seed += 1;
    let (two, _) = train_cached(&cache, OutputLayer::of(dec), &other, &mut |_| {}).unwrap();
    assert_ne!(bits(one.projector1()), bits(two.projector1()));
}

#[test]
fn a_cache_spilled_to_disk_trains_the_same_steer() {
    let model = tiny_gpt2();
    let dec = model.decoder();
    let mut rng = Rng(9);
    let positive = planted_corpus(&mut rng, SET_A, 24);
    let negative = planted_corpus(&mut rng, SET_B, 24);
    let mut config = planted_config();
    config.steps = 10;
    let memory = HiddenCache::build(dec, &positive, &negative, config.max_length).unwrap();
    let dir = tempfile::tempdir().unwrap();
    // A 1 KiB budget: the first sequences stay in memory until it is exceeded, then all of it moves.
    let disk = HiddenCache::build_with(dec, &positive, &negative, config.max_length, 1024, Some(dir.path())).unwrap();
    assert!(!memory.spilled() && disk.spilled());
    assert_eq!((memory.rows(), memory.sequences()), (disk.rows(), disk.sequences()));
    let (a, ra) = train_cached(&memory, OutputLayer::of(dec), &config, &mut |_| {}).unwrap();
    let (b, rb) = train_cached(&disk, OutputLayer::of(dec), &config, &mut |_| {}).unwrap();
    let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(a.projector1()), bits(b.projector1()));
    assert_eq!(bits(a.projector2()), bits(b.projector2()));
    assert_eq!(ra.losses, rb.losses);
    // A spill directory that does not exist is an error naming it, not a panic.
    let missing = dir.path().join("no/such/dir");
    let e = HiddenCache::build_with(dec, &positive, &negative, config.max_length, 1024, Some(&missing)).unwrap_err();
    assert!(e.to_string().contains("no/such/dir"), "{e}");
}

#[test]
fn defaults_are_the_authors() {
    let c = TrainConfig::default();
    assert_eq!((c.epsilon, c.lr, c.beta1, c.beta2, c.adam_epsilon), (1e-3, 1e-2, 0.9, 0.999, 1e-8));
    assert_eq!((c.steps, c.batch_size, c.max_length, c.weight_decay, c.rank), (1000, 32, 256, 0.0, None));
    // rank min(1000, d): d = 16 here.
    let model = tiny_gpt2();
    let (steer, _) = train(
        model.decoder(),
        &[vec![1, 2, 3]],
        &[vec![4, 5, 6]],
        &{
            let mut c = TrainConfig::default();
            c.steps = 1;
            c
        },
        &mut |_| {},
    )
    .unwrap();
    assert_eq!((steer.rank(), steer.num_steers(), steer.has_dummy()), (16, 2, true));
}

#[test]
fn bad_settings_and_corpora_are_clear_errors() {
    let model = tiny_gpt2();
    let dec = model.decoder();
    let ok = vec![vec![1u32, 2, 3]];
    let with = |f: &dyn Fn(&mut TrainConfig)| {
        let mut c = TrainConfig::default();
        c.steps = 1;
        f(&mut c);
        train(dec, &ok, &ok, &c, &mut |_| {}).unwrap_err().to_string()
    };
    assert!(with(&|c| c.lr = 0.0).starts_with("lr: expected"));
    assert!(with(&|c| c.steps = 0).starts_with("steps: expected"));
    assert!(with(&|c| c.rank = Some(0)).starts_with("rank: expected"));
    assert!(with(&|c| c.beta2 = 1.0).starts_with("beta2: expected"));
    assert!(with(&|c| c.epsilon = f32::NAN).starts_with("epsilon: expected"));
    let c = TrainConfig::default();
    let e = train(dec, &[], &ok, &c, &mut |_| {}).unwrap_err().to_string();
    assert!(e.contains("positive corpus"), "{e}");
    let e = train(dec, &ok, &[vec![7]], &c, &mut |_| {}).unwrap_err().to_string();
    assert!(e.contains("negative corpus") && e.contains("two or more tokens"), "{e}");
    let steer = small_steer(dec);
    assert!(steer.strengths(&[f32::INFINITY]).unwrap_err().to_string().contains("finite"));
    assert!(steer.strengths(&[1.0, 2.0]).unwrap_err().to_string().contains("one per labelled steer"));
}

fn small_steer(dec: &dyn Decoder) -> Steer {
    let mut rng = Rng(3);
    let (d, r) = (dec.dim(), 4);
    let spec = SteerSpec {
        num_steers: 2,
        hidden_size: d,
        rank: r,
        vocab_size: dec.vocab(),
        epsilon: 1e-3,
        embedding_fingerprint: embedding_fingerprint(dec.output_embedding()),
        labels: vec!["positive".into()],
    };
    let p1 = (0..2 * d * r).map(|_| rng.sym(1.0)).collect();
    let p2 = (0..2 * d * r).map(|_| rng.sym(1.0)).collect();
    Steer::new(spec, p1, p2, serde_json::json!({"steps": 3})).unwrap()
}

/// (d) Save and load give back the same steer, with the metadata the format names.
#[test]
fn save_load_round_trip() {
    let model = tiny_gpt2();
    let dec = model.decoder();
    let steer = small_steer(dec);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("steer.safetensors");
    steer.save(&path).unwrap();
    let again = Steer::load_for(&path, dec).unwrap();
    assert_eq!(again, steer);
    let bytes = std::fs::read(&path).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let meta = meta.metadata().clone().unwrap();
    let mut keys: Vec<&str> = meta.keys().map(String::as_str).collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "embedding_fingerprint",
            "epsilon",
            "format_version",
            "hidden_size",
            "labels",
            "rank",
            "training",
            "vocab_size"
        ]
    );
    assert_eq!(meta["labels"], r#"["positive"]"#);
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut names = st.names();
    names.sort();
    assert_eq!(names, ["projector1", "projector2"]);
    assert_eq!(st.tensor("projector1").unwrap().shape(), [2, 16, 4]);
    // The same steer is the same bytes, whatever order a hash map would have listed the metadata in.
    for i in 0..4 {
        let other = dir.path().join(format!("again-{i}.safetensors"));
        steer.save(&other).unwrap();
        assert_eq!(std::fs::read(&other).unwrap(), bytes);
    }
}

/// Writes a safetensors file with the given f32 tensors (as raw bytes, so NaN can be planted) and metadata.
fn write_raw(path: &Path, tensors: &[(&str, Dtype, Vec<usize>, Vec<u8>)], meta: &HashMap<String, String>) {
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(n, dt, shape, b)| (n.to_string(), TensorView::new(*dt, shape.clone(), b).unwrap()))
        .collect();
    std::fs::write(path, safetensors::serialize(views, Some(meta.clone())).unwrap()).unwrap();
}

fn f32_bytes(xs: &[f32]) -> Vec<u8> {
    xs.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// (d) Malformed files are errors naming the file and the field.
#[test]
fn malformed_steer_files_are_clear_errors() {
    let model = tiny_gpt2();
    let dec = model.decoder();
    let steer = small_steer(dec);
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.safetensors");
    steer.save(&good).unwrap();
    let bytes = std::fs::read(&good).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let meta = meta.metadata().clone().unwrap();
    let p1 = f32_bytes(steer.projector1());
    let p2 = f32_bytes(steer.projector2());
    let shape = vec![2, 16, 4];
    let both = || {
        vec![
            ("projector1", Dtype::F32, shape.clone(), p1.clone()),
            ("projector2", Dtype::F32, shape.clone(), p2.clone()),
        ]
    };

    let check = |name: &str,
                 tensors: Vec<(&str, Dtype, Vec<usize>, Vec<u8>)>,
                 meta: &HashMap<String, String>,
                 field: &str,
                 want: &str| {
        let path = dir.path().join(format!("{name}.safetensors"));
        write_raw(&path, &tensors, meta);
        let err = Steer::load(&path).unwrap_err();
        assert!(matches!(err, SteerError::Format { .. }), "{name}: {err:?}");
        let msg = err.to_string();
        assert!(msg.contains(&path.display().to_string()), "{name}: {msg}");
        assert!(msg.contains(&format!("`{field}`")), "{name}: {msg}");
        assert!(msg.contains(want), "{name}: {msg}");
    };
    check("missing-p2", vec![both().remove(0)], &meta, "projector2", "tensor missing");
    let mut wrong = both();
    wrong[1].2 = vec![2, 16, 3];
    wrong[1].3 = vec![0; 2 * 16 * 3 * 4];
    check(
        "wrong-shape",
        wrong,
        &meta,
        "projector2",
        "expected shape [num_steers, hidden_size 16, rank 4], found [2, 16, 3]",
    );
    let mut steers = both();
    steers[1].2 = vec![3, 16, 4];
    steers[1].3 = vec![0; 3 * 16 * 4 * 4];
    check("steer-count", steers, &meta, "projector2", "expected 2 steers like projector1, found 3");
    let mut nan = steer.projector1().to_vec();
    nan[5] = f32::NAN;
    let mut with_nan = both();
    with_nan[0].3 = f32_bytes(&nan);
    check("nan", with_nan, &meta, "projector1", "expected finite values, found NaN at index 5");
    let mut f64s = both();
    f64s[0] = ("projector1", Dtype::F64, vec![2, 16, 2], p1.clone());
    check("dtype", f64s, &meta, "projector1", "expected dtype F32, found F64");
    let mut extra = both();
    extra.push(("bias", Dtype::F32, vec![1], vec![0; 4]));
    check("extra", extra, &meta, "bias", "unexpected tensor");
    for (field, value, want) in [
        ("epsilon", Some("abc"), "expected a finite number, found \"abc\""),
        ("epsilon", Some("inf"), "expected a finite number"),
        ("rank", None, "missing from the metadata"),
        ("rank", Some("0"), "expected a positive integer"),
        ("hidden_size", Some("-3"), "expected a positive integer"),
        ("vocab_size", None, "missing from the metadata"),
        ("labels", Some("positive"), "expected a JSON list of strings"),
        ("labels", Some("[\"a\",\"b\",\"c\"]"), "expected 2 or 1 labels for 2 steers, found 3"),
        ("training", Some("{"), "expected JSON"),
        ("embedding_fingerprint", Some("xyz"), "expected 16 hexadecimal digits"),
        ("format_version", Some("2"), "expected 1, found 2"),
    ] {
        let mut m = meta.clone();
        match value {
            Some(v) => m.insert(field.to_string(), v.to_string()),
            None => m.remove(field),
        };
        check(&format!("meta-{field}-{}", value.unwrap_or("none").len()), both(), &m, field, want);
    }
    // Rank and shape disagreeing is a shape error on the tensor.
    let mut m = meta.clone();
    m.insert("rank".into(), "5".into());
    check("rank-mismatch", both(), &m, "projector1", "rank 5");
    // Not safetensors at all.
    let junk = dir.path().join("junk.safetensors");
    std::fs::write(&junk, b"not a steer").unwrap();
    let msg = Steer::load(&junk).unwrap_err().to_string();
    assert!(msg.contains("junk.safetensors") && msg.contains("`safetensors`"), "{msg}");
    // Missing file.
    let msg = Steer::load(&dir.path().join("absent.safetensors")).unwrap_err().to_string();
    assert!(msg.contains("absent.safetensors"), "{msg}");
}

/// Loading a steer into another model (shape or embedding) is an error that says to use `transfer`.
#[test]
fn steer_for_another_model_is_refused() {
    let model = tiny_gpt2();
    let steer = small_steer(model.decoder());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.safetensors");
    steer.save(&path).unwrap();
    // Another hidden size.
    let neox = Model::load(&fixture("tiny-neox-sequential-f32")).unwrap();
    let msg = Steer::load_for(&path, neox.decoder()).unwrap_err().to_string();
    assert!(msg.contains("s.safetensors") && msg.contains("hidden_size is 16 in the steer but 24"), "{msg}");
    assert!(msg.contains("use `transfer`"), "{msg}");
    // Same shapes, other embedding: the fingerprint catches it.
    let mut spec_fp = steer.fingerprint().to_string();
    spec_fp.replace_range(0..1, if spec_fp.starts_with('0') { "1" } else { "0" });
    let other = Steer::new(
        SteerSpec {
            num_steers: 2,
            hidden_size: 16,
            rank: 4,
            vocab_size: 50,
            epsilon: 1e-3,
            embedding_fingerprint: spec_fp,
            labels: vec!["positive".into()],
        },
        steer.projector1().to_vec(),
        steer.projector2().to_vec(),
        serde_json::json!({}),
    )
    .unwrap();
    let path2 = dir.path().join("other.safetensors");
    other.save(&path2).unwrap();
    let msg = Steer::load_for(&path2, model.decoder()).unwrap_err().to_string();
    assert!(msg.contains("embedding_fingerprint") && msg.contains("use `transfer`"), "{msg}");
}

#[test]
fn fingerprint_is_stable_and_sensitive() {
    let e: Vec<f32> = (0..64).map(|i| i as f32 * 0.25).collect();
    // Pinned value (computed independently in Python: FNV-1a 64 over the u64 LE length, then the f32 LE
    // values): the fingerprint is part of the file format.
    let fp = embedding_fingerprint(&e);
    assert_eq!(fp, "3aa1c812c8d2b5cb");
    assert_eq!(fp, embedding_fingerprint(&e.clone()));
    let mut f = e.clone();
    f[63] += 1e-6;
    assert_ne!(fp, embedding_fingerprint(&f));
    // Large embeddings are sampled, still sensitive to the sampled values and to the length.
    let big = vec![0.5f32; (1 << 20) + 7];
    assert_ne!(embedding_fingerprint(&big), embedding_fingerprint(&big[..big.len() - 1]));
}

/// The cache keeps `max_length` tokens of each sequence (one row per predicted token) and skips sequences of
/// fewer than two tokens.
#[test]
fn hidden_cache_truncates_and_skips() {
    let model = tiny_gpt2();
    let dec = model.decoder();
    let long: Vec<u32> = (0..20).map(|i| i % 50).collect();
    let cache = HiddenCache::build(dec, &[long.clone(), vec![3]], &[long.clone(), long[..3].to_vec()], 6).unwrap();
    assert_eq!((cache.sequences(), cache.rows(), cache.skipped(), cache.dim()), (3, 5 + 5 + 2, 1, 16));
    let msg =
        HiddenCache::build(dec, std::slice::from_ref(&long), std::slice::from_ref(&long), 1).unwrap_err().to_string();
    assert!(msg.starts_with("max_length: expected at least 2"), "{msg}");
}

/// Timing of one training step at GPT-2 small's output-layer shape (d 768, vocab 50,257, rank 768, 256 rows);
/// slow, so behind `MEMSTEER_SLOW=1`.
#[test]
fn slow_training_step_timing_at_gpt2_shape() {
    if std::env::var("MEMSTEER_SLOW").as_deref() != Ok("1") {
        eprintln!("skipped: set MEMSTEER_SLOW=1");
        return;
    }
    let (n, d, r, vocab) = (256, 768, 768, 50_257);
    let mut rng = Rng(1);
    let h: Vec<f32> = (0..n * d).map(|_| rng.sym(1.0)).collect();
    let e: Vec<f32> = (0..vocab * d).map(|_| rng.sym(0.05)).collect();
    let p1: Vec<f32> = (0..2 * d * r).map(|_| rng.sym(0.01)).collect();
    let p2 = p1.clone();
    let strengths: Vec<f32> = (0..n).flat_map(|t| [if t % 2 == 0 { 1.0 } else { -1.0 }, 1.0]).collect();
    let targets: Vec<u32> = (0..n).map(|_| rng.below(vocab) as u32).collect();
    let (mut g1, mut g2) = (vec![0.0; p1.len()], vec![0.0; p2.len()]);
    let batch = SteerBatch { hidden: &h, strengths: &strengths, targets: &targets };
    let steers = Steers { p1: &p1, p2: &p2, steers: 2, dim: d, rank: r };
    let start = std::time::Instant::now();
    steer_loss_and_grads(&steers, 1e-3, OutputLayer::uncapped(&e), &batch, &mut g1, &mut g2).unwrap();
    let step = start.elapsed();
    let mut grad = vec![0.0f32; n * d];
    let start = std::time::Instant::now();
    nll_and_grad(&h, OutputLayer::uncapped(&e), d, &targets, 1.0, &mut grad).unwrap();
    let fused = start.elapsed();
    let mut lp = vec![0.0f32; n];
    let start = std::time::Instant::now();
    memsteer_kernels::log_prob_targets(&memsteer_kernels::Device::Cpu, &h, &e, d, &targets, &mut lp).unwrap();
    let forward = start.elapsed();
    eprintln!(
        "{} threads, {n} rows: training step {step:.2?}; fused output layer forward+backward {fused:.2?}; kernels' forward only {forward:.2?}",
        rayon::current_num_threads()
    );
}
