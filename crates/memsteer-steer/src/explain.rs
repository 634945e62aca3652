//! Interpretation of a steer: the singular value decomposition of each labelled `W_s = P1_s P2_sᵀ` and the
//! vocabulary tokens at both ends of its top singular directions (issue 9, part 4).
//!
//! **Which side scores the tokens.** With `h` the final hidden state (a row) and `e_t` the output embedding
//! of token `t`, the steered logit is `h (I + ε v W) e_tᵀ`, so the steer changes it by `ε v · h W e_tᵀ`. With
//! `W = Σ_i σ_i u_i v_iᵀ`, that is `ε v Σ_i σ_i (h·u_i)(e_t·v_i)`: along direction `i`, `u_i` (the `P1` side)
//! reads the context and `v_i` (the `P2` side) decides which tokens move. Tokens are therefore scored by the
//! **right** singular vector, `score_t = e_t · v_i`; the tokens with the largest and the smallest scores move
//! in opposite directions, by `ε v σ_i (h·u_i)` times their score.
//!
//! **Sign.** A singular pair is defined up to `(u_i, v_i) → (−u_i, −v_i)`. Each direction is oriented so
//! that its token of largest `|score|` (the lowest id on a tie) has a positive score: the `positive` list
//! starts with the token the direction is most about. Whether the steer at strength `+1` promotes the
//! `positive` or the `negative` end in a given context is the sign of `h·u_i`.
//!
//! The decomposition never forms the `d × d` matrix: thin QR `P1 = Q1 R1`, `P2 = Q2 R2`, one-sided Jacobi SVD
//! of the `rank × rank` matrix `R1 R2ᵀ = U' Σ V'ᵀ`, then `U = Q1 U'`, `V = Q2 V'`; all in `f64`.
//!
//! ```
//! use memsteer_steer::explain::{ExplainConfig, explain};
//! use memsteer_steer::{Steer, SteerSpec, embedding_fingerprint};
//! // A 4-token vocabulary in 2 dimensions and a rank-1 steer W = 2 e₀ e₁ᵀ: it moves tokens along axis 1.
//! let embedding = vec![1.0f32, 0.0, 0.0, 1.0, 0.0, -1.0, 0.5, 0.5];
//! let spec = SteerSpec {
//!     num_steers: 1,
//!     hidden_size: 2,
//!     rank: 1,
//!     vocab_size: 4,
//!     epsilon: 1e-3,
//!     embedding_fingerprint: embedding_fingerprint(&embedding),
//!     labels: vec!["positive".into()],
//! };
//! let steer = Steer::new(spec, vec![1.0, 0.0], vec![0.0, 2.0], serde_json::json!({}))?;
//! let names = ["a", "b", "c", "d"];
//! let token = |id: u32| names.get(id as usize).map(|s| s.to_string());
//! let config = ExplainConfig { dims: 1, top: 2 };
//! let explanation = explain(&steer, &embedding, &config, &token)?;
//! let dim = &explanation.dimensions[0];
//! assert!((dim.singular_value - 2.0).abs() < 1e-12);
//! assert_eq!(dim.positive[0].token.as_deref(), Some("b"));
//! assert_eq!(dim.negative[0].token.as_deref(), Some("c"));
//! println!("{}", serde_json::to_string(&explanation).unwrap());
//! # Ok::<(), memsteer_steer::SteerError>(())
//! ```

use serde::{Deserialize, Serialize};

use crate::linalg::{jacobi_svd, matmul, thin_qr, transpose};
use crate::{Result, Steer, SteerError, embedding_fingerprint};

/// How much of each steer [`explain`] reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExplainConfig {
    /// Singular directions per steer, the largest first (at least 1; capped at the steer's rank and hidden
    /// size). Directions past the steer's numerical rank have singular value ≈ 0 and arbitrary tokens.
    pub dims: usize,
    /// Tokens at each end of a direction (at least 1; capped at the vocabulary size).
    pub top: usize,
}

impl Default for ExplainConfig {
    /// 5 directions, 10 tokens at each end.
    fn default() -> Self {
        Self { dims: 5, top: 10 }
    }
}

/// The explanation of a steer's labelled steers, as `steer explain --json` prints it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Explanation {
    /// One entry per (labelled steer, singular direction), steer by steer, directions by decreasing
    /// singular value.
    pub dimensions: Vec<Dimension>,
}

/// One singular direction of one steer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Dimension {
    /// Index of the labelled steer (0 is the first label).
    pub steer: usize,
    /// Index of the direction, 0 for the largest singular value.
    pub rank: usize,
    /// The singular value `σ` of `W_s = P1_s P2_sᵀ` (without ε).
    pub singular_value: f64,
    /// The tokens with the largest scores `e_t · v`, best first.
    pub positive: Vec<TokenScore>,
    /// The tokens with the smallest scores `e_t · v`, most negative first.
    pub negative: Vec<TokenScore>,
}

/// A token and its score `e_t · v` on a singular direction.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenScore {
    /// Token id.
    pub id: u32,
    /// Token text, when the caller's vocabulary knows it.
    pub token: Option<String>,
    /// `e_t · v`, with `v` the unit right singular vector.
    pub score: f64,
}

/// The thin SVD of one steer `W = P1 P2ᵀ = U diag(σ) Vᵀ`, in `f64`.
#[derive(Debug, Clone, PartialEq)]
pub struct SteerSvd {
    /// Hidden size `d`.
    pub dim: usize,
    /// Number of singular triples `k` (the steer's rank).
    pub k: usize,
    /// Singular values, descending (`k` of them; those past the numerical rank are 0 or tiny).
    pub singular_values: Vec<f64>,
    /// Left singular vectors, `d × k` row-major (column `i` for `singular_values[i]`; zero where σ is 0).
    pub u: Vec<f64>,
    /// Right singular vectors, `d × k` row-major.
    pub v: Vec<f64>,
}

impl SteerSvd {
    /// Column `i` of `V`, the unit right singular vector of `singular_values[i]`.
    pub fn v_column(&self, i: usize) -> Vec<f64> {
        (0..self.dim).map(|r| self.v[r * self.k + i]).collect()
    }
    /// Column `i` of `U`, the unit left singular vector of `singular_values[i]`.
    pub fn u_column(&self, i: usize) -> Vec<f64> {
        (0..self.dim).map(|r| self.u[r * self.k + i]).collect()
    }
}

/// The SVD of steer `s` (any steer, the dummy included) without forming `W`: thin QR of both projectors
/// and a one-sided Jacobi SVD of `R1 R2ᵀ`. Each pair is signed so that the largest-magnitude entry of its
/// right singular vector is positive ([`explain`] re-signs by token score).
pub fn steer_svd(steer: &Steer, s: usize) -> Result<SteerSvd> {
    if s >= steer.num_steers() {
        return Err(SteerError::Input(format!(
            "steer index: expected below the number of steers ({}), found {s}",
            steer.num_steers()
        )));
    }
    let (d, r) = (steer.hidden_size(), steer.rank());
    let slice = |p: &[f32]| -> Vec<f64> { p[s * d * r..(s + 1) * d * r].iter().map(|&x| f64::from(x)).collect() };
    let (q1, r1) = thin_qr(&slice(steer.projector1()), d, r);
    let (q2, r2) = thin_qr(&slice(steer.projector2()), d, r);
    let m = matmul(&r1, &transpose(&r2, r, r), r, r, r);
    let small = jacobi_svd(&m, r);
    let mut u = matmul(&q1, &small.u, d, r, r);
    let mut v = matmul(&q2, &small.v, d, r, r);
    for i in 0..r {
        let pivot =
            (0..d).map(|row| v[row * r + i]).fold(0.0f64, |best, x| if x.abs() > best.abs() { x } else { best });
        if pivot < 0.0 {
            flip(&mut u, &mut v, d, r, i);
        }
    }
    Ok(SteerSvd { dim: d, k: r, singular_values: small.s, u, v })
}

fn flip(u: &mut [f64], v: &mut [f64], d: usize, k: usize, i: usize) {
    for row in 0..d {
        u[row * k + i] = -u[row * k + i];
        v[row * k + i] = -v[row * k + i];
    }
}

/// Explains every labelled steer of `steer` (the dummy steer is skipped): its top `config.dims` singular
/// directions, each with the `config.top` tokens of largest and of smallest score `e_t · v` (see the
/// module documentation for the side and the sign). `embedding` is the base model's output embedding
/// (`vocab × hidden`, the one the steer was made for: its size and fingerprint are checked); `token`
/// names a token id (or `None`).
pub fn explain(
    steer: &Steer,
    embedding: &[f32],
    config: &ExplainConfig,
    token: &dyn Fn(u32) -> Option<String>,
) -> Result<Explanation> {
    if config.dims == 0 {
        return Err(SteerError::Config { field: "dims", message: "expected at least 1, found 0".into() });
    }
    if config.top == 0 {
        return Err(SteerError::Config { field: "top", message: "expected at least 1, found 0".into() });
    }
    let (d, vocab) = (steer.hidden_size(), steer.vocab_size());
    if embedding.len() != vocab * d {
        return Err(SteerError::Input(format!(
            "output embedding: expected {} values (vocab {vocab} × hidden size {d}), found {}",
            vocab * d,
            embedding.len()
        )));
    }
    let fp = embedding_fingerprint(embedding);
    if fp != steer.fingerprint() {
        return Err(SteerError::ModelMismatch {
            source_name: "steer".into(),
            field: "embedding_fingerprint",
            steer: steer.fingerprint().to_string(),
            model: fp,
        });
    }
    let dims = config.dims.min(steer.rank()).min(d);
    let top = config.top.min(vocab);
    let mut dimensions = Vec::new();
    for s in 0..steer.labels().len() {
        let svd = steer_svd(steer, s)?;
        for i in 0..dims {
            let dir = svd.v_column(i);
            let mut scores: Vec<f64> =
                embedding.chunks_exact(d).map(|e| e.iter().zip(&dir).map(|(&x, &y)| f64::from(x) * y).sum()).collect();
            let pivot = scores.iter().fold(0.0f64, |best, &x| if x.abs() > best.abs() { x } else { best });
            if pivot < 0.0 {
                scores.iter_mut().for_each(|x| *x = -*x);
            }
            let mut ids: Vec<u32> = (0..vocab as u32).collect();
            let by_score = |a: &u32, b: &u32| scores[*b as usize].total_cmp(&scores[*a as usize]).then(a.cmp(b));
            let pick = |ids: &[u32]| -> Vec<TokenScore> {
                ids.iter().map(|&id| TokenScore { id, token: token(id), score: scores[id as usize] }).collect()
            };
            ids.sort_by(by_score);
            let positive = pick(&ids[..top]);
            ids.sort_by(|a, b| scores[*a as usize].total_cmp(&scores[*b as usize]).then(a.cmp(b)));
            let negative = pick(&ids[..top]);
            dimensions.push(Dimension {
                steer: s,
                rank: i,
                singular_value: svd.singular_values[i],
                positive,
                negative,
            });
        }
    }
    Ok(Explanation { dimensions })
}

impl std::fmt::Display for Explanation {
    /// A readable table: one block per direction, the positive and the negative tokens side by side.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = |t: &TokenScore| t.token.clone().map_or_else(|| format!("#{}", t.id), |s| format!("{s:?}"));
        for dim in &self.dimensions {
            writeln!(f, "steer {} · dimension {} · σ = {:.6e}", dim.steer, dim.rank, dim.singular_value)?;
            writeln!(f, "  {:<32} {:>10}   {:<32} {:>10}", "positive", "score", "negative", "score")?;
            for k in 0..dim.positive.len().max(dim.negative.len()) {
                let cell = |list: &[TokenScore]| {
                    list.get(k)
                        .map_or_else(|| (String::new(), String::new()), |t| (name(t), format!("{:+.4}", t.score)))
                };
                let (pn, ps) = cell(&dim.positive);
                let (nn, ns) = cell(&dim.negative);
                writeln!(f, "  {pn:<32} {ps:>10}   {nn:<32} {ns:>10}")?;
            }
        }
        Ok(())
    }
}
