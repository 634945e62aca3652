//! LM-Steer (Han et al., "Word Embeddings Are Steers for Language Models") for memsteer.
//!
//! A steer is a low-rank linear map `W_s = P1_s P2_sᵀ` applied to a frozen model's final hidden state
//! `h` before the output layer: logits `= (h + ε Σ_s v_s (h P1_s) P2_sᵀ) Eᵀ`, with `v_s` each steer's
//! strength (any real number; negative reverses the style).
//!
//! - [`Steer`]: the parameters, steered projection / logits / log-probabilities, and the safetensors file
//!   (`projector1`, `projector2`, metadata) with checks that a steer belongs to the model it meets.
//! - [`train`]: training from a positive and a negative corpus on hidden states cached once, with Adam
//!   and the authors' dummy steer; [`fused`] holds the output layer's forward and backward with no
//!   `[tokens, vocab]` buffer.
//! - [`explain`]: the SVD of each steer and the tokens at both ends of its top singular directions.
//! - [`transfer`]: moves a steer to another model through least-squares maps between the two output
//!   embeddings: the paper's `W' = Hᵀ W H`, the authors' script, or the two-sided `Hᵀ W Gᵀ`.
//! - [`evidence`]: where a text carries the steer's style (exact best spans) and at which strength
//!   (`detect`: the authors' zero-shot classifier over a grid of strengths).
//!
//! ```
//! use memsteer_lm::Model;
//! use memsteer_steer::{TrainConfig, Steer, train};
//! let model = Model::load(std::path::Path::new("../../fixtures/lm/tiny-gpt2-f32"))?;
//! let positive = vec![vec![1u32, 2, 1, 2, 1, 2]; 4];
//! let negative = vec![vec![3u32, 4, 3, 4, 3, 4]; 4];
//! let mut config = TrainConfig::default();
//! config.steps = 5;
//! let (steer, report) = train(model.decoder(), &positive, &negative, &config, &mut |_| {})?;
//! assert_eq!(report.losses.len(), 5);
//! let path = std::env::temp_dir().join(format!("steer-doc-{}.safetensors", std::process::id()));
//! steer.save(&path)?;
//! let again = Steer::load_for(&path, model.decoder())?;
//! assert_eq!(again, steer);
//! // Strength +2 on the labelled steer (the dummy stays at 1).
//! let strengths = again.strengths(&[2.0])?;
//! let h = model.decoder().hidden_states(&[1, 2, 3])?;
//! let logits = again.logits(&h, memsteer_steer::OutputLayer::of(model.decoder()), &strengths)?;
//! assert_eq!(logits.len(), 3 * model.decoder().vocab());
//! # Ok::<(), memsteer_steer::SteerError>(())
//! ```
#![deny(missing_docs)]

#[cfg(feature = "cuda")]
pub mod cuda;
pub mod data;
mod error;
pub mod eval;
pub mod evidence;
pub mod explain;
pub mod fused;
pub mod generate;
pub mod highlight;
mod linalg;
mod steer;
mod train;
pub mod transfer;

pub use error::{Result, SteerError};
pub use fused::OutputLayer;
pub use steer::{FORMAT_VERSION, Steer, SteerSpec, embedding_fingerprint};
pub use train::{
    DEFAULT_MAX_RANK, HiddenCache, MAX_BATCH_SIZE, MAX_STEPS, Progress, TrainConfig, TrainReport, train, train_cached,
    train_cached_on,
};

/// The README's example, compiled and run as a doctest.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
