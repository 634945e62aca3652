//! Discrete hidden Markov models: validation, the forward algorithm in matrix form (Eq. 4 of the
//! LM-Steer paper) and scaled, next-token distributions, sampling.

use memsteer_panel::rng::SplitMix64;

use crate::{HmmError, Result};

/// Tolerance for "sums to one".
pub const STOCHASTIC_TOL: f64 = 1e-9;

/// A hidden Markov model with `S` states and `V` observation symbols.
#[derive(Debug, Clone, PartialEq)]
pub struct Hmm {
    states: usize,
    vocab: usize,
    init: Vec<f64>,
    trans: Vec<f64>,
    emit: Vec<f64>,
}

fn check_probs(what: &'static str, values: &[f64], rows: usize, cols: usize) -> Result<()> {
    if values.len() != rows * cols {
        return Err(HmmError::Shape { what, expected: rows * cols, found: values.len() });
    }
    if let Some((index, &value)) = values.iter().enumerate().find(|(_, v)| !v.is_finite() || **v < 0.0) {
        return Err(HmmError::Value { what, index, value });
    }
    for (row, r) in values.chunks(cols.max(1)).enumerate() {
        let sum: f64 = r.iter().sum();
        if (sum - 1.0).abs() > STOCHASTIC_TOL {
            return Err(HmmError::NotStochastic { what, row, sum });
        }
    }
    Ok(())
}

impl Hmm {
    /// Builds a model from its initial distribution (`S`), row-stochastic transitions (`S×S`,
    /// `trans[s*S + s'] = P(s' | s)`) and emissions (`S×V`, `emit[s*V + o] = P(o | s)`).
    pub fn new(init: Vec<f64>, trans: Vec<f64>, emit: Vec<f64>) -> Result<Self> {
        let states = init.len();
        if states == 0 {
            return Err(HmmError::Shape { what: "initial distribution", expected: 1, found: 0 });
        }
        let vocab = emit.len() / states;
        check_probs("initial distribution", &init, 1, states)?;
        check_probs("transition matrix", &trans, states, states)?;
        if vocab == 0 {
            return Err(HmmError::Shape { what: "emission matrix", expected: states, found: emit.len() });
        }
        check_probs("emission matrix", &emit, states, vocab)?;
        Ok(Self { states, vocab, init, trans, emit })
    }

    /// The same model started from another initial distribution.
    pub fn with_init(&self, init: Vec<f64>) -> Result<Self> {
        Self::new(init, self.trans.clone(), self.emit.clone())
    }

    /// Number of states.
    pub fn states(&self) -> usize {
        self.states
    }

    /// Number of observation symbols.
    pub fn vocab(&self) -> usize {
        self.vocab
    }

    /// The initial distribution.
    pub fn init(&self) -> &[f64] {
        &self.init
    }

    /// The emission distribution of state `s`.
    pub fn emission_row(&self, s: usize) -> Vec<f64> {
        self.emit[s * self.vocab..(s + 1) * self.vocab].to_vec()
    }

    /// The transition matrix, `S×S` row-major.
    pub fn transition_matrix(&self) -> &[f64] {
        &self.trans
    }

    /// `P(o | s)` for all `s`: the vector `p(o)` of Eq. 4.
    pub fn emission_column(&self, o: usize) -> Vec<f64> {
        (0..self.states).map(|s| self.emit[s * self.vocab + o]).collect()
    }

    fn check_obs(&self, obs: &[usize]) -> Result<()> {
        match obs.iter().position(|&o| o >= self.vocab) {
            Some(position) => Err(HmmError::Observation { position, value: obs[position], vocab: self.vocab }),
            None => Ok(()),
        }
    }

    /// `P(o_1, …, o_T)` exactly as Eq. 4 writes it: `πᵀ (∏_t diag(p(o_t)) T) p(o_T)`. Underflows for
    /// long sequences; use [`Hmm::log_prob`] there.
    pub fn prob_matrix_form(&self, obs: &[usize]) -> Result<f64> {
        self.check_obs(obs)?;
        let Some((&last, head)) = obs.split_last() else { return Ok(1.0) };
        let s = self.states;
        let mut row = self.init.clone();
        for &o in head {
            // row ← row · diag(p(o)) · T
            let weighted: Vec<f64> = (0..s).map(|i| row[i] * self.emit[i * self.vocab + o]).collect();
            row = (0..s).map(|j| (0..s).map(|i| weighted[i] * self.trans[i * s + j]).sum()).collect();
        }
        Ok((0..s).map(|i| row[i] * self.emit[i * self.vocab + last]).sum())
    }

    /// The forward filter after `prefix`: `P(state at t+1 | o_1..o_t)` and `log P(o_1..o_t)`.
    pub fn filter(&self, prefix: &[usize]) -> Result<(Vec<f64>, f64)> {
        self.check_obs(prefix)?;
        let s = self.states;
        let mut alpha = self.init.clone();
        let mut log_p = 0.0;
        for &o in prefix {
            let weighted: Vec<f64> = (0..s).map(|i| alpha[i] * self.emit[i * self.vocab + o]).collect();
            let z: f64 = weighted.iter().sum();
            if z <= 0.0 {
                return Ok((vec![0.0; s], f64::NEG_INFINITY));
            }
            log_p += z.ln();
            alpha = (0..s).map(|j| (0..s).map(|i| weighted[i] * self.trans[i * s + j]).sum::<f64>() / z).collect();
        }
        Ok((alpha, log_p))
    }

    /// `log P(o_1, …, o_T)` by the scaled forward algorithm.
    pub fn log_prob(&self, obs: &[usize]) -> Result<f64> {
        self.filter(obs).map(|(_, lp)| lp)
    }

    /// `P(o_{t+1} = v | o_1..o_t)` for every `v`.
    pub fn next_token(&self, prefix: &[usize]) -> Result<Vec<f64>> {
        let (alpha, _) = self.filter(prefix)?;
        Ok((0..self.vocab).map(|v| (0..self.states).map(|i| alpha[i] * self.emit[i * self.vocab + v]).sum()).collect())
    }

    /// Samples a sequence of `len` observations.
    pub fn sample(&self, len: usize, rng: &mut SplitMix64) -> Vec<usize> {
        let pick = |p: &[f64], rng: &mut SplitMix64| {
            let u = rng.uniform();
            let mut acc = 0.0;
            for (i, &x) in p.iter().enumerate() {
                acc += x;
                if u < acc {
                    return i;
                }
            }
            p.len() - 1
        };
        let s = self.states;
        let mut state = pick(&self.init, rng);
        let mut out = Vec::with_capacity(len);
        for _ in 0..len {
            out.push(pick(&self.emit[state * self.vocab..(state + 1) * self.vocab], rng));
            state = pick(&self.trans[state * s..(state + 1) * s], rng);
        }
        out
    }
}

/// All sequences of length `len` over `vocab` symbols, in lexicographic order.
pub fn all_sequences(vocab: usize, len: usize) -> impl Iterator<Item = Vec<usize>> {
    let total = vocab.checked_pow(len as u32).unwrap_or(usize::MAX);
    (0..total).map(move |mut k| {
        let mut seq = vec![0; len];
        for slot in seq.iter_mut().rev() {
            *slot = k % vocab;
            k /= vocab;
        }
        seq
    })
}
