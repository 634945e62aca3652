//! Next-token sampling: temperature, top-k and nucleus (top-p), driven by a caller-supplied uniform
//! draw so that every random choice comes from a seeded generator.

/// Sampling settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingConfig {
    /// Softmax temperature; 0 picks the most likely token.
    pub temperature: f32,
    /// Keep only the `k` most likely tokens.
    pub top_k: Option<usize>,
    /// Keep the smallest set of most likely tokens whose probability reaches `p`.
    pub top_p: Option<f32>,
}

impl Default for SamplingConfig {
    fn default() -> Self {
        Self { temperature: 1.0, top_k: None, top_p: None }
    }
}

/// The filtered, renormalised distribution `sample` draws from, as (token, probability) pairs sorted by
/// decreasing probability.
pub fn distribution(logits: &[f32], cfg: &SamplingConfig) -> Vec<(usize, f64)> {
    if logits.is_empty() {
        return Vec::new();
    }
    let argmax = logits.iter().enumerate().fold(0, |best, (i, &x)| if x > logits[best] { i } else { best });
    if cfg.temperature <= 0.0 {
        return vec![(argmax, 1.0)];
    }
    let t = f64::from(cfg.temperature);
    let m = f64::from(logits[argmax]);
    let mut probs: Vec<(usize, f64)> =
        logits.iter().enumerate().map(|(i, &x)| (i, ((f64::from(x) - m) / t).exp())).collect();
    probs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    if let Some(k) = cfg.top_k {
        probs.truncate(k.max(1));
    }
    let z: f64 = probs.iter().map(|p| p.1).sum();
    probs.iter_mut().for_each(|p| p.1 /= z);
    if let Some(top_p) = cfg.top_p {
        let mut acc = 0.0;
        let keep = probs
            .iter()
            .position(|p| {
                acc += p.1;
                acc >= f64::from(top_p)
            })
            .map_or(probs.len(), |i| i + 1);
        probs.truncate(keep);
        let z: f64 = probs.iter().map(|p| p.1).sum();
        probs.iter_mut().for_each(|p| p.1 /= z);
    }
    probs
}

/// A logit that is NaN or infinite: no distribution can be drawn from it (a NaN would make every
/// cumulative comparison false and silently return the last token; a `+∞` would swallow the rest).
#[derive(Debug, Clone, Copy, PartialEq, thiserror::Error)]
#[error("the logit of token {token} is {value}; the model produced a non-finite value, so no token can be sampled")]
pub struct NonFiniteLogit {
    /// The token whose logit is not finite (the first one).
    pub token: usize,
    /// Its value.
    pub value: f32,
}

/// Draws a token from `logits` with the uniform number `u ∈ [0, 1)`; refuses logits that hold a NaN
/// or an infinity (an empty slice draws token 0).
pub fn sample(logits: &[f32], cfg: &SamplingConfig, u: f64) -> Result<usize, NonFiniteLogit> {
    if let Some((token, &value)) = logits.iter().enumerate().find(|(_, x)| !x.is_finite()) {
        return Err(NonFiniteLogit { token, value });
    }
    Ok(draw(&distribution(logits, cfg), u))
}

/// The token of `dist` whose cumulative probability first exceeds `u` (the last one when rounding
/// leaves the sum below `u`; token 0 for an empty distribution).
fn draw(dist: &[(usize, f64)], u: f64) -> usize {
    let mut acc = 0.0;
    for &(tok, p) in dist {
        acc += p;
        if u < acc {
            return tok;
        }
    }
    dist.last().map_or(0, |d| d.0)
}

/// [`sample`] with the tokens `excluded` (sorted ascending) never drawn, as when a model's embedding
/// has more rows than its tokenizer has tokens; the other logits must be finite, and at least one
/// token must remain. With nothing excluded it is [`sample`].
pub fn sample_excluding(
    logits: &[f32],
    cfg: &SamplingConfig,
    u: f64,
    excluded: &[u32],
) -> Result<usize, NonFiniteLogit> {
    if excluded.is_empty() {
        return sample(logits, cfg, u);
    }
    let is_excluded = |i: usize| u32::try_from(i).is_ok_and(|i| excluded.binary_search(&i).is_ok());
    if let Some((token, &value)) = logits.iter().enumerate().find(|&(i, x)| !x.is_finite() && !is_excluded(i)) {
        return Err(NonFiniteLogit { token, value });
    }
    let mut masked = logits.to_vec();
    for &id in excluded {
        if let Some(x) = masked.get_mut(id as usize) {
            *x = f32::NEG_INFINITY;
        }
    }
    if masked.iter().all(|&x| x == f32::NEG_INFINITY) {
        return Err(NonFiniteLogit { token: 0, value: f32::NEG_INFINITY });
    }
    // Excluded tokens have probability 0; drop them so that rounding never falls through to one.
    let dist: Vec<(usize, f64)> = distribution(&masked, cfg).into_iter().filter(|&(_, p)| p > 0.0).collect();
    Ok(draw(&dist, u))
}
