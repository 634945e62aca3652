//! Where a text carries a steer's style, and at what strength: the authors' two text analyses
//! (`evidence_words` and `steer_analysis` in their `model_base.py`), on hidden states the caller computed.
//!
//! - [`max_spans`]: at most `k` disjoint spans of at most `L` tokens with the largest total evidence, by
//!   dynamic programming (the authors' `find_max_subspans` is an exact optimum too; a greedy choice is not).
//! - [`detect`]: the text's mean token loss under a grid of strengths of the labelled steer, the strength
//!   that explains it best, the authors' softmax over the grid (a zero-shot style classifier) and per-token
//!   evidence `log P_best(x_t | x_<t) − log P_0(x_t | x_<t)` against strength 0. The dummy steer stays at 1
//!   throughout (memsteer's convention; the authors' grid holds it at 0), so the grid, the baseline and
//!   `steer generate` at the same strengths agree.
//!
//! ```
//! use memsteer_steer::evidence::{Span, max_spans};
//! let evidence = [None, Some(2.0), Some(-1.0), Some(2.0), Some(-5.0), Some(1.0)];
//! // One span of at most 3 tokens: 2 − 1 + 2 = 3 beats any single token.
//! assert_eq!(max_spans(&evidence, 1, 3), vec![Span { start: 1, end: 4, evidence: 3.0 }]);
//! // Two spans of one token each: 2 + 2.
//! let two = max_spans(&evidence, 2, 1);
//! assert_eq!(two.iter().map(|s| (s.start, s.end)).collect::<Vec<_>>(), vec![(1, 2), (3, 4)]);
//! ```

use crate::{Result, Steer, SteerError};

/// The authors' sharpness of the distribution over strengths: `softmax(10 · (mean loss − loss))`.
pub const AUTHORS_SHARPNESS: f64 = 10.0;

/// A span of tokens `start..end` (token indices into the text) with its summed evidence.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Span {
    /// First token.
    pub start: usize,
    /// One past the last token.
    pub end: usize,
    /// Summed evidence of its tokens.
    pub evidence: f64,
}

/// At most `max_spans` disjoint spans of 1 to `max_len` consecutive tokens maximising their total
/// evidence, each with a positive sum; tokens without evidence (`None`, e.g. the first token) are never in
/// a span. Exact (dynamic programming over tokens × spans used, `O(n · max_spans · max_len)`); among equal
/// totals the choice is deterministic (scanning from the end, leaving a token out first, then the shortest
/// span ending there). Returned strongest first (ties: the earlier).
pub fn max_spans(evidence: &[Option<f64>], max_spans: usize, max_len: usize) -> Vec<Span> {
    let n = evidence.len();
    if n == 0 || max_spans == 0 || max_len == 0 {
        return Vec::new();
    }
    let k = max_spans.min(n);
    // best[i][j]: the largest total over the first i tokens with at most j spans; choice[i][j]: the
    // length of the span ending at token i − 1 in that optimum (0: token i − 1 is not in a span).
    let width = k + 1;
    let mut best = vec![0.0f64; (n + 1) * width];
    let mut choice = vec![0usize; (n + 1) * width];
    for i in 1..=n {
        for j in 0..=k {
            let mut b = best[(i - 1) * width + j];
            let mut c = 0;
            if j > 0 {
                let mut sum = 0.0;
                for len in 1..=max_len.min(i) {
                    let Some(e) = evidence[i - len] else { break };
                    sum += e;
                    let total = best[(i - len) * width + j - 1] + sum;
                    if sum > 0.0 && total > b {
                        b = total;
                        c = len;
                    }
                }
            }
            best[i * width + j] = b;
            choice[i * width + j] = c;
        }
    }
    let (mut i, mut j) = (n, k);
    let mut spans = Vec::new();
    while i > 0 {
        let len = choice[i * width + j];
        if len == 0 {
            i -= 1;
        } else {
            let sum = evidence[i - len..i].iter().map(|e| e.unwrap_or(0.0)).sum();
            spans.push(Span { start: i - len, end: i, evidence: sum });
            i -= len;
            j -= 1;
        }
    }
    spans.sort_by(|a, b| b.evidence.total_cmp(&a.evidence).then(a.start.cmp(&b.start)));
    spans
}

/// The grid of strengths [`detect`] tries: `bins` values evenly from `min` to `max` (the authors' defaults:
/// −3 to 3 in 7 bins).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DetectConfig {
    /// Smallest strength.
    pub min: f32,
    /// Largest strength.
    pub max: f32,
    /// Number of strengths (at least 2).
    pub bins: usize,
}

impl Default for DetectConfig {
    fn default() -> Self {
        Self { min: -3.0, max: 3.0, bins: 7 }
    }
}

impl DetectConfig {
    /// The strengths, `min + (max − min) · i / (bins − 1)`.
    pub fn strengths(&self) -> Result<Vec<f32>> {
        if !(self.min.is_finite() && self.max.is_finite() && self.min < self.max) {
            return Err(SteerError::Config {
                field: "min/max",
                message: format!("expected finite strengths with min < max, found {} and {}", self.min, self.max),
            });
        }
        if self.bins < 2 || self.bins > 1 << 16 {
            return Err(SteerError::Config {
                field: "bins",
                message: format!("expected between 2 and 65536 strengths, found {}", self.bins),
            });
        }
        let step = (f64::from(self.max) - f64::from(self.min)) / (self.bins - 1) as f64;
        Ok((0..self.bins).map(|i| (f64::from(self.min) + step * i as f64) as f32).collect())
    }
}

/// What [`detect`] found for one text.
#[derive(Debug, Clone, PartialEq)]
pub struct Detection {
    /// The strengths tried.
    pub strengths: Vec<f32>,
    /// Mean `−log p(x_t | x_<t)` over the text's tokens after the first, at each strength (the labelled
    /// steer at that strength, the dummy at 1).
    pub losses: Vec<f64>,
    /// Index of the strength with the lowest loss (the first on ties).
    pub best: usize,
    /// `softmax(10 · (mean loss − loss))` over the strengths, as the authors compute it.
    pub distribution: Vec<f64>,
    /// Per token after the first: `log P_best(x_t | x_<t) − log P_0(x_t | x_<t)`, `P_0` the steer at
    /// strength 0 (the dummy at 1, as on the grid): positive where the best strength explains the token
    /// better than no labelled style does; all zero when the best strength is 0.
    pub evidence: Vec<f64>,
}

impl Detection {
    /// The best strength.
    pub fn best_strength(&self) -> f32 {
        self.strengths[self.best]
    }
}

/// Scores a text under each strength of `config` for the labelled steer (index 0, the dummy at 1):
/// `hidden` holds the final hidden states of the text's tokens but the last (`(n − 1) × d`), `targets`
/// the tokens after the first (`n − 1` of them), `output` the model's output layer
/// ([`crate::OutputLayer::of`]).
pub fn detect(
    steer: &Steer,
    hidden: &[f32],
    output: crate::OutputLayer<'_>,
    targets: &[u32],
    config: &DetectConfig,
) -> Result<Detection> {
    if steer.labels().is_empty() {
        return Err(SteerError::Input("detect: the steer has no labelled steer".into()));
    }
    if targets.is_empty() {
        return Err(SteerError::Input("detect: the text needs at least two tokens".into()));
    }
    let strengths = config.strengths()?;
    let mut labelled = vec![0.0f32; steer.labels().len()];
    let mut losses = Vec::with_capacity(strengths.len());
    let mut per_token = Vec::with_capacity(strengths.len());
    for &s in &strengths {
        labelled[0] = s;
        let lp = steer.log_prob_targets(hidden, output, targets, &steer.strengths(&labelled)?)?;
        if let Some((t, v)) = lp.iter().enumerate().find(|(_, v)| !v.is_finite()) {
            return Err(SteerError::Numerical(format!(
                "detect: log-probability of token {} at strength {s} is {v}",
                t + 1
            )));
        }
        losses.push(-lp.iter().map(|&x| f64::from(x)).sum::<f64>() / lp.len() as f64);
        per_token.push(lp);
    }
    let best = losses.iter().enumerate().fold(0, |b, (i, &l)| if l < losses[b] { i } else { b });
    let mean = losses.iter().sum::<f64>() / losses.len() as f64;
    let logits: Vec<f64> = losses.iter().map(|l| AUTHORS_SHARPNESS * (mean - l)).collect();
    let top = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let weights: Vec<f64> = logits.iter().map(|x| (x - top).exp()).collect();
    let z: f64 = weights.iter().sum();
    let distribution = weights.iter().map(|w| w / z).collect();
    labelled[0] = 0.0;
    let base = steer.log_prob_targets(hidden, output, targets, &steer.strengths(&labelled)?)?;
    let evidence = per_token[best].iter().zip(&base).map(|(&p, &q)| f64::from(p) - f64::from(q)).collect();
    Ok(Detection { strengths, losses, best, distribution, evidence })
}

/// [`detect`] on one text: its hidden states from `decoder`, the analysis, and the evidence per word
/// ([`word_evidence`]; words are the tokens' text from `tokenizer`, or the ids when there is none).
pub fn detect_text(
    decoder: &dyn memsteer_lm::Decoder,
    steer: &Steer,
    ids: &[u32],
    tokenizer: Option<&memsteer_lm::tokenizer::Tokenizer>,
    config: &DetectConfig,
) -> Result<(Detection, Vec<WordEvidence>)> {
    if ids.len() < 2 || ids.len() > decoder.context() {
        return Err(SteerError::Input(format!(
            "{} token(s); detection needs at least two and at most the model's context of {}",
            ids.len(),
            decoder.context()
        )));
    }
    let hidden = decoder.hidden_states(ids)?;
    let rows = &hidden[..(ids.len() - 1) * decoder.dim()];
    let detection = detect(steer, rows, crate::OutputLayer::of(decoder), &ids[1..], config)?;
    let pieces = match tokenizer {
        Some(t) => crate::highlight::token_pieces(t, ids)?,
        None => ids.iter().map(|i| format!(" {i}")).collect(),
    };
    let evidence: Vec<Option<f64>> =
        std::iter::once(None).chain(detection.evidence.iter().copied().map(Some)).collect();
    let words = word_evidence(&pieces, &evidence);
    Ok((detection, words))
}

/// A word of a text and its mean per-token evidence.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct WordEvidence {
    /// The word as it reads in the text (surrounding whitespace trimmed).
    pub word: String,
    /// Mean evidence of its tokens (`log P_best − log P_0` per token).
    pub evidence: f64,
}

/// Groups tokens into words: a new word starts at a piece that begins with whitespace, at punctuation,
/// and after punctuation; each word gets the mean evidence of its tokens that have one.
pub fn word_evidence(pieces: &[String], evidence: &[Option<f64>]) -> Vec<WordEvidence> {
    let is_punct = |s: &str| !s.trim().is_empty() && s.trim().chars().all(|c| c.is_ascii_punctuation());
    let mut words: Vec<(String, Vec<f64>)> = Vec::new();
    let mut prev_punct = true;
    for (piece, e) in pieces.iter().zip(evidence) {
        let punct = is_punct(piece);
        let starts = words.is_empty() || prev_punct || punct || piece.starts_with(char::is_whitespace);
        if starts {
            words.push((String::new(), Vec::new()));
        }
        let w = words.last_mut().expect("pushed above");
        w.0.push_str(piece);
        w.1.extend(e);
        prev_punct = punct;
    }
    words
        .into_iter()
        .filter(|(w, e)| !w.trim().is_empty() && !e.is_empty())
        .map(|(w, e)| WordEvidence { word: w.trim().to_string(), evidence: e.iter().sum::<f64>() / e.len() as f64 })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use memsteer_panel::rng::SplitMix64;

    /// Every set of disjoint spans (each 1..=max_len tokens with evidence, positive sum), at most k of
    /// them: the best total.
    fn brute_force(ev: &[Option<f64>], k: usize, max_len: usize) -> f64 {
        fn go(ev: &[Option<f64>], from: usize, k: usize, max_len: usize) -> f64 {
            if k == 0 || from >= ev.len() {
                return 0.0;
            }
            // Skip token `from`, or start a span there.
            let mut best = go(ev, from + 1, k, max_len);
            let mut sum = 0.0;
            for end in from + 1..=(from + max_len).min(ev.len()) {
                let Some(e) = ev[end - 1] else { break };
                sum += e;
                if sum > 0.0 {
                    best = best.max(sum + go(ev, end, k - 1, max_len));
                }
            }
            best
        }
        go(ev, 0, k, max_len)
    }

    #[test]
    fn spans_equal_brute_force_on_random_evidence() {
        let mut rng = SplitMix64::new(7);
        for case in 0..3000 {
            let n = 1 + (rng.uniform() * 11.0) as usize;
            let k = (rng.uniform() * 4.0) as usize;
            let max_len = 1 + (rng.uniform() * 4.0) as usize;
            let ev: Vec<Option<f64>> = (0..n)
                .map(|i| {
                    let u = rng.uniform();
                    (i > 0 && u > 0.08).then(|| ((rng.uniform() - 0.45) * 6.0 * 8.0).round() / 8.0)
                })
                .collect();
            let spans = max_spans(&ev, k, max_len);
            let total: f64 = spans.iter().map(|s| s.evidence).sum();
            let want = brute_force(&ev, k, max_len);
            assert!(
                (total - want).abs() < 1e-9,
                "case {case}: {ev:?} k={k} L={max_len}: {spans:?} ({total}) vs {want}"
            );
            assert!(spans.len() <= k);
            let mut sorted = spans.clone();
            sorted.sort_by_key(|s| s.start);
            for w in sorted.windows(2) {
                assert!(w[0].end <= w[1].start, "overlap: {spans:?}");
            }
            for s in &spans {
                assert!(s.end > s.start && s.end - s.start <= max_len && s.evidence > 0.0, "{s:?}");
                assert!(ev[s.start..s.end].iter().all(Option::is_some), "{s:?} covers a token without evidence");
                let sum: f64 = ev[s.start..s.end].iter().map(|e| e.unwrap()).sum();
                assert!((sum - s.evidence).abs() < 1e-12);
            }
            for w in spans.windows(2) {
                assert!(w[0].evidence >= w[1].evidence, "not strongest first: {spans:?}");
            }
        }
    }

    /// A case where taking the strongest window first loses: greedy takes [1, 3) (6) and then single
    /// tokens only (1); the optimum with two spans of at most 2 is [0, 2) and [2, 4) (4 + 4).
    #[test]
    fn spans_beat_greedy_where_greedy_is_wrong() {
        let ev = [Some(1.0), Some(3.0), Some(3.0), Some(1.0)];
        let spans = max_spans(&ev, 2, 2);
        assert_eq!(spans, vec![Span { start: 0, end: 2, evidence: 4.0 }, Span { start: 2, end: 4, evidence: 4.0 }]);
        assert_eq!(brute_force(&ev, 2, 2), 8.0);
    }

    /// The grid and the baseline both hold the dummy at 1: with a labelled steer that does nothing and a
    /// dummy that does, every strength explains the text equally, the distribution is uniform and the
    /// evidence is exactly zero (a baseline without the dummy would report the dummy's shift as evidence).
    #[test]
    fn detect_holds_the_dummy_at_one_everywhere() {
        let (d, r, vocab, n) = (4usize, 2usize, 7usize, 5usize);
        let mut rng = SplitMix64::new(3);
        let mut normals = |k: usize| (0..k).map(|_| rng.normal() as f32).collect::<Vec<f32>>();
        let embedding = normals(vocab * d);
        let hidden = normals(n * d);
        let targets: Vec<u32> = (0..n as u32).map(|t| (t * 3) % vocab as u32).collect();
        // Steer 0 (labelled) is zero; steer 1 (the dummy) is not.
        let mut p1 = vec![0.0f32; 2 * d * r];
        let mut p2 = vec![0.0f32; 2 * d * r];
        let (a, b) = (normals(d * r), normals(d * r));
        p1[d * r..].copy_from_slice(&a);
        p2[d * r..].copy_from_slice(&b);
        let spec = crate::SteerSpec {
            num_steers: 2,
            hidden_size: d,
            rank: r,
            vocab_size: vocab,
            epsilon: 0.5,
            embedding_fingerprint: crate::embedding_fingerprint(&embedding),
            labels: vec!["style".into()],
        };
        let steer = Steer::new(spec, p1, p2, serde_json::json!({})).unwrap();
        assert!(steer.has_dummy());
        let found =
            detect(&steer, &hidden, crate::OutputLayer::uncapped(&embedding), &targets, &DetectConfig::default())
                .unwrap();
        assert!(found.losses.iter().all(|&l| l == found.losses[0]), "{:?}", found.losses);
        assert_eq!(found.best, 0);
        assert!(found.distribution.iter().all(|&p| (p - 1.0 / 7.0).abs() < 1e-12));
        assert!(found.evidence.iter().all(|&e| e == 0.0), "{:?}", found.evidence);
        // The dummy itself does move the text: against no steer at all the log-probabilities differ.
        let with =
            steer.log_prob_targets(&hidden, crate::OutputLayer::uncapped(&embedding), &targets, &[0.0, 1.0]).unwrap();
        let without =
            steer.log_prob_targets(&hidden, crate::OutputLayer::uncapped(&embedding), &targets, &[0.0, 0.0]).unwrap();
        assert!(with.iter().zip(&without).any(|(x, y)| (x - y).abs() > 1e-3));
    }

    #[test]
    fn grid_of_strengths() {
        let c = DetectConfig::default();
        assert_eq!(c.strengths().unwrap(), vec![-3.0, -2.0, -1.0, 0.0, 1.0, 2.0, 3.0]);
        for bad in [
            DetectConfig { bins: 1, ..c },
            DetectConfig { min: 1.0, max: 1.0, ..c },
            DetectConfig { min: f32::NAN, ..c },
            DetectConfig { bins: usize::MAX, ..c },
        ] {
            assert!(bad.strengths().is_err(), "{bad:?}");
        }
    }
}
