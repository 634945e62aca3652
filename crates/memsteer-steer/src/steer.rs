//! The steer model `W_s = P1_s P2_sᵀ` and its safetensors file.

use std::path::Path;

use memsteer_kernels::{Device, Steers, log_prob_targets_capped, matmul_transposed, steered_projection};
use memsteer_lm::Decoder;
use safetensors::{Dtype, SafeTensors};

use crate::{OutputLayer, Result, SteerError};

/// Version of the steer file layout this crate writes and reads.
pub const FORMAT_VERSION: u32 = 1;

/// Values of the output embedding that the fingerprint reads at most (evenly spaced when there are more).
const FINGERPRINT_SAMPLES: usize = 1 << 20;

/// A fingerprint of an output embedding (`vocab × dim`): 64-bit FNV-1a over the little-endian bytes of
/// its length and of its values, all of them up to 2²⁰ values and an evenly spaced sample of 2²⁰ beyond
/// that. Stable across platforms and versions; 16 hexadecimal digits.
pub fn embedding_fingerprint(embedding: &[f32]) -> String {
    let mut h = memsteer_panel::rng::Fnv1a::default();
    h.write(&(embedding.len() as u64).to_le_bytes());
    let n = embedding.len();
    let samples = n.min(FINGERPRINT_SAMPLES);
    for k in 0..samples {
        // Evenly spaced indices, exact in integer arithmetic (u128 avoids overflow of k · n).
        let i = if n <= FINGERPRINT_SAMPLES { k } else { (k as u128 * n as u128 / samples as u128) as usize };
        h.write(&embedding[i].to_le_bytes());
    }
    format!("{:016x}", h.finish())
}

/// A set of LM-Steer steers for one base model.
///
/// `projector1` and `projector2` are `num_steers × hidden_size × rank` (row-major, `f32`); steer `s` is
/// `W_s = P1_s P2_sᵀ` and, at strengths `v`, the logits are `(h + ε Σ_s v_s (h P1_s) P2_sᵀ) Eᵀ`. The first
/// `labels.len()` steers are labelled; when there is one steer more, it is the dummy steer of training,
/// which absorbs the label-independent shift and is applied at strength 1 (see [`Steer::strengths`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Steer {
    projector1: Vec<f32>,
    projector2: Vec<f32>,
    num_steers: usize,
    hidden_size: usize,
    rank: usize,
    vocab_size: usize,
    epsilon: f32,
    embedding_fingerprint: String,
    labels: Vec<String>,
    training: serde_json::Value,
}

/// The shapes and identity of a [`Steer`] (everything but its projectors and training settings).
#[derive(Debug, Clone, PartialEq)]
pub struct SteerSpec {
    /// Number of steers, the dummy included.
    pub num_steers: usize,
    /// Hidden size `d` of the base model.
    pub hidden_size: usize,
    /// Rank of each steer.
    pub rank: usize,
    /// Vocabulary size of the base model.
    pub vocab_size: usize,
    /// The fixed scale ε.
    pub epsilon: f32,
    /// [`embedding_fingerprint`] of the base model's output embedding.
    pub embedding_fingerprint: String,
    /// Names of the labelled steers (`num_steers` or `num_steers − 1` of them).
    pub labels: Vec<String>,
}

impl Steer {
    /// A steer from its parts; checks the shapes, that every value is finite and that ε is finite.
    pub fn new(
        spec: SteerSpec,
        projector1: Vec<f32>,
        projector2: Vec<f32>,
        training: serde_json::Value,
    ) -> Result<Self> {
        let origin = Path::new("steer");
        let SteerSpec { num_steers, hidden_size, rank, vocab_size, epsilon, embedding_fingerprint, labels } = spec;
        let bad = |field: &str, message: String| SteerError::Format {
            path: origin.to_path_buf(),
            field: field.to_string(),
            message,
        };
        if num_steers == 0 || hidden_size == 0 || rank == 0 || vocab_size == 0 {
            return Err(bad(
                "shape",
                format!(
                    "expected num_steers, hidden_size, rank and vocab_size ≥ 1, found {num_steers}, {hidden_size}, {rank}, {vocab_size}"
                ),
            ));
        }
        if !epsilon.is_finite() {
            return Err(bad("epsilon", format!("expected a finite number, found {epsilon}")));
        }
        if labels.len() != num_steers && labels.len() + 1 != num_steers {
            return Err(bad(
                "labels",
                format!(
                    "expected {num_steers} or {} labels (one per steer, the dummy unlabelled), found {}",
                    num_steers - 1,
                    labels.len()
                ),
            ));
        }
        let want = num_steers * hidden_size * rank;
        for (name, p) in [("projector1", &projector1), ("projector2", &projector2)] {
            if p.len() != want {
                return Err(bad(
                    name,
                    format!("expected {want} values ({num_steers} × {hidden_size} × {rank}), found {}", p.len()),
                ));
            }
            if let Some(i) = p.iter().position(|x| !x.is_finite()) {
                return Err(bad(name, format!("expected finite values, found {} at index {i}", p[i])));
            }
        }
        Ok(Self {
            projector1,
            projector2,
            num_steers,
            hidden_size,
            rank,
            vocab_size,
            epsilon,
            embedding_fingerprint,
            labels,
            training,
        })
    }

    /// `P1`, `num_steers × hidden_size × rank`.
    pub fn projector1(&self) -> &[f32] {
        &self.projector1
    }
    /// `P2`, `num_steers × hidden_size × rank`.
    pub fn projector2(&self) -> &[f32] {
        &self.projector2
    }
    /// Number of steers, the dummy included.
    pub fn num_steers(&self) -> usize {
        self.num_steers
    }
    /// Hidden size of the base model.
    pub fn hidden_size(&self) -> usize {
        self.hidden_size
    }
    /// Rank of each steer.
    pub fn rank(&self) -> usize {
        self.rank
    }
    /// Vocabulary size of the base model.
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }
    /// The fixed scale ε.
    pub fn epsilon(&self) -> f32 {
        self.epsilon
    }
    /// Fingerprint of the base model's output embedding ([`embedding_fingerprint`]).
    pub fn fingerprint(&self) -> &str {
        &self.embedding_fingerprint
    }
    /// Names of the labelled steers.
    pub fn labels(&self) -> &[String] {
        &self.labels
    }
    /// Whether the last steer is a dummy steer (applied at strength 1).
    pub fn has_dummy(&self) -> bool {
        self.labels.len() + 1 == self.num_steers
    }
    /// The training settings recorded with the steer (`{}` when it was not trained).
    pub fn training(&self) -> &serde_json::Value {
        &self.training
    }
    /// The projectors as the kernels take them.
    pub fn as_steers(&self) -> Steers<'_> {
        Steers {
            p1: &self.projector1,
            p2: &self.projector2,
            steers: self.num_steers,
            dim: self.hidden_size,
            rank: self.rank,
        }
    }

    /// The strength of every steer given the strengths of the labelled ones (one per label, finite);
    /// the dummy steer, when there is one, gets 1.
    pub fn strengths(&self, labelled: &[f32]) -> Result<Vec<f32>> {
        if labelled.len() != self.labels.len() {
            return Err(SteerError::Input(format!(
                "strengths: expected one per labelled steer ({}), found {}",
                self.labels.len(),
                labelled.len()
            )));
        }
        if let Some(v) = labelled.iter().find(|v| !v.is_finite()) {
            return Err(SteerError::Input(format!("strengths: expected finite numbers, found {v}")));
        }
        let mut all = labelled.to_vec();
        if self.has_dummy() {
            all.push(1.0);
        }
        Ok(all)
    }

    /// Every steer's strength with the first labelled steer at `strength` (as `steer generate
    /// FILE:STRENGTH` dials it), other labelled steers at 0 and the dummy at 1; an error when the file
    /// has no labelled steer.
    pub fn strengths_of_first(&self, strength: f32) -> Result<Vec<f32>> {
        if self.labels.is_empty() {
            return Err(SteerError::Input("the steer has no labelled steer to set a strength on".into()));
        }
        let mut labelled = vec![0.0f32; self.labels.len()];
        labelled[0] = strength;
        self.strengths(&labelled)
    }

    /// Checks that the steer was made for `decoder` (hidden size, vocabulary size and output-embedding
    /// fingerprint); the error names `origin` and says to use `transfer`.
    pub fn check_model(&self, decoder: &dyn Decoder, origin: &str) -> Result<()> {
        let mismatch = |field: &'static str, steer: String, model: String| {
            Err(SteerError::ModelMismatch { source_name: origin.to_string(), field, steer, model })
        };
        if decoder.dim() != self.hidden_size {
            return mismatch("hidden_size", self.hidden_size.to_string(), decoder.dim().to_string());
        }
        if decoder.vocab() != self.vocab_size {
            return mismatch("vocab_size", self.vocab_size.to_string(), decoder.vocab().to_string());
        }
        let fp = embedding_fingerprint(decoder.output_embedding());
        if fp != self.embedding_fingerprint {
            return mismatch("embedding_fingerprint", self.embedding_fingerprint.clone(), fp);
        }
        Ok(())
    }

    /// Steered hidden states `h' = h + ε Σ_s v_s (h P1_s) P2_sᵀ` of `hidden` (`rows × hidden_size`), with
    /// `strengths` one per steer (see [`Steer::strengths`]).
    pub fn project(&self, hidden: &[f32], strengths: &[f32]) -> Result<Vec<f32>> {
        let mut out = vec![0.0f32; hidden.len()];
        steered_projection(&Device::Cpu, hidden, &self.as_steers(), strengths, self.epsilon, &mut out)?;
        Ok(out)
    }

    /// Steered logits `h' Eᵀ` (soft-capped when `output` has a cap), `rows × vocab`, for hidden states
    /// `rows × hidden_size`.
    pub fn logits(&self, hidden: &[f32], output: OutputLayer<'_>, strengths: &[f32]) -> Result<Vec<f32>> {
        let embedding = output.embedding();
        let d = self.hidden_size;
        if embedding.len() != self.vocab_size * d {
            return Err(SteerError::Input(format!(
                "output embedding: expected {} values (vocab {} × hidden size {d}), found {}",
                self.vocab_size * d,
                self.vocab_size,
                embedding.len()
            )));
        }
        let hp = self.project(hidden, strengths)?;
        let rows = hp.len() / d;
        let mut out = vec![0.0f32; rows * self.vocab_size];
        matmul_transposed(&Device::Cpu, &hp, embedding, rows, d, self.vocab_size, &mut out)?;
        output.cap(&mut out);
        Ok(out)
    }

    /// `log softmax(h' Eᵀ)[target]` (of soft-capped logits when `output` has a cap) for every row,
    /// through the kernels' fused output layer.
    pub fn log_prob_targets(
        &self,
        hidden: &[f32],
        output: OutputLayer<'_>,
        targets: &[u32],
        strengths: &[f32],
    ) -> Result<Vec<f32>> {
        let hp = self.project(hidden, strengths)?;
        let mut out = vec![0.0f32; targets.len()];
        let (e, cap) = (output.embedding(), output.softcap());
        log_prob_targets_capped(&Device::Cpu, &hp, e, self.hidden_size, targets, &mut out, cap)?;
        Ok(out)
    }

    /// Writes the steer as safetensors (tensors `projector1`, `projector2`; metadata `epsilon`, `rank`,
    /// `hidden_size`, `vocab_size`, `embedding_fingerprint`, `labels`, `training`, `format_version`),
    /// through a temporary file renamed into place.
    pub fn save(&self, path: &Path) -> Result<()> {
        let shape = vec![self.num_steers, self.hidden_size, self.rank];
        let b1 = f32_bytes(&self.projector1);
        let b2 = f32_bytes(&self.projector2);
        let fmt =
            |message: String| SteerError::Format { path: path.to_path_buf(), field: "safetensors".into(), message };
        let meta: std::collections::BTreeMap<String, String> = [
            ("epsilon", format_f32(self.epsilon)),
            ("rank", self.rank.to_string()),
            ("hidden_size", self.hidden_size.to_string()),
            ("vocab_size", self.vocab_size.to_string()),
            ("embedding_fingerprint", self.embedding_fingerprint.clone()),
            ("labels", serde_json::Value::from(self.labels.clone()).to_string()),
            ("training", self.training.to_string()),
            ("format_version", FORMAT_VERSION.to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        // Byte-stable header (sorted metadata), so the same steer is the same file in every run.
        let bytes = memsteer_lm::weights::serialize_stable(
            &[("projector1", Dtype::F32, shape.clone(), &b1), ("projector2", Dtype::F32, shape, &b2)],
            &meta,
        )
        .map_err(fmt)?;
        memsteer_panel::durable::write_bytes(path, &bytes)
            .map_err(|source| SteerError::Io { path: path.to_path_buf(), source })
    }

    /// Reads a steer file; every malformed part is an error naming the file and the field.
    pub fn load(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|source| SteerError::Io { path: path.to_path_buf(), source })?;
        let bad = |field: &str, message: String| SteerError::Format {
            path: path.to_path_buf(),
            field: field.to_string(),
            message,
        };
        let (_, header) = SafeTensors::read_metadata(&bytes)
            .map_err(|e| bad("safetensors", format!("expected a safetensors file ({e})")))?;
        let tensors = SafeTensors::deserialize(&bytes)
            .map_err(|e| bad("safetensors", format!("expected a safetensors file ({e})")))?;
        let meta = header.metadata().clone().unwrap_or_default();
        let field = |name: &str| -> Result<&String> {
            meta.get(name).ok_or_else(|| bad(name, "missing from the metadata".into()))
        };
        let version: u32 = field("format_version")?
            .parse()
            .map_err(|_| bad("format_version", format!("expected an integer, found {:?}", meta["format_version"])))?;
        if version != FORMAT_VERSION {
            return Err(bad("format_version", format!("expected {FORMAT_VERSION}, found {version}")));
        }
        let positive = |name: &str| -> Result<usize> {
            let s = field(name)?;
            match s.parse::<usize>() {
                Ok(v) if v > 0 => Ok(v),
                _ => Err(bad(name, format!("expected a positive integer, found {s:?}"))),
            }
        };
        let rank = positive("rank")?;
        let hidden_size = positive("hidden_size")?;
        let vocab_size = positive("vocab_size")?;
        let eps_text = field("epsilon")?;
        let epsilon: f32 = match eps_text.parse::<f32>() {
            Ok(e) if e.is_finite() => e,
            _ => return Err(bad("epsilon", format!("expected a finite number, found {eps_text:?}"))),
        };
        let embedding_fingerprint = field("embedding_fingerprint")?.clone();
        if embedding_fingerprint.len() != 16 || !embedding_fingerprint.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(bad(
                "embedding_fingerprint",
                format!("expected 16 hexadecimal digits, found {embedding_fingerprint:?}"),
            ));
        }
        let labels_text = field("labels")?;
        let labels: Vec<String> = serde_json::from_str(labels_text)
            .map_err(|e| bad("labels", format!("expected a JSON list of strings ({e})")))?;
        let training: serde_json::Value =
            serde_json::from_str(field("training")?).map_err(|e| bad("training", format!("expected JSON ({e})")))?;
        let mut num_steers = None;
        let mut read = |name: &str| -> Result<Vec<f32>> {
            let t = tensors.tensor(name).map_err(|_| bad(name, "tensor missing".into()))?;
            if t.dtype() != Dtype::F32 {
                return Err(bad(name, format!("expected dtype F32, found {:?}", t.dtype())));
            }
            let shape = t.shape();
            if shape.len() != 3 || shape[1] != hidden_size || shape[2] != rank || shape[0] == 0 {
                return Err(bad(
                    name,
                    format!("expected shape [num_steers, hidden_size {hidden_size}, rank {rank}], found {shape:?}"),
                ));
            }
            if *num_steers.get_or_insert(shape[0]) != shape[0] {
                return Err(bad(
                    name,
                    format!("expected {} steers like projector1, found {}", num_steers.unwrap_or(0), shape[0]),
                ));
            }
            let values: Vec<f32> =
                t.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
            if let Some(i) = values.iter().position(|x| !x.is_finite()) {
                return Err(bad(name, format!("expected finite values, found {} at index {i}", values[i])));
            }
            Ok(values)
        };
        let projector1 = read("projector1")?;
        let projector2 = read("projector2")?;
        let num_steers = num_steers.unwrap_or(0);
        let names: Vec<String> = tensors
            .names()
            .into_iter()
            .filter(|n| *n != "projector1" && *n != "projector2")
            .map(str::to_string)
            .collect();
        if !names.is_empty() {
            return Err(bad(&names[0], "unexpected tensor (a steer file holds projector1 and projector2 only)".into()));
        }
        if labels.len() != num_steers && labels.len() + 1 != num_steers {
            return Err(bad(
                "labels",
                format!(
                    "expected {num_steers} or {} labels for {num_steers} steers, found {}",
                    num_steers - 1,
                    labels.len()
                ),
            ));
        }
        let spec = SteerSpec { num_steers, hidden_size, rank, vocab_size, epsilon, embedding_fingerprint, labels };
        Steer::new(spec, projector1, projector2, training).map_err(|e| match e {
            SteerError::Format { field, message, .. } => bad(&field, message),
            other => other,
        })
    }

    /// [`Steer::load`], then [`Steer::check_model`] against `decoder`.
    pub fn load_for(path: &Path, decoder: &dyn Decoder) -> Result<Self> {
        let steer = Self::load(path)?;
        steer.check_model(decoder, &path.display().to_string())?;
        Ok(steer)
    }
}

fn f32_bytes(xs: &[f32]) -> Vec<u8> {
    xs.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Shortest text that parses back to the same `f32`.
fn format_f32(x: f32) -> String {
    format!("{x:?}")
}
