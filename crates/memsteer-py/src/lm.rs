//! Models and steers: `memsteer.Model` (log-probabilities, steered generation) and `memsteer.Steer`.

use std::path::PathBuf;

use memsteer_kernels::Device;
use memsteer_lm::DeviceModel;
use memsteer_lm::sample::SamplingConfig;
use memsteer_lm::tokenizer::Tokenizer;
use memsteer_steer::generate::{SteerSet, generate_samples};
use pyo3::prelude::*;
use pyo3::types::PyBytes;

use crate::{PyErrMessage, f64_bytes, input_error, run_detached, to_py};

/// One generated sample: prompt index, sample number, tokens and (with a tokenizer) text.
type Sample = (usize, usize, Vec<u32>, Option<String>);

/// A model directory loaded onto a device, with its tokenizer when it has one.
#[pyclass(module = "memsteer._native", frozen)]
#[derive(Debug)]
pub struct Model {
    model: DeviceModel,
    tokenizer: Option<Tokenizer>,
    dir: PathBuf,
    device: String,
}

impl Model {
    fn tokenizer(&self) -> PyResult<&Tokenizer> {
        self.tokenizer.as_ref().ok_or_else(|| {
            input_error(
                "InputError",
                format!(
                    "{}: no tokenizer (tokenizer.json, or vocab.json + merges.txt); give token ids instead of text",
                    self.dir.display()
                ),
            )
        })
    }

    fn decoder(&self) -> PyResult<&dyn memsteer_lm::Decoder> {
        self.model.decoder().map_err(to_py)
    }
}

/// Checks a batch of token-id sequences against the model, naming the sequence at fault.
fn check_ids(seqs: &[Vec<u32>], vocab: usize, min_len: usize) -> PyResult<()> {
    for (i, s) in seqs.iter().enumerate() {
        if s.len() < min_len {
            return Err(input_error(
                "InputError",
                format!("sequence {i}: expected at least {min_len} tokens, found {}", s.len()),
            ));
        }
        if let Some(t) = s.iter().find(|&&t| t as usize >= vocab) {
            return Err(input_error(
                "InputError",
                format!("sequence {i}: token id {t} is outside the model's vocabulary of {vocab}"),
            ));
        }
    }
    Ok(())
}

#[pymethods]
impl Model {
    #[new]
    #[pyo3(signature = (dir, device = "cpu", compute = "auto"))]
    fn new(py: Python<'_>, dir: PathBuf, device: &str, compute: &str) -> PyResult<Self> {
        let device_name = device.to_string();
        let compute = memsteer_lm::Compute::parse(compute).map_err(|e| input_error("InputError", e.to_string()))?;
        run_detached(py, (None, false), move |_| {
            let dev =
                Device::parse(&device_name).map_err(|e| PyErrMessage::input(format!("device {device_name:?}: {e}")))?;
            let model = DeviceModel::load_with(&dir, &dev, compute).map_err(|e| {
                let mut m = PyErrMessage::from_error(e);
                m.prefix(&format!("loading the model in {}", dir.display()));
                m
            })?;
            let tokenizer = if memsteer_lm::tokenizer::present_in(&dir) {
                Some(Tokenizer::from_dir(&dir).map_err(PyErrMessage::from_error)?)
            } else {
                None
            };
            Ok(Model { model, tokenizer, dir, device: device_name })
        })
    }

    /// The model's vocabulary size.
    #[getter]
    fn vocab_size(&self) -> PyResult<usize> {
        Ok(self.decoder()?.vocab())
    }

    /// The model's context length.
    #[getter]
    fn context(&self) -> PyResult<usize> {
        Ok(self.decoder()?.context())
    }

    /// The hidden size.
    #[getter]
    fn hidden_size(&self) -> PyResult<usize> {
        Ok(self.decoder()?.dim())
    }

    /// Where the model runs.
    #[getter]
    fn device(&self) -> String {
        self.device.clone()
    }

    /// What its products run in (`f32`, or `bf16 on amx kernels`, …), as `memsteer logprobs` prints.
    #[getter]
    fn compute(&self) -> String {
        self.model.compute()
    }

    /// The precision class of its products: `f32`, `bf16`, or on a GPU `cuda-` and the weights' type.
    #[getter]
    fn precision(&self) -> String {
        self.model.precision()
    }

    /// The model directory.
    #[getter]
    fn path(&self) -> String {
        self.dir.display().to_string()
    }

    /// Whether the directory has a tokenizer.
    #[getter]
    fn has_tokenizer(&self) -> bool {
        self.tokenizer.is_some()
    }

    /// Token ids of each text, with the tokenizer's special tokens (as `memsteer logprobs` reads text).
    fn encode(&self, texts: Vec<String>) -> PyResult<Vec<Vec<u32>>> {
        let tok = self.tokenizer()?;
        texts.iter().map(|t| tok.encode(t).map_err(to_py)).collect()
    }

    /// The text of token ids.
    fn decode(&self, ids: Vec<u32>) -> PyResult<String> {
        self.tokenizer()?.decode(&ids).map_err(to_py)
    }

    /// `log p(x_t | x_<t)` for `t ≥ 1` of every sequence, in packed batches of `batch_size`, as
    /// little-endian `f64` bytes per sequence.
    #[pyo3(signature = (seqs, batch_size = 8, threads = None, progress = false))]
    fn logprobs<'py>(
        &self,
        py: Python<'py>,
        seqs: Vec<Vec<u32>>,
        batch_size: usize,
        threads: Option<usize>,
        progress: bool,
    ) -> PyResult<Vec<Bound<'py, PyBytes>>> {
        let lps = self.token_log_probs(py, &seqs, batch_size, (threads, progress))?;
        Ok(lps.into_iter().map(|lp| f64_bytes(py, lp.into_iter().map(f64::from))).collect())
    }

    /// Each sequence's log-probability (the sum over `t ≥ 1`, in `f64`, as `memsteer logprobs` writes
    /// the panel's outcome), as little-endian `f64` bytes.
    #[pyo3(signature = (seqs, batch_size = 8, threads = None, progress = false))]
    fn sequence_logprobs<'py>(
        &self,
        py: Python<'py>,
        seqs: Vec<Vec<u32>>,
        batch_size: usize,
        threads: Option<usize>,
        progress: bool,
    ) -> PyResult<Bound<'py, PyBytes>> {
        let lps = self.token_log_probs(py, &seqs, batch_size, (threads, progress))?;
        Ok(f64_bytes(py, lps.iter().map(|lp| lp.iter().map(|&v| f64::from(v)).sum::<f64>())))
    }

    /// Steered samples as `memsteer steer generate` makes them: `(prompt, sample, tokens, text)` for
    /// `samples` samples of every prompt (prompt `i` keyed as the id `i` of a prompts file).
    #[pyo3(signature = (prompts, steers, max_new_tokens, temperature, top_p, top_k, samples, seed, threads = None))]
    #[allow(clippy::too_many_arguments)]
    fn generate(
        &self,
        py: Python<'_>,
        prompts: Vec<Vec<u32>>,
        steers: Vec<(PyRef<'_, Steer>, f32)>,
        max_new_tokens: usize,
        temperature: f32,
        top_p: Option<f32>,
        top_k: Option<usize>,
        samples: usize,
        seed: u64,
        threads: Option<usize>,
    ) -> PyResult<Vec<Sample>> {
        let dec = self.decoder()?;
        let mut set = Vec::new();
        for (i, (s, strength)) in steers.iter().enumerate() {
            s.steer.check_model(dec, &format!("steers[{i}]")).map_err(to_py)?;
            let strengths = s
                .steer
                .strengths_of_first(*strength)
                .map_err(|e| input_error("InputError", format!("steers[{i}]: {e}")))?;
            set.push((s.steer.clone(), strengths));
        }
        let set = SteerSet::new(set);
        let cfg = SamplingConfig { temperature, top_k, top_p };
        let keyed: Vec<(String, Vec<u32>)> = prompts.into_iter().enumerate().map(|(i, p)| (i.to_string(), p)).collect();
        let gens = run_detached(py, (threads, false), |w| {
            w.check();
            generate_samples(&self.model, &set, &keyed, (samples, max_new_tokens), &cfg, seed)
                .map_err(PyErrMessage::from_error)
        })?;
        gens.into_iter()
            .map(|g| {
                let text = match &self.tokenizer {
                    Some(t) => Some(t.decode(&g.tokens).map_err(to_py)?),
                    None => None,
                };
                Ok((g.prompt, g.sample, g.tokens, text))
            })
            .collect()
    }
}

impl Model {
    fn token_log_probs(
        &self,
        py: Python<'_>,
        seqs: &[Vec<u32>],
        batch_size: usize,
        (threads, progress): (Option<usize>, bool),
    ) -> PyResult<Vec<Vec<f32>>> {
        if batch_size == 0 {
            return Err(input_error("InputError", "batch_size must be at least 1".into()));
        }
        check_ids(seqs, self.decoder()?.vocab(), 2)?;
        run_detached(py, (threads, progress), |w| {
            w.begin("sequences", seqs.len() as u64);
            let mut out = Vec::with_capacity(seqs.len());
            for (b, batch) in seqs.chunks(batch_size).enumerate() {
                let refs: Vec<&[u32]> = batch.iter().map(Vec::as_slice).collect();
                let lps = self.model.token_log_probs_batch(&refs).map_err(|e| {
                    PyErrMessage::input(format!("sequences {}..{}: {e}", b * batch_size, b * batch_size + batch.len()))
                })?;
                out.extend(lps);
                w.add(batch.len() as u64);
            }
            Ok(out)
        })
    }
}

/// An LM-Steer steer file.
#[pyclass(module = "memsteer._native", frozen)]
#[derive(Debug)]
pub struct Steer {
    steer: memsteer_steer::Steer,
}

#[pymethods]
impl Steer {
    /// Loads a steer file.
    #[staticmethod]
    fn load(py: Python<'_>, path: PathBuf) -> PyResult<Self> {
        run_detached(py, (None, false), move |_| {
            let steer = memsteer_steer::Steer::load(&path).map_err(PyErrMessage::from_error)?;
            Ok(Steer { steer })
        })
    }

    /// Writes the steer file atomically.
    fn save(&self, path: PathBuf) -> PyResult<()> {
        self.steer.save(&path).map_err(to_py)
    }

    /// The labelled steers' names.
    #[getter]
    fn labels(&self) -> Vec<String> {
        self.steer.labels().to_vec()
    }

    /// Steers in the file (the labelled ones and the dummy).
    #[getter]
    fn num_steers(&self) -> usize {
        self.steer.num_steers()
    }

    /// Rank of each steer.
    #[getter]
    fn rank(&self) -> usize {
        self.steer.rank()
    }

    /// Hidden size of the model it steers.
    #[getter]
    fn hidden_size(&self) -> usize {
        self.steer.hidden_size()
    }

    /// Vocabulary size of the model it steers.
    #[getter]
    fn vocab_size(&self) -> usize {
        self.steer.vocab_size()
    }

    /// ε, the scale of every strength.
    #[getter]
    fn epsilon(&self) -> f32 {
        self.steer.epsilon()
    }

    /// Whether the steer was made for `model` (its output embedding's fingerprint).
    fn fits(&self, model: &Model) -> PyResult<bool> {
        Ok(self.steer.check_model(model.decoder()?, "steer").is_ok())
    }

    /// Trains a steer on `model` (frozen) as `memsteer steer train` does: the positive corpus at
    /// strength +1, the negative at −1; returns the steer and the loss of every step.
    #[staticmethod]
    #[pyo3(signature = (model, positive, negative, rank, steps, lr, batch_size, epsilon, max_length, weight_decay,
        init_std, seed, cache_memory, cache_dir, threads, progress = false))]
    #[allow(clippy::too_many_arguments)]
    fn train(
        py: Python<'_>,
        model: &Model,
        positive: Vec<Vec<u32>>,
        negative: Vec<Vec<u32>>,
        rank: Option<usize>,
        steps: usize,
        lr: f32,
        batch_size: usize,
        epsilon: f32,
        max_length: usize,
        weight_decay: f32,
        init_std: f32,
        seed: u64,
        cache_memory: f64,
        cache_dir: Option<PathBuf>,
        threads: Option<usize>,
        progress: bool,
    ) -> PyResult<(Steer, Vec<f64>)> {
        use memsteer_steer::{HiddenCache, TrainConfig, train_cached_on};
        let dec = model.decoder()?;
        check_ids(&positive, dec.vocab(), 0)?;
        check_ids(&negative, dec.vocab(), 0)?;
        if !(cache_memory.is_finite() && cache_memory >= 0.0) {
            return Err(input_error("InputError", format!("cache_memory: expected GiB ≥ 0, found {cache_memory}")));
        }
        let mut config = TrainConfig::default();
        config.rank = rank;
        config.steps = steps;
        config.lr = lr;
        config.batch_size = batch_size;
        config.epsilon = epsilon;
        config.max_length = max_length;
        config.weight_decay = weight_decay;
        config.seed = seed;
        config.init_std = init_std;
        config.validate().map_err(to_py)?;
        let budget = (cache_memory * (1u64 << 30) as f64).min(usize::MAX as f64) as usize;
        let device = model.model.device();
        let (steer, report) = run_detached(py, (threads, progress), |w| {
            w.begin("hidden states", 1);
            let cache =
                HiddenCache::build_with(dec, &positive, &negative, config.max_length, budget, cache_dir.as_deref())
                    .map_err(PyErrMessage::from_error)?;
            w.begin("steer", config.steps as u64);
            train_cached_on(&device, &cache, memsteer_steer::OutputLayer::of(dec), &config, &mut |_| w.add(1))
                .map_err(PyErrMessage::from_error)
        })?;
        Ok((Steer { steer }, report.losses))
    }

    /// The words each of the steer's `dims` strongest directions promotes and demotes, as
    /// `memsteer steer explain --json` prints them (JSON text).
    fn explain(&self, model: &Model, dims: usize, top: usize) -> PyResult<String> {
        let dec = model.decoder()?;
        self.steer.check_model(dec, "steer").map_err(to_py)?;
        let name = |id: u32| model.tokenizer.as_ref().and_then(|t| t.id_to_token(id));
        let config = memsteer_steer::explain::ExplainConfig { dims, top };
        let ex =
            memsteer_steer::explain::explain(&self.steer, dec.output_embedding(), &config, &name).map_err(to_py)?;
        serde_json::to_string(&ex).map_err(to_py)
    }

    /// Per-token evidence for the labelled steer at `strength` and the best spans, as `memsteer steer
    /// highlight --json` prints them (JSON text).
    fn highlight(
        &self,
        py: Python<'_>,
        model: &Model,
        text: &str,
        strength: f32,
        spans: usize,
        span_length: usize,
    ) -> PyResult<String> {
        let dec = model.decoder()?;
        self.steer.check_model(dec, "steer").map_err(to_py)?;
        let tok = model.tokenizer()?;
        let tokens = tok.encode(text).map_err(to_py)?;
        let h = run_detached(py, (None, false), |_| {
            memsteer_steer::highlight::highlight(dec, &self.steer, tok, tokens, strength, (spans, span_length))
                .map_err(PyErrMessage::from_error)
        })?;
        let mut json = h.json();
        json["label"] = self.steer.labels().first().cloned().unwrap_or_default().into();
        json["strength"] = strength.into();
        serde_json::to_string(&json).map_err(to_py)
    }

    /// The steer moved from the model `source` to `target` through a least-squares map between their
    /// output embeddings on the tokens they share (as `memsteer steer transfer`); returns it and the
    /// fit's relative residual.
    #[pyo3(signature = (source, target, map, top_k, ridge))]
    fn transfer(
        &self,
        py: Python<'_>,
        source: &Model,
        target: &Model,
        map: &str,
        top_k: Option<usize>,
        ridge: f64,
    ) -> PyResult<(Steer, f64)> {
        use memsteer_steer::transfer::{EmbeddingView, SharedTokens, TransferConfig, TransferMap, transfer};
        let map = match map {
            "paper" => TransferMap::Paper,
            "authors" => TransferMap::Authors,
            "two-sided" => TransferMap::TwoSided,
            other => {
                return Err(input_error(
                    "InputError",
                    format!("map: expected one of paper, authors, two-sided, found {other:?}"),
                ));
            }
        };
        if !(ridge.is_finite() && ridge >= 0.0) {
            return Err(input_error("InputError", format!("ridge must be a finite number ≥ 0, found {ridge}")));
        }
        let (from, to) = (source.decoder()?, target.decoder()?);
        self.steer.check_model(from, "steer").map_err(to_py)?;
        let shared = SharedTokens::of_dirs((&source.dir, from.vocab()), (&target.dir, to.vocab())).map_err(to_py)?;
        let config = TransferConfig { top_k, ridge, map };
        let (moved, report) = run_detached(py, (None, false), |_| {
            let views = EmbeddingView::of(from).and_then(|f| Ok((f, EmbeddingView::of(to)?)));
            let (f, t) = views.map_err(PyErrMessage::from_error)?;
            transfer(&self.steer, &f, &t, &shared, &config).map_err(PyErrMessage::from_error)
        })?;
        Ok((Steer { steer: moved }, report.relative_residual))
    }
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Model>()?;
    m.add_class::<Steer>()?;
    Ok(())
}
