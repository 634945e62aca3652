//! The host's part of a model whose blocks run elsewhere (`memsteer serve --device cuda`): its shapes,
//! its output embedding in f32 and its logit soft-cap, read from the checkpoint without loading, packing
//! or widening anything else.

use std::path::Path;

use crate::arch::{Arch, Slot};
use crate::weights::Weights;
use crate::{Decoder, KvCache, LmError, Result};

/// A model's output layer on the host, as a [`Decoder`] whose shapes, output embedding and cap are the
/// model's (the same values as [`crate::Model`]'s, so a steer's fingerprint check passes or fails
/// alike) and whose forward passes are errors: they run on a device. Holds `vocab × dim` floats, not
/// the model.
#[derive(Debug)]
pub struct HostHead {
    arch: Arch,
    embedding: Vec<f32>,
}

impl HostHead {
    /// Reads `dir/config.json` and the output embedding (the input embedding when tied) in f32.
    pub fn load(dir: &Path) -> Result<Self> {
        let arch = Arch::from_file(&dir.join("config.json"))?;
        arch.validate()?;
        let slot = if arch.tied { Slot::Embed } else { Slot::Head };
        let specs = arch.tensors();
        let spec = specs
            .iter()
            .find(|s| s.slot == slot)
            .ok_or_else(|| LmError::Input(format!("{}: the model has no output embedding", dir.display())))?;
        let embedding = Weights::open(dir)?.tensor(&spec.name_refs(), &spec.shape)?;
        Ok(Self { arch, embedding })
    }
}

impl Decoder for HostHead {
    fn forward_packed(&self, _: &[&[u32]], _: Option<&mut KvCache>) -> Result<Vec<f32>> {
        Err(LmError::Input(
            "only the output layer of this model is on the host: its forward passes run on the device".into(),
        ))
    }
    fn output_embedding(&self) -> &[f32] {
        &self.embedding
    }
    fn logit_softcap(&self) -> Option<f32> {
        self.arch.logit_softcap
    }
    fn dim(&self) -> usize {
        self.arch.dim
    }
    fn context(&self) -> usize {
        self.arch.context
    }
    fn vocab(&self) -> usize {
        self.arch.vocab
    }
}
