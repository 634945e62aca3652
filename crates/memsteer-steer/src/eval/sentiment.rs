//! The built-in sentiment scorer (`memsteer steer eval`'s default): a logistic regression on hashed, lowercased
//! word unigrams (presence), trained deterministically on the 3,000 labelled UCI sentences that ship in
//! the binary (`fixtures/corpus/sentiment.jsonl`), 20% held out by hashed id to report its accuracy.

use std::sync::OnceLock;

use crate::{Result, SteerError};

const DATA: &str = include_str!("../../../../fixtures/corpus/sentiment.jsonl");
/// Number of hash buckets of the bag of words.
const BUCKETS: usize = 1 << 18;
/// Passes of stochastic gradient descent over the training split.
const EPOCHS: usize = 20;
/// Step size of stochastic gradient descent.
const LR: f64 = 0.1;
/// L2 penalty, applied to the weights a sentence touches.
const L2: f64 = 1e-4;
/// Seed of the shuffles and of the held-out split.
const SEED: u64 = 20_240_601;

/// A trained scorer and its held-out accuracy.
#[derive(Debug, Clone)]
pub struct SentimentScorer {
    weights: Vec<f64>,
    bias: f64,
    /// Share of the held-out sentences classified correctly at P(positive) ≥ 0.5.
    pub held_out_accuracy: f64,
    /// Sentences trained on.
    pub train_size: usize,
    /// Sentences held out.
    pub held_out_size: usize,
}

/// Lowercased words (runs of letters, digits and apostrophes), each hashed to a bucket; deduplicated.
fn features(text: &str) -> Vec<usize> {
    let lower = text.to_lowercase();
    let mut f: Vec<usize> = lower
        .split(|c: char| !(c.is_alphanumeric() || c == '\''))
        .map(|w| w.trim_matches('\''))
        .filter(|w| !w.is_empty())
        .map(|w| (memsteer_panel::rng::hash_key(SEED, w.as_bytes()) % BUCKETS as u64) as usize)
        .collect();
    f.sort_unstable();
    f.dedup();
    f
}

fn sigmoid(z: f64) -> f64 {
    1.0 / (1.0 + (-z).exp())
}

/// Whether a sentence id falls in the scorer's held-out 20% (never trained on; its accuracy is measured
/// there). `cargo xtask reproduce steer` trains its steer on these sentences, so the scorer that judges
/// the steered text never saw the steer's training data.
pub fn held_out(id: &str) -> bool {
    memsteer_panel::rng::hash_key(SEED ^ 0x5EED, id.as_bytes()).is_multiple_of(5)
}

impl SentimentScorer {
    /// The scorer trained on the embedded corpus, once per process.
    pub fn builtin() -> Result<&'static SentimentScorer> {
        static SCORER: OnceLock<std::result::Result<SentimentScorer, String>> = OnceLock::new();
        SCORER
            .get_or_init(|| Self::train_on(DATA).map_err(|e| format!("{e:#}")))
            .as_ref()
            .map_err(|e| SteerError::Input(format!("training the built-in sentiment scorer: {e}")))
    }

    /// Trains on JSON lines `{"id", "text", "label": "positive"|"negative"}`.
    pub fn train_on(data: &str) -> Result<SentimentScorer> {
        let mut train = Vec::new();
        let mut test = Vec::new();
        for (i, line) in data.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let v: serde_json::Value = serde_json::from_str(line)
                .map_err(|e| SteerError::Input(format!("sentiment corpus line {}: {e}", i + 1)))?;
            let (Some(id), Some(text), Some(label)) = (v["id"].as_str(), v["text"].as_str(), v["label"].as_str())
            else {
                return Err(SteerError::Input(format!(
                    "sentiment corpus line {}: expected `id`, `text` and `label` strings",
                    i + 1
                )));
            };
            let y = match label {
                "positive" => 1.0,
                "negative" => 0.0,
                other => {
                    return Err(SteerError::Input(format!("sentiment corpus line {}: unknown label {other:?}", i + 1)));
                }
            };
            let ex = (features(text), y);
            if held_out(id) { test.push(ex) } else { train.push(ex) }
        }
        if train.is_empty() || test.is_empty() {
            return Err(SteerError::Input("the sentiment corpus is too small to split".into()));
        }
        let mut weights = vec![0.0f64; BUCKETS];
        let mut bias = 0.0f64;
        let mut order: Vec<usize> = (0..train.len()).collect();
        let mut rng = memsteer_panel::rng::SplitMix64::new(SEED);
        for _ in 0..EPOCHS {
            // Fisher–Yates with the seeded stream.
            for i in (1..order.len()).rev() {
                let j = rng.below(i as u64 + 1) as usize;
                order.swap(i, j);
            }
            for &k in &order {
                let (f, y) = &train[k];
                let z = bias + f.iter().map(|&b| weights[b]).sum::<f64>();
                let g = sigmoid(z) - y;
                for &b in f {
                    weights[b] -= LR * (g + L2 * weights[b]);
                }
                bias -= LR * g;
            }
        }
        let mut scorer = SentimentScorer {
            weights,
            bias,
            held_out_accuracy: 0.0,
            train_size: train.len(),
            held_out_size: test.len(),
        };
        let correct = test.iter().filter(|(f, y)| (scorer.prob(f) >= 0.5) == (*y == 1.0)).count();
        scorer.held_out_accuracy = correct as f64 / test.len() as f64;
        Ok(scorer)
    }

    fn prob(&self, f: &[usize]) -> f64 {
        sigmoid(self.bias + f.iter().map(|&b| self.weights[b]).sum::<f64>())
    }

    /// P(positive) of a text.
    pub fn score(&self, text: &str) -> f64 {
        self.prob(&features(text))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_scorer_is_accurate_and_orders_obvious_sentences() {
        let s = SentimentScorer::builtin().expect("scorer");
        assert!(s.held_out_accuracy >= 0.7, "held-out accuracy {}", s.held_out_accuracy);
        assert!(s.score("I loved it, wonderful") > s.score("terrible, awful, I hated it"));
        assert_eq!(s.train_size + s.held_out_size, 3000);
    }
}
