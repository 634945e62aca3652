//! A model loaded for a device, chosen once at load: callers score and decode through it without
//! branching on where it runs.

use std::path::Path;

use memsteer_kernels::Device;

use crate::{Compute, Decoder, LmError, Model, Result};

/// A checkpoint loaded where it runs: on the CPU, or (feature `cuda`) on a GPU, whose whole-sequence
/// forward passes (scoring, hidden states) run on the device. The CPU copy that cached decoding and
/// the host output embedding need is loaded the first time [`DeviceModel::decoder`] is asked for, so
/// scoring checkpoints on a GPU never reads the weights twice.
#[derive(Debug)]
#[non_exhaustive]
#[allow(clippy::large_enum_variant)] // one per process
pub enum DeviceModel {
    /// On the CPU.
    Cpu(Model),
    /// On a GPU.
    #[cfg(feature = "cuda")]
    Gpu(Box<GpuHalves>),
}

/// The GPU variant of [`DeviceModel`].
#[cfg(feature = "cuda")]
#[derive(Debug)]
pub struct GpuHalves {
    dir: std::path::PathBuf,
    device: Device,
    gpu: std::sync::Arc<crate::gpu::GpuModel>,
    decoder: std::sync::OnceLock<crate::gpu::GpuDecoder>,
}

impl DeviceModel {
    /// Loads `dir` (`config.json` and the weights) onto `device`, the CPU computing as
    /// [`crate::cpu::default_compute`] says (the command line's global `--compute`, which a GPU, whose
    /// products run in the weights' type, does not use).
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let compute = if matches!(device, Device::Cpu) { crate::cpu::default_compute() } else { Compute::Auto };
        Self::load_with(dir, device, compute)
    }

    /// Loads `dir` onto `device`, the CPU computing as `compute` says; a GPU multiplies in the weights'
    /// type and takes only [`Compute::Auto`].
    pub fn load_with(dir: &Path, device: &Device, compute: Compute) -> Result<Self> {
        if !matches!(device, Device::Cpu) && compute != Compute::Auto {
            return Err(LmError::Input(format!(
                "compute {:?} chooses the CPU's products; on {device:?} products run in the weights' type (use auto)",
                compute.name()
            )));
        }
        match device {
            #[cfg(feature = "cuda")]
            Device::Cuda(_) => Ok(DeviceModel::Gpu(Box::new(GpuHalves {
                dir: dir.to_path_buf(),
                device: device.clone(),
                gpu: std::sync::Arc::new(crate::gpu::GpuModel::load(dir, device)?),
                decoder: std::sync::OnceLock::new(),
            }))),
            Device::Cpu => Ok(DeviceModel::Cpu(Model::load_with(dir, compute)?)),
            other => Err(LmError::Input(format!("this build has no runtime for {other:?}"))),
        }
    }

    /// The device it runs on.
    pub fn device(&self) -> Device {
        match self {
            DeviceModel::Cpu(_) => Device::Cpu,
            #[cfg(feature = "cuda")]
            DeviceModel::Gpu(g) => g.device.clone(),
        }
    }

    /// What its products run in: the CPU model's [`Model::compute`], or the CUDA device.
    pub fn compute(&self) -> String {
        match self {
            DeviceModel::Cpu(m) => m.compute().to_string(),
            #[cfg(feature = "cuda")]
            DeviceModel::Gpu(g) => format!("{} products on {:?}", g.gpu.precision(), g.device),
        }
    }

    /// The precision class of its products ([`Model::precision`]; on a GPU `cuda-` and the weights'
    /// type).
    pub fn precision(&self) -> String {
        match self {
            DeviceModel::Cpu(m) => m.precision().to_string(),
            #[cfg(feature = "cuda")]
            DeviceModel::Gpu(g) => g.gpu.precision(),
        }
    }

    /// Whether it runs on a GPU (whose strength is whole-sequence passes over large batches, not
    /// cached decoding one token at a time).
    pub fn is_gpu(&self) -> bool {
        !matches!(self, DeviceModel::Cpu(_))
    }

    /// `log p(x_t | x_<t)` for `t = 1..T` of every sequence, in one packed forward pass on the device.
    pub fn token_log_probs_batch(&self, seqs: &[&[u32]]) -> Result<Vec<Vec<f32>>> {
        match self {
            DeviceModel::Cpu(m) => m.token_log_probs_batch(seqs),
            #[cfg(feature = "cuda")]
            DeviceModel::Gpu(g) => g.gpu.token_log_probs_batch(seqs),
        }
    }

    /// The model as a [`Decoder`]: hidden states of whole sequences on the device, cached decoding and
    /// the output embedding on the host (the CPU copy is loaded on the first call).
    pub fn decoder(&self) -> Result<&dyn Decoder> {
        match self {
            DeviceModel::Cpu(m) => Ok(m),
            #[cfg(feature = "cuda")]
            DeviceModel::Gpu(g) => {
                if g.decoder.get().is_none() {
                    let cpu = Model::load(&g.dir)?;
                    // Another thread may have set it meanwhile; either copy is the same model.
                    let _ = g.decoder.set(crate::gpu::GpuDecoder::new(cpu, g.gpu.clone()));
                }
                g.decoder
                    .get()
                    .map(|d| d as &dyn Decoder)
                    .ok_or_else(|| LmError::Input("the model's CPU copy could not be kept".into()))
            }
        }
    }
}
