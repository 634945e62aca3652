//! memsteer-steer analysis: `explain` (low-rank SVD against a dense `f64` reference, planted directions,
//! the JSON layout) and `transfer` (recovering `QᵀWQ` under an orthogonal change of basis, steered logits
//! preserved, residuals, token matching and errors).

use memsteer_steer::explain::{ExplainConfig, explain, steer_svd};
use memsteer_steer::transfer::{EmbeddingView, Matching, SharedTokens, TransferConfig, TransferMap, fit_map, transfer};
use memsteer_steer::{OutputLayer, Steer, SteerError, SteerSpec, embedding_fingerprint};

/// Singular values of the low-rank SVD against the dense reference, relative to σ_max.
const SVD_RTOL: f64 = 1e-8;
/// `W'` of a transferred steer against `QᵀWQ`, relative to max |QᵀWQ| (f32 storage of the projectors).
const TRANSFER_RTOL: f64 = 1e-5;
/// Steered logits of source and transferred steer, relative to max |logit| (f32 model math).
const LOGITS_RTOL: f64 = 1e-4;

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
    fn normal(&mut self) -> f64 {
        let u = self.uniform().max(1e-300);
        (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * self.uniform()).cos()
    }
}

fn f32s(xs: &[f64]) -> Vec<f32> {
    xs.iter().map(|&x| x as f32).collect()
}

fn f64s(xs: &[f32]) -> Vec<f64> {
    xs.iter().map(|&x| f64::from(x)).collect()
}

/// `A (n×m) · B (m×p)`.
fn matmul(a: &[f64], b: &[f64], n: usize, m: usize, p: usize) -> Vec<f64> {
    let mut c = vec![0.0; n * p];
    for i in 0..n {
        for k in 0..m {
            for j in 0..p {
                c[i * p + j] += a[i * m + k] * b[k * p + j];
            }
        }
    }
    c
}

fn transpose(a: &[f64], n: usize, m: usize) -> Vec<f64> {
    let mut t = vec![0.0; n * m];
    for i in 0..n {
        for j in 0..m {
            t[j * n + i] = a[i * m + j];
        }
    }
    t
}

/// Dense `W_s = P1_s P2_sᵀ` (`d × d`, f64).
fn dense_w(steer: &Steer, s: usize) -> Vec<f64> {
    let (d, r) = (steer.hidden_size(), steer.rank());
    let p1 = f64s(&steer.projector1()[s * d * r..(s + 1) * d * r]);
    let p2 = f64s(&steer.projector2()[s * d * r..(s + 1) * d * r]);
    matmul(&p1, &transpose(&p2, d, r), d, r, d)
}

/// Reference singular values, descending: square roots of the eigenvalues of `WᵀW` by the classical
/// two-sided cyclic Jacobi eigenvalue method (independent of the crate's one-sided SVD).
fn reference_singular_values(w: &[f64], d: usize) -> Vec<f64> {
    let mut a = matmul(&transpose(w, d, d), w, d, d, d);
    for _sweep in 0..100 {
        let off: f64 = (0..d)
            .flat_map(|i| (0..d).filter(move |&j| j != i).map(move |j| (i, j)))
            .map(|(i, j)| a[i * d + j].powi(2))
            .sum();
        let diag: f64 = (0..d).map(|i| a[i * d + i].powi(2)).sum();
        if off <= 1e-32 * diag {
            break;
        }
        for p in 0..d {
            for q in p + 1..d {
                let apq = a[p * d + q];
                if apq == 0.0 {
                    continue;
                }
                let theta = (a[q * d + q] - a[p * d + p]) / (2.0 * apq);
                let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
                let c = 1.0 / (t * t + 1.0).sqrt();
                let s = t * c;
                for k in 0..d {
                    let (akp, akq) = (a[k * d + p], a[k * d + q]);
                    a[k * d + p] = c * akp - s * akq;
                    a[k * d + q] = s * akp + c * akq;
                }
                for k in 0..d {
                    let (apk, aqk) = (a[p * d + k], a[q * d + k]);
                    a[p * d + k] = c * apk - s * aqk;
                    a[q * d + k] = s * apk + c * aqk;
                }
            }
        }
    }
    let mut s: Vec<f64> = (0..d).map(|i| a[i * d + i].max(0.0).sqrt()).collect();
    s.sort_by(|x, y| y.total_cmp(x));
    s
}

/// A random orthogonal `n × n` matrix (Gram–Schmidt on Gaussian rows).
fn random_orthogonal(n: usize, rng: &mut Rng) -> Vec<f64> {
    let mut q = vec![0.0; n * n];
    for i in 0..n {
        let mut v: Vec<f64> = (0..n).map(|_| rng.normal()).collect();
        for _ in 0..2 {
            for r in 0..i {
                let dot: f64 = (0..n).map(|j| v[j] * q[r * n + j]).sum();
                for j in 0..n {
                    v[j] -= dot * q[r * n + j];
                }
            }
        }
        let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
        for j in 0..n {
            q[i * n + j] = v[j] / norm;
        }
    }
    q
}

fn make_steer(
    embedding: &[f32],
    d: usize,
    r: usize,
    num_steers: usize,
    epsilon: f32,
    p1: Vec<f32>,
    p2: Vec<f32>,
) -> Steer {
    let spec = SteerSpec {
        num_steers,
        hidden_size: d,
        rank: r,
        vocab_size: embedding.len() / d,
        epsilon,
        embedding_fingerprint: embedding_fingerprint(embedding),
        labels: vec!["positive".into()],
    };
    Steer::new(spec, p1, p2, serde_json::json!({"steps": 7})).unwrap()
}

fn random_steer(rng: &mut Rng, embedding: &[f32], d: usize, r: usize, epsilon: f32) -> Steer {
    let p1 = (0..2 * d * r).map(|_| rng.normal() as f32).collect();
    let p2 = (0..2 * d * r).map(|_| rng.normal() as f32).collect();
    make_steer(embedding, d, r, 2, epsilon, p1, p2)
}

fn max_abs(xs: &[f64]) -> f64 {
    xs.iter().fold(0.0, |m, x| m.max(x.abs()))
}

fn max_abs_diff(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max)
}

/// The low-rank SVD's singular values equal the dense reference's; `U diag(σ) Vᵀ` rebuilds `W` and both
/// factors are orthonormal; also for a rank-deficient steer and a steer of rank above the hidden size.
#[test]
fn steer_svd_matches_dense_reference() {
    let mut rng = Rng(11);
    for &(d, r, deficient) in &[(24usize, 6usize, false), (24, 6, true), (5, 8, false)] {
        let embedding = f32s(&(0..40 * d).map(|_| rng.normal()).collect::<Vec<_>>());
        let mut p1: Vec<f32> = (0..2 * d * r).map(|_| rng.normal() as f32).collect();
        let p2: Vec<f32> = (0..2 * d * r).map(|_| rng.normal() as f32).collect();
        if deficient {
            // Column 1 of P1_0 equals column 0: W_0 has rank r − 1.
            for i in 0..d {
                p1[i * r + 1] = p1[i * r];
            }
        }
        let steer = make_steer(&embedding, d, r, 2, 1e-3, p1, p2);
        for s in 0..2 {
            let svd = steer_svd(&steer, s).unwrap();
            let w = dense_w(&steer, s);
            let reference = reference_singular_values(&w, d);
            let smax = reference[0];
            let k = r.min(d);
            let true_rank = if deficient && s == 0 { k - 1 } else { k };
            let mut worst = 0.0f64;
            for (got, want) in svd.singular_values.iter().zip(&reference).take(true_rank) {
                worst = worst.max((got - want).abs() / want);
            }
            assert!(worst <= SVD_RTOL, "d {d} r {r} steer {s}: relative error {worst:e}");
            for i in true_rank..r {
                assert!(svd.singular_values[i] <= 1e-12 * smax, "σ_{i} = {:e}", svd.singular_values[i]);
            }
            eprintln!("d {d} r {r} deficient {deficient} steer {s}: max relative error of σ {worst:.2e}");
            // Rebuild W from the triples.
            let mut us = svd.u.clone();
            for row in 0..d {
                for i in 0..r {
                    us[row * r + i] *= svd.singular_values[i];
                }
            }
            let rebuilt = matmul(&us, &transpose(&svd.v, d, r), d, r, d);
            assert!(max_abs_diff(&rebuilt, &w) <= 1e-12 * max_abs(&w));
            let vtv = matmul(&transpose(&svd.v, d, r), &svd.v, r, d, r);
            for i in 0..true_rank {
                for j in 0..true_rank {
                    let want = if i == j { 1.0 } else { 0.0 };
                    assert!((vtv[i * r + j] - want).abs() < 1e-12);
                }
            }
        }
    }
}

/// A planted steer `W = σ₁ a bᵀ + σ₂ a₂ b₂ᵀ` with `b = E[k]/|E[k]|` puts token `k` first on the positive
/// side of the top direction, and the token planted as `−E[k]` first on the negative side, whatever the
/// sign of `a`; the second direction finds its own planted token.
#[test]
fn explain_finds_planted_directions() {
    let (d, vocab, k, k_neg, k2) = (16usize, 60usize, 17usize, 40usize, 5usize);
    for flip in [1.0f64, -1.0] {
        let mut rng = Rng(21);
        let mut e: Vec<f64> = (0..vocab * d).map(|_| rng.normal() * 0.3).collect();
        for j in 0..d {
            e[k * d + j] *= 4.0;
            e[k_neg * d + j] = -0.8 * e[k * d + j];
            e[k2 * d + j] *= 4.0;
        }
        let embedding = f32s(&e);
        let e = f64s(&embedding);
        let unit = |v: Vec<f64>| {
            let n = v.iter().map(|x| x * x).sum::<f64>().sqrt();
            v.into_iter().map(|x| x / n).collect::<Vec<_>>()
        };
        let b = unit(e[k * d..(k + 1) * d].to_vec());
        // b₂: E[k2] with its component along b removed.
        let raw2 = e[k2 * d..(k2 + 1) * d].to_vec();
        let c: f64 = raw2.iter().zip(&b).map(|(x, y)| x * y).sum();
        let b2 = unit(raw2.iter().zip(&b).map(|(x, y)| x - c * y).collect());
        let a = unit((0..d).map(|_| rng.normal()).collect());
        let a2raw: Vec<f64> = (0..d).map(|_| rng.normal()).collect();
        let ca: f64 = a2raw.iter().zip(&a).map(|(x, y)| x * y).sum();
        let a2 = unit(a2raw.iter().zip(&a).map(|(x, y)| x - ca * y).collect());
        let (s1, s2) = (5.0, 2.0);
        // Rank 2: P1 = [σ₁ a, σ₂ a₂] (times flip), P2 = [b, b₂].
        let mut p1 = vec![0.0f32; d * 2];
        let mut p2 = vec![0.0f32; d * 2];
        for i in 0..d {
            p1[i * 2] = (flip * s1 * a[i]) as f32;
            p1[i * 2 + 1] = (flip * s2 * a2[i]) as f32;
            p2[i * 2] = b[i] as f32;
            p2[i * 2 + 1] = b2[i] as f32;
        }
        let steer = make_steer(&embedding, d, 2, 1, 1e-3, p1, p2);
        let names = |id: u32| Some(format!("tok{id}"));
        let config = ExplainConfig { dims: 2, top: 3 };
        let ex = explain(&steer, &embedding, &config, &names).unwrap();
        assert_eq!(ex.dimensions.len(), 2);
        let top = &ex.dimensions[0];
        assert!((top.singular_value - s1).abs() < 1e-5 * s1, "σ₁ = {}", top.singular_value);
        assert_eq!(top.positive[0].id, k as u32, "flip {flip}");
        assert_eq!(top.negative[0].id, k_neg as u32, "flip {flip}");
        assert!(top.positive[0].score > 0.0 && top.negative[0].score < 0.0);
        let norm_k = e[k * d..(k + 1) * d].iter().map(|x| x * x).sum::<f64>().sqrt();
        assert!((top.positive[0].score - norm_k).abs() < 1e-5 * norm_k);
        assert!(top.positive.windows(2).all(|w| w[0].score >= w[1].score));
        assert!(top.negative.windows(2).all(|w| w[0].score <= w[1].score));
        let second = &ex.dimensions[1];
        assert_eq!(second.rank, 1);
        assert!((second.singular_value - s2).abs() < 1e-5 * s2);
        assert_eq!(second.positive[0].id, k2 as u32);
        assert_eq!(second.positive[0].token.as_deref(), Some(format!("tok{k2}").as_str()));
    }
}

/// The JSON layout of the issue, the readable table, and the errors of explain.
#[test]
fn explain_json_layout_and_errors() {
    let mut rng = Rng(5);
    let d = 8;
    let embedding = f32s(&(0..20 * d).map(|_| rng.normal()).collect::<Vec<_>>());
    let steer = random_steer(&mut rng, &embedding, d, 3, 1e-3);
    let names = |id: u32| if id.is_multiple_of(2) { Some(format!("t{id}")) } else { None };
    let ex = explain(&steer, &embedding, &ExplainConfig { dims: 10, top: 4 }, &names).unwrap();
    // dims capped at the rank; only the labelled steer (not the dummy).
    assert_eq!(ex.dimensions.len(), 3);
    assert!(ex.dimensions.iter().all(|x| x.steer == 0));
    let json = serde_json::to_value(&ex).unwrap();
    let dim0 = &json["dimensions"][0];
    for key in ["steer", "rank", "singular_value", "positive", "negative"] {
        assert!(dim0.get(key).is_some(), "missing {key}");
    }
    let t = &dim0["positive"][0];
    assert!(t["id"].is_u64() && t["score"].is_f64() && t.get("token").is_some());
    assert_eq!(dim0["positive"].as_array().unwrap().len(), 4);
    let back: memsteer_steer::explain::Explanation = serde_json::from_value(json).unwrap();
    assert_eq!(back, ex);
    let table = ex.to_string();
    assert!(table.contains("steer 0 · dimension 0"));
    // Errors.
    let other = f32s(&(0..20 * d).map(|_| rng.normal()).collect::<Vec<_>>());
    assert!(matches!(
        explain(&steer, &other, &ExplainConfig::default(), &names),
        Err(SteerError::ModelMismatch { field: "embedding_fingerprint", .. })
    ));
    assert!(matches!(explain(&steer, &embedding[..d], &ExplainConfig::default(), &names), Err(SteerError::Input(_))));
    assert!(matches!(
        explain(&steer, &embedding, &ExplainConfig { dims: 0, top: 3 }, &names),
        Err(SteerError::Config { field: "dims", .. })
    ));
    assert!(steer_svd(&steer, 2).is_err());
}

/// With `E_to = E_from Q` for a random orthogonal `Q`, the transferred steer's `W'` is `QᵀWQ`, the residual
/// is at f32 rounding, the steered logits on `h_to = h_from Q` equal the source's, and the metadata says so.
#[test]
fn transfer_recovers_rotated_steer() {
    let mut rng = Rng(31);
    let (d, vocab, r) = (12usize, 64usize, 3usize);
    let e_from: Vec<f64> = (0..vocab * d).map(|_| rng.normal()).collect();
    let e_from32 = f32s(&e_from);
    let q = random_orthogonal(d, &mut rng);
    let e_to32 = f32s(&matmul(&f64s(&e_from32), &q, vocab, d, d));
    let steer = random_steer(&mut rng, &e_from32, d, r, 0.05);
    let from = EmbeddingView::new(&e_from32, d).unwrap();
    let to = EmbeddingView::new(&e_to32, d).unwrap();
    let shared = SharedTokens::by_id(vocab, vocab).unwrap();
    assert_eq!(shared.matching, Matching::ById);
    let (moved, map) = transfer(&steer, &from, &to, &shared, &TransferConfig::default()).unwrap();
    eprintln!("rotation: relative residual {:.2e}, ridge {:e}", map.relative_residual, map.ridge);
    assert!(map.relative_residual < 1e-6, "residual {}", map.relative_residual);
    assert_eq!(map.ridge, 0.0);
    assert!(!map.ridge_automatic);
    assert!(max_abs_diff(&map.h, &q) < 1e-5, "H differs from Q by {:e}", max_abs_diff(&map.h, &q));
    assert_eq!((moved.hidden_size(), moved.rank(), moved.vocab_size(), moved.num_steers()), (d, r, vocab, 2));
    assert_eq!(moved.fingerprint(), embedding_fingerprint(&e_to32));
    assert_eq!(moved.epsilon(), steer.epsilon());
    for s in 0..2 {
        let want = matmul(&transpose(&q, d, d), &matmul(&dense_w(&steer, s), &q, d, d, d), d, d, d);
        let got = dense_w(&moved, s);
        let err = max_abs_diff(&got, &want) / max_abs(&want);
        eprintln!("rotation: steer {s}: |W' − QᵀWQ| / max|QᵀWQ| = {err:.2e}");
        assert!(err <= TRANSFER_RTOL, "steer {s}: {err:e}");
    }
    let t = &moved.training()["transfer"];
    assert_eq!(moved.training()["steps"], 7);
    assert_eq!(t["matching"], "id");
    assert_eq!(t["shared_tokens"], vocab);
    assert_eq!(t["pairs_used"], vocab);
    assert_eq!(t["from_hidden_size"], d);
    assert_eq!(t["from_embedding_fingerprint"], steer.fingerprint());
    assert_eq!(t["ridge_automatic"], false);
    assert!(t["top_k"].is_null());
    assert!(t["relative_residual"].as_f64().unwrap() < 1e-6);
    // Steered logits agree on corresponding hidden states.
    let rows = 5;
    let h_from = f32s(&(0..rows * d).map(|_| rng.normal()).collect::<Vec<_>>());
    let h_to = f32s(&matmul(&f64s(&h_from), &q, rows, d, d));
    for strength in [-2.0f32, 0.0, 3.0] {
        let src = f64s(
            &steer.logits(&h_from, OutputLayer::uncapped(&e_from32), &steer.strengths(&[strength]).unwrap()).unwrap(),
        );
        let dst =
            f64s(&moved.logits(&h_to, OutputLayer::uncapped(&e_to32), &moved.strengths(&[strength]).unwrap()).unwrap());
        let err = max_abs_diff(&src, &dst) / max_abs(&src);
        assert!(err <= LOGITS_RTOL, "strength {strength}: {err:e}");
    }
    // The steer's own effect (strength 3 minus strength −2) is preserved too, not only the base logits.
    let effect = |st: &Steer, h: &[f32], e: &[f32]| {
        let hi = f64s(&st.logits(h, OutputLayer::uncapped(e), &st.strengths(&[3.0]).unwrap()).unwrap());
        let lo = f64s(&st.logits(h, OutputLayer::uncapped(e), &st.strengths(&[-2.0]).unwrap()).unwrap());
        hi.iter().zip(&lo).map(|(a, b)| a - b).collect::<Vec<_>>()
    };
    let (a, b) = (effect(&steer, &h_from, &e_from32), effect(&moved, &h_to, &e_to32));
    let err = max_abs_diff(&a, &b) / max_abs(&a);
    eprintln!("rotation: steer effect on logits, relative error {err:.2e} (effect size {:.3})", max_abs(&a));
    assert!(max_abs(&a) > 0.1 && err < 1e-3, "{err:e}");
    // Round trip through a file keeps the transfer record.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("moved.safetensors");
    moved.save(&path).unwrap();
    assert_eq!(Steer::load(&path).unwrap(), moved);
}

/// A target of another hidden size (`E_to = E_from A`, `A` 12 × 16): the paper's fit `E_from ≈ E_to Hᵀ`
/// is singular (the automatic ridge) and its solution inverts `A` (`H Aᵀ = I`), `W' = HᵀWH`, rank kept.
#[test]
fn transfer_to_a_wider_model() {
    let mut rng = Rng(41);
    let (d, dt, vocab, r) = (12usize, 16usize, 80usize, 4usize);
    let e_from32 = f32s(&(0..vocab * d).map(|_| rng.normal()).collect::<Vec<_>>());
    let a: Vec<f64> = (0..d * dt).map(|_| rng.normal() / (d as f64).sqrt()).collect();
    let e_to32 = f32s(&matmul(&f64s(&e_from32), &a, vocab, d, dt));
    let steer = random_steer(&mut rng, &e_from32, d, r, 1e-3);
    let shared = SharedTokens::given((0..vocab as u32).map(|i| (i, i)).collect());
    let (moved, map) = transfer(
        &steer,
        &EmbeddingView::new(&e_from32, d).unwrap(),
        &EmbeddingView::new(&e_to32, dt).unwrap(),
        &shared,
        &TransferConfig::default(),
    )
    .unwrap();
    assert!(map.relative_residual < 1e-6);
    assert!(map.ridge_automatic);
    assert_eq!((moved.hidden_size(), moved.rank()), (dt, r));
    assert_eq!((map.d_from, map.d_to), (d, dt));
    let identity: Vec<f64> = (0..d * d).map(|k| if k / d == k % d { 1.0 } else { 0.0 }).collect();
    let hat = matmul(&map.h, &transpose(&a, d, dt), d, dt, d);
    assert!(max_abs_diff(&hat, &identity) < 1e-5, "H Aᵀ − I: {:e}", max_abs_diff(&hat, &identity));
    let h = &map.h;
    let want = matmul(&transpose(h, d, dt), &matmul(&dense_w(&steer, 0), h, d, d, dt), dt, d, dt);
    let err = max_abs_diff(&dense_w(&moved, 0), &want) / max_abs(&want);
    assert!(err <= TRANSFER_RTOL, "{err:e}");
    assert_eq!(moved.training()["transfer"]["matching"], "given");
}

/// Noise in the target's embeddings gives a positive residual; `top_k` limits the pairs used; a ridge
/// shrinks `H`.
#[test]
fn noisy_transfer_has_a_residual() {
    let mut rng = Rng(51);
    let (d, vocab) = (10usize, 200usize);
    let e_from: Vec<f64> = (0..vocab * d).map(|_| rng.normal()).collect();
    let q = random_orthogonal(d, &mut rng);
    let clean = matmul(&e_from, &q, vocab, d, d);
    let noisy: Vec<f64> = clean.iter().map(|x| x + 0.3 * rng.normal()).collect();
    let (e_from32, e_to32) = (f32s(&e_from), f32s(&noisy));
    let from = EmbeddingView::new(&e_from32, d).unwrap();
    let to = EmbeddingView::new(&e_to32, d).unwrap();
    let shared = SharedTokens::by_id(vocab, vocab).unwrap();
    let all = fit_map(&from, &to, &shared, &TransferConfig::default()).unwrap();
    eprintln!("noisy: relative residual {:.4} (noise/signal 0.3)", all.relative_residual);
    assert!(all.relative_residual > 0.2 && all.relative_residual < 0.4, "{}", all.relative_residual);
    assert!(max_abs_diff(&all.h, &q) < 0.2);
    let first =
        fit_map(&from, &to, &shared, &TransferConfig { top_k: Some(30), ridge: 0.0, ..Default::default() }).unwrap();
    assert_eq!((first.pairs_used, first.shared), (30, vocab));
    // Fewer pairs: the fit overfits them, the residual on them is smaller.
    assert!(first.relative_residual < all.relative_residual);
    let ridged =
        fit_map(&from, &to, &shared, &TransferConfig { top_k: None, ridge: 1e4, ..Default::default() }).unwrap();
    let norm = |h: &[f64]| h.iter().map(|x| x * x).sum::<f64>().sqrt();
    assert!(norm(&ridged.h) < 0.5 * norm(&all.h));
    assert_eq!(ridged.ridge, 1e4);
}

/// Token matching by string, the automatic ridge, and every error of transfer.
#[test]
fn transfer_matching_and_errors() {
    let from_names = ["a", "b", "c", "a"];
    let to_names = ["c", "x", "a"];
    let from = |id: u32| from_names.get(id as usize).map(|s| s.to_string());
    let to = |id: u32| to_names.get(id as usize).map(|s| s.to_string());
    let shared = SharedTokens::by_string(4, &from, 3, &to).unwrap();
    assert_eq!(shared.pairs, vec![(0, 2), (2, 0)]);
    assert_eq!(shared.matching, Matching::ByString);
    let m = SharedTokens::matched(4, Some(&from), 3, Some(&to)).unwrap();
    assert_eq!(m, shared);
    assert!(matches!(SharedTokens::matched(4, Some(&from), 3, None), Err(SteerError::Input(_))));
    assert!(matches!(SharedTokens::matched(4, None, 3, None), Err(SteerError::Shape { .. })));
    assert_eq!(SharedTokens::matched(3, None, 3, None).unwrap().matching, Matching::ById);
    let none = |_: u32| Some("zzz".to_string());
    assert!(matches!(SharedTokens::by_string(4, &from, 3, &none), Err(SteerError::NoSharedTokens { .. })));

    let mut rng = Rng(61);
    let (d, vocab) = (12usize, 40usize);
    let e32 = f32s(&(0..vocab * d).map(|_| rng.normal()).collect::<Vec<_>>());
    let steer = random_steer(&mut rng, &e32, d, 2, 1e-3);
    let view = EmbeddingView::new(&e32, d).unwrap();
    let ids = SharedTokens::by_id(vocab, vocab).unwrap();
    // Underdetermined without a ridge, fine with one.
    let few = TransferConfig { top_k: Some(5), ridge: 0.0, ..Default::default() };
    let err = transfer(&steer, &view, &view, &ids, &few).unwrap_err();
    assert!(matches!(err, SteerError::Underdetermined { shared: 5, hidden_size: 12 }), "{err}");
    assert!(err.to_string().contains("ridge"));
    assert!(
        transfer(&steer, &view, &view, &ids, &TransferConfig { top_k: Some(5), ridge: 1e-3, ..Default::default() })
            .is_ok()
    );
    // Singular normal equations (all embeddings in a 3-dimensional subspace): automatic tiny ridge.
    let basis: Vec<f64> = (0..3 * d).map(|_| rng.normal()).collect();
    let coef: Vec<f64> = (0..vocab * 3).map(|_| rng.normal()).collect();
    let flat32 = f32s(&matmul(&coef, &basis, vocab, 3, d));
    let flat = EmbeddingView::new(&flat32, d).unwrap();
    let fit = fit_map(&flat, &view, &ids, &TransferConfig::default()).unwrap();
    assert!(fit.ridge > 0.0 && fit.ridge_automatic, "expected an automatic ridge");
    // Mismatches.
    let other32 = f32s(&(0..vocab * d).map(|_| rng.normal()).collect::<Vec<_>>());
    let other = EmbeddingView::new(&other32, d).unwrap();
    assert!(matches!(
        transfer(&steer, &other, &view, &ids, &TransferConfig::default()),
        Err(SteerError::ModelMismatch { field: "embedding_fingerprint", .. })
    ));
    let narrow = EmbeddingView::new(&e32, 6).unwrap();
    assert!(matches!(
        transfer(&steer, &narrow, &view, &ids, &TransferConfig::default()),
        Err(SteerError::ModelMismatch { field: "hidden_size", .. })
    ));
    assert!(matches!(EmbeddingView::new(&e32[..7], d), Err(SteerError::Shape { .. })));
    let out_of_range = SharedTokens::given(vec![(0, 0), (vocab as u32, 1)]);
    assert!(matches!(fit_map(&view, &view, &out_of_range, &TransferConfig::default()), Err(SteerError::Shape { .. })));
    assert!(matches!(
        fit_map(&view, &view, &SharedTokens::given(vec![]), &TransferConfig::default()),
        Err(SteerError::NoSharedTokens { .. })
    ));
    assert!(matches!(
        fit_map(&view, &view, &ids, &TransferConfig { top_k: None, ridge: -1.0, ..Default::default() }),
        Err(SteerError::Config { field: "ridge", .. })
    ));
    assert!(matches!(
        fit_map(&view, &view, &ids, &TransferConfig { top_k: Some(0), ridge: 0.0, ..Default::default() }),
        Err(SteerError::Config { field: "top_k", .. })
    ));
}

/// Timing of explain and transfer at GPT-2 small's shape (d 768, rank 768, vocabulary 50,257) and of the
/// fit to a GPT-2 medium width (1024) on the authors' 4,000 pairs; slow, so behind `MEMSTEER_SLOW=1`.
#[test]
fn slow_explain_and_transfer_timing_at_gpt2_shape() {
    if std::env::var("MEMSTEER_SLOW").as_deref() != Ok("1") {
        eprintln!("skipped: set MEMSTEER_SLOW=1");
        return;
    }
    let (d, r, vocab, dt) = (768usize, 768usize, 50_257usize, 1024usize);
    let mut rng = Rng(71);
    let e32: Vec<f32> = (0..vocab * d).map(|_| (0.05 * rng.normal()) as f32).collect();
    let spec = SteerSpec {
        num_steers: 2,
        hidden_size: d,
        rank: r,
        vocab_size: vocab,
        epsilon: 1e-3,
        embedding_fingerprint: embedding_fingerprint(&e32),
        labels: vec!["positive".into()],
    };
    let p1: Vec<f32> = (0..2 * d * r).map(|_| (0.01 * rng.normal()) as f32).collect();
    let p2: Vec<f32> = (0..2 * d * r).map(|_| (0.01 * rng.normal()) as f32).collect();
    let steer = Steer::new(spec, p1, p2, serde_json::json!({})).unwrap();
    let t = std::time::Instant::now();
    let ex = explain(&steer, &e32, &ExplainConfig { dims: 5, top: 10 }, &|_| None).unwrap();
    eprintln!("explain d {d} rank {r} vocab {vocab}: {:.2} s", t.elapsed().as_secs_f64());
    assert_eq!(ex.dimensions.len(), 5);
    let a: Vec<f32> = (0..d * dt).map(|_| (rng.normal() / (d as f64).sqrt()) as f32).collect();
    // Rows past the 4,000 fitted ones only need to exist.
    let mut to32: Vec<f32> = (0..vocab * dt).map(|_| (0.05 * rng.normal()) as f32).collect();
    to32[..4000 * dt].iter_mut().for_each(|x| *x = 0.0);
    for v in 0..4000 {
        for k in 0..d {
            let x = e32[v * d + k];
            for (o, &y) in to32[v * dt..(v + 1) * dt].iter_mut().zip(&a[k * dt..(k + 1) * dt]) {
                *o += x * y;
            }
        }
    }
    let t = std::time::Instant::now();
    let (moved, map) = transfer(
        &steer,
        &EmbeddingView::new(&e32, d).unwrap(),
        &EmbeddingView::new(&to32, dt).unwrap(),
        &SharedTokens::by_id(vocab, vocab).unwrap(),
        &TransferConfig { top_k: Some(4000), ridge: 0.0, ..Default::default() },
    )
    .unwrap();
    eprintln!(
        "transfer {d} → {dt} on 4000 pairs: {:.2} s, relative residual {:.2e}",
        t.elapsed().as_secs_f64(),
        map.relative_residual
    );
    assert_eq!(moved.hidden_size(), dt);
    assert_eq!(moved.training()["transfer"]["inverse"]["ridge_automatic"], true);
}

/// A relation between the models that is linear and invertible but far from orthogonal (`E_to = E_from A`,
/// hidden states `h_from = h_to Aᵀ`, so the base logits agree): the two-sided map carries the steer's
/// effect on the logits exactly; the authors' `Hᵀ W H`, exact only for orthogonal maps, does not.
#[test]
fn two_sided_transfer_is_exact_for_any_invertible_map() {
    let mut rng = Rng(61);
    let (d, vocab, r) = (10usize, 60usize, 3usize);
    let e_from32 = f32s(&(0..vocab * d).map(|_| rng.normal()).collect::<Vec<_>>());
    // A = Q · diag(0.3 … 2.55): invertible, column scales far from equal.
    let q = random_orthogonal(d, &mut rng);
    let a: Vec<f64> = (0..d * d).map(|k| q[k] * (0.3 + 0.25 * (k % d) as f64)).collect();
    let e_to32 = f32s(&matmul(&f64s(&e_from32), &a, vocab, d, d));
    let steer = random_steer(&mut rng, &e_from32, d, r, 0.05);
    let (from, to) = (EmbeddingView::new(&e_from32, d).unwrap(), EmbeddingView::new(&e_to32, d).unwrap());
    let shared = SharedTokens::by_id(vocab, vocab).unwrap();
    let rows = 5;
    let h_to = f32s(&(0..rows * d).map(|_| rng.normal()).collect::<Vec<_>>());
    let h_from = f32s(&matmul(&f64s(&h_to), &transpose(&a, d, d), rows, d, d));
    let effect = |st: &Steer, h: &[f32], e: &[f32]| {
        let hi = f64s(&st.logits(h, OutputLayer::uncapped(e), &st.strengths(&[3.0]).unwrap()).unwrap());
        let lo = f64s(&st.logits(h, OutputLayer::uncapped(e), &st.strengths(&[-2.0]).unwrap()).unwrap());
        hi.iter().zip(&lo).map(|(a, b)| a - b).collect::<Vec<_>>()
    };
    let want = effect(&steer, &h_from, &e_from32);
    assert!(max_abs(&want) > 0.1, "effect {}", max_abs(&want));
    let run = |map: TransferMap| {
        let (moved, _) = transfer(&steer, &from, &to, &shared, &TransferConfig { map, ..Default::default() }).unwrap();
        let err = max_abs_diff(&effect(&moved, &h_to, &e_to32), &want) / max_abs(&want);
        (moved, err)
    };
    let (two, two_err) = run(TransferMap::TwoSided);
    let (_, paper_err) = run(TransferMap::Paper);
    let (_, authors_err) = run(TransferMap::Authors);
    eprintln!("invertible map: effect error two-sided {two_err:.2e}, paper {paper_err:.2e}, authors {authors_err:.2e}");
    assert!(two_err < 1e-3, "two-sided: {two_err:e}");
    assert!(paper_err > 0.1, "HᵀWH should miss a non-orthogonal map, error {paper_err:e}");
    assert!(authors_err > 0.1, "BWBᵀ should miss a non-orthogonal map, error {authors_err:e}");
    let t = &two.training()["transfer"];
    assert_eq!(t["map"], "two-sided");
    assert!(t["inverse"]["relative_residual"].as_f64().unwrap() < 1e-6);
    assert_eq!(t["inverse"]["pairs_used"], vocab);
    // A wider target (E_to = E_from B, B d × dt of full row rank, h_from = h_to Bᵀ): the base logits still
    // agree and the two-sided map is still exact (the inverse fit's XᵀX is singular: the automatic ridge).
    let dt = d + 4;
    let b: Vec<f64> = (0..d * dt).map(|_| rng.normal()).collect();
    let e_wide = f32s(&matmul(&f64s(&e_from32), &b, vocab, d, dt));
    let wide = EmbeddingView::new(&e_wide, dt).unwrap();
    let h_wide = f32s(&(0..rows * dt).map(|_| rng.normal()).collect::<Vec<_>>());
    let h_src = f32s(&matmul(&f64s(&h_wide), &transpose(&b, d, dt), rows, dt, d));
    let want = effect(&steer, &h_src, &e_from32);
    let two_sided = TransferConfig { map: TransferMap::TwoSided, ..Default::default() };
    let (moved, _) = transfer(&steer, &from, &wide, &shared, &two_sided).unwrap();
    assert_eq!(moved.hidden_size(), dt);
    assert_eq!(moved.training()["transfer"]["inverse"]["ridge_automatic"], true);
    let err = max_abs_diff(&effect(&moved, &h_wide, &e_wide), &want) / max_abs(&want);
    eprintln!("wider target: effect error two-sided {err:.2e}");
    assert!(err < 1e-3, "wider two-sided: {err:e}");
    // On an orthogonal map the two forms agree.
    let e_rot = f32s(&matmul(&f64s(&e_from32), &q, vocab, d, d));
    let rot = EmbeddingView::new(&e_rot, d).unwrap();
    let config = |map| TransferConfig { map, ..Default::default() };
    let (a1, _) = transfer(&steer, &from, &rot, &shared, &config(TransferMap::Paper)).unwrap();
    for map in [TransferMap::TwoSided, TransferMap::Authors] {
        let (a2, _) = transfer(&steer, &from, &rot, &shared, &config(map)).unwrap();
        for s in 0..2 {
            let (w1, w2) = (dense_w(&a1, s), dense_w(&a2, s));
            assert!(max_abs_diff(&w1, &w2) / max_abs(&w1) <= TRANSFER_RTOL, "{map:?}, steer {s}");
        }
    }
}

/// Each map equals its numpy formula (`fixtures/transfer/make_golden.py`: `numpy.linalg.lstsq`, row
/// normalisation, the target's id order and `top_k` for the authors' map) on a pair of models related by a
/// non-orthogonal invertible `A` (cond 8.3) plus noise, to 1e-6 relative; under an orthogonal relation
/// the three maps agree.
#[test]
fn transfer_maps_equal_their_numpy_formulas() {
    let golden: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../fixtures/transfer/golden.json"))
            .expect("golden"),
    )
    .expect("json");
    let nums = |v: &serde_json::Value| -> Vec<f64> {
        let mut out = Vec::new();
        let mut stack = vec![v];
        while let Some(x) = stack.pop() {
            match x {
                serde_json::Value::Array(a) => stack.extend(a.iter().rev()),
                n => out.push(n.as_f64().expect("number")),
            }
        }
        out
    };
    let size = |k: &str| golden[k].as_u64().expect("size") as usize;
    let (vocab, d, r, steers, top_k) = (size("vocab"), size("dim"), size("rank"), size("steers"), size("top_k"));
    let e_from = f32s(&nums(&golden["e_from"]));
    let spec = SteerSpec {
        num_steers: steers,
        hidden_size: d,
        rank: r,
        vocab_size: vocab,
        epsilon: 1e-3,
        embedding_fingerprint: embedding_fingerprint(&e_from),
        labels: vec!["style".into()],
    };
    let steer =
        Steer::new(spec, f32s(&nums(&golden["projector1"])), f32s(&nums(&golden["projector2"])), serde_json::json!({}))
            .unwrap();
    let pairs: Vec<(u32, u32)> = golden["pairs"]
        .as_array()
        .expect("pairs")
        .iter()
        .map(|p| (p[0].as_u64().expect("id") as u32, p[1].as_u64().expect("id") as u32))
        .collect();
    let shared = SharedTokens::given(pairs);
    let from = EmbeddingView::new(&e_from, d).unwrap();
    for (case, target) in [("non_orthogonal", "e_to"), ("orthogonal", "e_rot")] {
        let e_to = f32s(&nums(&golden[target]));
        let to = EmbeddingView::new(&e_to, d).unwrap();
        for map in [TransferMap::Paper, TransferMap::Authors, TransferMap::TwoSided] {
            let top = if map == TransferMap::Authors { Some(top_k) } else { None };
            let (moved, fit) =
                transfer(&steer, &from, &to, &shared, &TransferConfig { map, top_k: top, ..Default::default() })
                    .unwrap();
            assert_eq!(fit.pairs_used, if map == TransferMap::Authors { top_k } else { vocab });
            let want = &golden[case][map.name()];
            for (got, key) in [(moved.projector1(), "projector1"), (moved.projector2(), "projector2")] {
                let w = nums(&want[key]);
                let err = max_abs_diff(&f64s(got), &w) / max_abs(&w);
                eprintln!("{case} {}: {key} relative error {err:.2e}", map.name());
                assert!(err < 1e-6, "{case} {}: {key} differs from numpy by {err:e} (relative)", map.name());
            }
        }
        if case == "non_orthogonal" {
            // The maps really differ here, so the comparison above tells them apart.
            let p = nums(&golden[case]["paper"]["projector1"]);
            for other in ["authors", "two-sided"] {
                let o = nums(&golden[case][other]["projector1"]);
                assert!(max_abs_diff(&p, &o) / max_abs(&p) > 0.05, "{other} equals paper");
            }
        }
    }
    // The authors' map uses its 4,000 by default (here all 90 pairs: more than this vocabulary).
    let e_to = f32s(&nums(&golden["e_to"]));
    let to = EmbeddingView::new(&e_to, d).unwrap();
    let authors = TransferConfig { map: TransferMap::Authors, ..Default::default() };
    let (moved, fit) = transfer(&steer, &from, &to, &shared, &authors).unwrap();
    assert_eq!(fit.pairs_used, vocab);
    assert_eq!(moved.training()["transfer"]["top_k"], 4000);
    assert_eq!(moved.training()["transfer"]["map"], "authors");
}
