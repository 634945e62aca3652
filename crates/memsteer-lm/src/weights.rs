//! Safetensors weights (single file or sharded with `model.safetensors.index.json`), converted to `f32`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use safetensors::{Dtype, SafeTensors};

use crate::{LmError, Result};

/// The raw bytes of every weight file of a model directory.
#[derive(Debug)]
pub struct Weights {
    files: Vec<(PathBuf, Vec<u8>)>,
    /// Tensor name → index into `files`.
    index: HashMap<String, usize>,
}

impl Weights {
    /// Opens `model.safetensors` or the shards listed in `model.safetensors.index.json` under `dir`.
    pub fn open(dir: &Path) -> Result<Self> {
        let single = dir.join("model.safetensors");
        let sharded = dir.join("model.safetensors.index.json");
        let paths: Vec<PathBuf> = if single.exists() {
            vec![single]
        } else if sharded.exists() {
            let text =
                std::fs::read_to_string(&sharded).map_err(|source| LmError::Io { path: sharded.clone(), source })?;
            let v: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| LmError::Config { path: sharded.clone(), message: format!("not valid JSON: {e}") })?;
            let map = v.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| LmError::Config {
                path: sharded.clone(),
                message: "missing object `weight_map`".into(),
            })?;
            let mut files: Vec<String> = map.values().filter_map(|f| f.as_str().map(String::from)).collect();
            files.sort();
            files.dedup();
            files.into_iter().map(|f| dir.join(f)).collect()
        } else {
            let pt = dir.join("pytorch_model.bin");
            let hint = if pt.exists() {
                " (found pytorch_model.bin: convert it to safetensors first, e.g. with the safetensors package's torch helpers; memsteer does not unpickle)"
            } else {
                ""
            };
            return Err(LmError::Io {
                path: single,
                source: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!("no model.safetensors or model.safetensors.index.json{hint}"),
                ),
            });
        };
        let mut files = Vec::with_capacity(paths.len());
        let mut index = HashMap::new();
        for path in paths {
            let bytes = std::fs::read(&path).map_err(|source| LmError::Io { path: path.clone(), source })?;
            let names: Vec<String> = SafeTensors::deserialize(&bytes)
                .map_err(|e| LmError::Weights { path: path.clone(), message: e.to_string() })?
                .names()
                .into_iter()
                .map(String::from)
                .collect();
            for n in names {
                index.insert(n, files.len());
            }
            files.push((path, bytes));
        }
        Ok(Self { files, index })
    }

    /// The first of `names` present in the files.
    fn find<'n>(&self, names: &[&'n str]) -> Option<(&'n str, usize)> {
        names.iter().find_map(|n| self.index.get(*n).map(|&i| (*n, i)))
    }

    /// Loads a tensor as `f32`, checking its shape; `names` are alternatives (e.g. with and without a
    /// `transformer.` prefix).
    pub fn tensor(&self, names: &[&str], shape: &[usize]) -> Result<Vec<f32>> {
        let Some((name, file)) = self.find(names) else {
            let path = self.files.first().map(|f| f.0.clone()).unwrap_or_default();
            return Err(LmError::Tensor { path, name: names[0].to_string(), message: "missing".into() });
        };
        let (path, bytes) = &self.files[file];
        let err = |message: String| LmError::Tensor { path: path.clone(), name: name.to_string(), message };
        let st = SafeTensors::deserialize(bytes)
            .map_err(|e| LmError::Weights { path: path.clone(), message: e.to_string() })?;
        let view = st.tensor(name).map_err(|e| err(e.to_string()))?;
        if view.shape() != shape {
            return Err(err(format!("shape {:?}, expected {:?}", view.shape(), shape)));
        }
        let data = view.data();
        Ok(match view.dtype() {
            Dtype::F32 => data.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
            Dtype::F16 => data.chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
            Dtype::BF16 => data.chunks_exact(2).map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
            other => return Err(err(format!("dtype {other:?} is not supported; expected F32, F16 or BF16"))),
        })
    }
}
