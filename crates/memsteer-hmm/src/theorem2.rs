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
