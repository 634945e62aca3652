//! Moving a steer to another model (issue 9, part 7; the maps named in issue 16). Every map is a least-
//! squares fit between the two output embeddings on the tokens both vocabularies share, solved in closed
//! form, and carries the steer in low-rank form (`P1' = Hᵀ P1`, `P2' = Rᵀ P2`, so `W' = Hᵀ W R` keeps the
//! rank and `d × d` is never formed):
//!
//! - [`TransferMap::Paper`] (the default): the paper's `e_v = H e'_v` (`H`, `d_from × d_to`, maps the
//!   target's embeddings to the source's), fitted so that `E_from ≈ E_to Hᵀ`, and `W' = Hᵀ W H`.
//! - [`TransferMap::Authors`]: the authors' `steer_transfer.py`: `B` (`d_to × d_from`) fitted with
//!   `E_to B ≈ E_from` on the first `top_k` (4,000) shared tokens in the target vocabulary's order, each
//!   row of `B` divided by its norm, `P' = B P` for both projectors (`W' = B W Bᵀ`). Their script reaches
//!   the fit with Adam on the mean squared error; the closed-form optimum of that loss stands in here.
//! - [`TransferMap::TwoSided`]: `W' = Hᵀ W Gᵀ` with `E_to ≈ E_from H` and `E_from ≈ E_to G` both fitted:
//!   exact for any invertible linear relation between the models (`E_to = E_from A`, hidden states
//!   `h_to = h_from A⁻ᵀ`, as equal base logits imply), where the first two are exact only for orthogonal
//!   relations. All three agree when the relation is orthogonal.
//!
//! Why `Hᵀ W H` in the paper: with `e_v = H e'_v` and hidden states related the same way, the steered
//! logit `cᵀ (I + ε W) e_v` becomes `c'ᵀ (HᵀH + ε Hᵀ W H) e'_v`, the target's own when `HᵀH = I`.
//!
//! Each fit solves its normal equations `(XᵀX + λ I) M = XᵀY` by Cholesky in `f64`. With `λ = 0` and a
//! singular `XᵀX`, a tiny ridge (`10⁻¹²` of the mean diagonal, then ×100 up to 4 times) is added and
//! recorded. Fewer shared tokens than the fit's input size with `λ = 0` is refused as underdetermined.
//! The fit's relative residual `‖X M − Y‖_F / ‖Y‖_F` is recorded in the new steer's `training` metadata
//! under `"transfer"`.
//!
//! ```
//! use memsteer_steer::transfer::{EmbeddingView, SharedTokens, TransferConfig, transfer};
//! use memsteer_steer::{Steer, SteerSpec, embedding_fingerprint};
//! // Source: 3 tokens in 2 dimensions; target: the same tokens, axes swapped (H is a permutation).
//! let e_from = vec![1.0f32, 0.0, 0.0, 1.0, 1.0, 1.0];
//! let e_to = vec![0.0f32, 1.0, 1.0, 0.0, 1.0, 1.0];
//! let spec = SteerSpec {
//!     num_steers: 1,
//!     hidden_size: 2,
//!     rank: 1,
//!     vocab_size: 3,
//!     epsilon: 1e-3,
//!     embedding_fingerprint: embedding_fingerprint(&e_from),
//!     labels: vec!["positive".into()],
//! };
//! let steer = Steer::new(spec, vec![1.0, 0.0], vec![0.0, 1.0], serde_json::json!({}))?;
//! let from = EmbeddingView::new(&e_from, 2)?;
//! let to = EmbeddingView::new(&e_to, 2)?;
//! let shared = SharedTokens::by_id(3, 3)?; // same vocabulary: match by id (a caller should warn)
//! let (moved, fit) = transfer(&steer, &from, &to, &shared, &TransferConfig::default())?;
//! assert!(fit.relative_residual < 1e-12);
//! // W = e₀ e₁ᵀ becomes W' = e₁ e₀ᵀ (up to rounding).
//! let close = |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-6);
//! assert!(close(moved.projector1(), &[0.0, 1.0]));
//! assert!(close(moved.projector2(), &[1.0, 0.0]));
//! assert!(moved.training()["transfer"]["relative_residual"].is_number());
//! # Ok::<(), memsteer_steer::SteerError>(())
//! ```

use std::collections::HashMap;

use rayon::prelude::*;

use crate::linalg::{cholesky, cholesky_solve, gram, matmul_tn, transpose};
use crate::{Result, Steer, SteerError, SteerSpec, embedding_fingerprint};

/// The automatic ridge starts at this fraction of the mean diagonal of `XᵀX`.
const AUTO_RIDGE_START: f64 = 1e-12;
/// The automatic ridge grows by this factor per retry.
const AUTO_RIDGE_GROWTH: f64 = 100.0;
/// Retries of the automatic ridge after the first.
const AUTO_RIDGE_RETRIES: usize = 4;
/// Rows per block for the residual (fixed, so the result does not depend on the thread count).
const RESIDUAL_BLOCK_ROWS: usize = 256;

/// An output embedding, `vocab × dim`, row-major `f32`.
#[derive(Debug, Clone, Copy)]
pub struct EmbeddingView<'a> {
    values: &'a [f32],
    vocab: usize,
    dim: usize,
}

impl<'a> EmbeddingView<'a> {
    /// A view of `values` as rows of `dim`; the length must be a positive multiple of `dim`.
    pub fn new(values: &'a [f32], dim: usize) -> Result<Self> {
        if dim == 0 || values.is_empty() || !values.len().is_multiple_of(dim) {
            return Err(SteerError::Shape {
                what: "output embedding".into(),
                expected: format!("a positive multiple of the hidden size {dim} values"),
                found: format!("{} values", values.len()),
            });
        }
        Ok(Self { values, vocab: values.len() / dim, dim })
    }
    /// The output embedding of a model.
    pub fn of(decoder: &'a dyn memsteer_lm::Decoder) -> Result<Self> {
        Self::new(decoder.output_embedding(), decoder.dim())
    }
    /// The values, `vocab × dim`.
    pub fn values(&self) -> &'a [f32] {
        self.values
    }
    /// Vocabulary size (rows).
    pub fn vocab(&self) -> usize {
        self.vocab
    }
    /// Hidden size (columns).
    pub fn dim(&self) -> usize {
        self.dim
    }
    fn row(&self, id: u32) -> &'a [f32] {
        &self.values[id as usize * self.dim..(id as usize + 1) * self.dim]
    }
}

/// How the shared tokens were matched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Matching {
    /// By token string (both vocabularies known).
    ByString,
    /// By token id, the vocabularies having the same size but no token strings: the caller should warn
    /// that this assumes the two models use the same tokenizer.
    ById,
    /// Pairs given by the caller.
    Given,
}

impl Matching {
    fn name(self) -> &'static str {
        match self {
            Matching::ByString => "string",
            Matching::ById => "id",
            Matching::Given => "given",
        }
    }
}

/// Pairs `(source id, target id)` of tokens the two vocabularies share, in the order the fit takes them
/// (its `top_k` are the first pairs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedTokens {
    /// `(source id, target id)`, by increasing source id when matched here.
    pub pairs: Vec<(u32, u32)>,
    /// How they were matched.
    pub matching: Matching,
}

impl SharedTokens {
    /// Tokens whose strings are equal, by increasing source id; a string that occurs several times in a
    /// vocabulary is matched through its lowest id only. Errors when no token is shared.
    pub fn by_string(
        from_vocab: usize,
        from: &dyn Fn(u32) -> Option<String>,
        to_vocab: usize,
        to: &dyn Fn(u32) -> Option<String>,
    ) -> Result<Self> {
        let mut target: HashMap<String, u32> = HashMap::with_capacity(to_vocab);
        for id in 0..to_vocab as u32 {
            if let Some(s) = to(id) {
                target.entry(s).or_insert(id);
            }
        }
        let mut seen = std::collections::HashSet::new();
        let mut pairs = Vec::new();
        for id in 0..from_vocab as u32 {
            if let Some(s) = from(id)
                && let Some(&t) = target.get(&s)
                && seen.insert(s)
            {
                pairs.push((id, t));
            }
        }
        if pairs.is_empty() {
            return Err(SteerError::NoSharedTokens { from_vocab, to_vocab });
        }
        Ok(Self { pairs, matching: Matching::ByString })
    }

    /// Every id matched to itself, for two vocabularies of the same size without token strings (the
    /// caller should warn: this is right only when both models use the same tokenizer).
    pub fn by_id(from_vocab: usize, to_vocab: usize) -> Result<Self> {
        if from_vocab != to_vocab {
            return Err(SteerError::Shape {
                what: "transfer by token id".into(),
                expected: format!("vocabularies of the same size (source {from_vocab})"),
                found: format!("target vocabulary of {to_vocab}; give both models' token strings instead"),
            });
        }
        if from_vocab == 0 {
            return Err(SteerError::NoSharedTokens { from_vocab, to_vocab });
        }
        Ok(Self { pairs: (0..from_vocab as u32).map(|i| (i, i)).collect(), matching: Matching::ById })
    }

    /// By string when both vocabularies' token strings are given, else by id when neither is and the sizes
    /// agree ([`Matching::ById`]: warn); otherwise an error saying what is missing.
    pub fn matched(
        from_vocab: usize,
        from: Option<&dyn Fn(u32) -> Option<String>>,
        to_vocab: usize,
        to: Option<&dyn Fn(u32) -> Option<String>>,
    ) -> Result<Self> {
        match (from, to) {
            (Some(f), Some(t)) => Self::by_string(from_vocab, f, to_vocab, t),
            (None, None) => Self::by_id(from_vocab, to_vocab),
            (f, _) => Err(SteerError::Input(format!(
                "transfer: token strings are known for the {} model only; matching tokens needs both vocabularies (tokenizer files), or neither with equal vocabulary sizes (match by id)",
                if f.is_some() { "source" } else { "target" }
            ))),
        }
    }

    /// The tokens the models in the directories `from_dir` and `to_dir` share: by the text their
    /// tokenizers give each token when both directories have tokenizer files, by id when neither has
    /// (see [`Self::matched`]).
    pub fn of_dirs(
        (from_dir, from_vocab): (&std::path::Path, usize),
        (to_dir, to_vocab): (&std::path::Path, usize),
    ) -> Result<Self> {
        use memsteer_lm::tokenizer::{Tokenizer, present_in};
        let tok = |dir: &std::path::Path| present_in(dir).then(|| Tokenizer::from_dir(dir)).transpose();
        let (tf, tt) = (tok(from_dir)?, tok(to_dir)?);
        let from_name = tf.as_ref().map(|t| move |id: u32| t.token_text(id));
        let to_name = tt.as_ref().map(|t| move |id: u32| t.token_text(id));
        Self::matched(
            from_vocab,
            from_name.as_ref().map(|f| f as &dyn Fn(u32) -> Option<String>),
            to_vocab,
            to_name.as_ref().map(|f| f as &dyn Fn(u32) -> Option<String>),
        )
    }

    /// Caller-chosen pairs ([`Matching::Given`]).
    pub fn given(pairs: Vec<(u32, u32)>) -> Self {
        Self { pairs, matching: Matching::Given }
    }
}

/// How the steer is carried to the target (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TransferMap {
    /// The paper's: `E_from ≈ E_to Hᵀ` (`e_v = H e'_v`), `W' = Hᵀ W H`; exact when `H` is orthogonal.
    #[default]
    Paper,
    /// The authors' script: `E_to B ≈ E_from` on the first `top_k` (default [`AUTHORS_TOP_K`]) shared
    /// tokens in the target's id order, rows of `B` normalised, `P' = B P`.
    Authors,
    /// `W' = Hᵀ W Gᵀ` with `E_to ≈ E_from H` and `E_from ≈ E_to G`: exact for any invertible linear
    /// relation between the two models. The base logits tie `h_from ≈ h_to Hᵀ`; the steer's term
    /// `h_from W E_fromᵀ` then becomes `h_to Hᵀ W Gᵀ E_toᵀ`.
    TwoSided,
}

/// The authors' number of shared tokens the fit uses (`top_k = 4000` in their `steer_transfer.py`).
pub const AUTHORS_TOP_K: usize = 4000;

impl TransferMap {
    /// The name recorded in a transferred steer's metadata (and the CLI's `--map` value).
    pub fn name(self) -> &'static str {
        match self {
            TransferMap::Paper => "paper",
            TransferMap::Authors => "authors",
            TransferMap::TwoSided => "two-sided",
        }
    }

    /// `W'` in the paper's notation.
    pub fn formula(self) -> &'static str {
        match self {
            TransferMap::Paper => "HᵀWH with E_from ≈ E_to Hᵀ",
            TransferMap::Authors => "BWBᵀ with E_to B ≈ E_from, rows of B normalised",
            TransferMap::TwoSided => "HᵀWGᵀ with E_to ≈ E_from H and E_from ≈ E_to G",
        }
    }
}

/// Settings of the least-squares fit.
#[derive(Debug, Clone, PartialEq)]
pub struct TransferConfig {
    /// Fit on the first `top_k` shared pairs only; `None` for all of them ([`TransferMap::Authors`]:
    /// [`AUTHORS_TOP_K`], in the target's id order).
    pub top_k: Option<usize>,
    /// Ridge `λ ≥ 0` added to the diagonal of `XᵀX` (absolute, in squared embedding units); 0 for plain
    /// least squares (with an automatic tiny ridge if `XᵀX` is singular).
    pub ridge: f64,
    /// How `W` is carried to the target.
    pub map: TransferMap,
}

impl Default for TransferConfig {
    /// All shared tokens, no ridge, the paper's `Hᵀ W H`.
    fn default() -> Self {
        Self { top_k: None, ridge: 0.0, map: TransferMap::Paper }
    }
}

/// A least-squares map `M` with `E_to ≈ E_from M` between the two views given to [`fit_map`]; as returned
/// by [`transfer`], the map `H` that carries `P1` (`P1' = Hᵀ P1`, `d_from × d_to` of the steer's two models)
/// with the statistics of the fit it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct EmbeddingMap {
    /// `M`, `d_from × d_to` row-major.
    pub h: Vec<f64>,
    /// Input size (rows of `M`).
    pub d_from: usize,
    /// Output size (columns of `M`).
    pub d_to: usize,
    /// Pairs the fit used.
    pub pairs_used: usize,
    /// Shared pairs available (before `top_k`).
    pub shared: usize,
    /// The ridge actually used (the configured one, or the automatic one).
    pub ridge: f64,
    /// Whether `ridge` was added automatically because `XᵀX` was singular (a caller may warn).
    pub ridge_automatic: bool,
    /// `‖X H − Y‖_F / ‖Y‖_F` on the pairs used.
    pub relative_residual: f64,
}

/// Fits `M` (`from.dim() × to.dim()`) with `E_to ≈ E_from M` on the shared pairs (the first
/// `config.top_k` of them when set) by least squares; see the module documentation. `config.map` is not
/// used here.
pub fn fit_map(
    from: &EmbeddingView<'_>,
    to: &EmbeddingView<'_>,
    shared: &SharedTokens,
    config: &TransferConfig,
) -> Result<EmbeddingMap> {
    if config.ridge.is_nan() || config.ridge < 0.0 || !config.ridge.is_finite() {
        return Err(SteerError::Config {
            field: "ridge",
            message: format!("expected a finite number ≥ 0, found {}", config.ridge),
        });
    }
    if config.top_k == Some(0) {
        return Err(SteerError::Config { field: "top_k", message: "expected at least 1, found 0".into() });
    }
    if shared.pairs.is_empty() {
        return Err(SteerError::NoSharedTokens { from_vocab: from.vocab, to_vocab: to.vocab });
    }
    for &(f, t) in &shared.pairs {
        if f as usize >= from.vocab || t as usize >= to.vocab {
            return Err(SteerError::Shape {
                what: "shared token pair".into(),
                expected: format!("ids below the vocabulary sizes ({} source, {} target)", from.vocab, to.vocab),
                found: format!("({f}, {t})"),
            });
        }
    }
    let pairs = &shared.pairs[..config.top_k.map_or(shared.pairs.len(), |k| k.min(shared.pairs.len()))];
    let (n, m, p) = (pairs.len(), from.dim, to.dim);
    if n < m && config.ridge == 0.0 {
        return Err(SteerError::Underdetermined { shared: n, hidden_size: m });
    }
    let (g, c) = gram(n, m, p, |i, x, y| {
        let (f, t) = pairs[i];
        for (a, &b) in x.iter_mut().zip(from.row(f)) {
            *a = f64::from(b);
        }
        for (a, &b) in y.iter_mut().zip(to.row(t)) {
            *a = f64::from(b);
        }
    });
    let with_ridge = |lambda: f64| {
        let mut a = g.clone();
        for i in 0..m {
            a[i * m + i] += lambda;
        }
        cholesky(&a, m)
    };
    let mut ridge = config.ridge;
    let mut ridge_automatic = false;
    let mut factor = with_ridge(ridge);
    if factor.is_none() && config.ridge == 0.0 {
        let mean_diag = (0..m).map(|i| g[i * m + i]).sum::<f64>() / m as f64;
        let mut lambda = AUTO_RIDGE_START * mean_diag.max(f64::MIN_POSITIVE);
        for _ in 0..=AUTO_RIDGE_RETRIES {
            factor = with_ridge(lambda);
            if factor.is_some() {
                ridge = lambda;
                ridge_automatic = true;
                break;
            }
            lambda *= AUTO_RIDGE_GROWTH;
        }
    }
    let Some(l) = factor else {
        return Err(SteerError::Numerical(format!(
            "transfer: the normal equations of the fit are singular (ridge {ridge}); are the embeddings it regresses on (of the shared tokens) degenerate?"
        )));
    };
    let h = cholesky_solve(&l, &c, m, p);
    if let Some(bad) = h.iter().find(|x| !x.is_finite()) {
        return Err(SteerError::Numerical(format!("transfer: the fitted map holds a non-finite value ({bad})")));
    }
    let (num, den) = pairs
        .par_chunks(RESIDUAL_BLOCK_ROWS)
        .map(|block| {
            let mut num = 0.0;
            let mut den = 0.0;
            let mut pred = vec![0.0f64; p];
            for &(f, t) in block {
                pred.iter_mut().for_each(|x| *x = 0.0);
                for (k, &x) in from.row(f).iter().enumerate() {
                    let x = f64::from(x);
                    for (o, &hk) in pred.iter_mut().zip(&h[k * p..(k + 1) * p]) {
                        *o += x * hk;
                    }
                }
                for (&o, &y) in pred.iter().zip(to.row(t)) {
                    let y = f64::from(y);
                    num += (o - y) * (o - y);
                    den += y * y;
                }
            }
            (num, den)
        })
        .collect::<Vec<_>>()
        .into_iter()
        .fold((0.0, 0.0), |a, b| (a.0 + b.0, a.1 + b.1));
    let relative_residual = if den > 0.0 { (num / den).sqrt() } else { num.sqrt() };
    Ok(EmbeddingMap {
        h,
        d_from: m,
        d_to: p,
        pairs_used: n,
        shared: shared.pairs.len(),
        ridge,
        ridge_automatic,
        relative_residual,
    })
}

/// Moves `steer` from the model with output embedding `from` (the steer's own model: size and fingerprint
/// are checked) to the model with output embedding `to` with `config.map` (see the module documentation),
/// for every steer (the dummy included). The new steer has the target's hidden size, vocabulary size and
/// fingerprint, the same ε and labels, and the source's training settings with a `"transfer"` entry (map
/// and formula, source shapes and fingerprint, shared and used pairs, matching, `top_k`, ridge and whether
/// it was automatic, relative residual, and for the two-sided map the inverse fit's pairs, ridge and
/// residual under `"inverse"`). Also returns the map `H` that carried `P1` (`P1' = Hᵀ P1`) with its fit.
pub fn transfer(
    steer: &Steer,
    from: &EmbeddingView<'_>,
    to: &EmbeddingView<'_>,
    shared: &SharedTokens,
    config: &TransferConfig,
) -> Result<(Steer, EmbeddingMap)> {
    let mismatch = |field: &'static str, s: String, m: String| SteerError::ModelMismatch {
        source_name: "transfer source".into(),
        field,
        steer: s,
        model: m,
    };
    if from.dim != steer.hidden_size() {
        return Err(mismatch("hidden_size", steer.hidden_size().to_string(), from.dim.to_string()));
    }
    if from.vocab != steer.vocab_size() {
        return Err(mismatch("vocab_size", steer.vocab_size().to_string(), from.vocab.to_string()));
    }
    let fp = embedding_fingerprint(from.values);
    if fp != steer.fingerprint() {
        return Err(mismatch("embedding_fingerprint", steer.fingerprint().to_string(), fp));
    }
    let swapped = |pairs: &[(u32, u32)]| SharedTokens {
        pairs: pairs.iter().map(|&(f, t)| (t, f)).collect(),
        matching: shared.matching,
    };
    // The backward fit E_to G ≈ E_from (G: d_to × d_from), as a map H = Gᵀ (d_from × d_to).
    let backward = |pairs: &SharedTokens, config: &TransferConfig| -> Result<EmbeddingMap> {
        let g = fit_map(to, from, pairs, config).map_err(|e| match e {
            e @ SteerError::Underdetermined { .. } => e,
            e => SteerError::Input(format!(
                "transfer: the fit E_from ≈ E_to Hᵀ (target embeddings to source ones) failed: {e}"
            )),
        })?;
        Ok(EmbeddingMap { h: transpose(&g.h, g.d_from, g.d_to), d_from: g.d_to, d_to: g.d_from, ..g })
    };
    let mut config = config.clone();
    let (left, right, inverse) = match config.map {
        TransferMap::Paper => {
            let h = backward(&swapped(&shared.pairs), &config)?;
            let r = h.h.clone();
            (h, r, None)
        }
        TransferMap::Authors => {
            // Their order: the target vocabulary's; their top_k.
            let mut pairs = shared.pairs.clone();
            pairs.sort_by_key(|&(_, t)| t);
            config.top_k = Some(config.top_k.unwrap_or(AUTHORS_TOP_K));
            let mut h = backward(&swapped(&pairs), &config)?;
            // Rows of B are columns of H = Bᵀ: each divided by its norm.
            let (m, p) = (h.d_from, h.d_to);
            for j in 0..p {
                let norm = (0..m).map(|i| h.h[i * p + j] * h.h[i * p + j]).sum::<f64>().sqrt();
                if !(norm > 0.0 && norm.is_finite()) {
                    return Err(SteerError::Numerical(format!(
                        "authors' transfer: row {j} of the fitted map has norm {norm} and cannot be normalised"
                    )));
                }
                for i in 0..m {
                    h.h[i * p + j] /= norm;
                }
            }
            let r = h.h.clone();
            (h, r, None)
        }
        TransferMap::TwoSided => {
            let h = fit_map(from, to, shared, &config)?;
            let g = backward(&swapped(&shared.pairs), &config).map_err(|e| {
                SteerError::Input(format!(
                    "two-sided transfer: the inverse fit E_from ≈ E_to G (target embeddings to source ones) failed: {e}"
                ))
            })?;
            let r = g.h.clone();
            (h, r, Some(g))
        }
    };
    let record = serde_json::json!({
        "map": config.map.name(),
        "formula": config.map.formula(),
        "inverse": inverse.as_ref().map(|g| serde_json::json!({
            "pairs_used": g.pairs_used,
            "ridge": g.ridge,
            "ridge_automatic": g.ridge_automatic,
            "relative_residual": g.relative_residual,
        })),
        "from_hidden_size": from.dim,
        "from_vocab_size": from.vocab,
        "from_embedding_fingerprint": steer.fingerprint(),
        "matching": shared.matching.name(),
        "shared_tokens": left.shared,
        "pairs_used": left.pairs_used,
        "top_k": config.top_k,
        "ridge": left.ridge,
        "ridge_automatic": left.ridge_automatic,
        "relative_residual": left.relative_residual,
        "residual_of": match config.map {
            TransferMap::Paper => "E_to G ≈ E_from, H = Gᵀ",
            TransferMap::Authors => "E_to B ≈ E_from before its rows were normalised",
            TransferMap::TwoSided => "E_from H ≈ E_to",
        },
    });
    let moved = apply_maps(steer, &left, &right, to, record)?;
    Ok((moved, left))
}

/// The steer `W' = Hᵀ W H` for the model with output embedding `to`, given a map `H` (`d_from × d_to`)
/// in the paper's sense (`e_v = H e'_v`, so `E_from ≈ E_to Hᵀ`). Note that [`fit_map`]`(from, to, …)` fits
/// the other direction (`E_to ≈ E_from M`): passing its `M` here gives the retired one-sided variant,
/// neither the paper's map nor the authors' (use [`transfer`] for those). `record` goes into
/// the training metadata under `"transfer"` (beside the source's settings, or as
/// `{"source": …, "transfer": …}` when those are not a JSON object).
pub fn apply_map(
    steer: &Steer,
    map: &EmbeddingMap,
    to: &EmbeddingView<'_>,
    record: serde_json::Value,
) -> Result<Steer> {
    apply_maps(steer, map, &map.h, to, record)
}

/// `W' = Hᵀ W R` in low-rank form (`P1' = Hᵀ P1`, `P2' = Rᵀ P2`), `R` (`d_from × d_to`, row-major) being
/// `H` itself or the transposed inverse fit.
fn apply_maps(
    steer: &Steer,
    map: &EmbeddingMap,
    right: &[f64],
    to: &EmbeddingView<'_>,
    record: serde_json::Value,
) -> Result<Steer> {
    if map.d_from != steer.hidden_size()
        || map.d_to != to.dim
        || map.h.len() != map.d_from * map.d_to
        || right.len() != map.h.len()
    {
        return Err(SteerError::Shape {
            what: "embedding map".into(),
            expected: format!("{} × {} (steer hidden size × target hidden size)", steer.hidden_size(), to.dim),
            found: format!("{} × {} ({} values)", map.d_from, map.d_to, map.h.len()),
        });
    }
    let (d, r, dt) = (steer.hidden_size(), steer.rank(), map.d_to);
    let mut p1 = Vec::with_capacity(steer.num_steers() * dt * r);
    let mut p2 = Vec::with_capacity(steer.num_steers() * dt * r);
    for s in 0..steer.num_steers() {
        for (src, m, dst) in [(steer.projector1(), &map.h[..], &mut p1), (steer.projector2(), right, &mut p2)] {
            let block: Vec<f64> = src[s * d * r..(s + 1) * d * r].iter().map(|&x| f64::from(x)).collect();
            dst.extend(matmul_tn(m, &block, d, dt, r).into_iter().map(|x| x as f32));
        }
    }
    let training = match steer.training() {
        serde_json::Value::Object(o) => {
            let mut o = o.clone();
            o.insert("transfer".into(), record);
            serde_json::Value::Object(o)
        }
        other => serde_json::json!({ "source": other, "transfer": record }),
    };
    let spec = SteerSpec {
        num_steers: steer.num_steers(),
        hidden_size: dt,
        rank: r,
        vocab_size: to.vocab,
        epsilon: steer.epsilon(),
        embedding_fingerprint: embedding_fingerprint(to.values),
        labels: steer.labels().to_vec(),
    };
    Steer::new(spec, p1, p2, training)
}
