//! LM-Steer's Theorem 2, constructively.
//!
//! States carry representations `φ_s ∈ R^d` split into a semantic part (`d_sem` dimensions) and a
//! condition part (`d_cond`). Transitions are `T(s, s') = φ_{s,sem}ᵀ A' φ_{s',sem} + φ_{s,cond}ᵀ φ_{s',cond}`,
//! initial distributions `π = Φᵀ φ_π`, emissions `p(o | s) = φ_sᵀ w_o`. Written as a language model, the
//! forward vector after a prefix is `α_t = c_tᵀ Φ` for a context vector `c_t ∈ R^d`, and the next token
//! has probability `P(v | ctx) ∝ c_tᵀ e_v` with word embedding `e_v = Φ p(v)`.
//!
//! Under Assumption 1 the condition coordinates of `c_t` evolve independently, each multiplied by a
//! scalar per token, so switching the initial condition part from `φ_π,cond` to `φ_π',cond` rescales them:
//! `c'_t = D c_t` with `D = diag(1, …, 1, φ_π',k / φ_π,k, …)`. Replacing the embeddings `e_v` by `W e_v`
//! with `W = D` therefore turns the π-model into the π'-model exactly. `docs/theory.md` has the
//! derivation and the construction used here.

use memsteer_panel::rng::SplitMix64;

use crate::hmm::{Hmm, all_sequences};
use crate::linalg::{matmul, random_distribution, random_orthogonal, solve, transpose};
use crate::{HmmError, Result};

/// An HMM whose state representations satisfy Assumption 1, with its LM view.
#[derive(Debug, Clone)]
pub struct Assumption1Hmm {
    d_sem: usize,
    d_cond: usize,
    vocab: usize,
    /// `Φ`, `d × S` row-major (`phi[i*S + s] = φ_{s,i}`); here `S = d`.
    phi: Vec<f64>,
    /// `A'`, `d_sem × d_sem`.
    a_prime: Vec<f64>,
    /// Emissions `S × V`.
    emit: Vec<f64>,
}

impl Assumption1Hmm {
    /// A random instance: `semantic` semantic states whose representations are the columns of a random
    /// orthogonal matrix, `conditions` condition states with one-hot condition representations (absorbing:
    /// a condition, once drawn, persists), a random semantic Markov chain `P` realised as
    /// `A' = Q P Qᵀ`, and random emissions over `vocab` symbols.
    pub fn random(semantic: usize, conditions: usize, vocab: usize, seed: u64) -> Result<Self> {
        if semantic == 0 || conditions == 0 || vocab < 2 {
            return Err(HmmError::Construction(format!(
                "need ≥ 1 semantic state, ≥ 1 condition state and ≥ 2 symbols, got {semantic}, {conditions}, {vocab}"
            )));
        }
        let mut rng = SplitMix64::new(seed);
        let d = semantic + conditions;
        let q = random_orthogonal(semantic, &mut rng);
        let mut phi = vec![0.0; d * d];
        for i in 0..semantic {
            for s in 0..semantic {
                phi[i * d + s] = q[i * semantic + s];
            }
        }
        for k in 0..conditions {
            phi[(semantic + k) * d + semantic + k] = 1.0;
        }
        let p: Vec<f64> = (0..semantic).flat_map(|_| random_distribution(semantic, &mut rng)).collect();
        let a_prime = matmul(
            &matmul(&q, &p, semantic, semantic, semantic),
            &transpose(&q, semantic, semantic),
            semantic,
            semantic,
            semantic,
        );
        // Peaked emissions (cubed uniforms): states, and so conditions, are distinguishable by their words.
        let emit: Vec<f64> = (0..d)
            .flat_map(|_| {
                let raw: Vec<f64> = (0..vocab).map(|_| rng.uniform().powi(3) + 0.02).collect();
                let z: f64 = raw.iter().sum();
                raw.into_iter().map(move |x| x / z)
            })
            .collect();
        Ok(Self { d_sem: semantic, d_cond: conditions, vocab, phi, a_prime, emit })
    }

    /// Representation dimension `d` (= number of states).
    pub fn dim(&self) -> usize {
        self.d_sem + self.d_cond
    }

    /// Number of semantic dimensions.
    pub fn semantic_dims(&self) -> usize {
        self.d_sem
    }

    /// Vocabulary size.
    pub fn vocab(&self) -> usize {
        self.vocab
    }

    fn phi_at(&self, s: usize, i: usize) -> f64 {
        self.phi[i * self.dim() + s]
    }

    /// The largest violation of Assumption 1's three properties (0 up to rounding for a valid instance):
    /// equal norms of the dimensions, orthogonal dimensions, and vanishing third moments
    /// `Σ_s φ_{s,i} φ_{s,j} φ_{s,k}` for condition `k` unless `i = j = k`.
    pub fn assumption1_violation(&self) -> f64 {
        let d = self.dim();
        let mut worst = 0.0f64;
        let norm0: f64 = (0..d).map(|s| self.phi_at(s, 0).powi(2)).sum();
        for i in 0..d {
            let norm: f64 = (0..d).map(|s| self.phi_at(s, i).powi(2)).sum();
            worst = worst.max((norm - norm0).abs());
            for j in 0..d {
                if i != j {
                    let dot: f64 = (0..d).map(|s| self.phi_at(s, i) * self.phi_at(s, j)).sum();
                    worst = worst.max(dot.abs());
                }
                for k in self.d_sem..d {
                    if !(i == j && j == k) {
                        let m3: f64 = (0..d).map(|s| self.phi_at(s, i) * self.phi_at(s, j) * self.phi_at(s, k)).sum();
                        worst = worst.max(m3.abs());
                    }
                }
            }
        }
        worst
    }

    /// The transition matrix `T(s, s') = φ_{s,sem}ᵀ A' φ_{s',sem} + φ_{s,cond}ᵀ φ_{s',cond}`.
    pub fn transitions(&self) -> Vec<f64> {
        let d = self.dim();
        let mut t = vec![0.0; d * d];
        for s in 0..d {
            for s2 in 0..d {
                let mut v = 0.0;
                for i in 0..self.d_sem {
                    for j in 0..self.d_sem {
                        v += self.phi_at(s, i) * self.a_prime[i * self.d_sem + j] * self.phi_at(s2, j);
                    }
                }
                for k in self.d_sem..d {
                    v += self.phi_at(s, k) * self.phi_at(s2, k);
                }
                // Exact zeros stay zeros; rounding noise around them is clipped.
                t[s * d + s2] = if v.abs() < 1e-14 { 0.0 } else { v };
            }
        }
        t
    }

    /// The initial distribution `π = Φᵀ φ_π`.
    pub fn init_from(&self, phi_pi: &[f64]) -> Vec<f64> {
        let d = self.dim();
        (0..d)
            .map(|s| (0..d).map(|i| self.phi_at(s, i) * phi_pi[i]).sum::<f64>())
            .map(|x| if x.abs() < 1e-15 { 0.0 } else { x })
            .collect()
    }

    /// `φ_π = Φ π` (Φ is orthogonal here) for a distribution `π` over states.
    pub fn representation_of(&self, pi: &[f64]) -> Vec<f64> {
        let d = self.dim();
        (0..d).map(|i| (0..d).map(|s| self.phi_at(s, i) * pi[s]).sum()).collect()
    }

    /// The HMM started from `φ_π`.
    pub fn hmm(&self, phi_pi: &[f64]) -> Result<Hmm> {
        let init = self.init_from(phi_pi);
        let sum: f64 = init.iter().sum();
        let init = init.into_iter().map(|x| (x / sum).max(0.0)).collect();
        Hmm::new(init, self.transitions(), self.emit.clone())
    }

    /// Word embeddings `e_v = Φ p(v)`, `V × d` row-major.
    pub fn embeddings(&self) -> Vec<f64> {
        let d = self.dim();
        let mut e = vec![0.0; self.vocab * d];
        for v in 0..self.vocab {
            for i in 0..d {
                e[v * d + i] = (0..d).map(|s| self.phi_at(s, i) * self.emit[s * self.vocab + v]).sum();
            }
        }
        e
    }

    /// Advances a context vector by one token: `c ← (cᵀ Φ diag(p(o)) Φᵀ B)ᵀ`, `B = blockdiag(A', I)`,
    /// rescaled to unit sum of absolute values (the LM's distribution is scale-free).
    pub fn advance(&self, c: &[f64], o: usize) -> Vec<f64> {
        let d = self.dim();
        // u_s = (cᵀ Φ)_s p(o | s)
        let u: Vec<f64> = (0..d)
            .map(|s| (0..d).map(|i| c[i] * self.phi_at(s, i)).sum::<f64>() * self.emit[s * self.vocab + o])
            .collect();
        // m = Φ u
        let m: Vec<f64> = (0..d).map(|i| (0..d).map(|s| self.phi_at(s, i) * u[s]).sum()).collect();
        let mut next = vec![0.0; d];
        for (j, slot) in next.iter_mut().enumerate().take(self.d_sem) {
            *slot = (0..self.d_sem).map(|i| m[i] * self.a_prime[i * self.d_sem + j]).sum();
        }
        next[self.d_sem..d].copy_from_slice(&m[self.d_sem..d]);
        let norm: f64 = next.iter().map(|x| x.abs()).sum();
        if norm > 0.0 { next.iter().map(|x| x / norm).collect() } else { next }
    }

    /// Next-token distribution of the LM with context `c` and embeddings `W e_v` (`w` is `d×d`
    /// row-major, `None` = identity): `P(v) ∝ cᵀ W e_v`.
    pub fn lm_next(&self, c: &[f64], w: Option<&[f64]>, embeddings: &[f64]) -> Vec<f64> {
        let d = self.dim();
        let cw: Vec<f64> = match w {
            Some(w) => (0..d).map(|j| (0..d).map(|i| c[i] * w[i * d + j]).sum()).collect(),
            None => c.to_vec(),
        };
        let scores: Vec<f64> = (0..self.vocab).map(|v| (0..d).map(|i| cw[i] * embeddings[v * d + i]).sum()).collect();
        let z: f64 = scores.iter().sum();
        scores.into_iter().map(|x| x / z).collect()
    }

    /// Probability of a sequence under the LM started from `φ_π` with embeddings transformed by `w`.
    pub fn lm_sequence_prob(&self, phi_pi: &[f64], w: Option<&[f64]>, embeddings: &[f64], seq: &[usize]) -> f64 {
        let mut c = phi_pi.to_vec();
        let mut p = 1.0;
        for &o in seq {
            p *= self.lm_next(&c, w, embeddings)[o];
            c = self.advance(&c, o);
        }
        p
    }

    /// The W of Theorem 2 for switching `φ_π → φ_π'` (condition parts only): diagonal, 1 on semantic
    /// dimensions and `φ_π',k / φ_π,k` on condition dimensions. Errors when the semantic parts differ or a
    /// condition entry of `φ_π` is zero (the theorem's hypotheses).
    pub fn theorem2_w(&self, phi_pi: &[f64], phi_pi2: &[f64]) -> Result<Vec<f64>> {
        let d = self.dim();
        if let Some(i) = (0..self.d_sem).find(|&i| (phi_pi[i] - phi_pi2[i]).abs() > 1e-12) {
            return Err(HmmError::Construction(format!(
                "φ_π and φ_π' differ in semantic dimension {i}; Theorem 2 needs them to differ only in the condition part"
            )));
        }
        let mut w = vec![0.0; d * d];
        for i in 0..d {
            w[i * d + i] = if i < self.d_sem {
                1.0
            } else if phi_pi[i] != 0.0 {
                phi_pi2[i] / phi_pi[i]
            } else {
                return Err(HmmError::Construction(format!("condition entry {i} of φ_π is zero")));
            };
        }
        Ok(w)
    }

    /// Least-squares `W` mapping the π-model's normalised contexts to the π'-model's over all prefixes
    /// up to `len − 1` tokens (the best linear steer in that sense), for the negative control.
    pub fn fit_w(&self, phi_pi: &[f64], phi_pi2: &[f64], len: usize) -> Result<Vec<f64>> {
        let d = self.dim();
        let e = self.embeddings();
        let normalise = |c: &[f64]| {
            let z: f64 = (0..self.vocab).map(|v| (0..d).map(|i| c[i] * e[v * d + i]).sum::<f64>()).sum();
            c.iter().map(|x| x / z).collect::<Vec<f64>>()
        };
        let (mut xs, mut ys) = (Vec::new(), Vec::new());
        for l in 0..len {
            for prefix in all_sequences(self.vocab, l) {
                let (mut c, mut c2) = (phi_pi.to_vec(), phi_pi2.to_vec());
                for &o in &prefix {
                    c = self.advance(&c, o);
                    c2 = self.advance(&c2, o);
                }
                xs.extend(normalise(&c));
                ys.extend(normalise(&c2));
            }
        }
        let n = xs.len() / d;
        // Normal equations: (XᵀX) W = XᵀY, with a tiny ridge for rank-deficient context sets.
        let xt = transpose(&xs, n, d);
        let mut xtx = matmul(&xt, &xs, d, n, d);
        let trace: f64 = (0..d).map(|i| xtx[i * d + i]).sum();
        for i in 0..d {
            xtx[i * d + i] += 1e-12 * trace;
        }
        let xty = matmul(&xt, &ys, d, n, d);
        solve(&xtx, &xty, d, d).ok_or_else(|| HmmError::Construction("the context vectors are degenerate".into()))
    }
}

/// Result of a Theorem 2 check.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Theorem2Report {
    /// Seed of the construction.
    pub seed: u64,
    /// Semantic states (= semantic dimensions).
    pub semantic_states: usize,
    /// Condition states (= condition dimensions).
    pub condition_states: usize,
    /// Vocabulary size.
    pub vocab: usize,
    /// Longest exhaustively checked sequence length.
    pub length: usize,
    /// Sequences compared exhaustively.
    pub sequences_checked: usize,
    /// Largest violation of Assumption 1 by the construction.
    pub assumption1_violation: f64,
    /// max |P_π'(x) − P_{π, WE}(x)| over all sequences up to `length` (the identity: rounding level).
    pub max_abs_error: f64,
    /// The same, relative to P_π'(x).
    pub max_rel_error: f64,
    /// Largest |log P_π'(o_t | o_<t) − log P_{π,WE}(o_t | o_<t)| along sampled long sequences.
    pub sampled_max_abs_log_error: f64,
    /// Sampled sequences × their length.
    pub sampled_tokens: usize,
    /// Without steering: max |P_π'(x) − P_π(x)| (how different the two distributions are).
    pub unsteered_max_abs_error: f64,
    /// Negative control: π' differs in the semantic part; max |P_π'(x) − P_{π, W_fit E}(x)| with the
    /// least-squares W.
    pub control_max_abs_error: f64,
    /// The same, relative to P_π'(x).
    pub control_max_rel_error: f64,
    /// Diagonal of the Theorem 2 W.
    pub w_diagonal: Vec<f64>,
}

/// Settings of [`check_theorem2`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Theorem2Config {
    /// Seed.
    pub seed: u64,
    /// Semantic states.
    pub semantic_states: usize,
    /// Condition states.
    pub condition_states: usize,
    /// Vocabulary size.
    pub vocab: usize,
    /// Exhaustive check up to this sequence length.
    pub length: usize,
    /// Sampled sequences for the long check.
    pub samples: usize,
    /// Their length.
    pub sample_length: usize,
}

impl Default for Theorem2Config {
    fn default() -> Self {
        Self { seed: 1, semantic_states: 4, condition_states: 2, vocab: 5, length: 5, samples: 20, sample_length: 200 }
    }
}

struct Setup {
    m: Assumption1Hmm,
    rng: SplitMix64,
    phi1: Vec<f64>,
    phi2: Vec<f64>,
    w: Vec<f64>,
    cond1: Vec<f64>,
}

/// The construction shared by the check and the illustration: the model, φ_π, φ_π' and the W.
fn setup(cfg: &Theorem2Config) -> Result<Setup> {
    let m = Assumption1Hmm::random(cfg.semantic_states, cfg.condition_states, cfg.vocab, cfg.seed)?;
    let mut rng = SplitMix64::new(cfg.seed ^ 0xA5A5_A5A5);
    let (ds, dc) = (cfg.semantic_states, cfg.condition_states);
    // π: semantic mass 0.5 spread over semantic states, condition mass 0.5 over condition states;
    // π': the same semantic part, the condition mass redistributed.
    let sem: Vec<f64> = random_distribution(ds, &mut rng).into_iter().map(|x| 0.5 * x).collect();
    // A lopsided condition mix, and π' with the condition masses in reverse order: a clear switch.
    let raw: Vec<f64> = (0..dc).map(|_| rng.uniform().powi(3) + 0.02).collect();
    let z: f64 = raw.iter().sum();
    let cond1: Vec<f64> = raw.iter().map(|x| 0.5 * x / z).collect();
    let cond2: Vec<f64> = cond1.iter().rev().copied().collect();
    let pi1: Vec<f64> = sem.iter().chain(&cond1).copied().collect();
    let pi2: Vec<f64> = sem.iter().chain(&cond2).copied().collect();
    let (phi1, phi2) = (m.representation_of(&pi1), m.representation_of(&pi2));
    let w = m.theorem2_w(&phi1, &phi2)?;
    Ok(Setup { m, rng, phi1, phi2, w, cond1 })
}

/// Next-token distributions after one sampled prefix, for the Theorem 2 figure.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Illustration {
    /// The prefix (sampled from the π' model).
    pub prefix: Vec<usize>,
    /// P(· | prefix) starting from π.
    pub under_pi: Vec<f64>,
    /// P(· | prefix) starting from π'.
    pub under_pi2: Vec<f64>,
    /// P(· | prefix) of the π-model with embeddings W e_v.
    pub steered: Vec<f64>,
}

/// Next-token distributions under π, π' and the steered π-model after a prefix of `prefix_len` tokens.
pub fn illustrate(cfg: &Theorem2Config, prefix_len: usize) -> Result<Illustration> {
    let Setup { m, mut rng, phi1, phi2, w, .. } = setup(cfg)?;
    let (h1, h2) = (m.hmm(&phi1)?, m.hmm(&phi2)?);
    let prefix = h2.sample(prefix_len, &mut rng);
    let e = m.embeddings();
    let mut c = phi1.clone();
    for &o in &prefix {
        c = m.advance(&c, o);
    }
    Ok(Illustration {
        under_pi: h1.next_token(&prefix)?,
        under_pi2: h2.next_token(&prefix)?,
        steered: m.lm_next(&c, Some(&w), &e),
        prefix,
    })
}

/// Builds a random Assumption-1 HMM, two initial distributions differing only in their condition part,
/// the Theorem 2 W, and checks the identity exhaustively and on sampled long sequences; then the negative
/// control with a semantic change.
pub fn check_theorem2(cfg: &Theorem2Config) -> Result<Theorem2Report> {
    if cfg.length == 0 {
        return Err(HmmError::Construction("the exhaustive check needs a sequence length of at least 1".into()));
    }
    if cfg.condition_states < 2 {
        return Err(HmmError::Construction(
            "switching the condition needs ≥ 2 condition states: π and π' share their semantic part, so with one condition state they are equal".into(),
        ));
    }
    if cfg.vocab.checked_pow(cfg.length as u32).is_none_or(|n| n > 2_000_000) {
        return Err(HmmError::Construction(format!(
            "{}^{} sequences are too many to enumerate; lower --length or --vocab",
            cfg.vocab, cfg.length
        )));
    }
    let Setup { m, mut rng, phi1, phi2, w, cond1 } = setup(cfg)?;
    let (ds, dc) = (cfg.semantic_states, cfg.condition_states);
    let e = m.embeddings();
    let h1 = m.hmm(&phi1)?;
    let h2 = m.hmm(&phi2)?;

    let (mut max_abs, mut max_rel, mut unsteered, mut n) = (0.0f64, 0.0f64, 0.0f64, 0usize);
    for len in 1..=cfg.length {
        for seq in all_sequences(cfg.vocab, len) {
            let truth = h2.prob_matrix_form(&seq)?;
            let steered = m.lm_sequence_prob(&phi1, Some(&w), &e, &seq);
            max_abs = max_abs.max((truth - steered).abs());
            max_rel = max_rel.max((truth - steered).abs() / truth);
            unsteered = unsteered.max((truth - h1.prob_matrix_form(&seq)?).abs());
            n += 1;
        }
    }
    let mut sampled = 0.0f64;
    for _ in 0..cfg.samples {
        let seq = h2.sample(cfg.sample_length, &mut rng);
        let mut c = phi1.clone();
        for t in 0..seq.len() {
            let truth = h2.next_token(&seq[..t])?[seq[t]];
            let steered = m.lm_next(&c, Some(&w), &e)[seq[t]];
            sampled = sampled.max((truth.ln() - steered.ln()).abs());
            c = m.advance(&c, seq[t]);
        }
    }

    // Negative control: a semantic change, the best linear W.
    let sem2: Vec<f64> = random_distribution(ds, &mut rng).into_iter().map(|x| 0.5 * x).collect();
    let pi3: Vec<f64> = sem2.iter().chain(&cond1).copied().collect();
    let phi3 = m.representation_of(&pi3);
    let h3 = m.hmm(&phi3)?;
    let w_fit = m.fit_w(&phi1, &phi3, cfg.length)?;
    let (mut control, mut control_rel) = (0.0f64, 0.0f64);
    for seq in all_sequences(cfg.vocab, cfg.length) {
        let truth = h3.prob_matrix_form(&seq)?;
        let gap = (truth - m.lm_sequence_prob(&phi1, Some(&w_fit), &e, &seq)).abs();
        control = control.max(gap);
        control_rel = control_rel.max(gap / truth);
    }
    let d = m.dim();
    Ok(Theorem2Report {
        seed: cfg.seed,
        semantic_states: ds,
        condition_states: dc,
        vocab: cfg.vocab,
        length: cfg.length,
        sequences_checked: n,
        assumption1_violation: m.assumption1_violation(),
        max_abs_error: max_abs,
        max_rel_error: max_rel,
        sampled_max_abs_log_error: sampled,
        sampled_tokens: cfg.samples * cfg.sample_length,
        unsteered_max_abs_error: unsteered,
        control_max_abs_error: control,
        control_max_rel_error: control_rel,
        w_diagonal: (0..d).map(|i| w[i * d + i]).collect(),
    })
}

/// One point of the learned-steer convergence curve.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct LearnedSteer {
    /// Training sequences sampled from the π' process.
    pub samples: usize,
    /// Tokens they hold.
    pub tokens: usize,
    /// Mean total variation between P_π'(·|ctx) and P_(π, W_learned E)(·|ctx) over held-out contexts.
    pub tv: f64,
    /// The same for the unsteered π-model.
    pub tv_unsteered: f64,
    /// Mean KL(P_π'(·|ctx) ‖ P_(π, W_learned E)(·|ctx)) over held-out contexts (sensitive to contexts
    /// where the linear scores of a learned steer come near zero).
    pub kl: f64,
    /// The same for the unsteered π-model, for scale.
    pub kl_unsteered: f64,
    /// The same for the analytic W (rounding level).
    pub kl_analytic: f64,
    /// min_s ‖s W_learned E − W_analytic E‖_F / ‖W_analytic E‖_F: W matters only through the embeddings it
    /// acts on (with fewer symbols than dimensions part of it is unidentified) and only up to scale.
    pub distance_to_analytic: f64,
    /// The learned W, row-major.
    pub w: Vec<f64>,
}

/// Settings of [`learn_steers`].
#[derive(Debug, Clone, PartialEq)]
pub struct LearnConfig {
    /// The construction (as for [`check_theorem2`]).
    pub model: Theorem2Config,
    /// Training-set sizes (sequences) to learn from.
    pub sample_sizes: Vec<usize>,
    /// Tokens per training sequence.
    pub sequence_length: usize,
    /// Levenberg–Marquardt iterations (at most).
    pub steps: usize,
}

impl Default for LearnConfig {
    fn default() -> Self {
        Self {
            model: Theorem2Config::default(),
            sample_sizes: vec![10, 100, 1000, 5000],
            sequence_length: 20,
            steps: 100,
        }
    }
}

/// Mean log-likelihood, gradient and Hessian (row-major over the `d²` entries of `M`) of
/// `log(cᵀ M e_o) − log(cᵀ M s)`, `s = Σ_v e_v`; `None` when a score is not positive.
fn objective(
    data: &[(Vec<f64>, usize)],
    e: &[f64],
    sum_e: &[f64],
    d: usize,
    w: &[f64],
    with_hessian: bool,
) -> Option<(f64, Vec<f64>, Vec<f64>)> {
    let p = d * d;
    let (mut f, mut g) = (0.0, vec![0.0; p]);
    let mut h = if with_hessian { vec![0.0; p * p] } else { Vec::new() };
    let (mut a, mut b) = (vec![0.0; p], vec![0.0; p]);
    for (c, o) in data {
        let cw: Vec<f64> = (0..d).map(|j| (0..d).map(|i| c[i] * w[i * d + j]).sum()).collect();
        let num: f64 = (0..d).map(|j| cw[j] * e[o * d + j]).sum();
        let den: f64 = (0..d).map(|j| cw[j] * sum_e[j]).sum();
        if num.is_nan() || den.is_nan() || num <= 0.0 || den <= 0.0 {
            return None;
        }
        f += num.ln() - den.ln();
        for i in 0..d {
            for j in 0..d {
                a[i * d + j] = c[i] * e[o * d + j] / num;
                b[i * d + j] = c[i] * sum_e[j] / den;
                g[i * d + j] += a[i * d + j] - b[i * d + j];
            }
        }
        if with_hessian {
            for k in 0..p {
                for l in 0..p {
                    h[k * p + l] += b[k] * b[l] - a[k] * a[l];
                }
            }
        }
    }
    let n = data.len() as f64;
    g.iter_mut().for_each(|x| *x /= n);
    h.iter_mut().for_each(|x| *x /= n);
    Some((f / n, g, h))
}

/// Maximises the LM-Steer likelihood over `M` from `M = I` by Levenberg–Marquardt.
fn fit_lm_steer(data: &[(Vec<f64>, usize)], e: &[f64], d: usize, v: usize, max_iter: usize) -> Vec<f64> {
    let p = d * d;
    let sum_e: Vec<f64> = (0..d).map(|i| (0..v).map(|o| e[o * d + i]).sum()).collect();
    let mut w: Vec<f64> = (0..p).map(|k| if k % (d + 1) == 0 { 1.0 } else { 0.0 }).collect();
    let Some((mut f, mut g, mut h)) = objective(data, e, &sum_e, d, &w, true) else { return w };
    let mut lambda = 1e-3 * (0..p).map(|k| h[k * p + k].abs()).fold(0.0, f64::max).max(1e-12);
    for _ in 0..max_iter {
        // Solve (−H + λ I) Δ = g for the ascent step.
        let mut a: Vec<f64> = h.iter().map(|x| -x).collect();
        for k in 0..p {
            a[k * p + k] += lambda;
        }
        let Some(delta) = solve(&a, &g, p, 1) else {
            lambda *= 10.0;
            continue;
        };
        let trial: Vec<f64> = w.iter().zip(&delta).map(|(x, dx)| x + dx).collect();
        match objective(data, e, &sum_e, d, &trial, true) {
            Some((f2, g2, h2)) if f2 >= f => {
                let gain = f2 - f;
                w = trial;
                (f, g, h) = (f2, g2, h2);
                lambda = (lambda / 3.0).max(1e-15);
                if gain < 1e-13 {
                    break;
                }
            }
            _ => lambda *= 4.0,
        }
        if lambda > 1e12 {
            break;
        }
    }
    w
}

/// Total variation between `p` and `q` with negative scores of `q` clipped to zero and renormalised.
fn tv(p: &[f64], q: &[f64]) -> f64 {
    let clipped: Vec<f64> = q.iter().map(|x| if x.is_finite() { x.max(0.0) } else { 0.0 }).collect();
    let z: f64 = clipped.iter().sum();
    if z <= 0.0 {
        return 1.0;
    }
    0.5 * p.iter().zip(&clipped).map(|(a, b)| (a - b / z).abs()).sum::<f64>()
}

/// KL(p ‖ q); a steer that drives some score of `q` to zero or below (an invalid linear LM on that
/// context) is charged as if it gave those symbols probability 1e-12.
fn kl(p: &[f64], q: &[f64]) -> f64 {
    let clipped: Vec<f64> = q.iter().map(|x| if x.is_finite() { x.max(1e-12) } else { 1e-12 }).collect();
    let z: f64 = clipped.iter().sum();
    p.iter().zip(&clipped).filter(|(a, _)| **a > 0.0).map(|(a, b)| a * (a / (b / z)).ln()).sum()
}

/// Fits the steer by the LM-Steer objective: maximise the mean next-token log-likelihood of sequences
/// sampled from the π' process under the π-model with embeddings `M e_v` (`M = I + εW`, started at `I`,
/// maximised by Levenberg–Marquardt on the exact gradient and Hessian), for each training-set size; evaluates on held-out contexts.
pub fn learn_steers(cfg: &LearnConfig) -> Result<Vec<LearnedSteer>> {
    if cfg.sample_sizes.is_empty() || cfg.sample_sizes.contains(&0) {
        return Err(HmmError::Construction(format!(
            "training-set sizes must be at least 1 sequence, found {:?}",
            cfg.sample_sizes
        )));
    }
    if cfg.sequence_length == 0 || cfg.steps == 0 {
        return Err(HmmError::Construction("sequence length and iterations must be at least 1".into()));
    }
    let Setup { m, mut rng, phi1, phi2, w: w_analytic, .. } = setup(&cfg.model)?;
    let h2 = m.hmm(&phi2)?;
    let e = m.embeddings();
    let d = m.dim();
    let v = m.vocab();
    // Contexts (normalised, under π) and targets of a set of sequences from π'.
    let contexts = |seqs: &[Vec<usize>]| -> Vec<(Vec<f64>, usize)> {
        let mut out = Vec::new();
        for seq in seqs {
            let mut c = phi1.clone();
            for &o in seq {
                out.push((c.clone(), o));
                c = m.advance(&c, o);
            }
        }
        out
    };
    let held: Vec<Vec<usize>> = (0..200).map(|_| h2.sample(cfg.sequence_length, &mut rng)).collect();
    // Held-out evaluation: contexts with their true π' conditionals.
    let mut eval: Vec<(Vec<f64>, Vec<f64>)> = Vec::new();
    for seq in &held {
        let mut c = phi1.clone();
        for t in 0..seq.len() {
            eval.push((c.clone(), h2.next_token(&seq[..t])?));
            c = m.advance(&c, seq[t]);
        }
    }
    let mean_kl =
        |w: Option<&[f64]>| eval.iter().map(|(c, p)| kl(p, &m.lm_next(c, w, &e))).sum::<f64>() / eval.len() as f64;
    let kl_unsteered = mean_kl(None);
    let mean_tv =
        |w: Option<&[f64]>| eval.iter().map(|(c, p)| tv(p, &m.lm_next(c, w, &e))).sum::<f64>() / eval.len() as f64;
    let tv_unsteered = mean_tv(None);
    let kl_analytic = mean_kl(Some(&w_analytic));
    // W E for the identifiable part of a steer: (W E)[i, v] = Σ_j W[i, j] e_v[j].
    let e_ref = &e;
    let apply = |w: &[f64]| -> Vec<f64> {
        let mut out = Vec::with_capacity(d * v);
        for i in 0..d {
            for o in 0..v {
                out.push((0..d).map(|j| w[i * d + j] * e_ref[o * d + j]).sum::<f64>());
            }
        }
        out
    };
    let target = apply(&w_analytic);
    let norm_a = target.iter().map(|x| x * x).sum::<f64>().sqrt();

    let mut out = Vec::new();
    let max_n = cfg.sample_sizes.iter().copied().max().unwrap_or(0);
    let pool: Vec<Vec<usize>> = (0..max_n).map(|_| h2.sample(cfg.sequence_length, &mut rng)).collect();
    for &n in &cfg.sample_sizes {
        let data = contexts(&pool[..n]);
        let w = fit_lm_steer(&data, &e, d, v, cfg.steps);
        let kl_learned = mean_kl(Some(&w));
        let we = apply(&w);
        let s = we.iter().zip(&target).map(|(a, b)| a * b).sum::<f64>() / we.iter().map(|a| a * a).sum::<f64>();
        let dist = we.iter().zip(&target).map(|(a, b)| (s * a - b).powi(2)).sum::<f64>().sqrt() / norm_a;
        out.push(LearnedSteer {
            samples: n,
            tokens: data.len(),
            tv: mean_tv(Some(&w)),
            tv_unsteered,
            kl: kl_learned,
            kl_unsteered,
            kl_analytic,
            distance_to_analytic: dist,
            w,
        });
    }
    Ok(out)
}
