//! What a server serves: the model, its tokenizer, end-of-sequence tokens and chat template, and the
//! steers loaded for it (each checked against the model at start-up).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use memsteer_lm::tokenizer::Tokenizer;
use memsteer_steer::Steer;
use serde_json::Value;

use crate::ServeError;
use crate::chat::ChatTemplate;

/// A steer file under the name requests use.
#[derive(Debug)]
pub struct NamedSteer {
    /// The name.
    pub name: String,
    /// The file.
    pub path: PathBuf,
    /// The steer.
    pub steer: Arc<Steer>,
}

/// The model and everything loaded with it.
#[derive(Debug)]
pub struct Served {
    /// The name `/v1/models` lists and requests may give.
    pub name: String,
    /// The model on the host: all of it on the CPU, its output layer only when a GPU runs it.
    pub model: HostModel,
    /// Its tokenizer.
    pub tokenizer: Tokenizer,
    /// Tokens that end a generation (from `generation_config.json`, `config.json` and
    /// `tokenizer_config.json`), inside the model's vocabulary.
    pub eos: Vec<u32>,
    /// The chat template, when the model has one.
    pub chat: Option<ChatTemplate>,
    /// The steers.
    pub steers: Vec<NamedSteer>,
    /// Unix time of loading (`created` in `/v1/models`).
    pub created: u64,
    /// Ids of the model's vocabulary that the tokenizer cannot decode (padded embedding rows, as
    /// Pythia's 50,304 rows for 50,277 tokens): never sampled.
    pub undecodable: Vec<u32>,
    /// Where decoding steps run.
    pub runner: Runner,
}

/// The model on the host.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)] // one per server
pub enum HostModel {
    /// The whole model (decoding on the CPU).
    Full(memsteer_lm::Model),
    /// Its shapes, output embedding and cap (decoding on a GPU): what the steers' checks and the
    /// server's shapes need, without a host copy of the weights.
    Head(memsteer_lm::HostHead),
}

impl HostModel {
    /// As a [`memsteer_lm::Decoder`] (the head's forward passes are errors).
    pub fn decoder(&self) -> &dyn memsteer_lm::Decoder {
        match self {
            HostModel::Full(m) => m.decoder(),
            HostModel::Head(h) => h,
        }
    }
}

/// Where the decoding steps run: the CPU model ([`Served::model`]), or a copy of the checkpoint on a
/// CUDA device whose KV caches live on the device. Steers, sampling and detokenising stay on the host.
#[derive(Debug)]
#[non_exhaustive]
pub enum Runner {
    /// On the CPU.
    Cpu,
    /// On a CUDA device.
    #[cfg(feature = "cuda")]
    Cuda(Box<memsteer_lm::gpu::GpuModel>),
}

/// Whether a new row starts ([`Served::admit`]).
#[derive(Debug)]
pub enum Admit {
    /// It starts, with this cache.
    Row(RowCache),
    /// Not now: the device needs the memory for the rows running.
    Wait,
    /// Never: it does not fit on the device even alone.
    NoRoom(String),
    /// Never: its cache could not be made for another reason than memory.
    Failed(String),
}

/// The admission rule of a row on a device: whether other rows run, whether the device keeps room for
/// its cache and their next step with it, and its cache (or why it could not be allocated: `(out of
/// memory, message)`). `Ok(Some)`: it starts; `Ok(None)`: it waits for the running rows; `Err`: it
/// cannot run (out of memory alone, or another error). The room is asked before the cache is made (a
/// row that waits takes nothing); a row alone always starts when its cache fits, since only its own
/// step can fail then.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))] // the CPU's caches grow: only a device admits
pub(crate) fn admission<C>(
    others: bool,
    room: impl FnOnce() -> bool,
    cache: impl FnOnce() -> Result<C, (bool, String)>,
) -> Result<Option<C>, (bool, String)> {
    if others && !room() {
        return Ok(None);
    }
    match cache() {
        Ok(c) => Ok(Some(c)),
        Err((true, _)) if others => Ok(None),
        Err(e) => Err(e),
    }
}

/// One row's keys and values, where its model runs.
#[derive(Debug)]
pub enum RowCache {
    /// In host memory.
    Cpu(memsteer_lm::KvCache),
    /// On the device.
    #[cfg(feature = "cuda")]
    Cuda(memsteer_lm::gpu::DeviceKvCache),
}

impl RowCache {
    /// Bytes its keys and values take.
    pub fn bytes(&self) -> usize {
        match self {
            RowCache::Cpu(c) => c.bytes(),
            #[cfg(feature = "cuda")]
            RowCache::Cuda(c) => c.bytes(),
        }
    }
}

fn read_json(path: &Path) -> Result<Option<Value>, ServeError> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|e| ServeError::Load(format!("{}: {e}", path.display())))?;
    serde_json::from_str(&text).map(Some).map_err(|e| ServeError::Load(format!("{}: not JSON: {e}", path.display())))
}

/// A special token as `tokenizer_config.json` writes it: a string or `{"content": …}`.
pub(crate) fn special_token(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(String::from),
        _ => None,
    }
}

impl Served {
    /// Loads the model in `dir` with its tokenizer and the steers `(name, file)`; a steer made for
    /// another model, a duplicate name or a missing tokenizer is an error naming it.
    pub fn load(dir: &Path, steers: &[(String, PathBuf)], name: Option<String>) -> Result<Self, ServeError> {
        Self::load_on(dir, steers, name, &memsteer_kernels::Device::Cpu)
    }

    /// [`Served::load`] with the decoding steps on `device` (a CUDA device needs the `cuda` feature; the
    /// host then keeps only the model's output layer, for the steers' checks and the shapes).
    pub fn load_on(
        dir: &Path,
        steers: &[(String, PathBuf)],
        name: Option<String>,
        device: &memsteer_kernels::Device,
    ) -> Result<Self, ServeError> {
        let runner = match device {
            memsteer_kernels::Device::Cpu => Runner::Cpu,
            #[cfg(feature = "cuda")]
            memsteer_kernels::Device::Cuda(_) => {
                let on = |e: memsteer_lm::LmError| ServeError::Load(format!("{} on {device:?}: {e}", dir.display()));
                let g = memsteer_lm::gpu::GpuModel::load(dir, device).map_err(on)?;
                // A model the device cannot decode (heads wider than the kernel takes) fails here, not
                // on every request.
                g.new_cache(1).map_err(on)?;
                Runner::Cuda(Box::new(g))
            }
            #[allow(unreachable_patterns)]
            other => return Err(ServeError::Load(format!("memsteer serve has no runtime for {other:?}"))),
        };
        let at = |e: memsteer_lm::LmError| ServeError::Load(format!("{}: {e}", dir.display()));
        let model = match runner {
            Runner::Cpu => HostModel::Full(memsteer_lm::Model::load(dir).map_err(at)?),
            #[cfg(feature = "cuda")]
            Runner::Cuda(_) => HostModel::Head(memsteer_lm::HostHead::load(dir).map_err(at)?),
        };
        if !memsteer_lm::tokenizer::present_in(dir) {
            return Err(ServeError::Load(format!(
                "{}: no tokenizer (tokenizer.json, or vocab.json + merges.txt); the server reads and writes text",
                dir.display()
            )));
        }
        let tokenizer = Tokenizer::from_dir(dir).map_err(|e| ServeError::Load(e.to_string()))?;
        let dec = model.decoder();
        let tokenizer_config = read_json(&dir.join("tokenizer_config.json"))?;
        // End-of-sequence ids from every file that names them.
        let mut eos: Vec<u32> = Vec::new();
        for file in ["generation_config.json", "config.json"] {
            if let Some(v) = read_json(&dir.join(file))? {
                match v.get("eos_token_id") {
                    Some(Value::Number(n)) => eos.extend(n.as_u64().map(|x| x as u32)),
                    Some(Value::Array(a)) => eos.extend(a.iter().filter_map(Value::as_u64).map(|x| x as u32)),
                    _ => {}
                }
            }
        }
        let eos_text = special_token(tokenizer_config.as_ref().and_then(|c| c.get("eos_token")));
        if let Some(id) = eos_text.as_deref().and_then(|t| tokenizer.token_to_id(t)) {
            eos.push(id);
        }
        eos.retain(|&id| (id as usize) < dec.vocab());
        eos.sort_unstable();
        eos.dedup();
        let chat = ChatTemplate::load(dir, tokenizer_config.as_ref())?;
        let mut loaded: Vec<NamedSteer> = Vec::new();
        for (steer_name, path) in steers {
            if steer_name.is_empty() || loaded.iter().any(|s| &s.name == steer_name) {
                return Err(ServeError::Load(format!(
                    "--steer {steer_name}={}: steer names must be non-empty and distinct",
                    path.display()
                )));
            }
            let steer = Steer::load_for(path, dec).map_err(|e| {
                ServeError::Load(format!("--steer {steer_name}={}: {e} (made for another model?)", path.display()))
            })?;
            if steer.labels().is_empty() {
                return Err(ServeError::Load(format!(
                    "--steer {steer_name}={}: the steer has no labelled steer to set a strength on",
                    path.display()
                )));
            }
            loaded.push(NamedSteer { name: steer_name.clone(), path: path.clone(), steer: Arc::new(steer) });
        }
        let name = name.unwrap_or_else(|| {
            dir.canonicalize()
                .ok()
                .and_then(|p| p.file_name().map(|f| f.to_string_lossy().into_owned()))
                .unwrap_or_else(|| "model".into())
        });
        let created = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let undecodable: Vec<u32> = (0..dec.vocab() as u32).filter(|&id| tokenizer.id_to_token(id).is_none()).collect();
        if undecodable.len() == dec.vocab() {
            return Err(ServeError::Load(format!(
                "{}: the tokenizer decodes none of the model's {} token ids",
                dir.display(),
                dec.vocab()
            )));
        }
        Ok(Self { name, model, tokenizer, eos, chat, steers: loaded, created, undecodable, runner })
    }

    /// A KV cache for a new row of at most `capacity` positions, where the model runs. On the CPU a
    /// cache grows as it fills, so a row always starts. On a GPU its memory is taken now, and when
    /// `others` rows run the device must keep room for the next step (`next_step`: its rows and output
    /// rows, `memsteer_lm::gpu::GpuModel::step_bytes`), so that a row that starts never makes the
    /// step of the rows already running fail: otherwise the row waits for them. With nothing else
    /// running a row always starts when its cache fits (a step that then fails fails only it).
    pub fn admit(&self, capacity: usize, next_step: (usize, usize), others: bool) -> Admit {
        let _ = (capacity, next_step, others);
        match &self.runner {
            Runner::Cpu => Admit::Row(RowCache::Cpu(memsteer_lm::KvCache::new())),
            #[cfg(feature = "cuda")]
            Runner::Cuda(g) => {
                let positions = capacity.min(self.context());
                // Checked before the cache is allocated, so a row that waits takes nothing.
                let room = || {
                    let need = g.cache_bytes(positions).saturating_add(g.step_bytes(next_step.0, next_step.1));
                    g.gpu().free_memory().is_ok_and(|(free, _)| free >= need)
                };
                let cache = || {
                    g.new_cache(positions).map_err(|e| (memsteer_lm::gpu::GpuModel::out_of_memory(&e), e.to_string()))
                };
                match admission(others, room, cache) {
                    Ok(Some(cache)) => Admit::Row(RowCache::Cuda(cache)),
                    Ok(None) => Admit::Wait,
                    Err((true, e)) => Admit::NoRoom(format!(
                        "a KV cache of {positions} positions (prompt + max_tokens) does not fit on the device: {e}"
                    )),
                    Err((false, e)) => Admit::Failed(format!("a KV cache of {positions} positions: {e}")),
                }
            }
        }
    }

    /// Final hidden states of a decoding step: `seqs[i]` continues `caches[i]` (which it extends),
    /// all rows of all sequences laid end to end (`Σ len × dim`).
    pub fn forward_step(&self, seqs: &[&[u32]], caches: &mut [&mut RowCache]) -> Result<Vec<f32>, String> {
        let wrong = || "internal: a row's KV cache is not where the model runs".to_string();
        let out = match &self.runner {
            Runner::Cpu => {
                let mut cpu = Vec::with_capacity(caches.len());
                for c in caches.iter_mut() {
                    #[allow(irrefutable_let_patterns)]
                    let RowCache::Cpu(c) = &mut **c else { return Err(wrong()) };
                    cpu.push(c);
                }
                self.model.decoder().forward_cached(seqs, &mut cpu)
            }
            #[cfg(feature = "cuda")]
            Runner::Cuda(g) => {
                let mut dev = Vec::with_capacity(caches.len());
                for c in caches.iter_mut() {
                    let RowCache::Cuda(c) = &mut **c else { return Err(wrong()) };
                    dev.push(c);
                }
                g.forward_cached(seqs, &mut dev)
            }
        };
        out.map_err(|e| format!("forward pass: {e}"))
    }

    /// Logits (soft-capped as the model says) of `rows` final hidden states (`rows × dim`), where the
    /// model runs.
    pub fn logits(&self, hidden: &[f32], rows: usize) -> Result<Vec<f32>, String> {
        let dec = self.model.decoder();
        let out = match &self.runner {
            Runner::Cpu => {
                let mut logits = vec![0.0f32; rows * dec.vocab()];
                memsteer_kernels::matmul_transposed(
                    &memsteer_kernels::Device::Cpu,
                    hidden,
                    dec.output_embedding(),
                    rows,
                    dec.dim(),
                    dec.vocab(),
                    &mut logits,
                )
                .map(|()| {
                    dec.logits_in_place(&mut logits);
                    logits
                })
                .map_err(|e| e.to_string())
            }
            #[cfg(feature = "cuda")]
            Runner::Cuda(g) => g.logits(hidden, rows).map_err(|e| e.to_string()),
        };
        out.map_err(|e| format!("output layer: {e}"))
    }

    /// The model's context length.
    pub fn context(&self) -> usize {
        self.model.decoder().context()
    }

    /// The model's vocabulary size.
    pub fn vocab(&self) -> usize {
        self.model.decoder().vocab()
    }

    /// The text of one token (as OpenAI's log-probabilities show tokens).
    pub fn token_text(&self, id: u32) -> String {
        self.tokenizer.decode(&[id]).unwrap_or_default()
    }

    /// `token`'s log-probability under `logits` at temperature 1 and the `top` most likely tokens.
    pub fn logprob(&self, logits: &[f32], token: u32, top: usize) -> crate::engine::TokenLogprob {
        let m = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let z: f64 = logits.iter().map(|&x| f64::from(x - m).exp()).sum();
        let lz = f64::from(m) + z.ln();
        let lp = |x: f32| (f64::from(x) - lz) as f32;
        let mut best: Vec<usize> = Vec::new();
        if top > 0 {
            let mut idx: Vec<usize> = (0..logits.len()).collect();
            let k = top.min(idx.len());
            idx.select_nth_unstable_by(k - 1, |&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
            idx.truncate(k);
            idx.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
            best = idx;
        }
        crate::engine::TokenLogprob {
            token: self.token_text(token),
            logprob: lp(logits[token as usize]),
            top: best.into_iter().map(|i| (self.token_text(i as u32), lp(logits[i]))).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::admission;

    #[test]
    fn a_row_waits_while_others_run_and_fails_only_alone() {
        let fits = || Ok::<u8, (bool, String)>(1);
        let full = || Err::<u8, _>((true, "out of memory".to_string()));
        let broken = || Err::<u8, _>((false, "an illegal address".to_string()));
        assert_eq!(admission(false, || false, fits), Ok(Some(1)), "alone, a cache that fits starts");
        assert_eq!(admission(true, || true, fits), Ok(Some(1)), "room left for the others' step");
        assert_eq!(admission(true, || false, fits), Ok(None), "no room for the others' step: wait");
        assert_eq!(admission(true, || true, full), Ok(None), "the cache does not fit while others run: wait");
        assert_eq!(admission(false, || true, full), Err((true, "out of memory".into())), "alone and no room");
        assert_eq!(admission(true, || true, broken), Err((false, "an illegal address".into())), "not memory: fails");
        // A row that waits makes no cache; alone, the room is not asked.
        let mut made = false;
        let _ = admission(
            true,
            || false,
            || {
                made = true;
                fits()
            },
        );
        assert!(!made, "a waiting row allocated its cache");
        let mut asked = false;
        let _ = admission(
            false,
            || {
                asked = true;
                true
            },
            fits,
        );
        assert!(!asked);
    }
}
