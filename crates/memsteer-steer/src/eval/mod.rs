//! Evaluating steered generations: the paper's diversity metric ([`distinct_n`]) and the built-in
//! sentiment scorer ([`sentiment::SentimentScorer`]), as `memsteer steer eval` and `cargo xtask reproduce
//! steer` use them.
//!
//! ```
//! use memsteer_steer::eval::distinct_n;
//! // One prompt, two samples of three words: 5 distinct unigrams of 6 words.
//! let words = |s: &str| s.split_whitespace().map(String::from).collect::<Vec<_>>();
//! let d = distinct_n(&[vec![words("a b c"), words("a d e")]]);
//! assert_eq!(d[0], 5.0 / 6.0);
//! ```

pub mod sentiment;

/// dist-1/2/3 as the LM-Steer (and DExperts) authors compute them: for each prompt, the distinct n-grams
/// over all its samples' words divided by the total number of words of those samples, averaged over
/// prompts. `groups[p]` holds the word lists of prompt p's samples; prompts without words are skipped.
pub fn distinct_n(groups: &[Vec<Vec<String>>]) -> [f64; 3] {
    let mut sums = [0.0f64; 3];
    let mut counted = 0usize;
    for samples in groups {
        let total: usize = samples.iter().map(Vec::len).sum();
        if total == 0 {
            continue;
        }
        counted += 1;
        for (n, sum) in (1..=3).zip(sums.iter_mut()) {
            let mut seen = std::collections::HashSet::new();
            for words in samples {
                for w in words.windows(n) {
                    seen.insert(w);
                }
            }
            *sum += seen.len() as f64 / total as f64;
        }
    }
    sums.map(|s| if counted == 0 { 0.0 } else { s / counted as f64 })
}
