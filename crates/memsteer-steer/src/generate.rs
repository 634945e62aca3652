//! Steered generation: steers with their strengths applied to the last hidden state, sampling from
//! seeded generators, either with a KV cache one token at a time (the CPU's strength) or by whole-
//! sequence forward passes over every stream at once (a GPU's), with the same tokens either way.

use memsteer_kernels::{Device, ResidentMatrix, matmul_transposed};
use memsteer_lm::sample::{SamplingConfig, sample};
use memsteer_lm::{Decoder, KvCache};
use memsteer_panel::rng::SplitMix64;

use crate::{Result, Steer, SteerError};

/// Steers loaded for one model with the strengths of every steer (dummy at 1).
#[derive(Debug, Clone, Default)]
pub struct SteerSet {
    steers: Vec<(Steer, Vec<f32>)>,
}

impl SteerSet {
    /// Steers and the strengths of each (as [`Steer::strengths`] gives them, dummy included).
    pub fn new(steers: Vec<(Steer, Vec<f32>)>) -> Self {
        Self { steers }
    }

    /// Whether no steer is applied.
    pub fn is_empty(&self) -> bool {
        self.steers.is_empty()
    }

    /// `h' = h + Σ_files (project_f(h) − h)`, i.e. every file's `ε Σ_s v_s (h P1_s) P2_sᵀ` added to `h`.
    pub fn apply(&self, h: &[f32]) -> Result<Vec<f32>> {
        let mut out = h.to_vec();
        for (steer, strengths) in &self.steers {
            let p = steer.project(h, strengths)?;
            for ((o, &pi), &hi) in out.iter_mut().zip(&p).zip(h) {
                *o += pi - hi;
            }
        }
        Ok(out)
    }
}

/// A continuation of `prompt` by `max_new` tokens with a KV cache, the steers applied to every
/// step's last hidden state, sampled from a generator seeded by `seed`.
pub fn steered_continuation(
    decoder: &dyn Decoder,
    set: &SteerSet,
    prompt: &[u32],
    max_new: usize,
    cfg: &SamplingConfig,
    seed: u64,
) -> Result<Vec<u32>> {
    let mut rng = SplitMix64::new(seed);
    let (d, vocab) = (decoder.dim(), decoder.vocab());
    let mut cache = KvCache::new();
    let mut out = Vec::with_capacity(max_new);
    let mut input: Vec<u32> = prompt.to_vec();
    let mut logits = vec![0.0f32; vocab];
    while out.len() < max_new {
        let hidden = decoder.forward(&input, &mut cache)?;
        let last = &hidden[hidden.len() - d..];
        if set.is_empty() {
            matmul_transposed(&Device::Cpu, last, decoder.output_embedding(), 1, d, vocab, &mut logits)?;
        } else {
            let h = set.apply(last)?;
            matmul_transposed(&Device::Cpu, &h, decoder.output_embedding(), 1, d, vocab, &mut logits)?;
        }
        decoder.logits_in_place(&mut logits);
        let next = sample(&logits, cfg, rng.uniform())
            .map_err(|e| SteerError::Input(format!("step {}: {e}", out.len())))? as u32;
        out.push(next);
        input.clear();
        input.push(next);
    }
    Ok(out)
}

/// Tokens of one whole-sequence forward pass of [`batched_continuations`] (bounds device memory), and
/// streams per logits product (`streams × vocab` values at once).
pub const BATCH_LIMITS: (usize, usize) = (1 << 16, 256);

/// Every continuation at once, for a decoder whose strength is whole-sequence forward passes (the GPU):
/// each step runs one packed forward pass (`forward_packed(…, None)`, no KV cache) over every stream's
/// tokens so far, steers each stream's last hidden state on the host as [`steered_continuation`] does,
/// computes the logits on `device` and samples each stream from its own generator seeded by `seeds`.
/// `(max_rows, max_logits)`: tokens per forward pass (a longer single stream still goes alone) and
/// streams per logits product.
/// With the same decoder numbers it gives [`steered_continuation`]'s tokens (tested on the CPU).
/// Recomputing the prefix makes a step cost the whole sequence: right for the short continuations of
/// steer evaluations, not for long ones.
pub fn batched_continuations(
    decoder: &dyn Decoder,
    device: &Device,
    set: &SteerSet,
    prompts: &[&[u32]],
    (seeds, name): (&[u64], &(dyn Fn(usize) -> String + Sync)),
    (max_new, cfg): (usize, &SamplingConfig),
    (max_rows, max_logits): (usize, usize),
) -> Result<Vec<Vec<u32>>> {
    if seeds.len() != prompts.len() {
        return Err(SteerError::Input(format!("{} seeds for {} prompts", seeds.len(), prompts.len())));
    }
    let (d, vocab) = (decoder.dim(), decoder.vocab());
    let mut seqs: Vec<Vec<u32>> = prompts.iter().map(|p| p.to_vec()).collect();
    let mut rngs: Vec<_> = seeds.iter().map(|&s| SplitMix64::new(s)).collect();
    let mut logits = Vec::new();
    // The output embedding stays on the device across steps.
    let embedding = ResidentMatrix::new(device, decoder.output_embedding(), vocab, d)?;
    // With MEMSTEER_GPU_PROFILE set: where the steps' time goes, on stderr at the end.
    let profile = std::env::var_os("MEMSTEER_GPU_PROFILE").is_some();
    let mut spent = [0.0f64; 4];
    let mut clock = std::time::Instant::now();
    let mut lap = |i: usize| {
        if profile {
            spent[i] += clock.elapsed().as_secs_f64();
            clock = std::time::Instant::now();
        }
    };
    for _ in 0..max_new {
        let mut start = 0;
        while start < seqs.len() {
            // The next group of streams: at least one, at most max_rows tokens otherwise.
            let (mut end, mut rows) = (start + 1, seqs[start].len());
            while end < seqs.len() && rows + seqs[end].len() <= max_rows {
                rows += seqs[end].len();
                end += 1;
            }
            let refs: Vec<&[u32]> = seqs[start..end].iter().map(Vec::as_slice).collect();
            lap(3);
            let hidden = decoder.forward_packed(&refs, None)?;
            lap(0);
            let mut last = Vec::with_capacity(refs.len() * d);
            let mut at = 0;
            for s in &refs {
                at += s.len();
                let row = &hidden[(at - 1) * d..at * d];
                if set.is_empty() {
                    last.extend_from_slice(row);
                } else {
                    last.extend(set.apply(row)?);
                }
            }
            for (c, rows) in last.chunks(max_logits.max(1) * d).enumerate() {
                let n = rows.len() / d;
                logits.resize(n * vocab, 0.0);
                lap(3);
                embedding.matmul_transposed(rows, n, &mut logits)?;
                decoder.logits_in_place(&mut logits);
                lap(1);
                // Each stream samples from its own generator: in parallel, the same tokens.
                use rayon::prelude::*;
                let first = start + c * max_logits.max(1);
                let streams = seqs[first..first + n].iter_mut().zip(&mut rngs[first..first + n]).zip(&prompts[first..]);
                let picked: Vec<Result<()>> = streams
                    .zip(logits.chunks(vocab))
                    .enumerate()
                    .collect::<Vec<_>>()
                    .into_par_iter()
                    .map(|(i, (((seq, rng), prompt), l))| {
                        let step = seq.len() - prompt.len();
                        let next = sample(l, cfg, rng.uniform())
                            .map_err(|e| SteerError::Input(format!("{}, step {step}: {e}", name(first + i))))?;
                        seq.push(next as u32);
                        Ok(())
                    })
                    .collect();
                picked.into_iter().collect::<Result<()>>()?;
                lap(2);
            }
            start = end;
        }
    }
    lap(3);
    if profile {
        let [forward, product, sampling, rest] = spent;
        eprintln!(
            "batched continuations: forward passes {forward:.2} s, logits products {product:.2} s, sampling {sampling:.2} s, \
             the rest (steering, grouping) {rest:.2} s"
        );
    }
    Ok(seqs.into_iter().zip(prompts).map(|(s, p)| s[p.len()..].to_vec()).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The batched path (what `--device cuda` runs) and the cached per-sample path give the same
    /// tokens from the same decoder and seeds: prompts of different lengths, several in one group and
    /// groups split by the row budget, with and without a steer, sampled and greedy.
    #[test]
    fn batched_continuations_equal_cached_decoding() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/lm/tiny-gpt2-f32");
        let model = memsteer_lm::Model::load(&dir).unwrap();
        let dec = model.decoder();
        let (d, vocab) = (dec.dim(), dec.vocab());
        let mut rng = SplitMix64::new(5);
        let prompts: Vec<Vec<u32>> =
            [1usize, 3, 7, 2, 5].iter().map(|&n| (0..n).map(|_| rng.below(vocab as u64) as u32).collect()).collect();
        let refs: Vec<&[u32]> = prompts.iter().map(Vec::as_slice).collect();
        let seeds: Vec<u64> = (0..prompts.len() as u64).map(|i| 100 + i).collect();
        let rank = 2;
        let p: Vec<f32> = (0..2 * 2 * d * rank).map(|_| rng.normal() as f32).collect();
        let spec = crate::SteerSpec {
            num_steers: 2,
            hidden_size: d,
            rank,
            vocab_size: vocab,
            epsilon: 0.5,
            embedding_fingerprint: crate::embedding_fingerprint(dec.output_embedding()),
            labels: vec!["x".into()],
        };
        let steer =
            Steer::new(spec, p[..2 * d * rank].to_vec(), p[2 * d * rank..].to_vec(), serde_json::json!({})).unwrap();
        let strengths = steer.strengths(&[-2.0]).unwrap();
        for (set, temperature) in [
            (SteerSet::new(Vec::new()), 1.0),
            (SteerSet::new(vec![(steer.clone(), strengths.clone())]), 1.0),
            (SteerSet::new(vec![(steer.clone(), strengths.clone())]), 0.0),
        ] {
            let cfg = SamplingConfig { temperature, top_k: None, top_p: None };
            let want: Vec<Vec<u32>> = refs
                .iter()
                .zip(&seeds)
                .map(|(prompt, &seed)| steered_continuation(dec, &set, prompt, 6, &cfg, seed).unwrap())
                .collect();
            // One group and one logits product; groups of a few streams (and a long stream alone) and
            // logits two streams at a time.
            for limits in [BATCH_LIMITS, (12, 2)] {
                let batched = batched_continuations(
                    dec,
                    &Device::Cpu,
                    &set,
                    &refs,
                    (&seeds, &|k| format!("stream {k}")),
                    (6, &cfg),
                    limits,
                )
                .unwrap();
                assert_eq!(batched, want, "temperature {temperature}, limits {limits:?}");
            }
            let batched = want;
            // Different streams draw different tokens (the comparison is not between constants).
            if temperature > 0.0 {
                assert!(batched.iter().any(|b| b != &batched[0]));
            }
        }
    }

    /// Sampling applies the model's logit soft-cap (tiny-gemma2: 3, which bends these logits): both
    /// decoding paths draw what sampling from `3·tanh(z/3)` of the products `z`, capped here by hand in
    /// `f64`, draws with the same generator, and not what the uncapped products draw.
    #[test]
    fn sampling_sees_the_soft_capped_logits() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/lm/tiny-gemma2");
        let model = memsteer_lm::Model::load(&dir).unwrap();
        let dec = model.decoder();
        assert_eq!(dec.logit_softcap(), Some(3.0));
        let (d, vocab) = (dec.dim(), dec.vocab());
        let cfg = SamplingConfig::default();
        let by_hand = |prompt: &[u32], seed: u64, cap: bool| -> Vec<u32> {
            let mut rng = SplitMix64::new(seed);
            let (mut cache, mut input, mut out) = (KvCache::new(), prompt.to_vec(), Vec::new());
            while out.len() < 12 {
                let h = dec.forward(&input, &mut cache).unwrap();
                let last = &h[h.len() - d..];
                let logits: Vec<f32> = (0..vocab)
                    .map(|v| {
                        let e = &dec.output_embedding()[v * d..(v + 1) * d];
                        let z: f64 = last.iter().zip(e).map(|(a, b)| f64::from(*a) * f64::from(*b)).sum();
                        (if cap { 3.0 * (z / 3.0).tanh() } else { z }) as f32
                    })
                    .collect();
                let next = sample(&logits, &cfg, rng.uniform()).unwrap() as u32;
                out.push(next);
                input = vec![next];
            }
            out
        };
        let prompts: [&[u32]; 3] = [&[5, 17, 3], &[60], &[1, 2, 3, 4, 5, 6, 7]];
        let seeds = [11u64, 12, 13];
        let cached: Vec<Vec<u32>> = prompts
            .iter()
            .zip(seeds)
            .map(|(p, s)| steered_continuation(dec, &SteerSet::default(), p, 12, &cfg, s).unwrap())
            .collect();
        let capped: Vec<Vec<u32>> = prompts.iter().zip(seeds).map(|(p, s)| by_hand(p, s, true)).collect();
        let uncapped: Vec<Vec<u32>> = prompts.iter().zip(seeds).map(|(p, s)| by_hand(p, s, false)).collect();
        assert_eq!(cached, capped);
        assert_ne!(cached, uncapped);
        let names = |k: usize| format!("stream {k}");
        let batched = batched_continuations(
            dec,
            &Device::Cpu,
            &SteerSet::default(),
            &prompts,
            (&seeds, &names),
            (12, &cfg),
            BATCH_LIMITS,
        )
        .unwrap();
        assert_eq!(batched, capped);
    }
}

/// One generated sample.
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    /// Index of the prompt.
    pub prompt: usize,
    /// Sample number (0-based).
    pub sample: usize,
    /// Generated token ids (the prompt excluded).
    pub tokens: Vec<u32>,
}

/// `samples` continuations of every prompt, `(key, tokens)`, as `memsteer steer generate` makes them:
/// sample `s` of the prompt keyed `k` is seeded with `hash_key(seed, "k\0s")`, so each sample is the
/// same whatever else is generated; on the CPU every sample decodes with its own KV cache (in parallel),
/// on a GPU all of them in packed whole-sequence passes (the same tokens). Returned prompt by prompt.
/// The settings, the prompts' ids and their room in the context are checked first.
pub fn generate_samples(
    model: &memsteer_lm::DeviceModel,
    set: &SteerSet,
    prompts: &[(String, Vec<u32>)],
    (samples, max_new): (usize, usize),
    cfg: &SamplingConfig,
    seed: u64,
) -> Result<Vec<Generation>> {
    use rayon::prelude::*;
    let decoder = model.decoder()?;
    let bad = |m: String| Err(SteerError::Input(m));
    if samples < 1 || max_new < 1 {
        return bad(format!("samples and max_new_tokens must be at least 1, found {samples} and {max_new}"));
    }
    if !(cfg.temperature.is_finite() && cfg.temperature >= 0.0) {
        return bad(format!("temperature must be a finite number ≥ 0, found {}", cfg.temperature));
    }
    if cfg.top_k == Some(0) {
        return bad("top_k must be at least 1".into());
    }
    if let Some(p) = cfg.top_p
        && !(p > 0.0 && p <= 1.0)
    {
        return bad(format!("top_p must be in (0, 1], found {p}"));
    }
    for (key, p) in prompts {
        if p.is_empty() {
            return bad(format!("prompt {key:?} has no tokens; generation needs at least one"));
        }
        if let Some(t) = p.iter().find(|&&t| t as usize >= decoder.vocab()) {
            return bad(format!(
                "prompt {key:?}: token id {t} is outside the model's vocabulary of {}",
                decoder.vocab()
            ));
        }
        // The last sampled token is never fed back, so it needs no position.
        if p.len().saturating_add(max_new - 1) > decoder.context() {
            return bad(format!(
                "prompt {key:?}: {} prompt tokens + {max_new} new tokens exceed the model's context of {} positions",
                p.len(),
                decoder.context()
            ));
        }
    }
    let work: Vec<(usize, usize)> = (0..prompts.len()).flat_map(|p| (0..samples).map(move |s| (p, s))).collect();
    let seed_of = |p: usize, s: usize| {
        let key = format!("{}\u{0}{s}", prompts[p].0);
        memsteer_panel::rng::hash_key(seed, key.as_bytes())
    };
    if model.is_gpu() {
        let starts: Vec<&[u32]> = work.iter().map(|&(p, _)| prompts[p].1.as_slice()).collect();
        let seeds: Vec<u64> = work.iter().map(|&(p, s)| seed_of(p, s)).collect();
        let name = |k: usize| format!("prompt {:?}, sample {}", prompts[work[k].0].0, work[k].1);
        let tokens = batched_continuations(
            decoder,
            &model.device(),
            set,
            &starts,
            (&seeds, &name),
            (max_new, cfg),
            BATCH_LIMITS,
        )?;
        return Ok(work
            .iter()
            .zip(tokens)
            .map(|(&(prompt, sample), tokens)| Generation { prompt, sample, tokens })
            .collect());
    }
    work.par_iter()
        .map(|&(p, s)| {
            let tokens = steered_continuation(decoder, set, &prompts[p].1, max_new, cfg, seed_of(p, s))
                .map_err(|e| SteerError::Input(format!("prompt {:?}, sample {s}: {e}", prompts[p].0)))?;
            Ok(Generation { prompt: p, sample: s, tokens })
        })
        .collect()
}
