//! Evaluating steered generations: the paper's diversity metric ([`distinct_n`]), conditional
//! perplexity ([`perplexities`]), the built-in sentiment scorer ([`sentiment::SentimentScorer`]) and the
//! external-scorer protocol ([`external_scores`]), as `memsteer steer eval` and `cargo xtask reproduce
//! steer` use them.
//!
//! ```
//! use memsteer_steer::eval::distinct_n;
//! // One prompt, two samples of three words: 5 distinct unigrams of 6 words.
//! let words = |s: &str| s.split_whitespace().map(String::from).collect::<Vec<_>>();
//! let d = distinct_n(&[vec![words("a b c"), words("a d e")]]);
//! assert_eq!(d[0], 5.0 / 6.0);
//! ```

mod files;
pub mod sentiment;

pub use files::{FileEval, PPL_CUTOFF, PerplexityModel, Scorer, evaluate};

use crate::{Result, SteerError};

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

/// Scores texts with an external program, the protocol of `memsteer steer eval --scorer-cmd`: runs
/// `sh -c cmd`, writes one JSON line `{"text": …}` per text to its stdin, and reads one finite number
/// per line from its stdout (blank lines skipped), exactly one per text. A failing command is an
/// error carrying its stderr.
pub fn external_scores(cmd: &str, texts: &[&str]) -> Result<Vec<f64>> {
    use std::io::Write as _;
    use std::process::{Command, Stdio};
    let err = |m: String| SteerError::Input(format!("--scorer-cmd {cmd:?}: {m}"));
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| err(format!("starting `sh -c`: {e}")))?;
    let mut input = String::new();
    for t in texts {
        input.push_str(&serde_json::json!({ "text": t }).to_string());
        input.push('\n');
    }
    let mut stdin = child.stdin.take().ok_or_else(|| err("no stdin".into()))?;
    let writer = std::thread::spawn(move || {
        // A scorer that exits without reading everything closes the pipe; its exit status tells.
        let _ = stdin.write_all(input.as_bytes());
    });
    let out = child.wait_with_output().map_err(|e| err(format!("waiting for it: {e}")))?;
    let _ = writer.join();
    if !out.status.success() {
        return Err(err(format!(
            "failed ({}); its stderr:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim_end()
        )));
    }
    let stdout = String::from_utf8(out.stdout).map_err(|_| err("stdout is not UTF-8".into()))?;
    let mut scores = Vec::new();
    for (i, line) in stdout.lines().enumerate() {
        let l = line.trim();
        if l.is_empty() {
            continue;
        }
        let x: f64 = l.parse().map_err(|_| err(format!("output line {} is not a number: {l:?}", i + 1)))?;
        if !x.is_finite() {
            return Err(err(format!("output line {} is not a finite number: {l:?}", i + 1)));
        }
        scores.push(x);
    }
    if scores.len() != texts.len() {
        return Err(err(format!(
            "expected {} scores (one per sample, one per line), got {}",
            texts.len(),
            scores.len()
        )));
    }
    Ok(scores)
}

/// Conditional perplexities `exp(−mean log p(x_t | x_<t))` over the tokens of each sequence from
/// index `first + 1` on (`first` = prompt length − 1, or 0 without a prompt), scored in packed chunks
/// of 16 on `model`'s device: chunks in parallel on the CPU, one at a time on a GPU (concurrent
/// callers would each hold a forward pass's buffers and gain nothing on its one stream).
pub fn perplexities(model: &memsteer_lm::DeviceModel, seqs: &[(Vec<u32>, usize)]) -> Result<Vec<f64>> {
    use rayon::prelude::*;
    if let Some((i, _)) = seqs.iter().enumerate().find(|(_, (s, first))| *first + 1 >= s.len()) {
        return Err(SteerError::Input(format!("sequence {i}: no token after its prompt to score")));
    }
    let chunks: Vec<&[(Vec<u32>, usize)]> = seqs.chunks(16).collect();
    let score = |chunk: &&[(Vec<u32>, usize)]| -> Result<Vec<f64>> {
        let refs: Vec<&[u32]> = chunk.iter().map(|(s, _)| s.as_slice()).collect();
        let lps = model.token_log_probs_batch(&refs)?;
        Ok(lps
            .iter()
            .zip(chunk.iter())
            .map(|(lp, (_, first))| {
                let tail = &lp[*first..];
                let mean = tail.iter().map(|&x| f64::from(x)).sum::<f64>() / tail.len() as f64;
                (-mean).exp()
            })
            .collect())
    };
    let per_chunk = if model.is_gpu() {
        chunks.iter().map(score).collect::<Result<Vec<_>>>()?
    } else {
        chunks.par_iter().map(score).collect::<Result<Vec<_>>>()?
    };
    Ok(per_chunk.into_iter().flatten().collect())
}

#[cfg(test)]
mod protocol_tests {
    use super::*;

    #[test]
    fn external_scores_read_one_number_per_text() {
        let texts = ["a", "bb", "ccc"];
        // Each line is {"text":"…"}: its length is 11 + the text's.
        assert_eq!(external_scores("awk '{ print length($0) }'", &texts).unwrap(), vec![12.0, 13.0, 14.0]);
        let e = external_scores("head -n 1 | awk '{ print 1 }'", &texts).unwrap_err().to_string();
        assert!(e.contains("expected 3 scores") && e.contains("got 1"), "{e}");
        let e = external_scores("echo inf; echo 1; echo 2", &texts).unwrap_err().to_string();
        assert!(e.contains("not a finite number"), "{e}");
        let e = external_scores("echo broken >&2; exit 4", &texts).unwrap_err().to_string();
        assert!(e.contains("failed") && e.contains("broken"), "{e}");
    }

    #[test]
    fn perplexities_of_the_continuation_only() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/lm/tiny-gpt2-f32");
        let model = memsteer_lm::DeviceModel::load(&dir, &memsteer_kernels::Device::Cpu).unwrap();
        let seq: Vec<u32> = vec![3, 1, 4, 1, 5, 9, 2];
        let lp = model.token_log_probs_batch(&[&seq]).unwrap().remove(0);
        // Prompt of 3 tokens: the continuation's 4 tokens are log-probs 2..6.
        let want = (-lp[2..].iter().map(|&x| f64::from(x)).sum::<f64>() / 4.0).exp();
        let many: Vec<(Vec<u32>, usize)> = (0..20).map(|_| (seq.clone(), 2)).collect();
        let got = perplexities(&model, &many).unwrap();
        assert_eq!(got.len(), 20);
        assert!(got.iter().all(|&g| (g - want).abs() <= 1e-12 * want), "{got:?} vs {want}");
        assert!(perplexities(&model, &[(vec![1, 2], 1)]).is_err());
    }
}
