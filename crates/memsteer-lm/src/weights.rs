//! Safetensors weights (single file or sharded with `model.safetensors.index.json`), memory-mapped,
//! each header parsed once, tensors converted to `f32` in bulk.
//!
//! This is the one module of the crate with `unsafe` code: mapping a file. A mapped file that another
//! process truncates or rewrites while it is mapped is undefined behaviour, as for every
//! memory-mapped reader (safetensors', candle's); checkpoints are read-only inputs, so memsteer maps
//! them, and converts every tensor to owned `f32` at load time so the mapping lives only as long as
//! [`Weights`].
#![allow(unsafe_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use safetensors::{Dtype, SafeTensors};

use crate::{LmError, Result};

/// One mapped weight file.
#[derive(Debug)]
struct File {
    path: PathBuf,
    bytes: memmap2::Mmap,
    /// Offset of the data section (after the 8-byte length and the JSON header).
    data_start: usize,
}

/// Where one tensor lives.
#[derive(Debug, Clone)]
struct Entry {
    file: usize,
    dtype: Dtype,
    shape: Vec<usize>,
    /// Byte range inside the file's data section.
    range: (usize, usize),
}

/// The weight files of a model directory, mapped, with every tensor's location.
#[derive(Debug)]
pub struct Weights {
    files: Vec<File>,
    index: HashMap<String, Entry>,
}

fn weight_paths(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join("model.safetensors");
    let sharded = dir.join("model.safetensors.index.json");
    if single.exists() {
        return Ok(vec![single]);
    }
    if sharded.exists() {
        let text = std::fs::read_to_string(&sharded).map_err(|source| LmError::Io { path: sharded.clone(), source })?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| LmError::Config { path: sharded.clone(), message: format!("not valid JSON: {e}") })?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| LmError::Config { path: sharded.clone(), message: "missing object `weight_map`".into() })?;
        let mut files = Vec::new();
        for (name, f) in map {
            let f = f.as_str().ok_or_else(|| LmError::Config {
                path: sharded.clone(),
                message: format!("`weight_map` entry {name:?} must name a file"),
            })?;
            files.push(f.to_string());
        }
        files.sort();
        files.dedup();
        return Ok(files.into_iter().map(|f| dir.join(f)).collect());
    }
    let pt = dir.join("pytorch_model.bin");
    let hint = if pt.exists() {
        " (found pytorch_model.bin: convert it to safetensors first, e.g. with the safetensors package's torch helpers; memsteer does not unpickle)"
    } else {
        ""
    };
    Err(LmError::Io {
        path: single,
        source: std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("no model.safetensors or model.safetensors.index.json{hint}"),
        ),
    })
}

pub(crate) fn map(path: &Path) -> Result<memmap2::Mmap> {
    let file = std::fs::File::open(path).map_err(|source| LmError::Io { path: path.into(), source })?;
    // SAFETY: the mapping is read-only and private to this process; see the module documentation
    // for the one remaining hazard (another process changing the file while it is mapped).
    unsafe { memmap2::Mmap::map(&file) }.map_err(|source| LmError::Io { path: path.into(), source })
}

impl Weights {
    /// Opens `model.safetensors` or the shards listed in `model.safetensors.index.json` under `dir`.
    pub fn open(dir: &Path) -> Result<Self> {
        let mut files: Vec<File> = Vec::new();
        let mut index = HashMap::new();
        for path in weight_paths(dir)? {
            let bytes = map(&path)?;
            let (header, meta) = SafeTensors::read_metadata(&bytes)
                .map_err(|e| LmError::Weights { path: path.clone(), message: e.to_string() })?;
            let data_start = 8 + header;
            let data_len = bytes.len().saturating_sub(data_start);
            for (name, info) in meta.tensors() {
                let (a, b) = info.data_offsets;
                if a > b || b > data_len {
                    return Err(LmError::Tensor {
                        path: path.clone(),
                        name,
                        message: format!("data offsets {a}..{b} lie outside the {data_len}-byte data section"),
                    });
                }
                let entry = Entry { file: files.len(), dtype: info.dtype, shape: info.shape.clone(), range: (a, b) };
                if let Some(first) = index.insert(name.clone(), entry) {
                    return Err(LmError::Tensor {
                        path: path.clone(),
                        name,
                        message: format!(
                            "also stored in {}; a tensor must live in one shard",
                            files[first.file].path.display()
                        ),
                    });
                }
            }
            files.push(File { path, bytes, data_start });
        }
        Ok(Self { files, index })
    }

    /// Whether any tensor is stored in `dtype`.
    pub fn has_dtype(&self, dtype: Dtype) -> bool {
        self.index.values().any(|e| e.dtype == dtype)
    }

    /// Tensor names.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.index.keys().map(String::as_str)
    }

    /// A tensor's stored element type and little-endian bytes, checking its shape and that its type
    /// is F32, F16 or BF16; `names` are alternatives as for [`Weights::tensor`].
    pub fn raw(&self, names: &[&str], shape: &[usize]) -> Result<(Dtype, &[u8])> {
        let Some((name, e)) = names.iter().find_map(|n| self.index.get(*n).map(|e| (*n, e))) else {
            let path = self.files.first().map(|f| f.path.clone()).unwrap_or_default();
            return Err(LmError::Tensor {
                path,
                name: names.first().copied().unwrap_or_default().to_string(),
                message: "missing".into(),
            });
        };
        let file = &self.files[e.file];
        let err = |message: String| LmError::Tensor { path: file.path.clone(), name: name.to_string(), message };
        if e.shape != shape {
            return Err(err(format!("shape {:?}, expected {:?}", e.shape, shape)));
        }
        let data = &file.bytes[file.data_start + e.range.0..file.data_start + e.range.1];
        let count: usize = shape.iter().product();
        let width = match e.dtype {
            Dtype::F32 => 4,
            Dtype::F16 | Dtype::BF16 => 2,
            other => return Err(err(format!("dtype {other:?} is not supported; expected F32, F16 or BF16"))),
        };
        if data.len() != count * width {
            return Err(err(format!("holds {} bytes, expected {} for shape {shape:?}", data.len(), count * width)));
        }
        Ok((e.dtype, data))
    }

    /// Loads a tensor as `f32`, checking its shape; `names` are alternatives (e.g. with and without a
    /// `transformer.` prefix).
    pub fn tensor(&self, names: &[&str], shape: &[usize]) -> Result<Vec<f32>> {
        let (dtype, data) = self.raw(names, shape)?;
        let mut out = vec![0.0f32; shape.iter().product()];
        decode(dtype, data, &mut out);
        Ok(out)
    }

    /// Tells the kernel that the mapped pages of the tensor (the first of `names` found) are not needed
    /// any more: it drops them from this process's resident memory (they are read back if touched again,
    /// the mapping being read-only). For loaders that have copied a tensor elsewhere.
    pub fn release(&self, names: &[&str]) {
        let Some(e) = names.iter().find_map(|n| self.index.get(*n)) else { return };
        let file = &self.files[e.file];
        #[cfg(unix)]
        // SAFETY: the map is read-only and never written (memmap2 maps files shared), so dropping its
        // page-table entries loses nothing: a later read faults the same bytes back in from the page
        // cache or the file, and every `&[u8]` into it stays valid. The range is widened to whole pages,
        // which may drop a neighbouring tensor's pages too; they fault back in the same way.
        let _ = unsafe {
            file.bytes.unchecked_advise_range(
                memmap2::UncheckedAdvice::DontNeed,
                file.data_start + e.range.0,
                e.range.1 - e.range.0,
            )
        };
        #[cfg(not(unix))]
        let _ = file;
    }

    /// A fingerprint of the weights: FNV-1a over every file's header and, for each tensor (by name),
    /// its byte length and 16 windows of up to 1 KiB spread evenly over its data, each part
    /// length-prefixed. Two checkpoints of one training run differ in every tensor, so they differ
    /// here; it reads at most 16 KiB per tensor, not the whole file.
    pub fn fingerprint(&self) -> String {
        const WINDOWS: usize = 16;
        const WINDOW: usize = 1024;
        let mut h = Fnv::default();
        let part = |h: &mut Fnv, bytes: &[u8]| {
            h.write(&(bytes.len() as u64).to_le_bytes());
            h.write(bytes);
        };
        for f in &self.files {
            part(&mut h, &f.bytes[..f.data_start.min(f.bytes.len())]);
        }
        let mut names: Vec<&String> = self.index.keys().collect();
        names.sort();
        for n in names {
            let e = &self.index[n];
            let f = &self.files[e.file];
            let data = &f.bytes[f.data_start + e.range.0..f.data_start + e.range.1];
            part(&mut h, n.as_bytes());
            let stride = data.len().saturating_sub(WINDOW) / (WINDOWS - 1);
            for w in 0..WINDOWS {
                let start = (w * stride).min(data.len());
                part(&mut h, &data[start..(start + WINDOW).min(data.len())]);
            }
        }
        format!("{:016x}", h.finish())
    }
}

use memsteer_panel::rng::Fnv1a as Fnv;

/// One tensor to write: name, dtype, shape and its little-endian bytes.
pub type TensorBytes<'a> = (&'a str, Dtype, Vec<usize>, &'a [u8]);

/// Serialises tensors and metadata in the safetensors format with a byte-stable header: metadata keys
/// sorted, tensors in the order given. (`safetensors::serialize` writes its metadata map in hash
/// order, so two runs that compute the same values could write different bytes.) Errors when a
/// tensor's byte length does not match its shape and dtype.
pub fn serialize_stable(
    tensors: &[TensorBytes<'_>],
    metadata: &std::collections::BTreeMap<String, String>,
) -> std::result::Result<Vec<u8>, String> {
    let mut header = serde_json::Map::new();
    if !metadata.is_empty() {
        let meta: serde_json::Map<String, serde_json::Value> =
            metadata.iter().map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone()))).collect();
        header.insert("__metadata__".into(), serde_json::Value::Object(meta));
    }
    let mut offset = 0usize;
    for (name, dtype, shape, bytes) in tensors {
        let count = shape.iter().try_fold(1usize, |a, &b| a.checked_mul(b));
        let need = count.and_then(|c| c.checked_mul(dtype.bitsize() / 8));
        if need != Some(bytes.len()) {
            return Err(format!(
                "tensor `{name}`: {} bytes do not hold a {dtype:?} tensor of shape {shape:?}",
                bytes.len()
            ));
        }
        header.insert(
            (*name).to_string(),
            serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + bytes.len()]}),
        );
        offset += bytes.len();
    }
    // serde_json's map keeps keys sorted, so the header is the same bytes for the same content.
    let mut json = serde_json::to_string(&serde_json::Value::Object(header)).map_err(|e| e.to_string())?;
    while !json.len().is_multiple_of(8) {
        json.push(' ');
    }
    let mut out = Vec::with_capacity(8 + json.len() + offset);
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(json.as_bytes());
    for (_, _, _, bytes) in tensors {
        out.extend_from_slice(bytes);
    }
    Ok(out)
}

/// `out[i]` = value `i` of little-endian `data` of type `dtype` (F32, F16 or BF16, as [`Weights::raw`]
/// returns them), widened exactly to `f32`.
pub(crate) fn decode(dtype: Dtype, data: &[u8], out: &mut [f32]) {
    use half::slice::HalfFloatSliceExt;
    match dtype {
        Dtype::F32 => {
            for (o, b) in out.iter_mut().zip(data.chunks_exact(4)) {
                *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
        Dtype::F16 => {
            let bits: Vec<half::f16> =
                data.chunks_exact(2).map(|b| half::f16::from_bits(u16::from_le_bytes([b[0], b[1]]))).collect();
            bits.convert_to_f32_slice(out);
        }
        _ => {
            let bits: Vec<half::bf16> =
                data.chunks_exact(2).map(|b| half::bf16::from_bits(u16::from_le_bytes([b[0], b[1]]))).collect();
            bits.convert_to_f32_slice(out);
        }
    }
}
